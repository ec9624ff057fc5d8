"""GPU benchmark of the fused linear heads, run by scripts/gpu_check.sh.

Fused linear JSD (beta = 0.5) and fused linear cross-entropy, bf16, N = 16384, H = 4096,
V = 128256 by default, forward + backward (gradients of the student's hidden states and lm_head
weight), in one process on one GPU, each implementation side by side:

* ``divkit``: divkit.fused_linear_divergence / fused_linear_cross_entropy (on CUDA: the PyTorch
  chunk loop with torch's GEMMs and divkit's CUDA row kernel where the build has it);
* ``liger``: Liger-Kernel's LigerFusedLinearJSD / LigerFusedLinearCrossEntropyLoss, when
  installed;
* ``materialized``: plain PyTorch on the full [N, V] logits (autograd);
* ``gemms``: the same GEMMs as divkit's chunk loop (logits, hidden-state and weight gradients,
  chunk by chunk, bf16 operands with fp32 output), alone: the floor;
* ``divkit_torch_rows``: divkit's chunk loop with PyTorch ops as its row step
  (``backend="torch"``): what divkit's CUDA row kernels (divergence, label rows) replace, timed
  last so that it never takes the others' time budget.
* ``divkit_core_loop``: the C++ core's own CUDA chunk loop (``_C.fused_linear_divergence`` /
  ``_C.fused_linear_cross_entropy`` on the CUDA tensors: cuBLAS from the core, no PyTorch op per
  chunk), which the Python functions do not take yet; its workspace comes from cudaMallocAsync,
  outside torch's allocator, so its peak-memory figure counts only the gradient outputs. A CPU
  build runs the CPU core instead (the dry run).

Times are medians of rounds that run every implementation once in turn (CUDA events); peak
memory is torch.cuda.max_memory_allocated over one forward + backward, absolute and above the
inputs. Ratios: divkit's time over the GEMMs' and over Liger's, its peak memory over Liger's, and
its time over that of its PyTorch row step.
Writes gpu_fused_bench.json and gpu_fused_bench.md into --out.

``--dry-run``: the same code on CPU tensors at a small size (wall-clock times, no memory
figures), to test the benchmark and its writers without a GPU.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch

import divkit
from divkit.backends import torch_ops

IMPLS = ("divkit", "liger", "materialized", "gemms", "divkit_torch_rows", "divkit_core_loop")


# ---------------------------------------------------------------------------------------------
# The implementations: each returns step() -> loss (forward + backward of one call).
# ---------------------------------------------------------------------------------------------


_LIGER_ERROR: List[str] = []


def _liger(op: str) -> Optional[Callable]:
    try:
        if op == "jsd":
            from liger_kernel.transformers.fused_linear_jsd import LigerFusedLinearJSD

            m = LigerFusedLinearJSD(jsd_beta=0.5)
            return lambda sh, sw, th, tw, labels: m(sh, sw, th, tw, None)
        from liger_kernel.transformers.fused_linear_cross_entropy import (
            LigerFusedLinearCrossEntropyLoss,
        )

        m = LigerFusedLinearCrossEntropyLoss()
        return lambda sh, sw, th, tw, labels: m(sw, sh, labels)
    except Exception as e:  # noqa: BLE001 - any import problem means "not available"
        _LIGER_ERROR[:] = [f"{type(e).__name__}: {e}"[:200]]
        return None


def _materialized(op: str) -> Callable:
    def jsd(sh, sw, th, tw, labels, beta=0.5):
        lq = torch.log_softmax((sh @ sw.T).float(), -1)
        with torch.no_grad():
            lp = torch.log_softmax((th @ tw.T).float(), -1)
        lm = torch.logaddexp(lp + math.log(beta), lq + math.log(1 - beta))
        row = beta * (lp.exp() * (lp - lm)).sum(-1) + (1 - beta) * (lq.exp() * (lq - lm)).sum(-1)
        return row.mean()

    def ce(sh, sw, th, tw, labels):
        return torch.nn.functional.cross_entropy((sh @ sw.T).float(), labels)

    return jsd if op == "jsd" else ce


def _divkit(op: str, backend: str = "auto") -> Callable:
    if op == "jsd":
        return lambda sh, sw, th, tw, labels: divkit.fused_linear_divergence(
            sh, sw, th, tw, "jsd", beta=0.5, backend=backend
        )
    return lambda sh, sw, th, tw, labels: divkit.fused_linear_cross_entropy(
        sh, sw, labels, backend=backend
    )


def _gemms(op: str) -> Callable:
    """The GEMMs of divkit's chunk loop alone (its _Head, its default chunk), no row step."""

    def run(sh, sw, th, tw, labels):
        n, v = sh.shape[0], sw.shape[0]
        rows = torch_ops._rows_per_chunk(None, n, v, sh.device)
        s = torch_ops._Head(sh.detach(), sw.detach(), None, torch.float32)
        t = torch_ops._Head(th, tw, None, torch.float32) if op == "jsd" else None
        gh = torch.empty(sh.shape, dtype=torch.float32, device=sh.device)
        gw = torch.zeros(sw.shape, dtype=torch.float32, device=sh.device)
        for a in range(0, n, rows):
            b = min(n, a + rows)
            hc = s.rows(a, b)
            z = s.logits(hc)
            if t is not None:
                t.logits(t.rows(a, b))
            gh[a:b] = s.grad_hidden(z)
            s.add_grad_weight(gw, z, hc)
        sh.grad, sw.grad = gh.to(sh.dtype), gw.to(sw.dtype)
        return None

    run.no_backward = True
    return run


