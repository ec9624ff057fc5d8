"""``divkit bench``: runs the benchmark scripts of ``bench/`` and checks their results.

Each benchmark (``--op``) is a script of the source checkout's ``bench/`` folder, run with this
Python; its progress goes to stderr as it runs, and its Markdown tables (the tables of
docs/benchmarks.md) are printed at the end. While the scripts time divkit against its peers
they also compute the same quantity with each; this module checks those values against the
reference and makes the command fail (exit code 1) on a mismatch:

==============  ===============================  ==============================================
op              script                           checked
==============  ===============================  ==============================================
divergence      bench/bench_divergence.py        divkit's loss (and in-place) against TRL's
                                                 ``generalized_jsd_loss`` (eager, torch.compile)
fused_linear    bench/bench_fused_linear.py      the loss of eager TRL and Liger against divkit's
preference      bench/bench_preference.py        DPO, CPO/SimPO, TDPO2 and SparsePO losses
                                                 against their peers' (TRL's, torch on the
                                                 materialized logits)
ot              bench/bench_ot.py                the transport cost of divkit-f32 / f64 against
                                                 POT's (to a tolerance set by the marginal errors)
trainers        bench/bench_trainers.py          the logged losses of divkit's TRL / Hugging Face
                                                 trainers against the stock trainers' (step 0:
                                                 1e-4; every step: 2e-3, the round-off grown
                                                 through the optimizer steps)
==============  ===============================  ==============================================

``divkit bench`` without ``--op`` runs the kernel benchmarks (every op above but ``trainers``:
:data:`DEFAULT_OPS`). ``trainers`` trains Hugging Face models (tiny, built from a config) with
each pair of trainers, which takes minutes at its full sizes and needs ``trl`` and
``transformers``: it runs only when asked, ``--op trainers``.

Relative tolerances: 1e-4 for float32 results; 5e-2 for bfloat16/float16 peers that compute in
the low precision themselves (TRL's eager loss in bf16 rounds every step; divkit computes in
fp32). A script that exits with an error, or whose output lacks the values to check, fails too.

When divkit is installed from a wheel the ``bench/`` folder is not installed with it: the scripts
are looked for in ``--bench-dir``, ``$DIVKIT_BENCH_DIR``, the source checkout the package was
installed from (editable installs) and ``./bench``.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

__all__ = ["OPS", "DEFAULT_OPS", "BenchError", "find_bench_dir", "run_bench", "check_output"]

RTOL_FP32 = 1e-4
RTOL_LOW = 5e-2


class BenchError(RuntimeError):
    """The benchmarks cannot be run (no bench/ folder, unknown op)."""


@dataclass
class Op:
    script: str
    quick: Sequence[str]  # arguments of --quick
    uses_json: bool = False  # run with --json FILE / --markdown FILE
    description: str = ""
    by_default: bool = True  # run by `divkit bench` without --op


OPS: Dict[str, Op] = {
    "divergence": Op(
        "bench_divergence.py",
        ["--quick"],
        uses_json=True,
        description="token-level divergences vs TRL eager and torch.compile",
    ),
    "fused_linear": Op(
        "bench_fused_linear.py",
        ["--quick"],
        description="fused linear-head JSD vs eager TRL and Liger-Kernel",
    ),
    "preference": Op(
        "bench_preference.py", ["--quick"], description="DPO, CPO/SimPO, TDPO2, SparsePO vs peers"
    ),
    "ot": Op("bench_ot.py", ["--quick"], description="Sinkhorn vs POT (and GeomLoss)"),
    "trainers": Op(
        "bench_trainers.py",
        ["--quick"],
        uses_json=True,
        description="divkit's TRL and Hugging Face trainers vs the stock trainers",
        by_default=False,  # slow: trains Hugging Face models
    ),
}

#: The benchmarks that ``divkit bench`` runs without ``--op``: the kernel benchmarks.
DEFAULT_OPS: List[str] = [name for name, op in OPS.items() if op.by_default]


@dataclass
class Check:
    """The result of checking one script's output."""

    compared: int = 0
    max_rel: float = 0.0
    mismatches: List[str] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)

    def compare(self, what: str, got: float, ref: float, rtol: float) -> None:
        rel = abs(got - ref) / max(abs(ref), 1e-12)
        self.compared += 1
        self.max_rel = max(self.max_rel, rel)
        if not rel <= rtol:  # also catches NaN
            self.mismatches.append(
                f"{what}: {got!r} vs reference {ref!r} (relative difference {rel:.2e} > {rtol:.0e})"
            )


