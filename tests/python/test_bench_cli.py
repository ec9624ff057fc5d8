"""``divkit bench``: a real quick run of one cheap benchmark (its table and its check against
TRL), the mismatch and failure paths through stand-in scripts, the parsers on each script's
output format, and the error when the bench/ folder is absent."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest

from divkit import bench_cli
from divkit.bench_cli import TABLES, BenchError, check_output, find_bench_dir, run_bench
from divkit.cli import main

REPO_BENCH = Path(__file__).resolve().parents[2] / "bench"


def test_quick_divergence_runs_checks_and_prints_table(capsys):
    """The real bench_divergence.py, cut down to one cheap case (divkit and TRL's eager loss,
    forward KL, fp32, small N and V)."""
    rc = main(
        [
            "bench",
            "--op",
            "divergence",
            "--quick",
            "--bench-dir",
            str(REPO_BENCH),
            "--",
            "--kinds",
            "forward_kl",
            "--dtypes",
            "fp32",
            "--variants",
            "divkit",
            "eager",
            "--n",
            "64",
            "--vocab",
            "4096",
            "--reps",
            "1",
            "--triad-gib",
            "0.1",
        ]
    )
    cap = capsys.readouterr()
    assert rc == 0, cap.out + cap.err
    out = cap.out
    assert out.startswith("## divergence")
    assert "| kind | V | dtype | divkit |" in out
    row = next(line for line in out.splitlines() if line.startswith("| forward_kl | 4096 | fp32 |"))
    assert float(row.split("|")[4].strip().rstrip("*").replace(",", "")) > 0  # divkit's ms
    assert "checked: 1 value(s) against the reference" in out
    assert "[divkit bench] divergence:" in cap.err  # the progress, echoed on stderr


def fake_bench(tmp_path, body: str) -> Path:
    """A bench/ folder whose bench_divergence.py is ``body``."""
    d = tmp_path / "bench"
    d.mkdir()
    (d / "bench_divergence.py").write_text(textwrap.dedent(body))
    return d


DIVERGENCE_STANDIN = """
    import json, sys
    args = sys.argv[1:]
    res = {"results": [{"kind": "jsd", "v": 100, "dtype": "fp32", "variants": {
        "divkit": {"loss": 0.5}, "eager": {"loss": %r}}}]}
    json.dump(res, open(args[args.index("--json") + 1], "w"))
    open(args[args.index("--markdown") + 1], "w").write("| kind | loss |\\n|---|---|\\n| jsd | x |\\n")
    print("progress line")
    sys.exit(%d)
