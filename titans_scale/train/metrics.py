"""Progress and metrics of a run: a console line every few steps, ``metrics.jsonl`` and wandb (rank 0 only).

MFU = 3 x forward FLOPs per token (``model_stats``; forward + backward) x tokens/s / (peak FLOP/s per process
x processes). The default peak per process: 989e12 on a GPU (H100 dense bf16), and 180e9 on a CPU (what
large fp32 matrix products reach on 2 cores of the reference machine, design doc section 5); set
``train.peak_flops`` for other hardware.
"""

from __future__ import annotations

import json
import math
import os
import secrets
import time
from pathlib import Path

import torch

GPU_PEAK_FLOPS = 989e12
CPU_PEAK_FLOPS = 180e9


def default_peak_flops(device: torch.device) -> float:
    return GPU_PEAK_FLOPS if device.type == "cuda" else CPU_PEAK_FLOPS


def human(n: float) -> str:
    """12345 -> '12.3K'."""
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.1f}{unit}"
    return f"{n:.0f}"


def duration(seconds: float) -> str:
    """Seconds as h:mm:ss or m:ss."""
    seconds = int(max(0, seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def say(message: str) -> None:
    print(message, flush=True)


class RunLog:
    """What rank 0 reports during training; the other ranks hold an inert one (``enabled=False``)."""

    def __init__(self, *, enabled: bool, run_dir: Path, start_step: int, total_steps: int,
                 flops_per_token: float, peak_flops: float, wandb_cfg=None, config: dict | None = None,
                 metrics=None):
        self.enabled = enabled
        # what else a validation loss says (the task's): perplexity for a language model
        self.metrics = metrics or (lambda loss: {"val_ppl": math.exp(min(loss, 50.0))})
        self.start_step, self.total_steps = start_step, total_steps
        self.flops_per_token, self.peak_flops = flops_per_token, peak_flops
        self.path = Path(run_dir) / "metrics.jsonl"
        self.wandb = None
        self.started = self.last_time = time.time()
        self.last_step, self.last_tokens = start_step, None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._truncate_after(start_step)
        if wandb_cfg is not None and wandb_cfg.mode != "disabled":
            self.wandb = start_wandb(wandb_cfg, Path(run_dir), config or {})

    def _truncate_after(self, step: int) -> None:
        """A resumed run redoes the steps after its checkpoint: drop their old lines (atomically)."""
        if not self.path.exists():
            return
        keep = [line for line in self.path.read_text().splitlines() if line and json.loads(line).get("step", 0) <= step]
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text("".join(line + "\n" for line in keep))
        os.replace(tmp, self.path)

    def record(self, row: dict) -> None:
        """One JSON line in metrics.jsonl, and the same numbers to wandb."""
        if not self.enabled:
            return
        row = {"time": round(time.time(), 3), **row}
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in row.items() if k not in ("step", "time")}, step=row["step"])

    def train_step(self, step: int, loss: float, lr: float, tokens: int, log: bool) -> None:
        """Record a finished optimizer step (1-based ``step``); print a progress line when ``log``."""
        if not self.enabled:
            return
        row = {"step": step, "loss": loss, "lr": lr, "tokens": tokens}
        if log:
            now = time.time()
            if self.last_tokens is not None and now > self.last_time:
                rate = (tokens - self.last_tokens) / (now - self.last_time)
                mfu = 3 * self.flops_per_token * rate / self.peak_flops
                row.update(tokens_per_s=round(rate, 1), mfu=mfu)
                steps_left = self.total_steps - step
                eta = (now - self.last_time) / max(1, step - self.last_step) * steps_left
                speed = f" | {human(rate)} tok/s | MFU {100 * mfu:.2f}% | ETA {duration(eta)}"
            else:  # the first line of a run has no interval to measure
                speed = ""
            width = len(str(self.total_steps))
            say(f"[train] step {step:{width}d}/{self.total_steps} | loss {loss:.4f} | lr {lr:.2e}{speed} "
                f"| elapsed {duration(now - self.started)}")
            self.last_time, self.last_step, self.last_tokens = now, step, tokens
        self.record(row)

    def validation(self, step: int, loss: float) -> None:
        if not self.enabled:
            return
        extra = self.metrics(loss)
        words = "".join(f" | {name.replace('_', ' ')} {value:.2f}" for name, value in extra.items())
        say(f"[eval]  step {step}/{self.total_steps} | val loss {loss:.4f}{words}")
        self.record({"step": step, "val_loss": loss, **extra})

    def close(self) -> None:
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None


def start_wandb(wandb_cfg, run_dir: Path, config: dict):
    """A wandb run whose files stay in the run directory; one id per run directory, so a resume continues it."""
    wandb_dir = run_dir / "wandb"
    wandb_dir.mkdir(parents=True, exist_ok=True)
    for var in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        os.environ.setdefault(var, str(wandb_dir))
    os.environ.setdefault("WANDB_SILENT", "true")
    import wandb

    id_file = wandb_dir / "run_id"
    if not id_file.exists():
        id_file.write_text(secrets.token_hex(4))
    return wandb.init(
        project=wandb_cfg.project or "titans_scale", entity=wandb_cfg.entity, mode=wandb_cfg.mode,
        name=wandb_cfg.name or run_dir.name, id=id_file.read_text().strip(), resume="allow",
        dir=str(wandb_dir), config=config, settings=wandb.Settings(console="off", quiet=True),
    )
