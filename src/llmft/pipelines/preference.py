"""Preference tuning with DPO (Rafailov et al. 2023; the book's chapter 7 bonus): move an
instruction model towards the `chosen` and away from the `rejected` response of each pair.

The loss of a pair is ``-log σ(β ((π_c − π_r) − (ref_c − ref_r)))``: π and ref are the
log-probabilities of the chosen (c) and rejected (r) response under the model being trained and
under the model it started as. The notebook keeps a second, frozen copy for ref and runs it on
every step; here the starting model is run once over every pair before training (eval mode, so
deterministic) and its log-probabilities travel in the batches: one model in memory, and each step
runs only the policy. With fresh LoRA adapters the reference is the same model with its adapters
off (`adapters_disabled`).

The run directory is an ordinary instruction run (task ``instruction``, its prompt style
recorded), so `generate`, `instruct respond`, `merge` and the server take it.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from llmft.checkpoint import base_spec, load_finetuned, save_finetuned, weights_fingerprint
from llmft.data.batching import make_loader
from llmft.data.instruction import InstructionSplits
from llmft.data.preference import (
    PreferenceDataset, PreferenceKeys, ShuffledBatches, collate_preference, load_preference_data,
    split_preference_data,
)
from llmft.errors import LlmftError
from llmft.models import DecoderLM
from llmft.pipelines.instruction import InstructionTask, resolve_style
from llmft.pipelines.options import RunOptions
from llmft.plots import plot_values
from llmft.progress import progress_bar
from llmft.prompts import PromptStyle, get_prompt_style
from llmft.rundir import RunDir, RunMeta, atomic_write_json, create_run
from llmft.tasks import expect_task
from llmft.tokenizers import Tokenizer
from llmft.training.distributed import TaskModule, require_one_process
from llmft.training.freezing import count_parameters
from llmft.training.lora import adapters_disabled, apply_lora, merge_lora
from llmft.training.loop import (
    Batch, History, TrainConfig, autocast, resolve_device, seed_everything, to_device, train,
)
from llmft.training.resources import peak_memory_mb
from llmft.weights import load_pretrained

log = logging.getLogger("llmft")

REDUCTIONS = ("mean", "sum")
METRICS = ("loss", "reward_margin", "reward_accuracy")  # what each evaluation measures


@dataclass(kw_only=True)
class PreferenceOptions(RunOptions):
    model: str = "gpt2-medium"  # an `instruct train` run (full or LoRA), or a model spec
    data: str = "instruction-data-with-preference"
    out: Path = Path("runs/dpo")
    prompt_style: str | None = None  # a run's own; else the model's chat template, else alpaca
    instruction_key: str = "instruction"
    input_key: str = "input"
    chosen_key: str = "chosen"
    rejected_key: str = "rejected"
    shuffle_split: bool = True  # False: the notebook's split of the file in order
    beta: float = 0.1  # how far the policy may move from the reference
    logprob_reduction: str = "mean"  # a response's log-probability: mean over its tokens (book) or sum (TRL)
    sample_tokens: int = 35
    train: TrainConfig = field(default_factory=lambda: TrainConfig(
        epochs=1, batch_size=8, lr=5e-6, weight_decay=0.01, eval_freq=5, eval_iter=5))

    def __post_init__(self) -> None:
        super().__post_init__()
        if not (math.isfinite(self.beta) and self.beta > 0):
            raise LlmftError(f"--beta must be a positive number, got {self.beta}")
        if self.logprob_reduction not in REDUCTIONS:
            raise LlmftError(f"--logprob-reduction must be one of {', '.join(REDUCTIONS)}, "
                             f"got {self.logprob_reduction!r}")
        if self.chosen_key == self.rejected_key:
            raise LlmftError(f"--chosen-key and --rejected-key are both {self.chosen_key!r}: name two keys")

    def keys(self) -> PreferenceKeys:
        """Where the data's entries keep each field."""
        return PreferenceKeys(self.instruction_key, self.input_key, self.chosen_key, self.rejected_key)


# -- the loss ------------------------------------------------------------------------------

