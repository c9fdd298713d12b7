"""Instruction fine-tuning (book chapter 7): train on instruction/input/output examples in a
prompt style, answer held-out instructions, and chat with a model or a run."""

from __future__ import annotations

import functools
import hashlib
import itertools
import json
import logging
import math
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from llmft.checkpoint import base_spec, load_finetuned, save_finetuned, weights_fingerprint
from llmft.data.batching import make_loader
from llmft.data.instruction import (
    InstructionDataset, InstructionSplits, collate_instruction, load_instruction_data, split_instruction_data,
)
from llmft.errors import Interrupted, LlmftError, one_line
from llmft.evaluation.metrics import score_responses
from llmft.generation import check_beams, decoding_session, generate, stream_text, text_increments
from llmft.plots import plot_values
from llmft.progress import progress_bar
from llmft.prompts import PromptStyle, default_prompt_style, get_prompt_style
from llmft.pipelines.options import RunOptions
from llmft.rundir import RunDir, RunMeta, atomic_write_json, read_json
from llmft.tasks import expect_task
from llmft.tokenizers import Tokenizer
from llmft.training.distributed import (
    TaskModule, World, all_gather_json, init_distributed, inner_model, is_sharded, log_global_batch, shard_loaders,
)
from llmft.training.freezing import count_parameters
from llmft.training.lora import apply_lora
from llmft.training.neftune import check_alpha, noisy_embeddings
from llmft.training.loop import Batch, History, TrainConfig, evaluate_loss, resolve_device, seed_everything, train
from llmft.training.resources import peak_memory_mb
from llmft.weights import Pretrained, load_pretrained

log = logging.getLogger("llmft")

SPLITS = InstructionSplits._fields  # train, validation, test


@dataclass(kw_only=True)
class InstructOptions(RunOptions):
    model: str = "gpt2-medium"
    data: str = "instruction-data"
    out: Path = Path("runs/sft")
    prompt_style: str | None = None  # default: the model's chat template, else alpaca
    instruction_key: str = "instruction"
    input_key: str = "input"
    output_key: str = "output"
    shuffle_split: bool = True  # False: the book's split of the file in order
    mask_prompt: bool = False  # exercise 7.2: no loss on instruction and input tokens
    neftune_alpha: float | None = None  # NEFTune: noise on the input embeddings while training
    sample_tokens: int = 35  # the book's per-epoch sample length
    train: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=2, eval_freq=5, eval_iter=5))

    def __post_init__(self) -> None:
        super().__post_init__()
        check_alpha(self.neftune_alpha)


