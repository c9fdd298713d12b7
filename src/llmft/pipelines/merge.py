"""`llmft merge`: fold a LoRA run's adapters into its base weights, or average several runs.

The result is a plain run directory, loaded and served like a full fine-tuning run: no LoRA
layers, the base model's speed, no need for the base model's spec. A language-model run can
also be written as a Hugging Face folder for `transformers` and other tools.

Several runs give their uniform weight average, a "model soup" (Wortsman et al., 2022): runs
fine-tuned from the same base on the same splits (other seeds, data orders, learning rates) stay
in one basin, and their average can answer as well as the best of them or better. LoRA runs are folded
first. The runs must agree on everything that shapes and uses the model (task, base, labels,
class token, prompt style, max length) and on their split files, so that the soup is scored on
texts none of its runs trained on.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
from pathlib import Path

import torch
from torch import nn

from llmft.checkpoint import load_finetuned, save_finetuned
from llmft.errors import LlmftError
from llmft.rundir import RunDir, RunMeta, check_target, create_run, require_out
from llmft.tokenizers import Tokenizer
from llmft.training.lora import merge_lora
from llmft.weights import export_hf

log = logging.getLogger("llmft")

HF_FOLDER = "hf"
# run.json fields every run of a soup must share (the rest records how each was trained)
SOUP_FIELDS = ("task", "model", "max_length", "labels", "class_token", "truncate", "prompt_style")
SPLIT_FILES = tuple(f"{name}{suffix}" for name in ("train", "validation", "test") for suffix in (".csv", ".json"))


def merge_run(run_dirs: list[Path] | Path, out: Path, hf: bool = False, overwrite: bool = False) -> Path:
    """Write `out`: one LoRA run with merged weights (its other files copied), or the weight
    average of several runs (their shared split files copied); with `hf`, also `out/hf`, a
    Hugging Face model folder."""
    runs = [Path(p) for p in ([run_dirs] if isinstance(run_dirs, (str, Path)) else run_dirs)]
    out = require_out(out)
    check_target(out, overwrite, runs)
    model, tokenizer, meta = fold_lora(runs) if len(runs) == 1 else soup(runs)
    if hf and meta.task == "classification":
        raise LlmftError(f"{runs[0]}: --hf exports language models; a classification head has no "
                         "Hugging Face equivalent here")
    decoder = getattr(model, "backbone", model)
    with create_run(out, overwrite, runs) as staged:
        kept = [p for p in runs[0].iterdir() if p.name not in RunDir.MODEL_FILES]
        for path in kept if len(runs) == 1 else [p for p in kept if p.name in SPLIT_FILES]:
            (shutil.copytree if path.is_dir() else shutil.copy2)(path, staged.file(path.name))
        save_finetuned(staged, model, tokenizer, meta)
        if hf:
            export_hf(decoder, staged.file(HF_FOLDER))
            tokenizer.save(staged.file(HF_FOLDER))
    log.info("merged %s into %s", ", ".join(map(str, runs)), out)
    return out


def fold_lora(runs: list[Path]) -> tuple[nn.Module, Tokenizer, RunMeta]:
    """One LoRA run's model with its adapters folded in, and the merged run's run.json."""
    model, tokenizer, meta = load_finetuned(runs[0])
    if meta.lora is None:
        raise LlmftError(f"{runs[0]}: not a LoRA run ({RunDir.META} has no lora settings); nothing to merge "
                         "(give several runs to average them)")
    merge_lora(model)
    return model, tokenizer, folded_meta(model, meta, {"run": str(runs[0].resolve()), "lora": meta.lora})


def decoder_config(model: nn.Module) -> dict:
    return getattr(model, "backbone", model).cfg.to_dict()


def folded_meta(model: nn.Module, meta: RunMeta, merged_from: dict) -> RunMeta:
    return dataclasses.replace(meta, lora=None, base_fingerprint=None, model_config=decoder_config(model),
                               merged_from=merged_from)


def soup(runs: list[Path]) -> tuple[nn.Module, Tokenizer, RunMeta]:
    """The uniform average of the runs' weights (accumulated in float64, one run loaded at a
    time besides the first), with the first run's tokenizer and run.json."""
    first = RunDir(runs[0]).read_meta()
    for run in runs[1:]:
        check_soup_member(run, RunDir(run).read_meta(), runs[0], first)
    model, tokenizer, _ = load_finetuned(runs[0])
    config = decoder_config(merge_lora(model))  # merge_lora leaves a model without adapters as it is
    total = {name: t.detach().double() for name, t in model.state_dict().items()}
    for run in runs[1:]:
        other = merge_lora(load_finetuned(run)[0])
        if (other_config := decoder_config(other)) != config:
            differ = sorted(k for k, v in other_config.items() if config.get(k) != v)
            raise LlmftError(f"{run}: its model differs from {runs[0]}'s in {', '.join(differ)}; runs averaged "
                             "into one model must have the same shape")
        for name, tensor in other.state_dict().items():
            total[name] += tensor.detach().double()
        del other
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            tensor.copy_(total[name] / len(runs))
    sources = {"runs": [str(r.resolve()) for r in runs], "average": "uniform"}
    return model, tokenizer, folded_meta(model, first, sources)


def check_soup_member(run: Path, meta: RunMeta, first_run: Path, first: RunMeta) -> None:
    """`run` may be averaged with `first_run`: the same model and use, the same split files."""
    for name in SOUP_FIELDS:
        if getattr(meta, name) != getattr(first, name):
            raise LlmftError(f"{run / RunDir.META}: field {name!r} is {getattr(meta, name)!r}, but "
                             f"{first_run / RunDir.META} has {getattr(first, name)!r}; runs averaged "
                             "into one model must agree on it")
    for name in SPLIT_FILES:
        a, b = first_run / name, run / name
        if a.is_file() != b.is_file() or (a.is_file() and a.read_bytes() != b.read_bytes()):
            raise LlmftError(f"{b}: differs from {a}; runs averaged into one model must share their splits "
                             "(else the soup is scored on texts some of its runs trained on)")
