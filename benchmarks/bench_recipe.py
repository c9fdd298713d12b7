"""Suite `recipe`: the book's chapter-6 spam classifier end to end, `--book-compat` against
our default path.

Both runs call `train_classifier` with the same options except `book_compat`: the real SMS
Spam Collection (balanced, 70/10/20 split), the gpt2-small architecture with RANDOM weights
(the pretrained GPT-2 files come from the Hugging Face hub, which this benchmark does not
use), last block + final norm + new head trainable, AdamW lr 5e-5, batch 8, loss on 5
batches every 50 steps, accuracies on 5 batches after each epoch, then full accuracies on
every split. The book's computation pads every text to the longest training text and reads
position -1, recomputing all 12 blocks each step; ours pads each batch to its own longest
text, reads the last real token, computes the 11 frozen blocks once per distinct text
(activation cache) and runs the trainable last block's queries and MLP at the class token
only. Same data, same number of optimizer steps.
"""

from __future__ import annotations

import csv
import tempfile
from pathlib import Path
from typing import Any

from common import QUICK_OVERRIDES, Section, median, peak_memory, ratio_cell, run_interleaved, timed

VARIANTS = {"book-compat": "book: every text padded to max length, token at -1, no cache",
            "default": "llmft default: per-batch padding, last real token, activation cache, "
                       "last block at that token only"}  # baseline first


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def measure(spec: dict[str, Any]) -> dict[str, Any]:
    from llmft.pipelines.classification import ClassifyOptions, train_classifier
    from llmft.training.loop import TrainConfig

    with tempfile.TemporaryDirectory(prefix="llmft-bench-") as tmp:
        out = Path(tmp) / "run"
        opts = ClassifyOptions(model=spec["model"], data=spec["data"], out=out, random_init=True,
                               config_overrides=spec["overrides"], book_compat=spec["variant"] == "book-compat",
                               max_length=spec["max_length"],
                               train=TrainConfig(epochs=spec["epochs"], device=spec["device"]))
        seconds, results = timed(lambda: train_classifier(opts), spec["device"])
        n_train = len(_rows(out / "train.csv"))
        epochs = _rows(out / "epochs.csv")
        evals = _rows(out / "metrics.csv")
    return {"wall_seconds": seconds, "results": results, "epochs": epochs, "last_eval": evals[-1],
            "steps": spec["epochs"] * (n_train // opts.train.batch_size), "peak_memory_mb": peak_memory(spec["device"])}


def _pct(x: float | str) -> str:
    return f"{float(x) * 100:.1f}"


def run(args) -> Section:
    from llmft.data.sources import resolve_data

    data = resolve_data("sms-spam")
    overrides = QUICK_OVERRIDES["gpt2"] if args.quick else {}

    def spec_for(variant: str) -> dict[str, Any]:
        return {"suite": "recipe", "label": f"recipe {variant}", "variant": variant, "model": "gpt2-small",
                "data": str(data), "overrides": overrides, "epochs": args.epochs, "device": args.device,
                "max_length": args.max_length}

    results = run_interleaved(list(VARIANTS), args.recipe_rounds, spec_for)
    wall = {v: [r["wall_seconds"] for r in rs] for v, rs in results.items()}
    base = median(wall["book-compat"])
    rows = []
    for variant, rs in results.items():
        r = rs[0]
        res = r["results"]
        t = median(wall[variant])
        per_epoch = " · ".join(f"{_pct(e['train_acc'])}/{_pct(e['val_acc'])}" for e in r["epochs"])
        rows.append([f"`{variant}`", VARIANTS[variant], str(args.epochs), str(r["steps"]),
                     " / ".join(f"{w:.1f}" for w in wall[variant]), ratio_cell(1 / t, 1 / base, variant == "book-compat"),
                     f"{res['train_seconds']:.1f}", str(res["max_length"]), per_epoch,
                     f"{_pct(res['train_accuracy'])} / {_pct(res['validation_accuracy'])} / {_pct(res['test_accuracy'])}",
                     f"{float(r['last_eval']['train_loss']):.3f} / {float(r['last_eval']['val_loss']):.3f}",
                     f"{max(x['peak_memory_mb'] for x in rs):,.0f}"])
    shape = (f"gpt2-small shrunk to {overrides} (--quick: a smoke test, not a measurement)" if args.quick
             else "gpt2-small architecture (124M parameters)")
    return Section(
        title="Book recipe (chapter 6 spam classifier): `--book-compat` vs llmft's default path",
        intro=[f"`train_classifier(ClassifyOptions(model=\"gpt2-small\", data=\"sms-spam\", random_init=True, "
               f"book_compat=..., train=TrainConfig(epochs={args.epochs})))` on `{data}`: {shape}, "
               "**randomly initialised** — pretrained GPT-2 weights come from the Hugging Face hub, which is not "
               "reachable from the benchmark machine — so accuracies are those of a random-init model whose last "
               "block and head are trained, not the book's ~95–97%. Everything else is the book's recipe: "
               f"balanced 70/10/20 split, AdamW lr 5e-5, batch 8, {args.epochs} epoch(s), loss on 5 batches every "
               "50 steps, train/val accuracy on 5 batches per epoch, final accuracy on every full split. "
               f"Wall time = the whole `train_classifier` call (data, model build, activation cache, training, "
               f"final accuracies, run directory with plots), on `{args.device}`, each run in its own process."],
        headers=["variant", "computation", "epochs", "optimizer steps", "wall time (s)", "speed vs book-compat",
                 "training loop only (s)", "max length (tokens)", "per-epoch train/val acc % (5 batches)",
                 "final train / val / test acc %", "last eval train / val loss", "peak RSS (MB)"],
        rows=rows,
        notes=["Max length: the longest training text unless `--max-length` is given. The book pads to 120 "
               "tokens, the longest text of ITS split (pandas sampling); llmft's seeded split (Python's `random`) "
               "holds other ham messages, whose longest is shorter, so `book-compat` pads less than the book did; "
               "`--max-length 120` reproduces the book's padded shape (the default path only truncates at it).",
               "The \"training loop only\" column is `results.json`'s `train_seconds`; for the default path it "
               "excludes the one-off activation-cache pass, which the wall time includes.",
               "The two paths are different computations (the book reads the state at the padded position -1, "
               "llmft the last real token), so their accuracies differ; they are shown to make sure the faster "
               "path still learns."],
        raw=[{"variant": v, "runs": rs} for v, rs in results.items()],
    )
