"""Preference data (the book's chapter 7 bonus, DPO): instructions with a preferred (`chosen`) and
a dispreferred (`rejected`) response, split, tokenized and batched in pairs.

The pipeline is the instruction data's, twice: entries -> `split_preference_data` (the
instruction split, then pairs whose two responses are the same dropped: they carry no signal)
-> `PreferenceDataset` (prompt + chosen and prompt + rejected, each an `InstructionDataset`
item) -> `collate_preference` (`collate_instruction` over both responses of every pair, the
prompt masked, end-of-text kept, padded to the batch's longest) in a DataLoader, whose training
batches keep their composition and change their order (`ShuffledBatches`).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch.utils.data import Dataset, Sampler

from llmft.data.instruction import InstructionDataset, InstructionSplits, collate_instruction, split_instruction_data
from llmft.data.sources import json_records, resolve_data
from llmft.errors import LlmftError
from llmft.prompts import PromptStyle

log = logging.getLogger(__name__)

PREFERENCE_DATA_NAME = "instruction-data-with-preference"
RESPONSES = ("chosen", "rejected")
NO_TOKEN = -1  # a pad id no tokenizer gives a token


class PreferenceKeys(NamedTuple):
    """Where an entry keeps each field (the book's names by default)."""

    instruction: str = "instruction"
    input: str = "input"
    chosen: str = "chosen"
    rejected: str = "rejected"


def load_preference_data(path_or_name: str | Path, keys: PreferenceKeys = PreferenceKeys()) -> list[dict]:
    """Entries with string fields ``instruction``, ``input`` (missing means empty), ``chosen`` and
    ``rejected`` (both non-empty), read from `keys`; other fields are kept, and ``output`` (what
    `instruct respond` scores against) is the chosen response where the entry has none.

    `path_or_name` is ``instruction-data-with-preference`` (the book's 1,100 pairs: a local copy
    when one exists, else downloaded once) or a JSON list / JSON Lines file. A bad entry is a
    one-line error naming it (numbered from 0) and the key.
    """
    path = resolve_data(str(path_or_name))
    entries = [_preference_entry(obj, keys, f"{path}: {where}") for obj, where in json_records(path)]
    if not entries:
        raise LlmftError(f"{path}: no entries")
    return entries


def _preference_entry(obj: Any, keys: PreferenceKeys, place: str) -> dict:
    """One checked entry, its fields under the standard names."""
    if not isinstance(obj, dict):
        raise LlmftError(f"{place}: expected an object, got {type(obj).__name__}")
    entry = dict(obj)
    for field, key in keys._asdict().items():
        value = obj.get(key, "") if field == "input" else obj.get(key)
        if value is None and key not in obj:
            raise LlmftError(f"{place}: missing key {key!r}")
        if not isinstance(value, str):
            raise LlmftError(f"{place}: key {key!r} must be a string, got {type(value).__name__}")
        if field in RESPONSES and not value.strip():
            raise LlmftError(f"{place}: empty {key!r}")
        entry[field] = value
    entry.setdefault("output", entry["chosen"])
    return entry


def is_informative(entry: Mapping[str, Any]) -> bool:
    """Whether a pair can teach a preference: its two responses differ."""
    return entry["chosen"].strip() != entry["rejected"].strip()


def split_preference_data(entries: Sequence[dict], seed: int = 123,
                          shuffle: bool = True) -> tuple[InstructionSplits, int]:
    """The instruction data's 85/10/5 split (`split_instruction_data`: seeded, or the book's
    split of the file in order), then every pair whose responses are the same dropped; also the
    number dropped. Splitting first keeps the partition of a file with the same instructions in
    the same order (the book's SFT and DPO files): no SFT training instruction in the DPO test split.
    """
    splits = split_instruction_data(entries, seed, shuffle=shuffle)
    kept = InstructionSplits(*([e for e in split if is_informative(e)] for split in splits))
    skipped = len(entries) - sum(map(len, kept))
    if skipped:
        log.info("%d of %d pairs have the same chosen and rejected response (no preference signal): skipped",
                 skipped, len(entries))
    return kept, skipped


class PreferenceDataset(Dataset):
    """Each pair as two `InstructionDataset` items (``input_ids``, ``prompt_len``): the styled
    prompt + chosen response and prompt + rejected response, tokenized as in instruction tuning.

    A pair where `allowed_max_length` leaves either response no token to score (its prompt fills
    the length) is dropped and counted in `n_unscored`. `set_reference` stores each pair's
    reference log-probabilities; `collate_preference` then batches them beside the tokens.
    """

    def __init__(self, entries: Sequence[Mapping[str, Any]], tokenizer: Any, style: PromptStyle,
                 allowed_max_length: int | None = None) -> None:
        sides = [InstructionDataset([{**e, "output": e[side]} for e in entries], tokenizer, style,
                                    allowed_max_length) for side in RESPONSES]
        kept = [i for i in range(len(entries)) if all(_scores_a_token(side[i], allowed_max_length) for side in sides)]
        self.data = [entries[i] for i in kept]
        self.pairs = [(sides[0][i], sides[1][i]) for i in kept]
        self.n_unscored = len(entries) - len(kept)
        if self.n_unscored:
            log.warning("%d of %d pairs have a prompt of %d tokens or more (no response token left): skipped",
                        self.n_unscored, len(entries), allowed_max_length)
        self.reference: torch.Tensor | None = None  # (pairs, 2): chosen, rejected

    def lengths(self) -> list[int]:
        """Each pair's longer tokenized text, for length-grouped batching."""
        return [max(len(c["input_ids"]), len(r["input_ids"])) for c, r in self.pairs]

    def set_reference(self, logps: torch.Tensor) -> None:
        """The reference model's (chosen, rejected) log-probabilities of every pair, in order."""
        if logps.shape != (len(self.pairs), 2):
            raise ValueError(f"expected reference log-probabilities of shape ({len(self.pairs)}, 2), "
                             f"got {tuple(logps.shape)}")
        self.reference = logps.detach().to("cpu", torch.float32)

    def __getitem__(self, index: int) -> dict[str, Any]:
        chosen, rejected = self.pairs[index]
        item = {"chosen": chosen, "rejected": rejected}
        if self.reference is not None:
            item["reference_logps"] = self.reference[index]
        return item

    def __len__(self) -> int:
        return len(self.pairs)


class ShuffledBatches(Sampler[list[int]]):
    """Fixed batches of indices, in a new order every epoch (drawn from `generator`). Every
    training batch is then one the reference pass ran whole, padded the same, so the cached
    reference log-probabilities equal recomputing them bit for bit (another batch's padding
    changes the floats). For one epoch this is the book's shuffled loader."""

    def __init__(self, batches: list[list[int]], generator: torch.Generator) -> None:
        self.batches, self.generator = batches, generator

    def __iter__(self):
        for i in torch.randperm(len(self.batches), generator=self.generator).tolist():
            yield self.batches[i]

    def __len__(self) -> int:
        return len(self.batches)


def _scores_a_token(item: Mapping[str, Any], allowed_max_length: int | None) -> bool:
    """Whether `collate_preference` leaves a target of this response unmasked."""
    targets = _collate_responses([item], allowed_max_length)["targets"]
    return bool((targets != -100).any())


def _collate_responses(rows: Sequence[Mapping[str, Any]], allowed_max_length: int | None) -> dict[str, torch.Tensor]:
    """`collate_instruction` with the prompt masked and `NO_TOKEN` as the pad: only the appended
    end-of-text and the padding count as padding, never an end-of-text id inside the text (a chat
    template's end-of-turn often is one), so the response's own tokens all stay scored."""
    return collate_instruction(rows, NO_TOKEN, allowed_max_length=allowed_max_length, mask_prompt=True)


def collate_preference(batch: Sequence[Mapping[str, Any]], pad_token_id: int,
                       allowed_max_length: int | None = None) -> dict[str, torch.Tensor]:
    """``{"input_ids": (B, 2, T), "targets": (B, 2, T)}``, chosen at ``[:, 0]`` and rejected at
    ``[:, 1]``: `collate_instruction` over both responses of every pair (so both share the
    batch's padded length), the prompt masked, the end-of-text (`pad_token_id`) kept as the last
    target. Dimension 0 counts pairs, so any cut of a batch into rows keeps pairs whole. With
    cached reference log-probabilities, also ``"reference_logps": (B, 2)``.
    """
    rows = [item[side] for item in batch for side in RESPONSES]
    out = {name: t.view(len(batch), 2, -1) for name, t in _collate_responses(rows, allowed_max_length).items()}
    for t in out.values():
        t[t == NO_TOKEN] = pad_token_id
    if all("reference_logps" in item for item in batch):
        out["reference_logps"] = torch.stack([item["reference_logps"] for item in batch])
    return out
