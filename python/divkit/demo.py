"""The former place of :mod:`divkit.tools.demo` (``divkit demo``): it replaces itself by that
module, so that ``divkit.demo`` and ``from divkit import demo`` are the very same module."""

import sys

if __name__ == "__main__":  # python -m divkit.demo
    import runpy

    runpy.run_module("divkit.tools.demo", run_name="__main__", alter_sys=True)
else:
    from .tools import demo as _module

    sys.modules[__name__] = _module
