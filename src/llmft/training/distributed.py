"""Training on several processes through PyTorch's own engine: torchrun sets RANK, WORLD_SIZE
and LOCAL_RANK, `init_distributed` joins the process group (NCCL on CUDA, gloo on CPU) and
`distribute` wraps the model with DDP or FSDP2.

Every rank builds the same global batches (the order one process would use, `--batch-size`
per device times the world size) and trains on its rows of each (`ShardedBatches`). A loss that
averages over examples or tokens is reweighted by each rank's share of them (`rank_weight`), so
the averaged gradient, and every reduced evaluation, equals one process's on the same data.
"""

from __future__ import annotations

import atexit
import copy
import json
import logging
import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from llmft.errors import LlmftError

log = logging.getLogger("llmft")

STRATEGIES = ("auto", "ddp", "fsdp")


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def world() -> World:
    """This process's place among the training processes (one process: rank 0 of 1)."""
    if not dist.is_initialized():
        return World()
    return World(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))


def init_distributed(device: str) -> World:
    """Join torchrun's process group when WORLD_SIZE > 1 (once per process); on CUDA, one device
    per local rank."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size == 1 or dist.is_initialized():
        return world()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = device in ("auto", "cuda") and torch.cuda.is_available()
    if cuda and local_rank >= torch.cuda.device_count():
        raise LlmftError(f"LOCAL_RANK {local_rank}: this machine has {torch.cuda.device_count()} CUDA device(s); "
                         "start at most that many processes per node (--nproc-per-node)")
    if cuda:
        torch.cuda.set_device(local_rank)
    for name in ("RANK", "MASTER_ADDR", "MASTER_PORT"):
        if name not in os.environ:
            raise LlmftError(f"WORLD_SIZE is {size} but {name} is not set: launch with torchrun")
    dist.init_process_group("nccl" if cuda else "gloo")
    # destroyed before the interpreter exits: left to the destructors, a gloo rank could abort
    # ("terminate called without an active exception") while its peers still shut down
    atexit.register(dist.destroy_process_group)
    if dist.get_rank() != 0:
        logging.getLogger("llmft").setLevel(logging.WARNING)
    return world()


def require_one_process(command: str) -> None:
    """For a command that does not run under torchrun yet: a one-line error there."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise LlmftError(f"{command} runs on one process; launch it without torchrun")


def all_reduce_sum(value: torch.Tensor) -> torch.Tensor:
    """The sum over ranks (the value itself on one process)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        value = value.clone()
        dist.all_reduce(value)
    return value


def barrier() -> None:
    """Wait for every rank (nothing on one process)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def all_gather_json(value: Any) -> list[Any]:
    """Every rank's JSON value, in rank order, sent as UTF-8 JSON bytes (nothing is pickled)."""
    w = world()
    if w.size == 1:
        return [value]
    here = "cuda" if dist.get_backend() == "nccl" else "cpu"  # NCCL moves CUDA tensors only
    data = torch.frombuffer(bytearray(json.dumps(value).encode()), dtype=torch.uint8).to(here)
    sizes = [torch.zeros(1, dtype=torch.long, device=here) for _ in range(w.size)]
    dist.all_gather(sizes, torch.tensor([data.numel()], device=here))
    longest = int(max(sizes).item())
    chunks = [torch.zeros(longest, dtype=torch.uint8, device=here) for _ in range(w.size)]
    dist.all_gather(chunks, torch.cat([data, data.new_zeros(longest - data.numel())]))
    return [json.loads(bytes(chunk[:int(n.item())].cpu().tolist())) for chunk, n in zip(chunks, sizes)]


def broadcast(value: torch.Tensor, src: int) -> torch.Tensor:
    """`value` of rank `src` on every rank (the others pass a tensor of its shape)."""
    if dist.get_backend() == "nccl":  # NCCL moves CUDA tensors only
        moved = value.cuda()
        dist.broadcast(moved, src=src)
        return moved.cpu()
    dist.broadcast(value, src=src)
    return value


def shard_rows(batch: dict[str, torch.Tensor], w: World) -> dict[str, torch.Tensor]:
    """This rank's contiguous share of a batch's rows."""
    return {k: torch.tensor_split(v, w.size)[w.rank] for k, v in batch.items()}


class ShardedBatches:
    """A loader's global batches, each cut to this rank's rows. Reads like the loader itself
    (length, dataset, shuffling state), so the loop and checkpoints need not know."""

    def __init__(self, loader: Any, w: World) -> None:
        self.loader, self.world = loader, w

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        return (shard_rows(batch, self.world) for batch in self.loader)

    def __len__(self) -> int:
        return len(self.loader)

    def __getattr__(self, name: str) -> Any:  # dataset, generator, batch_sampler, batch_size
        return getattr(self.loader, name)


def log_global_batch(cfg: Any, w: World) -> None:
    if w.size > 1:
        log.info("global batch: %d = %d per device x %d processes x %d accumulated", cfg.batch_size * w.size *
                 cfg.grad_accum, cfg.batch_size, w.size, cfg.grad_accum)


def shard_loaders(loaders: dict[str, Any], w: World) -> dict[str, Any]:
    return loaders if w.size == 1 else {name: ShardedBatches(loader, w) for name, loader in loaders.items()}


def rank_weight(count: torch.Tensor, w: World) -> torch.Tensor:
    """What scales a rank's mean loss over `count` items so that DDP's average of the ranks'
    gradients is the gradient of the mean over all ranks' items."""
    total = all_reduce_sum(count.detach().float())
    return count.float() * w.size / total


