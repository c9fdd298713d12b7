"""LoRA (book appendix E): parameter counts, exactness at B = 0, merging, gradients, adapters,
tied embeddings, and LoRA runs saved, reloaded and merged through the classification pipeline."""

from __future__ import annotations

import copy

import pytest
import torch

from llmft.errors import LlmftError
from llmft.models import build_model, get_config
from llmft.training.activation_cache import cache_start
from llmft.training.heads import SequenceClassifier
from llmft.training.lora import (
    LinearWithLoRA, LoRAConfig, apply_lora, load_lora_state_dict, lora_state_dict, merge_lora,
)


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models gain nothing from a second thread, and on a busy 2-core machine the threads
    mostly wait for each other (ten times slower here)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tokens(vocab: int = 1000) -> torch.Tensor:
    return torch.randint(0, vocab, (2, 12), generator=torch.Generator().manual_seed(0))


def randomize_b(model: torch.nn.Module) -> None:
    """Give every B values, as training would (B = 0 makes every check trivial)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora.B"):
                p.normal_(0, 0.05)


@pytest.fixture(params=["gpt2", "llama"])
def tiny_config(request, tiny_gpt2_config, tiny_llama_config):
    return tiny_gpt2_config if request.param == "gpt2" else tiny_llama_config


# -- counts --------------------------------------------------------------------------------------

def test_gpt2_medium_all_linear_rank_16_has_the_books_count():
    with torch.device("meta"):
        model = build_model(get_config("gpt2-medium"))
    assert apply_lora(model, LoRAConfig(rank=16, targets=("all-linear",))) == 7_898_384
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 7_898_384


def test_gpt2_small_spam_classifier_has_the_books_count():
    """Appendix E: head replaced, everything frozen, every Linear wrapped: 2,666,528 trainable."""
    with torch.device("meta"):
        model = SequenceClassifier(build_model(get_config("gpt2-small")), 2)
    assert apply_lora(model.backbone, LoRAConfig(rank=16, alpha=16)) == 2_666_528
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 2_666_528


@pytest.mark.parametrize("targets, per_block", [
    (("query", "value"), ["attn.query", "attn.value"]),
    (("attn",), ["attn.query", "attn.key", "attn.value", "attn.proj"]),
    (("attn-out",), ["attn.proj"]),
    (("mlp",), ["mlp.gate", "mlp.up", "mlp.down"]),
])
def test_targets_name_layers(tiny_llama_config, targets, per_block):
    model = build_model(tiny_llama_config)
    apply_lora(model, LoRAConfig(targets=targets))
    wrapped = {n for n, m in model.named_modules() if isinstance(m, LinearWithLoRA)}
    assert wrapped == {f"blocks.{i}.{p}" for i in range(2) for p in per_block}


def test_head_and_block_targets(tiny_gpt2_config):
    model = build_model(tiny_gpt2_config)
    apply_lora(model, LoRAConfig(targets="head,blocks.1"))
    wrapped = {n for n, m in model.named_modules() if isinstance(m, LinearWithLoRA)}
    assert wrapped == {"out_head", *(f"blocks.1.{p}" for p in ("attn.query", "attn.key", "attn.value",
                                                              "attn.proj", "mlp.fc", "mlp.proj"))}


# -- exactness -----------------------------------------------------------------------------------

def test_zero_b_is_the_base_model_exactly(tiny_config):
    torch.manual_seed(0)
    base = build_model(tiny_config).eval()
    wrapped = copy.deepcopy(base)
    apply_lora(wrapped, LoRAConfig(rank=4, alpha=8))
    x = tokens()
    assert torch.equal(wrapped(x), base(x))


def test_merged_equals_unmerged(tiny_config):
    torch.manual_seed(0)
    model = build_model(tiny_config).eval()
    apply_lora(model, LoRAConfig(rank=4, alpha=8, dropout=0.1))
    randomize_b(model)
    x = tokens()
    unmerged = model(x)
    merge_lora(model)
    assert not any(isinstance(m, LinearWithLoRA) for m in model.modules())
    assert all(type(m) is torch.nn.Linear for n, m in model.named_modules() if n.endswith(("query", "out_head")))
    torch.testing.assert_close(model(x), unmerged, atol=1e-5, rtol=0)


def test_tied_head_stays_tied_while_wrapped_and_merges_into_an_untied_copy(tiny_gpt2_config):
    torch.manual_seed(0)
    model = build_model(tiny_gpt2_config).eval()
    assert model.cfg.tie_embeddings
    apply_lora(model, LoRAConfig(rank=4, targets=("head",)))
    assert model.out_head.linear.weight is model.tok_emb.weight
    assert not model.tok_emb.weight.requires_grad
    randomize_b(model)
    embedding = model.tok_emb.weight.detach().clone()
    x = tokens()
    unmerged = model(x)
    merge_lora(model)
    assert torch.equal(model.tok_emb.weight, embedding)
    assert model.out_head.weight is not model.tok_emb.weight
    assert not model.cfg.tie_embeddings
    torch.testing.assert_close(model(x), unmerged, atol=1e-5, rtol=0)


@pytest.mark.parametrize("target", ["key", "value"])
def test_a_wrapped_key_or_value_is_never_absorbed(tiny_gpt2_config, target, monkeypatch):
    """The classifier's last block absorbs plain key/value weights into its one query; a LoRA
    key or value must take the plain path instead, or its update would be dropped."""
    from llmft.models.transformer import CausalSelfAttention

    torch.manual_seed(0)
    model = SequenceClassifier(build_model(tiny_gpt2_config), 2).eval()
    ids, lengths = tokens(), torch.tensor([12, 7])
    absorbed = []
    real = CausalSelfAttention.absorbed_attention
    monkeypatch.setattr(CausalSelfAttention, "absorbed_attention", lambda *a: absorbed.append(1) or real(*a))
    model(ids, lengths)
    assert absorbed  # plain weights: absorbed
    apply_lora(model.backbone, LoRAConfig(rank=4, targets=(f"blocks.1.attn.{target}",)))
    randomize_b(model)
    absorbed.clear()
    pruned = model(ids, lengths)
    assert not absorbed
    model.token_only_last_block = False
    torch.testing.assert_close(pruned, model(ids, lengths))


# -- what trains ---------------------------------------------------------------------------------

def grads(model: torch.nn.Module) -> set[str]:
    return {n for n, p in model.named_parameters() if p.grad is not None}


def test_gradients_reach_only_the_adapters(tiny_config):
    model = build_model(tiny_config)
    apply_lora(model, LoRAConfig(rank=4))
    randomize_b(model)  # at B = 0 no gradient reaches A
    model(tokens()).sum().backward()
    assert grads(model) == {n for n, _ in model.named_parameters() if n.endswith(("lora.A", "lora.B"))}


def test_classifier_gradients_reach_adapters_and_the_new_head(tiny_gpt2_config):
    """The pipeline's rule: a head that is no LoRA target trains fully beside the adapters."""
    model = SequenceClassifier(build_model(tiny_gpt2_config), 2)
    apply_lora(model.backbone, LoRAConfig(rank=4, targets=("query", "value")))
    model.backbone.out_head.requires_grad_(True)
    model(tokens(), torch.tensor([12, 7])).sum().backward()
    assert grads(model) == {n for n, _ in model.named_parameters()
                            if n.endswith(("lora.A", "lora.B")) or n.startswith("backbone.out_head.")}


