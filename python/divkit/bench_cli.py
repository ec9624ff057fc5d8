"""The former place of :mod:`divkit.tools.bench` (``divkit bench``): it replaces itself by that
module, so that ``divkit.bench_cli`` and ``from divkit import bench_cli`` are that same module."""

import sys

if __name__ == "__main__":  # python -m divkit.bench_cli
    import runpy

    runpy.run_module("divkit.tools.bench", run_name="__main__", alter_sys=True)
else:
    from .tools import bench as _module

    sys.modules[__name__] = _module