class TaskModule(nn.Module):
    """The model with its task's computations as `forward(batch, what)`: the one module DDP or
    FSDP wraps, so every training and evaluation call goes through the wrapper."""

    def __init__(self, model: nn.Module, task: Any) -> None:
        super().__init__()
        self.model, self.task = model, task

    def forward(self, batch: dict[str, torch.Tensor], what: str = "loss") -> torch.Tensor:
        return getattr(self.task, what)(self.model, batch)


def distribute(model: nn.Module, task: Any, strategy: str, precision: str, device: torch.device) -> nn.Module:
    """`TaskModule(model, task)`, wrapped for the process group: DDP over the model itself, or
    FSDP2 (each block sharded, then the root) over a copy; on one process, unwrapped."""
    runner = TaskModule(model, task)
    w = world()
    if w.size == 1:
        if strategy not in ("auto",):
            raise LlmftError(f"--strategy {strategy} needs several processes: launch with torchrun")
        return runner
    if strategy in ("auto", "ddp"):
        ids = [torch.cuda.current_device()] if device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(runner, device_ids=ids)
    return _fully_shard(TaskModule(copy.deepcopy(model), task), precision)


def _fully_shard(runner: TaskModule, precision: str) -> nn.Module:
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
        if precision == "bf16-mixed" else MixedPrecisionPolicy()
    for module in runner.modules():
        if type(module).__name__ == "Block":
            fully_shard(module, mp_policy=policy)
    return fully_shard(runner, mp_policy=policy)


def inner_model(runner: nn.Module) -> nn.Module:
    """The task model a runner trains (its parameters are sharded under FSDP)."""
    return (runner.module if isinstance(runner, nn.parallel.DistributedDataParallel) else runner).model


def is_sharded(runner: nn.Module) -> bool:
    """Whether FSDP shards the runner's parameters (fully_shard turns a module into an FSDPModule)."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(runner, FSDPModule)


def gather_into(model: nn.Module, runner: nn.Module) -> None:
    """After FSDP training, the full trained weights into `model` on every rank (DDP and one
    process train `model` itself)."""
    if not is_sharded(runner):
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(runner, options=StateDictOptions(full_state_dict=True))
    model.load_state_dict({name.removeprefix("model."): t for name, t in full.items()})


# -- sharded checkpoints (torch.distributed.checkpoint) -------------------------------------

def _state_options() -> Any:
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(ignore_frozen_params=True)


def _storage(value: torch.Tensor) -> tuple:
    """Where a tensor's values live (two names of one tied weight give the same answer)."""
    local = value.to_local() if hasattr(value, "to_local") else value
    return local.untyped_storage().data_ptr(), local.storage_offset(), tuple(local.shape)


def _runner_state(runner: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict, dict]:
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optim_state = get_state_dict(runner, optimizer, options=_state_options())
    named = [(f"param.{name}", value) for name, value in model_state.items()]
    named += [(f"optim.{name}.{slot}", value) for name, slots in optim_state["state"].items()
              for slot, value in slots.items()]
    flat: dict[tuple, tuple[str, torch.Tensor]] = {}  # by storage
    for key, value in named:  # a tied weight (embedding and output head) once, under its first name
        flat.setdefault(_storage(value), (key, value))
    return dict(flat.values()), model_state, optim_state


def sharded_state(runner: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """The trainable parameters ("param.FQN") and optimizer slots ("optim.FQN.SLOT") as the runner
    holds them: this rank's DTensor shards under FSDP, whole tensors otherwise. The names do not
    depend on the wrapper (DDP, FSDP or none), so a checkpoint loads into any of them."""
    return _runner_state(runner, optimizer)[0]


def save_sharded(state: dict[str, torch.Tensor], folder: Path) -> None:
    """Every rank writes its shards of `state` into `folder` (one safetensors file per rank, the
    shard offsets in its header: no pickled metadata). A collective: every rank calls it."""
    from torch.distributed.checkpoint import save
    from torch.distributed.checkpoint.hf_storage import HuggingFaceStorageWriter

    save(state, storage_writer=HuggingFaceStorageWriter(str(folder), save_distributed=True))


def load_sharded(runner: nn.Module, optimizer: torch.optim.Optimizer, folder: Path, groups: list[dict]) -> None:
    """Load what `save_sharded` wrote, at any world size and under any wrapper, into the
    runner's trainable parameters and the optimizer (its hyperparameters from `groups`)."""
    from torch.distributed.checkpoint import load
    from torch.distributed.checkpoint.hf_storage import HuggingFaceStorageReader
    from torch.distributed.checkpoint.state_dict import set_state_dict

    target, model_state, optim_state = _runner_state(runner, optimizer)
    with warnings.catch_warnings():  # one process reading a sharded checkpoint is what we mean
        warnings.filterwarnings("ignore", "torch.distributed is disabled")
        load(target, storage_reader=HuggingFaceStorageReader(str(folder)))
    groups = [{**saved, "params": fresh["params"]}
              for saved, fresh in zip(groups, optim_state["param_groups"], strict=True)]
    set_state_dict(runner, optimizer, model_state_dict=model_state,
                   optim_state_dict={"state": optim_state["state"], "param_groups": groups}, options=_state_options())


def no_sync(runner: nn.Module, accumulating: bool) -> Any:
    """DDP: skip the gradient all-reduce on a micro-batch that only accumulates."""
    import contextlib

    if accumulating and isinstance(runner, nn.parallel.DistributedDataParallel):
        return runner.no_sync()
    return contextlib.nullcontext()
