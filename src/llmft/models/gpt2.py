"""GPT-2 (Radford et al., 2019): learned absolute positions, LayerNorm, GELU (tanh) MLP."""

from __future__ import annotations

import torch
from torch import nn

from llmft.models.config import ModelConfig
from llmft.models.transformer import DecoderLM


class GeluMLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.fc = nn.Linear(cfg.emb_dim, cfg.hidden_dim, bias=cfg.bias)
        self.proj = nn.Linear(cfg.hidden_dim, cfg.emb_dim, bias=cfg.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(nn.functional.gelu(self.fc(x), approximate="tanh"))


class GPT2(DecoderLM):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__(cfg)
        self.pos_emb = nn.Embedding(cfg.context_length, cfg.emb_dim)
        nn.init.normal_(self.pos_emb.weight, std=0.02)

    def make_norm(self) -> nn.Module:
        return nn.LayerNorm(self.cfg.emb_dim, eps=self.cfg.norm_eps)

    def make_mlp(self) -> nn.Module:
        return GeluMLP(self.cfg)

    def position_embedding(self, positions: torch.Tensor) -> torch.Tensor:
        return self.pos_emb(positions)
