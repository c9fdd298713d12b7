"""Bad and unusual input across the CLI: one line naming what is wrong, exit code 2, nothing
written and nothing a user owns deleted. One row per case; the runs and files a row needs are
made once per module."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from llmft.cli import main
from llmft.pipelines.classification import ClassifyOptions, train_classifier
from llmft.pipelines.instruction import InstructOptions, train_instructions
from llmft.rundir import create_run
from llmft.training.loop import TrainConfig
from tests.helpers import INSTRUCTIONS, ROOT, SMS

TINY = {"n_layers": 1, "emb_dim": 32, "n_heads": 2, "context_length": 128}
QUICK = TrainConfig(epochs=1, batch_size=8, eval_freq=100, eval_iter=1, device="cpu")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A folder with a tiny classifier run, a tiny instruction run and data files, good and bad."""
    root = tmp_path_factory.mktemp("world")
    spam = root / "spam.tsv"
    spam.write_text("\n".join(SMS.read_text(encoding="utf-8").splitlines()[:120]) + "\n", encoding="utf-8")
    sft_data = root / "sft.json"
    sft_data.write_text(json.dumps(json.loads(INSTRUCTIONS.read_text())[:40]))
    train_classifier(ClassifyOptions(model="gpt2-small", data=str(spam), out=root / "clf", random_init=True,
                                     config_overrides=TINY, max_length=32, train=QUICK))
    train_instructions(InstructOptions(model="gpt2-small", data=str(sft_data), out=root / "sft", random_init=True,
                                       config_overrides=TINY, max_length=64, train=QUICK))
    files = {
        "extra.csv": "text,label\nhello,ham\nwin, now,spam\n",
        "header-only.csv": "text,label\n",
        "bom.csv": "\ufefftext,label\n" + "".join(f"text {i},{'ab'[i % 2]}\n" for i in range(30)),
        "object.json": json.dumps({"instruction": "a", "output": "b"}, indent=2),
        "two.csv": "text,label\na,x\nb,y\nc,x\nd,y\n",
        "list.json": "[1, 2]",
    }
    for name, text in files.items():
        (root / name).write_text(text, encoding="utf-8")
    (root / "folder").mkdir()
    (root / "folder" / "keep.txt").write_text("mine")
    (root / "file").write_text("a file")
    return root


def edit_run(world: Path, name: str, change) -> Path:
    """A copy of run `name` with one thing changed by `change(copy)`."""
    copy = world / f"{name}-edited-{len(list(world.iterdir()))}"
    shutil.copytree(world / name, copy)
    change(copy)
    return copy


def edit_meta(**changes):
    def change(run: Path) -> None:
        meta = json.loads((run / "run.json").read_text())
        for key, value in changes.items():
            if value is KeyError:
                del meta[key]
            else:
                meta[key] = value
        (run / "run.json").write_text(json.dumps(meta))
    return change


