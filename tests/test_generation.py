import pytest
import torch

from llmft.errors import LlmftError
from llmft import generation
from llmft.generation import (
    SHARED_PREFIX_MIN_TOKENS, accept_draft, attention_mask, decoding_session, generate, generate_tokens,
    prompt_lookup_draft, sample_next_token, stream_text, stream_tokens,
)
from llmft.models import build_model, get_config
from llmft.models.prepacked import can_prepack, prepacked_linears
from llmft.training.lora import LoRAConfig, apply_lora
from llmft.tokenizers import GPT2Tokenizer

from tests.conftest import DATA  # $LLMFT_DATA_DIR or ../shared/data
CONFIGS = {
    "gpt2": get_config("gpt2-small").with_(n_layers=2, emb_dim=64, n_heads=4, context_length=128),
    "llama": get_config("smollm2-135m").with_(n_layers=2, emb_dim=64, n_heads=4, n_kv_heads=2,
                                              hidden_dim=128, context_length=128, vocab_size=50257),
}
PROMPTS = [list(range(100, 117)), [5, 6, 7], [42] * 9, [300, 301, 302, 303, 304, 305, 306]]


def chaotic_model(arch, dtype=torch.float64):
    """A tiny random model whose next token depends on the whole context: untied, larger
    weights (the default init with tied embeddings mostly repeats the last token, which would
    hide masking or position mistakes)."""
    torch.manual_seed(0)
    model = build_model(CONFIGS[arch].with_(tie_embeddings=False))
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.35)
    return model.to(dtype).eval()


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def model(request):
    return chaotic_model(request.param)


@pytest.fixture(scope="module")
def tokenizer():
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LLMFT_DATA_DIR", str(DATA))
        return GPT2Tokenizer.default()


def test_models_are_context_sensitive(model):
    """Guards the tests below: padding without a mask must change the result."""
    ids = torch.tensor([PROMPTS[1]])
    padded = torch.tensor([[0, 0] + PROMPTS[1]])
    key_valid = torch.tensor([[False, False, True, True, True]])
    positions = torch.tensor([[0, 0, 0, 1, 2]])
    alone = model(ids)[0, -1]
    masked = model(padded, positions=positions, mask=attention_mask(key_valid, 0, 5))[0, -1]
    unmasked = model(padded)[0, -1]
    torch.testing.assert_close(masked, alone)
    assert (unmasked - alone).abs().max() > 1e-2
    assert len(set(generate_tokens(model, [PROMPTS[1]], max_new_tokens=20)[0])) > 3


def test_cached_equals_uncached(model):
    cached = generate_tokens(model, PROMPTS, max_new_tokens=16, use_cache=True)
    uncached = generate_tokens(model, PROMPTS, max_new_tokens=16, use_cache=False)
    assert cached == uncached
    assert [len(t) for t in cached] == [16] * 4


def test_cached_equals_uncached_float32():
    model = chaotic_model("llama", torch.float32)
    assert (generate_tokens(model, PROMPTS[:1], max_new_tokens=16)
            == generate_tokens(model, PROMPTS[:1], max_new_tokens=16, use_cache=False))


def test_batched_equals_one_at_a_time(model):
    alone = [generate_tokens(model, [p], max_new_tokens=16)[0] for p in PROMPTS]
    assert generate_tokens(model, PROMPTS, max_new_tokens=16) == alone
    assert generate_tokens(model, PROMPTS, max_new_tokens=16, use_cache=False) == alone


def test_finished_rows_leave_the_batch(model):
    alone = [generate_tokens(model, [p], max_new_tokens=16)[0] for p in PROMPTS]
    eos = alone[1][3]  # row 1 stops at its 4th token; the others stop where they meet it, if ever
    expected = [t[:t.index(eos)] if eos in t else t for t in alone]
    for use_cache in (True, False):
        assert generate_tokens(model, PROMPTS, max_new_tokens=16, eos_ids=[eos], use_cache=use_cache) == expected


SHARED = list(range(200, 220))  # a 20-token "system prompt" that every prompt below begins with
SUFFIXES = [[7, 8, 9], [31] * 6, [500, 501]]


def embedded(model):
    """The number of token ids each forward pass embeds (a list that grows), and its hook."""
    counts = []
    return counts, model.tok_emb.register_forward_hook(lambda m, args, out: counts.append(args[0].numel()))


