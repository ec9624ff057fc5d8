"""The divkit command's error policy: every bad argument or file gives one line on stderr and
exit code 2 before any work starts; reports are written atomically and never overwritten
without --force; FIFOs and devices are refused."""

from __future__ import annotations

import os

import pytest

pytest.importorskip("matplotlib")

from divkit.cli import main as cli_main  # noqa: E402
from divkit.tools import demo  # noqa: E402


@pytest.fixture
def no_run(monkeypatch):
    """run_demo replaced by a recorder: the checks must happen before it."""
    calls = []
    monkeypatch.setattr(demo, "run_demo", lambda cfg, out: calls.append(out))
    return calls


def _one_line_error(capsys, *words):
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err, err
    assert err.startswith("divkit demo: "), err
    for w in words:
        assert w in err, (w, err)


@pytest.mark.parametrize(
    "argv, words",
    [
        (["--methods", ","], ["--methods is empty"]),
        (["--methods", " , ,"], ["--methods is empty"]),
        (["--threads", "-1"], ["--threads"]),
        (["--threads", "100000"], ["--threads"]),
        (["--temperature", "nan"], ["--temperature"]),
        (["--temperature", "inf"], ["--temperature"]),
        (["--temperature", "0"], ["--temperature"]),
        (["--temperature", "-2"], ["--temperature"]),
        (["--seed", "-1"], ["--seed"]),
        (["--kinds", ","], ["--kinds is empty"]),
        (["--align-steps", "0"], ["--align-steps"]),
    ],
)
def test_bad_arguments_exit_2_before_any_work(argv, words, tmp_path, capsys, no_run):
    out = tmp_path / "out"
    assert cli_main(["demo", "--tiny", "--out", str(out), *argv]) == 2
    _one_line_error(capsys, *words)
    assert no_run == [] and not out.exists()


def test_bad_out_paths(tmp_path, capsys, no_run):
    f = tmp_path / "file"
    f.write_text("x")
    for bad, word in (
        (str(f), "not a folder"),  # an existing file
        (str(f / "sub"), "cannot be created"),  # under a file
        ("/dev/null", "not a folder"),  # a device
        ("", "non-empty"),
    ):
        assert cli_main(["demo", "--tiny", "--out", bad]) == 2
        _one_line_error(capsys, word)
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        if not os.access(ro, os.W_OK):  # root can write anywhere
            assert cli_main(["demo", "--tiny", "--out", str(ro)]) == 2
            _one_line_error(capsys, "not writable")
    finally:
        ro.chmod(0o700)
    assert no_run == []


def test_existing_report_is_not_overwritten(tmp_path, capsys, no_run):
    out = tmp_path / "out"
    out.mkdir()
    (out / "report.md").write_text("previous report")
    assert cli_main(["demo", "--tiny", "--out", str(out)]) == 0
    assert no_run == [str(out / "run-2")]
    assert "run-2" in capsys.readouterr().err
    (out / "run-2").mkdir(exist_ok=True)
    (out / "run-2" / "report.json").write_text("{}")
    assert demo.check_out_dir(str(out)) == str(out / "run-3")
    # --force writes into the folder itself.
    assert cli_main(["demo", "--tiny", "--force", "--out", str(out)]) == 0
    assert no_run[-1] == str(out)
    assert (out / "report.md").read_text() == "previous report"  # the recorder wrote nothing


def test_fifo_report_is_refused(tmp_path, capsys, no_run):
    out = tmp_path / "out"
    out.mkdir()
    os.mkfifo(out / "report.md")
    for extra in ([], ["--force"]):
        assert cli_main(["demo", "--tiny", "--out", str(out), *extra]) == 2
        _one_line_error(capsys, "not a regular file")
    assert no_run == []


def test_writes_are_atomic(tmp_path):
    target = tmp_path / "report.md"
    target.write_text("previous report")

    def failing(path):
        with open(path, "w") as f:
            f.write("half a rep")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        demo._write_atomic(str(target), failing)
    assert target.read_text() == "previous report"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.md"]  # no temporary left
    demo._write_atomic(str(target), lambda p: demo._write_text(p, "new report"))
    assert target.read_text() == "new report"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.md"]


def test_bench_bad_bench_dir(tmp_path, capsys):
    f = tmp_path / "file"
    f.write_text("x")
    for bad in (str(tmp_path / "missing"), str(f)):
        assert cli_main(["bench", "--op", "divergence", "--bench-dir", bad]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("divkit bench: error:") and "\n" not in err, err
