"""Fine-tune a pretrained decoder into a text classifier (book chapter 6), evaluate it,
and classify new texts with the saved run."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from llmft.checkpoint import base_spec, load_finetuned, save_finetuned, weights_fingerprint
from llmft.data.batching import batch_size_of, make_loader, sorted_batches
from llmft.data.classification import (
    ClassificationDataset, Splits, balance, check_truncate, class_counts, collate_classification, deduplicate,
    label_names, length_stats, longest, split, truncate, warn_about, write_split,
)
from llmft.data.sources import read_labelled_texts, resolve_data
from llmft.data.tables import check_out, read_text_rows, write_rows
from llmft.errors import LlmftError
from llmft.evaluation.classification import (
    DEFAULT_MAX_FPR, Scored, check_max_fpr, check_threshold, classification_report, decide, plot_report,
)
from llmft.pipelines.options import RunOptions, existing_paths
from llmft.plots import plot_values
from llmft.progress import progress_bar
from llmft.rundir import RunDir, RunMeta, atomic_write_json
from llmft.tasks import expect_task
from llmft.tokenizers import Tokenizer
from llmft.training.activation_cache import cache_start, cached_loaders
from llmft.training.distributed import (
    TaskModule, World, all_reduce_sum, init_distributed, log_global_batch, shard_loaders, shard_rows, world,
)
from llmft.training.estimate import estimate_lines
from llmft.training.freezing import apply_trainable, count_parameters
from llmft.training.heads import SequenceClassifier, check_class_token
from llmft.training.lora import apply_lora
from llmft.training.loop import Batch, autocast, resolve_device, seed_everything, to_device, train
from llmft.training.resources import peak_memory_mb
from llmft.weights import Pretrained, load_pretrained

log = logging.getLogger("llmft")

# The default --max-length: the longest training text, at most this many tokens, which keeps a
# CPU run practical on long texts (--max-length longest: the longest, capped at the context only).
MAX_LENGTH_CAP = 512


@dataclass(kw_only=True)
class ClassifyOptions(RunOptions):
    model: str = "gpt2-small"
    data: str = "sms-spam"
    out: Path = Path("runs/spam")
    text_column: str = "text"
    label_column: str = "label"
    validation_data: str | None = None  # explicit splits instead of cutting `data`
    test_data: str | None = None
    balance: bool = True
    dedupe: bool = False  # drop repeated texts before balancing and splitting
    split: tuple[float, float] = (0.7, 0.1)  # train, validation; test is the rest
    class_token: str = "last"  # which hidden state the head reads (heads.CLASS_TOKENS)
    trainable: str = "last-block"  # with finetune="full"
    book_compat: bool = False  # the book's computation: pad all to max_length, token at -1, no cache
    activation_cache: bool = True  # reuse the frozen prefix's outputs when that is exact
    truncate: str = "head"  # which end of a text longer than max_length is kept: head or tail
    max_fpr: float = DEFAULT_MAX_FPR  # the final report's threshold: at most this false-positive rate
    train_accuracy: bool = True  # score the whole training split after training (the book's report)

    def __post_init__(self) -> None:
        super().__post_init__()
        check_class_token(self.class_token)
        check_truncate(self.truncate)
        check_max_fpr(self.max_fpr)
        self.split = tuple(self.split)  # a list from a recorded run.json
        train_frac, val_frac = self.split
        if not (0 < train_frac < 1 and 0 < val_frac < 1 and train_frac + val_frac < 1):
            raise LlmftError(f"--train-frac {train_frac} and --val-frac {val_frac}: each must be between 0 "
                             "and 1 and together below 1 (the test split is the rest)")
        if bool(self.validation_data) != bool(self.test_data):
            raise LlmftError("--validation-data and --test-data go together")

    @property
    def effective_class_token(self) -> str:
        return "last-padded" if self.book_compat else self.class_token

    def inputs(self) -> list[Path]:
        return existing_paths(self.model, self.data, self.validation_data, self.test_data)

    @property
    def final_splits(self) -> tuple[str, ...]:
        """The splits scored in full after training; the metrics report needs validation and test."""
        return ("train", "validation", "test") if self.train_accuracy else ("validation", "test")


class ClassificationTask:
    """Cross-entropy on the classification token's logits; accuracies after each epoch."""

    seen_unit = "examples"

    def __init__(self, train_batches: DataLoader, val_batches: DataLoader, eval_iter: int,
                 device: torch.device, cache_start: int = 0) -> None:
        self.train_batches, self.val_batches = train_batches, val_batches
        self.eval_iter, self.device = eval_iter, device
        self.cache_start = cache_start  # batches hold the input of this block when > 0

    def logits(self, model: SequenceClassifier, batch: Batch) -> torch.Tensor:
        if self.cache_start:
            return model.forward_from(batch["hidden"], batch["lengths"], self.cache_start)
        return model(batch["input_ids"], batch["lengths"])

    def loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        return nn.functional.cross_entropy(self.logits(model, batch), batch["labels"])

    def loss_weight(self, batch: Batch) -> torch.Tensor:
        return torch.tensor(batch["labels"].shape[0])

    def count_seen(self, batch: Batch) -> int:
        return batch["labels"].shape[0]

    def on_epoch_end(self, runner: nn.Module, epoch: int) -> dict[str, Any]:
        train_acc = accuracy(runner, self, self.train_batches, self.device, self.eval_iter)
        val_acc = accuracy(runner, self, self.val_batches, self.device, self.eval_iter)
        log.info("epoch %d: training accuracy %.2f%% | validation accuracy %.2f%%",
                 epoch + 1, train_acc * 100, val_acc * 100)
        return {"train_acc": train_acc, "val_acc": val_acc}