def find_bench_dir(explicit: Optional[str] = None) -> Path:
    """The folder holding the benchmark scripts: ``explicit``, ``$DIVKIT_BENCH_DIR``, the
    source checkout of the package (``<repo>/bench`` next to ``<repo>/python/divkit``), or
    ``./bench``. Raises :class:`BenchError` when none holds them."""
    wanted = OPS["divergence"].script
    if explicit is not None or os.environ.get("DIVKIT_BENCH_DIR"):
        d = Path(explicit if explicit is not None else os.environ["DIVKIT_BENCH_DIR"])
        if not (d / wanted).is_file():
            raise BenchError(f"{d}: not a divkit bench/ folder (no {wanted} in it)")
        return d
    here = Path(__file__).resolve()  # <repo>/python/divkit/tools/bench.py in a source checkout
    checkout = here.parents[3] if len(here.parents) > 3 else here.parent
    for d in (checkout / "bench", Path.cwd() / "bench"):
        if (d / wanted).is_file():
            return d
    raise BenchError(
        "the benchmark scripts (bench/bench_*.py) were not found: they are part of divkit's "
        "source checkout, not of the installed package (looked in "
        f"{checkout / 'bench'} and {Path.cwd() / 'bench'}). Run `divkit bench` from "
        "a checkout of the repository, or pass --bench-dir PATH (or set DIVKIT_BENCH_DIR)."
    )


# ---------------------------------------------------------------------------------------------
# Checks, one per script
# ---------------------------------------------------------------------------------------------


def _check_divergence(stdout: str, json_path: Optional[str]) -> Check:
    c = Check()
    if not json_path or not os.path.exists(json_path):
        c.mismatches.append("bench_divergence.py wrote no JSON results")
        return c
    with open(json_path) as f:
        saved = json.load(f)
    for res in saved.get("results", []):
        tag = f"{res['kind']} V={res['v']} {res['dtype']}"
        vs = res.get("variants", {})
        dk = vs.get("divkit") or vs.get("divkit_inplace")
        if not dk or "error" in dk:
            c.mismatches.append(f"{tag}: divkit failed: {(dk or {}).get('error', 'not run')}")
            continue
        ref = dk["loss"]
        for name, r in vs.items():
            if "error" in r:
                if name.startswith("divkit"):
                    c.mismatches.append(f"{tag} {name}: {r['error']}")
                else:
                    c.notes.append(f"{tag} {name} not run: {r['error']}")
                continue
            if r is dk:
                continue
            # divkit's variants compute in fp32 alike; TRL's eager and compiled loss compute
            # in the logits' dtype.
            low = res["dtype"] != "fp32" and not name.startswith("divkit")
            c.compare(f"{tag} {name} loss", r["loss"], ref, RTOL_LOW if low else RTOL_FP32)
    if c.compared == 0 and not c.mismatches:
        c.notes.append("no peer ran: nothing to check against")
    return c


_ROW = re.compile(r"^\|(.+)\|\s*$")


def _table_rows(text: str, first_header: str) -> List[Dict[str, str]]:
    """The rows of the Markdown table whose first header cell is ``first_header``."""
    rows: List[Dict[str, str]] = []
    header: Optional[List[str]] = None
    for line in text.splitlines():
        m = _ROW.match(line.strip())
        if not m:
            header = None
            continue
        cells = [x.strip() for x in m.group(1).split("|")]
        if header is None:
            if cells and cells[0] == first_header:
                header = cells
            continue
        if all(set(x) <= set("-: ") for x in cells):
            continue
        rows.append(dict(zip(header, cells)))
    return rows


