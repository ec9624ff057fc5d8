"""``divkit compare``: per-token statistics against a float64 torch computation, .npy and
.safetensors (written by the real ``safetensors`` package) in fp32/fp16/bf16, blocks, the
command line, and every error path."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys

import numpy as np
import pytest
import torch

from divkit.cli import main
from divkit.compare import (
    PERCENTILES,
    CompareError,
    compare_files,
    format_text,
    open_logits,
    summarize,
)

N, V = 300, 50


def make_pair(n=N, v=V, seed=0):
    """A 'full precision' base and a perturbed 'quantized' test model."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, v, generator=g, dtype=torch.float64) * 2.0
    test = base + 0.3 * torch.randn(n, v, generator=g, dtype=torch.float64)
    return base, test


def reference(base: torch.Tensor, test: torch.Tensor):
    """fp64 per-token values from the logits as stored (after rounding to the file's dtype)."""
    b, t = base.double().reshape(-1, base.shape[-1]), test.double().reshape(-1, test.shape[-1])
    lp, lq = b.log_softmax(-1), t.log_softmax(-1)
    p, q = lp.exp(), lq.exp()
    kl = torch.where(p > 0, p * (lp - lq), torch.zeros_like(p)).sum(-1)
    m = 0.5 * (p + q)
    lm = m.log()
    js = 0.5 * torch.where(p > 0, p * (lp - lm), torch.zeros_like(p)).sum(-1) + 0.5 * torch.where(
        q > 0, q * (lq - lm), torch.zeros_like(q)
    ).sum(-1)
    tvd = 0.5 * (p - q).abs().sum(-1)
    k = b.argmax(-1, keepdim=True)
    dp = (q.gather(-1, k) - p.gather(-1, k)).squeeze(-1)
    top1 = b.argmax(-1) == t.argmax(-1)
    return {
        "kl": kl.numpy(),
        "js": js.numpy(),
        "tvd": tvd.numpy(),
        "delta_p": dp.numpy(),
        "top1": top1.numpy(),
    }


def check_against_reference(result, values, ref):
    for k in ("kl", "js", "tvd", "delta_p"):
        np.testing.assert_allclose(values[k], ref[k], rtol=1e-4, atol=2e-6, err_msg=k)
        want = summarize(ref[k])
        for stat, x in want.items():
            assert result[k][stat] == pytest.approx(x, rel=1e-4, abs=2e-6), (k, stat)
    np.testing.assert_array_equal(values["top1"], ref["top1"])
    assert result["top1_agreement"] == pytest.approx(ref["top1"].mean(), abs=1e-12)
    assert result["delta_p"]["rms"] == pytest.approx(
        float(np.sqrt(np.mean(ref["delta_p"] ** 2))), rel=1e-4, abs=1e-7
    )
    # A perturbed model disagrees somewhere and KL >= JS >= 0 per token (JS <= KL: convexity).
    assert 0 < result["top1_agreement"] < 1
    assert np.all(values["js"] <= values["kl"] + 1e-6) and np.all(values["js"] >= -1e-7)
    assert np.all((values["tvd"] >= 0) & (values["tvd"] <= 1))


def save_st(path, tensors):
    safetensors_torch = pytest.importorskip("safetensors.torch")
    safetensors_torch.save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))


def write_raw_st(path, header, data: bytes = b"", header_len=None):
    raw = json.dumps(header).encode() if not isinstance(header, bytes) else header
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw) if header_len is None else header_len))
        f.write(raw)
        f.write(data)


# ---------------------------------------------------------------------------------------------
# Values
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.float32, np.float16, np.float64])
def test_npy_against_fp64_reference(tmp_path, dtype):
    base, test = make_pair()
    b, t = base.numpy().astype(dtype), test.numpy().astype(dtype)
    np.save(tmp_path / "base.npy", b)
    np.save(tmp_path / "test.npy", t)
    result, values = compare_files(tmp_path / "base.npy", tmp_path / "test.npy", return_values=True)
    assert (result["tokens"], result["vocab"]) == (N, V)
    assert result["base_dtype"] == result["test_dtype"] == np.dtype(dtype).name
    check_against_reference(result, values, reference(torch.from_numpy(b), torch.from_numpy(t)))
    assert isinstance(open_logits(tmp_path / "base.npy").array, np.memmap)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_safetensors_against_fp64_reference(tmp_path, dtype):
    base, test = make_pair(seed=1)
    b, t = base.to(dtype), test.to(dtype)
    save_st(tmp_path / "base.safetensors", {"logits": b})
    save_st(tmp_path / "test.safetensors", {"logits": t})
    result, values = compare_files(
        tmp_path / "base.safetensors", tmp_path / "test.safetensors", return_values=True
    )
    assert result["base_dtype"] == str(dtype).replace("torch.", "")
    assert result["base_tensor"] == "logits"
    check_against_reference(result, values, reference(b, t))


