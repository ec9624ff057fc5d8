"""Losses kept alive until the interpreter exits: their autograd graphs must not hold
nanobind instances past the extension's teardown (nanobind then prints "leaked instance"
warnings, which users read as a memory bug)."""

import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent(
    """
    import torch
    import divkit

    keep = []
    r = lambda: torch.randn(4)
    pc = torch.randn(4, requires_grad=True)
    keep.append(divkit.preference_loss(pc, r(), r(), r(), loss_type=["sigmoid", "ipo"])[0])
    keep.append(divkit.kto_loss(pc, r(), r(), r(), r(), r())[0])
    keep.append(divkit.cpo_loss(-pc.abs() - 0.1, -r().abs() - 0.1, loss_type="simpo")[0])
    s = torch.randn(6, 11, requires_grad=True)
    keep.append(divkit.divergence(s, torch.randn(6, 11)))
    h = torch.randn(6, 8, requires_grad=True)
    w = torch.randn(11, 8, requires_grad=True)
    keep.append(divkit.fused_linear_cross_entropy(h, w, torch.randint(0, 11, (6,))))
    keep.append(divkit.fused_linear_divergence(h, w, torch.randn(6, 8), torch.randn(11, 8)))
    print("kept", len(keep))
    """
)


def test_losses_alive_at_exit_leak_nothing():
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr
    assert "kept 6" in proc.stdout
    assert "leaked" not in proc.stderr, proc.stderr
