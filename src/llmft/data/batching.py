"""Batch orders that waste less padding.

`LengthGroupedSampler` (`--group-by-length`): each epoch shuffles the examples, cuts the
shuffled list into mega-batches of `batch_size * mega` examples, sorts each mega-batch by
length, splits it into batches and shuffles the batch order. Every example is still seen
once per epoch and batches stay random, but neighbours in a batch have similar lengths, so
per-batch dynamic padding adds little.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator, Sequence

import torch
from torch.utils.data import DataLoader, Dataset, Sampler


class LengthGroupedSampler(Sampler[list[int]]):
    def __init__(self, lengths: Sequence[int], batch_size: int, seed: int, drop_last: bool = False,
                 mega: int = 50) -> None:
        self.lengths, self.batch_size, self.drop_last, self.mega = list(lengths), batch_size, drop_last, mega
        self.rng = random.Random(seed)

    def __iter__(self) -> Iterator[list[int]]:
        order = list(range(len(self.lengths)))
        self.rng.shuffle(order)
        if self.drop_last:  # drop the same number of examples as a plain shuffled loader
            order = order[:len(order) - len(order) % self.batch_size]
        span = self.batch_size * self.mega
        batches = []
        for start in range(0, len(order), span):
            group = sorted(order[start:start + span], key=self.lengths.__getitem__, reverse=True)
            batches += [group[i:i + self.batch_size] for i in range(0, len(group), self.batch_size)]
        self.rng.shuffle(batches)
        return iter(batches)

    def __len__(self) -> int:
        n = len(self.lengths)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)


def make_loader(dataset: Dataset, lengths: Sequence[int], batch_size: int, collate_fn: Callable,
                seed: int, train: bool, group_by_length: bool = False) -> DataLoader:
    """The one way both tasks batch data. Training: shuffled with `seed` (or length-grouped),
    last partial batch dropped as in the book; evaluation: in order, nothing dropped."""
    drop_last = train and len(lengths) >= batch_size
    if train and group_by_length:
        return DataLoader(dataset, batch_sampler=LengthGroupedSampler(lengths, batch_size, seed, drop_last),
                          collate_fn=collate_fn)
    return DataLoader(dataset, batch_size=batch_size, shuffle=train, drop_last=drop_last, collate_fn=collate_fn,
                      generator=torch.Generator().manual_seed(seed))
