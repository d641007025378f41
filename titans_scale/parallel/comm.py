"""Collectives and point-to-point transfers as autograd functions, with the accounting the benchmark reads.

Why our own and not megatron's ``mappings``: megatron's all-reduce in backward reduces ``grad.contiguous()``
and returns ``grad``, which silently drops the reduction when a gradient arrives non-contiguous; and its
sequence-parallel gathers allocate on ``torch.cuda.current_device()`` and gather dimension 0 (megatron's
sequence-first layout), while our activations are batch-first. These work on any device and dimension.

Every transfer adds the bytes this rank sends to ``STATS.sent[kind]`` (the logical payload: for a
collective, what this rank contributes to the other ranks) and every blocking wait to ``STATS.wait[kind]``.
"""

from __future__ import annotations

import time
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import Tensor
from torch.autograd import Function


@dataclass
class CommStats:
    """Bytes sent and seconds spent waiting, per kind of transfer (tp, relay, all_to_all, halo, kv)."""

    sent: Counter = field(default_factory=Counter)
    wait: Counter = field(default_factory=Counter)
    pending: list = field(default_factory=list)  # (work, tensor) of sends not yet known to be complete

    def reset(self) -> None:
        self.flush()
        self.sent.clear()
        self.wait.clear()

    def flush(self) -> None:
        """Wait for every outstanding send (their buffers must stay alive until then)."""
        with _timed("send"):
            for work, _ in self.pending:
                work.wait()
        self.pending.clear()


STATS = CommStats()


def _nbytes(t: Tensor) -> int:
    return t.numel() * t.element_size()


@contextmanager
def _timed(kind: str):
    """A blocking transfer: its time counts as waiting (for the neighbour, or for every rank of a collective)."""
    start = time.perf_counter()
    yield
    STATS.wait[kind] += time.perf_counter() - start


# ----------------------------------------------------------------------------------------------------
# Point to point (ranks are the group's own ranks)


def send(t: Tensor, group, peer: int, tag: int, kind: str) -> None:
    """Non-blocking send; the buffer is kept alive until the send completes."""
    t = t.detach().contiguous()
    STATS.sent[kind] += _nbytes(t)
    STATS.pending[:] = [(work, buf) for work, buf in STATS.pending if not work.is_completed()]
    STATS.pending.append((dist.isend(t, group=group, group_dst=peer, tag=tag), t))


def recv(shape, dtype, device, group, peer: int, tag: int, kind: str) -> Tensor:
    """Blocking receive into a new tensor; the wait is accounted to ``kind``."""
    t = torch.empty(shape, dtype=dtype, device=device)
    if t.numel() == 0:
        return t
    work = dist.irecv(t, group=group, group_src=peer, tag=tag)
    with _timed(kind):
        work.wait()
    return t


# ----------------------------------------------------------------------------------------------------
# Collectives along any dimension


def _all_gather(x: Tensor, dim: int, group, kind: str) -> Tensor:
    n = dist.get_world_size(group)
    xt = x.movedim(dim, 0).contiguous()
    out = xt.new_empty((n * xt.shape[0], *xt.shape[1:]))
    STATS.sent[kind] += (n - 1) * _nbytes(xt)
    with _timed(kind):
        dist.all_gather_single(out, xt, group=group)
    return out.movedim(0, dim)


