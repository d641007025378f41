"""Start a training run: ``python -m titans_scale.launch recipe=NAME [key=value ...]``.

One process by default; ``nproc=N`` starts N workers on this machine (``train/workers.py``: gloo on CPU,
nccl on GPU; they end together and never outlive the launcher). Under torchrun, the deepspeed launcher or srun
(seen from their environment variables) every process is already a worker and trains directly.

Exit codes: 0 done; 2 a mistake in the recipe or the command line, refused before training in one line; 3 the
run stopped on a failure it reported in one line (a non-finite loss, a full disk, a damaged checkpoint, a
collective timeout); 1 a worker died without saying why (the launcher names it); 128 + N stopped on signal N
after saving a checkpoint (SIGTERM: 143); 130 interrupted (Ctrl-C).
"""

from __future__ import annotations

import os
import sys

USAGE = """usage: python -m titans_scale.launch recipe=NAME [key=value ...]

  recipe=NAME          a YAML file in recipes/ (default: tiny) or a path to one
  key=value            override any field, e.g. train.steps=200 model.dim=256 data.seq_len=512
  nproc=N              N processes on this machine (under torchrun / deepspeed / srun: one per task)
  resume=auto|never|PATH   continue from the newest complete checkpoint in run_dir (auto), start over, or
                       start from a given checkpoint
  --version            which titans_scale runs (version and path)
  dry_run=true         resolve, check and print the plan and its cost without training (the data may be
                       left open: a paper recipe's estimate needs no data)

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
    from titans_scale.tasks import model_name

    if cfg.model.variant in ("transformer", "swa") or model_name(cfg).endswith("dlinear"):
        return "no memory"
    device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        backend, reason = resolve_backend(cfg.model.memory, cfg.model.dim // cfg.model.n_heads, device)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    return f"memory backend {backend} on {device}" + (f" (not triton: {reason})" if reason else "")


def named_tokenizer(cfg) -> None:
    """A data.tokenizer that does not exist is refused before any worker starts (not trained there)."""
    from titans_scale.config import ConfigError
    from titans_scale.data.config import check_named_tokenizer
    from titans_scale.data.errors import DataError

    try:
        check_named_tokenizer(cfg.data)
    except DataError as e:
        raise ConfigError(str(e)) from None


def dry_run(cfg, world_size: int, left_open: list[str] = ()) -> None:
    """Print the plan and what the run would cost; check the data (building the bundled sample when it is
    the default), unless the recipe's data is left open: the plan and estimate need only the recipe."""
    from titans_scale.tasks import get_task, model_name
    from titans_scale.train.engine import check_data, make_plan
    from titans_scale.train.metrics import human

    plan = make_plan(cfg, world_size)
    if left_open:
        print(f"[data] not checked: {', '.join(left_open)} left open (the plan and the estimate need only the recipe)")
    else:
        check_data(cfg, build=True)
    params, flops = get_task(cfg.task).stats(cfg)
    print(f"[plan] {model_name(cfg)}: {human(params)} parameters, {human(3 * flops)} FLOPs per token (fwd+bwd) | "
          f"{memory_backend(cfg)} | {plan.describe()}")
    from titans_scale.submit import estimate_line

    print(estimate_line(cfg, plan))  # GPU-hours at 40% MFU of an H100 (train.peak_flops for another GPU)


def spawn_workers(argv: list[str], nproc: int, run_dir: str) -> int:
    """Run ``python -m titans_scale.launch argv`` as ``nproc`` local workers (train/workers.py): they end
    together; a worker that dies without saying why is named here."""
    from titans_scale.train.faults import RUN_FAILED
    from titans_scale.train.requeue import REQUEUE_SIGNALS, STOP_SIGNALS, exit_code
    from titans_scale.train.workers import exit_description, run_workers

    if "OMP_NUM_THREADS" not in os.environ:  # share the cores instead of oversubscribing them
        os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // nproc))
    reported = {USER_ERROR, RUN_FAILED} | {exit_code(s) for s in REQUEUE_SIGNALS + STOP_SIGNALS}
    outcome = run_workers(argv, nproc, reported)
    if outcome.interrupted:
        raise KeyboardInterrupt
    if outcome.failed_rank is not None and outcome.failed_code not in reported:
        print(f"error: worker rank {outcome.failed_rank} {exit_description(outcome.failed_code)} (its output, if any, is "
              f"above); the other workers were stopped; resume=auto continues from the last complete checkpoint in "
              f"{run_dir}", file=sys.stderr, flush=True)
    return outcome.code


def failure_line(err: Exception, cfg, rank: int) -> str | None:
    """The one line a run-time failure prints ("" when another rank prints it), None for a bug (traceback)."""
    from titans_scale.train.faults import DISK_FULL, TrainingError, collective_failure, write_failure

    if isinstance(err, TrainingError):
        return str(err) if rank == 0 or not err.everywhere else ""
    if isinstance(err, OSError) and err.errno in DISK_FULL:
        return write_failure(err, err.filename or ".")
    if isinstance(err, RuntimeError) and cfg is not None:
        return collective_failure(err, cfg.train.collective_timeout_s, rank)
    return None


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if any(a in ("-h", "--help", "help") for a in argv):
        print(USAGE)
        return 0
    if "--version" in argv:
        from titans_scale import version_text

        print(version_text())
        return 0
    from titans_scale.config import ConfigError, config_text, open_keys, resolve

    from titans_scale.train.workers import die_with_parent

    die_with_parent()  # a worker of our own launcher: never outlive it
    rank = int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")))
    cfg = None
    try:
        cfg = resolve(argv)
        world_size, external = worker_count(cfg)
        from titans_scale.train.rundir import RunLock, check_run_dir

        if cfg.dry_run:
            if rank == 0:
                print(config_text(cfg), flush=True)
                check_run_dir(cfg.run_dir)
                dry_run(cfg, world_size, open_keys(argv))
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
                named_tokenizer(cfg)
            if not external and world_size > 1:
                return spawn_workers(argv, world_size, cfg.run_dir)
            from titans_scale.train.engine import train
            from titans_scale.train.requeue import exit_code

            return exit_code(train(cfg)["stopped"])  # 128 + the signal when a job's end stopped the run
        finally:
            lock.release()
    except ConfigError as e:
        if rank == 0 and not getattr(e, "reported", False):  # train() reports its own
            print(f"error: {e}", file=sys.stderr, flush=True)
        return USER_ERROR
    except Exception as e:
        from titans_scale.train.faults import RUN_FAILED

        line = failure_line(e, cfg, rank)
        if line is None:
            raise
        if line:
            print(f"error: {line}", file=sys.stderr, flush=True)
        return RUN_FAILED
    except KeyboardInterrupt:
        print("interrupted; resume=auto continues from the last complete checkpoint", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
