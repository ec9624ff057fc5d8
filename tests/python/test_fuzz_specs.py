"""The table of valid calls that the fuzz suites (test_fuzz_api.py) start from: one entry per
public callable of divkit, derived from the same module list as docs/api.md (scripts/gen_api.py),
and the test that keeps the table complete.

Each entry is ``name -> make(rng)``, returning ``(target, args, kwargs)``: a valid call of the
public function (``target`` is the function itself, or a small lambda that builds a class and
calls it). The fuzzers mutate one argument of it at a time.
"""

from __future__ import annotations

import importlib
import inspect
import math
from typing import Callable, Dict, List, Tuple

import torch
from torch import nn

import divkit
from divkit import distill as D
from divkit import fdpg, kde, lightsb, ot, preference, rlhf, wdm

# The modules whose __all__ docs/api.md lists (scripts/gen_api.py's PY_SECTIONS) and the top level.
API_MODULES = [
    "divkit",
    "divkit.functional",
    "divkit.fused",
    "divkit.sparse",
    "divkit.nn",
    "divkit.distributed",
    "divkit.preference",
    "divkit.rlhf",
    "divkit.ot",
    "divkit.distill",
    "divkit.fdpg",  # fdpg_f / fdpg_f_prime are public there only
    "divkit.memory",
]

# Public callables that take no argument to fuzz, or are result types, with the reason.
NOT_FUZZED = {
    "divkit.Error": "the error type",
    "divkit.get_num_threads": "no arguments",
    "divkit.available_simd_targets": "no arguments",
    "divkit.active_simd_target": "no arguments",
    "divkit.version": "no arguments",
    "divkit.empty_cache": "no arguments",
    "divkit.memory.cache_limit": "no arguments",
    "divkit.memory.cache_stats": "no arguments",
    "divkit.memory.set_cache_limit": "process-wide state (its argument errors: test_memory.py)",
    "divkit.LogprobsResult": "result type",
    "divkit.ot.SinkhornResult": "result type",
    "divkit.ot.SparseOTResult": "result type",
    "divkit.ot.KdeBandwidthResult": "result type",
    "divkit.ot.WDMOutput": "result type",
    "divkit.ot.LightSBConditional": "result type",
    "divkit.distill.USCDResult": "result type",
    "divkit.rlhf.FDPGStats": "result type",
    # Process-wide state: bad values in test_hardening.py::test_runtime_arguments (a huge
    # valid-looking thread count is the C++ runtime's bound, tested in the C++ suite).
    "divkit.set_num_threads": "process-wide state (test_hardening.py)",
    "divkit.force_simd_target": "process-wide state (test_hardening.py)",
    # Need a torch.distributed process group: their checks are tested in
    # test_vocab_parallel_errors.py.
    "divkit.distributed.vocab_parallel_divergence": "needs a process group",
    "divkit.distributed.shard_offsets": "needs a process group",
    # Reads a file: fuzzed over file contents in test_fuzz_files.py.
    "divkit.distill.load_document_logprobs": "file reader (test_fuzz_files.py)",
}


def public_callables() -> Dict[str, object]:
    """Every public callable, named as docs/api.md names it (top level first)."""
    out: Dict[str, object] = {}
    seen = set()
    for modname in API_MODULES:
        mod = importlib.import_module(modname)
        for name in mod.__all__:
            obj = getattr(mod, name)
            if inspect.ismodule(obj) or not callable(obj) or id(obj) in seen:
                continue
            seen.add(id(obj))
            out[f"{modname}.{name}"] = obj
    return out


Spec = Callable[[torch.Generator], Tuple[Callable, List, Dict]]
SPECS: Dict[str, Spec] = {}


def spec(name: str):
    def deco(f):
        SPECS[name] = f
        return f

    return deco


def _t(g, *shape, dtype=torch.float64, scale=2.0):
    return torch.randn(*shape, generator=g, dtype=torch.float64).mul(scale).to(dtype)


def _lab(g, n, v, shape=None):
    lab = torch.randint(0, v, (n,), generator=g)
    return lab if shape is None else lab.reshape(shape)


def _logps(g, *shape):
    return -torch.rand(*shape, generator=g, dtype=torch.float64) * 20 - 1


