"""Preference tuning (DPO): what the cached reference costs against the notebook's two-model
computation, and what a DPO run changed in the answers.

    python benchmarks/bench_dpo.py subset --train-pairs 160 --out pairs-160.json
    python benchmarks/bench_dpo.py time --model RUN_OR_MODEL --steps 10
    python benchmarks/bench_dpo.py answers BEFORE.json AFTER.json --out docs/results/dpo-answers.json

`subset`: the book's preference file with only the first `--train-pairs` pairs of the seeded
training split left as they are: every other training pair gets its chosen response as the
rejected one, which `instruct dpo` skips. The split is by position, so validation and test stay
the full seeded splits: a shorter epoch on a slow machine, evaluated as the whole one would be.

`time`: each variant runs in a fresh process (peak RSS is a per-process high-water mark; the
two variants alternate, ABBA, over `--rounds`). Both build the pipeline's data (seeded 85/10/5
split, identical pairs dropped), keep the first `--steps` training batches and the whole
validation split, and train through the training loop with the book's settings (AdamW lr 5e-6,
weight decay 0.01, batch 8, an evaluation of 5 batches of each split every 5 steps, mean
log-probabilities, beta 0.1):

- ``cached`` (llmft): the starting model runs once over those pairs, then each step and
  each evaluation runs the policy only;
- ``two-model`` (the notebook): a frozen deep copy of the starting model runs beside the
  policy on every training and evaluation batch.

Reported per variant, in CPU seconds of the measuring process (robust to a shared machine's
load; with `--threads 1` the compute itself): the reference pass (the deep copy, for two
models), seconds per training step and per evaluation (both splits), an epoch estimate from them (the reference pass scaled to
the whole training split, the epoch's steps, an evaluation before training and every 5 steps)
and the peak RSS.

`answers`: two `instruct respond` files of the same entries (before and after DPO): ROUGE-L F1 of
each against ``chosen`` and against ``rejected``, and the first ten answers side by side, written
as JSON and printed as markdown.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

VARIANTS = ("cached", "two-model")
# CPU seconds of this process: on a machine shared with other work (the load drifts during a
# run), what one variant costs is its own CPU time, not the wall time it waited for a core.
CLOCK = time.process_time
RESULT = "BENCH-DPO "


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("time", help="cached reference vs two models: seconds and peak memory")
    t.add_argument("--model", required=True, help="an `instruct train` run or a model spec (the start)")
    t.add_argument("--data", default="instruction-data-with-preference")
    t.add_argument("--steps", type=int, default=10, help="training steps timed per process")
    t.add_argument("--rounds", type=int, default=1, help="processes per variant, in ABBA order")
    t.add_argument("--device", default="cpu")
    t.add_argument("--threads", type=int, help="torch threads (default: torch's own)")
    t.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)  # set in the measuring processes
    c = sub.add_parser("subset", help="the book's file with fewer training pairs, same validation and test")
    c.add_argument("--train-pairs", type=int, required=True)
    c.add_argument("--out", type=Path, required=True)
    a = sub.add_parser("answers", help="ROUGE-L against chosen/rejected, ten answers side by side")
    a.add_argument("before", type=Path)
    a.add_argument("after", type=Path)
    a.add_argument("--out", type=Path, required=True)
    a.add_argument("--show", type=int, default=10)
    return p.parse_args(argv)


def measure(args: argparse.Namespace) -> dict:
    """One variant in this process: the data, the start model, the reference, the loop."""
    import torch

    from llmft.pipelines.instruction import InstructionTask
    from llmft.pipelines.preference import (
        PreferenceOptions, PreferenceTask, load_preference_splits, load_start, pair_datasets, preference_loader,
        prepare_policy, reference_loaders,
    )
    from llmft.training.loop import TrainConfig, resolve_device, seed_everything, train
    from llmft.training.resources import peak_memory_mb

    if args.threads:
        torch.set_num_threads(args.threads)
    opts = PreferenceOptions(model=args.model, data=args.data, out=Path("unused"), train=TrainConfig(
        epochs=1, batch_size=8, lr=5e-6, weight_decay=0.01, eval_freq=5, eval_iter=5, device=args.device))
    seed_everything(opts.train.seed)
    splits, _ = load_preference_splits(opts)
    epoch_pairs = len(splits.train)
    splits = splits._replace(train=splits.train[:args.steps * opts.train.batch_size])
    start = load_start(opts)
    fresh = prepare_policy(start, opts)
    max_length = start.model.cfg.context_length
    datasets = pair_datasets(splits, start, max_length)
    device = resolve_device(args.device)
    began = CLOCK()
    if args.variant == "cached":
        train_loader, val_loader = reference_loaders(datasets, start, fresh, max_length, opts, device)
        reference = None
    else:
        train_loader, val_loader = (preference_loader(datasets[name], start.tokenizer.eos_id, max_length, opts.train,
                                                      name == "train") for name in ("train", "validation"))
        reference = copy.deepcopy(start.model)
    reference_s = CLOCK() - began
    sampler = InstructionTask(start.tokenizer, start.style, datasets["validation"].data[0], sample_tokens=1)
    task = PreferenceTask(opts.beta, opts.logprob_reduction, sampler, device, reference=reference)
    task.eval_metrics, eval_s = timed(task.eval_metrics)
    began = CLOCK()
    history = train(start.model, task, train_loader, val_loader, opts.train, show_progress=False)
    loop_s = CLOCK() - began
    return {"variant": args.variant, "steps": len(train_loader), "evaluations": len(history.steps),
            "reference_s": reference_s, "step_s": (loop_s - sum(eval_s)) / len(train_loader),
            "evaluation_s": sum(eval_s) / len(history.steps), "epoch_pairs": epoch_pairs,
            "used_pairs": len(datasets["train"]), "val_pairs": len(datasets["validation"]),
            "peak_mb": peak_memory_mb(device), "threads": torch.get_num_threads(),
            "final_val_loss": history.steps[-1]["val_loss"]}


def timed(fn):
    """`fn`, and the list its calls' seconds are appended to."""
    seconds: list[float] = []

    def call(*args):
        began = CLOCK()
        out = fn(*args)
        seconds.append(CLOCK() - began)
        return out

    return call, seconds


