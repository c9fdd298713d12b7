"""Text generation: greedy, sampled or beam-search decoding, one prompt or many, with or without a KV cache.

`generate` is the text-level entry point (strings in, new text out). It sorts the prompts by
length into batches (less padding) and calls `generate_tokens` per batch, which joins what
`stream_tokens` yields: each step's newly decided tokens per prompt, as they are decided
(`stream_text` turns one prompt's steps into text pieces, for printing as it goes).

A batch is LEFT padded, so every row's next token sits in the same last column; each row's
position ids start at 0 at its first real token, and a boolean (B, 1, T, S) mask hides the
padding keys on top of causal attention, so a padded row computes what it would compute alone.
`DecodingState` holds this: the padded tokens, positions, key mask, the rows still decoding and
the model's KV cache rows.

With the cache, the prompt is run once (prefill) and each new token costs one position; without
it, the whole sequence is recomputed each step (the book's `generate`, kept as a reference for
tests and benchmarks). Rows that finish (end-of-text, a stop id, a stop string) leave the batch.

Decoding on a CPU is bound by reading the weights once per step, so two things make it faster
without changing the greedy output: the Linear weights are prepacked for oneDNN's few-row GEMM
(`llmft.models.prepacked`, entered by `decoding_session`), and a single greedy row verifies a
few guessed tokens per step (`prompt_lookup_draft`, `accept_draft`): every guess the model
agrees with is a step saved.

Prompts that begin alike (a chat template's system prompt) share that beginning's keys and
values: a batch's common prefix is run once, and a session keeps the last prefix it ran
(`PrefixStore`), so the next prompt or batch that starts with it skips those tokens.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from llmft.data.instruction import common_prefix_length
from llmft.errors import LlmftError
from llmft.models.prepacked import prepacked_linears

log = logging.getLogger("llmft")

# cuDNN's attention (PyTorch's first choice for bf16 on recent GPUs) plans each new shape
# anew, and decoding grows the key length by one every step: decoding on a GPU was many times
# slower with it (see docs/benchmarks.md, "Decoding defaults").
DECODE_ATTENTION_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
# Guessed tokens verified per greedy single-row step, at most (see `stream_tokens`): longer
# guesses are rarely kept; 3 answered the book's instructions fastest (see docs/benchmarks.md,
# "Decoding defaults").
DRAFT_TOKENS = 3
# A batch's common prefix runs on its own (one row, then copied to every row) only when it is at
# least this long: that extra pass reads every weight once, which a few tokens do not repay.
SHARED_PREFIX_MIN_TOKENS = 16

Steps = Iterator[dict[int, list[int]]]  # per step: prompt index -> its newly decided token ids


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


def next_tokens(logits: torch.Tensor, temperature: float = 0.0, top_k: int | None = None,
                top_p: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """The model's choices from next-token logits (B, K, V): greedy, the argmax at every position
    (B, K), one choice after the last token and after each guess; sampled, one token (B, 1)
    drawn at the last position (see `sample_next_token`)."""
    if temperature == 0.0:
        return logits.argmax(dim=-1)  # (B, K)
    return sample_next_token(logits[:, -1], temperature, top_k, top_p, generator)[:, None]  # (B, 1)


def accept_draft(draft: Sequence[int], choices: Sequence[int]) -> list[int]:
    """The tokens a step decides: the guesses in `draft` up to the first one the model disagrees
    with, plus the model's next choice. `choices[i]` is the model's choice after the last token
    (i = 0) or after guess i, so there is one more choice than guesses."""
    agreed = next((i for i, (guess, choice) in enumerate(zip(draft, choices)) if guess != choice), len(draft))
    return list(choices[:agreed + 1])


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


class PrefixStore:
    """The keys and values of the last prompt prefix a decoding session ran, per layer (1, H_kv,
    P, d) at positions 0..P-1: one entry, replaced by the next prefix that differs (like
    llama.cpp's prompt cache). Requests that share a system prompt reuse its cache."""

    def __init__(self) -> None:
        self.tokens: list[int] = []
        self.kv: list[tuple[torch.Tensor, torch.Tensor]] = []

    def known(self, tokens: Sequence[int]) -> int:
        """How many leading `tokens` the store holds keys and values for."""
        return common_prefix_length(self.tokens, tokens)

    def extend(self, model: Any, tokens: Sequence[int]) -> None:
        """Hold `tokens`: run the ones it does not know yet, as one row, after the ones it does."""
        known = self.known(tokens)
        model.set_kv_cache(1, len(tokens))
        self.write(model, known)
        ids = torch.tensor([list(tokens[known:])], device=model.tok_emb.weight.device)
        model.hidden_states(ids, cache_pos=known)
        self.remember(model, tokens)

    def remember(self, model: Any, tokens: Sequence[int]) -> None:
        """Hold `tokens`, whose keys and values the model's cache row 0 has at slots [0, len)."""
        P = len(tokens)
        self.tokens = list(tokens)
        self.kv = [(b.attn.kv_cache.k[:1, :, :P].clone(), b.attn.kv_cache.v[:1, :, :P].clone()) for b in model.blocks]

    def write(self, model: Any, n: int) -> None:
        """Copy the first `n` held positions into slots [0, n) of every row of the model's cache."""
        for block, (k, v) in zip(model.blocks, self.kv):
            block.attn.kv_cache.k[:, :, :n] = k[:, :, :n]
            block.attn.kv_cache.v[:, :, :n] = v[:, :, :n]


_SESSIONS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> its session's PrefixStore


@contextmanager
def decoding_session(model: Any, prepack: bool = True) -> Iterator[None]:
    """The model set up for decoding inside the block: eval mode, the decoding attention backends
    and (on CPU, if `prepack`) prepacked Linear weights; afterwards its mode is restored.

    Every generation function enters it; a caller that generates several times (`instruct
    respond`'s batches) enters it once around them, so the weights are packed once. Inside a
    session, entering it again changes nothing (the outer session's `prepack` holds). The
    session's `PrefixStore` lives as long as it: the weights do not change inside.
    """
    if model in _SESSIONS:
        yield
        return
    was_training = model.training
    model.eval()
    _SESSIONS[model] = PrefixStore()
    try:
        with sdpa_kernel(DECODE_ATTENTION_BACKENDS), prepacked_linears(model, prepack):
            yield
    finally:
        del _SESSIONS[model]
        model.train(was_training)


def crop_prompt(ids: Sequence[int], context_length: int) -> list[int]:
    """What the model sees of a sequence: its last `context_length` tokens (the book's
    `idx[:, -context_size:]`)."""
    return list(ids[-context_length:])


def note_context(prompt_lengths: Sequence[int], context_length: int, max_new_tokens: int) -> None:
    """One line each when the context cuts what the model sees: a prompt longer than it, and
    new tokens that may reach past it."""
    longest = max(prompt_lengths)
    if longest > context_length:
        log.warning("note: a prompt of %d tokens is longer than the model's context of %d tokens; it is cropped to "
                    "its last %d tokens", longest, context_length, context_length)
    if min(longest, context_length) + max_new_tokens > context_length:
        log.info("note: a %d-token prompt and up to %d new tokens reach past the model's context of %d tokens; "
                 "from there each new token is decided from the last %d tokens (the book's generate)",
                 min(longest, context_length), max_new_tokens, context_length, context_length)


class DecodingState:
    """One batch being decoded: its LEFT-padded token slots (B, T), their positions and which keys
    are real tokens (B, total), the prompt each batch row belongs to, and the model's KV cache rows.

    `prefill` runs the prompts and `step` each row's decided tokens, both returning next-token
    logits; `evict` drops the rows that finished, and `join` adds new prompts between two steps
    (continuous batching). Used as a context manager: the KV cache is dropped on exit.
    """

    def __init__(self, model: Any, rows: Sequence[list[int]], max_new_tokens: int, use_cache: bool,
                 width: int | None = None) -> None:
        """`width`: the prompts' slots, at least the longest prompt (default: exactly that).

        The rows' common prefix (`shared` tokens, see `_shareable`) fills the first slots of
        every row and the padding follows it, so its keys and values are the same in every row.
        """
        self.model, self.use_cache = model, use_cache
        device = model.tok_emb.weight.device
        B, T0 = len(rows), max(len(r) for r in rows) if width is None else width
        self.total = T0 + max_new_tokens
        P = self.shared = self._shareable(rows)
        pad = torch.tensor([T0 - len(r) for r in rows], device=device)  # (B,)
        self.seq = torch.tensor([r[:P] + [0] * (T0 - len(r)) + r[P:] for r in rows], device=device)  # (B, T0)
        slots = torch.arange(self.total, device=device)
        # (B, total): the prefix at positions 0..P-1, the rest of each row counting on after its padding
        self.positions = torch.where(slots < P, slots, (slots - pad[:, None]).clamp(min=P))
        self.key_valid = (slots < P) | (slots >= P + pad[:, None])  # (B, total)
        self.padded = any(len(r) < T0 for r in rows)  # without padding, plain causal attention (mask None)
        self.active = list(range(B))  # the prompt of each batch row
        self.n_prompts = B  # prompts this batch has held: a joining one is numbered on from here
        self.end = T0  # slots [0, end) hold tokens; the cache holds all but the last

    def __enter__(self) -> DecodingState:
        return self

    def __exit__(self, *exc: object) -> None:
        self.model.clear_kv_cache()

    def _shareable(self, rows: Sequence[list[int]]) -> int:
        """How many leading tokens every row shares, short of each row's last token. 0 outside a
        `decoding_session` or without the cache, and where a sliding window could reach past
        the prefix: the window counts slots, and the padding after the prefix would widen it."""
        window = self.model.cfg.sliding_window
        if not self.use_cache or self.model not in _SESSIONS or (window and self.total > window):
            return 0
        return min(min(common_prefix_length(rows[0], r) for r in rows), min(map(len, rows)) - 1)

    def prefill(self) -> torch.Tensor:
        """Run the prompts: next-token logits (B, 1, V). The session's `PrefixStore` gives the
        keys and values of the common prefix as far as it holds them, and holds it afterwards."""
        if not self.use_cache:
            return self._logits(0, [])
        prefix = self.seq[0, :self.shared].tolist()
        start = self._reuse_prefix(prefix)
        logits = self._logits(start, [])
        if len(prefix) > start:
            _SESSIONS[self.model].remember(self.model, prefix)
        return logits

    def _reuse_prefix(self, prefix: list[int]) -> int:
        """Make the model's cache, with the stored keys and values of the common `prefix` in its
        first slots; how many. A batch runs a long prefix the store lacks as one row first."""
        B, P = len(self.active), len(prefix)
        store = _SESSIONS.get(self.model)
        known = store.known(prefix) if P else 0
        if B > 1 and P - known >= SHARED_PREFIX_MIN_TOKENS:
            store.extend(self.model, prefix)
            known = P
        self.model.set_kv_cache(B, self.total)
        if known:
            store.write(self.model, known)
        return known

    def step(self, new: list[list[int]], draft: Sequence[int] = ()) -> torch.Tensor:
        """Append each row's decided tokens (`new`, as many for every row) and run them, then the
        guessed `draft` (a single row); logits (B, 1 + len(draft), V) after the last token and
        each guess. With the cache only the last token runs: the agreed guesses before it ran,
        as guesses, in the step before."""
        self.seq = torch.cat([self.seq, torch.tensor(new, device=self.seq.device)], dim=1)
        self.end += len(new[0])
        return self._logits(self.end - 1 if self.use_cache else 0, draft)

    def evict(self, keep: list[int]) -> None:
        """Keep only the batch rows `keep` (indices into `active`), cache rows included."""
        if len(keep) < len(self.active):
            self.select(keep)

    def select(self, rows: list[int]) -> None:
        """Make the batch the rows `rows` (indices into `active`) in that order, cache rows
        included; a row may come more than once (beam search continues a beam in several ways)."""
        idx = torch.tensor(rows, device=self.seq.device)
        self.active = [self.active[j] for j in rows]
        self.seq, self.positions, self.key_valid = self.seq[idx], self.positions[idx], self.key_valid[idx]
        self._edit_cache(lambda t: t[idx])

    def join(self, rows: Sequence[list[int]], max_new_tokens: int) -> torch.Tensor:
        """Add the prompts `rows` as new batch rows after a step, to decode with the others from
        the next step on (continuous batching); their next-token logits (N, 1, V).

        They are prefilled on their own, LEFT padded to this batch's slots (the batch gets more
        padding in front when one is longer), and their cache rows appended to the batch's.
        Slots that no row reads any more are dropped first, so that a batch which never empties
        does not grow without end. Like `evict`, with the model's cache rows kept in step.
        """
        self._compact()
        width = max(self.end, *(len(r) for r in rows))
        self._pad_left(width - self.end)
        self._grow(width + max_new_tokens)
        own = [block.attn.kv_cache for block in self.model.blocks]
        joining = DecodingState(self.model, rows, self.total - width, self.use_cache, width=width)
        logits = joining.prefill()
        if self.use_cache:  # the model now holds the joining rows' cache: this batch's rows go first
            for block, cache in zip(self.model.blocks, own):
                theirs = block.attn.kv_cache
                cache.k, cache.v = torch.cat([cache.k, theirs.k]), torch.cat([cache.v, theirs.v])
                block.attn.kv_cache = cache
        self.seq = torch.cat([self.seq, joining.seq])
        self.positions = torch.cat([self.positions, joining.positions])
        self.key_valid = torch.cat([self.key_valid, joining.key_valid])
        self.active += range(self.n_prompts, self.n_prompts + len(rows))
        self.n_prompts += len(rows)
        self.padded = True
        return logits

    def _compact(self) -> None:
        """Drop the leading slots that are padding in every row."""
        first = int(self.key_valid[:, :self.end].any(0).int().argmax())  # the first slot a row reads
        if first:
            self.seq, self.positions, self.key_valid = self.seq[:, first:], self.positions[:, first:], \
                self.key_valid[:, first:]
            self._edit_cache(lambda t: t[:, :, first:])
            self.end, self.total = self.end - first, self.total - first

    def _pad_left(self, n: int) -> None:
        """`n` more padding slots in front of every row."""
        if n > 0:
            self.seq, self.positions = F.pad(self.seq, (n, 0)), F.pad(self.positions, (n, 0))
            self.key_valid = F.pad(self.key_valid, (n, 0), value=False)
            self._edit_cache(lambda t: F.pad(t, (0, 0, n, 0)))
            self.end, self.total, self.padded = self.end + n, self.total + n, True

    def _grow(self, total: int) -> None:
        """Room for `total` slots: the new ones at the end, each row's positions counting on."""
        extra = total - self.total
        if extra > 0:
            steps = torch.arange(1, extra + 1, device=self.positions.device)
            self.positions = torch.cat([self.positions, self.positions[:, -1:] + steps], dim=1)
            self.key_valid = F.pad(self.key_valid, (0, extra), value=True)
            self._edit_cache(lambda t: F.pad(t, (0, 0, 0, extra)))
            self.total = total

    def _edit_cache(self, edit: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Replace every layer's cached keys and values (B, H, total, d) by `edit` of them."""
        if self.use_cache:
            for block in self.model.blocks:
                cache = block.attn.kv_cache
                cache.k, cache.v = edit(cache.k), edit(cache.v)

    def _logits(self, start: int, draft: Sequence[int]) -> torch.Tensor:
        """Run the tokens at slots [start, end) (all of them without a cache), then `draft`;
        next-token logits (B, 1 + len(draft), V) after the last token and each guess."""
        ids, end = self.seq[:, start:self.end], self.end
        if draft:
            ids = torch.cat([ids, torch.tensor([list(draft)], device=ids.device)], dim=1)
            end += len(draft)
        mask = attention_mask(self.key_valid[:, :end], start, end) if self.padded else None
        hidden = self.model.hidden_states(ids, positions=self.positions[:, start:end], mask=mask,
                                          cache_pos=start if self.use_cache else None)
        return self.model.out_head(hidden[:, -1 - len(draft):])  # the vocabulary projection where it is read


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
    """A guess of the next `max_tokens` tokens at most, without a model ("prompt lookup
    decoding", Saxena, 2023): what followed the latest earlier occurrence of the last few tokens,
    looked up again from the guess's end while it is short; [] where nothing matches. Answers to
    instructions copy from their prompt (names, the sentence to rewrite) and from themselves.
    Verifying 4 positions costs 1.3-1.5 one-token steps on a 2-core Xeon, so a step guesses only
    where a match says what comes next: repeating the last token instead, as this did before,
    made batch-1 answers slower (docs/benchmarks.md, "Batch-1 decoding").
    """
    draft: list[int] = []
    while len(draft) < max_tokens:
        more = _continuation([*tokens, *draft], max_tokens - len(draft), max_ngram)
        if not more:
            break
        draft += more
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


class ContextWindows:
    """A batch's `DecodingState` kept within the model's context. Each row is its prompt and new
    tokens (`rows`, `out`); the state holds each row's last `context_length` tokens with room
    for the new tokens that fit. When a step would take a row past the context, the state is
    made anew from every row's last tokens and prefilled (the book's sliding window: each new
    token decided from the last `context_length` tokens). Dropped from the model on exit."""

    def __init__(self, model: Any, rows: Sequence[list[int]], out: Sequence[list[int]], max_new_tokens: int,
                 use_cache: bool) -> None:
        self.model, self.rows, self.out, self.use_cache = model, rows, out, use_cache
        self.max_new_tokens = max_new_tokens
        self.context = model.cfg.context_length
        self.state = self._window(range(len(rows)))

    def __enter__(self) -> ContextWindows:
        return self

    def __exit__(self, *exc: object) -> None:
        self.model.clear_kv_cache()

    def _window(self, active: Iterable[int]) -> DecodingState:
        active = list(active)
        seqs = [crop_prompt(self.rows[r] + self.out[r], self.context) for r in active]
        left = max(self.max_new_tokens - len(self.out[r]) for r in active)
        state = DecodingState(self.model, seqs, min(left, self.context - max(map(len, seqs))), self.use_cache)
        state.active = active
        return state

    def advance(self, keep: list[int], new: list[list[int]], draft_tokens: int) -> tuple[torch.Tensor, list[int]]:
        """Keep the batch rows `keep`, run their `new` tokens and, for a single row, a guess of up
        to `draft_tokens` (`prompt_lookup_draft`); the next-token logits and the guess."""
        state = self.state
        state.evict(keep)
        room = state.total - state.end - len(new[0])
        if room < 0:  # a row would pass the context: its last tokens, prefilled anew
            self.state = self._window(state.active)
            return self.state.prefill(), []
        draft: list[int] = []
        if draft_tokens and len(keep) == 1:
            row = state.active[0]
            seen = self.rows[row] + self.out[row]
            draft = prompt_lookup_draft(seen, min(draft_tokens, self.max_new_tokens - len(self.out[row]) - 1, room))
        return state.step(new, draft), draft


@torch.no_grad()
def stream_tokens(model: Any, prompts: Sequence[Sequence[int]], *, max_new_tokens: int = 256,
                  temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
                  eos_ids: Sequence[int] = (), use_cache: bool = True, generator: torch.Generator | None = None,
                  is_done: Callable[[list[int]], bool] | None = None, draft_tokens: int = DRAFT_TOKENS,
                  prepack: bool = True) -> Steps:
    """Decode one batch of prompts together, yielding after each step the prompts' newly decided
    token ids ({prompt index: ids}, prompts that got none left out); a prompt's ids, joined
    over the steps, are its new tokens.

    A row stops at a token in `eos_ids` (not included in its output), when
    `is_done(new_tokens)` says so (the caller's stop-string check), or after `max_new_tokens`.
    The model sees at most its context: a longer prompt is cropped to its last tokens, and new
    tokens past the context are each decided from the last `context_length` tokens, as the
    book's `generate` does (`ContextWindows`; a one-line note says so). The model is called in
    eval mode (`decoding_session`) and its cache is cleared afterwards.

    Greedy decoding of a single row (a batch of one, or the last row left of a batch) with the
    cache verifies `draft_tokens` guessed tokens per step (`prompt_lookup_draft`): one
    forward pass over the last token and the guesses gives the model's own choice after each,
    the guesses it agrees with are kept, plus its choice after the last of them (`accept_draft`).
    The output is the greedy output (up to float rounding: several positions go through the
    model at once); a step with guesses costs more than a one-token step, but less than the
    steps that the agreed guesses save, since reading the weights bounds both. A step without
    a prompt-lookup match guesses nothing. 0 turns guessing off.

    `prepack` (CPU, fp32): multiply by oneDNN-prepacked copies of the Linear weights (see
    `llmft.models.prepacked`), faster at the cost of a second copy of them while generating.
    """
    if not prompts or max_new_tokens < 1:
        return
    rows = [list(p) for p in prompts]
    if any(not r for r in rows):
        raise LlmftError("cannot generate from an empty prompt")
    note_context([len(r) for r in rows], model.cfg.context_length, max_new_tokens)
    guessing = temperature == 0.0 and use_cache and draft_tokens > 0
    eos, out = set(eos_ids), [[] for _ in rows]
    with decoding_session(model, prepack), ContextWindows(model, rows, out, max_new_tokens, use_cache) as windows:
        logits, draft = windows.state.prefill(), []
        while True:
            state = windows.state
            decided, keep, new = {}, [], []
            choices = next_tokens(logits, temperature, top_k, top_p, generator)
            for j, chosen in enumerate(choices.tolist()):  # the one host sync per step
                row, tokens = state.active[j], accept_draft(draft, chosen)
                before = len(out[row])
                if _take(out[row], tokens, eos, max_new_tokens, is_done):
                    keep.append(j)
                    new.append(tokens)
                if len(out[row]) > before:
                    decided[row] = out[row][before:]
            if decided:
                yield decided
            if not keep:
                return
            logits, draft = windows.advance(keep, new, draft_tokens if guessing else 0)


class BeamSearch:
    """The beams of one prompt's beam search, scored as Hugging Face transformers' default
    (`num_beams`, `length_penalty`, `early_stopping=False`).

    A beam is its new tokens and their summed log-probability. Each step extends every beam by
    every token and keeps the `2 * num_beams` best candidates (one more set per stop id past
    the first): a candidate that ends (a stop id, which its tokens leave out, a stop string, or
    the last allowed token) is a hypothesis, scored by its log-probability over (its length,
    stop id included) ** `length_penalty`, if it ranks among the first `num_beams`; the
    `num_beams` best others go on. The search ends when no beam goes on, or when `num_beams`
    hypotheses are held and the best beam's score at its current length does not beat the worst.
    """

    def __init__(self, num_beams: int, max_new_tokens: int, eos_ids: Sequence[int], length_penalty: float = 1.0,
                 is_done: Callable[[list[int]], bool] | None = None) -> None:
        self.num_beams, self.max_new_tokens, self.length_penalty = num_beams, max_new_tokens, length_penalty
        self.eos, self.is_done = set(eos_ids), is_done
        self.candidates = (1 + max(1, len(self.eos))) * num_beams
        self.beams: list[tuple[list[int], float]] = [([], 0.0)]  # (new tokens, summed log-prob), best first
        self.hypotheses: list[tuple[float, list[int]]] = []  # (score, new tokens), best first

    def _ends(self, tokens: list[int]) -> bool:
        return (tokens[-1] in self.eos or len(tokens) >= self.max_new_tokens
                or (self.is_done is not None and self.is_done(tokens)))

    def advance(self, logits: torch.Tensor) -> list[int]:
        """Extend the beams by the next-token `logits` (one row per beam, (beams, V)); the
        beam each new beam continues (indices into the old beams), [] once the search is over."""
        summed = torch.tensor([s for _, s in self.beams], device=logits.device)[:, None]
        logprobs = logits.float().log_softmax(dim=-1) + summed
        V, n = logprobs.shape[-1], len(self.beams[0][0]) + 1  # n: each candidate's length
        top = logprobs.flatten().topk(min(self.candidates, logprobs.numel()))
        beams, rows = [], []
        for rank, (score, i) in enumerate(zip(top.values.tolist(), top.indices.tolist())):
            row, token = divmod(i, V)
            tokens = self.beams[row][0] + [token]
            if self._ends(tokens):
                if rank < self.num_beams:
                    self._hold(score / n ** self.length_penalty, tokens[:-1] if token in self.eos else tokens)
            elif len(beams) < self.num_beams:
                beams.append((tokens, score))
                rows.append(row)
        self.beams = beams
        return [] if self._settled(n) else rows

    def _hold(self, score: float, tokens: list[int]) -> None:
        self.hypotheses = sorted([*self.hypotheses, (score, tokens)], key=lambda h: -h[0])[:self.num_beams]

    def _settled(self, n: int) -> bool:
        """No beam goes on, or none can still beat the held hypotheses (at its current length)."""
        if not self.beams:
            return True
        full = len(self.hypotheses) == self.num_beams
        return full and self.beams[0][1] / n ** self.length_penalty <= self.hypotheses[-1][0]


def _beam_steps(prompts: Sequence[Sequence[int]], max_new_tokens: int, context_length: int) -> list[int]:
    """How many new tokens each cropped prompt's search may take: as many as asked, less where
    the context ends (a line says so)."""
    steps = [min(max_new_tokens, context_length - len(p)) for p in prompts]
    for prompt, n in zip(prompts, steps):
        if n < max_new_tokens:
            log.info("note: beam search stops at the model's context of %d tokens: at most %d new tokens after a "
                     "%d-token prompt", context_length, max(n, 0), len(prompt))
    return steps


@torch.no_grad()
def beam_search_batch(model: Any, prompts: Sequence[Sequence[int]], *, num_beams: int, max_new_tokens: int = 256,
                      eos_ids: Sequence[int] = (), length_penalty: float = 1.0,
                      is_done: Callable[[list[int]], bool] | None = None,
                      prepack: bool = True) -> list[list[tuple[float, list[int]]]]:
    """The hypotheses each prompt's beam search (`BeamSearch`) holds at its end, best first:
    (score, new tokens), at most `num_beams` of them. The prompts are searched together with the
    KV cache: they run once, as one left-padded batch, then every live beam of every prompt is a
    batch row, its cache row copied along with it each step, and a prompt's rows leave the batch
    when its search ends. Prompt and new tokens stay within the context: a longer prompt is
    cropped to its last tokens, and the new tokens stop where the context ends (no hypothesis if
    no token fits)."""
    if not all(prompts):
        raise LlmftError("cannot generate from an empty prompt")
    note_context([len(p) for p in prompts], model.cfg.context_length, max_new_tokens)  # a cropped prompt, if one is
    ids = [crop_prompt(p, model.cfg.context_length) for p in prompts]
    steps = _beam_steps(ids, max_new_tokens, model.cfg.context_length)
    searches = [BeamSearch(num_beams, n, eos_ids, length_penalty, is_done) for n in steps]
    going = [i for i, n in enumerate(steps) if n >= 1]  # the prompts with live beams, in batch order
    if going:
        with decoding_session(model, prepack), \
                DecodingState(model, [ids[i] for i in going], max(steps), use_cache=True) as state:
            logits = state.prefill()[:, -1]  # (rows, V): one row per live beam, each prompt's together
            while going:
                going, rows = _advance_beams(searches, going, logits)
                if going:
                    state.select(rows)
                    logits = state.step([tokens[-1:] for i in going for tokens, _ in searches[i].beams])[:, -1]
    return [search.hypotheses for search in searches]


def _advance_beams(searches: list[BeamSearch], going: list[int], logits: torch.Tensor) -> tuple[list[int], list[int]]:
    """One step of every going search, each on its own beams' rows of `logits` (B, V): the
    searches that go on, and the batch rows their new beams continue (indices into the old rows)."""
    still, rows, first = [], [], 0
    for i in going:
        count = len(searches[i].beams)
        chosen = searches[i].advance(logits[first:first + count])
        if chosen:
            still.append(i)
            rows += [first + r for r in chosen]
        first += count
    return still, rows


def beam_search_hypotheses(model: Any, prompt: Sequence[int], **options: Any) -> list[tuple[float, list[int]]]:
    """The hypotheses of one prompt's beam search: `beam_search_batch(model, [prompt], **options)`."""
    return beam_search_batch(model, [prompt], **options)[0]


def best_tokens(hypotheses: list[tuple[float, list[int]]]) -> list[int]:
    """The new tokens of a search's best hypothesis (none when it holds none)."""
    return hypotheses[0][1] if hypotheses else []


def beam_search_tokens(model: Any, prompt: Sequence[int], **options: Any) -> list[int]:
    """The new tokens of the best hypothesis of `beam_search_hypotheses(model, prompt, **options)`."""
    return best_tokens(beam_search_hypotheses(model, prompt, **options))


def generate_tokens(model: Any, prompts: Sequence[Sequence[int]], **options: Any) -> list[list[int]]:
    """New token ids for each prompt of one batch, generated together: the steps of
    `stream_tokens(model, prompts, **options)` joined (`options`: its keyword arguments)."""
    out: list[list[int]] = [[] for _ in prompts]
    for decided in stream_tokens(model, prompts, **options):
        for row, tokens in decided.items():
            out[row] += tokens
    return out


def stop_check(tokenizer: Any, stop_strings: Sequence[str]) -> Callable[[list[int]], bool] | None:
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


def _settled(text: str, stop_strings: Sequence[str]) -> str:
    """`text` cut at its first stop string, less an ending that may be the start of one: what
    more tokens can no longer take back."""
    text = cut_at_stop(text, stop_strings)
    held = max((n for s in stop_strings for n in range(1, len(s)) if text.endswith(s[:n])), default=0)
    return text[:len(text) - held]


def _token_options(model: Any, tokenizer: Any, temperature: float, top_k: int | None, top_p: float | None,
                   stop_strings: Sequence[str], eos_id: int | Sequence[int] | None,
                   seed: int | None) -> dict[str, Any]:
    """`stream_tokens`'s sampling and stopping arguments for `generate`'s: the sampling settings
    checked, the stop ids (default: end-of-text), a generator seeded with `seed`, a check for
    the stop strings."""
    if temperature < 0 or (top_k is not None and top_k < 1) or (top_p is not None and not 0 < top_p <= 1):
        raise LlmftError(f"sampling settings: need temperature >= 0, top_k >= 1, 0 < top_p <= 1 "
                         f"(got {temperature}, {top_k}, {top_p})")
    if eos_id is None:
        eos_id = tokenizer.eos_id
    generator = None
    if seed is not None:
        generator = torch.Generator(model.tok_emb.weight.device).manual_seed(seed)
    return {"temperature": temperature, "top_k": top_k, "top_p": top_p, "generator": generator,
            "eos_ids": [eos_id] if isinstance(eos_id, int) else list(eos_id),
            "is_done": stop_check(tokenizer, stop_strings)}


def _encode(tokenizer: Any, prompt: str | Sequence[int]) -> list[int]:
    """A prompt's token ids (a string is encoded)."""
    return tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)


def generate(model: Any, tokenizer: Any, prompts: Sequence[str] | Sequence[Sequence[int]], *,
             max_new_tokens: int = 256, temperature: float = 0.0, top_k: int | None = None,
             top_p: float | None = None, stop_strings: Sequence[str] = (),
             eos_id: int | Sequence[int] | None = None, use_cache: bool = True,
             seed: int | None = None, batch_size: int = 8, draft_tokens: int = DRAFT_TOKENS,
             prepack: bool = True, num_beams: int = 1, length_penalty: float = 1.0) -> list[str]:
    """The new text of each prompt (strings, or token id lists), in input order.

    Greedy when `temperature` is 0, else sampled (`top_k`, `top_p`); `seed` makes sampling
    reproducible. `num_beams` > 1: beam search instead (`beam_search_batch`, not sampled), the
    `batch_size` prompts of a batch searched together, `num_beams` rows each. Generation of a
    prompt ends at `eos_id` (default: the tokenizer's end-of-text; pass a list to add a chat
    template's end-of-turn id, see `PromptStyle.stop_token_ids`) or at the first stop string,
    which is cut off with everything after it. `draft_tokens` and `prepack`: see `stream_tokens`.
    """
    options = _token_options(model, tokenizer, temperature, top_k, top_p, stop_strings, eos_id, seed)
    check_beams(num_beams, temperature)
    encoded = [_encode(tokenizer, p) for p in prompts]
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]), reverse=True)
    texts: list[str] = [""] * len(encoded)
    with decoding_session(model, prepack):  # packed once for every batch
        for start in range(0, len(order), batch_size):
            batch = order[start:start + batch_size]
            new_tokens = _batch_tokens(model, [encoded[i] for i in batch], num_beams, length_penalty,
                                       max_new_tokens=max_new_tokens, use_cache=use_cache,
                                       draft_tokens=draft_tokens, prepack=prepack, **options)
            for i, tokens in zip(batch, new_tokens):
                texts[i] = cut_at_stop(tokenizer.decode(tokens), stop_strings)
    return texts


