#!/usr/bin/env python3
"""Distil a small teacher language model into a smaller student with divkit's divergences.

Everything is generated here, from fixed seeds; nothing is downloaded:

1. A synthetic "language": a random, fixed next-token source over a vocabulary of 256 tokens
   whose next-token distribution is a nonlinear function of the previous 3 tokens. Token
   sequences are sampled from it: a large training corpus, a small transfer set and a held-out
   set.
2. A teacher (an MLP language model with 165k parameters) is trained on the corpus with
   cross-entropy.
3. A student (24k parameters, 7x smaller) is trained on the small transfer set, from the same
   initialisation each time:
   - baseline: cross-entropy on the sampled next tokens only (no teacher);
   - distilled: ``divkit.divergence(student_logits, teacher_logits, kind)`` for several kinds,
     i.e. the student matches the teacher's whole next-token distribution.
4. For each student, on held-out data: KL(teacher || student), KL(student || teacher), the
   cross-entropy of the real next tokens (nats/token; the source's entropy is the floor), the
   accuracy and the top-1 agreement with the teacher.

Run:  .venv/bin/python examples/distill_tiny.py            (about a minute on 2 cores)
      .venv/bin/python examples/distill_tiny.py --kinds forward_kl,jsd --epochs 4
"""

from __future__ import annotations

import argparse
import math
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

import divkit

VOCAB = 256
CONTEXT = 3

# (kind, options passed to divkit.divergence): see the table in README.md for the formulas.
DEFAULT_KINDS = [
    ("forward_kl", {}),  # KL(p_teacher || q_student), classic KD
    ("reverse_kl", {}),  # KL(q_student || p_teacher), mode-seeking
    ("jsd", {"beta": 0.5}),  # generalized JSD (GKD), beta = 0.5
    ("skew_forward_kl", {"alpha": 0.1}),  # DistiLLM's skew KL
    ("skew_reverse_kl", {"alpha": 0.1}),
    ("tvd", {}),  # total variation
    ("hellinger", {}),  # squared Hellinger
]
KNOWN_OPTIONS = {kind: opts for kind, opts in DEFAULT_KINDS}


# ------------------------------------------------------------------------------------------
# The synthetic language
# ------------------------------------------------------------------------------------------


class Source:
    """A fixed random next-token distribution P(x_t | x_{t-3}, x_{t-2}, x_{t-1}).

    logits = W2 tanh(W1 [e(x_{t-3}); e(x_{t-2}); e(x_{t-1})]) + b, with a Zipf-like bias b so
    that some tokens are frequent, scaled so that the entropy is a few nats.
    """

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
        h = torch.tanh(self.e[ctx].flatten(1) @ self.w1)
        return self.sharpness * (h @ self.w2) + self.bias

    def sample(self, n_seq: int, length: int, gen: torch.Generator):
        """n_seq sequences of `length` tokens after a random prefix: (contexts, next tokens)."""
        seq = torch.randint(0, VOCAB, (n_seq, CONTEXT), generator=gen)
        ctxs, nexts = [], []
        for _ in range(length):
            ctx = seq[:, -CONTEXT:]
            probs = torch.softmax(self.logits(ctx), dim=-1)
            nxt = torch.multinomial(probs, 1, generator=gen)
            ctxs.append(ctx)
            nexts.append(nxt[:, 0])
            seq = torch.cat([ctx, nxt], dim=1)
        return torch.cat(ctxs), torch.cat(nexts)


# ------------------------------------------------------------------------------------------
# Models
# ------------------------------------------------------------------------------------------


class MLPLM(nn.Module):
    """A fixed-context MLP language model: embeddings of the last 3 tokens -> MLP -> logits."""

    def __init__(self, emb: int, hidden: int, layers: int):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, emb)
        mods, width = [], CONTEXT * emb
        for _ in range(layers):
            mods += [nn.Linear(width, hidden), nn.GELU()]
            width = hidden
        mods.append(nn.Linear(width, VOCAB))
        self.net = nn.Sequential(*mods)

    def forward(self, ctx: torch.Tensor) -> torch.Tensor:
        return self.net(self.emb(ctx).flatten(1))


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ------------------------------------------------------------------------------------------
# Training and evaluation
# ------------------------------------------------------------------------------------------


