#!/usr/bin/env python3
"""Token divergences: every kind against forward_kl, and the gradient buffer's forms.

    python bench/bench_divergence_kinds.py                       # N = 4096, V = 128256, fp32
    python bench/bench_divergence_kinds.py --n 512 --reps 3      # quicker

Part 1 (kinds): forward + backward of ``divkit.divergence(student, teacher, kind)`` for every
kind, through a free view of a leaf (as logits coming out of a model), the student gradient
written into a reused ``grad_out=`` buffer, so that the figure is the kernel's and not the
page faults of a fresh buffer. The kinds are run in rounds (one call of each kind per round,
in order), so that a change of the machine's load touches all of them alike; each kind's time
is the median of the rounds, and its ratio to forward_kl is the median of the per-round ratios.
Wall time and the process's CPU time are both reported (on a shared machine the CPU time is
the steadier of the two). A kind may carry its parameter as ``kind:value`` (``alpha`` for
alpha_divergence, renyi and the skew KLs, ``beta`` for jsd; e.g. ``--kinds forward_kl
alpha_divergence:0.3``); without one, alpha is 0.5 for alpha_divergence / renyi and 0.1 for the
skew KLs, beta 0.5 for jsd. The default rows add alpha = 0.3 and 0.7 for alpha_divergence (0.7
is the mirror-image branch, base p) and alpha = 0.3 and 2 for renyi: alpha = 1/2 has a cheaper
identity than the other orders, so 0.5 alone understates what these kinds cost.

Part 2 (buffers, forward_kl and the kinds of --buffer-kinds): the student gradient's forms, each
in its own subprocess (the environment variables are read once per process), the modes
alternated for --rounds rounds:

- old_default: a fresh ``torch.empty`` buffer per call with the huge-page advice (the default
  before the host cache; ``DIVKIT_HOST_CACHE_LIMIT=0``);
- old_no_huge_pages: the same without the advice (``DIVKIT_HUGE_PAGES=0`` as well);
- cached: the host cache (the default): the first call maps a block (4 KiB pages: the cache's
  blocks are not advised), later calls reuse it;
- cached_huge_pages: the host cache with its blocks advised (``DIVKIT_HUGE_PAGES=always``);
- grad_out: a reused ``grad_out=`` buffer; inplace: ``inplace_grad=True``.

--api function (default) times ``divergence_and_grad`` and the release of its gradient (what a
training step's backward does once the LM head's backward has consumed it); --api autograd times
forward + backward through a free view of a leaf and the release of the graph (autograd copies
the gradient into the leaf's ``.grad``: one more [N, V] buffer per call, in every mode). Per mode:
the first call and the median of the others (wall and CPU time), and the process's minor page
faults per call.

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
    "alpha_divergence:0.3",
    "alpha_divergence:0.7",
    "renyi",
    "renyi:0.3",
    "renyi:2",
    "cross_entropy",
)
# mode -> (environment, buffer form); an environment value None removes the variable.
MODES = {
    "old_default": ({"DIVKIT_HOST_CACHE_LIMIT": "0", "DIVKIT_HUGE_PAGES": None}, "fresh"),
    "old_no_huge_pages": ({"DIVKIT_HOST_CACHE_LIMIT": "0", "DIVKIT_HUGE_PAGES": "0"}, "fresh"),
    "cached": ({"DIVKIT_HOST_CACHE_LIMIT": None, "DIVKIT_HUGE_PAGES": None}, "fresh"),
    "cached_huge_pages": (
        {"DIVKIT_HOST_CACHE_LIMIT": None, "DIVKIT_HUGE_PAGES": "always"},
        "fresh",
    ),
    "grad_out": ({"DIVKIT_HOST_CACHE_LIMIT": None, "DIVKIT_HUGE_PAGES": None}, "grad_out"),
    "inplace": ({"DIVKIT_HOST_CACHE_LIMIT": None, "DIVKIT_HUGE_PAGES": None}, "inplace"),
}


def kind_args(spec: str) -> tuple[str, dict]:
    """``kind`` or ``kind:value`` -> (kind, the keyword arguments of divkit.divergence)."""
    kind, _, value = spec.partition(":")
    if kind == "jsd":
        return kind, {"beta": float(value) if value else 0.5}
    default = 0.5 if kind in ("alpha_divergence", "renyi") else 0.1
    return kind, {"alpha": float(value) if value else default}


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


def inputs(torch, n: int, v: int, noise: float = 1.0):
    """Student and teacher logits (no [N, V] temporaries: the machine may be short of memory):
    teacher = student + N(0, noise^2), so ``noise`` sets the spread of log(p / q)."""
    g = torch.Generator().manual_seed(0)
    s = torch.randn(n, v, generator=g).mul_(2)
    t = torch.randn(n, v, generator=g).mul_(noise).add_(s)
    return s, t


def cpu_now() -> float:
    return time.process_time()


def part_kinds(args) -> dict:
    import torch

    import divkit

    torch.set_num_threads(divkit.get_num_threads())
    tri = [triad_gbps(torch, args.triad_mib << 20)]
    s, t = inputs(torch, args.n, args.v, args.teacher_noise)
    leaf = s.requires_grad_(True)
    buf = torch.zeros_like(s)
    out = {k: {"wall": [], "cpu": []} for k in args.kinds}

    def step(spec):
        kind, kw = kind_args(spec)
        leaf.grad = None
        w0, c0 = time.perf_counter(), cpu_now()
        divkit.divergence(leaf.view(args.n, args.v), t, kind, grad_out=buf, **kw).backward()
        return time.perf_counter() - w0, cpu_now() - c0

    for spec in args.kinds:  # warm-up
        step(spec)
    for _ in range(args.reps):
        for spec in args.kinds:
            w, c = step(spec)
            out[spec]["wall"].append(w)
            out[spec]["cpu"].append(c)
    s = t = leaf = buf = None  # freed before the second triad
    tri.append(triad_gbps(torch, args.triad_mib << 20))
    return {"kinds": out, "triad": tri, "threads": divkit.get_num_threads()}


def _vmstat() -> dict:
    """The kernel's huge-page and compaction counters (Linux; empty elsewhere)."""
    keys = ("thp_fault_alloc", "thp_fault_fallback", "compact_stall")
    try:
        with open("/proc/vmstat") as f:
            return {k: int(v) for k, v in (line.split() for line in f) if k in keys}
    except OSError:
        return {}


