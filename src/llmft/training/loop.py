"""The one training loop, shared by classification and instruction fine-tuning.

It follows the book's `train_classifier_simple` / `train_model_simple`: AdamW, a loss
evaluation on `eval_iter` batches every `eval_freq` optimizer steps (starting at the first
step), a per-epoch hook (accuracies for classification, a generated sample for instructions)
and a counter of what was seen (examples or tokens). On top: gradient accumulation and
clipping, warm-up + cosine schedule, mixed precision, a progress bar with loss and ETA,
and metrics appended to CSV as they happen.
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from llmft.data.batching import order_state, set_order_state
from llmft.errors import Interrupted, LlmftError
from llmft.models.transformer import DecoderLM
from llmft.progress import progress_bar
from llmft.training.averaging import TailAverage, first_averaged_step
from llmft.training.distributed import (
    STRATEGIES, all_reduce_sum, barrier, distribute, gather_into, is_sharded, load_sharded, no_sync, rank_weight,
    sharded_state, world,
)
from llmft.training.resume import (
    Checkpoints, Interrupts, LoopState, load_optimizer_state, optimizer_state, rng_state, set_rng_state,
)

log = logging.getLogger("llmft")

Batch = dict[str, torch.Tensor]
PRECISIONS = ("32", "bf16-mixed", "16-mixed")


@dataclass
class TrainConfig:
    epochs: int = 5
    batch_size: int = 8
    lr: float = 5e-5
    weight_decay: float = 0.1
    eval_freq: int = 50
    eval_iter: int = 5
    grad_accum: int = 1
    max_grad_norm: float | None = None
    warmup_steps: int = 0
    lr_schedule: str = "constant"  # or "cosine" (after warm-up, down to min_lr_ratio * lr)
    min_lr_ratio: float = 0.1
    seed: int = 123
    device: str = "auto"
    precision: str = "32"
    group_by_length: bool = False  # batches of similar lengths (less padding), still shuffled
    compile: bool = False  # torch.compile the task's loss: model forward + loss in one graph
    grad_checkpoint: bool = False  # recompute block activations in backward to save memory
    strategy: str = "auto"  # under torchrun: ddp (auto) or fsdp
    checkpoint_every: int | None = None  # checkpoint every N optimizer steps and at each epoch's end
    keep_checkpoints: int = 1  # how many checkpoints to keep
    average_tail: float | None = None  # end with the mean weights of this last fraction of the steps

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "eval_freq", "eval_iter", "grad_accum", "keep_checkpoints"):
            if getattr(self, name) < 1:
                raise LlmftError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.lr <= 0:
            raise LlmftError(f"--lr must be positive, got {self.lr}")
        if self.checkpoint_every is not None and self.checkpoint_every < 1:
            raise LlmftError(f"--checkpoint-every must be at least 1, got {self.checkpoint_every}")
        if self.average_tail is not None and not 0 < self.average_tail <= 1:
            raise LlmftError(f"--average-tail must be a fraction in (0, 1], got {self.average_tail}")
        if self.average_tail is not None and self.strategy == "fsdp":
            raise LlmftError("--average-tail: not with --strategy fsdp (each rank holds only shards of the weights); "
                             "use --strategy ddp")
        if self.lr_schedule not in ("constant", "cosine"):
            raise LlmftError(f"--lr-schedule must be constant or cosine, got {self.lr_schedule!r}")
        if self.precision not in PRECISIONS:
            raise LlmftError(f"--precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.strategy not in STRATEGIES:
            raise LlmftError(f"--strategy must be one of {', '.join(STRATEGIES)}, got {self.strategy!r}")
        resolve_device(self.device)  # an unusable device fails before any work

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class Task(Protocol):
    """What the loop needs to know about a task. `on_epoch_end` gets the task's runner
    (`llmft.training.distributed.TaskModule`, maybe wrapped): call it to evaluate."""

    seen_unit: str  # "examples" or "tokens": what the `seen` counter counts

    def loss(self, model: nn.Module, batch: Batch) -> torch.Tensor: ...

    def loss_weight(self, batch: Batch) -> torch.Tensor: ...  # what `loss` averages over (several ranks)

    def count_seen(self, batch: Batch) -> int: ...

    def on_epoch_end(self, model: nn.Module, epoch: int) -> dict[str, Any]: ...

    # Optional: eval_metrics(runner, batches, num_batches) -> {"loss": ..., other: ...}, measured on an
    # evaluation's batches instead of the mean loss; the others become columns train_<other>, val_<other>.


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def resolve_device(name: str = "auto") -> torch.device:
    """`auto`: CUDA, else MPS, else CPU; any other name must be a device this machine has."""
    if name != "auto":
        try:
            device = torch.device(name)
        except RuntimeError:
            raise LlmftError(f"--device {name!r}: not a device name (auto, cpu, cuda, cuda:N, mps)") from None
        available = {"cpu": True, "cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available()}
        if not available.get(device.type, False):
            raise LlmftError(f"--device {name!r}: this machine has no {device.type} device")
        if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
            raise LlmftError(f"--device {name!r}: only {torch.cuda.device_count()} CUDA device(s)")
        return device
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    if precision == "32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16-mixed" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def to_device(batch: Batch, device: torch.device) -> Batch:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def prepare_model(model: nn.Module, cfg: TrainConfig) -> None:
    """Apply the memory switch to every decoder inside `model`."""
    for module in model.modules():
        if isinstance(module, DecoderLM):
            module.grad_checkpoint = cfg.grad_checkpoint


def make_optimizer(model: nn.Module, cfg: TrainConfig, device: torch.device,
                   sharded: bool = False) -> torch.optim.AdamW:
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise LlmftError("nothing to train: every parameter is frozen")
    # Fused AdamW: one kernel over all parameters, faster than the multi-tensor default on
    # CPU too (docs/benchmarks.md); not over FSDP's sharded parameters.
    fused = device.type in ("cuda", "cpu") and not sharded
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=fused)


def lr_at(step: int, total: int, cfg: TrainConfig) -> float:
    """Linear warm-up, then constant or cosine decay to min_lr_ratio * lr."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.lr_schedule == "constant":
        return cfg.lr
    progress = (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps)
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + (cfg.lr - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def batch_loss(runner: nn.Module, task: Task, batch: Batch) -> torch.Tensor:
    """The task's loss on this rank's rows; with several ranks, weighted by this rank's share
    of what the loss averages over, so that averaging over ranks gives the whole batch's loss."""
    loss = runner(batch)
    w = world()
    if w.size == 1:
        return loss
    count = task.loss_weight(batch)
    return torch.where(count > 0, loss, 0.0) * rank_weight(count, w)  # a rank with no rows adds 0


@torch.no_grad()
def evaluate_loss(runner: nn.Module, task: Task, batches: Iterable[Batch], num_batches: int | None,
                  device: torch.device, precision: str = "32") -> float:
    """Mean batch loss over the first `num_batches` batches (all when None), as the book's
    `calc_loss_loader`; with several ranks, each batch's loss is reduced over them."""
    was_training = runner.training
    runner.eval()
    total, n, ranks = 0.0, 0, world().size
    for i, batch in enumerate(batches):
        if num_batches is not None and i >= num_batches:
            break
        with autocast(device, precision):
            loss = batch_loss(runner, task, to_device(batch, device))
        total += (all_reduce_sum(loss.detach().float()) / ranks).item()
        n += 1
    runner.train(was_training)
    return total / n if n else float("nan")


@dataclass
class History:
    steps: list[dict[str, Any]] = field(default_factory=list)
    epochs: list[dict[str, Any]] = field(default_factory=list)


class MetricsSink(Protocol):
    """Where the loop's rows go as they happen: table "steps" (a loss evaluation) or "epochs"."""

    def write(self, table: str, row: dict[str, Any]) -> None: ...

    def clear(self) -> None: ...


class _Loop:
    """One fine-tuning run's state: the optimizer, the step and `seen` counters, the history,
    and what a checkpoint needs to continue it exactly."""

    def __init__(self, model: nn.Module, runner: nn.Module, task: Task, train_batches: DataLoader,
                 val_batches: Iterable[Batch], cfg: TrainConfig, device: torch.device, metrics: MetricsSink | None,
                 checkpoints: Checkpoints | None) -> None:
        self.model, self.runner, self.task, self.cfg, self.device = model, runner, task, cfg, device
        self.metrics = metrics
        self.train_batches, self.val_batches, self.checkpoints = train_batches, val_batches, checkpoints
        # One graph for forward + loss: it fuses more than compiling block by block (docs/benchmarks.md).
        self.loss_fn = torch.compile(batch_loss) if cfg.compile else batch_loss
        self.sharded = is_sharded(runner)
        self.optimizer = make_optimizer(runner, cfg, device, sharded=self.sharded)
        self.scaler = torch.amp.GradScaler(device.type, enabled=cfg.precision == "16-mixed")
        self.total_steps = math.ceil(len(train_batches) / cfg.grad_accum) * cfg.epochs
        self.history, self.seen, self.step = History(), 0, -1
        self.seen_key = f"{task.seen_unit}_seen"
        self.epoch_order = order_state(train_batches)  # the data order's RNG when the epoch began
        self.interrupts = Interrupts()
        self.ranks = world().size
        self.average = self.tail_average()

    def tail_average(self) -> TailAverage | None:
        """The running mean of the trainable weights that `--average-tail` asks for."""
        if self.cfg.average_tail is None:
            return None
        return TailAverage(self.trainable(), first_averaged_step(self.total_steps, self.cfg.average_tail))

    def restore_average(self, state: LoopState) -> None:
        """The checkpoint's running mean. With other --epochs the averaged tail moves: a tail that
        now begins after the checkpoint starts anew; one that would begin at another step already
        taken cannot be had, so the resume is refused. (A checkpoint without "average_start"
        predates the field: its tail is taken to begin where this run's does.)"""
        began, start = state.extra.get("average_start", self.average.start), self.average.start
        if began == start:
            self.average.load(state.tensors, state.extra["average_count"])
        elif start > state.step:
            log.info("--average-tail: with %d optimizer steps the average begins at step %d, not %d",
                     self.total_steps, start + 1, began + 1)
        else:
            raise LlmftError(f"--resume: the checkpoint after step {state.step + 1} averages the weights from step "
                             f"{began + 1} on; with {self.total_steps} optimizer steps --average-tail "
                             f"{self.cfg.average_tail:g} would begin at step {start + 1}, which is past: resume "
                             "with the checkpoint's --epochs, or enough more that the tail begins after it")

    def trainable(self) -> dict[str, nn.Parameter]:
        """The model's parameters that train, by name: what a checkpoint and the average hold."""
        return {n: p for n, p in self.model.named_parameters() if p.requires_grad}

    def across_ranks(self, count: int) -> int:
        """The sum of a count over the ranks (no collective, nothing allocated, on one process)."""
        return count if self.ranks == 1 else int(all_reduce_sum(torch.tensor(count)))

    def record(self, table: str, row: dict[str, Any]) -> None:
        (self.history.steps if table == "steps" else self.history.epochs).append(row)
        if self.metrics is not None:
            self.metrics.write(table, row)

    def evaluate(self, epoch_float: float) -> dict[str, Any]:
        train, val = self.split_metrics(self.train_batches), self.split_metrics(self.val_batches)
        row = {"step": self.step + 1, "epoch": round(epoch_float, 4), self.seen_key: self.seen,
               "train_loss": train.pop("loss"), "val_loss": val.pop("loss"),
               **{f"train_{k}": v for k, v in train.items()}, **{f"val_{k}": v for k, v in val.items()},
               "lr": self.optimizer.param_groups[0]["lr"]}
        self.record("steps", row)
        return row

    def split_metrics(self, batches: Iterable[Batch]) -> dict[str, float]:
        """The loss on `eval_iter` batches; a task with `eval_metrics(runner, batches, n)` measures
        it there itself, with whatever else it reports (preference tuning: reward margin, accuracy)."""
        cfg = self.cfg
        if hasattr(self.task, "eval_metrics"):
            return dict(self.task.eval_metrics(self.runner, batches, cfg.eval_iter))
        return {"loss": evaluate_loss(self.runner, self.task, batches, cfg.eval_iter, self.device, cfg.precision)}

    def optimizer_step(self) -> None:
        self.step += 1
        for group in self.optimizer.param_groups:
            group["lr"] = lr_at(self.step, self.total_steps, self.cfg)
        if self.cfg.max_grad_norm is not None:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.runner.parameters(), self.cfg.max_grad_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        if self.average is not None:
            self.average.update(self.step)

    # -- checkpoints ----------------------------------------------------------------------
    def state(self, epoch: int, batch: int) -> LoopState:
        """Everything that continues the run exactly from here (after an optimizer step); under
        FSDP without the optimizer's moments (`sharded_state` holds them)."""
        optim, groups = optimizer_state(self.optimizer)
        rngs, rng_extra = rng_state()
        tensors = {**({} if self.sharded else optim), **rngs, "order.epoch": self.epoch_order,
                   "order.now": order_state(self.train_batches),
                   **(self.average.tensors() if self.average is not None else {})}
        averaged = {} if self.average is None else {"average_count": self.average.count,
                                                     "average_start": self.average.start}
        return LoopState(epoch, batch, self.step, self.seen, {"steps": self.history.steps,
                                                             "epochs": self.history.epochs}, tensors,
                         {"param_groups": groups, "scaler": self.scaler.state_dict(), **rng_extra, **averaged})

    def save(self, epoch: int, batch: int) -> None:
        """Rank 0 writes the checkpoint (every rank holds the same state); under FSDP every rank
        writes its shards. No rank goes on (or exits, when interrupted) before it is complete."""
        if self.sharded:
            self.checkpoints.save_sharded(sharded_state(self.runner, self.optimizer), self.state(epoch, batch))
        elif world().is_main:
            self.checkpoints.save(self.trainable(), self.state(epoch, batch))
        barrier()

    def restore(self, trainable: dict[str, torch.Tensor], state: LoopState) -> None:
        if state.shards is not None:
            load_sharded(self.runner, self.optimizer, state.shards, state.extra["param_groups"])
        elif self.sharded:
            raise LlmftError(f"--resume --strategy fsdp: the checkpoint in {self.checkpoints.folder} was written "
                             "by one process or DDP; resume it with --strategy ddp")
        else:
            params = dict(self.model.named_parameters())
            with torch.no_grad():
                for name, value in trainable.items():
                    params[name].copy_(value)
            load_optimizer_state(self.optimizer, state.tensors, state.extra["param_groups"])
        self.scaler.load_state_dict(state.extra["scaler"])
        if self.average is not None:
            self.restore_average(state)
        self.step, self.seen = state.step, state.seen
        self.history = History(state.history["steps"], state.history["epochs"])
        if self.metrics is not None:  # rows logged after the checkpoint are dropped
            self.metrics.clear()
            for table, rows in state.history.items():
                for row in rows:
                    self.metrics.write(table, row)

    def after_step(self, epoch: int, batch: int) -> None:
        """Checkpoint when due or asked to stop (position: `batch` batches into `epoch`); stop
        when asked."""
        stop = bool(self.across_ranks(int(self.interrupts.requested)))  # all ranks stop together
        last = epoch == self.cfg.epochs  # the run is complete: nothing left to resume
        if self.checkpoints is not None and not last and (stop or self.checkpoints.due(self.step, batch == 0)):
            self.save(epoch, batch)
        if stop:
            saved = self.checkpoints is not None and not last
            raise Interrupted(f"interrupted after step {self.step + 1}; " + (
                "checkpoint saved: run the same command with --resume to continue" if saved else "nothing saved"))

    # -- the loop -------------------------------------------------------------------------
    def batches(self, skip: int, resumed: LoopState | None) -> Iterator[tuple[int, Batch]]:
        """This epoch's batches from number `skip` on, in the order an uninterrupted run sees;
        when `resumed` from a checkpoint, with every RNG as it was there."""
        if resumed is not None and skip:  # the epoch's order as it began, then skip what was trained on
            set_order_state(self.train_batches, resumed.tensors["order.epoch"])
        elif resumed is not None:
            set_order_state(self.train_batches, resumed.tensors["order.now"])
            set_rng_state(resumed.tensors, resumed.extra)
        self.epoch_order = order_state(self.train_batches)
        batches = iter(self.train_batches)
        for _ in range(skip):
            next(batches)
        if resumed is not None and skip:
            set_order_state(self.train_batches, resumed.tensors["order.now"])
            set_rng_state(resumed.tensors, resumed.extra)
        return enumerate(batches, skip)

    def epoch(self, epoch: int, bar: tqdm, skip: int = 0, resumed: LoopState | None = None) -> None:
        cfg, n = self.cfg, len(self.train_batches)
        self.optimizer.zero_grad(set_to_none=True)
        for i, batch in self.batches(skip, resumed):
            batch = to_device(batch, self.device)
            accumulating = bool((i + 1) % cfg.grad_accum) and i + 1 != n
            with no_sync(self.runner, accumulating):
                with autocast(self.device, cfg.precision):
                    loss = self.loss_fn(self.runner, self.task, batch)
                self.scaler.scale(loss / cfg.grad_accum).backward()
            self.seen += self.across_ranks(self.task.count_seen(batch))
            if accumulating:
                continue
            self.optimizer_step()
            bar.update(1)
            if self.step % cfg.eval_freq == 0:
                row = self.evaluate(epoch + (i + 1) / n)
                bar.set_postfix(train_loss=f"{row['train_loss']:.3f}", val_loss=f"{row['val_loss']:.3f}",
                                refresh=False)  # shown with the next step's update, not as one more line
                bar.write(f"Ep {epoch + 1} (Step {self.step:06d}): train loss {row['train_loss']:.3f}, "
                          f"val loss {row['val_loss']:.3f}")
            if i + 1 < n:
                self.after_step(epoch, i + 1)
        self.record("epochs", {"epoch": epoch + 1, self.seen_key: self.seen, **self.task.on_epoch_end(self.runner, epoch)})
        self.runner.train()
        self.after_step(epoch + 1, 0)

    def run(self, show_progress: bool) -> History:
        found = self.checkpoints.load_latest() if self.checkpoints is not None and self.checkpoints.resume else None
        if self.checkpoints is not None and self.checkpoints.resume and not found:
            raise LlmftError(f"--resume: no complete checkpoint in {self.checkpoints.folder}")
        resumed = None
        if found:
            self.restore(*found)
            resumed = found[1]
        else:
            first = self.evaluate(0.0)
            log.info("before training: train loss %.3f, validation loss %.3f (the first %d batches of each)",
                     first["train_loss"], first["val_loss"], self.cfg.eval_iter)
        self.runner.train()
        start = resumed.epoch if resumed else 0
        with self.interrupts, progress_bar(total=self.total_steps, initial=self.step + 1, desc="train", unit="step",
                                          disable=not show_progress or not world().is_main, dynamic_ncols=True) as bar:
            for epoch in range(start, self.cfg.epochs):
                if resumed and epoch == start:
                    self.epoch(epoch, bar, resumed.batch, resumed)
                else:
                    self.epoch(epoch, bar)
        if self.average is not None:
            self.average.apply()
            log.info("weights: the mean over the last %d of %d optimizer steps (--average-tail %g)",
                     self.average.count, self.total_steps, self.cfg.average_tail)
        return self.history


def train(model: nn.Module, task: Task, train_batches: DataLoader, val_batches: Iterable[Batch],
          cfg: TrainConfig, metrics: MetricsSink | None = None, show_progress: bool = True,
          checkpoints: Checkpoints | None = None) -> History:
    """Fine-tune `model` in place. `train_batches` is re-iterated every epoch (a DataLoader);
    every loss evaluation and epoch row goes to `metrics` as it happens. With `checkpoints`,
    the run is checkpointed as they say and continues from their newest one when resuming.
    Under torchrun the model is wrapped with `cfg.strategy` (`llmft.training.distributed`)."""
    device = resolve_device(cfg.device)
    model.to(device)
    prepare_model(model, cfg)
    runner = distribute(model, task, cfg.strategy, cfg.precision, device)
    history = _Loop(model, runner, task, train_batches, val_batches, cfg, device, metrics, checkpoints).run(show_progress)
    gather_into(model, runner)
    return history