@torch.no_grad()
def evaluate(runner: nn.Module, task: ClassificationTask, batches, device: torch.device,
             num_batches: int | None = None, precision: str = "32") -> tuple[float, float]:
    """(accuracy, mean batch loss) over the first `num_batches` batches (all when None), in one
    pass; `runner` is `TaskModule(model, task)` (maybe wrapped); several ranks' counts are summed."""
    was_training = runner.training
    runner.eval()
    counts = torch.zeros(2, dtype=torch.float64)  # correct, total
    loss_sum, n_batches = 0.0, 0
    for i, batch in enumerate(batches):
        if num_batches is not None and i >= num_batches:
            break
        batch = to_device(batch, device)
        with autocast(device, precision):
            logits = runner(batch, "logits")
        counts += torch.tensor([(logits.argmax(-1) == batch["labels"]).sum().item(), batch["labels"].shape[0]])
        if world().size == 1:
            loss_sum += nn.functional.cross_entropy(logits.float(), batch["labels"]).item()
        else:  # a rank's rows may be none (the last batch): sum, then divide by all ranks' rows
            loss = nn.functional.cross_entropy(logits.float(), batch["labels"], reduction="sum")
            loss_sum += (all_reduce_sum(loss) / all_reduce_sum(task.loss_weight(batch))).item()
        n_batches += 1
    runner.train(was_training)
    correct, total = all_reduce_sum(counts).tolist()
    if not total:
        return float("nan"), float("nan")
    return correct / total, loss_sum / n_batches


def accuracy(runner: nn.Module, task: ClassificationTask, batches, device: torch.device,
             num_batches: int | None = None) -> float:
    """Share of correct predictions over the first `num_batches` batches (the book's
    `calc_accuracy_loader`)."""
    return evaluate(runner, task, batches, device, num_batches)[0]


def load_splits(opts: ClassifyOptions) -> Splits:
    seed = opts.train.seed

    def read(name: str) -> list[tuple[str, str]]:
        return read_labelled_texts(resolve_data(name), opts.text_column, opts.label_column)

    examples = deduplicate(read(opts.data)) if opts.dedupe else read(opts.data)
    if opts.validation_data:
        splits = Splits(examples, read(opts.validation_data), read(opts.test_data))
        if opts.balance:
            splits.train = balance(splits.train, seed)
    else:
        splits = split(balance(examples, seed) if opts.balance else examples, opts.split, seed)
    return splits


