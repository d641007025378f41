"""The run directory: checked before anything starts, and owned by one run at a time.

``<run_dir>/run.lock`` carries an advisory lock (``flock``) for as long as the run lives, and says who holds
it (host, PID, start time). A second run on the same run_dir is refused in one line naming the first. The
kernel drops the lock when its holder dies, even by kill -9, so the lock of a crashed run is stale: the next
run takes it over and says so. Where the file system has no ``flock``, a holder on this host is checked by
its PID. The launcher takes the lock before it starts its workers (they inherit it through ``HOLDER_ENV``);
under torchrun, srun or submitit, rank 0 takes it.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import time
from pathlib import Path

from titans_scale.config import ConfigError

LOCK_NAME = "run.lock"
HOLDER_ENV = "TITANS_SCALE_RUN_LOCK_HOLDER"  # the PID of the launcher that holds the lock for its workers


def check_run_dir(run_dir: str | os.PathLike) -> None:
    """A ConfigError when ``run_dir`` cannot be a directory this process writes to (a regular file on its
    path, no permission); creates nothing (the dry run calls it too)."""
    path = Path(run_dir)
    for existing in (path, *path.parents):
        if existing.exists():
            if not existing.is_dir():
                where = "is" if existing == path else f"lies under {existing}, which is"
                raise ConfigError(f"run_dir={run_dir} {where} a regular file, not a directory; choose another run_dir")
            if not os.access(existing, os.W_OK | os.X_OK):
                raise ConfigError(f"run_dir={run_dir}: {existing} is not writable by this user; choose another run_dir")
            return


def _describe(owner: dict) -> str:
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(owner.get("started", 0)))
    return f"pid {owner.get('pid')} on host {owner.get('host')}, started {started}"


def _alive_here(owner: dict) -> bool:
    """Whether the owner runs on this host and its PID is alive (used only without flock)."""
    if owner.get("host") != socket.gethostname():
        return True  # cannot tell from here: assume it lives
    try:
        os.kill(int(owner["pid"]), 0)
    except ProcessLookupError:
        return False
    except (OSError, KeyError, ValueError):
        return True
    return True


class RunLock:
    """The lock of one run directory: ``acquire()`` (refuses in one line, or returns a note when it took a
    stale lock over), ``release()`` at the end. A held lock lives as long as this process (or its forks)."""

    def __init__(self, run_dir: str | os.PathLike):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_NAME
        self.fd: int | None = None

    @staticmethod
    def held_for_me() -> bool:
        """Whether the launcher that started this process (or this process itself) holds the lock."""
        holder = os.environ.get(HOLDER_ENV, "")
        return holder.isdigit() and int(holder) in (os.getpid(), os.getppid())

    def _read(self) -> dict:
        try:
            owner = json.loads(os.pread(self.fd, 4096, 0).decode() or "{}")
        except (OSError, ValueError):
            return {}
        return owner if isinstance(owner, dict) else {}

    def acquire(self) -> str | None:
        check_run_dir(self.run_dir)
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as err:
            raise ConfigError(f"run_dir={self.run_dir}: cannot create {self.path.name} ({err.strerror}); choose another run_dir") from None
        owner = None
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = self._read()
        except OSError as err:  # no flock on this file system: judge the recorded owner by its PID
            if err.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                raise
            recorded = self._read()
            if recorded and _alive_here(recorded):
                owner = recorded
        if owner is not None:
            os.close(self.fd)
            self.fd = None
            raise ConfigError(f"run_dir {self.run_dir} is in use by another run ({_describe(owner) if owner else 'owner unknown'}); "
                              f"wait for it to end or stop it, or choose another run_dir")
        stale = self._read()
        mine = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.time()}
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, json.dumps(mine).encode(), 0)
        os.environ[HOLDER_ENV] = str(os.getpid())  # for this process's workers
        if stale:
            return f"[lock]  took over the stale lock of a run that is gone ({_describe(stale)}) in {self.run_dir}"
        return None

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            os.ftruncate(self.fd, 0)  # a free lock file is empty; one with an owner but no flock is stale
        except OSError:
            pass
        os.close(self.fd)  # drops the flock
        self.fd = None
        if os.environ.get(HOLDER_ENV) == str(os.getpid()):
            del os.environ[HOLDER_ENV]
