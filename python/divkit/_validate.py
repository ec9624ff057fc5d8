"""Argument checks of the Python layer: what the C++ core cannot see (Python types, devices,
autograd state) and the few rules of functions written in torch.

One convention for every check: ``check(fn, name, value, *options)``, where ``fn`` is the public
function (or class) the user called and ``name`` the argument; the value comes back normalized
(a float, an int, a flattened tensor, ...). One error type: every failure raises
:class:`divkit.Error` (``divkit._C.Error``, a ValueError) with a message that starts with
``"<fn>: <name>"``, like the core's own messages. A value of the wrong Python type raises
:class:`ArgTypeError`, which is a ``divkit.Error`` and also a ``TypeError`` (Python's convention
for a wrong type), so ``except divkit.Error`` catches every argument error.

The rule for types: a value of the wrong Python type, or a tensor of the wrong dtype (integer,
bool or complex where real values are expected, a floating tensor where labels are expected),
raises :class:`ArgTypeError` (``except TypeError`` and ``except divkit.Error`` both catch it);
every other invalid argument (a value out of range, NaN, a shape or device that disagrees) raises
a plain :class:`divkit.Error`.

:func:`public` wraps each public function: it checks what every function shares (tensors on one
device and not on ``meta``, no complex tensors, no integer or bool tensors where values are
expected, no NaN / +inf in the inputs that are computed in torch, no row of all -inf in logits)
and turns an exception that escapes the function's own checks (an IndexError from a gather, a
RuntimeError from torch) into a divkit.Error that names the function, so that no internal
exception reaches the caller.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import inspect
import math
import numbers
import os
import re
import sys
import warnings
from typing import Any, Callable, Iterable, NoReturn, Optional, Sequence, Tuple

import numpy as np
import torch

from . import _C

Error = _C.Error


class ArgTypeError(Error, TypeError):
    """An argument of the wrong type: a :class:`divkit.Error` that is also a ``TypeError``."""


#: The logits dtypes the kernels read.
FLOAT_DTYPES: Tuple[torch.dtype, ...] = (
    torch.float32,
    torch.bfloat16,
    torch.float16,
    torch.float64,
)
#: reduction names, in the core's order.
REDUCTIONS: Tuple[str, ...] = tuple(_C.reductions())

_LOGITS_SHAPE = "the logits' shape without the last dimension"

#: The smallest positive value a parameter that must be > 0 may take: the smallest normal
#: float32, since the kernels compute in fp32 (a denormal temperature passes ``> 0`` and divides
#: to inf).
MIN_POSITIVE = 1.1754943508222875e-38
#: Integer arguments must fit in int64 (what the kernels and torch take).
_INT64 = 2**63


def type_name(x: Any) -> str:
    """The name of x's type as a message shows it (``int``, ``torch.Tensor``, ...)."""
    t = type(x)
    return t.__name__ if t.__module__ == "builtins" else f"{t.__module__}.{t.__qualname__}"


def fail(fn: str, msg: str) -> NoReturn:
    """Raises ``divkit.Error("<fn>: <msg>")``."""
    raise Error(f"{fn}: {msg}")


def fail_type(fn: str, msg: str) -> NoReturn:
    """Raises ``ArgTypeError("<fn>: <msg>")`` (a divkit.Error and a TypeError)."""
    raise ArgTypeError(f"{fn}: {msg}")


def _dtype_list(dtypes: Sequence[torch.dtype]) -> str:
    names = [str(d) for d in dtypes]
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " or " + names[-1]


# ---------------------------------------------------------------------------------------------
# Scalars.
# ---------------------------------------------------------------------------------------------


def isnan(v) -> bool:
    """math.isnan for argument checks. Under torch.compile(dynamic=True) a float argument is a
    SymFloat, which Dynamo cannot pass to math functions; comparisons on it become guards."""
    return v != v


def isfinite(v) -> bool:
    """math.isfinite for argument checks (see :func:`isnan`)."""
    return v - v == 0  # NaN - NaN and inf - inf are NaN


