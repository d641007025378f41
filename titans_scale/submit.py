"""Submit a training run to a Slurm cluster through submitit, or try it on this machine:

    python -m titans_scale.submit recipe=NAME nodes=N gpus_per_node=G partition=P [time=24:00:00 account=A]
                                  [key=value recipe overrides ...]
    python -m titans_scale.submit recipe=tiny cluster=local        # 2 tasks on this machine (gloo on CPU)

Everything is checked before anything is queued (the recipe and its overrides, the batch arithmetic at
this world size, the prepared data): a mistake is one line on stderr and exit code 2. ``dry_run=true``
prints the plan and an estimate of the GPU-hours instead of submitting.

The job runs one task per GPU; each task calls the training engine in-process (``TrainJob``). When
Slurm announces the end of the job (submitit's USR2, ``slurm_signal_delay_s`` before the time limit) the
ranks finish the current step and save a checkpoint together, then submitit requeues the job through
``TrainJob.checkpoint`` and the rerun continues from that checkpoint (``resume=auto``, same run_dir).
"""

from __future__ import annotations

import difflib
import os
import re
import shutil
import sys
import time
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Optional

from submitit.helpers import Checkpointable, DelayedSubmission, TorchDistributedEnvironment

if TYPE_CHECKING:
    from titans_scale.config import RunConfig
    from titans_scale.train.engine import Plan

USAGE = """usage: python -m titans_scale.submit recipe=NAME [submit keys] [key=value recipe overrides]

submit keys (everything else is a recipe override, as for titans_scale.launch):
  cluster=slurm|local    slurm (default): sbatch through submitit; local: this machine, one node
  nodes=N                nodes (default 1)
  gpus_per_node=G        GPUs per node, one task each (default 8; cluster=local on CPU: 0)
  tasks_per_node=T       tasks per node when it differs from gpus_per_node (default: gpus_per_node, or 2
                         on CPU)
  cpus_per_task=C        CPU cores per task (default 8; cluster=local: cores / tasks)
  partition=P account=A qos=Q constraint=C     Slurm's --partition, --account, --qos, --constraint
  time=T                 time limit per run: minutes, HH:MM:SS or D-HH:MM:SS (default 24:00:00); the job
                         requeues itself until the run is done
  signal_delay_s=S       warn the ranks S seconds before the time limit (default 180)
  max_requeues=K         give up after K time-outs (default 50)
  name=NAME              job name (default: the recipe's name)
  folder=DIR             submitit's logs and job files (default logs/submitit)
  mfu=F                  model FLOPs utilisation assumed by the dry-run estimate (default 0.4)
  wait=true|false        follow the log until the job ends (default: true for cluster=local)
  dry_run=true           check and print the plan and the GPU-hour estimate; submit nothing

See docs/cluster.md."""

USER_ERROR = 2


@dataclass
class SubmitConfig:
    """Where and how to run: the Slurm side of a submission (the run itself is a RunConfig)."""

    cluster: str = "slurm"  # slurm | local
    nodes: int = 1
    gpus_per_node: Optional[int] = None  # None: 8 on slurm, 0 on local
    tasks_per_node: Optional[int] = None  # None: one per GPU, or 2 without GPUs
    cpus_per_task: Optional[int] = None  # None: 8 on slurm, cores / tasks on local
    partition: Optional[str] = None
    account: Optional[str] = None
    qos: Optional[str] = None
    constraint: Optional[str] = None
    time: str = "24:00:00"
    signal_delay_s: int = 180
    max_requeues: int = 50
    name: Optional[str] = None
    folder: str = "logs/submitit"
    mfu: float = 0.4
    wait: Optional[bool] = None  # None: wait on local only

    @property
    def local(self) -> bool:
        return self.cluster == "local"


SUBMIT_KEYS = tuple(f.name for f in fields(SubmitConfig))


def parse_time(text: str) -> int:
    """Slurm's time formats (M, M:S, H:M:S, D-H, D-H:M, D-H:M:S) in whole minutes."""
    m = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", text.strip())
    if not m:
        raise ValueError(f"time={text!r} is not a Slurm time; use minutes, HH:MM:SS or D-HH:MM:SS (e.g. time=24:00:00)")
    days, a, b, c = m.groups()
    if days is not None:  # D-H, D-H:M, D-H:M:S
        hours, minutes, seconds = int(a), int(b or 0), int(c or 0)
    elif c is not None:  # H:M:S
        hours, minutes, seconds = int(a), int(b), int(c)
    elif b is not None:  # M:S
        hours, minutes, seconds = 0, int(a), int(b)
    else:  # M
        hours, minutes, seconds = 0, int(a), 0
    total = (int(days or 0) * 24 + hours) * 60 + minutes + (seconds + 59) // 60
    if total < 1:
        raise ValueError(f"time={text!r} must be at least one minute")
    return total


