"""End to end: train a tiny random GPT-2 on the real SMS data, save, reload, predict; and the
CLI's one-line errors with exit code 2 and no partial run directory."""

import json

import pytest
import torch

from llmft.cli import main
from llmft.pipelines.classification import ClassifyOptions, evaluate_run, predict, train_classifier
from llmft.training.loop import TrainConfig
from tests.helpers import SMS

TINY = {"n_layers": 2, "emb_dim": 64, "n_heads": 4, "context_length": 256}


@pytest.fixture(scope="module")
def spam_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "spam"
    opts = ClassifyOptions(model="gpt2-small", data=str(SMS), out=out, random_init=True, config_overrides=TINY,
                           trainable="all", train=TrainConfig(epochs=3, lr=1e-3, eval_freq=50, device="cpu"))
    return out, train_classifier(opts)


def test_learns_spam_well_above_majority(spam_run):
    out, results = spam_run
    # balanced classes: the majority baseline is 50%; 390 steps of a tiny random model get far past it
    assert results["validation_accuracy"] > 0.85
    assert results["test_accuracy"] > 0.85
    for name in ("run.json", "model.safetensors", "tokenizer/tokenizer_spec.json", "train.csv", "validation.csv",
                 "test.csv", "metrics.csv", "epochs.csv", "results.json", "loss.png", "loss.pdf",
                 "accuracy.png", "accuracy.pdf"):
        assert (out / name).is_file(), name
    assert len((out / "test.csv").read_text().splitlines()) == 301  # header + 300 (book split)
    assert json.loads((out / "run.json").read_text())["labels"] == ["ham", "spam"]
    assert not list(out.parent.glob(".*staging*"))


def test_reload_evaluates_and_predicts(spam_run):
    out, results = spam_run
    again = evaluate_run(out, device="cpu")
    assert again["test_accuracy"] == pytest.approx(results["test_accuracy"])
    labels = predict(out, ["WINNER!! You have won a £1000 prize. Call 09061701461 to claim now",
                           "Ok, see you at home later"], device="cpu")
    assert [label for label, _ in labels] == ["spam", "ham"]
    assert all(0.5 < p <= 1 for _, p in labels)


def test_each_split_runs_once_for_accuracy_and_report(spam_run, monkeypatch):
    """The metrics report takes its scores from the accuracy pass over each split: no second pass,
    and the same report a second pass gives."""
    import llmft.pipelines.classification as pipeline

    out, _ = spam_run
    passes, scoring = [], pipeline.split_scores
    monkeypatch.setattr(pipeline, "split_scores", lambda *a, **k: passes.append(1) or scoring(*a, **k))
    once = evaluate_run(out, device="cpu")
    assert len(passes) == 3  # train, validation, test: one pass each
    metrics = pipeline.final_metrics
    monkeypatch.setattr(pipeline, "final_metrics", lambda *a, **k: (metrics(*a, **k)[0], {}))
    twice = evaluate_run(out, device="cpu")
    assert len(passes) == 3 + 5 and twice == once  # 3 more, then test and validation again: the same report


def test_no_train_accuracy_scores_only_the_held_out_splits(tmp_path, monkeypatch, capsys):
    """`--no-train-accuracy`: the final pass runs validation and test only (the report needs
    both), their accuracies are those a reload computes, and no training accuracy is printed."""
    import llmft.pipelines.classification as pipeline
    from llmft.cli.classify import print_accuracies

    passes, scoring = [], pipeline.split_scores
    monkeypatch.setattr(pipeline, "split_scores", lambda *a, **k: passes.append(1) or scoring(*a, **k))
    opts = ClassifyOptions(model="gpt2-small", data=str(SMS), out=tmp_path / "run", random_init=True,
                           config_overrides=TINY, train_accuracy=False,
                           train=TrainConfig(epochs=1, lr=1e-3, eval_freq=50, device="cpu"))
    results = train_classifier(opts)
    assert len(passes) == 2 and "train_accuracy" not in results and "report" in results
    capsys.readouterr()  # the training progress
    print_accuracies(results)
    assert capsys.readouterr().out.splitlines() == [
        f"Validation accuracy:  {results['validation_accuracy'] * 100:.2f}%",
        f"Test accuracy:        {results['test_accuracy'] * 100:.2f}%"]
    again = evaluate_run(tmp_path / "run", device="cpu")
    for split in ("validation", "test"):
        assert results[f"{split}_accuracy"] == again[f"{split}_accuracy"], split


