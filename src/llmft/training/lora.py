"""Low-rank adaptation, LoRA (Hu et al., 2021; the book's appendix E).

A frozen pretrained `Linear` W gets a trainable low-rank update beside it:

    y = W x + (alpha / rank) · dropout(x) A B,    A: (in, rank), B: (rank, out)

A starts Kaiming-uniform (a = √5, as `nn.Linear` initialises weights) and B at zero, so
training starts exactly at the base model. Only A and B train: rank · (in + out) numbers per
layer instead of in · out, which is why a LoRA run saves a small adapter file instead of the
whole model. `merge_lora` folds W + (alpha / rank) (A B)ᵀ back into plain `Linear` layers, so a
merged model runs at the base model's speed.

Targets name the `Linear` layers to wrap by their path in `DecoderLM`: a target matches every
`Linear` whose dotted path contains its dot-separated parts in a row, so ``query`` matches
``blocks.3.attn.query``, ``mlp`` every MLP layer (GPT-2 ``mlp.fc/proj``, Llama
``mlp.gate/up/down``), ``attn`` all four attention layers, ``proj`` both GPT-2 ``attn.proj``
and ``mlp.proj``, ``blocks.11`` every layer of block 11. Aliases: ``attn-out`` (the attention
output ``attn.proj``), ``head`` (``out_head``), ``all-linear`` (every `Linear`, head included:
the book's choice).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from llmft.errors import LlmftError
from llmft.weights.checks import check_tensors
from llmft.models.transformer import DecoderLM

ALL_LINEAR = "all-linear"
TARGET_ALIASES = {"attn-out": "attn.proj", "head": "out_head"}
FINETUNE_MODES = ("full", "lora")


@dataclass
class LoRAConfig:
    rank: int = 16
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] = (ALL_LINEAR,)

    def __post_init__(self) -> None:
        if isinstance(self.targets, str):
            self.targets = self.targets.split(",")
        self.targets = tuple(t.strip() for t in self.targets)
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise LlmftError(f"--lora-rank must be a positive integer, got {self.rank!r}")
        if not self.alpha > 0:
            raise LlmftError(f"--lora-alpha must be positive, got {self.alpha}")
        if not 0 <= self.dropout < 1:
            raise LlmftError(f"--lora-dropout must be in [0, 1), got {self.dropout}")
        if not self.targets or not all(self.targets):
            raise LlmftError(f"--lora-targets: expected comma-separated layer names, got {','.join(self.targets)!r}")

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "targets": list(self.targets)}

    def describe(self, adapters: int) -> str:
        """For the log line naming what trains."""
        return f"LoRA rank {self.rank}, alpha {self.alpha:g} on {','.join(self.targets)}: {adapters:,} adapter parameters"


class LoRALayer(nn.Module):
    """The update (alpha / rank) · dropout(x) A B, added onto a base layer's output by `add_to`."""

    def __init__(self, in_dim: int, out_dim: int, rank: int, alpha: float, dropout: float = 0.0,
                 device: torch.device | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.A = nn.Parameter(torch.empty(in_dim, rank, device=device, dtype=dtype))
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))  # the book's init of A
        self.B = nn.Parameter(torch.zeros(rank, out_dim, device=device, dtype=dtype))
        self.rank, self.alpha = rank, alpha
        self.dropout = nn.Dropout(dropout) if dropout else nn.Identity()

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    def add_to(self, base_out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """base_out + (alpha / rank) · dropout(x) A B with one output-sized result: the scale
        goes into the small (…, rank) product and the add into the matmul (addmm), so a wide
        layer such as a 49k-token output head makes no extra output-sized temporaries."""
        xa = self.dropout(x) @ (self.A * self.scaling)
        out = torch.addmm(base_out.reshape(-1, self.B.shape[1]), xa.reshape(-1, xa.shape[-1]), self.B)
        return out.view(*x.shape[:-1], self.B.shape[1])

    def delta_weight(self) -> torch.Tensor:
        """The update in `nn.Linear` weight layout (out, in)."""
        return self.scaling * (self.A @ self.B).T


class LinearWithLoRA(nn.Module):
    """A frozen `Linear` plus its `LoRALayer` (the book's names: `linear`, `lora`).

    The wrapped `Linear` is kept as is, so a weight it shares (GPT-2's output head is the
    token embedding) stays shared.
    """

    def __init__(self, linear: nn.Linear, rank: int, alpha: float, dropout: float = 0.0) -> None:
        super().__init__()
        self.linear = linear
        w = linear.weight
        self.lora = LoRALayer(linear.in_features, linear.out_features, rank, alpha, dropout, w.device, w.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lora.add_to(self.linear(x), x)

    def plain_weight(self) -> None:
        """Not plain (`llmft.models.transformer.plain_weight`): the output adds the low-rank
        update, which code reading the base weight W instead of calling the layer would drop."""
        return None


def check_finetune(mode: str) -> None:
    if mode not in FINETUNE_MODES:
        raise LlmftError(f"--finetune must be one of {', '.join(FINETUNE_MODES)}, got {mode!r}")


def _matches(path: str, target: str) -> bool:
    """Whether the target's dot-separated parts occur in a row in the module path."""
    parts, want = path.split("."), target.split(".")
    return any(parts[i:i + len(want)] == want for i in range(len(parts) - len(want) + 1))


def select_targets(model: DecoderLM, targets: tuple[str, ...]) -> list[str]:
    """Paths of the `Linear` layers the targets name; every target must name one."""
    linears = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    chosen: set[str] = set()
    for target in targets:
        if target == ALL_LINEAR:
            chosen.update(linears)
            continue
        hits = [p for p in linears if _matches(p, TARGET_ALIASES.get(target, target))]
        if not hits:
            raise LlmftError(f"--lora-targets: {target!r} matches no Linear layer of {model.cfg.name} "
                             f"(layers are named like {', '.join(linears[:6])}, ..., out_head; "
                             f"or use attn, mlp, attn-out, head, {ALL_LINEAR})")
        chosen.update(hits)
    return [p for p in linears if p in chosen]


def lora_layers(model: nn.Module) -> dict[str, LinearWithLoRA]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LinearWithLoRA)}