def _batch_tokens(model: Any, prompts: list[list[int]], num_beams: int, length_penalty: float,
                  **options: Any) -> list[list[int]]:
    """A batch's new tokens: decoded together (`generate_tokens`), or with `num_beams` > 1 by beam
    search, the prompts searched together (`beam_search_batch`; `options` as `generate_tokens`
    takes them)."""
    if num_beams == 1:
        return generate_tokens(model, prompts, **options)
    kept = {k: options[k] for k in ("max_new_tokens", "eos_ids", "is_done", "prepack")}
    found = beam_search_batch(model, prompts, num_beams=num_beams, length_penalty=length_penalty, **kept)
    return [best_tokens(hypotheses) for hypotheses in found]


def check_beams(num_beams: int, temperature: float) -> None:
    """Fail before any work on a beam count beam search cannot use."""
    if num_beams < 1:
        raise LlmftError(f"--num-beams must be at least 1, got {num_beams}")
    if num_beams > 1 and temperature != 0.0:
        raise LlmftError(f"beam search (--num-beams {num_beams}) is greedy: it takes no --temperature "
                         f"(got {temperature})")


def text_increments(texts: Iterable[str]) -> Iterator[str]:
    """What each text adds to the one before it, for texts that each begin with the one before:
    the non-empty pieces that join to the last text."""
    sent = 0
    for text in texts:
        if len(text) > sent:
            yield text[sent:]
            sent = len(text)


