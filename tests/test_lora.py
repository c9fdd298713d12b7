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
