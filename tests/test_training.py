"""The shared loop and the activation cache, on real SMS data with a tiny random GPT."""

import copy

import numpy as np
import pytest
import torch

from llmft.data.classification import balance, label_names, split
from llmft.data.sources import read_labelled_texts
from llmft.models import build_model
from llmft.pipelines.classification import ClassificationTask, make_loaders
from llmft.rundir import RunDir
from llmft.training.activation_cache import ActivationStore, cache_start, cached_loaders
from llmft.training.freezing import apply_trainable
from llmft.training.heads import SequenceClassifier
from llmft.training.loop import TrainConfig, lr_at, train
from llmft.training.shared_prefixes import Segment, plan_prefixes, wave_batches
from tests.helpers import SMS, NextTokenTask
from tests.test_gemma3 import TINY as TINY_GEMMA3


@pytest.fixture(scope="module")
def sms_splits():
    examples = balance(read_labelled_texts(SMS), 123)[::6]  # 249 balanced examples
    return split(examples, (0.7, 0.1), 123)


def run(cfg, splits, tokenizer, use_cache, tmp_path=None, policy="last-block", epochs=2):
    torch.manual_seed(1)
    model = SequenceClassifier(build_model(cfg), 2)
    apply_trainable(model.backbone, policy)
    labels = label_names(splits)
    loaders = make_loaders(splits, tokenizer, labels, 64, 8, 123, None)
    start = cache_start(model) if use_cache else 0
    if start:
        loaders = cached_loaders(model, loaders, 123, torch.device("cpu"), start)
    task = ClassificationTask(loaders["train"], loaders["validation"], 2, torch.device("cpu"), start)
    tc = TrainConfig(epochs=epochs, eval_freq=5, eval_iter=2, lr=1e-3, device="cpu")
    metrics = RunDir(tmp_path).metrics() if tmp_path else None
    history = train(model, task, loaders["train"], loaders["validation"], tc, metrics, show_progress=False)
    return model, history, start


def test_activation_cache_gives_the_same_training(tiny_gpt2_config, sms_splits, gpt2_tokenizer):
    cfg = tiny_gpt2_config.with_(n_layers=3)
    plain, h_plain, _ = run(cfg, sms_splits, gpt2_tokenizer, use_cache=False)
    cached, h_cached, start = run(cfg, sms_splits, gpt2_tokenizer, use_cache=True)
    assert start == 2
    assert [r["train_loss"] for r in h_plain.steps] == pytest.approx([r["train_loss"] for r in h_cached.steps], abs=1e-5)
    assert [e["val_acc"] for e in h_plain.epochs] == [e["val_acc"] for e in h_cached.epochs]
    for (name, a), b in zip(plain.state_dict().items(), cached.state_dict().values()):
        if name.endswith("attn.key.bias"):
            # Softmax ignores a per-query constant, so this gradient is rounding noise that
            # Adam normalises into full-size steps: it differs between any two summation orders.
            continue
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4, msg=name)


def test_full_finetuning_learns_spam_and_logs(tiny_gpt2_config, sms_splits, gpt2_tokenizer, tmp_path):
    model, history, start = run(tiny_gpt2_config, sms_splits, gpt2_tokenizer, True, tmp_path, "all", epochs=3)
    assert start == 0  # embeddings train: nothing to cache
    assert history.steps[0]["step"] == 0 and history.steps[1]["step"] == 1  # book: eval after step 0
    assert history.steps[-1]["train_loss"] < history.steps[0]["train_loss"] - 0.2
    assert history.epochs[-1]["train_acc"] > 0.7
    header = (tmp_path / "metrics.csv").read_text().splitlines()[0]
    assert header == "step,epoch,examples_seen,train_loss,val_loss,lr"
    assert (tmp_path / "epochs.jsonl").read_text().count("\n") == 3


def test_cosine_schedule_with_warmup():
    cfg = TrainConfig(lr=1.0, warmup_steps=10, lr_schedule="cosine", min_lr_ratio=0.1)
    assert lr_at(0, 100, cfg) == pytest.approx(0.1)
    assert lr_at(9, 100, cfg) == pytest.approx(1.0)
    assert lr_at(100, 100, cfg) == pytest.approx(0.1)
    assert lr_at(55, 100, cfg) == pytest.approx(0.55)


class GradientRecorder(torch.optim.SGD):
    """An optimizer that records the gradients it is given and changes nothing."""

    def __init__(self, params, **_):
        self.recorded = []
        super().__init__(params, lr=0.0)

    def step(self, closure=None):
        self.recorded.append([p.grad.clone() for group in self.param_groups for p in group["params"]])


