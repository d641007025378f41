"""Checkpoints that a crash cannot corrupt, exact resumption, and the consolidated model file.

Layout of ``<run_dir>/checkpoints``::

    latest                 the tag of the newest complete checkpoint (written last, atomically)
    step_00000100/         DeepSpeed's files (module, ZeRO optimizer shards; its scheduler copy is unused), our
                           rank_XXXXX.pt (RNG states, data loader state) and meta.json (written last)
    tmp-step_00000200/     a checkpoint being written; never read, removed by the next save
    damaged-step_00000300/ a checkpoint whose files no longer match their checksums, set aside by resume=auto

A checkpoint is written under ``tmp-<tag>`` and renamed to ``<tag>`` only when every rank has finished, and
``latest`` moves to it only then: a run killed mid-write resumes from the previous complete checkpoint.
``meta.json``, written last, is the manifest: the size and sha256 of every file (hashed as it is written).
A load verifies them (each rank hashes its share of the files); a damaged checkpoint is refused in one line,
or under ``resume=auto`` set aside for the previous complete one. A write that fails (a full disk) removes
the partial checkpoint on every rank together and keeps the previous one. Non-finite weights are never saved.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from titans_scale.config import ConfigError, config_diff, to_dict
from titans_scale.models.config import ModelConfig

from .faults import TrainingError, any_rank, first_error, weights_are_finite, write_failure
from .schedule import move_to

LATEST = "latest"
META = "meta.json"
TMP = "tmp-"
DAMAGED = "damaged-"
TAG = re.compile(r"step_(\d+)")
CRASH_ENV = "TITANS_SCALE_CRASH_IN_CHECKPOINT"  # tests: "STEP" or "STEP@RANK": SIGKILL after the first file of
# that step's checkpoint (on every rank, or on RANK only)


def tag_of(step: int) -> str:
    return f"step_{step:08d}"


def atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def complete_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoint directories under ``root`` (a ``step_N`` with its meta.json), oldest first."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if TAG.fullmatch(p.name) and p.is_dir() and (p / META).is_file()]
    return sorted(found, key=lambda p: int(TAG.fullmatch(p.name).group(1)))


def find_checkpoint(root: Path) -> Path | None:
    """The checkpoint ``latest`` names (the newest complete one if the marker is missing or stale)."""
    marker = root / LATEST
    if marker.is_file():
        path = root / marker.read_text().strip()
        if (path / META).is_file():
            return path
    found = complete_checkpoints(root)
    return found[-1] if found else None


def read_meta(path: Path) -> dict:
    """A checkpoint's meta.json; a ConfigError naming the file when it is missing or garbled."""
    file = Path(path) / META
    try:
        meta = json.loads(file.read_text())
        if not isinstance(meta, dict) or not {"step", "tokens", "world_size", "config"} <= set(meta):
            raise ValueError("not a checkpoint manifest")
    except (OSError, ValueError) as err:
        reason = err.strerror if isinstance(err, OSError) else str(err).splitlines()[0]
        raise ConfigError(f"checkpoint {path}: {file.name} is unreadable ({reason})") from None
    return meta


def resolve_resume(resume: str, run_dir: Path) -> Path | None:
    """The checkpoint a run starts from: None for a fresh start (``resume=never`` or nothing saved yet)."""
    if resume == "never":
        return None
    if resume == "auto":
        return find_checkpoint(run_dir / "checkpoints")
    path = Path(resume)
    if (path / META).is_file():
        return path
    found = find_checkpoint(path) or find_checkpoint(path / "checkpoints")
    if found is None:
        raise ConfigError(f"resume={resume!r} holds no complete checkpoint (no {META}); use auto, never or a checkpoint directory")
    return found


# What must not change across a resume, besides the model: the parallel layout and the optimizer's kind of
# state (DeepSpeed's shards are per data-parallel rank and per ZeRO stage), and the data loader's unit of
# position (samples per micro-batch, sequence length).
FIXED_ACROSS_RESUME = ("train.zero_stage", "train.precision", "train.optimizer", "train.micro_batch",
                       "parallel.tp", "parallel.sp", "data.seq_len", "data.alphabet", "task", "forecast", "classify")


