"""`python -m titans_scale.submit`: bad input refused with one line before anything is queued, the dry-run
plan of a paper recipe, and submitit for real on this machine (cluster=local, 2 tasks, gloo): the tiny
recipe trains, and a job told that its time is running out saves a checkpoint, is requeued by submitit and
finishes from that checkpoint."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_train import shards, train_args, train_metrics  # noqa: F401 (shards is a fixture)

from titans_scale import submit

ROOT = Path(__file__).resolve().parent.parent
STEPS = 16


def submit_main(capsys, *args: str) -> tuple[int, str, str]:
    code = submit.main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err


def assert_one_line_error(code: int, err: str, *needles: str) -> None:
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


def paper_data(shards: dict) -> list[str]:
    return [f"data.data_dir={shards['data_dir']}", f"data.tokenizer={shards['tokenizer']}"]


@pytest.mark.parametrize("args, needles", [
    (["recipe=mac_760"], ["recipe 'mac_760' not found", "did you mean mac_760m"]),
    (["recipe=mac_760m", "train.lrr=1e-3"], ["unknown config key 'train.lrr'", "did you mean train.lr?"]),
    (["recipe=mac_760m", "nodez=2"], ["unknown key 'nodez'", "did you mean nodes?"]),
    (["recipe=mac_760m", "nodes=3"], ["nodes=3 x 8 tasks = 24 ranks cannot share the global batch of 128 sequences",
                                      "use nodes=1, 2, 4, 8 or 16"]),
    (["recipe=mag_170m", "gpus_per_node=6"], ["6 tasks = 6 ranks cannot share", "train.micro_batch=4"]),
    (["recipe=mac_760m", "time=1:xx"], ["time='1:xx' is not a Slurm time"]),
    (["recipe=tiny", "cluster=local", "nodes=2"], ["cluster=local runs on this machine only"]),
])
def test_bad_input_is_one_line_before_anything_is_queued(args, needles, shards, tmp_path, capsys):
    folder = tmp_path / "submitit"
    code, out, err = submit_main(capsys, *args, *paper_data(shards), f"folder={folder}")
    assert_one_line_error(code, err, *needles)
    assert not folder.exists() and "[submit]" not in out


def test_paper_recipe_without_data_names_the_fields_to_set(capsys, tmp_path):
    code, _, err = submit_main(capsys, "recipe=mac_760m", "nodes=2", f"folder={tmp_path}")
    assert_one_line_error(code, err, "data.data_dir, data.tokenizer must be set", "data.data_dir=... data.tokenizer=...")
    code, _, err = submit_main(capsys, "recipe=mac_760m", "nodes=2", f"folder={tmp_path}",
                               f"data.data_dir={tmp_path / 'nowhere'}", f"data.tokenizer={tmp_path / 'no.model'}")
    assert_one_line_error(code, err, str(tmp_path / "no.model"))


def test_cli_exit_code_and_single_line():
    result = subprocess.run([sys.executable, "-m", "titans_scale.submit", "recipe=nope", "nodes=2"], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert_one_line_error(result.returncode, result.stderr, "recipe 'nope' not found")


def test_dry_run_prints_the_plan_and_the_gpu_hours(shards, capsys, tmp_path):
    """From the recipe alone: the paper recipe's data is left open."""
    code, out, err = submit_main(capsys, "recipe=mac_760m", "nodes=2", "mfu=0.5", "dry_run=true",
                                 f"folder={tmp_path / 'submitit'}")
    assert code == 0, err
    assert "variant: mac" in out and "seq_len: 4096" in out  # the resolved recipe
    assert "[data] not checked: data.data_dir, data.tokenizer left open" in out
    assert "757.1M parameters" in out
    assert "world 16 (dp 16) | 57221 steps of 524.3K tokens = 16 dp x 8 accum x 1 seqs x 4096 tokens" in out
    hours = float(re.search(r"= ([\d,.]+) GPU-hours at 50% MFU of 989 TFLOP/s", out).group(1).replace(",", ""))
    from titans_scale.config import resolve
    from titans_scale.models import model_stats

    cfg = resolve(["recipe=mac_760m", *paper_data(shards)])
    expected = 3 * model_stats(cfg.model, 4096)[1] * 57221 * 524288 / (0.5 * 989e12) / 3600
    assert abs(hours - expected) < 1, (hours, expected)
    assert not (tmp_path / "submitit").exists()


def test_slurm_job_asks_for_one_task_per_gpu_a_warning_signal_and_requeue(shards, tmp_path):
    """The sbatch file submitit writes for a paper recipe (rendered, not queued; the local Slurm runs of
    tests/test_slurm.py exercise the same path with the sbatch scripts)."""
    sub = submit.plan_submission(["recipe=mag_760m", "nodes=2", "partition=gpu", "account=proj", "time=1-00:00:00",
                                  "dry_run=true", f"folder={tmp_path}", *paper_data(shards)])
    text = submit.executor_for(sub.sc)._executor._make_submission_file_text("python -m x", "uid")
    for line in ("--nodes=2", "--ntasks-per-node=8", "--gpus-per-node=8", "--cpus-per-task=8", "--time=1440",
                 "--signal=USR2@180", "--requeue", "--open-mode=append", "--partition=gpu", "--account=proj",
                 "--job-name=mag_760m"):
        assert f"#SBATCH {line}\n" in text, (line, text)


def task_pids(job) -> list[int]:
    """The task processes that submitit's local controller started (its children)."""
    pid = job._process.pid
    return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def test_submitit_local_trains_and_resumes_after_a_requeue(shards, tmp_path):
    """cluster=local, 2 tasks. USR2 to the tasks (what submitit's local controller sends before the time
    limit, as Slurm does with --signal=USR2@N): the ranks stop after the current step with a checkpoint,
    submitit calls TrainJob.checkpoint and requeues the job, and the rerun trains from that checkpoint to the
    last step; every step runs once."""
    args = train_args(shards, tmp_path / "run", train__steps=STEPS, train__checkpoint_every=0, train__eval_every=0)
    sub = submit.plan_submission(args + ["cluster=local", f"folder={tmp_path / 'submitit'}", "cpus_per_task=1"])
    assert sub.plan.world_size == 2 and sub.sc.tasks_per_node == 2
    job = submit.submit(sub)
    try:
        deadline = time.time() + 300
        while not re.search(r"^\[train\] step\s+2/", job.task(0).stdout() or "", flags=re.M):
            assert time.time() < deadline and job.state == "RUNNING", job.task(0).stdout()
            time.sleep(0.2)
        for pid in task_pids(job):
            os.kill(pid, signal.SIGUSR2)
        assert submit.follow(job, poll_s=0.5) == 0  # what `wait=true` prints: task 0's log to the end
        results = job.results()
    finally:
        if job.state == "RUNNING":
            job.cancel()
    log = job.task(0).stdout()
    assert [r["step"] for r in results] == [STEPS, STEPS], log
    stopped = int(re.search(r"saving a checkpoint at step (\d+)/", log).group(1))
    assert 2 <= stopped < STEPS, log
    assert "Calling checkpoint method" in log and "Requeued job" in log, log
    assert f"resuming from {tmp_path / 'run' / 'checkpoints' / f'step_{stopped:08d}'}" in log, log
    steps = [int(s) for s in re.findall(r"^\[train\] step\s+(\d+)/", log, flags=re.M)]
    assert steps == list(range(1, STEPS + 1)), log
    assert sorted(train_metrics(tmp_path / "run")["loss"]) == list(range(1, STEPS + 1))
    assert (tmp_path / "run" / "model.pt").is_file()
