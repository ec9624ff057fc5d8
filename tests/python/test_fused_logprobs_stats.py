"""fused_linear_logprobs' no-gradient per-token outputs log_sum_sq_probs (log sum_v p_v^2) and
is_top1 (the label is the argmax, the first maximum on ties): against an fp64 reference, the same
on the core, the PyTorch fallback and the custom-op route, against TRL's chunked head, and their
error paths."""

import pytest
import torch

import divkit


def _case(seed=0, n=(3, 10), v=53, h=16, scale=2.5):
    g = torch.Generator().manual_seed(seed)
    hid = torch.randn(*n, h, generator=g)
    w = torch.randn(v, h, generator=g) * scale / h**0.5
    b = torch.randn(v, generator=g) * 0.3
    labels = torch.randint(0, v, n, generator=g)
    z = hid.double() @ w.double().T + b.double()
    labels[:, ::3] = z.argmax(-1)[:, ::3]  # a third top-1
    labels[0, 1] = labels[2, 4] = -100
    return hid, w, b, labels, z


def _reference(z, labels, temperature):
    zt = z / temperature
    valid = labels != -100
    sq = torch.logsumexp(2 * zt, -1) - 2 * torch.logsumexp(zt, -1)
    return torch.where(valid, sq, 0.0), valid & (zt.argmax(-1) == labels)


@pytest.mark.parametrize("route", ["core", "torch", "op"])
@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_log_sum_sq_and_top1_match_fp64(route, temperature, monkeypatch):
    from divkit import _ops

    hid, w, b, labels, z = _case()
    if route == "op":
        monkeypatch.setattr(_ops, "ALWAYS", True)
    backend = "torch" if route == "torch" else "auto"
    xs = [x.clone().requires_grad_(True) for x in (hid, w, b)]
    res = divkit.fused_linear_logprobs(
        *xs[:2],
        labels,
        xs[2],
        temperature=temperature,
        return_entropy=True,
        chunk_size=4,
        backend=backend,
        return_log_sum_sq_probs=True,
        return_is_top1=True,
    )
    want_sq, want_top1 = _reference(z, labels, temperature)
    assert (
        res.log_sum_sq_probs.shape == labels.shape and res.log_sum_sq_probs.dtype == torch.float32
    )
    torch.testing.assert_close(res.log_sum_sq_probs.double(), want_sq, rtol=2e-5, atol=1e-6)
    assert res.is_top1.dtype == torch.bool and torch.equal(res.is_top1, want_top1)
    assert 0 < int(want_top1.sum()) < int((labels != -100).sum())
    assert res.topk_mass is None
    assert not res.log_sum_sq_probs.requires_grad and not res.is_top1.requires_grad
    # The extra outputs change neither the log-probs nor the entropy nor their gradients.
    plain = divkit.fused_linear_logprobs(
        hid, w, labels, b, temperature=temperature, return_entropy=True, chunk_size=4,
        backend=backend,
    )  # fmt: skip
    assert torch.equal(res.logprobs.detach(), plain.logprobs)
    assert torch.equal(res.entropy.detach(), plain.entropy)
    (res.logprobs.sum() + res.entropy.sum()).backward()
    ys = [x.clone().requires_grad_(True) for x in (hid, w, b)]
    again = divkit.fused_linear_logprobs(
        *ys[:2], labels, ys[2], temperature=temperature, return_entropy=True, chunk_size=4,
        backend=backend,
    )  # fmt: skip
    (again.logprobs.sum() + again.entropy.sum()).backward()
    for x, y in zip(xs, ys):
        assert torch.equal(x.grad, y.grad)


def test_each_extra_output_alone_and_bf16_inputs():
    hid, w, b, labels, z = _case(seed=1)
    want_sq, want_top1 = _reference(z, labels, 1.0)
    r = divkit.fused_linear_logprobs(hid, w, labels, b, return_log_sum_sq_probs=True)
    assert r.entropy is None and r.is_top1 is None
    torch.testing.assert_close(r.log_sum_sq_probs.double(), want_sq, rtol=2e-5, atol=1e-6)
    r = divkit.fused_linear_logprobs(hid, w, labels, b, return_is_top1=True, topk=2)
    assert r.log_sum_sq_probs is None and torch.equal(r.is_top1, want_top1)
    assert r.topk_mass is not None
    # bf16 operands: the core and the fallback widen them the same way.
    hb, wb = hid.bfloat16(), w.bfloat16()
    kw = dict(return_log_sum_sq_probs=True, return_is_top1=True)
    core = divkit.fused_linear_logprobs(hb, wb, labels, **kw)
    torch_ = divkit.fused_linear_logprobs(hb, wb, labels, backend="torch", **kw)
    torch.testing.assert_close(core.log_sum_sq_probs, torch_.log_sum_sq_probs, rtol=1e-5, atol=1e-6)
    assert torch.equal(core.is_top1, torch_.is_top1)


