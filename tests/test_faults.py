"""Fault injection on the real stack (CPU, gloo, world size 2, DeepSpeed ZeRO-1): every fault stops the run in
one line (or with the failing rank named), loses nothing beyond the last complete checkpoint, and the run,
resumed through all of them, ends with exactly the losses and weights of an uninterrupted run.

One run directory goes through a chain of faults (each launch costs ~15 s of start-up, so they share it):
a full disk during a save (a 3 MB tmpfs in a private mount namespace), kill -9 of one rank in the middle of a
checkpoint, kill -9 of the launcher (no worker left), a corrupted checkpoint file (fallback to the previous
one) and the stale lock the killed launcher left, a stopped rank (the collective timeout, under a
torchrun-style launch), SIGTERM (exit 143, then resume), and the end. Around it: a non-finite loss, damaged
files of every kind read without a launch, a held and a stale run_dir lock, set-up mistakes refused before
any worker starts.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from test_train import LAUNCH, ROOT, assert_same_params, shards, train_args, train_free_port, train_main  # noqa: F401
from test_train import train_metrics, train_params

STEPS = 6  # checkpoint every 2 steps, validation at 0, 3 and 6
FULL_DISK_BYTES = 3 << 20  # room for the step-2 checkpoint (~1.7 MB with the recovery scripts), not for step 4


def fault_args(shards: dict, run_dir: Path, **overrides) -> list[str]:
    return train_args(shards, run_dir, train__steps=STEPS, train__checkpoint_every=2, train__eval_every=3, nproc=2,
                      **overrides)


class Launch:
    """``python -m titans_scale.launch`` in the background, its output read as it comes."""

    def __init__(self, args: list[str], *, env: dict | None = None, prefix: list[str] = (), world: int | None = None,
                 rank: int | None = None, port: int | None = None):
        env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
        if rank is not None:  # one rank of a torchrun-style launch
            env.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                       MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        self.started = time.monotonic()
        self.proc = subprocess.Popen([*prefix, *LAUNCH, *map(str, args)], cwd=ROOT, env=env, text=True,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.out: list[str] = []
        self.err: list[str] = []
        self.readers = [threading.Thread(target=self._read, args=(stream, into), daemon=True)
                        for stream, into in ((self.proc.stdout, self.out), (self.proc.stderr, self.err))]
        for reader in self.readers:
            reader.start()

    @staticmethod
    def _read(stream, into: list[str]) -> None:
        for line in stream:
            into.append(line)

    def wait_for(self, condition, timeout: float = 240) -> float:
        """Wait until ``condition()`` holds (or a regex matches a stdout line); returns the time it took."""
        check = (lambda: any(re.search(condition, line) for line in self.out)) if isinstance(condition, str) else condition
        deadline = time.monotonic() + timeout
        while not check():
            assert self.proc.poll() is None or check(), f"ended before {condition}: {self}"
            assert time.monotonic() < deadline, f"timed out waiting for {condition}: {self}"
            time.sleep(0.05)
        return time.monotonic()

    def finish(self, timeout: float = 240) -> int:
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"still running after {timeout} s: {self}") from None
        for reader in self.readers:
            reader.join(10)
        return self.proc.returncode

    @property
    def stdout(self) -> str:
        return "".join(self.out)

    @property
    def errors(self) -> list[str]:
        """stderr lines that are not DeepSpeed's or torch's notices."""
        return [line for line in self.err if line.strip() and "[WARNING]" not in line and "warn" not in line.lower()]

    def __repr__(self) -> str:
        return f"exit {self.proc.poll()}\n--- stdout\n{self.stdout[-3000:]}\n--- stderr\n{''.join(self.err)[-3000:]}"


def descendants(pid: int) -> set[int]:
    """Every live process below ``pid`` (from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


def alive(pids: set[int]) -> set[int]:
    living = set()
    for pid in pids:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z":
            living.add(pid)
    return living


def corrupt(path: Path, offset: int = 1000, size: int = 4096) -> None:
    """Random bytes in the middle of a file, its size unchanged (zip headers intact)."""
    with open(path, "r+b") as f:
        f.seek(min(offset, path.stat().st_size - size))
        f.write(os.urandom(size))


def full_disk_prefix(run_dir: Path) -> tuple[list[str], str, str | None]:
    """A command prefix that runs a launch with ``run_dir`` on a 3 MB tmpfs (in a private mount namespace,
    copied out to ``<run_dir>.copy`` at the end), the words its error line must hold, and the checkpoint that
    must survive. Where no mount namespace is allowed (or TITANS_FAULTS_NO_TMPFS=1), a file-size limit stands
    in for the full disk, honestly: RLIMIT_FSIZE (SIGXFSZ ignored) below the size of one checkpoint file makes
    the first save fail with EFBIG ("File too large"), not ENOSPC, so the line says "cannot write" and there is
    no earlier checkpoint to keep."""
    copy_out = '"$@"; code=$?; cp -a "$0" "$0.copy"; exit $code'
    namespace = ["unshare", "-rm"]
    if (not os.environ.get("TITANS_FAULTS_NO_TMPFS") and shutil.which("unshare")
            and subprocess.run([*namespace, "true"], capture_output=True).returncode == 0):
        mount = f'mount -t tmpfs -o size={FULL_DISK_BYTES} tmpfs "$0" && '
        return [*namespace, "sh", "-c", mount + copy_out, str(run_dir)], "no space left on", "step_00000002"
    limit = 200_000  # the model-states file is ~400 KB; config, metrics, lock and shared memory stay far below
    rlimit = ("import os, resource, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
              f"resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit})); os.execvp(sys.argv[1], sys.argv[1:])")
    return ["sh", "-c", copy_out, str(run_dir), sys.executable, "-c", rlimit], "(File too large)", None


# ------------------------------------------------------------------------------------------------ runs
@pytest.fixture(scope="module")
def straight(tmp_path_factory, shards) -> dict:  # noqa: F811
    """The uninterrupted run every resumed chain must end equal to."""
    run_dir = tmp_path_factory.mktemp("straight")
    run = Launch(fault_args(shards, run_dir))
    assert run.finish() == 0, run
    return {"metrics": train_metrics(run_dir), "params": train_params(run_dir), "run_dir": run_dir}


def test_a_chain_of_faults_loses_nothing_beyond_the_last_checkpoint_and_ends_as_the_straight_run(
        shards, straight, tmp_path):  # noqa: F811
    from titans_scale.train.checkpoint import CRASH_ENV, Checkpointer

    mounted = tmp_path / "run"
    mounted.mkdir()
    run_dir = tmp_path / "run.copy"  # the full-disk run's directory, copied out of its namespace
    args = fault_args(shards, run_dir)
    root = run_dir / "checkpoints"
    timings = {}

    # A full disk during the step-4 save: one line within seconds, every rank stopped, step 2 kept intact.
    prefix, says, kept = full_disk_prefix(mounted)
    run = Launch(fault_args(shards, mounted), prefix=prefix)
    seen = run.wait_for(r"\[train\] step [24]/")
    assert run.finish() == 3, run
    timings["full disk: step line -> exit"] = time.monotonic() - seen
    assert len(run.errors) == 1 and says in run.errors[0], run
    if kept:
        assert "tmp-step_00000004" in run.errors[0] and f"{kept}, is kept" in run.errors[0], run
        assert Checkpointer(run_dir, 5, 0, 1).damage(root / kept) is None  # every file matches its sha256
    assert sorted(p.name for p in root.iterdir() if p.is_dir()) == ([kept] if kept else [])  # the partial save is gone
    assert all(math.isfinite(loss) for loss in train_metrics(run_dir)["loss"].values())

    # kill -9 of rank 1 in the middle of the step-4 checkpoint: the launcher names it and stops rank 0 at once.
    run = Launch(args, env={CRASH_ENV: "4@1"})
    assert run.finish() == 1, run
    assert run.errors[-1].startswith("error: worker rank 1 was killed by SIGKILL"), run
    assert (root / "latest").read_text() == "step_00000002" and (root / "tmp-step_00000004").is_dir()

    # kill -9 of the launcher once step 4 is saved: no worker (nor data-loader process) alive 10 s later.
    run = Launch(args)
    run.wait_for(lambda: (root / "step_00000004" / "meta.json").is_file())
    workers = descendants(run.proc.pid)
    assert len(workers) >= 2
    run.proc.kill()
    killed = time.monotonic()
    while alive(workers) and time.monotonic() - killed < 10:
        time.sleep(0.1)
    timings["launcher killed -> last worker gone"] = time.monotonic() - killed
    assert not alive(workers), f"still alive 10 s after the launcher's kill -9: {alive(workers)}"
    run.finish()
    assert json.loads((run_dir / "run.lock").read_text())["pid"] == run.proc.pid  # left behind: stale

    # Random bytes inside the step-4 optimizer shard; a torchrun-style launch (rank 0 takes the lock) resumes:
    # the stale lock is taken over, the damaged checkpoint set aside for step 2. Rank 1 then stops (SIGSTOP):
    # rank 0 ends in one line when the collective timeout (10 s) passes.
    corrupt(next((root / "step_00000004").glob("*optim_states.pt")), offset=300_000)
    port = train_free_port()
    ranks = [Launch(args + ["train.collective_timeout_s=10"], world=2, rank=r, port=port) for r in (0, 1)]
    try:
        ranks[0].wait_for(r"\[train\] step 3/")
        ranks[1].proc.send_signal(signal.SIGSTOP)
        stopped = time.monotonic()
        assert ranks[0].finish(60) == 3, ranks[0]
        timings["rank stopped -> collective timeout"] = time.monotonic() - stopped
    finally:
        ranks[1].proc.kill()
        ranks[1].proc.send_signal(signal.SIGCONT)
        ranks[1].finish()
    out = ranks[0].stdout
    assert "[lock]  took over the stale lock" in out, ranks[0]
    assert re.search(r"\[resume\] checkpoint \S+step_00000004 is damaged \(zero_pp_rank_\d_mp_rank_00_optim_states.pt "
                     r"does not match its sha256 .*falling back to \S+step_00000002", out), ranks[0]
    assert "resuming from" in out and out.count("[setup]") == 1
    assert ranks[0].errors == [ranks[0].errors[-1]] and "rank 0: timed out after 10 s waiting for the other ranks" in ranks[0].errors[-1]
    assert (root / "damaged-step_00000004").is_dir()

    # SIGTERM to the launcher: the step in flight ends, a checkpoint is saved, exit 143 with the resume hint.
    run = Launch(args)
    run.wait_for(r"\[setup\]")
    run.proc.send_signal(signal.SIGTERM)
    assert run.finish() == 128 + signal.SIGTERM, run
    stop = re.search(r"\[stop\]  SIGTERM .* saving a checkpoint at step (\d)/", run.stdout)
    assert stop and "resume=auto continues" in run.stdout and not run.errors, run
    assert (root / "latest").read_text() == f"step_{int(stop.group(1)):08d}"

    # The end: every step's loss, the validation losses and the weights equal the uninterrupted run's.
    run = Launch(args)
    assert run.finish() == 0, run
    assert train_metrics(run_dir) == straight["metrics"]
    assert_same_params(train_params(run_dir), straight["params"])
    assert all(math.isfinite(loss) for loss in train_metrics(run_dir)["loss"].values())
    print(" | ".join(f"{k}: {v:.1f} s" for k, v in timings.items()))
    assert timings["full disk: step line -> exit"] < 30 and timings["rank stopped -> collective timeout"] < 30


def test_a_non_finite_loss_stops_at_its_step_and_saves_nothing_of_it(shards, tmp_path):  # noqa: F811
    """lr 1e9 without clipping: the first non-finite step is named, nothing non-finite is written anywhere."""
    run = Launch(train_args(shards, tmp_path, train__lr=1e9, train__min_lr=1.0, train__warmup_steps=0,
                            train__grad_clip=0, train__checkpoint_every=1))
    assert run.finish() == 3, run
    line = run.errors[-1]
    step = int(re.search(r"non-finite loss nan .* at step (\d+): stopped before saving anything of it", line).group(1))
    assert len([e for e in run.errors if e.startswith("error:")]) == 1, run
    saved = sorted(p.name for p in (tmp_path / "checkpoints").glob("step_*"))
    assert saved == [f"step_{s:08d}" for s in range(1, step)] and not (tmp_path / "model.pt").exists()
    assert all(math.isfinite(v) for v in train_metrics(tmp_path)["loss"].values())


# --------------------------------------------------------------------------------- without a training run
def test_damaged_checkpoint_files_are_named_in_one_line(straight, tmp_path):
    """Each kind of damage to a complete checkpoint, found by its manifest (sizes, sha256) or its meta.json."""
    from titans_scale.train.checkpoint import META, Checkpointer

    source = straight["run_dir"] / "checkpoints" / "step_00000002"
    checkpointer = Checkpointer(tmp_path, 5, 0, 1)

    def damaged(change) -> str:
        path = tmp_path / "checkpoints" / "step_00000002"
        shutil.rmtree(path, ignore_errors=True)
        shutil.copytree(source, path)
        change(path)
        return checkpointer.damage(path)

    shard = next(source.glob("*optim_states.pt")).name
    assert damaged(lambda p: None) is None
    assert damaged(lambda p: corrupt(p / shard)) == f"{shard} does not match its sha256 in {META} (altered after it was written)"
    assert damaged(lambda p: os.truncate(p / shard, 1000)).startswith(f"{shard} has 1000 bytes, the manifest says ")
    assert damaged(lambda p: (p / "mp_rank_00_model_states.pt").unlink()) == "mp_rank_00_model_states.pt is missing"
    assert damaged(lambda p: (p / META).write_text('{"step": 2, "tok')) == f"its {META} is unreadable"


def test_a_damaged_or_non_finite_model_file_is_refused_by_eval_and_generate(straight, tmp_path, capsys):
    import zipfile

    from titans_scale.eval.checkpoint import load_checkpoint
    from titans_scale.eval.errors import EvalError
    from titans_scale.train.checkpoint import write_model_file

    model = tmp_path / "model.pt"
    shutil.copy(straight["run_dir"] / "model.pt", model)
    with zipfile.ZipFile(model) as archive:  # random bytes inside the largest tensor's data
        info = max(archive.infolist(), key=lambda i: i.file_size)
    corrupt(model, offset=info.header_offset + 30 + len(info.filename) + len(info.extra) + 64, size=256)
    with pytest.raises(EvalError, match=f"^{model} is damaged: its weights do not match the sha256 written with them"):
        load_checkpoint(model)
    blob = torch.load(straight["run_dir"] / "model.pt", weights_only=False)
    name = next(iter(blob["state_dict"]))
    blob["state_dict"][name][0] = float("nan")
    with pytest.raises(Exception, match="non-finite"):  # never written...
        write_model_file(model, blob["config"], blob["state_dict"])
    torch.save(blob, model)  # ...and, written by other means, never evaluated
    with pytest.raises(EvalError, match=f"{model} is damaged|{model} holds non-finite weights"):
        load_checkpoint(model)
    from titans_scale.generate import main as generate_main

    code = generate_main(["--checkpoint", str(model), "--prompt", "The", "--max-new-tokens", "2"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and f"{model}" in err, err


def test_a_run_dir_in_use_is_refused_and_a_stale_lock_taken_over(shards, tmp_path, capsys):  # noqa: F811
    from titans_scale.train.rundir import RunLock

    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from titans_scale.train.rundir import RunLock; "
                               f"RunLock({str(tmp_path)!r}).acquire(); print('held', flush=True); time.sleep(300)"],
                              cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        result = train_main(capsys, train_args(shards, tmp_path))
    finally:
        holder.kill()
        holder.wait()
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result
    assert result.stderr.startswith(f"error: run_dir {tmp_path} is in use by another run (pid {holder.pid} on host "
                                    f"{socket.gethostname()}, started "), result
    assert result.stderr.endswith("wait for it to end or stop it, or choose another run_dir\n"), result
    lock = RunLock(tmp_path)
    assert lock.acquire().startswith(f"[lock]  took over the stale lock of a run that is gone (pid {holder.pid} on host")
    lock.release()
    assert (tmp_path / "run.lock").read_text() == "" and RunLock(tmp_path).acquire() is None


def test_set_up_mistakes_are_refused_before_any_worker_starts(shards, tmp_path, capsys):  # noqa: F811
    (tmp_path / "file").write_text("a regular file")
    for extra in ([], ["dry_run=true"]):
        result = train_main(capsys, train_args(shards, tmp_path / "file" / "run") + extra)
        assert result.returncode == 2 and result.stderr == (
            f"error: run_dir={tmp_path / 'file' / 'run'} lies under {tmp_path / 'file'}, which is a regular file, not a "
            f"directory; choose another run_dir\n"), result
    result = train_main(capsys, train_args(shards, tmp_path / "run", data__tokenizer="/nonexistent.model", nproc=2))
    assert result.returncode == 2 and result.stderr.startswith(
        "error: data.tokenizer=/nonexistent.model does not exist; train one with") and result.stderr.count("\n") == 1
    assert not Path("/nonexistent.model").exists()


def test_the_launcher_reads_its_workers_exits_whatever_their_order():
    """Workers that all died before the launcher looked (a kill of the whole job step) are a failure, named;
    a reported failure (exit 3) is passed on as it is; all done is 0."""
    from titans_scale.train.workers import _supervise

    def workers(*scripts: str) -> list[subprocess.Popen]:
        procs = [subprocess.Popen([sys.executable, "-c", script]) for script in scripts]
        for proc in procs:
            proc.wait()
        return procs

    kill = "import os, signal; os.kill(os.getpid(), signal.SIGKILL)"
    outcome = _supervise(workers(kill, kill), reported={2, 3, 143}, received=[])
    assert (outcome.code, outcome.failed_code) == (1, -signal.SIGKILL) and outcome.failed_rank in (0, 1)
    outcome = _supervise(workers("pass", "raise SystemExit(3)"), reported={2, 3, 143}, received=[])
    assert (outcome.code, outcome.failed_rank) == (3, 1)
    assert _supervise(workers("pass", "pass"), reported={2, 3, 143}, received=[]).code == 0
