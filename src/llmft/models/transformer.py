"""The decoder-only transformer shared by every architecture.

`DecoderLM` is the whole skeleton: token embedding, a stack of pre-norm `Block`s, final norm,
output head. An architecture (`gpt2.py`, `llama.py`, `gemma3.py`) only says which norm, which
MLP and how positions enter (learned embeddings or rotary), and where it differs, what a block
holds (`make_block`) and how each block rotates (`layer_ropes`). Everything downstream
(classification heads, freezing, adapters, the activation cache, generation) relies on these names:
``tok_emb``, ``blocks[i].attn.{query,key,value,proj}``, ``blocks[i].mlp``, ``final_norm``,
``out_head``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from llmft.models.config import ModelConfig

Rope = tuple[torch.Tensor, torch.Tensor]  # (cos, sin), each (B, T, head_dim)
Projection = tuple[torch.Tensor, torch.Tensor | None]  # (W, b) of y = x Wᵀ + b


class KVCache(nn.Module):
    """Pre-allocated keys and values for one attention layer, so a new token costs one position."""

    def __init__(self, batch_size: int, n_kv_heads: int, max_len: int, head_dim: int,
                 device: torch.device, dtype: torch.dtype) -> None:
        super().__init__()
        shape = (batch_size, n_kv_heads, max_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, device=device, dtype=dtype), persistent=False)
        self.register_buffer("v", torch.zeros(shape, device=device, dtype=dtype), persistent=False)

    def update(self, start: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v at slots [start, start+T) and return every slot filled so far."""
        end = start + k.shape[2]
        self.k[:, :, start:end] = k
        self.v[:, :, start:end] = v
        return self.k[:, :, :end], self.v[:, :, :end]


def plain_weight(layer: nn.Module) -> Projection | None:
    """(W, b) when `layer` computes exactly y = x Wᵀ + b with these very tensors, else None.

    Code that uses W itself instead of calling the layer (weight absorption, prepacking) asks
    here. An `nn.Linear` is plain; any other layer answers through its own `plain_weight()`
    method, and a layer without one is not plain.
    """
    if type(layer) is nn.Linear:
        return layer.weight, layer.bias
    answer = getattr(layer, "plain_weight", None)
    return answer() if callable(answer) else None


