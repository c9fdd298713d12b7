"""Instruction data (book chapter 7): load, split, tokenize and batch instruction/response pairs.

The pipeline is the book's: entries -> `split_instruction_data` -> `InstructionDataset` (one token
list per entry, prompt style applied) -> `collate_instruction` (pad, shift, mask) in a DataLoader.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch.utils.data import Dataset

from llmft.data.sources import json_records, resolve_data
from llmft.errors import LlmftError
from llmft.prompts import PromptStyle, get_prompt_style

log = logging.getLogger(__name__)

INSTRUCTION_DATA_NAME = "instruction-data"


def load_instruction_data(path_or_name: str | Path, instruction_key: str = "instruction",
                          input_key: str | None = "input", output_key: str = "output") -> list[dict]:
    """Entries with keys ``instruction``, ``input``, ``output`` (all strings, output non-empty).

    `path_or_name` is ``instruction-data`` (the book's 1,100 examples: a local copy when one
    exists, else downloaded once) or a file: a JSON list of objects, or JSON Lines. The three
    keys can be renamed for other data sets; the input is optional (missing means empty).
    Other fields of an entry are kept. Entries are numbered from 0 in error messages.
    """
    path = resolve_data(str(path_or_name)) if str(path_or_name) == INSTRUCTION_DATA_NAME else Path(path_or_name)
    if not path.is_file():
        raise LlmftError(f"{path}: file not found (expected a JSON/JSONL file or {INSTRUCTION_DATA_NAME!r})")
    keys = {"instruction": instruction_key, "input": input_key, "output": output_key}
    entries = []
    for obj, where in json_records(path):
        if not isinstance(obj, dict):
            raise LlmftError(f"{path}: {where}: expected an object, got {type(obj).__name__}")
        entry = dict(obj)
        for field, key in keys.items():
            if field == "input" and (key is None or key not in obj):
                entry[field] = ""
                continue
            if key not in obj:
                raise LlmftError(f"{path}: {where}: missing key {key!r}")
            if not isinstance(obj[key], str):
                raise LlmftError(f"{path}: {where}: key {key!r} must be a string, "
                                 f"got {type(obj[key]).__name__}")
            entry[field] = obj[key]
        if not entry["output"].strip():
            raise LlmftError(f"{path}: {where}: empty {output_key!r}")
        entries.append(entry)
    if not entries:
        raise LlmftError(f"{path}: no entries")
    return entries


class InstructionSplits(NamedTuple):
    train: list[dict]
    validation: list[dict]
    test: list[dict]


def split_instruction_data(entries: Sequence[dict], seed: int = 123,
                           fractions: tuple[float, float, float] = (0.85, 0.10, 0.05),
                           shuffle: bool = True) -> InstructionSplits:
    """Train, validation and test in the book's sizes: train is the first int(0.85 n), test the
    next int(0.10 n), validation the rest (1,100 -> 935 train, 110 test, 55 validation).

    `shuffle=False` reproduces the book exactly (it splits the file in order); shuffling uses
    `random.Random(seed)`, so a split is the same on every machine.
    """
    if len(fractions) != 3 or min(fractions) < 0 or abs(sum(fractions) - 1.0) > 1e-6:
        raise LlmftError(f"split fractions {fractions}: expected three non-negative numbers summing to 1")
    data = list(entries)
    if shuffle:
        random.Random(seed).shuffle(data)
    train_portion = int(len(data) * fractions[0])
    test_portion = int(len(data) * fractions[1])
    return InstructionSplits(train=data[:train_portion], test=data[train_portion:train_portion + test_portion],
                             validation=data[train_portion + test_portion:])


def common_prefix_length(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading items a and b share."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


class InstructionDataset(Dataset):
    """Pre-tokenized ``prompt_style.format(entry) + prompt_style.response_text(entry)``.

    Each item is ``{"input_ids": [...], "prompt_len": n}``: `prompt_len` counts the tokens of the
    prompt part, for prompt masking (exercise 7.2). The whole text is encoded in one piece, as in
    the book, so the ids match the book's; the prompt length is the common prefix of that and the
    encoded prompt (a merge across the boundary counts as response).

    Examples longer than `allowed_max_length` tokens are counted in `n_truncated` (one warning
    reports the count) but kept whole: `collate_instruction` cuts them, after appending the
    end-of-text token, as the book's collate does, so a cut example does not learn to stop there.
    """

    def __init__(self, entries: Sequence[Mapping[str, Any]], tokenizer: Any,
                 prompt_style: str | PromptStyle = "alpaca", allowed_max_length: int | None = None) -> None:
        self.data = list(entries)
        style = get_prompt_style(prompt_style, tokenizer) if isinstance(prompt_style, str) else prompt_style
        self.prompt_style = style
        self.encoded_texts: list[list[int]] = []
        self.prompt_lengths: list[int] = []
        for entry in self.data:
            prompt = style.format(entry)
            ids = tokenizer.encode(prompt + style.response_text(entry))
            self.encoded_texts.append(ids)
            self.prompt_lengths.append(common_prefix_length(ids, tokenizer.encode(prompt)))
        limit = allowed_max_length
        self.n_truncated = 0 if limit is None else sum(len(ids) > limit for ids in self.encoded_texts)
        if self.n_truncated:
            log.warning("%d of %d instruction examples are longer than %d tokens and were truncated",
                        self.n_truncated, len(self.data), limit)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {"input_ids": self.encoded_texts[index], "prompt_len": self.prompt_lengths[index]}

    def __len__(self) -> int:
        return len(self.data)


def collate_instruction(batch: Sequence[Sequence[int] | Mapping[str, Any]], pad_token_id: int,
                        ignore_index: int = -100, allowed_max_length: int | None = None,
                        mask_prompt: bool = False) -> dict[str, torch.Tensor]:
    """The book's `custom_collate_fn`: ``{"input_ids": (B, T), "targets": (B, T)}``.

    Every item gets one end-of-text (pad) token and is padded to the longest item + 1; inputs
    drop the last position, targets the first (next-token prediction). In the targets the
    appended end-of-text (which the model must learn to emit) is kept and the padding after it
    becomes `ignore_index`, so the loss skips it. The book masks every pad id after the first
    instead, which is the same unless the text itself holds that id: a chat template's
    end-of-turn token (SmolLM2's `<|im_end|>` is also its end-of-text) closes the system and user
    turns, and masking by value would drop the target that ends the answer. `mask_prompt` also ignores the targets that predict
    prompt tokens (exercise 7.2); it needs the dataset's ``{"input_ids", "prompt_len"}`` items.
    Items may also be plain token lists, as in the book.
    """
    batch_max_length = max(len(_ids(item)) + 1 for item in batch)
    inputs_lst, targets_lst = [], []
    for item in batch:
        new_item = list(_ids(item)) + [pad_token_id]
        padded = new_item + [pad_token_id] * (batch_max_length - len(new_item))
        inputs = torch.tensor(padded[:-1])
        targets = torch.tensor(padded[1:])
        targets[len(new_item) - 1:] = ignore_index  # the padding after the end-of-text target
        if mask_prompt:
            if not isinstance(item, Mapping):
                raise ValueError("mask_prompt needs items with a 'prompt_len' (InstructionDataset items)")
            targets[:max(item["prompt_len"] - 1, 0)] = ignore_index
        if allowed_max_length is not None:
            inputs = inputs[:allowed_max_length]
            targets = targets[:allowed_max_length]
        inputs_lst.append(inputs)
        targets_lst.append(targets)
    return {"input_ids": torch.stack(inputs_lst), "targets": torch.stack(targets_lst)}


def _ids(item: Sequence[int] | Mapping[str, Any]) -> Sequence[int]:
    return item["input_ids"] if isinstance(item, Mapping) else item
