"""The host cache (divkit.memory): the [N, V] gradients divkit allocates come from cached blocks.

A block freed by torch is reused by the next fitting call (same address, a cache hit); a block
still referenced is never handed out; the results are bit-identical to the torch.empty path
(limit 0), also when a reused block holds stale values and some rows are ignored; the limit
bounds the cached bytes; empty_cache releases; bad limits raise divkit.Error; the environment
variable sets the limit; a fork child starts without the parent's free blocks.
"""

import gc
import os
import subprocess
import sys
import textwrap
import threading

import pytest
import torch

import divkit
from divkit import memory

N, V = 64, 8192  # a 2 MiB fp32 gradient: above memory.MIN_BYTES


@pytest.fixture(autouse=True)
def cache_limit():
    """Each test starts with an empty cache and a 64 MiB limit, and restores the limit."""
    saved = memory.cache_limit()
    memory.empty_cache()
    memory.set_cache_limit(64 << 20)
    yield
    gc.collect()
    memory.empty_cache()
    memory.set_cache_limit(saved)


def _inputs(seed=0, n=N, v=V, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    s = (3 * torch.randn(n, v, generator=g)).to(dtype)
    t = (3 * torch.randn(n, v, generator=g)).to(dtype)
    return s, t


def _grad(s, t, **kw):
    return divkit.divergence_and_grad(s, t, "forward_kl", **kw)[1]


def _stats():
    return memory.cache_stats()


def _overlap(a, b):
    a_lo, b_lo = a.data_ptr(), b.data_ptr()
    a_hi = a_lo + a.numel() * a.element_size()
    b_hi = b_lo + b.numel() * b.element_size()
    return a_lo < b_hi and b_lo < a_hi


def test_freed_gradient_block_is_reused_at_the_same_address():
    s, t = _inputs()
    g = _grad(s, t)
    ptr = g.data_ptr()
    before = _stats()
    assert before["in_use_blocks"] >= 1
    del g
    after_free = _stats()
    assert after_free["cached_blocks"] == before["cached_blocks"] + 1
    assert after_free["in_use_blocks"] == before["in_use_blocks"] - 1
    g2 = _grad(s, t)
    assert g2.data_ptr() == ptr
    assert _stats()["hits"] == before["hits"] + 1


def test_autograd_gradient_block_returns_when_the_graph_is_freed():
    s, t = _inputs()
    leaf = s.clone().requires_grad_(True)
    loss = divkit.divergence(leaf, t, "jsd")
    in_use = _stats()["in_use_blocks"]
    loss.backward()
    ref = leaf.grad.clone()
    # The graph keeps the gradient (autograd copied it into leaf.grad): the block is in use
    # until the graph is freed.
    assert _stats()["in_use_blocks"] == in_use
    loss2 = divkit.divergence(leaf, t, "jsd")
    assert _stats()["in_use_blocks"] == in_use + 1  # a second block, not the held one
    del loss, loss2
    assert _stats()["in_use_blocks"] == in_use - 1
    hits = _stats()["hits"]
    leaf.grad = None
    divkit.divergence(leaf, t, "jsd").backward()
    assert _stats()["hits"] == hits + 1
    assert torch.equal(leaf.grad, ref)


def test_held_gradient_is_never_reused():
    s, t = _inputs(0)
    s2, t2 = _inputs(1)
    g1 = _grad(s, t)
    kept = g1.clone()
    g2 = _grad(s2, t2)
    assert not _overlap(g1, g2)
    assert torch.equal(g1, kept)
    # A view keeps the block referenced too.
    view = g2[3:5]
    kept2 = view.clone()
    del g2
    g3 = _grad(s, t)
    assert not _overlap(g3, view)
    assert torch.equal(view, kept2)
    assert torch.equal(g3, kept)


def _stale(n=N, v=V, dtype=torch.float32):
    """Leaves a freed block full of NaN in the cache (the next fitting call reuses it)."""
    x = memory._empty((n, v), dtype, "cpu")
    x.fill_(float("nan"))
    del x


CASES = {
    "forward_kl": lambda s, t, **kw: divkit.divergence_and_grad(s, t, "forward_kl", **kw)[1],
    "jsd_teacher_grad": lambda s, t, **kw: divkit.divergence_and_grad(
        s, t, "jsd", grad_student=False, grad_teacher=True, **kw
    )[2],
    "renyi_none": lambda s, t, **kw: divkit.divergence_and_grad(
        s, t, "renyi", alpha=0.5, reduction="none", **kw
    )[1],
    "topk": lambda s, t, **kw: _autograd_grad(
        lambda x: divkit.topk_divergence(x, t, 32, "reverse_kl", **kw), s
    ),
    "sparse": lambda s, t, **kw: _autograd_grad(
        lambda x: divkit.sparse_divergence(
            x, t.topk(16, -1).indices, torch.log_softmax(t, -1).topk(16, -1).values, **kw
        ),
        s,
    ),
}


def _autograd_grad(f, s):
    leaf = s.clone().requires_grad_(True)
    f(leaf).backward()
    return leaf.grad


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_results_are_bit_identical_to_torch_empty(case, dtype):
    s, t = _inputs(2, dtype=dtype)
    labels = torch.randint(0, V, (N,))
    labels[::3] = -100  # ignored rows: the kernel must write their zeros over stale values
    kw = {"labels": labels}
    memory.set_cache_limit(0)
    before = _stats()
    ref = CASES[case](s, t, **kw)
    after = _stats()
    assert (after["hits"], after["misses"]) == (before["hits"], before["misses"])  # torch.empty
    memory.set_cache_limit(64 << 20)
    _stale(dtype=ref.dtype)
    hits = _stats()["hits"]
    got = CASES[case](s, t, **kw)
    assert _stats()["hits"] == hits + 1  # the stale block was reused
    assert got.dtype == ref.dtype and got.shape == ref.shape
    assert torch.equal(got, ref)
    assert torch.equal(got[::3], torch.zeros_like(got[::3]))


def test_grad_dtype_and_leading_shape():
    s, t = _inputs(3)
    s3, t3 = s.view(4, N // 4, V), t.view(4, N // 4, V)
    memory.set_cache_limit(0)
    ref = _grad(s3, t3, grad_dtype=torch.bfloat16)
    memory.set_cache_limit(64 << 20)
    _stale(dtype=torch.bfloat16)
    got = _grad(s3, t3, grad_dtype=torch.bfloat16)
    assert got.shape == (4, N // 4, V) and got.dtype == torch.bfloat16 and got.is_contiguous()
    assert torch.equal(got, ref)


def test_small_buffers_are_not_cached():
    s, t = _inputs(0, n=4, v=1024)  # 16 KiB
    before = _stats()
    g = _grad(s, t)
    del g
    after = _stats()
    assert (after["hits"], after["misses"]) == (before["hits"], before["misses"])


def test_limit_bounds_the_cached_bytes():
    memory.set_cache_limit(3 << 20)  # one 2 MiB gradient fits, two do not
    s, t = _inputs()
    g1, g2 = _grad(s, t), _grad(s, t)
    before = _stats()
    del g1, g2
    st = _stats()
    assert st["cached_bytes"] <= 3 << 20
    assert st["cached_blocks"] == 1
    assert st["unmapped_blocks"] == before["unmapped_blocks"] + 1
    assert memory.cache_limit() == 3 << 20


def test_empty_cache_releases_the_free_blocks():
    s, t = _inputs()
    held = _grad(s, t)
    g = _grad(s, t)
    nbytes = g.numel() * g.element_size()
    del g
    assert _stats()["cached_bytes"] == nbytes
    assert divkit.empty_cache() == nbytes  # the top-level name is memory.empty_cache
    st = _stats()
    assert st["cached_bytes"] == 0 and st["cached_blocks"] == 0
    assert st["in_use_blocks"] >= 1
    assert memory.empty_cache() == 0
    assert torch.equal(held, _grad(s, t))


def test_tensor_freed_in_another_thread_returns_its_block():
    s, t = _inputs()
    box = [_grad(s, t)]
    ptr = box[0].data_ptr()
    in_use = _stats()["in_use_blocks"]
    th = threading.Thread(target=box.clear)
    th.start()
    th.join()
    assert _stats()["in_use_blocks"] == in_use - 1
    assert _grad(s, t).data_ptr() == ptr


@pytest.mark.parametrize(
    "bad, err",
    [
        (-1, r"^set_cache_limit: nbytes must be an int >= 0, got -1$"),
        (2**64, r"^set_cache_limit: nbytes must fit in int64"),
    ],
)
def test_bad_limit_raises_error(bad, err):
    with pytest.raises(divkit.Error, match=err):
        memory.set_cache_limit(bad)
    assert memory.cache_limit() == 64 << 20


@pytest.mark.parametrize("bad", [1.5, "4G", None, True])
def test_limit_of_the_wrong_type_raises_type_error(bad):
    with pytest.raises(divkit.Error, match=r"^set_cache_limit: nbytes must be an int, got ") as e:
        memory.set_cache_limit(bad)
    assert isinstance(e.value, TypeError)


def _run(code, env):
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **env},
    )


@pytest.mark.parametrize("value, limit", [("64M", 64 << 20), ("3GiB", 3 << 30), ("0", 0)])
def test_environment_variable_sets_the_limit(value, limit):
    r = _run(
        """
        import torch, divkit
        from divkit import memory
        print(memory.cache_limit())
        g = divkit.divergence_and_grad(torch.randn(64, 8192), torch.randn(64, 8192))[1]
        print(memory.cache_stats()["misses"])
        """,
        {"DIVKIT_HOST_CACHE_LIMIT": value},
    )
    assert r.returncode == 0, r.stderr
    got_limit, misses = map(int, r.stdout.split())
    assert got_limit == limit
    assert misses == (0 if limit == 0 else 1)


def test_bad_environment_variable_raises_error_naming_it():
    r = _run(
        """
        import torch, divkit
        try:
            divkit.divergence_and_grad(torch.randn(64, 8192), torch.randn(64, 8192))
        except divkit.Error as e:
            print(e)
        """,
        {"DIVKIT_HOST_CACHE_LIMIT": "lots"},
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("DIVKIT_HOST_CACHE_LIMIT: expected a byte count"), r.stdout


def test_fork_child_starts_without_the_free_blocks():
    r = _run(
        """
        import os, torch, divkit
        from divkit import memory
        torch.set_num_threads(1)
        divkit.set_num_threads(1)
        g = torch.Generator().manual_seed(0)
        s, t = torch.randn(64, 8192, generator=g), torch.randn(64, 8192, generator=g)
        held = divkit.divergence_and_grad(s, t)[1]
        ref = held.clone()
        freed = divkit.divergence_and_grad(s, t, "jsd")[1]
        jsd = freed.clone()
        del freed
        assert memory.cache_stats()["cached_blocks"] == 1
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                st = memory.cache_stats()
                if st["cached_blocks"] != 0 or st["cached_bytes"] != 0:
                    code = 10
                elif not torch.equal(held, ref):
                    code = 11
                elif not torch.equal(divkit.divergence_and_grad(s, t, "jsd")[1], jsd):
                    code = 12
                elif memory.cache_stats()["misses"] != st["misses"] + 1:
                    code = 13
            except BaseException:
                code = 14
            os._exit(code)
        _, status = os.waitpid(pid, 0)
        print(os.waitstatus_to_exitcode(status))
        hits = memory.cache_stats()["hits"]
        print(torch.equal(divkit.divergence_and_grad(s, t, "jsd")[1], jsd))
        print(memory.cache_stats()["hits"] - hits)
        """,
        {},
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["0", "True", "1"]


def test_training_loop_reuses_two_blocks():
    """logits = h @ W, loss reassigned every step: the previous step's graph holds its gradient
    while the next call allocates, so two blocks alternate; after the first two steps every
    call is a hit, and the weight gradient is the one fresh buffers give."""
    g = torch.Generator().manual_seed(4)
    h, t = torch.randn(N, 32, generator=g), torch.randn(N, V, generator=g)
    w0 = torch.randn(32, V, generator=g)

    def train(steps):
        w = w0.clone().requires_grad_(True)
        for _ in range(steps):
            loss = divkit.divergence(h @ w, t, "reverse_kl")
            loss.backward()
        return w.grad

    memory.set_cache_limit(0)
    ref = train(5)
    memory.set_cache_limit(64 << 20)
    before = _stats()
    got = train(5)
    after = _stats()
    assert after["misses"] - before["misses"] == 2
    assert after["hits"] - before["hits"] == 3
    assert torch.equal(got, ref)


def test_threads_computing_and_freeing_concurrently_get_their_own_blocks():
    """Threads call divergence_and_grad (the kernel runs without the GIL) and free their
    gradients while others allocate: every gradient equals the reference, and no block is left
    in use afterwards."""
    s, t = _inputs(5)
    ref = _grad(s, t)
    in_use = _stats()["in_use_blocks"]
    bad = []

    def work():
        for _ in range(10):
            g = _grad(s, t)
            if not torch.equal(g, ref):
                bad.append(1)
            del g

    threads = [threading.Thread(target=work) for _ in range(6)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not bad
    assert _stats()["in_use_blocks"] == in_use
