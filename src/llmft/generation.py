"""Text generation: greedy or sampled decoding, one prompt or many, with or without a KV cache.

`generate` is the text-level entry point (strings in, new text out). It sorts the prompts by
length into batches (less padding) and calls `generate_tokens` per batch. A batch is LEFT padded,
so every row's next token sits in the same last column; each row's position ids start at 0 at
its first real token, and a boolean (B, 1, T, S) mask hides the padding keys on top of causal
attention, so a padded row computes what it would compute alone.

With the cache, the prompt is run once (prefill) and each new token costs one position; without
it, the whole sequence is recomputed each step (the book's `generate`, kept as a reference for
tests and benchmarks). Rows that finish (end-of-text, a stop id, a stop string) leave the batch.

Decoding on a CPU is bound by reading the weights once per step, so two things make it faster
without changing the greedy output: the Linear weights are prepacked for oneDNN's few-row GEMM
(`llmft.models.prepacked`), and a single greedy row verifies a few guessed tokens per step
(`prompt_lookup_draft`): every guess the model agrees with is a step saved.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from llmft.errors import LlmftError
from llmft.models.prepacked import prepacked_linears

# cuDNN's attention (PyTorch's first choice for bf16 on recent GPUs) plans each new shape
# anew, and decoding grows the key length by one every step: measured on an H200, GPT-2 small
# decoded at 38 ms/token with it and 3.4 ms/token without it.
DECODE_ATTENTION_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
# Guessed tokens verified per greedy single-row step (see generate_tokens): SmolLM2-135M-Instruct
# answering 16 of the book's instructions on one CPU thread took about 46 s with 3 (49-51 s with 6
# or 7, 61 s with none); oneDNN runs 4 positions no slower than 1, and longer guesses are rarely kept.
DRAFT_TOKENS = 3


def sample_next_token(logits: torch.Tensor, temperature: float = 0.0, top_k: int | None = None,
                      top_p: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """Next token ids (B,) from last-position logits (B, V).

    temperature 0: argmax (greedy). Otherwise the logits are divided by the temperature, cut to
    the `top_k` largest and to the smallest set whose probability reaches `top_p` (nucleus
    sampling, Holtzman et al., 2020), and sampled from.
    """
    if temperature == 0.0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        # drop a token when the tokens before it already reach top_p (the first always stays)
        drop = probs.cumsum(dim=-1) - probs >= top_p
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(-1, order, drop), float("-inf"))
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(-1)


def attention_mask(key_valid: torch.Tensor, q_start: int, q_end: int) -> torch.Tensor:
    """(B, 1, q_end - q_start, S) may-attend mask for queries at slots [q_start, q_end).

    A query sees the non-padding keys at or before its slot. A padding query also sees itself:
    its output is never used, but a row with no key at all would make attention NaN, and that
    NaN would reach the cached values other queries read (0 * NaN is NaN).
    """
    S = key_valid.shape[1]
    q = torch.arange(q_start, q_end, device=key_valid.device)[:, None]
    k = torch.arange(S, device=key_valid.device)[None, :]
    return ((key_valid[:, None, :] | (k == q)) & (k <= q)).unsqueeze(1)


@contextmanager
def _decoding(model: Any, prepack: bool) -> Iterator[None]:
    """Eval mode, the decoding attention backends and (on CPU, if `prepack`) prepacked Linear
    weights; afterwards the cache is dropped and the model's mode restored."""
    was_training = model.training
    model.eval()
    try:
        with sdpa_kernel(DECODE_ATTENTION_BACKENDS), prepacked_linears(model, prepack):
            yield
    finally:
        model.clear_kv_cache()
        model.train(was_training)


def _select_cache_rows(model: Any, keep: torch.Tensor) -> None:
    for block in model.blocks:
        cache = block.attn.kv_cache
        cache.k, cache.v = cache.k[keep], cache.v[keep]


def crop_prompt(ids: Sequence[int], context_length: int, max_new_tokens: int) -> list[int]:
    """The last tokens of a prompt that leave room for `max_new_tokens` in the context."""
    room = context_length - max_new_tokens
    if room < 1:
        raise LlmftError(f"max_new_tokens={max_new_tokens} leaves no room for a prompt in the "
                         f"model's context of {context_length} tokens")
    return list(ids[-room:])


def _continuation(tokens: Sequence[int], max_tokens: int, max_ngram: int) -> list[int]:
    """What followed the latest earlier occurrence of the last n tokens (n = max_ngram down
    to 1), up to `max_tokens` of it; [] when nothing matches."""
    L = len(tokens)
    for n in range(min(max_ngram, L - 1), 0, -1):
        tail = list(tokens[L - n:])
        for i in range(L - n - 1, -1, -1):
            if list(tokens[i:i + n]) == tail:
                return list(tokens[i + n:i + n + max_tokens])
    return []


