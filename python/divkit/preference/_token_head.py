"""The fused per-token terms of the token-level preference losses (TDPO, SparsePO) when both the
policy and the reference are linear heads: one pass of divkit's fused distillation engine
(``include/divkit/fused_linear.h``, ``FusedLabelTerms``) computes, from each chunk of both heads'
logits, the policy's and the reference's label log-probs and KL(pi_ref || pi) per token. The
backward is one more pass with the upstream gradients as per-token weights (the log-prob's as the
hard term's, the KL's as the soft term's), reading the chunks the forward kept within the keep
budget instead of recomputing their logits.

On CPU tensors that engine is the C++ core (``_C.fused_linear_label_terms``); on other devices
(CUDA) and with ``backend="torch"`` it is the PyTorch chunk loop of
:func:`divkit.backends.torch_ops.fused_linear_label_terms`: the same pass, outputs and
semantics, with torch's GEMMs."""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from typing import Any, Callable, Optional

import torch

from .. import _C, _device
from .. import _validate as check
from ..backends import torch_ops

# The backend of the calls made inside :func:`backend_scope` (the per-side path reaches
# token_terms through token_logratio_and_kl, which has no backend argument).
_BACKEND: contextvars.ContextVar = contextvars.ContextVar(
    "divkit_token_head_backend", default="auto"
)


@contextlib.contextmanager
def backend_scope(backend: str):
    """Runs the block with ``backend`` for the label-terms engine (see :func:`engine`).
    "auto" leaves the enclosing choice as it is, without touching the context variable
    (torch.compile cannot trace one)."""
    if backend == "auto":
        yield
        return
    token = _BACKEND.set(backend)
    try:
        yield
    finally:
        _BACKEND.reset(token)


def engine(fn: str, tensors, backend: Optional[str] = None) -> str:
    """The engine of the one pass: "core" (the C++ engine: CPU tensors under backend "auto" or
    "core"), "torch" (the PyTorch chunk loop: other devices, or backend "torch") or "torch_rows"
    (the PyTorch chunk loop with divkit's divergence kernel computing each chunk's KL rows: CUDA
    tensors under backend "auto" in a build whose CUDA kernels include ``divergence``, the route
    ``divkit._device.route`` gives the op "fused_linear_label_terms"); backend "core" on a device
    without the C++ engine, and meta tensors (no values), raise."""
    backend = _device.backend(fn, _BACKEND.get() if backend is None else backend)
    dev = _device.common_device(fn, tensors) or torch.device("cpu")
    if backend == "torch" or dev.type != "cpu":
        if backend == "core" or dev.type == "meta":
            check.fail(fn, f"no kernel for device {dev}")
        route = _device.route(fn, "fused_linear_label_terms", backend, tensors)
        return "torch_rows" if route.rows == "core" else "torch"
    return "core"


def _rows_route(h: torch.Tensor):
    """The route of the "torch_rows" engine's KL rows: divkit's kernel on h's device (PyTorch's
    current stream on CUDA, read at the call)."""
    dev = h.device
    stream = _device._cuda_stream(dev) if dev.type == "cuda" else None
    return _device.Route("torch", dev, stream, rows="core")


# Bytes of logits kept between the forward and the backward of one call (per side of a TDPO
# pair): the chunks of tokens [0, K) whose policy (and, when the KL is differentiated, reference)
# logits fit, as fp32. The rest are recomputed by the backward.
DEFAULT_KEEP_BYTES = 64 << 20

# Bytes of fp32 logits per chunk buffer (the engine holds up to three such buffers at once).
_CHUNK_BYTES = 32 << 20


