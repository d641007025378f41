"""Parameter count and forward FLOPs per token of a model config, from formulas (no module is built).

FLOPs count multiply-adds as 2 and leave out element-wise work (norms, activations, softmax, gates'
sigmoids, the memory's coefficient cumsums). Per token, with D = dim, H heads of size d, V vocab, N
the sequence length, N_p persistent tokens:

    projections   2 x (weights of every nn.Linear a token goes through)   incl. the LM head 2 D V
    attention     4 D x span             span = keys a query sees, averaged over the N positions:
                    full: N_p + (N+1)/2;  window W: N_p + mean_t min(t+1, W);
                    MAC: N_p + mean_t 2 (t mod L + 1)   (h_i and S_i for i <= j)
    persistent    4 D^2 N_p / N          their keys and values, projected once per sequence
    conv          2 x 3D x conv_width    the memory's short convolution (MAC: + D x conv_width for retrieval)
    memory        H x per-head cost, with the memory MLP's matrices (o_l x i_l), P = sum_l o_l i_l, chunk b:
                    inner gradient     2 P forward + 2 sum_{l>=1} o_l i_l backward (deltas)
                    dual-form reads    sum_l 4 o_l i_l (W and S terms) + 2 b (i_l + o_l) (in-chunk terms)
                    state update       4 P (W and S at the chunk end, amortised over b tokens)
                    MAC retrieval      2 P (a read at the segment-start weights)

Training costs about 3x the forward (backward = 2x), plus any recomputation.
"""

from __future__ import annotations

from titans_scale.memory import memory_shapes

from .config import ModelConfig


def _attention_params(cfg: ModelConfig) -> int:
    return 4 * cfg.dim * cfg.dim + cfg.persistent_tokens * cfg.dim


def _memory_params(cfg: ModelConfig) -> int:
    D, H, d, mem = cfg.dim, cfg.n_heads, cfg.head_dim, cfg.memory
    projections = 5 * D * D  # q, k, v, output gate, output
    conv = 3 * D * mem.conv_width + 3 * D
    gates = 3 * (D * H + H)  # theta, eta, alpha
    initial_weights = H * sum(o * i for o, i in memory_shapes(d, mem.depth, mem.expansion))
    layer_norm = 2 * H * d if mem.depth >= 2 else 0
    return projections + conv + gates + initial_weights + layer_norm + d  # + the per-head output RMSNorm


def _layer_params(kind: str, cfg: ModelConfig) -> int:
    D = cfg.dim
    mixers = {
        "full": _attention_params(cfg) + D,
        "window": _attention_params(cfg) + D,
        "lmm": _memory_params(cfg) + D,
        "mal": _memory_params(cfg) + _attention_params(cfg) + 2 * D,
        "mag": _attention_params(cfg) + _memory_params(cfg) + 2 * D,  # + the memory branch's norm
        "mac": _attention_params(cfg) + _memory_params(cfg) + 2 * D + cfg.head_dim,  # + the norms of h and of y
    }[kind]
    return mixers + 3 * D * cfg.mlp_width + D


def parameter_count(cfg: ModelConfig) -> int:
    """Exactly ``sum(p.numel() for p in build_model(cfg).parameters())`` (tied weights counted once)."""
    embeddings = cfg.vocab_size * cfg.dim * (1 if cfg.tie_embeddings else 2)
    return embeddings + cfg.dim + sum(_layer_params(kind, cfg) for kind in cfg.layer_kinds())


def _mean_span(kind: str, cfg: ModelConfig, seq_len: int) -> float:
    """Keys a query sees (N_p included), averaged over positions 0 .. seq_len - 1."""
    N, W, L = seq_len, cfg.window, cfg.segment_len
    if kind == "full":
        seen = N * (N + 1) / 2
    elif kind == "mac":
        full, rest = divmod(N, L)
        seen = 2 * (full * L * (L + 1) / 2 + rest * (rest + 1) / 2)
    else:  # sliding window: min(t + 1, W)
        ramp = min(N, W)
        seen = ramp * (ramp + 1) / 2 + (N - ramp) * W
    return cfg.persistent_tokens + seen / N


