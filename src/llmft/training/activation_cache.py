"""Frozen-prefix activation cache for classification.

When every trainable parameter sits in block k or later and the frozen blocks before it are
deterministic (no dropout), their output for an example never changes during training. We
compute it once per example and train/evaluate blocks[k:] on it for every epoch and every
evaluation: the book's recipe (last block trainable) then runs 1 block of 12 per step instead
of 12. Rows are stored unpadded (causal attention makes a real token's state independent of
the padding after it), in memory or, above `max_memory_bytes`, in a memory-mapped file.
"""

from __future__ import annotations

import logging
import tempfile

import numpy as np
import torch
from tqdm import tqdm
from torch.utils.data import DataLoader, Dataset

from llmft.data.batching import make_loader
from llmft.data.classification import ClassificationDataset, collate_classification
from llmft.training.freezing import first_trainable_block
from llmft.training.heads import SequenceClassifier

log = logging.getLogger("llmft")

# Poolings that read only real tokens; `last-padded` reads a padding position, whose state
# in the full model depends on the padding tokens, so it cannot use the cache.
CACHE_SAFE_POOLINGS = ("last", "first", "mean")


def cache_start(model: SequenceClassifier) -> int:
    """The block the cached activations feed into; 0 when caching does not apply."""
    if model.pooling not in CACHE_SAFE_POOLINGS or model.backbone.cfg.drop_rate > 0:
        return 0
    return first_trainable_block(model.backbone)


class CachedActivations(Dataset):
    """Per example: the input of block `start` (T_i, emb_dim) and the label."""

    def __init__(self, model: SequenceClassifier, data: ClassificationDataset, start: int, pad_id: int,
                 device: torch.device, batch_size: int = 64, max_memory_bytes: int = 4 << 30) -> None:
        self.start, self.labels = start, data.labels
        lengths = [len(ids) for ids in data.token_ids]
        self.offsets = np.concatenate([[0], np.cumsum(lengths)])
        emb_dim = model.backbone.cfg.emb_dim
        dtype = np.float32
        total_bytes = int(self.offsets[-1]) * emb_dim * np.dtype(dtype).itemsize
        if total_bytes > max_memory_bytes:
            self._file = tempfile.NamedTemporaryFile(prefix="llmft-activations-", suffix=".f32")
            self.states = np.memmap(self._file.name, dtype=dtype, mode="w+", shape=(int(self.offsets[-1]), emb_dim))
            log.info("activation cache: %.1f GiB spilled to %s", total_bytes / 2**30, self._file.name)
        else:
            self.states = np.empty((int(self.offsets[-1]), emb_dim), dtype=dtype)
        self._fill(model, data, pad_id, device, batch_size)

    @torch.no_grad()
    def _fill(self, model: SequenceClassifier, data: ClassificationDataset, pad_id: int,
              device: torch.device, batch_size: int) -> None:
        backbone = model.backbone
        was_training = backbone.training
        backbone.eval()
        order = sorted(range(len(data)), key=lambda i: len(data.token_ids[i]))  # little padding
        for s in tqdm(range(0, len(order), batch_size), desc=f"cache blocks 0-{self.start - 1}", unit="batch",
                      leave=False):
            rows = order[s:s + batch_size]
            batch = collate_classification([(data.token_ids[i], 0) for i in rows], pad_id)
            ids = batch["input_ids"].to(device)
            positions = backbone.default_positions(ids, None)
            hidden = backbone.run_blocks(backbone.embed(ids, positions), positions, stop=self.start)
            hidden = hidden.float().cpu().numpy()
            for r, i in enumerate(rows):
                self.states[self.offsets[i]:self.offsets[i + 1]] = hidden[r, :self.offsets[i + 1] - self.offsets[i]]
        backbone.train(was_training)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return torch.from_numpy(np.asarray(self.states[self.offsets[i]:self.offsets[i + 1]])), self.labels[i]


def collate_activations(batch: list[tuple[torch.Tensor, int]]) -> dict[str, torch.Tensor]:
    """Zero-pad cached states on the right; `lengths` marks the real tokens."""
    states = torch.nn.utils.rnn.pad_sequence([s for s, _ in batch], batch_first=True)
    return {
        "hidden": states,
        "lengths": torch.tensor([len(s) for s, _ in batch], dtype=torch.long),
        "labels": torch.tensor([label for _, label in batch], dtype=torch.long),
    }


def cached_loaders(model: SequenceClassifier, loaders: dict[str, DataLoader], pad_id: int, seed: int,
                   device: torch.device, start: int, group_by_length: bool = False) -> dict[str, DataLoader]:
    """Loaders over the input of block `start`, batched and shuffled exactly as `loaders`."""
    model.backbone.to(device)
    log.info("activation cache: computing blocks 0-%d once per example", start - 1)
    out = {}
    for name, loader in loaders.items():
        data = CachedActivations(model, loader.dataset, start, pad_id, device)
        lengths = np.diff(data.offsets).tolist()
        out[name] = make_loader(data, lengths, loader.batch_size or loader.batch_sampler.batch_size,
                                collate_activations, seed, train=name == "train", group_by_length=group_by_length)
    return out
