"""Independent float64 PyTorch implementations of divkit's divergences, for the tests.

Written from the formulas in include/divkit/divergence.h, deliberately plainly: probabilities
from log_softmax in float64, no fusion, autograd for the gradients.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

KINDS = (
    "forward_kl",
    "reverse_kl",
    "jsd",
    "skew_forward_kl",
    "skew_reverse_kl",
    "tvd",
    "hellinger",
    "jeffreys",
    "chi2",
    "alpha_divergence",
    "renyi",
    "cross_entropy",
)


def _kl(la: torch.Tensor, lb: torch.Tensor) -> torch.Tensor:
    """KL(a || b) = sum a (log a - log b) over the last dim, from log-probabilities."""
    return (la.exp() * (la - lb)).sum(-1)


def per_token(
    s: torch.Tensor,
    t: torch.Tensor,
    kind: str,
    *,
    beta: float = 0.5,
    alpha: float = 0.1,
    temperature: float = 1.0,
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """D(p_teacher, q_student) per row of [N, V] logits, computed in `dtype` (float64 for the
    reference; float32 to measure what PyTorch's own fp32 arithmetic gets)."""
    ls = F.log_softmax(s.to(dtype) / temperature, dim=-1)
    lt = F.log_softmax(t.to(dtype) / temperature, dim=-1)
    q, p = ls.exp(), lt.exp()
    if kind == "forward_kl":
        return _kl(lt, ls)
    if kind == "reverse_kl":
        return _kl(ls, lt)
    if kind == "jsd":
        if beta == 0:
            return _kl(lt, ls)
        if beta == 1:
            return _kl(ls, lt)
        lm = torch.log(beta * p + (1 - beta) * q)
        return beta * _kl(lt, lm) + (1 - beta) * _kl(ls, lm)
    if kind == "skew_forward_kl":
        return _kl(lt, torch.log(alpha * p + (1 - alpha) * q))
    if kind == "skew_reverse_kl":
        return _kl(ls, torch.log((1 - alpha) * p + alpha * q))
    if kind == "tvd":
        return 0.5 * (p - q).abs().sum(-1)
    if kind == "hellinger":
        return ((p.sqrt() - q.sqrt()) ** 2).sum(-1)
    if kind == "jeffreys":
        return _kl(lt, ls) + _kl(ls, lt)
    if kind == "chi2":
        return ((p - q) ** 2 / q).sum(-1)
    if kind == "alpha_divergence":
        if alpha == 1:
            return _kl(lt, ls)
        if alpha == 0:
            return _kl(ls, lt)
        return (1 - torch.exp(alpha * lt + (1 - alpha) * ls).sum(-1)) / (alpha * (1 - alpha))
    if kind == "renyi":
        if alpha == 1:
            return _kl(lt, ls)
        return torch.log(torch.exp(alpha * lt + (1 - alpha) * ls).sum(-1)) / (alpha - 1)
    if kind == "cross_entropy":
        return -(p * ls).sum(-1)
    raise ValueError(kind)


def loss(
    s: torch.Tensor,
    t: torch.Tensor,
    kind: str = "forward_kl",
    *,
    beta: float = 0.5,
    alpha: float = 0.1,
    temperature: float = 1.0,
    labels=None,
    ignore_index: int = -100,
    weights=None,
    reduction: str = "mean",
    num_items_in_batch=None,
    scale_by_t_squared: bool = False,
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """The reduced loss as divkit defines it, computed in `dtype` (differentiable in s, t)."""
    v = s.shape[-1]
    lead = s.shape[:-1]
    s2, t2 = s.reshape(-1, v), t.reshape(-1, v)
    n = s2.shape[0]
    active = (
        torch.ones(n, dtype=torch.bool) if labels is None else labels.reshape(-1) != ignore_index
    )
    idx = active.nonzero().flatten()
    # Only the active rows are computed (ignored rows may hold anything, even NaN).
    per = torch.zeros(n, dtype=dtype).index_put(
        (idx,),
        per_token(
            s2[idx], t2[idx], kind, beta=beta, alpha=alpha, temperature=temperature, dtype=dtype
        ),
    )
    if weights is not None:
        per = per * weights.reshape(-1).to(dtype)
    if scale_by_t_squared:
        per = per * temperature**2
    if reduction == "none":
        return per.reshape(lead)
    total = per.sum()
    if num_items_in_batch is not None:
        return total / float(num_items_in_batch)
    if reduction == "sum":
        return total
    if reduction == "mean":
        return total / max(int(active.sum()), 1)
    if reduction == "batchmean":
        return total / max(n, 1)
    raise ValueError(reduction)


def loss_and_grads(
    s, t, kind="forward_kl", grad_teacher=False, grad_output=None, dtype=torch.float64, **kw
):
    """(loss, d loss / d s, d loss / d t or None) computed in `dtype` via autograd."""
    s64 = s.detach().to(dtype).requires_grad_(True)
    t64 = t.detach().to(dtype).requires_grad_(grad_teacher)
    value = loss(s64, t64, kind, dtype=dtype, **kw)
    go = torch.ones_like(value) if grad_output is None else grad_output.to(dtype)
    inputs = (s64, t64) if grad_teacher else (s64,)
    grads = torch.autograd.grad(value, inputs, go)
    return value.detach(), grads[0], (grads[1] if grad_teacher else None)
