"""`llmft merge` with several runs: the uniform weight average ("model soup") of instruction runs
fine-tuned from one base on the same split, LoRA runs folded first; runs that differ in what
they were trained on or for are refused with one line naming the file and field."""

from __future__ import annotations

import json

import pytest
import safetensors.torch
import torch

from llmft.checkpoint import load_finetuned
from llmft.cli import main
from llmft.pipelines.instruction import InstructOptions, train_instructions
from llmft.training.lora import LoRAConfig, merge_lora
from llmft.training.loop import TrainConfig
from tests.helpers import INSTRUCTIONS

TINY = {"n_layers": 2, "emb_dim": 64, "n_heads": 4, "context_length": 256}


def train(out, data, seed, finetune="full", shuffle_split=False, **extra):
    train_instructions(InstructOptions(
        model="gpt2-small", data=str(data), out=out, random_init=True, config_overrides=TINY, max_length=64,
        finetune=finetune, lora=LoRAConfig(rank=4, alpha=8, targets=("attn", "mlp")), shuffle_split=shuffle_split,
        train=TrainConfig(epochs=1, lr=1e-3, eval_freq=5, eval_iter=1, device="cpu", seed=seed), **extra))
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two full runs (seeds 1, 2) and a LoRA run (seed 3) of one tiny random GPT-2 on the book's
    split of 40 entries (their random bases differ with the seed: the arithmetic is what is tested)."""
    tmp = tmp_path_factory.mktemp("soup")
    data = tmp / "slice.json"
    data.write_text(json.dumps(json.loads(INSTRUCTIONS.read_text())[:40]))
    return {"data": data, **{name: train(tmp / name, data, seed, finetune)
                             for name, seed, finetune in (("a", 1, "full"), ("b", 2, "full"), ("lora", 3, "lora"))}}


def folded_state(run):
    return merge_lora(load_finetuned(run)[0]).state_dict()  # a no-op without adapters


def test_the_average_of_full_and_lora_runs_is_their_mean_weight_by_weight(runs, tmp_path):
    soup = tmp_path / "soup"
    assert main(["merge", str(runs["a"]), str(runs["b"]), str(runs["lora"]), "--out", str(soup)]) == 0
    members = [folded_state(runs[name]) for name in ("a", "b", "lora")]
    assert not torch.equal(members[0]["blocks.0.attn.query.weight"], members[1]["blocks.0.attn.query.weight"])
    averaged = safetensors.torch.load_file(str(soup / "model.safetensors"))
    for name, tensor in averaged.items():
        expected = sum(m[name].double() for m in members) / 3
        assert torch.equal(tensor, expected.float()), name  # float64 sum, one rounding to float32
    meta = json.loads((soup / "run.json").read_text())
    assert meta["merged_from"] == {"runs": [str(runs[n].resolve()) for n in ("a", "b", "lora")], "average": "uniform"}
    assert meta["lora"] is None and meta["prompt_style"] == "alpaca"
    assert sorted(p.name for p in soup.iterdir()) == ["model.safetensors", "run.json", "test.json", "tokenizer",
                                                      "train.json", "validation.json"]  # no member's metrics
    assert (soup / "test.json").read_bytes() == (runs["a"] / "test.json").read_bytes()
    assert main(["instruct", "respond", str(soup), "--split", "test", "--max-new-tokens", "3"]) == 0


def test_a_run_averaged_with_itself_is_bit_identical(runs, tmp_path):
    soup = tmp_path / "soup"
    assert main(["merge", str(runs["a"]), str(runs["a"]), "--out", str(soup)]) == 0
    same = safetensors.torch.load_file(str(runs["a"] / "model.safetensors"))
    assert all(torch.equal(t, same[k]) for k, t in safetensors.torch.load_file(str(soup / "model.safetensors")).items())


def test_runs_on_other_splits_or_prompts_are_refused_naming_the_file(runs, tmp_path, capsys):
    shuffled = train(tmp_path / "shuffled", runs["data"], 1, shuffle_split=True)  # seed 1 like "a"
    assert main(["merge", str(runs["a"]), str(shuffled), "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert f"{shuffled / 'train.json'}: differs from {runs['a'] / 'train.json'}" in err and "Traceback" not in err
    chatml = train(tmp_path / "chatml", runs["data"], 1, prompt_style="chatml")
    assert main(["merge", str(runs["a"]), str(chatml), "--out", str(tmp_path / "y")]) == 2
    assert "field 'prompt_style' is 'chatml'" in capsys.readouterr().err
    assert main(["merge", str(runs["a"]), "--out", str(tmp_path / "z")]) == 2  # one full run: nothing to do
    assert "not a LoRA run" in capsys.readouterr().err
    assert not any((tmp_path / n).exists() for n in "xyz")


def test_classifiers_of_one_split_average_into_a_classifier_that_evaluates(tmp_path, capsys):
    """Two tiny spam classifiers of one seed (same split, head init and data order) at two
    learning rates average into a third whose weights, head included, are their mean; one with
    another class token is refused."""
    from llmft.pipelines.classification import ClassifyOptions, train_classifier
    from tests.helpers import SMS

    def classifier(name, lr, class_token="last"):
        train_classifier(ClassifyOptions(
            model="gpt2-small", data=str(SMS), out=tmp_path / name, random_init=True, config_overrides=TINY,
            class_token=class_token, train_accuracy=False,
            train=TrainConfig(epochs=1, lr=lr, eval_freq=1000, device="cpu")))
        return tmp_path / name

    a, b = classifier("a", 1e-3), classifier("b", 2e-3)
    assert main(["merge", str(a), str(b), "--out", str(tmp_path / "soup")]) == 0
    members = [folded_state(a), folded_state(b)]
    averaged = safetensors.torch.load_file(str(tmp_path / "soup" / "model.safetensors"))
    head = "backbone.out_head.weight"  # the new classification head
    assert head in averaged and not torch.equal(members[0][head], members[1][head])
    for name, tensor in averaged.items():
        assert torch.equal(tensor, ((members[0][name].double() + members[1][name].double()) / 2).float()), name
    assert main(["classify", "eval", str(tmp_path / "soup")]) == 0
    assert "Test accuracy:" in capsys.readouterr().out
    mean = classifier("mean", 1e-3, class_token="mean")
    assert main(["merge", str(a), str(mean), "--out", str(tmp_path / "x")]) == 2
    assert "field 'class_token' is 'mean'" in capsys.readouterr().err and not (tmp_path / "x").exists()
