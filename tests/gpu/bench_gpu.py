"""GPU benchmark of the token divergences (forward + backward), run by scripts/gpu_check.sh.

Measures, in one run on one GPU, side by side: divkit's CUDA kernel, torch.compile of the same
loss, Liger-Kernel where it is installed, and the device-to-device copy bandwidth. Writes
gpu_bench.json and gpu_bench.md into --out.
"""

import argparse
import json
import time
from pathlib import Path

import torch

from divkit import _C

DEVICE = "cuda"  # "cpu" under --dry-run


def timed(fn, warmup=2, iters=5):
    if DEVICE == "cpu":  # --dry-run: wall clock
        fn()
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(iters):
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return min(times)


def copy_bandwidth(nbytes):
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=DEVICE).fill_(1.0)
    dst = torch.empty_like(src)
    sec = timed(lambda: dst.copy_(src))
    return 2 * src.numel() * 4 / sec  # read + write


def torch_loss(kind, beta=0.5):
    def f(s, t):
        lq = torch.log_softmax(s.float(), -1)
        lp = torch.log_softmax(t.float(), -1)
        if kind == "forward_kl":
            row = (lp.exp() * (lp - lq)).sum(-1)
        elif kind == "reverse_kl":
            row = (lq.exp() * (lq - lp)).sum(-1)
        else:
            p, q = lp.exp(), lq.exp()
            lm = torch.log(beta * p + (1 - beta) * q)
            row = beta * (p * (lp - lm)).sum(-1) + (1 - beta) * (q * (lq - lm)).sum(-1)
        return row.mean()

    return f


def liger_fn(kind):
    try:
        from liger_kernel.transformers.functional import liger_jsd, liger_kl_div
    except Exception:  # noqa: BLE001 - any import problem means "not available"
        return None
    if kind == "jsd":
        return lambda s, t: liger_jsd(
            torch.log_softmax(s.float(), -1), torch.log_softmax(t.float(), -1), beta=0.5
        )
    if kind == "forward_kl":
        return lambda s, t: liger_kl_div(
            torch.log_softmax(s.float(), -1),
            torch.log_softmax(t.float(), -1),
            reduction="batchmean",
            log_target=True,
        )
    return None


def row_cache_ab(n, vs, t0, budget_s):
    """The divergence kernel with its shared-memory row cache at the default budget, off, and
    at the H100's opt-in limit (DIVKIT_CUDA_ROW_CACHE_BYTES, read at every call), alternating
    the three settings; medians. Rows for small V only (V = 128256 never fits)."""
    import os
    import statistics

    settings = {"default_s": None, "off_s": "0", "optin_s": "229376"}
    old = os.environ.get("DIVKIT_CUDA_ROW_CACHE_BYTES")
    out = []
    try:
        for v in vs:
            s = torch.randn(n, v, device=DEVICE, dtype=torch.bfloat16)
            t = torch.randn(n, v, device=DEVICE, dtype=torch.bfloat16)
            gs = torch.empty_like(s)
            loss = torch.zeros(1, device=DEVICE)
            for kind in ["forward_kl", "jsd"]:
                if time.time() - t0 > budget_s:
                    return out
                stream = torch.cuda.current_stream().cuda_stream if DEVICE == "cuda" else 0
                args = _C.DivergenceArgs(kind=kind, reduction="mean", stream=stream)
                times = {k: [] for k in settings}
                for _ in range(3):
                    for key, value in settings.items():
                        if value is None:
                            os.environ.pop("DIVKIT_CUDA_ROW_CACHE_BYTES", None)
                        else:
                            os.environ["DIVKIT_CUDA_ROW_CACHE_BYTES"] = value
                        times[key].append(
                            timed(
                                lambda: _C.divergence(s, t, loss, gs, None, None, None, args),
                                warmup=1,
                                iters=3,
                            )
                        )
                row = {"kind": kind, "v": v, "n": n}
                row.update({k: statistics.median(x) for k, x in times.items()})
                out.append(row)
                print(json.dumps(row), flush=True)
    finally:
        if old is None:
            os.environ.pop("DIVKIT_CUDA_ROW_CACHE_BYTES", None)
        else:
            os.environ["DIVKIT_CUDA_ROW_CACHE_BYTES"] = old
    return out