def _settled_texts(tokenizer: Any, steps: Steps, stop_strings: Sequence[str]) -> Iterator[str]:
    """Prompt 0's new text after each step, as far as it is settled (`_settled`), skipping steps
    whose text ends inside a multi-byte UTF-8 character (decoded as U+FFFD until its last byte
    comes); last, the whole text cut at its stop string."""
    tokens: list[int] = []
    for decided in steps:
        tokens += decided[0]
        text = tokenizer.decode(tokens)
        if not text.endswith("\ufffd"):
            yield _settled(text, stop_strings)
    yield cut_at_stop(tokenizer.decode(tokens), stop_strings)


def stream_text(model: Any, tokenizer: Any, prompt: str | Sequence[int], *, max_new_tokens: int = 256,
                temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
                stop_strings: Sequence[str] = (), eos_id: int | Sequence[int] | None = None,
                use_cache: bool = True, seed: int | None = None, draft_tokens: int = DRAFT_TOKENS,
                prepack: bool = True) -> Iterator[str]:
    """The new text of one prompt in pieces, as it is generated: the pieces join to what
    `generate` returns for it (the keyword arguments are its own). A piece comes once the text
    so far ends in a whole character and cannot be the start of a stop string; nothing from a
    stop string on is ever yielded.
    """
    options = _token_options(model, tokenizer, temperature, top_k, top_p, stop_strings, eos_id, seed)
    steps = stream_tokens(model, [_encode(tokenizer, prompt)], max_new_tokens=max_new_tokens,
                          use_cache=use_cache, draft_tokens=draft_tokens, prepack=prepack, **options)
    return text_pieces(tokenizer, steps, stop_strings)


def text_pieces(tokenizer: Any, steps: Steps, stop_strings: Sequence[str] = ()) -> Iterator[str]:
    """Prompt 0's new text in pieces from its steps (`stream_tokens`' form, {0: new ids} per
    step), as `stream_text` yields them: they join to its whole new text cut at the first stop
    string."""
    return text_increments(_settled_texts(tokenizer, steps, stop_strings))