def require_examples(splits: Splits, opts: ClassifyOptions) -> None:
    for name, part in splits.items():
        if not part:
            raise LlmftError(f"the {name} split is empty ({len(splits.train)} training examples from "
                             f"{opts.data}); use more data or other --train-frac/--val-frac")


def make_loaders(splits: Splits | dict[str, list], tokenizer, labels: list[str], max_length: int, batch_size: int,
                 seed: int, pad_to: int | None, group_by_length: bool = False,
                 side: str = "head") -> dict[str, DataLoader]:
    """A loader per split (`splits`, or named lists of examples), texts cut to their `side`."""
    def collate(batch):
        return collate_classification(batch, tokenizer.eos_id, pad_to)

    loaders = {}
    for name, examples in splits.items():
        data = ClassificationDataset(examples, tokenizer, labels, max_length, side)
        loaders[name] = make_loader(data, data.lengths, batch_size, collate, seed,
                                    train=name == "train", group_by_length=group_by_length)
    return loaders


def build_classifier(opts: ClassifyOptions, pretrained: Pretrained, labels: list[str]) -> tuple[SequenceClassifier, RunMeta]:
    """The pretrained model with a new head and the chosen parameters trainable, and the
    run.json that rebuilds it (max_length filled in later)."""
    lora = opts.finetune == "lora"
    fingerprint = weights_fingerprint(pretrained.model) if lora and not opts.random_init else None
    seed_everything(opts.train.seed)  # the new head's init does not depend on data loading
    model = SequenceClassifier(pretrained.model, len(labels), opts.effective_class_token)
    model.token_only_last_block = not opts.book_compat
    policy = surgery(model, opts)
    trainable, total = count_parameters(model)
    log.info("trainable parameters: %s of %s (%s)", f"{trainable:,}", f"{total:,}", policy)
    meta = RunMeta(task="classification", model=base_spec(opts.model), model_config=pretrained.config.to_dict(),
                   max_length=0, random_init=opts.random_init, base_fingerprint=fingerprint,
                   lora=opts.lora.to_dict() if lora else None, labels=labels,
                   class_token=opts.effective_class_token, options=opts.record())
    return model, meta


class Prepared(NamedTuple):
    """A classifier ready to train: the model, its task, the loaders of this rank, and what the
    run directory will record."""

    model: SequenceClassifier
    task: ClassificationTask
    loaders: dict[str, Any]
    splits: Splits
    meta: RunMeta
    pretrained: Pretrained
    device: torch.device


def prepare(opts: ClassifyOptions, w: World) -> Prepared:
    """Data → model surgery → (cached) loaders, each rank's share of every global batch."""
    seed_everything(opts.train.seed)
    splits = load_splits(opts)
    labels = label_names(splits)
    require_examples(splits, opts)
    for warning in warn_about(splits):
        log.warning("warning: %s", warning)
    pretrained = load_pretrained(opts.model, random_init=opts.random_init, overrides=opts.config_overrides)
    tokenizer = pretrained.tokenizer
    max_length = opts.max_length_within(pretrained.config.context_length, longest(splits.train, tokenizer),
                                        MAX_LENGTH_CAP)
    pad_to = max_length if opts.book_compat else None
    loaders = make_loaders(splits, tokenizer, labels, max_length, opts.train.batch_size * w.size, opts.train.seed,
                           pad_to=pad_to, group_by_length=opts.train.group_by_length, side=opts.truncate)
    log.info("data: %s | labels %s | max length %d tokens (%s kept)",
             ", ".join(f"{n} {len(e)} {class_counts(e)}" for n, e in splits.items()), labels, max_length,
             opts.truncate)
    log.info(length_stats([n for loader in loaders.values() for n in loader.dataset.full_lengths],
                          max_length).describe())
    log_global_batch(opts.train, w)
    model, meta = build_classifier(opts, pretrained, labels)
    meta.max_length, meta.truncate = max_length, opts.truncate
    device = resolve_device(opts.train.device)
    start = cache_start(model) if opts.activation_cache and not opts.book_compat else 0
    for line in estimate_lines(model, ClassificationTask(loaders["train"], loaders["validation"], 0, device, start),
                               {name: loader.dataset for name, loader in loaders.items()}, start, opts.train,
                               pad_to, device, opts.final_splits):
        log.info(line)
    if start:
        loaders = cached_loaders(model, loaders, opts.train.seed, device, start, opts.train.group_by_length)
    loaders = shard_loaders(loaders, w)
    task = ClassificationTask(loaders["train"], loaders["validation"], opts.train.eval_iter, device, start)
    return Prepared(model, task, loaders, splits, meta, pretrained, device)


