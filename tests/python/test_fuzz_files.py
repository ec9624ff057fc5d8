"""Fuzzing of divkit's file reader (distill.load_document_logprobs, behind
miniplm_difference_sampling(path=...)): arbitrary bytes, truncated or mutated valid files, as
text, .npz and .pt. The reader returns a dict of float64 tensors or raises divkit.Error, never
another exception. (divkit compare's .npy / .safetensors parsers are fuzzed in
test_compare*.py.)"""

from __future__ import annotations

import io
import os

import numpy as np
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import divkit
from divkit import distill as D

SETTINGS = settings(
    max_examples=60,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=list(HealthCheck),
)


def _valid_bytes(ext: str) -> bytes:
    t = np.array([-3.0, -2.5, -7.0])
    r = np.array([-2.0, -2.6, -6.0])
    if ext == ".npz":
        buf = io.BytesIO()
        np.savez(buf, teacher=t, reference=r)
        return buf.getvalue()
    if ext == ".pt":
        buf = io.BytesIO()
        torch.save({"teacher": torch.tensor(t), "reference": torch.tensor(r)}, buf)
        return buf.getvalue()
    return b"# teacher reference length\n-3.0 -2.0 4\n-2.5 -2.6 5\n-7.0 -6.0 9\n"


def _read(tmp_path, ext: str, data: bytes):
    p = tmp_path / f"docs{ext}"
    p.write_bytes(data)
    try:
        out = D.load_document_logprobs(str(p))
    except divkit.Error:
        return None
    assert isinstance(out, dict) and {"teacher", "reference"} <= set(out)
    for v in out.values():
        assert isinstance(v, torch.Tensor) and v.dtype == torch.float64
    return out


@SETTINGS
@given(ext=st.sampled_from([".txt", ".npz", ".pt"]), data=st.binary(max_size=512))
def test_arbitrary_bytes(tmp_path_factory, ext, data):
    _read(tmp_path_factory.mktemp("f"), ext, data)


@SETTINGS
@given(
    ext=st.sampled_from([".txt", ".npz", ".pt"]),
    cut=st.integers(0, 4096),
    flips=st.lists(st.tuples(st.integers(0, 4095), st.integers(0, 255)), max_size=4),
)
def test_truncated_or_mutated_valid_files(tmp_path_factory, ext, cut, flips):
    data = bytearray(_valid_bytes(ext))
    for pos, val in flips:
        if data:
            data[pos % len(data)] = val
    _read(tmp_path_factory.mktemp("f"), ext, bytes(data[: cut % (len(data) + 1)]))


def test_valid_files_read(tmp_path):
    for ext in (".txt", ".npz", ".pt"):
        out = _read(tmp_path, ext, _valid_bytes(ext))
        assert out is not None
        assert out["teacher"].tolist() == [-3.0, -2.5, -7.0]


def test_fifo_and_folder_are_refused(tmp_path):
    fifo = tmp_path / "docs.txt"
    os.mkfifo(fifo)  # reading it would block forever
    try:
        D.load_document_logprobs(str(fifo))
        raise AssertionError("a FIFO was accepted")
    except divkit.Error as e:
        assert "not a regular file" in str(e) and str(e).startswith("load_document_logprobs:")
    try:
        D.miniplm_difference_sampling(path=str(tmp_path))
        raise AssertionError("a folder was accepted")
    except divkit.Error as e:
        assert "not a regular file" in str(e)