N, V, B = 6, 7, 4


# --- token-level divergences, fused heads, sparse teachers -----------------------------------
@spec("divkit.divergence")
def _(g):
    return divkit.divergence, [_t(g, N, V), _t(g, N, V), "jsd"], dict(temperature=1.5)


@spec("divkit.divergence_and_grad")
def _(g):
    return divkit.divergence_and_grad, [_t(g, N, V), _t(g, N, V)], dict(labels=_lab(g, N, V))


@spec("divkit.fused_linear_divergence")
def _(g):
    return (
        divkit.fused_linear_divergence,
        [_t(g, N, 5), _t(g, V, 5), _t(g, N, 3), _t(g, V, 3)],
        dict(temperature=2.0),
    )


@spec("divkit.fused_linear_cross_entropy")
def _(g):
    return divkit.fused_linear_cross_entropy, [_t(g, N, 5), _t(g, V, 5), _lab(g, N, V)], {}


@spec("divkit.fused_linear_logprobs")
def _(g):
    return (
        divkit.fused_linear_logprobs,
        [_t(g, N, 5), _t(g, V, 5), _lab(g, N, V)],
        dict(return_entropy=True, topk=2),
    )


def _topk(g, k=3):
    idx = torch.stack([torch.randperm(V, generator=g)[:k] for _ in range(N)])
    lp = torch.log_softmax(_t(g, N, V), -1).gather(1, idx)
    return idx, lp


@spec("divkit.fused_linear_sparse_divergence")
def _(g):
    idx, lp = _topk(g)
    return divkit.fused_linear_sparse_divergence, [_t(g, N, 5), _t(g, V, 5), idx, lp], {}


@spec("divkit.sparse_divergence")
def _(g):
    idx, lp = _topk(g)
    return divkit.sparse_divergence, [_t(g, N, V), idx, lp], dict(reduction="sum")


@spec("divkit.topk_divergence")
def _(g):
    return divkit.topk_divergence, [_t(g, N, V), _t(g, N, V), 3], {}


# --- nn modules ------------------------------------------------------------------------------
@spec("divkit.nn.DivergenceLoss")
def _(g):
    return (
        lambda s, t, kind, temperature: divkit.nn.DivergenceLoss(kind, temperature=temperature)(
            s, t
        ),
        [_t(g, N, V), _t(g, N, V), "reverse_kl", 2.0],
        {},
    )


@spec("divkit.nn.FusedLinearDistillationLoss")
def _(g):
    return (
        lambda h, w, th, tw, kind: divkit.nn.FusedLinearDistillationLoss(kind)(h, w, th, tw),
        [_t(g, N, 5), _t(g, V, 5), _t(g, N, 3), _t(g, V, 3), "forward_kl"],
        {},
    )


@spec("divkit.nn.FusedLinearCrossEntropyLoss")
def _(g):
    return (
        lambda h, w, y, ls: divkit.nn.FusedLinearCrossEntropyLoss(label_smoothing=ls)(w, h, y),
        [_t(g, N, 5), _t(g, V, 5), _lab(g, N, V), 0.1],
        {},
    )


# --- preference ------------------------------------------------------------------------------
def _pairs(g, k=4):
    return [_logps(g, B) for _ in range(k)]


@spec("divkit.preference_loss")
def _(g):
    return divkit.preference_loss, _pairs(g), dict(loss_type="sigmoid", beta=0.1)


@spec("divkit.preference_metrics")
def _(g):
    return divkit.preference_metrics, [_t(g, B), _t(g, B)], {}


@spec("divkit.wpo_weights")
def _(g):
    return divkit.wpo_weights, [_t(g, 2, 3, V), _lab(g, 6, V, (2, 3))], {}


@spec("divkit.cpo_loss")
def _(g):
    return divkit.cpo_loss, _pairs(g, 2), dict(beta=0.1)


@spec("divkit.simpo_loss")
def _(g):
    return divkit.simpo_loss, _pairs(g, 2), dict(beta=2.0, simpo_gamma=0.5)


@spec("divkit.odds_ratio_loss")
def _(g):
    return divkit.odds_ratio_loss, _pairs(g, 2), dict(beta=0.1)


