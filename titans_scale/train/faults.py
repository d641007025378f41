"""How a run fails: one line that names what went wrong, where, and what to do next.

A failure the run can name (a non-finite loss, a full disk, a damaged checkpoint, a collective that timed
out) is a ``TrainingError``; the launcher prints it as one line and exits with ``RUN_FAILED``. Failures that
every rank must see (a checkpoint write that failed on one rank) are agreed on with one collective, so no
rank waits at a barrier for a partner that has given up.
"""

from __future__ import annotations

import errno
import math
from pathlib import Path

import torch
import torch.distributed as dist

RUN_FAILED = 3  # exit code: the run stopped on a failure it reported in one line
DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


class TrainingError(RuntimeError):
    """A run-time failure with its one-line explanation. ``everywhere``: every rank raises the same error
    (rank 0 reports it); otherwise only the rank that raised it knows, and it reports it itself."""

    def __init__(self, message: str, *, everywhere: bool = True):
        super().__init__(message)
        self.everywhere = everywhere


def write_failure(err: OSError, path: str | Path) -> str:
    """A failed write as one line: a full disk (or quota) says so, naming where."""
    path = Path(getattr(err, "filename", None) or path)
    reason = err.strerror or type(err).__name__
    if err.errno in DISK_FULL:
        return f"no space left on {path.parent} (writing {path.name}: {reason})"
    return f"cannot write {path} ({reason})"


def first_error(mine: str | None, group=None) -> str | None:
    """Every rank's error (None for none) gathered; the first one, the same on every rank. A collective."""
    if not (dist.is_available() and dist.is_initialized()):
        return mine
    errors = [None] * dist.get_world_size(group)
    dist.all_gather_object(errors, mine, group=group)
    return next((e for e in errors if e is not None), None)


def any_rank(flag: bool, device=None) -> bool:
    """Whether ``flag`` holds on any rank (one all-reduce of one number)."""
    if not (dist.is_available() and dist.is_initialized()):
        return flag
    value = torch.tensor([float(flag)], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def non_finite(loss: float, grad_norm) -> str | None:
    """'loss nan' / 'gradient norm inf' when a step's loss or gradient is not finite, else None."""
    bad = []
    if not math.isfinite(loss):
        bad.append(f"loss {loss}")
    if grad_norm is not None and not math.isfinite(float(grad_norm)):
        bad.append(f"gradient norm {float(grad_norm)}")
    return " and ".join(bad) or None


@torch.no_grad()
def weights_are_finite(module: torch.nn.Module) -> bool:
    """Whether every weight this rank holds is finite (ZeRO-3: its partition)."""
    for param in module.parameters():
        data = getattr(param, "ds_tensor", param)
        if data.numel() and not torch.isfinite(data).all():
            return False
    return True


PEER_LOST = ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "remote process exited",
             "NCCL communicator was aborted")


def collective_failure(err: BaseException, timeout_s: float, rank: int) -> str | None:
    """One line for an exception raised by a collective that timed out or lost a partner rank (gloo and
    nccl word them differently), else None."""
    text = str(err)
    fix = "resume=auto continues from the last complete checkpoint"
    if any(word in text for word in ("Timed out", "timed out", "Timeout", "timeout")):
        return (f"rank {rank}: timed out after {timeout_s:g} s waiting for the other ranks at a collective or the data "
                f"loader (one of them died, hangs or is far slower; its output says why); {fix} "
                f"(train.collective_timeout_s sets the limit)")
    if any(word in text for word in PEER_LOST):
        return f"rank {rank}: lost contact with another rank during a collective (it died; its output says why); {fix}"
    return None
