"""The maths of the neural long-term memory (design doc, section 1), with no module or distributed code.

Shapes: ``B`` batch, ``H`` heads, ``N`` tokens, ``d`` head size. A memory of depth ``L`` is an MLP whose
weight matrices ``W^(l)`` (``out x in``) are the fast weights. For ``L = 1`` it is ``M_W(z) = W z``; for
``L >= 2`` it is ``M_W(z) = z + LN(W_L gelu(... gelu(W_1 z)))`` with a per-head LayerNorm whose scale and
shift are outer-loop parameters.

Per token the memory learns ``l_t(W) = ||M_W(k_t) - v_t||^2`` with momentum and forgetting::

    S_t = eta_t S_{t-1} - theta_t grad l_t(W_{t'})      W_t = (1 - alpha_t) W_{t-1} + S_t

where ``t'`` ends the previous chunk of ``chunk_size`` tokens. ``chunked_memory`` is the fast path
(chunk-parallel, analytic inner gradients, dual-form reads); ``reference_memory`` is the slow path that
loops token by token, materialises every ``W_t`` and takes the inner gradient from autograd.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint


def memory_shapes(head_dim: int, depth: int, expansion: int) -> list[tuple[int, int]]:
    """``(out, in)`` of each fast-weight matrix: d -> e*d -> ... -> e*d -> d (or d -> d for depth 1)."""
    if depth == 1:
        return [(head_dim, head_dim)]
    hidden = expansion * head_dim
    dims = [head_dim] + [hidden] * (depth - 1) + [head_dim]
    return [(dims[i + 1], dims[i]) for i in range(depth)]


@dataclass
class MemoryState:
    """The memory of every (batch, head) at the last chunk boundary, plus the tokens written since.

    ``weights`` and ``momentum`` hold ``W`` and ``S`` per MLP layer, ``(B, H, out, in)``. ``pending``
    holds ``(k, v, theta, log_eta, log_decay)`` of the tokens after that boundary (fewer than a chunk):
    their gradients must still be taken at the boundary weights, so the next call finishes their chunk.
    """

    weights: tuple[Tensor, ...]
    momentum: tuple[Tensor, ...]
    pending: tuple[Tensor, ...]

    @property
    def num_pending(self) -> int:
        return self.pending[0].shape[2]

    def detach(self) -> "MemoryState":
        return MemoryState(*(tuple(t.detach() for t in group) for group in (self.weights, self.momentum, self.pending)))

    def tensors(self) -> list[Tensor]:
        return [*self.weights, *self.momentum, *self.pending]


def initial_state(initial_weights: list[Tensor] | tuple[Tensor, ...], batch: int) -> MemoryState:
    """The state before any token: the learned ``W_0`` (shared across the batch), ``S_0 = 0``."""
    weights = tuple(w.unsqueeze(0).expand(batch, *w.shape) for w in initial_weights)
    momentum = tuple(torch.zeros_like(w) for w in weights)
    w0 = initial_weights[0]
    heads, d = w0.shape[0], initial_weights[0].shape[-1]
    empty = w0.new_zeros(batch, heads, 0, d)
    gates = w0.new_zeros(batch, heads, 0)
    return MemoryState(weights, momentum, (empty, empty, gates, gates, gates))


def check_state(state: MemoryState, batch: int, shapes: list[tuple[int, int]], heads: int, dtype: torch.dtype) -> None:
    """Raise a ValueError naming the mismatch when a carried state does not fit this memory."""
    if len(state.weights) != len(shapes) or len(state.momentum) != len(shapes):
        raise ValueError(f"memory_state has {len(state.weights)} weight matrices; this memory has depth {len(shapes)}")
    for name, group in (("weights", state.weights), ("momentum", state.momentum)):
        for layer, (t, (out, inp)) in enumerate(zip(group, shapes)):
            if tuple(t.shape) != (batch, heads, out, inp):
                raise ValueError(
                    f"memory_state.{name}[{layer}] has shape {tuple(t.shape)}; expected {(batch, heads, out, inp)}"
                )
            if t.dtype != dtype:
                raise ValueError(f"memory_state.{name}[{layer}] has dtype {t.dtype}; expected {dtype}")
    for t in state.pending:
        if t.shape[:2] != (batch, heads) or t.dtype != dtype:
            raise ValueError(
                f"memory_state.pending has shape {tuple(t.shape)} / dtype {t.dtype}; "
                f"expected ({batch}, {heads}, n, ...) / {dtype}"
            )


# ----------------------------------------------------------------------------------------------------
# The memory MLP and its analytic inner gradient


def _layer_norm(a: Tensor, ln: tuple[Tensor, Tensor], eps: float) -> Tensor:
    """LayerNorm over the head dimension with a per-head scale and shift (outer-loop parameters)."""
    gamma, beta = ln
    return F.layer_norm(a, a.shape[-1:], eps=eps) * gamma + beta


def memory_read(z: Tensor, weights: tuple[Tensor, ...] | list[Tensor], ln: tuple[Tensor, Tensor] | None, eps: float) -> Tensor:
    """``M_W(z)`` for fixed weights, no update ("M*"). ``z``: (..., n, d); weights (..., out, in)."""
    h = z
    for layer, w in enumerate(weights):
        a = h @ w.transpose(-1, -2)
        h = F.gelu(a) if layer < len(weights) - 1 else a
    if ln is None:
        return h
    return z + _layer_norm(h, ln, eps)


def _inner_gradient(k: Tensor, v: Tensor, weights, ln, eps, cache: dict | None = None):
    """Analytic backprop of ``||M_W(k) - v||^2`` at ``W``: the inputs ``h`` and output-gradients ``delta``
    of every layer, so that ``grad_W^(l) = sum_i delta_i^(l) h_i^(l)T`` (rank 1 per token).

    Written with ATen's fused LayerNorm and GELU backward kernels (both twice differentiable), so that the
    outer autograd sees few, large operations. ``cache`` (a dict) receives what ``_chunk_backward`` needs."""
    depth = len(weights)
    inputs, pre = [k], []
    h = k
    for layer, w in enumerate(weights):
        a = h @ w.transpose(-1, -2)
        pre.append(a)
        if layer < depth - 1:
            h = F.gelu(a)
            inputs.append(h)
    if ln is None:
        delta = 2.0 * (a - v)
    else:
        gamma, beta = ln
        shape = a.shape[-1:]
        a_hat, mean, rstd = torch.native_layer_norm(a, shape, None, None, eps)
        g = 2.0 * (k + a_hat * gamma + beta - v) * gamma
        delta = torch.ops.aten.native_layer_norm_backward(g, a, shape, mean, rstd, None, None, [True, False, False])[0]
        if cache is not None:
            cache["inner_ln"] = (a_hat, rstd, g)
    deltas, back = [delta], []
    for layer in range(depth - 1, 0, -1):
        u = delta @ weights[layer]
        delta = torch.ops.aten.gelu_backward(u, pre[layer - 1])
        deltas.append(delta)
        back.append(u)
    if cache is not None:
        cache.update(inputs=inputs, pre=pre, deltas=deltas[::-1], back=back[::-1])
    return inputs, deltas[::-1]


# ----------------------------------------------------------------------------------------------------
# Chunk coefficients: the within-chunk recurrence unrolled in log space


def chunk_coefficients(theta: Tensor, log_eta: Tensor, log_decay: Tensor, momentum: bool):
    """Coefficients of ``W_t = A_t W' + Bm_t S' - sum_i C_ti u_i`` for every chunk at once.

    Inputs are (..., b) per chunk: ``theta``, ``log eta`` and ``log(1 - alpha)``. Returns ``A``, ``Bm``
    (..., b), ``C`` (..., b, b) lower-triangular, and for the end-of-chunk momentum
    ``S_b = E S' - sum_i F_i u_i`` the factors ``E`` (...) and ``F`` (..., b).
    """
    b = theta.shape[-1]
    causal = torch.ones(b, b, dtype=torch.bool, device=theta.device).tril()
    log_a = log_decay.cumsum(-1)
    decay = torch.exp((log_a.unsqueeze(-1) - log_a.unsqueeze(-2)).masked_fill(~causal, float("-inf")))  # [t, s]
    if momentum:
        log_e = log_eta.cumsum(-1)
        carry = torch.exp((log_e.unsqueeze(-1) - log_e.unsqueeze(-2)).masked_fill(~causal, float("-inf")))  # [s, i]
        eta_prod = torch.exp(log_e)
        C = (decay @ carry) * theta.unsqueeze(-2)
        Fm = carry[..., -1, :] * theta
    else:
        eta_prod = torch.zeros_like(theta)
        C = decay * theta.unsqueeze(-2)
        Fm = torch.zeros_like(theta)
        Fm[..., -1] = theta[..., -1]
    A = torch.exp(log_a)
    Bm = (decay @ eta_prod.unsqueeze(-1)).squeeze(-1)
    E = eta_prod[..., -1]
    return A, Bm, C, E, Fm


def layer_update(r, w, s, h, delta, A, Bm, mixing, ends, D):
    """One memory layer over one chunk, in dual form: the reads ``z_t = W_t r_t`` of every token and the
    layer's ``W``, ``S`` at the chunk's end, from the chunk-start ``W'``, ``S'`` (``s`` None: no momentum):

        z_t   = A_t W' r_t + Bm_t S' r_t - sum_i mixing_ti delta_i      (mixing_ti = C_ti h_i . r_t)
        W_end = A_b W' + Bm_b S' - sum_i C_bi delta_i h_i^T
        S_end = E S' - sum_i F_i delta_i h_i^T

    ``ends`` (BH, 3) holds ``A_b, Bm_b, E`` and ``D`` (BH, b, 2) holds ``C_b,i`` and ``F_i``. The
    weight-sized work of a chunk is all here (the kernels in ``triton_scan`` do the same)."""
    linear = A.unsqueeze(-1) * (r @ w.transpose(-1, -2))
    w_end = w * ends[:, 0, None, None]
    if s is not None:
        linear = torch.addcmul(linear, Bm.unsqueeze(-1), r @ s.transpose(-1, -2))
        w_end = torch.addcmul(w_end, s, ends[:, 1, None, None])
    z = torch.baddbmm(linear, mixing, delta, alpha=-1.0)
    w_end = torch.baddbmm(w_end, (delta * D[..., 0:1]).transpose(-1, -2), h, alpha=-1.0)
    if s is None:
        return z, w_end, None
    s_end = torch.baddbmm(s * ends[:, 2, None, None], (delta * D[..., 1:2]).transpose(-1, -2), h, alpha=-1.0)
    return z, w_end, s_end


def _chunk_step(weights, momenta, q, k, v, A, Bm, C, P, ends, D, ln, eps, cache=None):
    """One chunk: inner gradients at the chunk-start weights, dual-form reads of every ``W_t``, and the
    state at the chunk's end. Flattened over (batch, head): q/k/v (BH, b, d); ``P = C * (q k^T)`` is the
    first layer's read mixing, which needs no weights and is computed for all chunks at once.
    ``momenta`` is empty without momentum; ``cache`` (a dict) receives what ``_chunk_backward`` needs."""
    inputs, deltas = _inner_gradient(k, v, weights, ln, eps, cache)
    r = q
    new_w, new_s, reads, mixings = [], [], [], []
    for layer in range(len(weights)):
        mixing = P if layer == 0 else C * (r @ inputs[layer].transpose(-1, -2))
        s = momenta[layer] if momenta else None
        z, w_end, s_end = layer_update(r, weights[layer], s, inputs[layer], deltas[layer], A, Bm, mixing, ends, D)
        new_w.append(w_end)
        if s_end is not None:
            new_s.append(s_end)
        reads.append((r, z))
        mixings.append(mixing)
        r = F.gelu(z) if layer < len(weights) - 1 else z
    if cache is not None:
        cache.update(reads=reads, mixings=mixings)
    y = r if ln is None else q + _layer_norm(r, ln, eps)
    return y, new_w, new_s


_compiled: dict = {}


def compiled(fn, graphs: bool = False):
    """``fn`` (``_chunk_step`` or ``_chunk_backward``) through torch.compile, built on first use: Inductor
    fuses the elementwise work and removes the per-operation overhead of the small per-chunk tensors.
    ``graphs``: on CUDA each call replays one captured CUDA graph (mode ``reduce-overhead``), so a chunk
    costs a graph launch instead of dozens of kernel launches; the graph's outputs live in its own pool
    and are overwritten by the next replay, so every call starts a new graph step and returns copies."""
    key = (fn, graphs)
    if key not in _compiled:
        if not graphs:
            _compiled[key] = torch.compile(fn, dynamic=False)
        else:
            inner = torch.compile(fn, dynamic=False, mode="reduce-overhead")

            def replay(*args, cache=None, **kwargs):
                torch.compiler.cudagraph_mark_step_begin()
                out = _tree_clone(inner(*args, cache=cache, **kwargs) if cache is not None else inner(*args, **kwargs))
                if cache:  # the step's intermediates, written into ``cache``, are graph outputs too
                    cache.update(_tree_clone(cache))
                return out

            _compiled[key] = replay
    return _compiled[key]


def _tree_clone(x):
    """Copies of the tensors in nested tuples/lists/dicts (a CUDA graph's outputs outlive its next replay)."""
    if isinstance(x, Tensor):
        return x.clone()
    if isinstance(x, (list, tuple)):
        return type(x)(_tree_clone(v) for v in x)
    if isinstance(x, dict):
        return {k: _tree_clone(v) for k, v in x.items()}
    return x


def _step_fns(mode: str | None):
    """The chunk step and its backward for a loop mode: None (eager), "compiled" or "cudagraph"."""
    if mode is None:
        return _chunk_step, _chunk_backward
    graphs = mode == "cudagraph"
    return compiled(_chunk_step, graphs), compiled(_chunk_backward, graphs)


def _chunk_group(depth, n_state, ln, eps, mode, *tensors):
    """Runs consecutive chunks; a separate function so that it can be recomputed in backward.
    ``tensors``: the ``n_state`` state tensors (W per layer, then S per layer), then the per-chunk inputs."""
    weights, momenta = list(tensors[:depth]), list(tensors[depth:n_state])
    step = _step_fns(mode)[0]
    # unbind, not indexing: the backward of N/b index ops would allocate N/b full-size gradients.
    per_chunk = zip(*(t.unbind(1) for t in tensors[n_state:]))
    ys = []
    for chunk in per_chunk:
        y, weights, momenta = step(weights, momenta, *chunk, ln, eps)
        ys.append(y)
    return (torch.stack(ys, 1), *weights, *momenta)


# ----------------------------------------------------------------------------------------------------
# The hand-written backward of the chunk scan (the default eager path)


def _project_out(u: Tensor, a_hat: Tensor) -> Tensor:
    """``u - mean(u) - a_hat mean(u a_hat)`` over the last dim: LayerNorm's backward without ``rstd``
    (a symmetric linear map of ``u``, so it is its own transpose)."""
    return u - u.mean(-1, keepdim=True) - a_hat * (u * a_hat).mean(-1, keepdim=True)


def _gelu_second(x: Tensor) -> Tensor:
    """``gelu''(x) = phi(x) (2 - x^2)`` for the exact (erf) GELU."""
    return torch.exp(-0.5 * x * x) * (1.0 / math.sqrt(2.0 * math.pi)) * (2.0 - x * x)


def _chunk_backward(weights, momenta, q, k, v, A, Bm, C, P, ends, D, ln, eps, cache, gy, g_w, g_s):
    """Gradients of one ``_chunk_step`` by hand: from those of its read ``gy`` and end state ``g_w``,
    ``g_s`` to those of its start state and inputs. Replaces ~130 small autograd nodes per chunk (the
    inner gradient's second derivative included) with the few matmuls below; ``cache`` is what the
    forward kept. Returns (g_weights, g_momenta, g_inputs dict, g_gamma, g_beta)."""
    depth = len(weights)
    inputs, pre, deltas, back = cache["inputs"], cache["pre"], cache["deltas"], cache["back"]
    reads, mixings = cache["reads"], cache["mixings"]
    g_ends = ends.new_zeros(ends.shape)
    g_D, g_A, g_Bm, g_C = D.new_zeros(D.shape), A.new_zeros(A.shape), Bm.new_zeros(Bm.shape), C.new_zeros(C.shape)
    g_gamma = g_beta = None
    z = reads[-1][1]
    if ln is None:
        gz, g_q = gy, torch.zeros_like(q)
    else:
        gamma, beta = ln
        shape = z.shape[-1:]
        z_hat, mean, rstd = torch.native_layer_norm(z, shape, None, None, eps)
        g_gamma, g_beta = (gy * z_hat).sum(-2, keepdim=True), gy.sum(-2, keepdim=True)
        gz = torch.ops.aten.native_layer_norm_backward(gy * gamma, z, shape, mean, rstd, None, None, [True, False, False])[0]
        g_q = gy.clone()
    g_weights, g_momenta, g_inputs, g_deltas = [None] * depth, [None] * depth, [None] * depth, [None] * depth
    # The reads and the end-of-chunk state, layer by layer from the top (layer_update's backward).
    for layer in range(depth - 1, -1, -1):
        (r, _), h, delta, w = reads[layer], inputs[layer], deltas[layer], weights[layer]
        s = momenta[layer] if momenta else None
        gwe = g_w[layer]
        g_wl = gwe * ends[:, 0, None, None]
        g_ends[:, 0] += (gwe * w).sum((-1, -2))
        t = h @ gwe.transpose(-1, -2)
        g_delta = -t * D[..., 0:1]
        g_D[..., 0] -= (t * delta).sum(-1)
        g_h = -(delta * D[..., 0:1]) @ gwe
        ag = A.unsqueeze(-1) * gz
        g_wl += ag.transpose(-1, -2) @ r
        g_r = ag @ w
        g_A += (gz * (r @ w.transpose(-1, -2))).sum(-1)
        if s is not None:
            gse = g_s[layer]
            g_sl = gwe * ends[:, 1, None, None] + gse * ends[:, 2, None, None]
            g_ends[:, 1] += (gwe * s).sum((-1, -2))
            g_ends[:, 2] += (gse * s).sum((-1, -2))
            t = h @ gse.transpose(-1, -2)
            g_delta -= t * D[..., 1:2]
            g_D[..., 1] -= (t * delta).sum(-1)
            g_h -= (delta * D[..., 1:2]) @ gse
            bg = Bm.unsqueeze(-1) * gz
            g_sl += bg.transpose(-1, -2) @ r
            g_r += bg @ s
            g_Bm += (gz * (r @ s.transpose(-1, -2))).sum(-1)
            g_momenta[layer] = g_sl
        g_mix = -(gz @ delta.transpose(-1, -2))
        g_delta -= mixings[layer].transpose(-1, -2) @ gz
        if layer == 0:
            g_P = g_mix
            g_q += g_r
        else:
            g_C += g_mix * (r @ h.transpose(-1, -2))
            g_mix = g_mix * C
            g_r += g_mix @ h
            g_h += g_mix.transpose(-1, -2) @ r
            gz = torch.ops.aten.gelu_backward(g_r, reads[layer - 1][1])
        g_weights[layer], g_inputs[layer], g_deltas[layer] = g_wl, g_h, g_delta
    # The inner gradient: delta_l = gelu'(a_l) * (delta_{l+1} W_{l+1}), from the bottom layer up.
    g_pre = [None] * depth
    for layer in range(depth - 1):
        g_u = torch.ops.aten.gelu_backward(g_deltas[layer], pre[layer])
        g_pre[layer] = g_deltas[layer] * back[layer] * _gelu_second(pre[layer])
        g_deltas[layer + 1] += g_u @ weights[layer + 1].transpose(-1, -2)
        g_weights[layer + 1] += deltas[layer + 1].transpose(-1, -2) @ g_u
    g_top = g_deltas[-1]
    g_k = torch.zeros_like(k)
    if ln is None:  # delta = 2 (a - v)
        g_pre[-1], g_v = 2.0 * g_top, -2.0 * g_top
    else:  # delta = rstd * project_out(g), g = 2 (k + a_hat gamma + beta - v) gamma
        a_hat, rstd, g = cache["inner_ln"]
        g_g = rstd * _project_out(g_top, a_hat)
        g_a_hat = -rstd * (g_top * (g * a_hat).mean(-1, keepdim=True) + g * (g_top * a_hat).mean(-1, keepdim=True))
        g_rstd = (g_top * _project_out(g, a_hat)).sum(-1, keepdim=True)
        two = 2.0 * g_g * gamma
        g_k += two
        g_v = -two
        g_a_hat += two * gamma
        g_gamma += (g_g * (2.0 * (k + a_hat * gamma + beta - v) + 2.0 * gamma * a_hat)).sum(-2, keepdim=True)
        g_beta += two.sum(-2, keepdim=True)
        g_pre[-1] = rstd * _project_out(g_a_hat, a_hat) - g_rstd * rstd * rstd * a_hat / a_hat.shape[-1]
    # The forward of the memory MLP at the chunk-start weights: a_l = h_l W_l^T, h_{l+1} = gelu(a_l).
    for layer in range(depth - 1, -1, -1):
        g_weights[layer] += g_pre[layer].transpose(-1, -2) @ inputs[layer]
        g_h = g_inputs[layer] + g_pre[layer] @ weights[layer]
        if layer > 0:
            g_pre[layer - 1] += torch.ops.aten.gelu_backward(g_h, pre[layer - 1])
        else:
            g_k += g_h
    grads = dict(q=g_q, k=g_k, v=g_v, A=g_A, Bm=g_Bm, C=g_C, P=g_P, ends=g_ends, D=g_D)
    return g_weights, [g for g in g_momenta if g is not None], grads, g_gamma, g_beta


_PER_CHUNK = ("q", "k", "v", "A", "Bm", "C", "P", "ends", "D")


class _MemoryScan(torch.autograd.Function):
    """The chunk loop as one autograd node with a hand-written backward (``_chunk_backward``).

    Forward keeps, per chunk, the chunk-start state and the step's intermediates (``every = 0``), or only
    the state at every ``every``-th chunk; backward walks the chunks in reverse, recomputing a group's
    forward from its kept state when needed. Both give identical gradients (the same operations)."""

    @staticmethod
    def forward(ctx, depth, n_state, ln_gamma, ln_beta, eps, every, mode, *tensors):
        step = _step_fns(mode)[0]
        # contiguous and detached: every chunk then passes tensors of one layout (one compiled graph)
        states = [t.detach().contiguous() for t in tensors[:n_state]]
        # chunk-major copies: a chunk's slices then have the same strides at every length (one compiled graph)
        per_chunk = [t.transpose(0, 1).contiguous() for t in tensors[n_state:]]
        ln = None if ln_gamma is None else (ln_gamma, ln_beta)
        n_chunks = per_chunk[0].shape[0]
        y = tensors[n_state].new_empty(tensors[n_state].shape)
        kept = []
        for c in range(n_chunks):
            cache = {} if every == 0 else None
            if every == 0 or c % every == 0:
                kept.append((states, cache))
            y[:, c], new_w, new_s = step(states[:depth], states[depth:], *(t[c] for t in per_chunk), ln, eps, cache=cache)
            states = [*new_w, *new_s]
        ctx.depth, ctx.n_state, ctx.eps, ctx.every, ctx.kept = depth, n_state, eps, every, kept
        ctx.mode = mode
        ctx.save_for_backward(*(t for t in (ln_gamma, ln_beta) if t is not None), *per_chunk)
        ctx.has_ln = ln_gamma is not None
        return (y, *states)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gy, *g_end):
        depth, every, kept = ctx.depth, ctx.every, ctx.kept
        step, step_backward = _step_fns(ctx.mode)
        saved = ctx.saved_tensors
        ln = tuple(saved[:2]) if ctx.has_ln else None
        per_chunk = saved[2 * ctx.has_ln :]
        n_chunks = per_chunk[0].shape[0]
        gy = gy.transpose(0, 1).contiguous()
        g_state = [torch.zeros_like(s) if g is None else g.contiguous() for g, s in zip(g_end, kept[0][0])]
        grads = {name: torch.zeros_like(t) for name, t in zip(_PER_CHUNK, per_chunk)}
        g_ln = [torch.zeros_like(p) for p in ln] if ln is not None else None
        group = every if every > 0 else 1
        for start in range(((n_chunks - 1) // group) * group, -1, -group):
            stop = min(start + group, n_chunks)
            if every == 0:
                entries = [kept[start]]
            else:  # recompute this group's chunk-start states and intermediates from its kept state
                states, entries = kept[start // every][0], []
                for c in range(start, stop):
                    cache = {}
                    entries.append((states, cache))
                    _, new_w, new_s = step(states[:depth], states[depth:], *(t[c] for t in per_chunk), ln, ctx.eps, cache=cache)
                    states = [*new_w, *new_s]
            for c in range(stop - 1, start - 1, -1):
                states, cache = entries[c - start]
                g_w, g_s, g_in, g_gamma, g_beta = step_backward(
                    states[:depth], states[depth:], *(t[c] for t in per_chunk), ln, ctx.eps, cache,
                    gy[c], g_state[:depth], g_state[depth:],
                )
                g_state = [g.contiguous() for g in (*g_w, *g_s)]
                for name in _PER_CHUNK:
                    grads[name][c] = g_in[name]
                if ln is not None:
                    g_ln[0] += g_gamma
                    g_ln[1] += g_beta
        g_ln = g_ln or [None, None]
        return (None, None, *g_ln, None, None, None, *g_state, *(grads[name].transpose(0, 1) for name in _PER_CHUNK))


def _with_pending(state: MemoryState, q, k, v, theta, log_eta, log_decay):
    """Prepends the pending tokens of ``state`` (zero queries: their reads were already returned)."""
    n = state.num_pending
    if n == 0:
        return q, k, v, theta, log_eta, log_decay
    pk, pv, pt, pe, pd = state.pending
    return (
        torch.cat([q.new_zeros(*q.shape[:2], n, q.shape[-1]), q], 2),
        torch.cat([pk, k], 2),
        torch.cat([pv, v], 2),
        torch.cat([pt, theta], 2),
        torch.cat([pe, log_eta], 2),
        torch.cat([pd, log_decay], 2),
    )


def chunked_memory(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    theta: Tensor,
    log_eta: Tensor,
    log_decay: Tensor,
    state: MemoryState,
    *,
    chunk_size: int,
    ln: tuple[Tensor, Tensor] | None = None,
    eps: float = 1e-5,
    momentum: bool = True,
    checkpoint_every: int = 0,
    backend: str = "eager",
    kernel_precision: str = "ieee",
    hand_backward: bool = True,
) -> tuple[Tensor, MemoryState]:
    """Writes ``k -> v`` into the memory and reads ``y_t = M_{W_t}(q_t)`` for every token (fast path).

    q, k, v: (B, H, N, d); theta, log_eta (log of eta), log_decay (log of 1 - alpha): (B, H, N).
    ``ln`` is the (H, d) scale and shift of the memory's LayerNorm (depth >= 2). ``checkpoint_every = k``
    keeps the state only every k chunks and recomputes the rest in backward (activation memory ~ N / k);
    ``backend``: ``eager`` (PyTorch, chunk by chunk), ``compiled`` (the chunk step and its backward through
    torch.compile), ``cudagraph`` (compiled, each step one CUDA graph replay on a GPU) or ``triton`` (the whole loop in one kernel launch each way, ``triton_scan``; GPU, or
    TRITON_INTERPRET=1 on CPU for testing; ``kernel_precision`` its float32 products). In training the eager and compiled loops are one autograd node
    with a hand-written backward (``hand_backward=False``: autograd through every step instead, for
    comparison). Returns y (B, H, N, d) and the state after the last token.
    """
    B, H, N, d = q.shape
    n_pending = state.num_pending
    q, k, v, theta, log_eta, log_decay = _with_pending(state, q, k, v, theta, log_eta, log_decay)
    total = n_pending + N
    b = chunk_size
    n_full, tail = divmod(total, b)
    n_chunks = n_full + (tail > 0)
    pad = n_chunks * b - total

    def chunks(t: Tensor) -> Tensor:  # (B, H, T, ...) -> (BH, n_chunks, b, ...)
        if pad:
            t = F.pad(t, (0, 0, 0, pad) if t.dim() == 4 else (0, pad))
        return t.reshape(B * H, n_chunks, b, *t.shape[3:])

    qc, kc, vc = chunks(q), chunks(k), chunks(v)
    A, Bm, C, E, Fm = chunk_coefficients(chunks(theta), chunks(log_eta), chunks(log_decay), momentum)
    ends = torch.stack([A[..., -1], Bm[..., -1], E], -1)  # what the state keeps over a whole chunk
    D = torch.stack([C[..., -1, :], Fm], -1)  # without momentum the second column is never used
    ln_flat = None
    if ln is not None:
        ln_flat = tuple(p.unsqueeze(0).expand(B, H, d).reshape(B * H, 1, d) for p in ln)

    depth = len(state.weights)
    states = [w.reshape(B * H, *w.shape[2:]) for w in state.weights]
    if momentum:
        states += [s.reshape(B * H, *s.shape[2:]) for s in state.momentum]
    elif backend == "triton":  # the kernel always carries S; eta = 0 makes it unused (Bm = E = 0)
        states += [torch.zeros_like(w) for w in states]
    n_state = len(states)
    P = C * (qc @ kc.transpose(-1, -2))
    per_chunk = (qc, kc, vc, A, Bm, C, P, ends, D)
    # The default eager path is one autograd node over all chunks that keeps its own recomputation groups.
    hand = hand_backward and torch.is_grad_enabled()
    mode = backend if backend in ("compiled", "cudagraph") else None
    group = checkpoint_every if checkpoint_every > 0 and not hand and backend != "triton" else n_chunks
    ys = []
    for start in range(0, n_chunks, group):
        stop = min(start + group, n_chunks)
        # A trailing partial chunk is read but never folded into the state: it stays pending.
        full_stop = min(stop, n_full)
        if full_stop > start:
            args = [*states, *(t[:, start:full_stop] for t in per_chunk)]
            if backend == "triton":
                from .triton_scan import triton_scan

                out = triton_scan(states, args[n_state:], depth, ln_flat, eps, checkpoint_every or 1, kernel_precision)
            elif hand and any(t.requires_grad for t in args):
                out = _MemoryScan.apply(depth, n_state, *(ln_flat or (None, None)), eps, checkpoint_every, mode, *args)
            elif checkpoint_every > 0 and torch.is_grad_enabled():
                out = checkpoint(_chunk_group, depth, n_state, ln_flat, eps, mode, *args, use_reentrant=False)
            else:
                out = _chunk_group(depth, n_state, ln_flat, eps, mode, *args)
            ys.append(out[0])
            states = list(out[1:])
        if stop > full_stop:  # the partial chunk
            args = [*states, *(t[:, n_full:] for t in per_chunk)]
            ys.append(_chunk_group(depth, n_state, ln_flat, eps, None, *args)[0])  # odd shape: not worth a compile
    end_w = tuple(w.reshape(B, H, *w.shape[1:]) for w in states[:depth])
    if momentum:
        end_s = tuple(s.reshape(B, H, *s.shape[1:]) for s in states[depth:])
    else:
        end_s = tuple(torch.zeros_like(w) for w in end_w)  # eta = 0: nothing carries over
    y = torch.cat(ys, 1).reshape(B, H, n_chunks * b, d)[:, :, n_pending:total]

    keep = slice(n_full * b, total)
    new_state = MemoryState(
        end_w,
        end_s,
        (k[:, :, keep], v[:, :, keep], theta[:, :, keep], log_eta[:, :, keep], log_decay[:, :, keep]),
    )
    return y, new_state


# ----------------------------------------------------------------------------------------------------
# The slow, obviously-correct reference


def reference_memory(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    theta: Tensor,
    log_eta: Tensor,
    log_decay: Tensor,
    state: MemoryState,
    *,
    chunk_size: int,
    ln: tuple[Tensor, Tensor] | None = None,
    eps: float = 1e-5,
    momentum: bool = True,
) -> tuple[Tensor, MemoryState]:
    """Token by token: materialises ``W_t``, takes ``grad l_t(W_{t'})`` from torch.autograd, reads
    ``M_{W_t}(q_t)``. Same signature and result as ``chunked_memory``; for tests and users who doubt."""
    B, H, N, d = q.shape
    n_pending = state.num_pending
    q, k, v, theta, log_eta, log_decay = _with_pending(state, q, k, v, theta, log_eta, log_decay)
    ln_b = None if ln is None else tuple(p.unsqueeze(0).unsqueeze(2) for p in ln)  # (1, H, 1, d)
    eta = torch.exp(log_eta) if momentum else torch.zeros_like(log_eta)
    keep_decay = torch.exp(log_decay)
    W, S = list(state.weights), list(state.momentum)
    boundary_w, boundary_s = list(W), list(S)
    ys = []
    with torch.enable_grad():
        for t in range(q.shape[2]):
            if t % chunk_size == 0:
                boundary_w, boundary_s = list(W), list(S)
                anchor = [w if w.requires_grad else w.detach().requires_grad_() for w in W]
                W = anchor
            kt, vt = k[:, :, t : t + 1], v[:, :, t : t + 1]
            loss = ((memory_read(kt, anchor, ln_b, eps) - vt) ** 2).sum()
            grads = torch.autograd.grad(loss, anchor, create_graph=True)
            th = theta[:, :, t, None, None]
            S = [eta[:, :, t, None, None] * s - th * g for s, g in zip(S, grads)]
            W = [keep_decay[:, :, t, None, None] * w + s for w, s in zip(W, S)]
            ys.append(memory_read(q[:, :, t : t + 1], W, ln_b, eps))
    y = torch.cat(ys, 2)[:, :, n_pending:]
    total = q.shape[2]
    n_full = total // chunk_size
    if total % chunk_size == 0:
        boundary_w, boundary_s = W, S
    if not momentum:  # eta = 0: nothing carries over
        boundary_s = [torch.zeros_like(s) for s in boundary_s]
    keep = slice(n_full * chunk_size, total)
    new_state = MemoryState(
        tuple(boundary_w),
        tuple(boundary_s),
        (k[:, :, keep], v[:, :, keep], theta[:, :, keep], log_eta[:, :, keep], log_decay[:, :, keep]),
    )
    return y, new_state