@spec("divkit.orpo_loss")
def _(g):
    return divkit.orpo_loss, _pairs(g, 2) + [torch.rand(B, generator=g, dtype=torch.float64)], {}


@spec("divkit.kto_loss")
def _(g):
    return divkit.kto_loss, _pairs(g, 6), dict(beta=0.1)


@spec("divkit.d2o_loss")
def _(g):
    return (
        divkit.d2o_loss,
        [_logps(g, B, 3), _logps(g, B, 3), _logps(g, B), _logps(g, B)],
        dict(beta=0.1, alpha=0.1),
    )


@spec("divkit.hypo_loss")
def _(g):
    return divkit.hypo_loss, _pairs(g, 4) + [_logps(g, B, 3), _logps(g, B, 3)], dict(lam=0.01)


@spec("divkit.superhf_loss")
def _(g):
    return (
        divkit.superhf_loss,
        [_logps(g, B, 3), _t(g, B, 3)],
        dict(ref_logps=_logps(g, B, 3), top_k=1, kl_coef=0.35),
    )


def _tok4(g, t=3):
    return [_t(g, 2, t, V) for _ in range(4)] + [_lab(g, 2 * t, V, (2, t)) for _ in range(2)]


@spec("divkit.tdpo_loss")
def _(g):
    return divkit.tdpo_loss, _tok4(g), dict(beta=0.1, alpha=0.5)


@spec("divkit.sparsepo_loss")
def _(g):
    return divkit.sparsepo_loss, _tok4(g), dict(beta=0.1, l1_reward=0.01)


def _fused_pref(g, t=3):
    return [_t(g, 2, t, 5), _t(g, 2, t, 5), _t(g, V, 5)] + [
        _lab(g, 2 * t, V, (2, t)) for _ in range(2)
    ], dict(ref_chosen_logits=_t(g, 2, t, V), ref_rejected_logits=_t(g, 2, t, V))


@spec("divkit.tdpo_loss_fused")
def _(g):
    a, k = _fused_pref(g)
    return divkit.tdpo_loss_fused, a, k


@spec("divkit.sparsepo_loss_fused")
def _(g):
    a, k = _fused_pref(g)
    return divkit.sparsepo_loss_fused, a, k


@spec("divkit.preference.SparsePOMask")
def _(g):
    return (
        lambda h, n: preference.SparsePOMask(h, n)([torch.randn(2, 3, h)] * n),
        [5, 2],
        {},
    )


@spec("divkit.preference.sequence_logps")
def _(g):
    return preference.sequence_logps, [_t(g, 2, 3, V), _lab(g, 6, V, (2, 3))], dict(average=True)


@spec("divkit.preference.token_logratio_and_kl")
def _(g):
    return (
        preference.token_logratio_and_kl,
        [_t(g, 2, 3, V), _t(g, 2, 3, V), _lab(g, 6, V, (2, 3))],
        {},
    )


# --- distillation ----------------------------------------------------------------------------
@spec("divkit.bdkd_loss")
def _(g):
    return D.bdkd_loss, [_t(g, N, V), _t(g, N, V)], dict(temperature=2.0)


@spec("divkit.nkd_loss")
def _(g):
    return D.nkd_loss, [_t(g, N, V), _t(g, N, V), _lab(g, N, V)], {}


@spec("divkit.uskd_loss")
def _(g):
    return D.uskd_loss, [_t(g, N, V), _lab(g, N, V), _t(g, N, V)], {}


@spec("divkit.ofa_loss")
def _(g):
    return D.ofa_loss, [_t(g, N, V), _t(g, N, V), _lab(g, N, V)], {}


@spec("divkit.dac_kl_loss")
def _(g):
    return D.dac_kl_loss, [_t(g, N, V), _t(g, N, V)], dict(mass_hi=0.8)


@spec("divkit.DACKLBounds")
def _(g):
    return (
        lambda k, hidden, teacher_logits: D.DACKLBounds(k, hidden)(teacher_logits),
        [3, 4, _t(g, N, V, dtype=torch.float32)],
        {},
    )


@spec("divkit.DACKLLoss")
def _(g):
    return (
        lambda k, s, t: D.DACKLLoss(k, 4)(s, t),
        [3, _t(g, N, V, dtype=torch.float32), _t(g, N, V, dtype=torch.float32)],
        {},
    )


