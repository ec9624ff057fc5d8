"""divkit.integrations.hf against the stock transformers models and Trainer (tiny models built
from configs, fp32): the patched forward's loss and gradients, and Trainer with divkit's
compute_loss_func over a few steps with gradient accumulation (num_items_in_batch)."""

import copy
import math

import pytest
import torch

import divkit

tf = pytest.importorskip("transformers")
from divkit.integrations import hf  # noqa: E402

COMMON = dict(
    vocab_size=64,
    hidden_size=16,
    intermediate_size=32,
    num_hidden_layers=1,
    num_attention_heads=2,
    num_key_value_heads=1,
    max_position_embeddings=32,
)

CONFIGS = {
    "llama": lambda: tf.LlamaConfig(**COMMON),
    "qwen2": lambda: tf.Qwen2Config(**COMMON),
    "mistral": lambda: tf.MistralConfig(**COMMON),
    "gemma": lambda: tf.GemmaConfig(head_dim=8, **COMMON),
    "gemma2": lambda: tf.Gemma2Config(head_dim=8, final_logit_softcapping=5.0, **COMMON),
    "phi3": lambda: tf.Phi3Config(pad_token_id=0, eos_token_id=1, bos_token_id=1, **COMMON),
}


def _model(name):
    torch.manual_seed(0)
    return tf.AutoModelForCausalLM.from_config(CONFIGS[name]()).train()


def _batch(seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 64, (2, 7), generator=g)
    labels = ids.clone()
    labels[0, :2] = -100
    return ids, labels


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_patched_forward_equals_stock(name):
    stock = _model(name)
    patched = hf.apply_divkit_kernel(copy.deepcopy(stock))
    ids, labels = _batch()
    for kwargs in ({}, {"num_items_in_batch": torch.tensor(9)}):
        stock.zero_grad()
        patched.zero_grad()
        ref = stock(input_ids=ids, labels=labels, **kwargs)
        out = patched(input_ids=ids, labels=labels, **kwargs)
        assert out.logits is None
        torch.testing.assert_close(out.loss, ref.loss, rtol=1e-6, atol=1e-6)
        ref.loss.backward()
        out.loss.backward()
        for (pname, a), b in zip(stock.named_parameters(), patched.parameters()):
            torch.testing.assert_close(b.grad, a.grad, rtol=1e-5, atol=1e-7, msg=pname)
    # Without labels: the stock forward, logits and all.
    with torch.no_grad():
        torch.testing.assert_close(patched(input_ids=ids).logits, stock(input_ids=ids).logits)
    hf.revert_divkit_kernel(patched)
    assert patched(input_ids=ids, labels=labels).logits is not None


def test_apply_checks_the_class():
    model = _model("llama")
    with pytest.raises(divkit.Error, match="expected a Qwen2ForCausalLM"):
        hf.apply_divkit_kernel_to_qwen2(model)
    hf.apply_divkit_kernel_to_llama(model)
    cls = type("MyLM", (type(model),), {})
    with pytest.raises(divkit.Error, match="MyLM is not one of the tested classes"):
        hf.apply_divkit_kernel(cls(model.config))


class _Rows(torch.utils.data.Dataset):
    def __init__(self, n=8, t=7, seed=2):
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(0, 64, (n, t), generator=g)
        self.labels = self.ids.clone()
        self.labels[::3, :3] = -100  # uneven token counts per micro-batch

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.labels[i]}


def _train(tmp_path, model, trainer_cls=None, **trainer_kwargs):
    args = tf.TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
        max_steps=3,
        learning_rate=1e-2,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        seed=0,
        data_seed=0,
        disable_tqdm=True,
    )
    cls = tf.Trainer if trainer_cls is None else trainer_cls
    trainer = cls(model=model, args=args, train_dataset=_Rows(), **trainer_kwargs)
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return losses, model


