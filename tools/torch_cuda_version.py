"""Prints the CUDA version the installed torch was built for ("13.0"), or nothing.

Run by CMake with ``python -I`` so that pip's build isolation does not hide the environment's
torch; torch is located, not imported (reading ``torch/version.py`` takes milliseconds).
"""

import importlib.util
import re
from pathlib import Path

spec = importlib.util.find_spec("torch")
if spec is not None and spec.submodule_search_locations:
    version_file = Path(list(spec.submodule_search_locations)[0]) / "version.py"
    try:
        text = version_file.read_text()
    except OSError:
        text = ""
    match = re.search(r"^cuda\b[^=\n]*=\s*['\"](\d+\.\d+)", text, re.MULTILINE)
    if match:
        print(match.group(1))
