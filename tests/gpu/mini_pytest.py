"""Runs tests/gpu's test modules where pytest is not installed (the GPU machine may lack it):
a stand-in `pytest` module with the few features they use (mark.parametrize, mark.skipif,
raises, skip), then every test function with every parameter combination.

Usage: python tests/gpu/mini_pytest.py tests/gpu/test_divergence_cuda.py [...]
"""

import contextlib
import importlib.util
import itertools
import re
import sys
import traceback
import types


class _Mark:
    def parametrize(self, names, values):
        def deco(fn):
            fn.__dict__.setdefault("_params", []).append(
                ([n.strip() for n in names.split(",")], values)
            )
            return fn

        return deco

    def skipif(self, condition, reason=""):
        return types.SimpleNamespace(condition=condition, reason=reason)


@contextlib.contextmanager
def raises(exc, match=None):
    try:
        yield
    except exc as e:
        if match is not None and not re.search(match, str(e)):
            raise AssertionError(f"{e!r} does not match {match!r}") from e
        return
    raise AssertionError(f"did not raise {exc}")


class _Skipped(Exception):
    pass


def skip(reason=""):
    raise _Skipped(reason)


def _install_stand_in():
    mod = types.ModuleType("pytest")
    mod.mark = _Mark()
    mod.raises = raises
    mod.skip = skip
    sys.modules["pytest"] = mod


def _cases(fn):
    groups = getattr(fn, "_params", [])
    if not groups:
        yield {}
        return
    expanded = []
    for names, values in groups:
        expanded.append([dict(zip(names, v if len(names) > 1 else (v,))) for v in values])
    for combo in itertools.product(*expanded):
        kw = {}
        for d in combo:
            kw.update(d)
        yield kw


def main(paths):
    _install_stand_in()
    passed = failed = skipped = 0
    for path in paths:
        spec = importlib.util.spec_from_file_location(f"gpu_test_{passed}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        mark = getattr(module, "pytestmark", None)
        if mark is not None and mark.condition:
            print(f"{path}: skipped ({mark.reason})")
            continue
        for name in sorted(n for n in dir(module) if n.startswith("test_")):
            fn = getattr(module, name)
            for kw in _cases(fn):
                label = f"{name}[{', '.join(f'{k}={v}' for k, v in kw.items())}]"
                try:
                    fn(**kw)
                    passed += 1
                except _Skipped as e:
                    skipped += 1
                    print(f"SKIPPED {label}: {e}")
                except Exception:  # noqa: BLE001 - report every failure
                    failed += 1
                    print(f"FAILED {label}")
                    traceback.print_exc()
    print(f"{passed} passed, {failed} failed" + (f", {skipped} skipped" if skipped else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