def epoch_estimate(r: dict) -> float:
    """Seconds for a whole epoch at the book's settings: the reference pass over every training
    and validation pair, every step, and an evaluation before training and every 5 steps."""
    steps = r["epoch_pairs"] // 8
    reference = r["reference_s"] / (r["used_pairs"] + r["val_pairs"]) * (r["epoch_pairs"] + r["val_pairs"])
    return reference + steps * r["step_s"] + (1 + math.ceil(steps / 5)) * r["evaluation_s"]


def in_fresh_process(variant: str, argv: list[str]) -> dict:
    """`measure` of one variant in a new interpreter (this script with --variant)."""
    print(f"[bench_dpo] {variant} ...", file=sys.stderr, flush=True)
    env = {**os.environ, "TQDM_DISABLE": "1"}
    proc = subprocess.run([sys.executable, __file__, *argv, "--variant", variant], capture_output=True, text=True,
                          env=env)
    found = [line[len(RESULT):] for line in proc.stdout.splitlines() if line.startswith(RESULT)]
    if proc.returncode or not found:
        raise SystemExit(f"{variant}: exit {proc.returncode}\n{proc.stderr[-3000:]}")
    return json.loads(found[-1])


def timing_table(runs: dict[str, list[dict]]) -> str:
    """The variants side by side (medians over processes; the highest peak)."""
    lines = ["| variant | reference pass (CPU s) | CPU s/step | CPU s/evaluation | epoch estimate (CPU min) "
             "| peak RSS (MB) | val loss after |", "|---|---|---|---|---|---|---|"]
    cached_epoch = statistics.median(epoch_estimate(r) for r in runs["cached"])
    for variant, rs in runs.items():
        epoch = statistics.median(epoch_estimate(r) for r in rs)
        lines.append(f"| {variant} | {statistics.median(r['reference_s'] for r in rs):.1f} "
                     f"| {statistics.median(r['step_s'] for r in rs):.2f} "
                     f"| {statistics.median(r['evaluation_s'] for r in rs):.2f} | {epoch / 60:.1f} "
                     f"({epoch / cached_epoch:.2f}x cached) | {max(r['peak_mb'] for r in rs):,.0f} "
                     f"| {rs[0]['final_val_loss']:.4f} |")
    return "\n".join(lines)


