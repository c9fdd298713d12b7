"""Fixtures: the real data ($LLMFT_DATA_DIR, else ../shared/data), tiny model configs, no network."""

from __future__ import annotations

import os

import pytest
import torch

from llmft.models import get_config
from tests.helpers import DATA, GPT2_BPE

# Never touch the network from tests: hub calls fail fast instead of hanging.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("LLMFT_DATA_DIR", str(DATA))
# One thread: the test models are small, and with two threads on a 2-core machine any other
# busy process makes every op wait for a descheduled thread.
torch.set_num_threads(1)


def pytest_xdist_auto_num_workers(config) -> int:
    """`-n auto` (pyproject.toml): one worker per CPU this process may use, at most 4 (each
    holds its own torch and, for some files, real models)."""
    usable = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else range(os.cpu_count() or 1)
    return min(4, len(usable))


@pytest.fixture(scope="session")
def gpt2_tokenizer():
    from llmft.tokenizers import GPT2Tokenizer

    return GPT2Tokenizer(GPT2_BPE / "encoder.json", GPT2_BPE / "vocab.bpe")


@pytest.fixture
def tiny_gpt2_config():
    return get_config("gpt2-small").with_(name="tiny-gpt2", n_layers=2, emb_dim=64, n_heads=4,
                                          context_length=128, hidden_dim=0)


@pytest.fixture
def tiny_llama_config():
    return get_config("smollm2-135m").with_(name="tiny-llama", n_layers=2, emb_dim=64, n_heads=4, n_kv_heads=2,
                                            hidden_dim=96, head_dim=0, context_length=128)
