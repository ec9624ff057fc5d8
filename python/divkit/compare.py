"""The former place of :mod:`divkit.tools.compare` (``divkit compare``): it replaces itself by that
module, so that ``divkit.compare`` and ``from divkit import compare`` are the very same module."""

import sys

if __name__ == "__main__":  # python -m divkit.compare
    import runpy

    runpy.run_module("divkit.tools.compare", run_name="__main__", alter_sys=True)
else:
    from .tools import compare as _module

    sys.modules[__name__] = _module
