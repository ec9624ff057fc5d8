"""Property-based fuzzing of every public Python function (the table of test_fuzz_specs.py).

From a valid call, hypothesis mutates one argument at a time (NaN / inf entries, rows of -inf,
integer, bool and complex dtypes, shapes that disagree, another device, out-of-range labels,
NaN / inf / denormal / negative / wrongly typed scalars, rescaled values) and checks the error
policy of docs/guide.md ("Errors"):

* the call returns outputs without NaN, or raises ``divkit.Error`` (an ``ArgTypeError``, also
  a ``TypeError``, for a wrong type or dtype): never another exception;
* values no function can take (NaN, +inf, complex, integer or bool values, a tensor on another
  device, labels outside [0, V) other than ignore_index, a NaN parameter) always raise;
* the valid call, and valid rescalings of it, give finite outputs.

Derandomized and bounded (``max_examples`` per function) so that the suite takes well under a
minute; ``DIVKIT_HYPOTHESIS_PROFILE=thorough`` (or ``DIVKIT_FUZZ_EXAMPLES=N`` per function)
runs many more examples.
"""

from __future__ import annotations

import inspect
import os
import warnings

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import divkit
import test_fuzz_specs as specs
from test_fuzz_specs import SPECS, all_finite

EXAMPLES = int(
    os.environ.get(
        "DIVKIT_FUZZ_EXAMPLES",
        1000 if os.environ.get("DIVKIT_HYPOTHESIS_PROFILE") == "thorough" else 24,
    )
)

IGNORE = -100
SHAPES = [(6, 7, 4), (1, 2, 1), (3, 1, 2)]

# Mutations by the kind of value they apply to. Those in MUST_RAISE give a value no function
# can take; the others may be valid (a rescaled tensor, a negative parameter where negative is
# allowed) and must then give outputs without NaN.
FLOAT_TENSOR = [
    "nan",
    "posinf",
    "neginf_entry",
    "neginf_row",
    "int",
    "bool",
    "complex",
    "meta",
    "drop_first",
    "drop_last",
    "empty",
    "scalar",
    "list",
    "none",
    "scale_small",
    "scale_large",
    "noncontiguous",
]
INT_TENSOR = [
    "label_high",
    "label_negative",
    "all_ignored",
    "float",
    "bool",
    "complex",
    "meta",
    "drop_first",
    "drop_last",
    "empty",
    "none",
]
FLOAT_SCALAR = [
    "nan",
    "inf",
    "neginf",
    "denormal",
    "negative",
    "zero",
    "huge",
    "str",
    "none",
    "bool",
    "complex",
    "nan_tensor",
    "tensor2",
]
INT_SCALAR = ["negative", "zero", "int64_overflow", "float", "bool", "str", "none"]
STR_SCALAR = ["bogus", "int", "none", "empty_str"]
BOOL_SCALAR = ["two", "str", "none"]
SEQ = ["empty_seq", "negative_entry", "nan_entry", "none", "str"]

MUST_RAISE = {
    ("float_tensor", "nan"),
    ("float_tensor", "posinf"),
    ("float_tensor", "int"),
    ("float_tensor", "bool"),
    ("float_tensor", "complex"),
    ("float_tensor", "meta"),
    ("int_tensor", "complex"),
    ("int_tensor", "meta"),
    ("float_scalar", "nan"),
    ("float_scalar", "nan_tensor"),
    ("float_scalar", "str"),
    ("float_scalar", "complex"),
    ("int_scalar", "str"),
    ("int_scalar", "int64_overflow"),
    ("str_scalar", "bogus"),
    ("str_scalar", "int"),
    ("bool_scalar", "str"),
}
# Out-of-range labels must raise where the labels index the vocabulary (names holding "label" or
# "indices"); lengths or sample ids of 10**6 may be valid.
LABEL_MUST_RAISE = {"label_high", "label_negative"}


def _indexes_vocab(name: str) -> bool:
    return "label" in name or "indices" in name


# Arguments passed through untouched (any values): fuzzed as opaque objects.
OPAQUE = {("divkit.rlhf.best_of_n", "samples")}
# Functions whose outputs hold -inf by design (masked logits).
INF_OUTPUT = {"divkit.uscd_logits", "divkit.USCDLogitsProcessor"}
# Mutations after which a valid result must also be free of inf.
FINITE_RESULT = {("float_tensor", "scale_small"), ("float_tensor", "noncontiguous")}


