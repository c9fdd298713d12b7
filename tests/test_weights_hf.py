"""Hugging Face checkpoints <-> our models: same weights give the same logits as `transformers`,
in both directions, and every broken folder fails with a one-line LlmftError."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from llmft.errors import LlmftError
from llmft.models import ModelConfig, RopeScaling, build_model
from llmft.weights.huggingface import config_from_hf, config_to_hf, export_hf, load_hf_folder

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()

VOCAB = 96
SMALL = dict(vocab_size=VOCAB, context_length=64, emb_dim=64, n_layers=2, n_heads=4)
OUR_CONFIGS = {
    "gpt2": ModelConfig(name="gpt2", architecture="gpt2", qkv_bias=True, bias=True,
                        tie_embeddings=True, **SMALL),
    "gpt2-untied": ModelConfig(name="gpt2-untied", architecture="gpt2", qkv_bias=True, bias=True,
                               **SMALL),
    "llama": ModelConfig(name="llama", architecture="llama", n_kv_heads=2, hidden_dim=96,
                         rope_theta=500000.0, **SMALL),
    "llama3-rope": ModelConfig(name="llama3-rope", architecture="llama", n_kv_heads=2,
                               hidden_dim=96, tie_embeddings=True,
                               rope_scaling=RopeScaling(8.0, 1.0, 4.0, 16), **SMALL),
    "qwen2": ModelConfig(name="qwen2", architecture="llama", n_kv_heads=1, hidden_dim=96,
                         qkv_bias=True, norm_eps=1e-6, rope_theta=1e6, tie_embeddings=True, **SMALL),
}


def hf_model(kind: str) -> torch.nn.Module:
    """A small random `transformers` model of each supported kind."""
    t = transformers
    llama_like = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, intermediate_size=96, max_position_embeddings=64)
    if kind == "gpt2":
        cfg = t.GPT2Config(vocab_size=VOCAB, n_positions=64, n_embd=64, n_layer=2, n_head=4,
                           bos_token_id=0, eos_token_id=0)
        model = t.GPT2LMHeadModel(cfg)
    elif kind == "llama":
        model = t.LlamaForCausalLM(t.LlamaConfig(**llama_like, rope_theta=500000.0))
    elif kind == "llama3-rope":
        scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                   "high_freq_factor": 4.0, "original_max_position_embeddings": 16}
        model = t.LlamaForCausalLM(t.LlamaConfig(**llama_like, rope_scaling=scaling,
                                                 tie_word_embeddings=True))
    else:
        model = t.Qwen2ForCausalLM(t.Qwen2Config(**llama_like, tie_word_embeddings=False))
    return perturbed(model)


def perturbed(model: torch.nn.Module) -> torch.nn.Module:
    """Noise on every parameter, so norms and biases are not their trivial initial values."""
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def ours_from(cfg: ModelConfig, state: dict[str, torch.Tensor]) -> torch.nn.Module:
    model = build_model(cfg)
    model.load_state_dict(state)
    return model.eval()


def assert_same_logits(ours: torch.nn.Module, hf: torch.nn.Module) -> None:
    ids = torch.randint(0, VOCAB, (2, 17), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = hf(ids).logits
        got = ours(ids)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("kind", ["gpt2", "llama", "llama3-rope", "qwen2"])
def test_hf_checkpoint_loads_with_same_logits(kind: str, tmp_path: Path) -> None:
    hf = hf_model(kind)
    hf.save_pretrained(tmp_path, safe_serialization=True)
    cfg, state = load_hf_folder(tmp_path)
    assert cfg.architecture == ("gpt2" if kind == "gpt2" else "llama")
    assert_same_logits(ours_from(cfg, state), hf)


@pytest.mark.parametrize("kind", list(OUR_CONFIGS))
def test_export_loads_in_transformers_with_same_logits(kind: str, tmp_path: Path) -> None:
    torch.manual_seed(0)
    ours = perturbed(build_model(OUR_CONFIGS[kind]))
    export_hf(ours, tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["config.json", "model.safetensors"]
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert_same_logits(ours, hf)
    # ...and back: export -> load gives the same config and tensors.
    cfg, state = load_hf_folder(tmp_path / "out")
    assert cfg == OUR_CONFIGS[kind].with_(name="out")
    for key, value in ours.state_dict().items():
        torch.testing.assert_close(state[key], value, atol=0, rtol=0)


@pytest.mark.parametrize("kind", list(OUR_CONFIGS))
def test_config_round_trip(kind: str) -> None:
    cfg = OUR_CONFIGS[kind]
    assert config_from_hf(json.loads(json.dumps(config_to_hf(cfg))), cfg.name) == cfg


def test_sharded_checkpoint(tmp_path: Path) -> None:
    hf = hf_model("llama")
    hf.save_pretrained(tmp_path, safe_serialization=True, max_shard_size="40KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 2
    cfg, state = load_hf_folder(tmp_path)
    assert_same_logits(ours_from(cfg, state), hf)


def test_gpt2_hub_layout_without_prefix_and_with_mask_buffers(tmp_path: Path) -> None:
    """The hub's GPT-2 file stores `h.0.attn.c_attn.weight` (no `transformer.`) plus causal masks."""
    hf = hf_model("gpt2")
    hf.save_pretrained(tmp_path, safe_serialization=True)
    tensors = load_file(tmp_path / "model.safetensors")
    bare = {k.removeprefix("transformer."): v for k, v in tensors.items()}
    bare["h.0.attn.bias"] = torch.ones(1, 1, 64, 64).tril()
    save_file(bare, tmp_path / "model.safetensors", metadata={"format": "pt"})
    cfg, state = load_hf_folder(tmp_path)
    assert_same_logits(ours_from(cfg, state), hf)


