"""Fused token-level losses (TDPO1/TDPO2, SparsePO) and the fused exact KL: from policy hidden
states + lm_head weight, against the logits path on the materialized logits (loss, rewards and
gradients with respect to the hidden states and the weight), with the reference given as logits
or as hidden states + weight."""

from __future__ import annotations

import pytest
import torch

import divkit
from divkit import rlhf

B, T, H, HR, V = 2, 6, 8, 7, 23


def batch(seed, bias=False):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    x = {
        "hc": r(B, T, H),
        "hr": r(B, T, H),
        "w": r(V, H) * 0.5,
        "rhc": r(B, T, HR),
        "rhr": r(B, T, HR),
        "rw": r(V, HR) * 0.5,
        "b": r(V) * 0.3 if bias else None,
        "rb": r(V) * 0.3 if bias else None,
    }
    cl = torch.randint(0, V, (B, T), generator=g)
    rl = torch.randint(0, V, (B, T), generator=g)
    cl[:, :2] = -100  # prompt
    rl[:, :1] = -100
    rl[1, -2:] = -100  # padding
    x["cl"], x["rl"] = cl, rl
    return x


def logits(h, w, b):
    z = h @ w.t()
    return z if b is None else z + b


def leaves(x):
    out = {k: x[k].clone().requires_grad_() for k in ("hc", "hr", "w")}
    if x["b"] is not None:
        out["b"] = x["b"].clone().requires_grad_()
    return out


@pytest.mark.parametrize("ref_mode", ["logits", "hidden"])
@pytest.mark.parametrize("variant", ["tdpo1", "tdpo2"])
@pytest.mark.parametrize("bias", [False, True])
def test_tdpo_fused_equals_logits_path(ref_mode, variant, bias):
    x = batch(10 + bias, bias)
    # the materialized reference computation
    p = leaves(x)
    rcl, rrl = logits(x["rhc"], x["rw"], x["rb"]), logits(x["rhr"], x["rw"], x["rb"])
    want = divkit.tdpo_loss(
        logits(p["hc"], p["w"], p.get("b")),
        logits(p["hr"], p["w"], p.get("b")),
        rcl,
        rrl,
        x["cl"],
        x["rl"],
        beta=0.4,
        alpha=0.6,
        variant=variant,
    )
    gw = torch.autograd.grad(want[0].sum(), list(p.values()))
    # fused
    q = leaves(x)
    ref = (
        dict(ref_chosen_logits=rcl, ref_rejected_logits=rrl)
        if ref_mode == "logits"
        else dict(
            ref_chosen_hidden=x["rhc"],
            ref_rejected_hidden=x["rhr"],
            ref_weight=x["rw"],
            ref_bias=x["rb"],
        )
    )
    got = divkit.tdpo_loss_fused(
        q["hc"],
        q["hr"],
        q["w"],
        x["cl"],
        x["rl"],
        lm_head_bias=q.get("b"),
        beta=0.4,
        alpha=0.6,
        variant=variant,
        chunk_size=5,
        **ref,
    )
    gg = torch.autograd.grad(got[0].sum(), list(q.values()))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    for a, b in zip(gg, gw):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    # prompt positions get no gradient
    assert gg[0][x["cl"] == -100].abs().max() == 0


