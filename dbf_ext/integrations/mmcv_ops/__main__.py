"""``python -m dbf_ext.integrations.mmcv_ops SCRIPT [ARGS...]`` (or ``-m MODULE [ARGS...]``):
installs the ``mmcv._ext`` shim, then runs the script or module as ``__main__`` with ``ARGS``.

For scripts that import ``mmdet.models`` / ``mmrotate.models`` before they read a config,
such as mmdet 2.x's and mmrotate's ``tools/train.py`` and ``tools/test.py``. Works under
``torchrun`` too: ``torchrun --nproc_per_node 2 -m dbf_ext.integrations.mmcv_ops tools/train.py
CONFIG --launcher pytorch``.
"""

from __future__ import annotations

import os
import runpy
import sys

from dbf_ext.integrations.mmcv_ops import install

_USAGE = "usage: python -m dbf_ext.integrations.mmcv_ops (SCRIPT | -m MODULE) [ARGS...]"


def main(argv: list[str]) -> None:
    if not argv or argv[0] in ("-h", "--help") or argv == ["-m"]:
        asked = argv[:1] in (["-h"], ["--help"])
        print(_USAGE, file=sys.stdout if asked else sys.stderr)
        raise SystemExit(0 if asked else 2)
    install()
    if argv[0] == "-m":
        sys.argv = argv[1:]
        runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
    else:
        sys.argv = list(argv)
        # as `python SCRIPT` does: the script's folder first on the import path
        sys.path.insert(0, os.path.dirname(os.path.abspath(argv[0])))
        runpy.run_path(argv[0], run_name="__main__")


if __name__ == "__main__":
    main(sys.argv[1:])
