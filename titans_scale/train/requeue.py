"""Stopping a run cleanly when its Slurm job must end, and having the job requeued to continue.

Slurm announces the end of a job with a signal: the pre-timeout signal of ``--signal=B:USR1@SECONDS``
(our sbatch scripts forward it from the batch shell to every rank; submitit sends USR2 to every task),
or SIGTERM when the job is preempted, cancelled or out of time (SIGKILL follows after KillWait).
``RequeueHandler`` turns these signals into a flag that the training loop reads between optimizer
steps: the ranks agree on it with one all-reduce per step, so every rank stops after the same step and
they write one checkpoint together. Then, on rank 0, ``requeue()`` has the job run again; the rerun's
``resume=auto`` continues from that checkpoint in the same run directory.

- USR1 / USR2 (time is running out): checkpoint, then requeue: through the handler that held the
  signal before us when there is one (submitit's, which calls the job's ``checkpoint()`` and requeues
  it); under our sbatch scripts (``TITANS_REQUEUE_BY=batch``) the batch shell requeues the job once every
  rank has exited (so that no rank is killed half-way through its exit); else ``scontrol requeue``.
- SIGTERM (preemption, ``scancel``, the time limit): checkpoint and stop; whether the job runs again is
  Slurm's decision (a preempted job submitted with ``--requeue`` under PreemptMode=REQUEUE is requeued
  by Slurm; a cancelled one stays cancelled).

Signal handlers only record the signal (no I/O inside a handler). Processes forked after the handlers
are installed (data-loader workers) inherit them, so a signal sent to the whole job step does not kill
them under the loop's feet.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
from typing import Callable

REQUEUE_SIGNALS = (signal.SIGUSR1, signal.SIGUSR2)
STOP_SIGNALS = (signal.SIGTERM,)
SCONTROL_TIMEOUT_S = 60
REQUEUE_BY_ENV = "TITANS_REQUEUE_BY"  # "batch": slurm/_launch.sh requeues after the ranks exit


def slurm_job_id(environ=None) -> str | None:
    """The id ``scontrol requeue`` takes for this job (array tasks as ``ARRAYID_TASKID``), or None."""
    env = os.environ if environ is None else environ
    if env.get("SLURM_ARRAY_JOB_ID") and env.get("SLURM_ARRAY_TASK_ID"):
        return f"{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}"
    return env.get("SLURM_JOB_ID") or None


def signal_name(signum: int) -> str:
    return signal.Signals(signum).name


class RequeueHandler:
    """Catches the end-of-job signals; ``agree()`` between steps says whether to stop, ``requeue()`` after
    the checkpoint has the job run again. A context manager: leaving it restores the previous handlers
    (unless the run stopped).

    >>> with RequeueHandler() as requeue:
    ...     while step < total:
    ...         train_one_step()
    ...         if requeue.agree(device):   # a collective: every rank, every step
    ...             save_checkpoint(); break
    ...     if requeue.stopped and rank == 0:
    ...         print(requeue.requeue())
    """

    def __init__(self, signals: tuple[int, ...] = REQUEUE_SIGNALS + STOP_SIGNALS):
        self.signals = tuple(signals)
        self.caught: int | None = None  # the first signal this process caught
        self.stopped: int | None = None  # the signal the ranks agreed to stop on (requeue signals win)
        self._previous: dict[int, Callable | int | None] = {}
        if threading.current_thread() is threading.main_thread():  # Python only installs handlers there
            start_resource_tracker_deaf_to(REQUEUE_SIGNALS)
            for signum in self.signals:
                self._previous[signum] = signal.signal(signum, self._catch)

    def _catch(self, signum: int, frame) -> None:
        if self.caught is None or (signum in REQUEUE_SIGNALS and self.caught not in REQUEUE_SIGNALS):
            self.caught = signum

    @property
    def requested(self) -> bool:
        """Whether this process caught an end-of-job signal (local; ``agree`` makes it global)."""
        return self.caught is not None

    def agree(self, device=None, group=None) -> bool:
        """True on every rank when any rank caught a signal; a collective that every rank calls at the same
        point of every step (one all-reduce of two numbers). Without a process group it is ``requested``."""
        import torch
        import torch.distributed as dist

        mine = [float(self.caught in REQUEUE_SIGNALS), float(self.caught in STOP_SIGNALS)]
        if dist.is_available() and dist.is_initialized():
            flags = torch.tensor(mine, device=device)
            dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=group)
            mine = flags.tolist()
        if mine[0]:
            self.stopped = self.caught if self.caught in REQUEUE_SIGNALS else REQUEUE_SIGNALS[0]
        elif mine[1]:
            self.stopped = self.caught if self.caught in STOP_SIGNALS else STOP_SIGNALS[0]
        return self.stopped is not None

    @property
    def reason(self) -> str:
        """A few words on why the run stops, for the log."""
        if self.stopped in REQUEUE_SIGNALS:
            return f"{signal_name(self.stopped)} (the job's time is running out)"
        if self.stopped in STOP_SIGNALS:
            return f"{signal_name(self.stopped)} (the job is being preempted, cancelled or timed out)"
        return "no signal"

    def requeue(self) -> str:
        """After the checkpoint is complete, on one rank: have the job run again. Returns what was done, as a
        line for the log. Our handlers stay in place: the kill that follows a requeue then finds the ranks
        finishing their exit instead of cutting it short (SIGKILL still follows after KillWait).

        A requeue signal goes to the handler that held it before us if that is a Python function
        (submitit's: it calls the job's ``checkpoint()``, requeues the job and exits this process); under
        slurm/_launch.sh the batch shell requeues once the ranks have exited; otherwise, under Slurm,
        ``scontrol requeue``. After a stop signal nothing is requeued."""
        signum = self.stopped
        previous = self._previous.get(signum)
        if signum is None:
            return "[requeue] nothing to do: no signal was caught"
        if signum in STOP_SIGNALS:
            return (f"[stop] stopped on {signal_name(signum)} with a checkpoint saved; if Slurm does not requeue the "
                    f"job, submit it again with the same run_dir (resume=auto continues)")
        if callable(previous):
            print(f"[requeue] checkpoint saved; handing {signal_name(signum)} to {_qualname(previous)}", flush=True)
            previous(signum, None)  # submitit: requeues and exits
            return f"[requeue] {signal_name(signum)} handed to {_qualname(previous)}"
        job = slurm_job_id()
        if job is not None and os.environ.get(REQUEUE_BY_ENV) == "batch":
            return f"[requeue] checkpoint saved; the batch script requeues Slurm job {job} once every rank has exited"
        if job is None:
            return (f"[stop] stopped on {signal_name(signum)} with a checkpoint saved (not a Slurm job: nothing to "
                    f"requeue); run the same command again to continue (resume=auto)")
        print(f"[requeue] checkpoint saved; requeueing Slurm job {job}", flush=True)
        try:
            out = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=SCONTROL_TIMEOUT_S)
        except (OSError, subprocess.TimeoutExpired) as e:
            return f"[requeue] could not run scontrol requeue {job} ({e}); submit the job again with the same run_dir"
        if out.returncode:
            detail = (out.stderr or out.stdout).strip().splitlines()
            return (f"[requeue] scontrol requeue {job} failed ({detail[-1] if detail else f'exit {out.returncode}'}); "
                    f"submit the job again with the same run_dir (resume=auto continues)")
        return f"[requeue] Slurm job {job} requeued; it continues from the checkpoint"

    def close(self) -> None:
        """Give the signals back to the handlers that held them before."""
        for signum, previous in self._previous.items():
            signal.signal(signum, previous if previous is not None else signal.SIG_DFL)
        self._previous = {}

    def __enter__(self) -> "RequeueHandler":
        return self

    def __exit__(self, *exc) -> None:
        """Restore the previous handlers, unless the run stopped on a signal: then it is on its way out, and
        further signals of the ending job are only recorded until the process exits."""
        if self.stopped is None:
            self.close()


def start_resource_tracker_deaf_to(signals: tuple[int, ...]) -> None:
    """Start multiprocessing's resource tracker (the data loader's shared memory registers with it) while
    ``signals`` are ignored, so that it inherits the ignoring. It is a separate interpreter in the job step,
    Slurm signals every process of a step, and it ignores only INT and TERM by itself: USR1 would kill it,
    leaking the shared memory and filling the log with tracebacks at exit."""
    from multiprocessing import resource_tracker

    previous = {signum: signal.signal(signum, signal.SIG_IGN) for signum in signals}
    try:
        resource_tracker.ensure_running()
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def exit_code(signum: int | None) -> int:
    """The exit status of a run that stopped on ``signum`` (128 + signal, as the shell reports a signal),
    0 for a run that finished."""
    return 0 if signum is None else 128 + int(signum)


def _qualname(fn) -> str:
    owner = getattr(fn, "__self__", None)
    name = getattr(fn, "__qualname__", repr(fn))
    module = getattr(owner.__class__ if owner is not None else fn, "__module__", "") or ""
    return f"{module}.{name}" if module else name


__all__ = ["RequeueHandler", "REQUEUE_SIGNALS", "STOP_SIGNALS", "exit_code", "slurm_job_id"]
