"""Token prefixes that several texts share, computed once (the activation cache's plan).

Attention is causal, so a token's state depends only on the tokens up to it: texts that start
with the same tokens (a template, a greeting, spam from one sender, a BOS token) have the same
states there. Sorted, each distinct sequence shares its longest common prefix with the one
before it; only the rest of it is computed, attending to the prefix's cached keys and values.
On the SMS Spam Collection this skips 12 % of the tokens (docs/benchmarks.md).

A sequence's prefix may itself have been computed by several earlier sequences (`Segment`s of
its `path`), so sequences run in waves: wave 0 has no shared prefix, wave k+1 reads keys and
values that waves up to k kept. Within a wave, sequences with about as many new tokens form
one batch, padded on the right (causal attention: no real token sees the padding).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from llmft.data.instruction import common_prefix_length
from llmft.models.transformer import DecoderLM, KVCache

Sequence = tuple[int, ...]
MAX_PADDING = 1 / 8  # of a batch's token rows


@dataclass(frozen=True)
class Segment:
    """Positions [begin, end) of a sequence, computed by sequence number `owner`."""

    owner: int
    begin: int
    end: int


@dataclass
class PrefixPlan:
    sequences: list[Sequence]  # distinct, sorted
    shared: list[int]  # leading tokens each shares with the sequence before it (computed there or earlier)
    paths: list[list[Segment]]  # which sequence computed each position range of each sequence
    waves: list[int]  # 0: nothing shared; else 1 + the wave of the sequence that computed the prefix's end
    keep: list[int]  # new positions whose keys and values later sequences read: [shared, shared + keep)

    def new_length(self, i: int) -> int:
        """How many tokens sequence i computes."""
        return len(self.sequences[i]) - self.shared[i]

    def new_tokens(self) -> int:
        return sum(map(self.new_length, range(len(self.sequences))))


def plan_prefixes(distinct: list[Sequence], share: bool = True) -> PrefixPlan:
    """Who computes what; with `share` False, every sequence computes every token (wave 0).

    Later sequences read from sequence j only positions below the prefix it shares with j + 1
    (sorted order: no later sequence shares more with j), hence `keep`."""
    seqs = sorted(distinct)
    shared = [0] + [common_prefix_length(a, b) for a, b in zip(seqs, seqs[1:])] if share else [0] * len(seqs)
    paths: list[list[Segment]] = []
    waves: list[int] = []
    for i, (seq, p) in enumerate(zip(seqs, shared)):
        prefix = [Segment(s.owner, s.begin, min(s.end, p)) for s in paths[-1] if s.begin < p] if p else []
        waves.append(1 + waves[prefix[-1].owner] if prefix else 0)
        paths.append([*prefix, Segment(i, p, len(seq))])
    keep = [max(0, nxt - p) for p, nxt in zip(shared, [*shared[1:], 0])]
    return PrefixPlan(seqs, shared, paths, waves, keep)


def wave_batches(plan: PrefixPlan, max_tokens: int, max_slots: int) -> list[list[int]]:
    """Batches of sequence numbers, wave by wave, by number of new tokens: at most `max_tokens`
    token rows and `max_slots` key/value slots (rows × (longest prefix + longest new part)) each,
    and at most `MAX_PADDING` of their token rows padding (small batches run far below the
    GEMM's speed: docs/benchmarks.md)."""
    by_wave: dict[int, list[int]] = {}
    for i in range(len(plan.sequences)):
        by_wave.setdefault(plan.waves[i], []).append(i)
    batches = []
    for _, members in sorted(by_wave.items()):
        batch: list[int] = []
        tokens = prefix = 0  # the batch's real new tokens, its longest prefix
        for i in sorted(members, key=lambda i: (plan.new_length(i), plan.shared[i])):
            rows, length = len(batch) + 1, plan.new_length(i)  # the batch's longest so far
            longest = max(prefix, plan.shared[i])
            if batch and (rows * length > max_tokens or rows * (longest + length) > max_slots
                          or rows * length - (tokens + length) > MAX_PADDING * rows * length):
                batches.append(batch)
                batch, tokens, longest = [], 0, plan.shared[i]
            batch.append(i)
            tokens, prefix = tokens + length, longest
        batches.append(batch)
    return batches


def prefix_mask(shared: torch.Tensor, P: int, L: int) -> torch.Tensor:
    """(B, 1, L, P + L) "may attend": row b's prefix fills the last shared[b] of the P prefix
    slots; its L new tokens see that prefix and each other causally."""
    slots = torch.arange(P + L, device=shared.device)
    first = (P - shared).view(-1, 1, 1)  # (B, 1, 1): first real prefix slot
    causal = slots <= P + torch.arange(L, device=shared.device).unsqueeze(-1)  # (L, P + L)
    return ((slots >= first) & causal).unsqueeze(1)


@torch.no_grad()
def run_after_prefixes(model: DecoderLM, new_ids: torch.Tensor, shared: torch.Tensor,
                       prefix_kv: torch.Tensor | None, stop: int,
                       keep_rows: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """blocks[:stop] on tokens (B, L), padded on the right, that follow prefixes of shared[b]
    tokens whose keys and values `prefix_kv` (stop, 2, B, H_kv, P, d) holds right-aligned (None:
    no prefixes).
    Returns the output states (B, L, C) and the new tokens' keys and values in the rows
    `keep_rows` (stop, 2, len(keep_rows), H_kv, L, d)."""
    B, L = new_ids.shape
    P = 0 if prefix_kv is None else prefix_kv.shape[-2]
    cfg, weight = model.cfg, model.tok_emb.weight
    blocks = model.blocks[:stop]
    for layer, block in enumerate(blocks):
        block.attn.kv_cache = KVCache(B, cfg.n_kv_heads, P + L, cfg.head_dim, weight.device, weight.dtype)
        if P:
            block.attn.kv_cache.k[:, :, :P], block.attn.kv_cache.v[:, :, :P] = prefix_kv[layer]
    try:
        positions = shared.unsqueeze(1) + torch.arange(L, device=new_ids.device)  # (B, L)
        mask = prefix_mask(shared, P, L) if P else None  # None: plain causal, as without a prefix
        hidden = model.run_blocks(model.embed(new_ids, positions), positions, mask, cache_pos=P, stop=stop)
        caches = [b.attn.kv_cache for b in blocks]
        new_kv = torch.stack([torch.stack((c.k[keep_rows, :, P:], c.v[keep_rows, :, P:])) for c in caches])
    finally:
        for block in blocks:
            block.attn.kv_cache = None
    return hidden, new_kv


def gather_prefixes(plan: PrefixPlan, batch: list[int], kept: dict[int, torch.Tensor]) -> torch.Tensor:
    """(blocks, 2, B, H_kv, P, d): the keys and values of each row's shared prefix, right-aligned
    in P slots (the longest prefix), from the `kept` (blocks, 2, H_kv, keep, d) of their owners."""
    P, sample = max(plan.shared[i] for i in batch), next(iter(kept.values()))
    blocks, two, heads, _, d = sample.shape
    out = torch.zeros(blocks, two, len(batch), heads, P, d, dtype=sample.dtype)
    for row, i in enumerate(batch):
        parts = [kept[s.owner][..., s.begin - plan.shared[s.owner]:s.end - plan.shared[s.owner], :]
                 for s in plan.paths[i][:-1]]  # the last segment is the row's own new tokens
        if parts:
            out[:, :, row, :, P - plan.shared[i]:] = torch.cat(parts, dim=-2)
    return out
