"""The learning-rate schedule: linear warmup to the peak, then a cosine down to the minimum."""

from __future__ import annotations

import math

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR


def cosine_with_warmup(step: int, *, total_steps: int, warmup_steps: int, lr: float, min_lr: float) -> float:
    """The learning rate of optimizer step ``step`` (0-based): lr * (step + 1) / warmup during the warmup,
    then min_lr + (lr - min_lr) * (1 + cos(pi * progress)) / 2 with progress going from 0 to 1."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


class CosineWithWarmup:
    """The schedule as a LambdaLR factor (a picklable object, so the scheduler's state can be saved)."""

    def __init__(self, total_steps: int, warmup_steps: int, lr: float, min_lr: float):
        self.total_steps, self.warmup_steps, self.lr, self.min_lr = total_steps, warmup_steps, lr, min_lr

    def __call__(self, step: int) -> float:
        kw = dict(total_steps=self.total_steps, warmup_steps=self.warmup_steps, lr=self.lr, min_lr=self.min_lr)
        return cosine_with_warmup(step, **kw) / self.lr


def build_scheduler(optimizer: Optimizer, *, total_steps: int, warmup_steps: int, lr: float, min_lr: float) -> LambdaLR:
    """A scheduler that DeepSpeed steps once per optimizer step (param groups must start at ``lr``)."""
    return LambdaLR(optimizer, CosineWithWarmup(total_steps, warmup_steps, lr, min_lr))


def move_to(scheduler: LambdaLR, step: int) -> None:
    """Put a scheduler at optimizer step ``step`` of its own schedule. A resumed run does this instead of
    loading the saved scheduler, so the schedule is the one of the run's current config (a run can be
    extended by raising train.steps); with an unchanged config the learning rates are the same."""
    scheduler.last_epoch = step
    values = [base * factor(step) for base, factor in zip(scheduler.base_lrs, scheduler.lr_lambdas)]
    for group, value in zip(scheduler.optimizer.param_groups, values):
        group["lr"] = value
    scheduler._last_lr = values
