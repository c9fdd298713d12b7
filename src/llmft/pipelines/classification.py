"""Fine-tune a pretrained decoder into a text classifier (book chapter 6), evaluate it,
and classify new texts with the saved run."""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from llmft.checkpoint import load_finetuned, save_finetuned
from llmft.data.classification import (
    ClassificationDataset, Splits, balance, class_counts, collate_classification, label_names, longest,
    split, write_split,
)
from llmft.data.batching import make_loader
from llmft.data.sources import read_labelled_texts, resolve_data
from llmft.errors import LlmftError
from llmft.plots import plot_values
from llmft.training.activation_cache import cache_start, cached_loaders
from llmft.rundir import atomic_write_json, check_new_run_dir, staged_run_dir
from llmft.training.freezing import apply_trainable, count_parameters
from llmft.training.heads import SequenceClassifier, check_pooling
from llmft.training.lora import LoRAConfig, apply_lora, check_finetune
from llmft.training.loop import (
    Batch, TrainConfig, autocast, resolve_device, seed_everything, to_device, train,
)
from llmft.training.resources import peak_memory_mb
from llmft.weights import load_pretrained

log = logging.getLogger("llmft")


@dataclass
class ClassifyOptions:
    model: str = "gpt2-small"
    data: str = "sms-spam"
    out: Path = Path("runs/spam")
    text_column: str = "text"
    label_column: str = "label"
    validation_data: str | None = None  # explicit splits instead of cutting `data`
    test_data: str | None = None
    balance: bool = True
    split: tuple[float, float] = (0.7, 0.1)  # train, validation; test is the rest
    max_length: int | None = None  # default: longest training example, capped at the context
    pooling: str = "last"
    trainable: str = "last-block"  # with finetune="full"
    finetune: str = "full"  # or "lora": low-rank adapters on the frozen model (book appendix E)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    random_init: bool = False
    config_overrides: dict[str, Any] = field(default_factory=dict)  # random-init shape changes
    book_compat: bool = False  # the book's computation: pad all to max_length, token at -1, no cache
    activation_cache: bool = True  # reuse the frozen prefix's outputs when that is exact
    overwrite: bool = False
    train: TrainConfig = field(default_factory=TrainConfig)


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

    def count_seen(self, batch: Batch) -> int:
        return batch["labels"].shape[0]

    def on_epoch_end(self, model: nn.Module, epoch: int) -> dict[str, Any]:
        train_acc = accuracy(model, self, self.train_batches, self.device, self.eval_iter)
        val_acc = accuracy(model, self, self.val_batches, self.device, self.eval_iter)
        log.info("epoch %d: training accuracy %.2f%% | validation accuracy %.2f%%",
                 epoch + 1, train_acc * 100, val_acc * 100)
        return {"train_acc": train_acc, "val_acc": val_acc}


@torch.no_grad()
def evaluate(model: nn.Module, task: ClassificationTask, batches, device: torch.device,
             num_batches: int | None = None, precision: str = "32") -> tuple[float, float]:
    """(accuracy, mean batch loss) over the first `num_batches` batches (all when None), in one pass."""
    was_training = model.training
    model.eval()
    correct = total = 0
    loss_sum, n_batches = 0.0, 0
    for i, batch in enumerate(batches):
        if num_batches is not None and i >= num_batches:
            break
        batch = to_device(batch, device)
        with autocast(device, precision):
            logits = task.logits(model, batch)
        correct += (logits.argmax(-1) == batch["labels"]).sum().item()
        total += batch["labels"].shape[0]
        loss_sum += nn.functional.cross_entropy(logits.float(), batch["labels"]).item()
        n_batches += 1
    model.train(was_training)
    if not total:
        return float("nan"), float("nan")
    return correct / total, loss_sum / n_batches


def accuracy(model: nn.Module, task: ClassificationTask, batches, device: torch.device,
             num_batches: int | None = None) -> float:
    """Share of correct predictions over the first `num_batches` batches (the book's
    `calc_accuracy_loader`)."""
    return evaluate(model, task, batches, device, num_batches)[0]


def load_splits(opts: ClassifyOptions) -> Splits:
    seed = opts.train.seed

    def read(name: str) -> list[tuple[str, str]]:
        return read_labelled_texts(resolve_data(name), opts.text_column, opts.label_column)

    examples = read(opts.data)
    if opts.validation_data or opts.test_data:
        if not (opts.validation_data and opts.test_data):
            raise LlmftError("--validation-data and --test-data go together")
        splits = Splits(examples, read(opts.validation_data), read(opts.test_data))
        if opts.balance:
            splits.train = balance(splits.train, seed)
        return splits
    if opts.balance:
        examples = balance(examples, seed)
    return split(examples, opts.split, seed)


def make_loaders(splits: Splits, tokenizer, labels: list[str], max_length: int, batch_size: int,
                 seed: int, pad_to: int | None, group_by_length: bool = False) -> dict[str, DataLoader]:
    def collate(batch):
        return collate_classification(batch, tokenizer.eos_id, pad_to)

    loaders = {}
    for name, examples in splits.items():
        data = ClassificationDataset(examples, tokenizer, labels, max_length)
        loaders[name] = make_loader(data, [len(ids) for ids in data.token_ids], batch_size, collate, seed,
                                    train=name == "train", group_by_length=group_by_length)
    return loaders


