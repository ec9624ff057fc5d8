"""divkit: divergence-based training objectives for LLMs.

Fused C++ kernels (knowledge-distillation divergences and their gradients) with PyTorch
autograd wrappers::

    import divkit
    loss = divkit.divergence(student_logits, teacher_logits, "forward_kl", labels=labels)
    loss_fn = divkit.nn.DivergenceLoss("jsd", beta=0.5)

See :func:`divkit.divergence` for the formulas and conventions.
"""

import importlib as _importlib

from . import _C

# Light import: ``import divkit`` loads only the compiled core (_C, which needs neither torch nor
# numpy). Everything that imports torch is loaded on first access to one of its names (PEP 562
# module __getattr__ below), so that `divkit compare` and `divkit info` run without torch.
_SUBMODULES = (
    "distill",
    "distributed",
    "functional",
    "fused",
    "memory",
    "nn",
    "ot",
    "preference",
    "rlhf",
    "sparse",
)
# Public name -> the submodule that defines it.
_LAZY = {
    **dict.fromkeys(
        (
            "ALDRKLLoss",
            "DACKLBounds",
            "DACKLLoss",
            "USCDLogitsProcessor",
            "aldr_kl_loss",
            "bdkd_loss",
            "comp_sum_loss",
            "dac_kl_loss",
            "ddk_domain_weights",
            "ldr_kl_loss",
            "mdcs_consistency_loss",
            "miniplm_difference_sampling",
            "nd_loss",
            "nkd_loss",
            "ofa_loss",
            "swing_loss",
            "uscd_logits",
            "uskd_loss",
            "weight_aligning",
        ),
        "distill",
    ),
    **dict.fromkeys(("KINDS", "REDUCTIONS", "divergence", "divergence_and_grad"), "functional"),
    **dict.fromkeys(
        (
            "LogprobsResult",
            "fused_linear_cross_entropy",
            "fused_linear_divergence",
            "fused_linear_logprobs",
            "fused_linear_sparse_divergence",
        ),
        "fused",
    ),
    **dict.fromkeys(
        (
            "LOSS_TYPES",
            "cpo_loss",
            "d2o_loss",
            "dpo_loss",
            "hypo_loss",
            "kto_loss",
            "odds_ratio_loss",
            "orpo_loss",
            "preference_loss",
            "preference_metrics",
            "simpo_loss",
            "sparsepo_loss",
            "sparsepo_loss_fused",
            "superhf_loss",
            "tdpo_loss",
            "tdpo_loss_fused",
            "wpo_weights",
        ),
        "preference",
    ),
    **dict.fromkeys(("TAILS", "sparse_divergence", "topk_divergence"), "sparse"),
    "empty_cache": "memory",
}


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(_importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    elif name in _SUBMODULES:
        value = _importlib.import_module(f"{__name__}.{name}")
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value  # later accesses skip __getattr__
    return value


def __dir__():
    return sorted(set(globals()) | set(_LAZY) | set(_SUBMODULES))


__all__ = [
    "divergence",
    "divergence_and_grad",
    "fused_linear_divergence",
    "fused_linear_cross_entropy",
    "fused_linear_logprobs",
    "fused_linear_sparse_divergence",
    "LogprobsResult",
    "sparse_divergence",
    "topk_divergence",
    "TAILS",
    "nn",
    "memory",
    "empty_cache",
    "distributed",
    "ot",
    "KINDS",
    "REDUCTIONS",
    "preference",
    "rlhf",
    "LOSS_TYPES",
    "preference_loss",
    "dpo_loss",
    "preference_metrics",
    "wpo_weights",
    "cpo_loss",
    "simpo_loss",
    "odds_ratio_loss",
    "orpo_loss",
    "kto_loss",
    "d2o_loss",
    "hypo_loss",
    "superhf_loss",
    "tdpo_loss",
    "sparsepo_loss",
    "tdpo_loss_fused",
    "sparsepo_loss_fused",
    "distill",
    "bdkd_loss",
    "nkd_loss",
    "uskd_loss",
    "ofa_loss",
    "dac_kl_loss",
    "DACKLBounds",
    "DACKLLoss",
    "swing_loss",
    "mdcs_consistency_loss",
    "nd_loss",
    "ldr_kl_loss",
    "aldr_kl_loss",
    "ALDRKLLoss",
    "comp_sum_loss",
    "miniplm_difference_sampling",
    "ddk_domain_weights",
    "weight_aligning",
    "uscd_logits",
    "USCDLogitsProcessor",
    "set_num_threads",
    "get_num_threads",
    "available_simd_targets",
    "force_simd_target",
    "active_simd_target",
    "version",
    "Error",
    "__version__",
]

#: The error type of every argument check, the core's and the Python layer's: a subclass of
#: ValueError whose message names the function and the bad argument (a wrong type raises a
#: subclass that is also a TypeError).
Error = _C.Error


def set_num_threads(n: int) -> None:
    """Sets the number of threads of divkit's CPU kernels (results do not depend on it).

    n must be in [1, 8 x the number of processors]. In a child made by ``os.fork`` after
    divkit ran threads, the kernels run on one thread and n > 1 raises divkit.Error (OpenMP
    cannot restart its threads in a fork child; see "Threads and fork" in the guide).
    """
    from . import _validate

    # An int of any size is compared with the bound here (the binding converts int64 only).
    if isinstance(n, int) and not isinstance(n, bool):
        v = n
    else:
        v = _validate.integer("set_num_threads", "n", n)
    if not 1 <= v <= _C.max_num_threads():
        _validate.fail("set_num_threads", f"n must be in [1, {_C.max_num_threads()}], got {v}")
    _C.set_num_threads(v)


def get_num_threads() -> int:
    """The number of threads divkit's CPU kernels use."""
    return _C.get_num_threads()


def available_simd_targets() -> list:
    """SIMD targets compiled in and supported by this CPU, best first (e.g. ['AVX2', 'SSE4'])."""
    return list(_C.available_simd_targets())


def force_simd_target(name: str) -> None:
    """Restricts the kernels to one SIMD target (for tests and benchmarks); '' restores the
    automatic choice."""
    from . import _validate

    _C.force_simd_target(_validate.string("force_simd_target", "name", name))


def active_simd_target() -> str:
    """The SIMD target the kernels dispatch to now."""
    return _C.active_simd_target()


def version() -> str:
    """The version of divkit's compiled core."""
    return _C.version()


__version__ = _C.version()