def test_shared_prefix_runs_once_and_keeps_the_output(model):
    """A batch runs its common prefix once, then the rest of every row; one prompt after another
    in a session reuses the prefix it shares with the one before. Same tokens as alone."""
    assert len(SHARED) >= SHARED_PREFIX_MIN_TOKENS
    prompts = [SHARED + s for s in SUFFIXES]
    alone = [generate_tokens(model, [p], max_new_tokens=12)[0] for p in prompts]  # a fresh session each
    counts, hook = embedded(model)
    try:
        assert generate_tokens(model, prompts, max_new_tokens=12) == alone
        assert counts[:2] == [len(SHARED), 3 * max(map(len, SUFFIXES))]  # the prefix once, then the rest of each row
        with decoding_session(model):
            for i, (p, expected) in enumerate(zip(prompts, alone)):
                counts.clear()
                assert generate_tokens(model, [p], max_new_tokens=12) == [expected]
                assert counts[0] == (len(p) if i == 0 else len(p) - len(SHARED))  # the prefill
    finally:
        hook.remove()


@pytest.mark.parametrize("window", [5, 64])
def test_shared_prefix_under_a_sliding_window(window):
    """Gemma 3's window counts slots: the prefix is shared only where the window cannot reach
    past it (64 > every slot), and not with a window of 5, where the padding after the prefix
    would hide keys that a row alone sees."""
    cfg = get_config("gemma3-270m").with_(n_layers=3, emb_dim=64, n_heads=4, n_kv_heads=2, head_dim=16,
                                          hidden_dim=96, vocab_size=1000, context_length=64,
                                          query_pre_attn_scalar=16, sliding_window=window, sliding_window_pattern=3)
    torch.manual_seed(0)
    gemma = build_model(cfg)
    with torch.no_grad():
        for p in gemma.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.35)
    gemma = gemma.double().eval()
    prompts = [SHARED + s for s in SUFFIXES]
    alone = [generate_tokens(gemma, [p], max_new_tokens=12)[0] for p in prompts]
    counts, hook = embedded(gemma)
    try:
        assert generate_tokens(gemma, prompts, max_new_tokens=12) == alone
    finally:
        hook.remove()
    assert counts[0] == (len(SHARED) if window == 64 else 3 * (len(SHARED) + 6))


BOOK_TOKENS = 150  # the longest case below; greedy decoding makes the shorter ones its prefixes
LONG_PROMPT = [(7 * i) % 5000 for i in range(300)]  # longer than the context of 128


def book_generate(model, ids, max_new_tokens):
    """The book's `generate` (chapter 5), greedy: every new token from the last context_size tokens."""
    idx, context = list(ids), model.cfg.context_length
    with torch.no_grad():
        for _ in range(max_new_tokens):
            idx.append(int(model(torch.tensor([idx[-context:]]))[0, -1].argmax()))
    return idx[len(ids):]


@pytest.fixture(scope="module")
def book_answers(model):
    """The book's BOOK_TOKENS new tokens for the long prompt and a short one, once per model."""
    return [book_generate(model, p, BOOK_TOKENS) for p in (LONG_PROMPT, PROMPTS[0])]


@pytest.mark.parametrize("max_new_tokens", [28, 128, BOOK_TOKENS])
def test_prompt_and_new_tokens_past_the_context_follow_the_book(model, book_answers, max_new_tokens, caplog):
    """Issue 18: a prompt longer than the context is cropped to its last tokens, and new tokens
    at or past the context are each decided from the last context_length tokens, the book's
    way (before, the prompt was cut to leave room for every new token, and max_new_tokens at
    or above the context was refused)."""
    expected = [answer[:max_new_tokens] for answer in book_answers]
    with caplog.at_level("INFO", logger="llmft"):
        for use_cache in (True, False):
            assert generate_tokens(model, [LONG_PROMPT, PROMPTS[0]], max_new_tokens=max_new_tokens,
                                   use_cache=use_cache) == expected
        assert generate_tokens(model, [LONG_PROMPT], max_new_tokens=max_new_tokens) == expected[:1]
    notes = {r.getMessage() for r in caplog.records}
    assert ("note: a prompt of 300 tokens is longer than the model's context of 128 tokens; it is cropped to its "
            "last 128 tokens") in notes
    assert any("reach past the model's context of 128 tokens" in n for n in notes)


def test_top_k_1_sampling_equals_greedy(model):
    greedy = generate_tokens(model, PROMPTS, max_new_tokens=15)
    gen = torch.Generator().manual_seed(1)
    assert generate_tokens(model, PROMPTS, max_new_tokens=15, temperature=1.5, top_k=1, generator=gen) == greedy
    gen = torch.Generator().manual_seed(1)
    assert generate_tokens(model, PROMPTS, max_new_tokens=15, temperature=1.5, top_p=1e-9, generator=gen) == greedy