def test_activation_cache_starts_at_the_first_adapter(tiny_gpt2_config):
    def start(targets):
        model = SequenceClassifier(build_model(tiny_gpt2_config.with_(n_layers=3)), 2)
        apply_lora(model.backbone, LoRAConfig(targets=targets))
        return cache_start(model)

    assert start(("all-linear",)) == 0
    assert start(("blocks.2",)) == 2
    assert start(("head",)) == 3


# -- adapters ------------------------------------------------------------------------------------

def test_adapter_state_holds_only_a_and_b_and_round_trips(tiny_gpt2_config):
    torch.manual_seed(0)
    model = build_model(tiny_gpt2_config)
    apply_lora(model, LoRAConfig(rank=4, targets=("query", "mlp")))
    randomize_b(model)
    state = {k: v.clone() for k, v in lora_state_dict(model).items()}
    assert len(state) == 2 * 3 * 2 and all(k.endswith(("lora.A", "lora.B")) for k in state)
    other = build_model(tiny_gpt2_config)
    apply_lora(other, LoRAConfig(rank=4, targets=("query", "mlp")))
    load_lora_state_dict(other, state)
    assert all(torch.equal(v, state[k]) for k, v in lora_state_dict(other).items())


def test_adapter_state_with_a_task_head(tiny_gpt2_config):
    model = SequenceClassifier(build_model(tiny_gpt2_config), 2)
    apply_lora(model.backbone, LoRAConfig(rank=4, targets=("query",)))
    state = lora_state_dict(model, also=("backbone.out_head",))
    assert {"backbone.out_head.weight", "backbone.out_head.bias"} < set(state)


