"""Fused linear-head losses: from hidden states to loss and gradients in chunks of tokens, never
materializing the [tokens x vocabulary] logits (C++ core: include/divkit/fused_linear.h).

For a head ``logits = hidden @ weight.T + bias`` the core computes each chunk's logits with an
fp32 GEMM, the loss and d loss / d logits of the chunk in that buffer, and the gradients of
hidden, weight and bias with two more GEMMs. Peak extra memory is O(chunk x V), independent of
the number of tokens. Inputs may be float32, bfloat16, float16 or float64; they are converted
to fp32 (a weight one block of rows at a time, never as a whole copy) and multiplied and
accumulated in fp32 (no logits rounded to bf16, unlike Liger-Kernel's fused losses). Gradients
come back in each input's dtype.

With ``process_group`` the weights (and biases) are the rank's shard of the vocabulary, a
contiguous block of rows in rank order (as Megatron's vocabulary-parallel head; blocks may differ
in size); every rank passes the same hidden states and labels (global token ids), and gets the
same loss and the gradients of its own shard (and the full hidden-state gradient). The same C++
chunk loop runs on every rank, calling back into ``torch.distributed.all_reduce`` between the
phases of each chunk. See :mod:`divkit.distributed`.
"""

from __future__ import annotations

from typing import Callable, List, NamedTuple, Optional, Sequence

import torch

from . import _C, _device, _ops
from . import _validate as check
from ._autograd import Scaling, grads_in_forward, recompute_in_backward
from .backends import torch_ops

__all__ = [
    "fused_linear_divergence",
    "fused_linear_cross_entropy",
    "fused_linear_logprobs",
    "fused_linear_sparse_divergence",
    "LogprobsResult",
]

_LEAD = "the hidden states' shape without H"


def _hidden(fn: str, name: str, x, cpu: bool = True):
    x = check.tensor(fn, name, x, min_ndim=1, cpu=cpu)
    if x.shape[-1] == 0:
        check.fail(fn, f"{name} has shape {tuple(x.shape)}: the hidden size H must be >= 1")
    return x


def _matrix(fn: str, name: str, x, cpu: bool = True):
    return check.tensor(fn, name, x, ndim=(2,), cpu=cpu)


def _bias(fn: str, name: str, x, cpu: bool = True):
    return check.tensor(fn, name, x, ndim=(1,), optional=True, cpu=cpu)


def _check_head(fn: str, names: Sequence[str], h, w, b, group=None) -> None:
    """hidden [..., H], weight [V, H] with V >= 1, bias [V]: checked here, before either route
    runs, so that the PyTorch chunk loop raises what the core does (names: the three arguments'
    names in ``fn``). Not with a vocabulary-parallel ``group``: a shard's error must be raised
    on every rank, which the collective checks of both routes do."""
    if group is not None:
        return
    hn, wn, bn = names
    if w.shape[1] != h.shape[-1]:
        check.fail(
            fn,
            f"{hn} {list(h.shape)} and {wn} {list(w.shape)} disagree on the hidden size H",
        )
    if w.shape[0] == 0:
        check.fail(fn, f"{wn} has V = 0 rows (an empty vocabulary)")
    if b is not None and b.shape[0] != w.shape[0]:
        check.fail(fn, f"{bn} must have shape [{w.shape[0]}], got [{b.shape[0]}]")


def _check_finite(fn: str, route, group, *named) -> None:
    """The PyTorch route's check of what the core checks in C++: hidden states and weights
    (``named``: (name, tensor) pairs) with a NaN or +-inf entry raise, naming the first bad row
    of [N, H] or [V, H]. An ignored token's row counts too: its NaN reaches the weight gradient
    through the GEMM (0 * NaN). Not on the core's route (it checks), while torch.compile traces
    (a host read), nor with a vocabulary-parallel group (a shard's error must reach every rank
    through the collective checks), nor on tensors without values (fake or traced) or while a
    CUDA stream is captured into a graph (no host read there)."""
    if route is None or route.core or group is not None or _ops.compiling():
        return
    if not all(_ops._is_real(x) for _, x in named):
        return
    if any(x.is_cuda for _, x in named) and torch.cuda.is_current_stream_capturing():
        return
    for name, x in named:
        bad = ~torch.isfinite(x.detach().reshape(-1, x.shape[-1])).all(-1)
        if bool(bad.any()):
            check.fail(fn, f"{name} contains NaN or inf at row {int(bad.nonzero()[0, 0])}")


_DTENSOR: list = []


def _dtensor_type():
    """torch's DTensor class (None without torch.distributed or before torch 2.4), looked up
    once."""
    if not _DTENSOR:
        try:
            from torch.distributed.tensor import DTensor
        except Exception:
            DTensor = None
        _DTENSOR.append(DTensor)
    return _DTENSOR[0]


def _full(fn: str, name: str, x):
    """A DTensor weight or bias (FSDP2's sharded parameters, read outside the module's forward)
    as the full tensor, gathered once per call; its gradient is averaged over the mesh and
    handed back sharded like the parameter, as FSDP2 reduces every other gradient. Token
    tensors (hidden states, labels) must be local: each rank's batch is its own."""
    dt = _dtensor_type()
    if dt is None or not isinstance(x, dt):
        return x
    if name in ("hidden", "student_hidden", "teacher_hidden", "labels", "weights"):
        check.fail(
            fn,
            f"{name} is a DTensor; pass this rank's tokens as a plain tensor (x.to_local() or "
            f"x.full_tensor(), whichever is the batch this rank should see)",
        )
    from torch.distributed.tensor import Partial

    return x.full_tensor(grad_placements=[Partial("avg")] * x.device_mesh.ndim)


