#!/usr/bin/env python3
"""divkit.ot.sparse_ot vs POT's ot.smooth.smooth_ot_semi_dual: quadratically regularized OT
(reg_type 'l2') and sparsity-constrained OT (reg_type 'sparsity_constrained', max_nz = k).

    python bench/bench_sparse_ot.py                 # n = m in {500, 1000, 2000}
    python bench/bench_sparse_ot.py --sizes 300     # quick

Problem: x ~ N(0, I_d), y ~ N(0.5, I_d) with d = 8, uniform weights, cost |x - y|^2,
gamma = --gamma-rel x the mean cost x n, so that gamma ||P||^2 / 2 (about gamma / 2n for a plan
with a few entries of mass ~1/n per row) is comparable to <P, C>. Both solve the same semi-dual in float64: divkit by its C++
L-BFGS (tolerance --tol on ||P 1 - a||_1), POT by scipy's L-BFGS-B (its stopThr on the
gradient's max norm, here --tol / n, and numItermax = --max-iter). After each run the L1
marginal error and the primal objective <P, C> + gamma/2 ||P||^2 are recomputed from the
returned plan, so accuracy is shown next to the time. Times: best of 3 runs (1 if > 5 s), in
one process, 2 threads for divkit (POT's semi-dual is single-threaded numpy/scipy).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import platform
import time

import numpy as np


def problem(n: int, d: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d))
    y = rng.standard_normal((n, d)) + 0.5
    C = ((x[:, None, :] - y[None, :, :]) ** 2).sum(-1)
    w = np.full(n, 1.0 / n)
    return w, w.copy(), C


def stats(P, a, C, gamma):
    err = float(np.abs(P.sum(1) - a).sum())
    obj = float((P * C).sum() + 0.5 * gamma * (P * P).sum())
    nnz_col = int((P > 0).sum(0).max())
    return err, obj, nnz_col


def timed(fn, reps=3):
    best, out = float("inf"), None
    for _ in range(reps):
        t = time.perf_counter()
        out = fn()
        el = time.perf_counter() - t
        best = min(best, el)
        if el > 5:
            break
    return best, out


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--sizes", type=int, nargs="*", default=[500, 1000, 2000])
    ap.add_argument("--dim", type=int, default=8)
    ap.add_argument("--k", type=int, nargs="*", default=[0, 5], help="0: no sparsity constraint")
    ap.add_argument("--gamma-rel", type=float, default=1.0)
    ap.add_argument("--tol", type=float, default=1e-6)
    ap.add_argument("--max-iter", type=int, default=2000)
    args = ap.parse_args()

    import ot as pot
    import torch

    import divkit
    import divkit.ot as dot

    divkit.set_num_threads(2)
    print(
        f"Machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} "
        f"torch threads; POT {pot.__version__}\n"
    )
    print(
        "| n = m | k | gamma | solver | time (s) | vs divkit | L1 marginal error | "
        "objective rel. diff | max nnz per column |"
    )
    print("|---:|---:|---:|---|---:|---:|---:|---:|---:|")
    for n in args.sizes:
        a, b, C = problem(n, args.dim)
        gamma = args.gamma_rel * float(C.mean()) * n
        for k in args.k:
            at, bt, Ct = (torch.from_numpy(v) for v in (a, b, C))
            t_dk, res = timed(
                lambda: dot.sparse_ot(
                    at,
                    bt,
                    Ct,
                    gamma=gamma,
                    k=k or None,
                    tol=args.tol,
                    max_iter=args.max_iter,
                    warn=False,
                )
            )
            P_dk = res.plan.to_dense().numpy()
            err_dk, obj_dk, nz_dk = stats(P_dk, a, C, gamma)

            def run_pot():
                with contextlib.redirect_stdout(io.StringIO()):  # its projection prints
                    return pot.smooth.smooth_ot_semi_dual(
                        a,
                        b,
                        C,
                        gamma,
                        reg_type="sparsity_constrained" if k else "l2",
                        max_nz=k or None,
                        stopThr=args.tol / n,
                        numItermax=args.max_iter,
                    )

            t_pot, P_pot = timed(run_pot)
            err_pot, obj_pot, nz_pot = stats(P_pot, a, C, gamma)
            for name, t, err, obj, nz in (
                ("divkit", t_dk, err_dk, obj_dk, nz_dk),
                ("POT smooth_ot_semi_dual", t_pot, err_pot, obj_pot, nz_pot),
            ):
                print(
                    f"| {n} | {k or '-'} | {gamma:.3g} | {name} | {t:.3f} | "
                    f"{t / t_dk:.1f}x | {err:.1e} | {(obj - obj_dk) / abs(obj_dk):+.1e} | "
                    f"{nz} |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
