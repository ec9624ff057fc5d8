#!/usr/bin/env python3
"""divkit's trainers vs the stock TRL / Hugging Face trainers, side by side in one run: time per
training step, CPU time per step, peak memory, and the agreement of the logged losses.

    python bench/bench_trainers.py                  # full sizes (below)
    python bench/bench_trainers.py --quick          # tiny sizes, under a minute
    python bench/bench_trainers.py --pairs dpo,hf --json out.json --markdown out.md

Pairs (stock trainer vs divkit's), all on the same tiny ``LlamaForCausalLM`` built from a config
(no download): hidden --hidden (256), 2 layers, a vocabulary of --vocab (32000) words, so that
the lm_head dominates the step as in a real LM; a word-level tokenizer over those words built
here; random word sequences of --seq tokens (prompt a quarter, completion the rest), --batch (4)
sequences per step (KTO: and as many mismatched ones for its KL term; DPO, CPO and ORPO: half as
many chosen / rejected pairs):

==========  ==============================================  ========================================
pair        stock                                           divkit
==========  ==============================================  ========================================
dpo         ``trl.DPOTrainer`` (sigmoid; TRL's chunked      ``DivkitDPOTrainer`` (divkit's fused head
            fused head on the policy and the reference)     from the hidden states, divkit's loss)
kto         ``trl.KTOTrainer`` (kto)                        ``DivkitKTOTrainer``
gkd         ``trl.experimental.gkd.GKDTrainer`` (lmbda 0,   ``DivkitGKDTrainer`` (fused JSD from both
            JSD beta 0.5 on both models' full logits)       models' hidden states, no logits)
cpo         ``trl.experimental.cpo.CPOTrainer`` (sigmoid)   ``DivkitCPOTrainer`` (divkit's cpo_loss)
orpo        ``trl.experimental.orpo.ORPOTrainer``           ``DivkitORPOTrainer`` (odds_ratio_loss)
hf          ``transformers.Trainer``, the model's own       ``compute_loss_func=FusedCrossEntropyLoss``
            causal-LM loss                                  (``hf_divkit``) and ``apply_divkit_kernel``
                                                            (``hf_patched``)
==========  ==============================================  ========================================

The pairs compute the same math (same loss, same reduction), so their logged losses agree at
step 0 to fp32 round-off and stay together after (round-off grows through the Adam steps).

Each trainer runs in its own subprocess for --warmup + --steps optimizer steps (fp32, CPU,
constant learning rate, logging every step); the subprocesses of a pair alternate, --rounds
times, their order reversed every other round. Per trainer: the median over the timed steps of
the wall time and the CPU time (``time.process_time``: all threads of the process; on a shared
machine the wall time counts the waits, the CPU time does not) of one step (forward, backward,
optimizer), then the median over the rounds; "peak MiB" is the process's peak RSS during the
training steps (VmHWM, reset through /proc/self/clear_refs just before the first step) minus
its RSS then (the models, data and trainer excluded), the largest over the rounds. The loss
columns: the largest difference between the two trainers' logged losses, at step 0 and over all
steps (relative to the stock trainer's loss).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import warnings

PAIRS = {
    "dpo": ("dpo_trl", "dpo_divkit"),
    "kto": ("kto_trl", "kto_divkit"),
    "gkd": ("gkd_trl", "gkd_divkit"),
    "cpo": ("cpo_trl", "cpo_divkit"),
    "orpo": ("orpo_trl", "orpo_divkit"),
    "hf": ("hf_stock", "hf_divkit", "hf_patched"),
}
NAMES = {
    "dpo": "DPO (sigmoid)",
    "kto": "KTO",
    "gkd": "GKD (JSD, lmbda 0)",
    "cpo": "CPO (sigmoid)",
    "orpo": "ORPO",
    "hf": "HF Trainer, causal-LM CE",
}


# ---------------------------------------------------------------------------------------------
# Worker: one trainer in this process
# ---------------------------------------------------------------------------------------------


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def hwm_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets the peak RSS (VmHWM) to the current RSS
        return True
    except OSError:
        return False


def make_tokenizer(vocab: int):
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    special = ["<pad>", "<eos>", "<unk>", "<bos>", "user", "assistant"]
    words = special + [f"w{i}" for i in range(vocab - len(special))]
    tok = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        eos_token="<eos>",
        unk_token="<unk>",
        bos_token="<bos>",
    )
    # Special tokens are split off before the pre-tokenizer ("w5<eos>" is two tokens).
    fast.add_special_tokens({"additional_special_tokens": ["<eos>"]})
    fast.padding_side = "left"
    fast.chat_template = (
        "{% for m in messages %}{{ m['role'] }} {{ m['content'] }} "
        "{% endfor %}{% if add_generation_prompt %}assistant {% endif %}"
    )
    return fast


def make_model(seed: int, a):
    import torch
    import transformers

    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(
        vocab_size=a.vocab,
        hidden_size=a.hidden,
        intermediate_size=2 * a.hidden,
        num_hidden_layers=a.layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=2 * a.seq + 64,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=3,
        tie_word_embeddings=False,
    )
    return transformers.LlamaForCausalLM(cfg).float()


def make_texts(a, n: int, seed: int):
    """n random (prompt, completion, other completion) texts: the prompt a quarter of --seq words,
    the completions the rest (one word less: TRL appends the EOS)."""
    import random

    rng = random.Random(seed)
    p = max(1, a.seq // 4)
    c = max(1, a.seq - p - 1)

    def words(k):
        return " ".join(f"w{rng.randrange(a.vocab - 6)}" for _ in range(k))

    return [(words(p), " " + words(c), " " + words(c)) for _ in range(n)]


def run_case(case: str, a) -> dict:
    import datasets
    import torch
    import transformers

    for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        os.environ.setdefault(k, "1")
    os.environ.setdefault("WANDB_DISABLED", "true")
    warnings.simplefilter("ignore")
    transformers.logging.set_verbosity_error()
    datasets.disable_progress_bars()

    pair = case.split("_")[0]
    divkit_side = not case.endswith(("_trl", "_stock"))
    steps = a.warmup + a.steps
    tok = make_tokenizer(a.vocab)
    texts = make_texts(a, a.batch * steps, seed=1)
    out_dir = tempfile.mkdtemp(prefix=f"divkit-bench-{case}-")
    # --batch sequences per step: the paired trainers (DPO, CPO, ORPO) take half as many pairs.
    per_step = max(1, a.batch // 2) if pair in ("dpo", "cpo", "orpo") else a.batch
    common = dict(
        output_dir=out_dir,
        per_device_train_batch_size=per_step,
        max_steps=steps,
        learning_rate=1e-4,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        bf16=False,
        fp16=False,
        seed=0,
        data_seed=0,
        dataloader_num_workers=0,
        disable_tqdm=True,
        lr_scheduler_type="constant",
        warmup_steps=0,
    )
    max_length = a.seq + 8
    pref = datasets.Dataset.from_dict(
        {
            "prompt": [p for p, _, _ in texts],
            "chosen": [c for _, c, _ in texts],
            "rejected": [r for _, _, r in texts],
        }
    )
    model = make_model(0, a)
    kwargs = {}
    if pair == "dpo":
        from trl import DPOConfig, DPOTrainer

        from divkit.integrations.trl import DivkitDPOTrainer

        cls = DivkitDPOTrainer if divkit_side else DPOTrainer
        args = DPOConfig(**common, beta=0.1, max_length=max_length, precompute_ref_log_probs=False)
        kwargs = dict(ref_model=make_model(1, a), train_dataset=pref)
    elif pair == "kto":
        from trl import KTOConfig, KTOTrainer

        from divkit.integrations.trl import DivkitKTOTrainer

        cls = DivkitKTOTrainer if divkit_side else KTOTrainer
        half = a.batch * steps // 2 + 1
        data = datasets.Dataset.from_dict(
            {
                "prompt": [p for p, _, _ in texts[:half]] * 2,
                "completion": [c for _, c, _ in texts[:half]] + [r for _, _, r in texts[:half]],
                "label": [True] * half + [False] * half,
            }
        )
        args = KTOConfig(**common, beta=0.1, max_length=max_length)
        kwargs = dict(ref_model=make_model(1, a), train_dataset=data)
    elif pair == "gkd":
        from trl.experimental.gkd import GKDConfig, GKDTrainer

        from divkit.integrations import trl as dk_trl

        cls = dk_trl.DivkitGKDTrainer if divkit_side else GKDTrainer
        teacher = make_model(1, a)
        with torch.no_grad():  # a confident teacher: a JSD well away from 0
            teacher.lm_head.weight.mul_(10.0)
        data = datasets.Dataset.from_dict(
            {
                "messages": [
                    [{"role": "user", "content": p}, {"role": "assistant", "content": c.strip()}]
                    for p, c, _ in texts
                ]
            }
        )
        args = GKDConfig(**common, lmbda=0.0, beta=0.5, temperature=1.0, max_length=max_length + 8)
        kwargs = dict(teacher_model=teacher, train_dataset=data)
    elif pair in ("cpo", "orpo"):
        from divkit.integrations import trl as dk_trl

        if pair == "cpo":
            from trl.experimental.cpo import CPOConfig as Config
            from trl.experimental.cpo import CPOTrainer as Stock

            cls = dk_trl.DivkitCPOTrainer if divkit_side else Stock
            args = Config(**common, beta=0.1, max_length=max_length)
        else:
            from trl.experimental.orpo import ORPOConfig as Config
            from trl.experimental.orpo import ORPOTrainer as Stock

            cls = dk_trl.DivkitORPOTrainer if divkit_side else Stock
            args = Config(**common, beta=0.1, max_length=max_length)
        kwargs = dict(train_dataset=pref)
    elif pair == "hf":
        from divkit.integrations import hf

        ids = [tok(p + c)["input_ids"][: a.seq] for p, c, _ in texts]
        data = datasets.Dataset.from_dict({"input_ids": ids, "labels": ids})
        cls = transformers.Trainer
        args = transformers.TrainingArguments(**common)
        kwargs = dict(train_dataset=data)
        if case == "hf_divkit":
            kwargs["compute_loss_func"] = hf.FusedCrossEntropyLoss(model)
        elif case == "hf_patched":
            hf.apply_divkit_kernel(model)
    else:
        raise SystemExit(f"unknown case {case!r}")

    timing = {"wall": [], "cpu": [], "base": None, "hwm_reset": None}

    class Timer(transformers.TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            if timing["base"] is None:  # just before the first step: the memory baseline
                import gc

                gc.collect()
                timing["hwm_reset"] = reset_hwm()
                timing["base"] = rss_mib()
                timing["peak0"] = hwm_mib()
            self.t0, self.c0 = time.perf_counter(), time.process_time()

        def on_step_end(self, args, state, control, **kw):
            timing["wall"].append(time.perf_counter() - self.t0)
            timing["cpu"].append(time.process_time() - self.c0)

    processing = {} if pair == "hf" else {"processing_class": tok}
    trainer = cls(model=model, args=args, callbacks=[Timer()], **processing, **kwargs)
    trainer.train()
    losses = [float(h["loss"]) for h in trainer.state.log_history if "loss" in h]
    shutil.rmtree(out_dir, ignore_errors=True)
    timed = slice(a.warmup, None)
    peak = hwm_mib()
    if not timing["hwm_reset"]:  # the peak of the whole process: an upper bound
        peak = max(peak, timing["peak0"])
    return {
        "case": case,
        "wall_s": statistics.median(timing["wall"][timed]),
        "cpu_s": statistics.median(timing["cpu"][timed]),
        "wall_all": timing["wall"],
        "peak_mib": max(0.0, peak - timing["base"]),
        "base_mib": timing["base"],
        "hwm_reset": timing["hwm_reset"],
        "losses": losses,
    }


# ---------------------------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------------------------


def _run(cmd) -> str:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def load() -> str:
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def machine_description() -> dict:
    import torch
    import transformers
    import trl

    lscpu = {}
    for line in _run(["lscpu"]).splitlines():
        if ":" in line:
            k, v = line.split(":", 1)
            lscpu[k.strip()] = v.strip()
    mem = "?"
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                mem = f"{int(line.split()[1]) / 2**20:.1f} GiB"
    return {
        "cpu": lscpu.get("Model name", platform.processor() or platform.machine()),
        "cpus": lscpu.get("CPU(s)", str(os.cpu_count())),
        "memory": mem,
        "python": platform.python_version(),
        "torch": f"{torch.__version__} ({torch.get_num_threads()} threads)",
        "transformers": transformers.__version__,
        "trl": trl.__version__,
    }


def loss_diffs(ref, got):
    """(relative difference at step 0, largest absolute difference over the steps, largest
    relative difference over the steps) of two logged-loss lists."""
    if not ref or len(ref) != len(got):
        return float("nan"), float("nan"), float("nan")
    absd = [abs(x - y) for x, y in zip(ref, got)]
    rel = [d / max(abs(x), 1e-12) for d, x in zip(absd, ref)]
    return rel[0], max(absd), max(rel)


def summarize(runs, pairs):
    rows = []
    for pair in pairs:
        stock = PAIRS[pair][0]
        s = runs.get(stock) or []
        for dk in PAIRS[pair][1:]:
            d = runs.get(dk) or []
            row = {"pair": pair, "stock": stock, "divkit": dk}
            for side, rs in (("stock", s), ("divkit", d)):
                if rs:
                    row[f"{side}_wall_s"] = statistics.median(r["wall_s"] for r in rs)
                    row[f"{side}_cpu_s"] = statistics.median(r["cpu_s"] for r in rs)
                    row[f"{side}_peak_mib"] = max(r["peak_mib"] for r in rs)
                    row[f"{side}_rounds"] = [[r["wall_s"], r["cpu_s"]] for r in rs]
            if s and d:
                # Loss agreement within each round (both ran the same steps on the same data).
                by_round = {x["round"]: x for x in s}
                diffs = [
                    loss_diffs(by_round[y["round"]]["losses"], y["losses"])
                    for y in d
                    if y["round"] in by_round
                ]
                row["loss_step0_rel"] = max(x[0] for x in diffs)
                row["loss_max_abs"] = max(x[1] for x in diffs)
                row["loss_max_rel"] = max(x[2] for x in diffs)
                row["stock_loss0"] = s[0]["losses"][0] if s[0]["losses"] else float("nan")
                row["divkit_loss0"] = d[0]["losses"][0] if d[0]["losses"] else float("nan")
                row["speed"] = row["stock_wall_s"] / row["divkit_wall_s"]
                row["cpu_ratio"] = row["stock_cpu_s"] / row["divkit_cpu_s"]
                dm = row["divkit_peak_mib"]
                row["mem_ratio"] = row["stock_peak_mib"] / dm if dm > 1 else float("nan")
            rows.append(row)
    return rows


def fmt(x, spec):
    return "-" if x is None or (isinstance(x, float) and x != x) else format(x, spec)


def table_markdown(rows) -> str:
    L = [
        "| pair | divkit side | stock s/step | divkit s/step | speed (stock / divkit) | "
        "stock CPU s | divkit CPU s | CPU (stock / divkit) | stock peak MiB | divkit peak MiB | "
        "memory (stock / divkit) | loss step 0 rel. diff | loss max abs. diff | "
        "rounds: wall / CPU s (stock; divkit) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]

    def rounds(xs):
        return ", ".join(f"{w:.2f}/{c:.2f}" for w, c in xs or [])

    for r in rows:
        L.append(
            f"| {NAMES[r['pair']]} | {r['divkit']} | {fmt(r.get('stock_wall_s'), '.3f')} | "
            f"{fmt(r.get('divkit_wall_s'), '.3f')} | {fmt(r.get('speed'), '.2f')}x | "
            f"{fmt(r.get('stock_cpu_s'), '.3f')} | {fmt(r.get('divkit_cpu_s'), '.3f')} | "
            f"{fmt(r.get('cpu_ratio'), '.2f')}x | {fmt(r.get('stock_peak_mib'), '.0f')} | "
            f"{fmt(r.get('divkit_peak_mib'), '.0f')} | {fmt(r.get('mem_ratio'), '.1f')}x | "
            f"{fmt(r.get('loss_step0_rel'), '.1e')} | {fmt(r.get('loss_max_abs'), '.1e')} | "
            f"{rounds(r.get('stock_rounds'))}; {rounds(r.get('divkit_rounds'))} |"
        )
    return "\n".join(L)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny sizes (under a minute)")
    p.add_argument("--pairs", default=",".join(PAIRS), help="comma-separated: " + ", ".join(PAIRS))
    p.add_argument(
        "--batch",
        type=int,
        default=4,
        help="sequences per step (DPO, CPO, ORPO: half as many pairs)",
    )
    p.add_argument("--seq", type=int, default=256, help="tokens per sequence")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    p.add_argument("--steps", type=int, default=3, help="timed steps")
    p.add_argument("--rounds", type=int, default=2, help="alternating rounds of each pair")
    p.add_argument("--json", metavar="FILE", help="also write the raw results as JSON")
    p.add_argument("--markdown", metavar="FILE", help="also write the report as markdown")
    p.add_argument("--case", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.quick:
        a.batch, a.seq, a.hidden, a.vocab, a.warmup, a.steps, a.rounds = 2, 32, 32, 512, 1, 2, 1
    if a.case:
        for case in a.case.split(","):
            print("RESULT " + json.dumps(run_case(case, a)), flush=True)
        return
    pairs = [x.strip() for x in a.pairs.split(",") if x.strip()]
    for x in pairs:
        if x not in PAIRS:
            p.error(f"unknown pair {x!r}; choose from {', '.join(PAIRS)}")
    machine = machine_description()
    load_before = load()
    uptime_before = _run(["uptime"])
    sizes = (
        f"LlamaForCausalLM {a.layers} layers, hidden {a.hidden}, V={a.vocab}; batch {a.batch} x "
        f"{a.seq} tokens; {a.warmup} warm-up + {a.steps} timed steps; {a.rounds} rounds"
    )
    print(
        f"{machine['cpu']}, {machine['cpus']} cpus, {machine['memory']}; torch {machine['torch']}, "
        f"transformers {machine['transformers']}, trl {machine['trl']}\n{sizes}\n"
        f"load average before: {load_before}",
        flush=True,
    )
    worker = [
        "--batch", str(a.batch), "--seq", str(a.seq), "--hidden", str(a.hidden),
        "--layers", str(a.layers), "--vocab", str(a.vocab), "--warmup", str(a.warmup),
        "--steps", str(a.steps),
    ]  # fmt: skip
    runs, failures = {}, {}
    for rnd in range(a.rounds):
        order = [c for pair in pairs for c in (PAIRS[pair] if rnd % 2 == 0 else PAIRS[pair][::-1])]
        # One process per trainer (its own peak RSS); with --quick one process for them all (the
        # imports cost more than the tiny steps; the peaks are then only indicative).
        groups = [order] if a.quick else [[c] for c in order]
        for group in groups:
            r = subprocess.run(
                [sys.executable, os.path.abspath(__file__), "--case", ",".join(group), *worker],
                capture_output=True,
                text=True,
            )
            results = [
                json.loads(x[len("RESULT ") :])
                for x in r.stdout.splitlines()
                if x.startswith("RESULT ")
            ]
            for case in group[len(results) :]:
                tail = (r.stderr.strip().splitlines() or ["?"])[-1]
                failures[case] = tail
                print(f"{case}: failed ({r.returncode}): {tail}", flush=True)
            for res in results:
                case, res["round"] = res["case"], rnd
                runs.setdefault(case, []).append(res)
                print(
                    f"round {rnd + 1} {case}: {res['wall_s']:.3f} s/step, CPU {res['cpu_s']:.3f} "
                    f"s, peak +{res['peak_mib']:.0f} MiB, losses "
                    + " ".join(f"{x:.6f}" for x in res["losses"]),
                    flush=True,
                )
    rows = summarize(runs, pairs)
    load_after = load()
    uptime_after = _run(["uptime"])
    print(f"load average after: {load_after}")
    print(f"medians over {a.rounds} alternating round(s) of the per-step medians")
    head = (
        f"{'pair':<6}{'divkit side':<12}{'stock s':>9}{'divkit s':>9}{'speed':>7}"
        f"{'stock CPU':>10}{'dk CPU':>8}{'CPU':>7}{'stock MiB':>10}{'dk MiB':>8}{'mem':>7}"
        f"{'loss0 rel':>11}{'loss max abs':>13}"
    )
    print(head)
    for r in rows:
        print(
            f"{r['pair']:<6}{r['divkit']:<12}{fmt(r.get('stock_wall_s'), '9.3f'):>9}"
            f"{fmt(r.get('divkit_wall_s'), '9.3f'):>9}{fmt(r.get('speed'), '6.2f'):>6}x"
            f"{fmt(r.get('stock_cpu_s'), '10.3f'):>10}{fmt(r.get('divkit_cpu_s'), '8.3f'):>8}"
            f"{fmt(r.get('cpu_ratio'), '6.2f'):>6}x{fmt(r.get('stock_peak_mib'), '10.0f'):>10}"
            f"{fmt(r.get('divkit_peak_mib'), '8.0f'):>8}{fmt(r.get('mem_ratio'), '6.1f'):>6}x"
            f"{fmt(r.get('loss_step0_rel'), '11.1e'):>11}{fmt(r.get('loss_max_abs'), '13.1e'):>13}"
        )
    # One line per pair for scripts (divkit bench, the smoke test) to read.
    for r in rows:
        print(
            f"loss agreement {r['divkit']} vs {r['stock']}: step 0 relative difference "
            f"{fmt(r.get('loss_step0_rel'), '.2e')}, largest over the steps "
            f"{fmt(r.get('loss_max_rel'), '.2e')} relative, {fmt(r.get('loss_max_abs'), '.2e')} "
            "absolute"
        )
    cmd = "python bench/bench_trainers.py " + " ".join(sys.argv[1:])
    md = "\n".join(
        [
            f"Machine: {machine['cpu']}, {machine['cpus']} CPUs, {machine['memory']}; Python "
            f"{machine['python']}, torch {machine['torch']}, transformers "
            f"{machine['transformers']}, trl {machine['trl']}.",
            f"Load: before `{uptime_before}`; after `{uptime_after}`.",
            f"Command: `{cmd.strip()}`; {sizes}.",
            "",
            table_markdown(rows),
        ]
    )
    if a.markdown:
        with open(a.markdown, "w") as f:
            f.write(md + "\n")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(
                {
                    "machine": machine,
                    "cmd": cmd.strip(),
                    "sizes": vars(a),
                    "load_before": uptime_before,
                    "load_after": uptime_after,
                    "runs": runs,
                    "failures": failures,
                    "rows": rows,
                },
                f,
                indent=1,
            )
    if failures:
        sys.exit(1)


if __name__ == "__main__":
    main()
