"""Every layout a user can ask for that cannot work, refused at start-up with one line naming the numbers."""

from __future__ import annotations

from titans_scale.config import ConfigError

SCHEMES = ("relay", "all_to_all")


def check_world(world_size: int, tp: int, sp: int) -> int:
    """dp = world / (tp x sp); refused when tp x sp does not divide the world."""
    if tp < 1 or sp < 1:
        raise ConfigError(f"parallel.tp={tp} and parallel.sp={sp} must be >= 1")
    if world_size % (tp * sp):
        raise ConfigError(
            f"world size {world_size} is not dp x tp x sp: parallel.tp={tp} x parallel.sp={sp} = {tp * sp} does not "
            f"divide it; change the number of processes or the parallel sizes"
        )
    return world_size // (tp * sp)


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
    """ZeRO-3 gathers each layer's weights over the data-parallel group, which holds the SP ranks: the relay
    keeps those at different layers, so in backward each would wait for the other."""
    if zero_stage >= 3 and relays(cfg, sp, scheme):
        raise ConfigError(
            f"train.zero_stage={zero_stage} gathers every layer's weights across the sequence-parallel ranks, which the relay "
            f"keeps at different layers (a deadlock); use train.zero_stage<=2, or parallel.sp_scheme=all_to_all (not for MAC)"
        )


def validate_parallel(model_cfg, parallel_cfg, world_size: int | None = None, seq_len: int | None = None,
                      zero_stage: int | None = None) -> int | None:
    """The start-up check of a run's layout; returns the data-parallel size when the world size is given."""
    tp, sp, scheme = parallel_cfg.tp, parallel_cfg.sp, parallel_cfg.sp_scheme
    dp = check_world(world_size, tp, sp) if world_size is not None else None
    check_model(model_cfg, tp, sp, scheme)
    if seq_len is not None:
        check_sequence(model_cfg, seq_len, tp, sp, scheme, bool(getattr(parallel_cfg, "sequence_parallel", False)))
    if zero_stage is not None:
        check_zero_stage(model_cfg, sp, scheme, zero_stage)
    return dp
