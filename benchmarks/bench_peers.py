"""Suite `peers` (issue 19 part 1): llmft against the libraries people use for the same jobs,
on the same weights, data, split and hyperparameters.

    .venv/bin/python benchmarks/run.py --suite peers --threads 1                 # the full suite: ~10 h on 2 busy cores
    .venv/bin/python benchmarks/run.py --suite peers --limit 16 --rounds 1       # smoke test, minutes
    .venv/bin/python benchmarks/run.py --suite peers --peer-pairs classify sft   # some pairs only

Weights: SmolLM2-135M-Instruct from the offline GGUF (dequantised to fp32), exported once to a
Hugging Face folder (`hf_export.py`: llmft's `export_hf` plus tokenizer files; the logits of both
libraries on one prompt are compared and printed); both sides load that folder (llmft with
`--model FOLDER`). Data: llmft's own splits, from its data API with its seed (the peer) or made
by the command itself (llmft; the split files it writes are checked against the peer's).

Pairs (peer first, the baseline of each ratio):

- `classify`: transformers `Trainer` + `AutoModelForSequenceClassification` (the last block, the
  final norm and the new head trainable; the last real token, transformers' rule) vs
  `llmft classify train` (its defaults: AdamW 5e-5, weight decay 0.1, batch 8, 5 epochs, padding
  per batch, the last real token) on the SMS Spam Collection (balanced, 70/10/20).
- `sft`, `sft-masked`: TRL `SFTTrainer` on the book's instruction data in the Alpaca format
  (935 training examples), 1 epoch, batch 8, lr 5e-5, weight decay 0.1, loss on every token /
  completion-only loss, vs `llmft instruct train --prompt-style alpaca` / `--mask-prompt`.
- `sft-grouped`: `sft` with llmft's `--group-by-length` (batches of similar lengths, still
  shuffled: less padding, another data order; the peer runs as in `sft`).
- `classify-lora`, `sft-lora`: the same through PEFT LoRA (rank 16, alpha 16, no dropout, on
  every linear layer of the blocks: the seven projections) vs `--finetune lora --lora-targets
  attn,mlp` (the same seven: llmft's default `all-linear` also wraps the output head, which
  PEFT's `all-linear` leaves out and TRL refuses to adapt); the classifier's new head is trained
  whole on both sides. PEFT's A matrices start as llmft's do (`peer_jobs.start_like_llmft`:
  PEFT's own default starts them 6-10× narrower, and then the losses did not compare).
- `classify-lora-grouped`: `classify-lora` with llmft's `--group-by-length` (the peer as in
  `classify-lora`).
- `classify-lora-held-out`: `classify-lora-grouped` reporting what the peer's job reports: no
  periodic evaluation (`--eval-freq` past the last step, as the peer's `eval_strategy="no"`) and
  no training-split accuracy at the end (`--no-train-accuracy`; llmft still scores the
  validation split, which its metrics report's threshold needs, beside the test split).

Every variant runs in its own process (`worker.py`), the two sides of a pair in ABBA order over
`--rounds`, with `--threads` torch threads (default 1). Reported per variant: the wall time of the
whole job (imports of the trainer library, loading the model, data, training, the job's own
evaluation, llmft's run directory), the training loop alone, optimizer steps, trainable
parameters, the quality figure (test accuracy; the validation loss as `peer_jobs.py` defines it,
computed the same way for both sides after the job), the peak RSS of the job, and whether both
sides reached the same quality (accuracy within 0.5 points, validation loss within 2 %): a speed
figure counts only then, and is reported either way.

`--limit N` trains on N examples (classify: the first N of llmft's training split, the first
min(N, 16) of validation and test; instruct: the first n entries of the data with
int(0.85 n) = N, split by llmft as usual) to check the machinery in minutes.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from common import Section, median, peak_memory, ratio_cell
from peer_jobs import NO_PERIODIC_EVAL

MODEL = "smollm2-135m-instruct"
SIDES = ("peer", "llmft")  # baseline first
EVAL_LIMIT = 16  # --limit: validation and test texts of the classifier


@dataclass(frozen=True)
class Pair:
    task: str  # "classify" or "instruct"
    lora: bool
    mask: bool  # instruct: loss on the response only
    peer: str
    ours: str
    llmft_flags: tuple[str, ...] = ()  # beyond the suite's hyperparameters


PAIRS = {
    "classify": Pair("classify", False, False, "transformers Trainer, AutoModelForSequenceClassification",
                     "llmft classify train"),
    "classify-lora": Pair("classify", True, False, "transformers Trainer + PEFT LoRA",
                          "llmft classify train --finetune lora --lora-targets attn,mlp"),
    "classify-lora-grouped": Pair("classify", True, False, "transformers Trainer + PEFT LoRA",
                                  "llmft classify train --finetune lora --lora-targets attn,mlp --group-by-length",
                                  ("--group-by-length",)),
    "classify-lora-held-out": Pair("classify", True, False, "transformers Trainer + PEFT LoRA",
                                   "llmft classify train --finetune lora --lora-targets attn,mlp --group-by-length "
                                   f"--no-train-accuracy --eval-freq {NO_PERIODIC_EVAL}",
                                   ("--group-by-length", "--no-train-accuracy", "--eval-freq", str(NO_PERIODIC_EVAL))),
    "sft": Pair("instruct", False, False, "TRL SFTTrainer, loss on all tokens", "llmft instruct train"),
    "sft-grouped": Pair("instruct", False, False, "TRL SFTTrainer, loss on all tokens",
                        "llmft instruct train --group-by-length", ("--group-by-length",)),
    "sft-masked": Pair("instruct", False, True, "TRL SFTTrainer, completion-only loss",
                       "llmft instruct train --mask-prompt"),
    "sft-lora": Pair("instruct", True, False, "TRL SFTTrainer + PEFT LoRA, all tokens",
                     "llmft instruct train --finetune lora --lora-targets attn,mlp"),
}


def add_arguments(group) -> None:
    """The suite's options in `run.py` (`--rounds` and `--threads` are shared)."""
    group.add_argument("--limit", type=int, help="train on this many examples and evaluate on a few (smoke test; "
                       "--quick: 16)")
    group.add_argument("--peer-pairs", nargs="+", choices=list(PAIRS), default=list(PAIRS))
    group.add_argument("--peer-epochs", type=int, help="epochs for both sides of every pair instead of the recipe's "
                       "(classify 5, instruct 1): a shorter check of the per-epoch speed")


