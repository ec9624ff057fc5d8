"""The multi-process gloo harness of the distributed tests: ``world`` ranks spawned on this
machine, each in a gloo process group over a free local port, each running a check and writing
"ok" or its traceback to ``rank<r>.txt`` in a directory the test then reads (an exception in a
spawned rank would otherwise reach the test as a bare exit code)."""

from __future__ import annotations

import os
import socket
import sys
import traceback
from typing import Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now (for the group's rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(
    rank: int,
    world: int,
    port: int,
    result_dir: str,
    check: Callable,
    args: tuple,
    destroy: bool,
    hard_exit: bool,
):
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    try:
        check(rank, world, *args)
        msg = "ok"
    except BaseException:
        msg = traceback.format_exc()
    finally:
        with open(os.path.join(result_dir, f"rank{rank}.txt"), "w") as f:
            f.write(msg)
        if destroy:
            dist.destroy_process_group()
    if hard_exit:
        # Leave without interpreter finalization. A gloo worker thread of a process group that
        # DTensor's device mesh still references can drop the last reference to a finished
        # collective's work (which holds tensors) while Python finalizes; taking the GIL then
        # ends the thread inside a noexcept destructor and std::terminate aborts the rank
        # (core dump: c10d::ProcessGroupGloo::AsyncWork::~AsyncWork ->
        # TensorImpl::decref_pyobject -> take_gil -> pthread_exit). That is PyTorch's
        # teardown, not divkit's; the results are in the rank files already.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


def run_ranks(
    world: int,
    check: Callable,
    result_dir,
    *args,
    destroy: bool = True,
    hard_exit: bool = False,
) -> None:
    """Runs ``check(rank, world, *args)`` on ``world`` spawned ranks of one gloo process group
    (one thread each) and asserts that every rank finished it ("ok"), failing with the rank's
    traceback otherwise. ``check`` must be a module-level function (the ranks import it).
    ``destroy``: destroy the process group after the check; ``hard_exit``: leave each rank with
    ``os._exit(0)`` after writing its result (see :func:`_worker`)."""
    mp.spawn(
        _worker,
        args=(world, free_port(), str(result_dir), check, tuple(args), destroy, hard_exit),
        nprocs=world,
        join=True,
    )
    for rank in range(world):
        msg = open(os.path.join(str(result_dir), f"rank{rank}.txt")).read()
        assert msg == "ok", f"rank {rank} of {world}:\n{msg}"
