"""Llama-family decoders (Llama 2/3, SmolLM2, Qwen2): RMSNorm, rotary positions, SwiGLU MLP,
grouped-query attention. Qwen2 differs only by `qkv_bias=True` in its config."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from llmft.models.config import ModelConfig, RopeScaling
from llmft.models.transformer import DecoderLM, Rope


class GatedMLP(nn.Module):
    """down(act(gate(x)) * up(x)) (Shazeer, 2020): SwiGLU with SiLU (Llama), GeGLU with GELU (Gemma)."""

    def __init__(self, cfg: ModelConfig, act: Callable[[torch.Tensor], torch.Tensor] = F.silu) -> None:
        super().__init__()
        self.gate = nn.Linear(cfg.emb_dim, cfg.hidden_dim, bias=cfg.bias)
        self.up = nn.Linear(cfg.emb_dim, cfg.hidden_dim, bias=cfg.bias)
        self.down = nn.Linear(cfg.hidden_dim, cfg.emb_dim, bias=cfg.bias)
        self.act = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(self.act(self.gate(x)) * self.up(x))


def rope_inverse_frequencies(head_dim: int, theta: float, scaling: RopeScaling | None) -> torch.Tensor:
    """1 / theta^(2i/d), with Llama-3's smooth stretch of the low frequencies when scaling is set.
    Computed in float64 on the CPU, whatever the default device (a model built on the meta device
    still needs the real numbers)."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64, device="cpu") / head_dim)
    if scaling is None:
        return inv_freq.float()
    wavelen = 2 * math.pi / inv_freq
    low_wavelen = scaling.original_context_length / scaling.low_freq_factor
    high_wavelen = scaling.original_context_length / scaling.high_freq_factor
    smooth = (scaling.original_context_length / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor)
    scaled = torch.where(wavelen > low_wavelen, inv_freq / scaling.factor, inv_freq)
    medium = (wavelen <= low_wavelen) & (wavelen >= high_wavelen)
    blended = (1 - smooth) * inv_freq / scaling.factor + smooth * inv_freq
    return torch.where(medium, blended, scaled).float()


def rotary(inv_freq: torch.Tensor, positions: torch.Tensor) -> Rope:
    """(cos, sin), each (B, T, head_dim), of the angles position · inv_freq for every pair."""
    angles = positions.unsqueeze(-1).float() * inv_freq  # (B, T, head_dim / 2)
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos(), angles.sin()


class Llama(DecoderLM):
    def init_buffers(self) -> None:
        inv_freq = rope_inverse_frequencies(self.cfg.head_dim, self.cfg.rope_theta, self.cfg.rope_scaling)
        self.register_buffer("inv_freq", inv_freq.to(self.tok_emb.weight.device), persistent=False)

    def make_norm(self) -> nn.Module:
        return nn.RMSNorm(self.cfg.emb_dim, eps=self.cfg.norm_eps)

    def make_mlp(self) -> nn.Module:
        return GatedMLP(self.cfg)

    def rope(self, positions: torch.Tensor) -> Rope:
        return rotary(self.inv_freq, positions)