def real(fn: str, name: str, x: Any, *, allow_nan: bool = False) -> float:
    """A real number (a one-element real tensor is read); NaN is rejected unless
    ``allow_nan=True``."""
    if isinstance(x, torch.Tensor):
        if x.numel() != 1:
            fail(fn, f"{name} must be a number, got a tensor of shape {tuple(x.shape)}")
        if x.is_complex() or x.dtype == torch.bool:
            fail_type(fn, f"{name} must be a real number, got a tensor of dtype {x.dtype}")
        if x.device.type == "meta":
            fail(fn, f"{name} is a meta tensor (no value)")
        v = float(x.item())
    elif isinstance(x, bool) or not isinstance(x, numbers.Real):
        fail_type(fn, f"{name} must be a real number, got {type_name(x)}")
    else:
        v = float(x)
    if not allow_nan and isnan(v):
        fail(fn, f"{name} must not be nan")
    return v


def positive(fn: str, name: str, x: Any) -> float:
    """A finite real number > 0, not denormal (at least :data:`MIN_POSITIVE`)."""
    v = real(fn, name, x)
    if not (isfinite(v) and v > 0):
        fail(fn, f"{name} must be finite and > 0, got {v:g}")
    if v < MIN_POSITIVE:
        fail(
            fn,
            f"{name} must be >= {MIN_POSITIVE:.6g} (the smallest normal float32; the kernels "
            f"compute in fp32), got {v:g}",
        )
    return v


def nonnegative(fn: str, name: str, x: Any) -> float:
    """A finite real number >= 0."""
    v = real(fn, name, x)
    if not (isfinite(v) and v >= 0):
        fail(fn, f"{name} must be finite and >= 0, got {v:g}")
    return v


def integer(fn: str, name: str, x: Any, *, min: Optional[int] = None) -> int:
    """An int (not a bool), optionally >= min."""
    if isinstance(x, bool) or not isinstance(x, numbers.Integral):
        fail_type(fn, f"{name} must be an int, got {type_name(x)}")
    v = int(x)
    if not -_INT64 <= v < _INT64:
        fail(fn, f"{name} must fit in int64, got {v}")
    if min is not None and v < min:
        fail(fn, f"{name} must be an int >= {min}, got {v}")
    return v


#: The largest layer size or count a module's constructor accepts (a larger one is a mistake
#: that would try to allocate terabytes).
MAX_SIZE = 2**24


def size(fn: str, name: str, x: Any, *, max: int = MAX_SIZE) -> int:
    """An int in [1, max]: a layer size, a count of layers or samples."""
    v = integer(fn, name, x, min=1)
    if v > max:
        fail(fn, f"{name} must be <= {max}, got {v}")
    return v


def boolean(fn: str, name: str, x: Any) -> bool:
    """A bool (or numpy.bool_)."""
    if not isinstance(x, (bool, np.bool_)):
        fail_type(fn, f"{name} must be a bool, got {type_name(x)}")
    return bool(x)


def string(fn: str, name: str, x: Any, *, choices: Optional[Sequence[str]] = None) -> str:
    """A str, optionally one of choices."""
    if not isinstance(x, str):
        fail_type(fn, f"{name} must be a str, got {type_name(x)}")
    if choices is not None and x not in choices:
        fail(fn, f"unknown {name} '{x}' (valid: {', '.join(choices)})")
    return x


def reduction(fn: str, x: Any) -> str:
    """One of :data:`REDUCTIONS` (none, sum, mean, batchmean)."""
    if x not in REDUCTIONS:
        fail(fn, f"reduction must be one of {', '.join(REDUCTIONS)}, got {x!r}")
    return x


def num_items(fn: str, x: Any) -> float:
    """``num_items_in_batch``: None (0.0: the reduction's own divisor) or a finite number > 0."""
    if x is None:
        return 0.0
    n = real(fn, "num_items_in_batch", x)
    if not (isfinite(n) and n > 0):
        fail(fn, f"num_items_in_batch must be a finite number > 0 (or None), got {n:g}")
    return n


def chunk_size(fn: str, x: Any) -> int:
    """``chunk_size``: None (0: the core chooses) or an int >= 1."""
    if x is None:
        return 0
    c = integer(fn, "chunk_size", x)
    if c < 1:
        fail(fn, f"chunk_size must be >= 1 (or None to choose it), got {c}")
    return c