def train_classifier(opts: ClassifyOptions) -> dict[str, Any]:
    """The whole recipe: data → model surgery → training → final accuracies → run directory."""
    check_pooling(opts.pooling)
    check_finetune(opts.finetune)
    if opts.book_compat:
        opts.pooling = "last-padded"
    check_new_run_dir(opts.out, opts.overwrite)
    seed_everything(opts.train.seed)
    splits = load_splits(opts)
    labels = label_names(splits)
    pretrained = load_pretrained(opts.model, random_init=opts.random_init, overrides=opts.config_overrides)
    tokenizer, context = pretrained.tokenizer, pretrained.config.context_length
    if opts.max_length is not None and opts.max_length > context:
        raise LlmftError(f"--max-length {opts.max_length} exceeds the model's context of {context} tokens")
    max_length = opts.max_length or min(longest(splits.train, tokenizer), context)
    loaders = make_loaders(splits, tokenizer, labels, max_length, opts.train.batch_size, opts.train.seed,
                           pad_to=max_length if opts.book_compat else None,
                           group_by_length=opts.train.group_by_length)
    seed_everything(opts.train.seed)  # the new head's init does not depend on data loading
    model = SequenceClassifier(pretrained.model, len(labels), opts.pooling)
    model.token_only_last_block = not opts.book_compat
    policy = surgery(model, opts)
    trainable, total = count_parameters(model)
    log.info("data: %s | labels %s | max length %d tokens",
             ", ".join(f"{n} {len(e)} {class_counts(e)}" for n, e in splits.items()), labels, max_length)
    log.info("trainable parameters: %s of %s (%s)", f"{trainable:,}", f"{total:,}", policy)
    device = resolve_device(opts.train.device)
    start = cache_start(model) if opts.activation_cache and not opts.book_compat else 0
    if start:
        loaders = cached_loaders(model, loaders, opts.train.seed, device, start,
                                 opts.train.group_by_length)
    task = ClassificationTask(loaders["train"], loaders["validation"], opts.train.eval_iter, device, start)

    with staged_run_dir(opts.out, opts.overwrite) as run_dir:
        for name, examples in splits.items():
            write_split(run_dir / f"{name}.csv", examples)
        start = time.perf_counter()
        history = train(model, task, loaders["train"], loaders["validation"], opts.train, run_dir)
        train_seconds = time.perf_counter() - start
        results = final_metrics(model, task, loaders, device, opts.train.precision)
        results.update(train_seconds=round(train_seconds, 2), peak_memory_mb=peak_memory_mb(device),
                       trainable_parameters=trainable, total_parameters=total, max_length=max_length,
                       source=pretrained.source)
        atomic_write_json(run_dir / "results.json", results)
        plot_history(history, run_dir)
        meta = {"task": "classification", "model": opts.model, "model_config": pretrained.config.to_dict(),
                "labels": labels, "pooling": opts.pooling, "max_length": max_length,
                "random_init": opts.random_init, "options": {**asdict(opts), "out": str(opts.out)}}
        if opts.finetune == "lora":
            meta["lora"] = opts.lora.to_dict()
        save_finetuned(run_dir, model, tokenizer, meta)
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


def final_metrics(model, task: ClassificationTask, loaders: dict[str, DataLoader], device: torch.device,
                  precision: str = "32") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, loader in loaders.items():
        out[f"{name}_accuracy"], out[f"{name}_loss"] = evaluate(model, task, loader, device, None, precision)
    return out


def plot_history(history, run_dir: Path) -> None:
    steps = history.steps
    plot_values([s["epoch"] for s in steps], [s["examples_seen"] for s in steps],
                [s["train_loss"] for s in steps], [s["val_loss"] for s in steps], "loss", run_dir / "loss")
    plot_values([e["epoch"] for e in history.epochs], [e["examples_seen"] for e in history.epochs],
                [e["train_acc"] for e in history.epochs], [e["val_acc"] for e in history.epochs],
                "accuracy", run_dir / "accuracy")


def evaluate_run(run_dir: Path, batch_size: int = 8, device: str = "auto") -> dict[str, Any]:
    """Accuracy and loss of a saved classifier on its own train/validation/test splits."""
    model, tokenizer, meta = load_finetuned(run_dir)
    splits = Splits(*(read_labelled_texts(Path(run_dir) / f"{n}.csv") for n in ("train", "validation", "test")))
    loaders = make_loaders(splits, tokenizer, meta["labels"], meta["max_length"], batch_size, 0, None)
    dev = resolve_device(device)
    model.to(dev)
    return final_metrics(model, ClassificationTask(loaders["train"], loaders["validation"], 0, dev),
                         loaders, dev)


@torch.no_grad()
def predict(run_dir: Path, texts: list[str], device: str = "auto", batch_size: int = 8) -> list[tuple[str, float]]:
    """(label, probability) for each text, with the saved model."""
    model, tokenizer, meta = load_finetuned(run_dir)
    dev = resolve_device(device)
    model.to(dev)
    for number, text in enumerate(texts, 1):
        if not text.strip():
            raise LlmftError(f"text {number} is empty; nothing to classify")
    out = []
    for start in range(0, len(texts), batch_size):
        items = [(tokenizer.encode(t)[:meta["max_length"]], 0) for t in texts[start:start + batch_size]]
        batch = to_device(collate_classification(items, tokenizer.eos_id), dev)
        probs = torch.softmax(model(batch["input_ids"], batch["lengths"]), -1)
        best = probs.argmax(-1)
        out += [(meta["labels"][i], p) for i, p in zip(best.tolist(), probs.max(-1).values.tolist())]
    return out
