"""divkit as a loss inside TRL's real trainers (trl 1.16, transformers, datasets; no downloads).

DPO: TRL's ``DPOTrainer`` trains a tiny randomly initialized ``LlamaForCausalLM`` (2 layers,
hidden 32, a word-level tokenizer built here) on a few preference pairs, once unmodified and once
as a subclass whose ``_compute_loss`` is divkit's: the per-token log-probs of the completions by
``divkit.fused_linear_logprobs`` (the model's last hidden states and its lm_head, no logits
tensor) and the loss by ``divkit.dpo_loss``. TRL 1.16 computes the DPO loss inline in
``DPOTrainer._compute_loss`` (no separate method takes the log-probs), so that method is the one
replaced; the subclass reads the same batch (the collator's ``completion_mask``, chosen and
rejected stacked) and returns the mean per-pair loss, as TRL does. The reference model is a
second random model (a copy of the policy would make every step-0 loss log 2). The two runs
start from the same weights and see the same batches (same seed), so their logged losses must
agree at step 0 (and, more loosely, after) and fall.

GKD: TRL's ``GKDTrainer`` (trl.experimental.gkd) calls its static ``generalized_jsd_loss``
on the student's and teacher's logits; the subclass swaps in ``divkit.divergence(..., "jsd")``.
With ``lmbda=0`` (no on-policy generation) both runs see the same batches.
"""

from __future__ import annotations

import os
import warnings

import pytest
import torch

import divkit

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_DISABLED", "true")

transformers = pytest.importorskip("transformers")
trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")
tokenizers = pytest.importorskip("tokenizers")

WORDS = [
    "the",
    "cat",
    "dog",
    "sat",
    "ran",
    "on",
    "mat",
    "log",
    "a",
    "big",
    "small",
    "red",
    "blue",
    "and",
    "then",
    "slept",
    "ate",
    "fish",
    "good",
    "bad",
]
SPECIAL = ["<pad>", "<eos>", "<unk>", "<bos>"]


def make_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {t: i for i, t in enumerate(SPECIAL + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        eos_token="<eos>",
        unk_token="<unk>",
        bos_token="<bos>",
    )
    # Special tokens are split off before the pre-tokenizer, so "cat<eos>" (TRL appends the
    # EOS without a space) is two tokens.
    fast.add_special_tokens({"additional_special_tokens": ["<eos>"]})
    fast.padding_side = "left"
    return fast


def make_model(seed, vocab_size):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=64,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=3,
    )
    return transformers.LlamaForCausalLM(cfg).float()


def preference_data():
    pairs = [
        ("the cat", "sat on the mat", "ran on the log"),
        ("a dog", "ate the fish", "slept"),
        ("the big dog", "ran and then slept", "sat"),
        ("a small cat", "ate a red fish", "ran on a blue log"),
        ("the red cat", "slept on the mat", "ate the dog"),
        ("a blue dog", "sat then slept", "ran"),
        ("the small dog", "ate good fish", "ate bad fish"),
        ("a big cat", "sat on a big mat", "ran"),
    ]
    return datasets.Dataset.from_dict(
        {
            "prompt": [p for p, _, _ in pairs],
            "chosen": [" " + c for _, c, _ in pairs],
            "rejected": [" " + r for _, _, r in pairs],
        }
    )


class LossLog(transformers.TrainerCallback):
    def __init__(self):
        self.losses = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.losses.append(float(logs["loss"]))


def common_args(tmp_path, name):
    return dict(
        output_dir=str(tmp_path / name),
        per_device_train_batch_size=4,
        max_steps=6,
        learning_rate=5e-3,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        bf16=False,
        fp16=False,
        gradient_checkpointing=False,
        seed=0,
        data_seed=0,
        dataloader_num_workers=0,
        disable_tqdm=True,
        lr_scheduler_type="constant",
        warmup_steps=0,
    )


# ---------------------------------------------------------------------------------------------
# DPO
# ---------------------------------------------------------------------------------------------


def run_dpo(tmp_path, name, trainer_cls):
    from trl import DPOConfig

    tok = make_tokenizer()
    model = make_model(0, len(tok))
    ref = make_model(1, len(tok))
    args = DPOConfig(
        **common_args(tmp_path, name), beta=0.5, max_length=32, precompute_ref_log_probs=False
    )
    log = LossLog()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = trainer_cls(
            model=model,
            ref_model=ref,
            args=args,
            train_dataset=preference_data(),
            processing_class=tok,
            callbacks=[log],
        )
        trainer.train()
    return log.losses, trainer


def divkit_dpo_trainer_cls():
    from trl import DPOTrainer

    class DivkitDPOTrainer(DPOTrainer):
        """DPOTrainer with divkit's log-probs (fused lm_head) and divkit's DPO loss."""

        calls = 0

        @staticmethod
        def _sequence_logps(model, inputs, labels):
            backbone = model.get_decoder() if hasattr(model, "get_decoder") else model.model
            hidden = backbone(
                input_ids=inputs["input_ids"],
                attention_mask=inputs["attention_mask"],
                use_cache=False,
            ).last_hidden_state
            # Token t+1 is scored by the hidden state at t; completion tokens only.
            per_token = divkit.fused_linear_logprobs(
                hidden[:, :-1], model.lm_head.weight, labels[:, 1:]
            )
            return per_token.sum(dim=1)

        def _compute_loss(self, model, inputs, return_outputs):
            assert not return_outputs and self.loss_types == ["sigmoid"]
            labels = inputs["input_ids"].masked_fill(inputs["completion_mask"] == 0, -100)
            logps = self._sequence_logps(model, inputs, labels)
            with torch.no_grad():
                ref_logps = self._sequence_logps(self.ref_model, inputs, labels)
            chosen, rejected = logps.chunk(2)  # the collator stacks [chosen, rejected]
            ref_chosen, ref_rejected = ref_logps.chunk(2)
            losses, _, _ = divkit.dpo_loss(
                chosen, rejected, ref_chosen, ref_rejected, beta=self.beta
            )
            type(self).calls += 1
            return losses.mean()

    return DivkitDPOTrainer


