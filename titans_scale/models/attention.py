"""Attention: the projections (with RoPE and persistent tokens), the key/value cache, and the three masks.

Shapes: ``B`` batch, ``H`` heads, ``n`` new tokens (queries), ``m`` cached keys, ``d`` head size.
Every kernel takes the queries of the ``n`` newest tokens and the keys/values of the ``m`` cached tokens
followed by those ``n`` tokens' own, so that one code path serves training (``m = 0``), prefill and
one-token decoding. All of them call ``torch.nn.functional.scaled_dot_product_attention``:

- ``causal_attention``: each query sees the persistent prefix and every key up to its own position
  (lower-right aligned causal bias: flash / memory-efficient kernels on GPU).
- ``window_attention``: each query sees the prefix and the ``window`` most recent keys, itself included.
  Queries are cut into blocks of ``Q <= window``; a block attends to the ``window + Q - 1`` keys that end at
  its last query, under one banded mask shared by all blocks: cost and memory linear in the sequence.
- ``segment_attention`` (MAC): token j of a segment sees the prefix, the retrieved h_i and the segment
  tokens S_i for i <= j (design doc, "causality inside a segment").
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.attention.bias import causal_lower_right

from .layers import apply_rope, rope_tables

Prefix = tuple[Tensor, Tensor]  # keys and values of the persistent tokens, (1 or B, H, N_p, d)


@dataclass
class KVCache:
    """Keys (after RoPE) and values an attention layer still needs: all past tokens (full causal), the
    last ``window - 1`` (sliding window), or the tokens of the current segment (MAC)."""

    keys: Tensor  # (B, H, m, d)
    values: Tensor

    @property
    def length(self) -> int:
        return self.keys.shape[2]

    def append(self, keys: Tensor, values: Tensor) -> "KVCache":
        return KVCache(torch.cat([self.keys, keys], 2), torch.cat([self.values, values], 2))

    def last(self, count: int) -> "KVCache":
        start = max(0, self.length - count)
        return KVCache(self.keys[:, :, start:], self.values[:, :, start:])

    def detach(self) -> "KVCache":
        return KVCache(self.keys.detach(), self.values.detach())


def _with_prefix(k: Tensor, v: Tensor, prefix: Prefix | None) -> tuple[Tensor, Tensor]:
    if prefix is None:
        return k, v
    pk, pv = (p.expand(k.shape[0], *p.shape[1:]) for p in prefix)
    return torch.cat([pk, k], 2), torch.cat([pv, v], 2)


def causal_attention(q: Tensor, k: Tensor, v: Tensor, prefix: Prefix | None = None) -> Tensor:
    """Query i (of n) sees the prefix and keys 0 .. m + i (the last n keys are the queries' own)."""
    k, v = _with_prefix(k, v, prefix)
    n, s = q.shape[2], k.shape[2]
    if n == s:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    if n == 1:
        return F.scaled_dot_product_attention(q, k, v)
    if q.is_cuda:  # lower-right causal bias: flash / memory-efficient kernels, no mask in memory
        return F.scaled_dot_product_attention(q, k, v, attn_mask=causal_lower_right(n, s))
    mask = torch.ones(n, s, dtype=torch.bool, device=q.device).tril(s - n)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def window_attention(q: Tensor, k: Tensor, v: Tensor, window: int, prefix: Prefix | None = None) -> Tensor:
    """Query i sees the prefix and keys m + i - window + 1 .. m + i (cache first, its own keys last)."""
    B, H, n, d = q.shape
    drop = max(0, k.shape[2] - n - (window - 1))  # cached keys that no new query can see
    k, v = k[:, :, drop:], v[:, :, drop:]
    m = k.shape[2] - n
    head = min(n, window - m)  # these queries are less than a window from the start: plain causal
    out = causal_attention(q[:, :, :head], k[:, :, : m + head], v[:, :, : m + head], prefix)
    tail = n - head
    if tail == 0:
        return out
    # Tail query t sits at key index window + t and sees keys t + 1 .. t + window. Drop key 0, pad the end.
    Q = min(tail, window)
    blocks = -(-tail // Q)
    pad = blocks * Q - tail
    span = window + Q - 1
    kb, vb = (F.pad(t[:, :, 1:], (0, 0, 0, pad)).unfold(2, span, Q).transpose(-1, -2) for t in (k, v))
    i = torch.arange(Q, device=q.device)[:, None]
    j = torch.arange(span, device=q.device)[None, :]
    mask = (j >= i) & (j <= i + window - 1)  # block-relative band, the same for every block
    if prefix is not None:
        kb, vb = (torch.cat([p.expand(B, *p.shape[1:]).unsqueeze(2).expand(-1, -1, blocks, -1, -1), t], 3) for p, t in zip(prefix, (kb, vb)))
        mask = torch.cat([mask.new_ones(Q, prefix[0].shape[2]), mask], 1)
    qb = F.pad(q[:, :, head:], (0, 0, 0, pad)).reshape(B * H * blocks, 1, Q, d)
    kb, vb = (t.reshape(B * H * blocks, 1, -1, d) for t in (kb, vb))
    o = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=mask)
    return torch.cat([out, o.reshape(B, H, blocks * Q, d)[:, :, :tail]], 2)


def segment_attention(q: Tensor, retrieved: KVCache, segment: KVCache, prefix: Prefix | None = None) -> Tensor:
    """MAC: the queries are segment tokens m - n .. m - 1; keys are [P | h_0..h_{m-1} | S_0..S_{m-1}]."""
    n, m = q.shape[2], segment.length
    visible = torch.arange(m, device=q.device)[None, :] <= torch.arange(m - n, m, device=q.device)[:, None]
    mask = torch.cat([visible, visible], 1)
    k, v = _with_prefix(torch.cat([retrieved.keys, segment.keys], 2), torch.cat([retrieved.values, segment.values], 2), prefix)
    if prefix is not None:
        mask = torch.cat([mask.new_ones(n, prefix[0].shape[2]), mask], 1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


class Attention(nn.Module):
    """Multi-head attention with RoPE and N_p persistent tokens prepended to its keys and values.

    ``window=None`` is full causal attention, else sliding-window attention. The persistent tokens are
    learned vectors in the model width, projected by this layer's W_K and W_V and placed at positions
    0 .. N_p - 1; the sequence's tokens follow at N_p + t. MAC reuses the projections with its own keys.
    """

    def __init__(self, dim: int, heads: int, persistent_tokens: int, rope_theta: float, window: int | None = None):
        super().__init__()
        self.heads, self.head_dim, self.window = heads, dim // heads, window
        self.rope_theta = rope_theta
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(dim, dim, bias=False)
        self.to_v = nn.Linear(dim, dim, bias=False)
        self.to_out = nn.Linear(dim, dim, bias=False)
        self.persistent = nn.Parameter(torch.randn(persistent_tokens, dim)) if persistent_tokens else None

    @property
    def n_persistent(self) -> int:
        return 0 if self.persistent is None else self.persistent.shape[0]

    def rope(self, positions: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        return rope_tables(positions, self.head_dim, self.rope_theta, dtype)

    def _heads(self, t: Tensor) -> Tensor:  # (B, n, H*d) -> (B, H, n, d)
        return t.unflatten(-1, (-1, self.head_dim)).transpose(1, 2)  # -1: the local heads under TP

    def queries(self, x: Tensor, rope: tuple[Tensor, Tensor]) -> Tensor:
        return apply_rope(self._heads(self.to_q(x)), *rope)

    def keys_values(self, x: Tensor, rope: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        return apply_rope(self._heads(self.to_k(x)), *rope), self._heads(self.to_v(x))

    def persistent_kv(self) -> Prefix | None:
        """Keys and values of the persistent tokens, (1, H, N_p, d)."""
        if self.persistent is None:
            return None
        positions = torch.arange(self.n_persistent, device=self.persistent.device)
        return self.keys_values(self.persistent.unsqueeze(0), self.rope(positions, self.persistent.dtype))

    def merge(self, o: Tensor) -> Tensor:
        """(B, H, n, d) -> the output projection of the concatenated heads, (B, n, D)."""
        return self.to_out(o.transpose(1, 2).flatten(2))

    def forward(self, x: Tensor, cache: KVCache | None, position: int) -> tuple[Tensor, KVCache]:
        n = x.shape[1]
        start = self.n_persistent + position
        rope = self.rope(torch.arange(start, start + n, device=x.device), x.dtype)
        q = self.queries(x, rope)
        k, v = self.keys_values(x, rope)
        cache = KVCache(k, v) if cache is None else cache.append(k, v)
        prefix = self.persistent_kv()
        if self.window is None:
            return self.merge(causal_attention(q, cache.keys, cache.values, prefix)), cache
        o = window_attention(q, cache.keys, cache.values, self.window, prefix)
        return self.merge(o), cache.last(self.window - 1)
