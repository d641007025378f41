"""The training engine: a model from the zoo, the streaming data path and DeepSpeed ZeRO, run for N steps.

One optimizer step = ``grad_accum`` micro-batches of ``micro_batch`` sequences on each of ``dp`` data-parallel
ranks, ``global_batch_tokens`` tokens in all. DeepSpeed owns the optimizer (torch's AdamW unless the recipe
picks DeepSpeed's), the cosine schedule, gradient clipping, ZeRO partitioning and bf16; when the model is
split, the process groups are megatron-core's (``distributed.py``), so tensor and sequence parallelism
compose with ZeRO.
"""

from __future__ import annotations

import itertools
import logging
import math
import multiprocessing
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from omegaconf import OmegaConf
from torch import nn

from titans_scale.config import ConfigError, RunConfig, to_dict
from titans_scale.parallel import parallelize, validate_parallel

from .checkpoint import Checkpointer, atomic_write, check_resumable, export_model, find_checkpoint, resolve_resume
from .distributed import gradient_group
from .faults import TrainingError, any_rank, first_error, non_finite
from .metrics import RunLog, default_peak_flops, human, say
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
    """The data can be read and matches the recipe: builds the bundled sample data when it is the default
    and missing (``build``), then checks that the shards were made with the recipe's tokenizer and that the
    model's vocabulary holds the tokenizer's."""
    from titans_scale import data
    from titans_scale.data.config import resolve_data_dir, resolve_tokenizer

    try:
        if build:
            data.ensure_default_data(cfg.data)
        tokenizer = data.Tokenizer(resolve_tokenizer(cfg.data))
        if not cfg.data.remote:  # remote shards are checked by the loader once their metadata is fetched
            data.check_shards(resolve_data_dir(cfg.data), tokenizer, verify="none")
    except ConfigError:
        raise
    except (ValueError, OSError) as e:
        raise ConfigError(str(e).splitlines()[0]) from None
    if tokenizer.vocab_size > cfg.model.vocab_size:
        raise ConfigError(f"model.vocab_size={cfg.model.vocab_size} is smaller than the tokenizer's {tokenizer.vocab_size} "
                          f"tokens; set model.vocab_size={tokenizer.vocab_size}")


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


