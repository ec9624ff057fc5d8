"""``divkit compare``'s C++ kernel (``divkit._C.compare_rows``, include/divkit/compare.h) against
its numpy float64 path (the reference): the per-token values and every statistic of the report
for float32 / float16 / float64 / bfloat16 files, masked (-inf) entries, token ids, llama.cpp
base and test files; the fallback to numpy when the kernel is missing; the error paths. No torch
import."""

from __future__ import annotations

import json
import math
import struct

import numpy as np
import pytest

import divkit
from divkit import _C
from divkit.compare import CompareError, compare_files
from divkit.tools import compare as compare_mod
from test_compare_llamacpp import make_models, scored, write_llamacpp

# Per-token values and statistics: the kernel's exp/log (Highway, float64) and numpy's differ
# by an ulp or two, summed over V entries; the statistics agree far below what is printed.
RTOL, ATOL = 1e-12, 1e-15


def pair(n, v, seed, scale=2.0, noise=0.5):
    rng = np.random.default_rng(seed)
    base = rng.standard_normal((n, v)) * scale
    return base, base + noise * rng.standard_normal((n, v))


def close(a, b, path=""):
    """Nested dicts / lists of floats equal to RTOL (ints and strings exactly)."""
    if isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for k in a:
            close(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, list):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            close(x, y, f"{path}[{i}]")
    elif isinstance(a, float) and isinstance(b, float):
        if math.isinf(b) or math.isnan(b):
            assert a == b or (math.isnan(a) and math.isnan(b)), path
        else:
            assert abs(a - b) <= RTOL * abs(b) + ATOL, (path, a, b)
    else:
        assert a == b, path


def both(*args, **kw):
    core = compare_files(*args, engine="core", return_values=True, **kw)
    ref = compare_files(*args, engine="numpy", return_values=True, **kw)
    (rc, vc), (rn, vn) = core, ref
    rc.pop("block_rows"), rn.pop("block_rows")
    assert vc.keys() == vn.keys()
    for k in vc:
        if k == "top1":
            np.testing.assert_array_equal(vc[k], vn[k])
        else:
            np.testing.assert_allclose(vc[k], vn[k], rtol=RTOL, atol=ATOL, err_msg=k)
    close(rc, rn)
    return rc, vc


def test_kernel_is_built_and_default():
    assert compare_mod._core_kernel() is _C.compare_rows
    assert compare_mod._engine(None) is _C.compare_rows


@pytest.mark.parametrize("dtype", [np.float32, np.float16, np.float64])
def test_npy_core_equals_numpy(tmp_path, dtype):
    b, t = pair(211, 1031, 1)
    np.save(tmp_path / "b.npy", b.astype(dtype))
    np.save(tmp_path / "t.npy", t.astype(np.float32))
    ids = np.random.default_rng(2).integers(0, 1031, 211)
    np.save(tmp_path / "ids.npy", ids)
    r, _ = both(tmp_path / "b.npy", tmp_path / "t.npy", tokens=tmp_path / "ids.npy", chunk_size=50)
    assert r["kl"]["mean"] > 0.05 and "perplexity" in r and len(r["chunks"]) == 5


def test_masked_entries_and_infinite_kl(tmp_path):
    b, t = pair(64, 517, 3)
    b[0, ::3] = -np.inf  # base masks entries
    t[1, 1::5] = -np.inf  # test masks entries the base does not: KL(base || test) = +inf
    b[2, 1:] = -np.inf  # one entry left on both sides
    t[2, 1:] = -np.inf
    b[3, :] = np.where(np.arange(517) % 50, -np.inf, b[3, :])
    np.save(tmp_path / "b.npy", b.astype(np.float32))
    np.save(tmp_path / "t.npy", t.astype(np.float32))
    r, v = both(tmp_path / "b.npy", tmp_path / "t.npy")
    assert v["kl"][1] == np.inf and v["kl"][2] == 0.0 and r["kl"]["max"] == np.inf


def test_large_vocabulary_and_log_probs(tmp_path):
    b, t = pair(6, 152064, 4)
    np.save(tmp_path / "b.npy", b.astype(np.float32))
    # log-probs instead of logits: normalized again, the same values
    lt = t - t.max(1, keepdims=True)
    lt -= np.log(np.exp(lt).sum(1, keepdims=True))
    np.save(tmp_path / "t.npy", lt.astype(np.float32))
    both(tmp_path / "b.npy", tmp_path / "t.npy", tokens=np.arange(6) * 1000)


