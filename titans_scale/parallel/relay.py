"""Sequence parallelism by relay: the state of every layer flows from SP rank r-1 to rank r, layer by layer.

Rank r holds the r-th slice of every sequence. For each block l it receives the block's state after the
tokens before its slice (the memory (W, S) with its convolution cache, a sliding window's keys/values,
MAC's segment buffers: exactly the ``state`` the model carries between pieces of a sequence), runs the
block from there at position ``r x slice``, and sends its own end state on to rank r+1 without waiting.
So rank r works on block l while rank r+1 works on block l-1: a wavefront across layers (micro-batches
deepen it). The relay of each mixer's full state gives sliding-window attention its halo for free; full
attention (the Transformer++ baseline) receives every earlier key and value that way.

Exact gradients: the received state enters the graph through ``_Receive`` (identity forward; backward sends
the state's gradient back to rank r-1), and the outgoing state leaves through ``_Hand`` (identity on the
block's output; forward sends the state, backward blocks until rank r+1 returns its gradient). Autograd
visits the blocks top-down on every rank, so the backward wavefront runs the other way without deadlock.

``wavefront=False`` holds every hand-off until the whole forward (or backward) pass is done: the schedule
without the wavefront, for the benchmark.
"""

from __future__ import annotations

import dataclasses
import pickle

import torch
from torch import Tensor
from torch.autograd import Function

from . import comm

RELAY_TAG = 1 << 16
FORWARD, BACKWARD, META = 0, 1, 2


# ----------------------------------------------------------------------------------------------------
# A state as a flat list of tensors plus a picklable description


def flatten_state(obj) -> tuple[list[Tensor], tuple]:
    """The distinct tensors of a (nested dataclass / list / tuple) state and a spec to rebuild it. A tensor
    that appears twice (MAC's segment memory at a segment boundary is the memory) is listed once."""
    tensors: list[Tensor] = []
    index: dict[int, int] = {}

    def walk(o):
        if isinstance(o, Tensor):
            if id(o) not in index:
                index[id(o)] = len(tensors)
                tensors.append(o)
            return ("t", index[id(o)])
        if dataclasses.is_dataclass(o) and not isinstance(o, type):
            return ("d", type(o), tuple((f.name, walk(getattr(o, f.name))) for f in dataclasses.fields(o)))
        if isinstance(o, (list, tuple)):
            return ("l" if isinstance(o, list) else "u", tuple(walk(c) for c in o))
        return ("c", o)

    return tensors, walk(obj)


def unflatten_state(spec: tuple, tensors: list[Tensor]):
    kind, body = spec[0], spec[1:]
    if kind == "t":
        return tensors[body[0]]
    if kind == "d":
        cls, fields = body
        return cls(**{name: unflatten_state(s, tensors) for name, s in fields})
    if kind in ("l", "u"):
        items = [unflatten_state(s, tensors) for s in body[0]]
        return items if kind == "l" else tuple(items)
    return body[0]


def state_bytes(state) -> int:
    """Bytes of the distinct tensors of a state: what one hand-off sends."""
    return sum(t.numel() * t.element_size() for t in flatten_state(state)[0])


# ----------------------------------------------------------------------------------------------------
# The hand-offs as autograd functions


class _Hand(Function):
    """Identity on the block's output; forward sends the block's end state to rank r+1, backward waits
    for that state's gradient from rank r+1."""

    @staticmethod
    def forward(ctx, relay, tag, out, *wire):
        ctx.relay, ctx.tag, ctx.meta = relay, tag, [(t.shape, t.dtype) for t in wire]
        ctx.device = out.device
        relay.post(wire, relay.link.rank + 1, tag + FORWARD, forward=True)
        return out.view_as(out)

    @staticmethod
    def backward(ctx, grad_out):
        relay = ctx.relay
        grads = [relay.take(shape, dtype, ctx.device, relay.link.rank + 1, ctx.tag + BACKWARD) for shape, dtype in ctx.meta]
        grads = [g if needed else None for g, needed in zip(grads, ctx.needs_input_grad[3:])]
        return None, None, grad_out, *grads


class _Receive(Function):
    """Identity on the block's input and the received state; backward sends the state's gradient back to
    rank r-1. The input passes through so that the backward runs even if no state tensor got a gradient."""

    @staticmethod
    def forward(ctx, relay, tag, last, x, *wire):
        ctx.relay, ctx.tag, ctx.last = relay, tag, last
        return (x.view_as(x), *(t.view_as(t) for t in wire))

    @staticmethod
    def backward(ctx, grad_x, *grads):
        relay = ctx.relay
        relay.post(list(grads), relay.link.rank - 1, ctx.tag + BACKWARD, forward=False)
        if ctx.last and not relay.wavefront:
            relay.release(forward=False)
        return None, None, None, grad_x, *(None for _ in grads)