class NextTokenObjective(nn.Module):
    """The model under training, seen by DeepSpeed: forward(tokens) is the loss it backpropagates."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model.loss(tokens)


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

    from .distributed import megatron_groups

    ds_logger.setLevel(logging.WARNING)
    t = cfg.train
    groups = parameter_groups(model, t.weight_decay)
    optimizer = None
    if t.optimizer == "torch_adamw":
        optimizer = torch.optim.AdamW(groups, lr=t.lr, betas=(t.beta1, t.beta2), eps=t.eps, weight_decay=t.weight_decay)
    schedule = dict(total_steps=plan.total_steps, warmup_steps=t.warmup_steps, lr=t.lr, min_lr=t.min_lr)
    engine, *_ = deepspeed.initialize(
        model=NextTokenObjective(model).to(device),
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
        from titans_scale.models import build_model, model_stats

        self.cfg, self.plan, self.world = cfg, plan, world
        self.run_dir = Path(cfg.run_dir)
        self.config_dict = to_dict(cfg)
        torch.manual_seed(cfg.train.seed)  # the same initial weights on every rank
        # every rank builds the same plain model (same seed), then keeps its TP shards and SP slice
        self.model = parallelize(build_model(cfg.model), cfg.parallel)
        self.engine = build_engine(self.model, cfg, plan, world.device)
        self.dp_group = gradient_group()
        loader_args = dict(micro_batch=cfg.train.micro_batch, dp_rank=world.dp_rank, dp_size=world.dp_size,
                           timeout_s=cfg.train.collective_timeout_s)
        self.checkpointer = Checkpointer(self.run_dir, cfg.train.keep_last, world.rank, world.world_size)
        self.step, self.tokens = 0, 0
        self.batch_iter = None
        try:  # every rank sees the same data errors, so every rank stops
            self.train_loader = data.build_train_loader(cfg.data, seed=cfg.train.seed, **loader_args)
            self.val_loader = data.build_val_loader(cfg.data, **loader_args)
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
        params, flops_per_token = model_stats(cfg.model, plan.seq_len)
        peak = cfg.train.peak_flops or default_peak_flops(world.device)
        if world.is_main:
            say(f"[setup] {cfg.recipe}: {cfg.model.variant} model, {human(params)} parameters | {plan.describe()} "
                f"| ZeRO-{cfg.train.zero_stage} | {'bf16' if uses_bf16(cfg, world.device) else 'fp32'} on "
                f"{world.device.type} | run_dir {self.run_dir}")
        self.log = RunLog(enabled=world.is_main, run_dir=self.run_dir, start_step=self.step, total_steps=plan.total_steps,
                          flops_per_token=flops_per_token, peak_flops=peak * world.world_size,
                          wandb_cfg=cfg.wandb, config=self.config_dict)

    def train_step(self, batch_iter) -> float:
        """One optimizer step over grad_accum micro-batches; returns the mean loss over micro-batches and ranks."""
        engine = self.engine
        total = torch.zeros((), device=self.world.device)
        for _ in range(self.plan.grad_accum):
            tokens = next(batch_iter).to(self.world.device, torch.long, non_blocking=True)
            loss = engine(tokens)
            engine.backward(loss)
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
        for tokens in self.val_batches:
            total += self.engine(tokens.to(self.world.device, torch.long)).float()
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
            loss = self.train_step(batch_iter)
            self.step += 1
            self.check_finite(loss)
            self.tokens += plan.tokens_per_step
            lr = cosine_with_warmup(self.step - 1, total_steps=plan.total_steps, warmup_steps=t.warmup_steps,
                                    lr=t.lr, min_lr=t.min_lr)
            self.log.train_step(self.step, loss, lr, self.tokens,
                                log=self.step % t.log_every == 0 or self.step == plan.total_steps)
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
            export_model(self.model, self.cfg.model, path)
            if self.world.is_main:
                say(f"[done]  model written to {path}")
        self.save()
        if self.world.is_main and self.cfg.train.export and self.cfg.train.sample_tokens:
            say(f"[sample] {sample_text(path, self.cfg)!r}")

    def close(self) -> None:
        """Stop the data loader's worker processes now (after a failure the traceback would keep them, and
        at exit they would be asked to stop by a SIGTERM they ignore, see data/loader.py), close the log."""
        if self.batch_iter is not None:
            self.batch_iter.close()
        self.log.close()


def sample_text(model_path: Path, cfg: RunConfig) -> str:
    """A short continuation of ``train.sample_prompt`` by the exported model (seeded, top-k sampling)."""
    from titans_scale import data
    from titans_scale.data.config import resolve_tokenizer
    from titans_scale.models import generate

    from .checkpoint import load_model

    model, _ = load_model(model_path)
    tokenizer = data.Tokenizer(resolve_tokenizer(cfg.data))
    prompt = torch.tensor(tokenizer.encode(cfg.train.sample_prompt), dtype=torch.long)
    generator = torch.Generator().manual_seed(cfg.train.seed)
    out = generate(model, prompt, cfg.train.sample_tokens, temperature=0.8, top_k=40, generator=generator)
    return tokenizer.decode(out.tolist())


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
    from .distributed import init_distributed, shutdown

    from .rundir import RunLock

    world = init_distributed(cfg.parallel, timeout_s=cfg.train.collective_timeout_s)
    lock = RunLock(cfg.run_dir) if world.is_main and not RunLock.held_for_me() else None  # torchrun, srun
    try:
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
                ppl = math.exp(min(result["val_loss"], 50.0))
                summary += f" | validation loss {result['val_loss']:.4f} | perplexity {ppl:.2f}"
            say(summary)
        return result
    finally:
        stop_leftover_workers()
        if lock is not None:
            lock.release()
        shutdown()