class Progress:
    """A tqdm bar on a terminal when tqdm is installed; otherwise one line per run that grows by
    the mean training loss of each epoch as it ends."""

    def __init__(self, name: str, epochs: int):
        self.name, self.epochs, self.bar = name, epochs, None
        self.t0 = time.perf_counter()
        if sys.stderr.isatty():
            try:
                from tqdm import tqdm

                self.bar = tqdm(total=epochs, desc=f"  {name:<16}", leave=False, unit="epoch")
            except ImportError:
                pass
        if self.bar is None:
            print(f"  {name:<16} loss per epoch:", end="", flush=True)

    def epoch(self, i: int, loss: float):
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{loss:.4f}")
            self.bar.update(1)
        else:
            print(f" {loss:.3f}", end="", flush=True)

    def close(self):
        if self.bar is not None:
            self.bar.close()
        else:
            print(f"  ({time.perf_counter() - self.t0:.1f}s)", flush=True)


def train(
    model: nn.Module,
    name: str,
    ctx: torch.Tensor,
    loss_fn,
    epochs: int,
    batch: int,
    lr: float,
    seed: int,
) -> float:
    """Adam with a cosine schedule; loss_fn(logits, index) -> scalar. Returns the last epoch's
    mean training loss."""
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    steps = epochs * math.ceil(len(ctx) / batch)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: 0.5 * (1.0 + math.cos(math.pi * min(s, steps) / steps))
    )
    gen = torch.Generator().manual_seed(seed)
    progress = Progress(name, epochs)
    last = float("nan")
    for e in range(epochs):
        perm = torch.randperm(len(ctx), generator=gen)
        total, count = 0.0, 0
        for start in range(0, len(ctx), batch):
            idx = perm[start : start + batch]
            loss = loss_fn(model(ctx[idx]), idx)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
            count += len(idx)
        last = total / count
        progress.epoch(e, last)
    progress.close()
    return last


@torch.no_grad()
def evaluate(logits: torch.Tensor, targets: torch.Tensor, teacher_logits: torch.Tensor):
    """Held-out metrics, computed with plain PyTorch (independently of divkit)."""
    logq = F.log_softmax(logits.double(), dim=-1)
    logp = F.log_softmax(teacher_logits.double(), dim=-1)
    kl_ts = (logp.exp() * (logp - logq)).sum(-1).mean().item()
    kl_st = (logq.exp() * (logq - logp)).sum(-1).mean().item()
    ce = F.nll_loss(logq, targets).item()
    acc = (logits.argmax(-1) == targets).double().mean().item()
    agree = (logits.argmax(-1) == teacher_logits.argmax(-1)).double().mean().item()
    return kl_ts, kl_st, ce, acc, agree


