"""Sequence parallelism by all-to-all: head-parallel memories, attention by halo exchange. Every SP rank
works at once; nothing waits for a relay (but MAC, see below).

Memory layers (LMM, MAG's memory branch, MAL's memory): each rank projects its slice of the sequence
(q, k, v and the gates; the short convolution gets the pre-convolution q, k, v of the previous rank's
last ``conv_width - 1`` tokens as its cache: a halo), then one all-to-all turns (all heads, this slice)
into (H / sp heads, the whole sequence). The memory recurrence runs on those heads over the whole
sequence from W_0, with no communication, and a second all-to-all turns its reads back into (all heads,
this slice) for the output gate and projection. As Megatron does for Mamba; bounded by the number of heads.

Attention: sliding-window attention receives the last ``window - 1`` keys/values of the previous rank's
slice (a halo, so a slice must hold at least ``window - 1`` tokens); full attention (the Transformer++
baseline) all-gathers the keys/values of every earlier rank.

MAC writes each segment's attention output into the memory that the next segment reads, so its memory
depends on every earlier segment through attention: there is no head-parallel shortcut, and MAC blocks
use the relay under this scheme too.
"""

from __future__ import annotations

import torch
from torch import Tensor

from titans_scale.memory import NeuralMemory, initial_state
from titans_scale.memory.layer import state_dtype
from titans_scale.models import Attention, causal_attention, window_attention

from . import comm


class _HeadView:
    """What ``NeuralMemory.memorize`` reads of its module, for a slice of its heads."""

    def __init__(self, memory: NeuralMemory, heads: slice):
        self.cfg, self.shapes, self.reference, self.backend = memory.cfg, memory.shapes, memory.reference, memory.backend
        self.heads = heads.stop - heads.start
        self.ln = None if memory.ln is None else tuple(p[heads] for p in memory.ln)


def head_parallel_memory(inner, sequence, memory: NeuralMemory, x: Tensor, state=None):
    """``NeuralMemory.forward`` of this rank's slice ``x`` (B, S, D) under the all-to-all scheme."""
    comm.refuse_state(state)
    link, n = sequence.link, sequence.link.size
    B, S, _ = x.shape
    H, d, width = memory.heads, memory.head_dim, memory.cfg.conv_width
    if width > 1:  # the convolution cache: the previous slice's last pre-convolution q, k, v (zeros on rank 0)
        tail = x[:, S - (width - 1) :]
        tail_qkv = torch.cat([memory.to_q(tail), memory.to_k(tail), memory.to_v(tail)], -1)
        _, conv_cache = comm.from_previous(tail_qkv, tail_qkv, link, sequence.next_tag())
    else:
        conv_cache = x.new_zeros(B, 0, 3 * H * d)
    q, k, v, theta, log_eta, log_decay, _ = memory.project(x, conv_cache)
    packed = torch.cat([q, k, v, torch.stack([theta, log_eta, log_decay], -1)], -1)  # (B, H, S, 3d + 3)
    packed = comm.all_to_all(packed, 1, 2, link.group)  # -> (B, H / sp, N, 3d + 3)
    q, k, v, gates = packed.split([d, d, d, 3], -1)
    heads = slice(link.rank * (H // n), (link.rank + 1) * (H // n))
    dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
    start = initial_state([w[heads].to(state_dtype(dtype)) for w in memory.initial_weights], B)
    y, _ = NeuralMemory.memorize(_HeadView(memory, heads), q, k, v, *gates.unbind(-1), start)
    y = comm.all_to_all(y, 2, 1, link.group)  # -> (B, H, S, d)
    return memory.output(y, x), None


def halo_attention(inner, sequence, attention: Attention, x: Tensor, cache, position: int):
    """``Attention.forward`` of this rank's slice under the all-to-all scheme (``position``: the slice's
    first token in the sequence): the same projections and kernels, with the earlier keys/values fetched."""
    comm.refuse_state(cache)
    link, n = sequence.link, x.shape[1]
    start = attention.n_persistent + position
    rope = attention.rope(torch.arange(start, start + n, device=x.device), x.dtype)
    q = attention.queries(x, rope)
    k, v = attention.keys_values(x, rope)
    prefix = attention.persistent_kv()
    if attention.window is None:
        q, earlier = comm.from_earlier(q, torch.cat([k, v], -1), 2, link)
        k, v = (torch.cat([e, t], 2) for e, t in zip(earlier.chunk(2, -1), (k, v)))
        return attention.merge(causal_attention(q, k, v, prefix)), None
    m = attention.window - 1
    if m and n:
        q, halo = comm.from_previous(q, torch.cat([k, v], -1)[:, :, n - m :], link, sequence.next_tag())
        if link.has_prev:
            k, v = (torch.cat([h, t], 2) for h, t in zip(halo.chunk(2, -1), (k, v)))
    return attention.merge(window_attention(q, k, v, attention.window, prefix)), None
