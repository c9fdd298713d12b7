"""Preference tuning (DPO) on tiny random GPT-2s and the book's preference data: the loss against
the notebook's two-model computation, the cached reference against recomputing it, LoRA's
reference, the command end to end from each kind of start, and bad data."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from torch import nn

from llmft.cli import main
from llmft.data.instruction import load_instruction_data, split_instruction_data
from llmft.data.preference import (
    PREFERENCE_DATA_NAME, PreferenceDataset, PreferenceKeys, collate_preference, load_preference_data,
    split_preference_data,
)
from llmft.errors import LlmftError
from llmft.pipelines.instruction import InstructionTask, InstructOptions, train_instructions
from llmft.pipelines.preference import (
    PreferenceOptions, PreferenceTask, cached_loaders, evaluated, preference_loader, reference_batches,
    sequence_logprobs, train_preferences,
)
from llmft.prompts import get_prompt_style
from llmft.training import loop
from llmft.training.distributed import TaskModule
from llmft.training.lora import LoRAConfig, adapters_disabled, apply_lora, lora_layers
from llmft.training.loop import TrainConfig, seed_everything, train
from llmft.errors import Interrupted
from llmft.weights import load_pretrained
from tests.helpers import DATA, INSTRUCTIONS

TINY = {"n_layers": 2, "emb_dim": 64, "n_heads": 4, "context_length": 256}
PAIRS = DATA / "instruction-data" / "instruction-data-with-preference.json"
CPU = torch.device("cpu")
LN2 = torch.tensor(math.log(2)).item()  # ln 2 in float32, as the loss computes it
MAX_LENGTH = 64


@pytest.fixture(scope="module")
def entries():
    return json.loads(PAIRS.read_text())[:40]  # no pair with identical responses among these


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory, entries):
    path = tmp_path_factory.mktemp("pairs") / "pairs.json"
    path.write_text(json.dumps(entries[:24]))  # 20 train, 2 validation, 2 test
    return path


@pytest.fixture(scope="module")
def tiny():
    seed_everything(0)
    pretrained = load_pretrained("gpt2-small", random_init=True, overrides={**TINY, "drop_rate": 0.0})
    return pretrained.model, pretrained.tokenizer


@pytest.fixture(scope="module")
def sft_runs(tmp_path_factory):
    """A full and a LoRA instruction run of a tiny GPT-2 (alpaca prompts)."""
    tmp = tmp_path_factory.mktemp("sft")
    data = tmp / "slice.json"
    data.write_text(json.dumps(json.loads(INSTRUCTIONS.read_text())[:40]))
    runs = {}
    for finetune in ("full", "lora"):
        runs[finetune] = tmp / finetune
        train_instructions(InstructOptions(
            model="gpt2-small", data=str(data), out=runs[finetune], random_init=True, config_overrides=TINY,
            max_length=MAX_LENGTH, finetune=finetune, lora=LoRAConfig(rank=4, alpha=8),
            train=TrainConfig(epochs=1, lr=1e-3, eval_freq=5, eval_iter=1, device="cpu")))
    return runs


def make_task(tokenizer, entry, reduction="mean", reference=None) -> PreferenceTask:
    sampler = InstructionTask(tokenizer, get_prompt_style("alpaca", tokenizer), entry, sample_tokens=2)
    return PreferenceTask(0.1, reduction, sampler, CPU, reference=reference)


def loaders(tokenizer, train_entries, val_entries, batch_size, model=None, reduction="mean"):
    """(training, validation) loaders; with `model`, their pairs carry its log-probabilities."""
    style = get_prompt_style("alpaca", tokenizer)
    datasets = {name: PreferenceDataset(entries, tokenizer, style, MAX_LENGTH)
                for name, entries in (("train", train_entries), ("validation", val_entries))}
    cfg = TrainConfig(batch_size=batch_size, device="cpu")
    if model is not None:
        return cached_loaders(model, datasets, tokenizer.eos_id, MAX_LENGTH, cfg, reduction, CPU)
    return tuple(preference_loader(datasets[name], tokenizer.eos_id, MAX_LENGTH, cfg, name == "train")
                 for name in ("train", "validation"))


def per_pair_terms(model, task, batches):
    """Every pair's loss and reward margin, `model` in eval mode."""
    losses, margins = zip(*evaluated(model, lambda b: task.terms(model, b), batches, CPU, "32"))
    return torch.cat(losses), torch.cat(margins)


