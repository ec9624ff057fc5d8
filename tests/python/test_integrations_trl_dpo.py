"""DivkitDPOTrainer with divkit's fused head (add_divkit_lm_head in place of TRL's) against the
stock DPOTrainer (TRL's own chunked head) on the same tiny Llama and data: losses, gradient norms
and every logged metric; and the proof that no [tokens x V] logits exist in divkit's step."""

import warnings

import pytest
import torch

pytest.importorskip("trl")
pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")

import test_trl_client as client  # noqa: E402  (the tiny models, data and config)

# A vocabulary size no other dimension of the tiny model has (hidden 32, MLP 64, head 8,
# sequences <= 32 tokens): a tensor whose last dimension is V holds logits.
V = 97
STEPS = 3


class _Heads:
    """Counts the calls of TRL's chunked head, of divkit's fused_linear_logprobs, and of the
    lm_head modules' own forward; watches every op's output for a last dimension of V."""

    def __init__(self, monkeypatch):
        import trl.trainer.utils as trl_utils
        from torch.utils._python_dispatch import TorchDispatchMode

        import divkit.fused

        self.trl = self.divkit = 0
        self.logit_shapes = []
        trl_head, dk_head = trl_utils._ChunkedLogProbFunction, divkit.fused.fused_linear_logprobs
        heads = self

        class CountingTRLHead:
            @staticmethod
            def apply(*args):
                heads.trl += 1
                return trl_head.apply(*args)

        def counting_head(*args, **kwargs):
            heads.divkit += 1
            return dk_head(*args, **kwargs)

        monkeypatch.setattr(trl_utils, "_ChunkedLogProbFunction", CountingTRLHead)
        monkeypatch.setattr(divkit.fused, "fused_linear_logprobs", counting_head)

        class Watch(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                for o in out if isinstance(out, (tuple, list)) else (out,):
                    if isinstance(o, torch.Tensor) and o.ndim >= 1 and o.shape[-1] == V:
                        heads.logit_shapes.append((str(func), tuple(o.shape)))
                return out

        self.watch = Watch


def _run(
    tmp_path, name, trainer_cls, heads=None, peft_config=None, ref=True, evaluate=False, **config
):
    from trl import DPOConfig

    tok = client.make_tokenizer()
    kwargs = client.common_args(tmp_path, name)
    kwargs["max_steps"] = STEPS
    if evaluate:
        kwargs.update(eval_strategy="steps", eval_steps=1, per_device_eval_batch_size=4)
    if peft_config is not None:
        kwargs["learning_rate"] = 5e-2
    config.setdefault("precompute_ref_log_probs", False)
    args = DPOConfig(**kwargs, max_length=32, **config)
    model = client.make_model(0, V)
    lm_heads = [model.lm_head]
    ref_model = client.make_model(1, V) if ref else None
    if ref_model is not None:
        lm_heads.append(ref_model.lm_head)
    module_calls = []
    for m in lm_heads:
        m.register_forward_hook(lambda mod, a, out: module_calls.append(tuple(out.shape)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = trainer_cls(
            model=model,
            ref_model=ref_model,
            args=args,
            train_dataset=client.preference_data(),
            eval_dataset=client.preference_data() if evaluate else None,
            processing_class=tok,
            peft_config=peft_config,
        )
        if heads is None:
            trainer.train()
        else:
            with heads.watch():
                trainer.train()
    key = "eval_loss" if evaluate else "loss"
    logs = [h for h in trainer.state.log_history if key in h]
    return logs, trainer, module_calls


def _assert_same_logs(ref, got, skip=()):
    assert len(ref) == len(got) == STEPS
    for step, (a, b) in enumerate(zip(ref, got)):
        assert set(a) == set(b), step  # TRL's full metric set is logged
        tol = dict(rel=1e-5, abs=1e-6) if step == 0 else dict(rel=2e-3, abs=2e-4)
        for key in a:
            if key in ("learning_rate", "epoch", "step") or key in skip:
                continue
            # grad_norm: the gradient of every parameter, through divkit's head and loss.
            assert b[key] == pytest.approx(a[key], **tol), (step, key, a[key], b[key])


DPO_CASES = {
    "sigmoid": dict(beta=0.5),
    "ipo": dict(beta=0.5, loss_type=["ipo"]),
    "hinge": dict(beta=0.5, loss_type=["hinge"]),
    "apo_zero": dict(beta=0.5, loss_type=["apo_zero"]),
    "f_dpo_alpha": dict(
        beta=0.5, f_divergence_type="alpha_divergence", f_alpha_divergence_coef=0.5
    ),
    "f_dpo_forward_kl": dict(beta=0.5, f_divergence_type="forward_kl"),
    "multi_loss": dict(
        beta=0.5, loss_type=["sigmoid", "bco_pair", "sft"], loss_weights=[0.8, 0.2, 1.0]
    ),
    # WPO: the weights come from log_sum_sq_probs of divkit's head.
    "wpo_sigmoid": dict(beta=0.5, use_weighting=True),
    "wpo_apo_zero_ld_alpha": dict(
        beta=0.5, loss_type=["apo_zero"], use_weighting=True, ld_alpha=0.3
    ),
    "ld_alpha": dict(beta=0.5, ld_alpha=0.5),
}


@pytest.mark.parametrize("case", sorted(DPO_CASES))
def test_divkit_dpo_trainer_fused_head_equals_stock_trl(tmp_path, case, monkeypatch):
    from trl import DPOTrainer

    from divkit.integrations.trl import DivkitDPOTrainer

    heads = _Heads(monkeypatch)
    ref, _, _ = _run(tmp_path, "trl", DPOTrainer, heads, **DPO_CASES[case])
    # Stock TRL: its head, policy and reference each step; its tiles are [tokens x V] logits.
    assert (heads.trl, heads.divkit) == (2 * STEPS, 0)
    assert any(len(s) == 2 and s[0] > 1 for _, s in heads.logit_shapes)
    heads.trl, heads.logit_shapes = 0, []
    got, trainer, lm_calls = _run(tmp_path, "divkit", DivkitDPOTrainer, heads, **DPO_CASES[case])
    assert trainer.divkit_heads == [True, True]  # policy and reference
    assert (heads.trl, heads.divkit) == (0, 2 * STEPS)
    # No tensor with the vocabulary as its last dimension was made in divkit's steps (forward
    # and backward): no logits, not even a chunk of them, outside the core's row buffers; the
    # lm_head modules were never called.
    assert heads.logit_shapes == [] and lm_calls == []
    _assert_same_logs(ref, got)


def test_divkit_dpo_trainer_evaluation_metrics_equal_stock_trl(tmp_path, monkeypatch):
    """The evaluation loop (prediction_step, compute_loss with return_outputs) through divkit's
    head: every eval metric equals stock TRL's after each training step."""
    from trl import DPOTrainer

    from divkit.integrations.trl import DivkitDPOTrainer

    heads = _Heads(monkeypatch)
    config = dict(beta=0.5, use_weighting=True, loss_type=["sigmoid", "ipo"])
    ref, _, _ = _run(tmp_path, "trl", DPOTrainer, evaluate=True, **config)
    assert heads.divkit == 0
    got, _, lm_calls = _run(tmp_path, "dk", DivkitDPOTrainer, evaluate=True, **config)
    assert heads.trl == 2 * STEPS * 3 and heads.divkit == 2 * STEPS * 3 and lm_calls == []
    assert {"eval_loss", "eval_entropy", "eval_rewards/margins"} <= set(ref[0])
    _assert_same_logs(ref, got, skip=("eval_runtime", "eval_samples_per_second",
                                      "eval_steps_per_second"))  # fmt: skip


def test_divkit_dpo_trainer_precomputed_reference_uses_divkit_head(tmp_path, monkeypatch):
    """precompute_ref_log_probs: TRL computes the reference log-probs in its __init__, from the
    policy before training (ref_model=None); divkit's head serves that pass too."""
    import datasets
    from trl import DPOTrainer

    from divkit.integrations.trl import DivkitDPOTrainer

    # Reference log-probs are cached by the dataset's and the model's fingerprints: a second
    # run would read the first's. Without caching each run computes its own.
    was = datasets.is_caching_enabled()
    datasets.disable_caching()
    try:
        heads = _Heads(monkeypatch)
        config = dict(beta=0.5, precompute_ref_log_probs=True, loss_type=["sigmoid", "ipo"])
        ref, _, _ = _run(tmp_path, "trl", DPOTrainer, heads, ref=False, **config)
        n_trl = heads.trl
        assert n_trl > STEPS and heads.divkit == 0  # the precompute pass, then the policy
        heads.trl = 0
        got, trainer, lm_calls = _run(tmp_path, "dk", DivkitDPOTrainer, heads, ref=False, **config)
    finally:
        if was:
            datasets.enable_caching()
    assert trainer.divkit_heads == [True]
    assert heads.trl == 0 and heads.divkit == n_trl and lm_calls == []
    _assert_same_logs(ref, got)


def test_divkit_dpo_trainer_peft_reference_fused_head(tmp_path, monkeypatch):
    """A LoRA adapter trained, the reference its disabled-adapter forward (ref_model=None):
    divkit's head sits on the PEFT base model, as TRL puts its own; every metric equals stock
    TRL's."""
    peft = pytest.importorskip("peft")
    from trl import DPOTrainer

    from divkit.integrations.trl import DivkitDPOTrainer

    def lora():
        return peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])

    heads = _Heads(monkeypatch)
    config = dict(beta=0.5, use_weighting=True)
    ref, _, _ = _run(tmp_path, "trl", DPOTrainer, heads, peft_config=lora(), ref=False, **config)
    assert heads.trl == 2 * STEPS
    heads.trl, heads.logit_shapes = 0, []
    got, trainer, lm_calls = _run(
        tmp_path, "dk", DivkitDPOTrainer, heads, peft_config=lora(), ref=False, **config
    )
    assert trainer.divkit_heads == [True]
    assert (heads.trl, heads.divkit) == (0, 2 * STEPS)
    assert heads.logit_shapes == [] and lm_calls == []
    assert abs(ref[-1]["rewards/margins"]) > 1e-4  # the adapter moved away from the reference
    _assert_same_logs(ref, got)


def test_divkit_dpo_trainer_keeps_trl_head_when_asked_or_unsupported(tmp_path, monkeypatch):
    """divkit_fused_head=False keeps TRL's head; a model divkit's head cannot serve (here a
    final logit softcap) keeps TRL's head with a warning, and the results are stock TRL's."""
    from trl import DPOTrainer

    import divkit.integrations.trl as dk_trl

    heads = _Heads(monkeypatch)
    _, trainer, _ = _run(
        tmp_path, "off", lambda **kw: dk_trl.DivkitDPOTrainer(**kw, divkit_fused_head=False)
    )
    assert trainer.divkit_heads == [] and heads.divkit == 0 and heads.trl == 2 * STEPS

    make = client.make_model

    def softcapped(seed, vocab):
        m = make(seed, vocab)
        m.config.final_logit_softcapping = 3.0
        return m

    monkeypatch.setattr(client, "make_model", softcapped)
    monkeypatch.setattr(dk_trl, "_HEAD_WARNED", [])
    heads.trl = 0
    ref, _, _ = _run(tmp_path, "trl", DPOTrainer, beta=0.5)
    with pytest.warns(UserWarning, match="final logit softcap"):
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            trainer = _warned_trainer(tmp_path, dk_trl.DivkitDPOTrainer)
    assert trainer.divkit_heads == [False, False] and heads.divkit == 0
    trainer.train()
    got = [h for h in trainer.state.log_history if "loss" in h]
    _assert_same_logs(ref, got)


def _warned_trainer(tmp_path, cls):
    from trl import DPOConfig

    tok = client.make_tokenizer()
    kwargs = client.common_args(tmp_path, "capped")
    kwargs["max_steps"] = STEPS
    args = DPOConfig(**kwargs, max_length=32, beta=0.5, precompute_ref_log_probs=False)
    return cls(
        model=client.make_model(0, V),
        ref_model=client.make_model(1, V),
        args=args,
        train_dataset=client.preference_data(),
        processing_class=tok,
    )


def test_divkit_dpo_trainer_bad_fused_head_option(tmp_path):
    import divkit
    from divkit.integrations.trl import DivkitDPOTrainer

    with pytest.raises(divkit.Error, match="DivkitDPOTrainer: divkit_fused_head"):
        _run(tmp_path, "bad", lambda **kw: DivkitDPOTrainer(**kw, divkit_fused_head="yes"))


ALL_OUTPUTS = ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1")


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("shifted", [False, True])
def test_add_divkit_lm_head_equals_trl_fused_head(temperature, shifted):
    """Every field of TRL's FusedCausalLMOutput, and the gradients of the differentiable ones,
    from divkit's head equal TRL's add_fused_lm_head on the same model and labels; the top-1
    flags include labels tied with an earlier token (duplicated lm_head rows)."""
    import copy

    from trl.trainer.utils import add_fused_lm_head

    from divkit.integrations.trl import add_divkit_lm_head

    base = client.make_model(0, V)
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(4, V, (3, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[2, 9:] = 0
    with torch.no_grad():
        # Tokens 7, 40 and 41 share one lm_head row, the mean last hidden state scaled up: they
        # tie as the argmax at most positions, token 7 the first of them.
        hid = base.model(input_ids=ids, attention_mask=mask).last_hidden_state
        row = 4.0 * hid.mean((0, 1)) / hid.mean((0, 1)).norm()
        base.lm_head.weight[[7, 40, 41]] = row
        top = base(input_ids=ids, attention_mask=mask).logits.argmax(-1)
    trl_model, dk_model = base, copy.deepcopy(base)
    add_fused_lm_head(trl_model, temperature=temperature, outputs=ALL_OUTPUTS)
    assert add_divkit_lm_head(dk_model, temperature=temperature, outputs=ALL_OUTPUTS)
    # Labels: position i predicts label i + 1; the argmax token 7 at every third position,
    # its tied twins 40 / 41 (later indices, never top-1) at others, random ones elsewhere.
    labels = ids.clone()
    nxt = torch.nn.functional.pad(top[:, :-1], (1, 0), value=0)  # the argmax for label i
    labels[:, 2::3] = nxt[:, 2::3]
    labels[:, 3::3] = torch.where(nxt[:, 3::3] == 7, 40, labels[:, 3::3])
    labels[:, 4::3] = torch.where(nxt[:, 4::3] == 7, 41, labels[:, 4::3])
    labels[:, :2] = -100
    labels[2, 9:] = -100
    valid = labels != -100
    assert ((labels == 7) & valid).sum() >= 3 and (
        ((labels == 40) | (labels == 41)) & valid
    ).sum() >= 3
    kw = dict(input_ids=ids, attention_mask=mask, fused_lm_head=True)
    if shifted:
        shift = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=-100)
        kw["shift_labels"] = shift
    else:
        kw["labels"] = labels
    a, b = trl_model(**kw), dk_model(**kw)
    assert torch.equal(a.label_mask, b.label_mask)
    assert b.is_top1.dtype == torch.bool and torch.equal(a.is_top1, b.is_top1)
    assert 0 < int(a.is_top1.sum()) < int(a.label_mask.sum())  # both ways
    # Where the label is a later twin of the argmax the flag is False, as torch.argmax says.
    shifted_labels = kw["shift_labels"] if shifted else labels[:, 1:]
    twins = (shifted_labels == 40) | (shifted_labels == 41)
    assert twins.any() and not b.is_top1[twins].any()
    assert b.is_top1[shifted_labels == 7].all()
    for name in ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits"):
        x, y = getattr(a, name), getattr(b, name)
        assert x.shape == y.shape, name
        torch.testing.assert_close(y, x, rtol=2e-5, atol=2e-5, msg=name)
    for name in ("log_sum_sq_probs", "mean_logits", "is_top1"):
        assert not getattr(b, name).requires_grad, name
    torch.testing.assert_close(b.loss, a.loss, rtol=1e-5, atol=1e-6)
    (a.log_probs.sum() + 0.3 * a.entropy.sum()).backward()
    (b.log_probs.sum() + 0.3 * b.entropy.sum()).backward()
    # fp32 tolerance relative to each gradient's scale (the peaked rows of the tied tokens make
    # some gradients large: both heads are up to ~3e-7 of the scale from an fp64 reference).
    for (name, pa), pb in zip(trl_model.named_parameters(), dk_model.parameters()):
        atol = 1e-5 * float(pa.grad.abs().max())
        torch.testing.assert_close(pb.grad, pa.grad, rtol=1e-4, atol=atol, msg=lambda m: name + m)


def test_add_divkit_lm_head_rejects_unknown_output():
    import divkit
    from divkit.integrations.trl import add_divkit_lm_head

    with pytest.raises(divkit.Error, match="add_divkit_lm_head: outputs: 'logits'"):
        add_divkit_lm_head(client.make_model(0, V), outputs=("log_probs", "logits"))


def test_divkit_dpo_config_selects_the_head(tmp_path):
    """DivkitDPOConfig's divkit_fused_head picks the head as the keyword does; a keyword that
    disagrees with the config raises instead of silently winning."""
    import divkit
    from divkit.integrations.trl import DivkitDPOConfig, DivkitDPOTrainer

    def make(fused, **kw):
        args = DivkitDPOConfig(
            **client.common_args(tmp_path, f"cfg{fused}"),
            max_length=32,
            precompute_ref_log_probs=False,
            divkit_fused_head=fused,
        )
        return DivkitDPOTrainer(
            model=client.make_model(0, V),
            ref_model=client.make_model(1, V),
            args=args,
            train_dataset=client.preference_data(),
            processing_class=client.make_tokenizer(),
            **kw,
        )

    assert make(True).divkit_heads == [True, True]
    assert make(False).divkit_heads == []
    with pytest.raises(divkit.Error, match="disagrees with args.divkit_fused_head"):
        make(False, divkit_fused_head=True)