def grad_dtype(fn: str, x: Any) -> Optional[torch.dtype]:
    """``grad_dtype``: None or one of :data:`FLOAT_DTYPES`."""
    if x is None:
        return None
    if not isinstance(x, torch.dtype):
        fail_type(fn, f"grad_dtype must be a torch.dtype or None, got {type_name(x)}")
    if x not in FLOAT_DTYPES:
        fail(fn, f"grad_dtype must be {_dtype_list(FLOAT_DTYPES)}, got {x}")
    return x


# ---------------------------------------------------------------------------------------------
# Tensors.
# ---------------------------------------------------------------------------------------------


def tensor(
    fn: str,
    name: str,
    x: Any,
    *,
    dtypes: Optional[Sequence[torch.dtype]] = FLOAT_DTYPES,
    ndim: Optional[Sequence[int]] = None,
    min_ndim: int = 0,
    optional: bool = False,
    cpu: bool = True,
    dense: bool = False,
) -> Optional[torch.Tensor]:
    """A torch.Tensor: required unless ``optional`` (None passes through), on the CPU when
    ``cpu``, of one of ``dtypes`` (None: any), with a number of dimensions in ``ndim`` (or at
    least ``min_ndim``), strided when ``dense``."""
    if x is None:
        if optional:
            return None
        fail_type(fn, f"{name} is required")
    if not isinstance(x, torch.Tensor):
        fail_type(fn, f"{name} must be a torch.Tensor, got {type_name(x)}")
    if cpu and x.device.type != "cpu":
        fail(
            fn,
            f"{name} is on device {x.device}; divkit's kernels run on the CPU (move it "
            f"with .cpu())",
        )
    if dtypes is not None and x.dtype not in dtypes:
        fail_type(fn, f"{name} has dtype {x.dtype}; expected {_dtype_list(dtypes)}")
    if ndim is not None and x.dim() not in ndim:
        fail(
            fn,
            f"{name} must have {' or '.join(map(str, ndim))} dimensions, got shape "
            f"{tuple(x.shape)}",
        )
    if x.dim() < min_ndim:
        fail(fn, f"{name} must have at least {min_ndim} dimension(s), got shape {tuple(x.shape)}")
    if dense and (x.is_sparse or x.layout != torch.strided):
        fail(fn, f"{name} must be a dense (strided) tensor, got layout {x.layout}")
    return x


def logits(fn: str, name: str, x: Any, *, cpu: bool = True) -> torch.Tensor:
    """Logits ``[..., V]``: a dense tensor (on the CPU when ``cpu``) of a :data:`FLOAT_DTYPES`
    dtype, at least 1-D."""
    if not isinstance(x, torch.Tensor):
        fail_type(
            fn,
            f"{name} must be a torch.Tensor (or, with numpy inputs, a numpy.ndarray), "
            f"got {type_name(x)}",
        )
    tensor(fn, name, x, cpu=cpu)
    if x.dim() < 1:
        fail(fn, f"{name} must have at least one dimension [..., V], got a 0-d tensor")
    if x.shape[-1] == 0:
        fail(fn, f"{name} has V = 0 entries in its last dimension (shape {tuple(x.shape)})")
    if x.is_sparse or x.layout != torch.strided:
        fail(fn, f"{name} must be a dense (strided) tensor, got layout {x.layout}")
    return x


def same_shape(fn: str, name: str, x: torch.Tensor, ref: torch.Tensor, ref_name: str) -> None:
    """x has ref's shape."""
    if tuple(x.shape) != tuple(ref.shape):
        fail(
            fn,
            f"{name} has shape {tuple(x.shape)}, expected {tuple(ref.shape)} (the shape of "
            f"{ref_name})",
        )


def floating(fn: str, name: str, x: torch.Tensor) -> torch.Tensor:
    """x has a floating dtype."""
    if not x.is_floating_point():
        fail_type(fn, f"{name} must have a floating dtype, got {x.dtype}")
    return x


def integral(fn: str, name: str, x: torch.Tensor) -> torch.Tensor:
    """x has an integer dtype (not bool)."""
    if x.dtype == torch.bool or x.is_floating_point() or x.is_complex():
        fail_type(fn, f"{name} must have an integer dtype, got {x.dtype}")
    return x


