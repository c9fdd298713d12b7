"""`--compile` compiles forward + loss into one graph; it must train exactly like eager."""

import copy

import pytest
import torch

from llmft.models import build_model
from llmft.training.loop import TrainConfig, train
from tests.helpers import NextTokenTask

pytestmark = pytest.mark.slow  # inductor compiles C++ on CPU: tens of seconds


def test_compiled_training_matches_eager(tiny_llama_config):
    torch.manual_seed(0)
    base = build_model(tiny_llama_config)
    batches = [{"x": torch.randint(0, 500, (4, 12))} for _ in range(3)]
    histories = []
    for compile in (False, True):
        model = copy.deepcopy(base)
        cfg = TrainConfig(epochs=1, lr=1e-2, eval_freq=1, eval_iter=1, device="cpu", compile=compile)
        histories.append([r["train_loss"] for r in train(model, NextTokenTask(), batches, batches, cfg, show_progress=False).steps])
    assert histories[1] == pytest.approx(histories[0], rel=1e-4)
