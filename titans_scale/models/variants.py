"""The Titans variants (design doc, section 2) as token mixers inside one pre-norm block.

A ``Block`` is a list of mixers, each a residual sub-layer ``x + mixer(RMSNorm(x))``, then the SwiGLU MLP:

    full / window   [Attention]                       Transformer++ / SWA layers
    lmm             [LongTermMemory]                  the memory layer in place of attention
    mal             [LongTermMemory, Attention(SWA)]  memory as a layer, then sliding-window attention
    mag             [MemoryAsGate]                    SWA gated by the (normalised) memory branch
    mac             [MemoryAsContext]                 memory as context for attention inside segments

Every mixer is ``mixer(x, state, position) -> (out, state)``: ``state`` (None at the start) is what it
carries to the next piece of the sequence, ``position`` the index of x's first token in the sequence.

Persistent tokens P live in every attention (its keys and values, see ``Attention``); memory branches
start from their learned W_0 instead of first writing P, which would only give another learned initial
memory (our choice, for MAG and MAL where the paper prepends P to the memory's input too).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from titans_scale.memory import MemoryState, NeuralMemory, NeuralMemoryState

from .attention import Attention, KVCache, segment_attention
from .config import ModelConfig
from .layers import RMSNorm, SwiGLU


class LongTermMemory(nn.Module):
    """The neural memory layer as a mixer: writes every token, returns its read after the write."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.memory = NeuralMemory(cfg.dim, cfg.n_heads, cfg.memory)

    def forward(self, x: Tensor, state: NeuralMemoryState | None, position: int):
        return self.memory(x, state)


@dataclass
class GateState:
    attention: KVCache
    memory: NeuralMemoryState

    def detach(self) -> "GateState":
        return GateState(self.attention.detach(), self.memory.detach())