def test_mistral_and_qwen_sliding_windows_cap_the_context() -> None:
    base = config_to_hf(OUR_CONFIGS["llama"])
    mistral = {**base, "model_type": "mistral", "sliding_window": 32}
    assert config_from_hf(mistral, "m").context_length == 32
    qwen = {**config_to_hf(OUR_CONFIGS["qwen2"]), "sliding_window": 16}
    assert config_from_hf(qwen, "q").context_length == 64  # use_sliding_window is off
    assert config_from_hf({**qwen, "use_sliding_window": True}, "q").context_length == 16


def test_transformers5_rope_parameters_are_read() -> None:
    hf = hf_model("llama3-rope").config.to_dict()
    assert "rope_parameters" in hf or "rope_scaling" in hf
    cfg = config_from_hf(hf, "x")
    assert cfg.rope_scaling == RopeScaling(8.0, 1.0, 4.0, 16) and cfg.tie_embeddings


# -- errors ----------------------------------------------------------------------------------

@pytest.fixture
def llama_folder(tmp_path: Path) -> Path:
    hf_model("llama").save_pretrained(tmp_path / "m", safe_serialization=True)
    return tmp_path / "m"


def test_missing_config(llama_folder: Path) -> None:
    (llama_folder / "config.json").unlink()
    with pytest.raises(LlmftError, match=r"m: no config.json \(not a Hugging Face model folder\)"):
        load_hf_folder(llama_folder)


def test_pickle_only_folder_is_refused(llama_folder: Path) -> None:
    (llama_folder / "model.safetensors").unlink()
    (llama_folder / "pytorch_model.bin").write_bytes(b"not even read")
    with pytest.raises(LlmftError, match=r"pytorch_model.bin: pickle checkpoints are refused"):
        load_hf_folder(llama_folder)


def test_missing_weights(llama_folder: Path) -> None:
    (llama_folder / "model.safetensors").unlink()
    with pytest.raises(LlmftError, match=r"no model.safetensors or model.safetensors.index.json"):
        load_hf_folder(llama_folder)


def test_unsupported_model_type(llama_folder: Path) -> None:
    config = json.loads((llama_folder / "config.json").read_text())
    (llama_folder / "config.json").write_text(json.dumps({**config, "model_type": "bert"}))
    with pytest.raises(LlmftError, match=r"config.json: model_type 'bert' is not supported; "
                                         r"expected one of gpt2, llama, mistral, qwen2"):
        load_hf_folder(llama_folder)


def test_unsupported_rope_scaling_names_the_field() -> None:
    hf = {**config_to_hf(OUR_CONFIGS["llama"]), "rope_scaling": {"rope_type": "yarn", "factor": 4}}
    with pytest.raises(LlmftError, match=r"x/config.json: rope_scaling=.*yarn.* is not supported"):
        config_from_hf(hf, "x", source="x/config.json")


def test_missing_field_names_it() -> None:
    hf = config_to_hf(OUR_CONFIGS["gpt2"])
    del hf["n_embd"]
    with pytest.raises(LlmftError, match=r"config.json: missing field n_embd"):
        config_from_hf(hf, "x")


def test_shape_mismatch_names_file_and_tensor(llama_folder: Path) -> None:
    config = json.loads((llama_folder / "config.json").read_text())
    (llama_folder / "config.json").write_text(json.dumps({**config, "intermediate_size": 128}))
    with pytest.raises(LlmftError, match=r"model.safetensors: tensor model.layers.0.mlp.gate_proj"
                                         r".weight has shape \(96, 64\), expected \(128, 64\)"):
        load_hf_folder(llama_folder)


def test_missing_and_unexpected_tensors(llama_folder: Path) -> None:
    path = llama_folder / "model.safetensors"
    tensors = load_file(path)
    save_file({k: v for k, v in tensors.items() if k != "model.norm.weight"}, path)
    with pytest.raises(LlmftError, match=r"model.safetensors: missing tensor model.norm.weight"):
        load_hf_folder(llama_folder)
    save_file({**tensors, "model.extra.weight": torch.zeros(2)}, path)
    with pytest.raises(LlmftError, match=r"model.safetensors: unexpected tensor model.extra.weight"):
        load_hf_folder(llama_folder)


def test_sharded_checkpoint_with_missing_shard(tmp_path: Path) -> None:
    hf_model("llama").save_pretrained(tmp_path, safe_serialization=True, max_shard_size="40KB")
    shard = sorted(tmp_path.glob("model-*.safetensors"))[0]
    shard.unlink()
    with pytest.raises(LlmftError, match=rf"index.json: shard {shard.name} not found"):
        load_hf_folder(tmp_path)


def test_corrupt_safetensors(llama_folder: Path) -> None:
    (llama_folder / "model.safetensors").write_bytes(b"\x00garbage")
    with pytest.raises(LlmftError, match=r"model.safetensors: not a readable safetensors file"):
        load_hf_folder(llama_folder)


def test_export_refuses_parameters_without_hf_equivalent(tmp_path: Path) -> None:
    model = build_model(OUR_CONFIGS["llama"])
    model.extra = torch.nn.Linear(2, 2)
    with pytest.raises(LlmftError, match=r"extra\.(weight|bias) has no Hugging Face equivalent"):
        export_hf(model, tmp_path / "out")
    assert not (tmp_path / "out" / "model.safetensors").exists()


def test_export_overwrites_atomically(tmp_path: Path) -> None:
    model = build_model(OUR_CONFIGS["gpt2"])
    export_hf(model, tmp_path)
    export_hf(model, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]
    shutil.rmtree(tmp_path)
