"""What several test modules share: where the real data is, the smallest training task, and llmft's
model on a Hugging Face folder's weights."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("LLMFT_DATA_DIR", "").split(os.pathsep)[0] or ROOT.parent / "shared" / "data")
SMS = DATA / "sms-spam-collection" / "SMSSpamCollection"
INSTRUCTIONS = DATA / "instruction-data" / "instruction-data.json"
GPT2_BPE = DATA / "gpt2-tokenizer"


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


def write_slices(root: Path, sms_lines: int, instructions: int) -> Path:
    """`root/spam.tsv` (the first SMS lines) and `root/sft.json` (the first instruction entries)."""
    (root / "spam.tsv").write_text("\n".join(SMS.read_text(encoding="utf-8").splitlines()[:sms_lines]) + "\n",
                                   encoding="utf-8")
    (root / "sft.json").write_text(json.dumps(json.loads(INSTRUCTIONS.read_text())[:instructions]))
    return root


def ours_from_folder(folder: Path, **overrides) -> torch.nn.Module:
    """llmft's model on a Hugging Face folder's config (with `overrides`, e.g. drop_rate=0.0) and
    weights, in eval mode."""
    from llmft.models import build_model
    from llmft.weights.huggingface import load_hf_folder

    cfg, state = load_hf_folder(folder)
    model = build_model(cfg.with_(**overrides))
    model.load_state_dict(state)
    return model.eval()
