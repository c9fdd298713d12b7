"""Fold a LoRA run's adapters into its base weights (`llmft merge`).

The result is a plain run directory, loaded and served like a full fine-tuning run: no LoRA
layers, the base model's speed, no need for the base model's spec. A language-model run can
also be written as a Hugging Face folder for `transformers` and other tools.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from llmft.checkpoint import ADAPTER_FILE, RUN_FILE, WEIGHTS_FILE, load_finetuned, save_finetuned
from llmft.errors import LlmftError
from llmft.rundir import check_new_run_dir, staged_run_dir
from llmft.training.lora import merge_lora
from llmft.weights import export_hf

log = logging.getLogger("llmft")

HF_FOLDER = "hf"


def merge_run(run_dir: Path, out: Path, hf: bool = False, overwrite: bool = False) -> Path:
    """Write `out`: the run with merged weights, its other files (splits, metrics, plots) copied;
    with `hf`, also `out/hf`, a Hugging Face model folder."""
    run_dir, out = Path(run_dir), Path(out)
    check_new_run_dir(out, overwrite)
    model, tokenizer, meta = load_finetuned(run_dir)
    if "lora" not in meta:
        raise LlmftError(f"{run_dir}: not a LoRA run ({RUN_FILE} has no lora settings); nothing to merge")
    if hf and meta["task"] == "classification":
        raise LlmftError(f"{run_dir}: --hf exports language models; a classification head has no "
                         "Hugging Face equivalent here")
    merge_lora(model)
    decoder = getattr(model, "backbone", model)
    merged = {k: v for k, v in meta.items() if k != "lora"}
    merged.update(model_config=decoder.cfg.to_dict(), merged_from={"run": str(run_dir), "lora": meta["lora"]})
    with staged_run_dir(out, overwrite) as staged:
        for path in run_dir.iterdir():
            if path.name not in (RUN_FILE, WEIGHTS_FILE, ADAPTER_FILE, "tokenizer"):
                (shutil.copytree if path.is_dir() else shutil.copy2)(path, staged / path.name)
        save_finetuned(staged, model, tokenizer, merged)
        if hf:
            export_hf(decoder, staged / HF_FOLDER)
            tokenizer.save(staged / HF_FOLDER)
    log.info("merged %s into %s", run_dir, out)
    return out
