"""RequeueHandler on its own: signals become a flag, the ranks agree on it with one all-reduce (gloo, world
size 2, only one rank signalled), requeue signals win over stop signals, a handler that held the signal
before (submitit's) gets it back after the checkpoint, and handlers are restored unless the run stopped."""

from __future__ import annotations

import os
import signal

import pytest
import torch.distributed as dist
import torch.multiprocessing as mp

from titans_scale.train.requeue import RequeueHandler, exit_code, slurm_job_id


@pytest.fixture(autouse=True)
def requeue_no_slurm(monkeypatch):
    for key in ("SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID", "TITANS_REQUEUE_BY"):
        monkeypatch.delenv(key, raising=False)


def test_a_signal_is_a_flag_until_the_ranks_agree():
    with RequeueHandler() as handler:
        assert not handler.requested and not handler.agree()
        os.kill(os.getpid(), signal.SIGUSR1)
        assert handler.requested and handler.caught == signal.SIGUSR1 and handler.stopped is None
        assert handler.agree() and handler.stopped == signal.SIGUSR1
        assert "SIGUSR1" in handler.reason
        assert "not a Slurm job" in handler.requeue()
    assert signal.getsignal(signal.SIGUSR1) == handler._catch  # a stopped run keeps ignoring the job's signals
    handler.close()
    assert signal.getsignal(signal.SIGUSR1) == signal.SIG_DFL
    assert exit_code(handler.stopped) == 128 + signal.SIGUSR1 and exit_code(None) == 0


def test_requeue_signal_wins_over_term_and_term_requeues_nothing():
    with RequeueHandler() as handler:
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGUSR2)
        assert handler.agree() and handler.stopped == signal.SIGUSR2
    handler.close()
    with RequeueHandler() as handler:
        os.kill(os.getpid(), signal.SIGTERM)
        assert handler.agree() and handler.stopped == signal.SIGTERM
        assert handler.requeue().startswith("[stop]")
    handler.close()


def test_previous_python_handler_gets_the_signal_after_the_checkpoint():
    """submitit installs a USR2 handler that calls the job's checkpoint() and requeues it: it must run only
    once the checkpoint is written, i.e. from requeue(), not when the signal arrives."""
    calls = []
    previous = signal.signal(signal.SIGUSR2, lambda signum, frame: calls.append(signum))
    try:
        with RequeueHandler() as handler:
            os.kill(os.getpid(), signal.SIGUSR2)
            assert handler.agree() and calls == []
            assert "handed to" in handler.requeue() and calls == [signal.SIGUSR2]
        handler.close()
    finally:
        signal.signal(signal.SIGUSR2, previous)


def test_handlers_are_restored_when_nothing_was_caught():
    before = signal.getsignal(signal.SIGTERM)
    with RequeueHandler():
        assert signal.getsignal(signal.SIGTERM) != before
    assert signal.getsignal(signal.SIGTERM) == before


def test_batch_script_requeues_and_array_tasks_are_named_whole(monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "41")
    monkeypatch.setenv("TITANS_REQUEUE_BY", "batch")
    with RequeueHandler() as handler:
        os.kill(os.getpid(), signal.SIGUSR1)
        handler.agree()
        assert "the batch script requeues Slurm job 41" in handler.requeue()
    handler.close()
    assert slurm_job_id({"SLURM_JOB_ID": "45", "SLURM_ARRAY_JOB_ID": "40", "SLURM_ARRAY_TASK_ID": "5"}) == "40_5"


def requeue_agree_worker(rank: int, port: int, signal_at: int, out) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    with RequeueHandler() as handler:
        step = 0
        while step < 100:
            step += 1
            if rank == 0 and step == signal_at:
                os.kill(os.getpid(), signal.SIGUSR1)
            if handler.agree():
                break
        out.put((rank, step, handler.caught, handler.stopped))
    handler.close()
    dist.destroy_process_group()


def test_ranks_stop_at_the_same_step_when_one_rank_is_signalled():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    mp.start_processes(requeue_agree_worker, args=(port, 7, out), nprocs=2, start_method="spawn")
    rows = sorted(out.get(timeout=60) for _ in range(2))
    assert rows == [(0, 7, signal.SIGUSR1, signal.SIGUSR1), (1, 7, None, signal.SIGUSR1)]
