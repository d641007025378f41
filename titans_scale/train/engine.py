"""The training engine: a task's model and data (language modelling on the streaming token path,
forecasting, classification: ``titans_scale/tasks``) and DeepSpeed ZeRO, run for N steps.

One optimizer step = ``grad_accum`` micro-batches of ``micro_batch`` sequences on each of ``dp`` data-parallel
ranks, ``global_batch_tokens`` tokens in all. DeepSpeed owns the optimizer (torch's AdamW unless the recipe
picks DeepSpeed's), the cosine schedule, gradient clipping, ZeRO partitioning and bf16; when the model is
split, the process groups are megatron-core's (``distributed.py``), so tensor and sequence parallelism
compose with ZeRO.
"""

from __future__ import annotations

import functools
import itertools
import logging
import math
import multiprocessing
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from omegaconf import OmegaConf
from torch import nn

from titans_scale.config import ConfigError, RunConfig, config_text, to_dict
from titans_scale.parallel import parallelize, validate_parallel

from .checkpoint import Checkpointer, atomic_write, check_resumable, export_model, find_checkpoint, resolve_resume
from .distributed import gradient_group, megatron_groups
from .faults import TrainingError, any_rank, first_error, non_finite
from .metrics import GradientNorms, RunLog, default_peak_flops, human, max_over_ranks, peak_memory, say
from .profile import step_profiler
from .requeue import RequeueHandler
from .schedule import build_scheduler, cosine_with_warmup


@dataclass
class Plan:
    """What a run will do, derived from its config and the world size before anything is built."""

    world_size: int
    dp_size: int
    seq_len: int
    micro_batch: int
    grad_accum: int
    total_steps: int
    tokens_per_step: int
    resume_from: Path | None  # the checkpoint to start from, None for a fresh start

    def describe(self) -> str:
        return (f"world {self.world_size} (dp {self.dp_size}) | {self.total_steps} steps of {human(self.tokens_per_step)} "
                f"tokens = {self.dp_size} dp x {self.grad_accum} accum x {self.micro_batch} seqs x {self.seq_len} tokens"
                + (f" | resuming from {self.resume_from}" if self.resume_from else ""))


