"""What tests/test_distributed.py launches with torchrun: one tiny training run, options as JSON."""

import json
import sys

import torch

from llmft.pipelines.classification import ClassifyOptions, train_classifier
from llmft.pipelines.instruction import InstructOptions, train_instructions
from llmft.training.loop import TrainConfig

PIPELINES = {"classification": (ClassifyOptions, train_classifier), "instruction": (InstructOptions, train_instructions)}

if __name__ == "__main__":
    torch.set_num_threads(1)
    spec = json.loads(sys.argv[1])
    options, pipeline = PIPELINES[spec.pop("task")]
    pipeline(options(**{**spec, "train": TrainConfig(**spec["train"])}))
