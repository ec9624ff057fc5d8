#!/usr/bin/env python3
"""divkit vs PyTorch eager (TRL's formulas) vs torch.compile, forward + backward, in one command.

    python bench/bench_divergence.py                    # the full table (N = 4096)
    python bench/bench_divergence.py --quick            # smoke test, ~1-2 minutes
    python bench/bench_divergence.py --kinds jsd --markdown out.md

For each kind x V x dtype it times ``loss = f(student, teacher); loss.backward()`` with a detached
teacher [N, V] and student logits [N, V] that are a view of a leaf tensor requiring grad: as in
training, where the logits come out of the model, autograd passes their gradient on rather than
storing it (--leaf passes the leaf itself; then autograd keeps the gradient in .grad, and may
copy it):

* ``divkit``          divkit.divergence(..., reduction="batchmean") (gradient into a new buffer)
* ``divkit in-place`` the same with inplace_grad=True (the gradient overwrites the student
                      logits; they are restored from a copy between runs, outside the timing)
* ``divkit in-place, deferred checks`` the same inside divkit.cuda_checks.deferred_checks(): the
                      rows are checked for NaN/+inf as the kernel reads them, not all before the
                      first write (one read of both inputs less; a bad row still raises)
* ``divkit grad_out`` the same with grad_out= a buffer allocated once and reused by every run
                      (no page faults inside the kernel)
* ``eager``           TRL's GKDTrainer.generalized_jsd_loss (beta = 0: forward KL, beta = 1:
                      reverse KL, beta = 0.5: JSD), exactly as TRL calls it
* ``compile``         torch.compile of the same function (compiled and warmed up first)

with torch.set_num_threads(divkit.get_num_threads()). Times are the median of --reps runs after
warm-up; every run starts with student.grad = None (as zero_grad(set_to_none=True) leaves it),
so the gradient buffer is allocated inside the timed region for every variant.

Memory: each (kind, V, dtype) runs in a fresh subprocess; before every timed run the script
frees what it can (gc, malloc_trim) and resets the kernel's peak-RSS counter
(/proc/self/clear_refs); it reports the largest peak RSS during one forward + backward minus
RSS just before it: the extra memory a step needs beyond its inputs, the gradient included.
The in-place variant runs first in its process.

Bandwidth: a triad a = b + s * c (torch, float32, three arrays of 1 GiB: far beyond the
300 MiB L3) is timed in the same run, before and after the divergences; the best run counts
3 arrays of traffic. divkit's GB/s counts the bytes it must move: read s, read t, write the
gradient.

Eager at N = 4096, V = 128256 needs tens of GB and 40+ s per step for JSD: before each eager
variant (and torch.compile where eight [N, V] fp32 arrays would not fit), a probe at N = 256
estimates its peak memory and step time at the full N (both linear in N). If the full N would
not fit in the available memory (less --reserve-gib), or a step would take more than
--peer-max-s, the variant runs at N/2, N/4, ... and its time and memory are scaled to the
full N and marked with '*' (with the reason under the table). The probe's predictions are kept
in the JSON output, to check the linearity against the variants run at the full N.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from typing import Any, Dict, List, Optional

TRL_KINDS = {"forward_kl": 0.0, "reverse_kl": 1.0, "jsd": 0.5}  # kind -> TRL's beta
VARIANTS = (
    "divkit_inplace",
    "divkit_inplace_deferred",
    "divkit",
    "divkit_grad_out",
    "compile",
    "eager",
)  # run order
LABELS = {
    "divkit": "divkit",
    "divkit_inplace": "divkit in-place",
    "divkit_inplace_deferred": "divkit in-place, deferred checks",
    "divkit_grad_out": "divkit grad_out",
    "eager": "eager",
    "compile": "compile",
}
TARGET_EAGER = 30.0
TARGET_COMPILE = 3.0
TARGET_BW = 0.45  # with a gradient buffer
TARGET_BW_INPLACE = 0.60
GIB = 1 << 30
MIB = 1 << 20


# ---------------------------------------------------------------------------------------------
# Memory accounting
# ---------------------------------------------------------------------------------------------


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def rss_bytes() -> int:
    return _status_kib("VmRSS") * 1024


def peak_rss_bytes() -> int:
    return _status_kib("VmHWM") * 1024


def reset_peak_rss() -> None:
    """Resets VmHWM to the current RSS (Linux >= 4.0)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


_libc = None


def release_free_memory() -> None:
    global _libc
    gc.collect()
    try:
        if _libc is None:
            _libc = ctypes.CDLL("libc.so.6")
        _libc.malloc_trim(0)
    except OSError:
        pass


def mem_available_bytes() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