def write_bf16_safetensors(path, x):
    bits = (np.ascontiguousarray(x, dtype=np.float32).view(np.uint32) >> 16).astype("<u2")
    header = json.dumps(
        {"logits": {"dtype": "BF16", "shape": list(x.shape), "data_offsets": [0, bits.nbytes]}}
    ).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(header)))
        f.write(header)
        f.write(bits.tobytes())


def test_bfloat16_and_big_endian(tmp_path):
    b, t = pair(40, 300, 5)
    write_bf16_safetensors(tmp_path / "b.safetensors", b)
    np.save(tmp_path / "t.npy", t.astype(">f4"))  # big-endian: converted per block
    r, _ = both(tmp_path / "b.safetensors", tmp_path / "t.npy")
    assert r["base_dtype"] == "bfloat16"


def test_llamacpp_files(tmp_path):
    base, test, tokens = make_models(n_chunk=3, n_ctx=40, v=301, seed=7)
    write_llamacpp(tmp_path / "base.kld", base, tokens)
    write_llamacpp(tmp_path / "test.kld", test, tokens)
    np.save(tmp_path / "t.npy", scored(test, 40))
    np.save(tmp_path / "b.npy", scored(base, 40))
    r, v = both(tmp_path / "base.kld", tmp_path / "t.npy")  # a floored log-prob base
    assert "perplexity" in r and r["base_format"] == "llama.cpp"
    both(tmp_path / "b.npy", tmp_path / "test.kld")  # a llama.cpp test: normalized
    both(tmp_path / "base.kld", tmp_path / "test.kld")


def test_threads_and_blocks_change_nothing(tmp_path):
    b, t = pair(97, 700, 8)
    np.save(tmp_path / "b.npy", b.astype(np.float32))
    np.save(tmp_path / "t.npy", t.astype(np.float32))
    want = compare_files(tmp_path / "b.npy", tmp_path / "t.npy", threads=1, block_rows=97)
    for threads, rows in ((2, 5), (3, 1)):
        got = compare_files(
            tmp_path / "b.npy", tmp_path / "t.npy", threads=threads, block_rows=rows
        )
        assert got == dict(want, block_rows=rows)


def test_falls_back_to_numpy_without_the_kernel(tmp_path, monkeypatch):
    b, t = pair(20, 64, 9)
    np.save(tmp_path / "b.npy", b.astype(np.float32))
    np.save(tmp_path / "t.npy", t.astype(np.float32))
    want = compare_files(tmp_path / "b.npy", tmp_path / "t.npy", engine="numpy")
    monkeypatch.setattr(compare_mod, "_core_kernel", lambda: None)
    assert compare_files(tmp_path / "b.npy", tmp_path / "t.npy") == want
    with pytest.raises(CompareError, match="engine 'core': divkit's compiled extension"):
        compare_files(tmp_path / "b.npy", tmp_path / "t.npy", engine="core")


def test_engine_and_row_errors(tmp_path):
    b, t = pair(30, 64, 10)
    b[17, 5] = np.nan
    np.save(tmp_path / "b.npy", b.astype(np.float32))
    np.save(tmp_path / "t.npy", t.astype(np.float32))
    with pytest.raises(CompareError, match="engine must be 'core' or 'numpy'"):
        compare_files(tmp_path / "b.npy", tmp_path / "t.npy", engine="torch")
    msgs = []
    for engine in ("core", "numpy"):
        with pytest.raises(CompareError, match=r"b\.npy: base row 17 holds NaN") as e:
            compare_files(tmp_path / "b.npy", tmp_path / "t.npy", engine=engine, block_rows=8)
        msgs.append(str(e.value))
    assert msgs[0] == msgs[1]
    b[17, 5] = 0.0
    t[3, :] = -np.inf
    np.save(tmp_path / "b.npy", b.astype(np.float32))
    np.save(tmp_path / "t.npy", t.astype(np.float32))
    with pytest.raises(CompareError, match=r"t\.npy: test row 3 holds no finite value"):
        compare_files(tmp_path / "b.npy", tmp_path / "t.npy", engine="core")


def outs(n, tokens=False):
    names = ["kl", "js", "tvd", "delta_p", "top1"]
    names += ["nll", "nll_base", "delta_p_next"] if tokens else []
    return {k: np.zeros(n) for k in names}