def test_tdpo2_fused_stop_gradient():
    # tdpo2's chosen side has no gradient from its KL: the chosen hidden-state gradient is
    # c_b * grad(sum of the chosen log-ratios) with c_b = -beta sigma(-beta logits_b)
    x = batch(3)
    hc = x["hc"].clone().requires_grad_()
    rcl, rrl = logits(x["rhc"], x["rw"], None), logits(x["rhr"], x["rw"], None)
    losses, _, _ = divkit.tdpo_loss_fused(
        hc,
        x["hr"],
        x["w"],
        x["cl"],
        x["rl"],
        ref_chosen_logits=rcl,
        ref_rejected_logits=rrl,
        beta=0.5,
    )
    (g,) = torch.autograd.grad(losses.sum(), hc)
    lp = divkit.fused_linear_logprobs(hc, x["w"], x["cl"]).sum(-1)
    (gr,) = torch.autograd.grad(lp.sum(), hc)
    c = -0.5 * (1 - torch.exp(-losses.detach()))
    torch.testing.assert_close(g, c[:, None, None] * gr, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("ref_mode", ["logits", "hidden"])
def test_sparsepo_fused_equals_logits_path(ref_mode):
    x = batch(20)
    g = torch.Generator().manual_seed(2)
    masks = [torch.rand(B, T, generator=g) for _ in range(4)]
    kw = dict(beta=0.3, l1_reward=0.01, l1_kl=0.02)
    runs = []
    for fused in (False, True):
        p = leaves(x)
        m = [mm.clone().requires_grad_() for mm in masks]
        mk = dict(
            chosen_reward_mask=m[0],
            rejected_reward_mask=m[1],
            chosen_kl_mask=m[2],
            rejected_kl_mask=m[3],
        )
        rcl, rrl = logits(x["rhc"], x["rw"], None), logits(x["rhr"], x["rw"], None)
        if fused:
            ref = (
                dict(ref_chosen_logits=rcl, ref_rejected_logits=rrl)
                if ref_mode == "logits"
                else dict(
                    ref_chosen_hidden=x["rhc"], ref_rejected_hidden=x["rhr"], ref_weight=x["rw"]
                )
            )
            out = divkit.sparsepo_loss_fused(
                p["hc"], p["hr"], p["w"], x["cl"], x["rl"], **ref, **mk, **kw
            )
        else:
            out = divkit.sparsepo_loss(
                logits(p["hc"], p["w"], None),
                logits(p["hr"], p["w"], None),
                rcl,
                rrl,
                x["cl"],
                x["rl"],
                **mk,
                **kw,
            )
        grads = torch.autograd.grad(out[0].sum(), list(p.values()) + m)
        runs.append((out, grads))
    (o1, g1), (o2, g2) = runs
    for a, b in zip(o2, o1):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    for a, b in zip(g2, g1):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("direction", ["policy_ref", "ref_policy"])
@pytest.mark.parametrize("ref_mode", ["logits", "hidden"])
def test_exact_kl_fused_equals_exact_kl(direction, ref_mode):
    x = batch(30, bias=True)
    p = leaves(x)
    rz = logits(x["rhc"], x["rw"], x["rb"])
    want = rlhf.exact_kl(
        logits(p["hc"], p["w"], p["b"]), rz, labels=x["cl"], direction=direction, temperature=1.5
    )
    gw = torch.autograd.grad(want.sum(), [p["hc"], p["w"], p["b"]])
    q = leaves(x)
    ref = (
        dict(ref_logits=rz)
        if ref_mode == "logits"
        else dict(ref_hidden=x["rhc"], ref_weight=x["rw"], ref_bias=x["rb"])
    )
    got = rlhf.exact_kl_fused(
        q["hc"],
        q["w"],
        lm_head_bias=q["b"],
        labels=x["cl"],
        direction=direction,
        temperature=1.5,
        chunk_size=4,
        **ref,
    )
    gg = torch.autograd.grad(got.sum(), [q["hc"], q["w"], q["b"]])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert (got[x["cl"] == -100] == 0).all() and (got[x["cl"] != -100] > 0).all()
    for a, b in zip(gg, gw):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_fused_bad_input():
    x = batch(40)
    rcl, rrl = logits(x["rhc"], x["rw"], None), logits(x["rhr"], x["rw"], None)
    with pytest.raises(ValueError, match="either ref_chosen_logits or ref_chosen_hidden"):
        divkit.tdpo_loss_fused(x["hc"], x["hr"], x["w"], x["cl"], x["rl"])
    with pytest.raises(ValueError, match="lm_head_weight"):
        divkit.tdpo_loss_fused(
            x["hc"],
            x["hr"],
            x["rw"],
            x["cl"],
            x["rl"],
            ref_chosen_logits=rcl,
            ref_rejected_logits=rrl,
        )
    with pytest.raises(ValueError, match="batch sizes disagree"):
        divkit.tdpo_loss_fused(
            x["hc"],
            x["hr"][:1],
            x["w"],
            x["cl"],
            x["rl"],
            ref_chosen_logits=rcl,
            ref_rejected_logits=rrl,
        )
    with pytest.raises(ValueError, match="ref_chosen_logits must have shape"):
        divkit.sparsepo_loss_fused(
            x["hc"],
            x["hr"],
            x["w"],
            x["cl"],
            x["rl"],
            ref_chosen_logits=rcl[..., :-1],
            ref_rejected_logits=rrl,
        )
    with pytest.raises(ValueError, match="beta"):
        divkit.tdpo_loss_fused(
            x["hc"],
            x["hr"],
            x["w"],
            x["cl"],
            x["rl"],
            beta=0.0,
            ref_chosen_logits=rcl,
            ref_rejected_logits=rrl,
        )
    with pytest.raises(ValueError, match="direction"):
        rlhf.exact_kl_fused(x["hc"], x["w"], ref_logits=rcl, direction="forward")
    with pytest.raises(ValueError, match="chunk_size"):
        rlhf.exact_kl_fused(x["hc"], x["w"], ref_logits=rcl, chunk_size=0)


# ---------------------------------------------------------------------------------------------
# The one-pass engine (reference hidden states): against a float64 materialized computation.
# ---------------------------------------------------------------------------------------------


def tdpo_fp64(x, p, variant, beta, alpha):
    """TDPO written out in float64 from the materialized logits (independent of divkit)."""

    def side(h, labels, rh, kl_grad):
        z = logits(h.double(), p["w"].double(), None if p.get("b") is None else p["b"].double())
        zr = logits(rh.double(), x["rw"].double(), None if x["rb"] is None else x["rb"].double())
        lq, lr = torch.log_softmax(z, -1), torch.log_softmax(zr, -1)
        mask = labels != -100
        y = labels.clamp(min=0)[..., None]
        lratio = ((lq.gather(-1, y) - lr.gather(-1, y))[..., 0] * mask).sum(-1)
        lq_kl = lq if kl_grad else lq.detach()
        kl = ((lr.exp() * (lr - lq_kl)).sum(-1) * mask).sum(-1)
        return lratio, kl

    lw, kw = side(p["hc"], x["cl"], x["rhc"], variant == "tdpo1")
    ll, kr = side(p["hr"], x["rl"], x["rhr"], True)
    a = 1.0 if variant == "tdpo1" else alpha
    return -torch.nn.functional.logsigmoid(beta * ((lw + a * kw) - (ll + a * kr)))


def fused_call(x, q, variant, **kw):
    return divkit.tdpo_loss_fused(
        q["hc"],
        q["hr"],
        q["w"],
        x["cl"],
        x["rl"],
        lm_head_bias=q.get("b"),
        ref_chosen_hidden=x["rhc"],
        ref_rejected_hidden=x["rhr"],
        ref_weight=x["rw"],
        ref_bias=x["rb"],
        beta=0.4,
        alpha=0.6,
        variant=variant,
        **kw,
    )


@pytest.mark.parametrize("variant", ["tdpo1", "tdpo2"])
@pytest.mark.parametrize("keep_bytes", [0, 4 * V * 5, None])  # none, the first chunk, all
@pytest.mark.parametrize("chunk_size", [1, 5, None])
def test_tdpo_one_pass_against_fp64(variant, keep_bytes, chunk_size):
    x = batch(50, bias=True)
    p = {k: v.double().detach().requires_grad_() for k, v in leaves(x).items()}
    want = tdpo_fp64(x, p, variant, 0.4, 0.6)
    # a non-uniform upstream gradient: each pair's loss weighted differently
    up = torch.tensor([0.7, -1.3], dtype=torch.float64)
    gw = torch.autograd.grad((want * up).sum(), list(p.values()))
    q = leaves(x)
    got = fused_call(x, q, variant, chunk_size=chunk_size, keep_bytes=keep_bytes)[0]
    gg = torch.autograd.grad((got * up.float()).sum(), list(q.values()))
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
    for a, b in zip(gg, gw):
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-6)


