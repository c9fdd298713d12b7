"""Frozen-prefix activation cache for classification.

When every trainable parameter sits in block k or later and the frozen blocks before it are
deterministic (no dropout), their output for an example never changes during training. We
compute it once per distinct text and train/evaluate blocks[k:] on it for every epoch and every
evaluation: the book's recipe (last block trainable) then runs 1 block of 12 per step instead
of 12. Rows are stored unpadded (causal attention makes a real token's state independent of
the padding after it), in memory or, above `max_memory_bytes`, in a memory-mapped file. The
trainable suffix then runs its last block at the classification token only (see
`DecoderLM.run_blocks`).
"""

from __future__ import annotations

import logging
import tempfile
import time

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from llmft.data.batching import make_loader
from llmft.data.classification import ClassificationDataset
from llmft.progress import progress_bar
from llmft.training.distributed import broadcast, world
from llmft.training.freezing import first_trainable_block
from llmft.training.heads import SequenceClassifier

log = logging.getLogger("llmft")

# Class tokens that read only real tokens; `last-padded` reads a padding position, whose state
# in the full model depends on the padding tokens, so it cannot use the cache.
CACHE_SAFE_CLASS_TOKENS = ("last", "first", "mean")


def cache_start(model: SequenceClassifier) -> int:
    """The block the cached activations feed into; 0 when caching does not apply."""
    if model.class_token not in CACHE_SAFE_CLASS_TOKENS or model.backbone.cfg.drop_rate > 0:
        return 0
    return first_trainable_block(model.backbone)


class ActivationStore:
    """The input of block `start` (T_i, emb_dim) for every distinct token sequence, computed once.

    Identical texts (the SMS collection repeats many spam messages, also across splits) share
    one computation and one row range.
    """

    def __init__(self, model: SequenceClassifier, sequences: list[list[int]], start: int, device: torch.device,
                 max_tokens: int = 2048, max_memory_bytes: int = 4 << 30) -> None:
        self.start = start
        distinct = list(dict.fromkeys(map(tuple, sequences)))
        ends = np.cumsum([len(ids) for ids in distinct])
        self.spans = {ids: (int(end) - len(ids), int(end)) for ids, end in zip(distinct, ends)}
        rows, emb_dim, dtype = int(ends[-1]) if len(ends) else 0, model.backbone.cfg.emb_dim, np.float32
        total_bytes = rows * emb_dim * np.dtype(dtype).itemsize
        if total_bytes > max_memory_bytes:
            self._file = tempfile.NamedTemporaryFile(prefix="llmft-activations-", suffix=".f32")
            self.states = np.memmap(self._file.name, dtype=dtype, mode="w+", shape=(rows, emb_dim))
            log.info("activation cache: %.1f GiB spilled to %s", total_bytes / 2**30, self._file.name)
        else:
            self.states = np.empty((rows, emb_dim), dtype=dtype)
        log.info("activation cache: blocks 0-%d over %d distinct texts of %d (%d tokens)",
                 start - 1, len(distinct), len(sequences), rows)
        began = time.perf_counter()
        self._fill(model, distinct, device, max_tokens)
        log.info("activation cache: filled in %.1f s", time.perf_counter() - began)

    @torch.no_grad()
    def _fill(self, model: SequenceClassifier, distinct: list[tuple[int, ...]], device: torch.device,
              max_tokens: int) -> None:
        """Compute the states; with several ranks, each computes every N-th batch, then all
        exchange them (each batch broadcast from the rank that computed it)."""
        backbone = model.backbone
        was_training = backbone.training
        backbone.eval()
        batches, w = same_length_batches(distinct, max_tokens), world()
        mine = batches[w.rank::w.size]
        with progress_bar(total=sum(len(rows) * len(rows[0]) for rows in mine), desc=f"cache blocks 0-{self.start - 1}",
                          unit="tok", unit_scale=True, leave=False, disable=not w.is_main) as bar:
            for rows in mine:  # progress in tokens: a batch's cost grows with its length
                ids = torch.tensor(rows, device=device)
                positions = backbone.default_positions(ids, None)
                hidden = backbone.run_blocks(backbone.embed(ids, positions), positions, stop=self.start)
                self._put(rows, hidden.float().cpu())
                bar.update(ids.numel())
        if w.size > 1:
            for j, rows in enumerate(batches):
                self._put(rows, broadcast(self._get(rows) if j % w.size == w.rank else
                                          torch.empty(len(rows), len(rows[0]), self.states.shape[1]), j % w.size))
        backbone.train(was_training)

    def _put(self, rows: list[tuple[int, ...]], hidden: torch.Tensor) -> None:
        for seq, states in zip(rows, hidden.numpy()):
            begin, end = self.spans[seq]
            self.states[begin:end] = states

    def _get(self, rows: list[tuple[int, ...]]) -> torch.Tensor:
        return torch.from_numpy(np.stack([self.states[slice(*self.spans[seq])] for seq in rows]))


def same_length_batches(sequences: list[tuple[int, ...]], max_tokens: int) -> list[list[tuple[int, ...]]]:
    """Batches of equal-length sequences, at most `max_tokens` tokens each (one sequence at
    least): no padding at all, faster than padded batches (docs/benchmarks.md)."""
    by_length: dict[int, list[tuple[int, ...]]] = {}
    for seq in sequences:
        by_length.setdefault(len(seq), []).append(seq)
    batches = []
    for length, group in sorted(by_length.items()):
        rows = max(1, max_tokens // max(length, 1))
        batches += [group[i:i + rows] for i in range(0, len(group), rows)]
    return batches


class CachedActivations(Dataset):
    """One split's examples as (input of block `start`, label) pairs read from a store."""

    def __init__(self, store: ActivationStore, data: ClassificationDataset) -> None:
        self.store, self.labels = store, data.labels
        self.spans = [store.spans[tuple(ids)] for ids in data.token_ids]

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        begin, end = self.spans[i]
        return torch.from_numpy(np.asarray(self.store.states[begin:end])), self.labels[i]


def collate_activations(batch: list[tuple[torch.Tensor, int]]) -> dict[str, torch.Tensor]:
    """Zero-pad cached states on the right; `lengths` marks the real tokens."""
    states = torch.nn.utils.rnn.pad_sequence([s for s, _ in batch], batch_first=True)
    return {
        "hidden": states,
        "lengths": torch.tensor([len(s) for s, _ in batch], dtype=torch.long),
        "labels": torch.tensor([label for _, label in batch], dtype=torch.long),
    }


def cached_loaders(model: SequenceClassifier, loaders: dict[str, DataLoader], seed: int,
                   device: torch.device, start: int, group_by_length: bool = False) -> dict[str, DataLoader]:
    """Loaders over the input of block `start`, batched and shuffled exactly as `loaders`."""
    model.backbone.to(device)
    store = ActivationStore(model, [ids for loader in loaders.values() for ids in loader.dataset.token_ids],
                            start, device)
    out = {}
    for name, loader in loaders.items():
        data = CachedActivations(store, loader.dataset)
        lengths = [end - begin for begin, end in data.spans]
        out[name] = make_loader(data, lengths, loader.batch_size or loader.batch_sampler.batch_size,
                                collate_activations, seed, train=name == "train", group_by_length=group_by_length)
    return out