def chunked_cross_entropy(hidden: torch.Tensor, head: nn.Module, targets: torch.Tensor, vocab_size: int,
                          max_logits: int = 1 << 25) -> torch.Tensor:
    """cross_entropy(head(hidden), targets), the mean over the rows of hidden (N, C), holding at
    most `max_logits` logits at once: the rows go in chunks whose logits are recomputed in the
    backward pass rather than kept. A batch's logits over Gemma's 262k-token vocabulary would be
    gigabytes; a batch that fits in one chunk is computed as it is, without the recomputation."""
    rows = max(1, max_logits // vocab_size)
    if len(targets) <= rows:
        return nn.functional.cross_entropy(head(hidden), targets)

    def summed(h: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(head(h), t, reduction="sum")

    sums = [torch.utils.checkpoint.checkpoint(summed, h, t, use_reentrant=False)
            for h, t in zip(hidden.split(rows), targets.split(rows))]
    return torch.stack(sums).sum() / len(targets)


class InstructionTask:
    """Next-token cross-entropy (padding and masked prompt ignored); a sample after each epoch."""

    seen_unit = "tokens"

    def __init__(self, tokenizer: Tokenizer, style: PromptStyle, sample_entry: dict, sample_tokens: int) -> None:
        self.tokenizer, self.style = tokenizer, style
        self.sample_entry, self.sample_tokens = sample_entry, sample_tokens

    def loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        """The book's loss (mean over targets that are not -100), with the vocabulary
        projection computed only where a target counts: padding and a masked prompt cost nothing.
        Large projections go a chunk of rows at a time (`chunked_cross_entropy`)."""
        counted = batch["targets"] != -100
        hidden = model.hidden_states(batch["input_ids"])[counted]
        return chunked_cross_entropy(hidden, model.out_head, batch["targets"][counted], model.cfg.vocab_size)

    def loss_weight(self, batch: Batch) -> torch.Tensor:
        return (batch["targets"] != -100).sum()

    def count_seen(self, batch: Batch) -> int:
        return batch["input_ids"].numel()

    def on_epoch_end(self, runner: nn.Module, epoch: int) -> dict[str, Any]:
        if is_sharded(runner):  # FSDP: no rank holds the whole model to generate with
            return {"sample": ""}
        model = inner_model(runner).eval()
        sample = answer(model, self.tokenizer, self.style, [self.sample_entry], max_new_tokens=self.sample_tokens)[0]
        tqdm.write(f"sample: {self.style.format(self.sample_entry)}{sample}".replace("\n", " "))
        return {"sample": sample}


def answer(model: nn.Module, tokenizer: Tokenizer, style: PromptStyle, entries: list[dict], *,
           max_new_tokens: int = 256, batch_size: int = 8, **sampling: Any) -> list[str]:
    """Each entry's answer: generate after the styled prompt, then cut the response out."""
    prompts = [style.format(e) for e in entries]
    texts = generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens, stop_strings=style.stop_strings,
                     eos_id=style.stop_token_ids(tokenizer), batch_size=batch_size, **sampling)
    return [style.extract_response(t) for t in texts]


def stream_answer(model: nn.Module, tokenizer: Tokenizer, style: PromptStyle, entry: dict,
                  **sampling: Any) -> Iterator[str]:
    """`answer` for one entry, in pieces as they are generated."""
    return stream_response(model, tokenizer, style, style.format(entry), **sampling)


def stream_response(model: nn.Module, tokenizer: Tokenizer, style: PromptStyle, prompt: str | list[int],
                    **sampling: Any) -> Iterator[str]:
    """The response to a prompt already in `style` (text or token ids), in pieces as they are
    generated: stopped and extracted as `answer` does."""
    pieces = stream_text(model, tokenizer, prompt, stop_strings=style.stop_strings,
                         eos_id=style.stop_token_ids(tokenizer), **sampling)
    return response_pieces(style, pieces)


def response_pieces(style: PromptStyle, pieces: Iterable[str]) -> Iterator[str]:
    """`style.extract_response` of the text that `pieces` join to, in pieces: a piece comes once
    the text so far can no longer turn out to start with the response header (which is cut off),
    and whitespace only once more text follows it (the response is stripped)."""
    header = style.response_header.strip()

    def responses() -> Iterator[str]:
        text = ""
        for text in itertools.accumulate(pieces):
            start = text.lstrip()
            if not (header and len(start) < len(header) and header.startswith(start)):
                yield style.extract_response(text)
        yield style.extract_response(text)

    return text_increments(responses())


def resolve_style(name: str | None, tokenizer: Tokenizer) -> PromptStyle:
    return get_prompt_style(name, tokenizer) if name else default_prompt_style(tokenizer)


def instruction_loader(data: list[dict], tokenizer: Tokenizer, style: PromptStyle, max_length: int,
                       opts: InstructOptions, is_train: bool, ranks: int = 1) -> DataLoader:
    """Batches of `ranks` x `--batch-size` examples (each rank trains on its share)."""
    dataset = InstructionDataset(data, tokenizer, style, max_length)
    collate = functools.partial(collate_instruction, pad_token_id=tokenizer.eos_id,
                                allowed_max_length=max_length, mask_prompt=opts.mask_prompt)
    lengths = [min(len(ids), max_length) for ids in dataset.encoded_texts]
    return make_loader(dataset, lengths, opts.train.batch_size * ranks, collate, opts.train.seed, train=is_train,
                       group_by_length=opts.train.group_by_length)


def load_splits(opts: InstructOptions) -> InstructionSplits:
    entries = load_instruction_data(opts.data, opts.instruction_key, opts.input_key, opts.output_key)
    splits = split_instruction_data(entries, opts.train.seed, shuffle=opts.shuffle_split)
    if not splits.train or not splits.validation:
        raise LlmftError(f"{opts.data}: {len(entries)} examples are too few for a train/validation split")
    return splits


def prepare(opts: InstructOptions, w: World) -> tuple[Pretrained, PromptStyle, dict[str, Any], InstructionSplits,
                                                      RunMeta]:
    """The model (with LoRA if asked), its prompt style, this rank's loaders, the splits and
    the run.json to write."""
    seed_everything(opts.train.seed)
    splits = load_splits(opts)
    pretrained = load_pretrained(opts.model, random_init=opts.random_init, overrides=opts.config_overrides)
    model, tokenizer, cfg = pretrained.model, pretrained.tokenizer, pretrained.config
    max_length = opts.max_length_within(cfg.context_length, cfg.context_length)
    style = resolve_style(opts.prompt_style, tokenizer)
    loaders = shard_loaders({"train": instruction_loader(splits.train, tokenizer, style, max_length, opts, True, w.size),
                             "validation": instruction_loader(splits.validation, tokenizer, style, max_length, opts,
                                                              False, w.size)}, w)
    log_global_batch(opts.train, w)
    lora = opts.finetune == "lora"
    fingerprint = weights_fingerprint(model) if lora and not opts.random_init else None
    policy = opts.lora.describe(apply_lora(model, opts.lora)) if lora else "all"
    trainable, total = count_parameters(model)
    log.info("data: %d train, %d validation, %d test | prompt style %s | trainable parameters %s of %s (%s)",
             len(splits.train), len(splits.validation), len(splits.test), style.name, f"{trainable:,}",
             f"{total:,}", policy)
    meta = RunMeta(task="instruction", model=base_spec(opts.model), model_config=cfg.to_dict(),
                   max_length=max_length, random_init=opts.random_init, base_fingerprint=fingerprint,
                   lora=opts.lora.to_dict() if lora else None, prompt_style=style.name, options=opts.record())
    return pretrained, style, loaders, splits, meta


def train_instructions(opts: InstructOptions) -> dict[str, Any]:
    """Fine-tune on instructions into a run directory. Under torchrun every rank trains its
    share; rank 0 writes the run."""
    w = init_distributed(opts.train.device)
    with opts.run_directory() as run:
        pretrained, style, loaders, splits, meta = prepare(opts, w)
        model, tokenizer = pretrained.model, pretrained.tokenizer
        task = InstructionTask(tokenizer, style, splits.validation[0], opts.sample_tokens)
        device = resolve_device(opts.train.device)
        if w.is_main:
            for name, data in splits._asdict().items():
                atomic_write_json(run.split(name, ".json"), data)
        model.to(device)
        full_val_loss = functools.partial(evaluate_loss, TaskModule(model, task), task, loaders["validation"], None,
                                          device, opts.train.precision)
        loss_before = full_val_loss()
        began = time.perf_counter()
        with noisy_embeddings(model, opts.neftune_alpha):
            history = train(model, task, loaders["train"], loaders["validation"], opts.train,
                            run.metrics() if w.is_main else None, checkpoints=opts.checkpoints(run))
        results = summarize(history, loss_before, full_val_loss())
        results.update(train_seconds=round(time.perf_counter() - began, 2), peak_memory_mb=peak_memory_mb(device),
                       trainable_parameters=count_parameters(model)[0], source=pretrained.source)
        if w.is_main:
            run.write_results(results)
            steps = history.steps
            plot_values([s["epoch"] for s in steps], [s["tokens_seen"] for s in steps],
                        [s["train_loss"] for s in steps], [s["val_loss"] for s in steps], "loss", run.plot("loss"),
                        seen_label="Tokens seen")
            save_finetuned(run, model, tokenizer, meta)
    return results


def summarize(history: History, full_val_loss_before: float, full_val_loss_after: float) -> dict[str, Any]:
    """The losses a user compares: first and last evaluation, and the whole validation split."""
    steps = history.steps
    return {"initial_train_loss": steps[0]["train_loss"], "initial_val_loss": steps[0]["val_loss"],
            "final_train_loss": steps[-1]["train_loss"], "final_val_loss": steps[-1]["val_loss"],
            "full_val_loss_before": full_val_loss_before, "full_val_loss_after": full_val_loss_after,
            "tokens_seen": history.epochs[-1]["tokens_seen"]}


def load_chat_model(run_or_model: str, device: str = "auto",
                    compile: bool = False) -> tuple[nn.Module, Tokenizer, PromptStyle]:
    """A fine-tuned instruction run (its weights and prompt style), or a model spec (its chat
    template, else alpaca). `compile` compiles each block (cached decoding reuses the graphs)."""
    if RunDir(run_or_model).is_run():
        model, tokenizer, meta = load_finetuned(run_or_model)
        expect_task(meta, "instruction", run_or_model, "generating text")
        style = get_prompt_style(meta.prompt_style, tokenizer)
    else:
        pretrained = load_pretrained(run_or_model)
        model, tokenizer = pretrained.model, pretrained.tokenizer
        style = default_prompt_style(tokenizer)
    if compile:
        model.compile_blocks()
    return model.to(resolve_device(device)).eval(), tokenizer, style


def check_answer_settings(max_new_tokens: int, batch_size: int) -> None:
    """Fail before any work on counts that would generate nothing."""
    if max_new_tokens < 1:
        raise LlmftError(f"--max-new-tokens must be at least 1, got {max_new_tokens}")
    if batch_size < 1:
        raise LlmftError(f"--batch-size must be at least 1, got {batch_size}")


def respond(source: str | Path, *, split: str | None = "test", data: str | None = None, out: Path | None = None,
            max_new_tokens: int = 256, batch_size: int = 8, device: str = "auto", compile: bool = False,
            prepack: bool = True, num_beams: int = 1, length_penalty: float = 1.0) -> Path:
    """Answer every entry of a run's split (or of a data file) into JSON with a
    `model_response` per entry, greedy or (`num_beams` > 1) by beam search. `source` is a run
    directory or, to score a model before fine-tuning, a model spec (then `data` names the
    entries, e.g. RUN/test.json).

    The file is rewritten atomically after each batch, so an interrupted run loses at most
    one batch, and a rerun answers only the entries still missing a response. Beside it,
    OUT.settings.json records what it answers and how: a rerun that asks for something else
    fails instead of continuing the old file. `prepack`: see `generation.decoding_session`.
    """
    check_answer_settings(max_new_tokens, batch_size)
    check_beams(num_beams, temperature=0.0)
    resolve_device(device)
    w = init_distributed(device)
    run = RunDir(source)
    if run.is_run():
        expect_task(run.read_meta(), "instruction", source, "instruct respond")
    elif not (data and out):
        raise LlmftError(f"{source}: not a run directory; to answer with a model, pass --data FILE and --out FILE")
    out = Path(out or run.file(f"{'data' if data else split}-responses.json"))
    entries = entries_to_answer(run, split, data)
    record = {"source": base_spec(str(source)), "entries": str(Path(data).resolve()) if data else f"split {split}",
              "entries_fingerprint": entries_fingerprint(entries), "max_new_tokens": max_new_tokens,
              "num_beams": num_beams, "length_penalty": length_penalty}
    entries = resume_responses(out, entries, record, write=w.is_main)
    model, tokenizer, style = load_chat_model(str(source), device, compile)
    todo = [i for i, e in enumerate(entries) if "model_response" not in e]
    todo.sort(key=lambda i: len(style.format(entries[i])))  # similar lengths share a batch
    mine = todo[w.rank::w.size]  # under torchrun, every rank answers its share
    rounds = math.ceil(math.ceil(len(todo) / w.size) / batch_size)
    with progress_bar(total=len(entries), initial=len(entries) - len(todo), desc="respond", unit="entry",
                      disable=not w.is_main) as bar, \
            decoding_session(model, prepack), interrupted_keeps(out, entries):  # weights packed once
        for r in range(rounds):
            rows = mine[r * batch_size:(r + 1) * batch_size]
            texts = answer(model, tokenizer, style, [entries[i] for i in rows], max_new_tokens=max_new_tokens,
                           batch_size=batch_size, num_beams=num_beams, length_penalty=length_penalty) if rows else []
            answered = [pair for rank_pairs in all_gather_json(list(zip(rows, texts))) for pair in rank_pairs]
            for i, text in answered:
                entries[i]["model_response"] = text
            if w.is_main:
                atomic_write_json(out, entries)
            bar.update(len(answered))
    if not todo and w.is_main:
        atomic_write_json(out, entries)
    return out


@contextmanager
def interrupted_keeps(out: Path, entries: list[dict]) -> Iterator[None]:
    """Ctrl-C while answering: say what is kept and how to go on (exit code 130)."""
    try:
        yield
    except KeyboardInterrupt:
        done = sum("model_response" in e for e in entries)
        raise Interrupted(f"interrupted with {done} of {len(entries)} entries answered, saved in {out}; "
                          "run the same command to continue") from None


def entries_to_answer(run: RunDir, split: str | None, data: str | None) -> list[dict]:
    if data:
        return load_instruction_data(data)
    if split not in SPLITS:
        raise LlmftError(f"--split must be one of {', '.join(SPLITS)}, got {split!r}")
    return read_json(run.split(split, ".json"))


def entries_fingerprint(entries: list[dict]) -> str:
    """A hash of the entries as asked for (their answers left out)."""
    asked = [{k: v for k, v in e.items() if k != "model_response"} for e in entries]
    return hashlib.sha256(json.dumps(asked, sort_keys=True).encode()).hexdigest()[:16]


def resume_responses(out: Path, entries: list[dict], record: dict[str, Any], write: bool = True) -> list[dict]:
    """The entries to fill in: those of an existing `out` made for the same `record` (a
    one-line error when it was made for something else), else `entries`; the record is
    written before any answer (when `write`: rank 0 under torchrun)."""
    settings = out.with_name(out.stem + ".settings.json")
    if not out.parent.is_dir():
        raise LlmftError(f"--out {out}: folder {out.parent} does not exist")
    if out.exists():
        if not settings.is_file():
            raise LlmftError(f"--out {out}: exists, with no {settings.name} saying what it answers; "
                             "choose another --out (or remove it)")
        saved = read_json(settings)
        for key, value in record.items():
            if not isinstance(saved, dict) or saved.get(key) != value:
                raise LlmftError(f"--out {out}: answers {saved.get(key) if isinstance(saved, dict) else None!r} "
                                 f"for {key!r} ({settings.name}), this command asks for {value!r}; "
                                 "choose another --out")
        done = read_json(out)
        if not isinstance(done, list) or not all(isinstance(e, dict) for e in done):
            raise LlmftError(f"--out {out}: expected a JSON list of entries")
        log.info("resuming %s: %d of %d answered", out, sum("model_response" in e for e in done), len(done))
        return done
    try:
        if write:
            atomic_write_json(settings, record)
    except OSError as e:
        raise LlmftError(f"--out {out}: cannot write there ({one_line(e)})") from None
    return entries


def reference_scores(path: Path) -> dict[str, Any]:
    """Exact match and ROUGE-L F1 of the responses in `path` against their `output`."""
    return score_responses(read_json(path))
