"""Typed configuration of a Titans language model (design doc, section 2) and the paper's sizes.

Variants:
    lmm          the memory layer in place of attention
    mac          memory as context: segments, retrieval before the segment, attention over [P | h | S]
    mag          memory as gate: sliding-window attention and the memory branch, combined by a gate
    mal          memory as layer: the memory layer, then sliding-window attention
    transformer  Transformer++ baseline: full causal attention
    swa          baseline: sliding-window attention only

Layers left out of ``memory_layers`` are plain attention blocks: full causal attention for ``mac`` (and
``transformer``), sliding-window attention for ``lmm``, ``mag``, ``mal`` (and ``swa``), so that a
partial-memory model keeps the cost profile of its variant (our choice).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from titans_scale.memory import MemoryConfig, validate_memory

VARIANTS = ("lmm", "mac", "mag", "mal", "transformer", "swa")
MEMORY_VARIANTS = ("lmm", "mac", "mag", "mal")

# What each layer is made of; ``layer_kinds`` maps a config to one of these per layer.
LAYER_KINDS = ("lmm", "mac", "mag", "mal", "full", "window")


@dataclass
class ModelConfig:
    """One Titans (or baseline) language model. ``validate()`` is the one place that checks it."""

    variant: str = "mac"
    vocab_size: int = 32000
    dim: int = 768
    n_layers: int = 12
    n_heads: int = 16  # attention heads and memory heads alike (head size dim / n_heads)
    mlp_hidden: int | None = None  # SwiGLU width; None: Llama's 8/3 * dim rounded up to mlp_multiple_of
    mlp_multiple_of: int = 256
    tie_embeddings: bool = False
    rope_theta: float = 10000.0
    persistent_tokens: int = 128  # N_p learnable tokens prepended to every attention's keys and values
    segment_len: int = 512  # MAC segment length
    window: int = 2048  # sliding-window span: a token sees itself and the window - 1 tokens before it
    memory_layers: str | list[int] = "all"  # "all", or the indices of the layers that carry a memory
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    init_std: float = 0.02
    norm_eps: float = 1e-5
    # keep only each block's input in training and recompute the block in backward (with the memory's own
    # memory.checkpoint_every, activation memory then grows with layers x N, not with everything inside)
    activation_checkpointing: bool = False

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def mlp_width(self) -> int:
        """The SwiGLU hidden width actually used."""
        if self.mlp_hidden is not None:
            return self.mlp_hidden
        m = self.mlp_multiple_of
        return -(-int(8 * self.dim / 3) // m) * m

    def memory_layer_set(self) -> set[int]:
        if self.variant not in MEMORY_VARIANTS:
            return set()
        if self.memory_layers == "all":
            return set(range(self.n_layers))
        return set(self.memory_layers)

    def layer_kinds(self) -> list[str]:
        """The kind of every layer (one of LAYER_KINDS): the variant where a memory sits, else attention."""
        plain = "full" if self.variant in ("mac", "transformer") else "window"
        with_memory = self.memory_layer_set()
        return [self.variant if i in with_memory else plain for i in range(self.n_layers)]

    def validate(self) -> "ModelConfig":
        """Raise ValueError naming the field, its value and what is allowed; returns self."""
        if self.variant not in VARIANTS:
            raise ValueError(f"model.variant={self.variant!r} is unknown; choose one of {', '.join(VARIANTS)}")
        for name in ("vocab_size", "dim", "n_layers", "n_heads", "mlp_multiple_of"):
            if getattr(self, name) < 1:
                raise ValueError(f"model.{name}={getattr(self, name)} must be >= 1")
        if self.dim % self.n_heads:
            raise ValueError(f"model.n_heads={self.n_heads} must divide model.dim={self.dim}")
        if self.head_dim % 2:
            raise ValueError(f"model.dim / model.n_heads = {self.head_dim} must be even (RoPE rotates pairs of channels)")
        if self.mlp_hidden is not None and self.mlp_hidden < 1:
            raise ValueError(f"model.mlp_hidden={self.mlp_hidden} must be >= 1, or null for 8/3 * dim")
        for name in ("rope_theta", "init_std", "norm_eps"):
            if not getattr(self, name) > 0:
                raise ValueError(f"model.{name}={getattr(self, name)} must be > 0")
        if self.persistent_tokens < 0:
            raise ValueError(f"model.persistent_tokens={self.persistent_tokens} must be >= 0")
        if self.window < 1:
            raise ValueError(f"model.window={self.window} must be >= 1")
        if self.segment_len < 1:
            raise ValueError(f"model.segment_len={self.segment_len} must be >= 1")
        self._validate_memory_layers()
        kinds = set(self.layer_kinds())
        if self.variant in MEMORY_VARIANTS:
            validate_memory(self.dim, self.n_heads, self.memory)
            b = self.memory.chunk_size
            if kinds & {"window", "mag", "mal"} and self.window % b:
                raise ValueError(
                    f"model.window={self.window} must be a multiple of model.memory.chunk_size={b} "
                    f"(e.g. {max(b, self.window // b * b)}), so that windows and memory chunks share boundaries"
                )
            if "mac" in kinds:
                if self.segment_len % b:
                    raise ValueError(
                        f"model.segment_len={self.segment_len} must be a multiple of model.memory.chunk_size={b} "
                        f"(e.g. {max(b, self.segment_len // b * b)}): MAC reads the memory at segment starts"
                    )
                if self.persistent_tokens > self.segment_len:
                    raise ValueError(
                        f"model.persistent_tokens={self.persistent_tokens} must not exceed "
                        f"model.segment_len={self.segment_len}"
                    )
        return self

    def _validate_memory_layers(self) -> None:
        layers = self.memory_layers
        if isinstance(layers, str):
            if layers != "all":
                raise ValueError(f"model.memory_layers={layers!r} must be 'all' or a list of layer indices")
            return
        layers = list(layers)
        bad = [i for i in layers if not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < self.n_layers]
        if bad or len(set(layers)) != len(layers):
            raise ValueError(
                f"model.memory_layers={layers} must be 'all' or distinct layer indices in [0, {self.n_layers - 1}]"
            )


# ----------------------------------------------------------------------------------------------------
# The paper's sizes (design doc, section 3)

# size -> (n_layers, dim, n_heads, tie_embeddings). 400M has the shape of Gated DeltaNet's 0.4B models
# (NVlabs/GatedDeltaNet lit_gpt/config.py: width 1536, 12 heads; 12 layers as in GatedDeltaNet_H1_0.4B).
# Untied at 170M, tied above: the choice that keeps the Transformer++ MLP near Llama's 8/3 * dim.
PAPER_SIZES: dict[str, tuple[int, int, int, bool]] = {
    "170M": (12, 768, 16, False),
    "340M": (24, 1024, 16, True),
    "400M": (12, 1536, 12, True),
    "760M": (24, 1536, 16, True),
}
PAPER_MLP_MULTIPLE = 64


def paper_config(size: str, variant: str, **overrides) -> ModelConfig:
    """The paper's model of ``size`` for ``variant``: vocab 32K, chunk 16, segment 512, window 2048, memory
    depth 2 x4, 128 persistent tokens for MAC/MAG/MAL (none for the baselines, as in the paper); depth,
    width and heads from the paper. The SwiGLU width is fitted so that this variant's parameter count is
    the nominal size (rounded to a multiple of 64), which keeps comparisons between variants at equal
    parameters. ``overrides`` replace fields before fitting (an explicit ``mlp_hidden`` turns it off).

    The fitted widths (x dim): 170M transformer/swa 3328 (4.3), lmm 2944 (3.8), mac/mag/mal 1856 (2.4);
    340M 2816 (2.75), 2240 (2.2), 832 (0.8); 400M 4288 (2.8), 3456 (2.25), 1344 (0.9); 760M 4352 (2.8),
    3584 (2.3), 1472 (1.0). A hybrid layer holds attention (4 D^2) and a memory (5 D^2 + W_0) beside its
    MLP, so at equal size its MLP is narrow."""
    from .stats import parameter_count

    if size not in PAPER_SIZES:
        raise ValueError(f"paper size {size!r} is unknown; choose one of {', '.join(PAPER_SIZES)}")
    n_layers, dim, n_heads, tie = PAPER_SIZES[size]
    cfg = ModelConfig(
        variant=variant, vocab_size=32000, dim=dim, n_layers=n_layers, n_heads=n_heads, tie_embeddings=tie,
        persistent_tokens=128 if variant in ("mac", "mag", "mal") else 0, segment_len=512, window=2048,
        memory=MemoryConfig(chunk_size=16, depth=2, expansion=4),
    )
    if overrides.get("mlp_hidden") is not None:
        return replace(cfg, **overrides).validate()
    cfg = replace(cfg, **{**overrides, "mlp_hidden": 1}).validate()
    target = float(size.rstrip("M")) * 1e6
    per_unit = parameter_count(replace(cfg, mlp_hidden=2)) - parameter_count(cfg)  # params per unit of width
    width = (target - parameter_count(cfg)) / per_unit + 1
    hidden = max(PAPER_MLP_MULTIPLE, round(width / PAPER_MLP_MULTIPLE) * PAPER_MLP_MULTIPLE)
    return replace(cfg, mlp_hidden=hidden).validate()