# ---------------------------------------------------------------------------------------------
# The worker: one (kind, V, dtype) in a fresh process
# ---------------------------------------------------------------------------------------------


def make_inputs(torch, n: int, v: int, dtype, seed: int = 0):
    """student ~ 3 z1 (requires grad), teacher = student + 1.5 z2.

    Drawing 2 N V normals takes ~10-20 s at N = 4096, V = 128256 on two cores, so a block of 64
    random rows is drawn once and every block of rows is a column rotation of it (a different
    shift per block): distinct rows, same statistics, filled at memory speed, and no [N, V]
    temporary.
    """
    g = torch.Generator().manual_seed(seed)
    rows = min(64, n)
    base_s = torch.randn(rows, v, generator=g) * 3.0
    base_d = torch.randn(rows, v, generator=g) * 1.5
    s = torch.empty(n, v, dtype=dtype)
    t = torch.empty(n, v, dtype=dtype)
    shifts = torch.randint(0, v, (2 * ((n + rows - 1) // rows),), generator=g).tolist()
    for b, i in enumerate(range(0, n, rows)):
        m = min(rows, n - i)
        xs = torch.roll(base_s[:m], shifts[2 * b], dims=1)
        s[i : i + m] = xs
        t[i : i + m] = xs.add_(torch.roll(base_d[:m], shifts[2 * b + 1], dims=1))
    return s.requires_grad_(True), t


def load_trl_generalized_jsd_loss():
    """TRL's GKDTrainer.generalized_jsd_loss, the function's own source from the installed TRL.

    Importing trl.experimental.gkd.gkd_trainer pulls in transformers, accelerate and datasets
    (5-10 s per worker process); the function itself only needs torch and F. So its source is
    taken from the installed file (without importing the package) and compiled on its own. Set
    DIVKIT_BENCH_IMPORT_TRL=1 to import the real staticmethod instead.
    """
    if os.environ.get("DIVKIT_BENCH_IMPORT_TRL") == "1":
        import warnings

        warnings.filterwarnings("ignore")
        from trl.experimental.gkd.gkd_trainer import GKDTrainer

        return GKDTrainer.generalized_jsd_loss
    import ast
    import importlib.util

    import torch
    import torch.nn.functional as F

    spec = importlib.util.find_spec("trl")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("trl is not installed (pip install trl)")
    path = os.path.join(
        list(spec.submodule_search_locations)[0], "experimental", "gkd", "gkd_trainer.py"
    )
    with open(path) as f:
        tree = ast.parse(f.read(), path)
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef) and node.name == "GKDTrainer":
            for item in node.body:
                if isinstance(item, ast.FunctionDef) and item.name == "generalized_jsd_loss":
                    item.decorator_list = []  # @staticmethod
                    module = ast.Module(body=[item], type_ignores=[])
                    namespace = {"torch": torch, "F": F}
                    exec(compile(module, path, "exec"), namespace)
                    return namespace["generalized_jsd_loss"]
    raise RuntimeError(f"GKDTrainer.generalized_jsd_loss not found in {path}")


def worker(cfg: Dict[str, Any]) -> Dict[str, Any]:
    import torch

    import divkit
    import divkit.cuda_checks  # deferred_checks(), for the in-place variant

    threads = divkit.get_num_threads()
    torch.set_num_threads(threads)
    kind, v, n = cfg["kind"], cfg["v"], cfg["n"]
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[cfg["dtype"]]
    reps, warmup = cfg["reps"], cfg["warmup"]
    beta = TRL_KINDS.get(kind, 0.5)
    out: Dict[str, Any] = {
        "threads": threads,
        "torch_threads": torch.get_num_threads(),
        "variants": {},
    }

    compiled: Dict[str, Any] = {}
    eager_fn = None
    if kind in TRL_KINDS and ({"eager", "compile"} & set(cfg["variants"])):
        trl_loss = load_trl_generalized_jsd_loss()

        def eager_fn(s, t):
            return trl_loss(s, t, beta=beta, temperature=1.0, reduction="batchmean")

    def divkit_fn(inplace, grad_out=None, deferred=False):
        def f(s, t):
            if deferred:
                with divkit.cuda_checks.deferred_checks():
                    return divkit.divergence(
                        s, t, kind, beta=beta, reduction="batchmean", inplace_grad=inplace
                    )
            return divkit.divergence(
                s,
                t,
                kind,
                beta=beta,
                reduction="batchmean",
                inplace_grad=inplace,
                grad_out=grad_out,
            )

        return f

    # One set of inputs per worker; smaller N (probes, memory-limited runs) use leading rows.
    s_full, t_full = make_inputs(torch, n, v, dtype)
    elem = s_full.element_size()

    def logits_for(n_run: int):
        """(leaf holding the gradient, the logits the loss sees, teacher)."""
        leaf = s_full if n_run == n else s_full.detach()[:n_run].requires_grad_(True)
        if cfg["leaf"]:
            return leaf, (lambda: leaf), t_full[:n_run]
        # As in training, where the logits come out of the model: a non-leaf tensor whose
        # gradient autograd passes on instead of storing (here through a free view).
        return leaf, (lambda: leaf.view(n_run, v)), t_full[:n_run]

    def measure(fn, leaf, logits, t, reps_, warmup_, restore=None) -> Dict[str, Any]:
        def step():
            loss = fn(logits(), t)
            loss.backward()
            return loss

        for _ in range(warmup_):
            leaf.grad = None
            if restore:
                restore()
            step()
        times, peaks = [], []
        value = float("nan")
        for _ in range(reps_):
            leaf.grad = None  # as zero_grad(set_to_none=True): each step allocates its gradient
            if restore:
                restore()
            release_free_memory()
            base = rss_bytes()
            reset_peak_rss()
            t0 = time.perf_counter()
            loss = step()
            times.append(time.perf_counter() - t0)
            peaks.append(peak_rss_bytes() - base)
            value = float(loss.detach())
            del loss
        leaf.grad = None
        return {
            "times": times,
            "median": statistics.median(times),
            "peak_extra": max(peaks),
            "peak_extra_min": min(peaks),
            "loss": value,
        }

    def run_at(variant: str, n_run: int, reps_: int, warmup_: int) -> Dict[str, Any]:
        leaf, logits, t = logits_for(n_run)
        restore = backup = None
        if variant in ("divkit_inplace", "divkit_inplace_deferred"):
            backup = leaf.detach().clone()

            def restore():
                with torch.no_grad():
                    leaf.detach().copy_(backup)

        if variant == "divkit":
            fn = divkit_fn(False)
        elif variant == "divkit_grad_out":
            fn = divkit_fn(False, torch.zeros(n_run, v, dtype=dtype))
        elif variant == "divkit_inplace":
            fn = divkit_fn(True)
        elif variant == "divkit_inplace_deferred":
            fn = divkit_fn(True, deferred=True)
        elif variant == "eager":
            fn = eager_fn
        else:
            if "fn" not in compiled:
                # Static shapes: a probe at a small N must not turn the full-N graph dynamic.
                torch._dynamo.config.automatic_dynamic_shapes = False
                compiled["fn"] = torch.compile(eager_fn)
            fn = compiled["fn"]
        t0 = time.perf_counter()
        r = measure(fn, leaf, logits, t, reps_, warmup_, restore)
        r["wall"] = time.perf_counter() - t0
        if restore:
            restore()  # the next variant reads the original logits
        del leaf, logits, t, backup, restore
        release_free_memory()
        return r

    for variant in [x for x in VARIANTS if x in cfg["variants"]]:
        if variant in ("eager", "compile") and eager_fn is None:
            continue
        try:
            n_run = n
            note = ""
            warm = max(warmup, 1) if variant == "compile" else warmup  # compiles in warm-up
            avail = mem_available_bytes() - cfg["reserve_bytes"]
            probe_n = cfg["probe_n"]
            # Eager always (cheap), torch.compile when eight [N, V] fp32 arrays would not fit
            # (a probe costs it a second compilation).
            if probe_n < n and (
                variant == "eager" or (variant == "compile" and 8 * n * v * 4 > avail)
            ):
                # Peak memory and time of the full N, estimated from a small probe (both are
                # linear in N for these elementwise formulas).
                probe = run_at(variant, probe_n, 2, 0 if variant == "eager" else 1)
                need = probe["peak_extra"] * n / probe_n
                secs = min(probe["times"]) * n / probe_n
                out.setdefault("probes", {})[variant] = {
                    "n": probe_n,
                    "times": probe["times"],
                    "peak_extra": probe["peak_extra"],
                    "predicted_s": secs,
                    "predicted_bytes": need,
                }
                why = []
                while n_run > probe_n and need * n_run / n > avail:
                    n_run //= 2
                if n_run < n:
                    why.append(
                        f"needs ~{need / GIB:.1f} GiB at N={n}, {avail / GIB:.1f} GiB "
                        f"available (less {cfg['reserve_bytes'] / GIB:.0f} GiB left to "
                        f"others)"
                    )
                n_mem = n_run
                while n_run > probe_n and secs * n_run / n > cfg["peer_max_s"]:
                    n_run //= 2
                if n_run < n_mem:
                    why.append(
                        f"~{secs:.1f} s per step predicted at N={n} (--peer-max-s "
                        f"{cfg['peer_max_s']:g})"
                    )
                if n_run < n:
                    note = (
                        " and ".join(why) + f": run at N={n_run}, time and memory scaled "
                        f"x{n // n_run}"
                    )
                if variant == "eager":
                    warm = 0  # the probe was the warm-up
            r = run_at(variant, n_run, reps, warm)
            if n_run != n:
                f = n / n_run
                r["median"] *= f
                r["times"] = [x * f for x in r["times"]]
                r["peak_extra"] = int(r["peak_extra"] * f)
            r["n_run"] = n_run
            r["note"] = note
            out["variants"][variant] = r
        except Exception as e:  # noqa: BLE001 - reported in the table
            out["variants"][variant] = {"error": f"{type(e).__name__}: {e}"[:300]}
        release_free_memory()
    return out


# ---------------------------------------------------------------------------------------------
# Triad and machine description (parent process)
# ---------------------------------------------------------------------------------------------


def triad(torch, threads: int, total_bytes: int, runs: int = 10) -> Dict[str, float]:
    torch.set_num_threads(threads)
    n = total_bytes // 3 // 4
    a = torch.empty(n, dtype=torch.float32)
    b = torch.full((n,), 1.0)
    c = torch.full((n,), 2.0)
    a.zero_()
    torch.add(b, c, alpha=3.0, out=a)  # warm up
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        torch.add(b, c, alpha=3.0, out=a)
        times.append(time.perf_counter() - t0)
    del a, b, c
    gc.collect()
    bytes_moved = 3 * n * 4
    return {
        "best_gbps": bytes_moved / min(times) / 1e9,
        "median_gbps": bytes_moved / statistics.median(times) / 1e9,
        "array_mib": n * 4 / MIB,
    }


def _run(cmd: List[str]) -> str:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def machine_description(torch, divkit) -> Dict[str, str]:
    lscpu = {}
    for line in _run(["lscpu"]).splitlines():
        if ":" in line:
            k, val = line.split(":", 1)
            lscpu[k.strip()] = val.strip()
    mem = ""
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                mem = f"{int(line.split()[1]) / 1024 / 1024:.1f} GiB"
    os_name = ""
    if os.path.exists("/etc/os-release"):
        with open("/etc/os-release") as f:
            for line in f:
                if line.startswith("PRETTY_NAME="):
                    os_name = line.split("=", 1)[1].strip().strip('"')
    caches = ", ".join(
        f"{k} {lscpu[k]}" for k in ("L1d cache", "L2 cache", "L3 cache") if k in lscpu
    )
    return {
        "cpu": lscpu.get("Model name", platform.processor()),
        "cores": f"{lscpu.get('CPU(s)', '?')} CPUs ({lscpu.get('Core(s) per socket', '?')} cores/socket, "
        f"{lscpu.get('Thread(s) per core', '?')} thread/core), "
        f"{lscpu.get('Hypervisor vendor', 'bare metal')} "
        f"{'VM' if 'Hypervisor vendor' in lscpu else ''}".strip(),
        "caches": caches,
        "memory": mem,
        "os": f"{os_name}, Linux {platform.release()}",
        "compiler": (_run(["c++", "--version"]).splitlines() or ["?"])[0],
        "python": platform.python_version(),
        "torch": torch.__version__,
        "divkit": divkit.version(),
        "simd": f"{divkit.active_simd_target()} (available: {', '.join(divkit.available_simd_targets())})",
        "threads": str(divkit.get_num_threads()),
    }


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------


def fmt_ms(r: Optional[Dict[str, Any]]) -> str:
    if not r:
        return "-"
    if "error" in r:
        return "error"
    star = "*" if r.get("note") else ""
    return (
        f"{r['median'] * 1e3:,.0f}{star}"
        if r["median"] >= 0.1
        else f"{r['median'] * 1e3:,.1f}{star}"
    )


def fmt_mem(r: Optional[Dict[str, Any]]) -> str:
    if not r or "error" in r:
        return "-"
    x = r["peak_extra"]
    star = "*" if r.get("note") else ""
    if x >= GIB:
        return f"{x / GIB:.2f} GiB{star}"
    return f"{x / MIB:.1f} MiB{star}"


def row_block_bytes(v: int, threads: int) -> int:
    vpad = (v + 15) // 16 * 16  # padded to the widest vector (16 fp32 lanes)
    return 5 * vpad * 4 * threads


def analyse(results: List[Dict[str, Any]], bw_gbps: float, args) -> List[Dict[str, Any]]:
    rows = []
    for res in results:
        vs = res["variants"]
        dk, dki, dko = vs.get("divkit"), vs.get("divkit_inplace"), vs.get("divkit_grad_out")
        eg, cp = vs.get("eager"), vs.get("compile")
        elem = 4 if res["dtype"] == "fp32" else 2
        moved = 3 * args.n * res["v"] * elem

        def ok(r):
            return r is not None and "error" not in r

        row = dict(res)
        row["gbps"] = moved / dk["median"] / 1e9 if ok(dk) else None
        row["gbps_inplace"] = moved / dki["median"] / 1e9 if ok(dki) else None
        row["gbps_grad_out"] = moved / dko["median"] / 1e9 if ok(dko) else None
        dkd = vs.get("divkit_inplace_deferred")
        row["gbps_inplace_deferred"] = moved / dkd["median"] / 1e9 if ok(dkd) else None
        row["compile_ratio_inplace_deferred"] = (
            cp["median"] / dkd["median"] if ok(cp) and ok(dkd) else None
        )
        row["compile_ratio_grad_out"] = cp["median"] / dko["median"] if ok(cp) and ok(dko) else None
        row["eager_ratio"] = eg["median"] / dk["median"] if ok(eg) and ok(dk) else None
        row["compile_ratio"] = cp["median"] / dk["median"] if ok(cp) and ok(dk) else None
        row["eager_ratio_inplace"] = eg["median"] / dki["median"] if ok(eg) and ok(dki) else None
        row["compile_ratio_inplace"] = cp["median"] / dki["median"] if ok(cp) and ok(dki) else None
        row["block_bound"] = row_block_bytes(res["v"], res["threads"])
        # The memory floor: the bytes divkit must move at the triad's bandwidth. No kernel can
        # beat it, so peer time / floor time caps any speed-up.
        floor = moved / (bw_gbps * 1e9)
        row["floor_s"] = floor
        row["eager_ceiling"] = eg["median"] / floor if ok(eg) else None
        row["compile_ceiling"] = cp["median"] / floor if ok(cp) else None
        rows.append(row)
    return rows


def render(rows, triads, bw_gbps, machine, args, wall, loads) -> str:
    L: List[str] = []
    L.append(
        f"N = {args.n}, threads = {machine['threads']} (divkit and torch), "
        f"median of {args.reps} runs of forward + backward after {args.warmup} warm-up; "
        f"reduction batchmean; jsd with beta = 0.5."
    )
    tri = "; ".join(
        f"{k}: best {t['best_gbps']:.1f} GB/s (median {t['median_gbps']:.1f})"
        for k, t in triads.items()
    )
    L.append(
        f"Triad (torch float32, 3 x {next(iter(triads.values()))['array_mib']:.0f} MiB): {tri}. "
        f"Reference bandwidth: {bw_gbps:.1f} GB/s."
    )
    L.append(
        f"Load average before/after: {loads[0]} / {loads[1]}. Wall time of the run: {wall / 60:.1f} min."
    )
    L.append("")
    L.append(
        "Time per forward + backward (ms); ratios = peer time / divkit time (divkit with a "
        "gradient buffer; in parentheses: in-place)."
    )
    L.append("")
    L.append(
        "| kind | V | dtype | divkit | divkit in-place | eager (TRL) | torch.compile | "
        "eager / divkit | compile / divkit | divkit GB/s | % of triad |"
    )
    L.append("|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        vs = r["variants"]

        def ratio(a, b):
            if a is None:
                return "-"
            s = f"{a:.1f}x"
            if b is not None:
                s += f" ({b:.1f}x)"
            return s

        pct = (
            f"{100 * r['gbps'] / bw_gbps:.0f}% ({100 * r['gbps_inplace'] / bw_gbps:.0f}%)"
            if r["gbps"] and r["gbps_inplace"]
            else (f"{100 * r['gbps'] / bw_gbps:.0f}%" if r["gbps"] else "-")
        )
        gb = (
            f"{r['gbps']:.1f} ({r['gbps_inplace']:.1f})"
            if r["gbps"] and r["gbps_inplace"]
            else (f"{r['gbps']:.1f}" if r["gbps"] else "-")
        )
        L.append(
            f"| {r['kind']} | {r['v']} | {r['dtype']} | {fmt_ms(vs.get('divkit'))} | "
            f"{fmt_ms(vs.get('divkit_inplace'))} | {fmt_ms(vs.get('eager'))} | "
            f"{fmt_ms(vs.get('compile'))} | {ratio(r['eager_ratio'], r['eager_ratio_inplace'])} | "
            f"{ratio(r['compile_ratio'], r['compile_ratio_inplace'])} | {gb} | {pct} |"
        )
    if any(r["variants"].get("divkit_grad_out") for r in rows):
        L.append("")
        L.append(
            "With a reused grad_out= buffer (the kernel writes into mapped memory: no page "
            "faults inside it):"
        )
        L.append("")
        L.append(
            "| kind | V | dtype | divkit grad_out (ms) | compile / divkit | GB/s | % of triad |"
        )
        L.append("|---|---:|---|---:|---:|---:|---:|")
        for r in rows:
            if not r["variants"].get("divkit_grad_out"):
                continue
            cr = r["compile_ratio_grad_out"]
            gb = r["gbps_grad_out"]
            L.append(
                f"| {r['kind']} | {r['v']} | {r['dtype']} | "
                f"{fmt_ms(r['variants'].get('divkit_grad_out'))} | "
                f"{f'{cr:.1f}x' if cr else '-'} | {f'{gb:.1f}' if gb else '-'} | "
                f"{f'{100 * gb / bw_gbps:.0f}%' if gb else '-'} |"
            )
    if any(r["variants"].get("divkit_inplace_deferred") for r in rows):
        L.append("")
        L.append(
            "In place with deferred checks (each row checked as it is read, not every row "
            "before the first write: one read of both inputs less):"
        )
        L.append("")
        L.append(
            "| kind | V | dtype | in-place deferred (ms) | in-place / deferred | "
            "compile / deferred | GB/s | % of triad |"
        )
        L.append("|---|---:|---|---:|---:|---:|---:|---:|")
        for r in rows:
            vd = r["variants"].get("divkit_inplace_deferred")
            if not vd or "error" in vd:
                continue
            vi = r["variants"].get("divkit_inplace")
            ri = f"{vi['median'] / vd['median']:.2f}" if vi and "error" not in vi else "-"
            cr = r["compile_ratio_inplace_deferred"]
            gb = r["gbps_inplace_deferred"]
            L.append(
                f"| {r['kind']} | {r['v']} | {r['dtype']} | {fmt_ms(vd)} | {ri} | "
                f"{f'{cr:.1f}x' if cr else '-'} | {gb:.1f} | {100 * gb / bw_gbps:.0f}% |"
            )
    L.append("")
    L.append(
        "Peak extra memory of one forward + backward (peak RSS minus RSS with the inputs "
        "allocated; the gradient included). Row-block bound = threads x 5 x V x 4 bytes."
    )
    L.append("")
    L.append(
        "| kind | V | dtype | divkit | divkit in-place | row-block bound | eager (TRL) | torch.compile |"
    )
    L.append("|---|---:|---|---:|---:|---:|---:|---:|")
    for r in rows:
        vs = r["variants"]
        L.append(
            f"| {r['kind']} | {r['v']} | {r['dtype']} | {fmt_mem(vs.get('divkit'))} | "
            f"{fmt_mem(vs.get('divkit_inplace'))} | {r['block_bound'] / MIB:.1f} MiB | "
            f"{fmt_mem(vs.get('eager'))} | {fmt_mem(vs.get('compile'))} |"
        )
    notes = [
        (r, k, vr)
        for r in rows
        for k, vr in r["variants"].items()
        if vr.get("note") or vr.get("error")
    ]
    if notes:
        L.append("")
        for r, k, vr in notes:
            L.append(
                f"* {r['kind']} V={r['v']} {r['dtype']} {LABELS[k]}: "
                f"{vr.get('note') or vr.get('error')}"
            )

    # Targets.
    L.append("")
    L.append(
        "Targets, for divkit with a gradient buffer (in parentheses: in-place); 'short by' is "
        "the factor (or the points of bandwidth) still missing. The last column is the most "
        "any implementation could reach: the peer's time over the memory floor (the bytes "
        "divkit must move at the triad bandwidth)."
    )
    L.append("")
    L.append(
        "| kind | V | dtype | vs eager (>= 30x) | vs torch.compile (>= 3x) | "
        "% of triad (>= 45%; in place >= 60%; fp32 V=128256) | in-place extra memory (<= row block) | "
        "ceiling: peer / memory floor |"
    )
    L.append("|---|---:|---|---|---|---|---|---|")

    def speed(a, b, target):
        if a is None:
            return "-"
        txt = f"{a:.1f}x" + (f" ({b:.1f}x)" if b is not None else "")
        if a >= target and (b is None or b >= target):
            return txt + ": met"

        def factor(x):
            return f"{target / x:.2f}x" if target / x < 1.1 else f"{target / x:.1f}x"

        short = factor(a) if a < target else "met"
        if b is not None:
            short += f" ({factor(b)})" if b < target else " (met)"
        return txt + ": MISSED, short by " + short

    for r in rows:
        bw = "-"
        if r["dtype"] == "fp32" and r["v"] == 128256 and r["gbps"]:
            a = r["gbps"] / bw_gbps
            b = r["gbps_inplace"] / bw_gbps if r["gbps_inplace"] else None
            txt = f"{100 * a:.0f}%" + (f" ({100 * b:.0f}%)" if b is not None else "")
            if a >= TARGET_BW and (b is None or b >= TARGET_BW_INPLACE):
                bw = txt + ": met"
            else:
                bw = (
                    txt
                    + f": MISSED, short by {max(0, 100 * (TARGET_BW - a)):.0f} pts"
                    + (
                        f" ({max(0, 100 * (TARGET_BW_INPLACE - b)):.0f} pts)"
                        if b is not None
                        else ""
                    )
                )
        ceil_parts = []
        if r.get("eager_ceiling"):
            ceil_parts.append(f"eager {r['eager_ceiling']:.0f}x")
        if r.get("compile_ceiling"):
            ceil_parts.append(f"compile {r['compile_ceiling']:.1f}x")
        ceiling = (
            (", ".join(ceil_parts) + f" (floor {r['floor_s'] * 1e3:.0f} ms)") if ceil_parts else "-"
        )
        mem = "-"
        dki = r["variants"].get("divkit_inplace")
        if dki and "error" not in dki:
            extra, bound = dki["peak_extra"], r["block_bound"]
            # Besides the row blocks the core keeps O(N) per-row state (a flag, a scale and the
            # row loss: 17 bytes a row) and Python a few small objects.
            slack = 17 * args.n + 256 * 1024
            if extra <= bound:
                mem = f"{extra / MIB:.1f} MiB (row blocks {bound / MIB:.1f} MiB): met"
            elif extra <= bound + slack:
                mem = (
                    f"{extra / MIB:.1f} MiB (row blocks {bound / MIB:.1f} MiB + O(N) "
                    f"per-row state): met"
                )
            else:
                mem = (
                    f"{extra / MIB:.1f} MiB > row blocks {bound / MIB:.1f} MiB: MISSED by "
                    f"{extra / max(bound, 1):.1f}x"
                )
        L.append(
            f"| {r['kind']} | {r['v']} | {r['dtype']} | "
            f"{speed(r['eager_ratio'], r['eager_ratio_inplace'], TARGET_EAGER)} | "
            f"{speed(r['compile_ratio'], r['compile_ratio_inplace'], TARGET_COMPILE)} | "
            f"{bw} | {mem} | {ceiling} |"
        )
    return "\n".join(L)


def machine_markdown(machine: Dict[str, str], cmd: str) -> str:
    L = ["| | |", "|---|---|"]
    for k in (
        "cpu",
        "cores",
        "caches",
        "memory",
        "os",
        "compiler",
        "python",
        "torch",
        "divkit",
        "simd",
        "threads",
    ):
        L.append(f"| {k} | {machine[k]} |")
    L.append("")
    L.append(f"Command: `{cmd}`")
    return "\n".join(L)


# ---------------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------------


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--quick",
        action="store_true",
        help="smoke test: N=256, V=32000, 3 runs (about 1-2 minutes)",
    )
    ap.add_argument(
        "--kinds",
        nargs="+",
        default=["forward_kl", "reverse_kl", "jsd"],
        help="divergence kinds (peers exist for forward_kl, reverse_kl, jsd; other "
        "divkit kinds get divkit rows only)",
    )
    ap.add_argument("--vocab", nargs="+", type=int, default=None, help="V values (32000 128256)")
    ap.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--n", type=int, default=None, help="rows (tokens); default 4096")
    ap.add_argument("--reps", type=int, default=None, help="timed runs per variant (default 5)")
    ap.add_argument(
        "--warmup",
        type=int,
        default=None,
        help="warm-up runs (default 1; torch.compile compiles in its warm-up; eager "
        "at large N is warmed up by its memory probe)",
    )
    ap.add_argument("--triad-gib", type=float, default=3.0, help="total triad size (GiB)")
    ap.add_argument(
        "--reserve-gib",
        type=float,
        default=3.0,
        help="memory left to others when deciding whether eager fits",
    )
    ap.add_argument(
        "--peer-max-s",
        type=float,
        default=30.0,
        help="eager steps predicted (from the probe) to take longer than this run at "
        "N/2, N/4, ... and are scaled to N (default 30: only JSD at V=128256, "
        "which takes 40+ s per step)",
    )
    ap.add_argument(
        "--leaf",
        action="store_true",
        help="pass the student logits as a leaf tensor (autograd then stores the "
        "gradient in .grad) instead of as a view of one (default; as logits "
        "that come out of a model)",
    )
    ap.add_argument("--markdown", metavar="FILE", help="also write the report as markdown")
    ap.add_argument("--json", metavar="FILE", help="also write the raw results as JSON")
    ap.add_argument(
        "--render",
        metavar="JSON",
        help="print (and with --markdown write) the report of a saved --json run",
    )
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.worker:
        res = worker(json.loads(args.worker))
        sys.stdout.write("\nRESULT " + json.dumps(res) + "\n")
        return 0

    if args.render:
        with open(args.render) as f:
            saved = json.load(f)
        run_args = argparse.Namespace(**saved["args"])
        triads = saved["triads"]
        bw = max(t["best_gbps"] for t in triads.values())
        rows = analyse(saved["results"], bw, run_args)
        report = render(
            rows,
            triads,
            bw,
            saved["machine"],
            run_args,
            saved.get("wall_s", 0.0),
            tuple(saved.get("loads", ("?", "?"))),
        )
        text = machine_markdown(saved["machine"], saved.get("cmd", "?")) + "\n\n" + report
        print(text)
        if args.markdown:
            with open(args.markdown, "w") as f:
                f.write(text + "\n")
        return 0

    if args.quick:
        args.n = args.n or 256
        args.vocab = args.vocab or [32000]
        args.reps = args.reps or 3
        args.triad_gib = min(args.triad_gib, 2.0)
    args.n = args.n or 4096
    args.vocab = args.vocab or [32000, 128256]
    args.reps = args.reps or 5
    args.warmup = args.warmup or 1

    import torch

    import divkit

    threads = divkit.get_num_threads()
    torch.set_num_threads(threads)
    for k in args.kinds:
        if k not in divkit.KINDS:
            ap.error(f"--kinds: unknown kind {k!r}; divkit has {', '.join(divkit.KINDS)}")
    machine = machine_description(torch, divkit)
    cmd = "python " + " ".join([os.path.relpath(sys.argv[0])] + sys.argv[1:])
    t_start = time.perf_counter()
    load_before = "%.2f %.2f %.2f" % os.getloadavg()
    print(
        f"divkit {machine['divkit']} ({machine['simd']}), torch {machine['torch']}, "
        f"{threads} threads, {machine['cpu']}; load {load_before}",
        flush=True,
    )

    triads = {"before": triad(torch, threads, int(args.triad_gib * GIB))}
    print(f"triad: {triads['before']['best_gbps']:.1f} GB/s", flush=True)

    results = []
    for v in args.vocab:
        for dt in args.dtypes:
            for kind in args.kinds:
                cfg = {
                    "kind": kind,
                    "v": v,
                    "dtype": dt,
                    "n": args.n,
                    "reps": args.reps,
                    "warmup": args.warmup,
                    "variants": args.variants,
                    "probe_n": min(256, args.n),
                    "reserve_bytes": int(args.reserve_gib * GIB),
                    "leaf": args.leaf,
                    "peer_max_s": args.peer_max_s,
                }
                t0 = time.perf_counter()
                proc = subprocess.run(
                    [sys.executable, os.path.abspath(__file__), "--worker", json.dumps(cfg)],
                    capture_output=True,
                    text=True,
                )
                res = None
                for line in proc.stdout.splitlines():
                    if line.startswith("RESULT "):
                        res = json.loads(line[len("RESULT ") :])
                if res is None:
                    err = (proc.stderr.strip().splitlines() or [f"exit code {proc.returncode}"])[-1]
                    res = {
                        "threads": threads,
                        "variants": {
                            x: {"error": f"worker failed (rc {proc.returncode}): {err}"[:300]}
                            for x in args.variants
                        },
                    }
                res.update(kind=kind, v=v, dtype=dt)
                results.append(res)
                summary = ", ".join(
                    f"{LABELS[k]} {fmt_ms(r)} ms / {fmt_mem(r)}" for k, r in res["variants"].items()
                )
                print(
                    f"  {kind:>10} V={v:<6} {dt}: {summary}  [{time.perf_counter() - t0:.0f} s]",
                    flush=True,
                )

    triads["after"] = triad(torch, threads, int(args.triad_gib * GIB))
    bw = max(t["best_gbps"] for t in triads.values())
    wall = time.perf_counter() - t_start
    load_after = "%.2f %.2f %.2f" % os.getloadavg()
    rows = analyse(results, bw, args)
    report = render(rows, triads, bw, machine, args, wall, (load_before, load_after))
    print()
    print(machine_markdown(machine, cmd))
    print()
    print(report)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(machine_markdown(machine, cmd) + "\n\n" + report + "\n")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    "machine": machine,
                    "args": vars(args),
                    "triads": triads,
                    "results": results,
                    "wall_s": wall,
                    "cmd": cmd,
                    "loads": [load_before, load_after],
                },
                f,
                indent=1,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