def test_binding_errors():
    b = np.zeros((4, 10), np.float32)
    with pytest.raises(divkit._C.Error, match="compare_rows: test has shape"):
        _C.compare_rows(b, np.zeros((4, 11), np.float32), None, **outs(4))
    with pytest.raises(ValueError, match=r"compare_rows: tokens\[2\] = 10 is out of range"):
        _C.compare_rows(b, b, np.array([0, 1, 10, 2]), **outs(4, True))
    with pytest.raises(ValueError, match="compare_rows: nll is required"):
        _C.compare_rows(b, b, np.arange(4), **outs(4))
    with pytest.raises(ValueError, match="compare_rows: kl must have shape \\[4\\]"):
        _C.compare_rows(b, b, None, **dict(outs(4), kl=np.zeros(3)))
    with pytest.raises(ValueError, match="compare_rows: js must be float64"):
        _C.compare_rows(b, b, None, **dict(outs(4), js=np.zeros(4, np.float32)))
    with pytest.raises(ValueError, match="base_format must be 'float', 'bfloat16' or 'llama.cpp'"):
        _C.compare_rows(b, b, None, base_format="fp8", **outs(4))
    with pytest.raises(ValueError, match="base must be a uint16 array with base_format 'bfloat16'"):
        _C.compare_rows(b, b, None, base_format="bfloat16", **outs(4))
    q = np.zeros((4, 10), np.uint16)
    with pytest.raises(ValueError, match="test has unsupported dtype uint16"):
        _C.compare_rows(b, q, None, **outs(4))
    with pytest.raises(ValueError, match="rows of 10 uint16, expected 14 for a llama.cpp file"):
        _C.compare_rows(q, b, None, base_format="llama.cpp", vocab=10, **outs(4))
    with pytest.raises(ValueError, match="compare_rows: base row 1 holds NaN or \\+inf"):
        _C.compare_rows(np.array([[0.0, 1.0], [np.inf, 0.0]]), np.zeros((2, 2)), None, **outs(2))


def test_cli_engine_flag(tmp_path, capsys):
    from divkit.cli import main

    b, t = pair(25, 80, 11)
    np.save(tmp_path / "b.npy", b.astype(np.float32))
    np.save(tmp_path / "t.npy", t.astype(np.float32))
    got = []
    for engine in ("core", "numpy"):
        args = ["compare", str(tmp_path / "b.npy"), str(tmp_path / "t.npy"), "--json"]
        assert main(args + ["--no-progress", "--engine", engine]) == 0
        got.append(json.loads(capsys.readouterr().out))
        got[-1].pop("block_rows")
    close(got[0], got[1])
    with pytest.raises(SystemExit):
        main(["compare", "a", "b", "--engine", "torch"])


def write_st(path, header_bytes, data=b""):
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(header_bytes)))
        f.write(header_bytes)
        f.write(data)


def test_safetensors_hostile_headers(tmp_path):
    good = tmp_path / "g.npy"
    np.save(good, np.zeros((4, 8), np.float32))
    nested = b'{"x": ' + b"[" * 100000 + b"]" * 100000 + b"}"
    write_st(tmp_path / "deep.safetensors", nested)
    with pytest.raises(CompareError, match="JSON nested too deeply"):
        compare_files(good, tmp_path / "deep.safetensors")
    huge = {"x": {"dtype": "F32", "shape": [2**40, 2**40], "data_offsets": [0, 16]}}
    write_st(tmp_path / "huge.safetensors", json.dumps(huge).encode(), bytes(16))
    with pytest.raises(CompareError, match=r"shape \[1099511627776, 1099511627776\] of F32 needs"):
        compare_files(good, tmp_path / "huge.safetensors")
    bad = {"x": {"dtype": "F32", "shape": [4, 8.5], "data_offsets": [0, 128]}}
    write_st(tmp_path / "float.safetensors", json.dumps(bad).encode(), bytes(128))
    with pytest.raises(CompareError, match="is not a list of integers"):
        compare_files(good, tmp_path / "float.safetensors")
    bad = {"x": {"dtype": ["F32"], "shape": [4, 8], "data_offsets": [0, 128]}}
    write_st(tmp_path / "dt.safetensors", json.dumps(bad).encode(), bytes(128))
    with pytest.raises(CompareError, match="has dtype"):
        compare_files(good, tmp_path / "dt.safetensors")