def _lookup(config: dict, dotted: str):
    for part in dotted.split("."):
        config = config.get(part, "<absent>") if isinstance(config, dict) else "<absent>"
    return config


def check_resumable(path: Path, config: dict, world_size: int) -> None:
    """Refuse a checkpoint whose model or layout differs from this run's, naming the fields that differ. (A
    checkpoint whose meta.json is unreadable is left to ``Checkpointer.verified``, which can fall back.)"""
    try:
        meta = read_meta(path)
    except ConfigError:
        return
    old = {"model": meta["config"]["model"], "world_size": meta["world_size"]}
    new = {"model": config["model"], "world_size": world_size}
    for key in FIXED_ACROSS_RESUME:
        if _lookup(meta["config"], key) != "<absent>":  # a key newer than the checkpoint: it had the default
            old[key], new[key] = _lookup(meta["config"], key), _lookup(config, key)
    diff = config_diff(old, new)
    if diff:
        raise ConfigError(
            f"checkpoint {path} was written by a different run ({'; '.join(diff)}); "
            f"use another run_dir, or resume=never with a fresh run_dir"
        )


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class HashingWriter:
    """A binary file that hashes what goes through it (torch.save writes its file front to back). The
    OSError of a failed write is kept: torch reports it as a RuntimeError without the errno."""

    def __init__(self, file):
        self.file, self.sha256, self.bytes, self.error = file, hashlib.sha256(), 0, None

    def write(self, data) -> int:
        try:
            written = self.file.write(data)
        except OSError as err:
            self.error = err
            raise
        self.sha256.update(data)
        self.bytes += memoryview(data).nbytes
        return written

    def flush(self) -> None:
        self.file.flush()


def save_file(obj, path: Path, **torch_save_kwargs) -> dict:
    """``torch.save(obj)`` to ``path``; returns the file's {"bytes", "sha256"}. A failed write raises its
    OSError (errno intact: a full disk is ENOSPC)."""
    writer = None
    try:
        with open(path, "wb") as f:
            writer = HashingWriter(f)
            torch.save(obj, writer, **torch_save_kwargs)
    except RuntimeError:
        if writer is not None and writer.error is not None:
            raise writer.error from None
        raise
    return {"bytes": writer.bytes, "sha256": writer.sha256.hexdigest()}


def file_digest(path: Path) -> dict:
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 24):
            sha.update(block)
    return {"bytes": path.stat().st_size, "sha256": sha.hexdigest()}


class RecordedWrites:
    """DeepSpeed's checkpoint writes, redirected while one checkpoint is saved: each file is hashed as it is
    written, and a failed write (a full disk) is recorded instead of raised, so this rank still reaches
    DeepSpeed's barriers and every rank learns of the failure together."""

    def __init__(self, engine, tmp: Path):
        self.engine, self.tmp = engine, tmp
        self.files: dict[str, dict] = {}
        self.failure: str | None = None
        self.checkpoint_engine = engine.checkpoint_engine
        self.torch_kwargs = {"_use_new_zipfile_serialization": getattr(self.checkpoint_engine, "zipfile_serialization", True)}

    def save(self, state_dict, path) -> None:
        if self.failure is None:
            try:
                self.files[str(Path(path).relative_to(self.tmp))] = save_file(state_dict, Path(path), **self.torch_kwargs)
            except OSError as err:
                self.failure = write_failure(err, path)

    def guarded(self, write):
        def call(*args, **kwargs):
            if self.failure is None:
                try:
                    write(*args, **kwargs)
                except OSError as err:
                    self.failure = write_failure(err, self.tmp)
        return call

    def __enter__(self) -> "RecordedWrites":
        engine, checkpoint_engine = self.engine, self.checkpoint_engine
        vars(checkpoint_engine)["makedirs"] = self.guarded(checkpoint_engine.makedirs)
        vars(checkpoint_engine)["save"] = self.save
        vars(engine)["_copy_recovery_script"] = self.guarded(engine._copy_recovery_script)
        return self

    def __exit__(self, *exc) -> None:
        for name in ("save", "makedirs"):
            vars(self.checkpoint_engine).pop(name, None)
        vars(self.engine).pop("_copy_recovery_script", None)