def kind_of(x) -> str:
    if isinstance(x, torch.Tensor):
        return "float_tensor" if x.is_floating_point() else "int_tensor"
    if isinstance(x, bool):
        return "bool_scalar"
    if isinstance(x, int):
        return "int_scalar"
    if isinstance(x, float):
        return "float_scalar"
    if isinstance(x, str):
        return "str_scalar"
    if isinstance(x, (tuple, list)) and all(isinstance(v, (int, float)) for v in x):
        return "seq"
    return "other"


MUTATIONS = {
    "float_tensor": FLOAT_TENSOR,
    "int_tensor": INT_TENSOR,
    "float_scalar": FLOAT_SCALAR,
    "int_scalar": INT_SCALAR,
    "str_scalar": STR_SCALAR,
    "bool_scalar": BOOL_SCALAR,
    "seq": SEQ,
    "other": ["none"],
}


def _narrow(x, dim):
    if x.dim() == 0 or x.shape[dim] < 2:
        return x[..., :0] if x.dim() else x.reshape(1, 1)
    return x.narrow(dim, 0, x.shape[dim] - 1)


def mutate(x, kind: str, how: str, pos: int):
    """x with mutation ``how`` (pos picks the element)."""
    if how == "none":
        return None
    if kind in ("float_tensor", "int_tensor"):
        if how == "meta":
            return x.to("meta")
        if how == "drop_first":
            return _narrow(x, 0)
        if how == "drop_last":
            return _narrow(x, -1)
        if how == "empty":
            return x[:0] if x.dim() else x.reshape(1)[:0]
        if how == "complex":
            return x.to(torch.complex128) + 0.5j
        if how == "bool":
            return x > 0
        if how == "list":
            return x.tolist()
        if how == "scalar":
            return x.reshape(-1)[0].clone()
        if kind == "float_tensor":
            y = x.detach().clone()
            flat = y.view(-1)
            if flat.numel() == 0:
                return y
            i = pos % flat.numel()
            if how == "nan":
                flat[i] = float("nan")
            elif how == "posinf":
                flat[i] = float("inf")
            elif how == "neginf_entry":
                flat[i] = float("-inf")
            elif how == "neginf_row":
                if y.dim() >= 2:
                    y.view(-1, y.shape[-1])[pos % (flat.numel() // y.shape[-1])] = float("-inf")
                else:
                    y.fill_(float("-inf"))
            elif how == "int":
                return x.round().to(torch.int64)
            elif how == "scale_small":
                return x * 1e-4
            elif how == "scale_large":
                return x * 50.0
            elif how == "noncontiguous":
                if x.dim() < 2:
                    return torch.stack([x, x], -1)[..., 0]
                return x.transpose(-1, -2).contiguous().transpose(-1, -2)
            return y.requires_grad_(x.requires_grad)
        y = x.clone()
        flat = y.view(-1)
        if flat.numel() == 0:
            return y
        i = pos % flat.numel()
        if how == "label_high":
            flat[i] = 10**6
        elif how == "label_negative":
            flat[i] = -7
        elif how == "all_ignored":
            y.fill_(IGNORE)
        elif how == "float":
            return x.double()
        return y
    if kind in ("float_scalar", "int_scalar"):
        return {
            "nan": float("nan"),
            "inf": float("inf"),
            "neginf": float("-inf"),
            "denormal": 5e-324,
            "negative": -abs(x) - 1,
            "zero": type(x)(0),
            "huge": 1e300,
            "str": "1",
            "bool": True,
            "complex": complex(1, 1),
            "nan_tensor": torch.tensor(float("nan")),
            "tensor2": torch.ones(2),
            "int64_overflow": 2**64,
            "float": float(x) + 0.5,
        }[how]
    if kind == "str_scalar":
        return {"bogus": "no_such_option", "int": 3, "empty_str": ""}[how]
    if kind == "bool_scalar":
        return {"two": 2, "str": "yes"}[how]
    if kind == "seq":
        if how == "empty_seq":
            return type(x)()
        if how == "negative_entry":
            return type(x)([-1] + list(x[1:]))
        if how == "nan_entry":
            return type(x)([float("nan")] + list(x[1:]))
        return "abc"
    raise AssertionError(how)


def call(target, args, kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return target(*args, **kwargs)


def check_call(name, target, args, kwargs, kind, how, arg_name=""):
    """Runs the call; returns a failure description or None."""
    try:
        out = call(target, args, kwargs)
    except divkit.Error as e:
        msg = str(e)
        head = msg.split(":")[0]
        public = name.split(".")[-1]
        if head != public and not head.startswith(public + "."):
            return f"the message does not start with '{public}:' (the function called): {msg!r}"
        return None
    except Exception as e:  # noqa: BLE001 - the property under test
        return f"{type(e).__name__} escaped: {str(e)[:300]}"
    if (kind, how) in MUST_RAISE or (how in LABEL_MUST_RAISE and _indexes_vocab(arg_name)):
        return "accepted a value no function can take"
    allow_inf = name in INF_OUTPUT or ((kind, how) not in FINITE_RESULT and how != "valid")
    if not all_finite(out, allow_inf=allow_inf):
        return "NaN (or inf) in the outputs"
    return None


def _slots(args, kwargs):
    return [("arg", i) for i in range(len(args))] + [("kw", k) for k in kwargs]


def arg_name(target, where, key) -> str:
    """The parameter's name (positional arguments through the target's signature)."""
    if where == "kw":
        return key
    try:
        params = list(inspect.signature(target).parameters)
    except (TypeError, ValueError):
        return str(key)
    return params[key] if key < len(params) else str(key)


# Known gaps: (function, argument, mutation) -> reason. Reported as xfail, so that the list
# shrinks; empty while none is open.
XFAIL: dict = {}


def known_gap(name, pname, how) -> str:
    return XFAIL.get((name, pname, how)) or XFAIL.get((name, pname, "*"), "")


@pytest.mark.parametrize("name", sorted(SPECS))
@settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,
    suppress_health_check=list(HealthCheck),
    database=None,
)
@given(data=st.data())
def test_fuzz_one_argument(name, data):
    make = SPECS[name]
    seed = data.draw(st.integers(0, 2**16), label="seed")
    # (rows N, vocabulary V, batch B) of the valid call: the usual shape and the edges.
    specs.N, specs.V, specs.B = data.draw(st.sampled_from(SHAPES), label="N, V, B")
    try:
        target, args, kwargs = make(torch.Generator().manual_seed(seed))
    finally:
        specs.N, specs.V, specs.B = SHAPES[0]
    slots = _slots(args, kwargs)
    where, key = data.draw(st.sampled_from(slots), label="slot")
    value = args[key] if where == "arg" else kwargs[key]
    pname = arg_name(target, where, key)
    kind = "other" if (name, pname) in OPAQUE else kind_of(value)
    how = data.draw(st.sampled_from(["valid"] + MUTATIONS[kind]), label="mutation")
    if how != "valid":
        pos = data.draw(st.integers(0, 10**6), label="pos")
        new = mutate(value, kind, how, pos)
        if where == "arg":
            args = list(args)
            args[key] = new
        else:
            kwargs = dict(kwargs, **{key: new})
    problem = check_call(name, target, args, kwargs, kind, how, pname)
    if problem and known_gap(name, pname, how):
        return  # listed in XFAIL (reported by test_known_gaps), not a new finding
    assert problem is None, f"{name}: argument {pname!r} ({kind}) mutated by {how!r}: {problem}"


@pytest.mark.parametrize("gap", sorted(XFAIL), ids=lambda g: "-".join(g))
def test_known_gaps(gap):
    """Each known gap once, at the usual shape (the fused heads' H = 0 gaps at the edge shape):
    xfail while it is open, XPASS once fixed (then remove it from XFAIL)."""
    name, pname, how = gap
    shape = SHAPES[1] if how in ("drop_first", "drop_last") else SHAPES[0]
    specs.N, specs.V, specs.B = shape
    try:
        target, args, kwargs = SPECS[name](torch.Generator().manual_seed(0))
    finally:
        specs.N, specs.V, specs.B = SHAPES[0]
    slot = next((w, k) for w, k in _slots(args, kwargs) if arg_name(target, w, k) == pname)
    value = args[slot[1]] if slot[0] == "arg" else kwargs[slot[1]]
    kind = kind_of(value)
    hows = MUTATIONS[kind] if how == "*" else [how]
    problems = []
    for h in hows:
        new = mutate(value, kind, h, 1)
        a, k = list(args), dict(kwargs)
        if slot[0] == "arg":
            a[slot[1]] = new
        else:
            k[slot[1]] = new
        p = check_call(name, target, a, k, kind, h, pname)
        if p:
            problems.append(p)
    if problems:
        pytest.xfail(f"{XFAIL[gap]}: {problems[0]}")
