"""What a classification run will cost, said before the expensive work starts.

The FLOPs of a forward pass through a stack of blocks are, per sequence of T tokens, about
2 x their parameters x T (every weight is one multiply and one add per token) plus
2 x layers x attention width x T^2 (scores and the weighted sum). A short timed probe of one
small batch on this machine turns FLOPs into seconds: the activation cache pass runs the frozen
prefix forward over every distinct text; an epoch runs the trained suffix forward and backward
over the training split, plus forward passes for the evaluations (the probe times each kind).
Right padding counts: a batch costs what its longest text costs, times its rows.
"""

from __future__ import annotations

import random
import statistics
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from llmft.training.heads import SequenceClassifier
from llmft.training.loop import TrainConfig, autocast

PROBE_TOKENS = 512  # tokens in the probe batch: GEMMs about as large as the real batches, about a second


@dataclass(frozen=True)
class BlockCost:
    """Forward FLOPs of `layers` blocks holding `params` parameters, their attention `width` wide."""

    params: int
    layers: int
    width: int

    @classmethod
    def of(cls, model: SequenceClassifier, start: int, stop: int) -> BlockCost:
        blocks, cfg = model.backbone.blocks[start:stop], model.backbone.cfg
        return cls(sum(p.numel() for b in blocks for p in b.parameters()), len(blocks), cfg.n_heads * cfg.head_dim)

    def total(self, lengths: Iterable[int]) -> float:
        return sum(2.0 * self.params * n + 2.0 * self.layers * self.width * n * n for n in lengths)


def padded_lengths(lengths: Sequence[int], batch_size: int, order: str, pad_to: int | None = None,
                   seed: int = 0) -> list[int]:
    """The texts' lengths as batched (in batch order): each its batch's longest (or `pad_to`). `order`:
    "shuffled" (one seeded random epoch: what training costs on average) or "grouped" (similar
    lengths together, as --group-by-length and the final evaluation)."""
    if pad_to is not None:
        return [pad_to] * len(lengths)
    index = list(range(len(lengths)))
    if order == "shuffled":
        random.Random(seed).shuffle(index)
    else:
        index.sort(key=lengths.__getitem__)
    out: list[int] = []
    for start in range(0, len(index), batch_size):
        batch = [lengths[i] for i in index[start:start + batch_size]]
        out += [max(batch)] * len(batch)
    return out


def timed(fn: Callable[[], Any], device: torch.device, repeats: int = 3) -> float:
    """Seconds of the fastest of `repeats` calls of `fn`: the first also pays for one-off setup,
    and on a shared machine a single call may land in another process's burst."""
    seconds = []
    for _ in range(repeats):
        began = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds.append(time.perf_counter() - began)
    return min(seconds)


def duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.1f} min" if seconds < 5400 else f"{seconds / 3600:.1f} h"


@dataclass(frozen=True)
class Probe:
    """Seconds of one probe batch (`rows` x `length` tokens): the prefix forward (the cache
    pass), the suffix forward (evaluation) and a training step (forward and backward)."""

    rows: int
    length: int
    prefix: float
    forward: float
    step: float


def run_probe(model: SequenceClassifier, task: Any, start: int, length: int, device: torch.device,
              precision: str) -> Probe:
    """Time one small batch through what training runs; no state changes (RNG, mode, gradients)."""
    rows = max(1, PROBE_TOKENS // length)
    backbone = model.to(device).backbone
    ids = torch.zeros(rows, length, dtype=torch.long, device=device)
    batch = {"input_ids": ids, "lengths": torch.full((rows,), length, device=device),
             "labels": torch.zeros(rows, dtype=torch.long, device=device)}
    positions = backbone.default_positions(ids, None)

    def prefix() -> None:
        batch["hidden"] = backbone.run_blocks(backbone.embed(ids, positions), positions, stop=start)

    def step() -> None:
        task.loss(model, batch).backward()

    was_training = model.training
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), autocast(device, precision):
        with torch.no_grad():
            model.eval()
            seconds_prefix = timed(prefix, device) if start else 0.0
            seconds_forward = timed(lambda: task.logits(model, batch), device)
        model.train()
        seconds_step = timed(step, device)
    model.train(was_training)
    model.zero_grad(set_to_none=True)
    return Probe(rows, length, seconds_prefix, seconds_forward, seconds_step)


def training_seconds(probe: Probe, suffix: BlockCost, lengths: dict[str, list[int]], cfg: TrainConfig,
                     pad_to: int | None, final_splits: tuple[str, ...]) -> tuple[float, float]:
    """(one epoch, the final evaluation) in seconds: an epoch's steps, its loss evaluations and
    epoch-end accuracies (`eval_iter` batches of train and validation each); at the end, each of
    `final_splits` once in full, longest texts first (`split_scores`)."""
    probed = suffix.total([probe.length] * probe.rows)
    order = "grouped" if cfg.group_by_length else "shuffled"
    train = suffix.total(padded_lengths(lengths["train"], cfg.batch_size, order, pad_to))
    steps = len(lengths["train"]) // cfg.batch_size // cfg.grad_accum
    evaluations = (steps // cfg.eval_freq + 2) * 2 * cfg.eval_iter * cfg.batch_size * train / len(lengths["train"])
    final = sum(suffix.total(padded_lengths(lengths[name], cfg.batch_size, "grouped", pad_to)) for name in final_splits)
    return (probe.step * train + probe.forward * evaluations) / probed, probe.forward * final / probed


def estimate_lines(model: SequenceClassifier, task: Any, datasets: dict[str, Any], start: int, cfg: TrainConfig,
                   pad_to: int | None, device: torch.device, final_splits: tuple[str, ...]) -> list[str]:
    """What the cache pass (blocks before `start`; none when 0), training and scoring
    `final_splits` at the end will take, from the splits' `datasets` (`ClassificationDataset`)
    and a probe of the training texts' median length."""
    lengths = {name: data.lengths for name, data in datasets.items()}
    length = min(int(statistics.median(lengths["train"])), PROBE_TOKENS)
    probe = run_probe(model, task, start, length, device, cfg.precision)
    lines = []
    if start:
        prefix, probed = BlockCost.of(model, 0, start), [probe.length] * probe.rows
        distinct = [len(ids) for ids in {tuple(ids) for data in datasets.values() for ids in data.token_ids}]
        flops, rate = prefix.total(distinct), prefix.total(probed) / probe.prefix
        lines.append(f"estimate: activation cache pass (blocks 0-{start - 1}, {len(distinct):,} distinct texts, "
                     f"{sum(distinct):,} tokens, {flops / 1e12:.2f} TFLOP) ~{duration(flops / rate)} "
                     f"(a {probe.rows} x {probe.length}-token probe ran {rate / 1e9:.0f} GFLOP/s)")
    epoch, final = training_seconds(probe, BlockCost.of(model, start, len(model.backbone.blocks)), lengths, cfg, pad_to,
                                    final_splits)
    lines.append(f"estimate: one epoch ({len(lengths['train']):,} training texts, with its evaluations) "
                 f"~{duration(epoch)}; {cfg.epochs} epoch{'s' * (cfg.epochs != 1)} and the final evaluation "
                 f"~{duration(epoch * cfg.epochs + final)}")
    return lines