"""


def test_mismatch_fails(tmp_path, capsys):
    d = fake_bench(tmp_path, DIVERGENCE_STANDIN % (0.51, 0))
    assert main(["bench", "--op", "divergence", "--bench-dir", str(d), "--quiet"]) == 1
    out = capsys.readouterr().out
    assert (
        "MISMATCH (1 problem(s); 1 value(s) compared)" in out
        and "jsd V=100 fp32 eager loss: 0.51" in out
    )
    assert "| jsd | x |" in out  # the tables are printed all the same


def test_agreement_passes_and_failed_script_fails(tmp_path, capsys):
    d = fake_bench(tmp_path, DIVERGENCE_STANDIN % (0.5 * (1 + 5e-5), 0))
    assert main(["bench", "--op", "divergence", "--bench-dir", str(d), "--quiet"]) == 0
    assert "checked: 1 value(s)" in capsys.readouterr().out
    (d / "bench_divergence.py").write_text(textwrap.dedent(DIVERGENCE_STANDIN % (0.5, 3)))
    assert main(["bench", "--op", "divergence", "--bench-dir", str(d), "--quiet"]) == 1
    assert "FAILED: bench/bench_divergence.py exited with code 3" in capsys.readouterr().out


def test_op_selection(monkeypatch):
    """Without --op: the kernel benchmarks, not the trainers' (which train Hugging Face models);
    --op names exactly what runs, trainers included. Only the selection is checked (the scripts
    do not run)."""
    calls = []

    def fake_run_bench(ops, **kw):
        calls.append(list(ops))
        return 0

    monkeypatch.setattr(bench_cli, "run_bench", fake_run_bench)
    kernels = ["divergence", "fused_linear", "preference", "ot"]
    assert bench_cli.DEFAULT_OPS == kernels
    assert set(bench_cli.OPS) == set(kernels) | {"trainers"}
    for argv, want in (
        (["bench"], kernels),
        (["bench", "--quick"], kernels),
        (["bench", "--op", "trainers"], ["trainers"]),
        (["bench", "--op", "ot", "--op", "trainers"], ["ot", "trainers"]),
        (["bench", "--op", "divergence", "--", "--kinds", "jsd"], ["divergence"]),
    ):
        assert main(argv) == 0
        assert calls.pop() == want, argv
    with pytest.raises(SystemExit):  # argparse: not a benchmark
        main(["bench", "--op", "nope"])
    assert not calls


def test_missing_bench_folder(tmp_path, capsys, monkeypatch):
    # As installed from a wheel: the module lives in site-packages, no bench/ beside it or in
    # the working directory.
    monkeypatch.setattr(
        bench_cli, "__file__", str(tmp_path / "site-packages" / "divkit" / "bench_cli.py")
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("DIVKIT_BENCH_DIR", raising=False)
    with pytest.raises(BenchError, match="not found: they are part of divkit's source checkout"):
        find_bench_dir()
    assert main(["bench", "--op", "ot", "--quick"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("divkit bench: error: the benchmark scripts") and "--bench-dir" in err
    assert main(["bench", "--bench-dir", str(tmp_path)]) == 2
    assert "not a divkit bench/ folder" in capsys.readouterr().err
    monkeypatch.setenv("DIVKIT_BENCH_DIR", str(REPO_BENCH))
    assert find_bench_dir() == REPO_BENCH
    monkeypatch.chdir(REPO_BENCH.parent)
    monkeypatch.delenv("DIVKIT_BENCH_DIR")
    assert find_bench_dir().resolve() == REPO_BENCH.resolve()  # ./bench of a checkout
    with pytest.raises(BenchError, match="unknown --op 'nope'"):
        run_bench(["nope"])


# ---------------------------------------------------------------------------------------------
# The checks on each script's output format (as the scripts print it)
# ---------------------------------------------------------------------------------------------


def test_check_fused_linear_output():
    out = textwrap.dedent("""\
        Machine: x

        | N | V | dtype | variant | time | vs divkit | peak extra memory | loss rel. diff |
        |---:|---:|---|---|---:|---:|---:|---:|
        | 64 | 2000 | float32 | divkit | 0.07 s | 1.00x | 5 MB | 0.0e+00 |
        | 64 | 2000 | float32 | eager | 0.42 s | 6.16x | 27 MB | 7.6e-08 |
        | 64 | 2000 | float32 | liger | - | - | - | killed (out of memory) |
        | 64 | 2000 | float32 | gemm_floor | 0.00 s | 0.01x | 4 MB | - |
        | 64 | 2000 | bfloat16 | eager | 0.40 s | 10.15x | 24 MB | 2.3e-03 |
        """)
    c = check_output("fused_linear", out)
    assert c.compared == 2 and not c.mismatches and "killed" in c.notes[0]
    c = check_output("fused_linear", out.replace("7.6e-08", "3.0e-04"))
    assert len(c.mismatches) == 1 and "float32 eager" in c.mismatches[0]
    c = check_output("fused_linear", out.replace("| float32 | liger |", "| float32 | divkit |"))
    assert len(c.mismatches) == 1  # divkit itself failed
    assert check_output("fused_linear", "no table").mismatches


def test_check_preference_output():
    out = (
        "AMD EPYC, 2 cpus\n"
        "dpo_divkit              dpo_trl                     0.000    0.008 17.60x          2"
        "        3    1.5x  - (losses 1.433115 vs 1.433115)\n"
        "tdpo_divkit             tdpo_trl                   57.400   59.200  1.03x        417"
        "     4017    9.6x  met (losses 0.671216 vs 0.671217)\n"
    )
    c = check_output("preference", out)
    assert c.compared == 2 and not c.mismatches
    c = check_output("preference", out.replace("0.671216 vs", "0.681216 vs"))
    assert len(c.mismatches) == 1 and c.mismatches[0].startswith("tdpo_divkit loss (vs tdpo_trl)")
    c = check_output("preference", "tdpo_divkit: failed (1): ['boom']\n")
    assert c.mismatches == ["tdpo_divkit: failed (1): ['boom']"]
    table = TABLES["preference"](out).splitlines()
    assert table[0] == "AMD EPYC, 2 cpus" and len(table) == 6
    assert table[-1] == (
        "| tdpo_divkit | tdpo_trl | 57.400 | 59.200 | 1.03x | 417 | 4017 | 9.6x | met | "
        "0.671216 | 0.671217 |"
    )


def test_check_ot_output():
    line = (
        " {s:>10} n=   300 d=  3 time     0.003 s  mem       0.4 MiB  iters    55  L1 err "
        "{e}  cost {c}\n"
    )
    out = (
        line.format(s="divkit-f32", e="8.46e-05", c="1.43895")
        + line.format(s="pot", e="8.19e-04", c="1.43739")
        + line.format(s="geomloss", e="nan", c="3.1")
    )
    c = check_output("ot", out)
    assert c.compared == 1 and not c.mismatches  # 1.1e-3 apart, within 2 x the errors
    c = check_output("ot", out.replace("1.43895", "1.46"))
    assert len(c.mismatches) == 1 and "divkit-f32 transport cost vs pot" in c.mismatches[0]


def test_check_divergence_json(tmp_path):
    res = {
        "results": [
            {
                "kind": "jsd",
                "v": 8,
                "dtype": "bf16",
                "variants": {
                    "divkit": {"loss": 0.2107},
                    "divkit_inplace": {"loss": 0.2107},
                    "eager": {"loss": 0.2070},
                    "compile": {"error": "RuntimeError: x"},
                },
            },
            {"kind": "tvd", "v": 8, "dtype": "fp32", "variants": {"divkit": {"error": "boom"}}},
        ]
    }
    path = tmp_path / "r.json"
    path.write_text(json.dumps(res))
    c = check_output("divergence", "", str(path))
    # bf16 eager within the low-precision tolerance; the failed divkit run is a mismatch, the
    # failed peer a note.
    assert c.compared == 2 and c.mismatches == ["tvd V=8 fp32: divkit failed: boom"]
    assert c.notes == ["jsd V=8 bf16 compile not run: RuntimeError: x"]