def _check_fused_linear(stdout: str, json_path: Optional[str]) -> Check:
    c = Check()
    rows = _table_rows(stdout, "N")
    if not rows:
        c.mismatches.append("bench_fused_linear.py printed no result table")
        return c
    for r in rows:
        tag = f"N={r.get('N')} V={r.get('V')} {r.get('dtype')} {r.get('variant')}"
        diff = r.get("loss rel. diff", "")
        if r.get("time") == "-":  # an error row: the reason is in the last column
            (c.mismatches if r.get("variant") == "divkit" else c.notes).append(f"{tag}: {diff}")
            continue
        if r.get("variant") in ("divkit", "gemm_floor") or diff == "-":
            continue
        try:
            rel = float(diff)
        except ValueError:
            c.mismatches.append(f"{tag}: unreadable loss difference {diff!r}")
            continue
        rtol = RTOL_FP32 if r.get("dtype") == "float32" else RTOL_LOW
        c.compare(f"{tag} loss", 1.0 + rel, 1.0, rtol)  # the script prints |a - b| / |b|
    return c


# bench_preference.py's side-by-side table: divkit case, peer case, divkit s, peer s, speed,
# divkit MiB, peer MiB, memory, target, losses.
_PREF = re.compile(
    r"^(\w+)\s+(\w+)\s+(\S+)\s+(\S+)\s+(\S+)x\s+(\S+)\s+(\S+)\s+(\S+)x\s+(.*?)\s*"
    r"\(losses (\S+) vs (\S+)\)\s*$"
)


def _check_preference(stdout: str, json_path: Optional[str]) -> Check:
    c = Check()
    for line in stdout.splitlines():
        m = _PREF.match(line.strip())
        if m:
            c.compare(
                f"{m.group(1)} loss (vs {m.group(2)})",
                float(m.group(10)),
                float(m.group(11)),
                RTOL_FP32,
            )
        elif re.match(r"^\w+: failed", line.strip()):
            (c.mismatches if "_divkit" in line.split(":")[0] else c.notes).append(line.strip())
    if c.compared == 0 and not c.mismatches:
        c.mismatches.append("bench_preference.py printed no loss comparison")
    return c


_OT = re.compile(r"^\s*(\S+) n=\s*(\d+) d=\s*(\d+) time .* L1 err (\S+)\s+cost (\S+)\s*$")


def _check_ot(stdout: str, json_path: Optional[str]) -> Check:
    """Transport costs <P, C> of divkit and POT for the same problem. The plans differ by their
    marginal errors (the solvers stop on different norms), so the tolerance grows with them:
    1e-4 + 2 (L1 error of one + L1 error of the other), relative."""
    c = Check()
    found: Dict[Tuple[str, str], Dict[str, Tuple[float, float]]] = {}
    for line in stdout.splitlines():
        m = _OT.match(line)
        if m:
            found.setdefault((m.group(2), m.group(3)), {})[m.group(1)] = (
                float(m.group(4)),
                float(m.group(5)),
            )
        elif "failed" in line and line.startswith("# divkit"):
            c.mismatches.append(line.strip("# ").strip())
    if not found:
        c.mismatches.append("bench_ot.py printed no results")
        return c
    for (n, d), solvers in found.items():
        refs = [s for s in ("pot-log", "pot") if s in solvers]
        ref = refs[0] if refs else ("divkit-f64" if "divkit-f64" in solvers else None)
        if ref is None:
            continue
        ref_err, ref_cost = solvers[ref]
        for s, (err, cost) in solvers.items():
            if s == ref or not s.startswith("divkit"):
                continue  # GeomLoss reports its regularized cost: not comparable
            c.compare(
                f"n={n} d={d} {s} transport cost vs {ref}",
                cost,
                ref_cost,
                RTOL_FP32 + 2 * (abs(err) + abs(ref_err)),
            )
    return c


def _preference_tables(text: str) -> str:
    """bench_preference.py's side-by-side table, rendered as docs/benchmarks.md's."""
    rows = [m.groups() for m in map(_PREF.match, (x.strip() for x in text.splitlines())) if m]
    if not rows:
        return ""
    first = text.strip().splitlines()[0]
    L = [
        first,
        "",
        "| divkit case | peer | divkit s | peer s | speed (peer / divkit) | divkit peak MiB | "
        "peer peak MiB | memory (peer / divkit) | target | loss divkit | loss peer |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|---:|---:|",
    ]
    for r in rows:
        L.append(
            f"| {r[0]} | {r[1]} | {r[2]} | {r[3]} | {r[4]}x | {r[5]} | {r[6]} | {r[7]}x | "
            f"{r[8]} | {r[9]} | {r[10]} |"
        )
    return "\n".join(L)