def test_trainer_compute_loss_func_equals_stock_trainer(tmp_path):
    ref_losses, ref_model = _train(tmp_path / "stock", _model("llama"))
    model = _model("llama")
    loss_func = hf.FusedCrossEntropyLoss(model)
    seen = []

    def counting(outputs, labels, num_items_in_batch=None):
        seen.append((outputs.logits.shape[1], num_items_in_batch))
        return loss_func(outputs, labels, num_items_in_batch=num_items_in_batch)

    losses, model = _train(tmp_path / "divkit", model, compute_loss_func=counting)
    loss_func.remove()
    # 3 steps x 2 micro-batches; logits of one position only; the trainer's token count.
    assert len(seen) == 6
    assert all(keep == 1 and n is not None for keep, n in seen)
    assert len(losses) == len(ref_losses) == 3
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses), rtol=1e-5, atol=1e-6)
    for (name, a), b in zip(ref_model.named_parameters(), model.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6, msg=name)


def test_trainer_with_patched_model_equals_stock_trainer(tmp_path):
    ref_losses, ref_model = _train(tmp_path / "stock", _model("qwen2"))
    losses, model = _train(tmp_path / "divkit", hf.apply_divkit_kernel(_model("qwen2")))
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses), rtol=1e-5, atol=1e-6)
    for (name, a), b in zip(ref_model.named_parameters(), model.parameters()):
        if name.endswith("k_proj.bias"):
            # Its exact gradient is 0 (a key bias shifts each query's scores by a constant, which
            # the softmax ignores): both runs step on rounding noise, which Adam normalizes, so
            # the two differ by the noise's SIMD-dependent bits, not by divkit's loss.
            assert (b - a).abs().max() < 1e-4, name
            continue
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("kind", ["forward_kl", "jsd"])
def test_trainer_fused_distillation_loss_equals_plain_torch_kd(tmp_path, kind):
    """FusedDistillationLoss against a Trainer whose compute_loss distills with materialized
    logits in plain torch (fp64 log-softmax): the same losses over three steps with gradient
    accumulation (num_items_in_batch), the same parameters after them."""
    torch.manual_seed(5)
    teacher = tf.AutoModelForCausalLM.from_config(CONFIGS["llama"]()).eval()
    beta, hard = 0.3, 0.25

    def plain(model, inputs, num_items_in_batch):
        logits = model(input_ids=inputs["input_ids"]).logits.double()
        with torch.no_grad():
            t_logits = teacher(input_ids=inputs["input_ids"]).logits.double()
        labels = torch.nn.functional.pad(inputs["labels"], (0, 1), value=-100)[:, 1:]
        mask = labels != -100
        q, p = logits.log_softmax(-1), t_logits.log_softmax(-1)
        if kind == "forward_kl":
            soft = (p.exp() * (p - q)).sum(-1)
        else:  # generalized JSD, m = beta p + (1 - beta) q
            m = torch.logsumexp(torch.stack([p + math.log(beta), q + math.log(1 - beta)]), 0)
            soft = beta * (p.exp() * (p - m)).sum(-1) + (1 - beta) * (q.exp() * (q - m)).sum(-1)
        ce = -q.gather(-1, labels.clamp(min=0)[..., None])[..., 0]
        per_token = (hard * ce + soft) * mask
        return (per_token.sum() / num_items_in_batch).float()

    class PlainKD(tf.Trainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            return plain(model, inputs, num_items_in_batch)

    ref_losses, ref_model = _train(tmp_path / "plain", _model("llama"), trainer_cls=PlainKD)
    model = _model("llama")
    loss_func = hf.FusedDistillationLoss(model, teacher, kind, beta=beta, hard_weight=hard)
    losses, model = _train(tmp_path / "divkit", model, compute_loss_func=loss_func)
    loss_func.remove()
    assert len(losses) == len(ref_losses) == 3
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses), rtol=1e-5, atol=1e-6)
    # The reference's gradients are fp64-exact, divkit's fp32: Adam's normalization magnifies
    # the rounding of near-zero gradient entries, so the parameters agree to 1e-5 absolute.
    for (name, a), b in zip(ref_model.named_parameters(), model.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5, msg=name)
