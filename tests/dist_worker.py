"""What tests/test_distributed.py launches with torchrun: one tiny training run, options as JSON.
With "stop_after": N in them, every rank is asked to stop after optimizer step N, as a Ctrl-C
would (the run checkpoints and exits with 130)."""

import json
import sys

import torch

from llmft.errors import LlmftError
from llmft.pipelines.classification import ClassifyOptions, train_classifier
from llmft.pipelines.instruction import InstructOptions, train_instructions
from llmft.training import loop
from llmft.training.loop import TrainConfig

PIPELINES = {"classification": (ClassifyOptions, train_classifier), "instruction": (InstructOptions, train_instructions)}


def stop_after(n: int) -> None:
    step = loop._Loop.optimizer_step

    def optimizer_step(self):
        step(self)
        if self.step + 1 == n:
            self.interrupts.requested = True

    loop._Loop.optimizer_step = optimizer_step


if __name__ == "__main__":
    torch.set_num_threads(1)
    spec = json.loads(sys.argv[1])
    options, pipeline = PIPELINES[spec.pop("task")]
    if "stop_after" in spec:
        stop_after(spec.pop("stop_after"))
    try:
        pipeline(options(**{**spec, "train": TrainConfig(**spec["train"])}))
    except LlmftError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(e.exit_code)