def test_gradient_accumulation_matches_a_bigger_batch(tiny_gpt2_config, monkeypatch):
    """Two accumulated half-batches hand the optimizer the gradient of one full batch.

    Both sum the same per-token terms, only in another order. Reassociating a float32 sum of
    n terms changes it by at most about n * 2**-24 times the sum of their magnitudes, which can
    dwarf the sum itself (the key bias's gradient is exactly 0 in exact arithmetic: only
    rounding noise is left). Every gradient element here sums at most 2**10 terms no larger
    than the gradient's overall scale (its largest element), so the two differ by less than
    2**-14 of that scale.
    """
    from llmft.training import loop

    torch.manual_seed(0)
    base = build_model(tiny_gpt2_config)
    data = torch.randint(0, 1000, (8, 10))
    optimizers = []
    monkeypatch.setattr(loop, "make_optimizer", lambda model, cfg, device, **_: optimizers.append(
        GradientRecorder([p for p in model.parameters() if p.requires_grad])) or optimizers[-1])
    for accum, bs in ((1, 8), (2, 4)):
        batches = [{"x": data[i:i + bs]} for i in range(0, 8, bs)]
        train(copy.deepcopy(base), NextTokenTask(), batches, batches,
              TrainConfig(epochs=1, grad_accum=accum, device="cpu"), show_progress=False)
    full, accumulated = (opt.recorded for opt in optimizers)
    assert len(full) == len(accumulated) == 1  # one optimizer step each
    scale = max(g.abs().max().item() for g in full[0])
    for a, b in zip(full[0], accumulated[0]):
        torch.testing.assert_close(b, a, rtol=0, atol=2**-14 * scale)


class WeightRecorder:
    """A metrics sink that keeps the model's weights (in float64) at every loss evaluation."""

    def __init__(self, model):
        self.model, self.weights = model, {}

    def write(self, table, row):
        if table == "steps":
            self.weights[row["step"]] = {n: p.detach().double().clone() for n, p in self.model.named_parameters()}

    def clear(self):
        self.weights.clear()


def test_tail_averaging_ends_with_the_mean_of_the_last_steps(tiny_gpt2_config):
    """--average-tail 0.4 of 10 steps: the run trains exactly as without it and ends with the
    mean of the weights after steps 7 to 10.

    The float32 running mean m_k = m_(k-1) + (w_k - m_(k-1)) / k takes 3 updates here; each
    rounds a difference, a product and a sum of numbers no larger than M (the largest |weight|
    of the tensor over those steps) by at most 2**-24 M each, and later updates scale earlier
    errors by (k - 1) / k < 1. So it is within 9 * 2**-24 M of the exact mean; 16 * 2**-24 M is
    allowed. The last step's weights differ from the mean by far more (lr 1e-2)."""
    torch.manual_seed(0)
    base = build_model(tiny_gpt2_config)
    data = torch.randint(0, 1000, (20, 10))
    batches = [{"x": data[i:i + 2]} for i in range(0, 20, 2)]  # 10 optimizer steps
    models = {}
    for fraction in (None, 0.4):
        models[fraction] = copy.deepcopy(base)
        recorder = WeightRecorder(models[fraction])
        train(models[fraction], NextTokenTask(), batches, batches[:1],
              TrainConfig(epochs=1, eval_freq=1, eval_iter=1, lr=1e-2, device="cpu", average_tail=fraction),
              recorder, show_progress=False)
        if fraction is None:
            plain = recorder.weights
    assert recorder.weights.keys() == plain.keys() == set(range(11))
    for step, weights in plain.items():  # the steps themselves are the same
        assert all(weights[n].equal(recorder.weights[step][n]) for n in weights), step
    moved = 0.0
    for name, p in models[0.4].named_parameters():
        tail = torch.stack([plain[step][name] for step in (7, 8, 9, 10)])
        scale = tail.abs().max().item()
        torch.testing.assert_close(p.double(), tail.mean(0), rtol=0, atol=16 * 2**-24 * scale)
        moved = max(moved, (p.double() - tail[-1]).abs().max().item() / max(scale, 1e-30))
        assert models[None].state_dict()[name].double().equal(tail[-1])  # without it: the last step's
    assert moved > 1e-3


def test_cached_and_token_loaders_batch_identically_when_grouped(tiny_gpt2_config, sms_splits, gpt2_tokenizer):
    model = SequenceClassifier(build_model(tiny_gpt2_config), 2)
    apply_trainable(model.backbone, "last-block")
    labels = label_names(sms_splits)
    tokens = make_loaders(sms_splits, gpt2_tokenizer, labels, 64, 8, 7, None, group_by_length=True)
    cached = cached_loaders(model, tokens, 7, torch.device("cpu"), 1, group_by_length=True)
    a = [(b["labels"].tolist(), b["lengths"].tolist()) for b in tokens["train"]]
    b = [(b["labels"].tolist(), b["lengths"].tolist()) for b in cached["train"]]
    assert a == b and len(a) == len(sms_splits.train) // 8
    widths = [max(lengths) * len(lengths) for _, lengths in a]
    assert sum(widths) < 1.2 * sum(sum(lengths) for _, lengths in a)


