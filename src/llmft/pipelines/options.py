"""What every training pipeline takes: the model, the data, the run directory, how to fine-tune.

Options are validated when they are made, so a bad value fails before any work; the pipelines
never change them.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from llmft.errors import LlmftError
from llmft.rundir import RunDir, RunMeta, create_run, read_json, require_out, staging_path
from llmft.tasks import expect_task
from llmft.training.distributed import world
from llmft.training.resume import Checkpoints
from llmft.training.lora import LoRAConfig, check_finetune
from llmft.training.loop import TrainConfig

LONGEST = "longest"  # --max-length longest: the longest training example (capped at the context)
COMMAND_FIELDS = ("out", "overwrite", "resume")  # what a command says for itself, never taken from --config


@dataclass(kw_only=True)
class RunOptions:
    model: str  # registry name, Hugging Face folder or .gguf file
    data: str  # data set name or file
    out: Path  # the run directory to create
    max_length: int | str | None = None  # tokens per example, LONGEST, or None: the task's default
    finetune: str = "full"  # or "lora": low-rank adapters on the frozen model (book appendix E)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    random_init: bool = False  # random weights instead of pretrained (tests, benchmarks)
    config_overrides: dict[str, Any] = field(default_factory=dict)  # random-init shape changes
    overwrite: bool = False  # replace an existing run
    resume: bool = False  # continue an interrupted run from its newest checkpoint
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self) -> None:
        self.out = require_out(self.out)
        check_finetune(self.finetune)
        self.max_length = parse_max_length(self.max_length)

    def max_length_within(self, context_length: int, longest: int, cap: int | None = None) -> int:
        """Tokens per example: `max_length` when it is a number (checked against the model's
        context), else the `longest` example's length, capped at the task's default `cap` unless
        the options say LONGEST; never more than the context."""
        if isinstance(self.max_length, int):
            if self.max_length > context_length:
                raise LlmftError(f"--max-length {self.max_length} exceeds the model's context of {context_length} "
                                 "tokens")
            return self.max_length
        if cap is not None and self.max_length is None:
            longest = min(longest, cap)
        return min(longest, context_length)

    def inputs(self) -> list[Path]:
        """The files this run reads: the run directory must never replace one of them."""
        return existing_paths(self.model, self.data)

    @contextmanager
    def run_directory(self) -> Iterator[RunDir]:
        """The run being made: rank 0 creates it (`create_run`); under torchrun the other ranks
        get its staging folder, to read checkpoints from, and write nothing."""
        if world().is_main:
            with create_run(self.out, self.overwrite, self.inputs(), resume=self.resume) as run:
                yield run
        else:
            yield RunDir(staging_path(self.out))

    def checkpoints(self, run: RunDir) -> Checkpoints:
        """The training checkpoints of `run` (its staging folder), as these options ask. They
        record the global batch (`--batch-size` per device times the processes), which a resumed
        run must share, so a run resumes at another world size with the same global batch."""
        record = self.record()
        record["train"]["batch_size"] *= world().size
        return Checkpoints(run.file(RunDir.CHECKPOINTS), self.train.checkpoint_every, self.train.keep_checkpoints,
                           record, resume=self.resume)

    def record(self) -> dict[str, Any]:
        """The options as JSON values, for run.json."""
        return {**asdict(self), "out": str(self.out)}


def parse_max_length(value: int | str | None) -> int | str | None:
    """`--max-length` as given: a number of tokens (at least 1, a string of digits too), LONGEST,
    or None."""
    if value is None or value == LONGEST:
        return value
    if isinstance(value, str) and value.strip().removeprefix("-").isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise LlmftError(f"--max-length must be a number of tokens or {LONGEST!r}, got {value!r}")
    if value < 1:
        raise LlmftError(f"--max-length must be at least 1, got {value}")
    return value


def recorded_options(config: Path | str, options_class: type, task: str, command: str) -> dict[str, Any]:
    """The options a run was made with (`RunMeta.options` of a run.json, or of a run directory's),
    less COMMAND_FIELDS: what `--config` starts from."""
    path = Path(config)
    path = RunDir(path).file(RunDir.META) if path.is_dir() else path
    meta = RunMeta.from_dict(read_json(path), str(path))
    expect_task(meta, task, path, f"{command} --config")
    known = {f.name for f in fields(options_class)}
    unknown = sorted(set(meta.options) - known)
    if not meta.options or unknown:
        raise LlmftError(f"--config {path}: " + (f"option {unknown[0]!r} is not one of {command}'s" if unknown else
                                                 "records no options to rerun"))
    return {name: value for name, value in meta.options.items() if name not in COMMAND_FIELDS}


def existing_paths(*specs: str | None) -> list[Path]:
    """The specs that name existing files or folders."""
    return [Path(spec) for spec in specs if spec and Path(spec).exists()]
