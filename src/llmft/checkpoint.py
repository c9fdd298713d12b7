"""Saving a fine-tuned model into its run directory and loading it back.

A run directory holds `run.json` (task, model config, task settings), `model.safetensors`
and `tokenizer/`. Weights are safetensors only: loading never unpickles anything.
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

log = logging.getLogger("llmft")

RUN_FILE = "run.json"
WEIGHTS_FILE = "model.safetensors"


def save_finetuned(run_dir: Path, model: nn.Module, tokenizer: Tokenizer, meta: dict[str, Any]) -> None:
    """Write weights, tokenizer and `run.json` (meta must hold `task` and `model_config`)."""
    safetensors.torch.save_model(model, str(run_dir / WEIGHTS_FILE))
    tokenizer.save(run_dir / "tokenizer")
    atomic_write_json(run_dir / RUN_FILE, meta)


def build_task_model(meta: dict[str, Any]) -> nn.Module:
    """The module a run trained, rebuilt from `run.json` with random weights."""
    from llmft.training.heads import SequenceClassifier  # heads import models; avoid a cycle

    backbone = build_model(ModelConfig.from_dict(meta["model_config"]))
    if meta["task"] == "classification":
        return SequenceClassifier(backbone, len(meta["labels"]), meta["pooling"])
    return backbone


def load_finetuned(run_dir: Path) -> tuple[nn.Module, Tokenizer, dict[str, Any]]:
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise LlmftError(f"{run_dir}: run directory not found")
    meta = read_json(run_dir / RUN_FILE)
    model = build_task_model(meta)
    weights = run_dir / WEIGHTS_FILE
    if not weights.is_file():
        raise LlmftError(f"{weights}: weights file not found")
    try:
        missing, unexpected = safetensors.torch.load_model(model, str(weights), strict=False)
    except (RuntimeError, OSError) as e:
        raise LlmftError(f"{weights}: cannot load ({str(e).splitlines()[0]})") from None
    if missing or unexpected:
        raise LlmftError(f"{weights}: does not match {RUN_FILE} (missing {missing[:3]}, unexpected {unexpected[:3]})")
    model.eval()
    log.info("loaded %s model from %s", meta["task"], run_dir)
    return model, load_tokenizer(run_dir / "tokenizer"), meta