def test_text_generation_seeds_and_order(model, tokenizer):
    prompts = ["Every effort moves you", "Hello", "The capital of France is a city that"]
    kwargs = dict(max_new_tokens=12, temperature=1.0, top_k=50, top_p=0.95, batch_size=2)
    a = generate(model, tokenizer, prompts, seed=123, **kwargs)
    assert a == generate(model, tokenizer, prompts, seed=123, **kwargs)
    assert a != generate(model, tokenizer, prompts, seed=124, **kwargs)
    greedy = generate(model, tokenizer, prompts, max_new_tokens=12, batch_size=2)
    assert greedy == [generate(model, tokenizer, [p], max_new_tokens=12)[0] for p in prompts]
    ids = [tokenizer.encode(p) for p in prompts]
    assert generate(model, tokenizer, ids, max_new_tokens=12) == greedy


def test_stop_strings_cut_and_stop(model, tokenizer):
    prompt = "Every effort moves you"
    full_tokens = generate_tokens(model, [tokenizer.encode(prompt)], max_new_tokens=30)[0]
    full = tokenizer.decode(full_tokens)
    assert full == generate(model, tokenizer, [prompt], max_new_tokens=30)[0]
    stop = tokenizer.decode(full_tokens[8:10])
    expected = full[:full.index(stop)]
    assert generate(model, tokenizer, [prompt], max_new_tokens=30, stop_strings=["\x00never", stop]) == [expected]

    seen = []

    def is_done(tokens):
        seen.append(len(tokens))
        return stop in tokenizer.decode(tokens)

    generate_tokens(model, [tokenizer.encode(prompt)], max_new_tokens=30, is_done=is_done)
    assert max(seen) <= 10  # generation ended once the stop string was complete


def test_eos_id_default_and_lists(model, tokenizer):
    prompt = tokenizer.encode("Every effort moves you")
    tokens = generate_tokens(model, [prompt], max_new_tokens=20)[0]
    eos = tokens[5]
    expected = tokenizer.decode(tokens[:tokens.index(eos)])
    assert generate(model, tokenizer, [prompt], max_new_tokens=20, eos_id=eos) == [expected]
    assert generate(model, tokenizer, [prompt], max_new_tokens=20, eos_id=[50256, eos]) == [expected]


def test_model_state_is_restored(model, tokenizer):
    model.train()
    try:
        generate(model, tokenizer, ["Hi"], max_new_tokens=3)
        assert model.training
        assert all(b.attn.kv_cache is None for b in model.blocks)
    finally:
        model.eval()


def test_bad_arguments(model, tokenizer):
    with pytest.raises(LlmftError, match="sampling settings"):
        generate(model, tokenizer, ["Hi"], temperature=-1)
    with pytest.raises(LlmftError, match="empty prompt"):
        generate(model, tokenizer, [""], max_new_tokens=3)
    assert generate_tokens(model, [[1, 2]], max_new_tokens=0) == [[]]


def test_sample_next_token_filters():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).expand(2000, -1)
    gen = torch.Generator().manual_seed(0)
    assert set(sample_next_token(logits, 1.0, top_k=2, generator=gen).tolist()) == {0, 1}
    assert set(sample_next_token(logits, 1.0, top_p=0.7, generator=gen).tolist()) == {0, 1}
    assert set(sample_next_token(logits, 1.0, top_p=0.81, generator=gen).tolist()) == {0, 1, 2}
    counts = torch.bincount(sample_next_token(logits, 1.0, generator=gen), minlength=4) / 2000
    torch.testing.assert_close(counts, torch.tensor([0.5, 0.3, 0.15, 0.05]), atol=0.04, rtol=0)
    assert sample_next_token(logits[:1], 0.0).tolist() == [0]


def test_prompt_lookup_draft():
    tokens = [5, 6, 7, 8, 9, 5, 6]
    assert prompt_lookup_draft(tokens, 3) == [7, 8, 9]  # "5 6" seen before: what followed it
    assert prompt_lookup_draft(tokens, 7) == [7, 8, 9, 5, 6, 7, 8]  # looked up again from the guess's end
    assert prompt_lookup_draft([1, 2, 9, 1, 2, 7, 1, 2], 2) == [7, 1]  # the latest occurrence wins
    assert prompt_lookup_draft([3, 1, 2, 4, 1, 2, 3, 1, 2], 2) == [4, 1]  # "3 1 2" beats the later "1 2"
    assert prompt_lookup_draft([1, 2, 3], 3) == []  # nothing matches: no guess
    assert prompt_lookup_draft(tokens, 0) == []