def test_token_terms_one_pass_any_upstream():
    # log-ratio and KL per token with unrelated upstream gradients (not TDPO's proportional ones)
    x = batch(51, bias=True)
    h = x["hc"].double().requires_grad_()
    w = x["w"].double().requires_grad_()
    b = x["b"].double().requires_grad_()
    z = logits(h, w, b)
    zr = logits(x["rhc"].double(), x["rw"].double(), x["rb"].double())
    lq, lr = torch.log_softmax(z, -1), torch.log_softmax(zr, -1)
    mask = x["cl"] != -100
    y = x["cl"].clamp(min=0)[..., None]
    lratio = (lq.gather(-1, y) - lr.gather(-1, y))[..., 0] * mask
    kl = (lr.exp() * (lr - lq)).sum(-1) * mask
    g = torch.Generator().manual_seed(5)
    u1, u2 = torch.randn(B, T, generator=g), torch.randn(B, T, generator=g)
    gw = torch.autograd.grad((lratio * u1).sum() + (kl * u2).sum(), [h, w, b])
    hf, wf, bf = (t.detach().float().requires_grad_() for t in (h, w, b))
    got_lr, got_kl, got_m = divkit.preference.token_logratio_and_kl(
        None,
        None,
        x["cl"],
        policy_hidden=hf,
        lm_head_weight=wf,
        lm_head_bias=bf,
        ref_hidden=x["rhc"],
        ref_weight=x["rw"],
        ref_bias=x["rb"],
        chunk_size=4,
        keep_bytes=4 * V * 8 * 2,
    )
    gg = torch.autograd.grad((got_lr * u1).sum() + (got_kl * u2).sum(), [hf, wf, bf])
    torch.testing.assert_close(got_lr.double(), lratio, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got_kl.double(), kl, rtol=1e-5, atol=1e-6)
    assert torch.equal(got_m, mask)
    for a, b_ in zip(gg, gw):
        torch.testing.assert_close(a.double(), b_, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("keep_bytes", [0, None])
def test_tdpo_one_pass_bitwise_any_thread_count(keep_bytes):
    x = batch(52, bias=True)
    outs = []
    before = divkit.get_num_threads()
    try:
        for threads in (1, 2, 3):
            divkit.set_num_threads(threads)
            q = leaves(x)
            got = fused_call(x, q, "tdpo2", chunk_size=3, keep_bytes=keep_bytes)
            outs.append([got[0], *torch.autograd.grad(got[0].sum(), list(q.values()))])
    finally:
        divkit.set_num_threads(before)
    for other in outs[1:]:
        for a, b in zip(outs[0], other):
            assert torch.equal(a, b)


@pytest.mark.parametrize("variant", ["tdpo1", "tdpo2"])
def test_tdpo_grads_in_forward_match_recompute(variant):
    # keep_bytes=0: the per-token path (every chunk recomputed by the backward); a budget that
    # holds one pair (or all): the gradients computed in the forward from the kept logits, pair
    # group by pair group; an upstream gradient that differs between pairs: the fallback.
    x = batch(53, bias=True)
    res = []
    for keep, up in ((0, None), (4 * V * T * 4, None), (1 << 20, None), (1 << 20, [0.3, 2.0])):
        q = leaves(x)
        got = fused_call(x, q, variant, chunk_size=2, keep_bytes=keep)
        w = torch.ones(B) if up is None else torch.tensor(up)
        res.append([*got, *torch.autograd.grad((got[0] * w).sum(), list(q.values()))])
        if up is not None:  # against the per-token path with the same weights
            q = leaves(x)
            ref = fused_call(x, q, variant, chunk_size=2, keep_bytes=0)
            want = torch.autograd.grad((ref[0] * w).sum(), list(q.values()))
            for a, b in zip(res[-1][3:], want):
                torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    for other in res[1:3]:
        for a, b in zip(res[0], other):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_tdpo_one_pass_bad_input():
    x = batch(54)
    q = leaves(x)
    with pytest.raises(ValueError, match="tdpo_loss_fused.*keep_bytes"):
        fused_call(x, q, "tdpo2", keep_bytes=-1)
    bad = x["cl"].clone()
    bad[0, 3] = V
    with pytest.raises(ValueError, match="tdpo_loss_fused.*chosen_labels"):
        divkit.tdpo_loss_fused(
            q["hc"],
            q["hr"],
            q["w"],
            bad,
            x["rl"],
            ref_chosen_hidden=x["rhc"],
            ref_rejected_hidden=x["rhr"],
            ref_weight=x["rw"],
        )
    h = q["hc"].detach().clone()
    h[1, 4, 0] = float("nan")
    with pytest.raises(ValueError, match="tdpo_loss_fused"):
        divkit.tdpo_loss_fused(
            h,
            q["hr"],
            q["w"],
            x["cl"],
            x["rl"],
            ref_chosen_hidden=x["rhc"],
            ref_rejected_hidden=x["rhr"],
            ref_weight=x["rw"],
        )


# ---------------------------------------------------------------------------------------------
# SparsePO on the pair engine (gradients in the forward): against the materialized
# sparsepo_loss in float64, masks with and without gradient, both engines.
# ---------------------------------------------------------------------------------------------

SP = dict(beta=0.3, l1_reward=0.05, l1_kl=0.02)
MASKS = ("chosen_reward_mask", "rejected_reward_mask", "chosen_kl_mask", "rejected_kl_mask")


def sp_masks(seed, kind):
    if kind == "none":
        return [None] * 4
    g = torch.Generator().manual_seed(seed)
    # values of both signs (the L1 term's |m|), away from 0
    ms = [torch.rand(B, T, generator=g) * 1.5 + 0.05 for _ in range(4)]
    ms[1][0, 3] = -0.4
    return [m.requires_grad_(kind == "grad") for m in ms]


def sp_fp64(x, p, masks, up):
    """divkit.sparsepo_loss on float64 logits materialized from float64 copies of the inputs:
    (losses, rewards..., gradients of (losses * up).sum() w.r.t. p's tensors and the masks)."""
    q = {k: v.detach().double().requires_grad_() for k, v in p.items()}
    ms = [None if m is None else m.detach().double().requires_grad_(m.requires_grad) for m in masks]
    b = q.get("b")
    rb = None if x["rb"] is None else x["rb"].double()
    out = divkit.sparsepo_loss(
        logits(q["hc"], q["w"], b),
        logits(q["hr"], q["w"], b),
        logits(x["rhc"].double(), x["rw"].double(), rb),
        logits(x["rhr"].double(), x["rw"].double(), rb),
        x["cl"],
        x["rl"],
        **dict(zip(MASKS, ms)),
        **SP,
    )
    wrt = list(q.values()) + [m for m in ms if m is not None and m.requires_grad]
    return out, torch.autograd.grad((out[0] * up).sum(), wrt)


def sp_call(x, p, masks, **kw):
    return divkit.sparsepo_loss_fused(
        p["hc"],
        p["hr"],
        p["w"],
        x["cl"],
        x["rl"],
        lm_head_bias=p.get("b"),
        ref_chosen_hidden=x["rhc"],
        ref_rejected_hidden=x["rhr"],
        ref_weight=x["rw"],
        ref_bias=x["rb"],
        **dict(zip(MASKS, masks)),
        **SP,
        **kw,
    )


def sp_fused(x, p, masks, up, **kw):
    out = sp_call(x, p, masks, **kw)
    wrt = list(p.values()) + [m for m in masks if m is not None and m.requires_grad]
    return out, torch.autograd.grad((out[0] * up).sum(), wrt)


@pytest.mark.parametrize("backend", ["core", "torch"])
@pytest.mark.parametrize("masks", ["none", "const", "grad"])
@pytest.mark.parametrize("keep_bytes", [None, 16 * V * T, 0])  # all pairs, one pair, none
@pytest.mark.parametrize("upstream", ["uniform", "per_pair"])
def test_sparsepo_one_pass_against_fp64(backend, masks, keep_bytes, upstream):
    x = batch(60, bias=True)
    ms = sp_masks(61, masks)
    up = torch.full((B,), 0.5) if upstream == "uniform" else torch.tensor([0.7, -1.3])
    p = leaves(x)
    want, gw = sp_fp64(x, p, ms, up.double())
    got, gg = sp_fused(x, p, ms, up, chunk_size=5, keep_bytes=keep_bytes, backend=backend)
    for a, b in zip(got, want):
        torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-6)
    assert len(gg) == len(gw) == 4 + 4 * (masks == "grad")
    for a, b in zip(gg, gw):
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-6)


