"""Issue 18, real data and real users: long texts (length statistics, the estimate, the default
cap, head or tail truncation), the metrics a spam filter needs, batch prediction, chat, progress
off the terminal, --threads and --config. Tiny random models on the real SMS and instruction data."""

from __future__ import annotations

import csv
import dataclasses
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from llmft import progress
from llmft.cli import cli, main
from llmft.data.classification import ClassificationDataset, length_stats, truncate
from llmft.evaluation.classification import classification_report, rates_at, report_lines, threshold_for_fpr
from llmft.pipelines.chat import Chat, open_chat
from llmft.pipelines.classification import ClassifyOptions, label_probabilities, load_classifier, predict, \
    predict_file, train_classifier
from llmft.pipelines.instruction import InstructOptions, answer, load_chat_model, train_instructions
from llmft.training.estimate import BlockCost, padded_lengths
from llmft.training.loop import TrainConfig
from tests.helpers import SMS, write_slices

TINY = {"n_layers": 2, "emb_dim": 64, "n_heads": 4, "context_length": 1024}
QUICK = TrainConfig(epochs=1, lr=1e-3, eval_freq=20, eval_iter=1, device="cpu")


def sms_pairs(n: int) -> list[tuple[str, str]]:
    return [(text, label) for label, text in (line.split("\t", 1) for line in
                                               SMS.read_text(encoding="utf-8").splitlines()[:n])]


