"""RLHF utilities and alignment diagnostics: per-token KL estimators (k1, k2, k3, abs, with
verl's clamps), the exact per-token KL over the vocabulary, reward-model ensembles, InfAlign's
reward calibration and transforms, best-of-N selection, SALSA's model soup, top-k entropy and
mass indicators, and the gradient-entanglement check.
"""

from __future__ import annotations

import math
from typing import Dict, Iterable, Mapping, Optional, Sequence

import torch

from . import _C, _ops
from . import _validate as check
from ._autograd import recompute_in_backward
from .functional import divergence
from .fused import fused_linear_divergence

__all__ = [
    "KL_ESTIMATORS",
    "kl_estimator",
    "exact_kl",
    "exact_kl_fused",
    "ensemble_rewards",
    "calibrate_reward",
    "infalign_transform",
    "best_of_n",
    "model_soup",
    "topk_entropy_mass",
    "gradient_entanglement",
]

#: Names accepted by :func:`kl_estimator` (verl's names are aliases).
KL_ESTIMATORS = ("k1", "k2", "k3", "abs", "kl", "mse", "low_var_kl")
_ALIASES = {"kl": "k1", "mse": "k2", "low_var_kl": "k3"}


@check.public("kl_estimator", finite_args=("logprobs", "ref_logprobs"))
def kl_estimator(
    logprobs: torch.Tensor, ref_logprobs: torch.Tensor, kind: str = "k3", *, clamp: bool = False
) -> torch.Tensor:
    """Per-token estimators of KL(pi || pi_ref) from the log-probs of sampled tokens y ~ pi
    (Schulman 2020, "Approximating KL divergence"; verl's ``kl_penalty``, TRL's PPO/GRPO), with
    ``r = log pi_ref(y) - log pi(y)``:

    - ``k1`` (``kl``): -r (unbiased, high variance, can be negative)
    - ``k2`` (``mse``): r^2 / 2 (biased, low variance)
    - ``k3`` (``low_var_kl``): exp(r) - r - 1 (unbiased, >= 0, low variance)
    - ``abs``: |r|

    ``clamp=True`` applies verl's clamps to k3: r to [-20, 20] and the result to [-10, 10]
    (zero gradient where a clamp is active, as torch.clamp). Elementwise on tensors of any shape
    and float dtype (the result in torch's promoted dtype); computed in fp64 in divkit's C++
    core (``include/divkit/rlhf.h``), differentiable."""
    fn = "kl_estimator"
    check.tensor(fn, "logprobs", logprobs, dtypes=None, cpu=False)
    check.tensor(fn, "ref_logprobs", ref_logprobs, dtypes=None, cpu=False)
    kind = _ALIASES.get(check.string(fn, "kind", kind), kind)
    if kind not in ("k1", "k2", "k3", "abs"):
        check.fail(fn, f"unknown kind '{kind}' (valid: {', '.join(KL_ESTIMATORS)})")
    if logprobs.shape != ref_logprobs.shape:
        check.fail(
            fn,
            f"ref_logprobs has shape {tuple(ref_logprobs.shape)}, expected {tuple(logprobs.shape)}",
        )
    # Same shapes (checked above): promote_types is result_type, and traceable.
    out_dtype = torch.promote_types(logprobs.dtype, ref_logprobs.dtype)
    if not out_dtype.is_floating_point:
        check.fail(fn, "logprobs and ref_logprobs must be floating tensors")
    dtype = torch.float64 if out_dtype == torch.float64 else torch.float32
    shape, device, clamp = logprobs.shape, logprobs.device, bool(clamp)
    if _ops.use_ops(logprobs, ref_logprobs, fn=fn):
        return _ops.kl_estimator(logprobs, ref_logprobs, kind, clamp, out_dtype)

    def run(inputs, grad_out, need):
        a, b = (_flat(x, dtype) for x in inputs)
        out = torch.empty(a.numel(), dtype=dtype)
        g = [
            torch.empty(a.numel(), dtype=dtype) if need is not None and need[i] else None
            for i in range(2)
        ]
        go = None if grad_out is None else _flat(grad_out, dtype)
        _C.kl_estimator(a, b, kind, clamp, out, go, *g)
        return (out.reshape(shape).to(device, out_dtype),), _shaped(g, inputs)

    return recompute_in_backward(run, (logprobs, ref_logprobs), fn=fn)[0]