def _chunk_rows(v: int, n: int, chunk_size: Optional[int], fn: str) -> int:
    if chunk_size is not None:
        rows = check.integer(fn, "chunk_size", chunk_size, min=1)
    else:
        rows = max(1, _CHUNK_BYTES // (4 * max(1, v)))
    return max(1, min(rows, n))


def _options(chunk: int, reduction: str, soft_weight: float, ignore_index: int):
    o = _C.FusedLinearOptions()
    o.ignore_index = ignore_index
    o.kind = "forward_kl"
    o.temperature = 1.0
    o.reduction = reduction
    o.chunk_size = chunk
    o.hard_weight = 0.0
    o.soft_weight = soft_weight
    return o


def usable(h, w, b, rh, rw, rb) -> bool:
    """Whether this path serves these inputs: tensors on one device (the C++ engine on the CPU,
    the PyTorch chunk loop elsewhere; a meta tensor has no values) and a reference that is not
    differentiated (its gradient is not part of this path)."""
    devs = {x.device for x in (h, w, b, rh, rw, rb) if isinstance(x, torch.Tensor)}
    if len(devs) != 1 or next(iter(devs)).type == "meta":
        return False
    return not any(x is not None and x.requires_grad for x in (rh, rw, rb))


@dataclasses.dataclass(frozen=True, eq=False)
class SideInputs:
    """The inputs of one side's label terms (:func:`token_terms`, and the engine pass over rows
    of one side): the policy's head (``hidden`` ``[..., H]``, ``weight`` ``[V, H]``, ``bias``),
    the reference's (``ref_hidden`` ``[..., H_ref]``, ``ref_weight``, ``ref_bias``), the
    validated ``labels``, ``ignore_index`` and whether the KL is differentiated (``kl_grad``),
    carried by name instead of a long row of positional arguments."""

    hidden: Any
    weight: Any
    bias: Any
    ref_hidden: Any
    ref_weight: Any
    ref_bias: Any
    labels: Any
    ignore_index: int
    kl_grad: bool


@dataclasses.dataclass(frozen=True)
class _SidePlan:
    """:class:`_TokenTerms`'s non-tensor settings (its forward and backward)."""

    fn: str
    ignore_index: int
    kl_grad: bool
    chunk: int  # rows per chunk of logits
    keep_rows: int  # rows whose logits the forward keeps for the backward
    engine: str  # see engine()


class _TokenTerms(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, w, b, rh, rw, rb, labels, plan: _SidePlan):
        side = SideInputs(
            hidden=h,
            weight=w,
            bias=b,
            ref_hidden=rh,
            ref_weight=rw,
            ref_bias=rb,
            labels=labels,
            ignore_index=plan.ignore_index,
            kl_grad=plan.kl_grad,
        )
        lp, ref_lp, kl, kept_s, kept_t = _label_terms(
            plan.fn, side, chunk=plan.chunk, keep_rows=plan.keep_rows, eng=plan.engine
        )
        ctx.save_for_backward(h, w, b, rh, rw, rb, labels)
        ctx.kept = (kept_s, kept_t)
        ctx.kl_grad, ctx.chunk, ctx.fn, ctx.ignore_index = (
            plan.kl_grad,
            plan.chunk,
            plan.fn,
            plan.ignore_index,
        )
        ctx.engine = plan.engine
        ctx.mark_non_differentiable(ref_lp)
        if not plan.kl_grad:
            ctx.mark_non_differentiable(kl)
        return lp, ref_lp, kl

    @staticmethod
    def backward(ctx, g_lp, g_ref_lp, g_kl):
        h, w, b, rh, rw, rb, labels = ctx.saved_tensors
        kept_s, kept_t = ctx.kept
        ctx.kept = (None, None)
        need = ctx.needs_input_grad[:3]
        n = h.shape[0]
        if ctx.engine != "core":
            soft = g_kl is not None and ctx.kl_grad
            grads = torch_ops.fused_linear_label_terms_backward(
                h,
                w,
                b,
                rh,
                rw,
                rb,
                labels,
                ctx.ignore_index,
                ctx.chunk,
                None if g_lp is None else g_lp.reshape(-1),
                g_kl.reshape(-1) if soft else None,
                need,
                kept_s,
                kept_t if soft else None,
                fn=ctx.fn,
            )
            return (*grads, None, None, None, None, None)
        # d lp / dz = -(d CE / dz): the log-prob's upstream gradient is the hard term's weight,
        # negated; the KL's is the soft term's (forward_kl = KL(teacher || student)).
        hard = (
            torch.zeros(n, dtype=torch.float64)
            if g_lp is None
            else (-g_lp.reshape(-1).to(torch.float64)).contiguous()
        )
        soft = g_kl is not None and ctx.kl_grad
        weights = g_kl.reshape(-1).to(torch.float64).contiguous() if soft else None
        grads = [
            torch.empty(x.shape, dtype=x.dtype) if f else None for x, f in zip((h, w, b), need)
        ]
        loss = torch.empty(1, dtype=torch.float32)
        with check.attributed(ctx.fn):
            _C.fused_linear_label_terms(
                (h, w, b),
                (rh, rw, rb),
                labels,
                weights,
                _options(ctx.chunk, "sum", 1.0 if soft else 0.0, ctx.ignore_index),
                loss,
                tuple(grads),
                (None, None, hard, kept_s, kept_t if soft else None),
                True,
            )
        return (*grads, None, None, None, None, None)


def _rows(x: torch.Tensor) -> torch.Tensor:
    """[..., H] as [N, H] with unit stride along H (inside the autograd graph)."""
    x = x.reshape(-1, x.shape[-1])
    return x if x.stride(-1) == 1 else x.contiguous()


def token_terms(
    fn: str,
    side: SideInputs,
    *,
    chunk_size: Optional[int],
    keep_bytes: Optional[int],
    backend: Optional[str] = None,
):
    """(log pi(y), log pi_ref(y), KL(pi_ref || pi)) per token, each ``[...]`` fp32 (0 at ignored
    tokens), from ``side`` (:class:`SideInputs`: ``hidden [..., H]``, ``weight [V, H]``,
    ``ref_hidden [..., H_ref]``, ``ref_weight [V, H_ref]`` and validated ``labels [...]``).
    Gradients reach the policy's hidden, weight and bias (the KL's only with ``kl_grad``); the
    reference is treated as a constant (see :func:`usable`). ``backend``: see :func:`engine`
    (None: the enclosing :func:`backend_scope`'s)."""
    h, w, b = side.hidden, side.weight, side.bias
    rh, rw, rb = side.ref_hidden, side.ref_weight, side.ref_bias
    kl_grad = side.kl_grad
    eng = engine(fn, _NAMES(h, w, b, rh, rw, rb), backend)
    lead = h.shape[:-1]
    hf, rhf = _rows(h), _rows(rh.detach())
    n, v = hf.shape[0], w.shape[0]
    chunk = _chunk_rows(v, n, chunk_size, fn)
    if keep_bytes is None:
        keep_bytes = DEFAULT_KEEP_BYTES
    keep_bytes = check.integer(fn, "keep_bytes", keep_bytes, min=0)
    differentiated = torch.is_grad_enabled() and any(
        x is not None and x.requires_grad for x in (h, w, b)
    )
    # The chunks of tokens [0, K) that fit the budget: the policy's logits, and the reference's
    # when the KL is differentiated (its gradient needs p_ref); fp32 (fp64 on the PyTorch loop
    # for fp64 inputs).
    item = 8 if eng != "core" and torch.float64 in (h.dtype, w.dtype, rh.dtype, rw.dtype) else 4
    per_token = item * v * (2 if kl_grad else 1)
    keep_rows = (min(n, keep_bytes // per_token) // chunk) * chunk if differentiated else 0
    lp, ref_lp, kl = _TokenTerms.apply(
        hf,
        w if w.stride(-1) == 1 else w.contiguous(),
        b,
        rhf,
        rw.detach() if rw.stride(-1) == 1 else rw.detach().contiguous(),
        None if rb is None else rb.detach(),
        side.labels.reshape(-1),
        _SidePlan(
            fn=fn,
            ignore_index=int(side.ignore_index),
            kl_grad=bool(kl_grad),
            chunk=chunk,
            keep_rows=keep_rows,
            engine=eng,
        ),
    )
    return lp.reshape(lead), ref_lp.reshape(lead), kl.reshape(lead)


def _NAMES(h, w, b, rh, rw, rb):
    return (
        ("policy_hidden", h),
        ("lm_head_weight", w),
        ("lm_head_bias", b),
        ("ref_hidden", rh),
        ("ref_weight", rw),
        ("ref_bias", rb),
    )


# Bytes of fp32 logits that the pair engine keeps for one group of pairs between the chunks'
# forward pass and their gradient pass (the gradients computed in the forward).
DEFAULT_PAIR_KEEP_BYTES = 256 << 20


@dataclasses.dataclass(frozen=True)
class PairLoss:
    """The per-loss piece of the token-level pair losses (TDPO, SparsePO), shared by the
    per-side path and the pair engine (:func:`pair_in_forward`): only the sequence-level
    arithmetic differs between the losses; the chunk loop over both heads' logits is one.

    ``combine(chosen, rejected, *extras)`` -> ``(losses, chosen_rewards, rejected_rewards)``,
    each ``[B]``, with ``chosen`` and ``rejected`` the per-token ``(logratio, kl, mask)``
    ``[B, T]`` of :func:`token_logratio_and_kl` (fp32, 0 at ignored tokens; mask bool). Each
    pair's loss must depend on its own row of every argument only (the engine takes pairs in
    groups). ``extras``: tensors with a leading batch dimension that the combine reads
    (SparsePO's token masks), sliced by pair; gradients reach those that require grad.
    ``kl_grad_chosen``: whether the chosen side's KL is differentiated (False: TDPO2's
    stop-gradient)."""

    combine: Callable
    kl_grad_chosen: bool = True
    extras: tuple = ()


@dataclasses.dataclass(frozen=True, eq=False)
class PairInputs:
    """The inputs of a fused pair loss (:func:`~divkit.tdpo_loss_fused`,
    :func:`~divkit.sparsepo_loss_fused`) under the public arguments' names: built once by the
    public function and carried through the pair engine (:func:`pair_in_forward`) and the
    per-side path, instead of a long row of positional arguments. The policy's head
    (``policy_*_hidden`` ``[B, T, H]``, ``lm_head_weight``, ``lm_head_bias``); the labels; the
    reference either as logits (``ref_*_logits``) or as hidden states with ``ref_weight`` and
    ``ref_bias``; and the options. ``backend`` is the checked name (see :func:`engine`)."""

    policy_chosen_hidden: Any
    policy_rejected_hidden: Any
    lm_head_weight: Any
    chosen_labels: Any
    rejected_labels: Any
    ref_chosen_logits: Any = None
    ref_rejected_logits: Any = None
    ref_chosen_hidden: Any = None
    ref_rejected_hidden: Any = None
    ref_weight: Any = None
    lm_head_bias: Any = None
    ref_bias: Any = None
    ignore_index: Any = -100
    chunk_size: Optional[int] = None
    keep_bytes: Optional[int] = None
    backend: str = "auto"


@dataclasses.dataclass(frozen=True)
class _PairPlan:
    """The pair engine's non-tensor settings, carried through :class:`_PairGradsInForward`
    (its forward and, for a recompute, its backward)."""

    fn: str
    ignore_index: int
    chunk: int  # rows per chunk of logits
    group: int  # pairs per group whose logits are kept from its forward to its gradient pass
    combine: Callable  # PairLoss.combine
    kl_grad_chosen: bool
    engine: str  # "core" or "torch" (see engine())


def _forward_side(fn: str, side: SideInputs, *, chunk: int, outs, keep: bool, eng: str = "core"):
    """One forward call over rows of one side (``side.hidden`` ``[N, H]``), filling outs (lp,
    ref_lp, kl) and, with keep, the kept logits (returned)."""
    keep_rows = side.hidden.shape[0] if keep else 0
    got = _label_terms(fn, side, chunk=chunk, keep_rows=keep_rows, eng=eng, outs=outs)
    return got[3], got[4]


def _label_terms(fn: str, side: SideInputs, *, chunk: int, keep_rows: int, eng: str, outs=None):
    """One engine pass (the core's, or the PyTorch route's with eng "torch") over the rows of
    ``side`` (``hidden`` ``[N, H]``): (lp, ref_lp, kl, kept_s, kept_t), the first three [N]
    fp32 (written into outs when given), the logits of the first keep_rows rows kept for the
    backward (the reference's only with kl_grad)."""
    h, w, b = side.hidden, side.weight, side.bias
    rh, rw, rb = side.ref_hidden, side.ref_weight, side.ref_bias
    labels, ignore_index, kl_grad = side.labels, side.ignore_index, side.kl_grad
    n, v = h.shape[0], w.shape[0]
    if eng != "core":
        route = _rows_route(h) if eng == "torch_rows" else None
        got = torch_ops.fused_linear_label_terms(
            h, w, b, rh, rw, rb, labels, ignore_index, chunk, keep_rows, kl_grad, fn=fn, route=route
        )
        if outs is None:
            return got
        for out, x in zip(outs, got[:3]):
            out.copy_(x)
        return (*outs, got[3], got[4])
    if outs is None:
        outs = tuple(torch.empty(n, dtype=torch.float32) for _ in range(3))
    lp, ref_lp, kl = outs
    kept_s = torch.empty((keep_rows, v), dtype=torch.float32) if keep_rows else None
    kept_t = torch.empty((keep_rows, v), dtype=torch.float32) if keep_rows and kl_grad else None
    with check.attributed(fn):
        _C.fused_linear_label_terms(
            (h, w, b),
            (rh, rw, rb),
            labels,
            None,
            _options(chunk, "none", 1.0, ignore_index),
            kl,
            (None, None, None),
            (lp, ref_lp, None, kept_s, kept_t),
            False,
        )
    return lp, ref_lp, kl, kept_s, kept_t


def _extra_grads_needed(ctx, extras):
    first = 11  # the Function's inputs before the extras
    return [
        isinstance(e, torch.Tensor) and bool(ctx.needs_input_grad[first + i])
        for i, e in enumerate(extras)
    ]


def _rows_of(x, p0, p1):
    return None if x is None else x[p0:p1]


class _PairGradsInForward(torch.autograd.Function):
    """A pair loss (:class:`PairLoss`) from both heads with the gradients of ``losses.sum()``
    computed in the forward, pair group by pair group: each group's logits are kept (within the
    budget) from the forward pass to its gradient pass, so no chunk is computed twice. The
    backward scales them by the upstream gradient when it is the same for every pair
    (``losses.sum()`` / ``.mean()``), and otherwise recomputes through the per-token path."""

    @staticmethod
    def forward(ctx, hc, hr, w, b, rhc, rhr, rw, rb, cl, rl, plan: _PairPlan, *extras):
        fn, ii, chunk, group = plan.fn, plan.ignore_index, plan.chunk, plan.group
        combine, kl_c, eng = plan.combine, plan.kl_grad_chosen, plan.engine
        bsz, t = cl.shape
        n, hdim, v = bsz * t, hc.shape[-1], w.shape[0]
        hcf, hrf = _rows(hc), _rows(hr)
        rhcf, rhrf = _rows(rhc), _rows(rhr)
        need = ctx.needs_input_grad[:4]
        need_x = _extra_grads_needed(ctx, extras)
        dev = hc.device
        # The weight's gradient accumulates over the groups and both sides in fp32 (the
        # PyTorch loop: its compute dtype, fp64 for fp64 inputs).
        acc = torch_ops._compute_dtype(hc, w, rhc, rw) if eng != "core" else torch.float32
        ghc = torch.empty((n, hdim), dtype=hc.dtype, device=dev) if need[0] else None
        ghr = torch.empty((n, hdim), dtype=hr.dtype, device=dev) if need[1] else None
        gw = torch.zeros((v, w.shape[1]), dtype=acc, device=dev) if need[2] else None
        gb = torch.zeros(v, dtype=acc, device=dev) if need[3] and b is not None else None
        gx = [
            torch.zeros(e.shape, dtype=e.dtype, device=e.device) if f else None
            for e, f in zip(extras, need_x)
        ]
        masks = {"c": cl != ii, "r": rl != ii}
        terms = {
            s: [torch.zeros(n, dtype=torch.float32, device=dev) for _ in range(3)] for s in "cr"
        }
        sides = {
            "c": (hcf, rhcf, cl.reshape(-1), kl_c, ghc),
            "r": (hrf, rhrf, rl.reshape(-1), True, ghr),
        }
        for p0 in range(0, bsz, group):
            p1 = min(bsz, p0 + group)
            r0, r1 = p0 * t, p1 * t
            kept = {}
            for s, (h, rh, lab, klg, _) in sides.items():
                outs = [x[r0:r1] for x in terms[s]]
                rows = SideInputs(
                    hidden=h[r0:r1],
                    weight=w,
                    bias=b,
                    ref_hidden=rh[r0:r1],
                    ref_weight=rw,
                    ref_bias=rb,
                    labels=lab[r0:r1],
                    ignore_index=ii,
                    kl_grad=klg,
                )
                kept[s] = _forward_side(fn, rows, chunk=chunk, outs=outs, keep=True, eng=eng)
            # The per-token gradients of this group's losses (each pair's loss depends on its
            # own tokens and extras only), through the same sequence-level arithmetic as the
            # output; and the extras' gradients.
            leaves = [
                (terms[s][0][r0:r1] - terms[s][1][r0:r1]).reshape(p1 - p0, t).requires_grad_()
                if k == 0
                else terms[s][2][r0:r1].reshape(p1 - p0, t).requires_grad_()
                for s in "cr"
                for k in (0, 1)
            ]
            xs = [
                e[p0:p1].detach().requires_grad_() if f else _rows_of(e, p0, p1)
                for e, f in zip(extras, need_x)
            ]
            wrt = leaves + [x for x, f in zip(xs, need_x) if f]
            with torch.enable_grad():
                losses_g = combine(
                    (leaves[0], leaves[1], masks["c"][p0:p1]),
                    (leaves[2], leaves[3], masks["r"][p0:p1]),
                    *xs,
                )[0]
                got = torch.autograd.grad(losses_g.sum(), wrt, allow_unused=True)
            got = [torch.zeros_like(x) if g is None else g for x, g in zip(wrt, got)]
            g_lrc, g_klc, g_lrr, g_klr = got[:4]
            rest = iter(got[4:])
            for buf, f in zip(gx, need_x):
                if f:
                    buf[p0:p1] = next(rest)
            upstream = {"c": (g_lrc, g_klc), "r": (g_lrr, g_klr)}
            for s, (h, rh, lab, klg, gh) in sides.items():
                g_lp, g_kl = upstream[s]
                if eng != "core":
                    kept_s, kept_t = kept.pop(s)
                    torch_ops.fused_linear_label_terms_backward(
                        h[r0:r1],
                        w,
                        b,
                        rh[r0:r1],
                        rw,
                        rb,
                        lab[r0:r1],
                        ii,
                        chunk,
                        g_lp.reshape(-1),
                        g_kl.reshape(-1) if klg else None,
                        (gh is not None, gw is not None, gb is not None),
                        kept_s,
                        kept_t if klg else None,
                        (None if gh is None else gh[r0:r1], gw, gb),
                        fn=fn,
                    )
                    del kept_s, kept_t
                    continue
                hard = (-g_lp.reshape(-1).to(torch.float64)).contiguous()
                weights = g_kl.reshape(-1).to(torch.float64).contiguous() if klg else None
                loss = torch.empty(1, dtype=torch.float32)
                kept_s, kept_t = kept.pop(s)
                with check.attributed(fn):
                    _C.fused_linear_label_terms(
                        (h[r0:r1], w, b),
                        (rh[r0:r1], rw, rb),
                        lab[r0:r1],
                        weights,
                        _options(chunk, "sum", 1.0 if klg else 0.0, ii),
                        loss,
                        (None if gh is None else gh[r0:r1], gw, gb),
                        (None, None, hard, kept_s, kept_t if klg else None),
                        True,
                        True,
                    )
                del kept_s, kept_t
        shape = (bsz, t)
        lrc = (terms["c"][0] - terms["c"][1]).reshape(shape)
        lrr = (terms["r"][0] - terms["r"][1]).reshape(shape)
        losses, cr, rr = combine(
            (lrc, terms["c"][2].reshape(shape), masks["c"]),
            (lrr, terms["r"][2].reshape(shape), masks["r"]),
            *extras,
        )
        ctx.grads = (
            None if ghc is None else ghc.reshape(hc.shape),
            None if ghr is None else ghr.reshape(hr.shape),
            None if gw is None else gw.to(w.dtype),
            None if gb is None else gb.to(b.dtype),
            *gx,
        )
        ctx.save_for_backward(hc, hr, w, b, rhc, rhr, rw, rb, cl, rl, *extras)
        ctx.plan = plan
        ctx.mark_non_differentiable(cr, rr)
        return losses.detach(), cr.detach(), rr.detach()

    @staticmethod
    def backward(ctx, go, _cr, _rr):
        grads = ctx.grads
        ctx.grads = None
        if go is None:
            return (None,) * len(ctx.needs_input_grad)
        go = go.reshape(-1)
        if grads is not None and bool((go == go[0]).all()):
            c = go[0]
            g = [None if x is None else x * c.to(x.dtype) for x in grads]
            return (*g[:4], *(None,) * 7, *g[4:])
        # A pair-dependent upstream gradient (or a second backward): the per-token path.
        hc, hr, w, b, rhc, rhr, rw, rb, cl, rl, *extras = ctx.saved_tensors
        plan = ctx.plan
        need = ctx.needs_input_grad[:4]
        need_x = _extra_grads_needed(ctx, extras)
        ps = [
            x.detach().requires_grad_(f) if x is not None else None
            for x, f in zip((hc, hr, w, b), need)
        ]
        xs = [e.detach().requires_grad_() if f else e for e, f in zip(extras, need_x)]
        ii = plan.ignore_index
        with torch.enable_grad():
            sides = []
            for h, rh, lab, klg in (
                (ps[0], rhc, cl, plan.kl_grad_chosen),
                (ps[1], rhr, rl, True),
            ):
                side = SideInputs(
                    hidden=h,
                    weight=ps[2],
                    bias=ps[3],
                    ref_hidden=rh,
                    ref_weight=rw,
                    ref_bias=rb,
                    labels=lab.reshape(-1),
                    ignore_index=ii,
                    kl_grad=klg,
                )
                lp, ref_lp, kl = token_terms(
                    plan.fn, side, chunk_size=plan.chunk, keep_bytes=0, backend=plan.engine
                )
                sides.append((lp - ref_lp, kl, lab != ii))
            losses = plan.combine(*sides, *xs)[0]
            inputs = [x for x, f in zip(ps, need) if f] + [x for x, f in zip(xs, need_x) if f]
            got = iter(torch.autograd.grad(losses, inputs, go, allow_unused=True))
        g = [next(got) if f else None for f in need]
        gx = [next(got) if f else None for f in need_x]
        return (*g, *(None,) * 7, *gx)


def pair_in_forward(fn, loss: PairLoss, p: PairInputs):
    """The pair loss's (losses, chosen_rewards, rejected_rewards) with the gradients computed
    in the forward, or None when one pair's logits do not fit ``p.keep_bytes`` (the caller then
    takes the per-token path). ``p``: reference hidden states (no reference logits), labels
    validated as ``[B, T]``, ``ignore_index`` and ``keep_bytes`` checked; ``p.backend``: see
    :func:`engine`."""
    hc, hr = p.policy_chosen_hidden, p.policy_rejected_hidden
    w, b, rw, rb = p.lm_head_weight, p.lm_head_bias, p.ref_weight, p.ref_bias
    rhc, rhr = p.ref_chosen_hidden, p.ref_rejected_hidden
    cl, rl = p.chosen_labels, p.rejected_labels
    eng = engine(fn, _NAMES(hc, w, b, rhc, rw, rb) + (("policy_rejected_hidden", hr),), p.backend)
    bsz, t = cl.shape
    v = w.shape[0]
    budget = DEFAULT_PAIR_KEEP_BYTES if p.keep_bytes is None else p.keep_bytes
    item = 8 if eng != "core" and torch.float64 in (hc.dtype, w.dtype, rhc.dtype, rw.dtype) else 4
    # Kept per pair: the policy's logits of both sides, the reference's of the rejected side,
    # and the chosen reference's when the chosen KL is differentiated.
    per_pair = item * v * t * ((2 if loss.kl_grad_chosen else 1) + 2)
    if per_pair == 0:
        return None  # no tokens (T = 0) or V = 0: the per-side path
    group = min(bsz, budget // per_pair)
    if group < 1:
        return None
    plan = _PairPlan(
        fn=fn,
        ignore_index=int(p.ignore_index),
        chunk=_chunk_rows(v, group * t, p.chunk_size, fn),
        group=group,
        combine=loss.combine,
        kl_grad_chosen=bool(loss.kl_grad_chosen),
        engine=eng,
    )
    return _PairGradsInForward.apply(
        hc,
        hr,
        w if w.stride(-1) == 1 else w.contiguous(),
        b,
        rhc.detach(),
        rhr.detach(),
        rw.detach() if rw.stride(-1) == 1 else rw.detach().contiguous(),
        None if rb is None else rb.detach(),
        cl,
        rl,
        plan,
        *loss.extras,
    )
