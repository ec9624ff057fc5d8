#!/usr/bin/env python3
"""The fused label losses of the linear head (cross-entropy, selective log-softmax), forward +
backward to the hidden states and the weight, and the sparse (top-k) teacher's row kernel
(``divkit.sparse_divergence``, forward KL with the tail bucket, k = 20, on [N, V] student logits,
forward + backward), side by side in one run:

- ``divkit``: this tree's ``divkit.fused_linear_cross_entropy`` / ``fused_linear_logprobs``;
- ``divkit_base`` (with ``--baseline DIR``): the same calls from another divkit checkout's
  ``python`` directory (its own build), e.g. the tree before a kernel change: before/after in
  one run;
- ``divkit_2pass``: this tree with the label losses' gradient taken in a pass of its own after
  the forward statistics (``_C._set_label_one_sweep(False)``, the path before softcap, top-k mass
  and the entropy term were folded into the statistics' sweep): one-sweep against two-pass in one
  run;
- ``eager``: the materialized computation in torch (``hidden @ W.T``, then
  ``F.cross_entropy`` / TRL-style ``log_softmax(...).gather``; for the sparse teacher the k + 1
  bucket KL written with ``log_softmax``, ``gather`` and ``log1p``).

Ops: ``ce`` (cross-entropy), ``logprobs`` (sum of the log-probs), ``sparse`` (above), and the
configurations of the label losses whose gradient the one-sweep path covers: ``ce_softcap``
(softcap 30, label smoothing 0.1), ``ce_topk`` (cross-entropy with gradients and the top-k mass,
k = --topk, through ``divkit._C`` since the Python API asks for the top-k mass only from
``fused_linear_logprobs``), ``lp_entropy`` (log-probs and entropy at temperature 0.7, backward of
``sum(logprobs) + 0.1 sum(entropy)``).

Liger-Kernel's fused linear cross-entropy is a Triton (GPU) kernel and does not run on a CPU:
it is not a peer here. A small hidden size (default H = 256) keeps the row kernels a visible
share of the time beside the GEMMs.

    python bench/bench_label_head.py [--baseline /path/to/other/python] [--rounds 3]
    python bench/bench_label_head.py --ops ce_softcap,ce_topk,lp_entropy \
        --variants divkit,divkit_2pass --vocab 128256 --threads 2
    python bench/bench_label_head.py --ops ce_softcap,ce_topk,lp_entropy --paired --reps 6

``--paired``: per op, one process times whole calls with the one-sweep and the two-pass path
alternating (``_C._set_label_one_sweep``), --reps pairs, and prints the medians and the median
of the per-pair ratios: a change in the machine's load hits both members of a pair alike.

Each (op, variant) runs in its own subprocess, --reps calls each (the best kept), for --rounds
alternating rounds; the table gives the median over the rounds and the largest peak extra RSS
(peak RSS minus the RSS once the inputs exist). The load average is printed before and after.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_case(op: str, variant: str, a) -> dict:
    import torch
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(0)
    n, v, h = a.tokens, a.vocab, a.hidden
    hid = torch.randn(n, h, generator=g).requires_grad_()
    w = (torch.randn(v, h, generator=g) * h**-0.5).requires_grad_()
    labels = torch.randint(0, v, (n,), generator=g)
    labels[: n // 8] = -100
    if a.threads:
        torch.set_num_threads(a.threads)
    paired = variant == "paired"
    if paired:
        variant = "divkit"
    if variant.startswith("divkit"):
        import divkit
        from divkit import _C

        if a.threads:
            divkit.set_num_threads(a.threads)
        _C._set_label_one_sweep(variant != "divkit_2pass")
    if op == "sparse":
        hid = torch.randn(n, v, generator=g).requires_grad_()  # the student logits
        k = 20
        t_lp, idx = (torch.randn(n, v, generator=g) * 2).log_softmax(-1).topk(k, -1)

    def step():
        if op == "sparse":
            if variant == "eager":
                lq = hid.log_softmax(-1)
                lq_b = lq.gather(-1, idx)
                p_b = t_lp.exp()
                p_tail = (1 - p_b.sum(-1)).clamp(min=0)
                lq_tail = torch.log1p(-lq_b.exp().sum(-1).clamp(max=1 - 1e-7))
                kl = (p_b * (t_lp - lq_b)).sum(-1) + torch.xlogy(p_tail, p_tail) - p_tail * lq_tail
                loss = kl.mean()
            else:
                loss = divkit.sparse_divergence(hid, idx, t_lp, "forward_kl")
            loss.backward()
            hid.grad = None
            return float(loss.detach())
        if op in ("ce_softcap", "ce_topk", "lp_entropy"):
            return label_config_step(op, variant, hid, w, labels, a)
        if variant == "eager":
            z = hid @ w.t()
            if op == "ce":
                loss = F.cross_entropy(z, labels, ignore_index=-100)
            else:
                yi = labels.clamp(min=0)
                lp = z.log_softmax(-1).gather(-1, yi[:, None])[:, 0] * (labels != -100)
                loss = lp.sum()
        elif op == "ce":
            loss = divkit.fused_linear_cross_entropy(hid, w, labels)
        else:
            loss = divkit.fused_linear_logprobs(hid, w, labels).sum()
        loss.backward()
        hid.grad = w.grad = None
        return float(loss.detach())

    step()  # warm-up
    if paired:  # one sweep and two passes alternating in this process, pair by pair
        one, two = [], []
        for r in range(a.reps):
            for on in (True, False) if r % 2 == 0 else (False, True):
                _C._set_label_one_sweep(on)
                t0 = time.perf_counter()
                step()
                (one if on else two).append(time.perf_counter() - t0)
        _C._set_label_one_sweep(True)
        return {"one": one, "two": two}
    base = rss_mib()
    times = []
    for _ in range(a.reps):
        t0 = time.perf_counter()
        value = step()
        times.append(time.perf_counter() - t0)
    return {"seconds": min(times), "peak_mib": max(0.0, peak_mib() - base), "value": value}


def label_config_step(op, variant, hid, w, labels, a) -> float:
    """One forward + backward of the label-loss configurations (ce_softcap, ce_topk,
    lp_entropy)."""
    import torch
    import torch.nn.functional as F

    if variant == "eager":
        z = hid @ w.t()
        if op == "ce_softcap":
            loss = F.cross_entropy(30.0 * torch.tanh(z / 30.0), labels, label_smoothing=0.1)
        elif op == "ce_topk":
            loss = F.cross_entropy(z, labels)
            with torch.no_grad():
                p = z.softmax(-1)
                mass = p.topk(a.topk, -1).values.sum(-1)  # noqa: F841 (the statistic's cost)
        else:
            lp = (z / 0.7).log_softmax(-1)
            mask = labels != -100
            tok = lp.gather(-1, labels.clamp(min=0)[:, None])[:, 0] * mask
            ent = -(lp.exp() * lp).sum(-1) * mask
            loss = tok.sum() + 0.1 * ent.sum()
    else:
        import divkit
        from divkit import _C

        if op == "ce_softcap":
            loss = divkit.fused_linear_cross_entropy(
                hid, w, labels, softcap=30.0, label_smoothing=0.1
            )
        elif op == "ce_topk":
            opts = _C.FusedLinearOptions()
            opts.topk = a.topk
            loss = torch.empty(1)
            gh, gw = torch.empty_like(hid), torch.empty_like(w)
            mass = torch.empty(hid.shape[0])
            h, wd, y = hid.detach(), w.detach(), labels
            _C.fused_linear_cross_entropy(
                (h, wd, None), y, None, opts, loss, (gh, gw, None), (None, None, None, mass)
            )
            return float(loss)
        else:
            res = divkit.fused_linear_logprobs(hid, w, labels, temperature=0.7, return_entropy=True)
            loss = res.logprobs.sum() + 0.1 * res.entropy.sum()
    loss.backward()
    hid.grad = w.grad = None
    return float(loss.detach())


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--baseline", help="another divkit checkout's python directory")
    p.add_argument(
        "--ops",
        default="ce,logprobs,sparse",
        help="comma-separated: ce, logprobs, sparse, ce_softcap, ce_topk, lp_entropy",
    )
    p.add_argument(
        "--variants",
        default="divkit,eager",
        help="comma-separated: divkit, divkit_2pass, eager (divkit_base comes with --baseline)",
    )
    p.add_argument("--topk", type=int, default=20, help="k of ce_topk's top-k mass")
    p.add_argument("--threads", type=int, default=0, help="torch and divkit threads (0: default)")
    p.add_argument(
        "--paired",
        action="store_true",
        help="one sweep against two passes in one process per op, --reps pairs",
    )
    p.add_argument("--case", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.case:
        op, variant = a.case.split(":")
        print(json.dumps(run_case(op, variant, a)))
        return

    def load():
        with open("/proc/loadavg") as f:
            return " ".join(f.read().split()[:3])

    here = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python")
    paths = {var: here for var in a.variants.split(",")}
    if a.baseline:
        paths["divkit_base"] = a.baseline
    print(
        f"{os.cpu_count()} cpus; N={a.tokens} V={a.vocab} H={a.hidden} fp32, threads "
        f"{a.threads or 'default'}; load average before: {load()}"
    )
    args = [x for x in sys.argv[1:] if not x.startswith("--baseline")]
    if a.paired:
        print(f"paired in one process per op, {a.reps} pairs (order alternating); medians")
        print(f"{'op':<12}{'one sweep s':>12}{'two passes s':>13}{'ratio':>8}  pair ratios")
        for op in a.ops.split(","):
            env = dict(os.environ, PYTHONPATH=here)
            r = subprocess.run(
                [sys.executable, __file__, "--case", f"{op}:paired", *args],
                capture_output=True,
                text=True,
                env=env,
            )
            if r.returncode != 0:
                print(f"{op}: failed: {r.stderr.strip().splitlines()[-1:]}")
                continue
            d = json.loads(r.stdout.strip().splitlines()[-1])
            ratios = sorted(t / o for o, t in zip(d["one"], d["two"]))
            one, two = sorted(d["one"]), sorted(d["two"])
            print(
                f"{op:<12}{one[len(one) // 2]:>12.3f}{two[len(two) // 2]:>13.3f}"
                f"{ratios[len(ratios) // 2]:>7.2f}x  " + " ".join(f"{x:.2f}" for x in ratios)
            )
        print(f"load average after: {load()}")
        return
    if a.baseline and a.baseline in args:
        args.remove(a.baseline)
    cases = [(op, var) for op in a.ops.split(",") for var in paths]
    runs = {c: [] for c in cases}
    for rnd in range(a.rounds):
        for op, var in cases if rnd % 2 == 0 else cases[::-1]:
            env = dict(os.environ, PYTHONPATH=paths[var])
            r = subprocess.run(
                [sys.executable, __file__, "--case", f"{op}:{var}", *args],
                capture_output=True,
                text=True,
                env=env,
            )
            if r.returncode != 0:
                print(f"{op}:{var} failed: {r.stderr.strip().splitlines()[-1:]}")
                continue
            runs[(op, var)].append(json.loads(r.stdout.strip().splitlines()[-1]))
    print(f"load average after: {load()}; medians of {a.rounds} alternating rounds")
    print(f"{'op':<12}{'variant':<14}{'seconds':>9}{'peak MiB':>10}{'value':>16}  all rounds")
    med = {}
    for (op, var), rs in runs.items():
        if not rs:
            continue
        secs = sorted(r["seconds"] for r in rs)
        med[(op, var)] = secs[len(secs) // 2]
        print(
            f"{op:<12}{var:<14}{med[(op, var)]:>9.4f}"
            f"{max(r['peak_mib'] for r in rs):>10.0f}{rs[-1]['value']:>16.6f}  "
            + " ".join(f"{x:.3f}" for x in secs)
        )
    for op in a.ops.split(","):
        d = med.get((op, "divkit"))
        for other in ("eager", "divkit_base", "divkit_2pass"):
            o = med.get((op, other))
            if d and o:
                print(f"{op}: divkit {o / d:.2f}x the speed of {other}")


if __name__ == "__main__":
    main()