@spec("divkit.swing_loss")
def _(g):
    return (
        D.swing_loss,
        [_t(g, N, V), _t(g, N, V), torch.rand(N, generator=g, dtype=torch.float64)],
        dict(noise_std=0.1, seed=3),
    )


@spec("divkit.mdcs_consistency_loss")
def _(g):
    return D.mdcs_consistency_loss, [_t(g, N, V), _t(g, N, V), _lab(g, N, V)], {}


@spec("divkit.nd_loss")
def _(g):
    y = _lab(g, N, 3)
    ft = _t(g, N, 5)
    return D.nd_loss, [_t(g, N, 5), ft, y, _t(g, 3, 5)], {}


@spec("divkit.ldr_kl_loss")
def _(g):
    return D.ldr_kl_loss, [_t(g, N, V), _lab(g, N, V)], dict(lam=1.0, margin=0.1)


@spec("divkit.aldr_kl_loss")
def _(g):
    return D.aldr_kl_loss, [_t(g, N, V), _lab(g, N, V)], dict(alpha=2.0, lam0=1.0)


@spec("divkit.ALDRKLLoss")
def _(g):
    return (
        lambda num_samples, logits, labels, ids: D.ALDRKLLoss(num_samples)(logits, labels, ids),
        [N, _t(g, N, V), _lab(g, N, V), torch.arange(N)],
        {},
    )


@spec("divkit.comp_sum_loss")
def _(g):
    return D.comp_sum_loss, [_t(g, N, V), _lab(g, N, V)], dict(tau=0.5)


@spec("divkit.miniplm_difference_sampling")
def _(g):
    return (
        D.miniplm_difference_sampling,
        [_logps(g, 8), _logps(g, 8)],
        dict(ratio=0.5, lengths=torch.randint(1, 9, (8,), generator=g)),
    )


@spec("divkit.ddk_domain_weights")
def _(g):
    return D.ddk_domain_weights, [torch.rand(3, generator=g) + 1, torch.rand(3, generator=g)], {}


@spec("divkit.weight_aligning")
def _(g):
    return D.weight_aligning, [_t(g, 8, 4), 5, _t(g, 8)], {}


@spec("divkit.uscd_logits")
def _(g):
    return D.uscd_logits, [_t(g, N, V), _t(g, N, V)], dict(std_threshold=0.05)


@spec("divkit.USCDLogitsProcessor")
def _(g):
    return (
        lambda w, std, lame: D.USCDLogitsProcessor(lame_weight=w)(std, lame),
        [0.5, _t(g, 2, V, dtype=torch.float32), _t(g, 2, V, dtype=torch.float32)],
        {},
    )


@spec("divkit.distill.uskd_soft_labels")
def _(g):
    return D.uskd_soft_labels, [_t(g, N, V), _lab(g, N, V), _t(g, N, V)], {}


@spec("divkit.distill.dac_kl_mass_bounds")
def _(g):
    return D.dac_kl_mass_bounds, [_t(g, N, V)], dict(mass_hi=0.8)


@spec("divkit.distill.swing_temperatures")
def _(g):
    return D.swing_temperatures, [torch.rand(N, generator=g, dtype=torch.float64)], {}


@spec("divkit.distill.swing_noise")
def _(g):
    return D.swing_noise, [3, (N, V)], {}


@spec("divkit.distill.teacher_class_means")
def _(g):
    return D.teacher_class_means, [_t(g, N, 5), _lab(g, N, 3), 3], {}


@spec("divkit.distill.generalized_cross_entropy")
def _(g):
    return D.generalized_cross_entropy, [_t(g, N, V), _lab(g, N, V)], dict(q=0.7)


@spec("divkit.distill.mae_loss")
def _(g):
    return D.mae_loss, [_t(g, N, V), _lab(g, N, V)], {}


@spec("divkit.distill.smooth_adversarial_comp_sum_loss")
def _(g):
    return D.smooth_adversarial_comp_sum_loss, [_t(g, N, V), _t(g, N, V), _lab(g, N, V)], {}


@spec("divkit.distill.miniplm_scores")
def _(g):
    return D.miniplm_scores, [_logps(g, 8), _logps(g, 8)], {}


