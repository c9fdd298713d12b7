"""Fold a LoRA run's adapters into its base weights (`llmft merge`).

The result is a plain run directory, loaded and served like a full fine-tuning run: no LoRA
layers, the base model's speed, no need for the base model's spec. A language-model run can
also be written as a Hugging Face folder for `transformers` and other tools.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
from pathlib import Path

from llmft.checkpoint import load_finetuned, save_finetuned
from llmft.errors import LlmftError
from llmft.rundir import RunDir, check_target, create_run, require_out
from llmft.training.lora import merge_lora
from llmft.weights import export_hf

log = logging.getLogger("llmft")

HF_FOLDER = "hf"


def merge_run(run_dir: Path, out: Path, hf: bool = False, overwrite: bool = False) -> Path:
    """Write `out`: the run with merged weights, its other files (splits, metrics, plots) copied;
    with `hf`, also `out/hf`, a Hugging Face model folder."""
    run_dir, out = Path(run_dir), require_out(out)
    check_target(out, overwrite, [run_dir])
    model, tokenizer, meta = load_finetuned(run_dir)
    if meta.lora is None:
        raise LlmftError(f"{run_dir}: not a LoRA run ({RunDir.META} has no lora settings); nothing to merge")
    if hf and meta.task == "classification":
        raise LlmftError(f"{run_dir}: --hf exports language models; a classification head has no "
                         "Hugging Face equivalent here")
    merge_lora(model)
    decoder = getattr(model, "backbone", model)
    merged = dataclasses.replace(meta, lora=None, base_fingerprint=None, model_config=decoder.cfg.to_dict(),
                                 merged_from={"run": str(run_dir.resolve()), "lora": meta.lora})
    with create_run(out, overwrite, [run_dir]) as staged:
        for path in run_dir.iterdir():
            if path.name not in RunDir.MODEL_FILES:
                (shutil.copytree if path.is_dir() else shutil.copy2)(path, staged.file(path.name))
        save_finetuned(staged, model, tokenizer, merged)
        if hf:
            export_hf(decoder, staged.file(HF_FOLDER))
            tokenizer.save(staged.file(HF_FOLDER))
    log.info("merged %s into %s", run_dir, out)
    return out