# -- the notebook's computation, written out: two models, chosen and rejected run separately --

def notebook_logprobs(model, input_ids, targets, reduction):
    """The notebook's `compute_logprobs` on our shifted targets (-100 = not scored)."""
    logits = model(input_ids)
    mask = targets != -100
    log_probs = torch.log_softmax(logits, dim=-1)
    selected = torch.gather(log_probs, -1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1) * mask
    return selected.sum(-1) / mask.sum(-1) if reduction == "mean" else selected.sum(-1)


def notebook_dpo_loss(policy_model, reference_model, batch, beta, reduction):
    """The notebook's `compute_dpo_loss_batch`: (mean loss, reward margin)."""
    ids, targets = batch["input_ids"], batch["targets"]
    pc, pr = (notebook_logprobs(policy_model, ids[:, i], targets[:, i], reduction) for i in (0, 1))
    with torch.no_grad():
        rc, rr = (notebook_logprobs(reference_model, ids[:, i], targets[:, i], reduction) for i in (0, 1))
    losses = -nn.functional.logsigmoid(beta * ((pc - pr) - (rc - rr)))
    return losses.mean(), (pc - rc).mean() - (pr - rr).mean()


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_loss_is_ln2_and_every_margin_zero_before_the_first_update(tiny, entries, reduction):
    model, tokenizer = tiny
    train_batches, val_batches = loaders(tokenizer, entries[:30], entries[30:], 4, model, reduction)
    task = make_task(tokenizer, entries[0], reduction)
    for batches, pairs in ((train_batches, 28), (reference_batches(train_batches), 30), (val_batches, 10)):
        losses, margins = per_pair_terms(model, task, batches)
        assert len(losses) == pairs
        assert torch.equal(losses, torch.full_like(losses, LN2)) and torch.equal(margins, torch.zeros_like(margins))
        metrics = task.eval_metrics(TaskModule(model, task), batches, None)
        assert metrics == {"loss": LN2, "reward_margin": 0.0, "reward_accuracy": 0.0}


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_loss_and_margins_match_the_notebooks_two_model_computation(tiny, entries, reduction):
    reference, tokenizer = tiny
    policy = copy.deepcopy(reference)
    train_batches, val_batches = loaders(tokenizer, entries[:16], entries[16:32], 4, policy, reduction)
    task = make_task(tokenizer, entries[0], reduction)
    train(policy, task, train_batches, val_batches, TrainConfig(epochs=1, batch_size=4, lr=1e-3, eval_freq=100,
                                                                eval_iter=1, device="cpu"), show_progress=False)
    policy.eval()
    compared = 0
    for batch in val_batches:
        ours = task.batch_metrics(policy, batch)
        loss, margin = notebook_dpo_loss(policy, reference, batch, 0.1, reduction)
        torch.testing.assert_close(ours[:2], torch.stack([loss, margin]), rtol=1e-5, atol=1e-6)
        compared += 1
    assert compared == 4 and task.eval_metrics(TaskModule(policy, task), val_batches, None)["reward_margin"] > 0


def test_one_step_raises_chosen_relative_to_rejected(tiny, entries):
    model, tokenizer = tiny
    policy = copy.deepcopy(model)
    train_batches, val_batches = loaders(tokenizer, entries[:8], entries[:8], 8, policy)
    task = make_task(tokenizer, entries[0])
    batch = next(iter(val_batches))
    before = evaluated(policy, lambda b: sequence_logprobs(policy, b), [batch], CPU, "32")[0]
    history = train(policy, task, train_batches, val_batches, TrainConfig(epochs=1, batch_size=8, lr=1e-4,
                                                                          eval_freq=1, eval_iter=1, device="cpu"),
                    show_progress=False)
    after = evaluated(policy, lambda b: sequence_logprobs(policy, b), [batch], CPU, "32")[0]
    assert len(history.steps) == 2  # before training, after the one step
    gain = (after[:, 0] - after[:, 1]) - (before[:, 0] - before[:, 1])
    assert gain.mean() > 0
    assert history.steps[0]["val_loss"] == LN2 and history.steps[1]["val_loss"] < LN2
    assert history.steps[1]["val_reward_margin"] > 0 and history.steps[1]["val_reward_accuracy"] > 0.5


