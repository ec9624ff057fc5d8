#!/usr/bin/env python3
"""Token divergences: every kind against forward_kl, and the gradient buffer's three forms.

    python bench/bench_divergence_kinds.py                       # N = 4096, V = 128256, fp32
    python bench/bench_divergence_kinds.py --n 512 --reps 3      # quicker

Part 1 (kinds): forward + backward of ``divkit.divergence(student, teacher, kind)`` for every
kind, through a free view of a leaf (as logits coming out of a model), the student gradient
written into a reused ``grad_out=`` buffer, so that the figure is the kernel's and not the
page faults of a fresh buffer. The kinds are run in rounds (one call of each kind per round,
in order), so that a change of the machine's load touches all of them alike; each kind's time
is the median of the rounds, and its ratio to forward_kl is the median of the per-round ratios.
Wall time and the process's CPU time are both reported (on a shared machine the CPU time is
the steadier of the two).

Part 2 (buffers, forward_kl and the kinds of --buffer-kinds): the gradient in a fresh buffer
with the huge-page advice (the default), the same with ``DIVKIT_HUGE_PAGES=0``, a reused
``grad_out=`` buffer, and in place (``inplace_grad=True``); each mode in its own subprocess
(the environment variable is read once per process), the modes alternated for --rounds rounds.

Both parts measure a triad a = b + s * c (torch, float32, arrays far beyond the L3) in the same
run and print divkit's effective bandwidth (read s, read t, write the gradient: 12 bytes per
fp32 logit) against it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

KINDS = (
    "forward_kl",
    "reverse_kl",
    "jsd",
    "skew_forward_kl",
    "skew_reverse_kl",
    "tvd",
    "hellinger",
    "jeffreys",
    "chi2",
    "alpha_divergence",
    "renyi",
    "cross_entropy",
)
MODES = ("default", "no_huge_pages", "grad_out", "inplace")


def _alpha(kind: str) -> float:
    return 0.5 if kind in ("alpha_divergence", "renyi") else 0.1


def triad_gbps(torch, total_bytes: int = 3 << 30, runs: int = 5) -> float:
    """Best of `runs` of a = b + 1.5 c over three float32 arrays of total_bytes in all (the
    arrays are freed before returning)."""
    n = total_bytes // 12
    a, b, c = torch.empty(n), torch.rand(n), torch.rand(n)
    a.copy_(b)  # fault the pages in
    best = 0.0
    for _ in range(runs):
        t0 = time.perf_counter()
        torch.add(b, c, alpha=1.5, out=a)
        best = max(best, 12 * n / (time.perf_counter() - t0) / 1e9)
    del a, b, c
    return best


def inputs(torch, n: int, v: int):
    """Student and teacher logits (no [N, V] temporaries: the machine may be short of memory)."""
    g = torch.Generator().manual_seed(0)
    s = torch.randn(n, v, generator=g).mul_(2)
    t = torch.randn(n, v, generator=g).add_(s)
    return s, t


def cpu_now() -> float:
    return time.process_time()


def part_kinds(args) -> dict:
    import torch

    import divkit

    torch.set_num_threads(divkit.get_num_threads())
    tri = [triad_gbps(torch)]
    s, t = inputs(torch, args.n, args.v)
    leaf = s.requires_grad_(True)
    buf = torch.zeros_like(s)
    out = {k: {"wall": [], "cpu": []} for k in args.kinds}

    def step(kind):
        leaf.grad = None
        w0, c0 = time.perf_counter(), cpu_now()
        divkit.divergence(
            leaf.view(args.n, args.v), t, kind, alpha=_alpha(kind), grad_out=buf
        ).backward()
        return time.perf_counter() - w0, cpu_now() - c0

    for kind in args.kinds:  # warm-up
        step(kind)
    for _ in range(args.reps):
        for kind in args.kinds:
            w, c = step(kind)
            out[kind]["wall"].append(w)
            out[kind]["cpu"].append(c)
    s = t = leaf = buf = None  # freed before the second triad
    tri.append(triad_gbps(torch))
    return {"kinds": out, "triad": tri, "threads": divkit.get_num_threads()}


def part_buffer_worker(mode: str, kind: str, n: int, v: int, reps: int) -> dict:
    import torch

    import divkit

    torch.set_num_threads(divkit.get_num_threads())
    tri = triad_gbps(torch)  # first, so that its arrays and the inputs are not held together
    s, t = inputs(torch, n, v)
    backup = s.clone() if mode == "inplace" else None
    leaf = s.requires_grad_(True)
    buf = torch.zeros_like(s) if mode == "grad_out" else None
    times = []
    for r in range(reps + 1):
        leaf.grad = None
        if mode == "inplace":
            with torch.no_grad():
                leaf.copy_(backup)
        t0 = time.perf_counter()
        loss = divkit.divergence(
            leaf.view(n, v),
            t,
            kind,
            alpha=_alpha(kind),
            inplace_grad=mode == "inplace",
            grad_out=buf,
        )
        loss.backward()
        if r:
            times.append(time.perf_counter() - t0)
    return {"times": times, "triad": tri}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--n", type=int, default=4096)
    ap.add_argument("--v", type=int, default=128256)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=3, help="rounds of the buffer modes")
    ap.add_argument("--kinds", nargs="+", default=list(KINDS))
    ap.add_argument("--buffer-kinds", nargs="+", default=["forward_kl", "reverse_kl", "jsd"])
    ap.add_argument("--skip-kinds", action="store_true")
    ap.add_argument("--skip-buffers", action="store_true")
    ap.add_argument("--json", help="write the raw results here")
    ap.add_argument("--_worker", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args._worker:
        mode, kind, reps = args._worker
        print(json.dumps(part_buffer_worker(mode, kind, args.n, args.v, int(reps))))
        return 0

    moved = 12 * args.n * args.v
    res = {"uptime_before": os.popen("uptime").read().strip()}
    print(f"N = {args.n}, V = {args.v}, fp32, forward + backward; {res['uptime_before']}")
    if not args.skip_kinds:
        k = part_kinds(args)
        res["kinds"] = k
        base = k["kinds"]["forward_kl"] if "forward_kl" in k["kinds"] else None
        tri = max(k["triad"])
        print(
            f"\nKinds ({k['threads']} threads; triad {k['triad'][0]:.1f} / {k['triad'][1]:.1f} GB/s "
            f"before / after), grad_out buffer, medians of {args.reps} rounds:\n"
        )
        print(
            "| kind | wall ms | CPU ms | wall / forward_kl | CPU / forward_kl | GB/s | % of triad |"
        )
        print("|---|---:|---:|---:|---:|---:|---:|")
        for kind, r in k["kinds"].items():
            w, c = statistics.median(r["wall"]), statistics.median(r["cpu"])
            if base is not None:
                rw = statistics.median(a / b for a, b in zip(r["wall"], base["wall"]))
                rc = statistics.median(a / b for a, b in zip(r["cpu"], base["cpu"]))
                ratios = f"{rw:.2f} | {rc:.2f}"
            else:
                ratios = "- | -"
            gb = moved / w / 1e9
            print(
                f"| {kind} | {w * 1e3:,.0f} | {c * 1e3:,.0f} | {ratios} | {gb:.1f} | "
                f"{100 * gb / tri:.0f}% |"
            )
    if not args.skip_buffers:
        runs = {(kind, m): [] for kind in args.buffer_kinds for m in MODES}
        tris = []
        for _ in range(args.rounds):
            for kind in args.buffer_kinds:
                for mode in MODES:
                    env = dict(os.environ)
                    if mode == "no_huge_pages":
                        env["DIVKIT_HUGE_PAGES"] = "0"
                    outp = subprocess.run(
                        [
                            sys.executable,
                            __file__,
                            "--n",
                            str(args.n),
                            "--v",
                            str(args.v),
                            "--_worker",
                            mode,
                            kind,
                            str(args.reps),
                        ],
                        env=env,
                        check=True,
                        capture_output=True,
                        text=True,
                    ).stdout
                    r = json.loads(outp.strip().splitlines()[-1])
                    runs[(kind, mode)].append(statistics.median(r["times"]))
                    tris.append(r["triad"])
        tri = max(tris)
        res["buffers"] = {f"{k}/{m}": v for (k, m), v in runs.items()}
        res["buffer_triads"] = tris
        print(
            f"\nGradient buffers (triad: best {tri:.1f}, median {statistics.median(tris):.1f} GB/s; "
            f"each mode in its own process, {args.rounds} rounds alternating, each a median of "
            f"{args.reps}; ms, median over rounds; ratio to the default in parentheses):\n"
        )
        print("| kind | " + " | ".join(MODES) + " | best GB/s (% of triad) |")
        print("|---|" + "---:|" * (len(MODES) + 1))
        for kind in args.buffer_kinds:
            d = statistics.median(runs[(kind, "default")])
            cells = []
            best = min(statistics.median(runs[(kind, m)]) for m in MODES)
            for m in MODES:
                x = statistics.median(runs[(kind, m)])
                cells.append(f"{x * 1e3:,.0f} ({x / d:.2f})")
            print(
                f"| {kind} | "
                + " | ".join(cells)
                + f" | {moved / best / 1e9:.1f} ({100 * moved / best / 1e9 / tri:.0f}%) |"
            )
    res["uptime_after"] = os.popen("uptime").read().strip()
    print(f"\n{res['uptime_after']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
