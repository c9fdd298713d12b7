"""The tasks a run can be trained for: what each adds to the base model and what it records.

Adding a task means one entry here, its pipeline (`llmft.pipelines`) and its CLI commands.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from torch import nn

from llmft.errors import LlmftError
from llmft.data.classification import check_truncate
from llmft.models.transformer import DecoderLM
from llmft.training.heads import SequenceClassifier, check_class_token

if TYPE_CHECKING:
    from llmft.rundir import RunMeta


@dataclass(frozen=True)
class TaskSpec:
    name: str
    trained_with: str  # the command that makes such a run, for messages
    meta_fields: tuple[str, ...]  # RunMeta fields this task needs
    new_modules: tuple[str, ...]  # modules the task adds to the base (saved beside LoRA adapters)
    build: Callable[[DecoderLM, RunMeta], nn.Module]  # the trained module around a base model
    check: Callable[[RunMeta, str], None] | None = None  # task-specific run.json checks


def _check_classifier(meta: RunMeta, source: str) -> None:
    check_class_token(meta.class_token, f"{source}: field 'class_token'")
    check_truncate(meta.truncate, f"{source}: field 'truncate'")
    if len(meta.labels) < 2:
        raise LlmftError(f"{source}: field 'labels' needs at least two classes, got {meta.labels}")


def _classifier(backbone: DecoderLM, meta: RunMeta) -> nn.Module:
    return SequenceClassifier(backbone, len(meta.labels), meta.class_token)


def _language_model(backbone: DecoderLM, meta: RunMeta) -> nn.Module:
    return backbone


TASKS = {
    "classification": TaskSpec("classification", "llmft classify train", ("labels", "class_token"),
                               ("backbone.out_head",), _classifier, check=_check_classifier),
    "instruction": TaskSpec("instruction", "llmft instruct train", ("prompt_style",), (), _language_model),
}


def check_meta(meta: RunMeta, source: str) -> None:
    """The task-specific part of validating run.json."""
    if meta.task not in TASKS:
        raise LlmftError(f"{source}: field 'task' is {meta.task!r}, expected one of {', '.join(TASKS)}")
    for name in TASKS[meta.task].meta_fields:
        if getattr(meta, name) is None:
            raise LlmftError(f"{source}: missing field {name!r} (needed by a {meta.task} run)")
    if TASKS[meta.task].check:
        TASKS[meta.task].check(meta, source)
    if meta.max_length < 1:
        raise LlmftError(f"{source}: field 'max_length' must be at least 1, got {meta.max_length}")


def expect_task(meta: RunMeta, task: str, run: object, command: str) -> None:
    """Fail with what the run is when a command needs another kind of run."""
    if meta.task != task:
        raise LlmftError(f"{run}: this run's task is {meta.task!r} (made by {TASKS[meta.task].trained_with}); "
                         f"{command} needs a {task!r} run (made by {TASKS[task].trained_with})")
