"""Gemma 3 (Gemma Team, 2025): the Llama decoder with Gemma's changes.

- token embeddings scaled by sqrt(emb_dim), the factor rounded to the embedding dtype;
- RMSNorm computed in float32 with a (1 + weight) scale (the weights start at 0);
- four norms per block: before and after attention, before and after the MLP;
- RMSNorm on every query and key head before the rotation;
- GeGLU MLP (tanh-approximated GELU);
- attention scores scaled by 1/sqrt(query_pre_attn_scalar);
- sliding-window attention on local layers (five of every six), whose RoPE base is
  `rope_local_theta` (10,000) instead of the global layers' `rope_theta` (1,000,000).

Grouped-query attention, tied embeddings and the window itself are config values shared with the
other architectures (`ModelConfig`).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from llmft.models.llama import GatedMLP, Llama, rope_inverse_frequencies, rotary
from llmft.models.transformer import Block, CausalSelfAttention, Rope


class GemmaRMSNorm(nn.Module):
    """x / rms(x) * (1 + weight), computed in float32 and returned in x's dtype."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x.float()
        y = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + self.eps)
        return (y * (1.0 + self.weight.float())).type_as(x)


class Gemma3(Llama):
    def init_buffers(self) -> None:
        super().init_buffers()  # inv_freq: the global layers' rotation
        cfg = self.cfg
        local = rope_inverse_frequencies(cfg.head_dim, cfg.rope_local_theta or cfg.rope_theta, None)
        self.register_buffer("local_inv_freq", local.to(self.tok_emb.weight.device), persistent=False)

    def make_norm(self) -> nn.Module:
        return GemmaRMSNorm(self.cfg.emb_dim, self.cfg.norm_eps)

    def make_mlp(self) -> nn.Module:
        return GatedMLP(self.cfg, functools.partial(F.gelu, approximate="tanh"))

    def make_block(self, layer: int) -> Block:
        """Normed query and key heads, and a norm after attention and after the MLP too."""
        cfg = self.cfg
        head_norms = (GemmaRMSNorm(cfg.head_dim, cfg.norm_eps), GemmaRMSNorm(cfg.head_dim, cfg.norm_eps))
        attn = CausalSelfAttention(cfg, window=cfg.attention_window(layer), qk_norms=head_norms)
        return Block(cfg, attn, self.make_norm(), self.make_norm(), self.make_mlp(),
                     post_norms=(self.make_norm(), self.make_norm()))

    def embed(self, idx: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Token embeddings times sqrt(emb_dim), rounded to float32 and then to their dtype
        (in bfloat16 sqrt(640) is 25.25) as Gemma's code does."""
        x = super().embed(idx, positions)
        return x * torch.tensor(self.cfg.emb_dim ** 0.5).to(x.dtype)

    def layer_ropes(self, positions: torch.Tensor) -> list[Rope | None]:
        """Local layers rotate by `rope_local_theta`, global ones by `rope_theta`."""
        global_rope, local_rope = rotary(self.inv_freq, positions), rotary(self.local_inv_freq, positions)
        return [global_rope if self.cfg.attention_window(i) is None else local_rope
                for i in range(self.cfg.n_layers)]