# -- mistakes --------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, message", [
    (dict(rank=0), "--lora-rank must be a positive integer"),
    (dict(rank=-4), "--lora-rank must be a positive integer"),
    (dict(alpha=0), "--lora-alpha must be positive"),
    (dict(dropout=1.0), "--lora-dropout must be in"),
    (dict(targets=("query", "")), "--lora-targets"),
])
def test_bad_config(kwargs, message):
    with pytest.raises(LlmftError, match=message):
        LoRAConfig(**kwargs)


def test_target_matching_no_layer(tiny_gpt2_config):
    with pytest.raises(LlmftError, match="'gate' matches no Linear layer of tiny-gpt2"):
        apply_lora(build_model(tiny_gpt2_config), LoRAConfig(targets=("query", "gate")))


def test_adapter_onto_a_base_of_other_shape(tiny_gpt2_config):
    model = build_model(tiny_gpt2_config)
    apply_lora(model, LoRAConfig(rank=4))
    wider = build_model(tiny_gpt2_config.with_(emb_dim=128))
    apply_lora(wider, LoRAConfig(rank=4))
    with pytest.raises(LlmftError, match=r"blocks\.0\.attn\.key\.lora\.A has shape \(64, 4\), expected \(128, 4\)"):
        load_lora_state_dict(wider, lora_state_dict(model))
    with pytest.raises(LlmftError, match="no LoRA layers"):
        load_lora_state_dict(build_model(tiny_gpt2_config), lora_state_dict(model))
    with pytest.raises(LlmftError, match="already has LoRA layers"):
        apply_lora(model, LoRAConfig())


# -- LoRA runs: save, load, predict, merge -------------------------------------------------------

@pytest.fixture
def hf_base(tmp_path, tiny_gpt2_config, gpt2_tokenizer):
    """A tiny random GPT-2 as a Hugging Face folder: a 'pretrained' base found by its path."""
    from llmft.weights import export_hf

    torch.manual_seed(3)
    folder = tmp_path / "tiny-gpt2-hf"
    export_hf(build_model(tiny_gpt2_config), folder)
    gpt2_tokenizer.save(folder)
    return folder


@pytest.fixture(scope="module")
def sms_slice(tmp_path_factory):
    """About 120 balanced SMS messages in the collection's own `label<TAB>text` format."""
    from llmft.data.classification import balance
    from llmft.data.sources import read_labelled_texts
    from tests.helpers import SMS

    path = tmp_path_factory.mktemp("data") / "sms.tsv"
    path.write_text("".join(f"{label}\t{text}\n" for text, label in balance(read_labelled_texts(SMS), 123)[::12]))
    return path


TEXTS = ["You have won a free prize! Call now to claim", "See you at lunch tomorrow?", "URGENT reply STOP"]


def classifier_logits(model, tokenizer, texts=TEXTS):
    from llmft.data.classification import collate_classification

    batch = collate_classification([(tokenizer.encode(t), 0) for t in texts], tokenizer.eos_id)
    with torch.no_grad():
        return model.eval()(batch["input_ids"], batch["lengths"])


def train_lora_classifier(monkeypatch, out, sms_slice, tiny_gpt2_config, base, **lora):
    """`train_classifier` with LoRA for a few steps; returns the trained in-memory model too."""
    from llmft.pipelines import classification
    from llmft.training.loop import TrainConfig

    saved = {}

    def capture(run_dir, model, tokenizer, meta):
        saved["model"] = model
        return classification_save(run_dir, model, tokenizer, meta)

    classification_save = classification.save_finetuned
    monkeypatch.setattr(classification, "save_finetuned", capture)
    if base == "random":
        model, init = "gpt2-small", dict(random_init=True, config_overrides={
            k: getattr(tiny_gpt2_config, k) for k in ("n_layers", "emb_dim", "n_heads", "context_length")})
    else:
        model, init = str(base), {}
    opts = classification.ClassifyOptions(
        model=model, data=str(sms_slice), out=out, max_length=32, finetune="lora", lora=LoRAConfig(**lora), **init,
        train=TrainConfig(epochs=1, batch_size=8, lr=1e-3, eval_freq=100, eval_iter=1, device="cpu"))
    results = classification.train_classifier(opts)
    return results, saved["model"]