class MemoryAsGate(nn.Module):
    """MAG: ``o = SWA([P | x]) * sigmoid(RMSNorm(M(x)))``, the memory branch normalised with a learned scale.

    The paper normalises both branches. Normalising the attention output too (this code's previous form) made the
    mixer's output unit-sized at initialisation, 20x the embeddings, where every other residual branch starts
    small (its output projection at init_std / sqrt(2 n_layers)): MAG then plateaued (docs/memory.md). The
    attention branch keeps that scale here; the gate's argument is normalised, so the memory decides it.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attention = Attention(cfg.dim, cfg.n_heads, cfg.persistent_tokens, cfg.rope_theta, cfg.window)
        self.memory = NeuralMemory(cfg.dim, cfg.n_heads, cfg.memory)
        self.memory_norm = RMSNorm(cfg.dim, cfg.norm_eps)

    def forward(self, x: Tensor, state: GateState | None, position: int):
        a, kv = self.attention(x, None if state is None else state.attention, position)
        m, memory = self.memory(x, None if state is None else state.memory)
        return a * torch.sigmoid(self.memory_norm(m)), GateState(kv, memory)


@dataclass
class ContextState:
    """What MAC carries between pieces of a sequence (the current segment holds fewer than L tokens)."""

    memory: NeuralMemoryState  # the memory, written with the attention outputs (with that stream's conv cache)
    segment_memory: MemoryState  # the memory as it was when the current segment began: retrieval reads it
    query_conv: Tensor  # convolution cache of the retrieval queries' stream (the layer's input)
    retrieved: KVCache  # keys/values of h_i for the segment's tokens so far
    segment: KVCache  # keys/values of S_i for the segment's tokens so far

    def detach(self) -> "ContextState":
        return ContextState(
            self.memory.detach(), self.segment_memory.detach(), self.query_conv.detach(),
            self.retrieved.detach(), self.segment.detach(),
        )


class MemoryAsContext(nn.Module):
    """MAC, per segment S of L tokens, with M the memory before the segment:

        h = RMSNorm(M*(q(S)))                    retrieval, no write; RMSNorm per head, like the memory's output
        y = Attn(queries S, keys [P | h | S])    token j sees P, h_i and S_i for i <= j
        o = y * sigmoid(M_t(RMSNorm(y)))         write y into the memory, gate by the read after the write

    The memory writes RMSNorm(y) (a learned scale, our choice): like every other memory input it is normalised,
    so that its values are on the scale its MLP's output starts at, whatever the scale of the attention output
    (small at initialisation: the output projection starts at init_std / sqrt(2 n_layers)).

    One segment's attention input is laid out [P | h | S] with RoPE positions 0 .. N_p + 2L - 1, the same
    for every segment. Segments are processed in turn (the next retrieval needs this segment's writes);
    projections that do not depend on the memory are computed for the whole piece at once.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.segment_len = cfg.segment_len
        self.attention = Attention(cfg.dim, cfg.n_heads, cfg.persistent_tokens, cfg.rope_theta)
        self.memory = NeuralMemory(cfg.dim, cfg.n_heads, cfg.memory)
        self.retrieved_norm = RMSNorm(cfg.head_dim, cfg.norm_eps)
        self.write_norm = RMSNorm(cfg.dim, cfg.norm_eps)

    def _rope(self, offsets: Tensor, dtype: torch.dtype):
        return self.attention.rope(self.attention.n_persistent + offsets, dtype)

    def forward(self, x: Tensor, state: ContextState | None, position: int):
        n, L = x.shape[1], self.segment_len
        arange = torch.arange(n, device=x.device)
        in_segment = 0 if state is None else state.segment.length
        rope = self._rope(L + (in_segment + arange) % L, x.dtype)  # S_i sits at N_p + L + i
        q = self.attention.queries(x, rope)
        k, v = self.attention.keys_values(x, rope)
        q_memory, query_conv = self.memory.query(x, None if state is None else state.query_conv)
        prefix = self.attention.persistent_kv()
        empty = KVCache(k[:, :, :0], v[:, :, :0])
        if state is None:
            memory = self.memory.init_state(x.shape[0])
            state = ContextState(memory, memory.memory, query_conv, empty, empty)
        memory, segment_memory, retrieved, segment = state.memory, state.segment_memory, state.retrieved, state.segment
        outputs, start = [], 0
        while start < n:
            m = segment.length
            stop = min(n, start + L - m)
            piece = slice(start, stop)
            h = self.memory.retrieve(q_memory[:, :, piece], segment_memory)
            h = self.retrieved_norm(h).transpose(1, 2).flatten(2)
            retrieved = retrieved.append(*self.attention.keys_values(h, self._rope(m + arange[: stop - start], x.dtype)))
            segment = segment.append(k[:, :, piece], v[:, :, piece])
            y = self.attention.merge(segment_attention(q[:, :, piece], retrieved, segment, prefix))
            gate, memory = self.memory(self.write_norm(y), memory)
            outputs.append(y * torch.sigmoid(gate))
            if segment.length == L:  # the segment is complete: the next one reads the memory as it is now
                segment_memory, retrieved, segment = memory.memory, empty, empty
            start = stop
        out = torch.cat(outputs, 1) if len(outputs) > 1 else outputs[0]
        return out, ContextState(memory, segment_memory, query_conv, retrieved, segment)


class Block(nn.Module):
    """Pre-norm residual block: ``x + mixer(RMSNorm(x))`` for each mixer, then ``x + MLP(RMSNorm(x))``."""

    def __init__(self, mixers: list[nn.Module], dim: int, hidden: int, eps: float):
        super().__init__()
        self.mixers = nn.ModuleList(mixers)
        self.mixer_norms = nn.ModuleList(RMSNorm(dim, eps) for _ in mixers)
        self.mlp_norm = RMSNorm(dim, eps)
        self.mlp = SwiGLU(dim, hidden)

    def forward(self, x: Tensor, states: list | None, position: int) -> tuple[Tensor, list]:
        new_states = []
        for norm, mixer, state in zip(self.mixer_norms, self.mixers, states or [None] * len(self.mixers)):
            out, state = mixer(norm(x), state, position)
            x = x + out
            new_states.append(state)
        return x + self.mlp(self.mlp_norm(x)), new_states


def build_block(kind: str, cfg: ModelConfig) -> Block:
    """The block of one layer kind (see ``ModelConfig.layer_kinds``)."""

    def attention(window: int | None) -> Attention:
        return Attention(cfg.dim, cfg.n_heads, cfg.persistent_tokens, cfg.rope_theta, window)

    mixers = {
        "full": lambda: [attention(None)],
        "window": lambda: [attention(cfg.window)],
        "lmm": lambda: [LongTermMemory(cfg)],
        "mal": lambda: [LongTermMemory(cfg), attention(cfg.window)],
        "mag": lambda: [MemoryAsGate(cfg)],
        "mac": lambda: [MemoryAsContext(cfg)],
    }[kind]()
    return Block(mixers, cfg.dim, cfg.mlp_width, cfg.norm_eps)
