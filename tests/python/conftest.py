"""Shared fixtures and cases for divkit's Python tests."""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import settings

import divkit

settings.register_profile("default", max_examples=40, deadline=None)
settings.register_profile("thorough", max_examples=1000, deadline=None)
settings.load_profile(os.environ.get("DIVKIT_HYPOTHESIS_PROFILE", "default"))

# One pytest process calls divkit with thousands of shapes: with the default host-cache limit
# (a quarter of the memory) the free gradient blocks it keeps would sit beside the suite's largest
# tests (over 12 GB at V = 128256). A small limit keeps the cache exercised at a bounded RSS;
# tests/python/test_memory.py sets its own limits.
if "DIVKIT_HOST_CACHE_LIMIT" not in os.environ:
    divkit.memory.set_cache_limit(256 << 20)

# (kind, parameters): every kind, and the parameter values where a kind changes character
# (jsd's and alpha_divergence's exact endpoints, negative and > 1 Amari alphas, ...).
CASES = [
    ("forward_kl", {}),
    ("reverse_kl", {}),
    ("jsd", {"beta": 0.5}),
    ("jsd", {"beta": 0.1}),
    ("jsd", {"beta": 0.9}),
    ("jsd", {"beta": 0.0}),
    ("jsd", {"beta": 1.0}),
    ("skew_forward_kl", {"alpha": 0.1}),
    ("skew_forward_kl", {"alpha": 0.5}),
    ("skew_reverse_kl", {"alpha": 0.1}),
    ("skew_reverse_kl", {"alpha": 0.5}),
    ("tvd", {}),
    ("hellinger", {}),
    ("jeffreys", {}),
    ("chi2", {}),
    ("alpha_divergence", {"alpha": 0.5}),
    ("alpha_divergence", {"alpha": 2.0}),
    ("alpha_divergence", {"alpha": -0.5}),
    ("alpha_divergence", {"alpha": 1.0}),
    ("alpha_divergence", {"alpha": 0.0}),
    ("renyi", {"alpha": 0.5}),
    ("renyi", {"alpha": 2.0}),
    ("renyi", {"alpha": 1.0}),
    ("cross_entropy", {}),
]
# One case per kind, for the tests that do not need every parameter value.
KIND_CASES = [
    ("forward_kl", {}),
    ("reverse_kl", {}),
    ("jsd", {"beta": 0.5}),
    ("skew_forward_kl", {"alpha": 0.1}),
    ("skew_reverse_kl", {"alpha": 0.1}),
    ("tvd", {}),
    ("hellinger", {}),
    ("jeffreys", {}),
    ("chi2", {}),
    ("alpha_divergence", {"alpha": 0.5}),
    ("renyi", {"alpha": 2.0}),
    ("cross_entropy", {}),
]


def case_id(case) -> str:
    kind, params = case
    return kind + "".join(f"-{k}={v:g}" for k, v in params.items())


def logits(*shape, scale: float = 2.0, seed: int = 0, dtype=torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype)


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item()


@pytest.fixture(autouse=True)
def _restore_runtime():
    """Tests that change the thread count or SIMD target leave the defaults behind."""
    threads = divkit.get_num_threads()
    yield
    divkit.set_num_threads(threads)
    divkit.force_simd_target("")


def test_all_kinds_have_cases():
    assert {k for k, _ in CASES} == set(divkit.KINDS)
    assert {k for k, _ in KIND_CASES} == set(divkit.KINDS)