def per_token(
    fn: str,
    name: str,
    x: Any,
    lead_shape: Sequence[int],
    *,
    lead: str = _LOGITS_SHAPE,
    cpu: bool = True,
) -> torch.Tensor:
    """A tensor (on the CPU when ``cpu``) of shape ``lead_shape`` (one value per token; ``lead``
    says what that shape is in the message)."""
    if not isinstance(x, torch.Tensor):
        fail_type(fn, f"{name} must be a torch.Tensor or None, got {type_name(x)}")
    tensor(fn, name, x, dtypes=None, cpu=cpu)
    if tuple(x.shape) != tuple(lead_shape):
        fail(fn, f"{name} has shape {tuple(x.shape)}, expected {tuple(lead_shape)} ({lead})")
    return x


def labels(
    fn: str,
    x: Any,
    lead_shape: Sequence[int],
    *,
    required: bool = False,
    lead: str = _LOGITS_SHAPE,
    cpu: bool = True,
    vocab: Optional[int] = None,
    ignore_index: int = -100,
    name: str = "labels",
) -> Optional[torch.Tensor]:
    """Token labels of shape ``lead_shape``, returned detached, flattened, int32 or int64 (other
    integer dtypes become int64); None passes unless ``required``. With ``vocab``, every label
    other than ``ignore_index`` must be in [0, vocab)."""
    if x is None:
        if required:
            fail(fn, f"{name} is required")
        return None
    x = integral(fn, name, per_token(fn, name, x, lead_shape, lead=lead, cpu=cpu))
    x = x.detach()
    if x.dtype not in (torch.int32, torch.int64):
        x = x.to(torch.int64)
    x = x.reshape(-1)
    if vocab is not None:
        label_range(fn, name, x, vocab, ignore_index)
    return x


def label_range(fn: str, name: str, x: torch.Tensor, vocab: int, ignore_index: int) -> None:
    """Every entry of x other than ignore_index is in [0, vocab)."""
    bad = ((x < 0) | (x >= vocab)) & (x != ignore_index)
    if x.numel() and bool(bad.any()):
        i = int(bad.reshape(-1).nonzero()[0, 0])
        fail(
            fn,
            f"{name} must be in [0, {vocab}) or ignore_index ({ignore_index}), got "
            f"{int(x.reshape(-1)[i])} at flat position {i}",
        )


def weights(
    fn: str,
    x: Any,
    lead_shape: Sequence[int],
    *,
    autograd: bool = True,
    cpu: bool = True,
    lead: str = _LOGITS_SHAPE,
) -> Optional[torch.Tensor]:
    """Token weights of shape ``lead_shape`` (no gradient flows to them), returned detached,
    flattened, float32 or float64 (``lead`` as in per_token)."""
    if x is None:
        return None
    x = floating(fn, "weights", per_token(fn, "weights", x, lead_shape, lead=lead, cpu=cpu))
    if autograd and x.requires_grad and torch.is_grad_enabled():
        fail(
            fn,
            "weights requires grad, but divkit does not compute gradients with respect to "
            "weights; pass weights.detach()",
        )
    x = x.detach()
    if x.dtype not in (torch.float32, torch.float64):
        x = x.to(torch.float32)
    return x.reshape(-1)


def no_grad(fn: str, name: str, x: torch.Tensor, why: str) -> torch.Tensor:
    """x must not require grad (while grad mode is on): ``why`` says which gradient is missing."""
    if x.requires_grad and torch.is_grad_enabled():
        fail(fn, f"{name} requires grad, but {why}; pass {name}.detach()")
    return x


def vector(
    fn: str, name: str, x: Any, n: Optional[int] = None, *, allow_empty: bool = False
) -> torch.Tensor:
    """A floating 1-D tensor ``[B]`` (any device), with n entries when n is given."""
    if not isinstance(x, torch.Tensor):
        fail_type(fn, f"{name} must be a torch.Tensor, got {type_name(x)}")
    if x.dim() != 1:
        fail(fn, f"{name} must be 1-D [B], got shape {tuple(x.shape)}")
    floating(fn, name, x)
    if n is not None and x.shape[0] != n:
        fail(
            fn,
            f"{name} has {x.shape[0]} entries, expected {n} (the batch size of the first "
            f"argument); batch sizes disagree",
        )
    if x.shape[0] == 0 and not allow_empty:
        fail(fn, f"{name} is empty: the batch needs at least one pair")
    return x


