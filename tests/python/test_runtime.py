"""Threads (bit-identical results), SIMD targets, version and the command line tool."""

from __future__ import annotations

import importlib.metadata
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import divkit
import divkit_reference as ref
from conftest import CASES, case_id, logits, max_err


def loss_and_grads_bytes(s, t, kind, **kw):
    loss, gs, gt = divkit.divergence_and_grad(s, t, kind, grad_teacher=True, **kw)
    return [x.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes() for x in (loss, gs, gt)]


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_thread_count_does_not_change_a_bit(case):
    kind, params = case
    s = logits(67, 501, scale=3.0, seed=600)
    t = logits(67, 501, scale=3.0, seed=601)
    labels = torch.arange(67) % 5 - 1
    labels[labels == -1] = -100
    kw = dict(labels=labels, temperature=1.3, **params)
    results = []
    for n in (1, 2, 3):
        divkit.set_num_threads(n)
        assert divkit.get_num_threads() == n
        results.append(loss_and_grads_bytes(s, t, kind, **kw))
        results.append(loss_and_grads_bytes(s, t, kind, reduction="none", **kw))
    assert results[0] == results[2] == results[4]
    assert results[1] == results[3] == results[5]


def test_thread_count_bf16_and_autograd():
    s = logits(40, 1000, seed=602, dtype=torch.bfloat16)
    t = logits(40, 1000, seed=603, dtype=torch.float16)
    out = []
    for n in (1, 2):
        divkit.set_num_threads(n)
        sl = s.clone().requires_grad_(True)
        loss = divkit.divergence(sl, t, "jsd")
        loss.backward()
        out.append((loss.detach(), sl.grad))
    assert torch.equal(out[0][0], out[1][0])
    assert torch.equal(out[0][1].view(torch.int16), out[1][1].view(torch.int16))


def test_simd_targets():
    targets = divkit.available_simd_targets()
    assert targets and all(isinstance(x, str) for x in targets)
    default = divkit.active_simd_target()
    assert default == targets[0]
    s, t = logits(5, 333, seed=604), logits(5, 333, seed=605)
    want = ref.loss_and_grads(s, t, "jsd")
    for name in targets:
        divkit.force_simd_target(name)
        assert divkit.active_simd_target() == name
        loss, gs, _ = divkit.divergence_and_grad(s, t, "jsd")
        assert loss.item() == pytest.approx(want[0].item(), rel=1e-5)
        assert max_err(gs, want[1]) <= 1e-5 * want[1].abs().max().item()
    divkit.force_simd_target("")
    assert divkit.active_simd_target() == default


def test_version():
    v = divkit.version()
    assert v == divkit.__version__ == divkit._C.version()
    assert v == importlib.metadata.version("divkit")
    assert all(part.isdigit() for part in v.split("."))


def test_exports():
    for name in ("divergence", "nn", "set_num_threads", "get_num_threads", "KINDS", "version"):
        assert hasattr(divkit, name)
    assert divkit.KINDS == tuple(divkit._C.kinds())
    assert "forward_kl" in divkit.KINDS and len(divkit.KINDS) == 12
    assert divkit.REDUCTIONS == ("none", "sum", "mean", "batchmean")


def test_cli_info(capsys):
    from divkit.cli import main

    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert divkit.version() in out and "threads:" in out
    assert divkit.available_simd_targets()[0] in out
    assert main(["info", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["version"] == divkit.version()
    assert info["threads"] == divkit.get_num_threads()
    assert info["simd_targets"] == divkit.available_simd_targets()
    assert main([]) == 2


def test_cli_entry_points():
    out = subprocess.run(
        [sys.executable, "-m", "divkit", "info", "--json"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    assert json.loads(out)["version"] == divkit.version()
    script = Path(sys.executable).parent / "divkit"
    if script.exists():  # the console script, where pip put it beside the interpreter
        out = subprocess.run(
            [str(script), "info"], check=True, capture_output=True, text=True
        ).stdout
        assert out.startswith(f"divkit {divkit.version()}")
