"""Thread-count bounds and fork safety of divkit's kernels.

A child made by os.fork after the parent ran OpenMP threads must not hang in its next kernel
(libgomp cannot restart its pool there): divkit runs it on one thread, with the same result.
Each scenario runs in a fresh interpreter under a timeout, so a hang fails instead of blocking.
"""

import subprocess
import sys
import textwrap

import pytest

import divkit

TIMEOUT_S = 120


def run_script(body: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(body)],
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
    )


@pytest.mark.parametrize("bad", [0, -1, 2**31 - 1, 2**31, 2**63, 2**100, -(2**100)])
def test_set_num_threads_rejects_out_of_range(bad):
    before = divkit.get_num_threads()
    with pytest.raises(divkit.Error, match=r"^set_num_threads: n must be in \[1, "):
        divkit.set_num_threads(bad)
    assert divkit.get_num_threads() == before


def test_set_num_threads_accepts_up_to_the_bound():
    from divkit import _C

    before = divkit.get_num_threads()
    hi = _C.max_num_threads()
    assert hi >= 8
    try:
        divkit.set_num_threads(hi)
        assert divkit.get_num_threads() == hi
        with pytest.raises(divkit.Error):
            divkit.set_num_threads(hi + 1)
    finally:
        divkit.set_num_threads(before)


FORK_SCRIPT = """
import os, sys, torch, divkit
from divkit import _C

torch.set_num_threads(1)  # only divkit's threads are under test (torch has the same limitation)

torch.manual_seed(0)
s = torch.randn(64, 4096)
t = torch.randn(64, 4096)
{setup}
pid = os.fork()
if pid == 0:
    code = 0
    try:
        if _C.forked_single_threaded() != {expect_single}:
            code = 10
        elif divkit.divergence(s, t).item() != parent:
            code = 11
        elif {expect_single}:
            try:
                divkit.set_num_threads(2)
                code = 12
            except divkit.Error as e:
                if "forked" not in str(e):
                    code = 13
            if divkit.get_num_threads() != 1:
                code = 14
    except BaseException:
        code = 20
    os._exit(code)
_, status = os.waitpid(pid, 0)
print("child exit", os.waitstatus_to_exitcode(status))
sys.exit(os.waitstatus_to_exitcode(status))
"""


def test_fork_child_after_threads_runs_single_threaded():
    # The parent runs a two-thread region (64 x 4096 entries is above the kernels' serial size).
    setup = "divkit.set_num_threads(2)\nparent = divkit.divergence(s, t).item()"
    r = run_script(FORK_SCRIPT.format(setup=setup, expect_single=True))
    assert r.returncode == 0, r.stdout + r.stderr


def test_fork_child_of_a_single_threaded_parent_keeps_its_setting():
    setup = (
        "divkit.set_num_threads(1)\nparent = divkit.divergence(s, t).item()\n"
        "divkit.set_num_threads(2)"
    )
    r = run_script(FORK_SCRIPT.format(setup=setup, expect_single=False))
    assert r.returncode == 0, r.stdout + r.stderr


def test_multiprocessing_fork_workers_do_not_hang():
    script = """
    import multiprocessing as mp, torch, divkit

    def work(seed):
        g = torch.Generator().manual_seed(seed)
        s, t = torch.randn(64, 4096, generator=g), torch.randn(64, 4096, generator=g)
        return divkit.divergence(s, t).item()

    if __name__ == "__main__":
        torch.set_num_threads(1)
        divkit.set_num_threads(2)
        want = [work(i) for i in range(3)]
        with mp.get_context("fork").Pool(2) as pool:
            got = pool.map(work, range(3))
        assert got == want, (got, want)
        print("ok")
    """
    r = run_script(script)
    assert r.returncode == 0 and "ok" in r.stdout, r.stdout + r.stderr