@spec("divkit.distill.weight_align_")
def _(g):
    torch.manual_seed(0)
    return D.weight_align_, [nn.Linear(4, 8), 5], {}


@spec("divkit.distill.row_entropy")
def _(g):
    return D.row_entropy, [_t(g, N, V)], dict(temperature=1.5)


# --- rlhf ------------------------------------------------------------------------------------
@spec("divkit.rlhf.kl_estimator")
def _(g):
    return rlhf.kl_estimator, [_logps(g, B, 3), _logps(g, B, 3), "k3"], {}


@spec("divkit.rlhf.exact_kl")
def _(g):
    return rlhf.exact_kl, [_t(g, N, V), _t(g, N, V)], dict(labels=_lab(g, N, V))


@spec("divkit.rlhf.exact_kl_fused")
def _(g):
    return rlhf.exact_kl_fused, [_t(g, N, 5), _t(g, V, 5)], dict(ref_logits=_t(g, N, V))


@spec("divkit.rlhf.ensemble_rewards")
def _(g):
    return rlhf.ensemble_rewards, [_t(g, 3, B), "uwo"], dict(uwo_lambda=0.5)


@spec("divkit.rlhf.calibrate_reward")
def _(g):
    return rlhf.calibrate_reward, [_t(g, B), _t(g, B, 5)], {}


@spec("divkit.rlhf.infalign_transform")
def _(g):
    return rlhf.infalign_transform, [torch.rand(B, generator=g, dtype=torch.float64), 2.0], {}


@spec("divkit.rlhf.best_of_n")
def _(g):
    return rlhf.best_of_n, [_t(g, B, 3)], dict(samples=_t(g, B, 3, 2))


@spec("divkit.rlhf.model_soup")
def _(g):
    return rlhf.model_soup, [[{"w": _t(g, 3)}, {"w": _t(g, 3)}]], dict(weights=[0.3, 0.7])


@spec("divkit.rlhf.topk_entropy_mass")
def _(g):
    return rlhf.topk_entropy_mass, [_t(g, N, V), 3], dict(labels=_lab(g, N, V))


@spec("divkit.rlhf.gradient_entanglement")
def _(g):
    w = _t(g, 3).requires_grad_(True)
    return (
        rlhf.gradient_entanglement,
        [(w * _t(g, 3)).sum(), (w * _t(g, 3)).sum(), [w]],
        {},
    )


@spec("divkit.rlhf.fdpg_loss")
def _(g):
    return fdpg.fdpg_loss, [_logps(g, 8), _logps(g, 8), _t(g, 8), "jsd"], {}


@spec("divkit.fdpg.fdpg_f")
def _(g):
    return fdpg.fdpg_f, [_t(g, 5), "jsd"], {}


@spec("divkit.fdpg.fdpg_f_prime")
def _(g):
    return fdpg.fdpg_f_prime, [_t(g, 5), "reverse_kl"], {}


# --- optimal transport -----------------------------------------------------------------------
@spec("divkit.ot.sinkhorn")
def _(g):
    return ot.sinkhorn, [_t(g, 5, 2), _t(g, 4, 2)], dict(eps=0.5, max_iter=200, warn=False)


@spec("divkit.ot.sinkhorn_divergence")
def _(g):
    return ot.sinkhorn_divergence, [_t(g, 5, 2), _t(g, 4, 2)], dict(eps=0.5)


@spec("divkit.ot.sinkhorn_kd_loss")
def _(g):
    return ot.sinkhorn_kd_loss, [_t(g, N, V), _t(g, N, V)], dict(eps=0.1, n_iter=10)


@spec("divkit.ot.monge_gap")
def _(g):
    return ot.monge_gap, [_t(g, 5, 2), _t(g, 5, 2)], dict(eps=0.5)


@spec("divkit.ot.sparse_ot")
def _(g):
    a = torch.rand(4, generator=g, dtype=torch.float64) + 0.1
    b = torch.rand(3, generator=g, dtype=torch.float64) + 0.1
    return (
        ot.sparse_ot,
        [a / a.sum(), b / b.sum(), torch.rand(4, 3, generator=g, dtype=torch.float64)],
        dict(gamma=0.5, warn=False),
    )


