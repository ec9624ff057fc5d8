"""The ``divkit`` command line tool."""

from __future__ import annotations

import argparse
import json
import sys
from typing import List, Optional


def _info(args: argparse.Namespace) -> int:
    import divkit

    from . import _C

    info = {
        "version": divkit.version(),
        "threads": divkit.get_num_threads(),
        "simd_targets": divkit.available_simd_targets(),
        "active_simd_target": divkit.active_simd_target(),
        "kinds": list(_C.kinds()),  # not divkit.KINDS: that module imports torch
    }

    built = bool(getattr(_C, "cuda_built", lambda: False)())
    info["cuda_built"] = built
    info["cuda_devices"] = list(_C.cuda_devices()) if built else []
    # The installed version, read from its metadata: importing torch here would cost seconds.
    try:
        from importlib.metadata import version as _dist_version

        info["torch"] = _dist_version("torch")
    except Exception:  # PackageNotFoundError: torch is optional for the CLI
        info["torch"] = None
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        print(f"divkit {info['version']}")
        print(f"threads: {info['threads']}")
        print(
            f"simd targets: {', '.join(info['simd_targets'])} "
            f"(active: {info['active_simd_target']})"
        )
        print(f"divergence kinds: {', '.join(info['kinds'])}")
        if not built:
            print("cuda kernels: not built")
        else:
            gpus = ", ".join(f"{i}: {n}" for i, n in enumerate(info["cuda_devices"]))
            print(f"cuda kernels: built; GPUs: {gpus or 'none visible'}")
        print(f"torch: {info['torch']}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from .tools.demo import main as demo_main

    return demo_main(args)


_COMMANDS = ("info", "demo", "compare", "bench")


def build_parser(command: Optional[str] = None) -> argparse.ArgumentParser:
    """The ``divkit`` parser; with ``command``, only that subcommand's parser is built, so that
    ``divkit compare`` and ``divkit info`` never import the demo's torch models."""
    parser = argparse.ArgumentParser(
        prog="divkit", description="divkit: divergence-based training objectives for LLMs"
    )
    sub = parser.add_subparsers(dest="command", metavar="command")
    if command in (None, "info"):
        p_info = sub.add_parser("info", help="print the version, thread count and SIMD targets")
        p_info.add_argument("--json", action="store_true", help="print as JSON")
        p_info.set_defaults(func=_info)
    if command in (None, "demo"):
        from .tools.demo import add_arguments as demo_arguments

        p_demo = sub.add_parser(
            "demo",
            help="the main job: distil a small LM through the fused "
            "linear head, align it (DPO, f-DPO, TDPO2), write a report",
        )
        demo_arguments(p_demo)
        p_demo.set_defaults(func=_demo)
    if command in (None, "compare"):
        from .tools.compare import add_parser as _add_compare

        _add_compare(sub)
    if command in (None, "bench"):
        from .tools.bench import add_parser as _add_bench

        _add_bench(sub)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    # The top-level parser has no option that takes a value: the first word is the command.
    first = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(first if first in _COMMANDS else None)
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return args.func(args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