def test_batches_pad_at_most_an_eighth_of_their_tokens():
    plan = plan_prefixes([(1, 2), (3,), (4, 5), (6, 7, 8), (9, 10), (11,)])  # no common prefixes
    batches = [[plan.sequences[i] for i in b] for b in wave_batches(plan, max_tokens=4, max_slots=16)]
    assert batches == [[(3,), (11,)], [(1, 2), (4, 5)], [(9, 10)], [(6, 7, 8)]]
    lengths = [5, 6, 8, 9, 9, 9, 9, 9, 9, 9, 9]  # 5 + 6: 1 of 12 padding; 5 + 6 + 8: 5 of 24
    plan = plan_prefixes([tuple(range(100 * k, 100 * k + n)) for k, n in enumerate(lengths)])
    sizes = [[plan.new_length(i) for i in b] for b in wave_batches(plan, max_tokens=32, max_slots=64)]
    assert sizes == [[5, 6], [8, 9, 9], [9, 9, 9], [9, 9, 9]]


def test_prefix_plan_computes_each_shared_prefix_once():
    plan = plan_prefixes([(5, 6, 7, 8), (5, 6, 9), (5, 6, 7, 1, 2), (4,), (5, 6, 7, 8, 3)])
    assert plan.sequences == [(4,), (5, 6, 7, 1, 2), (5, 6, 7, 8), (5, 6, 7, 8, 3), (5, 6, 9)]
    assert plan.shared == [0, 0, 3, 4, 2]
    assert plan.waves == [0, 0, 1, 2, 1]
    assert plan.paths[3] == [Segment(1, 0, 3), Segment(2, 3, 4), Segment(3, 4, 5)]
    assert plan.keep == [0, 3, 1, 0, 0]  # (5, 6, 7) for sequences 2-4, (8) for sequence 3
    assert plan.new_tokens() == 1 + 5 + 1 + 1 + 1
    assert [[plan.sequences[i] for i in b] for b in wave_batches(plan, 8, 8)] == [
        [(4,)], [(5, 6, 7, 1, 2)], [(5, 6, 9), (5, 6, 7, 8)], [(5, 6, 7, 8, 3)]]
    assert plan_prefixes(plan.sequences, share=False).new_tokens() == 18


@pytest.mark.parametrize("config", ["tiny_gpt2_config", "tiny_llama_config", "tiny_gemma3_config"])
def test_shared_prefixes_give_the_states_of_whole_texts(config, request):
    """Texts with shared prefixes of 1 to 9 tokens, in three waves, some longer than Gemma's
    window of 5: the states equal those of every text computed whole, up to float rounding
    (other GEMM shapes; a masked attention over cached keys instead of a causal one)."""
    torch.manual_seed(0)
    cfg = request.getfixturevalue(config) if config != "tiny_gemma3_config" else TINY_GEMMA3
    model = SequenceClassifier(build_model(cfg), 2).eval()
    apply_trainable(model.backbone, "last-block")
    start = cache_start(model)
    head = torch.randint(11, cfg.vocab_size, (9,)).tolist()
    texts = [head + [7, 8], head[:4] + [9], head + [7, 8, 1, 2, 3], head[:1] + [4, 4], [3, 3, 3],
             head + [7], head[:4] + [9, 5, 6, 7, 8, 9, 10], head + [7, 8, 1, 2, 3]]
    shared = ActivationStore(model, texts, start, torch.device("cpu"), max_tokens=12)
    whole = ActivationStore(model, texts, start, torch.device("cpu"), max_tokens=12, share_prefixes=False)
    scale = float(np.abs(whole.states).max())
    for text in texts:
        a, b = (torch.from_numpy(np.asarray(s.states[slice(*s.spans[tuple(text)])])) for s in (shared, whole))
        torch.testing.assert_close(a, b, rtol=0, atol=2**-16 * scale)


def test_activation_store_computes_a_repeated_text_once(tiny_gpt2_config):
    torch.manual_seed(0)
    model = SequenceClassifier(build_model(tiny_gpt2_config), 2).eval()
    apply_trainable(model.backbone, "last-block")
    store = ActivationStore(model, [[5, 6, 7], [8, 9], [5, 6, 7], [8, 9, 10, 11]], 1, torch.device("cpu"))
    assert store.states.shape == (3 + 2 + 4, 64)
    b = model.backbone
    ids = torch.tensor([[8, 9, 10, 11]])
    expected = b.run_blocks(b.embed(ids, b.default_positions(ids, None)), b.default_positions(ids, None), stop=1)
    begin, end = store.spans[(8, 9, 10, 11)]
    torch.testing.assert_close(torch.from_numpy(store.states[begin:end]), expected[0].detach())
