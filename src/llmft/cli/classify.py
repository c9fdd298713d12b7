"""`llmft classify train | eval | predict`."""

from __future__ import annotations

from pathlib import Path

import click

from llmft.cli.options import command_options, lora_options, prints_results, run_options, train_options
from llmft.data.classification import TRUNCATE_SIDES
from llmft.evaluation.classification import DEFAULT_MAX_FPR
from llmft.training.freezing import TRAINABLE_POLICIES
from llmft.training.heads import CLASS_TOKENS


@click.group()
def classify() -> None:
    """Fine-tune a language model into a text classifier (book chapter 6)."""


@classify.command("train")
@run_options("gpt2-small", "sms-spam", "Data set name or a CSV/TSV/JSONL file.")
@click.option("--text-column", default="text")
@click.option("--label-column", default="label")
@click.option("--validation-data", default=None, help="Use this file as validation split (with --test-data).")
@click.option("--test-data", default=None, help="Use this file as test split (with --validation-data).")
@click.option("--balance/--no-balance", default=True, help="Undersample classes to the smallest one.")
@click.option("--dedupe", is_flag=True, help="Drop repeated texts before splitting (no text in two splits).")
@click.option("--train-frac", default=0.7, type=float)
@click.option("--val-frac", default=0.1, type=float)
@click.option("--max-length", default=None, help="Tokens per text, or 'longest': the longest training text "
              "(default: the longest, at most 512).")
@click.option("--truncate", default="head", type=click.Choice(TRUNCATE_SIDES),
              help="Which end of a longer text is kept.")
@click.option("--max-fpr", default=DEFAULT_MAX_FPR, type=float,
              help="The final report's threshold: at most this false-positive rate (two classes).")
@click.option("--class-token", default="last", type=click.Choice(CLASS_TOKENS),
              help="Which hidden state the head reads.")
@click.option("--trainable", default="last-block", type=click.Choice(list(TRAINABLE_POLICIES)),
              help="Layers trained with --finetune full.")
@click.option("--train-accuracy/--no-train-accuracy", default=True,
              help="Score the whole training split after training (the book's report; most of the final pass).")
@lora_options
@click.option("--book-compat", is_flag=True, help="The book's computation: fixed padding, token at -1.")
@click.option("--activation-cache/--no-activation-cache", default=True,
              help="Compute the frozen layers once per example (automatic when exact).")
@train_options(epochs=5, eval_freq=50, eval_iter=5)
def train_cmd(**kwargs) -> None:
    """Fine-tune a classifier and print its accuracies."""
    from llmft.pipelines.classification import ClassifyOptions, train_classifier

    opts = command_options(ClassifyOptions, kwargs, "classification", "classify train")
    results = train_classifier(opts)
    if not prints_results():
        return
    print_accuracies(results)
    print_report(results)
    click.echo(f"run saved to {opts.out}")


def print_accuracies(results: dict) -> None:
    for split in ("train", "validation", "test"):
        if f"{split}_accuracy" in results:  # no training split with --no-train-accuracy
            click.echo(f"{split.capitalize() + ' accuracy:':21} {results[f'{split}_accuracy'] * 100:.2f}%")


def print_report(results: dict) -> None:
    from llmft.evaluation.classification import report_lines

    if "report" in results:
        for line in report_lines(results["report"]):
            click.echo(line)


@classify.command("eval")
@click.argument("run_dir", type=click.Path(path_type=Path))
@click.option("--data", default=None, help="Evaluate this labelled file (CSV/TSV/JSONL) instead of the run's splits.")
@click.option("--text-column", default="text")
@click.option("--label-column", default="label")
@click.option("--max-fpr", default=DEFAULT_MAX_FPR, type=float,
              help="Report the threshold that keeps the false-positive rate at most this (two classes).")
@click.option("--batch-size", default=8)
@click.option("--device", default="auto")
def eval_cmd(run_dir: Path, data: str | None, **options) -> None:
    """Accuracy and loss on the run's splits, then per class precision, recall and F1, the
    confusion matrix and (two classes) ROC and PR areas of the test split or --data FILE; the
    plots and evaluation.json go into the run (RUN/eval-STEM/ for --data)."""
    from llmft.pipelines.classification import evaluate_run

    results = evaluate_run(run_dir, data=data, **options)
    if not data:
        print_accuracies(results)
        for split in ("train", "validation", "test"):
            click.echo(f"{split.capitalize() + ' loss:':21} {results[f'{split}_loss']:.3f}")
    print_report(results)


@classify.command("predict")
@click.argument("run_dir", type=click.Path(path_type=Path))
@click.argument("texts", nargs=-1)
@click.option("--file", "texts_file", type=click.Path(path_type=Path),
              help="Texts to classify: CSV/TSV (with --text-column), JSONL, or plain text (one a line).")
@click.option("--text-column", default="text")
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="Write every row of --file with its label and class probabilities here (.csv or .jsonl).")
@click.option("--threshold", type=float, default=None,
              help="Two classes: the positive (second) label when its probability reaches this.")
@click.option("--batch-size", default=8)
@click.option("--device", default="auto")
def predict_cmd(run_dir: Path, texts: tuple[str, ...], texts_file: Path | None, text_column: str, out: Path | None,
                threshold: float | None, batch_size: int, device: str) -> None:
    """Label and probability for each text; with --file and --out, a file of predictions."""
    from llmft.data.tables import read_text_rows
    from llmft.errors import LlmftError
    from llmft.pipelines.classification import predict, predict_file

    if out is not None:
        if texts or texts_file is None:
            raise LlmftError("--out writes the predictions of --file; pass the texts with --file")
        rows = predict_file(run_dir, texts_file, out, text_column, threshold, device, batch_size)
        click.echo(f"{rows:,} predictions saved to {out}")
        return
    items = list(texts) + (read_text_rows(texts_file, text_column)[1] if texts_file else [])
    if not items:
        raise LlmftError("no texts to classify: pass them as arguments or with --file")
    for text, (label, prob) in zip(items, predict(run_dir, items, device, batch_size, threshold)):
        click.echo(f"{label}\t{prob:.3f}\t{text}")
