"""Training checkpoints: everything an interrupted run needs to continue bit for bit.

A checkpoint is a folder `checkpoints/step-NNNNNN/` in the run's staging area, written under a
temporary name and renamed when complete:

- `trainable.safetensors`: the parameters that train (adapters and the new head for LoRA);
  frozen ones are rebuilt by the same command from the same seed.
- `tensors.safetensors`: the optimizer's moments and step counts, the RNG states of torch (CPU,
  CUDA) and of the training data order.
- under FSDP, `shards/` instead of the trainable weights and the optimizer's moments: one
  safetensors file per rank, written and read by `torch.distributed.checkpoint` (each file's
  header holds its shards' offsets), so a run checkpointed at one world size resumes at another.
- `state.json`: the loop's position (epoch, batch, step, what was seen), the metrics rows so
  far, the learning-rate schedule position, the loss scaler, the optimizer's hyperparameters,
  the Python and numpy RNG states, the command's options and each file's size and hash.

Loading reads safetensors and JSON only (nothing is unpickled) and checks every file's size and
hash: a checkpoint torn by a kill is skipped for the previous one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import shutil
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.torch
import torch

from llmft.errors import LlmftError, one_line
from llmft.rundir import atomic_write_json
from llmft.training.distributed import barrier, save_sharded, world

log = logging.getLogger("llmft")

TRAINABLE, TENSORS, SHARDS = "trainable.safetensors", "tensors.safetensors", "shards"

# Options that may change on --resume: where things go and how fast, not what is computed.
RESUMABLE_CHANGES = ("out", "overwrite", "resume", "epochs", "checkpoint_every", "keep_checkpoints", "device",
                     "compile", "strategy")


@dataclass
class LoopState:
    """Where the loop stands after an optimizer step."""

    epoch: int  # the epoch in progress
    batch: int  # batches of that epoch already trained on
    step: int  # optimizer steps taken - 1
    seen: int
    history: dict[str, list[dict[str, Any]]]  # "steps" and "epochs" rows so far
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)  # optimizer + RNG tensors
    extra: dict[str, Any] = field(default_factory=dict)  # JSON parts of optimizer, scaler, RNGs
    shards: Path | None = None  # FSDP: the trainable weights and optimizer moments, sharded (not in `tensors`)


def _digest(path: Path) -> str:
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Checkpoints:
    """The checkpoints folder of one run: write, prune, find the newest complete one.

    `every`: a checkpoint every that many optimizer steps and at the end of each epoch (None:
    only when the run is interrupted); `keep`: how many to keep; `resume`: continue from the
    newest; `options`: the command's options, which a resumed run must share."""

    def __init__(self, folder: Path, every: int | None, keep: int, options: dict[str, Any],
                 resume: bool = False) -> None:
        self.folder, self.every, self.keep, self.options, self.resume = Path(folder), every, keep, options, resume

    def due(self, step: int, epoch_end: bool) -> bool:
        return self.every is not None and (epoch_end or (step + 1) % self.every == 0)

    def save(self, trainable: dict[str, torch.Tensor], state: LoopState) -> Path:
        """One process, or rank 0 of DDP: the trainable weights and the whole state in two files."""
        began, (tmp, final) = time.perf_counter(), self._fresh_folder(state)
        safetensors.torch.save_file({k: v.detach().contiguous().cpu() for k, v in trainable.items()},
                                    str(tmp / TRAINABLE))
        return self._complete(tmp, final, state, began)

    def save_sharded(self, shards: dict[str, torch.Tensor], state: LoopState) -> Path:
        """FSDP, called on every rank: each rank writes its shards of the trainable weights and
        optimizer moments through torch.distributed.checkpoint (`shards/`, loadable at any world
        size), then rank 0 the rest of the state."""
        began, main = time.perf_counter(), world().is_main
        tmp, final = self._fresh_folder(state) if main else self._folders(state)
        barrier()  # the folder exists
        save_sharded(shards, tmp / SHARDS)
        barrier()  # every shard is written
        return self._complete(tmp, final, state, began) if main else final

    def _folders(self, state: LoopState) -> tuple[Path, Path]:
        final = self.folder / f"step-{state.step + 1:06d}"
        return final.with_name(final.name + ".tmp"), final

    def _fresh_folder(self, state: LoopState) -> tuple[Path, Path]:
        tmp, final = self._folders(state)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        return tmp, final

    def _complete(self, tmp: Path, final: Path, state: LoopState, began: float) -> Path:
        """Write the loop state beside the weights, hash every file, then rename `tmp` to `final`."""
        safetensors.torch.save_file({k: v.contiguous().cpu() for k, v in state.tensors.items()}, str(tmp / TENSORS))
        files = sorted(p for p in tmp.rglob("*") if p.is_file())
        for path in files:
            with open(path, "rb+") as f:
                os.fsync(f.fileno())
        hashes = {str(p.relative_to(tmp)): {"size": p.stat().st_size, "blake2b": _digest(p)} for p in files}
        atomic_write_json(tmp / "state.json", {
            "epoch": state.epoch, "batch": state.batch, "step": state.step, "seen": state.seen,
            "history": state.history, "extra": state.extra, "options": self.options, "files": hashes})
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        _fsync_dir(self.folder)
        self._prune()
        log.info("checkpoint at step %d saved in %.2f s (%s)", state.step + 1, time.perf_counter() - began, final)
        return final

    def _prune(self) -> None:
        for old in self.complete()[:-self.keep]:
            shutil.rmtree(old, ignore_errors=True)

    def complete(self) -> list[Path]:
        """Checkpoints whose writing finished (renamed, state.json in place), oldest first."""
        if not self.folder.is_dir():
            return []
        return [p for p in sorted(self.folder.glob("step-*"))
                if not p.name.endswith(".tmp") and (p / "state.json").is_file()]

    @staticmethod
    def _intact(path: Path) -> bool:
        try:
            state = json.loads((path / "state.json").read_text(encoding="utf-8"))
            return all((path / name).stat().st_size == meta["size"] and _digest(path / name) == meta["blake2b"]
                       for name, meta in state["files"].items())
        except (OSError, ValueError, KeyError, TypeError):
            log.warning("skipping %s: incomplete or damaged checkpoint", path)
            return False

    def load_latest(self) -> tuple[dict[str, torch.Tensor], LoopState] | None:
        """The newest intact checkpoint's trainable weights and loop state, if any (only the
        checkpoints newer than it are hashed: a torn one is skipped for the one before)."""
        path = next((p for p in reversed(self.complete()) if self._intact(p)), None)
        if path is None:
            return None
        state = json.loads((path / "state.json").read_text(encoding="utf-8"))
        check_same_options(state["options"], self.options, path)
        try:
            tensors = safetensors.torch.load_file(str(path / TENSORS))
            trainable = safetensors.torch.load_file(str(path / TRAINABLE)) if (path / TRAINABLE).is_file() else {}
        except (OSError, safetensors.SafetensorError) as e:
            raise LlmftError(f"{path}: cannot read the checkpoint ({one_line(e)})") from None
        log.info("resuming from %s (epoch %d, step %d)", path, state["epoch"] + 1, state["step"] + 1)
        shards = path / SHARDS if (path / SHARDS).is_dir() else None
        return trainable, LoopState(state["epoch"], state["batch"], state["step"], state["seen"], state["history"],
                                    tensors, state["extra"], shards)


