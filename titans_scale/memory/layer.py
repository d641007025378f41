"""The neural memory as a layer: projections, short convolution, gates, memory, output gate."""

from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from .config import MemoryConfig
from .maths import MemoryState, check_state, chunked_memory, initial_state, memory_read, memory_shapes, reference_memory


@dataclass
class NeuralMemoryState:
    """What a memory layer carries between calls: the memory itself and the convolution's last inputs."""

    memory: MemoryState
    conv: Tensor  # (B, conv_width - 1, 3 * H * d): the pre-convolution q, k, v of the latest tokens

    def detach(self) -> "NeuralMemoryState":
        return NeuralMemoryState(self.memory.detach(), self.conv.detach())


def state_dtype(dtype: torch.dtype) -> torch.dtype:
    """The memory state is kept in float32 whenever activations are in half precision."""
    return torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype


class ShortConv(nn.Module):
    """Causal depthwise 1-D convolution over the sequence, with a cache of the last inputs."""

    def __init__(self, channels: int, width: int):
        super().__init__()
        self.width = width
        self.weight = nn.Parameter(torch.empty(channels, 1, width))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        nn.init.zeros_(self.bias)

    def forward(self, x: Tensor, cache: Tensor) -> tuple[Tensor, Tensor]:
        """x: (B, N, C); cache: (B, width - 1, C). Returns the output and the new cache."""
        full = torch.cat([cache, x], 1)
        y = F.conv1d(full.transpose(1, 2), self.weight, self.bias, groups=full.shape[-1]).transpose(1, 2)
        return y, full[:, full.shape[1] - (self.width - 1) :]


