"""End to end: fine-tune a tiny random GPT on a slice of the book's instruction data until the
validation loss falls, then generate, extract, score with reference metrics and a local judge."""

import json

import pytest

from llmft.cli import main
from llmft.pipelines.instruction import InstructOptions, reference_scores, respond, train_instructions
from llmft.training.loop import TrainConfig
from tests.helpers import INSTRUCTIONS

TINY = {"n_layers": 2, "emb_dim": 64, "n_heads": 4, "context_length": 256}


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sft")
    data = tmp / "slice.json"
    data.write_text(json.dumps(json.loads(INSTRUCTIONS.read_text())[:100]))
    out = tmp / "run"
    results = train_instructions(InstructOptions(
        model="gpt2-small", data=str(data), out=out, random_init=True, config_overrides=TINY, max_length=128,
        train=TrainConfig(epochs=2, lr=5e-3, eval_freq=5, eval_iter=2, device="cpu")))
    return out, results


def test_validation_loss_falls(sft_run):
    out, results = sft_run
    assert results["final_val_loss"] < results["initial_val_loss"] - 2.0
    assert results["full_val_loss_after"] < results["full_val_loss_before"] - 2.0
    for name in ("run.json", "model.safetensors", "train.json", "validation.json", "test.json", "metrics.csv",
                 "loss.png", "loss.pdf", "results.json"):
        assert (out / name).is_file(), name
    sizes = [len(json.loads((out / f"{s}.json").read_text())) for s in ("train", "test", "validation")]
    assert sizes == [85, 10, 5]
    epochs = [json.loads(line) for line in (out / "epochs.jsonl").read_text().splitlines()]
    assert len(epochs) == 2 and all("sample" in e for e in epochs)


def test_respond_resumes_and_scores(sft_run, capsys):
    out, _ = sft_run
    path = respond(out, split="test", max_new_tokens=8, device="cpu")
    entries = json.loads(path.read_text())
    assert len(entries) == 10 and all(isinstance(e["model_response"], str) for e in entries)
    entries[3]["model_response"] = "already answered"
    del entries[4]["model_response"]
    path.write_text(json.dumps(entries))
    respond(out, split="test", max_new_tokens=8, device="cpu")
    again = json.loads(path.read_text())
    assert again[3]["model_response"] == "already answered" and "model_response" in again[4]
    again[0]["model_response"] = again[0]["output"]
    path.write_text(json.dumps(again))
    scores = reference_scores(path)
    assert scores["n"] == 10 and scores["exact_match"] >= 0.1 and scores["rouge_l_f1"] >= 0.1


def test_cli_respond_and_generate_with_beams(sft_run, tmp_path, capsys):
    """`--num-beams` reaches the decoder (the answers are the beam search's), is recorded, and a
    rerun with other decoding settings does not continue the file."""
    from llmft.generation import beam_search_tokens
    from llmft.pipelines.instruction import load_chat_model

    out, _ = sft_run
    beams = tmp_path / "beams.json"
    assert main(["instruct", "respond", str(out), "--out", str(beams), "--max-new-tokens", "6", "--num-beams", "3",
                 "--length-penalty", "0.5"]) == 0
    settings = json.loads((tmp_path / "beams.settings.json").read_text())
    assert (settings["num_beams"], settings["length_penalty"]) == (3, 0.5)
    entry = next(e for e in json.loads(beams.read_text()) if not e["input"])  # as `generate` formats it
    model, tokenizer, style = load_chat_model(str(out), "cpu", False)
    tokens = beam_search_tokens(model, tokenizer.encode(style.format(entry)), num_beams=3, max_new_tokens=6,
                                eos_ids=style.stop_token_ids(tokenizer), length_penalty=0.5)
    assert entry["model_response"] == style.extract_response(tokenizer.decode(tokens))
    assert main(["instruct", "respond", str(out), "--out", str(beams), "--max-new-tokens", "6"]) == 2
    assert "answers 3 for 'num_beams'" in capsys.readouterr().err
    assert main(["generate", str(out), entry["instruction"], "--max-new-tokens", "6", "--num-beams", "3",
                 "--length-penalty", "0.5"]) == 0
    assert capsys.readouterr().out == entry["model_response"] + "\n"
    assert main(["generate", str(out), "Name a color.", "--num-beams", "2", "--temperature", "0.5"]) == 2
    assert "takes no --temperature" in capsys.readouterr().err


def test_cli_generate_and_local_judge(sft_run, capsys):
    out, _ = sft_run
    assert main(["generate", str(out), "Name a color.", "--max-new-tokens", "5"]) == 0
    printed = capsys.readouterr().out
    assert printed.count("\n") >= 1
    assert main(["generate", str(out), "Name a color.", "--max-new-tokens", "5", "--no-prepack"]) == 0
    assert capsys.readouterr().out == printed
    responses = out / "test-responses.json"
    if not responses.exists():
        respond(out, split="test", max_new_tokens=4, device="cpu")
    assert main(["instruct", "judge", str(responses), "--judge", f"local:{out}"]) == 0
    printed = capsys.readouterr().out
    assert "Number of scores:" in printed and "of 10" in printed
    assert (out / "test-responses-scores.json").is_file()


def test_cli_errors(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text('[{"instruction": "a", "output": "b"},\n {"instruction": 3, "output": "c"}]')
    code = main(["instruct", "train", "--random-init", "--model", "gpt2-small", "--data", str(bad),
                 "--out", str(tmp_path / "r")])
    assert code == 2 and "entry 1: key 'instruction' must be a string" in capsys.readouterr().err
    assert main(["instruct", "train", "--random-init", "--data", str(INSTRUCTIONS), "--prompt-style", "nope",
                 "--out", str(tmp_path / "r")]) == 2
    assert "unknown prompt style 'nope'" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_respond_with_a_model_before_finetuning_needs_data_and_out(tmp_path, capsys):
    assert main(["instruct", "respond", "gpt2-small", "--data", str(INSTRUCTIONS)]) == 2
    assert "pass --data FILE and --out FILE" in capsys.readouterr().err