def test_the_cached_reference_equals_recomputing_it_every_step(tiny, entries):
    base, tokenizer = tiny
    cfg = TrainConfig(epochs=2, batch_size=4, lr=1e-3, eval_freq=2, eval_iter=2, device="cpu")
    results = []
    for cached in (True, False):
        policy = copy.deepcopy(base)
        train_batches, val_batches = loaders(tokenizer, entries[:14], entries[14:22], 4, policy if cached else None)
        assert ("reference_logps" in next(iter(val_batches))) == cached
        task = make_task(tokenizer, entries[0], reference=None if cached else copy.deepcopy(base))
        seed_everything(7)
        history = train(policy, task, train_batches, val_batches, cfg, show_progress=False)
        results.append((history.steps, policy.state_dict()))
    (steps_a, weights_a), (steps_b, weights_b) = results
    assert steps_a == steps_b and len(steps_a) == 4
    assert weights_a.keys() == weights_b.keys() and all(torch.equal(weights_a[k], weights_b[k]) for k in weights_a)
    assert not torch.equal(weights_a["tok_emb.weight"], base.state_dict()["tok_emb.weight"])


def test_lora_reference_with_adapters_off_is_the_base_exactly(tiny, entries):
    base, tokenizer = tiny
    batch = next(iter(loaders(tokenizer, entries, entries, 4)[1]))
    expected = evaluated(base, lambda b: sequence_logprobs(base, b), [batch], CPU, "32")[0]
    adapted = copy.deepcopy(base)
    apply_lora(adapted, LoRAConfig(rank=4, alpha=8))
    with torch.no_grad():
        for layer in lora_layers(adapted).values():
            layer.lora.B.normal_()  # trained adapters: the model is no longer the base
    with_adapters = evaluated(adapted, lambda b: sequence_logprobs(adapted, b), [batch], CPU, "32")[0]
    with adapters_disabled(adapted):
        assert not lora_layers(adapted)
        off = evaluated(adapted, lambda b: sequence_logprobs(adapted, b), [batch], CPU, "32")[0]
    assert torch.equal(off, expected) and not torch.allclose(with_adapters, expected)
    again = evaluated(adapted, lambda b: sequence_logprobs(adapted, b), [batch], CPU, "32")[0]
    assert len(lora_layers(adapted)) == 13 and torch.equal(again, with_adapters)


def dpo_args(model, data, out, *extra):
    return ["instruct", "dpo", "--model", str(model), "--data", str(data), "--out", str(out), "--max-length",
            str(MAX_LENGTH), "--batch-size", "4", "--eval-freq", "2", "--eval-iter", "1", "--lr", "1e-3",
            "--device", "cpu", *extra]


def test_cli_from_an_sft_run_then_respond_and_generate(sft_runs, pairs_file, tmp_path, capsys):
    out = tmp_path / "dpo"
    assert main(dpo_args(sft_runs["full"], pairs_file, out)) == 0
    printed = capsys.readouterr().out
    assert "reward margin 0.000 ->" in printed and f"run saved to {out}" in printed
    meta = json.loads((out / "run.json").read_text())
    sft_meta = json.loads((sft_runs["full"] / "run.json").read_text())
    assert meta["task"] == "instruction" and meta["prompt_style"] == sft_meta["prompt_style"] == "alpaca"
    assert meta["model"] == sft_meta["model"] and meta["lora"] is None
    assert meta["options"]["beta"] == 0.1 and meta["options"]["logprob_reduction"] == "mean"
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["val_loss"] == LN2 and rows[0]["val_reward_margin"] == 0.0
    assert {"train_reward_margin", "val_reward_accuracy", "examples_seen"} <= rows[0].keys()
    assert rows[-1]["examples_seen"] == rows[-1]["step"] * 4
    epochs = [json.loads(line) for line in (out / "epochs.jsonl").read_text().splitlines()]
    assert len(epochs) == 1 and "sample" in epochs[0]
    for name in ("loss", "reward-margin", "reward-accuracy"):
        assert (out / f"{name}.png").is_file() and (out / f"{name}.pdf").is_file()
    results = json.loads((out / "results.json").read_text())
    assert results["full_val_loss_before"] == LN2 and results["full_val_reward_margin_after"] != 0
    assert results["pairs_skipped_same_responses"] == 0 and results["source"].startswith("run:")
    assert [len(json.loads((out / f"{s}.json").read_text())) for s in ("train", "validation", "test")] == [20, 2, 2]
    assert main(["instruct", "respond", str(out), "--split", "test", "--max-new-tokens", "4"]) == 0
    responses = json.loads((out / "test-responses.json").read_text())
    assert len(responses) == 2 and all(isinstance(e["model_response"], str) for e in responses)
    assert main(["generate", str(out), "Name a color.", "--max-new-tokens", "3"]) == 0