def make_plan(cfg: RunConfig, world_size: int) -> Plan:
    """Batch arithmetic and the checkpoint to resume; every mismatch is a ConfigError naming the fix."""
    t = cfg.train
    seq_len = cfg.data.seq_len
    dp = validate_parallel(cfg.model, cfg.parallel, world_size, seq_len, t.zero_stage)  # heads / tp, chunks / sp, ...
    per_accum = t.micro_batch * seq_len * dp
    if t.global_batch_tokens % per_accum:
        lo = max(per_accum, t.global_batch_tokens // per_accum * per_accum)
        raise ConfigError(
            f"train.global_batch_tokens={t.global_batch_tokens} is not a multiple of train.micro_batch x data.seq_len x "
            f"data-parallel ranks = {t.micro_batch} x {seq_len} x {dp} = {per_accum}; use e.g. "
            f"train.global_batch_tokens={lo} (or {lo + per_accum}), or change nproc / train.micro_batch"
        )
    total = t.steps or math.ceil(t.tokens / t.global_batch_tokens)
    resume_from = resolve_resume(cfg.resume, Path(cfg.run_dir))
    if resume_from is not None:
        check_resumable(resume_from, to_dict(cfg), world_size)
    elif cfg.resume == "never" and find_checkpoint(Path(cfg.run_dir) / "checkpoints") is not None:
        raise ConfigError(f"run_dir {cfg.run_dir} already holds checkpoints; resume=auto continues them, "
                          f"or choose another run_dir")
    return Plan(world_size, dp, seq_len, t.micro_batch, t.global_batch_tokens // per_accum, total,
                t.global_batch_tokens, resume_from)


def check_data(cfg: RunConfig, *, build: bool) -> None:
    """The data can be read and matches the recipe (the task's check, a ConfigError otherwise); ``build``:
    this process may create the default data (the bundled sample's shards, a generated series or genome)."""
    from titans_scale.tasks import get_task

    get_task(cfg.task).check(cfg, build)


def agreed(fn, world):
    """``fn(True)`` on rank 0, then ``fn(False)`` on the other ranks once rank 0 passed. A ConfigError on any
    rank stops every rank with that rank's message, so no rank waits at a collective forever."""
    result = None
    for mine in (world.rank == 0, world.rank != 0):
        error = None
        if mine:
            try:
                result = fn(world.rank == 0)
            except ConfigError as e:
                error = str(e)
        errors = [None] * world.world_size
        dist.all_gather_object(errors, error)
        first = next((e for e in errors if e is not None), None)
        if first is not None:
            raise ConfigError(first)
    return result


class Objective(nn.Module):
    """The model under training, seen by DeepSpeed: forward(*batch) is the loss it backpropagates
    (``model.loss(tokens)`` for language modelling, ``model.loss(window, target)`` for forecasting, ...).
    ``weights(tokens)``, when given, weights each next-token target (a synthetic task's answers only)."""

    def __init__(self, model: nn.Module, weights=None):
        super().__init__()
        self.model = model
        self.weights = weights

    def forward(self, *batch: torch.Tensor) -> torch.Tensor:
        if self.weights is None:
            return self.model.loss(*batch)
        return self.model.loss(*batch, self.weights(batch[0]))


NextTokenObjective = Objective  # the language model's objective, by its former name


def target_weights(cfg: RunConfig):
    """The objective's per-target weights: a synthetic task's answers (``data.synthetic.loss=answers``), else None."""
    task = cfg.data.synthetic
    if cfg.task != "lm" or not task.task or task.loss != "answers":
        return None
    from titans_scale.data.synthetic import answer_weights

    return functools.partial(answer_weights, cfg=task, vocab=cfg.data.vocab_size)


def decays(name: str, param: torch.Tensor) -> bool:
    """Weight decay on matrices (projections, embeddings, persistent tokens, the memory's initial weights and
    convolution); none on vectors (biases, norm gains) nor on normalisation parameters of any shape (the
    memory's per-head LayerNorm is (heads, d)), recognised by their names: ``*norm*`` or ``ln_*``."""
    is_norm = any("norm" in part or part.startswith("ln_") for part in name.split("."))
    return param.dim() >= 2 and not is_norm


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (decay if decays(name, param) else no_decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def uses_bf16(cfg: RunConfig, device: torch.device) -> bool:
    return cfg.train.precision == "bf16" or (cfg.train.precision == "auto" and device.type == "cuda")


def deepspeed_config(cfg: RunConfig, plan: Plan, bf16: bool) -> dict:
    t = cfg.train
    ds = {
        "train_micro_batch_size_per_gpu": t.micro_batch,
        "gradient_accumulation_steps": plan.grad_accum,
        "gradient_clipping": t.grad_clip,
        "zero_optimization": {"stage": t.zero_stage},
        "bf16": {"enabled": bf16},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }
    if t.optimizer == "deepspeed_adamw":
        ds["optimizer"] = {"type": "AdamW", "params": {"lr": t.lr, "betas": [t.beta1, t.beta2], "eps": t.eps,
                                                       "weight_decay": t.weight_decay}}
    return ds


def build_engine(model: nn.Module, cfg: RunConfig, plan: Plan, device: torch.device):
    """``deepspeed.initialize`` with our optimizer, schedule and (when built) megatron-core's groups."""
    import deepspeed
    from deepspeed.utils import logger as ds_logger

    ds_logger.setLevel(logging.WARNING)
    t = cfg.train
    groups = parameter_groups(model, t.weight_decay)
    optimizer = None
    if t.optimizer == "torch_adamw":
        optimizer = torch.optim.AdamW(groups, lr=t.lr, betas=(t.beta1, t.beta2), eps=t.eps, weight_decay=t.weight_decay)
    schedule = dict(total_steps=plan.total_steps, warmup_steps=t.warmup_steps, lr=t.lr, min_lr=t.min_lr)
    engine, *_ = deepspeed.initialize(
        model=NextTokenObjective(model, target_weights(cfg)).to(device),
        optimizer=optimizer,
        model_parameters=groups if optimizer is None else None,
        lr_scheduler=lambda opt: build_scheduler(opt, **schedule),
        config=deepspeed_config(cfg, plan, uses_bf16(cfg, device)),
        mpu=megatron_groups(),
        dist_init_required=False,
    )
    return engine


def batches(loader):
    """Endless token batches from a loader: a new epoch starts when one ends."""
    while True:
        yield from loader


def mean_over(values: torch.Tensor, group) -> float:
    """The mean of a scalar over the ranks of ``group``."""
    values = values.detach().float().reshape(1).clone()
    dist.all_reduce(values, group=group)
    return values.item() / dist.get_world_size(group)


class Trainer:
    """One run on this rank: the DeepSpeed engine, the data, checkpoints and the log."""

    def __init__(self, cfg: RunConfig, plan: Plan, world):
        from titans_scale import data
        from titans_scale.tasks import get_task, model_name

        self.cfg, self.plan, self.world = cfg, plan, world
        self.task = get_task(cfg.task)
        self.run_dir = Path(cfg.run_dir)
        self.config_dict = to_dict(cfg)
        torch.manual_seed(cfg.train.seed)  # the same initial weights on every rank
        # every rank builds the same plain model (same seed), then keeps its TP shards and SP slice
        self.model = parallelize(self.task.build_model(cfg), cfg.parallel)
        self.engine = build_engine(self.model, cfg, plan, world.device)
        self.dp_group = gradient_group()
        self.checkpointer = Checkpointer(self.run_dir, cfg.train.keep_last, world.rank, world.world_size)
        self.step, self.tokens = 0, 0
        self.batch_iter = None
        try:  # every rank sees the same data errors, so every rank stops
            self.train_loader, self.val_loader = self.task.loaders(
                cfg, micro_batch=cfg.train.micro_batch, dp_rank=world.dp_rank, dp_size=world.dp_size, seed=cfg.train.seed)
            if plan.resume_from is not None:
                plan.resume_from = self.checkpointer.verified(plan.resume_from, fall_back=cfg.resume == "auto",
                                                              say=say if world.is_main else lambda line: None)
                check_resumable(plan.resume_from, self.config_dict, world.world_size)
                self.step, self.tokens = self.checkpointer.load(self.engine, plan.resume_from, self.train_loader)
        except data.DataError as e:
            raise ConfigError(str(e).splitlines()[0]) from None
        self.val_batches = None  # the first eval_batches batches of the validation split, read once
        if world.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            atomic_write(self.run_dir / "config.yaml", OmegaConf.to_yaml(OmegaConf.create(self.config_dict)))
        params, flops_per_token = self.task.stats(cfg)
        peak = cfg.train.peak_flops or default_peak_flops(world.device)
        if world.is_main:
            say(f"[setup] {cfg.recipe}: {model_name(cfg)} model, {human(params)} parameters | {plan.describe()} "
                f"| ZeRO-{cfg.train.zero_stage} | {'bf16' if uses_bf16(cfg, world.device) else 'fp32'} on "
                f"{world.device.type} | run_dir {self.run_dir}")
        self.log = RunLog(enabled=world.is_main, run_dir=self.run_dir, start_step=self.step, total_steps=plan.total_steps,
                          flops_per_token=flops_per_token, peak_flops=peak * world.world_size,
                          tokens_per_step=plan.tokens_per_step, wandb_cfg=cfg.wandb, config=self.config_dict,
                          metrics=self.task.validation_metrics)
        self.profiler = step_profiler(cfg.train.profile, self.run_dir, world.rank, plan.total_steps - self.step,
                                      world.device, self.step)
        groups = megatron_groups()
        self.grad_norms = GradientNorms(self.model, dp_rank=groups.get_data_parallel_rank() if groups else world.rank,
                                        tp_rank=groups.get_tensor_model_parallel_rank() if groups else 0)
        self.last_grad_norms: dict[str, float] | None = None

    def train_step(self, batch_iter) -> float:
        """One optimizer step over grad_accum micro-batches; returns the mean loss over micro-batches and ranks.
        The gradient norms (``last_grad_norms``) are read after the last backward, before the optimizer step."""
        engine = self.engine
        total = torch.zeros((), device=self.world.device)
        for micro in range(self.plan.grad_accum):
            loss = engine(*self.task.on_device(next(batch_iter), self.world.device))
            engine.backward(loss)
            if micro == self.plan.grad_accum - 1:
                self.last_grad_norms = self.grad_norms.measure(self.world.device)
            engine.step()
            total += loss.detach().float()
        return mean_over(total / self.plan.grad_accum, self.dp_group)

    def check_finite(self, loss: float) -> None:
        """Stop every rank at the first step whose loss or gradient is not finite, before anything of it is
        logged, saved or exported (one all-reduce per step)."""
        mine = non_finite(loss, self.engine.get_global_grad_norm())
        if any_rank(mine is not None, self.world.device):
            what = first_error(mine)
            raise TrainingError(
                f"non-finite {what} at step {self.step}: stopped before saving anything of it; "
                f"{self.checkpointer.previous_note()}; lower train.lr, raise train.warmup_steps or set train.grad_clip")

    @torch.no_grad()
    def validate(self) -> float:
        """Mean validation loss over the first eval_batches micro-batches of every data-parallel rank."""
        if self.val_batches is None:  # at most one epoch of the validation split
            self.val_batches = list(itertools.islice(iter(self.val_loader), self.cfg.train.eval_batches))
        self.engine.eval()
        total = torch.zeros((), device=self.world.device)
        for batch in self.val_batches:
            total += self.engine(*self.task.on_device(batch, self.world.device)).float()
        self.engine.train()
        return mean_over(total / max(1, len(self.val_batches)), self.dp_group)

    def save(self) -> None:
        self.checkpointer.save(self.engine, step=self.step, tokens=self.tokens, train_loader=self.train_loader,
                               config=self.config_dict)

    def fit(self, stop=None) -> dict:
        """Train to the last step, validating and saving on schedule; validate once more at the end. With a
        ``RequeueHandler`` (``stop``), the ranks check after every step whether the job is ending; if so they
        save a checkpoint together and return early with ``stopped`` set to the signal."""
        t, plan = self.cfg.train, self.plan

        def due(every: int) -> bool:  # a periodic event at this step (the last step has its own)
            return bool(every) and self.step % every == 0 and self.step < plan.total_steps

        result = {"first_val_loss": None, "val_loss": None, "stopped": None}
        if self.step == 0 and t.eval_batches:
            result["first_val_loss"] = self.validate()
            self.log.validation(0, result["first_val_loss"])
        self.batch_iter = batch_iter = batches(self.train_loader)
        self.engine.train()
        while self.step < plan.total_steps:
            started = time.perf_counter()
            loss = self.train_step(batch_iter)
            self.profiler.step()
            seconds = time.perf_counter() - started
            self.step += 1
            self.check_finite(loss)
            self.tokens += plan.tokens_per_step
            lr = cosine_with_warmup(self.step - 1, total_steps=plan.total_steps, warmup_steps=t.warmup_steps,
                                    lr=t.lr, min_lr=t.min_lr)
            self.log.train_step(self.step, loss, lr, self.tokens,
                                log=self.step % t.log_every == 0 or self.step == plan.total_steps, seconds=seconds,
                                grad_norms=self.last_grad_norms, grad_clip=t.grad_clip,
                                peak_bytes=int(max_over_ranks(peak_memory(self.world.device), self.world.device)))
            if due(t.eval_every) and t.eval_batches:
                self.log.validation(self.step, self.validate())
            if due(t.checkpoint_every):
                self.save()
            if stop is not None and stop.agree(self.world.device) and self.step < plan.total_steps:
                if self.world.is_main:
                    say(f"[stop]  {stop.reason}: saving a checkpoint at step {self.step}/{plan.total_steps}")
                self.save()  # (a no-op if this step's checkpoint was just written)
                return {**result, "stopped": stop.stopped, "step": self.step, "tokens": self.tokens}
        if t.eval_batches:
            result["val_loss"] = self.validate()
            self.log.validation(self.step, result["val_loss"])
        return {**result, "step": self.step, "tokens": self.tokens}

    def finish(self) -> None:
        """model.pt (for evaluation and generation), the final checkpoint, then (rank 0) a short sample.
        The model file comes first: a run killed while saving its last checkpoint has already exported
        the finished weights, and its resume rewrites the same file."""
        path = self.run_dir / "model.pt"
        if self.cfg.train.export:
            export_model(self.model, self.cfg.model, path, None if self.cfg.task == "lm" else self.task.export(self.cfg))
            if self.world.is_main:
                say(f"[done]  model written to {path}")
        self.save()
        if self.world.is_main and self.cfg.train.export:
            line = self.task.finish(path, self.cfg)
            if line:
                say(line)

    def close(self) -> None:
        """Stop the data loader's worker processes now (after a failure the traceback would keep them, and
        at exit they would be asked to stop by a SIGTERM they ignore, see data/loader.py), close the log."""
        if self.batch_iter is not None:
            self.batch_iter.close()
        trace = self.profiler.close()
        if trace is not None and self.world.is_main:
            first, last = self.profiler.steps
            say(f"[profile] steps {first}-{last} traced into {trace} (open it in https://ui.perfetto.dev or "
                f"chrome://tracing); the slowest operators in {trace.parent / 'ops_rank0.txt'}")
        self.log.close()


def draw_curves(run_dir: Path) -> str:
    """The loss and perplexity curves of the run, drawn beside metrics.jsonl (a line saying where, or why not)."""
    from titans_scale.eval.curves import plot_curves

    try:
        return f"[done]  curves in {plot_curves(run_dir)} (redraw: python -m titans_scale.eval curves {run_dir})"
    except Exception as e:  # a picture is not worth failing a finished run for
        return f"[done]  curves not drawn ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"


def checked_plan(cfg: RunConfig, world, lock=None) -> Plan:
    """``check_data`` and ``make_plan`` on every rank, rank 0 first (it takes the run directory's ``lock``
    when given, and builds missing sample data)."""

    def check(first: bool) -> Plan:
        if first and lock is not None:
            note = lock.acquire()
            if note:
                say(note)
        check_data(cfg, build=first)
        return make_plan(cfg, world.world_size)

    return agreed(check, world)


def stop_leftover_workers() -> None:
    """Kill the data-loader workers a failure left mid-batch (a traceback still holds their loader). They ignore
    SIGTERM (data/loader.py), so at exit multiprocessing would wait for them forever. torch's SIGCHLD handler
    is dropped first: it would raise "DataLoader worker is killed" over the failure being reported."""
    children = multiprocessing.active_children()
    if children:
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        for child in children:
            child.kill()
            child.join()


def train(cfg: RunConfig) -> dict:
    """The main job, on every rank: join the groups, check, train, validate, save, export, sample, leave.
    Returns the step, tokens, first and last validation loss, and ``stopped``: the signal a Slurm job's end
    stopped the run on (after a checkpoint), or None when it finished."""
    from titans_scale.tasks import get_task

    from .distributed import init_distributed, shutdown

    from .rundir import RunLock

    world = init_distributed(cfg.parallel, timeout_s=cfg.train.collective_timeout_s)
    lock = RunLock(cfg.run_dir) if world.is_main and not RunLock.held_for_me() else None  # torchrun, srun
    try:
        if world.is_main:
            say(config_text(cfg))
        plan = checked_plan(cfg, world, lock)
        started = time.time()
        with RequeueHandler() as stop:  # before the loaders fork their workers: they inherit the handlers
            trainer = Trainer(cfg, plan, world)
            try:
                result = trainer.fit(stop)
                if result["stopped"] is None:
                    trainer.finish()
            finally:
                trainer.close()
            if result["stopped"] is not None:
                if world.is_main:
                    say(stop.requeue())  # submitit's handler, if it held the signal, requeues and exits here
                return result
        if world.is_main:
            summary = f"[done]  {result['step']} steps, {human(result['tokens'])} tokens in {time.time() - started:.0f} s"
            if result["val_loss"] is not None:
                summary += f" | {get_task(cfg.task).summary(result['val_loss'])}"
            say(summary)
            say(draw_curves(Path(cfg.run_dir)))
        return result
    except ConfigError as e:  # said here, before leaving the groups: a launcher may stop this rank once another exits
        if world.is_main:
            print(f"error: {e}", file=sys.stderr, flush=True)
        e.reported = True
        raise
    finally:
        stop_leftover_workers()
        if lock is not None:
            lock.release()
        shutdown()