def _check_same_tokens(
    fn: str,
    group,
    hidden: Sequence[torch.Tensor],
    labels,
    *,
    count: Optional[int] = None,
    weights: Optional[torch.Tensor] = None,
    device=None,
    error: Optional[Exception] = None,
) -> None:
    """Vocabulary-parallel mode: every rank must pass the same tokens (hidden states, global
    labels, token weights). A cheap fingerprint (token count, sums of the labels and weights, of
    the hidden states and their squares, in fp64) is compared across the group with one
    all-reduce (max of x and of -x); a difference raises on every rank instead of a silently
    wrong loss (or ranks waiting on each other's chunks). ``count`` and ``device`` default to
    the first hidden state's. ``error``: this rank's argument error, if any, raised on this rank
    (and a pointer to it on the others) after the all-reduce, so that every rank raises."""
    import torch.distributed as dist

    with torch.no_grad():
        n = hidden[0].shape[0] if count is None else count
        dev = hidden[0].device if device is None else device
        vals = [0.0 if error is None else 1.0, float(n)]
        vals.append(0.0 if labels is None else labels.double().sum())
        vals.append(0.0 if weights is None else weights.double().sum())
        for x in hidden:
            h = x.detach().double()
            vals += [h.sum(), (h * h).sum()]
        # On the tokens' device: NCCL reduces CUDA tensors only.
        stats = torch.stack([torch.as_tensor(v, dtype=torch.float64, device=dev) for v in vals])
        both = torch.cat([stats, -stats])
        dist.all_reduce(both, op=dist.ReduceOp.MAX, group=group)
        k = stats.numel()
        hi, lo = both[:k], -both[k:]
    if error is not None:
        raise error
    if float(hi[0]) > 0:
        check.fail(
            fn,
            "the arguments were rejected on another rank of the vocabulary-parallel group "
            "(see its error)",
        )
    # fp64 sums of the same values may differ in the last bits between thread counts.
    tol = 1e-10 * (hi.abs() + lo.abs())
    if bool(((hi - lo) > tol).any()):
        names = ["error", "token count", "labels", "weights"] + ["hidden states"] * (k - 4)
        bad = sorted({n for n, d, t in zip(names, (hi - lo).tolist(), tol.tolist()) if d > t})
        check.fail(
            fn,
            f"process_group: the ranks passed different tokens ({', '.join(bad)} differ); in "
            f"vocabulary-parallel mode every rank passes the same tokens and holds its own "
            f"shard of the vocabulary",
        )


def _labels(fn: str, labels, lead_shape, *, optional: bool = False, cpu: bool = True):
    if labels is None and not optional:
        check.fail_type(fn, "labels are required")
    return check.labels(fn, labels, lead_shape, lead=_LEAD, cpu=cpu)


def _head_loss(
    fn: str,
    call: Callable,
    tensors: Sequence[Optional[torch.Tensor]],
    reduced: bool,
    backward: Optional[Callable] = None,
    n_diff: int = 1,
):
    """The autograd of a fused head over ``tensors`` (hidden states, weights, biases; None for
    an absent bias, kept out of the graph).

    ``call(tensors, need, upstream) -> (outputs tuple, grads)`` makes one core call: ``need`` one
    flag per tensor, ``upstream`` None or the per-token upstream gradient (the call then uses it
    as token weights of a summed loss), ``grads`` one tensor or None per tensor. With a reduced
    loss the gradients come from the forward call and backward scales them, handing them over
    to autograd without a copy (GradsInForward); otherwise backward calls again with the
    upstream gradient (RecomputeInBackward), or ``backward(tensors, grad_out, need) -> grads``
    when given. Returns the outputs (one tensor when there is one)."""
    present = [i for i, t in enumerate(tensors) if t is not None]
    xs = [tensors[i] for i in present]

    def full(sub, fill=None) -> List:
        out = [fill] * len(tensors)
        for i, x in zip(present, sub):
            out[i] = x
        return out

    def pick(grads):
        return [grads[i] for i in present]

    if reduced:

        def run(need):
            outs, grads = call(list(tensors), full(need, False), None)
            return (outs[0] if len(outs) == 1 else tuple(outs)), pick(grads)

        return grads_in_forward(run, xs, Scaling(keep=False, fn=fn))

    def rerun(inputs, grad_out, need):
        ts = full(inputs)
        if grad_out is None:
            return call(ts, [False] * len(ts), None)[0], None
        if backward is not None:
            return None, pick(backward(ts, grad_out, full(need, False)))
        return None, pick(call(ts, full(need, False), grad_out)[1])

    rerun.fn = fn
    outs = recompute_in_backward(rerun, xs, n_diff)
    return outs[0] if len(outs) == 1 else outs


def _collective(group):
    """(rank, world size, all_reduce) of a torch.distributed process group, for the core's
    vocabulary-parallel mode: the core calls all_reduce(buffer, op) with a float64 numpy array
    viewing its own buffer, reduced in place over the group."""
    import torch.distributed as dist

    ops = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}

    def all_reduce(buffer, op):
        dist.all_reduce(torch.from_numpy(buffer), op=ops[op], group=group)

    return dist.get_rank(group), dist.get_world_size(group), all_reduce


def _options(group=None, **fields) -> "_C.FusedLinearOptions":
    """The core's options object, with the vocabulary-parallel collective of ``group`` if given."""
    opts = _C.FusedLinearOptions()
    for name, value in fields.items():
        setattr(opts, name, value)
    if group is not None:
        opts.rank, opts.world, opts.all_reduce = _collective(group)
    return opts


def _grad_buffer(x: Optional[torch.Tensor], need: bool) -> Optional[torch.Tensor]:
    return torch.empty(x.shape, dtype=x.dtype) if need and x is not None else None


# ---------------------------------------------------------------------------------------------
# Distillation
# ---------------------------------------------------------------------------------------------


class _DistillConfig(NamedTuple):
    kind: str
    beta: float
    alpha: float
    temperature: float
    scale_by_t_squared: bool
    ignore_index: int
    reduction: str
    num_items_in_batch: float
    hard_weight: float
    soft_weight: float
    chunk_size: int


def _distill_options(cfg: _DistillConfig, reduction: str, group) -> "_C.FusedLinearOptions":
    return _options(
        group,
        kind=cfg.kind,
        beta=cfg.beta,
        alpha=cfg.alpha,
        temperature=cfg.temperature,
        scale_by_t_squared=cfg.scale_by_t_squared,
        ignore_index=cfg.ignore_index,
        reduction=reduction,
        num_items_in_batch=cfg.num_items_in_batch if reduction != "none" else 0.0,
        hard_weight=cfg.hard_weight,
        soft_weight=cfg.soft_weight,
        chunk_size=cfg.chunk_size,
    )