def _core_loop(op: str) -> Callable:
    """The core's chunk loop through _C, forward and backward in one call (the gradients of the
    student's hidden states and weight, fp32, cast to the inputs' dtype as autograd would)."""
    from divkit import _C

    def run(sh, sw, th, tw, labels):
        o = _C.FusedLinearOptions()
        if sh.is_cuda:
            o.stream = torch.cuda.current_stream(sh.device).cuda_stream
        h, w = sh.detach(), sw.detach()
        gh = torch.empty(h.shape, dtype=torch.float32, device=h.device)
        gw = torch.empty(w.shape, dtype=torch.float32, device=h.device)
        loss = torch.empty(1, dtype=torch.float32, device=h.device)
        if op == "jsd":
            o.kind, o.beta = "jsd", 0.5
            _C.fused_linear_divergence(
                (h, w, None),
                (th, tw, None),
                None,
                None,
                None,
                o,
                loss,
                (gh, gw, None),
                (None, None, None),
            )
        else:
            _C.fused_linear_cross_entropy(
                (h, w, None), labels, None, o, loss, (gh, gw, None), (None,) * 4
            )
        sh.grad, sw.grad = gh.to(sh.dtype), gw.to(sw.dtype)
        return None

    run.no_backward = True
    return run


def implementations(op: str) -> Dict[str, Optional[Callable]]:
    return {
        "divkit": _divkit(op),
        "liger": _liger(op),
        "materialized": _materialized(op),
        "gemms": _gemms(op),
        "divkit_torch_rows": _divkit(op, "torch"),
        "divkit_core_loop": _core_loop(op),
    }


# ---------------------------------------------------------------------------------------------
# Timing and memory
# ---------------------------------------------------------------------------------------------


class Clock:
    """CUDA events on a GPU, wall clock (after a synchronize) elsewhere."""

    def __init__(self, cuda: bool) -> None:
        self.cuda = cuda

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def time(self, fn: Callable[[], None]) -> float:
        if not self.cuda:
            t0 = time.perf_counter()
            fn()
            return time.perf_counter() - t0
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / 1e3


def _step(fn: Callable, inputs) -> Callable[[], Optional[float]]:
    sh, sw, th, tw, labels = inputs

    def step():
        sh.grad = sw.grad = None
        loss = fn(sh, sw, th, tw, labels)
        if loss is None:
            return None
        loss.backward()
        return float(loss.detach())

    return step


def _is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in str(e).lower()


