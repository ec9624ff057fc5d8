#!/usr/bin/env python3
"""Generates docs/api.md, divkit's API reference, from the installed package and the headers:

- Python: every name of ``divkit.__all__`` and of its submodules' ``__all__`` with its
  signature (``inspect.signature``) and the first sentence of its docstring; the ``divkit``
  command's subcommands (from ``divkit.cli.build_parser``);
- C++: every function declared at namespace level in ``include/divkit/*.h`` with its declaration
  and the first sentence of the comment above it, and the types each header defines.

Run:  .venv/bin/python scripts/gen_api.py            (writes docs/api.md)
      .venv/bin/python scripts/gen_api.py --check    (exit 1 if docs/api.md is out of date)
tests/python/test_api_doc.py checks that docs/api.md names every public Python name and every
declared C++ function, with the current parameter names.
"""

from __future__ import annotations

import argparse
import glob
import inspect
import os
import re
import sys
from typing import List, Tuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# (heading, module, what the section is)
PY_SECTIONS = [
    ("Token-level divergences", "divkit.functional", "logits [..., V] of a student and a teacher"),
    (
        "Fused linear heads",
        "divkit.fused",
        "from hidden states and lm_head weights, without the [tokens x V] logits",
    ),
    ("Sparse teachers", "divkit.sparse", "top-k teacher log-probs against full student logits"),
    ("Modules (`divkit.nn`)", "divkit.nn", "torch.nn.Module wrappers"),
    (
        "Vocabulary-parallel (`divkit.distributed`)",
        "divkit.distributed",
        "the lm_head sharded by vocabulary over a process group",
    ),
    (
        "Preference alignment (`divkit.preference`)",
        "divkit.preference",
        "DPO family and token-level preference losses",
    ),
    ("RLHF utilities (`divkit.rlhf`)", "divkit.rlhf", "KL estimators, rewards, diagnostics"),
    ("Optimal transport (`divkit.ot`)", "divkit.ot", "entropic OT and kernel discrepancies"),
    ("Distillation methods (`divkit.distill`)", "divkit.distill", "methods from the literature"),
    (
        "Host memory (`divkit.memory`)",
        "divkit.memory",
        "the cache of the large CPU buffers divkit returns (the [N, V] gradients)",
    ),
    (
        "CUDA checks (`divkit.cuda_checks`)",
        "divkit.cuda_checks",
        "deferred input checks of the CUDA kernels, for CUDA graph capture",
    ),
]
RUNTIME = [
    "set_num_threads",
    "get_num_threads",
    "available_simd_targets",
    "force_simd_target",
    "active_simd_target",
    "version",
    "Error",
    "__version__",
]