def _distill_call(
    cfg: _DistillConfig,
    group,
    sh,
    sw,
    sb,
    th,
    tw,
    tb,
    labels,
    weights,
    token_ids,
    need,
    reduction: Optional[str] = None,
    route: Optional[_device.Route] = None,
):
    """One core call (or the PyTorch fallback's, when ``route`` says so). need: 6 flags
    (student hidden/weight/bias, teacher hidden/weight/bias). Returns (loss, six gradients or
    None)."""
    reduction = reduction or cfg.reduction
    if route is not None and not route.core:
        # The PyTorch chunk loop; on CUDA its row step is divkit's CUDA kernel (route.rows).
        return torch_ops.fused_linear_divergence(
            sh, sw, sb, th, tw, tb, labels, weights, cfg, need, reduction, route=route, group=group
        )
    n = sh.shape[0]
    loss = torch.empty(n if reduction == "none" else 1, dtype=torch.float32)
    grads = [_grad_buffer(x, f) for x, f in zip((sh, sw, sb, th, tw, tb), need)]
    with check.attributed("fused_linear_divergence"):
        _C.fused_linear_divergence(
            _head(sh, sw, sb),
            _head(th, tw, tb),
            labels,
            weights,
            token_ids,
            _distill_options(cfg, reduction, group),
            loss,
            tuple(grads[:3]),
            tuple(grads[3:]),
        )
    return loss, grads


def _token_weights(upstream: torch.Tensor, weights: Optional[torch.Tensor]) -> torch.Tensor:
    """A per-token upstream gradient as the token weights of a summed loss."""
    w = upstream.reshape(-1).to(torch.float64)
    if weights is not None:
        w = w * weights.to(torch.float64)
    return w.contiguous()


def fused_linear_divergence(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    kind: str = "forward_kl",
    *,
    student_bias: Optional[torch.Tensor] = None,
    teacher_bias: Optional[torch.Tensor] = None,
    labels: Optional[torch.Tensor] = None,
    hard_weight: float = 0.0,
    soft_weight: float = 1.0,
    chunk_size: Optional[int] = None,
    process_group=None,
    teacher_token_ids: Optional[torch.Tensor] = None,
    beta: float = 0.5,
    alpha: float = 0.1,
    temperature: float = 1.0,
    scale_by_t_squared: bool = False,
    ignore_index: int = -100,
    weights: Optional[torch.Tensor] = None,
    reduction: str = "mean",
    num_items_in_batch=None,
    backend: str = "auto",
) -> torch.Tensor:
    """Knowledge distillation from hidden states, fused with both linear heads.

    With ``z_s = student_hidden @ student_weight.T + student_bias`` and likewise ``z_t`` for the
    teacher, ``q = softmax(z_s / T)`` (student) and ``p = softmax(z_t / T)`` (teacher)::

        loss = hard_weight * CE(z_s, labels) + soft_weight * D_kind(p, q)

    where ``D_kind`` is any divergence of :func:`divkit.divergence` with its direction
    (``forward_kl`` = KL(p_teacher || q_student), ``reverse_kl`` = KL(q_student || p_teacher),
    ``jsd`` with ``beta`` as TRL's generalized_jsd_loss, ...), and CE the plain cross-entropy of
    the student's logits at temperature 1 (Hinton et al. 2015; TRL's GKD and Liger's
    distillation losses combine the two this way). Both terms are reduced alike (``reduction``,
    ``num_items_in_batch``, tokens with ``labels == ignore_index`` excluded; ``weights``
    multiplies both terms per token).

    Shapes: ``student_hidden [..., Hs]``, ``student_weight [V, Hs]``, ``teacher_hidden [...,
    Ht]``, ``teacher_weight [V_t, Ht]``, biases ``[V]``, labels ``[...]``. The hidden sizes may
    differ. A teacher vocabulary larger than the student's needs ``teacher_token_ids [V]``: the
    teacher's row of each student token (``torch.arange(V)`` truncates); the teacher
    distribution is then renormalized over those tokens. Never padded with logit 0.

    dtypes: float32, bfloat16, float16 or float64; computed in fp32 (fp32 GEMMs, fp32 logits,
    fp64 row sums); the loss is float32; gradients are in each input's dtype. Gradients flow to
    every input that requires grad, the teacher's too (online distillation).

    Memory: O(chunk_size x V) extra (default: about 256 MiB of logits per chunk buffer, 32 to
    1024 tokens), plus an fp32 accumulator for a weight gradient that is not fp32. With a reduced loss the gradients are computed in the forward call (as Liger
    does); with ``reduction="none"`` the backward reruns the chunks with the upstream gradient
    as weights.

    ``backend``: ``"auto"`` (the C++ core for CPU tensors, the PyTorch fallback on other devices),
    ``"core"`` or ``"torch"`` (chunked PyTorch ops on any device, without ``process_group`` and
    ``teacher_token_ids``; the fp32 weights are copied once per call), as in
    :func:`divkit.divergence`.
    """
    fn = "fused_linear_divergence"
    student_weight = _full(fn, "student_weight", student_weight)
    teacher_weight = _full(fn, "teacher_weight", teacher_weight)
    student_bias = _full(fn, "student_bias", student_bias)
    teacher_bias = _full(fn, "teacher_bias", teacher_bias)
    student_hidden = _full(fn, "student_hidden", student_hidden)
    teacher_hidden = _full(fn, "teacher_hidden", teacher_hidden)
    route = _device.route(
        fn,
        fn,
        backend,
        (
            ("student_hidden", student_hidden),
            ("student_weight", student_weight),
            ("teacher_hidden", teacher_hidden),
            ("teacher_weight", teacher_weight),
            ("student_bias", student_bias),
            ("teacher_bias", teacher_bias),
            ("labels", labels),
            ("weights", weights),
            ("teacher_token_ids", teacher_token_ids),
        ),
    )
    cpu = route.device.type == "cpu"
    if not route.core and teacher_token_ids is not None:
        check.fail(
            fn,
            "the PyTorch fallback has no teacher_token_ids (no kernel for "
            f"device {route.device} with them)",
        )
    sh = _hidden(fn, "student_hidden", student_hidden, cpu)
    sw = _matrix(fn, "student_weight", student_weight, cpu)
    th = _hidden(fn, "teacher_hidden", teacher_hidden, cpu)
    tw = _matrix(fn, "teacher_weight", teacher_weight, cpu)
    sb = _bias(fn, "student_bias", student_bias, cpu)
    tb = _bias(fn, "teacher_bias", teacher_bias, cpu)
    _check_head(fn, ("student_hidden", "student_weight", "student_bias"), sh, sw, sb, process_group)
    _check_head(fn, ("teacher_hidden", "teacher_weight", "teacher_bias"), th, tw, tb, process_group)
    _check_finite(
        fn,
        route,
        process_group,
        ("student_hidden", sh),
        ("student_weight", sw),
        ("teacher_hidden", th),
        ("teacher_weight", tw),
    )
    lead = sh.shape[:-1]
    if tuple(th.shape[:-1]) != tuple(lead):
        check.fail(
            fn,
            f"teacher_hidden has shape {tuple(th.shape)} and student_hidden "
            f"{tuple(sh.shape)}: the token dimensions must agree",
        )
    lab = _labels(fn, labels, lead, optional=True, cpu=cpu)
    # As divergence's: no gradient flows to the weights, so weights that require one raise.
    weights = check.weights(fn, weights, lead, cpu=cpu, lead=_LEAD)
    ids = None
    if teacher_token_ids is not None:
        check.integral(
            fn,
            "teacher_token_ids",
            # [V]: a [1, V] or [V, 1] tensor is not flattened silently.
            check.tensor(fn, "teacher_token_ids", teacher_token_ids, dtypes=None, ndim=(1,)),
        )
        ids = teacher_token_ids.detach().reshape(-1)
        if ids.dtype not in (torch.int32, torch.int64):
            ids = ids.to(torch.int64)
    cfg = _DistillConfig(
        kind=check.string(fn, "kind", kind),
        beta=check.real(fn, "beta", beta),
        alpha=check.real(fn, "alpha", alpha),
        temperature=check.real(fn, "temperature", temperature),
        scale_by_t_squared=check.boolean(fn, "scale_by_t_squared", scale_by_t_squared),
        ignore_index=check.integer(fn, "ignore_index", ignore_index),
        reduction=check.string(fn, "reduction", reduction),
        num_items_in_batch=check.num_items(fn, num_items_in_batch),
        hard_weight=check.real(fn, "hard_weight", hard_weight),
        soft_weight=check.real(fn, "soft_weight", soft_weight),
        chunk_size=check.chunk_size(fn, chunk_size),
    )
    _check_spec(fn, cfg)
    return _divergence_apply(
        sh, sw, sb, th, tw, tb, lab, weights, ids, cfg, process_group, lead, route
    )


