#!/usr/bin/env python3
"""Reproduction: the reward-versus-KL frontier of TDPO against DPO (Zeng et al. 2024, "Token-level
Direct Preference Optimization"), at toy scale, nothing downloaded.

Setup (fixed seeds):

1. A tiny autoregressive policy over a vocabulary of 8 tokens: next-token logits from the
   prompt token, the position and the previous token (embeddings -> MLP); completions of 4
   tokens after a 1-token prompt, 4 prompts. The reference is a fixed random initialization
   (scaled so that its next-token distributions are peaked); the policy starts as a copy.
2. A known reward ``r(y)`` = the number of "good" tokens (ids 0-2) in the completion plus 0.5
   per pair of consecutive good tokens. Pairs of completions are sampled from the reference and
   labelled by the Bradley-Terry model of that reward, ``P(a > b) = sigmoid(r(a) - r(b))``, so
   the KL-regularized optimum is known: ``pi*_beta(y) ∝ pi_ref(y) exp(r(y) / beta)``.
3. Each method is trained offline on the same pairs for every beta of a grid and every seed
   (a seed draws the pairs and the minibatch order): DPO (``divkit.preference_loss``), f-DPO
   with the Jensen-Shannon divergence (``f_divergence_type="js_divergence"``), TDPO1 and TDPO2
   (``divkit.tdpo_loss``, alpha = 0.5, from policy and reference logits).
4. Evaluation is exact: all 8^4 completions of every prompt are enumerated, so the expected
   reward ``E_pi[r]`` and the sequence ``KL(pi || pi_ref)`` have no sampling error. A
   checkpoint every few steps adds a point (KL, reward); the exact optimal frontier of
   ``pi*_beta`` over a fine beta grid is drawn for reference (no policy has a higher reward at
   the same KL).

The paper's claim (IMDb sentiment generation with a sentiment classifier as the reward): TDPO,
TDPO2 in particular, reaches a better reward-KL frontier than DPO, i.e. a lower sequence KL at
equal reward. Per seed, each method's frontier is the Pareto set of its checkpoints over all
betas; the KL it needs to reach a reward level is interpolated on it, at reward levels that
every method reaches; the ratio KL(TDPO) / KL(DPO) (geometric mean over the levels) gets a 95%
confidence interval over the seeds (Student t). The claim holds here if the interval is below 1.

Run:  .venv/bin/python examples/repro_tdpo_frontier.py [--out DIR] [--seeds 5] [--steps 200]
      (about 1.5 minutes of CPU time, one thread; --tiny for a smoke test)
"""

from __future__ import annotations

import argparse
import copy
import itertools
import math
import os
from typing import Dict, List, Sequence

import numpy as np
import torch
from torch import nn

import divkit

V, T, N_PROMPTS, GOOD = 8, 4, 4, 3
METHODS = ("dpo", "fdpo_js", "tdpo1", "tdpo2")
LABELS = {
    "dpo": "DPO",
    "fdpo_js": "f-DPO (JS)",
    "tdpo1": "TDPO1",
    "tdpo2": "TDPO2 (alpha 0.5)",
}
# Two-sided 97.5% Student t quantiles by degrees of freedom (95% intervals over seeds).
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}