def _needing_grad(x: Tensor) -> Tensor:
    """``x`` itself, or a leaf copy that requires grad (frozen layers below): the backward of a hand-off
    must run on both ends whenever gradients are on, or the neighbour would wait for ever."""
    return x if x.requires_grad else x.detach().requires_grad_()


class Relay:
    """The hand-offs of one model on one SP rank. Tags are fixed by (micro-batch, layer, direction), so a
    message always meets its receive. The first hand-off of a shape also sends the state's description
    (its structure, shapes and dtypes); later ones send the tensors alone."""

    def __init__(self, link: comm.Link, n_layers: int, wavefront: bool = True):
        self.link, self.n_layers, self.wavefront = link, n_layers, wavefront
        self.known: dict = {}  # key -> (spec, metas) of states received
        self.told: set = set()  # keys whose description was sent
        self.held = {True: [], False: []}  # sends held back without the wavefront, by direction
        self.micro_batch = 0

    def tag(self, layer: int) -> int:
        return RELAY_TAG + 3 * (self.micro_batch * self.n_layers + layer)

    # -- transport (held back without the wavefront)

    def post(self, tensors, peer: int, tag: int, forward: bool) -> None:
        sends = [(t, peer, tag) for t in tensors if t.numel()]
        if self.wavefront:
            for t, p, g in sends:
                comm.send(t, self.link.group, p, g, "relay")
        else:
            self.held[forward].extend((t.detach().clone(), p, g) for t, p, g in sends)

    def release(self, forward: bool) -> None:
        """Send what was held back (without the wavefront: after the whole pass)."""
        for t, p, g in self.held[forward]:
            comm.send(t, self.link.group, p, g, "relay")
        self.held[forward].clear()

    def take(self, shape, dtype, device, peer: int, tag: int) -> Tensor:
        return comm.recv(shape, dtype, device, self.link.group, peer, tag, "relay")

    # -- the two ends of a block

    def receive(self, layer: int, x: Tensor):
        """The block's input and the state rank r-1 ended the block with (None on rank 0)."""
        if not self.link.has_prev:
            return x, None
        tag, key = self.tag(layer), (layer, tuple(x.shape), x.dtype)
        if key not in self.known:
            size = self.take((1,), torch.int64, x.device, self.link.rank - 1, tag + META)
            blob = self.take((int(size.item()),), torch.uint8, x.device, self.link.rank - 1, tag + META)
            self.known[key] = pickle.loads(blob.cpu().numpy().tobytes())
        spec, metas = self.known[key]
        tensors = [self.take(shape, dtype, x.device, self.link.rank - 1, tag + FORWARD) for shape, dtype in metas]
        wire = [i for i, t in enumerate(tensors) if t.numel()]
        if torch.is_grad_enabled():  # the same condition as the sender's: both ends agree on a backward
            last = layer == 0 and self.micro_batch == 0
            x, *moved = _Receive.apply(self, tag, last, _needing_grad(x), *(tensors[i].requires_grad_() for i in wire))
            for i, t in zip(wire, moved):
                tensors[i] = t
        return x, unflatten_state(spec, tensors)

    def hand_on(self, layer: int, out: Tensor, state) -> Tensor:
        """Send the block's end state to rank r+1; returns the block's output (tied to the send)."""
        if not self.link.has_next:
            return out
        tag, key = self.tag(layer), (layer, tuple(out.shape), out.dtype)
        tensors, spec = flatten_state(state)
        if key not in self.told:
            description = pickle.dumps((spec, [(tuple(t.shape), t.dtype) for t in tensors]))
            blob = torch.frombuffer(bytearray(description), dtype=torch.uint8)
            for t in (torch.tensor([blob.numel()], dtype=torch.int64), blob):
                comm.send(t.to(out.device), self.link.group, self.link.rank + 1, tag + META, "relay_meta")
            self.told.add(key)
        wire = [t for t in tensors if t.numel()]
        if torch.is_grad_enabled():
            return _Hand.apply(self, tag, _needing_grad(out), *wire)
        self.post(wire, self.link.rank + 1, tag + FORWARD, forward=True)
        return out


def relay_block(inner, sequence, layer: int, x: Tensor, states, position: int):
    """A block's forward under the relay: start from rank r-1's state, hand the end state to rank r+1."""
    comm.refuse_state(states)
    relay = sequence.relay
    x, states = relay.receive(layer, x)
    out, states = inner(x, states, sequence.offset + position)
    return relay.hand_on(layer, out, states), states
