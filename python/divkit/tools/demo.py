"""``divkit demo``: the main job, end to end, on data generated here (nothing is downloaded).

1. **Data.** A synthetic "language" over 256 tokens whose next-token distribution is a fixed
   random nonlinear function of the previous 3 tokens (:class:`Source`). Three disjoint samples:
   a corpus for the teacher, a small transfer set for the students, a held-out set.
2. **Distillation through the fused linear head.** A teacher MLP language model
   (:class:`TinyLM`: embeddings -> MLP -> hidden states -> lm_head) is trained on the corpus with
   :func:`divkit.fused_linear_cross_entropy`; then a 7x smaller student is trained on the
   transfer set, from the same initialization each time, once on the hard labels only (the
   baseline, :func:`divkit.fused_linear_cross_entropy`) and once per divergence with
   :func:`divkit.fused_linear_divergence` from the two models' hidden states and lm_head
   weights (forward KL, reverse KL, JSD, skew KL, TVD by default): the ``[tokens x V]`` logits
   of the loss are never materialized. After every epoch the student's held-out perplexity and
   KL(p_teacher || q_student) are measured in plain PyTorch fp64 (independently of divkit).
3. **Alignment.** The distilled student with the lowest KL to the teacher becomes the reference
   policy. Completions of 8 tokens after 3-token prompts are sampled from it; a known reward
   (the fraction of completion tokens in a fixed random half of the vocabulary, the "good"
   tokens) labels pairs of completions (the higher reward is chosen, ties dropped). The policy
   is trained from the reference with DPO (:func:`divkit.preference_loss`, sequence log-probs
   from :func:`divkit.fused_linear_logprobs`), f-DPO with the Jensen-Shannon divergence
   (``f_divergence_type="js_divergence"``) and TDPO2 (:func:`divkit.tdpo_loss_fused`, policy
   and reference from hidden states). Every few steps the policy's own samples are scored:
   the true reward, and the sequence-level KL(pi || pi_ref) (the exact per-token KL over the
   vocabulary summed over each sampled completion, averaged over samples; plain PyTorch fp64).
4. **Report.** A progress bar (tqdm) on every training loop; ``curves.png`` (matplotlib, Agg),
   ``report.md`` and ``report.json`` in the output folder, whose path is printed at the end.

Entry points: :func:`run_demo` (everything; returns the report dict), :func:`main` (the
``divkit demo`` command). :class:`DemoConfig` holds every size, so a test can run a tiny one.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import json
import math
import os
import platform
import stat
import sys
import tempfile
import time
from typing import Dict, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

import divkit
from divkit.tools import require

VOCAB = 256
CONTEXT = 3

#: (kind, options of :func:`divkit.fused_linear_divergence`): the default divergences.
#: Directions: forward_kl = KL(p_teacher || q_student), reverse_kl = KL(q_student || p_teacher).
DEFAULT_KINDS: Tuple[Tuple[str, Dict[str, float]], ...] = (
    ("forward_kl", {}),  # classic KD, mean-seeking
    ("reverse_kl", {}),  # MiniLLM, mode-seeking
    ("jsd", {"beta": 0.5}),  # generalized JSD (GKD, TRL's beta)
    ("skew_forward_kl", {"alpha": 0.1}),  # DistiLLM's skew KL: KL(p || 0.1 p + 0.9 q)
    ("tvd", {}),  # total variation
)
_KIND_OPTIONS = {k: o for k, o in DEFAULT_KINDS}
_KIND_OPTIONS.update({"skew_reverse_kl": {"alpha": 0.1}})

#: Alignment methods: DPO (Rafailov et al. 2023), f-DPO with the JS divergence (Wang et al.
#: 2023, "Beyond Reverse KL"), TDPO2 (Zeng et al. 2024).
METHODS = ("dpo", "fdpo_js", "tdpo2")
_METHOD_LABELS = {"dpo": "DPO", "fdpo_js": "f-DPO (JS)", "tdpo2": "TDPO2"}


@dataclasses.dataclass
class DemoConfig:
    """Every size of the demo. The defaults are the main job (about a minute of training on 2
    cores); :meth:`tiny` is a configuration for tests (a few seconds)."""

    seed: int = 0
    # data: sequences x tokens per sequence
    corpus_seqs: int = 1000
    transfer_seqs: int = 200
    test_seqs: int = 200
    seq_len: int = 100
    # teacher (emb, hidden, layers) and student
    teacher_size: Tuple[int, int, int] = (32, 256, 2)
    student_size: Tuple[int, int, int] = (16, 64, 1)
    teacher_epochs: int = 6
    student_epochs: int = 12
    temperature: float = 1.0
    kinds: Tuple[Tuple[str, Dict[str, float]], ...] = DEFAULT_KINDS
    # alignment
    methods: Tuple[str, ...] = METHODS
    completion_len: int = 8
    train_prompts: int = 2048
    eval_prompts: int = 512
    align_steps: int = 200
    align_batch: int = 64
    align_lr: float = 1e-3
    align_beta: float = 0.1
    tdpo_alpha: float = 0.5
    eval_every: int = 20
    # runtime
    threads: int = 1
    progress: bool = True

    @classmethod
    def tiny(cls, **overrides) -> "DemoConfig":
        cfg = cls(
            corpus_seqs=120,
            transfer_seqs=40,
            test_seqs=40,
            seq_len=50,
            teacher_size=(16, 96, 1),
            student_size=(8, 32, 1),
            teacher_epochs=4,
            student_epochs=4,
            train_prompts=256,
            eval_prompts=128,
            align_steps=30,
            align_batch=32,
            align_lr=3e-3,
            eval_every=10,
        )
        return dataclasses.replace(cfg, **overrides)


# ---------------------------------------------------------------------------------------------
# Data: the synthetic language
# ---------------------------------------------------------------------------------------------


class Source:
    """A fixed random next-token distribution P(x_t | x_{t-3}, x_{t-2}, x_{t-1}):
    ``logits = sharpness * W2 tanh(W1 [e(x_{t-3}); e(x_{t-2}); e(x_{t-1})]) + b`` with a
    Zipf-like bias ``b`` (some tokens are frequent); its entropy is a few nats per token."""

    def __init__(
        self, gen: torch.Generator, emb: int = 8, hidden: int = 64, sharpness: float = 5.0
    ):
        self.e = torch.randn(VOCAB, emb, generator=gen)
        self.w1 = torch.randn(CONTEXT * emb, hidden, generator=gen) / math.sqrt(CONTEXT * emb)
        self.w2 = torch.randn(hidden, VOCAB, generator=gen) / math.sqrt(hidden)
        ranks = torch.randperm(VOCAB, generator=gen).float() + 1.0
        self.bias = -0.5 * torch.log(ranks)
        self.sharpness = sharpness

    def logits(self, ctx: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.e[ctx].flatten(-2) @ self.w1)
        return self.sharpness * (h @ self.w2) + self.bias

    def sample(self, n_seq: int, length: int, gen: torch.Generator):
        """``n_seq`` sequences of ``length`` tokens after a random 3-token prefix, as
        (contexts ``[n_seq * length, 3]``, next tokens ``[n_seq * length]``)."""
        seq = torch.randint(0, VOCAB, (n_seq, CONTEXT), generator=gen)
        ctxs, nexts = [], []
        for _ in range(length):
            ctx = seq[:, -CONTEXT:]
            nxt = torch.multinomial(torch.softmax(self.logits(ctx), -1), 1, generator=gen)
            ctxs.append(ctx)
            nexts.append(nxt[:, 0])
            seq = torch.cat([ctx, nxt], dim=1)
        return torch.cat(ctxs), torch.cat(nexts)


# ---------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------


class TinyLM(nn.Module):
    """A fixed-context MLP language model with an explicit lm_head, so that the losses can be
    fused with it: ``hidden(ctx)`` ``[..., 3] -> [..., H]``, ``head`` ``H -> V``."""

    def __init__(self, emb: int, hidden: int, layers: int):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, emb)
        mods, width = [], CONTEXT * emb
        for _ in range(layers):
            mods += [nn.Linear(width, hidden), nn.GELU()]
            width = hidden
        self.body = nn.Sequential(*mods)
        self.head = nn.Linear(width, VOCAB)

    def hidden(self, ctx: torch.Tensor) -> torch.Tensor:
        return self.body(self.emb(ctx).flatten(-2))

    def forward(self, ctx: torch.Tensor) -> torch.Tensor:
        return self.head(self.hidden(ctx))


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _bar(cfg: DemoConfig, total: int, desc: str):
    tqdm = require("tqdm.auto").tqdm
    return tqdm(
        total=total,
        desc=f"{desc:<22}",
        disable=not cfg.progress,
        leave=True,
        dynamic_ncols=True,
        mininterval=0.5,
        file=sys.stderr,
    )


# ---------------------------------------------------------------------------------------------
# Evaluation (plain PyTorch, fp64: independent of divkit)
# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def lm_metrics(
    logits: torch.Tensor, targets: torch.Tensor, teacher_logits: Optional[torch.Tensor] = None
) -> Dict[str, float]:
    """Held-out metrics: perplexity exp(CE of the real next tokens), accuracy and, with a
    teacher, KL(p_teacher || q_student), KL(q_student || p_teacher) and top-1 agreement."""
    logq = F.log_softmax(logits.double(), -1)
    out = {
        "perplexity": math.exp(F.nll_loss(logq, targets).item()),
        "accuracy": (logits.argmax(-1) == targets).double().mean().item(),
    }
    if teacher_logits is not None:
        logp = F.log_softmax(teacher_logits.double(), -1)
        out["kl_teacher_student"] = (logp.exp() * (logp - logq)).sum(-1).mean().item()
        out["kl_student_teacher"] = (logq.exp() * (logq - logp)).sum(-1).mean().item()
        out["agreement"] = (logits.argmax(-1) == teacher_logits.argmax(-1)).double().mean().item()
    return out


# ---------------------------------------------------------------------------------------------
# Part 1: distillation through the fused linear head
# ---------------------------------------------------------------------------------------------


def _train_lm(
    cfg: DemoConfig,
    model: TinyLM,
    desc: str,
    ctx: torch.Tensor,
    loss_fn,
    epochs: int,
    batch: int,
    lr: float,
    seed: int,
    on_epoch=None,
) -> float:
    """Adam with a cosine schedule over ``epochs``; ``loss_fn(model, index) -> scalar``.
    ``on_epoch(epoch)`` is called after each epoch (held-out curves). Returns the last epoch's
    mean training loss."""
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    per_epoch = math.ceil(len(ctx) / batch)
    steps = epochs * per_epoch
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: 0.5 * (1.0 + math.cos(math.pi * min(s, steps) / steps))
    )
    gen = torch.Generator().manual_seed(seed)
    last = float("nan")
    with _bar(cfg, steps, desc) as bar:
        for e in range(epochs):
            perm = torch.randperm(len(ctx), generator=gen)
            total, count = 0.0, 0
            for start in range(0, len(ctx), batch):
                idx = perm[start : start + batch]
                loss = loss_fn(model, idx)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                total += loss.item() * len(idx)
                count += len(idx)
                bar.update(1)
            last = total / count
            post = {"loss": f"{last:.4f}"}
            if on_epoch is not None:
                post.update(on_epoch(e + 1))
            bar.set_postfix(post, refresh=True)
    return last


def distill(cfg: DemoConfig, log=print) -> Dict:
    """Part 1. Returns a dict with the data summary, the teacher, the untrained and hard-label
    students and one run per divergence (final metrics and per-epoch held-out curves), plus the
    models themselves under ``"_models"`` (for part 2; not serialized)."""
    gen = torch.Generator().manual_seed(cfg.seed)
    source = Source(gen)
    corpus_ctx, corpus_next = source.sample(cfg.corpus_seqs, cfg.seq_len, gen)
    transfer_ctx, transfer_next = source.sample(cfg.transfer_seqs, cfg.seq_len, gen)
    test_ctx, test_next = source.sample(cfg.test_seqs, cfg.seq_len, gen)
    with torch.no_grad():
        floor = math.exp(F.cross_entropy(source.logits(test_ctx), test_next).item())
    data = {
        "vocabulary": VOCAB,
        "context": CONTEXT,
        "corpus_tokens": len(corpus_ctx),
        "transfer_tokens": len(transfer_ctx),
        "test_tokens": len(test_ctx),
        "source_perplexity": floor,
    }
    log(
        f"data: vocabulary {VOCAB}, context {CONTEXT}; teacher corpus {len(corpus_ctx)} tokens, "
        f"transfer set {len(transfer_ctx)}, held-out {len(test_ctx)}; the source's own held-out "
        f"perplexity (the floor) {floor:.2f}"
    )

    # Teacher: fused cross-entropy from hidden states + lm_head.
    torch.manual_seed(cfg.seed + 1)
    teacher = TinyLM(*cfg.teacher_size)
    t0 = time.perf_counter()
    teacher_loss = _train_lm(
        cfg,
        teacher,
        "teacher (CE)",
        corpus_ctx,
        lambda m, idx: divkit.fused_linear_cross_entropy(
            m.hidden(corpus_ctx[idx]), m.head.weight, corpus_next[idx], m.head.bias
        ),
        epochs=cfg.teacher_epochs,
        batch=512,
        lr=2e-3,
        seed=cfg.seed + 2,
    )
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    with torch.no_grad():
        teacher_h = teacher.hidden(transfer_ctx)  # the distillation's teacher inputs
        teacher_test = teacher(test_ctx)
    teacher_info = {
        "parameters": n_params(teacher),
        "train_loss": teacher_loss,
        "seconds": time.perf_counter() - t0,
        **lm_metrics(teacher_test, test_next),
    }
    log(
        f"teacher: {teacher_info['parameters']} parameters, held-out perplexity "
        f"{teacher_info['perplexity']:.2f} ({teacher_info['seconds']:.1f}s)"
    )

    def new_student() -> TinyLM:
        torch.manual_seed(cfg.seed + 3)
        return TinyLM(*cfg.student_size)

    def held_out(model: TinyLM) -> Dict[str, float]:
        with torch.no_grad():
            return lm_metrics(model(test_ctx), test_next, teacher_test)

    untrained = held_out(new_student())
    student_params = n_params(new_student())
    log(
        f"students: {student_params} parameters ({teacher_info['parameters'] / student_params:.1f}x "
        f"smaller), {cfg.student_epochs} epochs on the transfer set; untrained: KL(t||s) "
        f"{untrained['kl_teacher_student']:.3f}, perplexity {untrained['perplexity']:.1f}"
    )

    def run(name: str, options: Dict[str, float], loss_fn) -> Dict:
        model = new_student()
        curve = [
            {
                "epoch": 0,
                "kl_teacher_student": untrained["kl_teacher_student"],
                "perplexity": untrained["perplexity"],
            }
        ]

        def on_epoch(epoch: int) -> Dict[str, str]:
            m = held_out(model)
            curve.append(
                {
                    "epoch": epoch,
                    "kl_teacher_student": m["kl_teacher_student"],
                    "perplexity": m["perplexity"],
                }
            )
            return {"KL(t||s)": f"{m['kl_teacher_student']:.3f}", "ppl": f"{m['perplexity']:.2f}"}

        t0 = time.perf_counter()
        loss = _train_lm(
            cfg,
            model,
            name,
            transfer_ctx,
            loss_fn,
            epochs=cfg.student_epochs,
            batch=256,
            lr=3e-3,
            seed=cfg.seed + 4,
            on_epoch=on_epoch,
        )
        if not math.isfinite(loss):
            raise RuntimeError(f"divkit demo: the {name} run diverged (training loss {loss})")
        return {
            "kind": name,
            "options": dict(options),
            "train_loss": loss,
            "seconds": time.perf_counter() - t0,
            **held_out(model),
            "curve": curve,
            "_model": model,
        }

    baseline = run(
        "hard labels (CE)",
        {},
        lambda m, idx: divkit.fused_linear_cross_entropy(
            m.hidden(transfer_ctx[idx]), m.head.weight, transfer_next[idx], m.head.bias
        ),
    )
    runs = []
    for kind, options in cfg.kinds:

        def kd_loss(m, idx, kind=kind, options=options):
            return divkit.fused_linear_divergence(
                m.hidden(transfer_ctx[idx]),
                m.head.weight,
                teacher_h[idx],
                teacher.head.weight,
                kind,
                student_bias=m.head.bias,
                teacher_bias=teacher.head.bias,
                temperature=cfg.temperature,
                **options,
            )

        runs.append(run(kind, options, kd_loss))

    models = {"teacher": teacher, "baseline": baseline.pop("_model")}
    for r in runs:
        models[r["kind"]] = r.pop("_model")
    return {
        "data": data,
        "teacher": teacher_info,
        "student_parameters": student_params,
        "untrained": untrained,
        "baseline": baseline,
        "runs": runs,
        "_models": models,
        "_prompts": (transfer_ctx, test_ctx),
    }


# ---------------------------------------------------------------------------------------------
# Part 2: preference alignment with a known reward
# ---------------------------------------------------------------------------------------------


def good_tokens(seed: int) -> torch.Tensor:
    """The known reward's "good" tokens: a fixed random half of the vocabulary (bool [V])."""
    g = torch.Generator().manual_seed(seed + 100)
    mask = torch.zeros(VOCAB, dtype=torch.bool)
    mask[torch.randperm(VOCAB, generator=g)[: VOCAB // 2]] = True
    return mask


def reward(completions: torch.Tensor, good: torch.Tensor) -> torch.Tensor:
    """The known reward: the fraction of a completion's tokens that are good, in [0, 1]."""
    return good[completions].double().mean(-1)


@torch.no_grad()
def sample_completions(
    model: TinyLM, prompts: torch.Tensor, length: int, gen: torch.Generator
) -> torch.Tensor:
    """Ancestral sampling: prompts ``[B, 3]`` -> sequences ``[B, 3 + length]``."""
    seq = prompts
    for _ in range(length):
        probs = torch.softmax(model(seq[:, -CONTEXT:]).double(), -1)
        seq = torch.cat([seq, torch.multinomial(probs, 1, generator=gen)], 1)
    return seq


def completion_contexts(seq: torch.Tensor) -> torch.Tensor:
    """``[B, 3 + L]`` -> the context of each completion token, ``[B, L, 3]``."""
    return seq.unfold(1, CONTEXT, 1)[:, :-1]


@torch.no_grad()
def sequence_kl(policy: TinyLM, ref: TinyLM, seq: torch.Tensor) -> torch.Tensor:
    """Sequence-level KL(pi || pi_ref) of each sampled sequence: the exact per-token KL over the
    vocabulary summed over its completion tokens (fp64). Averaged over samples from pi it is
    the sequence-level KL, with less variance than the log-ratio of the sampled tokens."""
    ctx = completion_contexts(seq)
    logpi = F.log_softmax(policy(ctx).double(), -1)
    logref = F.log_softmax(ref(ctx).double(), -1)
    return (logpi.exp() * (logpi - logref)).sum(-1).sum(-1)


def preference_pairs(
    ref: TinyLM, prompts: torch.Tensor, cfg: DemoConfig, good: torch.Tensor, gen: torch.Generator
):
    """Two completions per prompt from the reference; the one with the higher known reward is
    chosen, ties are dropped. Returns (chosen, rejected) sequences ``[P, 3 + L]``."""
    a = sample_completions(ref, prompts, cfg.completion_len, gen)
    b = sample_completions(ref, prompts, cfg.completion_len, gen)
    ra, rb = reward(a[:, CONTEXT:], good), reward(b[:, CONTEXT:], good)
    keep = ra != rb
    a_wins = (ra > rb)[:, None]
    return torch.where(a_wins, a, b)[keep], torch.where(a_wins, b, a)[keep]


def _policy_terms(model: TinyLM, seq: torch.Tensor):
    return model.hidden(completion_contexts(seq)), seq[:, CONTEXT:]


def align(
    cfg: DemoConfig,
    reference: TinyLM,
    train_prompts: torch.Tensor,
    eval_prompts: torch.Tensor,
    log=print,
    reference_name: str = "distilled",
) -> Dict:
    """Part 2: every method of ``cfg.methods`` from the same reference and the same pairs.
    Returns the reference's reward, the number of pairs and per method the curve of (step,
    reward, sequence KL, held-out preference accuracy) and its final point."""
    good = good_tokens(cfg.seed)
    ref = copy.deepcopy(reference).eval()
    for p in ref.parameters():
        p.requires_grad_(False)
    gen = torch.Generator().manual_seed(cfg.seed + 200)
    chosen, rejected = preference_pairs(ref, train_prompts, cfg, good, gen)
    test_c, test_r = preference_pairs(ref, eval_prompts, cfg, good, gen)
    with torch.no_grad():  # reference terms, computed once
        ref_hc, labels_c = _policy_terms(ref, chosen)
        ref_hr, labels_r = _policy_terms(ref, rejected)
        ref_lc = divkit.fused_linear_logprobs(ref_hc, ref.head.weight, labels_c, ref.head.bias)
        ref_lr = divkit.fused_linear_logprobs(ref_hr, ref.head.weight, labels_r, ref.head.bias)
        ref_pc, ref_pr = ref_lc.sum(-1), ref_lr.sum(-1)

    def evaluate(policy: TinyLM, step: int) -> Dict[str, float]:
        g = torch.Generator().manual_seed(cfg.seed + 300)  # the same prompts and noise each time
        with torch.no_grad():
            seq = sample_completions(policy, eval_prompts, cfg.completion_len, g)
            hc, lc = _policy_terms(policy, test_c)
            hr, lr = _policy_terms(policy, test_r)
            rhc, _ = _policy_terms(ref, test_c)
            rhr, _ = _policy_terms(ref, test_r)
            lp = lambda h, m, lab: divkit.fused_linear_logprobs(  # noqa: E731
                h, m.head.weight, lab, m.head.bias
            ).sum(-1)
            margin = (lp(hc, policy, lc) - lp(rhc, ref, lc)) - (
                lp(hr, policy, lr) - lp(rhr, ref, lr)
            )
        return {
            "step": step,
            "reward": reward(seq[:, CONTEXT:], good).mean().item(),
            "sequence_kl": sequence_kl(policy, ref, seq).mean().item(),
            # a tie (the reference itself: every margin is 0) counts half
            "preference_accuracy": ((margin > 0).double() + 0.5 * (margin == 0).double())
            .mean()
            .item(),
        }

    ref_eval = evaluate(ref, 0)
    log(
        f"alignment: reference = the {reference_name} student; "
        f"{len(chosen)} training pairs ({len(train_prompts) - len(chosen)} ties dropped), "
        f"completions of {cfg.completion_len} tokens; reference reward {ref_eval['reward']:.3f}"
    )
    out = {
        "reference_reward": ref_eval["reward"],
        "pairs": len(chosen),
        "test_pairs": len(test_c),
        "good_tokens": int(good.sum()),
        "runs": [],
    }
    for method in cfg.methods:
        if method not in METHODS:
            raise ValueError(
                f"divkit demo: unknown method '{method}' (valid: {', '.join(METHODS)})"
            )
        policy = copy.deepcopy(ref)
        for p in policy.parameters():
            p.requires_grad_(True)
        opt = torch.optim.Adam(policy.parameters(), lr=cfg.align_lr)
        g = torch.Generator().manual_seed(cfg.seed + 400)  # the same batches for every method
        curve = [dict(ref_eval)]
        t0 = time.perf_counter()
        with _bar(cfg, cfg.align_steps, _METHOD_LABELS[method]) as bar:
            for step in range(1, cfg.align_steps + 1):
                idx = torch.randint(0, len(chosen), (cfg.align_batch,), generator=g)
                hc, lc = _policy_terms(policy, chosen[idx])
                hr, lr = _policy_terms(policy, rejected[idx])
                w, b = policy.head.weight, policy.head.bias
                if method == "tdpo2":
                    losses, _, _ = divkit.tdpo_loss_fused(
                        hc,
                        hr,
                        w,
                        lc,
                        lr,
                        ref_chosen_hidden=ref_hc[idx],
                        ref_rejected_hidden=ref_hr[idx],
                        ref_weight=ref.head.weight,
                        lm_head_bias=b,
                        ref_bias=ref.head.bias,
                        beta=cfg.align_beta,
                        alpha=cfg.tdpo_alpha,
                        variant="tdpo2",
                    )
                else:
                    pc = divkit.fused_linear_logprobs(hc, w, lc, b).sum(-1)
                    pr = divkit.fused_linear_logprobs(hr, w, lr, b).sum(-1)
                    f = "js_divergence" if method == "fdpo_js" else "reverse_kl"
                    losses, _, _ = divkit.preference_loss(
                        pc, pr, ref_pc[idx], ref_pr[idx], beta=cfg.align_beta, f_divergence_type=f
                    )
                loss = losses.mean()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                bar.update(1)
                if step % cfg.eval_every == 0 or step == cfg.align_steps:
                    row = evaluate(policy, step)
                    row["loss"] = loss.item()
                    curve.append(row)
                    bar.set_postfix(
                        {
                            "loss": f"{row['loss']:.3f}",
                            "reward": f"{row['reward']:.3f}",
                            "KL": f"{row['sequence_kl']:.2f}",
                        },
                        refresh=True,
                    )
        final = curve[-1]
        if not all(math.isfinite(final[k]) for k in ("reward", "sequence_kl")):
            raise RuntimeError(f"divkit demo: the {method} run diverged")
        out["runs"].append(
            {
                "method": method,
                "label": _METHOD_LABELS[method],
                "reward": final["reward"],
                "sequence_kl": final["sequence_kl"],
                "preference_accuracy": final["preference_accuracy"],
                "seconds": time.perf_counter() - t0,
                "curve": curve,
            }
        )
    # Methods end at different KLs: compare their rewards at one KL, the smallest final one,
    # read off each reward-vs-KL curve by linear interpolation.
    if out["runs"]:
        kl = min(r["sequence_kl"] for r in out["runs"])
        out["matched_kl"] = kl
        for r in out["runs"]:
            r["reward_at_matched_kl"] = reward_at_kl(r["curve"], kl)
    return out


def reward_at_kl(curve: Sequence[Dict[str, float]], kl: float) -> float:
    """The reward of a reward-vs-KL curve at sequence KL ``kl``, by linear interpolation between
    the points sorted by KL (clamped to the curve's ends)."""
    pts = sorted((c["sequence_kl"], c["reward"]) for c in curve)
    if kl <= pts[0][0]:
        return pts[0][1]
    for (k0, r0), (k1, r1) in zip(pts, pts[1:]):
        if kl <= k1:
            return r0 if k1 == k0 else r0 + (r1 - r0) * (kl - k0) / (k1 - k0)
    return pts[-1][1]


# ---------------------------------------------------------------------------------------------
# Report: figure, Markdown, JSON
# ---------------------------------------------------------------------------------------------


def plot(report: Dict, path: str) -> None:
    """Writes the curves as a PNG (matplotlib's Agg backend: no display needed)."""
    matplotlib = require("matplotlib")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    d, a = report["distillation"], report["alignment"]
    fig, ax = plt.subplots(2, 2, figsize=(12, 9))
    runs = [d["baseline"]] + d["runs"]
    for r in runs:
        style = "--" if r is d["baseline"] else "-"
        ep = [c["epoch"] for c in r["curve"]]
        ax[0, 0].plot(
            ep, [c["kl_teacher_student"] for c in r["curve"]], style, marker=".", label=r["kind"]
        )
        ax[0, 1].plot(ep, [c["perplexity"] for c in r["curve"]], style, marker=".", label=r["kind"])
    ax[0, 0].set(
        title="distillation: held-out KL(p_teacher || q_student)",
        xlabel="epoch",
        ylabel="nats / token",
        yscale="log",
    )
    ax[0, 1].axhline(d["teacher"]["perplexity"], color="k", lw=0.8, ls=":", label="teacher")
    ax[0, 1].axhline(
        d["data"]["source_perplexity"], color="grey", lw=0.8, ls="-.", label="source (floor)"
    )
    ax[0, 1].set(
        title="distillation: held-out perplexity", xlabel="epoch", ylabel="perplexity", yscale="log"
    )
    for r in a["runs"]:
        kl = [c["sequence_kl"] for c in r["curve"]]
        rw = [c["reward"] for c in r["curve"]]
        ax[1, 0].plot(kl, rw, marker="o", ms=3, label=r["label"])
        ax[1, 1].plot([c["step"] for c in r["curve"]], rw, marker="o", ms=3, label=r["label"])
    ax[1, 0].set(
        title="alignment: true reward vs sequence KL(pi || pi_ref)",
        xlabel="sequence-level KL (nats)",
        ylabel="reward of the policy's samples",
    )
    ax[1, 1].axhline(a["reference_reward"], color="k", lw=0.8, ls=":", label="reference")
    ax[1, 1].set(
        title="alignment: true reward during training",
        xlabel="step",
        ylabel="reward of the policy's samples",
    )
    for axis in ax.flat:
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _fmt_opts(options: Dict[str, float]) -> str:
    return ", ".join(f"{k}={v:g}" for k, v in options.items())


def markdown(report: Dict) -> str:
    d, a, env = report["distillation"], report["alignment"], report["environment"]
    lines = [
        "# divkit demo report",
        "",
        f"divkit {env['divkit']} (SIMD {env['simd']}), torch {env['torch']}, Python "
        f"{env['python']}, {env['threads']} thread(s); total {report['seconds']:.1f} s "
        f"(distillation {report['distillation_seconds']:.1f} s, alignment "
        f"{report['alignment_seconds']:.1f} s). Everything generated from seed "
        f"{report['config']['seed']}; nothing downloaded.",
        "",
        "![curves](curves.png)",
        "",
        "## 1. Distillation through the fused linear head",
        "",
        f"Synthetic language: vocabulary {d['data']['vocabulary']}, next token a fixed random "
        f"function of the previous {d['data']['context']}; teacher corpus "
        f"{d['data']['corpus_tokens']} tokens, transfer set {d['data']['transfer_tokens']}, "
        f"held-out {d['data']['test_tokens']}. Teacher: {d['teacher']['parameters']} parameters; "
        f"students: {d['student_parameters']} parameters, trained with "
        "`divkit.fused_linear_divergence` from hidden states and lm_head weights (the "
        "hard-label baseline with `divkit.fused_linear_cross_entropy`). Held-out metrics in "
        "plain PyTorch fp64; KL(t‖s) = KL(p_teacher ‖ q_student).",
        "",
        "| student | options | perplexity | KL(t‖s) | KL(s‖t) | top-1 agreement | train loss | time |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
        f"| source (floor) | | {d['data']['source_perplexity']:.3f} | | | | | |",
        f"| teacher | | {d['teacher']['perplexity']:.3f} | 0 | 0 | 1 | "
        f"{d['teacher']['train_loss']:.4f} | {d['teacher']['seconds']:.1f} s |",
        f"| untrained student | | {d['untrained']['perplexity']:.3f} | "
        f"{d['untrained']['kl_teacher_student']:.4f} | {d['untrained']['kl_student_teacher']:.4f} "
        f"| {d['untrained']['agreement']:.3f} | | |",
    ]
    for r in [d["baseline"]] + d["runs"]:
        lines.append(
            f"| {r['kind']} | {_fmt_opts(r['options'])} | {r['perplexity']:.3f} | "
            f"{r['kl_teacher_student']:.4f} | {r['kl_student_teacher']:.4f} | "
            f"{r['agreement']:.3f} | {r['train_loss']:.4f} | {r['seconds']:.1f} s |"
        )
    lines += [
        "",
        "## 2. Alignment with a known reward",
        "",
        f"Reference policy: the `{a['reference']}` student (the lowest KL to the teacher). "
        f"Reward: the fraction of the {report['config']['completion_len']} completion tokens "
        f"in a fixed random set of {a['good_tokens']} good tokens. {a['pairs']} training pairs "
        f"sampled from the reference (higher reward chosen, ties dropped), "
        f"{report['config']['align_steps']} steps of batch {report['config']['align_batch']}, "
        f"beta {report['config']['align_beta']:g}. Reward and sequence-level KL(pi ‖ pi_ref) "
        f"(exact per-token KL summed over the completion) on {report['config']['eval_prompts']} "
        "of the policy's own samples; preference accuracy on held-out pairs.",
        "",
        f"| method | final reward | final sequence KL (nats) | reward at KL = {a['matched_kl']:.2f} "
        "| held-out preference accuracy | time |",
        "|---|---:|---:|---:|---:|---:|",
        f"| reference | {a['reference_reward']:.3f} | 0 | | 0.5 (ties) | |",
    ]
    for r in a["runs"]:
        lines.append(
            f"| {r['label']} | {r['reward']:.3f} | {r['sequence_kl']:.3f} | "
            f"{r['reward_at_matched_kl']:.3f} | {r['preference_accuracy']:.3f} | "
            f"{r['seconds']:.1f} s |"
        )
    lines += [
        "",
        'The methods end at different KLs; "reward at KL" reads each reward-vs-KL '
        "curve at the smallest final KL (linear interpolation), the fair comparison. "
        "Curves (every point of the figure) are in `report.json`.",
        "",
    ]
    return "\n".join(lines)


def _public(x):
    """Drops the private ("_"-prefixed) entries before serialization."""
    if isinstance(x, dict):
        return {k: _public(v) for k, v in x.items() if not k.startswith("_")}
    if isinstance(x, list):
        return [_public(v) for v in x]
    return x


def run_demo(cfg: Optional[DemoConfig] = None, out_dir: str = "divkit-demo", log=print) -> Dict:
    """Runs both parts and writes ``report.json``, ``report.md`` and ``curves.png`` into
    ``out_dir`` (created). Returns the report (as in report.json)."""
    cfg = cfg or DemoConfig()
    threads = torch.get_num_threads(), divkit.get_num_threads()
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
        divkit.set_num_threads(cfg.threads)
    try:
        return _run(cfg, out_dir, log)
    finally:  # leave the caller's thread settings as they were
        torch.set_num_threads(threads[0])
        divkit.set_num_threads(threads[1])


def _run(cfg: DemoConfig, out_dir: str, log) -> Dict:
    os.makedirs(out_dir, exist_ok=True)
    t_start = time.perf_counter()
    log(
        f"divkit {divkit.__version__} demo (SIMD {divkit.active_simd_target()}, threads "
        f"{divkit.get_num_threads()}), torch {torch.__version__}"
    )
    log("part 1: distillation through the fused linear head")
    dist = distill(cfg, log=log)
    t_dist = time.perf_counter() - t_start
    best = min(dist["runs"], key=lambda r: r["kl_teacher_student"])
    log("part 2: alignment (DPO, f-DPO, TDPO2) with a known reward")
    train_prompts, eval_prompts = dist["_prompts"]
    g = torch.Generator().manual_seed(cfg.seed + 500)
    train_p = train_prompts[torch.randint(0, len(train_prompts), (cfg.train_prompts,), generator=g)]
    eval_p = eval_prompts[torch.randint(0, len(eval_prompts), (cfg.eval_prompts,), generator=g)]
    t1 = time.perf_counter()
    al = align(
        cfg, dist["_models"][best["kind"]], train_p, eval_p, log=log, reference_name=best["kind"]
    )
    al["reference"] = best["kind"]
    t_align = time.perf_counter() - t1
    config = dataclasses.asdict(cfg)
    config["kinds"] = [[k, dict(o)] for k, o in cfg.kinds]
    report = _public(
        {
            "config": config,
            "environment": {
                "divkit": divkit.__version__,
                "torch": torch.__version__,
                "python": platform.python_version(),
                "simd": divkit.active_simd_target(),
                "threads": divkit.get_num_threads(),
                "cpus": os.cpu_count(),
            },
            "distillation": dist,
            "alignment": al,
            "distillation_seconds": t_dist,
            "alignment_seconds": t_align,
            "seconds": time.perf_counter() - t_start,
        }
    )
    # Each file is written to a temporary name and renamed: a failure (a full disk, a plotting
    # error) leaves the previous report whole, never a truncated or empty one.
    _write_atomic(os.path.join(out_dir, "report.json"), lambda p: _dump_json(report, p))
    _write_atomic(os.path.join(out_dir, "curves.png"), lambda p: plot(report, p))
    _write_atomic(os.path.join(out_dir, "report.md"), lambda p: _write_text(p, markdown(report)))
    _summary(report, log)
    log(
        f"report: {os.path.abspath(out_dir)}/ (report.md, report.json, curves.png); "
        f"total {report['seconds']:.1f}s"
    )
    return report


def _dump_json(report: Dict, path: str) -> None:
    with open(path, "w") as f:
        json.dump(report, f, indent=1)


def _write_text(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


def _write_atomic(path: str, write) -> None:
    """``write(tmp)`` into a temporary file next to ``path`` (same folder, same suffix), then an
    atomic rename over ``path``; the temporary file is removed if ``write`` fails."""
    folder, base = os.path.split(path)
    stem, ext = os.path.splitext(base)
    fd, tmp = tempfile.mkstemp(prefix=f".{stem}-", suffix=f".tmp{ext}", dir=folder or ".")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


#: The files a run writes into --out.
REPORT_FILES = ("report.json", "report.md", "curves.png")


def check_out_dir(out_dir: str, force: bool = False) -> str:
    """Checks ``--out`` before any work: a folder that exists or can be created, writable, not a
    file, a FIFO or a device. An existing report in it is not overwritten unless ``force``: the
    run then goes to a fresh sub-folder ``run-2``, ``run-3``, ... Creates the folder and
    returns the one the run writes to. Raises ValueError with a one-line message."""
    if not isinstance(out_dir, str) or not out_dir.strip():
        raise ValueError("divkit demo: --out must be a non-empty path")
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise ValueError(f"divkit demo: --out {out_dir!r} exists and is not a folder")
    try:
        os.makedirs(out_dir, exist_ok=True)
    except OSError as e:
        raise ValueError(
            f"divkit demo: --out {out_dir!r} cannot be created ({e.strerror or e})"
        ) from None
    if not os.access(out_dir, os.W_OK | os.X_OK):
        raise ValueError(f"divkit demo: --out {out_dir!r} is not writable")
    for name in REPORT_FILES:
        p = os.path.join(out_dir, name)
        if os.path.lexists(p):
            st = os.stat(p) if os.path.exists(p) else None
            if st is None or not stat.S_ISREG(st.st_mode):
                raise ValueError(
                    f"divkit demo: {p!r} exists and is not a regular file (a FIFO, a device, a "
                    f"folder or a broken link); choose another --out"
                )
    if not force and any(os.path.lexists(os.path.join(out_dir, n)) for n in REPORT_FILES):
        i = 2
        while os.path.lexists(os.path.join(out_dir, f"run-{i}")):
            i += 1
        return check_out_dir(os.path.join(out_dir, f"run-{i}"), force)
    return out_dir


def _summary(report: Dict, log) -> None:
    d, a = report["distillation"], report["alignment"]
    log("")
    log(f"{'student':<28}{'perplexity':>11}{'KL(t||s)':>10}{'KL(s||t)':>10}{'agree':>8}")
    log(f"{'teacher':<28}{d['teacher']['perplexity']:>11.3f}{0:>10.4f}{0:>10.4f}{1:>8.3f}")
    for r in [dict(d["untrained"], kind="untrained"), d["baseline"]] + d["runs"]:
        log(
            f"{r['kind']:<28}{r['perplexity']:>11.3f}{r['kl_teacher_student']:>10.4f}"
            f"{r['kl_student_teacher']:>10.4f}{r['agreement']:>8.3f}"
        )
    log("")
    log(
        f"{'policy':<28}{'reward':>8}{'seq KL':>9}{'pref acc':>10}"
        f"{'reward at KL ' + format(a['matched_kl'], '.2f'):>20}"
    )
    log(
        f"{'reference (' + a['reference'] + ')':<28}{a['reference_reward']:>8.3f}{0:>9.3f}"
        f"{0.5:>10.3f}"
    )
    for r in a["runs"]:
        log(
            f"{r['label']:<28}{r['reward']:>8.3f}{r['sequence_kl']:>9.3f}"
            f"{r['preference_accuracy']:>10.3f}{r['reward_at_matched_kl']:>20.3f}"
        )
    log("")


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------


def parse_kinds(text: str) -> Tuple[Tuple[str, Dict[str, float]], ...]:
    kinds = []
    for name in filter(None, (k.strip() for k in text.split(","))):
        if name not in divkit.KINDS:
            raise ValueError(
                f"divkit demo: unknown kind '{name}' (valid: {', '.join(divkit.KINDS)})"
            )
        kinds.append((name, dict(_KIND_OPTIONS.get(name, {}))))
    if not kinds:
        raise ValueError("divkit demo: --kinds is empty")
    return tuple(kinds)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The ``divkit demo`` options (shared by the CLI and ``python -m divkit.tools.demo``)."""
    d = DemoConfig()
    p.add_argument(
        "--out",
        default="divkit-demo",
        help="output folder for report.md, report.json, curves.png (default: %(default)s)",
    )
    p.add_argument(
        "--kinds",
        default=",".join(k for k, _ in DEFAULT_KINDS),
        help="comma-separated divergences to distil with (default: %(default)s)",
    )
    p.add_argument(
        "--methods",
        default=",".join(METHODS),
        help="comma-separated alignment methods (default: %(default)s)",
    )
    p.add_argument(
        "--epochs", type=int, default=None, help=f"student epochs (default: {d.student_epochs})"
    )
    p.add_argument(
        "--teacher-epochs",
        type=int,
        default=None,
        help=f"teacher epochs (default: {d.teacher_epochs})",
    )
    p.add_argument(
        "--align-steps",
        type=int,
        default=None,
        help=f"alignment steps per method (default: {d.align_steps})",
    )
    p.add_argument("--temperature", type=float, default=d.temperature)
    p.add_argument(
        "--threads",
        type=int,
        default=d.threads,
        help="torch and divkit threads; 0 keeps their defaults (the models are tiny: "
        "one thread is fastest and steadiest on a busy machine)",
    )
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument(
        "--tiny", action="store_true", help="a tiny configuration (seconds; for smoke tests)"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument(
        "--force",
        action="store_true",
        help="overwrite an existing report in --out (without it, the run goes to a fresh "
        "sub-folder run-2, run-3, ...)",
    )


def config_from_args(args: argparse.Namespace) -> DemoConfig:
    base = DemoConfig.tiny() if args.tiny else DemoConfig()
    over = {
        "kinds": parse_kinds(args.kinds),
        "methods": tuple(m.strip() for m in args.methods.split(",") if m.strip()),
        "temperature": args.temperature,
        "threads": args.threads,
        "seed": args.seed,
        "progress": not args.no_progress,
    }
    if not over["methods"]:
        raise ValueError(f"divkit demo: --methods is empty (valid: {', '.join(METHODS)})")
    for m in over["methods"]:
        if m not in METHODS:
            raise ValueError(f"divkit demo: unknown method '{m}' (valid: {', '.join(METHODS)})")
    t = args.temperature
    if not (math.isfinite(t) and t >= 1e-3 and t <= 1e3):
        raise ValueError(f"divkit demo: --temperature must be finite in [0.001, 1000], got {t}")
    max_threads = 8 * (os.cpu_count() or 1)
    if not 0 <= args.threads <= max_threads:
        raise ValueError(
            f"divkit demo: --threads must be in [0, {max_threads}] (0 keeps the defaults), "
            f"got {args.threads}"
        )
    if not 0 <= args.seed < 2**63:
        raise ValueError(f"divkit demo: --seed must be in [0, 2**63), got {args.seed}")
    for name, value in (
        ("epochs", args.epochs),
        ("teacher_epochs", args.teacher_epochs),
        ("align_steps", args.align_steps),
    ):
        if value is not None:
            if value < 1:
                raise ValueError(
                    f"divkit demo: --{name.replace('_', '-')} must be >= 1, got {value}"
                )
            over["student_epochs" if name == "epochs" else name] = value
    return dataclasses.replace(base, **over)


def main(args: argparse.Namespace) -> int:
    """The ``divkit demo`` command: runs :func:`run_demo` with the parsed options."""
    try:
        cfg = config_from_args(args)
        out = check_out_dir(args.out, getattr(args, "force", False))
    except ValueError as e:
        print(_one_line(e), file=sys.stderr)
        return 2
    if os.path.normpath(out) != os.path.normpath(args.out):
        print(
            f"divkit demo: {args.out} already holds a report: this run writes to {out} "
            f"(--force overwrites)",
            file=sys.stderr,
        )
    run_demo(cfg, out)
    return 0


def _one_line(e: Exception) -> str:
    msg = " ".join(str(e).split())
    return msg if msg.startswith("divkit demo: ") else f"divkit demo: {msg}"


if __name__ == "__main__":  # pragma: no cover
    ap = argparse.ArgumentParser(
        prog="python -m divkit.tools.demo", description=__doc__.split("\n")[0]
    )
    add_arguments(ap)
    sys.exit(main(ap.parse_args()))