def test_sparsepo_one_pass_learned_masks():
    # masks from SparsePOMask (their gradient reaches the mask model through the fused loss):
    # against the materialized sparsepo_loss with the same mask model in float64
    import copy

    x = batch(62, bias=False)
    torch.manual_seed(0)
    layers = [torch.randn(B, T, 5) for _ in range(2)]
    model = divkit.preference.SparsePOMask(5, 2, dropout=0.0)
    with torch.no_grad():  # masks mostly above the final ReLU's kink
        for head in model.heads:
            head["mix"].bias.fill_(0.5)
    model64 = copy.deepcopy(model).double()
    p = leaves(x)
    mr, mk = model(layers)
    out = divkit.sparsepo_loss_fused(
        p["hc"],
        p["hr"],
        p["w"],
        x["cl"],
        x["rl"],
        ref_chosen_hidden=x["rhc"],
        ref_rejected_hidden=x["rhr"],
        ref_weight=x["rw"],
        chosen_reward_mask=mr,
        rejected_reward_mask=mr,
        chosen_kl_mask=mk,
        rejected_kl_mask=mk,
        chunk_size=4,
        **SP,
    )
    params = list(model.parameters())
    gg = torch.autograd.grad(out[0].mean(), list(p.values()) + params)
    q = {k: v.detach().double().requires_grad_() for k, v in p.items()}
    mr64, mk64 = model64([h.double() for h in layers])
    want = divkit.sparsepo_loss(
        logits(q["hc"], q["w"], None),
        logits(q["hr"], q["w"], None),
        logits(x["rhc"].double(), x["rw"].double(), None),
        logits(x["rhr"].double(), x["rw"].double(), None),
        x["cl"],
        x["rl"],
        chosen_reward_mask=mr64,
        rejected_reward_mask=mr64,
        chosen_kl_mask=mk64,
        rejected_kl_mask=mk64,
        **SP,
    )
    gw = torch.autograd.grad(want[0].mean(), list(q.values()) + list(model64.parameters()))
    torch.testing.assert_close(out[0].double(), want[0], rtol=1e-5, atol=1e-6)
    assert any(g.abs().max() > 0 for g in gg[len(p) :])
    for a, b in zip(gg, gw):
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("fn_name", ["tdpo_loss_fused", "sparsepo_loss_fused"])
@pytest.mark.parametrize("backend", ["core", "torch"])
def test_pair_engine_is_taken_and_backward_recomputes_nothing(fn_name, backend, monkeypatch):
    """Within the budget, each chunk of logits is computed once (in the forward) and the
    backward runs no engine pass; with keep_bytes=0 (the per-side path) the backward does."""
    from divkit.backends import torch_ops
    from divkit.preference import _token_head

    x = batch(63, bias=True)
    ms = sp_masks(64, "grad") if fn_name == "sparsepo_loss_fused" else None
    engine_calls, logits_calls, applied = [], [], []
    if backend == "core":
        orig_c = _token_head._C.fused_linear_label_terms

        def spy_c(*a):
            engine_calls.append(a[8])  # the backward flag
            return orig_c(*a)

        monkeypatch.setattr(_token_head._C, "fused_linear_label_terms", spy_c)
    else:
        orig_l = torch_ops._Head.logits

        def spy_l(self, hc):
            logits_calls.append(hc.shape[0])
            return orig_l(self, hc)

        monkeypatch.setattr(torch_ops._Head, "logits", spy_l)
    orig_apply = _token_head._PairGradsInForward.apply

    def spy_apply(*a):
        applied.append(1)
        return orig_apply(*a)

    monkeypatch.setattr(_token_head._PairGradsInForward, "apply", spy_apply)
    chunk = 4  # T = 6 tokens per side per pair: chunks of 4 and 2 for a one-pair group
    for keep in (16 * V * T, 0):
        p = leaves(x)
        kw = dict(chunk_size=chunk, keep_bytes=keep, backend=backend)
        if fn_name == "sparsepo_loss_fused":
            out = sp_call(x, p, ms, **kw)[0]
        else:
            out = fused_call(x, p, "tdpo1", **kw)[0]
        n_fwd = (len(engine_calls), len(logits_calls))
        loss = out.mean()
        loss.backward()
        n_bwd = (len(engine_calls) - n_fwd[0], len(logits_calls) - n_fwd[1])
        if keep:
            assert applied == [1]
            assert n_bwd == (0, 0)
            if backend == "core":  # per pair group (one pair): forward and gradient pass per side
                assert engine_calls == [False, False, True, True] * B
            else:  # both heads' logits, per chunk, per side, once
                assert logits_calls == [4, 4, 2, 2] * 2 * B
        else:
            assert applied == [1]  # not called again
            assert n_bwd[0] > 0 or n_bwd[1] > 0
        engine_calls.clear(), logits_calls.clear()


