"""A fused Triton kernel for the weight-sized work of one memory layer in one chunk (GPU path).

``maths.layer_update`` in one pass over the layer's state ``W'``, ``S'``: each program owns a block of
output rows, streams the input dimension once, and produces both the dual-form reads
``z = A * (r W'^T) + Bm * (r S'^T) - mixing @ delta`` and the end-of-chunk ``W``, ``S``. The state never
round-trips through memory between those steps.

The kernel needs no backward of its own: in training the chunk loop's hand-written backward
(``maths._chunk_backward``) differentiates ``layer_update`` by hand, and under ``hand_backward=False`` the
autograd wrapper below recomputes the eager ``layer_update`` and differentiates it. Runs on CUDA; with
``TRITON_INTERPRET=1`` set before import it runs on CPU, which is how the tests check it.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

from .maths import layer_update

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - the CPU stack installs triton; a GPU stack brings its own
    triton = None

MIN_DOT = 16  # tl.dot needs every block dimension >= 16


def fused_supported(chunk_size: int, head_dim: int, expansion: int, depth: int) -> str | None:
    """Why the fused kernel cannot run this configuration, or None when it can."""
    if triton is None:
        return "fused_kernel needs the triton package (pip install triton)"
    if chunk_size < MIN_DOT or chunk_size & (chunk_size - 1):
        return f"fused_kernel needs chunk_size a power of two >= {MIN_DOT}, got {chunk_size}"
    dims = {head_dim} | ({expansion * head_dim} if depth >= 2 else set())
    if any(dim % MIN_DOT for dim in dims):
        return f"fused_kernel needs memory widths that are multiples of {MIN_DOT}, got {sorted(dims)}"
    return None


if triton is not None:

    @triton.jit
    def _layer_update_kernel(
        r_ptr, w_ptr, s_ptr, h_ptr, delta_ptr, a_ptr, bm_ptr, mix_ptr, ends_ptr, d_ptr,
        out_ptr, wnew_ptr, snew_ptr,
        OUT, IN,
        B: tl.constexpr, MOMENTUM: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_I: tl.constexpr,
        PRECISION: tl.constexpr,
    ):
        bh = tl.program_id(0)
        NS: tl.constexpr = 2 if MOMENTUM else 1
        offs_t = tl.arange(0, B)
        offs_o = tl.program_id(1) * BLOCK_O + tl.arange(0, BLOCK_O)
        o_mask = offs_o < OUT
        delta = tl.load(delta_ptr + bh * B * OUT + offs_t[:, None] * OUT + offs_o[None, :], mask=o_mask[None, :], other=0.0)
        coef_a = tl.load(a_ptr + bh * B + offs_t)
        mixing = tl.load(mix_ptr + bh * B * B + offs_t[:, None] * B + offs_t[None, :])
        a_end = tl.load(ends_ptr + bh * 3)
        corr_w = delta * tl.load(d_ptr + bh * B * NS + offs_t * NS)[:, None]  # (B, BLOCK_O)
        read_w = tl.zeros((B, BLOCK_O), dtype=tl.float32)
        read_s = tl.zeros((B, BLOCK_O), dtype=tl.float32)
        if MOMENTUM:
            coef_bm = tl.load(bm_ptr + bh * B + offs_t)
            bm_end = tl.load(ends_ptr + bh * 3 + 1)
            e_end = tl.load(ends_ptr + bh * 3 + 2)
            corr_s = delta * tl.load(d_ptr + bh * B * NS + offs_t * NS + 1)[:, None]
        base = bh * OUT * IN
        for i0 in range(0, IN, BLOCK_I):
            offs_i = i0 + tl.arange(0, BLOCK_I)
            i_mask = offs_i < IN
            rows = bh * B * IN + offs_t[:, None] * IN + offs_i[None, :]
            r_blk = tl.load(r_ptr + rows, mask=i_mask[None, :], other=0.0)  # (B, BLOCK_I)
            h_blk = tl.load(h_ptr + rows, mask=i_mask[None, :], other=0.0)
            w_offs = base + offs_o[:, None] * IN + offs_i[None, :]
            w_mask = o_mask[:, None] & i_mask[None, :]
            w_blk = tl.load(w_ptr + w_offs, mask=w_mask, other=0.0)  # (BLOCK_O, BLOCK_I)
            read_w += tl.dot(r_blk, tl.trans(w_blk), input_precision=PRECISION)
            w_new = a_end * w_blk - tl.dot(tl.trans(corr_w), h_blk, input_precision=PRECISION)
            if MOMENTUM:
                s_blk = tl.load(s_ptr + w_offs, mask=w_mask, other=0.0)
                read_s += tl.dot(r_blk, tl.trans(s_blk), input_precision=PRECISION)
                w_new += bm_end * s_blk
                s_new = e_end * s_blk - tl.dot(tl.trans(corr_s), h_blk, input_precision=PRECISION)
                tl.store(snew_ptr + w_offs, s_new, mask=w_mask)
            tl.store(wnew_ptr + w_offs, w_new, mask=w_mask)
        z = coef_a[:, None] * read_w - tl.dot(mixing, delta, input_precision=PRECISION)
        if MOMENTUM:
            z += coef_bm[:, None] * read_s
        tl.store(out_ptr + bh * B * OUT + offs_t[:, None] * OUT + offs_o[None, :], z, mask=o_mask[None, :])


def _launch(r, w, s, h, delta, A, Bm, mixing, ends, D):
    if w.device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("fused_kernel runs on CUDA devices (or on CPU under TRITON_INTERPRET=1); set memory.fused_kernel=false")
    BH, b, IN = r.shape
    OUT = delta.shape[-1]
    momentum = s is not None
    r, w, h, delta, A, Bm, mixing, ends, D = (t.contiguous() for t in (r, w, h, delta, A, Bm, mixing, ends, D))
    s = s.contiguous() if momentum else w
    z = torch.empty(BH, b, OUT, device=r.device, dtype=r.dtype)
    w_new = torch.empty_like(w)
    s_new = torch.empty_like(w) if momentum else w_new
    block_o, block_i = min(64, OUT), min(64, IN)
    grid = (BH, triton.cdiv(OUT, block_o))
    _layer_update_kernel[grid](
        r, w, s, h, delta, A, Bm, mixing, ends, D, z, w_new, s_new, OUT, IN,
        B=b, MOMENTUM=momentum, BLOCK_O=block_o, BLOCK_I=block_i, PRECISION="ieee",
    )
    return z, w_new, (s_new if momentum else None)


class _FusedLayerUpdate(torch.autograd.Function):
    """Forward through the kernel; backward recomputes the eager ``layer_update`` and differentiates it."""

    @staticmethod
    def forward(ctx, r, w, s, *rest):
        ctx.has_momentum = s is not None
        ctx.save_for_backward(r, w, s if s is not None else w, *rest)
        return _launch(r, w, s, *rest)

    @staticmethod
    def backward(ctx, grad_z, grad_w, grad_s):
        saved = list(ctx.saved_tensors)
        if not ctx.has_momentum:
            saved[2] = None
        inputs = [None if t is None else t.detach().requires_grad_(t.requires_grad) for t in saved]
        wanted = [t for t in inputs if t is not None and t.requires_grad]
        with torch.enable_grad():
            z, w_end, s_end = layer_update(*inputs)
        outputs, grads_out = [z, w_end], [grad_z, grad_w]
        if s_end is not None:
            outputs.append(s_end)
            grads_out.append(grad_s)
        grads = iter(torch.autograd.grad(outputs, wanted, grads_out, allow_unused=True))
        return tuple(next(grads) if t is not None and t.requires_grad else None for t in inputs)


def fused_layer_update(r, w, s, h, delta, A, Bm, mixing, ends, D):
    """Drop-in for ``maths.layer_update`` backed by the Triton kernel."""
    return _FusedLayerUpdate.apply(r, w, s, h, delta, A, Bm, mixing, ends, D)
