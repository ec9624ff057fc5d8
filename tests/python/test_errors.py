"""Bad input: every error path raises ValueError / TypeError whose message names the argument."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import divkit
from conftest import logits

S = logits(3, 8, seed=500)
T = logits(3, 8, seed=501)


def raises(exc, *names):
    """pytest.raises whose message must contain every one of names."""

    class _Ctx:
        def __enter__(self):
            self.cm = pytest.raises(exc)
            self.info = self.cm.__enter__()
            return self.info

        def __exit__(self, *a):
            handled = self.cm.__exit__(*a)
            msg = str(self.info.value)
            for name in names:
                assert name in msg, f"{name!r} not in message {msg!r}"
            return handled

    return _Ctx()


@pytest.mark.parametrize(
    "args, kwargs, exc, names",
    [
        # logits
        (([[0.0, 1.0]], T), {}, TypeError, ["student_logits", "torch.Tensor"]),
        ((S, "x"), {}, TypeError, ["teacher_logits"]),
        ((S.long(), T), {}, TypeError, ["student_logits", "int64"]),
        ((S, T.to(torch.complex64)), {}, TypeError, ["teacher_logits"]),
        ((torch.tensor(1.0), torch.tensor(1.0)), {}, ValueError, ["student_logits", "0-d"]),
        ((S, logits(8, 3, seed=1)), {}, ValueError, ["teacher_logits", "shape"]),
        ((S, logits(3, 9, seed=1)), {}, ValueError, ["teacher_logits", "shape"]),
        ((S.to("meta"), T), {}, ValueError, ["student_logits", "meta", "CPU"]),
        ((S, T.to("meta")), {}, ValueError, ["teacher_logits", "CPU"]),
        ((torch.empty(3, 0), torch.empty(3, 0)), {}, ValueError, ["student_logits", "V = 0"]),
        # kind
        ((S, T, "kl"), {}, ValueError, ["kind", "forward_kl"]),
        ((S, T, 3), {}, TypeError, ["kind", "str"]),
        # parameters
        ((S, T, "jsd"), {"beta": 1.5}, ValueError, ["beta", "1.5"]),
        ((S, T, "jsd"), {"beta": -0.1}, ValueError, ["beta"]),
        ((S, T, "jsd"), {"beta": "0.5"}, TypeError, ["beta"]),
        ((S, T, "jsd"), {"beta": torch.ones(2)}, ValueError, ["beta"]),
        ((S, T, "skew_forward_kl"), {"alpha": 1.5}, ValueError, ["alpha"]),
        ((S, T, "skew_reverse_kl"), {"alpha": -0.5}, ValueError, ["alpha"]),
        ((S, T, "renyi"), {"alpha": 0.0}, ValueError, ["alpha"]),
        ((S, T, "renyi"), {"alpha": float("inf")}, ValueError, ["alpha"]),
        ((S, T, "alpha_divergence"), {"alpha": float("nan")}, ValueError, ["alpha"]),
        ((S, T), {"alpha": None}, TypeError, ["alpha"]),
        ((S, T), {"temperature": 0.0}, ValueError, ["temperature"]),
        ((S, T), {"temperature": -1.0}, ValueError, ["temperature"]),
        ((S, T), {"temperature": float("nan")}, ValueError, ["temperature"]),
        ((S, T), {"temperature": True}, TypeError, ["temperature"]),
        ((S, T), {"scale_by_t_squared": 1}, TypeError, ["scale_by_t_squared"]),
        # reduction and divisors
        ((S, T), {"reduction": "avg"}, ValueError, ["reduction", "batchmean"]),
        ((S, T), {"reduction": None}, TypeError, ["reduction"]),
        ((S, T), {"num_items_in_batch": 0}, ValueError, ["num_items_in_batch"]),
        ((S, T), {"num_items_in_batch": -3}, ValueError, ["num_items_in_batch"]),
        ((S, T), {"num_items_in_batch": float("nan")}, ValueError, ["num_items_in_batch"]),
        ((S, T), {"num_items_in_batch": "4"}, TypeError, ["num_items_in_batch"]),
        (
            (S, T),
            {"num_items_in_batch": 4, "reduction": "none"},
            ValueError,
            ["num_items_in_batch"],
        ),
        # labels
        ((S, T), {"labels": torch.zeros(4, dtype=torch.long)}, ValueError, ["labels", "shape"]),
        ((S, T), {"labels": torch.zeros(3)}, TypeError, ["labels", "integer"]),
        ((S, T), {"labels": torch.zeros(3, dtype=torch.bool)}, TypeError, ["labels"]),
        ((S, T), {"labels": [0, 1, 2]}, TypeError, ["labels"]),
        (
            (S, T),
            {"labels": torch.zeros(3, dtype=torch.long, device="meta")},
            ValueError,
            ["labels", "CPU"],
        ),
        ((S, T), {"ignore_index": 1.5}, TypeError, ["ignore_index"]),
        # weights
        ((S, T), {"weights": torch.ones(3, 1)}, ValueError, ["weights", "shape"]),
        ((S, T), {"weights": torch.ones(3, dtype=torch.long)}, TypeError, ["weights"]),
        ((S, T), {"weights": torch.ones(3, requires_grad=True)}, ValueError, ["weights", "detach"]),
        ((S, T), {"weights": np.ones(3)}, TypeError, ["weights"]),
        # gradient options
        ((S, T), {"grad_dtype": "float32"}, TypeError, ["grad_dtype"]),
        ((S, T), {"grad_dtype": torch.int32}, ValueError, ["grad_dtype"]),
        ((S, T), {"inplace_grad": "yes"}, TypeError, ["inplace_grad"]),
    ],
)
def test_bad_arguments(args, kwargs, exc, names):
    with raises(exc, *names):
        divkit.divergence(*args, **kwargs)


def test_core_errors_are_divkit_error():
    assert issubclass(divkit.Error, ValueError)
    with pytest.raises(divkit.Error):
        divkit.divergence(S, T, "nope")


@pytest.mark.parametrize("where", ["student", "teacher"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_logits_name_argument_and_row(where, bad):
    s, t = S.clone(), T.clone()
    (s if where == "student" else t)[1, 4] = bad
    with raises(ValueError, f"{where}_logits", "row 1"):
        divkit.divergence(s, t)


def test_all_masked_row():
    s = S.clone()
    s[2] = float("-inf")
    with raises(ValueError, "student_logits", "row 2", "-inf"):
        divkit.divergence(s, T)
    # ... which is fine when the row is ignored
    divkit.divergence(s, T, labels=torch.tensor([0, 0, -100]))


def test_inplace_errors():
    s = S.clone().requires_grad_(True)
    with raises(ValueError, "grad_dtype", "inplace_grad"):
        divkit.divergence(s, T, inplace_grad=True, grad_dtype=torch.float64)
    x = torch.cat([S, T]).requires_grad_(True)
    with raises(ValueError, "teacher_logits", "shares memory"):
        divkit.divergence(x[:3], x.detach()[1:4], inplace_grad=True)
    # A non-finite value is found before anything is overwritten.
    bad = S.clone()
    bad[2, 0] = float("nan")
    before = bad.clone()
    with raises(ValueError, "student_logits", "row 2"):
        divkit.divergence(bad.requires_grad_(True), T, inplace_grad=True)
    torch.testing.assert_close(bad.detach(), before, rtol=0, atol=0, equal_nan=True)


def test_inplace_deferred_checks_on_cpu():
    """Inside deferred_checks an in-place CPU call checks each row as it reads it: a bad row
    still raises and keeps its values, and the other rows hold the gradient that a call without
    that row gives them (reduction sum: each row's gradient is its own)."""
    bad = S.clone()
    bad[1, 4] = float("nan")
    want = S.clone().requires_grad_(True)
    labels = torch.tensor([0, -100, 0])
    divkit.divergence(want, T, labels=labels, reduction="sum").backward()
    got = bad.clone().requires_grad_(True)
    with divkit.cuda_checks.deferred_checks():
        with raises(ValueError, "student_logits", "row 1", "may already hold their gradient"):
            divkit.divergence(got, T, reduction="sum", inplace_grad=True)
    torch.testing.assert_close(got.detach()[1], bad[1], rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(got.detach()[[0, 2]], want.grad[[0, 2]], rtol=0, atol=0)
    # Valid inputs: the same loss and gradient bits as the default (check-first) path.
    a, b = S.clone().requires_grad_(True), S.clone().requires_grad_(True)
    loss_a = divkit.divergence(a.view(3, 8), T, "jsd", inplace_grad=True)
    loss_a.backward()
    with divkit.cuda_checks.deferred_checks():
        loss_b = divkit.divergence(b.view(3, 8), T, "jsd", inplace_grad=True)
    loss_b.backward()
    assert torch.equal(loss_a, loss_b)
    assert torch.equal(a.grad, b.grad)


def test_inplace_backward_twice_with_scaling():
    s = S.clone().requires_grad_(True)
    loss = divkit.divergence(s, T, inplace_grad=True) * 2
    loss.backward(retain_graph=True)
    with raises(RuntimeError, "inplace_grad"):
        loss.backward()


def test_divergence_and_grad_errors():
    with raises(TypeError, "grad_teacher"):
        divkit.divergence_and_grad(S, T, grad_teacher=1)
    with raises(ValueError, "divergence_and_grad", "teacher_logits"):
        divkit.divergence_and_grad(S, logits(3, 7))


def test_numpy_errors():
    s, t = S.numpy(), T.numpy()
    with raises(TypeError, "teacher_logits", "numpy"):
        divkit.divergence(s, T)
    with raises(TypeError, "student_logits", "int64"):
        divkit.divergence(s.astype(np.int64), t.astype(np.int64))
    with raises(ValueError, "teacher_logits", "shape"):
        divkit.divergence(s, t[:2])
    with raises(ValueError, "inplace_grad"):
        divkit.divergence(s, t, inplace_grad=True)
    with raises(ValueError, "labels", "shape"):
        divkit.divergence(s, t, labels=np.zeros(4, dtype=np.int64))
    with raises(TypeError, "labels"):
        divkit.divergence(s, t, labels=np.zeros(3))
    with raises(ValueError, "beta"):
        divkit.divergence(s, t, "jsd", beta=2.0)


def test_runtime_errors():
    with raises(ValueError, "n"):
        divkit.set_num_threads(0)
    with raises(TypeError, "n"):
        divkit.set_num_threads(2.0)
    with raises(ValueError, "name", "NOPE", "available"):
        divkit.force_simd_target("NOPE")
    with raises(TypeError, "name"):
        divkit.force_simd_target(None)


def test_module_errors():
    with raises(TypeError, "betta"):
        divkit.nn.DivergenceLoss("jsd", betta=0.5)
    with raises(TypeError, "labels"):
        divkit.nn.DivergenceLoss("jsd", labels=torch.zeros(3))
    with raises(ValueError, "kind"):
        divkit.nn.DivergenceLoss("nope")
    with raises(ValueError, "beta"):
        divkit.nn.DivergenceLoss("jsd", beta=2.0)
    with raises(ValueError, "temperature"):
        divkit.nn.DivergenceLoss(temperature=0)
    with raises(ValueError, "reduction"):
        divkit.nn.DivergenceLoss(reduction="avg")
    with raises(TypeError, "inplace_grad"):
        divkit.nn.DivergenceLoss(inplace_grad=None)


def test_low_level_module_dtype_errors():
    # The compiled module names the argument for dtypes the core does not support.
    loss = torch.empty(1)
    with raises(ValueError, "student", "uint8"):
        divkit._C.divergence(
            torch.zeros(2, 3, dtype=torch.uint8),
            T[:2],
            loss,
            None,
            None,
            "forward_kl",
            0.5,
            0.1,
            1.0,
            False,
            None,
            -100,
            None,
            "mean",
            0.0,
        )
    with raises(ValueError, "labels", "int16"):
        divkit._C.divergence(
            S,
            T,
            loss,
            None,
            None,
            "forward_kl",
            0.5,
            0.1,
            1.0,
            False,
            torch.zeros(3, dtype=torch.int16),
            -100,
            None,
            "mean",
            0.0,
        )
    with raises(ValueError, "loss", "int32"):
        divkit._C.divergence(
            S,
            T,
            torch.empty(1, dtype=torch.int32),
            None,
            None,
            "forward_kl",
            0.5,
            0.1,
            1.0,
            False,
            None,
            -100,
            None,
            "mean",
            0.0,
        )


def test_beta_just_outside_range_is_rejected():
    for beta in (1 + 1e-12, -1e-300):
        with raises(ValueError, "beta"):
            divkit.divergence(S, T, "jsd", beta=beta)


@pytest.mark.parametrize("fn", [divkit.divergence, divkit.divergence_and_grad])
@pytest.mark.parametrize("bad", [8, 100, -1, -101])
def test_labels_outside_vocabulary_raise(fn, bad):
    """Labels that are neither ignore_index nor in [0, V) mean the labels do not belong to
    these logits: an error naming the function, the argument and the position, not a loss that
    silently counts the token."""
    s = S.clone().requires_grad_()
    labels = torch.tensor([0, bad, 7])
    with raises(ValueError, fn.__name__, "labels", "[0, 8)", "flat position 1"):
        fn(s, T, labels=labels)
    assert s.grad is None


def test_labels_with_custom_ignore_index_are_accepted():
    """A custom ignore_index is ignored, not range-checked; the result equals masking by hand."""
    labels = torch.tensor([3, -1, 5])
    got = divkit.divergence(S, T, labels=labels, ignore_index=-1, reduction="none")
    full = divkit.divergence(S, T, reduction="none")
    torch.testing.assert_close(got, full * torch.tensor([1.0, 0.0, 1.0]), rtol=0, atol=0)
