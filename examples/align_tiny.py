#!/usr/bin/env python3
"""Align a tiny language model with DPO and TDPO2 on synthetic preference data.

Everything is generated here, from fixed seeds; nothing is downloaded:

1. A tiny autoregressive policy: next-token logits from the previous token and the position
   (embeddings -> MLP), vocabulary 16, completions of 6 tokens after a 1-token prompt.
2. A known reward: the number of "good" tokens (ids below 8) in the completion, plus a bonus for
   each good token that follows a good one. Pairs of completions are sampled from the initial
   policy (the reference); the one with the higher reward is chosen (ties dropped).
3. The policy is trained for a few hundred steps with ``divkit.preference_loss`` (DPO, from
   sequence log-probs) or ``divkit.tdpo_loss`` (TDPO2, from policy and reference logits).
4. Every few steps, on held-out pairs: the implicit-reward accuracy (beta * log-ratio of the
   chosen completion above that of the rejected one) and the mean margin, both of which rise,
   and the known reward of the policy's own greedy completions.

Run:  .venv/bin/python examples/align_tiny.py [--steps 300] [--methods dpo,tdpo2]
"""

from __future__ import annotations

import argparse
import copy
import time
from typing import Dict, List

import torch
from torch import nn

import divkit

V, T, GOOD = 16, 6, 8


class TinyLM(nn.Module):
    def __init__(self, hidden: int = 32):
        super().__init__()
        self.tok = nn.Embedding(V, hidden)
        self.pos = nn.Embedding(T + 1, hidden)
        self.mlp = nn.Sequential(nn.Linear(hidden, hidden), nn.Tanh(), nn.Linear(hidden, V))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [B, 1 + T] (prompt + completion) -> logits [B, T, V], where logits[:, t]
        predicts completion token t (already shifted, as divkit's token-level losses expect)."""
        inp = tokens[:, :-1]
        pos = torch.arange(inp.shape[1])
        return self.mlp(self.tok(inp) + self.pos(pos))


def reward(completions: torch.Tensor) -> torch.Tensor:
    good = (completions < GOOD).float()
    return good.sum(-1) + (good[:, 1:] * good[:, :-1]).sum(-1)


@torch.no_grad()
def sample(model: TinyLM, prompts: torch.Tensor, g: torch.Generator, greedy=False):
    tokens = prompts[:, None]
    for _ in range(T):
        logits = model(torch.cat([tokens, tokens[:, -1:]], 1))[:, -1]
        nxt = (
            logits.argmax(-1)
            if greedy
            else torch.multinomial(logits.softmax(-1), 1, generator=g).squeeze(-1)
        )
        tokens = torch.cat([tokens, nxt[:, None]], 1)
    return tokens


def preference_pairs(ref: TinyLM, n: int, g: torch.Generator):
    prompts = torch.randint(0, V, (n,), generator=g)
    a, b = sample(ref, prompts, g), sample(ref, prompts, g)
    ra, rb = reward(a[:, 1:]), reward(b[:, 1:])
    keep = ra != rb
    chosen = torch.where((ra > rb)[:, None], a, b)[keep]
    rejected = torch.where((ra > rb)[:, None], b, a)[keep]
    return chosen, rejected


def labels_of(tokens: torch.Tensor) -> torch.Tensor:
    return tokens[:, 1:]  # every completion token counts (the prompt is the input only)


def seq_logps(model, tokens):
    return divkit.preference.sequence_logps(model(tokens), labels_of(tokens))


@torch.no_grad()
def evaluate(policy, ref, chosen, rejected, beta, g) -> Dict[str, float]:
    _, cr, rj = divkit.preference_loss(
        seq_logps(policy, chosen),
        seq_logps(policy, rejected),
        seq_logps(ref, chosen),
        seq_logps(ref, rejected),
        beta=beta,
    )
    m = divkit.preference_metrics(cr, rj)
    greedy = sample(policy, torch.arange(V), g, greedy=True)
    return {
        "accuracy": m["rewards/accuracies"],
        "margin": m["rewards/margins"],
        "greedy_reward": reward(greedy[:, 1:]).mean().item(),
    }


def train(
    method: str,
    steps: int = 300,
    seed: int = 0,
    beta: float = 0.1,
    batch: int = 64,
    lr: float = 3e-3,
    eval_every: int = 50,
    verbose: bool = True,
) -> List[Dict[str, float]]:
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    ref = TinyLM()
    policy = copy.deepcopy(ref)
    for p in ref.parameters():
        p.requires_grad_(False)
    train_c, train_r = preference_pairs(ref, 4096, g)
    test_c, test_r = preference_pairs(ref, 1024, g)
    opt = torch.optim.Adam(policy.parameters(), lr=lr)
    history = []
    for step in range(steps + 1):
        if step % eval_every == 0:
            row = {"step": step, **evaluate(policy, ref, test_c, test_r, beta, g)}
            history.append(row)
            if verbose:
                print(
                    f"{method:6s} step {step:4d}  accuracy {row['accuracy']:.3f}  margin "
                    f"{row['margin']:+.4f}  greedy reward {row['greedy_reward']:.2f}",
                    flush=True,
                )
        if step == steps:
            break
        idx = torch.randint(0, train_c.shape[0], (batch,), generator=g)
        c, r = train_c[idx], train_r[idx]
        if method == "dpo":
            with torch.no_grad():
                rc, rr = seq_logps(ref, c), seq_logps(ref, r)
            losses, _, _ = divkit.preference_loss(
                seq_logps(policy, c), seq_logps(policy, r), rc, rr, beta=beta
            )
        elif method == "tdpo2":
            with torch.no_grad():
                ref_c, ref_r = ref(c), ref(r)
            losses, _, _ = divkit.tdpo_loss(
                policy(c), policy(r), ref_c, ref_r, labels_of(c), labels_of(r), beta=beta, alpha=0.5
            )
        else:
            raise ValueError(f"unknown method {method!r} (dpo, tdpo2)")
        opt.zero_grad()
        losses.mean().backward()
        opt.step()
    return history


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--methods", default="dpo,tdpo2")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    for method in args.methods.split(","):
        t0 = time.time()
        h = train(method, steps=args.steps, seed=args.seed)
        print(
            f"{method}: accuracy {h[0]['accuracy']:.3f} -> {h[-1]['accuracy']:.3f}, margin "
            f"{h[0]['margin']:+.4f} -> {h[-1]['margin']:+.4f}, greedy reward "
            f"{h[0]['greedy_reward']:.2f} -> {h[-1]['greedy_reward']:.2f} "
            f"({time.time() - t0:.1f} s)\n"
        )


if __name__ == "__main__":
    main()