#: The sparse teacher's tails, as divkit.sparse.TAILS (kept here so that importing this module
#: does not load divkit.sparse).
_TAILS = ("bucket", "renormalize")


def _check_spec(fn: str, cfg: _DistillConfig) -> None:
    """The divergence's kind, its parameters and the reduction, checked here for both routes
    under the public function's name (the core's shared checks name divergence). Not while
    torch.compile traces (Dynamo cannot trace the core's function; the custom ops check when
    they run)."""
    if not _ops.compiling():
        _C.validate_spec(
            cfg.kind, cfg.beta, cfg.alpha, cfg.temperature, cfg.scale_by_t_squared, fn=fn
        )
    check.reduction(fn, cfg.reduction)
    if cfg.reduction == "none" and cfg.num_items_in_batch > 0:
        # As divergence() and the PyTorch route: the core's call drops it for per-token losses.
        check.fail(
            fn,
            "num_items_in_batch divides a reduced loss; it cannot be used with reduction 'none'",
        )


def _divergence_apply(
    sh, sw, sb, th, tw, tb, labels, weights, ids, cfg: _DistillConfig, group, lead, route=None
):
    """fused_linear_divergence on validated arguments (group: a vocabulary-parallel process
    group, or None)."""

    def call(ts, need, upstream):
        if upstream is None:
            loss, grads = _distill_call(cfg, group, *ts, labels, weights, ids, need, route=route)
        else:
            loss, grads = _distill_call(
                cfg,
                group,
                *ts,
                labels,
                _token_weights(upstream, weights),
                ids,
                need,
                reduction="sum",
                route=route,
            )
        return (loss,), grads

    if _ops.use_ops(sh, sw, sb, th, tw, tb, labels, weights, fn="fused_linear_divergence"):
        # The op checks the ranks' tokens (a collective and a host read) when it runs.
        loss = _ops.fused_divergence(
            sh, sw, sb, th, tw, tb, labels, weights, ids, cfg, route, group
        )
        return loss.reshape(lead) if cfg.reduction == "none" else loss.reshape(())
    if group is not None:
        _check_same_tokens("fused_linear_divergence", group, (sh, th), labels)
    # reshape / contiguous stay inside the autograd graph.
    loss = _head_loss(
        "fused_linear_divergence",
        call,
        [
            _contig_rows(sh.reshape(-1, sh.shape[-1])),
            _contig_rows(sw),
            sb,
            _contig_rows(th.reshape(-1, th.shape[-1])),
            _contig_rows(tw),
            tb,
        ],
        cfg.reduction != "none",
    )
    if cfg.reduction == "none":
        return loss.reshape(lead)
    return loss.reshape(())


def _contig_rows(x: torch.Tensor) -> torch.Tensor:
    """[N, H] with unit column stride and non-overlapping rows (a copy only when needed)."""
    if x.shape[1] > 1 and x.stride(1) != 1 or (x.shape[0] > 1 and x.stride(0) < x.shape[1]):
        return x.contiguous()
    return x


