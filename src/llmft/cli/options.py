"""Command-line options shared by the training commands, generated from `TrainConfig`."""

from __future__ import annotations

import dataclasses
from typing import Any, get_args, get_type_hints

import click
from click.core import ParameterSource

from llmft.training.distributed import world
from llmft.training.lora import FINETUNE_MODES, LoRAConfig
from llmft.training.loop import TrainConfig

HELP = {
    "epochs": "Passes over the training data.",
    "batch_size": "Examples per batch.",
    "lr": "Peak AdamW learning rate.",
    "weight_decay": "AdamW weight decay.",
    "eval_freq": "Evaluate train/validation loss every N optimizer steps.",
    "eval_iter": "Batches per loss evaluation.",
    "grad_accum": "Batches accumulated per optimizer step.",
    "max_grad_norm": "Clip the gradient norm to this value.",
    "warmup_steps": "Linear warm-up steps.",
    "lr_schedule": "constant or cosine (after warm-up).",
    "min_lr_ratio": "Cosine floor as a fraction of --lr.",
    "seed": "Seed for data shuffling, splits and initialisation.",
    "device": "auto (cuda, mps, cpu), or a torch device name.",
    "precision": "32, bf16-mixed or 16-mixed (loss scaling).",
    "group_by_length": "Batch examples of similar length together (less padding), still shuffled.",
    "compile": "torch.compile forward + loss into one graph (GPU; slow to start on CPU).",
    "grad_checkpoint": "Recompute activations in backward: less memory for long sequences.",
    "strategy": "Under torchrun: ddp (auto) or fsdp (FSDP2, each block sharded).",
    "checkpoint_every": "Checkpoint every N optimizer steps and at each epoch's end (for --resume).",
    "keep_checkpoints": "How many checkpoints to keep.",
    "average_tail": "End with the uniform average of the weights after each optimizer step of this last "
                    "fraction of training (tail averaging, SWA without its schedule), e.g. 0.5.",
}


def prints_results() -> bool:
    """Whether this process prints a command's results: under torchrun only rank 0 does."""
    return world().is_main


def run_options(model: str, data: str, data_help: str):
    """What every training command takes: the model, the data and the run directory."""
    options = [
        click.option("--model", default=model, show_default=True, help="Registry name, HF folder or .gguf file."),
        click.option("--data", default=data, show_default=True, help=data_help),
        click.option("--out", required=True, help="Run directory to create."),
        click.option("--random-init", is_flag=True, help="Random weights instead of pretrained (tests, benchmarks)."),
        click.option("--overwrite", is_flag=True, help="Replace an existing run directory."),
        click.option("--resume", is_flag=True, help="Continue an interrupted run from its newest checkpoint."),
        click.option("--config", type=click.Path(), default=None,
                     help="Rerun with the options recorded in a run's run.json (or its folder); the options given "
                          "on the command line override them (--out, --overwrite and --resume are never taken)."),
    ]

    def decorate(command):
        for option in reversed(options):
            command = option(command)
        return command

    return decorate


def train_options(**defaults: Any):
    """Add one option per TrainConfig field, with task-specific defaults."""
    hints = get_type_hints(TrainConfig)

    def decorate(command):
        for f in reversed(dataclasses.fields(TrainConfig)):
            default = defaults.get(f.name, f.default)
            kind = hints[f.name]
            if kind is bool:
                command = click.option(f"--{f.name.replace('_', '-')}", f.name, is_flag=True, default=default,
                                       help=HELP[f.name])(command)
                continue
            kind = next((k for k in get_args(kind) if k is not type(None)), kind)  # int | None → int
            click_type = {int: int, float: float, str: str}[kind]
            command = click.option(f"--{f.name.replace('_', '-')}", f.name, type=click_type, default=default,
                                   show_default=True, help=HELP[f.name])(command)
        return command

    return decorate


def train_config(kwargs: dict[str, Any]) -> TrainConfig:
    """Pop the TrainConfig fields out of a command's keyword arguments."""
    return TrainConfig(**{f.name: kwargs.pop(f.name) for f in dataclasses.fields(TrainConfig)})


