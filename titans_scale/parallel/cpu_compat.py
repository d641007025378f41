"""megatron-core on a CPU: the one place that adapts it.

megatron's parallel layers allocate their weights on ``torch.cuda.current_device()`` and initialise them
under its CUDA RNG tracker. Both are avoided here, without patching torch or megatron:

- every parallel layer is built with ``use_cpu_initialization=True`` when the model lives on the CPU
  (the weights are allocated with ``torch.empty`` on the CPU);
- and with ``perform_initialization=False``: ``parallelize`` then copies into each layer the exact shard
  of the single-process model's weights, so megatron's RNG tracker is never consulted (bypassed);
- megatron's own sequence-parallel collectives (which allocate on ``torch.cuda.current_device()``) are
  not used: ours, in ``comm.py``, are device-agnostic.

``seed_model_parallel_rng`` is for code that does want megatron's tracker (e.g. dropout inside
megatron modules): on a GPU it is megatron's ``model_parallel_cuda_manual_seed``, on a CPU the plain torch
seed (the tracker needs CUDA RNG states).
"""

from __future__ import annotations

import torch


def megatron_config(tp: int, dtype: torch.dtype, device: torch.device):
    """The ``ModelParallelConfig`` of every parallel layer we build (no sequence parallel inside them:
    ``tensor.py`` owns the sequence-parallel regions, batch-first)."""
    from megatron.core import ModelParallelConfig

    return ModelParallelConfig(
        tensor_model_parallel_size=tp,
        params_dtype=dtype,
        use_cpu_initialization=device.type == "cpu",
        perform_initialization=False,
        sequence_parallel=False,
    )


def seed_model_parallel_rng(seed: int) -> None:
    """Seed torch, and megatron's CUDA RNG tracker where there is CUDA."""
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

        model_parallel_cuda_manual_seed(seed)
