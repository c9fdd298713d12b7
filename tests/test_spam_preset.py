"""`classify train --preset spam-quality`: the preset's flags are applied, a flag given on the
command line still wins, and without a preset the book-faithful defaults stay (no training:
the pipeline is replaced by one that records its options)."""

from __future__ import annotations

import pytest

import llmft.pipelines.classification as classification
from llmft.cli import main
from llmft.pipelines.presets import CLASSIFY_PRESETS, classify_preset
from llmft.errors import LlmftError

FAKE_RESULTS = {"train_accuracy": 1.0, "validation_accuracy": 1.0, "test_accuracy": 1.0}


@pytest.fixture
def trained(monkeypatch):
    """The options each `classify train` call would have trained with."""
    seen = []

    def fake_train(opts):
        seen.append(opts)
        return FAKE_RESULTS

    monkeypatch.setattr(classification, "train_classifier", fake_train)
    return seen


def train(tmp_path, *flags: str) -> int:
    return main(["classify", "train", "--out", str(tmp_path / "run"), *flags])


def test_preset_sets_its_flags(tmp_path, trained):
    assert train(tmp_path, "--preset", "spam-quality") == 0
    opts = trained[0]
    preset = CLASSIFY_PRESETS["spam-quality"]
    assert opts.model == preset["model"] == "gemma3-270m"
    assert opts.trainable == preset["trainable"]
    assert opts.train.epochs == preset.get("epochs", 5) and opts.train.lr == preset.get("lr", 5e-5)
    assert opts.class_token == preset.get("class_token", "last")


def test_flags_on_the_command_line_override_the_preset(tmp_path, trained):
    assert train(tmp_path, "--preset", "spam-quality", "--model", "smollm2-135m-instruct",
                 "--trainable", "last-block", "--lr", "1e-4") == 0
    opts = trained[0]
    assert (opts.model, opts.trainable, opts.train.lr) == ("smollm2-135m-instruct", "last-block", 1e-4)


def test_defaults_stay_book_faithful_without_a_preset(tmp_path, trained):
    assert train(tmp_path) == 0
    opts = trained[0]
    assert (opts.model, opts.trainable, opts.class_token, opts.finetune) == ("gpt2-small", "last-block", "last", "full")
    assert (opts.train.epochs, opts.train.lr) == (5, 5e-5)


def test_unknown_preset(tmp_path, trained, capsys):
    assert train(tmp_path, "--preset", "nope") == 2
    assert "nope" in capsys.readouterr().err and not trained
    with pytest.raises(LlmftError, match="not one of"):
        classify_preset("nope")
