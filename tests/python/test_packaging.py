"""Packaging: ``import divkit`` does not import torch (names load on first use) and keeps every
public name; ``divkit compare`` runs where torch cannot be imported."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys

import numpy as np
import pytest

import divkit

PKG = os.path.dirname(os.path.abspath(divkit.__file__))

# Makes `import torch` fail in the child process, as if torch were not installed.
_NO_TORCH = (
    "import sys\n"
    "for _m in [m for m in sys.modules if m.split('.')[0] == 'torch']: del sys.modules[_m]\n"
    "sys.modules['torch'] = None\n"
)


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=dict(os.environ)
    )


def test_import_divkit_does_not_import_torch():
    r = _run(
        "import sys, divkit\n"
        "print(divkit.__version__, 'torch' in sys.modules, issubclass(divkit.Error, ValueError))\n"
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == [divkit.__version__, "False", "True"]


def test_import_divkit_and_runtime_calls_without_torch():
    r = _run(
        _NO_TORCH + "import divkit\n"
        "divkit.get_num_threads(); divkit.available_simd_targets(); divkit.version()\n"
        "print('ok')\n"
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "ok"


def test_every_public_name_is_reachable():
    r = _run(
        "import sys, divkit\n"
        "names = list(divkit.__all__)\n"
        "missing = [n for n in names if n not in dir(divkit)]\n"
        "assert not missing, missing\n"
        "torch_loaded = 'torch' in sys.modules\n"
        "ns = {}\n"
        "exec('from divkit import ' + ', '.join(names), ns)\n"
        "assert all(ns[n] is getattr(divkit, n) for n in names)\n"
        "import divkit.functional, divkit.fused, divkit.sparse\n"
        "assert divkit.divergence is divkit.functional.divergence\n"
        "assert divkit.KINDS is divkit.functional.KINDS\n"
        "assert divkit.nn.__name__ == 'divkit.nn'\n"
        "print(torch_loaded, 'torch' in sys.modules)\n"
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["False", "True"]
    with pytest.raises(AttributeError, match="no attribute 'no_such_name'"):
        divkit.no_such_name  # noqa: B018


def _imports_torch_at_top_level(path: str) -> bool:
    tree = ast.parse(open(path).read())
    for node in tree.body:
        if isinstance(node, ast.Import) and any(
            a.name.split(".")[0] == "torch" for a in node.names
        ):
            return True
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "torch":
            return True
    return False


def test_divkit_compare_runs_without_torch(tmp_path):
    assert not _imports_torch_at_top_level(os.path.join(PKG, "tools", "compare.py"))
    rng = np.random.default_rng(0)
    base = rng.standard_normal((6, 11)).astype(np.float32)
    np.save(tmp_path / "base.npy", base)
    np.save(tmp_path / "test.npy", base + 0.1 * rng.standard_normal(base.shape).astype(np.float32))
    r = _run(
        _NO_TORCH + "import runpy, sys\n"
        f"sys.argv = ['divkit', 'compare', {str(tmp_path / 'base.npy')!r}, "
        f"{str(tmp_path / 'test.npy')!r}, '--json', '--no-progress']\n"
        "try:\n"
        "    runpy.run_module('divkit', run_name='__main__', alter_sys=True)\n"
        "finally:\n"
        "    assert sys.modules.get('torch') is None, 'torch was imported'\n"
    )
    assert r.returncode == 0, r.stderr
    assert isinstance(json.loads(r.stdout), dict)


def test_divkit_info_runs_without_torch():
    r = _run(
        _NO_TORCH + "import runpy, sys\n"
        "sys.argv = ['divkit', 'info', '--json']\n"
        "try:\n"
        "    runpy.run_module('divkit', run_name='__main__', alter_sys=True)\n"
        "except SystemExit as e:\n"
        "    assert not e.code, e.code\n"
        "finally:\n"
        "    assert sys.modules.get('torch') is None, 'torch was imported'\n"
    )
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["kinds"] == list(divkit._C.kinds())
    assert info["version"] == divkit.__version__