def prompt_lookup_draft(tokens: Sequence[int], max_tokens: int, max_ngram: int = 3) -> list[int]:
    """A guess of the next `max_tokens` tokens, without a model ("prompt lookup decoding",
    Saxena, 2023): what followed the latest earlier occurrence of the last few tokens, looked
    up again from the guess's end while it is short, the last token repeated where nothing
    matches. Answers to instructions copy from their prompt (names, the sentence to rewrite)
    and from themselves; and a CPU verifies 4 positions no slower than 1 (see
    `generate_tokens`), so a full-length guess costs nothing even when it is wrong.
    """
    draft: list[int] = []
    while len(draft) < max_tokens:
        seen = [*tokens, *draft]
        draft += _continuation(seen, max_tokens - len(draft), max_ngram) or seen[-1:]
    return draft


def _take(row_out: list[int], tokens: Sequence[int], eos: set[int], max_new_tokens: int,
          is_done: Callable[[list[int]], bool] | None) -> bool:
    """Append tokens to a row's output until one ends the row; whether the row goes on."""
    for token in tokens:
        if token in eos:
            return False
        row_out.append(token)
        if len(row_out) >= max_new_tokens or (is_done is not None and is_done(row_out)):
            return False
    return True


@torch.no_grad()
def generate_tokens(model: Any, prompts: Sequence[Sequence[int]], max_new_tokens: int = 256,
                    temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
                    eos_ids: Sequence[int] = (), use_cache: bool = True,
                    generator: torch.Generator | None = None,
                    is_done: Callable[[list[int]], bool] | None = None,
                    draft_tokens: int = DRAFT_TOKENS, prepack: bool = True) -> list[list[int]]:
    """New token ids for each prompt of one batch, generated together.

    A row stops at a token in `eos_ids` (not included in its output), when
    `is_done(new_tokens)` says so (the caller's stop-string check), or after `max_new_tokens`.
    Prompts longer than the context allows are cropped to their last tokens. The model is
    called in eval mode and its cache is cleared afterwards.

    Greedy decoding of a single row (a batch of one, or the last row left of a batch) with the
    cache verifies `draft_tokens` guessed tokens per step (`prompt_lookup_draft`): one
    forward pass over the last token and the guesses gives the model's own choice after each,
    the guesses it agrees with are kept, plus its choice after the last of them. The output is
    the greedy output (up to float rounding: several positions go through the model at once);
    a step on a CPU costs about what a one-token step costs, since reading the weights, not the
    arithmetic, bounds it. 0 turns guessing off.

    `prepack` (CPU, fp32): multiply by oneDNN-prepacked copies of the Linear weights (see
    `llmft.models.prepacked`), faster at the cost of a second copy of them while generating.
    """
    if not prompts or max_new_tokens < 1:
        return [[] for _ in prompts]
    ctx = model.cfg.context_length
    rows = [crop_prompt(p, ctx, max_new_tokens) for p in prompts]
    if any(not r for r in rows):
        raise LlmftError("cannot generate from an empty prompt")
    device = model.tok_emb.weight.device
    B, T0 = len(rows), max(len(r) for r in rows)
    total = T0 + max_new_tokens
    pad = torch.tensor([T0 - len(r) for r in rows], device=device)
    seq = torch.tensor([[0] * (T0 - len(r)) + r for r in rows], device=device)
    slots = torch.arange(total, device=device)
    positions = (slots - pad[:, None]).clamp(min=0)  # (B, total): 0 at each first real token
    key_valid = slots >= pad[:, None]
    padded = any(len(r) < T0 for r in rows)  # without padding, plain causal attention (mask None)
    guessing = temperature == 0.0 and use_cache and draft_tokens > 0
    eos = set(eos_ids)
    out: list[list[int]] = [[] for _ in rows]
    active = list(range(B))  # original row of each batch row

    def logits_after(start: int, end: int, draft: list[int]) -> torch.Tensor:
        """Run the tokens at slots [start, end) (all of them without a cache), then the guessed
        `draft`; next-token logits (B, 1 + len(draft), V) after the last token and each guess."""
        ids = seq[:, start:end]
        if draft:
            ids = torch.cat([ids, torch.tensor([draft], device=device)], dim=1)
            end += len(draft)
        mask = attention_mask(key_valid[:, :end], start, end) if padded else None
        hidden = model.hidden_states(ids, positions=positions[:, start:end], mask=mask,
                                     cache_pos=start if use_cache else None)
        return model.out_head(hidden[:, -1 - len(draft):])  # the vocabulary projection where it is read

    with _decoding(model, prepack):
        if use_cache:
            model.set_kv_cache(B, total)
        end, draft = T0, []  # slots [0, end) hold tokens; the cache holds all but the last
        logits = logits_after(0, T0, draft)  # prefill
        while True:
            if temperature == 0.0:
                choices = logits.argmax(dim=-1)  # (B, 1 + len(draft))
            else:
                choices = sample_next_token(logits[:, -1], temperature, top_k, top_p, generator)[:, None]
            keep, new = [], []
            for j, chosen in enumerate(choices.tolist()):  # the one host sync per step
                agreed = next((i for i, (g, c) in enumerate(zip(draft, chosen)) if g != c), len(draft))
                tokens = chosen[:agreed + 1]  # the agreed guesses and the model's next choice
                if _take(out[active[j]], tokens, eos, max_new_tokens, is_done):
                    keep.append(j)
                    new.append(tokens)
            if not keep:
                break
            if len(keep) < len(active):
                idx = torch.tensor(keep, device=device)
                active = [active[j] for j in keep]
                seq, positions, key_valid = seq[idx], positions[idx], key_valid[idx]
                if use_cache:
                    _select_cache_rows(model, idx)
            seq = torch.cat([seq, torch.tensor(new, device=device)], dim=1)
            end += len(new[0])
            draft = []
            if guessing and len(active) == 1:
                row = active[0]
                draft = prompt_lookup_draft(rows[row] + out[row], min(draft_tokens, max_new_tokens - len(out[row]) - 1))
            logits = logits_after(end - 1 if use_cache else 0, end, draft)
    return out