def _memory_flops(cfg: ModelConfig, retrieval: bool) -> float:
    """Per token: the memory's projections, gates, convolution and the chunked memory itself."""
    D, H, mem = cfg.dim, cfg.n_heads, cfg.memory
    shapes = memory_shapes(cfg.head_dim, mem.depth, mem.expansion)
    P = sum(o * i for o, i in shapes)
    b = mem.chunk_size
    per_head = 2 * P + 2 * sum(o * i for o, i in shapes[1:]) + sum(4 * o * i + 2 * b * (i + o) for o, i in shapes) + 4 * P
    linear = 2 * (5 * D * D + 3 * D * H) + 2 * 3 * D * mem.conv_width
    if retrieval:  # MAC's second query stream: W_Q, its convolution, the read
        per_head += 2 * P
        linear += 2 * D * D + 2 * D * mem.conv_width
    return linear + H * per_head


def _attention_flops(kind: str, cfg: ModelConfig, seq_len: int) -> float:
    D = cfg.dim
    return 8 * D * D + 4 * D * _mean_span(kind, cfg, seq_len) + 4 * D * D * cfg.persistent_tokens / seq_len


def forward_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Forward FLOPs per token, averaged over a sequence of ``seq_len`` tokens (see the module docstring)."""
    D = cfg.dim
    total = 2 * D * cfg.vocab_size  # the LM head
    for kind in cfg.layer_kinds():
        total += 6 * D * cfg.mlp_width
        if kind in ("full", "window"):
            total += _attention_flops(kind, cfg, seq_len)
        elif kind == "lmm":
            total += _memory_flops(cfg, retrieval=False)
        elif kind in ("mal", "mag"):
            total += _memory_flops(cfg, retrieval=False) + _attention_flops("window", cfg, seq_len)
        elif kind == "mac":
            total += _memory_flops(cfg, retrieval=True) + _attention_flops("mac", cfg, seq_len) + 4 * D * D  # h -> k, v
    return total


def backbone_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Forward FLOPs per token of the blocks alone (no LM head), for models with other heads."""
    return forward_flops_per_token(cfg, seq_len) - 2 * cfg.dim * cfg.vocab_size


def model_stats(cfg: ModelConfig, seq_len: int) -> tuple[int, float]:
    """``(parameter count, forward FLOPs per token at seq_len)`` of a config, for sizing and MFU."""
    cfg.validate()
    if seq_len < 1:
        raise ValueError(f"seq_len={seq_len} must be >= 1")
    return parameter_count(cfg), forward_flops_per_token(cfg, seq_len)


# ----------------------------------------------------------------------------------------------------
# Module groups, for gradient norms per part of the model

MODULE_GROUPS = ("memory", "attention", "mlp", "embed", "other")


def module_groups(model) -> dict[str, str]:
    """``{parameter name: group}`` with group one of ``MODULE_GROUPS``: the memory branch (the neural memory
    and the norms around it in MAG and MAC), attention (with the persistent tokens), the SwiGLU MLPs,
    the token embedding and output head, and the rest (the blocks' pre-norms and the final norm). Found by
    module type, so it holds for any wrapper around the model (DeepSpeed's, tensor-parallel layers)."""
    from torch import nn

    from titans_scale.memory import NeuralMemory

    from .attention import Attention
    from .layers import SwiGLU

    by_type = ((NeuralMemory, "memory"), (Attention, "attention"), (SwiGLU, "mlp"), (nn.Embedding, "embed"))
    by_name = {"memory_norm": "memory", "retrieved_norm": "memory", "write_norm": "memory", "head": "embed"}
    owner: dict[str, str] = {}
    for prefix, module in model.named_modules():
        group = next((g for t, g in by_type if isinstance(module, t)), None) or by_name.get(prefix.rsplit(".", 1)[-1])
        if group is None:
            continue
        for name, _ in module.named_parameters(prefix=prefix, remove_duplicate=False):
            owner.setdefault(name, group)  # the outermost module that names a group wins
    return {name: owner.get(name, "other") for name, _ in model.named_parameters()}