def _sparse_call(cfg, tail, sh, sw, sb, idx, lp, labels, weights, need, reduction=None, route=None):
    reduction = reduction or cfg.reduction
    if route is not None and not route.core:
        return torch_ops.fused_linear_sparse_divergence(
            sh, sw, sb, idx, lp, tail, labels, weights, cfg, need, reduction, route=route
        )
    loss = torch.empty(sh.shape[0] if reduction == "none" else 1, dtype=torch.float32)
    grads = [_grad_buffer(x, f) for x, f in zip((sh, sw, sb), need)]
    opts = _distill_options(cfg, reduction, None)
    opts.tail = tail
    _C.fused_linear_sparse_divergence(
        _head(sh, sw, sb), idx, lp, labels, weights, opts, loss, tuple(grads)
    )
    return loss, grads


def fused_linear_sparse_divergence(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_indices: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    kind: str = "forward_kl",
    *,
    tail: str = "bucket",
    student_bias: Optional[torch.Tensor] = None,
    labels: Optional[torch.Tensor] = None,
    hard_weight: float = 0.0,
    soft_weight: float = 1.0,
    chunk_size: Optional[int] = None,
    beta: float = 0.5,
    alpha: float = 0.1,
    temperature: float = 1.0,
    scale_by_t_squared: bool = False,
    ignore_index: int = -100,
    weights: Optional[torch.Tensor] = None,
    reduction: str = "mean",
    num_items_in_batch=None,
    backend: str = "auto",
) -> torch.Tensor:
    """Distillation from a sparse top-k teacher (an inference server's ``top_logprobs``), fused
    with the student's linear head: ``hard_weight * CE(z_s, labels) + soft_weight *
    D_kind(p_teacher, q_student)`` where ``z_s = student_hidden @ student_weight.T +
    student_bias``, the teacher is given by ``teacher_indices [..., k]`` and
    ``teacher_logprobs [..., k]``, and ``D_kind`` and ``tail`` are as in
    :func:`divkit.sparse_divergence` (``"bucket"``: the k entries plus one tail bucket;
    ``"renormalize"``: both sides renormalized over the k entries). Directions as there
    (``forward_kl`` = KL(p_teacher || q_student)); the temperature divides the student's logits
    only. Never materializes the student's [tokens x V] logits: O(chunk x V) extra memory.
    dtypes: float32 / bfloat16 / float16 / float64 hidden states and weight, computed in fp32;
    gradients (student hidden, weight, bias) in the inputs' dtypes. ``backend``: as in
    :func:`fused_linear_divergence`.
    """
    fn = "fused_linear_sparse_divergence"
    student_weight = _full(fn, "student_weight", student_weight)
    student_bias = _full(fn, "student_bias", student_bias)
    student_hidden = _full(fn, "student_hidden", student_hidden)
    route = _device.route(
        fn,
        fn,
        backend,
        (
            ("student_hidden", student_hidden),
            ("student_weight", student_weight),
            ("teacher_indices", teacher_indices),
            ("teacher_logprobs", teacher_logprobs),
            ("student_bias", student_bias),
            ("labels", labels),
            ("weights", weights),
        ),
    )
    cpu = route.device.type == "cpu"
    sh = _hidden(fn, "student_hidden", student_hidden, cpu)
    sw = _matrix(fn, "student_weight", student_weight, cpu)
    sb = _bias(fn, "student_bias", student_bias, cpu)
    _check_head(fn, ("student_hidden", "student_weight", "student_bias"), sh, sw, sb)
    _check_finite(fn, route, None, ("student_hidden", sh), ("student_weight", sw))
    lead = sh.shape[:-1]
    for name, x in (("teacher_indices", teacher_indices), ("teacher_logprobs", teacher_logprobs)):
        check.tensor(fn, name, x, dtypes=None, cpu=cpu)
        if tuple(x.shape[:-1]) != tuple(lead) or x.dim() != len(lead) + 1:
            check.fail(fn, f"{name} has shape {tuple(x.shape)}, expected {tuple(lead)} + (k,)")
        if x.shape[-1] == 0:
            check.fail(fn, f"{name} has k = 0 entries per token; a sparse teacher needs k >= 1")
    # As sparse_divergence: only while grad mode is on (under no_grad nothing is differentiated).
    check.no_grad(
        fn, "teacher_logprobs", teacher_logprobs, "a sparse teacher gets no gradient from divkit"
    )
    # As sparse_divergence: other integer index dtypes and float16 log-probabilities are
    # converted (the core takes int32 / int64 and float32 / float64 / bfloat16).
    check.integral(fn, "teacher_indices", teacher_indices)
    check.floating(fn, "teacher_logprobs", teacher_logprobs)
    idx = teacher_indices.detach().reshape(-1, teacher_indices.shape[-1]).contiguous()
    if idx.dtype not in (torch.int32, torch.int64):
        idx = idx.to(torch.int64)
    lp = teacher_logprobs.detach().reshape(-1, teacher_logprobs.shape[-1]).contiguous()
    if lp.dtype not in (torch.float32, torch.float64, torch.bfloat16):
        lp = lp.to(torch.float32)
    lab = _labels(fn, labels, lead, optional=True, cpu=cpu)
    weights = check.weights(fn, weights, lead, cpu=cpu, lead=_LEAD)
    if weights is not None:
        weights = weights.to(torch.float64).contiguous()
    cfg = _DistillConfig(
        kind=check.string(fn, "kind", kind),
        beta=check.real(fn, "beta", beta),
        alpha=check.real(fn, "alpha", alpha),
        temperature=check.real(fn, "temperature", temperature),
        scale_by_t_squared=check.boolean(fn, "scale_by_t_squared", scale_by_t_squared),
        ignore_index=check.integer(fn, "ignore_index", ignore_index),
        reduction=check.string(fn, "reduction", reduction),
        num_items_in_batch=check.num_items(fn, num_items_in_batch),
        hard_weight=check.real(fn, "hard_weight", hard_weight),
        soft_weight=check.real(fn, "soft_weight", soft_weight),
        chunk_size=check.chunk_size(fn, chunk_size),
    )
    _check_spec(fn, cfg)
    tail = check.string(fn, "tail", tail, choices=_TAILS)

    def call(ts, need, upstream):
        if upstream is None:
            loss, grads = _sparse_call(cfg, tail, *ts, idx, lp, lab, weights, need, route=route)
        else:
            loss, grads = _sparse_call(
                cfg,
                tail,
                *ts,
                idx,
                lp,
                lab,
                _token_weights(upstream, weights),
                need,
                reduction="sum",
                route=route,
            )
        return (loss,), grads

    if _ops.use_ops(sh, sw, sb, idx, lp, lab, weights, fn=fn):
        loss = _ops.fused_sparse_divergence(sh, sw, sb, idx, lp, lab, weights, cfg, tail, route)
    else:
        loss = _head_loss(
            fn,
            call,
            [_contig_rows(sh.reshape(-1, sh.shape[-1])), _contig_rows(sw), sb],
            cfg.reduction != "none",
        )
    return loss.reshape(lead) if cfg.reduction == "none" else loss.reshape(())