def train_classifier(opts: ClassifyOptions) -> dict[str, Any]:
    """The whole recipe: data → model surgery → training → final accuracies → run directory.
    Under torchrun every rank trains its share; rank 0 writes the run."""
    w = init_distributed(opts.train.device)
    with opts.run_directory() as run:
        model, task, loaders, splits, meta, pretrained, device = prepare(opts, w)
        if w.is_main:
            for name, examples in splits.items():
                write_split(run.split(name, ".csv"), examples)
        began = time.perf_counter()
        history = train(model, task, loaders["train"], loaders["validation"], opts.train,
                        run.metrics() if w.is_main else None, checkpoints=opts.checkpoints(run))
        results, scored_splits = final_metrics(model, task, {name: loaders[name] for name in opts.final_splits},
                                               device, opts.train.precision)
        trainable, total = count_parameters(model)
        results.update(train_seconds=round(time.perf_counter() - began, 2), peak_memory_mb=peak_memory_mb(device),
                       trainable_parameters=trainable, total_parameters=total, max_length=meta.max_length,
                       source=pretrained.source)
        if w.is_main:
            results["report"], scored = metrics_report(model, task, loaders, meta.labels, device, "test split",
                                                       max_fpr=opts.max_fpr, precision=opts.train.precision,
                                                       known=scored_splits)
            run.write_results(results)
            plot_history(history, run)
            plot_report(meta.labels, scored, "test split", run)
            save_finetuned(run, model, pretrained.tokenizer, meta)
    return results


def surgery(model: SequenceClassifier, opts: ClassifyOptions) -> str:
    """Make the chosen parameters trainable (the head is already replaced); says which.

    With LoRA the pretrained model is frozen and adapted, while the new classification head,
    which starts random, stays fully trainable (wrapped by ``all-linear`` or not).
    """
    if opts.finetune == "full":
        apply_trainable(model.backbone, opts.trainable)
        return opts.trainable
    adapters = apply_lora(model.backbone, opts.lora)
    model.backbone.out_head.requires_grad_(True)
    return opts.lora.describe(adapters) + " + the new head"


def final_metrics(model: nn.Module, task: ClassificationTask, loaders: dict[str, Any], device: torch.device,
                  precision: str = "32") -> tuple[dict[str, Any], dict[str, Scored]]:
    """Accuracy and loss of every split, and each split's scores for the metrics report, from
    one pass over it (`split_scores`)."""
    out: dict[str, Any] = {}
    scored: dict[str, Scored] = {}
    runner = TaskModule(model, task)
    for name, loader in loaders.items():
        scored[name], losses = split_scores(runner, loader, device, precision)
        labels, probabilities = scored[name]
        out[f"{name}_accuracy"] = float((probabilities.argmax(-1) == labels).mean())
        out[f"{name}_loss"] = mean_batch_loss(losses, batch_size_of(loader))
    return out, scored


def mean_batch_loss(losses: np.ndarray, batch_size: int) -> float:
    """The book's `calc_loss_loader` over a loader in order from its examples' losses (in that
    order): the mean of its batches' mean losses."""
    return float(np.mean([losses[i:i + batch_size].mean() for i in range(0, len(losses), batch_size)]))


def plot_history(history, run: RunDir) -> None:
    steps = history.steps
    plot_values([s["epoch"] for s in steps], [s["examples_seen"] for s in steps],
                [s["train_loss"] for s in steps], [s["val_loss"] for s in steps], "loss", run.plot("loss"))
    plot_values([e["epoch"] for e in history.epochs], [e["examples_seen"] for e in history.epochs],
                [e["train_acc"] for e in history.epochs], [e["val_acc"] for e in history.epochs],
                "accuracy", run.plot("accuracy"))


