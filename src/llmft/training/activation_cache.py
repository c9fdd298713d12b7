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

from llmft.data.batching import batch_size_of, make_loader
from llmft.data.classification import ClassificationDataset
from llmft.progress import progress_bar
from llmft.training.distributed import broadcast, world
from llmft.training.freezing import first_trainable_block
from llmft.training.heads import SequenceClassifier
from llmft.training.shared_prefixes import (PrefixPlan, gather_prefixes, plan_prefixes, run_after_prefixes,
                                            wave_batches)

log = logging.getLogger("llmft")

# Class tokens that read only real tokens; `last-padded` reads a padding position, whose state
# in the full model depends on the padding tokens, so it cannot use the cache.
CACHE_SAFE_CLASS_TOKENS = ("last", "first", "mean")
# Key/value slots a batch may hold per new token: bounds a batch of short suffixes after long prefixes.
SLOTS_PER_TOKEN = 4


def cache_start(model: SequenceClassifier) -> int:
    """The block the cached activations feed into; 0 when caching does not apply."""
    if model.class_token not in CACHE_SAFE_CLASS_TOKENS or model.backbone.cfg.drop_rate > 0:
        return 0
    return first_trainable_block(model.backbone)


class ActivationStore:
    """The input of block `start` (T_i, emb_dim) for every distinct token sequence, computed once.

    Identical texts (the SMS collection repeats many spam messages, also across splits) share
    one computation and one row range, and so do the leading tokens that texts have in common
    (`llmft.training.shared_prefixes`; in one process, when their keys and values fit in a
    quarter of `max_memory_bytes`).
    """

    def __init__(self, model: SequenceClassifier, sequences: list[list[int]], start: int, device: torch.device,
                 max_tokens: int = 2048, max_memory_bytes: int = 4 << 30, share_prefixes: bool = True) -> None:
        self.start = start
        plan = self._plan(model, list(dict.fromkeys(map(tuple, sequences))), share_prefixes, max_memory_bytes)
        ends = np.cumsum([len(ids) for ids in plan.sequences])
        self.spans = {ids: (int(end) - len(ids), int(end)) for ids, end in zip(plan.sequences, ends)}
        rows, emb_dim, dtype = int(ends[-1]) if len(ends) else 0, model.backbone.cfg.emb_dim, np.float32
        total_bytes = rows * emb_dim * np.dtype(dtype).itemsize
        if total_bytes > max_memory_bytes:
            self._file = tempfile.NamedTemporaryFile(prefix="llmft-activations-", suffix=".f32")
            self.states = np.memmap(self._file.name, dtype=dtype, mode="w+", shape=(rows, emb_dim))
            log.info("activation cache: %.1f GiB spilled to %s", total_bytes / 2**30, self._file.name)
        else:
            self.states = np.empty((rows, emb_dim), dtype=dtype)
        log.info("activation cache: blocks 0-%d over %d distinct texts of %d (%d tokens, %d computed)",
                 start - 1, len(plan.sequences), len(sequences), rows, plan.new_tokens())
        began = time.perf_counter()
        self._fill(model, plan, device, max_tokens)
        log.info("activation cache: filled in %.1f s", time.perf_counter() - began)

    def _plan(self, model: SequenceClassifier, distinct: list[tuple[int, ...]], share: bool,
              max_memory_bytes: int) -> PrefixPlan:
        """Shared prefixes once where that applies: one process (ranks would have to exchange
        keys and values between waves) and kept keys and values within a quarter of the memory."""
        plan = plan_prefixes(distinct, share=share and world().size == 1)
        cfg = model.backbone.cfg
        kv_bytes = sum(plan.keep) * self.start * 2 * cfg.n_kv_heads * cfg.head_dim * 4
        if kv_bytes > max_memory_bytes // 4:
            log.info("activation cache: shared prefixes computed for every text (their keys and values "
                     "would take %.1f GiB)", kv_bytes / 2**30)
            plan = plan_prefixes(distinct, share=False)
        return plan

    @torch.no_grad()
    def _fill(self, model: SequenceClassifier, plan: PrefixPlan, device: torch.device, max_tokens: int) -> None:
        """Compute the states wave by wave; with several ranks (no shared prefixes, one wave),
        each computes every N-th batch, then all exchange them (each batch broadcast from the
        rank that computed it)."""
        backbone = model.backbone
        was_training = backbone.training
        backbone.eval()
        batches, w = wave_batches(plan, max_tokens, SLOTS_PER_TOKEN * max_tokens), world()
        mine, kept = batches[w.rank::w.size], {}
        with progress_bar(total=sum(map(plan.new_length, (i for b in mine for i in b))),
                          desc=f"cache blocks 0-{self.start - 1}",
                          unit="tok", unit_scale=True, leave=False, disable=not w.is_main) as bar:
            for batch in mine:  # progress in tokens: a batch's cost grows with its length
                self._put(plan, batch, self._compute(backbone, plan, batch, kept, device))
                bar.update(sum(map(plan.new_length, batch)))
        if w.size > 1:
            for j, batch in enumerate(batches):  # rank j % size computed batch j
                self._put(plan, batch, broadcast(self._get(plan, batch), j % w.size))
        self._copy_prefixes(plan)
        backbone.train(was_training)

    def _compute(self, backbone, plan: PrefixPlan, batch: list[int], kept: dict[int, torch.Tensor],
                 device: torch.device) -> torch.Tensor:
        """The batch's new tokens through blocks[:start] (B, L, C; `_put` drops the padding's
        rows); keeps the keys and values later waves read."""
        shared = [plan.shared[i] for i in batch]
        length = max(map(plan.new_length, batch))
        new_ids = torch.tensor([[*plan.sequences[i][p:], *[0] * (length - plan.new_length(i))]
                                for i, p in zip(batch, shared)], device=device)
        prefix_kv = gather_prefixes(plan, batch, kept).to(device) if max(shared) else None
        keep_rows = [row for row, i in enumerate(batch) if plan.keep[i]]
        hidden, new_kv = run_after_prefixes(backbone, new_ids, torch.tensor(shared, device=device), prefix_kv,
                                            self.start, keep_rows)
        for j, row in enumerate(keep_rows):
            kept[batch[row]] = new_kv[:, :, j, :, :plan.keep[batch[row]]].cpu().clone()
        return hidden.float().cpu()

    def _rows(self, plan: PrefixPlan, i: int) -> slice:
        """The store rows of sequence i's new tokens."""
        begin, end = self.spans[plan.sequences[i]]
        return slice(begin + plan.shared[i], end)

    def _put(self, plan: PrefixPlan, batch: list[int], hidden: torch.Tensor) -> None:
        for i, states in zip(batch, hidden.numpy()):
            self.states[self._rows(plan, i)] = states[:plan.new_length(i)]

    def _get(self, plan: PrefixPlan, batch: list[int]) -> torch.Tensor:
        """(B, L, C) as `_compute` returns it."""
        out = torch.zeros(len(batch), max(map(plan.new_length, batch)), self.states.shape[1])
        for row, i in enumerate(batch):
            out[row, :plan.new_length(i)] = torch.from_numpy(np.asarray(self.states[self._rows(plan, i)]))
        return out

    def _copy_prefixes(self, plan: PrefixPlan) -> None:
        """Each sequence's shared prefix rows from the sequence before it (in sorted order, so
        that one's rows are complete by then)."""
        for before, seq, p in zip(plan.sequences, plan.sequences[1:], plan.shared[1:]):
            if p:
                src, dst = self.spans[before][0], self.spans[seq][0]
                self.states[dst:dst + p] = self.states[src:src + p]


class CachedActivations(Dataset):
    """One split's examples as (input of block `start`, label) pairs read from a store."""

    def __init__(self, store: ActivationStore, data: ClassificationDataset) -> None:
        self.store, self.labels = store, data.labels
        self.spans = [store.spans[tuple(ids)] for ids in data.token_ids]
        self.lengths = [end - begin for begin, end in self.spans]

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
        out[name] = make_loader(data, data.lengths, batch_size_of(loader),
                                collate_activations, seed, train=name == "train", group_by_length=group_by_length)
    return out