def check_reload(run, trained, gpt2_tokenizer) -> None:
    """Loading the run gives the trained model's logits bit for bit; `predict` runs on it."""
    from llmft.checkpoint import load_finetuned
    from llmft.pipelines.classification import predict

    model, tokenizer, meta = load_finetuned(run)
    assert meta.lora == {"rank": 4, "alpha": 8, "dropout": 0.0, "targets": ["all-linear"]}
    expected = classifier_logits(trained, gpt2_tokenizer)
    assert torch.equal(classifier_logits(model, tokenizer), expected)
    assert [label for label, _ in predict(run, TEXTS, device="cpu")] == \
        [meta.labels[i] for i in expected.argmax(-1).tolist()]


def test_lora_classifier_on_a_pretrained_base_saves_the_adapter_reloads_and_merges(
        hf_base, sms_slice, tiny_gpt2_config, gpt2_tokenizer, tmp_path, monkeypatch):
    from llmft.checkpoint import load_finetuned
    from llmft.rundir import RunDir
    from llmft.cli import main

    run, merged = tmp_path / "run", tmp_path / "merged"
    results, trained = train_lora_classifier(monkeypatch, run, sms_slice, tiny_gpt2_config, hf_base, rank=4, alpha=8)
    # all-linear adapts every Linear; the new head (wrapped too) also trains fully.
    assert results["trainable_parameters"] == sum(p.numel() for n, p in trained.named_parameters()
                                                  if n.endswith(("lora.A", "lora.B")) or ".out_head." in n
                                                  and "lora" not in n)
    assert (run / RunDir.ADAPTER).is_file() and not (run / RunDir.WEIGHTS).exists()
    check_reload(run, trained, gpt2_tokenizer)

    assert main(["merge", str(run), "--out", str(merged), "--hf"]) == 2  # no HF form for a classifier
    assert main(["merge", str(run), "--out", str(merged)]) == 0
    assert not (merged / RunDir.ADAPTER).exists() and (merged / "test.csv").is_file()
    model, tokenizer, meta = load_finetuned(merged)
    assert meta.lora is None and not any(isinstance(m, LinearWithLoRA) for m in model.modules())
    torch.testing.assert_close(classifier_logits(model, tokenizer), classifier_logits(trained, gpt2_tokenizer),
                               atol=1e-5, rtol=0)
    assert main(["merge", str(merged), "--out", str(tmp_path / "again")]) == 2  # nothing left to merge


def test_lora_classifier_on_a_random_base_saves_the_base_too(sms_slice, tiny_gpt2_config, gpt2_tokenizer, tmp_path,
                                                             monkeypatch):
    from llmft.rundir import RunDir

    run = tmp_path / "run"
    _, trained = train_lora_classifier(monkeypatch, run, sms_slice, tiny_gpt2_config, "random", rank=4, alpha=8)
    assert (run / RunDir.ADAPTER).is_file() and (run / RunDir.WEIGHTS).is_file()  # random weights cannot be re-made
    check_reload(run, trained, gpt2_tokenizer)


def test_lora_head_outside_the_targets_trains_fully(hf_base, sms_slice, tiny_gpt2_config, tmp_path, monkeypatch):
    from safetensors.torch import load_file

    from llmft.rundir import RunDir

    results, trained = train_lora_classifier(monkeypatch, tmp_path / "run", sms_slice, tiny_gpt2_config, hf_base,
                                             rank=2, targets=("query", "value"))
    head = trained.backbone.out_head
    assert type(head) is torch.nn.Linear and head.weight.requires_grad
    assert results["trainable_parameters"] == 2 * 2 * 2 * (64 + 64) + head.weight.numel() + head.bias.numel()
    assert set(load_file(tmp_path / "run" / RunDir.ADAPTER)) == {
        *(f"backbone.blocks.{i}.attn.{m}.lora.{ab}" for i in range(2) for m in ("query", "value") for ab in "AB"),
        "backbone.out_head.weight", "backbone.out_head.bias"}