def load_classifier(run_dir: Path | str, command: str) -> tuple[nn.Module, Tokenizer, RunMeta]:
    model, tokenizer, meta = load_finetuned(run_dir)
    expect_task(meta, "classification", run_dir, command)
    return model, tokenizer, meta


@torch.no_grad()
def split_scores(runner: nn.Module, loader: Any, device: torch.device,
                 precision: str = "32") -> tuple[Scored, np.ndarray]:
    """Every example of `loader`'s dataset: its true label, every label's probability and its
    loss, in the dataset's order. Runs the examples longest first in `loader`'s (global) batch
    size and collate, far less padding than batches in order; under torchrun each rank runs its
    rows of every batch and the ranks' results are summed. `runner` as in `evaluate`."""
    loader, w = getattr(loader, "loader", loader), world()  # a ShardedBatches' whole batches
    data = loader.dataset
    batches = sorted_batches(range(len(data)), data.lengths, batch_size_of(loader))
    was_training = runner.training
    runner.eval()
    rows, probabilities, losses = [], [], []
    for indices, batch in zip(batches, DataLoader(data, batch_sampler=batches, collate_fn=loader.collate_fn)):
        batch = to_device(shard_rows(batch, w), device)
        with autocast(device, precision):
            logits = runner(batch, "logits").float()
        rows.append(torch.tensor_split(torch.tensor(indices), w.size)[w.rank])
        probabilities.append(torch.softmax(logits, -1))
        losses.append(nn.functional.cross_entropy(logits, batch["labels"], reduction="none"))
    runner.train(was_training)
    rows, probs = torch.cat(rows).to(device), torch.cat(probabilities)
    every = torch.zeros(len(data), probs.shape[-1] + 1, device=device).index_copy_(
        0, rows, torch.cat([probs, torch.cat(losses)[:, None]], -1))
    every = all_reduce_sum(every).cpu().numpy()  # each row is one rank's, the others' are zero
    return (np.asarray(data.labels), every[:, :-1]), every[:, -1]


def metrics_report(model: nn.Module, task: ClassificationTask, loaders: dict[str, Any], labels: list[str],
                   device: torch.device, title: str, evaluated: str = "test", max_fpr: float = DEFAULT_MAX_FPR,
                   precision: str = "32", known: dict[str, Scored] | None = None) -> tuple[dict[str, Any], Scored]:
    """The metrics report (`classification_report`, called `title`) of the whole `evaluated`
    split, its threshold chosen on the validation split; and the evaluated scores, for plots.
    `known`: splits already scored (`final_metrics`), not run again."""
    runner, known = TaskModule(model, task), known or {}
    scored = {name: known[name] if name in known else split_scores(runner, loaders[name], device, precision)[0]
              for name in {evaluated, "validation"}}
    return classification_report(title, labels, scored[evaluated], scored["validation"], max_fpr), scored[evaluated]


def require_known_labels(examples: list[tuple[str, str]], labels: list[str], source: str) -> list[tuple[str, str]]:
    unknown = sorted({label for _, label in examples} - set(labels))
    if unknown:
        raise LlmftError(f"{source}: label(s) {', '.join(map(repr, unknown))} are not among the run's classes "
                         f"({', '.join(labels)})")
    return examples


def evaluate_run(run_dir: Path, batch_size: int = 8, device: str = "auto", data: str | None = None,
                 text_column: str = "text", label_column: str = "label",
                 max_fpr: float = DEFAULT_MAX_FPR) -> dict[str, Any]:
    """Accuracy and loss of a saved classifier on its train/validation/test splits and the
    metrics report of its test split; with `data`, the report of that labelled file instead. The
    report (under "report") is also written with its plots into `RunDir.evaluation(data)`."""
    check_max_fpr(max_fpr)
    model, tokenizer, meta = load_classifier(run_dir, "classify eval")
    run = RunDir(run_dir)
    named = {name: read_labelled_texts(run.split(name, ".csv"))
             for name in (("validation",) if data else ("train", "validation", "test"))}
    if data:
        named["data"] = require_known_labels(read_labelled_texts(resolve_data(data), text_column, label_column),
                                             meta.labels, data)
    loaders = make_loaders(named, tokenizer, meta.labels, meta.max_length, batch_size, 0, None,
                           side=meta.truncate)
    dev = resolve_device(device)
    model.to(dev)
    task = ClassificationTask(loaders["validation"], loaders["validation"], 0, dev)
    results, known = ({}, {}) if data else final_metrics(model, task, loaders, dev)
    title = str(data) if data else "test split"
    results["report"], scored = metrics_report(model, task, loaders, meta.labels, dev, title,
                                               "data" if data else "test", max_fpr, known=known)
    folder = run.evaluation(data)
    atomic_write_json(folder.file(RunDir.EVALUATION), results["report"])
    plot_report(meta.labels, scored, title, folder)
    return results


