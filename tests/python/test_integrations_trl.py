"""divkit.integrations.trl against the stock TRL trainers on the same tiny model and data."""

import pytest
import torch

pytest.importorskip("trl")
pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")

from test_trl_client import run_gkd  # noqa: E402  (the tiny models, data and config)


def test_divkit_gkd_trainer_equals_trl_gkd_trainer(tmp_path):
    try:
        from trl.experimental.gkd import GKDTrainer
    except Exception as e:  # pragma: no cover - depends on the installed TRL
        pytest.skip(f"trl.experimental.gkd.GKDTrainer not importable: {e}")
    from divkit.integrations.trl import DivkitGKDTrainer

    trl_losses = run_gkd(tmp_path, "gkd_trl", GKDTrainer)
    dk_losses = run_gkd(tmp_path, "gkd_divkit", DivkitGKDTrainer)
    assert len(trl_losses) == len(dk_losses) == 6
    assert trl_losses[0] > 0.05
    # Same math (JSD, beta 0.5, the completion tokens' mean), fp32 GEMMs in both: step 0 agrees
    # to round-off, the trajectory to what round-off grows to through six Adam steps.
    assert dk_losses[0] == pytest.approx(trl_losses[0], rel=1e-5, abs=1e-6)
    assert dk_losses == pytest.approx(trl_losses, rel=2e-3, abs=2e-4)


@pytest.mark.parametrize("kind", ["reverse_kl"])
def test_divkit_gkd_trainer_kinds_train(tmp_path, kind):
    from divkit.integrations import trl as dk_trl

    class Trainer(dk_trl.DivkitGKDTrainer):
        def __init__(self, *a, **k):
            super().__init__(*a, divkit_kind=kind, divkit_temperature=2.0, **k)

    losses = run_gkd(tmp_path, f"gkd_{kind}", Trainer)
    assert len(losses) == 6 and all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-2:]) < sum(losses[:2])


def test_divkit_gkd_trainer_every_kind_and_temperature_equal_divergence(tmp_path):
    """On a batch the trainer saw: for every divkit kind, at temperature 2, DivkitGKDTrainer's
    loss equals divkit.divergence on the materialized logits of both models (labels shifted,
    the completion tokens' mean)."""
    import divkit
    from divkit.integrations import trl as dk_trl

    seen = []

    class Recording(dk_trl.DivkitGKDTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if not seen:
                seen.append((self, {k: v.clone() for k, v in inputs.items()}))
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

    run_gkd(tmp_path, "gkd_kinds", Recording)
    trainer, inputs = seen[0]
    model, teacher = trainer.model, trainer.teacher_model
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    labels = torch.nn.functional.pad(inputs["labels"], (0, 1), value=-100)[:, 1:]
    with torch.no_grad():
        s = model(input_ids=ids, attention_mask=mask).logits
        t = teacher(input_ids=ids, attention_mask=mask).logits
    trainer.divkit_temperature = 2.0
    for kind in divkit.KINDS:
        trainer.divkit_kind = kind
        with torch.no_grad():
            got = trainer.compute_loss(model, inputs)
        want = divkit.divergence(s, t, kind, beta=trainer.beta, labels=labels, temperature=2.0)
        assert float(got) == pytest.approx(float(want), rel=1e-5, abs=1e-6), kind


def _run_dpo(tmp_path, name, trainer_cls, **config):
    import warnings

    from trl import DPOConfig

    import test_trl_client as client

    tok = client.make_tokenizer()
    model = client.make_model(0, len(tok))
    ref = client.make_model(1, len(tok))
    kwargs = client.common_args(tmp_path, name)
    kwargs["max_steps"] = 3
    args = DPOConfig(**kwargs, max_length=32, precompute_ref_log_probs=False, **config)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = trainer_cls(
            model=model,
            ref_model=ref,
            args=args,
            train_dataset=client.preference_data(),
            processing_class=tok,
        )
        trainer.train()
    return [h for h in trainer.state.log_history if "loss" in h]


DPO_CONFIGS = {
    "sigmoid": dict(beta=0.5),
    # TRL 1.16 raises with "sft" and use_weighting together (an in-place product on an expanded
    # tensor), so WPO is tested with ipo.
    "ipo_wpo": dict(beta=0.5, loss_type=["ipo"], use_weighting=True),
    "rpo": dict(beta=0.5, loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.5]),
    "hinge_robust_js_ld": dict(
        beta=0.5,
        loss_type=["hinge", "robust"],
        loss_weights=[0.7, 0.3],
        f_divergence_type="js_divergence",
        label_smoothing=0.1,
        ld_alpha=0.5,
    ),
}


