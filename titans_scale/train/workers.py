"""The local launcher behind ``nproc=N``: N worker processes that live and die together.

- Each worker is ``python -m titans_scale.launch ...`` with RANK / WORLD_SIZE / MASTER_* set (as torchrun
  sets them), in its own process group, and asks the kernel to kill it when the launcher dies
  (``die_with_parent``: Linux's PR_SET_PDEATHSIG, checked once more after it is set), so a kill -9 of the
  launcher leaves no worker training on.
- The launcher watches every worker (10 times a second). A worker that dies without having said why (killed,
  a traceback) stops the others at once, and the launcher names it. A worker that reported its failure in one
  line (exit codes in ``reported``) gives the others a few seconds to end the same way before they are stopped.
- SIGTERM / SIGUSR1 / SIGUSR2 to the launcher are passed on to every worker, which finish their step, save
  and exit with 128 + the signal; the launcher then exits with that code. Ctrl-C (SIGINT) stops them at once.

Only the standard library here: the workers import this before torch.
"""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass

PARENT_ENV = "TITANS_SCALE_LAUNCHER_PID"  # set for the workers: the launcher they must not outlive
POLL_S = 0.1
REPORTED_GRACE_S = 10.0  # how long a worker that reported a failure waits for its partners to end the same way
FORWARDED = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)
PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """In a worker of ``run_workers``: have the kernel SIGKILL this process when the launcher dies (Linux);
    elsewhere a thread checks every second. If the launcher is already gone, exit now."""
    expected = os.environ.get(PARENT_ENV, "")
    if not expected.isdigit():
        return
    launcher = int(expected)
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    else:
        def watch() -> None:
            while os.getppid() == launcher:
                time.sleep(1.0)
            os._exit(1)

        threading.Thread(target=watch, daemon=True, name="watch-launcher").start()
    if os.getppid() != launcher:  # it died before the request was in place
        os._exit(1)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def exit_description(code: int) -> str:
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


@dataclass
class Outcome:
    """How the workers ended: the exit code to return, and the worker that failed first (None if none did)."""

    code: int
    failed_rank: int | None = None
    failed_code: int | None = None
    interrupted: bool = False


def run_workers(args: list[str], nproc: int, reported: set[int]) -> Outcome:
    """``python -m titans_scale.launch args`` as ``nproc`` local workers, supervised as described above."""
    port = free_port()
    procs: list[subprocess.Popen] = []
    received: list[int] = []
    previous = {}

    def forward(signum, frame) -> None:
        received.append(signum)
        if signum != signal.SIGINT:
            for proc in procs:
                if proc.poll() is None:
                    _signal(proc, signum, group=False)

    for signum in (*FORWARDED, signal.SIGINT):
        previous[signum] = signal.signal(signum, forward)
    try:
        for rank in range(nproc):
            env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": str(nproc), "LOCAL_RANK": str(rank),
                   "LOCAL_WORLD_SIZE": str(nproc), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
                   PARENT_ENV: str(os.getpid())}
            procs.append(subprocess.Popen([sys.executable, "-m", "titans_scale.launch", *args], env=env,
                                          process_group=0))
        return _supervise(procs, reported, received)
    finally:
        for proc in procs:  # whatever happened, no worker (nor a data-loader process of one) outlives this
            _signal(proc, signal.SIGKILL, group=True)
        for proc in procs:
            proc.wait()
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _signal(proc: subprocess.Popen, signum: int, group: bool) -> None:
    try:
        os.killpg(proc.pid, signum) if group else proc.send_signal(signum)
    except (ProcessLookupError, PermissionError):
        pass


def _supervise(procs: list[subprocess.Popen], reported: set[int], received: list[int]) -> Outcome:
    failed: tuple[int, int] | None = None
    deadline = None
    while True:
        codes = [proc.poll() for proc in procs]
        if signal.SIGINT in received:
            return Outcome(130, interrupted=True)
        if failed is None:
            newly = [(rank, code) for rank, code in enumerate(codes) if code not in (None, 0)]
            if newly:  # a worker killed by a signal first, the ranks that died of its absence after
                failed = min(newly, key=lambda rc: (rc[1] >= 0, rc[0]))
                deadline = time.monotonic() + (REPORTED_GRACE_S if failed[1] in reported else 0.0)
        if all(code is not None for code in codes):
            if failed is None:
                return Outcome(0)
            return Outcome(failed[1] if failed[1] in reported else 1, *failed)
        if failed is not None and time.monotonic() >= deadline:
            for proc in procs:
                if proc.poll() is None:
                    _signal(proc, signal.SIGKILL, group=True)
            for proc in procs:
                proc.wait()
            continue
        time.sleep(POLL_S)
