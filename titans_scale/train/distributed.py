"""Who this process is in the world, and the process groups that DeepSpeed and the parallel layers share.

When the model is split (tensor or sequence parallel), the groups come from megatron-core's
``parallel_state`` (tensor parallel x sequence/context parallel x data parallel); DeepSpeed sees them
through ``MegatronGroups``, so ZeRO partitions over the data-parallel ranks and tensor/sequence parallelism
compose with it. A purely data-parallel world uses DeepSpeed's own group of all ranks.
"""

from __future__ import annotations

import datetime
import importlib
import math
import os
import subprocess
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist

from titans_scale.config import ParallelConfig, data_parallel_size

from .workers import free_port  # noqa: F401  (re-exported: the tests' spawn uses it)


@dataclass
class World:
    """This process's place: global rank, rank on the node, sizes, and its data-parallel coordinates."""

    rank: int
    local_rank: int
    world_size: int
    dp_rank: int  # which data shard this rank reads (ranks of one tp x sp group read the same)
    dp_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launcher_env(environ: dict | None = None) -> dict[str, str] | None:
    """RANK / WORLD_SIZE / LOCAL_RANK / MASTER_* as set by torchrun, the deepspeed launcher or our own spawn,
    or derived from srun's variables; None when no launcher started this process."""
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return {
            "RANK": env["RANK"],
            "WORLD_SIZE": env["WORLD_SIZE"],
            "LOCAL_RANK": env.get("LOCAL_RANK", "0"),
            "MASTER_ADDR": env.get("MASTER_ADDR", "127.0.0.1"),
            "MASTER_PORT": env.get("MASTER_PORT", "29500"),
        }
    if "SLURM_STEP_NUM_TASKS" in env and "SLURM_PROCID" in env:  # a task of an srun job step
        return {
            "RANK": env["SLURM_PROCID"],
            "WORLD_SIZE": env["SLURM_STEP_NUM_TASKS"],
            "LOCAL_RANK": env.get("SLURM_LOCALID", "0"),
            "MASTER_ADDR": env.get("MASTER_ADDR") or _first_slurm_host(env),
            "MASTER_PORT": env.get("MASTER_PORT") or str(20000 + int(env.get("SLURM_JOB_ID", "0")) % 20000),
        }
    return None


def _first_slurm_host(env) -> str:
    nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or "127.0.0.1"
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, timeout=30)
        if out.returncode == 0 and out.stdout.split():
            return out.stdout.split()[0]
    except (OSError, subprocess.TimeoutExpired):
        pass
    return nodelist.split(",")[0]




def quiet_imports() -> None:
    """Silence import-time notices that say nothing to a user: DeepSpeed's 'no GPU found, using the CPU'
    megatron-core's 'Transformer Engine and Apex are not installed' (we use neither), torch's deprecation
    notices for the collectives DeepSpeed calls (all_gather_into_tensor, reduce_scatter_tensor)."""
    import warnings

    warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")
    warnings.filterwarnings("ignore", message="`torch.distributed.[a-z_]+` is deprecated", category=FutureWarning)
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")


def skip_shm_op() -> None:
    """DeepSpeed JIT-builds a shared-memory all-reduce op on CPU (about 30 s); plain gloo is enough here."""
    comm_torch = importlib.import_module("deepspeed.comm.torch")  # `import deepspeed.comm.torch` binds torch
    comm_torch.build_shm_op = lambda: None


