"""The ``dbf-ext`` command line (also ``python -m dbf_ext``)."""

from __future__ import annotations

import argparse
import json
import sys


def _cmd_info(args: argparse.Namespace) -> int:
    from dbf_ext import _ext

    info = _ext.build_info()
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    runtime = info["cuda_runtime"]
    lines = [
        f"dbf_ext {info['version']} (torch {info['torch_version']})",
        f"  C++ compiler:   {info['cxx_compiler']}",
    ]
    if info["cuda"]:
        lines.append(
            f"  CUDA kernels:   compiled with nvcc {info['cuda_compiler_version']} "
            f"for architectures {info['cuda_architectures']}"
        )
    else:
        lines.append("  CUDA kernels:   not compiled (no nvcc at build time)")
    if info["gpu_usable"]:
        lines.append(f"  GPU:            usable: {', '.join(info['gpus'])}")
    else:
        reasons = []
        if info["cuda"] and runtime["error"]:
            reasons.append(runtime["error"])
        if not info["torch_cuda_available"]:
            reasons.append("torch reports no CUDA device")
        lines.append(f"  GPU:            not usable ({'; '.join(reasons) or 'no device'})")
    print("\n".join(lines))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dbf-ext",
        description="Dynamic training for (rotated) object detectors.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    info = commands.add_parser("info", help="version, compiled kernels and GPU availability")
    info.add_argument("--json", action="store_true", help="print machine-readable JSON")
    info.set_defaults(handler=_cmd_info)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "handler", None):
        parser.print_help()
        return 2
    try:
        return args.handler(args)
    except (ValueError, FileNotFoundError, ImportError) as err:
        print(f"dbf-ext {args.command}: error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