def bench_op(op: str, inputs, clock: Clock, rounds: int, deadline: float) -> List[dict]:
    """Rows for one op: every implementation warmed up once, then ``rounds`` rounds of one
    timed step each (in turn), then one step for its peak memory."""
    impls = implementations(op)
    rows = {name: {"op": op, "impl": name, "status": "ok", "times_s": []} for name in IMPLS}
    steps = {}
    for name, fn in impls.items():
        if fn is None:
            rows[name]["status"] = "not available: " + (_LIGER_ERROR or ["?"])[0]
            continue
        steps[name] = _step(fn, inputs)
    base = torch.cuda.memory_allocated() if clock.cuda else 0

    def attempt(name, what):
        try:
            return what()
        except Exception as e:  # noqa: BLE001 - an implementation failing is a result
            rows[name]["status"] = "out of memory" if _is_oom(e) else f"error: {e!r}"[:300]
            steps.pop(name, None)
            inputs[0].grad = inputs[1].grad = None
            if clock.cuda:
                torch.cuda.empty_cache()
            return None

    for name in list(steps):  # warm-up (compiles Triton kernels, cuBLAS heuristics)
        if time.time() > deadline:
            rows[name]["status"] = "skipped: out of time"
            steps.pop(name)
            continue
        loss = attempt(name, steps[name])
        rows[name]["loss"] = loss
    for _ in range(rounds):
        for name in list(steps):
            if time.time() > deadline:
                break
            t = attempt(name, lambda: clock.time(steps[name]))
            if t is not None:
                rows[name]["times_s"].append(t)
    for name in list(steps):
        if not clock.cuda:
            break
        clock.sync()
        inputs[0].grad = inputs[1].grad = None
        torch.cuda.reset_peak_memory_stats()
        if attempt(name, steps[name]) is None and name not in steps:
            continue
        clock.sync()
        peak = torch.cuda.max_memory_allocated()
        rows[name]["peak_mib"] = peak / 2**20
        rows[name]["above_inputs_mib"] = (peak - base) / 2**20
    inputs[0].grad = inputs[1].grad = None
    out = []
    for name in IMPLS:
        r = rows[name]
        r["ms"] = 1e3 * statistics.median(r["times_s"]) if r["times_s"] else None
        out.append(r)
    return out


def _rel(x: Optional[float], ref: Optional[float]) -> Optional[float]:
    if x is None or ref is None:
        return None
    return abs(x - ref) / max(abs(ref), 1e-30)


def ratios(rows: List[dict]) -> dict:
    """divkit over the GEMMs alone (time) and over Liger (time, peak memory), per op."""
    out = {}
    for op in sorted({r["op"] for r in rows}):
        by = {r["impl"]: r for r in rows if r["op"] == op}
        d, g, lg = by.get("divkit", {}), by.get("gemms", {}), by.get("liger", {})

        def div(a, b):
            return a / b if a is not None and b else None

        out[op] = {
            "time_over_gemms": div(d.get("ms"), g.get("ms")),
            "time_over_liger": div(d.get("ms"), lg.get("ms")),
            "peak_over_liger": div(d.get("peak_mib"), lg.get("peak_mib")),
            "loss_rel_diff_liger": _rel(lg.get("loss"), d.get("loss")),
            "loss_rel_diff_materialized": _rel(
                by.get("materialized", {}).get("loss"), d.get("loss")
            ),
            "time_over_torch_rows": div(d.get("ms"), by.get("divkit_torch_rows", {}).get("ms")),
            "core_loop_over_divkit": div(by.get("divkit_core_loop", {}).get("ms"), d.get("ms")),
        }
    return out


# ---------------------------------------------------------------------------------------------
# Writers
# ---------------------------------------------------------------------------------------------

TARGETS = "targets: time <= Liger's, peak memory <= half Liger's, time <= 1.15x the GEMMs alone"