def split_args(argv: list[str]) -> tuple[dict[str, str], list[str]]:
    """(submit keys, recipe overrides) from ``key=value`` arguments. A key that is neither, but close to a
    submit key, is refused here; anything else is left for the recipe resolver to judge."""
    from titans_scale.config import ConfigError, RunConfig, parse_overrides

    parse_overrides(argv)  # every argument is key=value
    run_keys = {f.name for f in fields(RunConfig)}
    submit, overrides = {}, []
    for arg in argv:
        key, value = arg.split("=", 1)
        if key in SUBMIT_KEYS:
            submit[key] = value
            continue
        top = key.split(".", 1)[0]
        close = difflib.get_close_matches(top, SUBMIT_KEYS, n=1, cutoff=0.75)
        if top not in run_keys and close and not difflib.get_close_matches(top, run_keys, n=1, cutoff=0.75):
            raise ConfigError(f"unknown key {key!r} (did you mean {close[0]}?); see python -m titans_scale.submit --help")
        overrides.append(arg)
    return submit, overrides


def submit_config(values: dict[str, str]) -> SubmitConfig:
    """The typed submit keys, with the defaults that depend on the cluster filled in; one-line errors."""
    from titans_scale.config import ConfigError, to_dataclass

    sc: SubmitConfig = to_dataclass(SubmitConfig, values)
    if sc.cluster not in ("slurm", "local"):
        raise ConfigError(f"cluster={sc.cluster!r} is not allowed; choose slurm (sbatch through submitit) or local")
    if sc.gpus_per_node is None:
        sc.gpus_per_node = 0 if sc.local else 8
    if sc.tasks_per_node is None:
        sc.tasks_per_node = sc.gpus_per_node or 2
    if sc.cpus_per_task is None:
        sc.cpus_per_task = max(1, (os.cpu_count() or 1) // sc.tasks_per_node) if sc.local else 8
    for key in ("nodes", "tasks_per_node", "cpus_per_task", "max_requeues"):
        if getattr(sc, key) < 1:
            raise ConfigError(f"{key}={getattr(sc, key)} must be >= 1")
    if sc.gpus_per_node < 0 or sc.signal_delay_s < 0:
        raise ConfigError("gpus_per_node and signal_delay_s must be >= 0")
    if sc.gpus_per_node and sc.tasks_per_node != sc.gpus_per_node:
        raise ConfigError(f"tasks_per_node={sc.tasks_per_node} must equal gpus_per_node={sc.gpus_per_node} "
                          f"(one task per GPU)")
    if sc.local and sc.nodes != 1:
        raise ConfigError(f"nodes={sc.nodes}: cluster=local runs on this machine only; use nodes=1")
    if not 0 < sc.mfu <= 1:
        raise ConfigError(f"mfu={sc.mfu} must be in (0, 1], e.g. mfu=0.4")
    try:
        parse_time(sc.time)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    return sc


def default_run_dir(name: str) -> str:
    """A new run directory per submission; a requeue reruns the same job and so the same directory."""
    return str(Path("runs") / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}")


@dataclass
class Submission:
    """A checked submission: where (``sc``), what (``cfg`` and the arguments that give it), its plan."""

    sc: SubmitConfig
    cfg: RunConfig
    args: list[str]  # recipe=... run_dir=... overrides: what every task resolves again
    plan: Plan


def plan_submission(argv: list[str]) -> Submission:
    """Check everything a submission needs, before anything is queued; raises ConfigError (one line)."""
    from titans_scale.config import ConfigError, resolve
    from titans_scale.train.engine import make_plan

    values, overrides = split_args(argv)
    sc = submit_config(values)
    recipe = next((a.split("=", 1)[1] for a in overrides if a.startswith("recipe=")), "tiny")
    sc.name = sc.name or Path(recipe).stem
    has_run_dir = any(a.startswith("run_dir=") for a in overrides)
    args = [f"recipe={recipe}"] + ([] if has_run_dir else [f"run_dir={default_run_dir(sc.name)}"])
    args += [a for a in overrides if not a.startswith("recipe=")]
    cfg = resolve(args)
    world_size = sc.nodes * sc.tasks_per_node
    check_world(cfg, sc, world_size)
    plan = make_plan(cfg, world_size)  # batch arithmetic at this world size, and the checkpoint to resume
    if not sc.local and not cfg.dry_run and shutil.which("sbatch") is None:
        raise ConfigError("sbatch not found: submit from a Slurm login node, or use cluster=local to run on this machine")
    return Submission(sc, cfg, args, plan)


def check_world(cfg: RunConfig, sc: SubmitConfig, world_size: int) -> None:
    """The global batch splits evenly over this many ranks in micro-batches; otherwise say which node
    counts work (ConfigError)."""
    from titans_scale.config import ConfigError

    t, seq_len, model_parallel = cfg.train, cfg.data.seq_len, cfg.parallel.tp * cfg.parallel.sp

    def fits(ranks: int) -> bool:
        dp = ranks // model_parallel
        return ranks % model_parallel == 0 and t.global_batch_tokens % (t.micro_batch * seq_len * dp) == 0

    if fits(world_size) or t.global_batch_tokens % seq_len:
        return  # fine, or a recipe mismatch that make_plan explains
    good = [str(n) for n in range(1, 1025) if fits(n * sc.tasks_per_node)][:8]
    hint = f"use nodes={' or '.join([', '.join(good[:-1]), good[-1]] if len(good) > 1 else good)}" if good else \
        "no node count works"
    model_parallel_note = f" with parallel.tp x parallel.sp = {model_parallel}" if model_parallel > 1 else ""
    raise ConfigError(
        f"nodes={sc.nodes} x {sc.tasks_per_node} tasks = {world_size} ranks cannot share the global batch of "
        f"{t.global_batch_tokens // seq_len} sequences (train.global_batch_tokens / data.seq_len) in micro-batches "
        f"of train.micro_batch={t.micro_batch}{model_parallel_note}; {hint}, or change train.micro_batch or gpus_per_node"
    )


def check_prepared_data(sub: Submission) -> None:
    """Named shards and tokenizer exist and match (ConfigError otherwise). Remote shards are checked by the
    job once fetched; the bundled sample (no data_dir) is built by the job on first use."""
    from titans_scale.train.engine import check_data

    if sub.cfg.data.data_dir and not sub.cfg.data.remote:
        check_data(sub.cfg, build=False)


# ----------------------------------------------------------------------------------------------------
# The plan, and what it will cost


def estimate(cfg: RunConfig, plan: Plan, mfu: float, peak_flops: float | None = None) -> tuple[float, float, float]:
    """(training FLOPs per token, total FLOPs, GPU-hours) of a run at ``mfu`` of ``peak_flops`` per GPU
    (default: ``train.peak_flops``, else an H100's dense bf16 989 TFLOP/s). Training = 3 x forward."""
    from titans_scale.tasks import get_task
    from titans_scale.train.metrics import GPU_PEAK_FLOPS

    _, forward = get_task(cfg.task).stats(cfg)  # per token of plan.seq_len (the task's own count for others)
    per_token = 3 * forward
    total = per_token * plan.total_steps * plan.tokens_per_step
    peak = peak_flops or cfg.train.peak_flops or GPU_PEAK_FLOPS
    return per_token, total, total / (mfu * peak) / 3600


def estimate_line(cfg: RunConfig, plan: Plan, mfu: float = 0.4, time_limit: str | None = None) -> str:
    """'[plan] estimate: ... GPU-hours at 40% MFU ...' for a dry run (launch's and submit's)."""
    from titans_scale.train.metrics import GPU_PEAK_FLOPS

    _, total, gpu_hours = estimate(cfg, plan, mfu)
    peak = cfg.train.peak_flops or GPU_PEAK_FLOPS
    hours = gpu_hours / plan.world_size
    runs = f" ({-(-hours * 60 // parse_time(time_limit)):.0f} run(s) of time={time_limit})" if time_limit else ""
    return (f"[plan] estimate: {total:.2e} FLOPs = {gpu_hours:,.0f} GPU-hours at {100 * mfu:.0f}% MFU of "
            f"{peak / 1e12:,.0f} TFLOP/s per GPU = {hours:,.1f} h on {plan.world_size} GPUs{runs}")


def plan_lines(sub: Submission) -> list[str]:
    """What the run is and what it will cost, a few lines for a human."""
    from titans_scale.tasks import get_task, model_name
    from titans_scale.train.metrics import human

    cfg, plan, sc = sub.cfg, sub.plan, sub.sc
    params, forward = get_task(cfg.task).stats(cfg)
    gpus = f" ({sc.gpus_per_node} GPUs each)" if sc.gpus_per_node else ""
    where = f"{sc.nodes} node(s) x {sc.tasks_per_node} task(s){gpus}"
    lines = [
        f"[plan] {cfg.recipe}: {model_name(cfg)} model, {human(params)} parameters, {human(3 * forward)} FLOPs per "
        f"token (training = 3 x forward) at seq_len {plan.seq_len}",
        f"[plan] {where} | {plan.describe()} | {human(plan.total_steps * plan.tokens_per_step)} tokens",
    ]
    if sc.gpus_per_node or cfg.train.peak_flops:  # (no estimate for a CPU trial)
        lines.append(estimate_line(cfg, plan, sc.mfu, sc.time))
    return lines + [f"[plan] run_dir {cfg.run_dir} | resume={cfg.resume}"]


# ----------------------------------------------------------------------------------------------------
# The job


class TrainJob(Checkpointable):
    """One task of a training job, as submitit runs it: joins the world that submitit describes and runs
    the training engine in this process.

    ``checkpoint()`` is what submitit calls on rank 0 when the job must end: by then the ranks have saved a
    checkpoint together (the engine's RequeueHandler held the signal until the end of the step), so the
    resumed job is this job again, with resume=auto in the same run_dir."""

    def __init__(self, args: list[str], threads: int = 0):
        self.args = list(args)
        self.threads = threads

    def __call__(self) -> dict:
        from titans_scale.config import resolve
        from titans_scale.train.requeue import exit_code

        TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)
        for key, value in (("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1"), ("CUDA_DEVICE_MAX_CONNECTIONS", "1")):
            os.environ.setdefault(key, value)
        if self.threads:
            import torch

            torch.set_num_threads(self.threads)
        from titans_scale.train.engine import train

        result = train(resolve(self.args))
        if result.get("stopped"):  # rank 0 has had submitit requeue the job (or Slurm decides, on SIGTERM)
            sys.exit(exit_code(result["stopped"]))
        return result

    def checkpoint(self, *args, **kwargs) -> DelayedSubmission:
        return DelayedSubmission(TrainJob(self.args + ["resume=auto"], self.threads))