def classify_texts(run_dir: Path, texts: list[str], device: str = "auto", batch_size: int = 8,
                   threshold: float | None = None, show_progress: bool = False) -> tuple[list[str], list[list[float]]]:
    """The run's labels and every label's probability for each text, `batch_size` texts of
    similar length at a time, cut as the run was trained."""
    for number, text in enumerate(texts, 1):
        if not text.strip():
            raise LlmftError(f"text {number} is empty; nothing to classify")
    model, tokenizer, meta = load_classifier(run_dir, "classify predict")
    check_threshold(threshold, meta.labels)
    model.to(resolve_device(device))
    probabilities: list[list[float]] = [[] for _ in texts]
    with progress_bar(total=len(texts), desc="predict", unit="text", disable=not show_progress) as bar:
        for rows in sorted_batches(range(len(texts)), [len(t) for t in texts], batch_size):  # less padding
            found = label_probabilities(model, tokenizer, [texts[i] for i in rows], meta.max_length, batch_size,
                                        meta.truncate)
            for i, probs in zip(rows, found):
                probabilities[i] = probs
            bar.update(len(rows))
    return meta.labels, probabilities


def predict(run_dir: Path, texts: list[str], device: str = "auto", batch_size: int = 8,
            threshold: float | None = None) -> list[tuple[str, float]]:
    """(label, probability) for each text, with the saved model; with a `threshold`, a two-class
    run's positive label when its probability reaches it (`decide`)."""
    labels, probabilities = classify_texts(run_dir, texts, device, batch_size, threshold)
    out = []
    for probs in probabilities:
        best = decide(probs, threshold)
        out.append((labels[best], probs[best]))
    return out


def predict_file(run_dir: Path, path: Path, out: Path, text_column: str = "text", threshold: float | None = None,
                 device: str = "auto", batch_size: int = 8) -> int:
    """Classify every row of `path` (CSV/TSV, JSON Lines, or plain text) into `out` (CSV or JSON
    Lines): each row as it was, with `predicted_label` and a `prob_LABEL` per class; the number
    of rows."""
    check_out(out, path)
    rows, texts = read_text_rows(path, text_column)
    labels, probabilities = classify_texts(run_dir, texts, device, batch_size, threshold, show_progress=True)
    for row, probs in zip(rows, probabilities):
        row["predicted_label"] = labels[decide(probs, threshold)]
        row.update({f"prob_{label}": p for label, p in zip(labels, probs)})
    write_rows(out, rows)
    return len(rows)


@torch.no_grad()
def label_probabilities(model: nn.Module, tokenizer: Tokenizer, texts: list[str], max_length: int,
                        batch_size: int = 8, side: str = "head") -> list[list[float]]:
    """Every label's probability for each text (in the head's order, `RunMeta.labels`), from
    `batch_size` texts at a time, each cut to its first (`side` head) or last (tail)
    `max_length` tokens, on the model's device."""
    device = next(model.parameters()).device
    out: list[list[float]] = []
    for start in range(0, len(texts), batch_size):
        items = [(truncate(tokenizer.encode(t), max_length, side), 0) for t in texts[start:start + batch_size]]
        batch = to_device(collate_classification(items, tokenizer.eos_id), device)
        out += torch.softmax(model(batch["input_ids"], batch["lengths"]), -1).tolist()
    return out