# ---------------------------------------------------------------------------------------------
# Cross-entropy
# ---------------------------------------------------------------------------------------------


class _CEConfig(NamedTuple):
    ignore_index: int
    label_smoothing: float
    lse_square_scale: float
    softcap: float
    reduction: str
    num_items_in_batch: float
    chunk_size: int


def _head(h, w, b):
    return (h.detach(), w.detach(), None if b is None else b.detach())


def _ce_options(cfg: _CEConfig, reduction: str, group) -> "_C.FusedLinearOptions":
    return _options(
        group,
        ignore_index=cfg.ignore_index,
        label_smoothing=cfg.label_smoothing,
        z_loss_scale=cfg.lse_square_scale,
        softcap=cfg.softcap,
        reduction=reduction,
        num_items_in_batch=cfg.num_items_in_batch,
        chunk_size=cfg.chunk_size,
    )


def fused_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    *,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    lse_square_scale: float = 0.0,
    softcap: Optional[float] = None,
    reduction: str = "mean",
    num_items_in_batch=None,
    chunk_size: Optional[int] = None,
    return_stats: bool = False,
    process_group=None,
    backend: str = "auto",
):
    """Cross-entropy of ``logits = hidden @ weight.T + bias`` against ``labels``, fused.

    As ``torch.nn.functional.cross_entropy(logits, labels, ignore_index, reduction,
    label_smoothing)`` with Liger-Kernel's extra options, on ``z = softcap * tanh(logits /
    softcap)`` when ``softcap`` is given (Gemma 2; a ``-inf`` logit stays ``-inf``, so that a
    ``-inf`` bias entry masks that vocabulary entry with or without softcap)::

        loss_i = (1 - eps) (lse_i - z_{i,y}) + eps (lse_i - mean_j z_ij) + lse_square_scale * lse_i^2

    (label smoothing ``eps`` as PyTorch; z-loss as PaLM / Liger's ``lse_square_scale``). With
    masked entries (``-inf`` bias) the smoothing spreads over the unmasked entries only:
    ``mean_j`` runs over the ``V'`` entries with a finite logit, the target is ``eps / V'`` on
    each and 0 on a masked one (whose weight row and bias get exactly 0 gradient), so the loss
    stays finite where PyTorch's and Liger's are ``+inf``; ``V' = V`` without a masked entry.
    ``reduction``: none | sum | mean (over non-ignored tokens) | batchmean; ``num_items_in_batch``
    divides the sum instead (Hugging Face gradient accumulation).

    Shapes: ``hidden [..., H]``, ``weight [V, H]``, ``bias [V]``, ``labels [...]``; labels must
    be in ``[0, V)`` or ``ignore_index``. dtypes: float32 / bfloat16 / float16 / float64,
    computed in fp32; gradients in the inputs' dtypes. With ``return_stats=True`` returns
    ``(loss, logprobs, entropy)``, the per-token ``log p(label)`` and entropy of the (softcapped)
    distribution, not differentiable. A NaN or +inf ``bias`` entry raises (naming its index).
    ``backend``: as in :func:`fused_linear_divergence` (the PyTorch fallback without
    ``process_group``).
    """
    fn = "fused_linear_cross_entropy"
    weight = _full(fn, "weight", weight)
    bias = _full(fn, "bias", bias)
    hidden = _full(fn, "hidden", hidden)
    route = _device.route(
        fn,
        fn,
        backend,
        (("hidden", hidden), ("weight", weight), ("labels", labels), ("bias", bias)),
    )
    cpu = route.device.type == "cpu"
    h = _hidden(fn, "hidden", hidden, cpu)
    w = _matrix(fn, "weight", weight, cpu)
    b = _bias(fn, "bias", bias, cpu)
    _check_head(fn, ("hidden", "weight", "bias"), h, w, b, process_group)
    _check_finite(fn, route, process_group, ("hidden", h), ("weight", w))
    lead = h.shape[:-1]
    lab = _labels(fn, labels, lead, cpu=cpu)
    cap = 0.0 if softcap is None else check.real(fn, "softcap", softcap)
    if softcap is not None and not (check.isfinite(cap) and cap > 0):
        check.fail(fn, f"softcap must be finite and > 0 (or None), got {cap:g}")
    # The options' ranges are checked here for both routes (the PyTorch loop has no checks of
    # its own), under their public names (the core calls lse_square_scale z_loss_scale).
    eps = check.real(fn, "label_smoothing", label_smoothing)
    if not 0.0 <= eps < 1.0:
        check.fail(fn, f"label_smoothing must be in [0, 1), got {eps:g}")
    cfg = _CEConfig(
        ignore_index=check.integer(fn, "ignore_index", ignore_index),
        label_smoothing=eps,
        lse_square_scale=check.nonnegative(fn, "lse_square_scale", lse_square_scale),
        softcap=cap,
        reduction=check.reduction(fn, check.string(fn, "reduction", reduction)),
        num_items_in_batch=check.num_items(fn, num_items_in_batch),
        chunk_size=check.chunk_size(fn, chunk_size),
    )
    stats = check.boolean(fn, "return_stats", return_stats)
    return _cross_entropy_apply(h, w, b, lab, cfg, process_group, lead, stats, route)


