"""``python -m dbf_ext.integrations.mmcv_ops SCRIPT [ARGS...]`` (or ``-m MODULE [ARGS...]``):
installs the ``mmcv._ext`` shim, then runs the script or module as ``__main__`` with ``ARGS``.

For scripts that import ``mmdet.models`` / ``mmrotate.models`` before they read a config,
such as mmdet 2.x's and mmrotate's ``tools/train.py`` and ``tools/test.py``. Works under
``torchrun`` too: ``torchrun --nproc_per_node 2 -m dbf_ext.integrations.mmcv_ops tools/train.py
CONFIG --launcher pytorch``.
"""

from __future__ import annotations

import runpy
import sys

from dbf_ext.integrations.mmcv_ops import install

_USAGE = "usage: python -m dbf_ext.integrations.mmcv_ops (SCRIPT | -m MODULE) [ARGS...]"


def main(argv: list[str]) -> None:
    if not argv or argv[0] in ("-h", "--help") or (argv[0] == "-m" and len(argv) < 2):
        print(_USAGE, file=sys.stderr if argv[:1] != ["-h"] and argv[:1] != ["--help"] else sys.stdout)
        raise SystemExit(0 if argv[:1] in (["-h"], ["--help"]) else 2)
    install()
    if argv[0] == "-m":
        sys.argv = [argv[1], *argv[2:]]
        runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
    else:
        sys.argv = list(argv)
        sys.path.insert(0, __import__("os").path.dirname(argv[0]) or ".")
        runpy.run_path(argv[0], run_name="__main__")


if __name__ == "__main__":
    main(sys.argv[1:])