def validate_memory(dim: int, heads: int, cfg: MemoryConfig) -> None:
    """The one place that checks a memory configuration; raises ValueError naming field and value."""
    if heads < 1 or dim % heads:
        raise ValueError(f"heads={heads} must be >= 1 and divide dim={dim}")
    if cfg.depth < 1:
        raise ValueError(f"memory depth={cfg.depth} must be >= 1")
    if cfg.chunk_size < 1:
        raise ValueError(f"memory chunk_size={cfg.chunk_size} must be >= 1")
    if cfg.expansion < 1:
        raise ValueError(f"memory expansion={cfg.expansion} must be >= 1")
    if cfg.conv_width < 1:
        raise ValueError(f"memory conv_width={cfg.conv_width} must be >= 1")
    if not cfg.theta_max > 0:
        raise ValueError(f"memory theta_max={cfg.theta_max} must be > 0")
    if cfg.ln_init not in ("unit_norm", "unit_rms"):
        raise ValueError(f"memory ln_init={cfg.ln_init!r} must be unit_norm or unit_rms")
    if not cfg.ln_eps > 0:
        raise ValueError(f"memory ln_eps={cfg.ln_eps} must be > 0")
    if cfg.checkpoint_every < 0:
        raise ValueError(f"memory checkpoint_every={cfg.checkpoint_every} must be >= 0 (0 = off)")
    if cfg.backend not in BACKENDS:
        raise ValueError(f"memory backend={cfg.backend!r} must be one of {', '.join(BACKENDS)}")
    if cfg.kernel_precision not in ("ieee", "tf32x3", "tf32"):
        raise ValueError(f"memory kernel_precision={cfg.kernel_precision!r} must be one of ieee, tf32x3, tf32")
    if cfg.backend == "triton":
        reason = _triton_unsupported(dim // heads, cfg)
        if reason:
            raise ValueError(f"memory.backend=triton: {reason}; use memory.backend=auto (falls back to cudagraph) or eager")


BACKENDS = ("eager", "compiled", "cudagraph", "triton", "auto")


def _triton_unsupported(head_dim: int, cfg: MemoryConfig) -> str | None:
    from .triton_scan import scan_supported

    return scan_supported(cfg.depth, cfg.chunk_size, head_dim, cfg.expansion, has_ln=cfg.depth >= 2)


def resolve_backend(cfg: MemoryConfig, head_dim: int, device_type: str) -> tuple[str, str | None]:
    """The one place that picks how the chunk loop runs: the backend for this device, and why ``auto``
    did not pick the kernel (None when it did, or when nothing was left to choose)."""
    if cfg.backend == "triton":
        if device_type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError("memory.backend=triton needs a CUDA device (or TRITON_INTERPRET=1 on CPU); use memory.backend=auto or eager")
        return "triton", None
    if cfg.backend != "auto":
        return cfg.backend, None
    if device_type != "cuda":
        return "eager", None
    reason = _triton_unsupported(head_dim, cfg)
    return ("cudagraph", reason) if reason else ("triton", None)


_warned: dict[str, bool] = {}  # fallback reasons already warned about in this process


class NeuralMemory(nn.Module):
    """Multi-head neural long-term memory (LMM) of design section 1.

    ``forward(x, state)`` writes every token into the memory and returns its read after the write,
    ``o = W_O (RMSNorm(y) * SiLU(x W_G))`` (the paper's normalisation and linear gate, in the form of
    Gated DeltaNet; our choice), plus the state to carry into the next call.
    """

    def __init__(self, dim: int, heads: int, cfg: MemoryConfig | None = None, reference: bool = False):
        super().__init__()
        cfg = cfg or MemoryConfig()
        validate_memory(dim, heads, cfg)
        self.dim, self.heads, self.cfg = dim, heads, cfg
        self.head_dim = d = dim // heads
        self.reference = reference  # use the slow token-by-token path (tests, debugging)
        inner = heads * d
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_k = nn.Linear(dim, inner, bias=False)
        self.to_v = nn.Linear(dim, inner, bias=False)
        self.conv = ShortConv(3 * inner, cfg.conv_width)
        self.to_theta = nn.Linear(dim, heads)
        # An ablated gate has no parameters at all (unused parameters upset data-parallel wrappers).
        self.to_eta = nn.Linear(dim, heads) if cfg.momentum else None
        self.to_alpha = nn.Linear(dim, heads) if cfg.forgetting else None
        self.shapes = memory_shapes(d, cfg.depth, cfg.expansion)
        self.initial_weights = nn.ParameterList(nn.Parameter(torch.empty(heads, o, i)) for o, i in self.shapes)
        if cfg.depth >= 2:
            self.ln_weight = nn.Parameter(torch.full((heads, d), self.ln_scale_init))
            self.ln_bias = nn.Parameter(torch.zeros(heads, d))
        self.out_norm_weight = nn.Parameter(torch.ones(d))
        self.to_gate = nn.Linear(dim, inner, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)
        self.reset_memory_parameters()

    def reset_parameters(self) -> None:
        """Every parameter of the layer to its initialisation (also after a meta-device build)."""
        for linear in (self.to_q, self.to_k, self.to_v, self.to_gate, self.to_out):
            linear.reset_parameters()
        self.conv.reset_parameters()
        nn.init.ones_(self.out_norm_weight)
        if self.cfg.depth >= 2:
            nn.init.constant_(self.ln_weight, self.ln_scale_init)
            nn.init.zeros_(self.ln_bias)
        self.reset_memory_parameters()

    def reset_memory_parameters(self) -> None:
        """W_0 scaled to keep activations O(1); gates start at the biases of the config (design doc)."""
        for w, (_, fan_in) in zip(self.initial_weights, self.shapes):
            if self.cfg.depth == 1:
                nn.init.zeros_(w)  # an empty matrix memory
            else:
                nn.init.normal_(w, std=1.0 / math.sqrt(fan_in))
        for proj, bias in ((self.to_theta, self.cfg.theta_bias_init), (self.to_eta, self.cfg.eta_bias_init), (self.to_alpha, self.cfg.alpha_bias_init)):
            if proj is None:
                continue
            nn.init.normal_(proj.weight, std=0.02)
            nn.init.constant_(proj.bias, bias)

    @property
    def ln_scale_init(self) -> float:
        """The memory LayerNorm's initial scale: 1/sqrt(d) (unit l2 norm per head) or 1 (``unit_rms``, the paper's)."""
        return 1.0 if self.cfg.ln_init == "unit_rms" else self.head_dim**-0.5

    @property
    def ln(self) -> tuple[Tensor, Tensor] | None:
        return (self.ln_weight, self.ln_bias) if self.cfg.depth >= 2 else None

    def init_state(self, batch: int, dtype: torch.dtype | None = None) -> NeuralMemoryState:
        """The state before any token; ``dtype`` is the activations' dtype (default: the parameters')."""
        ref = self.initial_weights[0]
        dtype = dtype or ref.dtype
        conv = ref.new_zeros(batch, self.cfg.conv_width - 1, 3 * self.heads * self.head_dim, dtype=dtype)
        weights = [w.to(state_dtype(dtype)) for w in self.initial_weights]
        return NeuralMemoryState(initial_state(weights, batch), conv)

    def _heads(self, t: Tensor) -> Tensor:  # (B, N, H*d) -> (B, H, N, d)
        return t.unflatten(-1, (self.heads, self.head_dim)).transpose(1, 2)

    def query(self, x: Tensor, conv_cache: Tensor | None) -> tuple[Tensor, Tensor]:
        """Retrieval queries for a stream other than the one written (MAC reads with the segment, writes
        the attention output): W_Q, the q channels of the short convolution, SiLU, l2 norm per head.
        Returns q (B, H, N, d) and this stream's convolution cache (B, width - 1, H * d)."""
        q = self.to_q(x)
        channels = q.shape[-1]
        if conv_cache is None:
            conv_cache = q.new_zeros(q.shape[0], self.cfg.conv_width - 1, channels)
        full = torch.cat([conv_cache, q], 1)
        q = F.conv1d(full.transpose(1, 2), self.conv.weight[:channels], self.conv.bias[:channels], groups=channels)
        q = F.normalize(self._heads(F.silu(q.transpose(1, 2))), dim=-1)
        return q, full[:, full.shape[1] - (self.cfg.conv_width - 1) :]

    def project(self, x: Tensor, conv_cache: Tensor):
        """q, k, v (B, H, N, d) and the gates theta, log eta, log(1 - alpha) (B, H, N)."""
        qkv = torch.cat([self.to_q(x), self.to_k(x), self.to_v(x)], -1)
        qkv, conv_cache = self.conv(qkv, conv_cache)
        q, k, v = (self._heads(t) for t in F.silu(qkv).chunk(3, -1))
        q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
        theta = self.cfg.theta_max * torch.sigmoid(self.to_theta(x)).transpose(1, 2)
        zeros = torch.zeros_like(theta)
        log_eta = F.logsigmoid(self.to_eta(x)).transpose(1, 2) if self.to_eta is not None else zeros  # unused
        log_decay = F.logsigmoid(-self.to_alpha(x)).transpose(1, 2) if self.to_alpha is not None else zeros
        return q, k, v, theta, log_eta, log_decay, conv_cache

    def memorize(self, q, k, v, theta, log_eta, log_decay, state: MemoryState) -> tuple[Tensor, MemoryState]:
        """Write and read per token with the fast path (or the reference); y is (B, H, N, d).

        Under bf16/fp16 (autocast or half parameters) the recurrence runs in float32: the memory state
        and every accumulator stay fp32, and only the read is cast back to the activations' dtype.
        """
        out_dtype = q.dtype
        dtype = state_dtype(q.dtype)
        check_state(state, q.shape[0], self.shapes, self.heads, dtype)
        ln = None if self.ln is None else tuple(p.to(dtype) for p in self.ln)
        common = dict(chunk_size=self.cfg.chunk_size, ln=ln, eps=self.cfg.ln_eps, momentum=self.cfg.momentum)
        inputs = tuple(t.to(dtype) for t in (q, k, v, theta, log_eta, log_decay))
        with torch.autocast(q.device.type, enabled=False):
            if self.reference:
                y, state = reference_memory(*inputs, state, **common)
            else:
                y, state = chunked_memory(*inputs, state, checkpoint_every=self.cfg.checkpoint_every, backend=self.backend(q.device.type),
                                          kernel_precision=self.cfg.kernel_precision, hand_backward=self.cfg.hand_backward, **common)
        return y.to(out_dtype), state

    def backend(self, device_type: str) -> str:
        """The chunk loop's backend on this device (``resolve_backend``); warns once when ``auto`` falls
        back from the kernel."""
        backend, reason = resolve_backend(self.cfg, self.head_dim, device_type)
        if reason and not _warned.get(reason):
            _warned[reason] = True
            warnings.warn(f"memory.backend=auto runs the CUDA-graph chunk loop, not the Triton kernel: {reason}", stacklevel=2)
        return backend

    def retrieve(self, q: Tensor, state: MemoryState) -> Tensor:
        """Read without writing ("M*"), at the weights of the last chunk boundary: (B, H, N, d).
        Like ``memorize``, it computes in the state's dtype (fp32 under bf16) and returns q's dtype."""
        dtype = state.weights[0].dtype
        ln = None if self.ln is None else tuple(p.to(dtype).unsqueeze(1) for p in self.ln)
        with torch.autocast(q.device.type, enabled=False):
            return memory_read(q.to(dtype), state.weights, ln, self.cfg.ln_eps).to(q.dtype)

    def output(self, y: Tensor, x: Tensor) -> Tensor:
        """RMS-normalise each head's read, gate it by the input, project back to the model width."""
        y = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + 1e-6) * self.out_norm_weight
        y = y.transpose(1, 2).flatten(2)
        return self.to_out(y * F.silu(self.to_gate(x)))

    def forward(self, x: Tensor, state: NeuralMemoryState | None = None) -> tuple[Tensor, NeuralMemoryState]:
        if x.dim() != 3 or x.shape[-1] != self.dim:
            raise ValueError(f"x has shape {tuple(x.shape)}; expected (batch, tokens, {self.dim})")
        if state is None:
            state = self.init_state(x.shape[0], torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype)
        check_state(state.memory, x.shape[0], self.shapes, self.heads, state_dtype(x.dtype))
        if state.conv.shape != (x.shape[0], self.cfg.conv_width - 1, 3 * self.heads * self.head_dim):
            raise ValueError(f"memory_state.conv has shape {tuple(state.conv.shape)}; expected batch {x.shape[0]}")
        if self.cfg.checkpoint_every > 0 and self.training and torch.is_grad_enabled():
            # Bounded memory asked for: the cheap projections (convolution, SiLU, norms, gates) are
            # recomputed in backward too, instead of keeping three (N, 3 H d) activations per layer.
            q, k, v, theta, log_eta, log_decay, conv = checkpoint(self.project, x, state.conv, use_reentrant=False)
        else:
            q, k, v, theta, log_eta, log_decay, conv = self.project(x, state.conv)
        y, memory = self.memorize(q, k, v, theta, log_eta, log_decay, state.memory)
        return self.output(y, x), NeuralMemoryState(memory, conv)