# One-line descriptions written here for the C++ functions whose comment does not start with
# one (a shared comment over a group of declarations, a section banner, or none); the header
# comments keep the full contracts.
CPP_NOTES = {
    "dtype_size": "Size of one element of `dtype` in bytes.",
    "cuda_built": "Whether this build has the CUDA kernels (DIVKIT_CUDA).",
    "cuda_device_count": "How many CUDA devices the CUDA runtime sees (0 when not built, "
    "without a driver or without a GPU).",
    "divergence_kind_name": 'The name of a divergence kind ("forward_kl", ...).',
    "parse_divergence_kind": "The kind named `name`; throws Error naming `kind` and listing the "
    "valid names.",
    "reduction_name": 'The name of a reduction ("none", "sum", "mean", "batchmean").',
    "parse_reduction": "The reduction named `name`; throws Error listing the valid names.",
    "fused_linear_divergence": "Knowledge distillation from hidden states: any divergence between "
    "softmax(z_teacher / T) and softmax(z_student / T), z = h W^T + b, "
    "chunk by chunk, with the optional hard-label term and the "
    "gradients of both heads.",
    "fused_linear_sparse_divergence": "Distillation from a top-k teacher fused with the student's "
    "head (sparse_divergence on chunks of z = h W^T + b).",
    "fused_linear_cross_entropy": "Cross-entropy of z = softcap(h W^T + b) against hard labels "
    "(label smoothing, z-loss), chunk by chunk, with gradients and "
    "optional per-token statistics.",
    "fused_linear_logprobs": "Selective log-softmax: per-token log p(label) (and optionally "
    "entropy, logsumexp, top-k mass) without materializing the logits.",
    "fused_linear_logprobs_backward": "The gradients of fused_linear_logprobs' log-probs and "
    "entropy with respect to hidden, weight and bias "
    "(recomputing each chunk).",
    "label_rows": "The label heads' row step on one chunk of logits already computed (statistics, "
    "and the gradient from per-row coefficients written over the logits); CUDA tensors run the "
    "CUDA kernel on the given stream.",
    "vocab_parallel_divergence": "divergence() over logits sharded by vocabulary: each rank passes "
    "its columns and a VocabShard (rank, world, all-reduce callback); "
    "every rank gets the unsharded loss and its shard's gradients.",
    "divergence_shard_stats": "Vocabulary-parallel phase 1: per-row max and log-sum-exp of this "
    "rank's shard of both logits.",
    "divergence_shard_sums": "Vocabulary-parallel phase 2: the shard's partial sums of the "
    "divergence under the combined normalizers.",
    "divergence_shard_grad": "Vocabulary-parallel phase 3: the gradients of the shard's logits "
    "from the combined sums.",
    "sinkhorn": "Solves B entropic OT problems (balanced or unbalanced, log-domain Sinkhorn with "
    "optional eps scaling), writing potentials, costs and optionally plans; returns "
    "each problem's iterations, marginal error and convergence.",
    "mmd2": "Squared maximum mean discrepancy between weighted samples (Gaussian or energy "
    "kernel), float64, with optional gradients.",
    "cs_divergence": "Cauchy-Schwarz divergence between weighted samples (Gaussian kernel), "
    "float64, with optional gradients.",
    "preference_loss_type_name": "The name of a DPO loss type (TRL's `loss_type`).",
    "parse_preference_loss_type": "The DPO loss type named `name`; throws Error naming "
    "`loss_type` and listing the valid names.",
    "f_divergence_type_name": "The name of an f-DPO divergence (TRL's `f_divergence_type`).",
    "parse_f_divergence_type": "The f-DPO divergence named `name`; throws Error listing the "
    "valid names.",
    "preference_loss": "The DPO family (every TRL loss type, weighted combinations, cDPO "
    "smoothing, f-DPO, WPO weights): per-pair losses, rewards and the "
    "gradients of the four log-prob inputs, in fp64.",
    "parse_cpo_loss_type": "The CPO loss type named `name` (sigmoid, hinge, ipo, simpo).",
    "cpo_loss": "CPO / SimPO / AlphaPO, reference-free: per-pair losses, rewards and gradients.",
    "odds_ratio_loss": "ORPO's odds-ratio term from average log-probs, with the log-odds and "
    "gradients.",
    "kto_loss": "KTO and APO-zero-unpaired on unpaired desirable and undesirable examples, with "
    "the KL reference point.",
    "parse_kl_estimator": "The KL estimator named `name` (k1, k2, k3, abs, or verl's kl, mse, "
    "low_var_kl).",
    "kl_estimator": "Per-token estimate of KL(pi || pi_ref) from sampled tokens' log-probs (k1, "
    "k2, k3, abs), with optional clamping and gradients.",
    "parse_ensemble_method": "The reward-ensemble method named `name` (mean, wco, uwo).",
    "ensemble_rewards": "Combines E reward models per row (mean, worst case, "
    "uncertainty-weighted; Coste et al. 2023), with gradients.",
    "calibrate_reward": "InfAlign's calibrated reward: the empirical CDF of the reference "
    "policy's rewards at each reward.",
    "infalign_transform": "InfAlign's transform exp(t u) of a calibrated reward, with its "
    "gradient.",
    "best_of_n": "Index (first maximum) and value of the best of N rewards per row.",
    "d2o_loss": "D2O (Duan et al. 2024): K self-generated samples against a human negative, "
    "with rewards and gradients.",
    "hypo_online_kl": "HyPO's online Monte-Carlo KL(pi || pi_ref) from k >= 2 samples per "
    "prompt, with its leave-one-out REINFORCE gradient.",
    "superhf_loss": "SuperHF (Mukobi et al. 2023): supervised loss on the top-k completions by "
    "reward plus a KL prior, with the kept indices and gradients.",
    "sparse_tail_name": 'The name of a sparse-teacher tail mode ("renormalize", "bucket").',
    "parse_sparse_tail": "The tail mode named `name`; throws Error naming `tail`.",
    "sparse_divergence": "Divergence between a top-k teacher (indices and log-probs per token) "
    "and the student's full logits, the tail renormalized or kept as one "
    "bucket; loss and student gradient.",
    "topk_divergence": "Divergence restricted to the teacher's k largest logits per row, both "
    "distributions renormalized (OstQuant's KL-Top).",
    "set_num_threads": "Sets the threads of the CPU kernels (results do not depend on it); "
    "n < 1 throws Error.",
    "get_num_threads": "The threads the CPU kernels use.",
    "available_simd_targets": "The SIMD targets compiled in and supported by this CPU, best first.",
    "force_simd_target": 'Restricts dispatch to one SIMD target ("" restores the automatic '
    "choice).",
    "active_simd_target": "The SIMD target the kernels dispatch to now.",
    "version": "divkit's version string.",
    "nkd_rows": "Per-row terms and student gradient of NKD, normalized knowledge distillation "
    "(Yang et al., ICCV 2023).",
    "ofa_rows": "Per-row loss and student gradient of OFA-KD's adaptive target enhancement "
    "(Hao et al., NeurIPS 2023).",
    "selective_contrast": "One USCD selective contrastive decoding step: contrasted logits where "
    "the standard prediction is uncertain (Wang et al. 2024).",
}

