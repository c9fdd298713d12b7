"""What every training pipeline takes: the model, the data, the run directory, how to fine-tune.

Options are validated when they are made, so a bad value fails before any work; the pipelines
never change them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from llmft.errors import LlmftError
from llmft.rundir import RunDir, require_out
from llmft.training.resume import Checkpoints
from llmft.training.lora import LoRAConfig, check_finetune
from llmft.training.loop import TrainConfig


@dataclass(kw_only=True)
class RunOptions:
    model: str  # registry name, Hugging Face folder or .gguf file
    data: str  # data set name or file
    out: Path  # the run directory to create
    max_length: int | None = None  # tokens per example; each task has its own default
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
        if self.max_length is not None and self.max_length < 1:
            raise LlmftError(f"--max-length must be at least 1, got {self.max_length}")

    def max_length_within(self, context_length: int, default: int) -> int:
        """`max_length`, or `default`, checked against the model's context."""
        if self.max_length is not None and self.max_length > context_length:
            raise LlmftError(f"--max-length {self.max_length} exceeds the model's context of {context_length} tokens")
        return self.max_length or min(default, context_length)

    def inputs(self) -> list[Path]:
        """The files this run reads: the run directory must never replace one of them."""
        return existing_paths(self.model, self.data)

    def checkpoints(self, run: RunDir) -> Checkpoints:
        """The training checkpoints of `run` (its staging folder), as these options ask."""
        return Checkpoints(run.file(RunDir.CHECKPOINTS), self.train.checkpoint_every, self.train.keep_checkpoints,
                           self.record(), resume=self.resume)

    def record(self) -> dict[str, Any]:
        """The options as JSON values, for run.json."""
        return {**asdict(self), "out": str(self.out)}


def existing_paths(*specs: str | None) -> list[Path]:
    """The specs that name existing files or folders."""
    return [Path(spec) for spec in specs if spec and Path(spec).exists()]
