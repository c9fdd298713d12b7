"""Instruction fine-tuning (book chapter 7): train on instruction/input/output examples in a
prompt style, answer held-out instructions, and chat with a model or a run."""

from __future__ import annotations

import functools
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from llmft.checkpoint import RUN_FILE, load_finetuned, save_finetuned
from llmft.data.batching import make_loader
from llmft.data.instruction import (
    InstructionDataset, collate_instruction, load_instruction_data, split_instruction_data,
)
from llmft.errors import LlmftError
from llmft.evaluation.metrics import score_responses
from llmft.generation import generate
from llmft.models.prepacked import prepacked_linears
from llmft.plots import plot_values
from llmft.prompts import PromptStyle, default_prompt_style, get_prompt_style
from llmft.rundir import atomic_write_json, check_new_run_dir, read_json, staged_run_dir
from llmft.tokenizers import Tokenizer
from llmft.training.freezing import count_parameters
from llmft.training.lora import LoRAConfig, apply_lora, check_finetune
from llmft.training.loop import Batch, TrainConfig, evaluate_loss, resolve_device, seed_everything, train
from llmft.training.resources import peak_memory_mb
from llmft.weights import load_pretrained

log = logging.getLogger("llmft")

SPLITS = ("train", "validation", "test")


@dataclass
class InstructOptions:
    model: str = "gpt2-medium"
    data: str = "instruction-data"
    out: Path = Path("runs/sft")
    prompt_style: str | None = None  # default: the model's chat template, else alpaca
    instruction_key: str = "instruction"
    input_key: str = "input"
    output_key: str = "output"
    shuffle_split: bool = True  # False: the book's split of the file in order
    mask_prompt: bool = False  # exercise 7.2: no loss on instruction and input tokens
    max_length: int | None = None  # allowed_max_length; default: the model's context
    sample_tokens: int = 35  # the book's per-epoch sample length
    finetune: str = "full"  # every parameter, or "lora": low-rank adapters on the frozen model
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    random_init: bool = False
    config_overrides: dict[str, Any] = field(default_factory=dict)
    overwrite: bool = False
    train: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=2, eval_freq=5, eval_iter=5))


class InstructionTask:
    """Next-token cross-entropy (padding and masked prompt ignored); a sample after each epoch."""

    seen_unit = "tokens"

    def __init__(self, tokenizer: Tokenizer, style: PromptStyle, sample_entry: dict, sample_tokens: int) -> None:
        self.tokenizer, self.style = tokenizer, style
        self.sample_entry, self.sample_tokens = sample_entry, sample_tokens

    def loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        """The book's loss (mean over targets that are not -100), with the vocabulary
        projection computed only where a target counts: padding and a masked prompt cost nothing."""
        counted = batch["targets"] != -100
        hidden = model.hidden_states(batch["input_ids"])[counted]
        return nn.functional.cross_entropy(model.out_head(hidden), batch["targets"][counted])

    def count_seen(self, batch: Batch) -> int:
        return batch["input_ids"].numel()

    def on_epoch_end(self, model: nn.Module, epoch: int) -> dict[str, Any]:
        model.eval()
        sample = answer(model, self.tokenizer, self.style, [self.sample_entry], self.sample_tokens)[0]
        tqdm.write(f"sample: {self.style.format(self.sample_entry)}{sample}".replace("\n", " "))
        return {"sample": sample}


def answer(model: nn.Module, tokenizer: Tokenizer, style: PromptStyle, entries: list[dict],
           max_new_tokens: int = 256, batch_size: int = 8, **sampling: Any) -> list[str]:
    """Each entry's answer: generate after the styled prompt, then cut the response out."""
    prompts = [style.format(e) for e in entries]
    texts = generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens, stop_strings=style.stop_strings,
                     eos_id=style.stop_token_ids(tokenizer), batch_size=batch_size, **sampling)
    return [style.extract_response(t) for t in texts]


def resolve_style(name: str | None, tokenizer: Tokenizer) -> PromptStyle:
    return get_prompt_style(name, tokenizer) if name else default_prompt_style(tokenizer)


