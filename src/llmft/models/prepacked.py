"""Decoding on CPU with the `Linear` weights prepacked for oneDNN.

A decoding step multiplies a few rows (one new token per sequence) by every weight matrix. On a
CPU that is bound by how fast the weights stream from memory, and `nn.Linear`'s GEMM streams
them slowly for a handful of rows: oneDNN's GEMM on a copy of the weights reordered once into
its blocked layout is markedly faster at these row counts (see docs/benchmarks.md, "Generation
on CPU: prepacked weights and prompt-lookup guesses").

`prepacked_linears(model)` swaps every plain `Linear` for a `PrepackedLinear` for the duration of
a `with` block (LoRA-wrapped ones included: their frozen base is a plain `Linear`). The model's
parameters are not touched; the packed copies (as large as the Linear weights) are freed on exit.
Results equal `nn.Linear`'s up to float rounding (another summation order).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from llmft.models.transformer import plain_weight

# oneDNN chooses its layout for this many rows: faster than a layout for 1 row at every row count
# from 1 to 512 measured; 4, 16 and 64 were no better in a whole decoding step.
PACK_ROWS_HINT = 8


def can_prepack(model: nn.Module) -> bool:
    """fp32 weights on a CPU whose PyTorch build has oneDNN, and no `torch.compile`d module
    (swapping its layers would only make it recompile; inductor packs weights itself)."""
    weight = next(model.parameters())
    compiled = any(getattr(m, "_compiled_call_impl", None) is not None for m in model.modules())
    return (weight.device.type == "cpu" and weight.dtype == torch.float32 and not compiled
            and torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight"))


class PrepackedLinear(nn.Module):
    """y = x Wᵀ + b through oneDNN with W reordered once; inference only (no autograd)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), PACK_ROWS_HINT)
        self.bias = None if bias is None else bias.detach()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x.contiguous(), self.packed, self.bias, "none", [], "")

    def plain_weight(self) -> None:
        """Not plain (`llmft.models.transformer.plain_weight`): W is held only in oneDNN's
        blocked layout. So weight absorption passes it by, and it is never packed twice."""
        return None


@contextmanager
def prepacked_linears(model: nn.Module, enabled: bool = True) -> Iterator[None]:
    """Run the model's plain `Linear`s on prepacked weights inside the block (a no-op when not
    `enabled`, where `can_prepack` says no, and for a model already inside such a block)."""
    swaps = [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()
             if plain_weight(child) is not None] if enabled else []
    if not swaps or not can_prepack(model):
        yield
        return
    try:
        for parent, name, linear in swaps:
            setattr(parent, name, PrepackedLinear(*plain_weight(linear)))
        yield
    finally:
        for parent, name, linear in swaps:
            setattr(parent, name, linear)