class TinyPolicy(nn.Module):
    def __init__(self, hidden: int = 32):
        super().__init__()
        self.prompt = nn.Embedding(V, hidden)
        self.tok = nn.Embedding(V, hidden)
        self.pos = nn.Embedding(T, hidden)
        self.mlp = nn.Sequential(nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh())
        self.head = nn.Linear(hidden, V)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [B, 1 + T] (prompt + completion) -> logits [B, T, V]; logits[:, t] predicts
        completion token t (already shifted, as divkit's token-level losses expect)."""
        inp = tokens[:, :-1]
        h = self.prompt(tokens[:, :1]) + self.tok(inp) + self.pos(torch.arange(T))
        return self.head(self.mlp(h))


def reward(completions: torch.Tensor) -> torch.Tensor:
    good = (completions < GOOD).double()
    return good.sum(-1) + 0.5 * (good[:, 1:] * good[:, :-1]).sum(-1)


def make_reference(seed: int) -> TinyPolicy:
    torch.manual_seed(seed)
    ref = TinyPolicy()
    with torch.no_grad():
        ref.head.weight.mul_(4.0)  # peaked next-token distributions
        ref.head.bias.copy_(torch.randn(V) * 0.5)
    for p in ref.parameters():
        p.requires_grad_(False)
    return ref


def all_sequences() -> torch.Tensor:
    """Every (prompt, completion): [N_PROMPTS * V^T, 1 + T]."""
    comp = torch.tensor(list(itertools.product(range(V), repeat=T)))
    prompts = torch.arange(N_PROMPTS).repeat_interleave(comp.shape[0])
    return torch.cat([prompts[:, None], comp.repeat(N_PROMPTS, 1)], 1)


def seq_logps(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    return divkit.preference.sequence_logps(model(tokens), tokens[:, 1:])


class Exact:
    """Exact expected reward and sequence KL(pi || pi_ref), by enumeration of all completions."""

    def __init__(self, ref: TinyPolicy):
        self.seqs = all_sequences()
        with torch.no_grad():
            ref_lp = seq_logps(ref, self.seqs).double().view(N_PROMPTS, -1)
        # Normalized in fp64 like the policy's below: the fp32 sequence log-probs sum to 1 only
        # up to fp32 rounding, which would otherwise show up as a KL of ~1e-8 between equal models.
        self.ref_lp = ref_lp - torch.logsumexp(ref_lp, 1, keepdim=True)
        self.r = reward(self.seqs[:, 1:]).view(N_PROMPTS, -1)

    @torch.no_grad()
    def __call__(self, policy: nn.Module) -> Dict[str, float]:
        lp = seq_logps(policy, self.seqs).double().view(N_PROMPTS, -1)
        lp = lp - torch.logsumexp(lp, 1, keepdim=True)  # exact 1 up to rounding
        p = lp.exp()
        kl = (p * (lp - self.ref_lp)).sum(1).mean()
        return {"kl": float(kl.clamp(min=0.0)), "reward": float((p * self.r).sum(1).mean())}

    def optimal(self, betas: Sequence[float]) -> List[Dict[str, float]]:
        """The exact KL-regularized optimum pi*_beta ∝ pi_ref exp(r / beta) for each beta."""
        out = []
        for b in betas:
            lp = self.ref_lp + self.r / b
            lp = lp - torch.logsumexp(lp, 1, keepdim=True)
            p = lp.exp()
            kl = (p * (lp - self.ref_lp)).sum(1).mean()
            out.append({"beta": b, "kl": float(kl), "reward": float((p * self.r).sum(1).mean())})
        return out


@torch.no_grad()
def sample(model: nn.Module, prompts: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    tokens = torch.cat([prompts[:, None], torch.zeros(len(prompts), T, dtype=torch.long)], 1)
    for t in range(T):
        logits = model(tokens)[:, t]
        tokens[:, 1 + t] = torch.multinomial(logits.softmax(-1), 1, generator=g).squeeze(-1)
    return tokens


@torch.no_grad()
def mc_sequence_kl(policy, ref, n: int, g: torch.Generator) -> Dict[str, float]:
    """Monte Carlo estimates of KL(pi || pi_ref) from n completions per prompt sampled from the
    policy: the plain log-ratio mean, and the mean of the per-token exact KLs summed over each
    sampled completion (the Rao-Blackwellized estimator; the KL from ``divkit.divergence``
    with the policy as the teacher: forward_kl is KL(teacher || student)). Both are unbiased;
    returns the means and their standard errors."""
    x = sample(policy, torch.arange(N_PROMPTS).repeat_interleave(n), g)
    lr = (seq_logps(policy, x) - seq_logps(ref, x)).double()
    pl, rl = policy(x), ref(x)
    tok = divkit.divergence(rl, pl, "forward_kl", reduction="none").double().sum(-1)
    se = lambda v: float(v.std() / math.sqrt(v.numel()))  # noqa: E731
    return {"logratio": float(lr.mean()), "logratio_se": se(lr), "tokens": float(tok.mean()),
            "tokens_se": se(tok)}  # fmt: skip


def preference_pairs(ref: TinyPolicy, n: int, g: torch.Generator):
    prompts = torch.randint(0, N_PROMPTS, (n,), generator=g)
    a, b = sample(ref, prompts, g), sample(ref, prompts, g)
    p = torch.sigmoid(reward(a[:, 1:]) - reward(b[:, 1:]))
    a_wins = torch.rand(n, generator=g, dtype=torch.float64) < p
    chosen = torch.where(a_wins[:, None], a, b)
    rejected = torch.where(a_wins[:, None], b, a)
    return chosen, rejected


def loss_fn(method: str, policy, batch, beta: float) -> torch.Tensor:
    c, r, ref_c, ref_r, ref_lc, ref_lr = batch
    if method in ("dpo", "fdpo_js"):
        f = "reverse_kl" if method == "dpo" else "js_divergence"
        losses, _, _ = divkit.preference_loss(
            seq_logps(policy, c), seq_logps(policy, r), ref_lc, ref_lr, beta=beta,
            f_divergence_type=f,
        )  # fmt: skip
    elif method in ("tdpo1", "tdpo2"):
        losses, _, _ = divkit.tdpo_loss(
            policy(c), policy(r), ref_c, ref_r, c[:, 1:], r[:, 1:], beta=beta, alpha=0.5,
            variant=method,
        )  # fmt: skip
    else:
        raise ValueError(f"unknown method {method!r} (valid: {', '.join(METHODS)})")
    return losses.mean()


def train(method, beta, ref, exact, data, seed, steps, batch, lr, eval_every):
    """Trains a copy of the reference: its checkpoints' exact (KL, reward), and the policy."""
    chosen, rejected, ref_c, ref_r, ref_lc, ref_lr = data
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    policy = copy.deepcopy(ref)
    for p in policy.parameters():
        p.requires_grad_(True)
    opt = torch.optim.Adam(policy.parameters(), lr=lr)
    points = []
    for step in range(1, steps + 1):
        idx = torch.randint(0, chosen.shape[0], (batch,), generator=g)
        b = (chosen[idx], rejected[idx], ref_c[idx], ref_r[idx], ref_lc[idx], ref_lr[idx])
        loss = loss_fn(method, policy, b, beta)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % eval_every == 0 or step == steps:
            points.append({"step": step, "beta": beta, "seed": seed, **exact(policy)})
    return points, policy


def pareto(points: Sequence[Dict]) -> np.ndarray:
    """The (KL, reward) points that no other point beats on both, sorted by KL: [k, 2]."""
    pts = sorted((p["kl"], p["reward"]) for p in points)
    front, best = [], -math.inf
    for kl, r in pts:
        if r > best:
            front.append((kl, r))
            best = r
    return np.array(front)


def kl_at_reward(front: np.ndarray, r: float) -> float:
    """The KL this frontier needs to reach reward r (linear interpolation; nan if unreached)."""
    if r > front[-1, 1]:
        return math.nan
    return float(np.interp(r, front[:, 1], front[:, 0]))


def mean_ci(x) -> tuple:
    x = np.asarray([v for v in x if math.isfinite(v)], dtype=float)
    if x.size == 0:
        return math.nan, math.nan
    if x.size == 1:
        return float(x[0]), 0.0
    return float(x.mean()), float(T975.get(x.size - 1, 1.96) * x.std(ddof=1) / math.sqrt(x.size))


def compare(points: Dict[str, List[Dict]], seeds, r0: float, n_levels: int = 5) -> Dict:
    """Per seed: each method's Pareto frontier; the KL needed at reward levels that every method
    reaches in that seed; log KL ratios of each method against DPO, averaged over the levels."""
    out: Dict[str, List[float]] = {m: [] for m in points if m != "dpo"}
    levels_used = []
    for s in seeds:
        # The reference itself (KL 0) starts every frontier.
        fronts = {
            m: pareto([{"kl": 0.0, "reward": r0}] + [p for p in pts if p["seed"] == s])
            for m, pts in points.items()
        }
        top = min(f[-1, 1] for f in fronts.values())
        levels = np.linspace(r0 + 0.15 * (top - r0), top, n_levels)
        levels_used.append((float(levels[0]), float(levels[-1])))
        base = np.array([kl_at_reward(fronts["dpo"], r) for r in levels])
        for m in out:
            mine = np.array([kl_at_reward(fronts[m], r) for r in levels])
            out[m].append(float(np.mean(np.log(mine / base))))
    res = {}
    for m, v in out.items():
        mean, ci = mean_ci(v)
        res[m] = {"log_ratio": mean, "ci": ci, "per_seed": v}
    return {"methods": res, "levels": levels_used}


def main(argv=None) -> Dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="repro_tdpo_frontier_out")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--betas", default=None, help="default 0.03,0.1,0.3,1,3")
    ap.add_argument("--mc-samples", type=int, default=4000, help="per prompt, for the MC check")
    ap.add_argument("--threads", type=int, default=1, help="torch and divkit threads")
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--pairs", type=int, default=2048)
    ap.add_argument("--eval-every", type=int, default=40)
    ap.add_argument("--tiny", action="store_true", help="smoke-test settings")
    a = ap.parse_args(argv)
    if a.tiny:
        a.seeds, a.steps, a.pairs, a.eval_every, a.mc_samples = 2, 10, 128, 5, 1000
    if a.betas is None:
        a.betas = "0.3,1000" if a.tiny else "0.03,0.1,0.3,1,3"
    methods = [m for m in a.methods.split(",") if m]
    if "dpo" not in methods:
        ap.error("--methods must include dpo (the baseline of the comparison)")
    betas = [float(b) for b in a.betas.split(",")]
    seeds = list(range(a.seeds))
    # Tiny models: one thread each is fastest, and the most polite on a shared machine; the
    # caller's settings come back at the end (the smoke test runs main inside pytest).
    threads = torch.get_num_threads(), divkit.get_num_threads()
    torch.set_num_threads(a.threads)
    divkit.set_num_threads(a.threads)
    try:
        return _run(a, methods, betas, seeds)
    finally:
        torch.set_num_threads(threads[0])
        divkit.set_num_threads(threads[1])


def _run(a, methods, betas, seeds) -> Dict:
    ref = make_reference(0)
    exact = Exact(ref)
    start = exact(ref)
    points: Dict[str, List[Dict]] = {m: [] for m in methods}
    for s in seeds:
        g = torch.Generator().manual_seed(1000 + s)
        c, r = preference_pairs(ref, a.pairs, g)
        with torch.no_grad():
            data = (c, r, ref(c), ref(r), seq_logps(ref, c), seq_logps(ref, r))
        for m in methods:
            for b in betas:
                pts, policy = train(m, b, ref, exact, data, s, a.steps, a.batch, a.lr, a.eval_every)
                points[m] += pts
                if s == 0 and m == "dpo" and b == min(betas):
                    farthest = policy  # the largest KL: the hardest case for the MC check
    opt_betas = np.geomspace(0.02, 200, 120)[::-1]
    optimal = [{"beta": math.inf, **start}] + exact.optimal([float(b) for b in opt_betas])
    cmp = compare(points, seeds, start["reward"])
    mc = mc_sequence_kl(farthest, ref, a.mc_samples, torch.Generator().manual_seed(7))
    mc["exact"] = exact(farthest)["kl"]

    # Final points per (method, beta): mean and 95% CI over the seeds.
    final = {}
    for m in methods:
        for b in betas:
            last = [p for p in points[m] if p["beta"] == b and p["step"] == a.steps]
            final[(m, b)] = {
                "kl": mean_ci([p["kl"] for p in last]),
                "reward": mean_ci([p["reward"] for p in last]),
            }
    opt_kl = np.array([o["kl"] for o in optimal])
    opt_r = np.array([o["reward"] for o in optimal])
    # No policy beats pi*_beta: its reward at its KL is the most any policy gets there.
    excess = max(p["reward"] - float(np.interp(p["kl"], opt_kl, opt_r))
                 for pts in points.values() for p in pts)  # fmt: skip

    lines = [
        f"Reference policy: reward {start['reward']:.3f}, KL 0. {len(seeds)} seeds, "
        f"{a.steps} steps, {a.pairs} pairs; mean ± 95% CI over seeds; 'optimal' is the exact "
        f"reward of pi*_beta at the method's KL.",
        "",
        "| method | beta | KL(pi ‖ pi_ref) | reward | optimal reward at that KL |",
        "|---|---|---|---|---|",
    ]
    for (m, b), v in final.items():
        (k, kc), (rw, rc) = v["kl"], v["reward"]
        lines.append(
            f"| {LABELS[m]} | {b:g} | {k:.3f} ± {kc:.3f} | {rw:.3f} ± {rc:.3f} | "
            f"{float(np.interp(k, opt_kl, opt_r)):.3f} |"
        )
    lines.append("")
    verdicts = {}
    for m, v in cmp["methods"].items():
        ratio = math.exp(v["log_ratio"])
        lo, hi = math.exp(v["log_ratio"] - v["ci"]), math.exp(v["log_ratio"] + v["ci"])
        if hi < 1:
            word = "lower KL than DPO at equal reward"
        elif lo > 1:
            word = "higher KL than DPO at equal reward"
        else:
            word = "no significant difference from DPO"
        verdicts[m] = word
        lines.append(
            f"- {LABELS[m]}: KL at equal reward / DPO's = {ratio:.2f} (95% CI {lo:.2f}-{hi:.2f}, "
            f"{len(seeds)} seeds): {word}"
        )
    if "tdpo2" in verdicts:
        holds = verdicts["tdpo2"].startswith("lower")
        worse = verdicts["tdpo2"].startswith("higher")
        word = "holds" if holds else ("is contradicted" if worse else "is not confirmed")
        lines.append(
            f"\nVerdict: the TDPO paper's claim (TDPO2 reaches a reward at lower sequence KL "
            f"than DPO) {word} at this scale."
        )
    lines.append(
        f"\nCheck of the exact KL (DPO, beta {min(betas):g}, seed 0): exact "
        f"{mc['exact']:.4f}; Monte Carlo ({a.mc_samples} samples per prompt) log-ratio "
        f"{mc['logratio']:.4f} ± {2 * mc['logratio_se']:.4f}, per-token KL sum "
        f"{mc['tokens']:.4f} ± {2 * mc['tokens_se']:.4f} (± 2 standard errors). Largest "
        f"reward of a checkpoint above the optimal frontier at its KL: {excess:.4f} (<= 0 up to "
        f"the frontier's interpolation)."
    )
    table = "\n".join(lines)
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "table.md"), "w") as f:
        f.write(table + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6.5, 4.5))
        ax.plot(opt_kl, opt_r, "k--", lw=1, label="optimal pi*_beta (exact)")
        for i, m in enumerate(methods):
            col = f"C{i}"
            allp = points[m]
            ax.scatter([p["kl"] for p in allp], [p["reward"] for p in allp], s=4, c=col,
                       alpha=0.25)  # fmt: skip
            xs = [final[(m, b)]["kl"] for b in betas]
            ys = [final[(m, b)]["reward"] for b in betas]
            ax.errorbar(
                [x[0] for x in xs], [y[0] for y in ys], xerr=[x[1] for x in xs],
                yerr=[y[1] for y in ys], fmt="o-", c=col, label=LABELS[m], ms=4,
            )  # fmt: skip
        ax.set_xscale("symlog", linthresh=0.1)
        ax.set_xlabel("sequence KL(pi || pi_ref) (exact)")
        ax.set_ylabel("expected reward (exact)")
        ax.set_title("Reward-KL frontier (dots: checkpoints; lines: final, per beta)")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(os.path.join(a.out, "frontier.png"), dpi=110)
        plt.close(fig)
    except ImportError:  # pragma: no cover
        print("matplotlib not installed: no PNG")
    print(table)
    return {
        "start": start,
        "points": points,
        "final": final,
        "optimal": optimal,
        "compare": cmp,
        "verdicts": verdicts,
        "mc_check": mc,
        "excess_over_optimal": excess,
        "exact": exact,
        "ref": ref,
    }


if __name__ == "__main__":
    main()
