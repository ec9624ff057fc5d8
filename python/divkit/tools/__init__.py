"""The applications behind the ``divkit`` command (:mod:`divkit.cli`): ``divkit demo``
(:mod:`~divkit.tools.demo`), ``divkit compare`` (:mod:`~divkit.tools.compare`) and ``divkit
bench`` (:mod:`~divkit.tools.bench`).

They are not imported by ``import divkit``. Their extra dependencies (tqdm, matplotlib) come with
``pip install "divkit[tools]"`` and are imported only when a tool uses them.
"""

from __future__ import annotations

import importlib
from types import ModuleType


def require(module: str) -> ModuleType:
    """Imports ``module``, a dependency of the tools only, or says how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        top = module.split(".")[0]
        raise ImportError(
            f"divkit's tools need {top}, which is not installed: pip install "
            f"'divkit[tools]' (or pip install {top})"
        ) from e