def test_tensor_choice_mixed_formats_and_dtypes(tmp_path):
    """A base fp32 .npy against one tensor of a bf16 .safetensors file holding several."""
    base, test = make_pair(seed=2)
    np.save(tmp_path / "base.npy", base.numpy().astype(np.float32))
    tb = test.to(torch.bfloat16)
    save_st(tmp_path / "test.safetensors", {"logits": tb, "other": torch.zeros(3, 4)})
    result, values = compare_files(
        tmp_path / "base.npy",
        tmp_path / "test.safetensors",
        test_tensor="logits",
        return_values=True,
    )
    assert (result["base_dtype"], result["test_dtype"]) == ("float32", "bfloat16")
    check_against_reference(result, values, reference(base.float(), tb))


def test_blocks_equal_one_block(tmp_path):
    base, test = make_pair(n=203, seed=3)
    np.save(tmp_path / "b.npy", base.numpy().astype(np.float32))
    np.save(tmp_path / "t.npy", test.numpy().astype(np.float32))
    one, v1 = compare_files(
        tmp_path / "b.npy", tmp_path / "t.npy", block_rows=203, return_values=True
    )
    many, v2 = compare_files(
        tmp_path / "b.npy", tmp_path / "t.npy", block_rows=17, return_values=True
    )
    for k in v1:
        np.testing.assert_array_equal(v1[k], v2[k])
    assert (one["block_rows"], many["block_rows"]) == (203, 17)
    one.pop("block_rows"), many.pop("block_rows")
    assert one == many