def test_instruction_lora_run_merges_into_a_hugging_face_folder(hf_base, tmp_path, monkeypatch):
    """Tied GPT-2 with its output head adapted: the run stores only the adapter, reloads bit for
    bit, and merges into an untied head without touching the embedding."""
    import json

    from llmft.checkpoint import load_finetuned
    from llmft.rundir import RunDir
    from llmft.cli import main
    from llmft.pipelines import instruction
    from llmft.weights import load_pretrained
    from tests.helpers import INSTRUCTIONS

    data, run, merged = tmp_path / "slice.json", tmp_path / "run", tmp_path / "merged"
    data.write_text(json.dumps(json.loads(INSTRUCTIONS.read_text())[:24]))
    saved = {}
    save = instruction.save_finetuned
    monkeypatch.setattr(instruction, "save_finetuned", lambda d, m, t, meta: save(d, saved.setdefault("model", m), t, meta))
    assert main(["instruct", "train", "--model", str(hf_base), "--data", str(data), "--out", str(run),
                 "--max-length", "64", "--epochs", "1", "--eval-iter", "1", "--lr", "1e-3", "--device", "cpu",
                 "--finetune", "lora", "--lora-rank", "4", "--lora-targets", "attn,head"]) == 0
    assert not (run / RunDir.WEIGHTS).exists()
    assert (run / RunDir.ADAPTER).stat().st_size < 1_000_000  # the base model is 13 MB
    x = tokens()
    expected = saved["model"].eval()(x)
    loaded, _, meta = load_finetuned(run)
    assert meta.lora["targets"] == ["attn", "head"]
    assert torch.equal(loaded(x), expected)

    assert main(["merge", str(run), "--out", str(merged), "--hf"]) == 0
    base = load_pretrained(str(hf_base)).model
    exported = load_pretrained(str(merged / "hf"))
    assert not exported.config.tie_embeddings
    assert torch.equal(exported.model.tok_emb.weight, base.tok_emb.weight)
    assert not torch.equal(exported.model.out_head.weight, base.out_head.weight)
    torch.testing.assert_close(exported.model(x), expected, atol=1e-5, rtol=0)
    merged_model, _, _ = load_finetuned(merged)
    torch.testing.assert_close(merged_model(x), expected, atol=1e-5, rtol=0)


def test_adapter_onto_a_changed_base_fails(hf_base, tiny_gpt2_config, gpt2_tokenizer, tmp_path):
    from llmft.checkpoint import load_finetuned, save_finetuned
    from llmft.rundir import RunDir, RunMeta
    from llmft.weights import export_hf, load_pretrained

    base = load_pretrained(str(hf_base))
    apply_lora(base.model, LoRAConfig(rank=4))
    run = tmp_path / "run"
    run.mkdir()
    save_finetuned(RunDir(run), base.model, base.tokenizer,
                   RunMeta(task="instruction", model=str(hf_base), model_config=base.config.to_dict(), max_length=64,
                           prompt_style="alpaca", lora=LoRAConfig(rank=4).to_dict()))
    export_hf(build_model(tiny_gpt2_config.with_(emb_dim=128)), hf_base)  # the base changed since
    with pytest.raises(LlmftError, match="emb_dim=128, but the run's adapter was trained on a base with emb_dim=64"):
        load_finetuned(run)


def test_cli_rejects_a_bad_rank(hf_base, sms_slice, tmp_path, capsys):
    from llmft.cli import main

    code = main(["classify", "train", "--model", str(hf_base), "--data", str(sms_slice),
                 "--out", str(tmp_path / "run"), "--finetune", "lora", "--lora-rank", "0"])
    assert code == 2
    assert capsys.readouterr().err.strip() == "error: --lora-rank must be a positive integer, got 0"


def test_classification_lora_keeps_the_new_head_fully_trainable():
    """Issue 5: the pretrained model is adapted; the new head trains fully, even when wrapped."""
    from llmft.pipelines.classification import ClassifyOptions, surgery

    with torch.device("meta"):
        model = SequenceClassifier(build_model(get_config("gpt2-small")), 2)
    surgery(model, ClassifyOptions(finetune="lora", lora=LoRAConfig(rank=16, alpha=16)))
    head = model.backbone.out_head
    assert isinstance(head, LinearWithLoRA) and head.linear.weight.requires_grad and head.linear.bias.requires_grad
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 2_666_528 + 768 * 2 + 2
