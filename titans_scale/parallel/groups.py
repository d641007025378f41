"""The process groups: tensor parallel (TP), sequence parallel (SP) and data parallel (DP), from megatron-core.

``world = dp x tp x sp``. megatron-core's ``parallel_state`` builds the groups, with our sequence-parallel
group as its *context-parallel* group (rank order tp-cp-dp: TP ranks are adjacent, then SP, then DP). That
choice makes the data-parallel group that DeepSpeed is handed (``get_data_parallel_group(
with_context_parallel=True)``, megatron's ``mpu`` in ``titans_scale.train.distributed``) span the SP ranks
too: SP ranks hold whole replicas of the weights and see different tokens of the same sequences, so their
gradients must be summed, which DeepSpeed's data-parallel averaging does once the loss of each SP rank is
scaled by ``sp`` (see ``sequence.sequence_loss``), exactly as Megatron treats context parallelism.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch.distributed as dist

from titans_scale.config import ConfigError, ParallelConfig, data_parallel_size



@dataclass(frozen=True)
class ParallelGroups:
    """This rank's coordinates and groups. ``dp_group`` is what gradients are averaged over (DP x SP)."""

    tp: int
    sp: int
    dp: int
    tp_rank: int
    sp_rank: int
    dp_rank: int  # which data shard this rank reads: ranks of one TP x SP group read the same batch
    tp_group: Any
    sp_group: Any
    dp_group: Any  # data parallel with the SP ranks (megatron: with_context_parallel=True)

    @property
    def has_prev(self) -> bool:
        return self.sp_rank > 0

    @property
    def has_next(self) -> bool:
        return self.sp_rank < self.sp - 1


def current_groups() -> ParallelGroups:
    """The groups megatron-core's ``parallel_state`` holds now (as set up by ``init_parallel`` or the engine)."""
    from megatron.core import parallel_state as ps

    if not ps.model_parallel_is_initialized():
        raise ConfigError("megatron-core's parallel groups are not set up; call titans_scale.parallel.init_parallel(tp, sp) first")
    return ParallelGroups(
        tp=ps.get_tensor_model_parallel_world_size(),
        sp=ps.get_context_parallel_world_size(),
        dp=ps.get_data_parallel_world_size(),
        tp_rank=ps.get_tensor_model_parallel_rank(),
        sp_rank=ps.get_context_parallel_rank(),
        dp_rank=ps.get_data_parallel_rank(),
        tp_group=ps.get_tensor_model_parallel_group(),
        sp_group=ps.get_context_parallel_group(),
        dp_group=ps.get_data_parallel_group(with_context_parallel=True),
    )


def init_parallel(tp: int = 1, sp: int = 1) -> ParallelGroups:
    """Build (or reuse) megatron-core's groups for ``tp`` x ``sp`` over the already-joined world.

    torch.distributed must be initialised (torchrun, the deepspeed launcher, ``init_distributed`` of the
    engine, or ``titans_scale.parallel.spawn``). Groups of other sizes are replaced.
    """
    from megatron.core import parallel_state as ps

    if not dist.is_available() or not dist.is_initialized():
        raise ConfigError("init_parallel needs torch.distributed initialised first (torchrun, deepspeed, or parallel.spawn)")
    data_parallel_size(ParallelConfig(tp=tp, sp=sp), dist.get_world_size())
    if ps.model_parallel_is_initialized():
        if (ps.get_tensor_model_parallel_world_size(), ps.get_context_parallel_world_size()) == (tp, sp):
            return current_groups()
        ps.destroy_model_parallel()
    ps.initialize_model_parallel(tensor_model_parallel_size=tp, context_parallel_size=sp, create_gloo_process_groups=False)
    return current_groups()
