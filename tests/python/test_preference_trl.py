"""divkit's preference losses against TRL's own code (trl 1.16, installed for real).

TRL 1.16 has no free dpo_loss function: the DPO math lives in DPOTrainer._compute_loss, which
runs the model through TRL's fused LM head. The test runs that method unmodified on a tiny real
transformers model (LlamaForCausalLM, TRL's add_fused_lm_head), with a plain namespace holding
the trainer attributes the method reads (beta, loss_types, ...) in place of a full trainer
(which would need a tokenizer and a dataset, and computes nothing more). divkit gets sequence
log-probs computed from the same model's logits, and the test compares the loss, TRL's logged
reward metrics, and the gradients with respect to every model parameter. CPO and ORPO expose
their loss math as methods (cpo_loss, odds_ratio_loss), called unbound the same way; KTO runs
KTOTrainer._compute_loss like DPO.
"""

from __future__ import annotations

import collections
import types

import pytest
import torch

import divkit

transformers = pytest.importorskip("transformers")
trl = pytest.importorskip("trl")
from accelerate import Accelerator  # noqa: E402
from trl.trainer.dpo_trainer import DPOTrainer  # noqa: E402
from trl.trainer.kto_trainer import KTOTrainer  # noqa: E402
from trl.trainer.utils import add_fused_lm_head  # noqa: E402

B, L, V = 3, 9, 32


def make_model(dtype):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=V,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    m = transformers.LlamaForCausalLM(cfg).to(dtype)
    add_fused_lm_head(
        m, outputs=("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1")
    )
    return m


@pytest.fixture(scope="module")
def model():
    return make_model(torch.float64)


@pytest.fixture(scope="module")
def model32():
    # TRL's alpha_divergence branch accepts fp16/bf16/fp32 only (its clamp table has no fp64).
    return make_model(torch.float32)


@pytest.fixture(scope="module")
def accelerator():
    return Accelerator(cpu=True)


def batch(seed, rows=2 * B):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (rows, L), generator=g)
    cm = torch.zeros(rows, L, dtype=torch.long)
    for i in range(rows):
        cm[i, 3 : 3 + 2 + (i * 7 + seed) % 5] = 1
    return ids, cm


def our_logps(model, ids, cm):
    """Sequence log-probs (sums over completion tokens), per-token logits and labels."""
    logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[:, :-1]
    labels = ids[:, 1:].masked_fill(cm[:, 1:] == 0, -100)
    return divkit.preference.sequence_logps(logits, labels), logits, labels


def trainer_namespace(model, accelerator, **kw):
    ns = types.SimpleNamespace(
        model=model,
        accelerator=accelerator,
        aux_loss_enabled=False,
        ld_alpha=None,
        precompute_ref_logps=True,
        ref_model=None,
        f_divergence_type="reverse_kl",
        f_alpha_divergence_coef=0.5,
        loss_types=["sigmoid"],
        loss_weights=[1.0],
        beta=0.1,
        label_smoothing=0.0,
        use_weighting=False,
        args=types.SimpleNamespace(discopop_tau=0.05, gradient_checkpointing_kwargs=None),
        _metrics={"train": collections.defaultdict(list), "eval": collections.defaultdict(list)},
        _total_train_tokens=0,
        _tp_size=1,
    )
    for k, v in kw.items():
        setattr(ns, k, v)
    return ns


def grads(model, loss):
    model.zero_grad(set_to_none=True)
    loss.backward()
    return [p.grad.detach().clone() for p in model.parameters() if p.grad is not None]


DPO_CASES = [
    (["sigmoid"], {}),
    (["hinge"], {}),
    (["ipo"], {}),
    (["exo_pair"], {"label_smoothing": 1e-3}),
    (["nca_pair"], {}),
    (["robust"], {"label_smoothing": 0.1}),
    (["bco_pair"], {}),
    (["sppo_hard"], {}),
    (["aot"], {"label_smoothing": 0.1}),
    (["aot_unpaired"], {}),
    (["apo_zero"], {}),
    (["apo_down"], {}),
    (["discopop"], {}),
    (["sigmoid_norm"], {}),
    (["sigmoid", "bco_pair", "apo_zero"], {"loss_weights": [0.6, 0.3, 1.5]}),
    (["sigmoid"], {"f_divergence_type": "forward_kl"}),
    (["sigmoid"], {"f_divergence_type": "js_divergence"}),
    (["ipo"], {"f_divergence_type": "alpha_divergence", "f_alpha_divergence_coef": 0.3}),
    (
        ["robust"],
        {
            "f_divergence_type": "alpha_divergence",
            "f_alpha_divergence_coef": 1.0,
            "label_smoothing": 0.2,
        },
    ),
    (["discopop"], {"f_divergence_type": "js_divergence"}),
    (["sigmoid"], {"use_weighting": True}),
    # (TRL 1.16 cannot backpropagate hinge with use_weighting: an in-place *= on relu output.)
    (
        ["bco_pair", "exo_pair"],
        {"use_weighting": True, "label_smoothing": 0.05, "loss_weights": [1.0, 0.5]},
    ),
    (["sigmoid"], {"beta": 2.0}),
    (["sft"], {}),
    (["sigmoid", "sft"], {"loss_weights": [1.0, 0.5]}),
    # (TRL 1.16 cannot run sft with use_weighting: an in-place *= on an expanded scalar.)
    (["sft"], {"f_divergence_type": "js_divergence"}),
]


