"""Tail averaging: the uniform average of the trainable weights over the last optimizer steps.

Stochastic Weight Averaging (Izmailov et al., 2018, "Averaging Weights Leads to Wider Optima and
Better Generalization") without its learning-rate change: after each optimizer step from
`start` on, the running mean is moved towards the new weights by 1 / (steps averaged), and the
run ends with the mean in place of the last step's weights. torch's `swa_utils.AveragedModel`
computes the same mean, but over a deep copy of the whole module (frozen weights, buffers, a
second LoRA wrapper); this one keeps only what trains, by name, so a checkpoint can hold it.
"""

from __future__ import annotations

import math

import torch
from torch import nn

PREFIX = "average."  # names of the mean's tensors in a checkpoint's tensors file


def first_averaged_step(total_steps: int, fraction: float) -> int:
    """The first optimizer step (counted from 0) of the last `fraction` of `total_steps`."""
    return total_steps - max(1, math.ceil(fraction * total_steps))


class TailAverage:
    """The running mean of `params` (name → parameter) over the optimizer steps from `start` on."""

    def __init__(self, params: dict[str, nn.Parameter], start: int) -> None:
        self.params, self.start = params, start
        self.count = 0
        self.mean: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def update(self, step: int) -> None:
        """Call after optimizer step `step`: m_k = m_(k-1) + (w - m_(k-1)) / k."""
        if step < self.start:
            return
        self.count += 1
        if self.count == 1:
            self.mean = {name: p.detach().clone() for name, p in self.params.items()}
            return
        for name, p in self.params.items():
            self.mean[name].lerp_(p.detach(), 1.0 / self.count)

    @torch.no_grad()
    def apply(self) -> None:
        """Put the mean in place of the weights (nothing when no step was averaged)."""
        for name, value in self.mean.items():
            self.params[name].copy_(value)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {PREFIX + name: value for name, value in self.mean.items()}

    def load(self, tensors: dict[str, torch.Tensor], count: int) -> None:
        self.count = count
        self.mean = {name: tensors[PREFIX + name].to(p.device, p.dtype) for name, p in self.params.items()} if count else {}
