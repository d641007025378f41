"""The sbatch scripts on a real single-node Slurm (Debian's slurm-wlm: slurmctld + slurmd + munge on
localhost, started by scripts/slurm_local.sh): `sbatch slurm/tiny_cpu.sh` trains the tiny recipe as 2 tasks
to the end, and a job signalled before its time limit (`scancel --signal=USR1 --batch`) saves a checkpoint,
requeues itself and finishes from that checkpoint exactly as the uninterrupted job did."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import time
from pathlib import Path

import pytest
from test_train import assert_same_params, shards, train_args, train_metrics, train_params  # noqa: F401 (shards: fixture)

ROOT = Path(__file__).resolve().parent.parent
STEPS = 16
STUCK_REASONS = ("PartitionConfig", "ReqNodeNotAvail", "BadConstraints", "PartitionNodeLimit", "InvalidQOS")
FINAL_STATES = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE")


def slurm_free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalSlurm:
    """A running local Slurm: its environment (SLURM_CONF) and a few client commands."""

    def __init__(self, env: dict):
        self.env = env

    def run(self, *cmd: str, check: bool = True) -> str:
        out = subprocess.run(cmd, env=self.env, cwd=ROOT, capture_output=True, text=True, timeout=60)
        if check and out.returncode:
            raise AssertionError(f"{' '.join(cmd)} failed: {out.stderr.strip() or out.stdout.strip()}")
        return out.stdout

    def sbatch(self, script: str, log: Path, args: list[str]) -> str:
        return self.run("sbatch", "--parsable", f"--output={log}", f"--error={log}", script, *args).strip().split(";")[0]

    def job(self, job_id: str) -> dict[str, str]:
        """The fields of `scontrol show job -o` (JobState, Restarts, ...)."""
        line = self.run("scontrol", "show", "job", "-o", job_id)
        return dict(re.findall(r"(\w+)=(\S*)", line))

    def wait(self, job_id: str, timeout: float = 300) -> dict[str, str]:
        deadline = time.time() + timeout
        while time.time() < deadline:
            info = self.job(job_id)
            if info.get("JobState") in FINAL_STATES:
                return info
            if info.get("JobState") == "PENDING" and info.get("Reason", "").startswith(STUCK_REASONS):
                break  # it will never start
            time.sleep(0.5)
        self.run("scancel", job_id, check=False)
        raise AssertionError(f"job {job_id} did not run to its end within {timeout} s: {info}")


@pytest.fixture(scope="session")
def slurm(tmp_path_factory):
    """A local Slurm for the session (scripts/slurm_local.sh start ... stop), on free ports."""
    state = tmp_path_factory.mktemp("slurm")
    env = {**os.environ, "TITANS_SLURMCTLD_PORT": str(slurm_free_port()), "TITANS_SLURMD_PORT": str(slurm_free_port())}
    # jobs take their threads from --cpus-per-task=1, as a user's do (the suite's OMP_NUM_THREADS=2 would give
    # each of a job's 2 tasks 2 threads and oversubscribe a 2-core machine)
    env.pop("OMP_NUM_THREADS", None)
    script = str(ROOT / "scripts" / "slurm_local.sh")
    started = subprocess.run(["bash", script, "start", str(state)], env=env, capture_output=True, text=True, timeout=600)
    if started.returncode:
        reason = (started.stderr.strip().splitlines() or [f"exit {started.returncode}"])[-1]
        pytest.skip(f"no local Slurm on this machine: {reason}")
    env["SLURM_CONF"] = str(state / "slurm.conf")
    yield LocalSlurm(env)
    subprocess.run(["bash", script, "stop", str(state)], env=env, capture_output=True, timeout=120)


def slurm_args(shards: dict, run_dir: Path) -> list[str]:
    """The tiny recipe, shrunk (test_train's model and shards), STEPS steps at world size 2, no periodic
    checkpoint: the only checkpoint of a signalled run is the one its signal made."""
    return train_args(shards, run_dir, train__steps=STEPS, train__checkpoint_every=0, train__eval_every=0)


def steps_logged(log: str) -> list[int]:
    return [int(s) for s in re.findall(r"^\[train\] step\s+(\d+)/", log, flags=re.M)]


@pytest.fixture(scope="module")
def straight_job(slurm, shards, tmp_path_factory):
    """`sbatch slurm/tiny_cpu.sh` left alone: (job info, log text, run_dir)."""
    root = tmp_path_factory.mktemp("slurm_straight")
    log = root / "job.out"
    job = slurm.sbatch("slurm/tiny_cpu.sh", log, slurm_args(shards, root / "run"))
    info = slurm.wait(job)
    return info, log.read_text(), root / "run"


def test_sbatch_tiny_cpu_trains_as_two_tasks_to_the_end(straight_job):
    info, log, run_dir = straight_job
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "0", log
    assert "2 task(s)" in log and "world 2 (dp 2)" in log, log
    assert steps_logged(log) == list(range(1, STEPS + 1)), log
    assert f"[done]  {STEPS} steps" in log and (run_dir / "model.pt").is_file(), log
    assert "[slurm] training exited with status 0" in log


def test_signalled_job_checkpoints_requeues_and_finishes_from_the_checkpoint(slurm, shards, straight_job, tmp_path):
    """USR1 to the batch shell (what --signal=B:USR1@N sends before the time limit): the ranks stop after the
    current step with a checkpoint, the job is requeued, the rerun resumes from that checkpoint and ends at
    the same step, losses and weights as the job that was left alone; no step runs twice."""
    log = tmp_path / "job.out"
    job = slurm.sbatch("slurm/tiny_cpu.sh", log, slurm_args(shards, tmp_path / "run"))
    deadline = time.time() + 300
    while not re.search(r"^\[train\] step\s+2/", log.read_text() if log.exists() else "", flags=re.M):
        assert time.time() < deadline and slurm.job(job)["JobState"] in ("PENDING", "RUNNING"), slurm.job(job)
        time.sleep(0.2)
    slurm.run("scancel", "--signal=USR1", "--batch", job)
    info = slurm.wait(job)
    text = log.read_text()
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", text

    first, second = text.split("[slurm] job " + job + " (tiny_cpu) run 1:")
    stopped = int(re.search(r"saving a checkpoint at step (\d+)/", first).group(1))
    assert 2 <= stopped < STEPS, text
    assert "[slurm] the ranks stopped with a checkpoint: requeueing job" in first
    assert f"resuming from {tmp_path / 'run' / 'checkpoints' / f'step_{stopped:08d}'}" in second
    assert steps_logged(first) == list(range(1, stopped + 1))
    assert steps_logged(second) == list(range(stopped + 1, STEPS + 1))
    assert f"[done]  {STEPS} steps" in second

    _, _, straight_dir = straight_job
    assert train_metrics(tmp_path / "run") == train_metrics(straight_dir)
    assert_same_params(train_params(tmp_path / "run"), train_params(straight_dir))


def test_requeue_handler_requeues_its_job_through_scontrol(slurm, monkeypatch):
    """Outside our sbatch scripts (a user's own `srun python -m titans_scale.launch` line), rank 0's
    RequeueHandler.requeue() runs `scontrol requeue $SLURM_JOB_ID` itself."""
    import signal

    from titans_scale.train.requeue import RequeueHandler

    job = slurm.run("sbatch", "--parsable", "--output=/dev/null", "--wrap", "sleep 120").strip().split(";")[0]
    deadline = time.time() + 60
    while slurm.job(job)["JobState"] != "RUNNING":
        assert time.time() < deadline, slurm.job(job)
        time.sleep(0.2)
    monkeypatch.setenv("SLURM_CONF", slurm.env["SLURM_CONF"])
    monkeypatch.setenv("SLURM_JOB_ID", job)
    monkeypatch.delenv("TITANS_REQUEUE_BY", raising=False)
    with RequeueHandler() as handler:
        os.kill(os.getpid(), signal.SIGUSR1)
        assert handler.agree()
        assert handler.requeue() == f"[requeue] Slurm job {job} requeued; it continues from the checkpoint"
    handler.close()
    assert slurm.job(job)["Restarts"] == "1"
    slurm.run("scancel", job)
