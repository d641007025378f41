"""Every layout a user can ask for that cannot work, refused at start-up with one line naming the numbers."""

from __future__ import annotations

from titans_scale.config import ConfigError, data_parallel_size

SCHEMES = ("relay", "all_to_all")


def check_model(cfg, tp: int, sp: int, scheme: str) -> None:
    """Heads, MLP width and vocabulary split evenly over the TP ranks (and heads over SP for all_to_all)."""
    if scheme not in SCHEMES:
        raise ConfigError(f"parallel.sp_scheme={scheme!r} is unknown; choose one of {', '.join(SCHEMES)}")
    if cfg.n_heads % tp:
        raise ConfigError(
            f"model.n_heads={cfg.n_heads} is not divisible by parallel.tp={tp}: each tensor-parallel rank owns whole "
            f"heads (and their memories); use a tp that divides {cfg.n_heads}"
        )
    if cfg.mlp_width % tp:
        raise ConfigError(f"the SwiGLU width {cfg.mlp_width} (model.mlp_hidden) is not divisible by parallel.tp={tp}; "
                          f"use a multiple of {tp}")
    if cfg.vocab_size % tp:
        padded = -(-cfg.vocab_size // tp) * tp
        raise ConfigError(f"model.vocab_size={cfg.vocab_size} is not divisible by parallel.tp={tp}: the vocabulary is "
                          f"split evenly; pad it, e.g. model.vocab_size={padded}")
    if sp > 1 and cfg.activation_checkpointing:
        raise ConfigError(
            f"model.activation_checkpointing=true recomputes each block in backward, which would repeat the sequence-"
            f"parallel hand-offs of parallel.sp={sp}; use memory.checkpoint_every (chunk-state recomputation) instead"
        )
    heads = cfg.n_heads // tp
    if sp > 1 and scheme == "all_to_all" and cfg.memory_layer_set() and heads % sp:
        raise ConfigError(
            f"parallel.sp_scheme=all_to_all splits each tensor-parallel rank's {heads} memory heads over parallel.sp={sp} "
            f"ranks, and {sp} does not divide {heads}; use sp_scheme=relay or an sp that divides {heads}"
        )


def check_sequence(cfg, seq_len: int, tp: int, sp: int, scheme: str, tp_sequence_parallel: bool = False) -> None:
    """Each SP rank's slice holds whole memory chunks (and, for MAC, whole segments)."""
    if seq_len % sp:
        raise ConfigError(f"sequence length {seq_len} is not divisible by parallel.sp={sp}; use a multiple of {sp}")
    part = seq_len // sp
    kinds = set(cfg.layer_kinds())
    b = cfg.memory.chunk_size
    if sp > 1 and cfg.memory_layer_set() and part % b:
        raise ConfigError(
            f"each sequence-parallel slice of {part} tokens (sequence {seq_len} / parallel.sp={sp}) is not a whole number "
            f"of memory chunks (model.memory.chunk_size={b}); use a sequence length that is a multiple of {sp * b}"
        )
    if sp > 1 and "mac" in kinds and part % cfg.segment_len:
        raise ConfigError(
            f"each sequence-parallel slice of {part} tokens (sequence {seq_len} / parallel.sp={sp}) is not a whole number "
            f"of MAC segments (model.segment_len={cfg.segment_len}); use a sequence length that is a multiple of "
            f"{sp * cfg.segment_len}"
        )
    if sp > 1 and scheme == "all_to_all":
        halos = [0]
        if kinds & {"window", "mag", "mal"}:
            halos.append(cfg.window - 1)  # sliding-window attention
        if kinds & {"lmm", "mag", "mal"}:
            halos.append(cfg.memory.conv_width - 1)  # the memory's short convolution (MAC relays)
        halo = max(halos)
        if part < halo:
            raise ConfigError(
                f"sp_scheme=all_to_all takes each rank's halo ({halo} tokens: the attention window - 1 or the convolution "
                f"width - 1) from the previous slice alone, but slices hold {part} tokens; use sp_scheme=relay or fewer SP ranks"
            )
    if tp_sequence_parallel and tp > 1 and part % tp:
        raise ConfigError(
            f"tensor-parallel sequence parallelism splits each slice of {part} tokens over parallel.tp={tp} ranks; "
            f"use a sequence length that is a multiple of {sp * tp}"
        )


def relays(cfg, sp: int, scheme: str) -> bool:
    """Whether some block runs the relay (every block under ``relay``; MAC blocks under ``all_to_all`` too)."""
    return sp > 1 and (scheme == "relay" or "mac" in cfg.layer_kinds())


def check_zero_stage(cfg, sp: int, scheme: str, zero_stage: int) -> None:
    """ZeRO-2 and ZeRO-3 act inside backward, per parameter, over the data-parallel group, which holds the SP
    ranks: ZeRO-3 gathers each layer's weights there while the relay keeps those ranks at different layers (a
    deadlock), and ZeRO-2's per-parameter reduction hooks do not see the gradients the relay's backward adds
    to a parameter later (measured: training diverges from one process after the first step). ZeRO-1
    reduces once after backward and is exact with the relay; all_to_all is exact with ZeRO-2 too."""
    if zero_stage >= 2 and relays(cfg, sp, scheme):
        raise ConfigError(
            f"train.zero_stage={zero_stage} does not compose with the sequence-parallel relay (parallel.sp={sp}, "
            f"sp_scheme={scheme}"
            + (", MAC blocks relay under all_to_all too" if scheme != "relay" else "")
            + "): use train.zero_stage=1"
            + (", or parallel.sp_scheme=all_to_all with train.zero_stage=2" if "mac" not in cfg.layer_kinds() else "")
        )


def validate_parallel(model_cfg, parallel_cfg, world_size: int | None = None, seq_len: int | None = None,
                      zero_stage: int | None = None) -> int | None:
    """The start-up check of a run's layout; returns the data-parallel size when the world size is given."""
    tp, sp, scheme = parallel_cfg.tp, parallel_cfg.sp, parallel_cfg.sp_scheme
    dp = data_parallel_size(parallel_cfg, world_size) if world_size is not None else None
    check_model(model_cfg, tp, sp, scheme)
    if seq_len is not None:
        check_sequence(model_cfg, seq_len, tp, sp, scheme, bool(getattr(parallel_cfg, "sequence_parallel", False)))
    if zero_stage is not None:
        check_zero_stage(model_cfg, sp, scheme, zero_stage)
    return dp