def train_instructions(opts: InstructOptions) -> dict[str, Any]:
    check_finetune(opts.finetune)
    check_new_run_dir(opts.out, opts.overwrite)
    seed_everything(opts.train.seed)
    entries = load_instruction_data(opts.data, opts.instruction_key, opts.input_key, opts.output_key)
    train_data, test_data, val_data = split_instruction_data(entries, opts.train.seed, shuffle=opts.shuffle_split)
    if not train_data or not val_data:
        raise LlmftError(f"{opts.data}: {len(entries)} examples are too few for a train/validation split")
    pretrained = load_pretrained(opts.model, random_init=opts.random_init, overrides=opts.config_overrides)
    model, tokenizer, cfg = pretrained.model, pretrained.tokenizer, pretrained.config
    if opts.max_length is not None and opts.max_length > cfg.context_length:
        raise LlmftError(f"--max-length {opts.max_length} exceeds the model's context of {cfg.context_length}")
    max_length = opts.max_length or cfg.context_length
    style = resolve_style(opts.prompt_style, tokenizer)
    collate = functools.partial(collate_instruction, pad_token_id=tokenizer.eos_id,
                                allowed_max_length=max_length, mask_prompt=opts.mask_prompt)

    def loader(data: list[dict], is_train: bool) -> DataLoader:
        dataset = InstructionDataset(data, tokenizer, style, max_length)
        return make_loader(dataset, [len(ids) for ids in dataset.encoded_texts], opts.train.batch_size, collate,
                           opts.train.seed, train=is_train, group_by_length=opts.train.group_by_length)

    train_loader, val_loader = loader(train_data, True), loader(val_data, False)
    policy = opts.lora.describe(apply_lora(model, opts.lora)) if opts.finetune == "lora" else "all"
    trainable, total = count_parameters(model)
    log.info("data: %d train, %d validation, %d test | prompt style %s | trainable parameters %s of %s (%s)",
             len(train_data), len(val_data), len(test_data), style.name, f"{trainable:,}", f"{total:,}", policy)
    task = InstructionTask(tokenizer, style, val_data[0], opts.sample_tokens)
    device = resolve_device(opts.train.device)
    with staged_run_dir(opts.out, opts.overwrite) as run_dir:
        for name, data in zip(SPLITS, (train_data, val_data, test_data)):
            atomic_write_json(run_dir / f"{name}.json", data)
        full_val_loss_before = evaluate_loss(model, task, val_loader, None, device, opts.train.precision)
        start = time.perf_counter()
        history = train(model, task, train_loader, val_loader, opts.train, run_dir)
        train_seconds = time.perf_counter() - start
        steps = history.steps
        results = {"initial_train_loss": steps[0]["train_loss"], "initial_val_loss": steps[0]["val_loss"],
                   "final_train_loss": steps[-1]["train_loss"], "final_val_loss": steps[-1]["val_loss"],
                   "full_val_loss_before": full_val_loss_before,
                   "full_val_loss_after": evaluate_loss(model, task, val_loader, None, device, opts.train.precision),
                   "train_seconds": round(train_seconds, 2),
                   "peak_memory_mb": peak_memory_mb(device), "tokens_seen": history.epochs[-1]["tokens_seen"],
                   "trainable_parameters": trainable, "source": pretrained.source}
        atomic_write_json(run_dir / "results.json", results)
        plot_values([s["epoch"] for s in steps], [s["tokens_seen"] for s in steps], [s["train_loss"] for s in steps],
                    [s["val_loss"] for s in steps], "loss", run_dir / "loss", seen_label="Tokens seen")
        meta = {"task": "instruction", "model": opts.model, "model_config": cfg.to_dict(),
                "prompt_style": style.name, "max_length": max_length, "random_init": opts.random_init,
                "options": {**asdict(opts), "out": str(opts.out)}}
        if opts.finetune == "lora":
            meta["lora"] = opts.lora.to_dict()
        save_finetuned(run_dir, model, tokenizer, meta)
    return results


def load_chat_model(run_or_model: str, device: str = "auto",
                    compile: bool = False) -> tuple[nn.Module, Tokenizer, PromptStyle]:
    """A fine-tuned instruction run (its weights and prompt style), or a model spec (its chat
    template, else alpaca). `compile` compiles each block (cached decoding reuses the graphs)."""
    path = Path(run_or_model)
    if (path / RUN_FILE).is_file():
        model, tokenizer, meta = load_finetuned(path)
        if meta["task"] != "instruction":
            raise LlmftError(f"{path}: a {meta['task']} run cannot generate text")
        style = get_prompt_style(meta["prompt_style"], tokenizer)
    else:
        pretrained = load_pretrained(run_or_model)
        model, tokenizer = pretrained.model, pretrained.tokenizer
        style = default_prompt_style(tokenizer)
    if compile:
        model.compile_blocks()
    return model.to(resolve_device(device)).eval(), tokenizer, style


def respond(source: str | Path, split: str | None = "test", data: str | None = None, out: Path | None = None,
            max_new_tokens: int = 256, batch_size: int = 8, device: str = "auto", compile: bool = False,
            prepack: bool = True) -> Path:
    """Answer every entry of a run's split (or of a data file) into JSON with a
    `model_response` per entry. `source` is a run directory or, to score a model before
    fine-tuning, a model spec (then `data` names the entries, e.g. RUN/test.json).

    The file is rewritten atomically after each batch, so an interrupted run loses at most
    one batch, and a rerun answers only the entries still missing a response. `prepack`: see
    `generation.generate_tokens`.
    """
    run_dir = Path(source)
    is_run = (run_dir / RUN_FILE).is_file()
    if not is_run and not (data and out):
        raise LlmftError(f"{source}: not a run directory; to answer with a model, pass --data FILE and --out FILE")
    out = Path(out or run_dir / f"{'data' if data else split}-responses.json")
    if out.is_file():
        entries = read_json(out)
        log.info("resuming %s: %d of %d answered", out, sum("model_response" in e for e in entries), len(entries))
    elif data:
        entries = load_instruction_data(data)
    elif split in SPLITS:
        entries = read_json(run_dir / f"{split}.json")
    else:
        raise LlmftError(f"--split must be one of {', '.join(SPLITS)}, got {split!r}")
    model, tokenizer, style = load_chat_model(str(source), device, compile)
    todo = [i for i, e in enumerate(entries) if "model_response" not in e]
    todo.sort(key=lambda i: len(style.format(entries[i])))  # similar lengths share a batch
    with tqdm(total=len(entries), initial=len(entries) - len(todo), desc="respond", unit="entry") as bar, \
            prepacked_linears(model, prepack):  # the weights packed once for every batch
        for s in range(0, len(todo), batch_size):
            rows = todo[s:s + batch_size]
            for i, text in zip(rows, answer(model, tokenizer, style, [entries[i] for i in rows],
                                            max_new_tokens, batch_size, prepack=prepack)):
                entries[i]["model_response"] = text
            atomic_write_json(out, entries)
            bar.update(len(rows))
    if not todo:
        atomic_write_json(out, entries)
    return out


def reference_scores(path: Path) -> dict[str, Any]:
    """Exact match and ROUGE-L F1 of the responses in `path` against their `output`."""
    return score_responses(read_json(path))
