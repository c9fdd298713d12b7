"""Labelled texts → balanced, split, tokenized examples → padded batches (book chapter 6)."""

from __future__ import annotations

import csv
import random
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from llmft.errors import LlmftError
from llmft.tokenizers import Tokenizer

Example = tuple[str, str]  # (text, label)
TRUNCATE_SIDES = ("head", "tail")  # which end of a text longer than max_length is kept


def check_truncate(side: object, what: str = "--truncate") -> None:
    if side not in TRUNCATE_SIDES:
        raise LlmftError(f"{what} must be one of {', '.join(TRUNCATE_SIDES)}, got {side!r}")


def truncate(ids: list[int], max_length: int, side: str = "head") -> list[int]:
    """The first (`head`, the book's cut) or the last (`tail`) `max_length` tokens of a text."""
    return ids[:max_length] if side == "head" else ids[-max_length:]


@dataclass
class Splits:
    train: list[Example]
    validation: list[Example]
    test: list[Example]

    def items(self):
        return (("train", self.train), ("validation", self.validation), ("test", self.test))


def balance(examples: list[Example], seed: int) -> list[Example]:
    """Undersample every class to the size of the smallest one (the book's spam recipe)."""
    by_label: dict[str, list[Example]] = {}
    for ex in examples:
        by_label.setdefault(ex[1], []).append(ex)
    n = min(len(group) for group in by_label.values())
    rng = random.Random(seed)
    kept = [ex for label in sorted(by_label) for ex in rng.sample(by_label[label], n)]
    return kept


def split(examples: list[Example], fractions: tuple[float, float], seed: int) -> Splits:
    """Shuffle with `seed`, then cut train = int(f0·n), validation = int(f1·n), test = rest
    (book: 1,494 balanced SMS → 1,045 / 149 / 300)."""
    shuffled = examples[:]
    random.Random(seed).shuffle(shuffled)
    n_train = int(fractions[0] * len(shuffled))
    n_val = int(fractions[1] * len(shuffled))
    return Splits(shuffled[:n_train], shuffled[n_train:n_train + n_val], shuffled[n_train + n_val:])


def label_names(splits: Splits) -> list[str]:
    """Sorted training labels; fails on a single class or on labels unseen in training."""
    labels = sorted({label for _, label in splits.train})
    if len(labels) < 2:
        raise LlmftError(f"training data has only one class ({labels[0] if labels else 'none'}); "
                         "classification needs at least two")
    for name, part in splits.items():
        unseen = sorted({label for _, label in part} - set(labels))
        if unseen:
            raise LlmftError(f"{name} data has label(s) {', '.join(map(repr, unseen))} never seen in training")
    return labels


def deduplicate(examples: list[Example]) -> list[Example]:
    """The first occurrence of each text (before splitting: no text in two splits)."""
    seen: set[str] = set()
    kept = []
    for text, label in examples:
        if text not in seen:
            seen.add(text)
            kept.append((text, label))
    return kept


def warn_about(splits: Splits) -> list[str]:
    """Warnings a user should see before training: labels that differ only in case, and texts
    that stand in more than one split (an optimistic validation or test accuracy)."""
    warnings = []
    spellings: dict[str, set[str]] = {}
    for _, part in splits.items():
        for _, label in part:
            spellings.setdefault(label.casefold(), set()).add(label)
    for variants in spellings.values():
        if len(variants) > 1:
            warnings.append(f"labels {', '.join(map(repr, sorted(variants)))} differ only in case; they are "
                            "trained as different classes")
    train_texts = {text for text, _ in splits.train}
    for name, part in (("validation", splits.validation), ("test", splits.test)):
        shared = sum(text in train_texts for text, _ in part)
        if shared:
            warnings.append(f"{shared} of {len(part)} {name} texts also stand in the training split "
                            "(--dedupe removes repeated texts before splitting)")
    return warnings


def write_split(path: Path, examples: list[Example]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["text", "label"])
        writer.writerows(examples)


def class_counts(examples: list[Example]) -> dict[str, int]:
    return dict(sorted(Counter(label for _, label in examples).items()))


class ClassificationDataset(torch.utils.data.Dataset):
    """Pre-tokenized texts, each truncated to `max_length` tokens (its head or its tail), with
    integer labels; `full_lengths` are the texts' lengths before the cut."""

    def __init__(self, examples: list[Example], tokenizer: Tokenizer, labels: list[str], max_length: int,
                 side: str = "head") -> None:
        index = {name: i for i, name in enumerate(labels)}
        encoded = [tokenizer.encode(text) for text, _ in examples]
        self.full_lengths = [len(ids) for ids in encoded]
        self.token_ids = [truncate(ids, max_length, side) for ids in encoded]
        self.lengths = [len(ids) for ids in self.token_ids]
        self.labels = [index[label] for _, label in examples]

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[list[int], int]:
        return self.token_ids[i], self.labels[i]


def longest(examples: list[Example], tokenizer: Tokenizer) -> int:
    return max(len(tokenizer.encode(text)) for text, _ in examples)


@dataclass(frozen=True)
class LengthStats:
    """Text lengths in tokens, and how many texts a `max_length` cuts."""

    texts: int
    mean: float
    p95: float
    longest: int
    max_length: int
    truncated: int

    def describe(self) -> str:
        return (f"text lengths: mean {self.mean:.1f} tokens, 95th percentile {self.p95:.0f}, max {self.longest:,} "
                f"({self.texts:,} texts); max length {self.max_length:,} truncates {self.truncated:,} of them "
                f"({self.truncated / self.texts:.1%})")


def length_stats(lengths: list[int], max_length: int) -> LengthStats:
    values = np.asarray(lengths)
    return LengthStats(len(values), float(values.mean()), float(np.percentile(values, 95)), int(values.max()),
                       max_length, int((values > max_length).sum()))


def collate_classification(batch: list[tuple[list[int], int]], pad_id: int,
                           pad_to: int | None = None) -> dict[str, torch.Tensor]:
    """Right-pad with `pad_id` to the longest item (or to `pad_to`, the book's fixed length).

    `lengths` counts the real tokens, so the head can read the last real token.
    """
    width = pad_to or max(len(ids) for ids, _ in batch)
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    for row, (ids, _) in enumerate(batch):
        input_ids[row, :len(ids)] = torch.tensor(ids, dtype=torch.long)
    return {
        "input_ids": input_ids,
        "lengths": torch.tensor([len(ids) for ids, _ in batch], dtype=torch.long),
        "labels": torch.tensor([label for _, label in batch], dtype=torch.long),
    }
