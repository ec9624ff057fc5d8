"""divkit demo (python/divkit/demo.py): a tiny configuration end to end, the report's files and
numbers, the evaluation helpers against divkit's own kernels, and the CLI."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch

import divkit
from divkit import demo
from divkit.cli import main as cli_main


@pytest.fixture(scope="module")
def tiny_report(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    lines = []
    report = demo.run_demo(demo.DemoConfig.tiny(progress=False), str(out), log=lines.append)
    return out, report, lines


def test_report_files_written_and_consistent(tiny_report):
    out, report, lines = tiny_report
    for name in ("report.json", "report.md", "curves.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    with open(out / "report.json") as f:
        on_disk = json.load(f)
    assert on_disk == json.loads(json.dumps(report))  # what run_demo returns is what it wrote
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    import matplotlib.image

    img = matplotlib.image.imread(str(out / "curves.png"))
    assert img.ndim == 3 and img.shape[0] > 300 and img.shape[1] > 300
    assert img[..., :3].std() > 0.05  # not a blank canvas
    # the output folder is named at the end
    assert str(out) in lines[-1]


def test_distillation_numbers(tiny_report):
    _, report, _ = tiny_report
    d = report["distillation"]
    cfg = report["config"]
    kinds = [r["kind"] for r in d["runs"]]
    assert kinds == ["forward_kl", "reverse_kl", "jsd", "skew_forward_kl", "tvd"]
    untrained = d["untrained"]
    assert untrained["kl_teacher_student"] > 0 and untrained["kl_student_teacher"] > 0
    floor = d["data"]["source_perplexity"]
    assert 1.0 < floor < demo.VOCAB
    for r in [d["baseline"]] + d["runs"]:
        for key in ("perplexity", "kl_teacher_student", "kl_student_teacher", "train_loss"):
            assert math.isfinite(r[key]), (r["kind"], key)
        assert r["kl_teacher_student"] >= 0 and r["kl_student_teacher"] >= 0
        # training moved the student towards the teacher and the data
        assert r["kl_teacher_student"] < untrained["kl_teacher_student"], r["kind"]
        assert r["perplexity"] < untrained["perplexity"], r["kind"]
        assert r["perplexity"] > floor * 0.9  # nothing beats the source by much on held-out data
        curve = r["curve"]
        assert [c["epoch"] for c in curve] == list(range(cfg["student_epochs"] + 1))
        assert curve[0]["kl_teacher_student"] == untrained["kl_teacher_student"]
        assert curve[-1]["kl_teacher_student"] == pytest.approx(r["kl_teacher_student"])
    for r in d["runs"]:
        # matching the teacher's distribution beats the hard labels at matching the teacher
        assert r["kl_teacher_student"] < d["baseline"]["kl_teacher_student"], r["kind"]
    assert d["teacher"]["perplexity"] < untrained["perplexity"]


def test_alignment_numbers(tiny_report):
    _, report, _ = tiny_report
    a = report["alignment"]
    d = report["distillation"]
    assert a["reference"] == min(d["runs"], key=lambda r: r["kl_teacher_student"])["kind"]
    assert [r["method"] for r in a["runs"]] == list(demo.METHODS)
    assert 0.0 <= a["reference_reward"] <= 1.0 and a["pairs"] > 0
    for r in a["runs"]:
        curve = r["curve"]
        assert curve[0]["sequence_kl"] == 0.0 and curve[0]["reward"] == a["reference_reward"]
        assert curve[0]["preference_accuracy"] == 0.5
        assert curve[-1]["step"] == report["config"]["align_steps"]
        assert 0.0 <= r["reward"] <= 1.0
        # the policy moved away from the reference, towards the known reward
        assert r["sequence_kl"] > 0
        assert r["reward"] > a["reference_reward"], r["method"]
        assert r["preference_accuracy"] > 0.5, r["method"]
        assert (
            min(c["reward"] for c in curve)
            <= r["reward_at_matched_kl"]
            <= max(c["reward"] for c in curve)
        )
    assert a["matched_kl"] == min(r["sequence_kl"] for r in a["runs"])


def test_markdown_holds_the_numbers(tiny_report):
    out, report, _ = tiny_report
    md = (out / "report.md").read_text()
    for r in report["distillation"]["runs"]:
        assert f"| {r['kind']} |" in md
        assert f"{r['kl_teacher_student']:.4f}" in md and f"{r['perplexity']:.3f}" in md
    for r in report["alignment"]["runs"]:
        assert f"| {r['label']} | {r['reward']:.3f} | {r['sequence_kl']:.3f} |" in md
    assert "![curves](curves.png)" in md


def test_sequence_kl_matches_divkit_exact_kl():
    torch.manual_seed(0)
    policy, ref = demo.TinyLM(8, 16, 1), demo.TinyLM(8, 16, 1)
    g = torch.Generator().manual_seed(1)
    seq = demo.sample_completions(policy, torch.randint(0, demo.VOCAB, (5, 3), generator=g), 6, g)
    assert seq.shape == (5, 9)
    ctx = demo.completion_contexts(seq)
    assert ctx.shape == (5, 6, 3)
    assert torch.equal(ctx[:, 2], seq[:, 2:5])  # token 3 + 2 is predicted from tokens 2..4
    with torch.no_grad():
        want = divkit.rlhf.exact_kl(policy(ctx), ref(ctx)).double().sum(-1)  # KL(pi || ref)
    got = demo.sequence_kl(policy, ref, seq)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert torch.all(demo.sequence_kl(policy, policy, seq).abs() < 1e-12)


def test_reward_and_interpolation():
    good = demo.good_tokens(0)
    assert good.dtype == torch.bool and int(good.sum()) == demo.VOCAB // 2
    assert torch.equal(good, demo.good_tokens(0))
    ids = torch.nonzero(good)[:, 0]
    bad = torch.nonzero(~good)[:, 0]
    y = torch.stack([ids[:4], bad[:4], torch.cat([ids[:1], bad[:3]])])
    assert demo.reward(y, good).tolist() == [1.0, 0.0, 0.25]
    curve = [
        {"sequence_kl": 0.0, "reward": 0.5},
        {"sequence_kl": 2.0, "reward": 0.9},
        {"sequence_kl": 1.0, "reward": 0.7},
    ]
    assert demo.reward_at_kl(curve, 1.5) == pytest.approx(0.8)
    assert demo.reward_at_kl(curve, 5.0) == 0.9 and demo.reward_at_kl(curve, -1.0) == 0.5


def test_bad_options_are_rejected(capsys):
    assert cli_main(["demo", "--tiny", "--kinds", "forward_kl,bogus"]) == 2
    assert "unknown kind 'bogus'" in capsys.readouterr().err
    assert cli_main(["demo", "--tiny", "--methods", "ppo"]) == 2
    assert "unknown method 'ppo'" in capsys.readouterr().err
    assert cli_main(["demo", "--epochs", "0"]) == 2
    assert "--epochs must be >= 1" in capsys.readouterr().err
    with pytest.raises(ValueError, match="--kinds is empty"):
        demo.parse_kinds(" , ")


def test_cli_runs_and_names_the_folder(tmp_path):
    out = tmp_path / "cli"
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "divkit",
            "demo",
            "--tiny",
            "--no-progress",
            "--kinds",
            "forward_kl,tvd",
            "--methods",
            "dpo",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 0, res.stderr
    assert f"report: {os.path.abspath(out)}/" in res.stdout
    report = json.loads((out / "report.json").read_text())
    assert [r["kind"] for r in report["distillation"]["runs"]] == ["forward_kl", "tvd"]
    assert [r["method"] for r in report["alignment"]["runs"]] == ["dpo"]
    assert (out / "curves.png").is_file() and (out / "report.md").is_file()