def _stop_check(tokenizer: Any, stop_strings: Sequence[str]) -> Callable[[list[int]], bool] | None:
    """Whether a row's new tokens end in a stop string. Only the last few tokens are decoded:
    a stop string of n bytes spans at most n tokens, plus one for a token that ends in it."""
    if not stop_strings:
        return None
    window = max(len(s.encode("utf-8")) for s in stop_strings) + 1

    def is_done(tokens: list[int]) -> bool:
        tail = tokenizer.decode(tokens[-window:])
        return any(s in tail for s in stop_strings)

    return is_done


def cut_at_stop(text: str, stop_strings: Sequence[str]) -> str:
    """`text` up to the first occurrence of any stop string."""
    cut = min((i for i in (text.find(s) for s in stop_strings) if i >= 0), default=len(text))
    return text[:cut]


def generate(model: Any, tokenizer: Any, prompts: Sequence[str] | Sequence[Sequence[int]],
             max_new_tokens: int = 256, temperature: float = 0.0, top_k: int | None = None,
             top_p: float | None = None, stop_strings: Sequence[str] = (),
             eos_id: int | Sequence[int] | None = None, use_cache: bool = True,
             seed: int | None = None, batch_size: int = 8, draft_tokens: int = DRAFT_TOKENS,
             prepack: bool = True) -> list[str]:
    """The new text of each prompt (strings, or token id lists), in input order.

    Greedy when `temperature` is 0, else sampled (`top_k`, `top_p`); `seed` makes sampling
    reproducible. Generation of a prompt ends at `eos_id` (default: the tokenizer's end-of-text;
    pass a list to add a chat template's end-of-turn id, see `PromptStyle.stop_token_ids`) or at
    the first stop string, which is cut off with everything after it. `draft_tokens` and
    `prepack`: see `generate_tokens`.
    """
    if temperature < 0 or (top_k is not None and top_k < 1) or (top_p is not None and not 0 < top_p <= 1):
        raise LlmftError(f"sampling settings: need temperature >= 0, top_k >= 1, 0 < top_p <= 1 "
                         f"(got {temperature}, {top_k}, {top_p})")
    if eos_id is None:
        eos_id = tokenizer.eos_id
    eos_ids = [eos_id] if isinstance(eos_id, int) else list(eos_id)
    encoded = [tokenizer.encode(p) if isinstance(p, str) else list(p) for p in prompts]
    generator = None
    if seed is not None:
        generator = torch.Generator(model.tok_emb.weight.device).manual_seed(seed)
    is_done = _stop_check(tokenizer, stop_strings)

    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]), reverse=True)
    texts: list[str] = [""] * len(encoded)
    with prepacked_linears(model, prepack):  # packed once for every batch
        for start in range(0, len(order), batch_size):
            batch = order[start:start + batch_size]
            new_tokens = generate_tokens(model, [encoded[i] for i in batch], max_new_tokens, temperature,
                                         top_k, top_p, eos_ids, use_cache, generator, is_done, draft_tokens, prepack)
            for i, tokens in zip(batch, new_tokens):
                texts[i] = cut_at_stop(tokenizer.decode(tokens), stop_strings)
    return texts
