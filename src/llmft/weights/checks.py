"""Checking a loaded state dict against the tensors a model expects, before copying."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from llmft.errors import LlmftError


def check_tensors(state: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor], source: str,
                  hint: str = "") -> None:
    """One-line LlmftError for the first missing, unexpected or wrongly shaped tensor."""
    suffix = f" ({hint})" if hint else ""
    for key in sorted(set(expected) | set(state)):
        if key not in state:
            raise LlmftError(f"{source}: missing tensor {key}{suffix}")
        if key not in expected:
            raise LlmftError(f"{source}: unexpected tensor {key}{suffix}")
        if state[key].shape != expected[key].shape:
            raise LlmftError(f"{source}: tensor {key} has shape {tuple(state[key].shape)}, "
                             f"expected {tuple(expected[key].shape)}{suffix}")