# -- the worker side -----------------------------------------------------------------------------

def limit_threads(threads: int) -> None:
    """torch's threads and the tokenizers' (Rust) pool, before either is used."""
    import os

    import torch

    os.environ["RAYON_NUM_THREADS"] = str(threads)
    torch.set_num_threads(threads)


def measure(spec: dict[str, Any]) -> dict[str, Any]:
    import time

    import peer_jobs

    limit_threads(spec["threads"])
    with tempfile.TemporaryDirectory(prefix="llmft-peer-") as tmp:
        start = time.perf_counter()
        figures, rest = peer_jobs.JOBS[spec["task"], spec["side"]](spec, Path(tmp))
        wall = time.perf_counter() - start
        peak = peak_memory("cpu")
        figures.update(rest())
    return {**figures, "wall_seconds": wall, "peak_memory_mb": peak}


# -- the orchestrator -----------------------------------------------------------------------------

def full_data() -> dict[str, dict[str, Any]]:
    return {"classify": {"data": "sms-spam", "validation_data": None, "test_data": None, "balance": True},
            "instruct": {"data": "instruction-data"}}


def limited_classify_data(limit: int, tmp: Path) -> dict[str, Any]:
    """The first `limit` texts of llmft's training split (and a few of the others) as files."""
    from llmft.data.classification import write_split
    from peer_jobs import classify_splits

    splits = classify_splits(full_data()["classify"])
    paths = {}
    for name, size in (("train", limit), ("validation", EVAL_LIMIT), ("test", EVAL_LIMIT)):
        paths[name] = tmp / f"spam-{name}.csv"
        write_split(paths[name], getattr(splits, name)[:size])
    return {"data": str(paths["train"]), "validation_data": str(paths["validation"]),
            "test_data": str(paths["test"]), "balance": False}


