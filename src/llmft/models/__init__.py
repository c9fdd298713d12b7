"""The model registry: named configs and the architecture classes that build them."""

from __future__ import annotations

from llmft.errors import LlmftError
from llmft.models.config import MODEL_CONFIGS, ModelConfig, RopeScaling, get_config
from llmft.models.gpt2 import GPT2
from llmft.models.llama import Llama
from llmft.models.transformer import DecoderLM

ARCHITECTURES: dict[str, type[DecoderLM]] = {"gpt2": GPT2, "llama": Llama}


def build_model(cfg: ModelConfig) -> DecoderLM:
    """A randomly initialised model of this config's architecture."""
    try:
        cls = ARCHITECTURES[cfg.architecture]
    except KeyError:
        raise LlmftError(
            f"unknown architecture {cfg.architecture!r}; expected one of {', '.join(ARCHITECTURES)}"
        ) from None
    return cls(cfg)


__all__ = ["ARCHITECTURES", "MODEL_CONFIGS", "DecoderLM", "ModelConfig", "RopeScaling",
           "build_model", "get_config"]