def test_lora_from_a_model_spec_a_lora_run_and_a_full_run(sft_runs, pairs_file, tmp_path, capsys):
    fresh = tmp_path / "fresh"
    train_preferences(PreferenceOptions(
        model="gpt2-small", random_init=True, config_overrides=TINY, data=str(pairs_file), out=fresh,
        max_length=MAX_LENGTH, finetune="lora", lora=LoRAConfig(rank=2, alpha=4),
        train=TrainConfig(batch_size=4, lr=1e-3, eval_freq=4, eval_iter=1, device="cpu")))
    meta = json.loads((fresh / "run.json").read_text())
    assert meta["lora"]["rank"] == 2 and meta["model"] == "gpt2-small"
    continued = tmp_path / "continued"
    assert main(dpo_args(sft_runs["lora"], pairs_file, continued, "--finetune", "lora")) == 0
    meta = json.loads((continued / "run.json").read_text())
    assert meta["lora"] == json.loads((sft_runs["lora"] / "run.json").read_text())["lora"]
    rows = [json.loads(line) for line in (continued / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["val_loss"] == LN2  # the reference is the LoRA run as it was, adapters on
    merged = tmp_path / "merged"
    assert main(["merge", str(continued), "--out", str(merged)]) == 0
    assert main(["generate", str(merged), "Name a color.", "--max-new-tokens", "3"]) == 0
    full = tmp_path / "full-from-lora"
    assert main(dpo_args(sft_runs["lora"], pairs_file, full)) == 0
    assert json.loads((full / "run.json").read_text())["lora"] is None
    on_full_run = tmp_path / "lora-on-full-run"
    assert main(dpo_args(sft_runs["full"], pairs_file, on_full_run, "--finetune", "lora", "--lora-rank", "2")) == 0
    meta = json.loads((on_full_run / "run.json").read_text())
    assert meta["lora"] is None and meta["options"]["finetune"] == "lora"  # saved merged
    rows = [json.loads(line) for line in (on_full_run / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["val_loss"] == LN2 and rows[-1]["val_loss"] != LN2
    assert main(["generate", str(on_full_run), "Name a color.", "--max-new-tokens", "3"]) == 0


def test_an_interrupted_run_resumes_bit_for_bit(sft_runs, pairs_file, tmp_path, monkeypatch):
    def options(out, **kw):
        return PreferenceOptions(model=str(sft_runs["full"]), data=str(pairs_file), out=out, max_length=MAX_LENGTH,
                                 train=TrainConfig(epochs=1, batch_size=4, lr=1e-3, eval_freq=2, eval_iter=1,
                                                   device="cpu", checkpoint_every=2), **kw)

    train_preferences(options(tmp_path / "whole"))
    step = loop._Loop.optimizer_step

    def stop_after_step_3(self):
        step(self)
        if self.step + 1 == 3:
            self.interrupts.requested = True

    monkeypatch.setattr(loop._Loop, "optimizer_step", stop_after_step_3)
    with pytest.raises(Interrupted):
        train_preferences(options(tmp_path / "resumed"))
    monkeypatch.setattr(loop._Loop, "optimizer_step", step)
    train_preferences(options(tmp_path / "resumed", resume=True))
    for name in ("model.safetensors", "metrics.csv", "epochs.csv"):
        assert (tmp_path / "resumed" / name).read_bytes() == (tmp_path / "whole" / name).read_bytes(), name


BAD = [
    ('[{"instruction": "a", "chosen": "b"}]', ".json", "entry 0: missing key 'rejected'"),
    ('[{"instruction": "a", "chosen": "b", "rejected": 3}]', ".json",
     "entry 0: key 'rejected' must be a string, got int"),
    ('[{"instruction": "a", "chosen": " ", "rejected": "c"}]', ".json", "entry 0: empty 'chosen'"),
    ('[{"instruction": "a", "input": null, "chosen": "b", "rejected": "c"}]', ".json",
     "entry 0: key 'input' must be a string, got NoneType"),
    ("[1]", ".json", "entry 0: expected an object, got int"),
    ('{"instruction": "a", "chosen": "b", "rejected": "c"}\n{"instruction": "a", "chosen": "b"}\n', ".jsonl",
     "entry 1 (line 2): missing key 'rejected'"),
    ("[]", ".json", "no entries"),
]


@pytest.mark.parametrize("text,suffix,message", BAD)
def test_bad_entries_are_one_line_errors(tmp_path, capsys, text, suffix, message):
    bad = tmp_path / f"bad{suffix}"
    bad.write_text(text)
    with pytest.raises(LlmftError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_preference_data(bad)
    assert main(["instruct", "dpo", "--random-init", "--model", "gpt2-small", "--data", str(bad),
                 "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and not (tmp_path / "r").exists()


def test_bad_options_are_one_line_errors(sft_runs, pairs_file, tmp_path, capsys):
    cases = [
        (["--beta", "0"], "--beta must be a positive number, got 0.0"),
        (["--chosen-key", "x", "--rejected-key", "x"], "--chosen-key and --rejected-key are both 'x'"),
        (["--prompt-style", "chatml"], "was trained with prompt style 'alpaca'"),
        (["--random-init"], "is a run directory, whose weights are the start"),
    ]
    for extra, message in cases:
        assert main(dpo_args(sft_runs["full"], pairs_file, tmp_path / "r", *extra)) == 2, extra
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, (extra, err)
    assert not (tmp_path / "r").exists()


def test_under_torchrun_it_says_it_runs_on_one_process(sft_runs, pairs_file, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(dpo_args(sft_runs["full"], pairs_file, tmp_path / "r")) == 2
    assert "instruct dpo runs on one process; launch it without torchrun" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_other_key_names(tmp_path):
    data = tmp_path / "pairs.jsonl"
    data.write_text('{"prompt": "Say hi", "good": "Hello!", "bad": "Go away."}\n')
    [entry] = load_preference_data(data, PreferenceKeys(instruction="prompt", chosen="good", rejected="bad"))
    assert (entry["instruction"], entry["input"], entry["chosen"], entry["rejected"], entry["output"]) == \
        ("Say hi", "", "Hello!", "Go away.", "Hello!")


def test_identical_pairs_are_skipped_and_counted():
    entries = load_preference_data(PREFERENCE_DATA_NAME)
    assert len(entries) == 1100
    for shuffle in (True, False):
        splits, skipped = split_preference_data(entries, 123, shuffle=shuffle)
        assert skipped == 6 and sum(map(len, splits)) == 1094
        assert all(e["chosen"] != e["rejected"] for split in splits for e in split)
    book = split_instruction_data(entries, shuffle=False)
    assert [len(s) for s in book] == [935, 55, 110]
    # The seeded split partitions the instructions as instruction tuning's does on the book's file.
    sft = split_instruction_data(load_instruction_data(INSTRUCTIONS), 123)
    splits, _ = split_preference_data(entries, 123)
    assert {e["instruction"] for e in splits.test} <= {e["instruction"] for e in sft.test}


def test_batches_mask_the_prompt_and_score_the_response_and_end_of_text(tiny, entries):
    _, tokenizer = tiny
    batches = loaders(tokenizer, entries[:3], entries[:3], 3)[1]
    batch = next(iter(batches))
    assert batch["input_ids"].shape[:2] == (3, 2) and batch["targets"].shape == batch["input_ids"].shape
    for i, pair in enumerate(batches.dataset.pairs):
        for side, item in enumerate(pair):
            targets = batch["targets"][i, side]
            expected = (item["input_ids"] + [tokenizer.eos_id])[item["prompt_len"]:MAX_LENGTH + 1]
            assert targets[targets != -100].tolist() == expected


def test_an_end_of_text_id_inside_the_text_stays_scored():
    """Chat templates end turns with the tokenizer's end-of-text id (SmolLM2's <|im_end|>)."""
    pair = {"chosen": {"input_ids": [5, 2, 6, 7, 2], "prompt_len": 3},
            "rejected": {"input_ids": [5, 2, 6, 8], "prompt_len": 3}}
    batch = collate_preference([pair], pad_token_id=2)
    assert batch["input_ids"].tolist() == [[[5, 2, 6, 7, 2], [5, 2, 6, 8, 2]]]
    assert batch["targets"].tolist() == [[[-100, -100, 7, 2, 2], [-100, -100, 8, 2, -100]]]