def sinkhorn_rows(t0, budget_s, sizes):
    """divkit.ot.sinkhorn on the GPU (divkit's CUDA kernel, float64), its PyTorch fallback
    (backend="torch") and POT's log-domain Sinkhorn on torch tensors (ot.bregman.sinkhorn_log,
    the cost from ot.dist inside the timing) where POT is installed: a fixed 100 iterations
    (tol = 0), the cost on the fly (cost_cache_mib=0) and held; medians of 3 rounds that run
    each in turn; ratios to divkit. At most 60 s, so that the token rows keep their budget."""
    import statistics

    import divkit.ot

    try:
        import ot as pot
    except ImportError:
        pot = None
    out = []
    iters = 100
    deadline = min(t0 + budget_s, time.time() + 60.0)
    for n, d in sizes:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(n, d, generator=g, dtype=torch.float64).to(DEVICE)
        y = (torch.randn(n, d, generator=g, dtype=torch.float64) + 0.5).to(DEVICE)
        a = torch.full((n,), 1.0 / n, dtype=torch.float64, device=DEVICE)
        eps = 0.05 * float(d)  # of the order of the mean cost / 40 (squared distances ~ 2 d)
        kw = dict(eps=eps, tol=0.0, max_iter=iters, warn=False)
        fns = {
            "divkit_fly": lambda: divkit.ot.sinkhorn(x, y, cost_cache_mib=0, **kw),
            "divkit_held": lambda: divkit.ot.sinkhorn(x, y, cost_cache_mib=1e6, **kw),
            "torch_fallback": lambda: divkit.ot.sinkhorn(x, y, backend="torch", **kw),
        }
        if pot is not None:
            fns["pot_log"] = lambda: pot.bregman.sinkhorn_log(
                a, a, pot.dist(x, y), eps, numItermax=iters, stopThr=0.0, warn=False
            )
        times = {k: [] for k in fns}
        for _ in range(3):
            for key, fn in fns.items():
                if time.time() > deadline:
                    break
                try:
                    times[key].append(timed(fn, warmup=1, iters=1))
                except Exception as e:  # noqa: BLE001 - report and go on
                    times[key] = []
                    print(f"sinkhorn {key}: {e!r}"[:300], flush=True)
        row = {"n": n, "m": n, "d": d, "iters": iters}
        for k, v in times.items():
            row[k + "_s"] = statistics.median(v) if v else None
        out.append(row)
        print(json.dumps(row), flush=True)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--n", type=int, default=16384)
    ap.add_argument("--v", type=int, default=128256)
    ap.add_argument("--budget-s", type=float, default=200.0)
    ap.add_argument(
        "--dry-run",
        action="store_true",
        help="CPU tensors at a small size, no torch.compile: tests this script and its writers",
    )
    a = ap.parse_args()
    global DEVICE
    t0 = time.time()
    if a.dry_run:
        DEVICE = "cpu"
        a.n, a.v = min(a.n, 8), min(a.v, 1000)
    n, v = a.n, a.v
    device_name = torch.cuda.get_device_properties(0).name if DEVICE == "cuda" else "cpu (dry run)"
    bw = copy_bandwidth(min(4 << 30, n * v * 2))
    # First: cheap (seconds), while the torch.compile compiles below may use up the budget.
    cache_rows = row_cache_ab(n, [4096, 32000] if DEVICE == "cuda" else [500], t0, a.budget_s)
    ot_sizes = [(4096, 3), (4096, 64), (16384, 16)] if DEVICE == "cuda" else [(64, 3)]
    ot_rows = sinkhorn_rows(t0, a.budget_s, ot_sizes)
    rows = []
    for dtype in [torch.bfloat16, torch.float32]:
        s = torch.randn(n, v, device=DEVICE, dtype=dtype)
        t = torch.randn(n, v, device=DEVICE, dtype=dtype)
        elt = s.element_size()
        nbytes = 3 * n * v * elt  # read s and t, write grad_s: the least any kernel moves
        for kind in ["forward_kl", "reverse_kl", "jsd"]:
            row = {"kind": kind, "dtype": str(dtype).replace("torch.", ""), "n": n, "v": v}
            loss = torch.zeros(1, device=DEVICE)
            gs = torch.empty_like(s)
            stream = torch.cuda.current_stream().cuda_stream if DEVICE == "cuda" else 0
            args = _C.DivergenceArgs(kind=kind, reduction="mean", stream=stream)
            sec = timed(lambda: _C.divergence(s, t, loss, gs, None, None, None, args))
            row["divkit_s"] = sec
            row["divkit_bw_fraction"] = nbytes / sec / bw
            ref = torch_loss(kind)
            compiled = torch.compile(ref) if DEVICE == "cuda" else None
            for name, fn in [("torch_compile", compiled), ("liger", liger_fn(kind))]:
                if fn is None or time.time() - t0 > a.budget_s:
                    row[name + "_s"] = None
                    continue
                sg = s.detach().requires_grad_()

                def step(fn=fn, sg=sg):
                    sg.grad = None
                    fn(sg, t).backward()

                try:
                    row[name + "_s"] = timed(step, warmup=2, iters=3)
                except Exception as e:  # noqa: BLE001 - report and go on
                    row[name + "_s"] = None
                    row[name + "_error"] = repr(e)[:200]
            rows.append(row)
            print(json.dumps(row), flush=True)
        s = t = gs = None
        if DEVICE == "cuda":
            torch.cuda.empty_cache()
    result = {
        "device": device_name,
        "torch": torch.__version__,
        "copy_bandwidth_GBps": bw / 1e9,
        "rows": rows,
        "row_cache": cache_rows,
        "sinkhorn": ot_rows,
        "seconds": time.time() - t0,
    }
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_bench.json").write_text(json.dumps(result, indent=2))

    def ms(x):
        return "n/a" if x is None else f"{x * 1e3:.2f}"

    lines = [
        f"GPU: {device_name}; torch {torch.__version__}; copy bandwidth {bw / 1e9:.0f} GB/s",
        "",
        "| kind | dtype | divkit ms | of copy bw | torch.compile ms | Liger ms |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['kind']} | {r['dtype']} | {ms(r['divkit_s'])} | "
            f"{r['divkit_bw_fraction']:.0%} | {ms(r['torch_compile_s'])} | {ms(r['liger_s'])} |"
        )
    if cache_rows:
        lines += [
            "",
            "Shared-memory row cache of the divergence kernel (DIVKIT_CUDA_ROW_CACHE_BYTES), "
            "bf16, forward + backward, ms (median of alternating runs):",
            "",
            "| kind | V | default | off (0) | opt-in (229376) |",
            "|---|---|---|---|---|",
        ]
        for r in cache_rows:
            lines.append(
                f"| {r['kind']} | {r['v']} | {ms(r['default_s'])} | {ms(r['off_s'])} | "
                f"{ms(r['optin_s'])} |"
            )
    if ot_rows:

        def ratio(r, k):
            v, base = r.get(k + "_s"), r.get("divkit_fly_s")
            return "n/a" if v is None or not base else f"{v / base:.2f}"

        lines += [
            "",
            "Sinkhorn (divkit.ot.sinkhorn, float64, 100 iterations, n = m), ms (median of 3 "
            "alternating rounds); x = time / divkit on the fly:",
            "",
            "| n | d | divkit on the fly | divkit held | torch fallback (x) | POT sinkhorn_log (x) |",
            "|---|---|---|---|---|---|",
        ]
        for r in ot_rows:
            lines.append(
                f"| {r['n']} | {r['d']} | {ms(r['divkit_fly_s'])} | {ms(r['divkit_held_s'])} | "
                f"{ms(r['torch_fallback_s'])} ({ratio(r, 'torch_fallback')}) | "
                f"{ms(r.get('pot_log_s'))} ({ratio(r, 'pot_log')}) |"
            )
    (out / "gpu_bench.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
