"""Task heads on top of a `DecoderLM`.

Classification (book chapter 6): the vocabulary projection `out_head` is replaced by
`Linear(emb_dim, num_classes)` and applied to one pooled hidden state per sequence.
"""

from __future__ import annotations

import torch
from torch import nn

from llmft.errors import LlmftError
from llmft.models.transformer import DecoderLM


def pool_last(hidden: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """The last real (non-padding) token of each right-padded row."""
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), lengths - 1]


def pool_last_padded(hidden: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Position -1 of the padded sequence (the book's chapter code)."""
    return hidden[:, -1]


def pool_first(hidden: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    return hidden[:, 0]


def pool_mean(hidden: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Mean over the real tokens only."""
    real = torch.arange(hidden.shape[1], device=hidden.device) < lengths.unsqueeze(1)
    return (hidden * real.unsqueeze(-1)).sum(1) / lengths.unsqueeze(1)


POOLINGS = {"last": pool_last, "last-padded": pool_last_padded, "first": pool_first, "mean": pool_mean}


def get_pooling(name: str):
    try:
        return POOLINGS[name]
    except KeyError:
        raise LlmftError(f"unknown classification token {name!r}; expected one of {', '.join(POOLINGS)}") from None


class SequenceClassifier(nn.Module):
    """A decoder whose output head maps one pooled hidden state to class logits."""

    def __init__(self, backbone: DecoderLM, num_classes: int, pooling: str = "last") -> None:
        super().__init__()
        self.backbone = backbone
        self.pooling = pooling
        self.pool = get_pooling(pooling)
        backbone.out_head = nn.Linear(backbone.cfg.emb_dim, num_classes)

    def forward(self, input_ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        positions = self.backbone.default_positions(input_ids, None)
        hidden = self.backbone.embed(input_ids, positions)
        return self.forward_from(hidden, lengths, start_layer=0)

    def forward_from(self, hidden: torch.Tensor, lengths: torch.Tensor, start_layer: int) -> torch.Tensor:
        """Resume at block `start_layer` from its input hidden states (the activation cache)."""
        b = self.backbone
        positions = b.default_positions(hidden[..., 0], None)
        x = b.final_norm(b.run_blocks(hidden, positions, start=start_layer))
        return b.out_head(self.pool(x, lengths))
