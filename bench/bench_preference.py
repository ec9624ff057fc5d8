#!/usr/bin/env python3
"""divkit's preference losses vs TRL, side by side in one run: time and peak memory.

    python bench/bench_preference.py            # full sizes (below)
    python bench/bench_preference.py --quick    # small sizes, a few seconds

1. Sequence level, a batch of --pairs (4096) pairs, forward + backward of the summed loss:
   - DPO sigmoid: ``divkit.preference_loss`` vs TRL 1.16's arithmetic. TRL 1.16 has no free
     dpo_loss function (the math lives inside DPOTrainer._compute_loss, which needs a model),
     so the peer is that method's sigmoid-loss lines reproduced in torch: ``logits =
     (pc - pr) - (rc - rr); losses = -logsigmoid(beta logits)``, rewards ``beta (p - r)``.
   - CPO/SimPO: ``divkit.cpo_loss`` vs TRL's own ``CPOTrainer.cpo_loss`` (called unbound).
2. Token level, TDPO2 from hidden states, B x T tokens (chosen and rejected each), hidden H,
   vocabulary V (default 8 x 512, 1024, 32000): ``divkit.tdpo_loss_fused`` (policy hidden
   states + lm_head, reference hidden states + its lm_head: both heads fused, no [tokens x V]
   tensor) vs the TRL-style materialized computation (logits = hidden @ W.T for the policy and
   the reference, log-probs by TRL's ``selective_log_softmax``, per-token KL(pi_ref || pi) by
   log_softmax over the full logits, TDPO2's loss in torch), forward + backward to the policy
   hidden states and lm_head weight. divkit variants: ``tdpo_divkit`` (the one-pass engine with
   its default keep budget), ``tdpo_divkit_nokeep`` (keep_bytes=0: the backward recomputes every
   chunk) and ``tdpo_divkit_2pass`` (the composition the one-pass engine replaced:
   ``fused_linear_logprobs`` for each head's label log-probs and ``rlhf.exact_kl_fused`` for the
   KL, each computing its own chunks of logits), and a second peer ``tdpo_divkit_logits``
   (divkit's ``tdpo_loss`` on the materialized logits). Liger-Kernel has no TDPO.
3. SparsePO from hidden states, same sizes, with four token masks [B, T] that require grad (as
   learned masks do): ``divkit.sparsepo_loss_fused`` (``sparsepo_divkit``: the one-pass engine,
   gradients in the forward; ``sparsepo_divkit_nokeep``: keep_bytes=0, the per-side path whose
   backward recomputes every chunk) vs SparsePO's formula in torch on the materialized logits
   (``sparsepo_torch``, the same per-token terms as ``tdpo_trl``) and divkit's ``sparsepo_loss``
   on the materialized logits (``sparsepo_divkit_logits``).

Each case runs in its own subprocess with --threads (2) torch and divkit threads; "peak MiB"
is that process's peak RSS minus its RSS just before the timed calls (inputs excluded). Times
are the best of --reps runs (one run of the large token cases) in each subprocess; the cases
run --rounds times, alternating, and the tables give medians over the rounds. The last table
sets each divkit case beside each peer: the speed (peer s / divkit s) and memory (peer MiB /
divkit MiB) ratios are taken within a round, where both ran under the same load, and their
median printed, with the token cases' target (at least as fast, at most 1/8 of the peak
memory). On a shared machine the figures are noisy: the header prints the load average
before and after.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
import types


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_case(case: str, a) -> dict:
    import torch
    import torch.nn.functional as F

    import divkit

    torch.set_num_threads(a.threads)
    divkit.set_num_threads(a.threads)
    torch.manual_seed(0)
    beta = 0.1
    if case in ("dpo_divkit", "dpo_trl", "cpo_divkit", "cpo_trl"):
        n = a.pairs
        xs = [(-torch.rand(n) * 50 - 1).requires_grad_() for _ in range(4)]

        def step():
            pc, pr, rc, rr = xs
            if case == "dpo_divkit":
                losses, cr, rj = divkit.preference_loss(pc, pr, rc, rr, beta=beta)
            elif case == "dpo_trl":
                logits = (pc - pr) - (rc - rr)
                losses = -F.logsigmoid(beta * logits)
                cr, rj = beta * (pc - rc).detach(), beta * (pr - rr).detach()
            elif case == "cpo_divkit":
                losses, cr, rj = divkit.cpo_loss(
                    pc, pr, loss_type="simpo", beta=2.0, simpo_gamma=0.5
                )
            else:
                from trl.experimental.cpo import CPOTrainer

                ns = types.SimpleNamespace(
                    alpha=0.0,
                    beta=2.0,
                    loss_type="simpo",
                    label_smoothing=0.0,
                    simpo_gamma=0.5,
                    accelerator=types.SimpleNamespace(device="cpu"),
                )
                losses, cr, rj = CPOTrainer.cpo_loss(ns, pc, pr)
            losses.sum().backward()
            for x in xs:
                x.grad = None
            return losses

        reps = a.reps
    else:
        b, t, h, v = a.batch, a.seq, a.hidden, a.vocab
        g = torch.Generator().manual_seed(0)
        w = (torch.randn(v, h, generator=g) * h**-0.5).requires_grad_()
        rw = w.detach() + 0.01 * torch.randn(v, h, generator=g) * h**-0.5
        hc, hr = (torch.randn(b, t, h, generator=g).requires_grad_() for _ in range(2))
        rhc, rhr = (
            hc.detach() + 0.1 * torch.randn(b, t, h, generator=g),
            hr.detach() + 0.1 * torch.randn(b, t, h, generator=g),
        )
        cl, rl = (torch.randint(0, v, (b, t), generator=g) for _ in range(2))
        cl[:, : t // 4] = -100
        rl[:, : t // 4] = -100

        # SparsePO's token masks [B, T] (learned masks in practice: they require grad here, so
        # both sides compute their gradients too)
        mrc, mrr, mkc, mkr = (
            (torch.rand(b, t, generator=g) * 1.5).requires_grad_() for _ in range(4)
        )
        masks = (mrc, mrr, mkc, mkr)
        sp = dict(beta=beta, l1_reward=0.01, l1_kl=0.01)

        def trl_side(hp, hrf, lab, kl_grad):
            # per-token log-ratio and KL(pi_ref || pi), 0 at ignored tokens
            from trl.trainer.utils import selective_log_softmax

            mask = lab != -100
            z = hp @ w.t()
            with torch.no_grad():
                zr = hrf @ rw.t()
                lr = zr.log_softmax(-1)
            idx = lab.masked_fill(~mask, 0)
            ratio = selective_log_softmax(z, idx) - lr.gather(-1, idx[..., None]).squeeze(-1)
            lp = (z if kl_grad else z.detach()).log_softmax(-1)
            kl = (lr.exp() * (lr - lp)).sum(-1)
            return ratio * mask, kl * mask, mask

        def two_pass_side(hp, hrf, lab, kl_grad):
            # The composition the one-pass engine replaced: three fused calls per side.
            from divkit import rlhf

            mask = lab != -100
            lp = divkit.fused_linear_logprobs(hp, w, lab)
            rlp = divkit.fused_linear_logprobs(hrf, rw, lab)
            hk, wk = (hp, w) if kl_grad else (hp.detach(), w.detach())
            kl = rlhf.exact_kl_fused(
                hk, wk, ref_hidden=hrf, ref_weight=rw, labels=lab, direction="ref_policy"
            )
            return ((lp - rlp) * mask).sum(-1), (kl * mask).sum(-1)

        def fused_kw():
            return dict(
                ref_chosen_hidden=rhc,
                ref_rejected_hidden=rhr,
                ref_weight=rw,
                beta=beta,
                keep_bytes=0 if case.endswith("_nokeep") else None,
            )

        def step():
            if case in ("tdpo_divkit", "tdpo_divkit_nokeep"):
                losses, _, _ = divkit.tdpo_loss_fused(
                    hc, hr, w, cl, rl, alpha=0.5, variant="tdpo2", **fused_kw()
                )
            elif case == "tdpo_divkit_2pass":
                lw, kw = two_pass_side(hc, rhc, cl, False)
                ll, kr = two_pass_side(hr, rhr, rl, True)
                losses = -F.logsigmoid(beta * ((lw - ll) - 0.5 * (kr - kw)))
            elif case == "tdpo_divkit_logits":
                losses, _, _ = divkit.tdpo_loss(
                    hc @ w.t(), hr @ w.t(), rhc @ rw.t(), rhr @ rw.t(), cl, rl, beta=beta
                )
            elif case == "tdpo_trl":
                lw, kw, _ = trl_side(hc, rhc, cl, False)
                ll, kr, _ = trl_side(hr, rhr, rl, True)
                lw, kw, ll, kr = (x.sum(-1) for x in (lw, kw, ll, kr))
                logits = (lw - ll) - 0.5 * (kr - kw)
                losses = -F.logsigmoid(beta * logits)
            elif case in ("sparsepo_divkit", "sparsepo_divkit_nokeep"):
                losses, _, _ = divkit.sparsepo_loss_fused(
                    hc,
                    hr,
                    w,
                    cl,
                    rl,
                    chosen_reward_mask=mrc,
                    rejected_reward_mask=mrr,
                    chosen_kl_mask=mkc,
                    rejected_kl_mask=mkr,
                    **fused_kw(),
                    **{k: v for k, v in sp.items() if k != "beta"},
                )
            elif case == "sparsepo_divkit_logits":
                losses, _, _ = divkit.sparsepo_loss(
                    hc @ w.t(),
                    hr @ w.t(),
                    rhc @ rw.t(),
                    rhr @ rw.t(),
                    cl,
                    rl,
                    chosen_reward_mask=mrc,
                    rejected_reward_mask=mrr,
                    chosen_kl_mask=mkc,
                    rejected_kl_mask=mkr,
                    **sp,
                )
            else:  # sparsepo_torch: SparsePO's formula in torch on the materialized logits
                (rw_, kw_, m_w), (rl_, kl_, m_l) = (
                    trl_side(hc, rhc, cl, True),
                    trl_side(hr, rhr, rl, True),
                )
                u = (mrc * rw_).sum(-1) - (mrr * rl_).sum(-1)
                d = -(mkc * kw_).sum(-1) + (mkr * kl_).sum(-1)
                l1 = sp["l1_reward"] * ((mrc.abs() * m_w).sum(-1) + (mrr.abs() * m_l).sum(-1))
                l1 = l1 + sp["l1_kl"] * ((mkc.abs() * m_w).sum(-1) + (mkr.abs() * m_l).sum(-1))
                losses = -F.logsigmoid(beta * (u - d)) + l1
            losses.sum().backward()
            out = losses.detach().clone()
            for x in (hc, hr, w, *masks):
                x.grad = None
            return out

        reps = 1 if a.vocab * a.batch * a.seq > 1e8 else a.reps
    if case in ("cpo_trl", "tdpo_trl", "sparsepo_torch"):  # import outside the measured region
        import trl.experimental.cpo  # noqa: F401
        import trl.trainer.utils  # noqa: F401
    base = rss_mib()
    times, losses = [], None
    for _ in range(reps):
        t0 = time.perf_counter()
        losses = step()
        times.append(time.perf_counter() - t0)
    return {
        "case": case,
        "seconds": min(times),
        "peak_mib": max(0.0, peak_mib() - base),
        "loss_mean": float(losses.detach().double().mean()),
    }


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--pairs", type=int, default=4096)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--threads", type=int, default=2, help="torch's and divkit's CPU threads")
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds of all the cases")
    p.add_argument(
        "--cases",
        default="dpo,cpo,tdpo,sparsepo",
        help="comma-separated families to run (dpo, cpo, tdpo, sparsepo)",
    )
    p.add_argument("--only", help="comma-separated case names to keep (e.g. tdpo_divkit,tdpo_trl)")
    p.add_argument("--case", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.quick:
        a.batch, a.seq, a.hidden, a.vocab, a.reps = 2, 128, 256, 8000, 3
    if a.case:
        print(json.dumps(run_case(a.case, a)))
        return
    import platform

    import torch

    def load():
        with open("/proc/loadavg") as f:
            return " ".join(f.read().split()[:3])

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(x.split(":", 1)[1].strip() for x in f if x.startswith("model name"))
    except (OSError, StopIteration):
        pass
    print(
        f"{cpu}, {os.cpu_count()} cpus, torch "
        f"{torch.__version__}, threads {a.threads}; pairs {a.pairs}; token cases "
        f"B={a.batch} T={a.seq} H={a.hidden} V={a.vocab}; load average before: {load()}"
    )
    args = [x for x in sys.argv[1:] if x != "--quick"]
    if a.quick:
        args += [
            "--batch",
            str(a.batch),
            "--seq",
            str(a.seq),
            "--hidden",
            str(a.hidden),
            "--vocab",
            str(a.vocab),
            "--reps",
            str(a.reps),
        ]
    # family: (divkit's cases, the peers' cases); ratios are peer / divkit, paired by round
    families = {
        "dpo": (("dpo_divkit",), ("dpo_trl",)),
        "cpo": (("cpo_divkit",), ("cpo_trl",)),
        "tdpo": (
            ("tdpo_divkit", "tdpo_divkit_nokeep", "tdpo_divkit_2pass"),
            ("tdpo_trl", "tdpo_divkit_logits"),
        ),
        "sparsepo": (
            ("sparsepo_divkit", "sparsepo_divkit_nokeep"),
            ("sparsepo_torch", "sparsepo_divkit_logits"),
        ),
    }
    cases = [c for f in a.cases.split(",") for part in families[f.strip()] for c in part]
    if a.only:
        cases = [c for c in cases if c in a.only.split(",")]
    runs = {c: [None] * a.rounds for c in cases}
    for rnd in range(a.rounds):
        # Alternate the order between rounds so that no case always runs first.
        for case in cases if rnd % 2 == 0 else cases[::-1]:
            r = subprocess.run(
                [sys.executable, __file__, "--case", case, *args], capture_output=True, text=True
            )
            if r.returncode != 0:
                print(f"{case}: failed ({r.returncode}): {r.stderr.strip().splitlines()[-1:]}")
                continue
            runs[case][rnd] = json.loads(r.stdout.strip().splitlines()[-1])

    def median(xs):
        xs = sorted(xs)
        m = len(xs) // 2
        return xs[m] if len(xs) % 2 else 0.5 * (xs[m - 1] + xs[m])

    rows = {}
    for c, rs in runs.items():
        ok = [r for r in rs if r is not None]
        if ok:
            rows[c] = {
                "seconds": median([r["seconds"] for r in ok]),
                "all": [r and r["seconds"] for r in rs],
                "peak_mib": median([r["peak_mib"] for r in ok]),
                "loss_mean": ok[-1]["loss_mean"],
            }
    print(f"load average after: {load()}; medians of {a.rounds} alternating rounds")
    print(f"{'case':<24}{'seconds':>10}{'peak MiB':>10}{'loss mean':>14}  all rounds (s)")
    for c, r in rows.items():
        print(
            f"{c:<24}{r['seconds']:>10.4f}{r['peak_mib']:>10.0f}{r['loss_mean']:>14.6f}  "
            + " ".join("-" if x is None else f"{x:.3f}" for x in r["all"])
        )
    # Side by side: each divkit case against each peer, the ratios taken within a round (both
    # measured under the same load), then the median over the rounds.
    print(
        f"\n{'divkit case':<24}{'peer':<24}{'divkit s':>9}{'peer s':>9}{'speed':>7}"
        f"{'divkit MiB':>11}{'peer MiB':>9}{'memory':>8}  target (speed >= 1, memory >= 8)"
    )
    for ours, peers in families.values():
        for c in ours:
            for pc in peers:
                d, t = rows.get(c), rows.get(pc)
                if not d or not t:
                    continue
                pairs = [
                    (x, y) for x, y in zip(runs[c], runs[pc]) if x is not None and y is not None
                ]
                speed = median([y["seconds"] / x["seconds"] for x, y in pairs])
                mem = median(
                    [
                        y["peak_mib"] / x["peak_mib"] if x["peak_mib"] > 1 else float("nan")
                        for x, y in pairs
                    ]
                )
                met = "-"  # the target is the token cases'
                if c.startswith(("tdpo", "sparsepo")):
                    met = "met" if speed >= 1 and mem >= 8 else "not met"
                print(
                    f"{c:<24}{pc:<24}{d['seconds']:>9.4g}{t['seconds']:>9.4g}{speed:>6.2f}x"
                    f"{d['peak_mib']:>11.0f}{t['peak_mib']:>9.0f}{mem:>7.1f}x  {met} "
                    f"(losses {d['loss_mean']:.6f} vs {t['loss_mean']:.6f})"
                )


if __name__ == "__main__":
    main()