def _reduce_scatter(x: Tensor, dim: int, group, kind: str) -> Tensor:
    n = dist.get_world_size(group)
    xt = x.movedim(dim, 0).contiguous()
    out = xt.new_empty((xt.shape[0] // n, *xt.shape[1:]))
    STATS.sent[kind] += _nbytes(xt) * (n - 1) // n
    with _timed(kind):
        dist.reduce_scatter_single(out, xt, group=group)
    return out.movedim(0, dim)


def _all_reduce(x: Tensor, group, kind: str, op=dist.ReduceOp.SUM) -> Tensor:
    x = x.clone(memory_format=torch.contiguous_format)
    n = dist.get_world_size(group)
    STATS.sent[kind] += 2 * _nbytes(x) * (n - 1) // n  # ring all-reduce: reduce-scatter + all-gather
    with _timed(kind):
        dist.all_reduce(x, op=op, group=group)
    return x


def _split(x: Tensor, dim: int, group) -> Tensor:
    return x.chunk(dist.get_world_size(group), dim)[dist.get_rank(group)].contiguous()


class _Copy(Function):
    """Identity forward, all-reduce backward: a replicated input entering a tensor-parallel region."""

    @staticmethod
    def forward(ctx, x, group, kind):
        ctx.group, ctx.kind = group, kind
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return _all_reduce(grad, ctx.group, ctx.kind), None, None


class _Gather(Function):
    """All-gather along ``dim``; backward keeps this rank's block of the gradient (``grad="split"``, when
    the gradient is replicated) or sums the ranks' gradients first (``grad="sum"``, when it is partial)."""

    @staticmethod
    def forward(ctx, x, dim, group, grad, kind):
        ctx.dim, ctx.group, ctx.grad, ctx.kind = dim, group, grad, kind
        return _all_gather(x, dim, group, kind)

    @staticmethod
    def backward(ctx, g):
        if ctx.grad == "sum":
            return _reduce_scatter(g, ctx.dim, ctx.group, ctx.kind), None, None, None, None
        return _split(g, ctx.dim, ctx.group), None, None, None, None


class _Split(Function):
    """Keep this rank's block along ``dim``; backward all-gathers the gradient."""

    @staticmethod
    def forward(ctx, x, dim, group, kind):
        ctx.dim, ctx.group, ctx.kind = dim, group, kind
        return _split(x, dim, group)

    @staticmethod
    def backward(ctx, g):
        return _all_gather(g, ctx.dim, ctx.group, ctx.kind), None, None, None


class _ReduceScatter(Function):
    """Sum over ranks and keep this rank's block along ``dim``; backward all-gathers."""

    @staticmethod
    def forward(ctx, x, dim, group, kind):
        ctx.dim, ctx.group, ctx.kind = dim, group, kind
        return _reduce_scatter(x, dim, group, kind)

    @staticmethod
    def backward(ctx, g):
        return _all_gather(g, ctx.dim, ctx.group, ctx.kind), None, None, None


def _exchange(x: Tensor, scatter_dim: int, gather_dim: int, group, kind: str) -> Tensor:
    n = dist.get_world_size(group)
    inp = torch.stack(x.chunk(n, scatter_dim), 0).contiguous()  # block i goes to rank i
    out = torch.empty_like(inp)
    STATS.sent[kind] += _nbytes(inp) * (n - 1) // n
    with _timed(kind):
        dist.all_to_all_single(out, inp, group=group)
    return torch.cat(out.unbind(0), gather_dim)  # block i came from rank i


class _AllToAll(Function):
    """Scatter ``scatter_dim`` over the ranks and gather ``gather_dim`` from them; backward is the inverse."""

    @staticmethod
    def forward(ctx, x, scatter_dim, gather_dim, group, kind):
        ctx.dims, ctx.group, ctx.kind = (scatter_dim, gather_dim), group, kind
        return _exchange(x, scatter_dim, gather_dim, group, kind)

    @staticmethod
    def backward(ctx, g):
        scatter_dim, gather_dim = ctx.dims
        return _exchange(g, gather_dim, scatter_dim, ctx.group, ctx.kind), None, None, None, None


def copy_to(x: Tensor, group, kind: str = "tp") -> Tensor:
    return _Copy.apply(x, group, kind)


def gather(x: Tensor, dim: int, group, grad: str = "split", kind: str = "tp") -> Tensor:
    return _Gather.apply(x, dim, group, grad, kind)


def split(x: Tensor, dim: int, group, kind: str = "tp") -> Tensor:
    return _Split.apply(x, dim, group, kind)


def reduce_scatter(x: Tensor, dim: int, group, kind: str = "tp") -> Tensor:
    return _ReduceScatter.apply(x, dim, group, kind)


def all_to_all(x: Tensor, scatter_dim: int, gather_dim: int, group, kind: str = "all_to_all") -> Tensor:
    return _AllToAll.apply(x, scatter_dim, gather_dim, group, kind)


# ----------------------------------------------------------------------------------------------------
# Sequence-parallel neighbour exchanges. The ``anchor`` passes through unchanged: it ties the exchange
# into the graph even on a rank that does not use what it received (rank 0), so that every rank runs the
# exchange's backward and its neighbours are never left waiting.


@dataclass(frozen=True)
class Link:
    """This rank's place in the sequence-parallel group: rank r holds the r-th slice of every sequence."""

    group: object
    rank: int
    size: int

    @property
    def has_prev(self) -> bool:
        return self.rank > 0

    @property
    def has_next(self) -> bool:
        return self.rank < self.size - 1


def refuse_state(state) -> None:
    """Under sequence parallelism each rank's slice starts from what its neighbours send, never from a state."""
    if state is not None:
        raise ValueError("a sequence-parallel model starts every sequence itself: call it without a state")


class _FromPrevious(Function):
    @staticmethod
    def forward(ctx, anchor, t, link, tag, kind):
        ctx.link, ctx.tag, ctx.kind, ctx.meta = link, tag, kind, (t.shape, t.dtype, t.device)
        if link.has_next:
            send(t, link.group, link.rank + 1, tag, kind)
        got = recv(t.shape, t.dtype, t.device, link.group, link.rank - 1, tag, kind) if link.has_prev else torch.zeros_like(t)
        return anchor.view_as(anchor), got

    @staticmethod
    def backward(ctx, g_anchor, g_got):
        link, shape = ctx.link, ctx.meta
        if link.has_prev:
            send(g_got, link.group, link.rank - 1, ctx.tag + 1, ctx.kind)
        g_t = recv(*shape, link.group, link.rank + 1, ctx.tag + 1, ctx.kind) if link.has_next else None
        return g_anchor, g_t, None, None, None


def from_previous(anchor: Tensor, t: Tensor, link, tag: int, kind: str = "halo") -> tuple[Tensor, Tensor]:
    """Send ``t`` to the next SP rank and return what the previous one sent (zeros on rank 0): a halo.
    Tags ``tag`` (forward) and ``tag + 1`` (backward) must be the same on every rank for one exchange."""
    return _FromPrevious.apply(anchor, t, link, tag, kind)


class _FromEarlier(Function):
    @staticmethod
    def forward(ctx, anchor, t, dim, link, kind):
        ctx.dim, ctx.link, ctx.kind, ctx.block = dim, link, kind, t.shape[dim]
        every = _all_gather(t, dim, link.group, kind)  # rank blocks in order along dim
        return anchor.view_as(anchor), every.narrow(dim, 0, link.rank * t.shape[dim]).contiguous()

    @staticmethod
    def backward(ctx, g_anchor, g_earlier):
        link, dim = ctx.link, ctx.dim
        shape = list(g_earlier.shape)
        shape[dim] = ctx.block * link.size
        full = g_earlier.new_zeros(shape)
        full.narrow(dim, 0, g_earlier.shape[dim]).copy_(g_earlier)
        return g_anchor, _reduce_scatter(full, dim, link.group, ctx.kind), None, None, None


def from_earlier(anchor: Tensor, t: Tensor, dim: int, link, kind: str = "kv") -> tuple[Tensor, Tensor]:
    """Every earlier SP rank's ``t``, concatenated along ``dim`` in rank order (empty on rank 0)."""
    return _FromEarlier.apply(anchor, t, dim, link, kind)