def matrix(fn: str, name: str, x: Any) -> torch.Tensor:
    """A non-empty floating 2-D tensor ``[B, K]`` (any device)."""
    if not isinstance(x, torch.Tensor) or x.dim() != 2 or not x.is_floating_point():
        fail(fn, f"{name} must be a 2-D float tensor [B, K]")
    if x.shape[0] == 0 or x.shape[1] == 0:
        fail(fn, f"{name} is empty")
    return x


def lengths(fn: str, name: str, x: Any, n: int) -> Optional[torch.Tensor]:
    """Sequence lengths ``[n]`` >= 1 (anything torch.as_tensor takes), as a contiguous CPU tensor
    of int32, int64, float32 or float64; None passes."""
    if x is None:
        return None
    if not isinstance(x, torch.Tensor):
        x = torch.as_tensor(x)
    if x.dim() != 1 or x.shape[0] != n:
        fail(fn, f"{name} must have shape [{n}], got {tuple(x.shape)}")
    x = x.detach().cpu()
    if x.dtype not in (torch.int32, torch.int64, torch.float32, torch.float64):
        x = x.to(torch.float64)
    # A traced call (torch.compile) cannot branch on values; the core checks them when it runs.
    if not torch.compiler.is_compiling():
        if bool((x <= 0).any()):
            fail(fn, f"{name} must be > 0, got {x[x <= 0][0].item()}")
        # Token counts, as the core checks: a length in (0, 1) would blow up s / n.
        if bool((x < 1).any()):
            fail(fn, f"{name} must be >= 1 (token counts), got {x[x < 1][0].item()}")
    return x.contiguous()


def lm_head(
    fn: str,
    hidden: Any,
    weight: Any,
    ref_logits: Any,
    ref_hidden: Any,
    ref_weight: Any,
    labels: Any,
) -> None:
    """Shapes of a fused policy head (``hidden [..., H]``, ``weight [V, H]``) and of its reference,
    given either as ``ref_logits [..., V]`` or as ``ref_hidden [..., H_ref]`` + ``ref_weight
    [V, H_ref]``; ``labels`` (optional) ``[...]``."""
    if not isinstance(hidden, torch.Tensor) or hidden.dim() < 2:
        fail(fn, "policy hidden states must be a tensor [..., H]")
    if (
        not isinstance(weight, torch.Tensor)
        or weight.dim() != 2
        or weight.shape[1] != hidden.shape[-1]
    ):
        fail(
            fn,
            f"lm_head_weight must be [V, H] with H = {hidden.shape[-1]} (the hidden size), "
            f"got {tuple(getattr(weight, 'shape', ()))}",
        )
    lead = tuple(hidden.shape[:-1])
    if (ref_logits is None) == (ref_hidden is None):
        fail(fn, "give either ref_logits or ref_hidden (with ref_weight)")
    if ref_logits is not None:
        if not isinstance(ref_logits, torch.Tensor) or tuple(ref_logits.shape) != lead + (
            weight.shape[0],
        ):
            fail(
                fn,
                f"ref_logits must have shape {lead + (weight.shape[0],)}, got "
                f"{tuple(getattr(ref_logits, 'shape', ()))}",
            )
    else:
        if not isinstance(ref_hidden, torch.Tensor) or tuple(ref_hidden.shape[:-1]) != lead:
            fail(
                fn,
                f"ref_hidden must have shape {lead} + [H_ref], got "
                f"{tuple(getattr(ref_hidden, 'shape', ()))}",
            )
        if (
            not isinstance(ref_weight, torch.Tensor)
            or ref_weight.dim() != 2
            or ref_weight.shape[1] != ref_hidden.shape[-1]
        ):
            fail(fn, f"ref_weight must be [V, H_ref] with H_ref = {ref_hidden.shape[-1]}")
    if labels is not None and tuple(labels.shape) != lead:
        fail(fn, f"labels must have shape {lead}, got {tuple(labels.shape)}")