def weights(data: bytes | None):
    def change(run: Path) -> None:
        path = run / "model.safetensors"
        path.write_bytes(path.read_bytes()[:len(path.read_bytes()) // 2] if data is None else data)
    return change


TRAIN = ["classify", "train", "--random-init", "--data", "{w}/two.csv"]
RESPOND = ["instruct", "respond", "{w}/sft", "--device", "cpu"]

# (id, argv, phrase of the one-line error, paths that must exist afterwards, that must not)
CASES = [
    ("empty-out", [*TRAIN, "--out", ""], "--out is empty", [], []),
    ("out-dot", [*TRAIN, "--out", ".", "--overwrite"], "refusing to use this directory", ["{w}/spam.tsv"], []),
    ("out-dotdot", [*TRAIN, "--out", "..", "--overwrite"], "refusing to use this directory", ["{w}/spam.tsv"], []),
    ("out-root", [*TRAIN, "--out", "/", "--overwrite"], "refusing to use this directory", [], []),
    ("out-home", [*TRAIN, "--out", str(Path.home()), "--overwrite"], "refusing to use this directory", [], []),
    ("out-not-a-run", [*TRAIN, "--out", "{w}/folder", "--overwrite"], "is not an llmft run",
     ["{w}/folder/keep.txt"], []),
    ("out-is-the-data", [*TRAIN, "--out", "{w}/two.csv", "--overwrite"], "an input of this command", ["{w}/two.csv"], []),
    ("out-holds-the-data", ["classify", "train", "--random-init", "--data", "{w}/clf/train.csv", "--out", "{w}/clf",
                            "--overwrite"], "an input of this command", ["{w}/clf/run.json"], []),
    ("out-exists", [*TRAIN, "--out", "{w}/clf"], "already exists (pass --overwrite", ["{w}/clf/run.json"], []),
    ("out-parent-is-a-file", [*TRAIN, "--out", "{w}/file/run"], "is a file, not a directory", [], []),
    ("out-unwritable", [*TRAIN, "--out", "/proc/llmft-test/run"], "cannot create its folder", [], []),
    ("max-length-0", [*TRAIN, "--out", "{w}/r", "--max-length", "0"], "--max-length must be at least 1", [], ["{w}/r"]),
    ("max-length-negative", [*TRAIN, "--out", "{w}/r", "--max-length", "-3"], "--max-length must be at least 1", [],
     ["{w}/r"]),
    ("train-frac", [*TRAIN, "--out", "{w}/r", "--train-frac", "1.5"], "--train-frac 1.5", [], ["{w}/r"]),
    ("fracs-sum", [*TRAIN, "--out", "{w}/r", "--train-frac", "0.8", "--val-frac", "0.3"], "together below 1", [],
     ["{w}/r"]),
    ("empty-split", [*TRAIN, "--out", "{w}/r", "--no-balance"], "split is empty", [], ["{w}/r"]),
    ("extra-fields", ["classify", "train", "--random-init", "--data", "{w}/extra.csv", "--out", "{w}/r"],
     "extra.csv, line 3: 3 fields, but the header names 2", [], ["{w}/r"]),
    ("header-only", ["classify", "train", "--random-init", "--data", "{w}/header-only.csv", "--out", "{w}/r"],
     "has a header row but no data rows", [], ["{w}/r"]),
    ("data-is-a-folder", ["classify", "train", "--random-init", "--data", "{w}/folder", "--out", "{w}/r"],
     "is a directory, expected a data file", [], ["{w}/r"]),
    ("same-columns", [*TRAIN, "--out", "{w}/r", "--label-column", "text"], "both 'text'", [], ["{w}/r"]),
    ("json-object", ["instruct", "train", "--random-init", "--data", "{w}/object.json", "--out", "{w}/r"],
     "expected a JSON list of objects (or JSON Lines), got one object", [], ["{w}/r"]),
    ("neftune-alpha", ["instruct", "train", "--random-init", "--data", "{w}/sft.json", "--out", "{w}/r",
                       "--neftune-alpha", "-5"], "--neftune-alpha must be a positive number, got -5.0", [], ["{w}/r"]),
    ("average-tail", [*TRAIN, "--out", "{w}/r", "--average-tail", "1.5"],
     "--average-tail must be a fraction in (0, 1], got 1.5", [], ["{w}/r"]),
    ("average-tail-fsdp", [*TRAIN, "--out", "{w}/r", "--average-tail", "0.5", "--strategy", "fsdp"],
     "--average-tail: not with --strategy fsdp", [], ["{w}/r"]),
    ("no-cuda", [*TRAIN, "--out", "{w}/r", "--device", "cuda"], "this machine has no cuda device", [], ["{w}/r"]),
    ("bad-device", [*TRAIN, "--out", "{w}/r", "--device", "gpu0"], "not a device name", [], ["{w}/r"]),
    ("predict-on-sft", ["classify", "predict", "{w}/sft", "hello"], "task is 'instruction'", [], []),
    ("eval-on-sft", ["classify", "eval", "{w}/sft"], "classify eval needs a 'classification' run", [], []),
    ("respond-on-clf", ["instruct", "respond", "{w}/clf"], "task is 'classification'", [],
     ["{w}/clf/test-responses.json"]),
    ("generate-on-clf", ["generate", "{w}/clf", "hi"], "generating text needs a 'instruction' run", [], []),
    ("weights-truncated", ["classify", "predict", ("clf", weights(None)), "hi"], "not a readable safetensors file",
     [], []),
    ("weights-empty", ["classify", "predict", ("clf", weights(b"")), "hi"], "not a readable safetensors file", [], []),
    ("weights-random", ["classify", "predict", ("clf", weights(os.urandom(4096))), "hi"],
     "not a readable safetensors file", [], []),
    ("meta-missing-key", ["classify", "predict", ("clf", edit_meta(labels=KeyError)), "hi"],
     "missing field 'labels'", [], []),
    ("meta-wrong-type", ["classify", "predict", ("clf", edit_meta(max_length="32")), "hi"],
     "field 'max_length' must be int", [], []),
    ("meta-old", ["classify", "predict", ("clf", edit_meta(schema_version=KeyError)), "hi"],
     "field 'schema_version' is None", [], []),
    ("meta-unknown-task", ["classify", "predict", ("clf", edit_meta(task="regression")), "hi"],
     "field 'task' is 'regression'", [], []),
    ("meta-disagrees", ["classify", "predict", ("clf", edit_meta(labels=["a", "b", "c"])), "hi"],
     "field 'labels' makes it (3, 32)", [], []),
    ("meta-bad-config", ["classify", "predict", ("clf", edit_meta(model_config={"name": "x"})), "hi"],
     "field 'model_config': missing field 'architecture'", [], []),
    ("respond-max-new-tokens", [*RESPOND, "--max-new-tokens", "0"], "--max-new-tokens must be at least 1", [],
     ["{w}/sft/test-responses.json"]),
    ("respond-batch-size", [*RESPOND, "--batch-size", "0"], "--batch-size must be at least 1", [],
     ["{w}/sft/test-responses.json"]),
    ("respond-missing-folder", [*RESPOND, "--out", "{w}/nowhere/out.json"], "folder {w}/nowhere does not exist", [],
     ["{w}/nowhere"]),
    ("respond-onto-foreign-file", [*RESPOND, "--out", "{w}/list.json"], "exists, with no list.settings.json",
     ["{w}/list.json"], []),
    ("generate-max-new-tokens", ["generate", "{w}/sft", "hi", "--max-new-tokens", "0"],
     "--max-new-tokens must be at least 1", [], []),
]


def fill(value, world: Path) -> str:
    if isinstance(value, tuple):
        return str(edit_run(world, *value))
    return value.replace("{w}", str(world))


@pytest.mark.parametrize("argv, phrase, exist, absent", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_and_leaves_nothing(world, argv, phrase, exist, absent, capsys, monkeypatch):
    monkeypatch.chdir(world)
    before = sorted(p.name for p in world.iterdir())
    code = main([fill(a, world) for a in argv])
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert err.startswith("error: ") and "\n" not in err and fill(phrase, world) in err, err
    for path in exist:
        assert Path(fill(path, world)).exists(), path
    for path in absent:
        assert not Path(fill(path, world)).exists(), path
    assert (world / "folder" / "keep.txt").read_text() == "mine"
    left = sorted(p.name for p in world.iterdir())
    assert [n for n in left if n not in before and not n.startswith(("clf-edited", "sft-edited"))] == []


def test_respond_refuses_to_continue_a_file_made_for_other_settings(world, capsys):
    out = world / "answers.json"
    assert main([*[fill(a, world) for a in RESPOND], "--out", str(out), "--max-new-tokens", "2"]) == 0
    answered = out.read_text()
    assert main([*[fill(a, world) for a in RESPOND], "--out", str(out), "--max-new-tokens", "3"]) == 2
    assert "answers 2 for 'max_new_tokens' (answers.settings.json), this command asks for 3" in capsys.readouterr().err
    assert main([*[fill(a, world) for a in RESPOND], "--out", str(out), "--max-new-tokens", "2", "--split",
                 "validation"]) == 2
    assert "for 'entries'" in capsys.readouterr().err
    assert out.read_text() == answered


def test_a_utf8_byte_order_mark_is_read(world):
    from llmft.data.sources import read_labelled_texts

    pairs = read_labelled_texts(world / "bom.csv")
    assert pairs[0] == ("text 0", "a") and len(pairs) == 30


def test_labels_that_differ_in_case_and_texts_in_two_splits_are_reported():
    from llmft.data.classification import Splits, deduplicate, warn_about

    splits = Splits([("a", "ham"), ("b", "Ham"), ("c", "spam")], [("a", "ham"), ("d", "spam")], [("e", "spam")])
    assert warn_about(splits) == [
        "labels 'Ham', 'ham' differ only in case; they are trained as different classes",
        "1 of 2 validation texts also stand in the training split (--dedupe removes repeated texts before splitting)"]
    assert deduplicate([("a", "x"), ("b", "y"), ("a", "z")]) == [("a", "x"), ("b", "y")]


def test_a_lora_run_checks_its_base_from_anywhere(world, tmp_path, monkeypatch, capsys, gpt2_tokenizer):
    """A LoRA run records its base as an absolute path with a fingerprint of its weights: it
    loads from another folder, and a different model at that path is refused."""
    from llmft.models import build_model, get_config
    from llmft.pipelines.classification import predict
    from llmft.weights import export_hf

    base = tmp_path / "base"
    export_hf(build_model(get_config("gpt2-small").with_(**TINY)), base)
    gpt2_tokenizer.save(base)
    monkeypatch.chdir(tmp_path)
    train_classifier(ClassifyOptions(model="base", data=str(world / "spam.tsv"), out=tmp_path / "lora",
                                     finetune="lora", max_length=32, train=QUICK))
    meta = json.loads((tmp_path / "lora" / "run.json").read_text())
    assert meta["model"] == str(base) and len(meta["base_fingerprint"]) == 32
    monkeypatch.chdir(world)
    assert len(predict(tmp_path / "lora", ["hello"], device="cpu")) == 1
    export_hf(build_model(get_config("gpt2-small").with_(**TINY)), base)  # same shape, other weights
    assert main(["classify", "predict", str(tmp_path / "lora"), "hello"]) == 2
    assert "not the ones this run's adapter was trained on" in capsys.readouterr().err


# -- two writers, and a killed one ---------------------------------------------------------

def test_a_second_writer_of_the_same_run_fails_and_the_first_run_survives(world, tmp_path):
    out = tmp_path / "run"
    with create_run(out) as run:
        (run.path / "run.json").write_text("{}")
        second = subprocess.run([sys.executable, "-m", "llmft", "classify", "train", "--random-init",
                                 "--data", str(world / "two.csv"), "--out", str(out), "--overwrite"],
                                capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert second.returncode == 2
    assert second.stderr.strip().splitlines()[-1] == f"error: {out}: another llmft command is writing this run directory"
    assert (out / "run.json").read_text() == "{}"


def test_a_run_that_appears_meanwhile_is_not_replaced(tmp_path):
    from llmft.errors import LlmftError

    out = tmp_path / "run"
    with pytest.raises(LlmftError, match="appeared while this command ran; the finished run is kept in"):
        with create_run(out) as run:
            (run.path / "weights").write_text("new")
            out.mkdir()
            (out / "run.json").write_text("{}")
    assert (out / "run.json").read_text() == "{}"
    assert [p.read_text() for p in tmp_path.glob(".run.finished-*/weights")] == ["new"]


KILLED = textwrap.dedent("""
    import sys, time
    from llmft.rundir import create_run
    with create_run(sys.argv[1]) as run:
        (run.path / "half").write_text("x")
        print("staged", flush=True)
        time.sleep(60)
""")


def test_a_killed_run_leaves_no_run_and_its_staging_is_cleaned_next_time(tmp_path, caplog):
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-c", KILLED, str(out)], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    assert proc.stdout.readline().strip() == "staged"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert not out.exists() and len(list(tmp_path.glob(".run.staging"))) == 1
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:  # the kernel frees the dead process's lock
        try:
            with caplog.at_level("INFO", logger="llmft"), create_run(out) as run:
                (run.path / "run.json").write_text("{}")
            break
        except Exception:
            time.sleep(0.1)
    assert (out / "run.json").is_file()
    assert list(tmp_path.glob(".run.*")) == []
    assert any("left by an interrupted run" in r.getMessage() for r in caplog.records)