@spec("divkit.ot.mmd")
def _(g):
    return ot.mmd, [_t(g, 5, 2), _t(g, 4, 2)], dict(sigma=1.0)


@spec("divkit.ot.cs_divergence")
def _(g):
    return ot.cs_divergence, [_t(g, 5, 2), _t(g, 4, 2)], dict(sigma=1.0)


@spec("divkit.ot.kde_log_density")
def _(g):
    return kde.kde_log_density, [_t(g, 5, 2), _t(g, 4, 2), 0.5], {}


@spec("divkit.ot.kde_log_likelihood")
def _(g):
    return kde.kde_log_likelihood, [_t(g, 5, 2), 0.5], {}


@spec("divkit.ot.kde_bandwidth")
def _(g):
    return kde.kde_bandwidth, [_t(g, 6, 2)], dict(grid=6, max_iter=20)


@spec("divkit.ot.wasserstein_dependency")
def _(g):
    torch.manual_seed(0)
    crit = wdm.wdm_critic(4, (8,))
    return (
        lambda x, y, gp_weight: wdm.wasserstein_dependency(
            crit, x, y, gp_weight=gp_weight, generator=torch.Generator().manual_seed(0)
        ),
        [_t(g, 5, 2, dtype=torch.float32), _t(g, 5, 2, dtype=torch.float32), 10.0],
        {},
    )


@spec("divkit.ot.WassersteinDependency")
def _(g):
    return (
        lambda dx, dy, x, y: wdm.WassersteinDependency(dx, dy, (8,))(x, y),
        [2, 2, _t(g, 5, 2, dtype=torch.float32), _t(g, 5, 2, dtype=torch.float32)],
        {},
    )


@spec("divkit.ot.wdm_critic")
def _(g):
    return wdm.wdm_critic, [4, (8,)], dict(spectral_norm=False)


@spec("divkit.ot.LightSB")
def _(g):
    return (
        lambda d, k, eps, x, y: lightsb.LightSB(d, k, eps)(x, y),
        [2, 3, 0.5, _t(g, 5, 2, dtype=torch.float32), _t(g, 5, 2, dtype=torch.float32)],
        {},
    )


@spec("divkit.ot.lightsb_objective")
def _(g):
    return (
        lightsb.lightsb_objective,
        [_t(g, 5, 2), _t(g, 5, 2), _t(g, 3), _t(g, 3, 2), _t(g, 3, 2, scale=0.3), 0.5],
        {},
    )


def test_every_public_callable_has_a_fuzz_spec():
    """A new public function fails here until it gets an entry in SPECS (or NOT_FUZZED)."""
    names = set(public_callables())
    uncovered = sorted(names - set(SPECS) - set(NOT_FUZZED))
    assert not uncovered, f"public callables without a fuzz spec: {uncovered}"
    stale = sorted((set(SPECS) | set(NOT_FUZZED)) - names)
    assert not stale, f"fuzz specs for names that are not public: {stale}"


def test_specs_are_valid_calls():
    """Every spec's unmutated call runs and gives finite outputs (the fuzzers' starting point)."""
    bad = {}
    for name, make in SPECS.items():
        target, args, kwargs = make(torch.Generator().manual_seed(0))
        try:
            out = target(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 - reported below
            bad[name] = f"{type(e).__name__}: {e}"
            continue
        if not all_finite(out):
            bad[name] = "non-finite output"
    assert not bad, bad


def all_finite(out, allow_inf: bool = False) -> bool:
    """No NaN anywhere in the (nested) output; no inf either unless allow_inf."""
    if isinstance(out, torch.Tensor):
        if out.is_floating_point() or out.is_complex():
            o = out.detach()
            if o.device.type == "meta":
                return True
            return not bool(torch.isnan(o).any()) and (allow_inf or not bool(torch.isinf(o).any()))
        return True
    if isinstance(out, float):
        return not math.isnan(out) and (allow_inf or not math.isinf(out))
    if isinstance(out, dict):
        return all(all_finite(v, allow_inf) for v in out.values())
    if isinstance(out, (tuple, list)):
        return all(all_finite(v, allow_inf) for v in out)
    if isinstance(out, nn.Module):
        return all(all_finite(p, allow_inf) for p in out.parameters())
    return True