@pytest.fixture(scope="module")
def long_texts(tmp_path_factory) -> Path:
    """40 long documents (20 SMS each, about 300-700 GPT-2 tokens) labelled by their first message."""
    path = tmp_path_factory.mktemp("long") / "long.csv"
    pairs = sms_pairs(800)
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["text", "label"])
        for i in range(0, 800, 20):
            writer.writerow([" ".join(text for text, _ in pairs[i:i + 20]), "ab"[i // 20 % 2]])
    return path


@pytest.fixture(scope="module")
def long_run(long_texts, tmp_path_factory):
    """A classifier on the long documents, its last block trained (the activation cache applies)."""
    import logging

    out = tmp_path_factory.mktemp("runs") / "long"
    records: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: records.append(record.getMessage())
    logging.getLogger("llmft").addHandler(handler)
    logging.getLogger("llmft").setLevel(logging.INFO)
    try:
        results = train_classifier(ClassifyOptions(model="gpt2-small", data=str(long_texts), out=out, random_init=True,
                                                   config_overrides=TINY, truncate="tail", train=QUICK))
    finally:
        logging.getLogger("llmft").removeHandler(handler)
    return out, results, records


def test_long_texts_are_described_estimated_and_capped_before_the_work(long_texts, long_run, gpt2_tokenizer):
    out, results, records = long_run
    texts = [row["text"] for row in csv.DictReader(open(long_texts, encoding="utf-8"))]
    lengths = [len(gpt2_tokenizer.encode(t)) for t in texts]
    stats = length_stats(lengths, 512)
    assert stats.truncated == sum(n > 512 for n in lengths) > 0  # the synthetic file has texts over the cap
    assert stats.describe() in records
    assert stats.describe().startswith(f"text lengths: mean {np.mean(lengths):.1f} tokens, 95th percentile "
                                       f"{np.percentile(lengths, 95):.0f}, max {max(lengths):,} (40 texts)")
    cache = [r for r in records if r.startswith("estimate: activation cache pass (blocks 0-0, ")]
    epoch = [r for r in records if r.startswith("estimate: one epoch (28 training texts")]
    assert len(cache) == 1 and "GFLOP/s)" in cache[0]
    assert len(epoch) == 1 and "1 epoch and the final evaluation ~" in epoch[0]
    order = [i for i, r in enumerate(records) if r.startswith(("text lengths", "estimate:", "activation cache:"))]
    assert [records[i].split(":")[0] for i in order] == ["text lengths", "estimate", "estimate", "activation cache",
                                                         "activation cache"]
    assert records[order[-1]].startswith("activation cache: filled in ")
    meta = json.loads((out / "run.json").read_text())
    assert (meta["max_length"], meta["truncate"], results["max_length"]) == (512, "tail", 512)


def test_predict_cuts_texts_as_the_run_was_trained(long_run):
    out, _, _ = long_run
    model, tokenizer, meta = load_classifier(out, "test")
    text = " ".join(text for text, _ in sms_pairs(40))
    ids = tokenizer.encode(text)
    assert len(ids) > 512 and truncate(ids, 512, "tail") == ids[-512:] and truncate(ids, 512, "head") == ids[:512]
    with torch.no_grad():
        expected = torch.softmax(model(torch.tensor([ids[-512:]]), torch.tensor([512])), -1)[0].tolist()
    assert label_probabilities(model, tokenizer, [text], 512, side="tail")[0] == pytest.approx(expected)
    label, prob = predict(out, [text], device="cpu")[0]
    assert prob == pytest.approx(max(expected), abs=1e-6) and label == meta.labels[int(np.argmax(expected))]


def test_max_length_longest_restores_the_books_rule(long_texts, tmp_path, gpt2_tokenizer):
    opts = ClassifyOptions(model="gpt2-small", data=str(long_texts), out=tmp_path / "r", max_length="longest")
    assert opts.max_length_within(1024, 700, 512) == 700 and opts.max_length_within(600, 700, 512) == 600
    default = ClassifyOptions(model="gpt2-small", data=str(long_texts), out=tmp_path / "r")
    assert default.max_length_within(1024, 700, 512) == 512 and default.max_length_within(1024, 93, 512) == 93
    assert ClassifyOptions(model="m", data="d", out="o", max_length="64").max_length == 64
    data = ClassificationDataset([(" a" * 30, "x")], gpt2_tokenizer, ["x"], 8, "tail")
    assert data.full_lengths == [30] and len(data.token_ids[0]) == 8


def test_estimate_counts_padding_and_attention():
    cost = BlockCost(params=1000, layers=2, width=8)
    assert cost.total([10]) == 2 * 1000 * 10 + 2 * 2 * 8 * 100
    assert padded_lengths([1, 5, 2, 2], 2, "grouped") == [2, 2, 5, 5]  # (1, 2) and (2, 5)
    assert padded_lengths([1, 5, 2], 2, "grouped", pad_to=9) == [9, 9, 9]
    shuffled = padded_lengths(list(range(1, 101)), 8, "shuffled")
    assert len(shuffled) == 100 and sum(shuffled) > sum(padded_lengths(list(range(1, 101)), 8, "grouped"))


# -- evaluation a user can act on ------------------------------------------------------------

KNOWN = (np.array([0, 0, 0, 0, 1, 1, 1]),
         np.array([[.9, .1], [.8, .2], [.4, .6], [.7, .3], [.2, .8], [.6, .4], [.1, .9]]))


def test_metrics_on_known_predictions():
    report = classification_report("known", ["ham", "spam"], KNOWN)
    # predicted: 0 0 1 0 | 1 0 1 -> ham: 3 of 4 right, 1 spam called ham; spam: 2 of 3 right, 1 ham called spam
    assert report["confusion"] == [[3, 1], [1, 2]]
    assert report["accuracy"] == pytest.approx(5 / 7)
    assert report["classes"]["ham"] == pytest.approx({"precision": 3 / 4, "recall": 3 / 4, "f1": 3 / 4, "support": 4})
    assert report["classes"]["spam"] == pytest.approx({"precision": 2 / 3, "recall": 2 / 3, "f1": 2 / 3, "support": 3})
    # ROC AUC: of the 12 (spam, ham) pairs, the spam text scores higher in 11 (0.4 < 0.6 is the one miss)
    assert report["roc_auc"] == pytest.approx(11 / 12)
    # average precision: ranks .9 spam, .8 spam, .6 ham, .4 spam: (1/3)(1 + 1 + 3/4)
    assert report["pr_auc"] == pytest.approx((1 + 1 + 3 / 4) / 3)
    lines = report_lines(report)
    assert lines[0] == "known (7 texts): accuracy 71.43%" and "ROC AUC 0.9167" in lines[-1]


def test_threshold_for_a_false_positive_rate():
    y, probs = KNOWN
    scores = probs[:, 1]
    assert threshold_for_fpr(y, scores, 0.0) == pytest.approx(0.8)  # above every ham's 0.6: 2 of 3 spam caught
    assert rates_at(y, scores, 0.8) == (0.0, pytest.approx(2 / 3))
    assert threshold_for_fpr(y, scores, 0.25) == pytest.approx(0.4)  # one ham of four allowed: every spam
    assert rates_at(y, scores, 0.4) == (0.25, 1.0)
    assert threshold_for_fpr(np.array([0, 1]), np.array([0.9, 0.1]), 0.0) is None
    report = classification_report("test", ["ham", "spam"], KNOWN, KNOWN, max_fpr=0.0)
    assert report["threshold"] == pytest.approx({"max_fpr": 0.0, "threshold": 0.8, "chosen_on": "validation",
                                                 "fpr": 0.0, "recall": 2 / 3})


@pytest.fixture(scope="module")
def spam_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "spam"
    data = tmp_path_factory.mktemp("data") / "spam.tsv"
    data.write_text("\n".join(SMS.read_text(encoding="utf-8").splitlines()[:600]) + "\n", encoding="utf-8")
    results = train_classifier(ClassifyOptions(model="gpt2-small", data=str(data), out=out, random_init=True,
                                               config_overrides=TINY, trainable="all", max_length=64,
                                               train=TrainConfig(epochs=2, lr=1e-3, eval_freq=50, device="cpu")))
    return out, results


def test_training_ends_with_the_report_and_its_plots(spam_run):
    out, results = spam_run
    report = results["report"]
    test_texts = len((out / "test.csv").read_text().splitlines()) - 1
    assert report["evaluated"] == "test split" and report["texts"] == test_texts
    assert report["accuracy"] == pytest.approx(results["test_accuracy"])
    assert sum(map(sum, report["confusion"])) == report["texts"] and 0 <= report["roc_auc"] <= 1
    assert json.loads((out / "results.json").read_text())["report"] == report
    for name in ("confusion", "roc", "pr"):
        assert (out / f"{name}.png").read_bytes().startswith(b"\x89PNG\r\n\x1a\n"), name
        assert (out / f"{name}.pdf").read_bytes().startswith(b"%PDF-"), name


def test_eval_reports_on_the_test_split_and_on_a_new_file(spam_run, tmp_path, capsys):
    out, results = spam_run
    assert main(["classify", "eval", str(out), "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert f"Test accuracy:        {results['test_accuracy'] * 100:.2f}%" in printed
    assert "confusion matrix (rows: true label, columns: predicted):" in printed and "ROC AUC" in printed
    assert json.loads((out / "evaluation.json").read_text())["confusion"] == results["report"]["confusion"]
    new = tmp_path / "fresh.csv"
    with open(new, "w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows([("text", "label"), *sms_pairs(700)[600:]])
    assert main(["classify", "eval", str(out), "--data", str(new), "--max-fpr", "0.05"]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith(f"{new} (100 texts): accuracy ")
    assert "at most 5.0% false positives on the validation" in printed
    assert (out / "eval-fresh" / "confusion.png").is_file() and (out / "eval-fresh" / "evaluation.json").is_file()


# -- batch prediction -------------------------------------------------------------------------

def test_batch_prediction_round_trip(spam_run, tmp_path):
    out, _ = spam_run
    texts = [t for t, _ in sms_pairs(640)[600:]]
    source = tmp_path / "messages.csv"
    with open(source, "w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows([["id", "body"], *([str(i), t] for i, t in enumerate(texts))])
    assert predict_file(out, source, tmp_path / "predictions.csv", text_column="body", batch_size=3) == 40
    rows = list(csv.DictReader(open(tmp_path / "predictions.csv", encoding="utf-8")))
    assert [r["id"] for r in rows] == [str(i) for i in range(40)] and [r["body"] for r in rows] == texts
    alone = predict(out, texts, device="cpu")
    assert [r["predicted_label"] for r in rows] == [label for label, _ in alone]
    for row, (label, prob) in zip(rows, alone):
        assert float(row["prob_ham"]) + float(row["prob_spam"]) == pytest.approx(1, abs=1e-5)
        assert float(row[f"prob_{label}"]) == pytest.approx(prob, abs=1e-5)
    lines = tmp_path / "messages.txt"
    lines.write_text("\n".join(texts[:5]) + "\n\n", encoding="utf-8")
    assert main(["classify", "predict", str(out), "--file", str(lines), "--out", str(tmp_path / "p.jsonl"),
                 "--threshold", "0.0"]) == 0
    written = [json.loads(line) for line in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert [w["text"] for w in written] == texts[:5] and {w["predicted_label"] for w in written} == {"spam"}


# -- chat ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def sft_run(tmp_path_factory):
    """A tiny instruction run (alpaca prompts, a context of 128 tokens)."""
    root = write_slices(tmp_path_factory.mktemp("sft"), sms_lines=1, instructions=60)
    opts = InstructOptions(model="gpt2-small", data=str(root / "sft.json"), out=root / "run", random_init=True,
                           config_overrides={**TINY, "context_length": 128}, max_length=96,
                           train=dataclasses.replace(QUICK, lr=5e-3, eval_freq=50))
    train_instructions(opts)
    return opts.out


def test_chat_through_stdin_for_two_turns(sft_run):
    model, tokenizer, style = load_chat_model(str(sft_run), "cpu")
    first = answer(model, tokenizer, style, [{"instruction": "Name a color.", "input": ""}], max_new_tokens=6)[0]
    chat = Chat(model, tokenizer, style, max_new_tokens=6)
    assert "".join(chat.reply("Name a color.")) == first
    second_prompt = chat.prompt_ids("And another?")
    turn = {"instruction": "Name a color.", "input": "", "output": first}
    assert second_prompt == (tokenizer.encode(style.format(turn) + style.response_text(turn)) + [tokenizer.eos_id]
                             + tokenizer.encode(style.format({"instruction": "And another?", "input": ""})))
    second = "".join(chat.reply("And another?"))
    result = CliRunner().invoke(cli, ["chat", str(sft_run), "--max-new-tokens", "6", "--device", "cpu"],
                                input="Name a color.\n\nAnd another?\n/reset\nName a color.\n/exit\nnever read\n")
    assert result.exit_code == 0, result.output
    assert result.stdout == f">> {first}\n>> >> {second}\n>> (conversation reset)\n>> {first}\n>> \n"


def test_chat_keeps_the_history_within_the_context(sft_run):
    chat = open_chat(str(sft_run), device="cpu", max_new_tokens=40)
    chat.turns = [(f"question {i} " * 3, "answer " * 5) for i in range(10)]
    ids = chat.prompt_ids("last one")
    kept = next(k for k in range(11) if chat._encode(chat.turns[10 - k:], "last one") == ids)
    assert 0 < kept < 10 and len(ids) + 40 <= 128  # the latest turns that fit, the oldest dropped
    assert len(chat._encode(chat.turns[9 - kept:], "last one")) + 40 > 128
    chat.reset()
    assert chat.turns == []
    assert chat.prompt_ids("x") == chat.tokenizer.encode(chat.style.format({"instruction": "x", "input": ""}))


# -- progress, threads, --config --------------------------------------------------------------------

class Pipe(io.StringIO):
    def isatty(self) -> bool:
        return False


def test_progress_off_a_terminal_is_a_few_whole_lines(monkeypatch):
    monkeypatch.setattr(progress, "LINE_SECONDS", 0.0)
    stream = Pipe()
    with progress.progress_bar(total=10_000, desc="work", file=stream) as bar:
        for _ in range(10_000):
            bar.update(1)
    lines = stream.getvalue().splitlines()
    assert "\r" not in stream.getvalue() and 10 <= len(lines) <= 100 // progress.LINE_PERCENT + 2
    assert lines[0].startswith("work:   0%") and lines[-1].startswith("work: 100%")


def test_threads_on_every_command(spam_run, capsys):
    out, _ = spam_run
    try:
        assert main(["classify", "predict", str(out), "hello", "--threads", "2"]) == 0
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(1)
    assert main(["generate", "--threads", "0", "--model", "x", "hi"]) == 2
    assert "--threads must be at least 1, got 0" in capsys.readouterr().err
    commands = [c for group in cli.commands.values() for c in getattr(group, "commands", {group.name: group}).values()]
    assert len(commands) >= 10 and all("threads" in {p.name for p in c.params} for c in commands)


def test_config_reruns_a_run_with_command_line_overrides(spam_run, sft_run, tmp_path):
    out, _ = spam_run
    again = tmp_path / "again"
    assert main(["classify", "train", "--config", str(out / "run.json"), "--out", str(again), "--epochs", "1",
                 "--truncate", "tail"]) == 0
    before, after = (json.loads((run / "run.json").read_text())["options"] for run in (out, again))
    assert after["out"] == str(again) and after["train"]["epochs"] == 1 and after["truncate"] == "tail"
    changed = {k for k in before if before[k] != after[k]}
    assert changed == {"out", "train", "truncate"}
    assert {k for k in before["train"] if before["train"][k] != after["train"][k]} == {"epochs"}
    sft_again = tmp_path / "sft-again"
    assert main(["instruct", "train", "--config", str(sft_run), "--out", str(sft_again)]) == 0
    recorded = [json.loads((run / "run.json").read_text())["options"] for run in (sft_run, sft_again)]
    assert {k for k in recorded[0] if recorded[0][k] != recorded[1][k]} == {"out"}


@pytest.mark.parametrize("argv, phrase", [
    (["classify", "train", "--data", "x.csv", "--out", "r", "--max-length", "many"],
     "--max-length must be a number of tokens or 'longest', got 'many'"),
    (["classify", "train", "--data", "x.csv", "--out", "r", "--max-fpr", "2"], "--max-fpr must be a false-positive"),
    (["classify", "train", "--config", "{sft}", "--out", "r"], "classify train --config needs a 'classification' run"),
    (["classify", "predict", "{spam}", "--file", "{spam}/test.csv", "--out", "p.txt"], "write .csv or .jsonl"),
    (["classify", "predict", "{spam}", "hi", "--out", "p.csv"], "--out writes the predictions of --file"),
    (["classify", "eval", "{spam}", "--data", "{sft}/test.json"], "expected an object with keys 'text' and 'label'"),
])
def test_bad_input_of_issue_18_is_one_line(spam_run, sft_run, argv, phrase, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code = main([a.replace("{spam}", str(spam_run[0])).replace("{sft}", str(sft_run)) for a in argv])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("error: ") and "\n" not in err and phrase in err, err
    assert not (tmp_path / "r").exists() and not list(tmp_path.glob("p.*"))
