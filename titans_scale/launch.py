"""Start a training run: ``python -m titans_scale.launch recipe=NAME [key=value ...]``.

One process by default; ``nproc=N`` starts N workers on this machine (torch's elastic launcher, the engine
behind torchrun: gloo on CPU, nccl on GPU). Under torchrun, the deepspeed launcher or srun (seen from their
environment variables) every process is already a worker and trains directly. A mistake in the recipe or
the command line stops the run before training with one line on stderr and exit code 2.
"""

from __future__ import annotations

import os
import sys
import uuid

USAGE = """usage: python -m titans_scale.launch recipe=NAME [key=value ...]

  recipe=NAME          a YAML file in recipes/ (default: tiny) or a path to one
  key=value            override any field, e.g. train.steps=200 model.dim=256 data.seq_len=512
  nproc=N              N processes on this machine (under torchrun / deepspeed / srun: one per task)
  resume=auto|never|PATH   continue from the newest complete checkpoint in run_dir (auto), start over, or
                       start from a given checkpoint
  dry_run=true         resolve, check and print the plan without training

See docs/training.md for every field."""

USER_ERROR = 2


def worker_count(cfg) -> tuple[int, bool]:
    """(world size, whether an external launcher started this process)."""
    from titans_scale.train.distributed import launcher_env

    env = launcher_env()
    return (int(env["WORLD_SIZE"]), True) if env else (cfg.nproc, False)


def memory_backend(cfg) -> str:
    """How the memory's chunk loop will run on this machine, for the plan; a backend that cannot run here
    (memory.backend=triton without a GPU) is refused before any worker starts."""
    import torch

    from titans_scale.config import ConfigError
    from titans_scale.memory.layer import resolve_backend

    if cfg.model.variant in ("transformer", "swa"):
        return "no memory"
    device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        backend, reason = resolve_backend(cfg.model.memory, cfg.model.dim // cfg.model.n_heads, device)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    return f"memory backend {backend} on {device}" + (f" (not triton: {reason})" if reason else "")


def dry_run(cfg, world_size: int) -> None:
    """Print the resolved recipe and what the run would do; build and check the data."""
    from omegaconf import OmegaConf

    from titans_scale.models import model_stats
    from titans_scale.train.engine import check_data, make_plan
    from titans_scale.train.metrics import human

    plan = make_plan(cfg, world_size)
    check_data(cfg, build=True)
    params, flops = model_stats(cfg.model, plan.seq_len)
    print(OmegaConf.to_yaml(OmegaConf.structured(cfg)).rstrip())
    print(f"[plan] {cfg.model.variant}: {human(params)} parameters, {human(3 * flops)} FLOPs per token (fwd+bwd) | "
          f"{memory_backend(cfg)} | {plan.describe()}")
    from titans_scale.submit import estimate_line

    print(estimate_line(cfg, plan))  # GPU-hours at 40% MFU of an H100 (train.peak_flops for another GPU)


def spawn_workers(argv: list[str], nproc: int) -> int:
    """Run ``python -m titans_scale.launch argv`` as ``nproc`` workers under torch's elastic agent."""
    import logging

    from torch.distributed.elastic.multiprocessing.api import DefaultLogsSpecs, SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    from titans_scale.train.requeue import REQUEUE_SIGNALS, STOP_SIGNALS, exit_code

    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)  # failures are reported below
    if "OMP_NUM_THREADS" not in os.environ:  # share the cores instead of oversubscribing them
        os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // nproc))
    config = LaunchConfig(
        min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=str(uuid.uuid4()), rdzv_backend="c10d",
        rdzv_endpoint="127.0.0.1:0", max_restarts=0, monitor_interval=0.1, start_method="spawn",
        logs_specs=DefaultLogsSpecs(log_dir=os.devnull),  # workers write to our stdout; no log dirs in /tmp
    )
    try:
        elastic_launch(config, entrypoint=sys.executable)("-m", "titans_scale.launch", *argv)
    except SignalException:  # Ctrl-C or a scheduler's TERM: the agent has stopped the workers
        raise KeyboardInterrupt from None
    except ChildFailedError as e:
        codes = {failure.exitcode for failure in e.failures.values()}
        if len(codes) == 1 and codes <= {USER_ERROR} | {exit_code(s) for s in REQUEUE_SIGNALS + STOP_SIGNALS}:
            return codes.pop()  # a user error or a signal stop: rank 0 has said why
        rank, failure = min(e.failures.items())
        print(f"error: worker rank {rank} exited with code {failure.exitcode} (its output is above)", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if any(a in ("-h", "--help", "help") for a in argv):
        print(USAGE)
        return 0
    from titans_scale.config import ConfigError, resolve

    rank = int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")))
    try:
        cfg = resolve(argv)
        world_size, external = worker_count(cfg)
        from titans_scale.train.rundir import RunLock, check_run_dir

        if cfg.dry_run:
            if rank == 0:
                check_run_dir(cfg.run_dir)
                dry_run(cfg, world_size)
            return 0
        lock = RunLock(cfg.run_dir)
        if not external:
            note = lock.acquire()  # the workers inherit it; under torchrun / srun rank 0 takes it in train()
            if note:
                print(note, flush=True)
        try:
            if not external:
                from titans_scale.train.engine import make_plan

                make_plan(cfg, world_size)  # batch arithmetic and the checkpoint, before any worker starts
                memory_backend(cfg)
            if not external and world_size > 1:
                return spawn_workers(argv, world_size)
            from titans_scale.train.engine import train
            from titans_scale.train.requeue import exit_code

            return exit_code(train(cfg)["stopped"])  # 128 + the signal when a job's end stopped the run
        finally:
            lock.release()
    except ConfigError as e:
        if rank == 0:
            print(f"error: {e}", file=sys.stderr, flush=True)
        return USER_ERROR
    except Exception as e:
        from titans_scale.train.faults import RUN_FAILED, TrainingError

        if not isinstance(e, TrainingError):
            raise
        if rank == 0 or not e.everywhere:
            print(f"error: {e}", file=sys.stderr, flush=True)
        return RUN_FAILED
    except KeyboardInterrupt:
        print("interrupted; resume=auto continues from the last complete checkpoint", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
