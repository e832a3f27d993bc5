"""Multi-head attention on `torch.nn.functional.scaled_dot_product_attention`.

Self-attention uses one fused qkv projection; cross-attention (used by fusion encoders and
decoders in later recipes) projects queries from `x` and keys/values from `context`.
Masks are boolean, True meaning "may attend", broadcastable to [B, heads, L_q, L_k].
Decoding keeps a per-layer key/value cache (`KVCache`): new tokens attend to the cached keys of
earlier ones, and cross-attention keys/values of a fixed context are computed once.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def padding_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """[B, L] 1/0 token mask -> [B, 1, 1, L] boolean key mask."""
    return attention_mask.bool()[:, None, None, :]


def causal_mask(length: int, device: torch.device | None = None) -> torch.Tensor:
    """[L, L] lower-triangular boolean mask: position t sees positions <= t."""
    return torch.ones(length, length, dtype=torch.bool, device=device).tril()


class KVCache:
    """Keys and values of earlier decoding steps, one dict per attention layer.

    `length` is the number of tokens already decoded; `reorder` selects or repeats batch rows
    (beam search). Everything generation needs of a decoder's state, in one object.

    `context_only=True` keeps only the cross-attention keys/values of the context: passes over
    the same context through the same (tied) cross-attention weights then project it once
    (BLIP's ITM encoder and LM decoder, Sec. 3.1); their self-attention and positions are
    untouched.
    """

    def __init__(self, context_only: bool = False) -> None:
        self.entries: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
        self.length = 0
        self.context_only = context_only

    def entry(self, layer: int, kind: str) -> dict[str, torch.Tensor] | None:
        """The keys/values of one attention ("self" or "cross") of one layer."""
        if kind == "self" and self.context_only:
            return None
        return self.entries.setdefault((layer, kind), {})

    def advance(self, tokens: int) -> None:
        """Count `tokens` more decoded tokens (a context-only cache decodes nothing)."""
        if not self.context_only:
            self.length += tokens

    def reorder(self, index: torch.Tensor, context: bool = True) -> KVCache:
        """Rows `index` of every entry; `context=False` leaves the cross-attention ("cross")
        entries as they are (right when each row moves among rows with the same context)."""
        for (_, kind), entry in self.entries.items():
            if context or kind != "cross":
                for key, tensor in entry.items():
                    entry[key] = tensor.index_select(0, index)
        return self


class Attention(nn.Module):
    """Multi-head (self- or cross-) attention with an output projection."""

    def __init__(self, dim: int, heads: int, context_dim: int | None = None, bias: bool = True):
        super().__init__()
        if dim % heads:
            raise ValueError(f"attention width {dim} is not divisible by {heads} heads")
        self.heads = heads
        self.is_cross = context_dim is not None
        if self.is_cross:
            self.q = nn.Linear(dim, dim, bias=bias)
            self.kv = nn.Linear(context_dim, 2 * dim, bias=bias)
        else:
            self.qkv = nn.Linear(dim, 3 * dim, bias=bias)
        self.out = nn.Linear(dim, dim, bias=bias)

    def _split_heads(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, _ = x.shape
        return x.view(batch, length, self.heads, -1).transpose(1, 2)

    def forward(
        self,
        x: torch.Tensor,
        context: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        is_causal: bool = False,
        cache: dict[str, torch.Tensor] | None = None,
        context_rows: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """`cache` (one layer of a `KVCache`) makes self-attention see earlier steps' keys and
        cross-attention reuse the context's keys/values. `context_rows` [B] pairs row i of `x`
        with row `context_rows[i]` of `context` (and of a cross-attention `mask`): each distinct
        context row is projected once, however often it repeats (the ITM batch of 3B pairs
        holds B images)."""
        if self.is_cross:
            q = self._split_heads(self.q(x))
            if cache is not None and "k" in cache:
                k, v = cache["k"], cache["v"]
            else:
                k, v = map(self._split_heads, self.kv(context).chunk(2, dim=-1))
                if cache is not None:  # one row per context row, whatever `context_rows` picks
                    cache["k"], cache["v"] = k, v
            if context_rows is not None:
                k, v = k.index_select(0, context_rows), v.index_select(0, context_rows)
                mask = None if mask is None else mask.index_select(0, context_rows)
        else:
            q, k, v = map(self._split_heads, self.qkv(x).chunk(3, dim=-1))
            if cache is not None and "k" in cache:
                past = cache["k"].shape[2]
                k, v = torch.cat([cache["k"], k], dim=2), torch.cat([cache["v"], v], dim=2)
                if is_causal:  # new query i sits at position past + i
                    mask = torch.ones(q.shape[2], k.shape[2], dtype=torch.bool, device=x.device).tril(past)
                    is_causal = False
            if cache is not None:
                cache["k"], cache["v"] = k, v
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal)
        return self.out(y.transpose(1, 2).flatten(2))
