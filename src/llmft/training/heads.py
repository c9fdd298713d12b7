"""Task heads on top of a `DecoderLM`.

Classification (book chapter 6): the vocabulary projection `out_head` is replaced by
`Linear(emb_dim, num_classes)` and applied to one pooled hidden state per sequence.
"""

from __future__ import annotations

import torch
from torch import nn

from llmft.errors import LlmftError
from llmft.models.transformer import DecoderLM


def last_position(lengths: torch.Tensor, T: int) -> torch.Tensor:
    """The last real (non-padding) token of each right-padded row."""
    return lengths - 1


def last_padded_position(lengths: torch.Tensor, T: int) -> torch.Tensor:
    """Position -1 of the padded sequence (the book's chapter code)."""
    return torch.full_like(lengths, T - 1)


def first_position(lengths: torch.Tensor, T: int) -> torch.Tensor:
    return torch.zeros_like(lengths)


def pool_mean(hidden: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Mean over the real tokens only."""
    real = torch.arange(hidden.shape[1], device=hidden.device) < lengths.unsqueeze(1)
    return (hidden * real.unsqueeze(-1)).sum(1) / lengths.unsqueeze(1)


# Classification tokens that are one position: where (B,) from the row lengths and padded length T.
TOKEN_POSITIONS = {"last": last_position, "last-padded": last_padded_position, "first": first_position}
CLASS_TOKENS = (*TOKEN_POSITIONS, "mean")  # "mean": the mean over the real tokens


def check_class_token(name: object, what: str = "--class-token") -> None:
    """The one place a classification token name is validated (options and run.json call it)."""
    if name not in CLASS_TOKENS:
        raise LlmftError(f"{what}: unknown classification token {name!r}; expected one of {', '.join(CLASS_TOKENS)}")


class SequenceClassifier(nn.Module):
    """A decoder whose output head maps one pooled hidden state to class logits."""

    def __init__(self, backbone: DecoderLM, num_classes: int, class_token: str = "last") -> None:
        super().__init__()
        self.backbone = backbone
        self.class_token = class_token  # a name in CLASS_TOKENS
        self.token_only_last_block = True  # False: the book's computation, every position everywhere
        backbone.out_head = nn.Linear(backbone.cfg.emb_dim, num_classes)

    def forward(self, input_ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        positions = self.backbone.default_positions(input_ids, None)
        hidden = self.backbone.embed(input_ids, positions)
        return self.forward_from(hidden, lengths, start_layer=0)

    def forward_from(self, hidden: torch.Tensor, lengths: torch.Tensor, start_layer: int) -> torch.Tensor:
        """Resume at block `start_layer` from its input hidden states (the activation cache).
        A one-position class token runs the last block at that token only (`DecoderLM.run_blocks`)."""
        b = self.backbone
        positions = b.default_positions(hidden[..., 0], None)
        if self.class_token == "mean":
            return b.out_head(pool_mean(b.final_norm(b.run_blocks(hidden, positions, start=start_layer)), lengths))
        token = TOKEN_POSITIONS[self.class_token](lengths, hidden.shape[1])
        if self.token_only_last_block:
            x = b.run_blocks(hidden, positions, start=start_layer, keep=token.unsqueeze(1))[:, 0]
        else:
            x = b.run_blocks(hidden, positions, start=start_layer)[torch.arange(len(token)), token]
        return b.out_head(b.final_norm(x))
