#!/usr/bin/env python3
"""``divkit compare``: the C++ kernel (``engine="core"``) against the numpy float64 path
(``engine="numpy"``) on the same files, in one run; then a streaming run over a large file pair
with its peak resident memory. numpy only (no torch).

    python bench/bench_compare.py                      # V = 32000 and 152064, then streaming
    python bench/bench_compare.py --stream-gib 0       # timings only
    python bench/bench_compare.py --json out.json

For each V, a base ``.npy`` of N x V float32 logits (N(0, 2^2)) and a test = base + N(0, 0.5^2)
are written to a temporary directory (and read once, so that the page cache holds them); each
engine then runs ``compare_files(base, test, tokens=ids, engine=...)`` --reps times, the two
engines alternating run by run so that both see the same machine (the machine this was written
on is shared and noisy); the table gives each engine's median tokens/s and the median of the
per-pair ratios, and each engine's process CPU time per token (all its threads), whose ratio
is the steadier figure on a machine shared with other work (there a scheduler gives numpy's
4 block threads a larger share of the cores than the core's 2). numpy computes N_numpy rows (its time is linear in N) and the core N rows:
numpy at V = 152064 takes about 13 ms per token on 2 cores. Both engines use every core: numpy
with its default 4 blocks at once, the core with divkit's thread count.

Streaming: a pair of files of --stream-gib GiB each (V = 152064) compared by the core in a
fresh process; its peak RSS (VmHWM) is reported next to the file size, with the tokens/s.
The files are written in pieces, so writing them needs no memory either.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))


def write_pair(d, n, v, seed=0, piece=256):
    """base.npy, test.npy ([n, v] float32) and ids.npy in directory d, written piece by piece."""
    rng = np.random.default_rng(seed)
    paths = [os.path.join(d, f"{k}_{v}_{n}.npy") for k in ("base", "test")]
    arrays = [np.lib.format.open_memmap(p, "w+", np.float32, (n, v)) for p in paths]
    for s in range(0, n, piece):
        e = min(n, s + piece)
        b = rng.standard_normal((e - s, v), dtype=np.float32) * 2.0
        arrays[0][s:e] = b
        arrays[1][s:e] = b + rng.standard_normal((e - s, v), dtype=np.float32) * 0.5
    for a in arrays:
        a.flush()
    del arrays
    ids = os.path.join(d, f"ids_{v}_{n}.npy")
    np.save(ids, rng.integers(0, v, n))
    for p in paths:  # into the page cache
        with open(p, "rb") as f:
            while f.read(64 << 20):
                pass
    return paths[0], paths[1], ids


def cpu_seconds():
    r = resource.getrusage(resource.RUSAGE_SELF)  # every thread of this process
    return r.ru_utime + r.ru_stime


def time_engine(compare_files, files, engine, cpu=None):
    base, test, ids = files
    c0, t0 = cpu_seconds(), time.perf_counter()
    r = compare_files(base, test, tokens=ids, engine=engine)
    if cpu is not None:
        cpu.append(cpu_seconds() - c0)
    return time.perf_counter() - t0, r


def bench_v(compare_files, d, v, n_core, n_numpy, reps):
    core_files = write_pair(d, n_core, v)
    numpy_files = core_files if n_numpy == n_core else write_pair(d, n_numpy, v, seed=0)
    # Warm-up of both (first-touch, thread start-up).
    time_engine(compare_files, numpy_files, "core")
    tc, tn, cc, cn = [], [], [], []
    for _ in range(reps):
        t, _ = time_engine(compare_files, numpy_files, "numpy", cn)
        tn.append(n_numpy / t)
        t, _ = time_engine(compare_files, core_files, "core", cc)
        tc.append(n_core / t)
    cpu_n = statistics.median(cn) / n_numpy
    cpu_c = statistics.median(cc) / n_core
    # Agreement on the same rows (the numpy files).
    _, rc = time_engine(compare_files, numpy_files, "core")
    _, rn = time_engine(compare_files, numpy_files, "numpy")
    rel = max(
        abs(rc[k][s] - rn[k][s]) / abs(rn[k][s])
        for k in ("kl", "js", "tvd", "nll")
        for s in ("mean", "se", "p99")
    )
    ratios = [c / nn for c, nn in zip(tc, tn)]
    return {
        "V": v,
        "N_core": n_core,
        "N_numpy": n_numpy,
        "numpy_tok_s": statistics.median(tn),
        "core_tok_s": statistics.median(tc),
        "ratio_median": statistics.median(ratios),
        "ratio_min": min(ratios),
        "ratio_max": max(ratios),
        "numpy_ms_per_tok": 1e3 / statistics.median(tn),
        "core_ms_per_tok": 1e3 / statistics.median(tc),
        "numpy_cpu_ms_per_tok": 1e3 * cpu_n,
        "core_cpu_ms_per_tok": 1e3 * cpu_c,
        "cpu_ratio": cpu_n / cpu_c,
        "max_rel_diff_stats": rel,
    }


# The child's peak RSS is VmHWM (of its own address space): getrusage's ru_maxrss would also
# count the parent's resident set at the fork (Linux keeps it across exec).
STREAM_CHILD = r"""
import json, sys, time
from divkit.compare import compare_files
base, test, ids = sys.argv[1:4]
t0 = time.perf_counter()
r = compare_files(base, test, tokens=ids, engine="core", progress=False)
dt = time.perf_counter() - t0
hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM")][0].split()[1]
print(json.dumps({"seconds": dt, "tokens": r["tokens"], "kl_mean": r["kl"]["mean"],
                  "peak_rss_mib": int(hwm) / 1024}))
