"""Data selection and mixing for distillation: MiniPLM difference sampling of pre-training
documents and DDK's domain mixture weights. Per-document and per-domain arithmetic in torch."""

from __future__ import annotations

import math
import os
import stat
import warnings
from typing import Union

import numpy as np
import torch

from .. import _validate as check

__all__ = [
    "load_document_logprobs",
    "miniplm_scores",
    "miniplm_difference_sampling",
    "ddk_domain_weights",
]


# ---------------------------------------------------------------------------------------------
# MiniPLM difference sampling.
# ---------------------------------------------------------------------------------------------


@check.public("load_document_logprobs")
def load_document_logprobs(path: Union[str, os.PathLike]) -> dict:
    """Reads per-document log-probabilities for :func:`miniplm_difference_sampling`.

    ``.npz``: arrays ``teacher``, ``reference`` and optionally ``lengths``; ``.pt``: a dict with
    those keys; any other extension: a text file with whitespace-separated columns ``teacher
    reference [length]``, one document per line (``#`` starts a comment). Returns a dict of
    float64 tensors."""
    fn = "load_document_logprobs"
    if not isinstance(path, (str, os.PathLike)):
        check.fail_type(fn, f"path must be a str or os.PathLike, got {check.type_name(path)}")
    path = os.fspath(path)
    if not os.path.exists(path):
        check.fail(fn, f"path {path!r} does not exist")
    if not stat.S_ISREG(os.stat(path).st_mode):
        # A FIFO or a device would block or never end; a folder is not a table.
        check.fail(fn, f"path {path!r} is not a regular file")
    try:
        d = _read_document_logprobs(fn, path)
    except check.Error:
        raise
    except Exception as e:  # the readers' own errors: a corrupt or foreign file
        check.fail(fn, f"cannot read {path!r} ({type(e).__name__}: {e})")
    for k in ("teacher", "reference"):
        if k not in d:
            check.fail(fn, f"{path!r} has no {k!r} entry")
    return d


def _read_document_logprobs(fn: str, path: str) -> dict:
    if path.endswith(".npz"):
        with np.load(path, allow_pickle=False) as z:
            d = {k: torch.from_numpy(np.asarray(z[k], dtype=np.float64)) for k in z.files}
    elif path.endswith(".pt"):
        obj = torch.load(path, weights_only=True)
        if not isinstance(obj, dict):
            check.fail(fn, f"{path!r} must hold a dict, got {check.type_name(obj)}")
        d = {k: torch.as_tensor(v, dtype=torch.float64) for k, v in obj.items()}
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "input contained no data": raised below instead
            arr = np.loadtxt(path, dtype=np.float64, comments="#", ndmin=2)
        if arr.shape[0] == 0:
            check.fail(fn, f"{path!r} holds no document (no data line)")
        if arr.shape[1] not in (2, 3):
            check.fail(
                fn,
                f"{path!r} must have 2 or 3 columns (teacher reference [length]), "
                f"got {arr.shape[1]}",
            )
        d = {
            "teacher": torch.from_numpy(arr[:, 0].copy()),
            "reference": torch.from_numpy(arr[:, 1].copy()),
        }
        if arr.shape[1] == 3:
            d["lengths"] = torch.from_numpy(arr[:, 2].copy())
    return d


@check.public("miniplm_scores")
def miniplm_scores(teacher_logprobs, reference_logprobs, lengths=None) -> torch.Tensor:
    r"""MiniPLM's difference score per document: (log p_teacher(x) - log p_ref(x)) / |x|
    (per token when ``lengths`` is given; the sums as given otherwise). float64 [D]."""
    fn = "miniplm_scores"
    lt = torch.as_tensor(teacher_logprobs, dtype=torch.float64).reshape(-1)
    lr = torch.as_tensor(reference_logprobs, dtype=torch.float64).reshape(-1)
    if lt.shape != lr.shape:
        check.fail(
            fn, f"reference_logprobs has {lr.numel()} documents, teacher_logprobs {lt.numel()}"
        )
    if not bool(torch.isfinite(lt).all() and torch.isfinite(lr).all()):
        check.fail(fn, "log-probabilities must be finite")
    d = lt - lr
    if lengths is not None:
        ln = torch.as_tensor(lengths, dtype=torch.float64).reshape(-1)
        if ln.shape != lt.shape or bool((ln <= 0).any()):
            check.fail(fn, f"lengths must be > 0, one per document ({lt.numel()})")
        d = d / ln
    return d