def apply_lora(model: DecoderLM, cfg: LoRAConfig) -> int:
    """Freeze the whole model, wrap the targeted `Linear`s; returns the number of LoRA parameters.

    A task head should replace `out_head` before this call, so ``head``/``all-linear`` wrap it.
    """
    if lora_layers(model):
        raise LlmftError("the model already has LoRA layers; merge them (merge_lora) before adding new ones")
    paths = select_targets(model, cfg.targets)
    model.requires_grad_(False)
    for path in paths:
        parent, _, name = path.rpartition(".")
        owner = model.get_submodule(parent)
        wrapped = LinearWithLoRA(getattr(owner, name), cfg.rank, cfg.alpha, cfg.dropout)
        setattr(owner, name, wrapped.train(owner.training))  # a model in eval mode stays so
    return sum(p.numel() for m in lora_layers(model).values() for p in m.lora.parameters())


@contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """`model` as its base while inside: each `LinearWithLoRA` is swapped for the `Linear` it
    wraps, so the output is the base model's exactly (preference tuning's reference with fresh
    adapters); the adapters are back on leaving."""
    wrapped = lora_layers(model)

    def put(path: str, module: nn.Module) -> None:
        parent, _, name = path.rpartition(".")
        setattr(model.get_submodule(parent), name, module)

    try:
        for path, layer in wrapped.items():
            put(path, layer.linear)
        yield model
    finally:
        for path, layer in wrapped.items():
            put(path, layer)


@torch.no_grad()
def merge_lora(model: nn.Module) -> nn.Module:
    """Replace each `LinearWithLoRA` by a plain `Linear` with weight W + (alpha / rank) (A B)ᵀ.

    The merged weight is always a new tensor: a tied output head (GPT-2, SmolLM2) merges into an
    untied copy, the token embedding keeps its weights, and the model's config says
    ``tie_embeddings=False`` from then on (saving and Hugging Face export rely on it).
    """
    for decoder in [m for m in model.modules() if isinstance(m, DecoderLM)]:
        head = decoder.out_head
        if isinstance(head, LinearWithLoRA) and head.linear.weight is decoder.tok_emb.weight:
            decoder.cfg = decoder.cfg.with_(tie_embeddings=False)
    for path, wrapped in lora_layers(model).items():
        base = wrapped.linear
        merged = nn.Linear(base.in_features, base.out_features, bias=base.bias is not None,
                           device=base.weight.device, dtype=base.weight.dtype)
        delta = wrapped.lora.delta_weight().to(torch.float32)
        merged.weight.copy_(base.weight.to(torch.float32) + delta)
        if base.bias is not None:
            merged.bias.copy_(base.bias)
        merged.requires_grad_(base.weight.requires_grad)
        parent, _, name = path.rpartition(".")
        setattr(model.get_submodule(parent), name, merged)
    return model


def lora_state_dict(model: nn.Module, also: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    """The LoRA A and B tensors, plus every tensor under the module paths in `also` (a new task
    head trained beside the adapters)."""
    state = model.state_dict()
    adapters = {f"{path}.lora.{n}" for path in lora_layers(model) for n in ("A", "B")}
    return {k: v for k, v in state.items() if k in adapters or any(k.startswith(p + ".") for p in also)}


@torch.no_grad()
def load_lora_state_dict(model: nn.Module, state: dict[str, torch.Tensor], also: tuple[str, ...] = (),
                         source: str = "adapter") -> None:
    """Load what `lora_state_dict(model, also)` saved; names and shapes must match exactly."""
    if not lora_layers(model):
        raise LlmftError(f"{source}: the model has no LoRA layers to load the adapter into")
    expected = lora_state_dict(model, also)
    check_tensors(state, expected, source, hint="adapter made for other LoRA targets or another base model?")
    for key, tensor in expected.items():
        tensor.copy_(state[key])