def executor_for(sc: SubmitConfig):
    """A submitit executor with the job's resources, time limit, signal and requeue settings."""
    import submitit

    executor = submitit.AutoExecutor(folder=sc.folder, cluster="local" if sc.local else "slurm",
                                     slurm_max_num_timeout=sc.max_requeues)
    params = dict(name=sc.name, nodes=sc.nodes, tasks_per_node=sc.tasks_per_node, cpus_per_task=sc.cpus_per_task,
                  timeout_min=parse_time(sc.time), stderr_to_stdout=True)
    if sc.gpus_per_node:
        params["gpus_per_node"] = sc.gpus_per_node
    if not sc.local:  # (the local executor warns 30 s before its time limit)
        params.update(slurm_signal_delay_s=sc.signal_delay_s, slurm_additional_parameters={"requeue": True})
        for key in ("partition", "account", "qos", "constraint"):
            if getattr(sc, key):
                params[f"slurm_{key}"] = getattr(sc, key)
    executor.update_parameters(**params)
    return executor


def submit(sub: Submission):
    """Queue the job; returns submitit's job handle."""
    threads = sub.sc.cpus_per_task if sub.sc.local else 0
    return executor_for(sub.sc).submit(TrainJob(sub.args, threads))


def follow(job, poll_s: float = 1.0) -> int:
    """Print the new lines of task 0's log until the job ends; 0 when every task succeeded, else 1."""
    seen = 0
    while True:
        done = job.done()
        text = job.task(0).stdout() or ""
        if len(text) > seen:
            print(text[seen:], end="", flush=True)
            seen = len(text)
        if done:
            break
        time.sleep(poll_s)
    try:
        job.results()
        return 0
    except Exception as e:  # submitit re-raises a task's failure
        lines = str(e).strip().splitlines()
        print(f"error: job {job.job_id} failed: {lines[-1] if lines else type(e).__name__} (logs in {job.paths.folder})",
              file=sys.stderr)
        return 1


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if any(a in ("-h", "--help", "help") for a in argv):
        print(USAGE)
        return 0
    if "--version" in argv:
        from titans_scale import version_text

        print(version_text())
        return 0
    from titans_scale.config import ConfigError, config_text, open_keys

    try:
        sub = plan_submission(argv)
        left_open = open_keys(sub.args) if sub.cfg.dry_run else []
        if sub.cfg.dry_run:  # the plan first: it is worth seeing even before the data is ready
            print(config_text(sub.cfg))
            print("\n".join(plan_lines(sub)), flush=True)
        if left_open:
            print(f"[data] not checked: {', '.join(left_open)} left open (the plan and the estimate need only the recipe)")
        else:
            check_prepared_data(sub)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return USER_ERROR
    if sub.cfg.dry_run:
        return 0
    print("\n".join(plan_lines(sub)), flush=True)
    job = submit(sub)
    where = "this machine" if sub.sc.local else "Slurm"
    print(f"[submit] job {job.job_id} ({sub.sc.name}) queued on {where}; logs in {sub.sc.folder}, "
          f"checkpoints in {sub.cfg.run_dir}", flush=True)
    wait = sub.sc.local if sub.sc.wait is None else sub.sc.wait
    return follow(job) if wait else 0


if __name__ == "__main__":
    sys.exit(main())
