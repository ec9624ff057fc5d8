#!/usr/bin/env python3
"""Two or more divkit builds against each other: bench_divergence_kinds.py --skip-buffers run
under each tree's PYTHONPATH in turn (a process per run, the order reversed every other round),
and per tree the median over rounds of each kind's ratio to forward_kl (CPU time and wall time;
the per-round ratio is the median of that process's per-call ratios), with the load of each run.

    python bench/bench_divergence_kinds_paired.py --trees base=/path/to/main/python \
        new=python --n 1024 --v 128256 --reps 5 --rounds 2 \
        --kinds forward_kl alpha_divergence:0.3 renyi:0.3

A tree is a folder holding a ``divkit`` package with its ``_C`` module (copy it, with the
module, if the build may change during the run).
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

ap = argparse.ArgumentParser()
ap.add_argument("--trees", nargs="+", required=True, help="name=PYTHONPATH")
ap.add_argument("--rounds", type=int, default=2)
ap.add_argument("--n", type=int, default=4096)
ap.add_argument("--v", type=int, default=32000)
ap.add_argument("--reps", type=int, default=3)
ap.add_argument("--kinds", nargs="+", default=None)
ap.add_argument(
    "--script",
    default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "bench_divergence_kinds.py"),
)
ap.add_argument("--out", default=None)
ap.add_argument("--teacher-noise", type=float, default=1.0)
a = ap.parse_args()
trees = [t.split("=", 1) for t in a.trees]
res = {name: [] for name, _ in trees}
tmp = tempfile.mkdtemp()
loads = []
for r in range(a.rounds):
    order = trees if r % 2 == 0 else trees[::-1]
    for name, path in order:
        js = os.path.join(tmp, f"{name}.json")
        cmd = [
            sys.executable,
            a.script,
            "--n",
            str(a.n),
            "--v",
            str(a.v),
            "--reps",
            str(a.reps),
            "--skip-buffers",
            "--triad-mib",
            "768",
            "--json",
            js,
        ]
        if a.kinds:
            cmd += ["--kinds"] + a.kinds
        cmd += ["--teacher-noise", str(a.teacher_noise)]
        env = dict(os.environ, PYTHONPATH=path)
        subprocess.run(cmd, env=env, check=True, capture_output=True, text=True)
        d = json.load(open(js))
        res[name].append(d)
        loads.append(d["uptime_before"].split("load average:")[1].strip())
        print(f"round {r} {name} done, load {loads[-1]}", file=sys.stderr, flush=True)
kinds = list(res[trees[0][0]][0]["kinds"]["kinds"].keys())
print(f"N = {a.n}, V = {a.v}, reps {a.reps}, rounds {a.rounds}; loads: {'; '.join(loads)}")
hdr = (
    "| kind | "
    + " | ".join(f"{n} CPU/fkl | {n} wall/fkl" for n, _ in trees)
    + " | "
    + " | ".join(f"{n} CPU ms" for n, _ in trees)
    + " |"
)
print(hdr)
print("|---" * (1 + 3 * len(trees)) + "|")
summary = {}
for k in kinds:
    cells, ms = [], []
    for name, _ in trees:
        rc, rw, cm = [], [], []
        for d in res[name]:
            kk = d["kinds"]["kinds"]
            f = kk["forward_kl"]
            rc.append(statistics.median(x / y for x, y in zip(kk[k]["cpu"], f["cpu"])))
            rw.append(statistics.median(x / y for x, y in zip(kk[k]["wall"], f["wall"])))
            cm.append(statistics.median(kk[k]["cpu"]) * 1e3)
        cells.append(
            f"{statistics.median(rc):.2f} ({'/'.join(f'{x:.2f}' for x in rc)}) | {statistics.median(rw):.2f}"
        )
        ms.append(f"{statistics.median(cm):,.0f}")
        summary.setdefault(k, {})[name] = (rc, rw, cm)
    print(f"| {k} | " + " | ".join(cells) + " | " + " | ".join(ms) + " |")
if a.out:
    json.dump({"summary": summary, "loads": loads}, open(a.out, "w"))
