"""Fused linear-head distillation, side by side: divkit vs eager PyTorch (TRL's
generalized_jsd_loss on materialized logits) vs Liger-Kernel's LigerFusedLinearJSDLoss vs the
GEMMs alone (the floor).

Every variant runs forward + backward of the same JSD distillation loss (beta = 0.5, gradients of
the student's hidden states and lm_head weight) in its own subprocess, so that its peak memory
(peak RSS minus the RSS once the inputs exist) is its own. The floor is the four GEMMs any
implementation must do (student and teacher logits, then grad_hidden and grad_weight), timed with
torch's fp32 matmul (MKL) and with numpy's (OpenBLAS, the library divkit's GEMMs come from); the
faster of the two is the floor. Results are checked against divkit's loss while timing (relative difference
printed). Liger runs its chunked loss with torch.compile (compiled=True) after a warm-up call.

    python bench/bench_fused_linear.py --quick
    python bench/bench_fused_linear.py --n 4096 --vocab 32000 128256 --dtype float32 bfloat16 \\
        --markdown out.md
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import resource
import subprocess
import sys
import time

VARIANTS = ("divkit", "eager", "liger", "gemm_floor", "gemm_floor_openblas")


def _status_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return 0.0


def _reset_peak_rss() -> bool:
    """Resets the kernel's RSS high-water mark (VmHWM) to the current RSS, so that the peak
    measured after the step is the step's own: building the inputs (fp32 randn, then the cast to
    bf16) leaves a higher mark than some variants reach (1.5 GB at V = 128256)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def worker(variant: str, n: int, v: int, h: int, dtype_name: str, threads: int, reps: int):
    import torch

    torch.set_num_threads(threads)
    dtype = getattr(torch, dtype_name)
    g = torch.Generator().manual_seed(0)
    sh = torch.randn(n, h, generator=g).to(dtype)
    th = torch.randn(n, h, generator=g).to(dtype)
    sw = (torch.randn(v, h, generator=g) / h**0.5).to(dtype)
    tw = (torch.randn(v, h, generator=g) * 2 / h**0.5).to(dtype)
    y = torch.randint(0, v, (n,), generator=g)

    if variant == "divkit":
        import divkit

        divkit.set_num_threads(threads)

        def step():
            a, w = sh.clone().requires_grad_(True), sw.clone().requires_grad_(True)
            loss = divkit.fused_linear_divergence(
                a, w, th, tw, "jsd", beta=0.5, reduction="batchmean"
            )
            loss.backward()
            return loss.item()
    elif variant == "eager":
        from trl.experimental.gkd.gkd_trainer import GKDTrainer

        jsd = GKDTrainer.generalized_jsd_loss

        def step():
            a, w = sh.clone().requires_grad_(True), sw.clone().requires_grad_(True)
            s_logits = a @ w.T
            with torch.no_grad():
                t_logits = th @ tw.T
            loss = jsd(s_logits, t_logits, beta=0.5, reduction="batchmean")
            loss.backward()
            return loss.item()
    elif variant == "liger":
        from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss

        fn = LigerFusedLinearJSDLoss(
            weight_hard_loss=0.0, weight_soft_loss=1.0, beta=0.5, compiled=True
        )

        def step():
            a, w = sh.clone().requires_grad_(True), sw.clone().requires_grad_(True)
            loss = fn(a, w, th, tw, y)
            loss.backward()
            return loss.item()
    elif variant == "gemm_floor_openblas":  # the same four GEMMs through numpy's OpenBLAS
        a32, w32, t32, tw32 = (x.float().numpy() for x in (sh, sw, th, tw))

        def step():
            s_logits = a32 @ w32.T
            t_logits = t32 @ tw32.T
            _ = s_logits @ w32
            _ = t_logits.T @ a32
            return float("nan")
    else:  # the four GEMMs, in fp32 (what divkit computes in), torch's BLAS (MKL)
        a32, w32, t32, tw32 = sh.float(), sw.float(), th.float(), tw.float()

        def step():
            s_logits = a32 @ w32.T
            t_logits = t32 @ tw32.T
            _ = s_logits @ w32
            _ = t_logits.T @ a32
            return float("nan")

    gc.collect()
    exact = _reset_peak_rss()
    base = _status_mb("VmRSS")
    t0 = time.perf_counter()
    value = step()  # warm-up (and torch.compile for Liger)
    times = [time.perf_counter() - t0] if reps == 0 else []  # reps 0: the cold step alone
    for _ in range(reps):
        t0 = time.perf_counter()
        value = step()
        times.append(time.perf_counter() - t0)
    # Without the reset (not Linux), ru_maxrss: an upper bound that includes building the inputs.
    peak = (
        _status_mb("VmHWM") if exact else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    )
    return {
        "variant": variant,
        "n": n,
        "v": v,
        "h": h,
        "dtype": dtype_name,
        "median_s": sorted(times)[len(times) // 2],
        "peak_extra_mb": peak - base,
        "loss": value,
    }


def run_variant(args, variant, n, v, dtype):
    cmd = [
        sys.executable,
        __file__,
        "--worker",
        variant,
        "--n",
        str(n),
        "--vocab",
        str(v),
        "--hidden",
        str(args.hidden),
        "--dtype",
        dtype,
        "--threads",
        str(args.threads),
        "--reps",
        str(args.reps),
    ]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        return {
            "variant": variant,
            "n": n,
            "v": v,
            "dtype": dtype,
            "error": f"timed out after {args.timeout} s",
        }
    for line in out.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    tail = (out.stderr or out.stdout).strip().splitlines()[-1:] or ["?"]
    reason = "killed (out of memory)" if out.returncode in (-9, 137) else tail[0][:160]
    return {"variant": variant, "n": n, "v": v, "dtype": dtype, "error": reason}


def machine() -> str:
    cpu = "?"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(l.split(":", 1)[1].strip() for l in f if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return (
        f"{cpu}, {os.cpu_count()} cores, {mem:.0f} GiB, {platform.system()} "
        f"{platform.release()}, load average {os.getloadavg()[0]:.1f}"
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, nargs="+", default=None)
    ap.add_argument("--vocab", type=int, nargs="+", default=None)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--dtype", nargs="+", default=["float32"])
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument(
        "--reps",
        type=int,
        default=1,
        help="timed runs after the warm-up; 0 times the warm-up step itself (a "
        "memory measurement for slow variants: it includes torch.compile)",
    )
    ap.add_argument("--timeout", type=int, default=1800)
    ap.add_argument("--quick", action="store_true", help="N=512, V=32000, H=1024")
    ap.add_argument("--markdown", metavar="FILE")
    ap.add_argument("--worker")
    args = ap.parse_args()
    if args.worker:
        res = worker(
            args.worker,
            args.n[0],
            args.vocab[0],
            args.hidden,
            args.dtype[0],
            args.threads,
            args.reps,
        )
        print("RESULT " + json.dumps(res))
        return 0
    if args.quick:
        args.n, args.vocab, args.hidden = args.n or [512], args.vocab or [32000], 1024
    args.n = args.n or [4096]
    args.vocab = args.vocab or [32000]

    lines = [
        f"Machine: {machine()}",
        "",
        f"JSD (beta 0.5) distillation, forward + backward (grads of student hidden and "
        f"weight), H = {args.hidden}, {args.threads} threads; time is "
        + (
            f"the median of {args.reps} run(s) after a warm-up"
            if args.reps
            else "one cold step (warm-up and compilation included)"
        )
        + "; peak extra memory = peak RSS minus RSS with "
        "the inputs allocated.",
        "",
        "| N | V | dtype | variant | time | vs divkit | peak extra memory | loss rel. diff |",
        "|---:|---:|---|---|---:|---:|---:|---:|",
    ]
    print("\n".join(lines), flush=True)
    for n in args.n:
        for v in args.vocab:
            for dt in args.dtype:
                res = {var: run_variant(args, var, n, v, dt) for var in args.variants}
                dk = res.get("divkit", {})
                for var in args.variants:
                    r = res[var]
                    if "error" in r:
                        row = f"| {n} | {v} | {dt} | {var} | - | - | - | {r['error']} |"
                    else:
                        ratio = (
                            f"{r['median_s'] / dk['median_s']:.2f}x" if "median_s" in dk else "-"
                        )
                        diff = (
                            "-"
                            if var.startswith("gemm_floor") or "loss" not in dk
                            else f"{abs(r['loss'] - dk['loss']) / max(abs(dk['loss']), 1e-12):.1e}"
                        )
                        row = (
                            f"| {n} | {v} | {dt} | {var} | {r['median_s']:.2f} s | {ratio} | "
                            f"{r['peak_extra_mb']:.0f} MB | {diff} |"
                        )
                    print(row, flush=True)
                    lines.append(row)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