def test_longest_first_pass_equals_batches_in_order(spam_run):
    """The final pass runs each split longest text first and puts the scores back in order: the
    same accuracy, loss and probabilities as the loader's own batches. A text's logits differ only
    by the GEMMs' summation order (padding is on the right, behind a causal mask): a few fp32
    rounding steps of a 2-layer, 64-wide model, far inside 1e-5."""
    import llmft.pipelines.classification as pipeline

    out, _ = spam_run
    model, tokenizer, meta = pipeline.load_classifier(out, "test")
    named = {"test": pipeline.read_labelled_texts(out / "test.csv")}
    loader = pipeline.make_loaders(named, tokenizer, meta.labels, meta.max_length, 8, 0, None)["test"]
    task = pipeline.ClassificationTask(loader, loader, 0, torch.device("cpu"))
    runner = pipeline.TaskModule(model, task)
    (labels, probabilities), losses = pipeline.split_scores(runner, loader, torch.device("cpu"))
    in_order = torch.cat([torch.softmax(runner(batch, "logits"), -1) for batch in loader]).detach()
    assert labels.tolist() == loader.dataset.labels
    torch.testing.assert_close(torch.from_numpy(probabilities), in_order, rtol=0, atol=1e-5)
    accuracy, loss = pipeline.evaluate(runner, task, loader, torch.device("cpu"))
    assert (probabilities.argmax(-1) == labels).mean() == accuracy
    assert pipeline.mean_batch_loss(losses, 8) == pytest.approx(loss, rel=1e-5)


def test_cli_predict_and_eval(spam_run, capsys):
    out, _ = spam_run
    assert main(["classify", "predict", str(out), "Free entry! Txt WIN to 80086 now"]) == 0
    assert capsys.readouterr().out.startswith("spam\t")
    assert main(["classify", "eval", str(out)]) == 0
    assert "Test accuracy:" in capsys.readouterr().out


@pytest.mark.parametrize("args, message", [
    (["--data", "missing.tsv"], "missing.tsv: data file not found"),
    (["--max-length", "5000"], "--max-length 5000 exceeds the model's context of 1024"),
])
def test_cli_errors_exit_2_without_leftovers(tmp_path, capsys, args, message):
    out = tmp_path / "run"
    code = main(["classify", "train", "--model", "gpt2-small", "--random-init", "--data", str(SMS),
                 "--out", str(out), *args])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and message in err
    assert not out.exists() and not list(tmp_path.iterdir())


def test_cli_refuses_existing_run_dir(spam_run, capsys):
    out, _ = spam_run
    assert main(["classify", "train", "--data", str(SMS), "--out", str(out)]) == 2
    assert "already exists (pass --overwrite" in capsys.readouterr().err


def test_unseen_label_and_one_class(tmp_path, capsys):
    train = tmp_path / "t.csv"
    train.write_text("text,label\na,x\nb,y\n")
    val = tmp_path / "v.csv"
    val.write_text("text,label\nc,z\n")
    code = main(["classify", "train", "--random-init", "--data", str(train), "--validation-data", str(val),
                 "--test-data", str(val), "--out", str(tmp_path / "r")])
    assert code == 2 and "validation data has label(s) 'z' never seen in training" in capsys.readouterr().err
    one = tmp_path / "one.csv"
    one.write_text("text,label\na,x\nb,x\n")
    assert main(["classify", "train", "--random-init", "--data", str(one), "--out", str(tmp_path / "r")]) == 2
    assert "only one class" in capsys.readouterr().err


def test_offline_pretrained_gpt2_says_so(tmp_path, capsys):
    code = main(["classify", "train", "--model", "gpt2-small", "--data", str(SMS), "--out", str(tmp_path / "r")])
    assert code == 2
    assert "unreachable" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_predict_matches_training_forward(spam_run):
    from llmft.checkpoint import load_finetuned

    out, _ = spam_run
    model, tokenizer, meta = load_finetuned(out)
    ids = torch.tensor([tokenizer.encode("hello there")])
    torch.testing.assert_close(model(ids, torch.tensor([ids.shape[1]])).softmax(-1).max(),
                               torch.tensor(predict(out, ["hello there"], device="cpu")[0][1]))
