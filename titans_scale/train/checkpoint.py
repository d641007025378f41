"""Checkpoints that a crash cannot corrupt, exact resumption, and the consolidated model file.

Layout of ``<run_dir>/checkpoints``::

    latest                 the tag of the newest complete checkpoint (written last, atomically)
    step_00000100/         DeepSpeed's files (module, ZeRO optimizer shards; its scheduler copy is unused), our
                           rank_XXXXX.pt (RNG states, data loader state) and meta.json (written last)
    tmp-step_00000200/     a checkpoint being written; never read, removed by the next save

A checkpoint is written under ``tmp-<tag>`` and renamed to ``<tag>`` only when every rank has finished, and
``latest`` moves to it only then: a run killed mid-write resumes from the previous complete checkpoint.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from titans_scale.config import ConfigError, config_diff, to_dict
from titans_scale.models.config import ModelConfig

from .schedule import move_to

LATEST = "latest"
META = "meta.json"
TMP = "tmp-"
CRASH_ENV = "TITANS_SCALE_CRASH_IN_CHECKPOINT"  # tests: die after the first file of this step's checkpoint


def tag_of(step: int) -> str:
    return f"step_{step:08d}"


def atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def complete_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoint directories under ``root``, oldest first."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and not p.name.startswith(TMP) and (p / META).is_file()]
    return sorted(found, key=lambda p: read_meta(p)["step"])


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
    return json.loads((Path(path) / META).read_text())


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
    """Refuse a checkpoint whose model or layout differs from this run's, naming the fields that differ."""
    meta = read_meta(path)
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


class Checkpointer:
    """Saves and restores a run's whole state through DeepSpeed plus one file per rank."""

    def __init__(self, run_dir: Path, keep_last: int, rank: int, world_size: int):
        self.root = Path(run_dir) / "checkpoints"
        self.keep_last, self.rank, self.world_size = keep_last, rank, world_size

    def save(self, engine, *, step: int, tokens: int, train_loader, config: dict) -> Path:
        """Write the checkpoint of ``step`` (a collective: every rank calls it)."""
        tag = tag_of(step)
        final, tmp = self.root / tag, self.root / f"{TMP}{tag}"
        if (final / META).is_file():  # nothing trained since this step's checkpoint was written
            return final
        if self.rank == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
        dist.barrier()
        if os.environ.get(CRASH_ENV) == str(step):
            _crash_after_first_file(engine)
        engine.save_checkpoint(str(self.root), tag=tmp.name, client_state={"step": step, "tokens": tokens},
                               save_latest=False)
        rank_state = {"rng": rng_state(), "train_loader": train_loader.state_dict()}
        torch.save(rank_state, tmp / f"rank_{self.rank:05d}.pt")
        dist.barrier()
        if self.rank == 0:
            meta = {"step": step, "tokens": tokens, "world_size": self.world_size, "config": config}
            atomic_write(tmp / META, json.dumps(meta, indent=1))
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            atomic_write(self.root / LATEST, tag)
            self._prune()
        dist.barrier()
        return final

    def _prune(self) -> None:
        """Keep the newest ``keep_last`` complete checkpoints; drop leftovers of interrupted saves."""
        for path in complete_checkpoints(self.root)[: -self.keep_last]:
            shutil.rmtree(path, ignore_errors=True)
        for path in self.root.glob(f"{TMP}*"):
            shutil.rmtree(path, ignore_errors=True)

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
    """Simulate a kill in the middle of a save: exit right after DeepSpeed wrote its first file."""
    checkpoint_engine = engine.checkpoint_engine
    save = checkpoint_engine.save

    def save_then_die(state_dict, path):
        save(state_dict, path)
        os._exit(86)

    checkpoint_engine.save = save_then_die


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


def export_model(module: torch.nn.Module, model_cfg: ModelConfig, path: Path, task: dict | None = None) -> None:
    """Write ``model.pt`` = {config, state_dict, and the task's ``task`` / ``task_config`` (a language model
    has none)} atomically on rank 0 (every rank must call it)."""
    state = full_state_dict(module)
    if state is None:
        return
    tmp = path.with_name(f".{path.name}.tmp")
    blob = {"format": "titans_scale.model/1", "config": to_dict(model_cfg), **(task or {}), "state_dict": state}
    torch.save(blob, tmp)
    os.replace(tmp, path)


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
    model, cfg = model_from_blob(blob)
    model.load_state_dict(blob["state_dict"])
    return model.to(device).eval(), cfg