def test_dpo_trainer_with_divkit_loss(tmp_path):
    from trl import DPOTrainer

    trl_losses, _ = run_dpo(tmp_path, "trl", DPOTrainer)
    cls = divkit_dpo_trainer_cls()
    dk_losses, _ = run_dpo(tmp_path, "divkit", cls)
    assert cls.calls == 6  # divkit's loss was the one trained on, every step
    assert len(trl_losses) == len(dk_losses) == 6
    assert all(torch.isfinite(torch.tensor(dk_losses)))
    # Step 0: same weights, same batch; the loss is not the trivial log 2 of a copied reference.
    assert abs(trl_losses[0] - 0.6931) > 1e-3
    assert dk_losses[0] == pytest.approx(trl_losses[0], rel=1e-5, abs=1e-6)
    # The trajectories stay together (fp32 round-off grows through the optimizer steps).
    assert dk_losses == pytest.approx(trl_losses, rel=2e-3, abs=2e-4)
    # And the loss falls: the last two steps (one pass over each batch) below the first two.
    assert sum(dk_losses[-2:]) < sum(dk_losses[:2]) - 0.05


# ---------------------------------------------------------------------------------------------
# GKD
# ---------------------------------------------------------------------------------------------


def run_gkd(tmp_path, name, trainer_cls):
    from trl.experimental.gkd import GKDConfig

    tok = make_tokenizer()
    tok.chat_template = (
        "{% for m in messages %}{{ m['role'] }} {{ m['content'] }} "
        "{% endfor %}{% if add_generation_prompt %}assistant {% endif %}"
    )
    tok.add_tokens(["user", "assistant"])
    student = make_model(0, len(tok))
    teacher = make_model(1, len(tok))
    with torch.no_grad():  # a confident teacher: a JSD far from the near-uniform students'
        teacher.lm_head.weight.mul_(30.0)
    rows = [
        ("the cat", "sat on the mat"),
        ("a dog", "ate the fish"),
        ("the big dog", "ran and then slept"),
        ("a small cat", "ate a red fish"),
        ("the red cat", "slept on the mat"),
        ("a blue dog", "sat then slept"),
        ("the small dog", "ate good fish"),
        ("a big cat", "sat on a big mat"),
    ]
    data = datasets.Dataset.from_dict(
        {
            "messages": [
                [{"role": "user", "content": p}, {"role": "assistant", "content": c}]
                for p, c in rows
            ]
        }
    )
    args = GKDConfig(
        **common_args(tmp_path, name), lmbda=0.0, beta=0.5, temperature=1.0, max_length=32
    )
    log = LossLog()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = trainer_cls(
            model=student,
            teacher_model=teacher,
            args=args,
            train_dataset=data,
            processing_class=tok,
            callbacks=[log],
        )
        trainer.train()
    return log.losses


def test_gkd_trainer_with_divkit_loss(tmp_path):
    try:
        from trl.experimental.gkd import GKDTrainer
    except Exception as e:  # pragma: no cover - depends on the installed TRL
        pytest.skip(f"trl.experimental.gkd.GKDTrainer not importable: {e}")

    calls = []

    class DivkitGKDTrainer(GKDTrainer):
        @staticmethod
        def generalized_jsd_loss(
            student_logits,
            teacher_logits,
            labels=None,
            beta=0.5,
            temperature=1.0,
            reduction="batchmean",
            num_items_in_batch=None,
        ):
            # TRL: the sum over the non-ignored tokens divided by num_items_in_batch when the
            # Trainer passes it, else by their number ("batchmean" with labels): divkit's
            # "mean" with labels, whose divisor num_items_in_batch replaces the same way.
            assert labels is not None and reduction == "batchmean"
            calls.append(num_items_in_batch)
            return divkit.divergence(
                student_logits,
                teacher_logits.detach(),
                "jsd",
                beta=beta,
                temperature=temperature,
                labels=labels,
                reduction="mean",
                num_items_in_batch=num_items_in_batch,
            )

    trl_losses = run_gkd(tmp_path, "gkd_trl", GKDTrainer)
    dk_losses = run_gkd(tmp_path, "gkd_divkit", DivkitGKDTrainer)
    assert len(calls) == 6 and len(trl_losses) == len(dk_losses) == 6
    assert all(torch.isfinite(torch.tensor(dk_losses)))
    assert dk_losses[0] == pytest.approx(trl_losses[0], rel=1e-5, abs=1e-6)
    assert dk_losses == pytest.approx(trl_losses, rel=2e-3, abs=2e-4)
    assert trl_losses[0] > 0.05
    assert sum(dk_losses[-2:]) < 0.9 * sum(dk_losses[:2])
