"""`llmft classify train | eval | predict`."""

from __future__ import annotations

from pathlib import Path

import click

from llmft.cli.options import lora_config, lora_options, run_options, train_config, train_options
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
@click.option("--max-length", default=None, type=int, help="Tokens per text (default: longest training text).")
@click.option("--class-token", default="last", type=click.Choice(CLASS_TOKENS),
              help="Which hidden state the head reads.")
@click.option("--trainable", default="last-block", type=click.Choice(list(TRAINABLE_POLICIES)),
              help="Layers trained with --finetune full.")
@lora_options
@click.option("--book-compat", is_flag=True, help="The book's computation: fixed padding, token at -1.")
@click.option("--activation-cache/--no-activation-cache", default=True,
              help="Compute the frozen layers once per example (automatic when exact).")
@train_options(epochs=5, eval_freq=50, eval_iter=5)
def train_cmd(**kwargs) -> None:
    """Fine-tune a classifier and print its accuracies."""
    from llmft.pipelines.classification import ClassifyOptions, train_classifier

    cfg, lora = train_config(kwargs), lora_config(kwargs)
    kwargs["split"] = (kwargs.pop("train_frac"), kwargs.pop("val_frac"))
    results = train_classifier(ClassifyOptions(**kwargs, lora=lora, train=cfg))
    print_accuracies(results)
    click.echo(f"run saved to {kwargs['out']}")


def print_accuracies(results: dict) -> None:
    for split in ("train", "validation", "test"):
        click.echo(f"{split.capitalize() + ' accuracy:':21} {results[f'{split}_accuracy'] * 100:.2f}%")


@classify.command("eval")
@click.argument("run_dir", type=click.Path(path_type=Path))
@click.option("--device", default="auto")
def eval_cmd(run_dir: Path, device: str) -> None:
    """Accuracy and loss on the run's train, validation and test splits."""
    from llmft.pipelines.classification import evaluate_run

    results = evaluate_run(run_dir, device=device)
    print_accuracies(results)
    for split in ("train", "validation", "test"):
        click.echo(f"{split.capitalize() + ' loss:':21} {results[f'{split}_loss']:.3f}")


@classify.command("predict")
@click.argument("run_dir", type=click.Path(path_type=Path))
@click.argument("texts", nargs=-1)
@click.option("--file", "texts_file", type=click.Path(path_type=Path), help="One text per line.")
@click.option("--device", default="auto")
def predict_cmd(run_dir: Path, texts: tuple[str, ...], texts_file: Path | None, device: str) -> None:
    """Label and probability for each text."""
    from llmft.data.sources import read_lines
    from llmft.errors import LlmftError
    from llmft.pipelines.classification import predict

    items = list(texts) + ([t for t in read_lines(texts_file) if t.strip()] if texts_file else [])
    if not items:
        raise LlmftError("no texts to classify: pass them as arguments or with --file")
    for text, (label, prob) in zip(items, predict(run_dir, items, device=device)):
        click.echo(f"{label}\t{prob:.3f}\t{text}")