@pytest.mark.parametrize("case", sorted(DPO_CONFIGS))
def test_divkit_dpo_trainer_equals_trl_dpo_trainer(tmp_path, case, monkeypatch):
    from trl import DPOTrainer

    import divkit.integrations.trl as dk_trl

    calls = []
    loss_fn = dk_trl.preference_loss

    def counting(*args, **kwargs):
        calls.append(kwargs["loss_type"])
        return loss_fn(*args, **kwargs)

    monkeypatch.setattr(dk_trl, "preference_loss", counting)
    config = DPO_CONFIGS[case]
    ref = _run_dpo(tmp_path, "trl", DPOTrainer, **config)
    got = _run_dpo(tmp_path, "divkit", dk_trl.DivkitDPOTrainer, **config)
    assert len(calls) == 3  # divkit's loss is the one trained on, every step
    assert len(ref) == len(got) == 3
    assert abs(ref[0]["loss"] - 0.6931) > 1e-3 or case != "sigmoid"
    for step, (a, b) in enumerate(zip(ref, got)):
        assert set(a) == set(b)  # TRL's full metric set is logged
        tol = dict(rel=1e-5, abs=1e-6) if step == 0 else dict(rel=2e-3, abs=2e-4)
        for key in a:
            if key in ("learning_rate", "epoch", "step", "grad_norm"):
                continue
            assert b[key] == pytest.approx(a[key], **tol), (step, key)


