"""Batch orders that waste less padding.

`LengthGroupedSampler` (`--group-by-length`): each epoch shuffles the examples, cuts the
shuffled list into mega-batches of `batch_size * mega` examples, sorts each mega-batch by
length, splits it into batches and shuffles the batch order. Every example is still seen
once per epoch and batches stay random, but neighbours in a batch have similar lengths, so
per-batch dynamic padding adds little.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable, Iterator, Sequence

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
            batches += sorted_batches(order[start:start + span], self.lengths, self.batch_size)
        self.rng.shuffle(batches)
        return iter(batches)

    def __len__(self) -> int:
        n = len(self.lengths)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)


def sorted_batches(indices: Iterable[int], lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """`indices` longest first, cut into batches: the least padding for a pass whose order does
    not matter (a whole split's scores, texts to classify; put back in order afterwards)."""
    ordered = sorted(indices, key=lengths.__getitem__, reverse=True)
    return [ordered[i:i + batch_size] for i in range(0, len(ordered), batch_size)]


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


def batch_size_of(loader: DataLoader) -> int:
    """A loader's batch size, whether it batches itself or a batch sampler (`--group-by-length`) does."""
    return loader.batch_size or loader.batch_sampler.batch_size


def order_state(loader: Iterable) -> torch.Tensor:
    """The state of what shuffles a training loader (its generator, or the length-grouped
    sampler's RNG) as a tensor, for exact resumption; empty when nothing of its own does."""
    if isinstance(getattr(loader, "batch_sampler", None), LengthGroupedSampler):
        version, internal, _ = loader.batch_sampler.rng.getstate()  # shuffling leaves no cached gauss
        return torch.tensor([version, *internal], dtype=torch.int64)
    if getattr(loader, "generator", None) is not None:
        return loader.generator.get_state()
    return torch.empty(0, dtype=torch.uint8)


def set_order_state(loader: Iterable, state: torch.Tensor) -> None:
    if isinstance(getattr(loader, "batch_sampler", None), LengthGroupedSampler):
        values = state.tolist()
        loader.batch_sampler.rng.setstate((values[0], tuple(values[1:]), None))
    elif state.numel():
        loader.generator.set_state(state)