def test_accept_draft():
    assert accept_draft([5, 6, 7], [5, 6, 7, 8]) == [5, 6, 7, 8]  # every guess agreed: all, plus the next choice
    assert accept_draft([5, 6, 7], [9, 6, 7, 8]) == [9]  # the first guess is wrong: the model's choice only
    assert accept_draft([5, 6, 7], [5, 9, 7, 8]) == [5, 9]  # agreed up to the first disagreement
    assert accept_draft([], [4]) == [4]  # no guesses: one token


def joined(steps, n):
    """Each prompt's tokens over the steps of `stream_tokens`."""
    out = [[] for _ in range(n)]
    for decided in steps:
        assert decided and all(decided.values())  # only prompts that got tokens
        for row, tokens in decided.items():
            out[row] += tokens
    return out


def test_stream_tokens_yield_what_generate_tokens_returns(model):
    prompts = [PROMPTS[0], PROMPTS[1], PROMPTS[2]]  # 17, 3 and 9 tokens
    full = generate_tokens(model, prompts, max_new_tokens=12)
    steps = stream_tokens(model, prompts, max_new_tokens=12)
    assert next(steps) == {row: tokens[:1] for row, tokens in enumerate(full)}  # after the prefill
    assert joined(steps, 3) == [tokens[1:] for tokens in full]

    eos = full[1][3]  # row 1 stops at its 4th token
    with_stop = generate_tokens(model, prompts, max_new_tokens=12, eos_ids=[eos])
    assert with_stop[1] == full[1][:3]
    assert joined(stream_tokens(model, prompts, max_new_tokens=12, eos_ids=[eos]), 3) == with_stop

    sampled = [joined(stream_tokens(model, prompts, max_new_tokens=12, temperature=1.0, top_k=20,
                                    generator=torch.Generator().manual_seed(7)), 3) for _ in range(2)]
    assert sampled[0] == sampled[1] == generate_tokens(model, prompts, max_new_tokens=12, temperature=1.0, top_k=20,
                                                       generator=torch.Generator().manual_seed(7))
    assert sampled[0] != full


def test_stream_text_joins_to_generate(model, tokenizer):
    prompt = "Every effort moves you"
    for kwargs in ({}, {"temperature": 1.0, "top_k": 50, "seed": 3}):
        pieces = list(stream_text(model, tokenizer, prompt, max_new_tokens=30, **kwargs))
        assert len(pieces) > 1 and "".join(pieces) == generate(model, tokenizer, [prompt], max_new_tokens=30,
                                                              **kwargs)[0]
    full = generate(model, tokenizer, [prompt], max_new_tokens=30)[0]
    stop = full[10:14]
    expected = full[:full.index(stop)]
    pieces = list(stream_text(model, tokenizer, prompt, max_new_tokens=30, stop_strings=[stop]))
    assert "".join(pieces) == expected == generate(model, tokenizer, [prompt], max_new_tokens=30,
                                                   stop_strings=[stop])[0]


def stream_of(monkeypatch, tokenizer, text, **kwargs):
    """`stream_text`'s pieces for a model that decides the tokens of `text` one per step, and the
    text joined after each piece."""
    tokens = tokenizer.encode(text)
    monkeypatch.setattr(generation, "stream_tokens", lambda model, prompts, **_: ({0: [t]} for t in tokens))
    pieces = list(stream_text(None, tokenizer, "prompt", **kwargs))
    return pieces, ["".join(pieces[:i + 1]) for i in range(len(pieces))]


def test_stream_text_waits_for_whole_characters(monkeypatch, tokenizer):
    text = "Ein Café für 😀 und 中文!"
    tokens = tokenizer.encode(text)
    assert any(tokenizer.decode(tokens[:i]).endswith("\ufffd") for i in range(len(tokens)))  # split characters
    pieces, _ = stream_of(monkeypatch, tokenizer, text)
    assert "".join(pieces) == text and not any("\ufffd" in piece for piece in pieces)


def test_stream_text_yields_nothing_of_a_stop_string(monkeypatch, tokenizer):
    text = "Red, ### green.\n\n### Instruction:\nName another color."
    stops = ["\n\n### Instruction:", "\n\n### Input:"]
    pieces, texts = stream_of(monkeypatch, tokenizer, text, stop_strings=stops)
    assert texts[-1] == "Red, ### green." and all("Red, ### green.".startswith(t) for t in texts)
    assert len(pieces) > 3