TABLES: Dict[str, Callable[[str], str]] = {
    "preference": _preference_tables,
    "ot": lambda text: markdown_tables(text, captions=False),  # above it: progress lines
}


RTOL_TRAJECTORY = 2e-3


def _check_trainers(stdout: str, json_path: Optional[str]) -> Check:
    """bench_trainers.py's JSON: each divkit trainer's logged losses against the stock
    trainer's of the same round (same weights, same batches): step 0 to fp32 round-off, the
    later steps to what it grows to through the optimizer steps."""
    c = Check()
    if not json_path or not os.path.exists(json_path):
        c.mismatches.append("bench_trainers.py wrote no JSON results")
        return c
    with open(json_path) as f:
        saved = json.load(f)
    for case, why in saved.get("failures", {}).items():
        stock = case.endswith(("_trl", "_stock"))
        (c.notes if stock else c.mismatches).append(f"{case} failed: {why}")
    runs = saved.get("runs", {})
    for row in saved.get("rows", []):
        stock, dk = row["stock"], row["divkit"]
        # A round's runs of the two trainers (a failed run leaves its round out).
        stock_runs = {r.get("round", i): r for i, r in enumerate(runs.get(stock, []))}
        for i, d in enumerate(runs.get(dk, [])):
            rnd = d.get("round", i)
            if rnd not in stock_runs:
                continue
            ls, ld = stock_runs[rnd]["losses"], d["losses"]
            if not ls or len(ls) != len(ld):
                c.mismatches.append(f"{dk} round {rnd + 1}: {len(ld)} losses vs {len(ls)}")
                continue
            c.compare(f"{dk} vs {stock} round {rnd + 1} step 0 loss", ld[0], ls[0], RTOL_FP32)
            for step, (x, y) in enumerate(zip(ld[1:], ls[1:]), 1):
                c.compare(
                    f"{dk} vs {stock} round {rnd + 1} step {step} loss", x, y, RTOL_TRAJECTORY
                )
    if c.compared == 0 and not c.mismatches:
        c.mismatches.append("bench_trainers.py compared no losses")
    return c


CHECKS: Dict[str, Callable[[str, Optional[str]], Check]] = {
    "divergence": _check_divergence,
    "fused_linear": _check_fused_linear,
    "preference": _check_preference,
    "ot": _check_ot,
    "trainers": _check_trainers,
}


def check_output(op: str, stdout: str, json_path: Optional[str] = None) -> Check:
    """Checks the output of one benchmark script (see the module's table)."""
    return CHECKS[op](stdout, json_path)


def markdown_tables(text: str, captions: bool = True) -> str:
    """The Markdown tables of a script's output, each with its caption (with ``captions``: the
    nearest non-blank line before it, at most one blank line above the table)."""
    lines = [x.rstrip() for x in text.splitlines()]
    out: List[str] = []
    for i, line in enumerate(lines):
        if not line.lstrip().startswith("|"):
            continue
        if i == 0 or not lines[i - 1].lstrip().startswith("|"):  # a table starts
            if out:
                out.append("")
            j = i - 1
            while j >= 0 and not lines[j].strip():
                j -= 1
            if captions and j >= 0 and j >= i - 2 and not lines[j].lstrip().startswith(("|", "#")):
                out += [lines[j].strip(), ""]
        out.append(line)
    return "\n".join(out)


# ---------------------------------------------------------------------------------------------
# Running
# ---------------------------------------------------------------------------------------------


def _run_script(cmd: List[str], echo) -> Tuple[int, str]:
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1
    )
    chunks = []
    assert proc.stdout is not None
    for line in proc.stdout:
        chunks.append(line)
        if echo is not None:
            echo.write(line)
            echo.flush()
    return proc.wait(), "".join(chunks)