# Namespace-level function declarations of the public headers (they are not indented).
_DECL = re.compile(
    r"^(?!#|namespace|struct|enum|class|using|typedef|template|\}|return)"
    r"([A-Za-z_][\w:<>,\s\*&]*?)\b([A-Za-z_]\w*)\s*\(",
    re.M,
)
_TYPE = re.compile(r"^(?:struct|class|enum class|enum)\s+(\w+)", re.M)


def first_sentence(text: str, limit: int = 220) -> str:
    """The first sentence of the first paragraph, with Sphinx roles turned into code spans."""
    text = re.sub(r":(?:func|class|mod|meth|attr|data):`~?([^`]+)`", r"`\1`", text or "")
    para = " ".join(text.strip().split("\n\n")[0].split())
    m = re.search(
        r"(?<![A-Za-z]\.[A-Za-z])(?<!e\.g)(?<!i\.e)(?<!et al)(?<!eq)(?<!eqs)(?<!vs)\.(?=\s|$)", para
    )
    s = para[: m.end()] if m else para
    if s.endswith(":"):  # the docstring goes on with a formula
        s = s[:-1] + "."
    if len(s) > limit:  # a long first sentence: cut at a clause boundary
        cut = max(s.rfind("; ", 0, limit), s.rfind(": ", 0, limit), s.rfind(", ", 0, limit))
        s = s[:cut] + " ..." if cut > 40 else s[:limit] + " ..."
    return s


def _signature(obj) -> str:
    try:
        sig = str(inspect.signature(obj))
    except (TypeError, ValueError):
        return "(...)"
    sig = re.sub(r"<([\w.]+) '([\w.]+)'>", r"\2", sig)  # <class 'torch.dtype'> -> torch.dtype
    # annotations are strings under "from __future__ import annotations": unquote them
    return re.sub(r"(: |-> )'([^']*)'", r"\1\2", sig)


# Python names whose docstring is inherited or missing.
PY_NOTES = {
    "Error": "divkit's error type, raised on bad input with a message naming the argument "
    "(the C++ core's divkit::Error).",
}


def py_entry(qualname: str, obj) -> str:
    note = PY_NOTES.get(qualname.rsplit(".", 1)[-1])
    if inspect.isclass(obj) and issubclass(obj, BaseException):
        return f"- `{qualname}` (exception, a `{obj.__mro__[1].__name__}`): {note or ''}"
    if inspect.ismodule(obj):
        return f"- `{qualname}`: module, see its section"
    if inspect.isclass(obj):
        doc = first_sentence(inspect.getdoc(obj) or "")
        if issubclass(obj, tuple) and hasattr(obj, "_fields"):
            return f"- `{qualname}({', '.join(obj._fields)})` (named tuple): {doc}"
        return f"- `{qualname}{_signature(obj)}` (class): {doc}"
    if callable(obj):
        return f"- `{qualname}{_signature(obj)}`: {first_sentence(inspect.getdoc(obj) or '')}"
    value = repr(tuple(obj)) if isinstance(obj, (list, tuple)) else repr(obj)
    return f"- `{qualname}` = `{value}`"


def python_part() -> List[str]:
    import importlib

    import divkit

    top = set(divkit.__all__)
    out = [
        "## Python",
        "",
        "`import divkit`. Names also exported at the top level are written `divkit.name`; the "
        "others live in their module (`divkit.ot.sinkhorn`). Conventions (directions, "
        "reductions, temperature, ignore_index, dtypes) are in the "
        "[guide](guide.md#8-conventions).",
        "",
    ]
    seen = set()
    for heading, modname, what in PY_SECTIONS:
        mod = importlib.import_module(modname)
        out += [f"### {heading}", "", f"{what[0].upper()}{what[1:]}.", ""]
        for name in mod.__all__:
            obj = getattr(mod, name)
            exported = name in top and getattr(divkit, name, None) is obj
            qual = f"divkit.{name}" if exported else f"{modname}.{name}"
            if exported:
                seen.add(name)
            entry = py_entry(qual, obj)
            if exported and not modname.startswith(
                ("divkit.functional", "divkit.fused", "divkit.sparse")
            ):
                entry += f" (also `{modname}.{name}`)"
            out.append(entry)
        out.append("")
    out += ["### Runtime and errors", ""]
    for name in RUNTIME:
        out.append(py_entry(f"divkit.{name}", getattr(divkit, name)))
        seen.add(name)
    modules = [n for n in divkit.__all__ if inspect.ismodule(getattr(divkit, n))]
    out += ["", "Submodules: " + ", ".join(f"`divkit.{n}`" for n in modules) + ".", ""]
    missing = [n for n in divkit.__all__ if n not in seen and n not in modules]
    if missing:
        out += ["### Other names", ""]
        out += [py_entry(f"divkit.{n}", getattr(divkit, n)) for n in missing]
        out.append("")
    return out