class Checkpointer:
    """Saves and restores a run's whole state through DeepSpeed plus one file per rank."""

    def __init__(self, run_dir: Path, keep_last: int, rank: int, world_size: int):
        self.root = Path(run_dir) / "checkpoints"
        self.keep_last, self.rank, self.world_size = keep_last, rank, world_size

    def save(self, engine, *, step: int, tokens: int, train_loader, config: dict) -> Path:
        """Write the checkpoint of ``step`` (a collective: every rank calls it). A TrainingError on every rank
        when the weights are not finite or a write failed (the partial checkpoint is removed)."""
        tag = tag_of(step)
        final, tmp = self.root / tag, self.root / f"{TMP}{tag}"
        if (final / META).is_file():  # nothing trained since this step's checkpoint was written
            return final
        if any_rank(not weights_are_finite(engine.module), engine.device):
            raise TrainingError(f"the weights hold non-finite values at step {step}: not saving them; "
                                f"{self.previous_note()}")
        failure = None
        if self.rank == 0:
            try:
                self.root.mkdir(parents=True, exist_ok=True)
                shutil.rmtree(tmp, ignore_errors=True)
            except OSError as err:
                failure = write_failure(err, self.root)
        failure = first_error(failure)
        if failure is None:
            with RecordedWrites(engine, tmp) as writes:
                if os.environ.get(CRASH_ENV) in (str(step), f"{step}@{self.rank}"):
                    _crash_after_first_file(engine)
                engine.save_checkpoint(str(self.root), tag=tmp.name, client_state={"step": step, "tokens": tokens},
                                       save_latest=False)
                rank_state = {"rng": rng_state(), "train_loader": train_loader.state_dict()}
                writes.save(rank_state, tmp / f"rank_{self.rank:05d}.pt")
            records = [None] * self.world_size
            dist.all_gather_object(records, (writes.files, writes.failure))
            failure = next((f for _, f in records if f is not None), None)
            if self.rank == 0 and failure is None:
                try:
                    self._publish(tmp, final, step, tokens, config, {k: v for files, _ in records for k, v in files.items()})
                except OSError as err:
                    failure = write_failure(err, tmp)
            if self.rank == 0 and failure is not None:
                shutil.rmtree(tmp, ignore_errors=True)
            failure = first_error(failure)
        if failure is not None:
            raise TrainingError(f"{failure}; the checkpoint of step {step} was not written; {self.previous_note()}")
        return final

    def _publish(self, tmp: Path, final: Path, step: int, tokens: int, config: dict, files: dict) -> None:
        """Rank 0, once every rank wrote its files: the manifest (meta.json), the rename, ``latest``, pruning."""
        for path in sorted(tmp.rglob("*")):  # files DeepSpeed wrote by itself (its recovery scripts)
            name = str(path.relative_to(tmp))
            if path.is_file() and name not in files:
                files[name] = file_digest(path)
        meta = {"step": step, "tokens": tokens, "world_size": self.world_size, "config": config, "files": files}
        atomic_write(tmp / META, json.dumps(meta, indent=1))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        atomic_write(self.root / LATEST, final.name)
        self._prune()

    def previous_note(self) -> str:
        previous = find_checkpoint(self.root)
        return (f"the last complete checkpoint, {previous}, is kept (resume=auto continues from it)" if previous
                else "there is no earlier checkpoint")

    def _prune(self) -> None:
        """Keep the newest ``keep_last`` complete checkpoints; drop leftovers of interrupted saves."""
        for path in complete_checkpoints(self.root)[: -self.keep_last]:
            shutil.rmtree(path, ignore_errors=True)
        for path in self.root.glob(f"{TMP}*"):
            shutil.rmtree(path, ignore_errors=True)

    def damage(self, path: Path) -> str | None:
        """Why the checkpoint at ``path`` cannot be trusted (a missing, truncated or altered file, an unreadable
        meta.json), or None. A collective: each rank hashes its share of the files."""
        problem, files = None, {}
        try:
            files = read_meta(path).get("files", {})  # checkpoints older than the manifest list no files
        except ConfigError:
            problem = f"its {META} is unreadable"
        for i, (name, want) in enumerate(sorted(files.items())):
            if problem is not None:
                break
            file = Path(path) / name
            if not file.is_file():
                problem = f"{name} is missing"
            elif file.stat().st_size != want["bytes"]:
                problem = f"{name} has {file.stat().st_size} bytes, the manifest says {want['bytes']} (truncated?)"
            elif i % self.world_size == self.rank and file_digest(file)["sha256"] != want["sha256"]:
                problem = f"{name} does not match its sha256 in {META} (altered after it was written)"
        return first_error(problem)

    def verified(self, path: Path, *, fall_back: bool, say) -> Path:
        """The checkpoint to load: ``path`` if intact; else, with ``fall_back`` (resume=auto), the newest
        intact earlier one, setting each damaged one aside as ``damaged-<tag>`` and saying so; without it
        (an explicit resume=PATH), a ConfigError naming the file. A collective."""
        path = Path(path)
        while (problem := self.damage(path)) is not None:
            if not fall_back:
                raise ConfigError(f"checkpoint {path} is damaged: {problem}; resume=auto falls back to the previous "
                                  f"complete checkpoint, or pass another resume=PATH")
            earlier = [p for p in complete_checkpoints(path.parent) if int(TAG.fullmatch(p.name).group(1))
                       < int(TAG.fullmatch(path.name).group(1))]
            aside = path.with_name(DAMAGED + path.name)
            first_error(None)  # every rank is done reading it
            if self.rank == 0:
                shutil.rmtree(aside, ignore_errors=True)
                os.replace(path, aside)
                say(f"[resume] checkpoint {path} is damaged ({problem}): set aside as {aside.name}; "
                    + (f"falling back to {earlier[-1]}" if earlier else "no earlier checkpoint"))
            first_error(None)
            if not earlier:
                raise ConfigError(f"checkpoint {path} is damaged ({problem}) and no earlier complete checkpoint is "
                                  f"left in {path.parent}; resume=never with a fresh run_dir starts over")
            path = earlier[-1]
        return path

    def load(self, engine, path: Path, train_loader) -> tuple[int, int]:
        """Restore everything from ``path``; returns the (step, tokens) it was taken at. The learning-rate
        schedule is the current config's, at the checkpoint's step (see ``schedule.move_to``)."""
        path = Path(path)
        meta = read_meta(path)
        loaded, _ = engine.load_checkpoint(str(path.parent), tag=path.name, load_optimizer_states=True,
                                           load_lr_scheduler_states=False)
        if loaded is None:
            raise RuntimeError(f"DeepSpeed could not load the checkpoint {path}")
        move_to(engine.lr_scheduler, meta["step"])
        rank_state = torch.load(path / f"rank_{self.rank:05d}.pt", weights_only=False)
        set_rng_state(rank_state["rng"])
        train_loader.load_state_dict(rank_state["train_loader"])
        return meta["step"], meta["tokens"]