def case_id(case):
    types_, kw = case
    return "+".join(types_) + "".join(f"-{k}={v}" for k, v in kw.items())


@pytest.mark.parametrize("case", DPO_CASES, ids=case_id)
def test_dpo_against_trl(model, model32, accelerator, case):
    loss_types, kw = case
    kw = dict(kw)
    fp32 = kw.get("f_divergence_type") == "alpha_divergence" and kw["f_alpha_divergence_coef"] != 1
    if fp32:
        model = model32
    weights = kw.pop("loss_weights", [1.0] * len(loss_types))
    ids, cm = batch(seed=len(case_id(case)))
    g = torch.Generator().manual_seed(3)
    ref = torch.randn(2 * B, generator=g, dtype=torch.float64) * 2 + 0.5
    with torch.no_grad():
        base, _, _ = our_logps(model, ids, cm)
    dtype = next(model.parameters()).dtype
    ref = (base + ref).to(dtype)  # reference log-probs near the policy's: log-ratios of a few nats
    inputs = {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "completion_mask": cm,
        "ref_chosen_logps": ref[:B],
        "ref_rejected_logps": ref[B:],
    }
    ns = trainer_namespace(model, accelerator, loss_types=loss_types, loss_weights=weights, **kw)
    trl_loss = DPOTrainer._compute_loss(ns, model, inputs, False)
    trl_grads = grads(model, trl_loss)

    logps, logits, labels = our_logps(model, ids, cm)
    lengths = cm.sum(1)
    policy_weights = None
    if kw.get("use_weighting"):
        w = divkit.wpo_weights(logits, labels)
        policy_weights = w[:B] * w[B:]
    losses, cr, rj = divkit.preference_loss(
        logps[:B],
        logps[B:],
        ref[:B],
        ref[B:],
        loss_type=loss_types,
        loss_weights=weights,
        beta=kw.get("beta", 0.1),
        label_smoothing=kw.get("label_smoothing", 0.0),
        f_divergence_type=kw.get("f_divergence_type", "reverse_kl"),
        f_alpha_divergence_coef=kw.get("f_alpha_divergence_coef", 0.5),
        chosen_lengths=lengths[:B],
        rejected_lengths=lengths[B:],
        policy_weights=policy_weights,
    )
    assert losses.dtype == (torch.float32 if fp32 else torch.float64)
    ours = losses.mean()
    tol = dict(rel=1e-4, abs=1e-6) if fp32 else dict(rel=1e-5, abs=1e-7)
    assert ours.item() == pytest.approx(trl_loss.item(), **tol)
    our_grads = grads(model, ours)
    assert len(our_grads) == len(trl_grads)
    for a, b in zip(our_grads, trl_grads):
        torch.testing.assert_close(a, b, rtol=1e-3 if fp32 else 1e-4, atol=1e-5 if fp32 else 1e-7)
    metrics = divkit.preference_metrics(cr, rj)
    for key, value in metrics.items():
        assert value == pytest.approx(ns._metrics["train"][key][-1], rel=1e-5, abs=1e-6), key


@pytest.mark.parametrize(
    "loss_type,alpha,eps",
    [
        ("sigmoid", 0.0, 0.0),
        ("sigmoid", 0.0, 0.2),
        ("hinge", 0.0, 0.0),
        ("ipo", 0.0, 0.0),
        ("simpo", 0.0, 0.1),
        ("simpo", 0.25, 0.0),
        ("sigmoid", -0.5, 0.0),
    ],
)
def test_cpo_against_trl(loss_type, alpha, eps):
    from trl.experimental.cpo import CPOTrainer

    g = torch.Generator().manual_seed(5)
    pc = (-torch.rand(6, generator=g, dtype=torch.float64) * 3 - 0.1).requires_grad_()
    pr = (-torch.rand(6, generator=g, dtype=torch.float64) * 3 - 0.1).requires_grad_()
    ns = types.SimpleNamespace(
        alpha=alpha,
        beta=0.7,
        loss_type=loss_type,
        label_smoothing=eps,
        simpo_gamma=0.4,
        accelerator=types.SimpleNamespace(device="cpu"),
    )
    want = CPOTrainer.cpo_loss(ns, pc, pr)
    gw = torch.autograd.grad(want[0].sum(), (pc, pr))
    got = divkit.cpo_loss(
        pc, pr, loss_type=loss_type, beta=0.7, label_smoothing=eps, simpo_gamma=0.4, alpha=alpha
    )
    gg = torch.autograd.grad(got[0].sum(), (pc, pr))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    for a, b in zip(gg, gw):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("scale", [1.0, 1e-4, 30.0])
