"""The peer benchmark's exporter and shared validation loss on a tiny random Llama: transformers
loads the folder whole (tokenizer included) and computes what llmft computes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from llmft.models import build_model
from llmft.tokenizers import HFTokenizer

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
ENTRIES = [{"instruction": "Name a colour.", "input": "", "output": "Blue."},
           {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},
           {"instruction": "Say hi.", "input": "", "output": "Hi!"}]


def byte_tokenizer() -> HFTokenizer:
    """Byte-level BPE without merges: every byte one token, plus an end-of-text token."""
    alphabet = sorted(tokenizers.pre_tokenizers.ByteLevel.alphabet())
    vocab = {c: i for i, c in enumerate(alphabet)}
    tok = tokenizers.Tokenizer(tokenizers.models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    tok.add_special_tokens(["<|end|>"])
    return HFTokenizer(tok, "<|end|>")


@pytest.fixture
def exported(tiny_llama_config, tmp_path: Path, monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    from hf_export import export_pretrained

    torch.manual_seed(0)
    tokenizer = byte_tokenizer()
    model = build_model(tiny_llama_config.with_(vocab_size=tokenizer.vocab_size)).eval()
    return model, tokenizer, export_pretrained(model, tokenizer, tmp_path / "hf")


def test_transformers_loads_the_folder_with_llmft_logits_and_ids(exported) -> None:
    from hf_export import logit_difference, tokenizer_matches

    model, tokenizer, folder = exported
    assert tokenizer_matches(tokenizer, folder, ["Hello, world! 123", "a<|end|>b"])
    assert logit_difference(model, folder, tokenizer.encode("Hello there")) < 1e-4
    classifier = transformers.AutoModelForSequenceClassification.from_pretrained(folder, num_labels=2)
    assert classifier.config.pad_token_id == tokenizer.eos_id


def test_validation_loss_is_the_same_through_both_libraries(exported) -> None:
    from peer_jobs import validation_losses

    model, tokenizer, folder = exported
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    ours = validation_losses(model.hidden_states, model.out_head, ENTRIES, tokenizer)
    theirs = validation_losses(lambda ids: hf.model(input_ids=ids).last_hidden_state, hf.lm_head, ENTRIES, tokenizer)
    assert ours["val_targets_all"] > ours["val_targets_response"] > 0
    for key in ("val_loss_all", "val_loss_response"):
        assert ours[key] == pytest.approx(theirs[key], abs=1e-5)
    # The token mean over the split: one batch holding every entry gives the loss of all its targets.
    with torch.no_grad():
        from llmft.data.instruction import InstructionDataset, collate_instruction
        from peer_jobs import alpaca

        data = InstructionDataset(ENTRIES, tokenizer, alpaca())
        batch = collate_instruction([data[i] for i in range(len(data))], tokenizer.eos_id)
        expected = torch.nn.functional.cross_entropy(model(batch["input_ids"]).flatten(0, 1), batch["targets"].flatten())
    assert ours["val_loss_all"] == pytest.approx(expected.item(), abs=1e-5)