def _crash_after_first_file(engine) -> None:
    """Simulate a kill -9 in the middle of a save: right after DeepSpeed wrote this rank's first file."""
    import signal

    checkpoint_engine = engine.checkpoint_engine
    save = checkpoint_engine.save

    def save_then_die(state_dict, path):
        save(state_dict, path)
        os.kill(os.getpid(), signal.SIGKILL)

    vars(checkpoint_engine)["save"] = save_then_die


# ----------------------------------------------------------------------------------------------------
# The consolidated model file, for evaluation and generation


def full_state_dict(module: torch.nn.Module) -> dict | None:
    """The whole fp32 state dict of a DeepSpeed-wrapped module, on rank 0 (None elsewhere); a collective.

    Parameters come from DeepSpeed's fp32 master copies (``safe_get_full_fp32_param``: ZeRO-1/2 fragments
    all-reduced, ZeRO-3 partitions gathered), so a bf16 run exports its exact optimizer weights; tied
    parameters keep every name they have in ``state_dict``; tensor-parallel shards are joined (every rank
    calls it), so a split model exports the single-process weights."""
    from deepspeed.utils import safe_get_full_fp32_param

    rank0 = dist.get_rank() == 0
    plan = getattr(module, "parallel", None)  # a tensor-parallel model: its shards are gathered over TP
    if plan is not None:
        from titans_scale.parallel.tensor import full_tensor
    out, seen = {}, {}
    for name, param in module.named_parameters(remove_duplicate=False):
        if id(param) not in seen:
            full = safe_get_full_fp32_param(param)
            full = full if full is not None else param.detach().float()
            if plan is not None:
                full = full_tensor(full, param, plan.groups)
            seen[id(param)] = full.cpu() if rank0 else None
        if rank0:
            out[name] = seen[id(param)]
    if not rank0:
        return None
    for prefix, owner in module.named_modules():  # persistent buffers (never partitioned)
        for name, buffer in owner.named_buffers(recurse=False):
            if buffer is not None and name not in owner._non_persistent_buffers_set:
                out[f"{prefix}.{name}" if prefix else name] = buffer.detach().cpu()
    return out