def parse_kinds(text: str):
    kinds = []
    for name in filter(None, (k.strip() for k in text.split(","))):
        if name not in divkit.KINDS:
            raise SystemExit(
                f"distill_tiny: unknown kind {name!r}; divkit's kinds are {', '.join(divkit.KINDS)}"
            )
        kinds.append((name, KNOWN_OPTIONS.get(name, {})))
    return kinds


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--kinds",
        default=",".join(k for k, _ in DEFAULT_KINDS),
        help="comma-separated divergence kinds to distil with",
    )
    ap.add_argument("--epochs", type=int, default=12, help="student epochs")
    ap.add_argument("--teacher-epochs", type=int, default=6)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch and divkit threads; 0 keeps their defaults. The matrices are "
        "tiny, so one thread is the fastest (and the steadiest on a busy "
        "machine)",
    )
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    kinds = parse_kinds(args.kinds)

    if args.threads > 0:
        torch.set_num_threads(args.threads)
        divkit.set_num_threads(args.threads)
    t_start = time.perf_counter()
    print(
        f"divkit {divkit.__version__} (SIMD {divkit.active_simd_target()}, "
        f"threads: {divkit.get_num_threads()}), torch {torch.__version__} "
        f"(threads: {torch.get_num_threads()})"
    )

    # Data: one source, three disjoint samples.
    gen = torch.Generator().manual_seed(args.seed)
    source = Source(gen)
    corpus_ctx, corpus_next = source.sample(1000, 100, gen)  # 100k tokens for the teacher
    transfer_ctx, transfer_next = source.sample(200, 100, gen)  # 20k tokens for the students
    test_ctx, test_next = source.sample(200, 100, gen)  # 20k held-out tokens
    with torch.no_grad():
        source_test_logits = source.logits(test_ctx)
        entropy = F.cross_entropy(source_test_logits, test_next).item()
    print(
        f"data: vocabulary {VOCAB}, context {CONTEXT} tokens; teacher corpus "
        f"{len(corpus_ctx)} tokens, student transfer set {len(transfer_ctx)} tokens, "
        f"held-out {len(test_ctx)} tokens; the source's own cross-entropy on held-out "
        f"data (the floor): {entropy:.3f} nats/token"
    )

    # Teacher.
    torch.manual_seed(args.seed + 1)
    teacher = MLPLM(emb=32, hidden=256, layers=2)
    t0 = time.perf_counter()
    print(
        f"training the teacher ({n_params(teacher) / 1e6:.2f}M parameters) with cross-entropy ..."
    )
    train(
        teacher,
        "teacher",
        corpus_ctx,
        lambda logits, idx: F.cross_entropy(logits, corpus_next[idx]),
        epochs=args.teacher_epochs,
        batch=512,
        lr=2e-3,
        seed=args.seed + 2,
    )
    teacher.eval()
    with torch.no_grad():
        teacher_transfer = teacher(transfer_ctx)
        teacher_test = teacher(test_ctx)
    teacher_time = time.perf_counter() - t0

    # Students: the same initial weights and batch order for every run.
    def new_student() -> nn.Module:
        torch.manual_seed(args.seed + 3)
        return MLPLM(emb=16, hidden=64, layers=1)

    print(
        f"training students ({n_params(new_student()) / 1e3:.1f}k parameters, "
        f"{args.epochs} epochs on the transfer set, temperature {args.temperature:g}) ..."
    )
    rows = []
    t0 = time.perf_counter()
    model = new_student()
    loss = train(
        model,
        "baseline (CE)",
        transfer_ctx,
        lambda logits, idx: F.cross_entropy(logits, transfer_next[idx]),
        epochs=args.epochs,
        batch=256,
        lr=3e-3,
        seed=args.seed + 4,
    )
    with torch.no_grad():
        rows.append(
            (
                "hard labels (CE)",
                loss,
                evaluate(model(test_ctx), test_next, teacher_test),
                time.perf_counter() - t0,
            )
        )

    for kind, options in kinds:
        t0 = time.perf_counter()
        model = new_student()

        def kd_loss(logits, idx, kind=kind, options=options):
            return divkit.divergence(
                logits, teacher_transfer[idx], kind, temperature=args.temperature, **options
            )

        loss = train(
            model,
            kind,
            transfer_ctx,
            kd_loss,
            epochs=args.epochs,
            batch=256,
            lr=3e-3,
            seed=args.seed + 4,
        )
        if not math.isfinite(loss):
            print(f"distill_tiny: the {kind} run diverged (train loss {loss})", file=sys.stderr)
            return 1
        with torch.no_grad():
            label = kind + "".join(f" {k}={v:g}" for k, v in options.items())
            rows.append(
                (
                    label,
                    loss,
                    evaluate(model(test_ctx), test_next, teacher_test),
                    time.perf_counter() - t0,
                )
            )

    # Report.
    print()
    print("held-out results (nats/token; KL(t||s) = KL(p_teacher || q_student)):")
    header = (
        f"{'student trained with':<26}{'train loss':>11}{'KL(t||s)':>10}{'KL(s||t)':>10}"
        f"{'CE':>8}{'acc':>8}{'agree':>8}{'time':>8}"
    )
    print(header)
    print("-" * len(header))
    t_eval = evaluate(teacher_test, test_next, teacher_test)
    print(
        f"{'(teacher itself)':<26}{'':>11}{0.0:>10.4f}{0.0:>10.4f}{t_eval[2]:>8.3f}"
        f"{t_eval[3]:>8.3f}{1.0:>8.3f}{teacher_time:>7.1f}s"
    )
    for label, loss, (kl_ts, kl_st, ce, acc, agree), secs in rows:
        print(
            f"{label:<26}{loss:>11.4f}{kl_ts:>10.4f}{kl_st:>10.4f}{ce:>8.3f}{acc:>8.3f}"
            f"{agree:>8.3f}{secs:>7.1f}s"
        )
    print("-" * len(header))
    print(
        f"CE: cross-entropy of the real next tokens (floor {entropy:.3f}); acc: next-token "
        f"accuracy; agree: top-1 agreement with the teacher."
    )
    best = min(rows[1:], key=lambda r: r[2][0]) if len(rows) > 1 else None
    if best is not None:
        base = rows[0][2]
        print(
            f"lowest KL(t||s): {best[0]} ({best[2][0]:.4f} vs {base[0]:.4f} for the "
            f"hard-label baseline; held-out CE {best[2][2]:.3f} vs {base[2]:.3f})"
        )
    print(f"total time {time.perf_counter() - t_start:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
