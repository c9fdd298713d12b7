"""The model registry: named configs and the architecture classes that build them."""

from __future__ import annotations

import torch
from torch.overrides import TorchFunctionMode

from llmft.errors import LlmftError
from llmft.models.config import MODEL_CONFIGS, ModelConfig, RopeScaling, get_config
from llmft.models.gemma3 import Gemma3
from llmft.models.gpt2 import GPT2
from llmft.models.llama import Llama
from llmft.models.transformer import DecoderLM

ARCHITECTURES: dict[str, type[DecoderLM]] = {"gpt2": GPT2, "llama": Llama, "gemma3": Gemma3}


def _architecture(cfg: ModelConfig) -> type[DecoderLM]:
    try:
        return ARCHITECTURES[cfg.architecture]
    except KeyError:
        raise LlmftError(
            f"unknown architecture {cfg.architecture!r}; expected one of {', '.join(ARCHITECTURES)}"
        ) from None


def build_model(cfg: ModelConfig) -> DecoderLM:
    """A randomly initialised model of this config's architecture."""
    return _architecture(cfg)(cfg)


class _SkippedInit(TorchFunctionMode):
    """Inside the block, `torch.nn.init` functions return their tensor untouched (this thread
    only: a torch function mode, no function is replaced)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if getattr(func, "__module__", None) == "torch.nn.init":
            return kwargs["tensor"] if "tensor" in kwargs else args[0]
        return func(*args, **kwargs)


def meta_model(cfg: ModelConfig) -> DecoderLM:
    """A model of this config on the meta device: every parameter's name and shape, no memory.
    `DecoderLM.assign_weights` makes it a real one.

    Nothing is initialised: there is nothing to draw on the meta device, and `normal_` there
    runs a Python reference implementation whose first call imports `torch._dynamo`, a slow
    import that loading a model otherwise never needs.
    """
    with torch.device("meta"), _SkippedInit():
        return _architecture(cfg)(cfg)


def parameter_shapes(cfg: ModelConfig) -> dict[str, torch.Size]:
    """The name and shape of every parameter of a model of this config. A tied output head is
    the token embedding, listed once, as ``tok_emb.weight``."""
    return {name: p.shape for name, p in meta_model(cfg).named_parameters()}


__all__ = ["ARCHITECTURES", "MODEL_CONFIGS", "DecoderLM", "ModelConfig", "RopeScaling",
           "build_model", "get_config", "meta_model", "parameter_shapes"]