@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_top1_ties_go_to_the_first_maximum_as_torch_argmax_and_trl(backend):
    """Exact ties (duplicated weight rows): a label tied with an earlier index is not top-1,
    as torch.argmax and TRL's ChunkedLogProbFunction say; log sum p^2 equals TRL's too. The
    entries are small integers and quarters, so every logit is exact whatever the GEMM's order
    of summation (otherwise the BLAS kernel of each column may break the ties its own way)."""
    from trl.kernels.chunked_logprob import ChunkedLogProbFunction

    g = torch.Generator().manual_seed(5)
    n, v, h = 12, 37, 8
    hid = torch.randint(-3, 4, (n, h), generator=g).float()
    w = torch.randint(-3, 4, (v, h), generator=g).float() * 0.25
    w[[3, 20, 36]] = torch.round(hid.mean(0) * 4.0)  # tied maxima at 3 (first), 20, 36
    z = hid @ w.T
    assert (z.argmax(-1) == 3).sum() >= 6
    labels = torch.tensor([3, 20, 36, 5, -100, 3, 36, 20, 3, 0, 1, 2])
    res = divkit.fused_linear_logprobs(
        hid, w, labels, backend=backend, return_log_sum_sq_probs=True, return_is_top1=True
    )
    valid = labels != -100
    want = valid & (z.argmax(-1) == labels)
    assert torch.equal(res.is_top1, want)
    twins = (labels == 20) | (labels == 36)
    assert (z[twins, 3] == z[twins].max(-1).values).sum() >= 2  # tied with the first maximum
    assert not res.is_top1[twins].any()
    outs = ("log_sum_sq_probs", "is_top1")
    _, _, sq, _, top1 = ChunkedLogProbFunction.apply(
        hid, w, None, labels.clamp(min=0), 1.0, 16, None, 1.0, outs
    )
    assert torch.equal(res.is_top1, top1 & valid)
    torch.testing.assert_close(
        res.log_sum_sq_probs, torch.where(valid, sq, 0.0), rtol=1e-5, atol=1e-6
    )


def test_extra_outputs_errors():
    hid, w, b, labels, _ = _case()
    with pytest.raises(divkit.Error, match="fused_linear_logprobs: return_is_top1"):
        divkit.fused_linear_logprobs(hid, w, labels, return_is_top1="yes")
    with pytest.raises(divkit.Error, match="fused_linear_logprobs: return_log_sum_sq_probs"):
        divkit.fused_linear_logprobs(hid, w, labels, return_log_sum_sq_probs=1)
    with pytest.raises(divkit.Error, match="not supported with process_group"):
        divkit.fused_linear_logprobs(
            hid, w, labels, return_log_sum_sq_probs=True, process_group=object()
        )
    # The binding: an output of the wrong dtype or length names it.
    from divkit import _C

    h2, lab = hid.reshape(-1, hid.shape[-1]), labels.reshape(-1)
    n = lab.numel()
    opts = _C.FusedLinearOptions()
    for more, name in (
        ((torch.empty(n, dtype=torch.bfloat16), None), "log_sum_sq_probs"),
        ((None, torch.empty(n - 1, dtype=torch.int32)), "is_top1"),
    ):
        with pytest.raises(divkit.Error, match=f"fused_linear_logprobs: .*{name}"):
            _C.fused_linear_logprobs(
                (h2, w, None), lab, opts, (torch.empty(n), None, None, None), more
            )


def test_custom_op_with_the_extra_outputs_opchecks_and_compiles_fullgraph():
    """The op's schema with the two trailing flags: opcheck (fake kernel, autograd registration)
    and torch.compile(fullgraph=True) equal to eager, bit for bit."""
    from divkit import _ops

    if not _ops.ENABLED:
        pytest.skip("custom ops not registered")
    hid, w, b, labels, _ = _case(seed=2)
    h2, lab = hid.reshape(-1, hid.shape[-1]), labels.reshape(-1)
    args = (h2.requires_grad_(True), w, b, lab, 0.8, -100, True, 0, 4, "auto", True, True)
    torch.library.opcheck(_ops.fused_logprobs_op, args)

    def f(h, w):
        r = divkit.fused_linear_logprobs(
            h, w, labels, b, temperature=0.8, return_entropy=True,
            return_log_sum_sq_probs=True, return_is_top1=True,
        )  # fmt: skip
        return r.logprobs.sum() + r.entropy.sum(), r.log_sum_sq_probs, r.is_top1

    eager = f(hid, w)
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")(hid, w)
    for x, y in zip(compiled, eager):
        assert torch.equal(x, y)
