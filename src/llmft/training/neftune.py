"""NEFTune (Jain et al., 2023, "NEFTune: Noisy Embeddings Improve Instruction Finetuning"):
while training, uniform noise in [-alpha / sqrt(L * d), alpha / sqrt(L * d)] on the input
embeddings of a batch padded to L tokens of d dimensions. L is the padded length, as in
transformers' `neftune_noise_alpha` (TRL's SFT trainer), so the two draw the same noise.

The noise is added to what the first block receives, after whatever scaling the architecture
applies (Gemma's sqrt(d)): where transformers' hook on the (scaled) embedding module adds it.
Evaluation and generation run in eval mode and see no noise."""

from __future__ import annotations

import logging
import functools
import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from llmft.errors import LlmftError

log = logging.getLogger("llmft")


def check_alpha(alpha: float | None) -> None:
    if alpha is not None and not (alpha > 0 and math.isfinite(alpha)):
        raise LlmftError(f"--neftune-alpha must be a positive number, got {alpha}")


def add_noise(block: nn.Module, args: tuple[Any, ...], alpha: float) -> tuple[Any, ...] | None:
    """A forward pre-hook on the first block: its input x (B, L, d) plus the noise, in training."""
    if not block.training:
        return None
    x, *rest = args
    bound = alpha / math.sqrt(x.shape[1] * x.shape[2])
    return (x + torch.empty_like(x).uniform_(-bound, bound), *rest)


@contextmanager
def noisy_embeddings(model: nn.Module, alpha: float | None) -> Iterator[None]:
    """NEFTune on `model` (a DecoderLM) for the duration of the block; nothing when alpha is None."""
    if alpha is None:
        yield
        return
    log.info("NEFTune: uniform noise of alpha %g on the input embeddings while training", alpha)
    handle = model.blocks[0].register_forward_pre_hook(functools.partial(add_noise, alpha=alpha))
    try:
        yield
    finally:
        handle.remove()