def take_positions(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x[b, index[b, j]] for every row b: (B, T, ...) -> (B, K, ...)."""
    index = index.view(*index.shape, *(1,) * (x.dim() - 2)).expand(-1, -1, *x.shape[2:])
    return x.gather(1, index)


def kept_mask(keep: torch.Tensor, T: int, cache_pos: int, mask: torch.Tensor | None) -> torch.Tensor:
    """The (B, 1, K, S) rows of the attention mask for the queries at positions `keep` (B, K): a
    given mask's rows, else causal (a query sees the cached prefix and the tokens up to itself)."""
    if mask is not None:
        return mask.gather(2, keep[:, None, :, None].expand(-1, mask.shape[1], -1, mask.shape[-1]))
    slots = torch.arange(cache_pos + T, device=keep.device)
    return (slots <= cache_pos + keep.unsqueeze(-1)).unsqueeze(1)


def within_window(mask: torch.Tensor | None, q_slots: torch.Tensor, S: int, window: int) -> torch.Tensor:
    """`mask` (None: causal) narrowed to sliding-window attention: a query at slot q (q_slots,
    (..., K)) sees only keys at slots q - window < k <= q of the S slots. (..., K, S) out."""
    behind = q_slots.unsqueeze(-1) - torch.arange(S, device=q_slots.device)  # (..., K, S): q - k
    near = behind < window
    return near & (behind >= 0) if mask is None else near & mask


def apply_rope(x: torch.Tensor, rope: Rope) -> torch.Tensor:
    """Rotate pairs (i, i + d/2) of x (B, H, T, d) by position-dependent angles (RoFormer)."""
    cos, sin = (t.unsqueeze(1).to(x.dtype) for t in rope)
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class CausalSelfAttention(nn.Module):
    """Multi-head (or grouped-query) causal attention through `scaled_dot_product_attention`.

    `window`: sliding-window attention, a query sees only the latest `window` keys (itself
    included). `qk_norms`: a norm for each query and each key head, applied before the rotation
    (Gemma 3); without them, none. Scores are scaled by 1/√query_pre_attn_scalar (1/√d by default).
    """

    def __init__(self, cfg: ModelConfig, window: int | None = None,
                 qk_norms: tuple[nn.Module, nn.Module] | None = None) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.query = nn.Linear(cfg.emb_dim, cfg.n_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.key = nn.Linear(cfg.emb_dim, cfg.n_kv_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.value = nn.Linear(cfg.emb_dim, cfg.n_kv_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.proj = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.emb_dim, bias=cfg.bias)
        self.q_norm, self.k_norm = qk_norms or (nn.Identity(), nn.Identity())
        self.window = window
        self.scale = 1 / math.sqrt(cfg.query_pre_attn_scalar)
        self.drop_rate = cfg.drop_rate
        self.kv_cache: KVCache | None = None

    def forward(self, x: torch.Tensor, rope: Rope | None, mask: torch.Tensor | None,
                cache_pos: int | None) -> torch.Tensor:
        """(B, T, C) -> (B, T, C). With a cache, the keys and values of earlier calls join in."""
        T = x.shape[1]
        q = self.q_norm(self.split_heads(self.query(x), self.n_heads))  # (B, H, T, d)
        if rope is not None:
            q = apply_rope(q, rope)
        k, v = self.keys_values(x, rope, cache_pos)  # (B, H_kv, S, d), S = cached prefix + T
        S = k.shape[2]
        if self.window is not None and S > self.window:  # sliding window (with S <= window it hides nothing)
            q_slots = torch.arange(S - T, S, device=x.device)  # the queries' key slots
            mask = within_window(mask, q_slots, S, self.window)  # (T, S), or (B, 1, T, S) with a mask
        elif mask is None and 1 < T < S:  # chunked prefill: causal, shifted by the cached prefix
            mask = torch.ones(T, S, dtype=torch.bool, device=x.device).tril(S - T)  # (T, S)
        return self.proj(self.attend(q, k, v, mask))  # (B, T, C)

    def forward_kept(self, x: torch.Tensor, rope: Rope | None, mask: torch.Tensor | None,
                     cache_pos: int | None, keep: torch.Tensor) -> torch.Tensor:
        """(B, T, C) -> (B, K, C): the outputs at positions `keep` (B, K) only. Keys and values
        still cover every position, queries only the kept ones."""
        T = x.shape[1]
        mask = kept_mask(keep, T, cache_pos or 0, mask)  # (B, 1, K, S)
        if self.window is not None:
            mask = within_window(mask, (cache_pos or 0) + keep.unsqueeze(1), mask.shape[-1], self.window)
        q = self.q_norm(self.split_heads(self.query(take_positions(x, keep)), self.n_heads))  # (B, H, K, d)
        absorbable = self.absorbable(rope, cache_pos, keep.shape[1])
        if absorbable is not None:
            return self.proj(self.absorbed_attention(q, x, mask, *absorbable))  # (B, K, C)
        if rope is not None:
            q = apply_rope(q, tuple(take_positions(t, keep) for t in rope))
        k, v = self.keys_values(x, rope, cache_pos)  # (B, H_kv, S, d)
        return self.proj(self.attend(q, k, v, mask))  # (B, K, C)

    def split_heads(self, y: torch.Tensor, n_heads: int) -> torch.Tensor:
        """A projection's output (B, T, n_heads·d) split into heads: (B, n_heads, T, d)."""
        B, T, _ = y.shape
        return y.view(B, T, n_heads, self.head_dim).transpose(1, 2)

    def keys_values(self, x: torch.Tensor, rope: Rope | None,
                    cache_pos: int | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values (B, H_kv, S, d) of x (B, T, C), after the cached ones when caching."""
        k = self.k_norm(self.split_heads(self.key(x), self.n_kv_heads))  # (B, H_kv, T, d)
        v = self.split_heads(self.value(x), self.n_kv_heads)  # (B, H_kv, T, d)
        if rope is not None:
            k = apply_rope(k, rope)
        if self.kv_cache is not None and cache_pos is not None:
            k, v = self.kv_cache.update(cache_pos, k, v)  # (B, H_kv, S, d)
        return k, v

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               mask: torch.Tensor | None) -> torch.Tensor:
        """softmax(q kᵀ · scale) v for queries q (B, H, Tq, d), heads merged: (B, Tq, H·d).
        No mask: causal (a single query sees every key)."""
        B, H, Tq, d = q.shape
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=mask is None and Tq > 1, scale=self.scale,
            dropout_p=self.drop_rate if self.training else 0.0,
            enable_gqa=self.n_kv_heads != self.n_heads,
        )  # (B, H, Tq, d)
        return y.transpose(1, 2).reshape(B, Tq, H * d)

    def absorbable(self, rope: Rope | None, cache_pos: int | None,
                   K: int) -> tuple[Projection, Projection] | None:
        """The key and value (W, b) when `absorbed_attention` is exact and cheaper, else None:
        few queries (K·H below the model width), no rotary positions, no key norm, no cache, no
        attention dropout, and plain key and value projections (`plain_weight`)."""
        if rope is not None or not isinstance(self.k_norm, nn.Identity) or cache_pos is not None \
                or (self.training and self.drop_rate > 0):
            return None
        key, value = plain_weight(self.key), plain_weight(self.value)
        if key is None or value is None or K * self.n_heads >= key[0].shape[1]:
            return None
        return key, value

    def absorbed_attention(self, q: torch.Tensor, x: torch.Tensor, mask: torch.Tensor,
                           key: Projection, value: Projection) -> torch.Tensor:
        """Attention for a few queries q (B, H, K, d) without computing keys and values.

        A query's score against position t is q·(W_k x_t + b_k) = (W_k^T q)·x_t + q·b_k (the last
        term is the same for every t). Its output is sum_t p_t (W_v x_t + b_v)
        = W_v (sum_t p_t x_t) + b_v. So project each query into the model dimension instead of
        every position into keys and values: O(T·H·C) per query instead of O(T·C²) (DeepSeek-V2's
        "weight absorption"). Needs positions that don't rotate keys (GPT-2's learned ones).
        """
        B, H, K, d = q.shape
        (w_k, b_k), (w_v, b_v) = key, value

        def per_query_head(t: torch.Tensor) -> torch.Tensor:
            """A key/value weight (H_kv·d, C) or bias (H_kv·d,) as (H, d, ...): GQA shares it."""
            return t.view(self.n_kv_heads, d, *t.shape[1:]).repeat_interleave(H // self.n_kv_heads, 0)

        q_x = torch.einsum("bhkd,hdc->bhkc", q, per_query_head(w_k))  # (B, H, K, C): W_k^T q
        scores = torch.einsum("bhkc,btc->bhkt", q_x, x)  # (B, H, K, T)
        if b_k is not None:  # softmax ignores it; kept so b_k still gets its (zero) gradient
            scores = scores + torch.einsum("bhkd,hd->bhk", q, per_query_head(b_k)).unsqueeze(-1)
        p = torch.softmax((scores * self.scale).masked_fill(~mask, float("-inf")), dim=-1)  # (B, H, K, T)
        p_x = torch.einsum("bhkt,btc->bhkc", p, x)  # (B, H, K, C): sum_t p_t x_t
        y = torch.einsum("bhkc,hdc->bkhd", p_x, per_query_head(w_v))  # (B, K, H, d)
        if b_v is not None:
            y = y + per_query_head(b_v)
        return y.reshape(B, K, H * d)


class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm1(x)), then x + mlp(norm2(x)).

    `post_norms` (Gemma's "sandwich" norms) also normalise the attention and the MLP output
    before each is added: x + post_attn_norm(attn(norm1(x))), x + post_mlp_norm(mlp(norm2(x))).
    """

    def __init__(self, cfg: ModelConfig, attn: CausalSelfAttention, norm1: nn.Module, norm2: nn.Module,
                 mlp: nn.Module, post_norms: tuple[nn.Module, nn.Module] | None = None) -> None:
        super().__init__()
        self.norm1, self.attn, self.norm2, self.mlp = norm1, attn, norm2, mlp
        self.post_attn_norm, self.post_mlp_norm = post_norms or (nn.Identity(), nn.Identity())
        self.drop_shortcut = nn.Dropout(cfg.drop_rate)

    def forward(self, x: torch.Tensor, rope: Rope | None, mask: torch.Tensor | None,
                cache_pos: int | None, keep: torch.Tensor | None = None) -> torch.Tensor:
        """(B, T, C) -> (B, T, C), or (B, K, C) at positions `keep` (B, K) only (see `run_blocks`)."""
        if keep is None:
            attended = self.attn(self.norm1(x), rope, mask, cache_pos)  # (B, T, C)
        else:  # from here on only the kept positions: residual, MLP
            attended = self.attn.forward_kept(self.norm1(x), rope, mask, cache_pos, keep)  # (B, K, C)
            x = take_positions(x, keep)  # (B, K, C)
        x = x + self.drop_shortcut(self.post_attn_norm(attended))
        return x + self.drop_shortcut(self.post_mlp_norm(self.mlp(self.norm2(x))))


class DecoderLM(nn.Module):
    """Token embedding -> blocks -> final norm -> output head. Subclasses supply the parts.

    Calling conventions shared by training, classification and generation:
    - ``positions`` (B, T) are the position ids of the tokens (left padding shifts them);
      default ``cache_pos + arange(T)``.
    - ``mask`` is a boolean (B, 1, T, S) "may attend" mask, or None for plain causal attention;
      a sliding-window block narrows it further, by key slot (`within_window`).
    - ``cache_pos`` is the first key/value cache slot the tokens are written to; None: no cache.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.emb_dim)
        self.drop_emb = nn.Dropout(cfg.drop_rate)
        self.blocks = nn.ModuleList(self.make_block(layer) for layer in range(cfg.n_layers))
        self.final_norm = self.make_norm()
        self.out_head = nn.Linear(cfg.emb_dim, cfg.vocab_size, bias=False)
        self.grad_checkpoint = False
        self.apply(self._init_weights)
        self.tie_weights()
        self.init_buffers()

    # -- what an architecture provides -------------------------------------------------
    def make_norm(self) -> nn.Module:
        raise NotImplementedError

    def make_mlp(self) -> nn.Module:
        raise NotImplementedError

    def make_block(self, layer: int) -> Block:
        """Block number `layer`: the architecture's norms and MLP around attention, windowed
        where the config says so (`ModelConfig.attention_window`)."""
        attn = CausalSelfAttention(self.cfg, window=self.cfg.attention_window(layer))
        return Block(self.cfg, attn, self.make_norm(), self.make_norm(), self.make_mlp())

    def position_embedding(self, positions: torch.Tensor) -> torch.Tensor | None:
        """Added to the token embeddings (learned absolute positions), or None."""
        return None

    def rope(self, positions: torch.Tensor) -> Rope | None:
        """Rotary (cos, sin) for these positions, or None."""
        return None

    def layer_ropes(self, positions: torch.Tensor) -> list[Rope | None]:
        """The rotary (cos, sin) of each block, in block order: by default `rope` for all."""
        return [self.rope(positions)] * self.cfg.n_layers

    def init_buffers(self) -> None:
        """Register the buffers computed from the config (never saved, never loaded), on the
        device of the weights."""

    # -- weights -----------------------------------------------------------------------
    def tie_weights(self) -> None:
        """With ``tie_embeddings``, make the output head's weight the token embedding's."""
        if self.cfg.tie_embeddings:
            self.out_head.weight = self.tok_emb.weight

    def assign_weights(self, state: Mapping[str, torch.Tensor]) -> None:
        """Make the tensors of a complete state dict the parameters, without copying them: a
        model built on the meta device (`llmft.models.meta_model`) becomes a real one. The
        head is tied again (assigning gave it a parameter of its own) and the buffers are
        computed on the weights' device."""
        self.load_state_dict(state, assign=True)
        self.tie_weights()
        self.init_buffers()

    # -- the shared forward ------------------------------------------------------------
    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def default_positions(self, idx: torch.Tensor, cache_pos: int | None) -> torch.Tensor:
        start = cache_pos or 0
        return torch.arange(start, start + idx.shape[1], device=idx.device).expand(idx.shape[0], -1)

    def embed(self, idx: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        x = self.tok_emb(idx)
        pos = self.position_embedding(positions)
        return self.drop_emb(x if pos is None else x + pos)

    def run_blocks(self, x: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor | None = None,
                   cache_pos: int | None = None, start: int = 0, stop: int | None = None,
                   keep: torch.Tensor | None = None) -> torch.Tensor:
        """Apply blocks[start:stop] to hidden states x (the activation cache resumes here).

        `keep` (B, K): the only positions whose outputs the caller reads (a classifier's token).
        The last block then runs its queries, projection and MLP on those K positions alone,
        (B, K, C) out: exact, since no later layer reads the other positions, and for the book's
        recipe (last block trainable, rest cached) it cuts the per-step work about fivefold.
        """
        blocks, ropes = self.blocks[start:stop], self.layer_ropes(positions)[start:stop]
        for i, (block, rope) in enumerate(zip(blocks, ropes)):
            block_keep = keep if i == len(blocks) - 1 else None  # earlier blocks: every position
            if self.grad_checkpoint and self.training:
                x = checkpoint(block, x, rope, mask, cache_pos, block_keep, use_reentrant=False)
            else:
                x = block(x, rope, mask, cache_pos, block_keep)
        return x

    def hidden_states(self, idx: torch.Tensor, positions: torch.Tensor | None = None,
                      mask: torch.Tensor | None = None, cache_pos: int | None = None) -> torch.Tensor:
        """Normalised final hidden states (B, T, emb_dim): what a task head reads."""
        if positions is None:
            positions = self.default_positions(idx, cache_pos)
        x = self.run_blocks(self.embed(idx, positions), positions, mask, cache_pos)
        return self.final_norm(x)

    def forward(self, idx: torch.Tensor, positions: torch.Tensor | None = None,
                mask: torch.Tensor | None = None, cache_pos: int | None = None) -> torch.Tensor:
        return self.out_head(self.hidden_states(idx, positions, mask, cache_pos))

    def compile_blocks(self) -> None:
        """torch.compile each block. Per block rather than whole model, so the classification
        head, the activation cache and generation all reuse the same compiled graphs; shapes
        start static (fastest kernels) and become dynamic only for a dimension that changes."""
        for block in self.blocks:
            block.compile()

    # -- key/value cache ---------------------------------------------------------------
    def set_kv_cache(self, batch_size: int, max_len: int) -> None:
        p = self.tok_emb.weight
        for block in self.blocks:
            block.attn.kv_cache = KVCache(batch_size, self.cfg.n_kv_heads, max_len,
                                          self.cfg.head_dim, p.device, p.dtype)

    def clear_kv_cache(self) -> None:
        for block in self.blocks:
            block.attn.kv_cache = None