def markdown(result: dict) -> str:
    def num(x, fmt):
        return "n/a" if x is None else format(x, fmt)

    s = result["shape"]
    lines = [
        f"Fused linear heads, {result['device']}; torch {result['torch']}; Liger "
        f"{result['liger'] or 'not installed'}; N = {s['n']}, H = {s['h']}, V = {s['v']}, "
        f"{s['dtype']}, forward + backward"
        + (" (dry run on CPU: wall-clock times, no memory figures)" if result["dry_run"] else ""),
        "",
        "| op | impl | ms | peak MiB | above inputs MiB | status |",
        "|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['op']} | {r['impl']} | {num(r.get('ms'), '.2f')} | "
            f"{num(r.get('peak_mib'), '.0f')} | {num(r.get('above_inputs_mib'), '.0f')} | "
            f"{r['status']} |"
        )
    lines += [
        "",
        "| op | divkit time / GEMMs | divkit time / Liger | divkit peak / Liger "
        "| loss vs Liger | loss vs materialized |",
        "|---|---|---|---|---|---|",
    ]
    for op, q in result["ratios"].items():
        lines.append(
            f"| {op} | {num(q['time_over_gemms'], '.3f')} | {num(q['time_over_liger'], '.3f')} "
            f"| {num(q['peak_over_liger'], '.3f')} | {num(q['loss_rel_diff_liger'], '.1e')} "
            f"| {num(q['loss_rel_diff_materialized'], '.1e')} |"
        )
    lines += [
        "",
        "divkit time / divkit with PyTorch rows (backend='torch'): "
        + ", ".join(
            f"{op} {num(q.get('time_over_torch_rows'), '.3f')}"
            for op, q in result["ratios"].items()
        ),
    ]
    lines += [
        "",
        "the core's CUDA loop (_C) time / divkit: "
        + ", ".join(
            f"{op} {num(q.get('core_loop_over_divkit'), '.3f')}"
            for op, q in result["ratios"].items()
        ),
    ]
    lines += ["", TARGETS]
    return "\n".join(lines) + "\n"


def write_results(out: Path, result: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_fused_bench.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "gpu_fused_bench.md").write_text(markdown(result))


# ---------------------------------------------------------------------------------------------


def make_inputs(n, h, v, dtype, device, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    sh = torch.randn(n, h, generator=g, device=device, dtype=dtype).requires_grad_()
    sw = (torch.randn(v, h, generator=g, device=device, dtype=dtype) / h**0.5).requires_grad_()
    th = torch.randn(n, h, generator=g, device=device, dtype=dtype)
    tw = torch.randn(v, h, generator=g, device=device, dtype=dtype) / h**0.5
    labels = torch.randint(0, v, (n,), generator=g, device=device)
    return [sh, sw, th, tw, labels]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--n", type=int, default=16384)
    ap.add_argument("--h", type=int, default=4096)
    ap.add_argument("--v", type=int, default=128256)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--ops", nargs="+", default=["jsd", "cross_entropy"])
    ap.add_argument("--budget-s", type=float, default=180.0)
    ap.add_argument("--dry-run", action="store_true")
    a = ap.parse_args(argv)
    t0 = time.time()
    deadline = t0 + a.budget_s
    if a.dry_run:
        device, dtype = "cpu", torch.float32
        a.n, a.h, a.v = min(a.n, 64), min(a.h, 32), min(a.v, 1000)
    else:
        if not torch.cuda.is_available():
            print("gpu_fused: no CUDA device visible to torch; use --dry-run to test on CPU")
            return 2
        device, dtype = "cuda", torch.bfloat16
    clock = Clock(device == "cuda")
    try:
        from importlib.metadata import version

        liger = version("liger-kernel")
    except Exception:  # noqa: BLE001
        liger = None
    rows: List[dict] = []
    for op in a.ops:
        inputs = make_inputs(a.n, a.h, a.v, dtype, device)
        rows += bench_op(op, inputs, clock, a.rounds, deadline)
        for r in rows[-len(IMPLS) :]:
            print(json.dumps({k: v for k, v in r.items() if k != "times_s"}), flush=True)
        del inputs
        if clock.cuda:
            torch.cuda.empty_cache()
    result = {
        "device": torch.cuda.get_device_name(0) if clock.cuda else "cpu",
        "torch": torch.__version__,
        "liger": liger,
        "dry_run": bool(a.dry_run),
        "shape": {"n": a.n, "h": a.h, "v": a.v, "dtype": str(dtype).replace("torch.", "")},
        "rows": rows,
        "ratios": ratios(rows),
        "seconds": time.time() - t0,
    }
    write_results(Path(a.out), result)
    print(markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
