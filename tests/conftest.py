"""Shared fixtures: the real data ($LLMFT_DATA_DIR, else ../shared/data), tiny model configs, no network."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from llmft.models import get_config

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("LLMFT_DATA_DIR", "").split(os.pathsep)[0] or ROOT.parent / "shared" / "data")
SMS = DATA / "sms-spam-collection" / "SMSSpamCollection"
INSTRUCTIONS = DATA / "instruction-data" / "instruction-data.json"
GPT2_BPE = DATA / "gpt2-tokenizer"

# Never touch the network from tests: hub calls fail fast instead of hanging.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("LLMFT_DATA_DIR", str(DATA))
# One thread: the test models are small, and with two threads on a 2-core machine any other
# busy process makes every op wait for a descheduled thread (20x slower measured here).
torch.set_num_threads(1)


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


class NextTokenTask:
    """The smallest task the training loop accepts: next-token loss on batches {"x": ids}."""

    seen_unit = "tokens"

    def loss(self, model, batch):
        logits = model(batch["x"][:, :-1])
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch["x"][:, 1:].flatten())

    def count_seen(self, batch):
        return batch["x"].numel()

    def on_epoch_end(self, model, epoch):
        return {}
