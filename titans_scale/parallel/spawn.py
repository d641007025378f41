"""Run a function on N local gloo processes (tests, benchmarks, small experiments on one machine)."""

from __future__ import annotations

import os
import pickle
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _entry(rank: int, fn, world_size: int, port: int, out_dir: str, args: tuple) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))  # the ranks share this machine's cores
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        result = fn(rank, world_size, *args)
        dist.barrier()
    finally:
        try:
            from megatron.core import parallel_state

            parallel_state.destroy_model_parallel()
        except ImportError:
            pass
        dist.destroy_process_group()
    path = Path(out_dir) / f"rank{rank}.pkl"
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(pickle.dumps(result))
    os.replace(tmp, path)


def spawn(fn, world_size: int, *args) -> list:
    """``fn(rank, world_size, *args)`` on ``world_size`` processes joined by gloo; returns each rank's
    result. ``fn`` must be importable (a module-level function); an exception in any rank is raised here."""
    from titans_scale.train.distributed import free_port

    with tempfile.TemporaryDirectory() as out_dir:
        mp.spawn(_entry, args=(fn, world_size, free_port(), out_dir, args), nprocs=world_size, join=True)
        return [pickle.loads((Path(out_dir) / f"rank{r}.pkl").read_bytes()) for r in range(world_size)]