def limited_instruct_data(limit: int, tmp: Path) -> dict[str, Any]:
    """The first n entries of the book's data, n the least with int(0.85 n) >= limit."""
    from llmft.data.instruction import load_instruction_data

    entries = load_instruction_data("instruction-data")
    n = next(n for n in range(limit, len(entries) + 1) if int(n * 0.85) >= limit)
    path = tmp / "instructions.json"
    path.write_text(json.dumps(entries[:n]), encoding="utf-8")
    return {"data": str(path)}


def suite_data(limit: int | None, tmp: Path) -> dict[str, dict[str, Any]]:
    if limit is None:
        return full_data()
    return {"classify": limited_classify_data(limit, tmp), "instruct": limited_instruct_data(limit, tmp)}


def run(args) -> Section:
    from common import run_interleaved
    from hf_export import export_with_check

    threads = args.threads or 1
    results = {}
    with tempfile.TemporaryDirectory(prefix="llmft-peers-") as tmp:
        export = export_with_check(MODEL, Path(tmp) / "hf")
        print(f"[bench] exported {MODEL}: {json.dumps(export)}", flush=True)
        data = suite_data(args.limit, Path(tmp))
        for name in args.peer_pairs:
            pair = PAIRS[name]

            def spec_for(side: str, name: str = name, pair: Pair = pair) -> dict[str, Any]:
                return {"suite": "peers", "label": f"peers {name} {side}", "pair": name, "side": side,
                        "weights": export["folder"], "threads": threads, "data": data[pair.task],
                        "epochs": args.peer_epochs, **asdict(pair)}

            results[name] = run_interleaved(list(SIDES), args.rounds, spec_for)
    return section(args, threads, export, results)


# -- the report -----------------------------------------------------------------------------------

def quality_key(pair: Pair) -> str:
    if pair.task == "classify":
        return "test_accuracy"
    return "val_loss_response" if pair.mask else "val_loss_all"


def same_quality(pair: Pair, peer: float, ours: float) -> str:
    """Accuracy within 0.5 points, validation loss within 2 % (of the peer's)."""
    if pair.task == "classify":
        gap = abs(ours - peer) * 100
        return f"{'yes' if gap <= 0.5 else 'no'} (Δ {gap:.1f} points)"
    gap = abs(ours - peer) / peer * 100
    return f"{'yes' if gap <= 2 else 'no'} (Δ {gap:.1f} %)"


def quality_cell(pair: Pair, runs: list[dict[str, Any]]) -> str:
    if pair.task == "classify":
        return f"{median([r['test_accuracy'] for r in runs]) * 100:.1f} % test accuracy"
    return (f"{median([r['val_loss_all'] for r in runs]):.4f} all / "
            f"{median([r['val_loss_response'] for r in runs]):.4f} response")


def inputs_cell(r: dict[str, Any]) -> str:
    if "same_split" in r:
        return "split files = the peer's" if r["same_split"] else "**split differs**"
    return f"token ids = llmft's: {r['same_token_ids']}"