def command_options(options_class: type, kwargs: dict[str, Any], task: str, command: str) -> Any:
    """The command's options object from its flags (`kwargs`, as click gives them); with
    --config, from the options a run of `task` was made with, each flag given on the command line
    overriding its recorded value."""
    from llmft.pipelines.options import recorded_options

    config = kwargs.pop("config")
    if config:
        ctx = click.get_current_context()
        given = {name: value for name, value in kwargs.items()
                 if ctx.get_parameter_source(name) is ParameterSource.COMMANDLINE}
        kwargs = {**flat_options(recorded_options(config, options_class, task, command)), **given}
    return options_class(**nested_options(kwargs))


def flat_options(record: dict[str, Any]) -> dict[str, Any]:
    """Recorded options (`RunOptions.record()`) as a command's flags: TrainConfig's fields, the
    --lora-* settings, --train-frac/--val-frac for the split."""
    flat = {name: value for name, value in record.items() if name not in ("train", "lora", "split")}
    flat.update(record.get("train", {}))
    flat.update({f"lora_{name}": ",".join(value) if name == "targets" else value
                 for name, value in record.get("lora", {}).items()})
    if "split" in record:
        flat["train_frac"], flat["val_frac"] = record["split"]
    return flat


def nested_options(flat: dict[str, Any]) -> dict[str, Any]:
    """A command's flags as its options object's fields (the inverse of `flat_options`)."""
    kwargs = dict(flat)
    kwargs["train"], kwargs["lora"] = train_config(kwargs), lora_config(kwargs)
    if "train_frac" in kwargs:
        kwargs["split"] = (kwargs.pop("train_frac"), kwargs.pop("val_frac"))
    return kwargs


def lora_options(command):
    """--finetune full|lora and the LoRA settings (book appendix E: rank 16, alpha 16, every Linear)."""
    options = [
        click.option("--finetune", type=click.Choice(FINETUNE_MODES), default="full", show_default=True,
                     help="full: train the chosen layers; lora: train low-rank adapters on the frozen model."),
        click.option("--lora-rank", type=int, default=16, show_default=True, help="LoRA rank r."),
        click.option("--lora-alpha", type=float, default=16.0, show_default=True,
                     help="LoRA alpha; the update is scaled by alpha / rank."),
        click.option("--lora-dropout", type=float, default=0.0, show_default=True, help="Dropout on the LoRA input."),
        click.option("--lora-targets", default="all-linear", show_default=True,
                     help="Comma-separated layers to adapt: query, key, value, attn-out, attn, mlp, head, "
                          "all-linear, or parts of a layer path (mlp.fc, blocks.11)."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def lora_config(kwargs: dict[str, Any]) -> LoRAConfig:
    """Pop the --lora-* options out of a command's keyword arguments."""
    return LoRAConfig(rank=kwargs.pop("lora_rank"), alpha=kwargs.pop("lora_alpha"),
                      dropout=kwargs.pop("lora_dropout"), targets=kwargs.pop("lora_targets"))


def sampling_options(command):
    """How a command generates: --max-new-tokens, --temperature, --top-k, --top-p, --seed,
    --device, --compile, --prepack."""
    options = [
        click.option("--max-new-tokens", default=256),
        click.option("--temperature", default=0.0, help="0: greedy."),
        click.option("--top-k", type=int, default=None),
        click.option("--top-p", type=float, default=None),
        click.option("--seed", type=int, default=None),
        click.option("--device", default="auto"),
        click.option("--compile", is_flag=True, help="torch.compile the blocks (GPU)."),
        prepack_option,
    ]
    for option in reversed(options):
        command = option(command)
    return command


def beam_options(command):
    """--num-beams and --length-penalty: beam search instead of greedy decoding."""
    command = click.option("--length-penalty", default=1.0,
                           help="Beam search: a hypothesis scores its log-probability / length ** this.")(command)
    return click.option("--num-beams", default=1, help="Beam search with this many beams (1: greedy or sampled).")(
        command)


def add_threads_option(group: click.Group) -> None:
    """Give every command under `group` `--threads N` (torch's CPU threads; default: torch's own),
    applied before the command's other options are read."""
    from llmft.training.resources import set_threads

    for command in group.commands.values():
        if isinstance(command, click.Group):
            add_threads_option(command)
            continue
        command.params.append(click.Option(
            ["--threads"], type=int, default=None, is_eager=True, expose_value=False,
            callback=lambda ctx, param, value: set_threads(value),
            help="CPU threads for torch (default: torch's own, one per core)."))


prepack_option = click.option(
    "--prepack/--no-prepack", default=True,
    help="CPU: multiply by oneDNN-prepacked copies of the Linear weights while generating (faster; "
         "a second copy of those weights in memory meanwhile).")