def _cross_entropy_apply(
    h, w, b, labels, cfg: _CEConfig, group, lead, return_stats: bool, route=None
):
    """fused_linear_cross_entropy on validated arguments (group: a vocabulary-parallel process
    group, or None; route: where it runs, the core when None)."""

    def call(ts, need, upstream):
        return _ce_call(cfg, group, route, return_stats, labels, ts, need, upstream)

    if _ops.use_ops(h, w, b, labels, fn="fused_linear_cross_entropy"):
        # The op checks the ranks' tokens (a collective and a host read) when it runs.
        out = _ops.fused_ce(h, w, b, labels, cfg, return_stats, route, group)
        if not return_stats:
            out = out[0]
    else:
        if group is not None:
            _check_same_tokens("fused_linear_cross_entropy", group, (h,), labels)
        out = _head_loss(
            "fused_linear_cross_entropy",
            call,
            [_contig_rows(h.reshape(-1, h.shape[-1])), _contig_rows(w), b],
            cfg.reduction != "none",
        )
    if return_stats:
        loss, logprobs, entropy = out
        loss = loss.reshape(lead) if cfg.reduction == "none" else loss.reshape(())
        return loss, logprobs.reshape(lead), entropy.reshape(lead)
    return out.reshape(lead) if cfg.reduction == "none" else out.reshape(())


def _ce_call(cfg: _CEConfig, group, route, return_stats: bool, labels, ts, need, upstream):
    """One fused cross-entropy call on [N, H] rows: ``(outputs, grads)`` with outputs (loss,) or
    (loss, logprobs, entropy); ``upstream`` None or the per-token upstream gradient (the call is
    then a summed loss weighted by it, without statistics)."""
    n = ts[0].shape[0]
    reduction = cfg.reduction if upstream is None else "sum"
    if route is not None and not route.core:
        return torch_ops.fused_linear_cross_entropy(
            *_head(*ts),
            labels,
            None if upstream is None else upstream.reshape(-1),
            cfg if upstream is None else cfg._replace(num_items_in_batch=0.0),
            need,
            reduction,
            return_stats and upstream is None,
            group=group,
            route=route,
        )
    loss = torch.empty(n if reduction == "none" else 1, dtype=torch.float32)
    grads = [_grad_buffer(x, f) for x, f in zip(ts, need)]
    stats = [
        torch.empty(n, dtype=torch.float32) if return_stats and upstream is None else None
        for _ in range(2)
    ]
    opts = _ce_options(
        cfg if upstream is None else cfg._replace(num_items_in_batch=0.0), reduction, group
    )
    _C.fused_linear_cross_entropy(
        _head(*ts),
        labels,
        None if upstream is None else upstream.reshape(-1).to(torch.float64).contiguous(),
        opts,
        loss,
        tuple(grads),
        (*stats, None, None),
    )
    return ((loss, *stats) if stats[0] is not None else (loss,)), grads


# ---------------------------------------------------------------------------------------------
# Selective log-softmax
# ---------------------------------------------------------------------------------------------


class LogprobsResult(NamedTuple):
    """Per-token outputs of :func:`fused_linear_logprobs` (each shaped like ``labels``)."""

    logprobs: torch.Tensor
    entropy: Optional[torch.Tensor]
    topk_mass: Optional[torch.Tensor]
    log_sum_sq_probs: Optional[torch.Tensor] = None
    is_top1: Optional[torch.Tensor] = None


def fused_linear_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    *,
    temperature: float = 1.0,
    ignore_index: int = -100,
    return_entropy: bool = False,
    topk: Optional[int] = None,
    chunk_size: Optional[int] = None,
    process_group=None,
    backend: str = "auto",
    return_log_sum_sq_probs: bool = False,
    return_is_top1: bool = False,
):
    """Per-token ``log p(label)`` of ``p = softmax((hidden @ weight.T + bias) / temperature)``
    without materializing the logits (TRL's ``selective_log_softmax`` fused with the lm_head;
    what DPO, GRPO and PPO need of the policy). Tokens with ``labels == ignore_index`` give 0.

    Returns the log-probs ``[...]`` (float32), differentiable with respect to hidden, weight and
    bias; the backward recomputes each chunk's logits (nothing of size V is kept). With
    ``return_entropy=True`` or ``topk=k`` returns a :class:`LogprobsResult` with the per-token
    entropy ``-sum_j p_j log p_j`` (differentiable) and the top-k probability mass (not
    differentiable), the likelihood over-optimisation indicators of Shi et al. 2024. With
    ``return_log_sum_sq_probs=True`` it also has ``log sum_j p_j^2`` (WPO's alignment term, Zhou
    et al. 2024; from the exps the statistics already take), with ``return_is_top1=True`` a bool
    flag that the label is the argmax of the logits (ties go to the first maximal index, as
    ``torch.argmax`` and TRL's fused head: a label tied with an earlier token is not top-1); both
    without gradient, 0 / False for ignored tokens, neither with ``process_group``.
    dtypes: float32 / bfloat16 / float16 / float64 inputs, computed in fp32. ``backend``: as in
    :func:`fused_linear_divergence`.
    """
    fn = "fused_linear_logprobs"
    weight = _full(fn, "weight", weight)
    bias = _full(fn, "bias", bias)
    hidden = _full(fn, "hidden", hidden)
    route = _device.route(
        fn,
        fn,
        backend,
        (("hidden", hidden), ("weight", weight), ("labels", labels), ("bias", bias)),
    )
    cpu = route.device.type == "cpu"
    h = _hidden(fn, "hidden", hidden, cpu)
    w = _matrix(fn, "weight", weight, cpu)
    b = _bias(fn, "bias", bias, cpu)
    _check_head(fn, ("hidden", "weight", "bias"), h, w, b, process_group)
    _check_finite(fn, route, process_group, ("hidden", h), ("weight", w))
    lead = h.shape[:-1]
    lab = _labels(fn, labels, lead, cpu=cpu)
    temperature = check.real(fn, "temperature", temperature)
    ignore_index = check.integer(fn, "ignore_index", ignore_index)
    k = 0 if topk is None else check.integer(fn, "topk", topk)
    if topk is not None and k < 1:
        check.fail(fn, f"topk must be >= 1 (or None), got {k}")
    # With process_group, V is the global vocabulary (the shards' sum), checked where it is known.
    if process_group is None and k > w.shape[0]:
        check.fail(fn, f"topk must be in [1, V = {w.shape[0]}], got {k}")
    chunk = check.chunk_size(fn, chunk_size)
    extra = (
        check.boolean(fn, "return_log_sum_sq_probs", return_log_sum_sq_probs),
        check.boolean(fn, "return_is_top1", return_is_top1),
    )
    if process_group is not None and any(extra):
        check.fail(
            fn, "return_log_sum_sq_probs and return_is_top1 are not supported with process_group"
        )
    return _logprobs_apply(
        h,
        w,
        b,
        lab,
        temperature,
        ignore_index,
        check.boolean(fn, "return_entropy", return_entropy),
        k,
        chunk,
        process_group,
        lead,
        route,
        extra,
    )


