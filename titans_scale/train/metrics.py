"""Progress and metrics of a run: a console line every few steps, ``metrics.jsonl`` and wandb (rank 0 only).

Every step records its loss, learning rate, tokens, tokens/s and MFU, the gradient norm before clipping in total
and per module group (``GradientNorms``: memory branch, attention, MLP, embeddings, other) and the peak memory of
the processes (``peak_memory``: allocated GPU memory, or resident memory on a CPU), the largest over the ranks.

MFU = 3 x forward FLOPs per token (``model_stats``; forward + backward) x tokens/s / (peak FLOP/s per process
x processes). The default peak per process: 989e12 on a GPU (H100 dense bf16), and 180e9 on a CPU (what
large fp32 matrix products reach on 2 cores of the reference machine, design doc section 5); set
``train.peak_flops`` for other hardware.
"""

from __future__ import annotations

import json
import math
import os
import resource
import secrets
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

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


def peak_memory(device: torch.device) -> int:
    """Bytes at this process's peak so far: allocated GPU memory (``torch.cuda.max_memory_allocated``), or on a
    CPU the resident set (``ru_maxrss``: the whole process, so it includes the interpreter and libraries)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024  # bytes on macOS, KiB on Linux


def local_gradient(param: torch.Tensor) -> tuple[torch.Tensor | None, bool]:
    """The part of ``param``'s data-parallel averaged gradient that this rank holds between DeepSpeed's last
    backward of a step and its optimizer step, and whether it is a partition (ZeRO 1-3 and the bf16 optimizer
    split it over the data-parallel ranks) rather than the whole gradient (ZeRO 0). The same cases, in the
    same order, as ``deepspeed.utils.safe_get_full_grad``, without its all-reduce per parameter."""
    mapping = getattr(param, "_hp_mapping", None)
    if getattr(param, "_hp_grad", None) is not None or (param.grad is None and hasattr(param, "_hp_mapping")):
        if mapping is None:  # no fragment of this parameter in this rank's partition
            return None, True
        fragment = mapping.get_lp_grad_fragment(param._index_in_param_group).flatten()
        address = mapping.lp_fragment_address
        if fragment.numel() == param.numel() and address.numel != param.numel():  # a whole buffer (bf16 optimizer)
            fragment = fragment.narrow(0, address.start, address.numel)
        return fragment, True
    if param.grad is not None:
        return param.grad, False
    if hasattr(param, "ds_id"):  # ZeRO-3
        return param._z3_optimizer.get_local_fp32_grad_for_param(param), True
    return None, True


class GradientNorms:
    """The L2 norm of a step's gradient, in total and per module group (``models.stats.module_groups``).

    ``measure`` runs on every rank between the last backward of a step and the optimizer step. Each element of
    the gradient counts once in the world: a ZeRO partition on the rank that holds it, a whole gradient on
    data-parallel rank 0 only, a tensor-parallel shard on every TP rank and a replicated parameter on TP rank 0
    only (the rule of DeepSpeed's own clipping norm); one all-reduce of a few numbers sums them."""

    def __init__(self, model: torch.nn.Module, dp_rank: int, tp_rank: int):
        from titans_scale.models.stats import MODULE_GROUPS, module_groups

        owner = module_groups(model)
        self.groups = [g for g in MODULE_GROUPS if g in owner.values()]
        self.params = [(p, self.groups.index(owner[n])) for n, p in model.named_parameters() if p.requires_grad]
        self.dp_rank, self.tp_rank = dp_rank, tp_rank

    def measure(self, device: torch.device) -> dict[str, float]:
        """``{"total": norm, group: norm, ...}``; a collective: every rank calls it."""
        grads, index = [], []
        for param, group in self.params:
            grad, partitioned = local_gradient(param)
            counted = (partitioned or self.dp_rank == 0) and (self.tp_rank == 0 or getattr(param, "tensor_model_parallel", False))
            if grad is not None and counted and grad.numel():
                grads.append(grad.float())
                index.append(group)
        squares = torch.zeros(len(self.groups), dtype=torch.float64, device=device)
        if grads:
            norms = torch.stack(torch._foreach_norm(grads)).double()
            squares.index_add_(0, torch.tensor(index, device=device), norms * norms)
        if dist.is_initialized():
            dist.all_reduce(squares)
        values = squares.tolist()
        return {"total": math.sqrt(sum(values)), **{g: math.sqrt(v) for g, v in zip(self.groups, values)}}


def max_over_ranks(value: float, device: torch.device) -> float:
    """The largest ``value`` of any rank (a collective: every rank calls it)."""
    if not dist.is_initialized():
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()


def gradient_summary(norms: dict[str, float]) -> str:
    """'0.881 (mem 3% att 10% mlp 0% emb 87% oth 0%)': the norm and each group's share of its square (the same
    shares after clipping, which scales every gradient alike)."""
    total = norms["total"] or 1.0
    shares = " ".join(f"{g[:3]} {100 * v * v / (total * total):.0f}%" for g, v in norms.items() if g != "total")
    return f"{norms['total']:.3g} ({shares})"


class RunLog:
    """What rank 0 reports during training; the other ranks hold an inert one (``enabled=False``)."""

    def __init__(self, *, enabled: bool, run_dir: Path, start_step: int, total_steps: int,
                 flops_per_token: float, peak_flops: float, tokens_per_step: int = 0, wandb_cfg=None,
                 config: dict | None = None, metrics=None):
        self.enabled = enabled
        self.tokens_per_step = tokens_per_step
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

    def train_step(self, step: int, loss: float, lr: float, tokens: int, log: bool, *, seconds: float,
                   grad_norms: dict[str, float] | None = None, grad_clip: float = 0.0, peak_bytes: int = 0) -> None:
        """Record a finished optimizer step (1-based ``step``) that took ``seconds``; print a progress line when
        ``log``. The row's tokens/s and MFU are this step's; the progress line's cover the steps since the
        last line (with the validations and checkpoints between them, so that the ETA holds)."""
        if not self.enabled:
            return
        rate = self.tokens_per_step / seconds if seconds > 0 else 0.0
        row = {"step": step, "loss": loss, "lr": lr, "tokens": tokens, "tokens_per_s": round(rate, 1),
               "mfu": 3 * self.flops_per_token * rate / self.peak_flops}
        if grad_norms is not None:
            row["grad_norm"] = grad_norms["total"]
            row.update({f"grad_norm/{g}": v for g, v in grad_norms.items() if g != "total"})
            if grad_clip > 0:
                row["clip_coef"] = min(1.0, grad_clip / max(grad_norms["total"], 1e-30))
        if peak_bytes:
            row["peak_memory_gb"] = round(peak_bytes / 1e9, 4)
        if log:
            now = time.time()
            if self.last_tokens is not None and now > self.last_time:
                rate = (tokens - self.last_tokens) / (now - self.last_time)
                mfu = 3 * self.flops_per_token * rate / self.peak_flops
                eta = (now - self.last_time) / max(1, step - self.last_step) * (self.total_steps - step)
                speed = f" | {human(rate)} tok/s | MFU {100 * mfu:.2f}% | ETA {duration(eta)}"
            else:  # the first line of a run: only this step to measure
                speed = f" | {human(rate)} tok/s"
            grad = f" | grad {gradient_summary(grad_norms)}" if grad_norms is not None else ""
            memory = f" | peak mem {peak_bytes / 1e9:.2f} GB" if peak_bytes else ""
            width = len(str(self.total_steps))
            say(f"[train] step {step:{width}d}/{self.total_steps} | loss {loss:.4f} | lr {lr:.2e}{grad}{speed}{memory} "
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
