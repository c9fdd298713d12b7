"""Which parameters train: named policies over the shared `DecoderLM` layout."""

from __future__ import annotations

from torch import nn

from llmft.errors import LlmftError
from llmft.models.transformer import DecoderLM


def _last_blocks(model: DecoderLM, n: int) -> list[nn.Module]:
    return [*model.blocks[len(model.blocks) - n:], model.final_norm, model.out_head]


TRAINABLE_POLICIES = {
    "head": lambda m: [m.out_head],
    "last-block": lambda m: _last_blocks(m, 1),  # the book's choice for the spam classifier
    "last-two-blocks": lambda m: _last_blocks(m, 2),
    "all": lambda m: [m],
}


def apply_trainable(model: DecoderLM, policy: str) -> None:
    """Freeze everything, then unfreeze the modules the policy names."""
    if policy not in TRAINABLE_POLICIES:
        raise LlmftError(f"unknown --trainable {policy!r}; expected one of {', '.join(TRAINABLE_POLICIES)}")
    model.requires_grad_(False)
    for module in TRAINABLE_POLICIES[policy](model):
        module.requires_grad_(True)


def first_trainable_block(model: DecoderLM) -> int:
    """Index of the first block holding a trainable parameter (n_layers if none does).

    Everything before it is a frozen prefix whose outputs can be computed once and cached.
    """
    if model.tok_emb.weight.requires_grad or any(
            p.requires_grad for name, p in model.named_parameters() if name.startswith("pos_emb")):
        return 0
    for i, block in enumerate(model.blocks):
        if any(p.requires_grad for p in block.parameters()):
            return i
    return len(model.blocks)


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total), counting tied tensors once."""
    params = {id(p): p for p in model.parameters()}.values()
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)