def _logprobs_apply(
    h,
    w,
    b,
    labels,
    temperature,
    ignore_index,
    return_entropy: bool,
    topk: int,
    chunk: int,
    group,
    lead,
    route=None,
    extra=(False, False),
):
    """fused_linear_logprobs on validated arguments (topk 0: not asked for; group: a
    vocabulary-parallel process group, or None; route: where it runs, the core when None;
    extra: whether log_sum_sq_probs and is_top1 are asked for)."""
    fallback = route is not None and not route.core
    args = (labels, temperature, ignore_index, return_entropy, topk, chunk, group, fallback, extra)

    def forward(ts, need, upstream):
        return _lp_forward(ts, *args, route=route), None

    def backward(ts, grad_out, need):
        return _lp_backward(ts, *args[:-1], grad_out, need, route=route)

    if _ops.use_ops(h, w, b, labels, fn="fused_linear_logprobs"):
        # The op checks the ranks' tokens (a collective and a host read) when it runs; it routes
        # again ("auto"), which keeps divkit's row kernel in the chunk loop (route.rows).
        core_rows = route is not None and route.rows == "core"
        outs = _ops.fused_logprobs(
            h, w, b, labels, *args[1:6], fallback and not core_rows, *extra, group
        )
    else:
        if group is not None:
            _check_same_tokens("fused_linear_logprobs", group, (h,), labels)
        outs = _head_loss(
            "fused_linear_logprobs",
            forward,
            [_contig_rows(h.reshape(-1, h.shape[-1])), _contig_rows(w), b],
            False,
            backward=backward,
            n_diff=2 if return_entropy else 1,
        )
    outs = list(outs) if isinstance(outs, tuple) else [outs]
    # (logprobs[, entropy][, topk_mass][, log_sum_sq_probs][, is_top1]), as asked.
    got = [outs.pop(0).reshape(lead)]
    for on in (return_entropy, bool(topk), *extra):
        got.append(outs.pop(0).reshape(lead) if on else None)
    if len(got) == 1 or not any(x is not None for x in got[1:]):
        return got[0]
    return LogprobsResult(*got)


def _lp_options(group, ignore_index, temperature, chunk, **more):
    return _options(
        group, ignore_index=ignore_index, temperature=temperature, chunk_size=chunk, **more
    )


def _lp_forward(
    ts,
    labels,
    temperature,
    ignore_index,
    return_entropy,
    topk,
    chunk,
    group,
    fallback,
    extra=(False, False),
    route=None,
) -> tuple:
    """fused_linear_logprobs' outputs on [N, H] rows: (logprobs[, entropy][, topk_mass]
    [, log_sum_sq_probs][, is_top1 (bool)]), as asked (extra: the last two's flags; route: the
    call's route, for the PyTorch loop's row step)."""
    if fallback and group is not None:
        if any(extra):
            check.fail(
                "fused_linear_logprobs",
                "return_log_sum_sq_probs and return_is_top1 are not supported with process_group",
            )
        # The vocabulary-parallel mode of the PyTorch loop.
        return torch_ops.fused_linear_logprobs_sharded(
            *_head(*ts), labels, ignore_index, temperature, return_entropy, topk, chunk, group
        )
    if fallback:
        return torch_ops.fused_linear_logprobs(
            *_head(*ts),
            labels,
            ignore_index,
            temperature,
            return_entropy,
            topk,
            chunk,
            extra=extra,
            route=route,
        )
    n = ts[0].shape[0]

    def vec(on, dtype=torch.float32):
        return torch.empty(n, dtype=dtype) if on else None

    lp, ent, mass = vec(True), vec(return_entropy), vec(bool(topk))
    sq, top1 = vec(extra[0]), vec(extra[1], torch.int32)
    _C.fused_linear_logprobs(
        _head(*ts),
        labels,
        _lp_options(group, ignore_index, temperature, chunk, topk=topk),
        (lp, ent, None, mass),
        (sq, top1) if any(extra) else None,
    )
    top1 = None if top1 is None else top1.bool()
    return tuple(x for x in (lp, ent, mass, sq, top1) if x is not None)


def _lp_backward(
    ts,
    labels,
    temperature,
    ignore_index,
    return_entropy,
    topk,
    chunk,
    group,
    fallback,
    grad_out,
    need,
    route=None,
):
    """The gradients of (hidden, weight, bias) given the upstream gradient of the log-probs (and
    of the entropy, a pair, when return_entropy)."""
    g_lp, g_ent = (grad_out, None) if not return_entropy else grad_out
    if fallback and group is not None:
        return torch_ops.fused_linear_logprobs_sharded_backward(
            *_head(*ts), labels, ignore_index, temperature, g_lp, g_ent, need, chunk, group
        )
    if fallback:
        return torch_ops.fused_linear_logprobs_backward(
            *_head(*ts), labels, ignore_index, temperature, g_lp, g_ent, need, chunk, route=route
        )
    grads = [_grad_buffer(x, f) for x, f in zip(ts, need)]
    _C.fused_linear_logprobs_backward(
        _head(*ts),
        labels,
        _lp_options(group, ignore_index, temperature, chunk),
        None if g_lp is None else g_lp.to(torch.float64).contiguous(),
        None if g_ent is None else g_ent.to(torch.float64).contiguous(),
        tuple(grads),
    )
    return grads
