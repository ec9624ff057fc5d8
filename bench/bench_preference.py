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
   KL, each computing its own chunks of logits). Liger-Kernel has no TDPO.

Each case runs in its own subprocess; "peak MiB" is that process's peak RSS minus its RSS
just before the timed calls (inputs excluded). Times are the best of --reps runs (one run of
the large token case) in each subprocess; the cases run --rounds times, alternating, and the
table gives the median over the rounds (the peak: the largest). On a shared machine the
figures are noisy: the header prints the load (``uptime``) before and after.
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

        def trl_side(hp, hrf, lab, kl_grad):
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
            return (ratio * mask).sum(-1), (kl * mask).sum(-1)

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

        def step():
            if case in ("tdpo_divkit", "tdpo_divkit_nokeep"):
                losses, _, _ = divkit.tdpo_loss_fused(
                    hc,
                    hr,
                    w,
                    cl,
                    rl,
                    ref_chosen_hidden=rhc,
                    ref_rejected_hidden=rhr,
                    ref_weight=rw,
                    beta=beta,
                    alpha=0.5,
                    variant="tdpo2",
                    keep_bytes=0 if case == "tdpo_divkit_nokeep" else None,
                )
            elif case == "tdpo_divkit_2pass":
                lw, kw = two_pass_side(hc, rhc, cl, False)
                ll, kr = two_pass_side(hr, rhr, rl, True)
                losses = -F.logsigmoid(beta * ((lw - ll) - 0.5 * (kr - kw)))
            else:
                lw, kw = trl_side(hc, rhc, cl, False)
                ll, kr = trl_side(hr, rhr, rl, True)
                logits = (lw - ll) - 0.5 * (kr - kw)
                losses = -F.logsigmoid(beta * logits)
            losses.sum().backward()
            out = losses.detach().clone()
            for x in (hc, hr, w):
                x.grad = None
            return out

        reps = 1 if a.vocab * a.batch * a.seq > 1e8 else a.reps
    if case in ("cpo_trl", "tdpo_trl"):  # import outside the measured region
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
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds of all the cases")
    p.add_argument(
        "--cases",
        default="dpo,cpo,tdpo",
        help="comma-separated families to run (dpo, cpo, tdpo)",
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

    print(
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cpus, torch "
        f"{torch.__version__}, threads {torch.get_num_threads()}; pairs {a.pairs}; TDPO2 "
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
    families = {
        "dpo": ("dpo_divkit", "dpo_trl"),
        "cpo": ("cpo_divkit", "cpo_trl"),
        "tdpo": ("tdpo_divkit", "tdpo_divkit_nokeep", "tdpo_divkit_2pass", "tdpo_trl"),
    }
    cases = [c for f in a.cases.split(",") for c in families[f.strip()]]
    if a.only:
        cases = [c for c in cases if c in a.only.split(",")]
    runs = {c: [] for c in cases}
    for rnd in range(a.rounds):
        # Alternate the order between rounds so that no case always runs first.
        for case in cases if rnd % 2 == 0 else cases[::-1]:
            r = subprocess.run(
                [sys.executable, __file__, "--case", case, *args], capture_output=True, text=True
            )
            if r.returncode != 0:
                print(f"{case}: failed ({r.returncode}): {r.stderr.strip().splitlines()[-1:]}")
                continue
            runs[case].append(json.loads(r.stdout.strip().splitlines()[-1]))
    rows = {}
    for c, rs in runs.items():
        if rs:
            secs = sorted(r["seconds"] for r in rs)
            rows[c] = {
                "seconds": secs[len(secs) // 2],
                "all": secs,
                "peak_mib": max(r["peak_mib"] for r in rs),
                "loss_mean": rs[-1]["loss_mean"],
            }
    print(f"load average after: {load()}; medians of {a.rounds} alternating rounds")
    print(f"{'case':<20}{'seconds':>10}{'peak MiB':>10}{'loss mean':>14}  all rounds (s)")
    for c, r in rows.items():
        print(
            f"{c:<20}{r['seconds']:>10.4f}{r['peak_mib']:>10.0f}{r['loss_mean']:>14.6f}  "
            + " ".join(f"{x:.3f}" for x in r["all"])
        )
    for name, members in families.items():
        t = rows.get(f"{name}_trl")
        for c in members[:-1]:
            d = rows.get(c)
            if d and t:
                mem = t["peak_mib"] / d["peak_mib"] if d["peak_mib"] > 1 else float("nan")
                print(
                    f"{c}: {t['seconds'] / d['seconds']:.2f}x the speed of the peer, peer "
                    f"peak memory / divkit's {mem:.1f}x (losses {d['loss_mean']:.6f} vs "
                    f"{t['loss_mean']:.6f})"
                )


if __name__ == "__main__":
    main()