def _flat(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return x.detach().to(device="cpu", dtype=dtype).reshape(-1).contiguous()


def _shaped(grads, inputs):
    return tuple(
        None if g is None else g.reshape(x.shape).to(device=x.device, dtype=x.dtype)
        for g, x in zip(grads, inputs)
    )


@check.public("exact_kl")
def exact_kl(
    policy_logits: torch.Tensor,
    ref_logits: torch.Tensor,
    *,
    labels: Optional[torch.Tensor] = None,
    ignore_index: int = -100,
    direction: str = "policy_ref",
    temperature: float = 1.0,
) -> torch.Tensor:
    """Exact per-token KL over the vocabulary, from logits ``[..., V]`` -> ``[...]`` (0 where
    ``labels == ignore_index``), by divkit's fused token kernel with the policy as the student:
    ``direction="policy_ref"`` is KL(pi || pi_ref) (the kernel's ``reverse_kl``, what k1-k3
    estimate), ``"ref_policy"`` is KL(pi_ref || pi) (``forward_kl``, TDPO's direction).
    Differentiable in both logits; fp32, bf16, fp16 or fp64 logits, fp32 result."""
    fn = "exact_kl"
    direction = check.string(fn, "direction", direction)
    kinds = {"policy_ref": "reverse_kl", "ref_policy": "forward_kl"}
    if direction not in kinds:
        check.fail(fn, f"unknown direction '{direction}' (valid: policy_ref, ref_policy)")
    if isinstance(policy_logits, torch.Tensor) and policy_logits.dim() >= 1:
        check.labels(
            fn,
            labels,
            policy_logits.shape[:-1],
            vocab=policy_logits.shape[-1],
            ignore_index=check.integer(fn, "ignore_index", ignore_index),
        )
    with check.renamed({"student_logits": "policy_logits", "teacher_logits": "ref_logits"}):
        return divergence(
            policy_logits,
            ref_logits,
            kinds[direction],
            labels=labels,
            ignore_index=ignore_index,
            temperature=temperature,
            reduction="none",
        )


def _head_rows(n_vocab: int, chunk_size: Optional[int]) -> int:
    # About 64 MiB of fp32 logits per chunk, as the fused kernels' default.
    if chunk_size is not None:
        return check.integer("exact_kl_fused", "chunk_size", chunk_size, min=1)
    return max(1, (1 << 24) // max(1, n_vocab))


def _chunked_head_divergence(
    hidden, weight, bias, ref_logits, labels, kind, ignore_index, temperature, chunk_size
):
    """Per-token divergence between softmax(hidden @ weight.T + bias) (the student) and
    ``ref_logits`` (the teacher), by chunks of tokens under activation checkpointing: the forward
    keeps no chunk's logits and the backward recomputes them, so the policy's [tokens x V] is
    never held (peak O(chunk x V))."""
    from torch.utils.checkpoint import checkpoint

    lead = hidden.shape[:-1]
    h = hidden.reshape(-1, hidden.shape[-1])
    r = ref_logits.reshape(-1, ref_logits.shape[-1])
    lab = None if labels is None else labels.reshape(-1)
    rows = _head_rows(r.shape[-1], chunk_size)

    def piece(hc, w, b, rc, lc):
        z = hc @ w.t() if b is None else torch.addmm(b, hc, w.t())
        return divergence(
            z,
            rc,
            kind,
            labels=lc,
            ignore_index=ignore_index,
            temperature=temperature,
            reduction="none",
        )

    grad = torch.is_grad_enabled() and any(
        x is not None and x.requires_grad for x in (hidden, weight, bias, ref_logits)
    )
    outs = []
    # At least one (possibly empty) chunk: no tokens give an empty result, not an empty cat.
    for s in range(0, max(h.shape[0], 1), rows):
        args = (
            h[s : s + rows],
            weight,
            bias,
            r[s : s + rows],
            None if lab is None else lab[s : s + rows],
        )
        outs.append(checkpoint(piece, *args, use_reentrant=False) if grad else piece(*args))
    return torch.cat(outs).reshape(lead)


@check.public("exact_kl_fused")
def exact_kl_fused(
    policy_hidden: torch.Tensor,
    lm_head_weight: torch.Tensor,
    *,
    ref_logits: Optional[torch.Tensor] = None,
    ref_hidden: Optional[torch.Tensor] = None,
    ref_weight: Optional[torch.Tensor] = None,
    lm_head_bias: Optional[torch.Tensor] = None,
    ref_bias: Optional[torch.Tensor] = None,
    labels: Optional[torch.Tensor] = None,
    ignore_index: int = -100,
    direction: str = "policy_ref",
    temperature: float = 1.0,
    chunk_size: Optional[int] = None,
) -> torch.Tensor:
    """:func:`exact_kl` from the policy's hidden states and lm_head, never materializing the
    policy's ``[tokens x V]`` logits: ``pi = softmax((policy_hidden @ lm_head_weight.T +
    lm_head_bias) / temperature)`` against the reference given either as ``ref_logits [..., V]``
    or as ``ref_hidden [..., H_ref]`` + ``ref_weight [V, H_ref]`` (+ ``ref_bias``).

    ``direction="policy_ref"``: KL(pi || pi_ref) (what k1-k3 estimate); ``"ref_policy"``:
    KL(pi_ref || pi) (TDPO's direction). Per token ``[...]``, 0 where ``labels ==
    ignore_index``, differentiable with respect to every input that requires grad.

    With reference hidden states both heads are fused in divkit's C++ kernel
    (:func:`divkit.fused_linear_divergence`, policy = student: ``policy_ref`` is its
    ``reverse_kl``, ``ref_policy`` its ``forward_kl``); with reference logits the policy's
    logits are made by chunks of ``chunk_size`` tokens (default: ~64 MiB of fp32 logits) under
    activation checkpointing and fed to :func:`divkit.divergence`. dtypes: fp32, bf16, fp16 or
    fp64 inputs; fp32 result."""
    fn = "exact_kl_fused"
    direction = check.string(fn, "direction", direction)
    kinds = {"policy_ref": "reverse_kl", "ref_policy": "forward_kl"}
    if direction not in kinds:
        check.fail(fn, f"unknown direction '{direction}' (valid: policy_ref, ref_policy)")
    check.lm_head(fn, policy_hidden, lm_head_weight, ref_logits, ref_hidden, ref_weight, labels)
    temperature = check.real(fn, "temperature", temperature)
    if ref_logits is None:
        return fused_linear_divergence(
            policy_hidden,
            lm_head_weight,
            ref_hidden,
            ref_weight,
            kinds[direction],
            student_bias=lm_head_bias,
            teacher_bias=ref_bias,
            labels=labels,
            ignore_index=ignore_index,
            temperature=temperature,
            reduction="none",
            chunk_size=chunk_size,
        )
    return _chunked_head_divergence(
        policy_hidden,
        lm_head_weight,
        lm_head_bias,
        ref_logits,
        labels,
        kinds[direction],
        ignore_index,
        temperature,
        chunk_size,
    )


@check.public("ensemble_rewards", finite_args=("rewards",))
def ensemble_rewards(
    rewards: torch.Tensor, method: str = "mean", *, uwo_lambda: float = 0.5, dim: int = 0
) -> torch.Tensor:
    """Reward-model ensembles (Coste et al. 2023, "Reward Model Ensembles Help Mitigate
    Overoptimization", eqs. 3-5), over the ensemble dimension ``dim`` of ``rewards``:
    ``mean``; ``wco`` (worst-case) min_i R_i; ``uwo`` (uncertainty-weighted) mean -
    uwo_lambda * population variance (the paper's best lambda for best-of-N is 0.5). Computed in
    fp64 in divkit's C++ core (``include/divkit/rlhf.h``); differentiable (wco: the gradient goes
    to the first minimum)."""
    fn = "ensemble_rewards"
    method = check.string(fn, "method", method)
    lam = check.real(fn, "uwo_lambda", uwo_lambda)
    if not isinstance(rewards, torch.Tensor) or rewards.dim() == 0 or rewards.shape[dim] == 0:
        check.fail(fn, "rewards must be a tensor with a non-empty ensemble dimension")
    if method not in ("mean", "wco", "uwo"):
        check.fail(fn, f"unknown method '{method}' (valid: mean, wco, uwo)")
    out_dtype = rewards.dtype if rewards.is_floating_point() else torch.float32
    dtype = torch.float64 if out_dtype == torch.float64 else torch.float32
    moved = rewards.movedim(dim, -1)
    if _ops.use_ops(rewards, fn=fn):
        return _ops.ensemble_rewards(moved, method, lam, out_dtype)
    lead, e, device = moved.shape[:-1], moved.shape[-1], rewards.device

    def run(inputs, grad_out, need):
        r = inputs[0].detach().movedim(dim, -1).to("cpu", dtype).reshape(-1, e).contiguous()
        out = torch.empty(r.shape[0], dtype=dtype)
        g = torch.empty(r.shape, dtype=dtype) if need is not None and need[0] else None
        go = None if grad_out is None else _flat(grad_out, dtype)
        _C.ensemble_rewards(r, method, lam, out, go, g)
        if g is not None:
            g = g.reshape(*lead, e).movedim(-1, dim).to(device, inputs[0].dtype)
        return (out.reshape(lead).to(device, out_dtype),), (g,)

    return recompute_in_backward(run, (rewards,), fn=fn)[0]


@check.public("calibrate_reward", finite_args=("rewards", "ref_rewards"))
def calibrate_reward(rewards: torch.Tensor, ref_rewards: torch.Tensor) -> torch.Tensor:
    """InfAlign's calibrated reward (Balashankar et al. 2024, CTRL): the empirical CDF of the
    reference policy's rewards at r, ``C(x, y) = (1/M) #{j : r(x, y'_j) <= r(x, y)}`` with
    y'_j ~ pi_ref, in [0, 1]. ``rewards`` ``[B]`` or ``[B, N]``; ``ref_rewards`` ``[B, M]``
    (M reference samples per prompt). No gradient (a step function: the result does not
    require grad, whatever the inputs do). fp32 result, computed in divkit's C++ core
    (``include/divkit/rlhf.h``); traced (``torch.compile``, ``torch.vmap``), through the custom
    op ``divkit::calibrate_reward``, which checks the values when the graph runs."""
    fn = "calibrate_reward"
    check.tensor(fn, "rewards", rewards, dtypes=None, cpu=False)
    check.tensor(fn, "ref_rewards", ref_rewards, dtypes=None, cpu=False)
    if ref_rewards.dim() != 2 or ref_rewards.shape[1] == 0:
        check.fail(fn, f"ref_rewards must be [B, M] with M >= 1, got {tuple(ref_rewards.shape)}")
    squeeze = rewards.dim() == 1
    r = rewards.unsqueeze(-1) if squeeze else rewards
    if r.dim() != 2 or r.shape[0] != ref_rewards.shape[0]:
        check.fail(
            fn,
            f"rewards must be [B] or [B, N] with B = {ref_rewards.shape[0]}, "
            f"got {tuple(rewards.shape)}",
        )
    if _ops.use_ops(rewards, ref_rewards, fn=fn):
        return _ops.calibrate_reward_op(rewards.detach(), ref_rewards.detach())
    return _calibrate(rewards, ref_rewards)


def _calibrate(rewards: torch.Tensor, ref_rewards: torch.Tensor) -> torch.Tensor:
    """calibrate_reward on checked rewards [B] or [B, N] (also the op's implementation)."""
    squeeze = rewards.dim() == 1
    r = rewards.unsqueeze(-1) if squeeze else rewards
    dtype = torch.float64 if torch.float64 in (rewards.dtype, ref_rewards.dtype) else torch.float32
    c = torch.empty(r.shape, dtype=torch.float32)
    # The core sorts each row of reference rewards once: O((N + M) log M) per prompt.
    _C.calibrate_reward(
        r.detach().to("cpu", dtype).contiguous(),
        ref_rewards.detach().to("cpu", dtype).contiguous(),
        c,
    )
    c = c.to(rewards.device)
    return c.squeeze(-1) if squeeze else c


@check.public("infalign_transform", finite_args=("calibrated",))
def infalign_transform(
    calibrated: torch.Tensor, t: float, *, scenario: Optional[str] = None
) -> torch.Tensor:
    """InfAlign's reward transform ``phi(u) = exp(t u)`` of a calibrated reward u in [0, 1],
    on which KL-regularized RL is run: t > 0 for best-of-N decoding (``scenario="best_of_n"``),
    t < 0 for best-of-N jailbreaking (worst-of-N, ``scenario="best_of_n_jailbreak"``); the
    scenario, when given, checks the sign. The paper tunes t per N; this exponential family is
    the paper's description, not verified against its code. Computed in divkit's C++ core
    (exponent clamped at 80), differentiable."""
    fn = "infalign_transform"
    check.tensor(fn, "calibrated", calibrated, dtypes=None, cpu=False)
    t = check.real(fn, "t", t)
    if scenario is not None:
        scenario = check.string(fn, "scenario", scenario)
        if scenario == "best_of_n" and not t > 0:
            check.fail(fn, f"t must be > 0 for best_of_n, got {t:g}")
        if scenario == "best_of_n_jailbreak" and not t < 0:
            check.fail(fn, f"t must be < 0 for best_of_n_jailbreak, got {t:g}")
        if scenario not in ("best_of_n", "best_of_n_jailbreak"):
            check.fail(fn, f"unknown scenario '{scenario}' (valid: best_of_n, best_of_n_jailbreak)")
    u = calibrated
    out_dtype = u.dtype if u.is_floating_point() else torch.float32
    dtype = torch.float64 if out_dtype == torch.float64 else torch.float32
    shape, device = u.shape, u.device
    if _ops.use_ops(u, fn=fn):
        return _ops.infalign_transform(u, t, out_dtype)

    def run(inputs, grad_out, need):
        out = torch.empty(u.numel(), dtype=dtype)
        g = torch.empty(u.numel(), dtype=dtype) if need is not None and need[0] else None
        go = None if grad_out is None else _flat(grad_out, dtype)
        _C.infalign_transform(_flat(inputs[0], dtype), t, out, go, g)
        return (out.reshape(shape).to(device, out_dtype),), _shaped([g], inputs)

    return recompute_in_backward(run, (u,), fn=fn)[0]


@check.public("best_of_n", logits_args=("rewards",))
def best_of_n(rewards: torch.Tensor, samples=None):
    """Best-of-N selection: for ``rewards`` ``[B, N]``, the index and the reward of the best of
    the N samples per prompt (first index on ties), and, when ``samples`` is given (a tensor
    ``[B, N, ...]`` or a list of B lists of N items), the chosen samples. Returns
    ``(indices [B], best_rewards [B], chosen_samples or None)``. The selection runs in divkit's
    C++ core (NaN rewards rejected) and has no gradient; ``best_rewards`` keeps the rewards'
    autograd graph (the gradient goes to the chosen entries). Traced (``torch.compile``,
    ``torch.vmap``), the selection is the custom op ``divkit::best_of_n``; samples given as
    lists are picked in Python (a graph break under ``torch.compile``), a tensor in the graph."""
    fn = "best_of_n"
    if not isinstance(rewards, torch.Tensor) or rewards.dim() != 2 or rewards.shape[1] == 0:
        check.fail(fn, "rewards must be [B, N] with N >= 1")
    if _ops.use_ops(rewards, samples if isinstance(samples, torch.Tensor) else None, fn=fn):
        idx = _ops.best_of_n_op(rewards.detach())
    else:
        idx = _best_indices(rewards)
    # gather keeps the autograd graph of the rewards (the gradient goes to the chosen sample)
    best = rewards.gather(-1, idx[:, None]).squeeze(-1)
    chosen = None
    if samples is not None:
        if isinstance(samples, torch.Tensor):
            if samples.shape[:2] != rewards.shape:
                check.fail(
                    "best_of_n", f"samples must be [B, N, ...] with [B, N] = {tuple(rewards.shape)}"
                )
            chosen = samples[torch.arange(rewards.shape[0]), idx]
        else:
            if len(samples) != rewards.shape[0] or any(len(s) != rewards.shape[1] for s in samples):
                check.fail("best_of_n", "samples must be B lists of N items")
            chosen = [s[i] for s, i in zip(samples, idx.tolist())]
    return idx, best, chosen


def _best_indices(rewards: torch.Tensor) -> torch.Tensor:
    """best_of_n's indices [B] (int64, on the rewards' device) for checked rewards [B, N] (also
    the op's implementation)."""
    idx = torch.empty(rewards.shape[0], dtype=torch.int64)
    dtype = torch.float64 if rewards.dtype == torch.float64 else torch.float32
    _C.best_of_n(rewards.detach().to("cpu", dtype).contiguous(), idx, None)
    return idx.to(rewards.device)


@check.public("model_soup")
def model_soup(
    state_dicts: Sequence[Mapping[str, torch.Tensor]], weights: Optional[Sequence[float]] = None
) -> Dict[str, torch.Tensor]:
    """SALSA's reference model (Chegini et al. 2024, "SALSA: Soup-based Alignment Learning"): the
    weighted average ``sum_k w_k theta_k`` of K state dicts with the same keys and shapes
    (weights default to uniform and are normalized to sum 1). Floating tensors are averaged in
    fp32 (fp64 kept) and cast back; other tensors (step counters, int buffers) are taken from the
    first state dict. Load it into a model to use as pi_ref."""
    fn = "model_soup"
    if len(state_dicts) == 0:
        check.fail(fn, "state_dicts is empty")
    w = (
        [1.0] * len(state_dicts)
        if weights is None
        else [check.real(fn, "weights", x) for x in weights]
    )
    if len(w) != len(state_dicts):
        check.fail(fn, f"{len(w)} weights for {len(state_dicts)} state dicts")
    total = sum(w)
    # Finite: an inf weight (or sum) makes w / total NaN or 0, a soup of NaNs or zeros.
    if not (check.isfinite(total) and total > 0 and all(x >= 0 for x in w)):
        check.fail(fn, f"weights must be >= 0 with a finite positive sum, got {w}")
    w = [x / total for x in w]
    keys = list(state_dicts[0].keys())
    for k, sd in enumerate(state_dicts[1:], 1):
        if list(sd.keys()) != keys:
            check.fail(fn, f"state dict {k} has other keys than state dict 0")
    out = {}
    for key in keys:
        first = state_dicts[0][key]
        if not first.is_floating_point():
            out[key] = first.clone()
            continue
        acc_dtype = torch.float64 if first.dtype == torch.float64 else torch.float32
        acc = torch.zeros(first.shape, dtype=acc_dtype, device=first.device)
        for wk, sd in zip(w, state_dicts):
            if sd[key].shape != first.shape:
                check.fail(
                    fn,
                    f"{key} has shape {tuple(sd[key].shape)} in one state "
                    f"dict and {tuple(first.shape)} in another",
                )
            acc += wk * sd[key].detach().to(acc_dtype)
        out[key] = acc.to(first.dtype)
    return out


@check.public("topk_entropy_mass", logits_args=("logits",))
def topk_entropy_mass(
    logits: torch.Tensor,
    k: int,
    *,
    labels: Optional[torch.Tensor] = None,
    ignore_index: int = -100,
    temperature: float = 1.0,
):
    """Likelihood over-optimisation indicators (Shi et al. 2024, "Understanding Likelihood
    Over-optimisation in Direct Alignment Algorithms"), per token of ``logits`` ``[..., V]``:

    - top-k mass ``M = sum_{v in top-k} p(v)``, p = softmax(logits / temperature);
    - top-k entropy: the entropy of the distribution renormalized over the top-k tokens,
      ``-sum_{v in top-k} (p(v)/M) log(p(v)/M)`` in nats (in [0, log k]; the paper's k and
      normalization were not found, so this one is stated and k is an argument).

    Returns ``(entropy [...], mass [...], mean_entropy, mean_mass)``, the means over tokens
    whose label is not ``ignore_index`` (all tokens without labels). No gradient. Compiles
    with ``fullgraph=True``: traced, the checks of the logits' values and of the labels' range
    run in ops (``divkit::checked_range``, ``divkit::checked_labels``) when the graph runs."""
    fn = "topk_entropy_mass"
    check.tensor(fn, "logits", logits, dtypes=None, cpu=False)
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= logits.shape[-1]:
        check.fail(fn, f"k must be an int in [1, V = {logits.shape[-1]}], got {k}")
    temperature = check.positive(fn, "temperature", temperature)
    # Traced, the value checks (the decorator's, which it skips then, and the labels' range)
    # run in ops when the graph runs.
    traced = _ops.ENABLED and _ops.compiling()
    with torch.no_grad():
        if traced:
            big = torch.finfo(logits.dtype).max  # -inf (a masked entry) passes, NaN / +inf not
            msg = "logits has NaN or +inf values"
            logits = _ops.checked_range_op(logits.detach(), -math.inf, big, fn, msg)
        x = logits if logits.dtype == torch.float64 else logits.float()
        logp = torch.log_softmax(x / temperature, -1)
        top = logp.topk(k, dim=-1).values
        log_mass = torch.logsumexp(top, -1, keepdim=True)
        if traced:
            # A row of only -inf (no distribution) gives a NaN log mass; eager's decorator raises
            # for it. Every output depends on log_mass, so the check cannot be dropped as unused.
            msg = "logits: a row is all -inf (every entry masked: no distribution)"
            log_mass = _ops.checked_range_op(log_mass, -math.inf, 1.0, fn, msg)
        logq = top - log_mass
        # 0 log 0 = 0: a masked (-inf) logit among the top k adds nothing (not 0 * -inf = NaN).
        entropy = -torch.where(logq == -math.inf, 0.0, logq.exp() * logq).sum(-1)
        mass = log_mass.squeeze(-1).exp()
        if labels is None:
            mask = torch.ones_like(mass, dtype=torch.bool)
        else:
            v, ii = logits.shape[-1], int(ignore_index)
            lab = check.labels(fn, labels, mass.shape, vocab=None if traced else v, ignore_index=ii)
            if traced:
                lab = _ops.checked_labels_op(lab, v, ii, fn)
            mask = (lab != ignore_index).reshape(mass.shape)
        entropy, mass = entropy * mask, mass * mask
        count = mask.sum().clamp(min=1)
        return entropy, mass, entropy.sum() / count, mass.sum() / count


@check.public("gradient_entanglement", finite_args=("chosen_logp", "rejected_logp"))
def gradient_entanglement(
    chosen_logp: torch.Tensor, rejected_logp: torch.Tensor, params: Iterable[torch.Tensor]
) -> Dict[str, float]:
    """The gradient-entanglement check (Yuan et al. 2024, "A Common Pitfall of Margin-based
    Language Model Alignment: Gradient Entanglement") for a model: with
    g_w = grad log pi(y_w) and g_l = grad log pi(y_l) over ``params`` (e.g.
    ``model.parameters()``), a small step along the margin's gradient g_w - g_l raises the
    chosen log-prob iff ``<g_w, g_l> <= |g_w|^2`` and lowers the rejected one iff
    ``<g_w, g_l> <= |g_l|^2``.

    ``chosen_logp``, ``rejected_logp``: scalars (e.g. summed sequence log-probs over a batch)
    computed from the model with autograd. Returns floats ``inner``, ``chosen_sq_norm``,
    ``rejected_sq_norm``, ``cosine`` and booleans ``chosen_rises``, ``rejected_falls``. The
    graph is kept (retain_graph) so a loss can still be backpropagated."""
    for name, x in (("chosen_logp", chosen_logp), ("rejected_logp", rejected_logp)):
        check.tensor("gradient_entanglement", name, x, dtypes=None, cpu=False)
    params = [p for p in params if p.requires_grad]
    if not params:
        check.fail("gradient_entanglement", "params has no tensor that requires grad")
    if chosen_logp.numel() != 1 or rejected_logp.numel() != 1:
        check.fail("gradient_entanglement", "chosen_logp and rejected_logp must be scalars")
    gw = torch.autograd.grad(chosen_logp.sum(), params, retain_graph=True, allow_unused=True)
    gl = torch.autograd.grad(rejected_logp.sum(), params, retain_graph=True, allow_unused=True)
    inner = ww = ll = 0.0
    for a, b in zip(gw, gl):
        a64 = None if a is None else a.double()
        b64 = None if b is None else b.double()
        if a64 is not None:
            ww += (a64 * a64).sum().item()
        if b64 is not None:
            ll += (b64 * b64).sum().item()
        if a64 is not None and b64 is not None:
            inner += (a64 * b64).sum().item()
    denom = math.sqrt(ww * ll)
    return {
        "inner": inner,
        "chosen_sq_norm": ww,
        "rejected_sq_norm": ll,
        "cosine": inner / denom if denom > 0 else 0.0,
        "chosen_rises": inner <= ww,
        "rejected_falls": inner <= ll,
    }


# f-DPG (Go et al. 2023) lives in divkit.fdpg; its loss is part of the RLHF toolbox.
from .fdpg import FDPG_DIVERGENCES, FDPGStats, fdpg_loss  # noqa: E402

__all__ += ["FDPG_DIVERGENCES", "FDPGStats", "fdpg_loss"]
