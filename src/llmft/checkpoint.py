"""Saving a fine-tuned model into its run directory and loading it back.

A run directory holds `run.json` (task, model config, task settings), `model.safetensors`
and `tokenizer/`. Weights are safetensors only: loading never unpickles anything.

A LoRA run (`run.json` holds `lora`) saves `adapter.safetensors` instead: the LoRA A/B tensors
and the task's new head, megabytes rather than gigabytes. Loading rebuilds the base model
from `run.json`'s `model` spec and adds the adapter. A randomly initialised base cannot be
rebuilt that way, so such a run also keeps the whole model in `model.safetensors`.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import safetensors.torch
from torch import nn

from llmft.errors import LlmftError
from llmft.models import ModelConfig, build_model
from llmft.rundir import atomic_write_json, read_json
from llmft.tokenizers import Tokenizer, load_tokenizer
from llmft.training.lora import LoRAConfig, apply_lora, load_lora_state_dict, lora_state_dict

log = logging.getLogger("llmft")

RUN_FILE = "run.json"
WEIGHTS_FILE = "model.safetensors"
ADAPTER_FILE = "adapter.safetensors"
# What a task adds to the base model: a LoRA run saves it beside the adapters.
TASK_HEADS = {"classification": ("backbone.out_head",)}
# ModelConfig fields that fix parameter shapes: a LoRA run's base must agree on all of them.
SHAPE_FIELDS = ("architecture", "vocab_size", "emb_dim", "n_layers", "n_heads", "n_kv_heads", "hidden_dim",
                "head_dim", "qkv_bias", "bias", "tie_embeddings")


def save_finetuned(run_dir: Path, model: nn.Module, tokenizer: Tokenizer, meta: dict[str, Any]) -> None:
    """Write weights, tokenizer and `run.json` (meta must hold `task` and `model_config`)."""
    lora = "lora" in meta
    if not lora or meta.get("random_init"):
        safetensors.torch.save_model(model, str(run_dir / WEIGHTS_FILE))
    if lora:
        adapter = lora_state_dict(model, TASK_HEADS.get(meta["task"], ()))
        safetensors.torch.save_file({k: v.contiguous() for k, v in adapter.items()}, str(run_dir / ADAPTER_FILE))
    tokenizer.save(run_dir / "tokenizer")
    atomic_write_json(run_dir / RUN_FILE, meta)


def build_task_model(meta: dict[str, Any], backbone: nn.Module | None = None) -> nn.Module:
    """The module a run trained around `backbone` (default: random weights from `run.json`)."""
    from llmft.training.heads import SequenceClassifier  # heads import models; avoid a cycle

    if backbone is None:
        backbone = build_model(ModelConfig.from_dict(meta["model_config"]))
    if meta["task"] == "classification":
        return SequenceClassifier(backbone, len(meta["labels"]), meta["pooling"])
    return backbone


def load_weights(model: nn.Module, weights: Path) -> nn.Module:
    if not weights.is_file():
        raise LlmftError(f"{weights}: weights file not found")
    try:
        missing, unexpected = safetensors.torch.load_model(model, str(weights), strict=False)
    except (RuntimeError, OSError) as e:
        raise LlmftError(f"{weights}: cannot load ({str(e).splitlines()[0]})") from None
    if missing or unexpected:
        raise LlmftError(f"{weights}: does not match {RUN_FILE} (missing {missing[:3]}, unexpected {unexpected[:3]})")
    return model


def pretrained_base(meta: dict[str, Any]) -> nn.Module:
    """The base model a LoRA run adapted, loaded again from its spec; it must have the run's shape."""
    from llmft.weights import load_pretrained  # weights pull in the hub client; load it when needed

    base = load_pretrained(meta["model"])
    saved = ModelConfig.from_dict(meta["model_config"])
    for name in SHAPE_FIELDS:
        if getattr(base.config, name) != getattr(saved, name):
            raise LlmftError(f"{meta['model']}: {name}={getattr(base.config, name)!r}, but the run's adapter "
                             f"was trained on a base with {name}={getattr(saved, name)!r} ({RUN_FILE})")
    return base.model


def load_lora_run(run_dir: Path, meta: dict[str, Any]) -> nn.Module:
    """Base model + task head + LoRA layers, with the run's weights."""
    random_base = meta.get("random_init", False)
    model = build_task_model(meta, None if random_base else pretrained_base(meta))
    apply_lora(getattr(model, "backbone", model), LoRAConfig(**meta["lora"]))
    if random_base:
        return load_weights(model, run_dir / WEIGHTS_FILE)
    adapter = run_dir / ADAPTER_FILE
    try:
        state = safetensors.torch.load_file(str(adapter))
    except (FileNotFoundError, OSError, safetensors.SafetensorError) as e:
        raise LlmftError(f"{adapter}: cannot load ({str(e).splitlines()[0]})") from None
    load_lora_state_dict(model, state, TASK_HEADS.get(meta["task"], ()), source=str(adapter))
    return model


def load_finetuned(run_dir: Path) -> tuple[nn.Module, Tokenizer, dict[str, Any]]:
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise LlmftError(f"{run_dir}: run directory not found")
    meta = read_json(run_dir / RUN_FILE)
    if "lora" in meta:
        model = load_lora_run(run_dir, meta)
    else:
        model = load_weights(build_task_model(meta), run_dir / WEIGHTS_FILE)
    model.eval()
    log.info("loaded %s model from %s", meta["task"], run_dir)
    return model, load_tokenizer(run_dir / "tokenizer"), meta
