"""Sequence parallelism over the SP group: this rank's slice of every sequence, the schemes, and the loss.

Every SP rank is given the same batch of whole sequences (the engine's loader does that: ranks of one
TP x SP group read the same data) and keeps the r-th of ``sp`` equal slices. ``model(tokens)`` returns the
logits of this rank's slice; ``model.loss(tokens)`` the loss of its slice's next-token predictions (the
last token of a slice predicts the first of the next one; the sequence's very last position predicts
nothing), divided by the sequence's ``B x (N - 1)`` predictions and multiplied by ``sp``: averaged over
the data-parallel x SP group (DeepSpeed's reduction), the gradients and the loss are those of the whole
sequence.

Schemes (``parallel.sp_scheme``): ``relay`` (``relay.py``: each layer's state flows from rank r-1 to r,
as a wavefront across layers) and ``all_to_all`` (``all_to_all.py``: head-parallel memories, attention
by halos; MAC blocks relay).
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext

import torch
from torch import Tensor

from titans_scale.memory import NeuralMemory
from titans_scale.models import Attention, MemoryAsContext

from . import comm
from .all_to_all import halo_attention, head_parallel_memory
from .checks import check_sequence
from .relay import Relay, relay_block
from .tensor import wrap_forward

HALO_TAG = 1 << 24


class Sequence:
    """One model's sequence-parallel set-up on this rank."""

    def __init__(self, groups, cfg, scheme: str, micro_batches: int = 1, wavefront: bool = True, tp_sequence_parallel: bool = False):
        self.link = comm.Link(groups.sp_group, groups.sp_rank, groups.sp)
        self.cfg, self.scheme, self.micro_batches = cfg, scheme, micro_batches
        self.tp, self.tp_sequence_parallel = groups.tp, tp_sequence_parallel
        self.relay = Relay(self.link, cfg.n_layers, wavefront)
        self.offset = 0  # the position of this rank's first token in the sequence
        self._exchanges = 0
        self.relayed_memories: list[NeuralMemory] = []  # memories of relay blocks (their W_0 is rank 0's)

    def next_tag(self) -> int:
        """A fresh tag pair for a halo exchange (every rank makes the same exchanges in the same order)."""
        self._exchanges += 1
        return HALO_TAG + 2 * self._exchanges

    def local(self, tokens: Tensor) -> tuple[Tensor, int]:
        """This rank's slice of the sequences (B, N) and the position of its first token."""
        if tokens.dim() != 2:
            raise ValueError(f"tokens have shape {tuple(tokens.shape)}; expected (batch, tokens)")
        n = tokens.shape[1]
        check_sequence(self.cfg, n, self.tp, self.link.size, self.scheme, self.tp_sequence_parallel)
        size = n // self.link.size
        start = self.link.rank * size
        return tokens[:, start : start + size], start

    @contextmanager
    def piece(self, micro_batch: int, offset: int):
        """One micro-batch's pass through the model."""
        self.relay.micro_batch, self.offset, self._exchanges = micro_batch, offset, 0
        yield

    def idle_parameters(self) -> list:
        """Parameters this rank does not use: a relayed memory's W_0 only starts the sequence on rank 0.
        The loss touches them (with weight 0) so that every rank has a gradient for every parameter, as
        data-parallel reducers (DeepSpeed's ZeRO buckets) need."""
        if not self.link.has_prev:
            return []
        return [w for memory in self.relayed_memories for w in memory.initial_weights]

    def finish(self) -> None:
        """End of the forward pass of every micro-batch (hand-offs held back without the wavefront go now)."""
        self.relay.release(forward=True)


def _offset_block(inner, sequence: Sequence, x: Tensor, states, position: int):
    """A block's forward at this slice's position (all-to-all scheme: the mixers fetch what they need)."""
    comm.refuse_state(states)
    return inner(x, None, sequence.offset + position)


def _sequence_forward(inner, sequence: Sequence, tokens: Tensor, state=None):
    if state is not None:
        raise ValueError("incremental inference (a carried state) is not supported under sequence parallelism; "
                         "decode with parallel.sp=1 (tensor parallelism keeps it)")
    part, offset = sequence.local(tokens)
    logits = []
    for mb, chunk in enumerate(part.chunk(sequence.micro_batches)):
        with sequence.piece(mb, offset):
            logits.append(inner(chunk)[0])
    sequence.finish()
    return torch.cat(logits), None


def sequence_loss(model, sequence: Sequence | None, tokens: Tensor) -> Tensor:
    """Next-token cross-entropy of this rank's slice, scaled so that its mean over the SP (and DP) ranks
    is the mean over the whole batch (also used by TP sequence parallelism alone, ``sequence=None``)."""
    if tokens.dim() != 2:
        raise ValueError(f"tokens have shape {tuple(tokens.shape)}; expected (batch, tokens)")
    B, N = tokens.shape
    if sequence is None:
        inputs, offset, size, micro = tokens, 0, 1, 1
    else:
        (inputs, offset), size, micro = sequence.local(tokens), sequence.link.size, sequence.micro_batches
    targets = tokens[:, offset + 1 : offset + inputs.shape[1] + 1]
    total = 0
    for mb, (x, y) in enumerate(zip(inputs.chunk(micro), targets.chunk(micro))):
        with sequence.piece(mb, offset) if sequence is not None else nullcontext():
            h, _ = model.hidden_states(x)
        n = y.shape[1]
        h = h if n == h.shape[1] else h[:, :n].contiguous()
        total = total + model.token_loss(model.head(h), y).sum()
    if sequence is not None:
        sequence.finish()
        total = total + sum((w.sum() * 0.0).to(total.dtype) for w in sequence.idle_parameters())
    return total * (size / (B * (N - 1)))


def sequence_parallelize(model, groups, scheme: str, micro_batches: int = 1, wavefront: bool = True,
                         tp_sequence_parallel: bool = False) -> Sequence:
    """Make every block work on this rank's slice (in place). Call before tensor parallelism, which wraps
    the mixers from outside; ``install_sequence_forward`` after it."""
    sequence = Sequence(groups, model.cfg, scheme, micro_batches, wavefront, tp_sequence_parallel)
    for layer, block in enumerate(model.blocks):
        if scheme == "relay" or any(isinstance(m, MemoryAsContext) for m in block.mixers):
            wrap_forward(block, relay_block, sequence, layer)
            sequence.relayed_memories += [m for m in block.modules() if isinstance(m, NeuralMemory)]
            continue
        wrap_forward(block, _offset_block, sequence)
        for module in block.modules():
            if isinstance(module, Attention):
                wrap_forward(module, halo_attention, sequence, module)
            elif isinstance(module, NeuralMemory):
                wrap_forward(module, head_parallel_memory, sequence, module)
    return sequence


def install_sequence_forward(model, sequence: Sequence) -> None:
    """``model(tokens)`` of the whole sequences returns this rank's slice of the logits."""
    wrap_forward(model, _sequence_forward, sequence)