def pair_rows(name: str, sides: dict[str, list[dict[str, Any]]]) -> list[list[str]]:
    pair, key = PAIRS[name], quality_key(PAIRS[name])
    wall = {side: median([r["wall_seconds"] for r in runs]) for side, runs in sides.items()}
    verdict = same_quality(pair, median([r[key] for r in sides["peer"]]), median([r[key] for r in sides["llmft"]]))
    rows = []
    for side, runs in sides.items():
        r = runs[0]
        rows.append([f"`{name}`" if side == "peer" else "", pair.peer if side == "peer" else f"`{pair.ours}`",
                     " / ".join(f"{x['wall_seconds']:.1f}" for x in runs),
                     ratio_cell(1 / wall[side], 1 / wall["peer"], side == "peer"),
                     f"{median([x['train_seconds'] for x in runs]):.1f}", str(r["steps"]),
                     f"{r['trainable_parameters']:,}", quality_cell(pair, runs),
                     verdict if side == "llmft" else "", f"{max(x['peak_memory_mb'] for x in runs):,.0f}",
                     inputs_cell(r)])
    return rows


def section(args, threads: int, export: dict[str, Any], results: dict[str, dict[str, list]]) -> Section:
    rows = [row for name, sides in results.items() for row in pair_rows(name, sides)]
    size = (f"**--limit {args.limit}**: {args.limit} training examples and a few to evaluate — a smoke test of "
            "the machinery, not a measurement" if args.limit else "the whole data sets")
    if args.peer_epochs:
        size += f", **{args.peer_epochs} epoch(s)** on both sides instead of the recipe's"
    return Section(
        title="Peers: llmft vs transformers Trainer, TRL SFTTrainer and PEFT (same weights, data, split, "
              "hyperparameters)",
        intro=[f"{MODEL} (offline GGUF, fp32) exported once to a Hugging Face folder; transformers' logits on "
               f"a {export['prompt_tokens']}-token prompt differ from llmft's by at most "
               f"{export['max_abs_logit_difference']:.2e}; tokenizer ids equal: {export['tokenizer_matches']}. "
               f"{size}. {threads} torch thread(s) per process, {args.rounds} process(es) per side, ABBA order "
               "within each pair; CPU. Wall time = the whole job in its own process."],
        headers=["pair", "implementation", "wall time (s) per run", "speed vs peer", "training loop (s)",
                 "optimizer steps", "trainable parameters", "quality", "same quality (counts?)", "peak RSS (MB)",
                 "same inputs"],
        rows=rows,
        notes=NOTES,
        raw=[{"pair": name, "export": export, "results": sides} for name, sides in results.items()],
    )


NOTES = [
    "A speed figure counts only where \"same quality\" says yes (test accuracy within 0.5 points, validation "
    "loss within 2 % of the peer's); it is shown either way.",
    "Validation loss (both sides alike, after the job): the token mean of the cross-entropy over the validation "
    "split's counted targets (summed over the split, divided by their number), on llmft's tokenization of the "
    "Alpaca text + end-of-text; \"all\" counts every target, \"response\" those after the prompt. The masked pair is "
    "judged on \"response\", the others on \"all\".",
    "Training loop: the peer's `trainer.train()`; llmft's `train()` call, which also evaluates 5 training and 5 "
    "validation batches before the first step and, for the classifier, every 50 steps and after each epoch "
    "(its defaults; instruct runs with `--eval-freq` past the last step, and writes a 35-token sample per epoch). "
    "The wall time also holds each job's own final evaluation: the peer's test predictions or `trainer.evaluate()`, "
    "llmft's accuracies on every split (validation and test only with `--no-train-accuracy`), its report, plots "
    "and run directory.",
    "Differences left as each library does them: transformers' Trainer exempts biases and norm weights from "
    "weight decay (llmft decays every trainable parameter); llmft's classification head has a bias and "
    "`nn.Linear`'s initialisation, transformers' `score` none and a normal(0, 0.02) one; the data order "
    "(each side's own seeded shuffle); llmft computes the classifier's frozen blocks once (activation cache).",
    "LoRA's A starts alike on both sides: uniform in ±1/√rank, llmft's Kaiming-uniform over its (in, rank) A "
    "(the book's layer), which the peer's A is re-drawn to match (`peer_jobs.start_like_llmft`; PEFT's own "
    "default is sqrt(in / rank) times narrower: 6 times for in = 576, 9.8 for the MLP's down projection); B "
    "starts at zero on both sides.",
]
