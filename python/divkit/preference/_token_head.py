"""The fused per-token terms of the token-level preference losses (TDPO, SparsePO) when both the
policy and the reference are linear heads: one pass of divkit's fused distillation engine
(``include/divkit/fused_linear.h``, ``FusedLabelTerms``) computes, from each chunk of both heads'
logits, the policy's and the reference's label log-probs and KL(pi_ref || pi) per token. The
backward is one more pass with the upstream gradients as per-token weights (the log-prob's as the
hard term's, the KL's as the soft term's), reading the chunks the forward kept within the keep
budget instead of recomputing their logits."""

from __future__ import annotations

from typing import Optional

import torch

from .. import _C
from .. import _validate as check

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
    """Whether this path serves these inputs: CPU tensors and a reference that is not
    differentiated (its gradient is not part of this path)."""
    for x in (h, w, b, rh, rw, rb):
        if x is not None and x.device.type != "cpu":
            return False
    return not any(x is not None and x.requires_grad for x in (rh, rw, rb))


class _TokenTerms(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, w, b, rh, rw, rb, labels, ignore_index, kl_grad, chunk, keep_rows, fn):
        n, v = h.shape[0], w.shape[0]
        lp = torch.empty(n, dtype=torch.float32)
        ref_lp = torch.empty(n, dtype=torch.float32)
        kl = torch.empty(n, dtype=torch.float32)
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
        ctx.save_for_backward(h, w, b, rh, rw, rb, labels)
        ctx.kept = (kept_s, kept_t)
        ctx.kl_grad, ctx.chunk, ctx.fn, ctx.ignore_index = kl_grad, chunk, fn, ignore_index
        ctx.mark_non_differentiable(ref_lp)
        if not kl_grad:
            ctx.mark_non_differentiable(kl)
        return lp, ref_lp, kl

    @staticmethod
    def backward(ctx, g_lp, g_ref_lp, g_kl):
        h, w, b, rh, rw, rb, labels = ctx.saved_tensors
        kept_s, kept_t = ctx.kept
        ctx.kept = (None, None)
        need = ctx.needs_input_grad[:3]
        n = h.shape[0]
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
        return (*grads, None, None, None, None, None, None, None, None, None)


def _rows(x: torch.Tensor) -> torch.Tensor:
    """[..., H] as [N, H] with unit stride along H (inside the autograd graph)."""
    x = x.reshape(-1, x.shape[-1])
    return x if x.stride(-1) == 1 else x.contiguous()


def token_terms(fn, h, w, b, rh, rw, rb, labels, ignore_index, kl_grad, chunk_size, keep_bytes):
    """(log pi(y), log pi_ref(y), KL(pi_ref || pi)) per token, each ``[...]`` fp32 (0 at ignored
    tokens), from ``h [..., H]``, ``w [V, H]``, ``rh [..., H_ref]``, ``rw [V, H_ref]`` and
    validated ``labels [...]``. Gradients reach h, w, b (the KL's only with ``kl_grad``); the
    reference is treated as a constant (see :func:`usable`)."""
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
    # when the KL is differentiated (its gradient needs p_ref).
    per_token = 4 * v * (2 if kl_grad else 1)
    keep_rows = (min(n, keep_bytes // per_token) // chunk) * chunk if differentiated else 0
    lp, ref_lp, kl = _TokenTerms.apply(
        hf,
        w if w.stride(-1) == 1 else w.contiguous(),
        b,
        rhf,
        rw.detach() if rw.stride(-1) == 1 else rw.detach().contiguous(),
        None if rb is None else rb.detach(),
        labels.reshape(-1),
        int(ignore_index),
        bool(kl_grad),
        chunk,
        keep_rows,
        fn,
    )
    return lp.reshape(lead), ref_lp.reshape(lead), kl.reshape(lead)