def test_sparsepo_one_pass_bad_input():
    x = batch(65)
    p = leaves(x)
    ms = sp_masks(66, "grad")
    with pytest.raises(divkit.Error, match="sparsepo_loss_fused.*keep_bytes"):
        sp_fused(x, p, ms, torch.ones(B), keep_bytes=-1)
    with pytest.raises(divkit.Error, match="sparsepo_loss_fused.*keep_bytes"):
        sp_fused(x, p, ms, torch.ones(B), keep_bytes=1.5)
    with pytest.raises(divkit.Error, match="sparsepo_loss_fused.*chunk_size"):
        sp_fused(x, p, ms, torch.ones(B), chunk_size=0)
    with pytest.raises(divkit.Error, match="sparsepo_loss_fused.*backend"):
        sp_fused(x, p, ms, torch.ones(B), backend="gpu")
    # a mask with another batch size, which slicing by pair would not notice
    bad = [ms[0], ms[1], torch.ones(B + 1, T), ms[3]]
    with pytest.raises(divkit.Error, match=r"sparsepo_loss_fused.*chosen_kl_mask.*\(2, 6\)"):
        sp_fused(x, p, bad, torch.ones(B))
    bad = [ms[0], [[1.0] * T] * B, ms[2], ms[3]]
    with pytest.raises(divkit.Error, match="sparsepo_loss_fused.*rejected_reward_mask"):
        sp_fused(x, p, bad, torch.ones(B))
    lab = x["rl"].clone()
    lab[1, 2] = V
    with pytest.raises(divkit.Error, match="sparsepo_loss_fused.*rejected_labels"):
        sp_fused(dict(x, rl=lab), p, ms, torch.ones(B))
    with pytest.raises(divkit.Error, match="sparsepo_loss_fused.*beta"):
        divkit.sparsepo_loss_fused(
            p["hc"],
            p["hr"],
            p["w"],
            x["cl"],
            x["rl"],
            ref_chosen_hidden=x["rhc"],
            ref_rejected_hidden=x["rhr"],
            ref_weight=x["rw"],
            beta=-1.0,
        )