def abba(rounds: int) -> list[str]:
    """The variants in the order they run: A B, then B A, ..., so that a drift in the machine's
    load biases neither."""
    return [v for i in range(rounds) for v in (VARIANTS[::-1] if i % 2 else VARIANTS)]


def time_variants(args: argparse.Namespace, argv: list[str]) -> None:
    """Each variant in its own process; the table, then every measurement as JSON."""
    load = os.getloadavg()[0]
    runs: dict[str, list[dict]] = {v: [] for v in VARIANTS}
    for variant in abba(args.rounds):
        runs[variant].append(in_fresh_process(variant, argv))
    r = runs["cached"][0]
    print(f"start {args.model}, {r['steps']} steps of 8 pairs ({r['evaluations']} evaluations), "
          f"{r['val_pairs']} validation pairs, {args.device}, {r['threads']} torch threads, {args.rounds} "
          f"process(es) per variant; load average {load:.1f} -> {os.getloadavg()[0]:.1f}\n")
    print(timing_table(runs))
    print("\n" + json.dumps(runs))


def compare_answers(args: argparse.Namespace) -> None:
    """ROUGE-L F1 of both answer files against chosen and rejected; the first answers side by side."""
    from llmft.evaluation.metrics import score_responses
    from llmft.rundir import atomic_write_json, read_json

    before, after = read_json(args.before), read_json(args.after)
    if [e["instruction"] for e in before] != [e["instruction"] for e in after]:
        raise SystemExit(f"{args.before} and {args.after} answer different entries")
    scores = {label: {f"rouge_l_f1_vs_{key}": score_responses(entries, reference_key=key)["rouge_l_f1"]
                      for key in ("chosen", "rejected")}
              for label, entries in (("before", before), ("after", after))}
    shown = [{"instruction": b["instruction"], "input": b["input"], "chosen": b["chosen"], "rejected": b["rejected"],
              "before": b["model_response"], "after": a["model_response"]} for b, a in zip(before, after)]
    changed = sum(e["before"] != e["after"] for e in shown)
    atomic_write_json(args.out, {"entries": len(before), "answers_changed": changed, "before": str(args.before),
                                 "after": str(args.after), "scores": scores, "answers": shown[:args.show]})
    print(f"{changed} of {len(before)} answers changed\n")
    print(f"| answers ({len(before)} entries) | ROUGE-L F1 vs chosen | ROUGE-L F1 vs rejected |\n|---|---|---|")
    for label, s in scores.items():
        print(f"| {label} | {s['rouge_l_f1_vs_chosen'] * 100:.2f} | {s['rouge_l_f1_vs_rejected'] * 100:.2f} |")


def write_subset(args: argparse.Namespace) -> None:
    """The book's file, all but the first `--train-pairs` training pairs made identical (skipped)."""
    from llmft.data.instruction import split_instruction_data
    from llmft.data.preference import PREFERENCE_DATA_NAME, is_informative
    from llmft.data.sources import resolve_data
    from llmft.rundir import atomic_write_json, read_json

    entries = read_json(resolve_data(PREFERENCE_DATA_NAME))
    numbered = [{**e, "index": i} for i, e in enumerate(entries)]
    train = [e["index"] for e in split_instruction_data(numbered, seed=123).train if is_informative(e)]
    for i in train[args.train_pairs:]:
        entries[i]["rejected"] = entries[i]["chosen"]
    atomic_write_json(args.out, entries)
    print(f"{args.out}: {min(args.train_pairs, len(train))} of {len(train)} training pairs kept")


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.command == "time" and args.variant:  # a measuring process
        print(RESULT + json.dumps(measure(args)), flush=True)
        return
    commands = {"time": lambda: time_variants(args, argv), "subset": lambda: write_subset(args),
                "answers": lambda: compare_answers(args)}
    commands[args.command]()


if __name__ == "__main__":
    main()