# ---------------------------------------------------------------------------------------------
# Values (one pass each; used where the inputs are computed in torch, not by a kernel that
# checks them itself).
# ---------------------------------------------------------------------------------------------


def _vmapped(x: torch.Tensor) -> bool:
    f = getattr(getattr(torch._C, "_functorch", None), "is_batchedtensor", None)
    return bool(f is not None and f(x))


def finite(fn: str, name: str, x: Optional[torch.Tensor], *, logits: bool = False) -> None:
    """No NaN or +inf in x (one pass when x is finite). ``logits``: -inf entries are masked
    entries and pass, but a row (last dimension) of only -inf does not (it has no softmax);
    otherwise -inf is rejected too."""
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.numel() == 0:
        return
    if x.device.type == "meta":
        return
    # A traced call (torch.compile, vmap's batched tensors) cannot branch on values: the custom
    # ops check their inputs when they run.
    if torch.compiler.is_compiling() or _vmapped(x):
        return
    xd = x.detach()
    if bool(torch.isfinite(xd).all()):
        return
    flat = xd.reshape(-1, xd.shape[-1]) if xd.dim() else xd.reshape(1, 1)
    bad = torch.isnan(flat) | (flat == math.inf)
    if not logits:
        bad = bad | (flat == -math.inf)
    if bool(bad.any()):
        r = int(bad.any(-1).nonzero()[0, 0])
        what = "NaN or inf" if not logits else "NaN or +inf"
        where = f"row {r}" if xd.dim() > 1 else f"entry {int(bad[r].nonzero()[0, 0])}"
        fail(fn, f"{name} has {what} values ({where} of {name})")
    masked = (flat == -math.inf).all(-1)
    if bool(masked.any()):
        r = int(masked.nonzero()[0, 0])
        fail(fn, f"{name}: row {r} is all -inf (every entry masked: no distribution)")


#: Parameter names that may hold integer (or bool) tensors: labels, indices, lengths, masks.
_INT_NAMES = ("labels", "indices", "lengths", "mask", "ids", "samples", "index")


def _int_allowed(name: str) -> bool:
    return any(k in name for k in _INT_NAMES)


def _tensors(name: str, v: Any) -> Iterable[Tuple[str, torch.Tensor]]:
    if isinstance(v, torch.Tensor):
        yield name, v
    elif isinstance(v, (list, tuple)) and len(v) <= 64:
        for i, t in enumerate(v):
            if isinstance(t, torch.Tensor):
                yield f"{name}[{i}]", t


def _prefix(fn: str, msg: str) -> str:
    """The message with ``fn: `` in front; a message from another divkit function (``divergence:
    student_logits ...``) is re-attributed to fn, keeping what it says."""
    if msg.startswith(fn + ":") or msg.startswith(fn + "("):
        return msg
    head, sep, rest = msg.partition(": ")
    if sep and head.replace("_", "").replace(".", "").isalnum() and " " not in head:
        return f"{fn}: {rest}"
    return f"{fn}: {msg}"


@contextlib.contextmanager
def attributed(fn: str):
    """Re-attributes a divkit.Error raised inside to ``fn``: the core's shared checks (the
    divergence spec, the row checks) name ``divergence`` whichever entry point called them."""
    try:
        yield
    except ArgTypeError as e:
        raise ArgTypeError(_prefix(fn, str(e))) from None
    except Error as e:
        raise Error(_prefix(fn, str(e))) from None


def warn(msg: str, category=RuntimeWarning) -> None:
    """warnings.warn attributed to the user's line: the first frame outside the divkit package
    (the wrappers of :func:`public` and inner divkit calls are skipped)."""
    pkg = os.path.dirname(os.path.abspath(__file__))
    level, f = 2, sys._getframe(1)
    while f is not None and os.path.abspath(f.f_code.co_filename).startswith(pkg):
        f, level = f.f_back, level + 1
    warnings.warn(msg, category, stacklevel=level)


# The public function the user called (the outermost one, when a divkit function calls
# another), for messages raised later, in backward.
_OUTER: contextvars.ContextVar[Optional[str]] = contextvars.ContextVar("divkit_fn", default=None)


