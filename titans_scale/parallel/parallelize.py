"""``parallelize(model, parallel_cfg, groups)``: the plain single-process model, made tensor- and
sequence-parallel in place, from outside (the model files read like the paper)."""

from __future__ import annotations

import functools
from dataclasses import dataclass

from torch import nn

from titans_scale.config import ConfigError

from .checks import check_model
from .groups import ParallelGroups, current_groups
from .sequence import Sequence, install_sequence_forward, sequence_loss, sequence_parallelize
from .tensor import Region, full_tensor, tensor_parallelize


@dataclass
class ParallelPlan:
    """What ``parallelize`` did to a model (``model.parallel``)."""

    groups: ParallelGroups
    scheme: str
    tp_sequence_parallel: bool
    region: Region | None  # tensor parallelism
    sequence: Sequence | None  # sequence parallelism


def parallelize(model: nn.Module, parallel_cfg, groups: ParallelGroups | None = None, *,
                tp_sequence_parallel: bool | None = None, micro_batches: int | None = None,
                wavefront: bool = True) -> nn.Module:
    """Split ``model`` (a ``TitansLM``, built the same on every rank) over the TP and SP groups, in place.

    ``parallel_cfg``: ``tp``, ``sp``, ``sp_scheme`` (relay | all_to_all), and optionally
    ``sequence_parallel`` (Megatron sequence parallelism inside TP) and ``sp_micro_batches`` (the relay's
    wavefront over micro-batches); the keyword arguments override those two. ``groups`` default to
    megatron-core's current ones. Afterwards (see ``sequence.py`` for SP):

    - ``model(tokens, state)`` returns full-vocabulary logits; under SP, of this rank's slice, no state;
    - ``model.loss(tokens)`` is what DeepSpeed should backpropagate (averaging gradients over DP x SP);
    - ``model.parallel`` describes the layout; ``full_parameters(model)`` gathers the single-process weights.
    """
    tp, sp, scheme = parallel_cfg.tp, parallel_cfg.sp, parallel_cfg.sp_scheme
    if tp_sequence_parallel is None:
        tp_sequence_parallel = bool(getattr(parallel_cfg, "sequence_parallel", False))
    micro_batches = micro_batches or int(getattr(parallel_cfg, "sp_micro_batches", 1))
    if tp == 1 and sp == 1:
        return model
    if getattr(model, "parallel", None) is not None:
        raise ValueError("this model is already parallelized; build a fresh one for another layout")
    groups = groups or current_groups()
    if (groups.tp, groups.sp) != (tp, sp):
        raise ConfigError(f"parallel.tp={tp}, parallel.sp={sp} but the process groups have tp={groups.tp}, sp={groups.sp}; "
                          f"call init_parallel({tp}, {sp}) first")
    if micro_batches < 1:
        raise ConfigError(f"sp_micro_batches={micro_batches} must be >= 1")
    check_model(model.cfg, tp, sp, scheme)
    tp_sequence_parallel = tp_sequence_parallel and tp > 1
    sequence = sequence_parallelize(model, groups, scheme, micro_batches, wavefront, tp_sequence_parallel) if sp > 1 else None
    region = tensor_parallelize(model, groups, tp_sequence_parallel) if tp > 1 else None
    if sequence is not None:
        install_sequence_forward(model, sequence)
    if sequence is not None or tp_sequence_parallel:
        model.loss = functools.partial(sequence_loss, model, sequence)
    model.parallel = ParallelPlan(groups, scheme, tp_sequence_parallel, region, sequence)
    return model


def full_parameters(model: nn.Module, grads: bool = False) -> dict:
    """The single-process parameters (or their gradients) by name, gathered from the TP shards (SP and DP
    ranks hold whole replicas). Collective over the TP group: call it on every rank."""
    plan = getattr(model, "parallel", None)
    out = {}
    for name, p in model.named_parameters():
        value = p.grad if grads else p.detach()
        if value is None:
            continue
        out[name] = value if plan is None else full_tensor(value, p, plan.groups)
    return out