def _flatten(options: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in options.items():
        if isinstance(value, dict) and key in ("train", "lora"):
            flat.update(_flatten(value, f"{key}."))
        else:
            flat[prefix + key] = value
    return flat


def check_same_options(saved: dict[str, Any], current: dict[str, Any], where: Path) -> None:
    """A resumed run computes what the interrupted one did: every option that defines the
    computation must be the same (a one-line error names each that differs)."""
    old, new = _flatten(json.loads(json.dumps(saved))), _flatten(json.loads(json.dumps(current)))
    # An option the checkpoint does not record did not exist when it was made: its default holds.
    differ = [k for k in sorted(old) if k.split(".")[-1] not in RESUMABLE_CHANGES and old[k] != new.get(k)]
    if differ:
        changes = ", ".join(f"--{k.split('.')[-1].replace('_', '-')} {old.get(k)!r} -> {new.get(k)!r}" for k in differ)
        raise LlmftError(f"--resume: the checkpoint in {where.parent} was made with other options ({changes}); "
                         "resume with the same ones, or start a new run")


class Interrupts:
    """While training: the first SIGINT (Ctrl-C) or SIGTERM asks the loop to stop after the
    current optimizer step (it checkpoints first); a second one stops at once."""

    def __init__(self) -> None:
        self.requested = False
        self.previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        log.warning("stopping after this step (%s again to stop at once)", signal.Signals(signum).name)

    def __enter__(self) -> Interrupts:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        self.previous.clear()


# -- RNG and optimizer state as safetensors + JSON -------------------------------------------

def rng_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """torch (CPU and CUDA), numpy and Python RNG states."""
    tensors = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors.update({f"rng.cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    return tensors, {"numpy": [kind, keys.tolist(), pos, has_gauss, gauss],
                     "python": [version, list(internal), gauss_next]}


def set_rng_state(tensors: dict[str, torch.Tensor], extra: dict[str, Any]) -> None:
    torch.set_rng_state(tensors["rng.torch"])
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("rng.cuda."))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    kind, keys, pos, has_gauss, gauss = extra["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = extra["python"]
    random.setstate((version, tuple(internal), gauss_next))


def optimizer_state(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], list[dict[str, Any]]]:
    """The optimizer's per-parameter tensors by name, and its parameter groups as JSON."""
    state = optimizer.state_dict()
    tensors = {f"optim.{index}.{key}": value for index, slots in state["state"].items()
               for key, value in slots.items()}
    return tensors, state["param_groups"]


def load_optimizer_state(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor],
                         groups: list[dict[str, Any]]) -> None:
    state: dict[int, dict[str, torch.Tensor]] = {}
    for name, value in tensors.items():
        if name.startswith("optim."):
            _, index, key = name.split(".", 2)
            state.setdefault(int(index), {})[key] = value
    optimizer.load_state_dict({"state": state, "param_groups": groups})