@check.public("miniplm_difference_sampling")
def miniplm_difference_sampling(
    teacher_logprobs=None,
    reference_logprobs=None,
    *,
    lengths=None,
    path=None,
    ratio: float = 0.5,
    mode: str = "select",
    temperature: float = 1.0,
) -> torch.Tensor:
    r"""MiniPLM difference sampling of pre-training documents.

    Gu et al., "MiniPLM: Knowledge Distillation for Pre-Training Language Models" (code
    thu-coai/MiniPLM). From offline per-document log-probs of the large teacher
    and a small reference model, score r(x) = (log p_teacher(x) - log p_ref(x)) / |x| (see
    :func:`miniplm_scores`): documents the teacher finds much likelier than the small model are
    the difficult, diverse ones worth keeping.

    * ``mode="select"``: the indices (int64, increasing) of the ceil(ratio * D) highest-scoring
      documents (ties broken by index), as MiniPLM's top-ratio selection (ratio 0.5 in the paper).
    * ``mode="weights"``: sampling weights D softmax(r / temperature) (mean 1), a soft variant.

    Inputs: arrays (anything torch.as_tensor takes) or ``path`` (:func:`load_document_logprobs`).
    """
    fn = "miniplm_difference_sampling"
    if path is not None:
        if teacher_logprobs is not None or reference_logprobs is not None:
            check.fail(fn, "give either path or the log-prob arrays, not both")
        d = load_document_logprobs(path)
        teacher_logprobs, reference_logprobs = d["teacher"], d["reference"]
        lengths = d.get("lengths", lengths)
    if teacher_logprobs is None or reference_logprobs is None:
        check.fail(fn, "teacher_logprobs and reference_logprobs (or path) are required")
    score = miniplm_scores(teacher_logprobs, reference_logprobs, lengths)
    dn = score.numel()
    if mode == "select":
        ratio = check.real(fn, "ratio", ratio, allow_nan=False)
        if not 0 < ratio <= 1:
            check.fail(fn, f"ratio must be in (0, 1], got {ratio:g}")
        k = min(dn, math.ceil(ratio * dn))
        order = torch.argsort(-score, stable=True)
        return order[:k].sort().values
    if mode == "weights":
        temperature = check.positive(fn, "temperature", temperature)
        return torch.softmax(score / temperature, 0) * dn
    check.fail(fn, f"mode must be 'select' or 'weights', got {mode!r}")


# ---------------------------------------------------------------------------------------------
# DDK domain mixing.
# ---------------------------------------------------------------------------------------------


@check.public("ddk_domain_weights")
def ddk_domain_weights(
    student_losses,
    teacher_losses,
    previous_weights=None,
    *,
    smoothing: float = 0.5,
    temperature: float = 1.0,
    min_weight: float = 0.0,
) -> torch.Tensor:
    r"""DDK: domain mixture weights updated smoothly from teacher-student loss gaps.

    Liu et al., "DDK: Distilling Domain Knowledge for Efficient Large Language Models". Per
    domain d, the gap g_d = L_student(d) - L_teacher(d) (validation losses)::

        pi      = softmax(g / temperature)                       (more data where the gap is)
        w_new   = (1 - smoothing) w_prev + smoothing pi          (the smooth update)
        w_new   = max(w_new, min_weight), renormalized to sum 1

    w_prev = uniform when not given. The paper's exact discrepancy factor and smoothing are not
    verified (no official or public code found). Returns float64 [D] that sums to 1.
    Per-domain arithmetic in torch.
    """
    fn = "ddk_domain_weights"
    ls = torch.as_tensor(student_losses, dtype=torch.float64).reshape(-1)
    lt = torch.as_tensor(teacher_losses, dtype=torch.float64).reshape(-1)
    if ls.numel() == 0 or ls.shape != lt.shape:
        check.fail(
            fn,
            f"student_losses and teacher_losses must be non-empty with one value per "
            f"domain, got {ls.numel()} and {lt.numel()}",
        )
    if not bool(torch.isfinite(ls).all() and torch.isfinite(lt).all()):
        check.fail(fn, "losses must be finite")
    dn = ls.numel()
    smoothing = check.real(fn, "smoothing", smoothing, allow_nan=False)
    if not 0 <= smoothing <= 1:
        check.fail(fn, f"smoothing must be in [0, 1], got {smoothing:g}")
    temperature = check.positive(fn, "temperature", temperature)
    min_weight = check.real(fn, "min_weight", min_weight, allow_nan=False)
    if not 0 <= min_weight <= 1.0 / dn:
        check.fail(fn, f"min_weight must be in [0, 1/D] = [0, {1.0 / dn:g}], got {min_weight:g}")
    if previous_weights is None:
        prev = torch.full((dn,), 1.0 / dn, dtype=torch.float64)
    else:
        prev = torch.as_tensor(previous_weights, dtype=torch.float64).reshape(-1)
        if (
            prev.shape != ls.shape
            or bool((prev < 0).any())
            or not math.isclose(float(prev.sum()), 1.0, rel_tol=0, abs_tol=1e-6)
        ):
            check.fail(fn, f"previous_weights must be {dn} non-negative weights summing to 1")
    pi = torch.softmax((ls - lt) / temperature, 0)
    w = (1 - smoothing) * prev + smoothing * pi
    w = w.clamp_min(min_weight)
    return w / w.sum()