@pytest.mark.parametrize("backend", ["core", "torch"])
def test_sparsepo_one_pass_partial_last_group(backend):
    # 5 pairs in groups of 2 (2, 2, 1): the masks and the rows sliced by pair group
    g = torch.Generator().manual_seed(67)
    bsz, t, h, v = 5, 4, 6, 11
    x = {
        "hc": torch.randn(bsz, t, h, generator=g),
        "hr": torch.randn(bsz, t, h, generator=g),
        "w": torch.randn(v, h, generator=g) * 0.5,
        "b": None,
        "rhc": torch.randn(bsz, t, h, generator=g),
        "rhr": torch.randn(bsz, t, h, generator=g),
        "rw": torch.randn(v, h, generator=g) * 0.5,
        "rb": None,
        "cl": torch.randint(0, v, (bsz, t), generator=g),
        "rl": torch.randint(0, v, (bsz, t), generator=g),
    }
    x["cl"][:, 0] = -100
    x["rl"][3, 2:] = -100
    ms = [(torch.rand(bsz, t, generator=g) + 0.1).requires_grad_() for _ in range(4)]
    p = leaves(x)
    up = torch.full((bsz,), 1.0 / bsz)
    want, gw = sp_fp64(x, p, ms, up.double())
    got, gg = sp_fused(x, p, ms, up, chunk_size=3, keep_bytes=2 * 16 * v * t, backend=backend)
    for a, b in zip(got, want):
        torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-6)
    for a, b in zip(gg, gw):
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("fn_name", ["tdpo_loss_fused", "sparsepo_loss_fused"])
@pytest.mark.parametrize("rejected_len", [T, T - 2])  # one length: the pair engine; else per side
@pytest.mark.parametrize("keep_bytes", [None, 0])
@pytest.mark.parametrize("backend", ["core", "torch"])
def test_fused_pair_every_input_reaches_its_place(fn_name, rejected_len, keep_bytes, backend):
    # Each argument of the fused pair losses travels (in one PairInputs) through both the pair
    # engine and the per-side path: with a non-default ignore_index, a reference bias unlike the
    # policy's, sides of different lengths and a sequence-level combine that is not symmetric in
    # chosen and rejected, any argument mixed up on either path moves the result away from the
    # float64 materialized loss.
    g = torch.Generator().manual_seed(70)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    tr = rejected_len
    x = {
        "hc": r(B, T, H),
        "hr": r(B, tr, H),
        "w": r(V, H) * 0.5,
        "rhc": r(B, T, HR),
        "rhr": r(B, tr, HR),
        "rw": r(V, HR) * 0.5,
        "b": r(V) * 0.3,
        "rb": r(V) * 0.9 + 1.0,
        "cl": torch.randint(0, V, (B, T), generator=g),
        "rl": torch.randint(0, V, (B, tr), generator=g),
    }
    x["cl"][:, :2] = -7
    x["rl"][:, :1] = -7
    x["rl"][1, -1] = -7  # padding
    masks = [torch.rand(B, t, generator=g) + 0.1 for t in (T, tr, T, tr)]
    if fn_name == "tdpo_loss_fused":
        kw = dict(beta=0.4, alpha=0.6, variant="tdpo1", label_smoothing=0.1)
    else:
        kw = dict(SP, **dict(zip(MASKS, masks)))
    p = leaves(x)
    q = {k: v.detach().double().requires_grad_() for k, v in p.items()}
    want = getattr(divkit, fn_name.removesuffix("_fused"))(
        logits(q["hc"], q["w"], q["b"]),
        logits(q["hr"], q["w"], q["b"]),
        logits(x["rhc"].double(), x["rw"].double(), x["rb"].double()),
        logits(x["rhr"].double(), x["rw"].double(), x["rb"].double()),
        x["cl"],
        x["rl"],
        ignore_index=-7,
        **kw,
    )
    gw = torch.autograd.grad(want[0].sum(), list(q.values()))
    got = getattr(divkit, fn_name)(
        p["hc"],
        p["hr"],
        p["w"],
        x["cl"],
        x["rl"],
        lm_head_bias=p["b"],
        ref_chosen_hidden=x["rhc"],
        ref_rejected_hidden=x["rhr"],
        ref_weight=x["rw"],
        ref_bias=x["rb"],
        ignore_index=-7,
        chunk_size=3,
        keep_bytes=keep_bytes,
        backend=backend,
        **kw,
    )
    gg = torch.autograd.grad(got[0].sum(), list(p.values()))
    for a, b in zip(got, want):
        torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-6)
    for a, b in zip(gg, gw):
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("lengths", [(0, 0), (0, 3)])
@pytest.mark.parametrize("ref_mode", ["logits", "hidden"])
@pytest.mark.parametrize("name", ["tdpo_loss", "sparsepo_loss"])
def test_fused_empty_sequences_equal_logits_path(name, ref_mode, lengths):
    # Sequences of no tokens (T = 0) on one side or both: the logits path gives the loss of zero
    # log-ratios and KLs; the fused paths used to fail (an empty torch.cat, a division by the
    # bytes of a pair's logits, 0).
    x = batch(14)
    tc, tr = lengths
    x["hc"], x["rhc"], x["cl"] = x["hc"][:, :tc], x["rhc"][:, :tc], x["cl"][:, :tc]
    x["hr"], x["rhr"], x["rl"] = x["hr"][:, :tr], x["rhr"][:, :tr], x["rl"][:, :tr]
    p = leaves(x)
    if ref_mode == "logits":
        ref = dict(
            ref_chosen_logits=logits(x["rhc"], x["rw"], None),
            ref_rejected_logits=logits(x["rhr"], x["rw"], None),
        )
    else:
        ref = dict(ref_chosen_hidden=x["rhc"], ref_rejected_hidden=x["rhr"], ref_weight=x["rw"])
    got = getattr(divkit, name + "_fused")(p["hc"], p["hr"], p["w"], x["cl"], x["rl"], **ref)
    q = leaves(x)
    want = getattr(divkit, name)(
        logits(q["hc"], q["w"], None),
        logits(q["hr"], q["w"], None),
        logits(x["rhc"], x["rw"], None),
        logits(x["rhr"], x["rw"], None),
        x["cl"],
        x["rl"],
    )
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    got[0].sum().backward()
    want[0].sum().backward()
    for k in p:
        torch.testing.assert_close(p[k].grad, q[k].grad, rtol=1e-4, atol=1e-6)