def _compiling() -> bool:
    fn = getattr(getattr(torch, "compiler", None), "is_compiling", None)
    return bool(fn()) if fn is not None else False


def outer_name(default: str) -> str:
    """The public function the user called (set by :func:`public`), else ``default``."""
    return _OUTER.get() or default


@contextlib.contextmanager
def renamed(names: dict):
    """Rewrites the argument names in a divkit.Error raised inside (an inner function's
    ``student_logits`` is the caller's ``policy_logits``), so that the message names the
    caller's argument."""
    try:
        yield
    except Error as e:
        msg = str(e)
        for old, new in names.items():
            msg = re.sub(rf"\b{re.escape(old)}\b", new, msg)
        raise (ArgTypeError if isinstance(e, ArgTypeError) else Error)(msg) from None


def public(
    fn: str,
    *,
    finite_args: Sequence[str] = (),
    logits_args: Sequence[str] = (),
    ints: Sequence[str] = (),
) -> Callable:
    """Decorates a public function (or a public class's ``__init__`` / ``forward``) with the
    shared checks of the error policy:

    * tensors: none complex; integer or bool only for names that hold labels, indices,
      lengths or masks (or are listed in ``ints``); all on one device, none on ``meta``;
    * ``finite_args``: no NaN / inf values; ``logits_args``: no NaN / +inf, -inf allowed as
      masked entries but no row of only -inf (for the inputs computed in torch: a C++ kernel
      checks its own);
    * an exception that is not a divkit.Error becomes one whose message starts with ``fn``; a
      divkit.Error from another divkit function is re-attributed to ``fn``.
    """

    def deco(f: Callable) -> Callable:
        sig = inspect.signature(f)

        @functools.wraps(f)
        def wrapper(*args, **kwargs):
            try:
                bound = sig.bind(*args, **kwargs)
            except TypeError as e:
                raise ArgTypeError(f"{fn}: {e}") from None
            device = None
            tensors = [nt for pname, v in bound.arguments.items() for nt in _tensors(pname, v)]
            for name, t in tensors:
                if device is None:
                    device = (name, t.device)
                elif t.device != device[1]:
                    fail(
                        fn,
                        f"{name} is on device {t.device}, but {device[0]} is on "
                        f"{device[1]}: the tensors must be on one device",
                    )
            for pname, v in bound.arguments.items():
                for name, t in _tensors(pname, v):
                    if t.is_complex():
                        fail_type(fn, f"{name} has complex dtype {t.dtype}; expected real values")
                    if not t.is_floating_point() and not (_int_allowed(pname) or pname in ints):
                        fail_type(
                            fn,
                            f"{name} has dtype {t.dtype}; {name} must have a floating dtype "
                            f"(real values)",
                        )
                    if t.device.type == "meta":
                        fail(fn, f"{name} is a meta tensor (no data); divkit computes on values")
            for pname in finite_args:
                for name, t in _tensors(pname, bound.arguments.get(pname)):
                    finite(fn, name, t)
            for pname in logits_args:
                for name, t in _tensors(pname, bound.arguments.get(pname)):
                    finite(fn, name, t, logits=True)
            # Dynamo cannot trace a ContextVar; a traced call reaches the custom ops, whose
            # messages name their function themselves.
            token = None if _compiling() or _OUTER.get() is not None else _OUTER.set(fn)
            try:
                return f(*args, **kwargs)
            except ArgTypeError as e:
                raise ArgTypeError(_prefix(fn, str(e))) from None
            except Error as e:
                raise Error(_prefix(fn, str(e))) from None
            except (
                TypeError,
                ValueError,
                IndexError,
                KeyError,
                AttributeError,
                ZeroDivisionError,
                OverflowError,
                NotImplementedError,
                RuntimeError,
            ) as e:
                if isinstance(e, RuntimeError) and "out of memory" in str(e):
                    raise
                raise Error(f"{fn}: invalid arguments ({type(e).__name__}: {e})") from e
            finally:
                if token is not None:
                    _OUTER.reset(token)

        wrapper.__signature__ = sig
        return wrapper

    return deco