def test_log_probs_equal_logits_and_masked_entries(tmp_path):
    """log-probs give the logits' statistics (softmax is shift-invariant); -inf entries are
    masked tokens with probability 0."""
    base, test = make_pair(n=64, seed=4)
    base[:, :5] = -float("inf")  # masked in the base model only: KL stays finite
    np.save(tmp_path / "b.npy", base.numpy())
    np.save(tmp_path / "t.npy", test.numpy())
    np.save(tmp_path / "blp.npy", base.log_softmax(-1).numpy())
    np.save(tmp_path / "tlp.npy", test.log_softmax(-1).numpy())
    r1, v1 = compare_files(tmp_path / "b.npy", tmp_path / "t.npy", return_values=True)
    r2, v2 = compare_files(tmp_path / "blp.npy", tmp_path / "tlp.npy", return_values=True)
    for k in ("kl", "js", "tvd", "delta_p"):
        np.testing.assert_allclose(v1[k], v2[k], rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(v1["top1"], v2["top1"])
    check_against_reference(r1, v1, reference(base, test))


def test_leading_dims_are_flattened(tmp_path):
    base, test = make_pair(n=60, seed=5)
    np.save(tmp_path / "b.npy", base.numpy().reshape(3, 20, V))
    np.save(tmp_path / "t.npy", test.numpy().reshape(3, 20, V))
    result, values = compare_files(tmp_path / "b.npy", tmp_path / "t.npy", return_values=True)
    assert result["tokens"] == 60
    check_against_reference(result, values, reference(base, test))


def test_identical_files_give_zero(tmp_path):
    base, _ = make_pair(n=40, seed=6)
    np.save(tmp_path / "b.npy", base.numpy().astype(np.float32))
    r = compare_files(tmp_path / "b.npy", tmp_path / "b.npy")
    assert r["top1_agreement"] == 1.0
    for k in ("kl", "js", "tvd", "delta_p"):
        assert abs(r[k]["max"]) < 1e-6 and abs(r[k]["min"]) < 1e-6


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------


def test_cli_json_and_text(tmp_path, capsys):
    base, test = make_pair(seed=7)
    np.save(tmp_path / "b.npy", base.numpy().astype(np.float32))
    np.save(tmp_path / "t.npy", test.numpy().astype(np.float32))
    want = compare_files(tmp_path / "b.npy", tmp_path / "t.npy")
    assert (
        main(
            ["compare", str(tmp_path / "b.npy"), str(tmp_path / "t.npy"), "--json", "--no-progress"]
        )
        == 0
    )
    got = json.loads(capsys.readouterr().out)
    assert got == json.loads(json.dumps(want))
    assert (
        main(["compare", str(tmp_path / "b.npy"), str(tmp_path / "t.npy"), "--block-rows", "64"])
        == 0
    )
    cap = capsys.readouterr()
    assert cap.out.strip() == format_text(want).strip()
    assert f"top-1 agreement: {100 * want['top1_agreement']:.3f}%" in cap.out
    assert f"{want['kl']['mean']:.4g}" in cap.out.split("\nKL ")[1].split("\n")[0]
    assert "divkit compare" in cap.err  # the progress bar, on stderr
    assert [f"p{q:g}" in want["kl"] for q in PERCENTILES] == [True] * len(PERCENTILES)


def test_cli_subprocess_exit_codes(tmp_path):
    base, test = make_pair(n=20, seed=8)
    np.save(tmp_path / "b.npy", base.numpy().astype(np.float32))
    np.save(tmp_path / "t.npy", test.numpy()[:, :10].astype(np.float32))
    cmd = [sys.executable, "-m", "divkit", "compare", str(tmp_path / "b.npy")]
    p = subprocess.run(cmd + [str(tmp_path / "t.npy")], capture_output=True, text=True)
    assert p.returncode == 2
    assert "shape mismatch" in p.stderr and "t.npy" in p.stderr and p.stdout == ""
    p = subprocess.run(cmd + [str(tmp_path / "b.npy"), "--json"], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["top1_agreement"] == 1.0


# ---------------------------------------------------------------------------------------------
# Errors: CompareError from the function, exit code 2 and the message from the command
# ---------------------------------------------------------------------------------------------


def good_npy(tmp_path, name="good.npy", n=8, v=V):
    base, _ = make_pair(n=n, v=v, seed=9)
    np.save(tmp_path / name, base.numpy().astype(np.float32))
    return tmp_path / name


def expect_error(tmp_path, capsys, bad, match, good=None, extra=()):
    good = good or good_npy(tmp_path)
    with pytest.raises(CompareError, match=match) as ei:
        compare_files(good, bad, **dict(extra))
    assert isinstance(ei.value, ValueError)
    argv = ["compare", str(good), str(bad), "--no-progress"]
    for k, v in dict(extra).items():
        argv += [f"--{k.replace('test_', '').replace('_', '-')}", str(v)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("divkit compare: error: ") and str(bad).split("/")[-1] in err
    return err


def test_error_missing_and_directory(tmp_path, capsys):
    expect_error(tmp_path, capsys, tmp_path / "nope.npy", "no such file")
    (tmp_path / "d.npy").mkdir()
    expect_error(tmp_path, capsys, tmp_path / "d.npy", "is a directory")


def test_error_fifo_refused_without_blocking(tmp_path, capsys):
    # Opening a FIFO with no writer blocks forever: it must be refused before any open().
    fifo = tmp_path / "pipe.npy"
    os.mkfifo(fifo)
    expect_error(tmp_path, capsys, fifo, "not a regular file")
    good = good_npy(tmp_path)
    with pytest.raises(CompareError, match=r"pipe.npy: not a regular file .*\(--tokens\)"):
        compare_files(good, good, tokens=fifo)


def test_error_npy_truncated_and_malformed(tmp_path, capsys):
    raw = good_npy(tmp_path, "full.npy").read_bytes()
    (tmp_path / "trunc.npy").write_bytes(raw[:-100])
    expect_error(tmp_path, capsys, tmp_path / "trunc.npy", "truncated or malformed")
    (tmp_path / "hdr.npy").write_bytes(raw[:8] + b"\x76\x00{'descr': garbage" + b" " * 100)
    expect_error(tmp_path, capsys, tmp_path / "hdr.npy", "not a readable .npy")
    (tmp_path / "nomagic.npy").write_bytes(b"hello world, not numpy")
    expect_error(tmp_path, capsys, tmp_path / "nomagic.npy", "not a .npy file")


def test_error_npy_dtype_and_shape(tmp_path, capsys):
    np.save(tmp_path / "int.npy", np.zeros((8, V), dtype=np.int32))
    expect_error(tmp_path, capsys, tmp_path / "int.npy", "dtype int32 is not supported")
    np.save(tmp_path / "vec.npy", np.zeros(V, dtype=np.float32))
    expect_error(tmp_path, capsys, tmp_path / "vec.npy", r"shape \(50,\); expected \[N, V\]")
    np.save(tmp_path / "empty.npy", np.zeros((0, V), dtype=np.float32))
    expect_error(tmp_path, capsys, tmp_path / "empty.npy", "is empty")
    np.save(tmp_path / "short.npy", np.zeros((7, V), dtype=np.float32))
    err = expect_error(tmp_path, capsys, tmp_path / "short.npy", "shape mismatch")
    assert "[8, 50]" in err and "[7, 50]" in err
    np.save(tmp_path / "narrow.npy", np.zeros((8, V - 1), dtype=np.float32))
    expect_error(tmp_path, capsys, tmp_path / "narrow.npy", "shape mismatch")
    g = good_npy(tmp_path, "g2.npy")
    with pytest.raises(CompareError, match="g2.npy: --tensor 'logits' given, but neither file"):
        compare_files(g, g, tensor="logits")
    assert main(["compare", str(g), str(g), "--tensor", "logits"]) == 2
    assert "neither file is a .safetensors file" in capsys.readouterr().err
    with pytest.raises(CompareError, match="g2.npy: --tensor 'x' given, but a .npy file holds"):
        compare_files(g, g, test_tensor="x")


def test_error_non_finite_names_file_and_row(tmp_path, capsys):
    base, test = make_pair(n=30, seed=10)
    test[17, 3] = float("nan")
    np.save(tmp_path / "nan.npy", test.numpy().astype(np.float32))
    np.save(tmp_path / "b.npy", base.numpy().astype(np.float32))
    err = expect_error(
        tmp_path,
        capsys,
        tmp_path / "nan.npy",
        "row 17 holds NaN or \\+inf",
        good=tmp_path / "b.npy",
        extra={"block_rows": 8},
    )
    assert "test row 17" in err


def test_error_safetensors_structure(tmp_path, capsys):
    d = tmp_path
    (d / "tiny.safetensors").write_bytes(b"\x01\x02")
    expect_error(d, capsys, d / "tiny.safetensors", "8-byte header length is missing")
    write_raw_st(d / "long.safetensors", {"x": 1}, header_len=10_000)
    expect_error(d, capsys, d / "long.safetensors", "truncated .safetensors file .the header")
    write_raw_st(d / "huge.safetensors", b"{}", header_len=1 << 60)
    expect_error(d, capsys, d / "huge.safetensors", "not plausible")
    write_raw_st(d / "notjson.safetensors", b"{not json")
    expect_error(d, capsys, d / "notjson.safetensors", "not JSON")
    write_raw_st(d / "list.safetensors", [1, 2])
    expect_error(d, capsys, d / "list.safetensors", "a JSON object expected")
    write_raw_st(d / "none.safetensors", {"__metadata__": {"a": "b"}})
    expect_error(d, capsys, d / "none.safetensors", "holds no tensor")
    write_raw_st(d / "keys.safetensors", {"x": {"dtype": "F32", "shape": [8, V]}})
    expect_error(d, capsys, d / "keys.safetensors", "needs dtype, shape and data_offsets")


def test_error_safetensors_tensors_and_data(tmp_path, capsys):
    d = tmp_path
    n_bytes = 8 * V * 4
    data = np.zeros((8, V), np.float32).tobytes()
    two = {
        "a": {"dtype": "F32", "shape": [8, V], "data_offsets": [0, n_bytes]},
        "b": {"dtype": "F32", "shape": [8, V], "data_offsets": [n_bytes, 2 * n_bytes]},
    }
    write_raw_st(d / "two.safetensors", two, data + data)
    expect_error(
        d, capsys, d / "two.safetensors", "holds 2 tensors .a, b.; choose one with --tensor"
    )
    expect_error(d, capsys, d / "two.safetensors", "no tensor named 'c'", extra={"tensor": "c"})
    r = compare_files(good_npy(d), d / "two.safetensors", tensor="b")  # .npy base: ignored
    assert r["tokens"] == 8 and r["test_tensor"] == "b" and "base_tensor" not in r
    assert compare_files(good_npy(d), d / "two.safetensors", test_tensor="a") == dict(
        r, test_tensor="a"
    )
    write_raw_st(
        d / "i32.safetensors",
        {"x": {"dtype": "I32", "shape": [8, V], "data_offsets": [0, n_bytes]}},
        data,
    )
    expect_error(d, capsys, d / "i32.safetensors", "dtype I32; expected F32, F16, BF16")
    write_raw_st(
        d / "offs.safetensors",
        {"x": {"dtype": "F32", "shape": [8, V], "data_offsets": [0, n_bytes - 4]}},
        data,
    )
    expect_error(d, capsys, d / "offs.safetensors", "do not hold shape")
    write_raw_st(
        d / "cut.safetensors",
        {"x": {"dtype": "F32", "shape": [8, V], "data_offsets": [0, n_bytes]}},
        data[:-40],
    )
    expect_error(
        d, capsys, d / "cut.safetensors", "truncated .safetensors file .tensor 'x' ends at byte"
    )
    write_raw_st(
        d / "vec.safetensors",
        {"x": {"dtype": "F32", "shape": [8 * V], "data_offsets": [0, n_bytes]}},
        data,
    )
    expect_error(d, capsys, d / "vec.safetensors", "expected \\[N, V\\]")
    write_raw_st(
        d / "f16.safetensors",
        {"x": {"dtype": "F16", "shape": [8, V], "data_offsets": [0, n_bytes // 2]}},
        np.zeros((8, V), np.float16).tobytes(),
    )
    r = compare_files(good_npy(d), d / "f16.safetensors")  # the hand-written file is valid
    assert r["test_dtype"] == "float16"


def test_error_block_rows(tmp_path):
    g = good_npy(tmp_path)
    with pytest.raises(CompareError, match="block_rows must be an int >= 1"):
        compare_files(g, g, block_rows=0)