def cli_part() -> List[str]:
    from divkit.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    helps = {a.dest: a.help for a in sub._choices_actions}
    out = [
        "## The `divkit` command",
        "",
        "Installed with the package (also `python -m divkit`); `divkit COMMAND --help` lists "
        "each command's options.",
        "",
    ]
    for name, p in sub.choices.items():
        usage = " ".join(p.format_usage().split())[len("usage: ") :]
        out.append(f"- `{usage}`: {helps.get(name) or ''}")
    return out + [""]


def _strip_comments(src: str) -> str:
    src = re.sub(r"/\*.*?\*/", lambda m: "\n" * m.group(0).count("\n"), src, flags=re.S)
    return re.sub(r"//[^\n]*", "", src)


def cpp_functions(path: str) -> List[Tuple[str, str, str]]:
    """(name, declaration, description) of each namespace-level function of a header."""
    raw = open(path).read()
    code = _strip_comments(raw)
    lines = raw.split("\n")
    out = []
    for m in _DECL.finditer(code):
        # the parameter list ends at the matching parenthesis (defaults may hold "{}" and "()")
        depth, i = 0, m.end() - 1
        while True:
            depth += {"(": 1, ")": -1}.get(code[i], 0)
            if depth == 0:
                break
            i += 1
        tail = re.match(r"[^;{]*", code[i + 1 :]).group(0)  # e.g. " const", " noexcept"
        decl = " ".join((code[m.start() : i + 1] + tail).split()) + ";"
        line = code.count("\n", 0, m.start())
        # the comment block above (declarations grouped under one comment share it)
        i, comment = line - 1, []
        while i >= 0 and lines[i].strip():
            s = lines[i].strip()
            if s.startswith("//"):
                comment.insert(0, s.lstrip("/").strip())
            elif comment:
                break
            i -= 1
        name = m.group(2)
        desc = CPP_NOTES.get(name) or first_sentence(re.sub(r"-{3,}", "", " ".join(comment)))
        out.append((name, decl, desc))
    return out


def cpp_part() -> List[str]:
    out = [
        "## C++",
        "",
        "Namespace `divkit`; `#include <divkit/divkit.h>` or the family's header; link "
        "`divkit::divkit` (`find_package(divkit)`). Bad input throws `divkit::Error` (a "
        "`std::invalid_argument`) naming the argument on bad input; outputs are caller-"
        "allocated `TensorView`s. The full contracts are the comments in each header.",
        "",
    ]
    for path in sorted(glob.glob(os.path.join(ROOT, "include", "divkit", "*.h"))):
        rel = os.path.relpath(path, ROOT)
        funcs = cpp_functions(path)
        types = _TYPE.findall(_strip_comments(open(path).read()))
        if not funcs and not types:
            continue
        out += [f"### [{rel}](../{rel})", ""]
        if types:
            out += ["Types: " + ", ".join(f"`{t}`" for t in types) + ".", ""]
        for name, decl, desc in funcs:
            out.append(f"- `{decl}`" + (f": {desc}" if desc else ""))
        out.append("")
    return out


def generate() -> str:
    head = [
        "# divkit API reference",
        "",
        "Generated by `scripts/gen_api.py` from the package's docstrings and signatures and "
        "from the public headers (do not edit by hand: run "
        "`.venv/bin/python scripts/gen_api.py`). Each entry gives the signature and the "
        "first sentence of its documentation; the docstrings and header comments hold the "
        "formulas, directions, dtypes and papers. `tests/python/test_api_doc.py` checks "
        "that every name of `divkit.__all__` and every function declared in "
        "`include/divkit/*.h` is here.",
        "",
        "Contents: [Python](#python) · [the divkit command](#the-divkit-command) · [C++](#c)",
        "",
    ]
    return "\n".join(head + python_part() + cli_part() + cpp_part()).rstrip() + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--check", action="store_true", help="exit 1 if docs/api.md is out of date")
    ap.add_argument("--out", default=os.path.join(ROOT, "docs", "api.md"))
    args = ap.parse_args()
    text = generate()
    if args.check:
        current = open(args.out).read() if os.path.exists(args.out) else ""
        if current != text:
            print(
                f"{args.out} is out of date: run .venv/bin/python scripts/gen_api.py",
                file=sys.stderr,
            )
            return 1
        return 0
    with open(args.out, "w") as f:
        f.write(text)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
