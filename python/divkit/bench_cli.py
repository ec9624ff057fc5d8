"""The former place of :mod:`divkit.tools.bench` (``divkit bench``): this module replaces itself by it,
so that ``divkit.bench_cli`` and ``from divkit import bench_cli`` are that very module."""

import sys

if __name__ == "__main__":  # python -m divkit.bench_cli
    import runpy

    runpy.run_module("divkit.tools.bench", run_name="__main__", alter_sys=True)
else:
    from .tools import bench as _module

    sys.modules[__name__] = _module
