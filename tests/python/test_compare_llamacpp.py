"""``divkit compare`` against llama.cpp's KL-divergence report (``llama-perplexity
--kl-divergence``): every figure (means, "±" standard errors, percentiles, the perplexity block,
Δp on the next token, RMS Δp, same top p, the per-chunk running figures) against an independent
float64 computation written here the way llama.cpp's tools/perplexity computes it; the reader of
llama.cpp's ``--kl-divergence-base`` file against a writer made from its documented layout; JSON;
bounded memory; no torch import."""

from __future__ import annotations

import json
import math
import os
import struct
import subprocess
import sys
import tracemalloc

import numpy as np
import pytest

from divkit.cli import main
from divkit.compare import CompareError, compare_files, format_text, open_logits

V = 64


# ---------------------------------------------------------------------------------------------
# llama.cpp's base-logits file, written from its documented layout
# ---------------------------------------------------------------------------------------------


def quantize_row(logits: np.ndarray) -> np.ndarray:
    """One row as llama.cpp stores it: float32 scale and min log-prob (4 uint16), then the
    logits within 16 of the max, as uint16 steps of scale above the floor (0 below), padded
    to an even count."""
    x = logits.astype(np.float32)
    v = x.size
    mx, mn = np.float32(x.max()), np.float32(x.min())
    mn = np.float32(max(mn, np.float32(mx - np.float32(16))))
    sum_exp = float(np.exp((x - mx).astype(np.float32)).astype(np.float64).sum())
    lse = np.float32(math.log(sum_exp))
    min_lp = np.float32(np.float32(mn - mx) - lse)
    scale = np.float32(np.float32(mx - mn) / np.float32(65535))
    row = np.zeros(2 * ((v + 1) // 2) + 4, dtype=np.uint16)
    row[:4] = np.array([scale, min_lp], dtype=np.float32).view(np.uint16)
    if scale != 0:
        inv = np.float32(1) / scale
        q = np.rint((inv * (x - mn)).astype(np.float32))  # nearest, ties to even
        row[4 : 4 + v] = np.where(x > mn, q, 0).astype(np.uint16)
    return row


def write_llamacpp(path, logits: np.ndarray, tokens: np.ndarray) -> None:
    """``logits``: [n_chunk, n_ctx, V] of every position; ``tokens``: [n_chunk, n_ctx]."""
    n_chunk, n_ctx, v = logits.shape
    first = n_ctx // 2
    with open(path, "wb") as f:
        f.write(b"_logits_")
        f.write(struct.pack("<Iii", n_ctx, v, n_chunk))
        f.write(tokens.astype("<i4").tobytes())
        for c in range(n_chunk):
            for j in range(first, n_ctx - 1):
                f.write(quantize_row(logits[c, j]).tobytes())


def decode_row(row: np.ndarray, v: int) -> np.ndarray:
    scale, min_lp = row[:4].view(np.float32)
    return (scale * row[4 : 4 + v].astype(np.float32) + min_lp).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# llama.cpp's figures, computed here as its kl_divergence() computes them (float64)
# ---------------------------------------------------------------------------------------------


def mean_and_uncertainty(s, s2, n):
    f = s / n
    df = s2 / n - f * f
    return f, (math.sqrt(df / (n - 1)) if df > 0 and n > 10 else 0.0)


def covariance(sa, sb, sab, n):
    return 0.0 if n < 10 else (sab / n - (sa / n) * (sb / n)) / (n - 1)


def percentile(sorted_values, fraction):
    if fraction <= 0:
        return sorted_values[0]
    if fraction >= 1:
        return sorted_values[-1]
    p = fraction * (len(sorted_values) - 1)
    ip = int(p)
    p -= ip
    return (1 - p) * sorted_values[ip] + p * sorted_values[min(ip + 1, len(sorted_values) - 1)]


def median(sorted_values):
    n = len(sorted_values)
    return (
        sorted_values[n // 2]
        if n % 2
        else 0.5 * (sorted_values[n // 2] + sorted_values[n // 2 - 1])
    )


def llamacpp_token(base_lp, test_logits, tok, floor):
    """One position, as llama.cpp's log_softmax(..., base_log_prob, tok, kld): base_lp are the
    base log-probs (stored ones for a llama.cpp file), test_logits the test's logits."""
    t = test_logits.astype(np.float64)
    imax = int(np.argmax(t))
    mx = t[imax]
    lse = math.log(np.exp(t - mx).sum())
    nll = mx + lse - t[tok]
    nll_base = -float(base_lp[tok])
    keep = base_lp > floor
    kld = float((np.exp(base_lp[keep]) * (base_lp[keep] - t[keep] + mx + lse)).sum())
    p_diff = math.exp(-nll) - math.exp(-nll_base)
    return dict(
        nll=nll, nll_base=nll_base, kld=kld, p_diff=p_diff, same=imax == int(np.argmax(base_lp))
    )


def llamacpp_report(per_token, chunk_rows):
    """The final report and the per-chunk lines from the per-token values."""
    acc = dict.fromkeys(["nll", "nll2", "b", "b2", "nb", "k", "k2", "d", "d2", "d4", "top"], 0.0)
    lines = []
    for i, r in enumerate(per_token):
        acc["nll"] += r["nll"]
        acc["nll2"] += r["nll"] ** 2
        acc["b"] += r["nll_base"]
        acc["b2"] += r["nll_base"] ** 2
        acc["nb"] += r["nll"] * r["nll_base"]
        acc["k"] += r["kld"]
        acc["k2"] += r["kld"] ** 2
        acc["d"] += r["p_diff"]
        acc["d2"] += r["p_diff"] ** 2
        acc["d4"] += r["p_diff"] ** 4
        acc["top"] += r["same"]
        n = i + 1
        if n % chunk_rows == 0 or n == len(per_token):
            lines.append(figures(acc, n))
    kld = np.sort([r["kld"] for r in per_token])
    dp = np.sort([r["p_diff"] for r in per_token])
    final = lines[-1]
    for name, vals in (("kld", kld), ("dp", dp)):
        final[name + "_max"], final[name + "_min"] = vals[-1], vals[0]
        final[name + "_median"] = median(vals)
        for q in (0.1, 1, 5, 10, 25, 75, 90, 95, 99, 99.9):
            final[f"{name}_p{q:g}"] = percentile(vals, q / 100)
    return final, lines


def figures(acc, n):
    lq, lq_se = mean_and_uncertainty(acc["nll"], acc["nll2"], n)
    lb, lb_se = mean_and_uncertainty(acc["b"], acc["b2"], n)
    cov = covariance(acc["nll"], acc["b"], acc["nb"], n)
    ppl, ppl_b = math.exp(lq), math.exp(lb)
    ratio_se = math.sqrt(lq_se**2 + lb_se**2 - 2 * cov)
    mse, mse_se = mean_and_uncertainty(acc["d2"], acc["d4"], n)
    top = acc["top"] / n
    k, k_se = mean_and_uncertainty(acc["k"], acc["k2"], n)
    d, d_se = mean_and_uncertainty(acc["d"], acc["d2"], n)
    return {
        "ppl_test": ppl,
        "ppl_test_se": ppl * lq_se,
        "ppl_base": ppl_b,
        "ppl_base_se": ppl_b * lb_se,
        "cor_ln_ppl": cov / (lq_se * lb_se),
        "ln_ppl_ratio": lq - lb,
        "ln_ppl_ratio_se": ratio_se,
        "ppl_ratio": math.exp(lq - lb),
        "ppl_ratio_se": math.exp(lq - lb) * ratio_se,
        "ppl_diff": ppl - ppl_b,
        "ppl_diff_se": math.sqrt((ppl * lq_se) ** 2 + (ppl_b * lb_se) ** 2 - 2 * ppl * ppl_b * cov),
        "kld": k,
        "kld_se": k_se,
        "dp": d,
        "dp_se": d_se,
        "rms_dp": math.sqrt(mse),
        "rms_dp_se": 0.5 / math.sqrt(mse) * mse_se,
        "same_top": top,
        "same_top_se": math.sqrt(top * (1 - top) / (n - 1)),
    }


def approx(x, rel=1e-9, abs=1e-12):
    return pytest.approx(x, rel=rel, abs=abs)


def check_report(r, final, lines, chunk_rows, rel=1e-9):
    ppl = r["perplexity"]
    for k in (
        "ppl_test",
        "ppl_test_se",
        "ppl_base",
        "ppl_base_se",
        "cor_ln_ppl",
        "ln_ppl_ratio",
        "ln_ppl_ratio_se",
        "ppl_ratio",
        "ppl_ratio_se",
        "ppl_diff",
        "ppl_diff_se",
    ):
        assert ppl[k] == approx(final[k], rel=rel), k
    assert (r["kl"]["mean"], r["kl"]["se"]) == (
        approx(final["kld"], rel),
        approx(final["kld_se"], rel),
    )
    dn = r["delta_p_next"]
    assert (dn["mean"], dn["se"]) == (approx(final["dp"], rel), approx(final["dp_se"], rel))
    assert (dn["rms"], dn["rms_se"]) == (
        approx(final["rms_dp"], rel),
        approx(final["rms_dp_se"], rel),
    )
    assert r["top1_agreement"] == approx(final["same_top"])
    assert r["top1_agreement_se"] == approx(final["same_top_se"])
    for ours, theirs in (("kl", "kld"), ("delta_p_next", "dp")):
        for stat in ("max", "min", "median") + tuple(
            f"p{q:g}" for q in (0.1, 1, 5, 10, 25, 75, 90, 95, 99, 99.9)
        ):
            assert r[ours][stat] == approx(final[f"{theirs}_{stat}"], 1e-7, 1e-12), (ours, stat)
    # The per-chunk table: llama.cpp's running figures at each chunk's end.
    assert r["chunk_size"] == chunk_rows and len(r["chunks"]) == len(lines)
    for c, want in zip(r["chunks"], lines):
        for ours, theirs in (
            ("ppl_test", "ppl_test"),
            ("ppl_test_se", "ppl_test_se"),
            ("ln_ppl_ratio", "ln_ppl_ratio"),
            ("ln_ppl_ratio_se", "ln_ppl_ratio_se"),
            ("kl", "kld"),
            ("kl_se", "kld_se"),
            ("rms_dp", "rms_dp"),
            ("rms_dp_se", "rms_dp_se"),
            ("same_top", "same_top"),
            ("same_top_se", "same_top_se"),
        ):
            assert c[ours] == approx(want[theirs], rel), (c["chunk"], ours)


def make_models(n_chunk=5, n_ctx=64, v=V, seed=0):
    """Logits of every position of n_chunk chunks for a base and a perturbed test model, and
    the token ids (token j + 1 drawn from the base model's prediction at position j)."""
    rng = np.random.default_rng(seed)
    base = (rng.standard_normal((n_chunk, n_ctx, v)) * 3.0).astype(np.float32)
    base[..., :3] -= 30.0  # a few tokens far below the base's top: under llama.cpp's 16-nat floor
    test = (base + 0.4 * rng.standard_normal(base.shape)).astype(np.float32)
    p = np.exp(base - base.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    u = rng.random((n_chunk, n_ctx, 1))
    drawn = np.minimum((p.cumsum(-1) < u).sum(-1), v - 1)
    tokens = rng.integers(0, v, (n_chunk, n_ctx)).astype(np.int32)
    tokens[:, 1:] = drawn[:, :-1]
    return base, test, tokens


def scored(x, n_ctx):
    """The rows llama.cpp scores: positions n_ctx/2 .. n_ctx-2 of every chunk."""
    return x[:, n_ctx // 2 : n_ctx - 1].reshape(-1, x.shape[-1])


# ---------------------------------------------------------------------------------------------
# Tests
# ---------------------------------------------------------------------------------------------


def test_npy_with_tokens_against_llamacpp_figures(tmp_path):
    base, test, tokens = make_models(seed=1)
    n_ctx = base.shape[1]
    b, t = scored(base, n_ctx), scored(test, n_ctx)
    targets = tokens[:, n_ctx // 2 + 1 :].reshape(-1)
    np.save(tmp_path / "b.npy", b)
    np.save(tmp_path / "t.npy", t)
    np.save(tmp_path / "ids.npy", targets.astype(np.int64))
    rows = n_ctx - 1 - n_ctx // 2
    r, values = compare_files(
        tmp_path / "b.npy",
        tmp_path / "t.npy",
        tokens=tmp_path / "ids.npy",
        chunk_size=rows,
        block_rows=7,
        return_values=True,
    )
    lb = b.astype(np.float64)
    lb = lb - lb.max(-1, keepdims=True)
    lb -= np.log(np.exp(lb).sum(-1, keepdims=True))
    per = [llamacpp_token(lb[i], t[i], targets[i], -np.inf) for i in range(len(b))]
    final, lines = llamacpp_report(per, rows)
    check_report(r, final, lines, rows)
    np.testing.assert_allclose(values["kl"], [x["kld"] for x in per], rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(
        values["delta_p_next"], [x["p_diff"] for x in per], rtol=1e-9, atol=1e-13
    )
    # The base-top-token variant is kept, named as such, and differs from llama.cpp's Δp.
    k = lb.argmax(-1)
    lt = t.astype(np.float64) - t.max(-1, keepdims=True)
    lt -= np.log(np.exp(lt).sum(-1, keepdims=True))
    r_ = np.arange(len(k))
    np.testing.assert_allclose(values["delta_p"], np.exp(lt[r_, k]) - np.exp(lb[r_, k]), atol=1e-13)
    assert r["delta_p"]["mean"] != pytest.approx(r["delta_p_next"]["mean"], rel=1e-3)
    # The chunk's own KL mean.
    for c in r["chunks"]:
        assert c["kl_chunk"] == approx(np.mean(values["kl"][c["start"] : c["start"] + c["rows"]]))


def test_llamacpp_reader_against_writer(tmp_path):
    base, _, tokens = make_models(n_chunk=3, n_ctx=33, v=V + 1, seed=2)  # odd V: padded rows
    write_llamacpp(tmp_path / "base.kld", base, tokens)
    f = open_logits(tmp_path / "base.kld")
    n_ctx, first = 33, 16
    rows = n_ctx - 1 - first
    assert (f.format, f.dtype, f.n_ctx, f.chunk_rows) == ("llama.cpp", "llama.cpp-uint16", 33, rows)
    assert f.shape == (3 * rows, V + 1) and f.array.shape[1] == 2 * ((V + 2) // 2) + 4
    np.testing.assert_array_equal(f.targets, tokens[:, first + 1 :].reshape(-1))
    want = np.stack([decode_row(quantize_row(x), V + 1) for x in scored(base, n_ctx)])
    got = np.concatenate([f.rows(i, min(i + 5, len(want))) for i in range(0, len(want), 5)])
    np.testing.assert_array_equal(got, want.astype(np.float64))
    # The stored log-probs are the base's within llama.cpp's quantization step (16/65535).
    lb = scored(base, n_ctx).astype(np.float64)
    lb = lb - lb.max(-1, keepdims=True)
    lb -= np.log(np.exp(lb).sum(-1, keepdims=True))
    top16 = lb >= lb.max(-1, keepdims=True) - 16
    assert np.abs(got - lb)[top16].max() < 16 / 65535 + 1e-5
    assert np.all(got[~top16] > lb[~top16])  # clamped to the floor


def test_llamacpp_base_against_llamacpp_figures(tmp_path):
    base, test, tokens = make_models(n_chunk=6, n_ctx=48, seed=3)
    n_ctx = base.shape[1]
    write_llamacpp(tmp_path / "base.kld", base, tokens)
    t = scored(test, n_ctx)
    np.save(tmp_path / "t.npy", t)
    r = compare_files(tmp_path / "base.kld", tmp_path / "t.npy", block_rows=10)
    f = open_logits(tmp_path / "base.kld")
    stored = f.rows(0, f.shape[0])
    per = [llamacpp_token(stored[i], t[i], f.targets[i], -16.0) for i in range(len(t))]
    final, lines = llamacpp_report(per, f.chunk_rows)
    check_report(r, final, lines, f.chunk_rows)
    assert r["base_format"] == "llama.cpp" and r["tokens"] == len(t)
    # --tokens is refused with a file that holds them; a test file from llama.cpp works too.
    np.save(tmp_path / "ids.npy", f.targets)
    with pytest.raises(CompareError, match="holds its token ids"):
        compare_files(tmp_path / "base.kld", tmp_path / "t.npy", tokens=tmp_path / "ids.npy")
    write_llamacpp(tmp_path / "test.kld", test, tokens)
    r2 = compare_files(tmp_path / "base.kld", tmp_path / "test.kld")
    assert r2["test_format"] == "llama.cpp"
    assert r2["kl"]["mean"] == pytest.approx(r["kl"]["mean"], rel=1e-2)


def test_llamacpp_file_errors(tmp_path, capsys):
    base, test, tokens = make_models(n_chunk=2, n_ctx=16, seed=4)
    write_llamacpp(tmp_path / "base.kld", base, tokens)
    raw = (tmp_path / "base.kld").read_bytes()
    (tmp_path / "cut.kld").write_bytes(raw[:-10])
    with pytest.raises(CompareError, match="cut.kld: truncated llama.cpp logits file"):
        open_logits(tmp_path / "cut.kld")
    (tmp_path / "head.kld").write_bytes(raw[:14])
    with pytest.raises(CompareError, match="20-byte header"):
        open_logits(tmp_path / "head.kld")
    (tmp_path / "bad.kld").write_bytes(raw[:8] + struct.pack("<Iii", 2, V, 2) + raw[20:])
    with pytest.raises(CompareError, match="needs n_ctx >= 3"):
        open_logits(tmp_path / "bad.kld")
    ids = np.frombuffer(raw[20 : 20 + 4 * 32], dtype="<i4").copy()
    ids[-1] = V + 5
    (tmp_path / "ids.kld").write_bytes(raw[:20] + ids.tobytes() + raw[20 + 4 * 32 :])
    with pytest.raises(CompareError, match="token ids outside"):
        open_logits(tmp_path / "ids.kld")
    with pytest.raises(CompareError, match="--tensor 'x' given, but a llama.cpp"):
        open_logits(tmp_path / "base.kld", tensor="x")
    np.save(tmp_path / "short.npy", scored(test, 16)[:-1])
    assert main(["compare", str(tmp_path / "base.kld"), str(tmp_path / "short.npy")]) == 2
    assert "shape mismatch" in capsys.readouterr().err


def test_tokens_errors(tmp_path):
    base, test, _ = make_models(n_chunk=1, n_ctx=40, seed=5)
    np.save(tmp_path / "b.npy", base[0])
    np.save(tmp_path / "t.npy", test[0])
    for name, ids, match in (
        ("short.npy", np.zeros(39, np.int64), "holds 39 token ids; expected 40"),
        ("float.npy", np.zeros(40, np.float32), "must be a .npy array of integers"),
        ("big.npy", np.full(40, V, np.int32), r"outside \[0, 64\)"),
    ):
        np.save(tmp_path / name, ids)
        with pytest.raises(CompareError, match=match):
            compare_files(tmp_path / "b.npy", tmp_path / "t.npy", tokens=tmp_path / name)
    with pytest.raises(CompareError, match="chunk_size must be an int >= 1"):
        compare_files(tmp_path / "b.npy", tmp_path / "t.npy", chunk_size=0)


def test_cli_json_round_trip_and_report(tmp_path, capsys):
    base, test, tokens = make_models(n_chunk=4, n_ctx=40, seed=6)
    write_llamacpp(tmp_path / "base.kld", base, tokens)
    np.save(tmp_path / "t.npy", scored(test, 40))
    want = compare_files(tmp_path / "base.kld", tmp_path / "t.npy")
    argv = ["compare", str(tmp_path / "base.kld"), str(tmp_path / "t.npy"), "--no-progress"]
    assert main(argv + ["--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got == want
    assert main(argv + ["--chunk-size", "25"]) == 0
    out = capsys.readouterr().out
    for line in (
        "Mean PPL(Q)",
        "Cor(ln(PPL(Q)), ln(PPL(base)))",
        "Mean ln(PPL(Q)/PPL(base))",
        "Mean PPL(Q)-PPL(base)",
        "Mean    KLD:",
        " 0.1%   KLD:",
        "75.0%   Δp:",
        "RMS Δp    :",
        "Same top p:",
        "per chunk of 25 rows",
    ):
        assert line in out, line
    w25 = compare_files(tmp_path / "base.kld", tmp_path / "t.npy", chunk_size=25)
    assert out.strip() == format_text(w25).strip()
    assert f"{w25['kl']['mean']:10.6f} ± {w25['kl']['se']:10.6f}" in out
    assert len(w25["chunks"]) == math.ceil(w25["tokens"] / 25)


def test_bounded_memory(tmp_path):
    """Peak traced memory stays far below the inputs: rows in blocks, per-token values in a
    memory-mapped temporary file, percentiles by sorting it in place."""
    n, v = 3000, 4000  # 48 MB of fp32 logits per file
    rng = np.random.default_rng(7)
    for name in ("b", "t"):
        a = np.lib.format.open_memmap(tmp_path / f"{name}.npy", "w+", np.float32, (n, v))
        for i in range(0, n, 500):
            a[i : i + 500] = rng.standard_normal((min(500, n - i), v), dtype=np.float32)
        a.flush()
        del a
    np.save(tmp_path / "ids.npy", rng.integers(0, v, n))
    inputs = 2 * n * v * 4
    ids = tmp_path / "ids.npy"
    results = []
    for threads in (1, 3):
        tracemalloc.start()
        try:
            r = compare_files(
                tmp_path / "b.npy", tmp_path / "t.npy", tokens=ids, block_rows=16, threads=threads
            )
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert r["tokens"] == n and r["perplexity"]["ppl_test"] > 0
        assert peak < inputs / 10, (threads, peak, inputs)
        results.append(r)
    assert results[0] == results[1]  # threads change nothing


def test_blocks_and_threads_change_nothing(tmp_path):
    base, test, tokens = make_models(n_chunk=3, n_ctx=50, seed=9)
    write_llamacpp(tmp_path / "base.kld", base, tokens)
    np.save(tmp_path / "t.npy", scored(test, 50))
    want = compare_files(tmp_path / "base.kld", tmp_path / "t.npy", block_rows=1000, threads=1)
    for rows, threads in ((1, 1), (7, 2), (13, 4)):
        got = compare_files(
            tmp_path / "base.kld", tmp_path / "t.npy", block_rows=rows, threads=threads
        )
        assert got == dict(want, block_rows=rows)
    with pytest.raises(CompareError, match="threads must be an int >= 1"):
        compare_files(tmp_path / "base.kld", tmp_path / "t.npy", threads=0)


def test_no_torch_and_no_tqdm(tmp_path):
    """The tool imports numpy only: run it with torch and tqdm blocked, and divkit's
    package __init__ (which belongs to the library) not executed."""
    base, test, tokens = make_models(n_chunk=2, n_ctx=20, seed=8)
    write_llamacpp(tmp_path / "base.kld", base, tokens)
    np.save(tmp_path / "t.npy", scored(test, 20))
    pkg = os.path.dirname(os.path.dirname(os.path.abspath(compare_files.__code__.co_filename)))
    code = f"""
import sys, types, json
sys.modules["torch"] = None
sys.modules["tqdm"] = None
m = types.ModuleType("divkit"); m.__path__ = [{pkg!r}]; sys.modules["divkit"] = m
from divkit.tools.compare import compare_files
r = compare_files({str(tmp_path / "base.kld")!r}, {str(tmp_path / "t.npy")!r}, progress=True)
print(json.dumps(r["kl"]["mean"]))
"""
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    want = compare_files(tmp_path / "base.kld", tmp_path / "t.npy")["kl"]["mean"]
    assert float(p.stdout) == want and p.stderr == ""