@pytest.mark.parametrize("pieces,expected", [
    (["  ", "###", " Resp", "onse:", "\n", "Red", ".  ", "\n"], ["Red", "."]),  # a repeated header is cut off
    (["##", "# not a header", " ok  "], ["### not a header", " ok"]),
    (["Hi", " ", "there", "  ", "\n"], ["Hi", " there"]),  # whitespace waits for what follows it
    ([" ", "\n"], []),
    (["##"], ["##"]),
])
def test_cli_streams_the_extracted_response(pieces, expected):
    from llmft.pipelines.instruction import response_pieces
    from llmft.prompts import get_prompt_style

    style = get_prompt_style("alpaca")
    assert list(response_pieces(style, iter(pieces))) == expected
    assert "".join(expected) == style.extract_response("".join(pieces))


def test_decoding_session_is_entered_once(monkeypatch):
    model = chaotic_model("llama", torch.float32)
    entered = []
    real = generation.prepacked_linears
    monkeypatch.setattr(generation, "prepacked_linears", lambda m, on: entered.append(on) or real(m, on))
    model.train()
    with decoding_session(model, prepack=False):
        assert not model.training
        generate_tokens(model, PROMPTS, max_new_tokens=4, prepack=True)  # inside: the session's settings hold
        assert not model.training and all(b.attn.kv_cache is None for b in model.blocks)
    assert entered == [False] and model.training
    generate_tokens(model, PROMPTS, max_new_tokens=4)
    assert entered == [False, True] and model.training


def test_guessed_tokens_keep_the_greedy_output(model, monkeypatch):
    """Steps that verify guesses (right ones, then a wrong one) give exactly the one-token-per-
    step output, in fewer forward passes; also for the last row left of a batch."""
    reference = {tuple(p): generate_tokens(model, [p], max_new_tokens=16, draft_tokens=0)[0] for p in PROMPTS}

    def oracle(tokens, max_tokens):  # the next two true tokens, then a wrong one
        prompt = next(p for p in reference if tuple(tokens[:len(p)]) == p)
        done = len(tokens) - len(prompt)
        truth = reference[prompt][done:done + 2]
        return (truth + [(truth[-1] + 1) % 1000 if truth else 1])[:max_tokens]

    monkeypatch.setattr(generation, "prompt_lookup_draft", oracle)
    passes = []
    hook = model.final_norm.register_forward_hook(lambda *_: passes.append(1))
    try:
        for p in PROMPTS:
            passes.clear()
            assert generate_tokens(model, [p], max_new_tokens=16) == [reference[tuple(p)]]
            assert len(passes) <= 1 + 16 // 3 + 1  # prefill, then three tokens a pass
        eos = reference[tuple(PROMPTS[1])][2]
        expected = [r[:r.index(eos)] if eos in r else r for r in reference.values()]
        assert generate_tokens(model, PROMPTS, max_new_tokens=16, eos_ids=[eos]) == expected
    finally:
        hook.remove()


@pytest.mark.skipif(not can_prepack(chaotic_model("llama", torch.float32)), reason="needs oneDNN on CPU")
def test_prepacked_linears_match_and_restore():
    model = chaotic_model("llama", torch.float32)
    apply_lora(model, LoRAConfig(targets=("query",)))
    linears = {name: m for name, m in model.named_modules() if type(m) is torch.nn.Linear}
    ids = torch.tensor([PROMPTS[0], PROMPTS[3] + [1] * 10])
    with torch.no_grad():
        expected = model(ids)
        with prepacked_linears(model):
            assert not any(type(m) is torch.nn.Linear for m in model.modules())
            torch.testing.assert_close(model(ids), expected, rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(model.out_head(model.hidden_states(ids)[:, -1]), expected[:, -1],
                                       rtol=1e-4, atol=1e-4)  # a non-contiguous input
    assert {name: m for name, m in model.named_modules() if type(m) is torch.nn.Linear} == linears
    with pytest.raises(RuntimeError, match="boom"), prepacked_linears(model):
        raise RuntimeError("boom")
    assert {name: m for name, m in model.named_modules() if type(m) is torch.nn.Linear} == linears
    assert (generate_tokens(model, PROMPTS, max_new_tokens=12, prepack=True)
            == generate_tokens(model, PROMPTS, max_new_tokens=12, prepack=False))