MODEL_FORMAT = "titans_scale.model/1"


def weights_digest(state_dict: dict) -> str:
    """sha256 over a state dict's names, dtypes, shapes and bytes, in order: written into model.pt and
    checked when it is loaded, so altered weights are refused instead of evaluated."""
    sha = hashlib.sha256()
    for name, tensor in state_dict.items():
        tensor = tensor.detach().cpu().contiguous()
        sha.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        sha.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return sha.hexdigest()


def write_model_file(path: Path, config: dict, state_dict: dict, task: dict | None = None) -> None:
    """``{format, config, state_dict, sha256}`` (and a task's ``task`` / ``task_config``: a language model has
    none) written atomically; refuses weights that are not finite."""
    bad = [name for name, t in state_dict.items() if t.is_floating_point() and not torch.isfinite(t).all()]
    if bad:
        raise TrainingError(f"not writing {path}: {len(bad)} weights hold non-finite values ({', '.join(bad[:3])})")
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        torch.save({"format": MODEL_FORMAT, "config": config, **(task or {}), "state_dict": state_dict,
                    "sha256": weights_digest(state_dict)}, tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def export_model(module: torch.nn.Module, model_cfg: ModelConfig, path: Path, task: dict | None = None) -> None:
    """Write ``model.pt`` atomically on rank 0 (every rank must call it; a failure stops every rank)."""
    state = full_state_dict(module)
    failure = None
    if state is not None:
        try:
            write_model_file(path, to_dict(model_cfg), state, task)
        except TrainingError as err:
            failure = str(err)
        except OSError as err:
            failure = write_failure(err, path)
    failure = first_error(failure)
    if failure is not None:
        raise TrainingError(failure)


def load_model(path: str | Path, device: str | torch.device = "cpu"):
    """The model and its ``ModelConfig`` from a ``model.pt`` written at the end of training (a language
    model, forecaster or classifier, as its ``task`` says)."""
    from titans_scale.tasks import model_from_blob

    path = Path(path)
    if path.is_dir():
        path = path / "model.pt"
    if not path.is_file():
        raise ConfigError(f"no model file at {path}; a finished run writes <run_dir>/model.pt")
    blob = torch.load(path, map_location="cpu", weights_only=False)
    if "sha256" in blob and weights_digest(blob["state_dict"]) != blob["sha256"]:
        raise ConfigError(f"{path} is damaged: its weights do not match the sha256 written with them; restore a copy, "
                          f"or write it again from the run's final checkpoint (the same launch command, resume=auto)")
    bad = [name for name, t in blob["state_dict"].items() if t.is_floating_point() and not torch.isfinite(t).all()]
    if bad:
        raise ConfigError(f"{path} holds non-finite weights ({', '.join(bad[:3])}); it cannot be evaluated; use a "
                          f"model from an earlier checkpoint")
    model, cfg = model_from_blob(blob)
    model.load_state_dict(blob["state_dict"])
    return model.to(device).eval(), cfg