def init_distributed(parallel: ParallelConfig, megatron: bool | None = None, timeout_s: float | None = None) -> World:
    """Join the process group (gloo on CPU, nccl on GPU) and, when the model is split (tp x sp > 1, or
    ``megatron=True``), build megatron-core's tensor / sequence (context) / data-parallel groups. A purely
    data-parallel world needs none: DeepSpeed's own data-parallel group is then the same (every rank), and
    not importing megatron-core saves about 5 s per process. ``timeout_s`` bounds every collective of every
    group (torch's default, 30 minutes, when None)."""
    env = launcher_env() or {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                             "MASTER_PORT": str(free_port())}
    os.environ.update(env)
    rank, local_rank, world_size = int(env["RANK"]), int(env["LOCAL_RANK"]), int(env["WORLD_SIZE"])
    data_parallel_size(parallel, world_size)  # refuse a world that tp * sp does not divide, before joining
    cuda = torch.cuda.is_available()
    quiet_imports()
    if cuda:
        torch.cuda.set_device(local_rank)
    else:
        skip_shm_op()
    import deepspeed

    timeout = {}
    if timeout_s is not None:
        timeout = {"timeout": datetime.timedelta(seconds=timeout_s)}
        # groups made later without a timeout (DeepSpeed's copy of the world group, ...) take torch's default
        c10d = importlib.import_module("torch.distributed.distributed_c10d")
        c10d.default_pg_timeout = c10d.default_pg_nccl_timeout = timeout["timeout"]
    deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo", auto_mpi_discovery=False, verbose=False, **timeout)
    dp_rank, dp_size = rank, world_size
    if megatron or (megatron is None and parallel.tp * parallel.sp > 1):
        from megatron.core import parallel_state

        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=parallel.tp, context_parallel_size=parallel.sp, create_gloo_process_groups=False,
            **({} if timeout_s is None else {"distributed_timeout_minutes": max(1, math.ceil(timeout_s / 60))}),
        )
        dp_rank, dp_size = parallel_state.get_data_parallel_rank(), parallel_state.get_data_parallel_world_size()
    return World(rank=rank, local_rank=local_rank, world_size=world_size, dp_rank=dp_rank, dp_size=dp_size,
                 device=torch.device("cuda", local_rank) if cuda else torch.device("cpu"))


def megatron_groups() -> "MegatronGroups | None":
    """DeepSpeed's ``mpu``: megatron-core's groups when they were built, else None (DeepSpeed's own)."""
    parallel_state = sys.modules.get("megatron.core.parallel_state")
    if parallel_state is None or not parallel_state.model_parallel_is_initialized():
        return None
    return MegatronGroups()


def gradient_group():
    """The ranks whose gradients are averaged (data x sequence parallel); None = every rank."""
    groups = megatron_groups()
    return None if groups is None else groups.get_data_parallel_group()


def shutdown() -> None:
    """Leave the process groups (without it, gloo runs sometimes abort at exit)."""
    if dist.is_available() and dist.is_initialized():
        if megatron_groups() is not None:
            sys.modules["megatron.core.parallel_state"].destroy_model_parallel()
        dist.destroy_process_group()


class MegatronGroups:
    """megatron-core's parallel_state under the names DeepSpeed asks its ``mpu`` for.

    DeepSpeed's data-parallel group is megatron's data x context-parallel group: the sequence-parallel ranks of
    one sample hold whole replicas of the weights and their gradients are averaged with the data-parallel
    ones (as Megatron does). Pipeline parallelism is 1, so the model-parallel group is the tensor-parallel one.
    """

    def __init__(self):
        from megatron.core import parallel_state

        self.ps = parallel_state

    def get_tensor_model_parallel_rank(self):
        return self.ps.get_tensor_model_parallel_rank()

    def get_tensor_model_parallel_world_size(self):
        return self.ps.get_tensor_model_parallel_world_size()

    def get_tensor_model_parallel_group(self):
        return self.ps.get_tensor_model_parallel_group()

    get_model_parallel_rank = get_tensor_model_parallel_rank
    get_model_parallel_world_size = get_tensor_model_parallel_world_size
    get_model_parallel_group = get_tensor_model_parallel_group

    def get_tensor_model_parallel_src_rank(self):
        return self.ps.get_tensor_model_parallel_src_rank()

    def get_pipeline_model_parallel_group(self):
        return self.ps.get_pipeline_model_parallel_group()

    def get_pipeline_model_parallel_world_size(self):
        return self.ps.get_pipeline_model_parallel_world_size()

    def get_data_parallel_group(self):
        return self.ps.get_data_parallel_group(with_context_parallel=True)

    def get_data_parallel_rank(self):
        return self.ps.get_data_parallel_rank(with_context_parallel=True)

    def get_data_parallel_world_size(self):
        return self.ps.get_data_parallel_world_size(with_context_parallel=True)