def part_buffer_worker(mode: str, kind: str, n: int, v: int, reps: int, api: str) -> dict:
    import resource

    import torch

    import divkit

    form = MODES[mode][1]
    torch.set_num_threads(divkit.get_num_threads())
    tri = triad_gbps(torch)  # first, so that its arrays and the inputs are not held together
    s, t = inputs(torch, n, v)
    backup = s.clone() if form == "inplace" else None
    buf = torch.zeros_like(s) if form == "grad_out" else None
    leaf = s.requires_grad_(api == "autograd")
    walls, cpus, faults = [], [], []
    vm0 = _vmstat()
    for _ in range(reps + 1):
        if form == "inplace":
            with torch.no_grad():
                leaf.copy_(backup)
        leaf.grad = None
        f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        w0, c0 = time.perf_counter(), cpu_now()
        name, kw = kind_args(kind)
        kw.update(inplace_grad=form == "inplace", grad_out=buf)
        if api == "function":
            loss, g, _ = divkit.divergence_and_grad(leaf, t, name, **kw)
            del loss, g  # the gradient is released (to the cache, or unmapped)
        else:
            loss = divkit.divergence(leaf.view(n, v), t, name, **kw)
            loss.backward()
            del loss  # the graph, which keeps the gradient, is released
        walls.append(time.perf_counter() - w0)
        cpus.append(cpu_now() - c0)
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
    vm1 = _vmstat()
    return {
        "first": walls[0],
        "first_cpu": cpus[0],
        "times": walls[1:],
        "cpu": cpus[1:],
        "faults": faults[1:],
        "first_faults": faults[0],
        "vmstat": {k: vm1[k] - vm0[k] for k in vm1 if k in vm0},
        "cache": divkit.memory.cache_stats(),
        "triad": tri,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--n", type=int, default=4096)
    ap.add_argument("--v", type=int, default=128256)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=3, help="rounds of the buffer modes")
    ap.add_argument("--kinds", nargs="+", default=list(KINDS))
    ap.add_argument("--buffer-kinds", nargs="+", default=["forward_kl", "reverse_kl", "jsd"])
    ap.add_argument(
        "--triad-mib", type=int, default=3072, help="the triad's three arrays, MiB in all"
    )
    ap.add_argument("--skip-kinds", action="store_true")
    ap.add_argument("--skip-buffers", action="store_true")
    ap.add_argument("--json", help="write the raw results here")
    ap.add_argument(
        "--teacher-noise",
        type=float,
        default=1.0,
        help="teacher = student + N(0, noise^2) (the kinds' section)",
    )
    ap.add_argument("--api", choices=("function", "autograd"), default="function")
    ap.add_argument(
        "--modes", nargs="+", choices=list(MODES), default=list(MODES), help="buffer modes"
    )
    ap.add_argument("--_worker", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args._worker:
        mode, kind, reps = args._worker
        print(json.dumps(part_buffer_worker(mode, kind, args.n, args.v, int(reps), args.api)))
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
        modes = args.modes
        runs = {(kind, m): [] for kind in args.buffer_kinds for m in modes}
        tris = []
        for _ in range(args.rounds):
            for kind in args.buffer_kinds:
                for mode in modes:
                    env = dict(os.environ)
                    for k, val in MODES[mode][0].items():
                        if val is None:
                            env.pop(k, None)
                        else:
                            env[k] = val
                    outp = subprocess.run(
                        [
                            sys.executable,
                            __file__,
                            "--n",
                            str(args.n),
                            "--v",
                            str(args.v),
                            "--api",
                            args.api,
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
                    runs[(kind, mode)].append(r)
                    tris.append(r["triad"])
        tri = max(tris)
        res["buffers"] = {f"{k}/{m}": v for (k, m), v in runs.items()}
        res["buffer_triads"] = tris
        base = modes[0]
        print(
            f"\nGradient buffers, --api {args.api} (triad: best {tri:.1f}, median "
            f"{statistics.median(tris):.1f} GB/s; each mode in its own process, {args.rounds} "
            f"rounds alternating; steady: the median of calls 2..{args.reps + 1} of a process; ms, "
            f"median over rounds; ratio to {base} in parentheses):\n"
        )

        def med(kind, mode, key, f=lambda r, k: statistics.median(r[k])):
            return statistics.median(f(r, key) for r in runs[(kind, mode)])

        one = lambda r, k: r[k]  # noqa: E731
        print(
            "| kind | mode | steady wall | steady CPU | first call wall | first call CPU | "
            "minor faults per call (steady / first) | THP faults, compaction stalls | GB/s |"
        )
        print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
        for kind in args.buffer_kinds:
            d = med(kind, base, "times")
            dc = med(kind, base, "cpu")
            d1 = med(kind, base, "first", one)
            for m in modes:
                x, c, x1 = med(kind, m, "times"), med(kind, m, "cpu"), med(kind, m, "first", one)
                c1 = med(kind, m, "first_cpu", one)
                fl, fl1 = med(kind, m, "faults"), med(kind, m, "first_faults", one)
                vm = runs[(kind, m)]
                thp = sum(r["vmstat"].get("thp_fault_alloc", 0) for r in vm)
                stall = sum(r["vmstat"].get("compact_stall", 0) for r in vm)
                print(
                    f"| {kind} | {m} | {x * 1e3:,.0f} ({x / d:.2f}) | {c * 1e3:,.0f} "
                    f"({c / dc:.2f}) | {x1 * 1e3:,.0f} ({x1 / d1:.2f}) | {c1 * 1e3:,.0f} | "
                    f"{fl:,.0f} / {fl1:,.0f} | {thp}, {stall} | {moved / x / 1e9:.1f} |"
                )
    res["uptime_after"] = os.popen("uptime").read().strip()
    print(f"\n{res['uptime_after']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