def test_odds_ratio_against_trl(scale):
    from trl.experimental.orpo import ORPOTrainer

    g = torch.Generator().manual_seed(6)
    # average log-probs from near 0 (p -> 1, log1mexp's hard side) to very negative
    pc = (-torch.rand(8, generator=g, dtype=torch.float64) * scale - 1e-6).requires_grad_()
    pr = (-torch.rand(8, generator=g, dtype=torch.float64) * scale - 1e-6).requires_grad_()
    ns = types.SimpleNamespace(beta=0.1, accelerator=types.SimpleNamespace(device="cpu"))
    want = ORPOTrainer.odds_ratio_loss(ns, pc, pr)
    gw = torch.autograd.grad(want[0].sum(), (pc, pr))
    got = divkit.odds_ratio_loss(pc, pr, beta=0.1)
    gg = torch.autograd.grad(got[0].sum(), (pc, pr))
    # TRL casts to fp32 (.float()); divkit keeps fp64.
    for a, b in zip(got, want):
        torch.testing.assert_close(a.double(), b.double(), rtol=2e-5, atol=1e-6)
    for a, b in zip(gg, gw):
        torch.testing.assert_close(a.double(), b.double(), rtol=2e-4, atol=1e-6)


@pytest.mark.parametrize("loss_type", ["kto", "apo_zero_unpaired"])
@pytest.mark.parametrize("weights", [(1.0, 1.0), (1.33, 0.7)])
def test_kto_against_trl(model, accelerator, loss_type, weights):
    rows = 5
    ids, cm = batch(seed=11, rows=rows)
    kl_ids, kl_cm = batch(seed=12, rows=rows)
    label = torch.tensor([True, False, True, True, False])
    g = torch.Generator().manual_seed(9)
    with torch.no_grad():
        base, _, _ = our_logps(model, ids, cm)
        kl_base, _, _ = our_logps(model, kl_ids, kl_cm)
    ref = base + torch.randn(rows, generator=g, dtype=torch.float64)
    # reference KL log-probs below the policy's so that z0 > 0 (the clamp is not active)
    ref_kl = kl_base - 0.5 + 0.3 * torch.randn(rows, generator=g, dtype=torch.float64)
    inputs = {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "completion_mask": cm,
        "KL_input_ids": kl_ids,
        "KL_attention_mask": torch.ones_like(kl_ids),
        "KL_completion_mask": kl_cm,
        "label": label,
        "ref_logps": ref,
        "ref_KL_logps": ref_kl,
    }
    ns = trainer_namespace(
        model,
        accelerator,
        loss_type=loss_type,
        desirable_weight=weights[0],
        undesirable_weight=weights[1],
        calculate_KL=loss_type == "kto",
    )
    ns._compute_kl_logps = types.MethodType(KTOTrainer._compute_kl_logps, ns)
    trl_loss = KTOTrainer._compute_loss(ns, model, inputs, False)
    trl_grads = grads(model, trl_loss)

    logps, _, _ = our_logps(model, ids, cm)
    with torch.no_grad():
        kl_logps, _, _ = our_logps(model, kl_ids, kl_cm)
    losses, cr, rj, kl = divkit.kto_loss(
        logps[label],
        logps[~label],
        kl_logps,
        ref[label],
        ref[~label],
        ref_kl,
        beta=0.1,
        desirable_weight=weights[0],
        undesirable_weight=weights[1],
        loss_type=loss_type,
    )
    if loss_type == "kto":
        assert kl.item() > 0
        assert kl.item() == pytest.approx(ns._metrics["train"]["kl"][-1], rel=1e-5)
    ours = losses.mean()
    assert ours.item() == pytest.approx(trl_loss.item(), rel=1e-5, abs=1e-7)
    for a, b in zip(grads(model, ours), trl_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)
    assert cr.mean().item() == pytest.approx(ns._metrics["train"]["rewards/chosen"][-1], rel=1e-5)
    assert rj.mean().item() == pytest.approx(ns._metrics["train"]["rewards/rejected"][-1], rel=1e-5)
