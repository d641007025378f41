"""The memory's whole chunk loop in two Triton kernels (``memory.backend=triton``): forward and backward.

One program per (batch x head) walks the chunks in order, doing a chunk's whole work without returning to
Python: the inner gradient through the memory MLP (GELU, LayerNorm), the dual-form reads and the
end-of-chunk update of ``W`` and ``S`` (``maths._chunk_step``, same formulas). The fast weights live in a
per-program slice of global memory (L2-resident at the paper's sizes) and are streamed in tiles of
``BLOCK_H`` hidden units, so head sizes up to 128 with expansion 4 need no more on-chip memory than a
tile. The within-chunk coefficients (``A``, ``Bm``, ``C``, ``P``, ``ends``, ``D``) are computed for all
chunks at once in PyTorch beforehand, as on the eager path.

Training keeps the state every ``every`` chunks; the backward kernel walks the chunks in reverse,
recomputing a group's chunk-start states from its kept state into a scratch slice, then runs the
hand-derived backward of each chunk (``maths._chunk_backward``, same formulas) in three passes over the
hidden tiles. Depth 1 (matrix memory, no LayerNorm) and depth 2 (MLP with residual and LayerNorm) are
covered; accumulators are in the inputs' dtype (float32 state under bf16 training; float64 in tests).

Runs on CUDA; with ``TRITON_INTERPRET=1`` set before import it runs on CPU, which is how the tests check
it against the eager path.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - the CPU stack installs triton; a GPU stack brings its own
    triton = None

MIN_DOT = 16  # tl.dot needs every block dimension >= 16
MAX_HEAD = 128  # a (chunk x head) tile and the (head x BLOCK_H) weight tiles stay on chip


def scan_supported(depth: int, chunk_size: int, head_dim: int, expansion: int, has_ln: bool) -> str | None:
    """Why the Triton scan cannot run this memory, or None when it can."""
    if triton is None:
        return "the triton backend needs the triton package (pip install triton)"
    if depth not in (1, 2):
        return f"the triton backend covers memory depth 1 and 2, got {depth}"
    if depth == 2 and not has_ln:
        return "the triton backend's depth-2 memory needs its LayerNorm"
    if chunk_size < MIN_DOT or chunk_size & (chunk_size - 1):
        return f"the triton backend needs chunk_size a power of two >= {MIN_DOT}, got {chunk_size}"
    if not MIN_DOT <= head_dim <= MAX_HEAD:
        return f"the triton backend needs a head size in [{MIN_DOT}, {MAX_HEAD}], got {head_dim}"
    if depth == 2 and (expansion * head_dim) % MIN_DOT:
        return f"the triton backend needs a hidden width (expansion x head size) that is a multiple of {MIN_DOT}, got {expansion * head_dim}"
    return None


def _block_h(hidden: int, block_d: int) -> int:
    """The largest hidden tile in (64, 32, 16) that divides the hidden width and keeps a weight tile
    (block_d x tile) within 4K elements: the backward holds eight of them at once (not tuned on a GPU yet)."""
    return next(b for b in (64, 32, 16) if hidden % b == 0 and (b * block_d <= 4096 or b == 16))


if triton is not None:

    @triton.jit
    def _gelu(x):
        return 0.5 * x * (1.0 + tl.erf(x * 0.7071067811865476))

    @triton.jit
    def _gelu_grad(x):  # gelu'(x) = Phi(x) + x phi(x)
        return 0.5 * (1.0 + tl.erf(x * 0.7071067811865476)) + x * tl.exp(-0.5 * x * x) * 0.3989422804014327

    @triton.jit
    def _gelu_second(x):  # gelu''(x) = phi(x) (2 - x^2)
        return tl.exp(-0.5 * x * x) * 0.3989422804014327 * (2.0 - x * x)

    @triton.jit
    def _ln_hat(a, dmask, D, eps):
        """LayerNorm without scale and shift over the (masked) head dimension: a_hat and rstd per row."""
        mean = tl.sum(a, 1) / D
        xc = tl.where(dmask[None, :], a - mean[:, None], 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, 1) / D + eps)
        return xc * rstd[:, None], rstd

    @triton.jit
    def _project_out(u, a_hat, dmask, D):
        """``u - mean(u) - a_hat mean(u a_hat)``: LayerNorm's backward without rstd."""
        out = u - (tl.sum(u, 1) / D)[:, None] - a_hat * (tl.sum(u * a_hat, 1) / D)[:, None]
        return tl.where(dmask[None, :], out, 0.0)

    @triton.jit
    def _copy(src, dst, SZ, BLOCK: tl.constexpr):
        for off in range(0, SZ, BLOCK):
            offs = off + tl.arange(0, BLOCK)
            tl.store(dst + offs, tl.load(src + offs, mask=offs < SZ), mask=offs < SZ)

    # ------------------------------------------------------------------------------------------------
    # Per-chunk loads shared by the kernels

    @triton.jit
    def _load_chunk(q_ptr, k_ptr, v_ptr, a_ptr, bm_ptr, c_ptr, p_ptr, ends_ptr, d_ptr, pid, c, NC, D,
                    B: tl.constexpr, BD: tl.constexpr):
        offs_t = tl.arange(0, B)
        offs_d = tl.arange(0, BD)
        dmask = offs_d < D
        rows = (pid * NC + c) * B * D + offs_t[:, None] * D + offs_d[None, :]
        q = tl.load(q_ptr + rows, mask=dmask[None, :], other=0.0)
        k = tl.load(k_ptr + rows, mask=dmask[None, :], other=0.0)
        v = tl.load(v_ptr + rows, mask=dmask[None, :], other=0.0)
        vec = (pid * NC + c) * B + offs_t
        coef_a = tl.load(a_ptr + vec)
        coef_bm = tl.load(bm_ptr + vec)
        mat = (pid * NC + c) * B * B + offs_t[:, None] * B + offs_t[None, :]
        c_mat = tl.load(c_ptr + mat)
        p_mat = tl.load(p_ptr + mat)
        a_end = tl.load(ends_ptr + (pid * NC + c) * 3)
        bm_end = tl.load(ends_ptr + (pid * NC + c) * 3 + 1)
        e_end = tl.load(ends_ptr + (pid * NC + c) * 3 + 2)
        d0 = tl.load(d_ptr + vec * 2)
        d1 = tl.load(d_ptr + vec * 2 + 1)
        return q, k, v, coef_a, coef_bm, c_mat, p_mat, a_end, bm_end, e_end, d0, d1

    # ------------------------------------------------------------------------------------------------
    # Forward of one chunk: reads y and the chunk-end state (src may equal dst: tiles update in place)

    @triton.jit
    def _fwd_chunk1(src, dst, q, k, v, coef_a, coef_bm, p_mat, a_end, bm_end, e_end, d0, d1, D,
                    BD: tl.constexpr, PREC: tl.constexpr):
        """Depth 1, ``M_W(z) = W z``: delta = 2 (W k - v)."""
        offs_d = tl.arange(0, BD)
        dmask = offs_d < D
        wo = offs_d[:, None] * D + offs_d[None, :]
        wm = dmask[:, None] & dmask[None, :]
        w = tl.load(src + wo, mask=wm, other=0.0)
        s = tl.load(src + D * D + wo, mask=wm, other=0.0)
        delta = 2.0 * (tl.dot(k, tl.trans(w), input_precision=PREC) - v)
        y = coef_a[:, None] * tl.dot(q, tl.trans(w), input_precision=PREC)
        y += coef_bm[:, None] * tl.dot(q, tl.trans(s), input_precision=PREC)
        y -= tl.dot(p_mat, delta, input_precision=PREC)
        w_new = a_end * w + bm_end * s - tl.dot(tl.trans(delta * d0[:, None]), k, input_precision=PREC)
        s_new = e_end * s - tl.dot(tl.trans(delta * d1[:, None]), k, input_precision=PREC)
        tl.store(dst + wo, w_new, mask=wm)
        tl.store(dst + D * D + wo, s_new, mask=wm)
        return y

    @triton.jit
    def _inner_top(src, k, v, gamma, beta, D, HD, eps,
                   B: tl.constexpr, BD: tl.constexpr, BLOCK_H: tl.constexpr, PREC: tl.constexpr):
        """Depth 2, first pass over the hidden tiles: ``a2 = gelu(k W1^T) W2^T``, its LayerNorm and the
        top layer's output gradient ``delta2`` of ``||k + LN(a2) - v||^2``."""
        offs_d = tl.arange(0, BD)
        dmask = offs_d < D
        offs_h = tl.arange(0, BLOCK_H)
        a2 = tl.zeros((B, BD), dtype=k.dtype)
        for j0 in range(0, HD, BLOCK_H):
            rows = j0 + offs_h
            w1 = tl.load(src + rows[:, None] * D + offs_d[None, :], mask=dmask[None, :], other=0.0)
            w2 = tl.load(src + 2 * HD * D + offs_d[:, None] * HD + rows[None, :], mask=dmask[:, None], other=0.0)
            h = _gelu(tl.dot(k, tl.trans(w1), input_precision=PREC))
            a2 += tl.dot(h, tl.trans(w2), input_precision=PREC)
        a_hat, rstd = _ln_hat(a2, dmask, D, eps)
        g = 2.0 * (k + a_hat * gamma[None, :] + beta[None, :] - v) * gamma[None, :]
        delta2 = rstd[:, None] * _project_out(g, a_hat, dmask, D)
        return a_hat, rstd, g, delta2

    @triton.jit
    def _fwd_chunk2(src, dst, q, k, v, coef_a, coef_bm, c_mat, p_mat, a_end, bm_end, e_end, d0, d1,
                    gamma, beta, D, HD, eps,
                    B: tl.constexpr, BD: tl.constexpr, BLOCK_H: tl.constexpr, PREC: tl.constexpr):
        """Depth 2, ``M_W(z) = z + LN(W2 gelu(W1 z))``. State layout: W1, S1 (HD x D), W2, S2 (D x HD)."""
        offs_d = tl.arange(0, BD)
        dmask = offs_d < D
        offs_h = tl.arange(0, BLOCK_H)
        _, _, _, delta2 = _inner_top(src, k, v, gamma, beta, D, HD, eps, B, BD, BLOCK_H, PREC)
        rw = tl.zeros((B, BD), dtype=k.dtype)
        rs = tl.zeros((B, BD), dtype=k.dtype)
        rh = tl.zeros((B, B), dtype=k.dtype)
        for j0 in range(0, HD, BLOCK_H):
            rows = j0 + offs_h
            o1 = rows[:, None] * D + offs_d[None, :]
            o2 = offs_d[:, None] * HD + rows[None, :]
            w1 = tl.load(src + o1, mask=dmask[None, :], other=0.0)
            s1 = tl.load(src + HD * D + o1, mask=dmask[None, :], other=0.0)
            w2 = tl.load(src + 2 * HD * D + o2, mask=dmask[:, None], other=0.0)
            s2 = tl.load(src + 3 * HD * D + o2, mask=dmask[:, None], other=0.0)
            a1 = tl.dot(k, tl.trans(w1), input_precision=PREC)
            h = _gelu(a1)
            delta1 = _gelu_grad(a1) * tl.dot(delta2, w2, input_precision=PREC)
            z1 = coef_a[:, None] * tl.dot(q, tl.trans(w1), input_precision=PREC)
            z1 += coef_bm[:, None] * tl.dot(q, tl.trans(s1), input_precision=PREC)
            z1 -= tl.dot(p_mat, delta1, input_precision=PREC)
            r2 = _gelu(z1)
            rh += tl.dot(r2, tl.trans(h), input_precision=PREC)
            rw += tl.dot(r2, tl.trans(w2), input_precision=PREC)
            rs += tl.dot(r2, tl.trans(s2), input_precision=PREC)
            tl.store(dst + o1, a_end * w1 + bm_end * s1 - tl.dot(tl.trans(delta1 * d0[:, None]), k, input_precision=PREC), mask=dmask[None, :])
            tl.store(dst + HD * D + o1, e_end * s1 - tl.dot(tl.trans(delta1 * d1[:, None]), k, input_precision=PREC), mask=dmask[None, :])
            tl.store(dst + 2 * HD * D + o2, a_end * w2 + bm_end * s2 - tl.dot(tl.trans(delta2 * d0[:, None]), h, input_precision=PREC), mask=dmask[:, None])
            tl.store(dst + 3 * HD * D + o2, e_end * s2 - tl.dot(tl.trans(delta2 * d1[:, None]), h, input_precision=PREC), mask=dmask[:, None])
        z2 = coef_a[:, None] * rw + coef_bm[:, None] * rs - tl.dot(c_mat * rh, delta2, input_precision=PREC)
        z_hat, _ = _ln_hat(z2, dmask, D, eps)
        return q + z_hat * gamma[None, :] + beta[None, :]

    @triton.jit
    def _fwd_chunk(src, dst, q_ptr, k_ptr, v_ptr, a_ptr, bm_ptr, c_ptr, p_ptr, ends_ptr, d_ptr, gamma, beta,
                   pid, c, NC, D, HD, eps,
                   DEPTH: tl.constexpr, B: tl.constexpr, BD: tl.constexpr, BLOCK_H: tl.constexpr, PREC: tl.constexpr):
        q, k, v, coef_a, coef_bm, c_mat, p_mat, a_end, bm_end, e_end, d0, d1 = _load_chunk(
            q_ptr, k_ptr, v_ptr, a_ptr, bm_ptr, c_ptr, p_ptr, ends_ptr, d_ptr, pid, c, NC, D, B, BD)
        if DEPTH == 1:
            y = _fwd_chunk1(src, dst, q, k, v, coef_a, coef_bm, p_mat, a_end, bm_end, e_end, d0, d1, D, BD, PREC)
        else:
            y = _fwd_chunk2(src, dst, q, k, v, coef_a, coef_bm, c_mat, p_mat, a_end, bm_end, e_end, d0, d1,
                            gamma, beta, D, HD, eps, B, BD, BLOCK_H, PREC)
        return y

    @triton.jit
    def _scan_fwd_kernel(
        state_ptr, kept_ptr, y_ptr, q_ptr, k_ptr, v_ptr, a_ptr, bm_ptr, c_ptr, p_ptr, ends_ptr, d_ptr,
        gamma_ptr, beta_ptr, NC, D, HD, SZ, NK, EVERY, eps,
        DEPTH: tl.constexpr, SAVE: tl.constexpr, B: tl.constexpr, BD: tl.constexpr, BLOCK_H: tl.constexpr,
        PREC: tl.constexpr,
    ):
        """Walks every chunk of one (batch x head); the state is updated in place in ``state_ptr`` and,
        with SAVE, copied to ``kept_ptr`` at the start of every EVERY-th chunk."""
        pid = tl.program_id(0)
        offs_t = tl.arange(0, B)
        offs_d = tl.arange(0, BD)
        dmask = offs_d < D
        state = state_ptr + pid * SZ
        gamma = tl.load(gamma_ptr + pid * D + offs_d, mask=dmask, other=0.0)
        beta = tl.load(beta_ptr + pid * D + offs_d, mask=dmask, other=0.0)
        for c in range(NC):
            if SAVE:
                if c % EVERY == 0:
                    _copy(state, kept_ptr + (pid * NK + c // EVERY) * SZ, SZ, 1024)
                    tl.debug_barrier()
            y = _fwd_chunk(state, state, q_ptr, k_ptr, v_ptr, a_ptr, bm_ptr, c_ptr, p_ptr, ends_ptr, d_ptr,
                           gamma, beta, pid, c, NC, D, HD, eps, DEPTH, B, BD, BLOCK_H, PREC)
            rows = (pid * NC + c) * B * D + offs_t[:, None] * D + offs_d[None, :]
            tl.store(y_ptr + rows, y, mask=dmask[None, :])
            tl.debug_barrier()  # the next chunk reads what other threads of this program wrote

    # ------------------------------------------------------------------------------------------------
    # Backward of one chunk (maths._chunk_backward, same formulas)

    @triton.jit
    def _bwd_chunk1(st, gs, q, k, v, gy, coef_a, coef_bm, p_mat, a_end, bm_end, e_end, d0, d1, D,
                    BD: tl.constexpr, PREC: tl.constexpr):
        offs_d = tl.arange(0, BD)
        dmask = offs_d < D
        wo = offs_d[:, None] * D + offs_d[None, :]
        wm = dmask[:, None] & dmask[None, :]
        w = tl.load(st + wo, mask=wm, other=0.0)
        s = tl.load(st + D * D + wo, mask=wm, other=0.0)
        gwe = tl.load(gs + wo, mask=wm, other=0.0)
        gse = tl.load(gs + D * D + wo, mask=wm, other=0.0)
        delta = 2.0 * (tl.dot(k, tl.trans(w), input_precision=PREC) - v)
        ag = coef_a[:, None] * gy
        bg = coef_bm[:, None] * gy
        g_ends0 = tl.sum(tl.sum(gwe * w, 1), 0)
        g_ends1 = tl.sum(tl.sum(gwe * s, 1), 0)
        g_ends2 = tl.sum(tl.sum(gse * s, 1), 0)
        t = tl.dot(k, tl.trans(gwe), input_precision=PREC)
        ts = tl.dot(k, tl.trans(gse), input_precision=PREC)
        g_delta = -t * d0[:, None] - ts * d1[:, None] - tl.dot(tl.trans(p_mat), gy, input_precision=PREC)
        g_d0 = -tl.sum(t * delta, 1)
        g_d1 = -tl.sum(ts * delta, 1)
        g_k = -tl.dot(delta * d0[:, None], gwe, input_precision=PREC) - tl.dot(delta * d1[:, None], gse, input_precision=PREC)
        g_q = tl.dot(ag, w, input_precision=PREC) + tl.dot(bg, s, input_precision=PREC)
        g_a = tl.sum(gy * tl.dot(q, tl.trans(w), input_precision=PREC), 1)
        g_bm = tl.sum(gy * tl.dot(q, tl.trans(s), input_precision=PREC), 1)
        g_p = -tl.dot(gy, tl.trans(delta), input_precision=PREC)
        g_pre = 2.0 * g_delta
        g_w = gwe * a_end + tl.dot(tl.trans(ag), q, input_precision=PREC) + tl.dot(tl.trans(g_pre), k, input_precision=PREC)
        g_s = gwe * bm_end + gse * e_end + tl.dot(tl.trans(bg), q, input_precision=PREC)
        g_k += tl.dot(g_pre, w, input_precision=PREC)
        tl.store(gs + wo, g_w, mask=wm)
        tl.store(gs + D * D + wo, g_s, mask=wm)
        g_c = tl.zeros_like(p_mat)
        return g_q, g_k, -g_pre, g_a, g_bm, g_c, g_p, g_ends0, g_ends1, g_ends2, g_d0, g_d1

    @triton.jit
    def _bwd_chunk2(st, gs, tmp, q, k, v, gy, coef_a, coef_bm, c_mat, p_mat, a_end, bm_end, e_end, d0, d1,
                    gamma, beta, D, HD, eps,
                    B: tl.constexpr, BD: tl.constexpr, BLOCK_H: tl.constexpr, PREC: tl.constexpr):
        """Depth 2: recompute the chunk's forward (passes 1-2), then the reads' and updates' backward with
        the inner gradient's first layer (pass B), then the inner gradient's top (LayerNorm) and the MLP's
        forward backward (pass C). ``tmp`` holds two (B x HD) per-tile intermediates between passes."""
        offs_t = tl.arange(0, B)
        offs_d = tl.arange(0, BD)
        dmask = offs_d < D
        offs_h = tl.arange(0, BLOCK_H)
        a_hat, rstd, g, delta2 = _inner_top(st, k, v, gamma, beta, D, HD, eps, B, BD, BLOCK_H, PREC)
        # forward pass 2, recomputed: the reads of the top layer
        rw = tl.zeros((B, BD), dtype=k.dtype)
        rs = tl.zeros((B, BD), dtype=k.dtype)
        rh = tl.zeros((B, B), dtype=k.dtype)
        for j0 in range(0, HD, BLOCK_H):
            rows = j0 + offs_h
            o1 = rows[:, None] * D + offs_d[None, :]
            o2 = offs_d[:, None] * HD + rows[None, :]
            w1 = tl.load(st + o1, mask=dmask[None, :], other=0.0)
            s1 = tl.load(st + HD * D + o1, mask=dmask[None, :], other=0.0)
            w2 = tl.load(st + 2 * HD * D + o2, mask=dmask[:, None], other=0.0)
            s2 = tl.load(st + 3 * HD * D + o2, mask=dmask[:, None], other=0.0)
            a1 = tl.dot(k, tl.trans(w1), input_precision=PREC)
            h = _gelu(a1)
            delta1 = _gelu_grad(a1) * tl.dot(delta2, w2, input_precision=PREC)
            z1 = coef_a[:, None] * tl.dot(q, tl.trans(w1), input_precision=PREC)
            z1 += coef_bm[:, None] * tl.dot(q, tl.trans(s1), input_precision=PREC)
            z1 -= tl.dot(p_mat, delta1, input_precision=PREC)
            r2 = _gelu(z1)
            rh += tl.dot(r2, tl.trans(h), input_precision=PREC)
            rw += tl.dot(r2, tl.trans(w2), input_precision=PREC)
            rs += tl.dot(r2, tl.trans(s2), input_precision=PREC)
        mix2 = c_mat * rh
        z2 = coef_a[:, None] * rw + coef_bm[:, None] * rs - tl.dot(mix2, delta2, input_precision=PREC)
        # the output LayerNorm: y = q + LN(z2) gamma + beta
        z_hat, rstd_o = _ln_hat(z2, dmask, D, eps)
        g_gamma = tl.sum(gy * z_hat, 0)
        g_beta = tl.sum(gy, 0)
        gz2 = rstd_o[:, None] * _project_out(gy * gamma[None, :], z_hat, dmask, D)
        g_q = gy
        g_a = tl.sum(gz2 * rw, 1)
        g_bm = tl.sum(gz2 * rs, 1)
        g_mix = -tl.dot(gz2, tl.trans(delta2), input_precision=PREC)
        g_delta2 = -tl.dot(tl.trans(mix2), gz2, input_precision=PREC)
        g_c = g_mix * rh
        g_mixc = g_mix * c_mat
        ag = coef_a[:, None] * gz2
        bg = coef_bm[:, None] * gz2
        t2 = tl.zeros((B, BD), dtype=k.dtype)
        t2s = tl.zeros((B, BD), dtype=k.dtype)
        g_k = tl.zeros((B, BD), dtype=k.dtype)
        g_p = tl.zeros((B, B), dtype=k.dtype)
        g_d0 = tl.zeros((B,), dtype=k.dtype)
        g_d1 = tl.zeros((B,), dtype=k.dtype)
        g_ends0 = tl.sum(g_d0, 0)
        g_ends1 = tl.sum(g_d0, 0)
        g_ends2 = tl.sum(g_d0, 0)
        tile = offs_t[:, None] * HD + offs_h[None, :]
        # pass B: per hidden tile, the backward of both layers' reads and updates, and of the inner
        # gradient's first layer (delta1 = gelu'(a1) * (delta2 W2))
        for j0 in range(0, HD, BLOCK_H):
            rows = j0 + offs_h
            o1 = rows[:, None] * D + offs_d[None, :]
            o2 = offs_d[:, None] * HD + rows[None, :]
            w1 = tl.load(st + o1, mask=dmask[None, :], other=0.0)
            s1 = tl.load(st + HD * D + o1, mask=dmask[None, :], other=0.0)
            w2 = tl.load(st + 2 * HD * D + o2, mask=dmask[:, None], other=0.0)
            s2 = tl.load(st + 3 * HD * D + o2, mask=dmask[:, None], other=0.0)
            gw1e = tl.load(gs + o1, mask=dmask[None, :], other=0.0)
            gs1e = tl.load(gs + HD * D + o1, mask=dmask[None, :], other=0.0)
            gw2e = tl.load(gs + 2 * HD * D + o2, mask=dmask[:, None], other=0.0)
            gs2e = tl.load(gs + 3 * HD * D + o2, mask=dmask[:, None], other=0.0)
            a1 = tl.dot(k, tl.trans(w1), input_precision=PREC)
            h = _gelu(a1)
            gp = _gelu_grad(a1)
            u = tl.dot(delta2, w2, input_precision=PREC)
            delta1 = gp * u
            qw1 = tl.dot(q, tl.trans(w1), input_precision=PREC)
            qs1 = tl.dot(q, tl.trans(s1), input_precision=PREC)
            z1 = coef_a[:, None] * qw1 + coef_bm[:, None] * qs1 - tl.dot(p_mat, delta1, input_precision=PREC)
            r2 = _gelu(z1)
            # top layer (reads r2 -> z2, update of W2, S2 by delta2 h^T)
            g_w2 = gw2e * a_end + tl.dot(tl.trans(ag), r2, input_precision=PREC)
            g_s2 = gw2e * bm_end + gs2e * e_end + tl.dot(tl.trans(bg), r2, input_precision=PREC)
            g_ends0 += tl.sum(tl.sum(gw2e * w2, 1), 0) + tl.sum(tl.sum(gw1e * w1, 1), 0)
            g_ends1 += tl.sum(tl.sum(gw2e * s2, 1), 0) + tl.sum(tl.sum(gw1e * s1, 1), 0)
            g_ends2 += tl.sum(tl.sum(gs2e * s2, 1), 0) + tl.sum(tl.sum(gs1e * s1, 1), 0)
            t2 += tl.dot(h, tl.trans(gw2e), input_precision=PREC)
            t2s += tl.dot(h, tl.trans(gs2e), input_precision=PREC)
            g_h = -tl.dot(delta2 * d0[:, None], gw2e, input_precision=PREC) - tl.dot(delta2 * d1[:, None], gs2e, input_precision=PREC)
            g_h += tl.dot(tl.trans(g_mixc), r2, input_precision=PREC)
            g_r2 = tl.dot(ag, w2, input_precision=PREC) + tl.dot(bg, s2, input_precision=PREC) + tl.dot(g_mixc, h, input_precision=PREC)
            gz1 = _gelu_grad(z1) * g_r2
            # bottom layer (reads q -> z1 with mixing P, update of W1, S1 by delta1 k^T)
            ag1 = coef_a[:, None] * gz1
            bg1 = coef_bm[:, None] * gz1
            g_w1 = gw1e * a_end + tl.dot(tl.trans(ag1), q, input_precision=PREC)
            g_s1 = gw1e * bm_end + gs1e * e_end + tl.dot(tl.trans(bg1), q, input_precision=PREC)
            t1 = tl.dot(k, tl.trans(gw1e), input_precision=PREC)
            t1s = tl.dot(k, tl.trans(gs1e), input_precision=PREC)
            g_delta1 = -t1 * d0[:, None] - t1s * d1[:, None] - tl.dot(tl.trans(p_mat), gz1, input_precision=PREC)
            g_d0 -= tl.sum(t1 * delta1, 1)
            g_d1 -= tl.sum(t1s * delta1, 1)
            g_k -= tl.dot(delta1 * d0[:, None], gw1e, input_precision=PREC) + tl.dot(delta1 * d1[:, None], gs1e, input_precision=PREC)
            g_q += tl.dot(ag1, w1, input_precision=PREC) + tl.dot(bg1, s1, input_precision=PREC)
            g_a += tl.sum(gz1 * qw1, 1)
            g_bm += tl.sum(gz1 * qs1, 1)
            g_p -= tl.dot(gz1, tl.trans(delta1), input_precision=PREC)
            # the inner gradient's first layer: delta1 = gelu'(a1) * (delta2 W2)
            g_u = gp * g_delta1
            g_delta2 += tl.dot(g_u, tl.trans(w2), input_precision=PREC)
            g_w2 += tl.dot(tl.trans(delta2), g_u, input_precision=PREC)
            tl.store(gs + o1, g_w1, mask=dmask[None, :])
            tl.store(gs + HD * D + o1, g_s1, mask=dmask[None, :])
            tl.store(gs + 2 * HD * D + o2, g_w2, mask=dmask[:, None])
            tl.store(gs + 3 * HD * D + o2, g_s2, mask=dmask[:, None])
            tl.store(tmp + j0 + tile, g_h)
            tl.store(tmp + B * HD + j0 + tile, g_delta1 * u * _gelu_second(a1))
        g_delta2 -= t2 * d0[:, None] + t2s * d1[:, None]
        g_d0 -= tl.sum(t2 * delta2, 1)
        g_d1 -= tl.sum(t2s * delta2, 1)
        # the inner gradient's top: delta2 = rstd * project_out(g, a_hat), g = 2 (k + a_hat gamma + beta - v) gamma
        g_g = rstd[:, None] * _project_out(g_delta2, a_hat, dmask, D)
        g_a_hat = -rstd[:, None] * (g_delta2 * (tl.sum(g * a_hat, 1) / D)[:, None] + g * (tl.sum(g_delta2 * a_hat, 1) / D)[:, None])
        g_rstd = tl.sum(g_delta2 * _project_out(g, a_hat, dmask, D), 1)
        two = 2.0 * g_g * gamma[None, :]
        g_k += two
        g_a_hat += two * gamma[None, :]
        g_gamma += tl.sum(g_g * (2.0 * (k + a_hat * gamma[None, :] + beta[None, :] - v) + 2.0 * gamma[None, :] * a_hat), 0)
        g_beta += tl.sum(two, 0)
        g_a2 = rstd[:, None] * _project_out(g_a_hat, a_hat, dmask, D) - (g_rstd * rstd * rstd / D)[:, None] * a_hat
        tl.debug_barrier()  # pass C reads what pass B stored
        # pass C: the memory MLP's forward at the chunk-start weights, a2 = h W2^T, h = gelu(k W1^T)
        for j0 in range(0, HD, BLOCK_H):
            rows = j0 + offs_h
            o1 = rows[:, None] * D + offs_d[None, :]
            o2 = offs_d[:, None] * HD + rows[None, :]
            w1 = tl.load(st + o1, mask=dmask[None, :], other=0.0)
            w2 = tl.load(st + 2 * HD * D + o2, mask=dmask[:, None], other=0.0)
            a1 = tl.dot(k, tl.trans(w1), input_precision=PREC)
            h = _gelu(a1)
            g_w2 = tl.load(gs + 2 * HD * D + o2, mask=dmask[:, None], other=0.0)
            tl.store(gs + 2 * HD * D + o2, g_w2 + tl.dot(tl.trans(g_a2), h, input_precision=PREC), mask=dmask[:, None])
            g_h = tl.load(tmp + j0 + tile) + tl.dot(g_a2, w2, input_precision=PREC)
            g_pre1 = tl.load(tmp + B * HD + j0 + tile) + _gelu_grad(a1) * g_h
            g_w1 = tl.load(gs + o1, mask=dmask[None, :], other=0.0)
            tl.store(gs + o1, g_w1 + tl.dot(tl.trans(g_pre1), k, input_precision=PREC), mask=dmask[None, :])
            g_k += tl.dot(g_pre1, w1, input_precision=PREC)
        return g_q, g_k, -two, g_a, g_bm, g_c, g_p, g_ends0, g_ends1, g_ends2, g_d0, g_d1, g_gamma, g_beta

    @triton.jit
    def _scan_bwd_kernel(
        kept_ptr, scratch_ptr, tmp_ptr, gstate_ptr, gy_ptr, q_ptr, k_ptr, v_ptr, a_ptr, bm_ptr, c_ptr, p_ptr,
        ends_ptr, d_ptr, gamma_ptr, beta_ptr,
        gq_ptr, gk_ptr, gv_ptr, ga_ptr, gbm_ptr, gc_ptr, gp_ptr, gends_ptr, gd_ptr, ggamma_ptr, gbeta_ptr,
        NC, D, HD, SZ, NK, EVERY, eps,
        DEPTH: tl.constexpr, B: tl.constexpr, BD: tl.constexpr, BLOCK_H: tl.constexpr, PREC: tl.constexpr,
    ):
        """Walks the chunks of one (batch x head) in reverse. ``gstate_ptr`` holds the gradient of the
        state after the last chunk and, at the end, that of the state before the first."""
        pid = tl.program_id(0)
        offs_t = tl.arange(0, B)
        offs_d = tl.arange(0, BD)
        dmask = offs_d < D
        gs = gstate_ptr + pid * SZ
        scratch = scratch_ptr + pid * EVERY * SZ
        tmp = tmp_ptr + pid * 2 * B * HD
        gamma = tl.load(gamma_ptr + pid * D + offs_d, mask=dmask, other=0.0)
        beta = tl.load(beta_ptr + pid * D + offs_d, mask=dmask, other=0.0)
        g_gamma = tl.zeros((BD,), dtype=gamma.dtype)
        g_beta = tl.zeros((BD,), dtype=gamma.dtype)
        for gi in range(NK):
            grp = NK - 1 - gi
            c0 = grp * EVERY
            n = tl.minimum(EVERY, NC - c0)
            # the group's chunk-start states, recomputed from its kept state
            _copy(kept_ptr + (pid * NK + grp) * SZ, scratch, SZ, 1024)
            tl.debug_barrier()
            for i in range(n - 1):
                _fwd_chunk(scratch + i * SZ, scratch + (i + 1) * SZ, q_ptr, k_ptr, v_ptr, a_ptr, bm_ptr, c_ptr, p_ptr,
                           ends_ptr, d_ptr, gamma, beta, pid, c0 + i, NC, D, HD, eps, DEPTH, B, BD, BLOCK_H, PREC)
                tl.debug_barrier()
            for ii in range(n):
                i = n - 1 - ii
                c = c0 + i
                q, k, v, coef_a, coef_bm, c_mat, p_mat, a_end, bm_end, e_end, d0, d1 = _load_chunk(
                    q_ptr, k_ptr, v_ptr, a_ptr, bm_ptr, c_ptr, p_ptr, ends_ptr, d_ptr, pid, c, NC, D, B, BD)
                rows = (pid * NC + c) * B * D + offs_t[:, None] * D + offs_d[None, :]
                gy = tl.load(gy_ptr + rows, mask=dmask[None, :], other=0.0)
                if DEPTH == 1:
                    g_q, g_k, g_v, g_a, g_bm, g_c, g_p, g_e0, g_e1, g_e2, g_d0, g_d1 = _bwd_chunk1(
                        scratch + i * SZ, gs, q, k, v, gy, coef_a, coef_bm, p_mat, a_end, bm_end, e_end, d0, d1, D, BD, PREC)
                else:
                    g_q, g_k, g_v, g_a, g_bm, g_c, g_p, g_e0, g_e1, g_e2, g_d0, g_d1, dg, db = _bwd_chunk2(
                        scratch + i * SZ, gs, tmp, q, k, v, gy, coef_a, coef_bm, c_mat, p_mat, a_end, bm_end, e_end,
                        d0, d1, gamma, beta, D, HD, eps, B, BD, BLOCK_H, PREC)
                    g_gamma += dg
                    g_beta += db
                tl.store(gq_ptr + rows, g_q, mask=dmask[None, :])
                tl.store(gk_ptr + rows, g_k, mask=dmask[None, :])
                tl.store(gv_ptr + rows, g_v, mask=dmask[None, :])
                vec = (pid * NC + c) * B + offs_t
                tl.store(ga_ptr + vec, g_a)
                tl.store(gbm_ptr + vec, g_bm)
                tl.store(gd_ptr + vec * 2, g_d0)
                tl.store(gd_ptr + vec * 2 + 1, g_d1)
                mat = (pid * NC + c) * B * B + offs_t[:, None] * B + offs_t[None, :]
                tl.store(gc_ptr + mat, g_c)
                tl.store(gp_ptr + mat, g_p)
                tl.store(gends_ptr + (pid * NC + c) * 3, g_e0)
                tl.store(gends_ptr + (pid * NC + c) * 3 + 1, g_e1)
                tl.store(gends_ptr + (pid * NC + c) * 3 + 2, g_e2)
                tl.debug_barrier()  # the previous chunk reads the state gradient this one wrote
        tl.store(ggamma_ptr + pid * D + offs_d, g_gamma, mask=dmask)
        tl.store(gbeta_ptr + pid * D + offs_d, g_beta, mask=dmask)


# ----------------------------------------------------------------------------------------------------
# The autograd node


def _check_device(t: Tensor) -> None:
    if t.device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("memory.backend=triton runs on CUDA devices (or on CPU under TRITON_INTERPRET=1); choose memory.backend=eager, compiled or cudagraph")


def _pack(states: list[Tensor], depth: int) -> Tensor:
    """(W_1.., S_1..) per layer -> one (BH, SZ) block per program, in the kernel's order W1 S1 W2 S2."""
    weights, momenta = states[:depth], states[depth:]
    return torch.cat([t.flatten(1) for pair in zip(weights, momenta) for t in pair], 1).contiguous()


def _unpack(packed: Tensor, like: list[Tensor], depth: int) -> list[Tensor]:
    sizes = [t[0].numel() for pair in zip(like[:depth], like[depth:]) for t in pair]
    parts = packed.split(sizes, 1)
    ordered = [parts[2 * layer] for layer in range(depth)] + [parts[2 * layer + 1] for layer in range(depth)]
    return [p.reshape(t.shape) for p, t in zip(ordered, like)]


def _meta(q: Tensor, depth: int, hidden: int, precision: str):
    BH, NC, b, d = q.shape
    block_d = max(MIN_DOT, triton.next_power_of_2(d))
    block_h = _block_h(hidden, block_d) if depth == 2 else MIN_DOT
    prec = precision if q.dtype == torch.float32 else None  # (float64 products have one precision)
    warps = 8 if block_d * max(b, block_h) >= 4096 else 4
    return BH, NC, b, d, block_d, block_h, prec, warps


class _TritonScan(torch.autograd.Function):
    """The chunk loop as one autograd node whose forward and backward are one kernel launch each."""

    @staticmethod
    def forward(ctx, depth, hidden, eps, every, precision, gamma, beta, state, q, k, v, A, Bm, C, P, ends, D):
        _check_device(q)
        BH, NC, b, d, block_d, block_h, prec, warps = _meta(q, depth, hidden, precision)
        save = torch.is_grad_enabled() or any(ctx.needs_input_grad)
        every = max(1, min(every, NC))
        n_kept = -(-NC // every)
        work = state.detach().clone().contiguous()
        kept = work.new_empty(BH, n_kept if save else 1, work.shape[1])
        y = q.new_empty(q.shape)
        if gamma is None:
            gamma = beta = q.new_zeros(BH, d)
        gamma, beta = gamma.contiguous(), beta.contiguous()  # (an expand over the batch may have stride 0)
        inputs = [t.contiguous() for t in (q, k, v, A, Bm, C, P, ends, D)]
        _scan_fwd_kernel[(BH,)](
            work, kept, y, *inputs, gamma, beta, NC, d, hidden, work.shape[1], kept.shape[1], every, eps,
            DEPTH=depth, SAVE=save, B=b, BD=block_d, BLOCK_H=block_h, PREC=prec, num_warps=warps,
        )
        ctx.depth, ctx.hidden, ctx.eps, ctx.every, ctx.has_ln, ctx.precision = depth, hidden, eps, every, depth == 2, precision
        ctx.save_for_backward(gamma, beta, kept, *inputs)
        return y, work

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gy, g_end):
        gamma, beta, kept, q, k, v, A, Bm, C, P, ends, D = ctx.saved_tensors
        depth, hidden, every = ctx.depth, ctx.hidden, ctx.every
        BH, NC, b, d, block_d, block_h, prec, warps = _meta(q, depth, hidden, ctx.precision)
        sz = kept.shape[-1]

        g_state = (torch.zeros(BH, sz, dtype=q.dtype, device=q.device) if g_end is None else g_end.clone()).contiguous()
        gy = torch.zeros_like(q) if gy is None else gy.contiguous()
        scratch = q.new_empty(BH, every, sz)
        tmp = q.new_empty(BH, 2, b, hidden if depth == 2 else 1)
        grads = [torch.empty_like(t) for t in (q, k, v, A, Bm, C, P, ends, D)]
        g_gamma, g_beta = torch.zeros_like(gamma), torch.zeros_like(beta)
        _scan_bwd_kernel[(BH,)](
            kept, scratch, tmp, g_state, gy, q, k, v, A, Bm, C, P, ends, D, gamma, beta, *grads, g_gamma, g_beta,
            NC, d, hidden, sz, kept.shape[1], every, ctx.eps,
            DEPTH=depth, B=b, BD=block_d, BLOCK_H=block_h, PREC=prec, num_warps=warps,
        )
        g_ln = (g_gamma, g_beta) if ctx.has_ln else (None, None)
        return (None, None, None, None, None, *g_ln, g_state, *grads)


def triton_scan(states: list[Tensor], per_chunk: list[Tensor], depth: int, ln, eps: float, every: int, precision: str = "ieee"):
    """The full chunks of ``maths.chunked_memory`` through the kernels. ``states``: W per layer, then S
    per layer, (BH, out, in); ``per_chunk``: q, k, v, A, Bm, C, P, ends, D as (BH, n_chunks, ...), with
    ``D`` holding both columns (C_b,i and F_i). ``ln``: the (BH, 1, d) scale and shift, or None (depth 1).
    ``precision``: tl.dot's float32 input precision (ieee, tf32x3 or tf32). Returns the reads
    (BH, n_chunks, b, d), then the end states in the order of ``states``."""
    hidden = states[0].shape[-2]
    gamma, beta = (None, None) if ln is None else (p.reshape(p.shape[0], -1) for p in ln)
    y, end = _TritonScan.apply(depth, hidden, eps, every, precision, gamma, beta, _pack(states, depth), *per_chunk)
    return (y, *_unpack(end, states, depth))