def run_bench(
    ops: Sequence[str],
    *,
    quick: bool = False,
    extra: Sequence[str] = (),
    bench_dir: Optional[str] = None,
    echo="stderr",
    out=None,
) -> int:
    """Runs the benchmarks ``ops`` (keys of :data:`OPS`), echoing their progress to ``echo``
    and printing their Markdown tables and the checks to ``out``. ``extra`` arguments are
    passed to every script. Returns 0, or 1 when a script failed or a check found a
    mismatch. Raises :class:`BenchError` when the scripts are not found. ``echo`` is a
    stream, ``None`` (silent) or ``"stderr"`` (the current ``sys.stderr``); ``out`` defaults
    to the current ``sys.stdout``."""
    echo = sys.stderr if echo == "stderr" else echo
    out = sys.stdout if out is None else out
    for op in ops:
        if op not in OPS:
            raise BenchError(f"unknown --op {op!r}; choose from {', '.join(OPS)}")
    d = find_bench_dir(bench_dir)
    status = 0
    for op in ops:
        spec = OPS[op]
        cmd = [sys.executable, str(d / spec.script)]
        if quick:
            cmd += list(spec.quick)
        cmd += list(extra)
        tmp = None
        json_path = md_path = None
        if spec.uses_json:
            tmp = tempfile.TemporaryDirectory(prefix="divkit-bench-")
            json_path = os.path.join(tmp.name, "results.json")
            md_path = os.path.join(tmp.name, "results.md")
            cmd += ["--json", json_path, "--markdown", md_path]
        try:
            if echo is not None:
                echo.write(f"[divkit bench] {op}: {' '.join(cmd)}\n")
                echo.flush()
            rc, text = _run_script(cmd, echo)
            print(f"## {op} ({spec.description}; bench/{spec.script})\n", file=out)
            if md_path and os.path.exists(md_path):
                with open(md_path) as f:  # the script's own Markdown report
                    tables = f.read().strip()
            else:
                tables = TABLES.get(op, markdown_tables)(text)
            print(tables or "(no table in the output)", file=out)
            print(file=out)
            if rc != 0:
                tail = "\n".join(text.strip().splitlines()[-5:])
                print(f"FAILED: bench/{spec.script} exited with code {rc}:\n{tail}\n", file=out)
                status = 1
                continue
            chk = check_output(op, text, json_path)
        finally:
            if tmp is not None:
                tmp.cleanup()
        for note in chk.notes:
            print(f"note: {note}", file=out)
        if chk.mismatches:
            status = 1
            print(
                f"MISMATCH ({len(chk.mismatches)} problem(s); {chk.compared} value(s) compared):",
                file=out,
            )
            for m in chk.mismatches:
                print(f"  {m}", file=out)
        else:
            print(
                f"checked: {chk.compared} value(s) against the reference, largest relative "
                f"difference {chk.max_rel:.1e}",
                file=out,
            )
        print(file=out)
    return status


def run_cli(args) -> int:
    """The ``divkit bench`` subcommand (see :mod:`divkit.cli`)."""
    ops = args.op or list(DEFAULT_OPS)
    try:
        return run_bench(
            ops,
            quick=args.quick,
            extra=args.extra,
            bench_dir=args.bench_dir,
            echo=None if args.quiet else "stderr",
        )
    except BenchError as e:
        print(f"divkit bench: error: {e}", file=sys.stderr)
        return 2


def add_parser(sub) -> None:
    """Registers ``bench`` on an argparse subparsers object."""
    p = sub.add_parser(
        "bench",
        help="run the benchmarks (checking results against the peers) and print their tables",
        description="Runs the benchmark scripts of the source checkout's bench/ folder, checks "
        "divkit's results against the peers' (TRL, Liger-Kernel, POT) and prints "
        "their Markdown tables. Exit code 1 on a mismatch or a failed script, 2 "
        "when the scripts are not found. Arguments after `--` go to the scripts, "
        "e.g. `divkit bench --op divergence --quick -- --kinds jsd --dtypes fp32`.",
    )
    p.add_argument(
        "--op",
        action="append",
        choices=list(OPS),
        help="benchmark to run (repeatable; default: "
        + ", ".join(DEFAULT_OPS)
        + "; trainers only when named). "
        + "; ".join(f"{k}: {v.description}" for k, v in OPS.items()),
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="the scripts' small sizes (seconds to a few minutes each)",
    )
    p.add_argument(
        "--bench-dir",
        metavar="PATH",
        help="folder of the bench_*.py scripts (default: the source checkout's "
        "bench/, or $DIVKIT_BENCH_DIR)",
    )
    p.add_argument("--quiet", action="store_true", help="do not echo the scripts' progress")
    p.add_argument("extra", nargs="*", metavar="-- ARGS", help="arguments passed on to the scripts")
    p.set_defaults(func=run_cli)