"""


def bench_stream(d, gib, v=152064):
    n = int(gib * (1 << 30) // (4 * v))
    files = write_pair(d, n, v, seed=1)
    out = subprocess.run(
        [sys.executable, "-c", STREAM_CHILD, *files], capture_output=True, text=True, check=True
    )
    r = json.loads(out.stdout)
    r.update(V=v, N=n, file_mib=os.path.getsize(files[0]) / (1 << 20))
    r["tok_s"] = n / r["seconds"]
    for p in files:
        os.remove(p)
    return r


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--stream-gib", type=float, default=4.0, help="size of each streamed file")
    ap.add_argument("--dir", default=None, help="where the temporary files go (default: TMPDIR)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    sys.path.insert(0, os.path.join(HERE, "..", "python"))
    import divkit
    from divkit.compare import compare_files

    info = {
        "cpus": os.cpu_count(),
        "divkit_threads": divkit._C.get_num_threads(),
        "simd": divkit._C.active_simd_target(),
        "load_avg_start": os.getloadavg(),
    }
    rows = []
    with tempfile.TemporaryDirectory(dir=args.dir) as d:
        for v, n_core, n_numpy in ((32000, 2048, 256), (152064, 512, 48)):
            r = bench_v(compare_files, d, v, n_core, n_numpy, args.reps)
            rows.append(r)
            print(
                f"V={v:>6}: numpy {r['numpy_tok_s']:8.1f} tok/s ({r['numpy_ms_per_tok']:.2f} ms/tok)"
                f"  core {r['core_tok_s']:8.1f} tok/s ({r['core_ms_per_tok']:.3f} ms/tok)"
                f"  ratio {r['ratio_median']:.1f}x (pairs {r['ratio_min']:.1f}-{r['ratio_max']:.1f})"
                f"; CPU time {r['numpy_cpu_ms_per_tok']:.2f} / {r['core_cpu_ms_per_tok']:.3f} ms/tok"
                f" = {r['cpu_ratio']:.1f}x"
                f"; max rel diff of the statistics {r['max_rel_diff_stats']:.1e}",
                flush=True,
            )
        stream = None
        if args.stream_gib > 0:
            stream = bench_stream(d, args.stream_gib)
            print(
                f"streaming: 2 files of {stream['file_mib']:.0f} MiB (N={stream['N']}, "
                f"V={stream['V']}): {stream['seconds']:.1f} s, {stream['tok_s']:.0f} tok/s, "
                f"peak RSS {stream['peak_rss_mib']:.0f} MiB",
                flush=True,
            )
    info["load_avg_end"] = os.getloadavg()
    print(f"machine: {info}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"info": info, "rows": rows, "stream": stream}, f, indent=2)


if __name__ == "__main__":
    main()