def sequence_logprobs(model: nn.Module, batch: Batch, reduction: str = "mean") -> torch.Tensor:
    """(pairs, 2): the log-probability of each pair's chosen and rejected response under `model`,
    over its scored tokens (targets not -100): their mean (the book) or sum (the DPO paper, TRL).
    The vocabulary projection runs only where a token is scored."""
    targets = batch["targets"].flatten(0, 1)
    scored = targets != -100
    hidden = model.hidden_states(batch["input_ids"].flatten(0, 1))[scored]
    token_logps = -nn.functional.cross_entropy(model.out_head(hidden).float(), targets[scored], reduction="none")
    per_row = torch.zeros(scored.shape, dtype=token_logps.dtype, device=scored.device)
    per_row = per_row.masked_scatter(scored, token_logps).sum(-1)
    if reduction == "mean":
        per_row = per_row / scored.sum(-1)
    return per_row.view(batch["targets"].shape[:2])


def dpo_terms(policy: torch.Tensor, reference: torch.Tensor, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per pair, from (pairs, 2) log-probabilities: the DPO loss
    ``-log σ(β ((π_c − π_r) − (ref_c − ref_r)))`` and the reward margin, the chosen response's
    implicit reward π_c − ref_c minus the rejected one's (without β, as the notebook reports it)."""
    logits = (policy[:, 0] - policy[:, 1]) - (reference[:, 0] - reference[:, 1])
    margins = (policy[:, 0] - reference[:, 0]) - (policy[:, 1] - reference[:, 1])
    return -nn.functional.logsigmoid(beta * logits), margins


def evaluated(module: nn.Module, fn: Callable[[Batch], torch.Tensor], batches: Iterable[Batch],
              device: torch.device, precision: str) -> list[torch.Tensor]:
    """`fn` of each batch (moved to `device`) without gradients, `module` in eval mode meanwhile."""
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad():
            out = []
            for batch in batches:
                with autocast(device, precision):
                    out.append(fn(to_device(batch, device)))
            return out
    finally:
        module.train(was_training)


class PreferenceTask:
    """DPO on batches of pairs (`collate_preference`) for the training loop. The reference
    log-probabilities come with the batch (`cache_reference`), or from `reference`, a frozen
    model run on every batch (the notebook's way, for comparison). Evaluations add the reward
    margin and accuracy; each epoch ends with a sample answer, as in instruction tuning."""

    seen_unit = "examples"

    def __init__(self, beta: float, reduction: str, sampler: InstructionTask, device: torch.device,
                 precision: str = "32", reference: nn.Module | None = None) -> None:
        self.beta, self.reduction, self.sampler = beta, reduction, sampler
        self.device, self.precision = device, precision
        self.reference = reference.eval().requires_grad_(False) if reference is not None else None

    def reference_logps(self, batch: Batch) -> torch.Tensor:
        """(pairs, 2): the batch's cached reference log-probabilities, or `reference`'s."""
        if self.reference is None:
            return batch["reference_logps"]
        with torch.no_grad():
            return sequence_logprobs(self.reference, batch, self.reduction)

    def terms(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """Per pair: the loss and the reward margin (`dpo_terms`)."""
        return dpo_terms(sequence_logprobs(model, batch, self.reduction), self.reference_logps(batch), self.beta)

    def loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        return self.terms(model, batch)[0].mean()

    def batch_metrics(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        """`METRICS` of one batch: mean loss, mean reward margin, share of pairs whose chosen
        response has the higher reward."""
        losses, margins = self.terms(model, batch)
        return torch.stack([losses.mean(), margins.mean(), (margins > 0).float().mean()])

    def eval_metrics(self, runner: nn.Module, batches: Iterable[Batch], num_batches: int | None) -> dict[str, float]:
        """`METRICS` averaged over the first `num_batches` batches (all when None), as the
        notebook's `compute_dpo_loss_loader`; `runner` is `TaskModule(model, self)`."""
        values = evaluated(runner, lambda b: runner(b, "batch_metrics").double(),
                           itertools.islice(batches, num_batches), self.device, self.precision)
        means = torch.stack(values).mean(0).tolist() if values else [float("nan")] * len(METRICS)
        return dict(zip(METRICS, means))

    def loss_weight(self, batch: Batch) -> torch.Tensor:
        return torch.tensor(batch["targets"].shape[0])

    def count_seen(self, batch: Batch) -> int:
        return batch["targets"].shape[0]

    def on_epoch_end(self, runner: nn.Module, epoch: int) -> dict[str, Any]:
        return self.sampler.on_epoch_end(runner, epoch)


def cache_reference(model: nn.Module, loader: DataLoader, reduction: str, device: torch.device,
                    precision: str = "32") -> None:
    """Store in `loader`'s `PreferenceDataset` every pair's log-probabilities under `model` as it
    is now, computed in eval mode (deterministic) over `loader`'s batches, which must hold every
    pair once. An evaluation on those same batches gives exactly ln 2 and zero margins then."""
    order = [i for batch in loader.batch_sampler for i in batch]
    batches = progress_bar(loader, desc="reference log-probabilities", unit="batch", leave=False, dynamic_ncols=True)
    values = evaluated(model, lambda b: sequence_logprobs(model, b, reduction).float().cpu(), batches, device,
                       precision)
    logps = torch.empty(len(order), 2)
    logps[order] = torch.cat(values)
    loader.dataset.set_reference(logps)


def preference_loader(dataset: PreferenceDataset, pad_token_id: int, max_length: int, cfg: TrainConfig,
                      is_train: bool) -> DataLoader:
    """Batches of `cfg.batch_size` pairs (`collate_preference`): in order, or for training the
    batches of one epoch of the loader `make_loader` makes (shuffled with `cfg.seed`, or
    length-grouped, the last partial one dropped), kept together and reordered every epoch."""

    def collate(batch: list[dict]) -> Batch:
        return collate_preference(batch, pad_token_id, max_length)

    loader = make_loader(dataset, dataset.lengths(), cfg.batch_size, collate, cfg.seed, train=is_train,
                         group_by_length=cfg.group_by_length)
    if not is_train:
        return loader
    order = torch.Generator().manual_seed(cfg.seed)  # the loader's too: checkpoints save its state
    return DataLoader(dataset, batch_sampler=ShuffledBatches(list(loader.batch_sampler), order), generator=order,
                      collate_fn=collate)


def reference_batches(loader: DataLoader) -> DataLoader:
    """What the reference pass over a training loader's pairs runs: its batches in order, then
    the pairs it leaves out (the dropped partial batch)."""
    batches = loader.batch_sampler.batches
    used = {i for batch in batches for i in batch}
    left = [i for i in range(len(loader.dataset)) if i not in used]
    return DataLoader(loader.dataset, batch_sampler=batches + ([left] if left else []), collate_fn=loader.collate_fn)


def cached_loaders(model: nn.Module, datasets: dict[str, PreferenceDataset], pad_token_id: int, max_length: int,
                   cfg: TrainConfig, reduction: str, device: torch.device) -> tuple[DataLoader, DataLoader]:
    """Training and validation loaders whose pairs carry their log-probabilities under `model`
    as it is now (`cache_reference`), computed on the batches these loaders make."""
    train_loader = preference_loader(datasets["train"], pad_token_id, max_length, cfg, True)
    val_loader = preference_loader(datasets["validation"], pad_token_id, max_length, cfg, False)
    model.to(device)
    for loader in (reference_batches(train_loader), val_loader):
        cache_reference(model, loader, reduction, device, cfg.precision)
    return train_loader, val_loader


# -- where DPO starts ----------------------------------------------------------------------

@dataclass
class Start:
    """The model preference tuning starts from, and what its run records about the base."""

    model: DecoderLM
    tokenizer: Tokenizer
    style: PromptStyle
    base: str  # run.json `model`: a registry name or an absolute path
    random_init: bool
    source: str  # where the weights came from, for results.json
    is_run: bool = False
    lora: dict[str, Any] | None = None  # LoRAConfig.to_dict() of the adapters the run saves
    fingerprint: str | None = None  # the base weights under those adapters
    merge_when_saved: bool = False  # adapters on a full run's weights: saved merged into them


def load_start(opts: PreferenceOptions) -> Start:
    """An `instruct train` run (its weights and prompt style), else a model spec."""
    if not RunDir(opts.model).is_run():
        pretrained = load_pretrained(opts.model, random_init=opts.random_init, overrides=opts.config_overrides)
        style = resolve_style(opts.prompt_style, pretrained.tokenizer)
        return Start(pretrained.model, pretrained.tokenizer, style, base_spec(opts.model), opts.random_init,
                     pretrained.source)
    if opts.random_init or opts.config_overrides:
        raise LlmftError(f"--random-init: {opts.model} is a run directory, whose weights are the start")
    model, tokenizer, meta = load_finetuned(opts.model)
    expect_task(meta, "instruction", opts.model, "instruct dpo")
    style = get_prompt_style(meta.prompt_style, tokenizer)
    if opts.prompt_style and get_prompt_style(opts.prompt_style, tokenizer).name != style.name:
        raise LlmftError(f"--prompt-style {opts.prompt_style}: {opts.model} was trained with prompt style "
                         f"{style.name!r}, which preference tuning keeps (omit --prompt-style)")
    return Start(model, tokenizer, style, meta.model, meta.random_init, f"run:{Path(opts.model).resolve()}",
                 is_run=True, lora=meta.lora, fingerprint=meta.base_fingerprint)


def prepare_policy(start: Start, opts: PreferenceOptions) -> bool:
    """Make trainable what `opts.finetune` trains; whether fresh LoRA adapters were added (the
    reference is then the model with them off). A LoRA run's adapters go on training under
    `--finetune lora`, and are merged into the weights under `--finetune full`. Adapters on a
    full run's weights are merged into them when saved: a LoRA run's base must load by name or
    path, and a run's weights do not."""
    if opts.finetune == "full":
        if start.lora is not None:
            merge_lora(start.model)
            start.lora = start.fingerprint = None
        start.model.requires_grad_(True)
        return False
    if start.lora is not None:
        if start.lora != opts.lora.to_dict():
            log.warning("%s: training its own LoRA adapters (%s); the --lora-* options are not used",
                        opts.model, start.lora)
        return False
    if start.is_run:
        start.merge_when_saved = True
    else:
        start.fingerprint = None if start.random_init else weights_fingerprint(start.model)
        start.lora = opts.lora.to_dict()
    apply_lora(start.model, opts.lora)
    return True


# -- the pipeline --------------------------------------------------------------------------

def load_preference_splits(opts: PreferenceOptions) -> tuple[InstructionSplits, int]:
    """The data's splits and how many pairs with the same two responses were dropped."""
    entries = load_preference_data(opts.data, opts.keys())
    splits, skipped = split_preference_data(entries, opts.train.seed, shuffle=opts.shuffle_split)
    if not splits.train or not splits.validation:
        raise LlmftError(f"{opts.data}: {len(entries) - skipped} usable pairs are too few for a "
                         "train/validation split")
    return splits, skipped


def pair_datasets(splits: InstructionSplits, start: Start, max_length: int) -> dict[str, PreferenceDataset]:
    """Training and validation pairs, tokenized; a split left with no pair is an error."""
    datasets = {}
    for name in ("train", "validation"):
        datasets[name] = PreferenceDataset(getattr(splits, name), start.tokenizer, start.style, max_length)
        if not len(datasets[name]):
            raise LlmftError(f"--max-length {max_length}: every {name} prompt fills it, no response token is left")
    return datasets


def reference_loaders(datasets: dict[str, PreferenceDataset], start: Start, fresh_adapters: bool, max_length: int,
                      opts: PreferenceOptions, device: torch.device) -> tuple[DataLoader, DataLoader]:
    """`cached_loaders` with the model as it starts: the reference (fresh adapters off)."""
    with adapters_disabled(start.model) if fresh_adapters else contextlib.nullcontext():
        return cached_loaders(start.model, datasets, start.tokenizer.eos_id, max_length, opts.train,
                              opts.logprob_reduction, device)


def train_preferences(opts: PreferenceOptions) -> dict[str, Any]:
    """Preference-tune `opts.model` into the run `opts.out`; returns what results.json holds."""
    require_one_process("instruct dpo")
    with create_run(opts.out, opts.overwrite, opts.inputs(), resume=opts.resume) as run:
        seed_everything(opts.train.seed)
        splits, skipped = load_preference_splits(opts)
        start = load_start(opts)
        fresh = prepare_policy(start, opts)
        cfg = start.model.cfg
        max_length = opts.max_length_within(cfg.context_length, cfg.context_length)
        datasets = pair_datasets(splits, start, max_length)
        trainable, total = count_parameters(start.model)
        log.info("pairs: %d train, %d validation, %d test (%d with the same two responses skipped) | prompt style "
                 "%s | trainable parameters %s of %s", len(datasets["train"]), len(datasets["validation"]),
                 len(splits.test), skipped, start.style.name, f"{trainable:,}", f"{total:,}")
        for name, data in {**splits._asdict(), **{n: ds.data for n, ds in datasets.items()}}.items():
            atomic_write_json(run.split(name, ".json"), data)
        device = resolve_device(opts.train.device)
        began = time.perf_counter()
        train_loader, val_loader = reference_loaders(datasets, start, fresh, max_length, opts, device)
        costs = {"reference_seconds": round(time.perf_counter() - began, 2)}
        task = PreferenceTask(opts.beta, opts.logprob_reduction,
                              InstructionTask(start.tokenizer, start.style, datasets["validation"].data[0],
                                              opts.sample_tokens), device, opts.train.precision)
        before = task.eval_metrics(TaskModule(start.model, task), val_loader, None)
        began = time.perf_counter()
        history = train(start.model, task, train_loader, val_loader, opts.train, run.metrics(),
                        checkpoints=opts.checkpoints(run))
        costs.update(train_seconds=round(time.perf_counter() - began, 2), peak_memory_mb=peak_memory_mb(device))
        results = {**summarize(history, before, task.eval_metrics(TaskModule(start.model, task), val_loader, None)),
                   **costs, "trainable_parameters": trainable, "source": start.source,
                   "pairs_skipped_same_responses": skipped,
                   "pairs_skipped_no_response_token": sum(ds.n_unscored for ds in datasets.values())}
        run.write_results(results)
        plot_history(history, run)
        if start.merge_when_saved:
            merge_lora(start.model)
        save_finetuned(run, start.model, start.tokenizer, run_meta(start, max_length, opts))
    return results


def run_meta(start: Start, max_length: int, opts: PreferenceOptions) -> RunMeta:
    """run.json of a preference-tuned model: an instruction run over the start's base."""
    return RunMeta(task="instruction", model=start.base, model_config=start.model.cfg.to_dict(), max_length=max_length,
                   random_init=start.random_init, base_fingerprint=start.fingerprint, lora=start.lora,
                   prompt_style=start.style.name, options=opts.record())


def summarize(history: History, full_val_before: dict[str, float], full_val_after: dict[str, float]) -> dict[str, Any]:
    """The first and last evaluation, and the whole validation split before and after."""
    first, last = history.steps[0], history.steps[-1]
    out: dict[str, Any] = {}
    for split, name in itertools.product(("train", "val"), METRICS):
        out[f"initial_{split}_{name}"], out[f"final_{split}_{name}"] = first[f"{split}_{name}"], last[f"{split}_{name}"]
    for name in METRICS:
        out[f"full_val_{name}_before"], out[f"full_val_{name}_after"] = full_val_before[name], full_val_after[name]
    out["examples_seen"] = history.epochs[-1]["examples_seen"]
    return out


def plot_history(history: History, run: RunDir) -> None:
    """One plot per metric, training vs validation, against epochs and examples seen."""
    steps = history.steps
    for name in METRICS:
        plot_values([s["epoch"] for s in steps], [s["examples_seen"] for s in steps],
                    [s[f"train_{name}"] for s in steps], [s[f"val_{name}"] for s in steps],
                    name.replace("_", " "), run.plot(name.replace("_", "-")))
