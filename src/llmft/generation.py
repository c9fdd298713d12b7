"""Text generation: greedy or sampled decoding, one prompt or many, with or without a KV cache.

`generate` is the text-level entry point (strings in, new text out). It sorts the prompts by
length into batches (less padding) and calls `generate_tokens` per batch. A batch is LEFT padded,
so every row's next token sits in the same last column; each row's position ids start at 0 at
its first real token, and a boolean (B, 1, T, S) mask hides the padding keys on top of causal
attention, so a padded row computes what it would compute alone.

With the cache, the prompt is run once (prefill) and each new token costs one position; without
it, the whole sequence is recomputed each step (the book's `generate`, kept as a reference for
tests and benchmarks). Rows that finish (end-of-text, a stop id, a stop string) leave the batch.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from llmft.errors import LlmftError

# cuDNN's attention (PyTorch's first choice for bf16 on recent GPUs) plans each new shape
# anew, and decoding grows the key length by one every step: measured on an H200, GPT-2 small
# decoded at 38 ms/token with it and 3.4 ms/token without it.
DECODE_ATTENTION_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


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
def _decoding(model: Any) -> Iterator[None]:
    """Eval mode and the decoding attention backends; afterwards the cache is dropped and the
    model's mode restored."""
    was_training = model.training
    model.eval()
    try:
        with sdpa_kernel(DECODE_ATTENTION_BACKENDS):
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


@torch.no_grad()
def generate_tokens(model: Any, prompts: Sequence[Sequence[int]], max_new_tokens: int = 256,
                    temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
                    eos_ids: Sequence[int] = (), use_cache: bool = True,
                    generator: torch.Generator | None = None,
                    is_done: Callable[[list[int]], bool] | None = None) -> list[list[int]]:
    """New token ids for each prompt of one batch, generated together.

    A row stops at a token in `eos_ids` (not included in its output), when
    `is_done(new_tokens)` says so (the caller's stop-string check), or after `max_new_tokens`.
    Prompts longer than the context allows are cropped to their last tokens. The model is
    called in eval mode and its cache is cleared afterwards.
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
    eos = set(eos_ids)
    out: list[list[int]] = [[] for _ in rows]
    active = list(range(B))  # original row of each batch row

    def last_logits(start: int, end: int) -> torch.Tensor:
        """Run the tokens at slots [start, end) (all of them without a cache); next-token logits."""
        mask = attention_mask(key_valid[:, :end], start, end) if padded else None
        hidden = model.hidden_states(seq[:, start:end], positions=positions[:, start:end], mask=mask,
                                     cache_pos=start if use_cache else None)
        return model.out_head(hidden[:, -1])  # the vocabulary projection at the last position only

    with _decoding(model):
        if use_cache:
            model.set_kv_cache(B, total)
        logits = last_logits(0, T0)  # prefill
        for step in range(max_new_tokens):
            next_ids = sample_next_token(logits, temperature, top_k, top_p, generator)
            keep = []
            for j, token in enumerate(next_ids.tolist()):  # the one host sync per step
                row = active[j]
                if token in eos:
                    continue
                out[row].append(token)
                if is_done is None or not is_done(out[row]):
                    keep.append(j)
            if not keep or step == max_new_tokens - 1:
                break
            if len(keep) < len(active):
                idx = torch.tensor(keep, device=device)
                active = [active[j] for j in keep]
                seq, next_ids = seq[idx], next_ids[idx]
                positions, key_valid = positions[idx], key_valid[idx]
                if use_cache:
                    _select_cache_rows(model, idx)
            seq = torch.cat([seq, next_ids[:, None]], dim=1)
            end = T0 + step + 1
            logits = last_logits(end - 1 if use_cache else 0, end)
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
             seed: int | None = None, batch_size: int = 8) -> list[str]:
    """The new text of each prompt (strings, or token id lists), in input order.

    Greedy when `temperature` is 0, else sampled (`top_k`, `top_p`); `seed` makes sampling
    reproducible. Generation of a prompt ends at `eos_id` (default: the tokenizer's end-of-text;
    pass a list to add a chat template's end-of-turn id, see `PromptStyle.stop_token_ids`) or at
    the first stop string, which is cut off with everything after it.
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
    for start in range(0, len(order), batch_size):
        batch = order[start:start + batch_size]
        new_tokens = generate_tokens(model, [encoded[i] for i in batch], max_new_tokens, temperature,
                                     top_k, top_p, eos_ids, use_cache, generator, is_done)
        for i, tokens in zip(batch, new_tokens):
            texts[i] = cut_at_stop(tokenizer.decode(tokens), stop_strings)
    return texts
