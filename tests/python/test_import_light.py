"""``import divkit`` stays light: the tools' dependencies (matplotlib, tqdm: the ``tools`` extra)
are imported only when a tool runs, and the package has no import cycle."""

from __future__ import annotations

import ast
import os
import subprocess
import sys

import divkit

PKG = os.path.dirname(os.path.abspath(divkit.__file__))


def test_import_divkit_imports_no_tool_dependency():
    # torch itself may import tqdm when it is installed: only what divkit adds is counted.
    code = (
        "import sys, numpy, torch\n"
        "before = set(sys.modules)\n"
        "import divkit, divkit.nn, divkit.ot, divkit.rlhf, divkit.distill, divkit.preference\n"
        "import divkit.distributed, divkit.cli\n"
        "bad = sorted(m for m in set(sys.modules) - before\n"
        "             if m.split('.')[0] in ('matplotlib', 'tqdm'))\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env=dict(os.environ),
        check=True,
    ).stdout.strip()
    assert out == "", f"import divkit imported {out}"


def test_old_tool_module_names_are_the_tools():
    import divkit.bench_cli
    import divkit.compare
    import divkit.demo
    from divkit.tools import bench, compare, demo

    assert divkit.bench_cli is bench and divkit.compare is compare and divkit.demo is demo


def _module_imports(path: str, module: str):
    """The divkit modules that ``module`` imports at its top level (not inside functions)."""
    tree = ast.parse(open(path).read())
    package = module if path.endswith("__init__.py") else module.rpartition(".")[0]
    out = set()
    for node in tree.body:
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            names = [target] + [f"{target}.{a.name}" for a in node.names]
            out.update(n for n in names if n.split(".")[0] == "divkit")
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.split(".")[0] == "divkit")
    return out


def test_no_import_cycles():
    modules = {}
    for root, _, files in os.walk(PKG):
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(root, f)
                rel = os.path.relpath(path, os.path.dirname(PKG))[:-3].replace(os.sep, ".")
                modules[rel[: -len(".__init__")] if rel.endswith(".__init__") else rel] = path
    graph = {
        m: {t for t in _module_imports(p, m) if t in modules and t != m} for m, p in modules.items()
    }
    # A package's __init__ importing its own submodules is not a cycle of concern; an edge from
    # a submodule back into a sibling that imports it is.
    state = {}

    def visit(m, stack):
        state[m] = 1
        for t in graph[m]:
            if m.startswith(t + ".") or t == "divkit":
                continue  # a submodule's import of its own package (or of divkit) runs no cycle
            if state.get(t) == 1:
                raise AssertionError(f"import cycle: {' -> '.join(stack + [m, t])}")
            if state.get(t) is None:
                visit(t, stack + [m])
        state[m] = 2

    for m in sorted(graph):
        if state.get(m) is None:
            visit(m, [])