def _run_distillation(tmp_path, name, trainer_cls, **extra):
    import warnings

    import datasets
    from trl import DistillationConfig

    import test_trl_client as client

    tok = client.make_tokenizer()
    student = client.make_model(0, len(tok))
    teacher = client.make_model(1, len(tok))
    with torch.no_grad():
        teacher.lm_head.weight.mul_(30.0)
    prompts = ["the cat", "a dog", "the big dog", "a small cat", "the red cat", "a blue dog"]
    data = datasets.Dataset.from_dict({"prompt": prompts + prompts[:2]})
    kwargs = client.common_args(tmp_path, name)
    kwargs["max_steps"] = 3
    args = DistillationConfig(**kwargs, beta=0.5, temperature=1.0, max_completion_length=4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = trainer_cls(
            model=student,
            teacher_model=teacher,
            args=args,
            train_dataset=data,
            processing_class=tok,
            **extra,
        )
        trainer.train()
    return [h for h in trainer.state.log_history if "loss" in h]


def test_divkit_distillation_trainer_equals_trl(tmp_path, monkeypatch):
    from trl import DistillationTrainer

    import divkit.integrations.trl as dk_trl

    calls = []
    fused = dk_trl.fused_linear_divergence

    def counting(*args, **kwargs):
        calls.append(args[4])
        return fused(*args, **kwargs)

    monkeypatch.setattr(dk_trl, "fused_linear_divergence", counting)
    ref = _run_distillation(tmp_path, "trl", DistillationTrainer)
    got = _run_distillation(tmp_path, "divkit", dk_trl.DivkitDistillationTrainer)
    assert calls and set(calls) == {"jsd"}
    assert len(ref) == len(got) == 3 and ref[0]["loss"] > 0.01
    for step, (a, b) in enumerate(zip(ref, got)):
        tol = dict(rel=1e-5, abs=1e-6) if step == 0 else dict(rel=2e-3, abs=2e-4)
        for key in ("loss", "entropy"):
            assert b[key] == pytest.approx(a[key], **tol), (step, key)


def _run_pref(tmp_path, name, trainer_cls, config_cls, **config):
    import warnings

    import test_trl_client as client

    tok = client.make_tokenizer()
    model = client.make_model(0, len(tok))
    kwargs = client.common_args(tmp_path, name)
    kwargs["max_steps"] = 3
    args = config_cls(**kwargs, max_length=32, **config)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = trainer_cls(
            model=model, args=args, train_dataset=client.preference_data(), processing_class=tok
        )
        trainer.train()
    return [h for h in trainer.state.log_history if "loss" in h]


PREF_CASES = {
    "cpo_sigmoid": ("cpo", dict(beta=0.5, label_smoothing=0.1)),
    "cpo_simpo_alpha": ("cpo", dict(beta=2.0, loss_type="simpo", alpha=0.2, cpo_alpha=0.0)),
    "orpo": ("orpo", dict(beta=0.3)),
}


@pytest.mark.parametrize("case", sorted(PREF_CASES))
def test_divkit_cpo_orpo_trainers_equal_trl(tmp_path, case, monkeypatch):
    import divkit.integrations.trl as dk_trl

    which, config = PREF_CASES[case]
    calls = []
    loss_name = "cpo_loss" if which == "cpo" else "odds_ratio_loss"
    loss_fn = getattr(dk_trl, loss_name)

    def counting(*args, **kwargs):
        calls.append(1)
        return loss_fn(*args, **kwargs)

    monkeypatch.setattr(dk_trl, loss_name, counting)
    if which == "cpo":
        from trl.experimental.cpo import CPOConfig, CPOTrainer

        ref_cls, cls, cfg = CPOTrainer, dk_trl.DivkitCPOTrainer, CPOConfig
    else:
        from trl.experimental.orpo import ORPOConfig, ORPOTrainer

        ref_cls, cls, cfg = ORPOTrainer, dk_trl.DivkitORPOTrainer, ORPOConfig
    ref = _run_pref(tmp_path, "trl", ref_cls, cfg, **config)
    got = _run_pref(tmp_path, "divkit", cls, cfg, **config)
    assert len(calls) == 3  # divkit's loss, every step
    assert len(ref) == len(got) == 3
    for step, (a, b) in enumerate(zip(ref, got)):
        assert set(a) == set(b)
        tol = dict(rel=1e-5, abs=1e-6) if step == 0 else dict(rel=2e-3, abs=2e-4)
        for key in a:
            if key not in ("learning_rate", "epoch", "step", "grad_norm"):
                assert b[key] == pytest.approx(a[key], **tol), (step, key)


@pytest.mark.parametrize("loss_type", ["kto", "apo_zero_unpaired"])
def test_divkit_kto_trainer_equals_trl(tmp_path, loss_type, monkeypatch):
    import warnings

    import datasets
    from trl import KTOConfig, KTOTrainer

    import divkit.integrations.trl as dk_trl
    import test_trl_client as client

    calls = []
    loss_fn = dk_trl.kto_loss

    def counting(*args, **kwargs):
        calls.append(1)
        return loss_fn(*args, **kwargs)

    monkeypatch.setattr(dk_trl, "kto_loss", counting)
    pairs = client.preference_data()
    data = datasets.Dataset.from_dict(
        {
            "prompt": list(pairs["prompt"]) * 2,
            "completion": list(pairs["chosen"]) + list(pairs["rejected"]),
            "label": [True] * len(pairs) + [False] * len(pairs),
        }
    )

    def run(name, cls):
        tok = client.make_tokenizer()
        kwargs = client.common_args(tmp_path, name)
        kwargs["max_steps"] = 3
        args = KTOConfig(
            **kwargs, beta=0.5, max_length=32, loss_type=loss_type, desirable_weight=1.3
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer = cls(
                model=client.make_model(0, len(tok)),
                ref_model=client.make_model(1, len(tok)),
                args=args,
                train_dataset=data,
                processing_class=tok,
            )
            trainer.train()
        return [h for h in trainer.state.log_history if "loss" in h]

    # Which head computes the log-probs: TRL's chunked one, or divkit's fused_linear_logprobs.
    import trl.trainer.utils as trl_utils

    import divkit.fused

    heads = {"trl": 0, "divkit": 0}
    trl_head, dk_head = trl_utils._ChunkedLogProbFunction, divkit.fused.fused_linear_logprobs

    class CountingTRLHead:
        @staticmethod
        def apply(*args):
            heads["trl"] += 1
            return trl_head.apply(*args)

    def counting_head(*args, **kwargs):
        heads["divkit"] += 1
        return dk_head(*args, **kwargs)

    monkeypatch.setattr(trl_utils, "_ChunkedLogProbFunction", CountingTRLHead)
    monkeypatch.setattr(divkit.fused, "fused_linear_logprobs", counting_head)
    ref = run("trl", KTOTrainer)
    # Policy and reference per step, and both on the mismatched (KL) completions for "kto".
    n = 3 * (4 if loss_type == "kto" else 2)
    assert heads == {"trl": n, "divkit": 0}
    got = run("divkit", dk_trl.DivkitKTOTrainer)
    assert heads == {"trl": n, "divkit": n}  # the divkit trainer: divkit's head only
    if loss_type == "kto":  # the KL baseline z0 is in play (TRL clamps it at 0)
        assert max(h["kl"] for h in ref) > 0.1
    assert len(calls) == 3 and len(ref) == len(got) == 3
    for step, (a, b) in enumerate(zip(ref, got)):
        assert set(a) == set(b)
        tol = dict(rel=1e-5, abs=1e-6) if step == 0 else dict(rel=2e-3, abs=2e-4)
        for key in a:
            if key not in ("learning_rate", "epoch", "step"):
                # grad_norm: the gradient of every parameter, through divkit's head and loss
                assert b[key] == pytest.approx(a[key], **tol), (step, key)


def test_divkit_dpo_trainer_with_peft_reference(tmp_path):
    """The reference is the PEFT model with its adapter disabled (ref_model=None), as in TRL."""
    peft = pytest.importorskip("peft")
    import warnings

    from trl import DPOConfig, DPOTrainer

    import test_trl_client as client
    from divkit.integrations.trl import DivkitDPOTrainer

    def run(name, cls):
        tok = client.make_tokenizer()
        kwargs = client.common_args(tmp_path, name)
        kwargs["max_steps"] = 3
        kwargs["learning_rate"] = 5e-2
        args = DPOConfig(**kwargs, beta=0.5, max_length=32, precompute_ref_log_probs=False)
        lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer = cls(
                model=client.make_model(0, len(tok)),
                ref_model=None,
                args=args,
                train_dataset=client.preference_data(),
                processing_class=tok,
                peft_config=lora,
            )
            trainer.train()
        return [h for h in trainer.state.log_history if "loss" in h]

    ref = run("trl", DPOTrainer)
    got = run("divkit", DivkitDPOTrainer)
    assert len(ref) == len(got) == 3
    assert abs(ref[-1]["loss"] - 0.6931) > 1e-4  # the adapter moved away from the reference
    for step, (a, b) in enumerate(zip(ref, got)):
        tol = dict(rel=1e-5, abs=1e-6) if step == 0 else dict(rel=2e-3, abs=2e-4)
        for key in ("loss", "rewards/margins", "rewards/chosen", "logps/chosen"):
            assert b[key] == pytest.approx(a[key], **tol), (step, key)


def test_divkit_tdpo_trainer_trains_and_equals_tdpo_loss(tmp_path):
    """TRL has no TDPO: the first step's loss equals divkit.tdpo_loss on the materialized logits
    of the same batch (the initial models), and the loss falls over a few steps."""
    import copy
    import warnings

    from trl import DPOConfig

    import divkit
    import test_trl_client as client
    from divkit.integrations.trl import DivkitTDPOTrainer

    tok = client.make_tokenizer()
    model, ref = client.make_model(0, len(tok)), client.make_model(1, len(tok))
    model0 = copy.deepcopy(model)
    seen = []

    class Recording(DivkitTDPOTrainer):
        def _compute_loss(self, model, inputs, return_outputs):
            loss = super()._compute_loss(model, inputs, return_outputs)
            seen.append(({k: v.clone() for k, v in inputs.items()}, float(loss)))
            return loss

    kwargs = client.common_args(tmp_path, "tdpo")
    args = DPOConfig(**kwargs, beta=0.5, max_length=32, precompute_ref_log_probs=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = Recording(
            model=model,
            ref_model=ref,
            args=args,
            train_dataset=client.preference_data(),
            processing_class=tok,
            tdpo_variant="tdpo2",
            tdpo_alpha=0.5,
        )
        trainer.train()
    inputs, loss0 = seen[0]
    labels = inputs["input_ids"].masked_fill(inputs["completion_mask"] == 0, -100)[:, 1:]
    with torch.no_grad():
        logits = model0(
            input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]
        ).logits
        ref_logits = ref(
            input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]
        ).logits
    pc, pr = logits[:, :-1].chunk(2)
    rc, rr = ref_logits[:, :-1].chunk(2)
    lc, lr = labels.chunk(2)
    want = divkit.tdpo_loss(pc, pr, rc, rr, lc, lr, beta=0.5, alpha=0.5, variant="tdpo2")[0]
    assert loss0 == pytest.approx(float(want.mean()), rel=1e-5, abs=1e-6)
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 6 and "rewards/margins" in logs[0]
    assert sum(h["loss"] for h in logs[-2:]) < sum(h["loss"] for h in logs[:2])


def _sparsepo(**extra):
    from divkit.integrations.trl import DivkitSparsePOTrainer

    class Trainer(DivkitSparsePOTrainer):
        def __init__(self, *a, **k):
            super().__init__(*a, **extra, **k)

    return Trainer


def test_divkit_sparsepo_trainer_reward_only_equals_trl_dpo(tmp_path):
    """SparsePO with m^r = 1, m^kl = 0 is DPO's sigmoid loss: equal to the stock DPOTrainer
    over three steps (loss, rewards, gradient norm)."""
    from trl import DPOTrainer

    ref = _run_dpo(tmp_path, "trl", DPOTrainer, beta=0.5)
    got = _run_dpo(tmp_path, "sparsepo", _sparsepo(sparsepo_mask="reward_only"), beta=0.5)
    assert len(ref) == len(got) == 3
    assert abs(ref[0]["loss"] - 0.6931) > 1e-3
    keys = ("loss", "grad_norm", "rewards/chosen", "rewards/rejected", "rewards/margins")
    for step, (a, b) in enumerate(zip(ref, got)):
        tol = dict(rel=1e-5, abs=1e-6) if step == 0 else dict(rel=2e-3, abs=2e-4)
        for key in keys + ("rewards/accuracies",):
            assert b[key] == pytest.approx(a[key], **tol), (step, key)


def test_divkit_sparsepo_trainer_ones_equals_tdpo1(tmp_path):
    """All-ones masks are TDPO1 (SparsePO's limit): equal to DivkitTDPOTrainer(tdpo1)."""
    from divkit.integrations.trl import DivkitTDPOTrainer

    class TDPO1(DivkitTDPOTrainer):
        def __init__(self, *a, **k):
            super().__init__(*a, tdpo_variant="tdpo1", **k)

    ref = _run_dpo(tmp_path, "tdpo1", TDPO1, beta=0.5)
    got = _run_dpo(tmp_path, "sparsepo", _sparsepo(sparsepo_mask="ones"), beta=0.5)
    assert len(ref) == len(got) == 3
    for a, b in zip(ref, got):
        for key in ("loss", "grad_norm", "rewards/chosen", "rewards/margins"):
            assert b[key] == pytest.approx(a[key], rel=1e-6, abs=1e-7), key


def test_divkit_sparsepo_trainer_learned_masks_equal_fp64(tmp_path):
    """The learned masks: the first step's loss equals SparsePO computed directly in fp64 from
    the materialized logits of the initial models and a copy of the initial mask model; the mask
    model trains (its parameters move) and is saved beside the model."""
    import copy
    import os
    import warnings

    import torch.nn.functional as F
    from trl import DPOConfig

    import divkit
    import test_trl_client as client

    tok = client.make_tokenizer()
    model, ref = client.make_model(0, len(tok)), client.make_model(1, len(tok))
    model0 = copy.deepcopy(model)
    seen, masks0 = [], []
    # A mask model of the caller's (the default's, with the mixers' biases set so that neither
    # mask starts all zero: a ReLU that starts dead gives its head no gradient).
    torch.manual_seed(0)
    mask_model = divkit.preference.SparsePOMask(32, 2, dropout=0.0)
    with torch.no_grad():
        for head in mask_model.heads:
            head["mix"].bias.fill_(0.5)
    base = _sparsepo(
        sparsepo_mask="learned",
        sparsepo_l1_reward=0.01,
        sparsepo_l1_kl=0.02,
        sparsepo_mask_model=mask_model,
    )

    class Recording(base):
        def _compute_loss(self, model, inputs, return_outputs):
            if not masks0:
                masks0.append(copy.deepcopy(self.sparsepo_mask_model))
            loss = super()._compute_loss(model, inputs, return_outputs)
            seen.append(({k: v.clone() for k, v in inputs.items()}, float(loss)))
            return loss

    kwargs = client.common_args(tmp_path, "sparsepo")
    kwargs["max_steps"] = 4
    args = DPOConfig(**kwargs, beta=0.5, max_length=32, precompute_ref_log_probs=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = Recording(
            model=model,
            ref_model=ref,
            args=args,
            train_dataset=client.preference_data(),
            processing_class=tok,
        )
        trainer.train()
    inputs, loss0 = seen[0]
    ids, am = inputs["input_ids"], inputs["attention_mask"]
    labels = ids.masked_fill(inputs["completion_mask"] == 0, -100)[:, 1:]
    with torch.no_grad():
        logp = F.log_softmax(model0.double()(input_ids=ids, attention_mask=am).logits, -1)
        out = ref.double()(input_ids=ids, attention_mask=am, output_hidden_states=True)
        logp_ref = F.log_softmax(out.logits, -1)
        m_r, m_kl = masks0[0].double()(list(out.hidden_states[1:]))
    logp, logp_ref, m_r, m_kl = logp[:, :-1], logp_ref[:, :-1], m_r[:, :-1], m_kl[:, :-1]
    tokens = labels != -100
    safe = labels.clamp(min=0).unsqueeze(-1)
    logratio = (logp.gather(-1, safe) - logp_ref.gather(-1, safe)).squeeze(-1) * tokens
    kl = (logp_ref.exp() * (logp_ref - logp)).sum(-1) * tokens
    u = (m_r * logratio).sum(-1)
    d = -(m_kl * kl).sum(-1)
    (u_w, u_l), (d_w, d_l) = u.chunk(2), d.chunk(2)
    l1 = 0.01 * (m_r.abs() * tokens).sum(-1) + 0.02 * (m_kl.abs() * tokens).sum(-1)
    l1_w, l1_l = l1.chunk(2)
    want = -F.logsigmoid(0.5 * ((u_w - d_w) - (u_l - d_l))) + l1_w + l1_l
    assert float(m_r[tokens].mean()) > 0 and float(m_kl[tokens].mean()) > 0  # masks not dead
    assert loss0 == pytest.approx(float(want.mean()), rel=1e-5, abs=1e-6)
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 4 and "sparsepo/reward_mask" in logs[0]
    assert logs[0]["sparsepo/reward_mask"] == pytest.approx(float(m_r[tokens].mean()), rel=1e-5)
    moved = [
        float((a - b).abs().max())
        for a, b in zip(masks0[0].parameters(), trainer.sparsepo_mask_model.parameters())
    ]
    assert max(moved) > 1e-4  # the mask model is trained with the policy
    trainer.save_model(str(tmp_path / "saved"))
    state = torch.load(os.path.join(tmp_path, "saved", "sparsepo_mask.pt"))
    assert set(state) == set(trainer.sparsepo_mask_model.state_dict())


def test_divkit_sparsepo_trainer_bad_arguments(tmp_path):
    import divkit

    with pytest.raises(divkit.Error, match="DivkitSparsePOTrainer: unknown sparsepo_mask"):
        _run_dpo(tmp_path, "bad", _sparsepo(sparsepo_mask="dense"), beta=0.5)
    with pytest.raises(divkit.Error, match="DivkitSparsePOTrainer: label_smoothing"):
        _run_dpo(tmp_path, "bad2", _sparsepo(), beta=0.5, label_smoothing=0.1)


def test_divkit_kto_trainer_with_peft_reference(tmp_path):
    """KTO on a LoRA adapter, the reference being the base model (ref_model=None): divkit's
    fused head sits under the adapter, the results are stock KTOTrainer's."""
    peft = pytest.importorskip("peft")
    import warnings

    import datasets
    from trl import KTOConfig, KTOTrainer

    import test_trl_client as client
    from divkit.integrations.trl import DivkitKTOTrainer

    pairs = client.preference_data()
    data = datasets.Dataset.from_dict(
        {
            "prompt": list(pairs["prompt"]) * 2,
            "completion": list(pairs["chosen"]) + list(pairs["rejected"]),
            "label": [True] * len(pairs) + [False] * len(pairs),
        }
    )

    def run(name, cls):
        tok = client.make_tokenizer()
        kwargs = client.common_args(tmp_path, name)
        kwargs.update(max_steps=3, learning_rate=5e-2)
        lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer = cls(
                model=client.make_model(0, len(tok)),
                ref_model=None,
                args=KTOConfig(**kwargs, beta=0.5, max_length=32),
                train_dataset=data,
                processing_class=tok,
                peft_config=lora,
            )
            trainer.train()
        return [h for h in trainer.state.log_history if "loss" in h]

    ref = run("trl", KTOTrainer)
    got = run("divkit", DivkitKTOTrainer)
    assert len(ref) == len(got) == 3 and max(h["kl"] for h in ref) > 0.1
    for step, (a, b) in enumerate(zip(ref, got)):
        tol = dict(rel=1e-5, abs=1e-6) if step == 0 else dict(rel=2e-3, abs=2e-4)
        for key in ("loss", "kl", "grad_norm", "logps/chosen"):
            if key in a:
                assert b[key] == pytest.approx(a[key], **tol), (step, key)


# ---------------------------------------------------------------------------------------------
# Configs: the divkit options as fields of TRL's config dataclasses.
# ---------------------------------------------------------------------------------------------

_CLI_BASE = ["--output_dir", "out", "--use_cpu", "true", "--report_to", "none"]

CLI_CASES = {
    "DivkitGKDConfig": (
        [
            "--divkit_kind",
            "reverse_kl",
            "--divkit_temperature",
            "2",
            "--divkit_alpha",
            "0.3",
            "--divkit_hard_weight",
            "0.1",
            "--divkit_scale_by_t_squared",
            "true",
            "--divkit_chunk_size",
            "8",
            "--beta",
            "0.3",
        ],
        dict(
            divkit_kind="reverse_kl",
            divkit_temperature=2.0,
            divkit_alpha=0.3,
            divkit_hard_weight=0.1,
            divkit_soft_weight=1.0,
            divkit_scale_by_t_squared=True,
            divkit_chunk_size=8,
            beta=0.3,
        ),
    ),
    "DivkitDistillationConfig": (
        ["--divkit_kind", "forward_kl", "--divkit_chunk_size", "16", "--temperature", "1.5"],
        dict(divkit_kind="forward_kl", divkit_chunk_size=16, divkit_alpha=0.1, temperature=1.5),
    ),
    "DivkitKTOConfig": (["--divkit_fused_head", "false"], dict(divkit_fused_head=False)),
    "DivkitDPOConfig": (["--divkit_fused_head", "false"], dict(divkit_fused_head=False)),
    "DivkitTDPOConfig": (
        ["--tdpo_variant", "tdpo1", "--tdpo_alpha", "0.25", "--beta", "0.2"],
        dict(tdpo_variant="tdpo1", tdpo_alpha=0.25, beta=0.2),
    ),
    "DivkitSparsePOConfig": (
        [
            "--sparsepo_mask",
            "shared",
            "--sparsepo_l1_reward",
            "0.01",
            "--sparsepo_l1_kl",
            "0.02",
            "--sparsepo_dropout",
            "0",
        ],
        dict(
            sparsepo_mask="shared",
            sparsepo_l1_reward=0.01,
            sparsepo_l1_kl=0.02,
            sparsepo_dropout=0.0,
        ),
    ),
}


@pytest.mark.parametrize("name", sorted(CLI_CASES))
def test_divkit_configs_parse_from_the_command_line(tmp_path, name):
    import transformers

    import divkit.integrations.trl as dk_trl

    cls = getattr(dk_trl, name)
    argv, want = CLI_CASES[name]
    (config,) = transformers.HfArgumentParser(cls).parse_args_into_dataclasses(
        args=_CLI_BASE + argv
    )
    assert type(config) is cls
    for key, value in want.items():
        assert getattr(config, key) == value, key
        assert type(getattr(config, key)) is type(value), key
    # The defaults, from an empty command line, are the trainers' keyword defaults.
    (default,) = transformers.HfArgumentParser(cls).parse_args_into_dataclasses(args=_CLI_BASE)
    for key in want:
        if key.startswith(("divkit_", "tdpo_", "sparsepo_")):
            field = cls.__dataclass_fields__[key]
            assert getattr(default, key) == field.default and field.metadata["help"]
    # The config round-trips through TrainingArguments' dict / JSON.
    assert '"' + next(iter(want)) + '"' in config.to_json_string()


BAD_CONFIGS = [
    ("DivkitGKDConfig", dict(divkit_kind="kl"), "unknown divkit_kind 'kl'"),
    ("DivkitGKDConfig", dict(divkit_temperature=0.0), "divkit_temperature must be finite and > 0"),
    ("DivkitGKDConfig", dict(divkit_alpha=float("inf")), "divkit_alpha must be finite"),
    ("DivkitGKDConfig", dict(divkit_hard_weight=-1.0), "divkit_hard_weight must be finite and >="),
    ("DivkitGKDConfig", dict(divkit_chunk_size=0), "divkit_chunk_size must be an int >= 1"),
    ("DivkitGKDConfig", dict(divkit_scale_by_t_squared=1), "divkit_scale_by_t_squared must be"),
    ("DivkitDistillationConfig", dict(divkit_kind="KL"), "unknown divkit_kind 'KL'"),
    ("DivkitDistillationConfig", dict(divkit_chunk_size=2.5), "divkit_chunk_size must be an int"),
    ("DivkitKTOConfig", dict(divkit_fused_head="yes"), "divkit_fused_head must be a bool"),
    ("DivkitDPOConfig", dict(divkit_fused_head=1), "divkit_fused_head must be a bool"),
    ("DivkitTDPOConfig", dict(tdpo_variant="tdpo3"), "unknown tdpo_variant 'tdpo3'"),
    ("DivkitTDPOConfig", dict(tdpo_alpha=float("nan")), "tdpo_alpha must not be nan"),
    ("DivkitTDPOConfig", dict(precompute_ref_log_probs=True), "precompute_ref_log_probs"),
    ("DivkitSparsePOConfig", dict(sparsepo_mask="dense"), "unknown sparsepo_mask 'dense'"),
    ("DivkitSparsePOConfig", dict(sparsepo_l1_kl=-0.1), "sparsepo_l1_kl must be finite and >="),
    ("DivkitSparsePOConfig", dict(sparsepo_dropout=1.0), "sparsepo_dropout must be in"),
    ("DivkitSparsePOConfig", dict(label_smoothing=0.1), "label_smoothing is not part"),
]


@pytest.mark.parametrize("name,fields,message", BAD_CONFIGS)
def test_divkit_configs_reject_bad_fields(tmp_path, name, fields, message):
    import re

    import divkit
    import divkit.integrations.trl as dk_trl

    cls = getattr(dk_trl, name)
    with pytest.raises(divkit.Error, match=f"^{name}: " + re.escape(message)):
        cls(output_dir=str(tmp_path), use_cpu=True, report_to="none", **fields)


def _losses_and_metrics(logs, keys):
    return [h[k] for h in logs for k in keys if k in h]


def test_divkit_gkd_config_equals_keywords(tmp_path, monkeypatch):
    """DivkitGKDConfig's fields give the loss trajectory of the same options as keywords."""
    import functools

    import trl.experimental.gkd as gkd

    from divkit.integrations import trl as dk_trl

    options = dict(hard_weight=0.1, chunk_size=8)

    class Keywords(dk_trl.DivkitGKDTrainer):
        def __init__(self, *a, **k):
            super().__init__(
                *a, divkit_kind="reverse_kl", divkit_temperature=2.0, divkit_options=options, **k
            )

    seen = []

    class FromConfig(dk_trl.DivkitGKDTrainer):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            seen.append(self)

    want = run_gkd(tmp_path, "gkd_keywords", Keywords)
    monkeypatch.setattr(
        gkd,
        "GKDConfig",
        functools.partial(
            dk_trl.DivkitGKDConfig,
            divkit_kind="reverse_kl",
            divkit_temperature=2.0,
            divkit_hard_weight=0.1,
            divkit_chunk_size=8,
        ),
    )
    got = run_gkd(tmp_path, "gkd_config", FromConfig)
    trainer = seen[0]
    assert (trainer.divkit_kind, trainer.divkit_temperature) == ("reverse_kl", 2.0)
    assert trainer.divkit_options["hard_weight"] == 0.1
    assert len(got) == len(want) == 6
    assert got == pytest.approx(want, rel=1e-6, abs=1e-7)


def test_divkit_distillation_config_equals_keywords(tmp_path, monkeypatch):
    import functools

    import trl

    import divkit.integrations.trl as dk_trl

    want = _run_distillation(
        tmp_path, "kw", dk_trl.DivkitDistillationTrainer, divkit_kind="forward_kl"
    )
    monkeypatch.setattr(
        trl,
        "DistillationConfig",
        functools.partial(dk_trl.DivkitDistillationConfig, divkit_kind="forward_kl"),
    )
    got = _run_distillation(tmp_path, "cfg", dk_trl.DivkitDistillationTrainer)
    keys = ("loss", "entropy")
    assert _losses_and_metrics(got, keys) == pytest.approx(
        _losses_and_metrics(want, keys), rel=1e-6, abs=1e-7
    )


@pytest.mark.parametrize(
    "trainer,fields",
    [
        ("DivkitTDPOTrainer", dict(tdpo_variant="tdpo1", tdpo_alpha=0.25)),
        (
            "DivkitSparsePOTrainer",
            dict(
                sparsepo_mask="shared",
                sparsepo_l1_reward=0.01,
                sparsepo_l1_kl=0.02,
                sparsepo_dropout=0.0,
            ),
        ),
    ],
)
def test_divkit_tdpo_sparsepo_configs_equal_keywords(tmp_path, monkeypatch, trainer, fields):
    import trl

    import divkit.integrations.trl as dk_trl

    base = getattr(dk_trl, trainer)
    config_cls = dk_trl.DivkitTDPOConfig if "TDPO" in trainer else dk_trl.DivkitSparsePOConfig

    class Keywords(base):
        def __init__(self, *a, **k):
            super().__init__(*a, **fields, **k)

    want = _run_dpo(tmp_path, "kw", Keywords, beta=0.5)
    monkeypatch.setattr(trl, "DPOConfig", config_cls)
    got = _run_dpo(tmp_path, "cfg", base, beta=0.5, **fields)
    keys = ("loss", "grad_norm", "rewards/margins", "sparsepo/reward_mask", "sparsepo/kl_mask")
    assert len(got) == len(want) == 3
    assert _losses_and_metrics(got, keys) == pytest.approx(
        _losses_and_metrics(want, keys), rel=1e-6, abs=1e-7
    )
    # Not the defaults: the options changed the loss.
    default = _run_dpo(tmp_path, "default", base, beta=0.5)
    assert abs(default[0]["loss"] - got[0]["loss"]) > 1e-6


def _run_kto(tmp_path, name, config_cls, **extra):
    import warnings

    import datasets

    import test_trl_client as client

    pairs = client.preference_data()
    data = datasets.Dataset.from_dict(
        {
            "prompt": list(pairs["prompt"]) * 2,
            "completion": list(pairs["chosen"]) + list(pairs["rejected"]),
            "label": [True] * len(pairs) + [False] * len(pairs),
        }
    )
    from divkit.integrations.trl import DivkitKTOTrainer

    tok = client.make_tokenizer()
    kwargs = client.common_args(tmp_path, name)
    kwargs["max_steps"] = 2
    fields = {k: v for k, v in extra.items() if k != "keyword"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = DivkitKTOTrainer(
            model=client.make_model(0, len(tok)),
            ref_model=client.make_model(1, len(tok)),
            args=config_cls(**kwargs, beta=0.5, max_length=32, **fields),
            train_dataset=data,
            processing_class=tok,
            **extra.get("keyword", {}),
        )
        trainer.train()
    return trainer, [h for h in trainer.state.log_history if "loss" in h]


def test_divkit_kto_config_equals_keyword(tmp_path, monkeypatch):
    from trl import KTOConfig

    import divkit.fused
    from divkit.integrations.trl import DivkitKTOConfig

    calls = []
    head = divkit.fused.fused_linear_logprobs

    def counting(*args, **kwargs):
        calls.append(1)
        return head(*args, **kwargs)

    monkeypatch.setattr(divkit.fused, "fused_linear_logprobs", counting)
    kw, want = _run_kto(tmp_path, "kw", KTOConfig, keyword=dict(divkit_fused_head=False))
    cfg, got = _run_kto(tmp_path, "cfg", DivkitKTOConfig, divkit_fused_head=False)
    assert not kw.divkit_fused_head and not cfg.divkit_fused_head and not calls  # TRL's head
    keys = ("loss", "grad_norm", "kl", "logps/chosen")
    assert _losses_and_metrics(got, keys) == pytest.approx(
        _losses_and_metrics(want, keys), rel=1e-6, abs=1e-7
    )
    fused, _ = _run_kto(tmp_path, "fused", DivkitKTOConfig)
    assert fused.divkit_fused_head and calls  # the default field: divkit's head


def test_divkit_keyword_disagreeing_with_config_raises(tmp_path, monkeypatch):
    """A keyword given with a divkit config must equal the field (one option, one place); an
    equal keyword is accepted; a stock TRL config takes the keywords (the other tests)."""
    import functools

    import trl
    import trl.experimental.gkd as gkd

    import divkit
    import divkit.integrations.trl as dk_trl

    def with_keywords(base, **extra):
        class Trainer(base):
            def __init__(self, *a, **k):
                super().__init__(*a, **extra, **k)

        return Trainer

    monkeypatch.setattr(trl, "DPOConfig", dk_trl.DivkitTDPOConfig)
    with pytest.raises(
        divkit.Error,
        match=r"DivkitTDPOTrainer: tdpo_variant='tdpo2' \(keyword\) disagrees with "
        r"args.tdpo_variant='tdpo1' \(DivkitTDPOConfig\)",
    ):
        _run_dpo(
            tmp_path,
            "bad",
            with_keywords(dk_trl.DivkitTDPOTrainer, tdpo_variant="tdpo2"),
            beta=0.5,
            tdpo_variant="tdpo1",
        )
    monkeypatch.setattr(trl, "DPOConfig", dk_trl.DivkitSparsePOConfig)
    with pytest.raises(divkit.Error, match="DivkitSparsePOTrainer: sparsepo_l1_kl=0.5"):
        _run_dpo(
            tmp_path,
            "bad",
            with_keywords(dk_trl.DivkitSparsePOTrainer, sparsepo_l1_kl=0.5),
            beta=0.5,
        )
    monkeypatch.setattr(gkd, "GKDConfig", functools.partial(dk_trl.DivkitGKDConfig))
    with pytest.raises(
        divkit.Error,
        match=r"DivkitGKDTrainer: divkit_options\['alpha'\]=0.5 disagrees with "
        r"args.divkit_alpha=0.1",
    ):
        run_gkd(
            tmp_path, "bad", with_keywords(dk_trl.DivkitGKDTrainer, divkit_options={"alpha": 0.5})
        )
    with pytest.raises(divkit.Error, match="DivkitGKDTrainer: divkit_kind='tvd' \\(keyword\\)"):
        run_gkd(tmp_path, "bad", with_keywords(dk_trl.DivkitGKDTrainer, divkit_kind="tvd"))
    # Equal values are accepted: the default kind given again as a keyword.
    seen = []

    class Equal(dk_trl.DivkitGKDTrainer):
        def __init__(self, *a, **k):
            super().__init__(*a, divkit_kind="jsd", divkit_options={"alpha": 0.1}, **k)
            seen.append(self)
            self.args.max_steps = 1

    run_gkd(tmp_path, "equal", Equal)
    assert seen[0].divkit_kind == "jsd"


def test_divkit_distillation_trainer_rejects_a_hard_label_term(tmp_path):
    """TRL's on-policy distillation passes a completion mask, not the next tokens: a hard-label
    term would silently be the cross-entropy against token 0, so it raises."""
    import divkit
    import divkit.integrations.trl as dk_trl

    with pytest.raises(
        divkit.Error, match="DivkitDistillationTrainer: divkit_options: hard_weight"
    ):
        _run_distillation(
            tmp_path,
            "bad",
            dk_trl.DivkitDistillationTrainer,
            divkit_options={"hard_weight": 0.5},
        )
