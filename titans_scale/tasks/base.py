"""What the engine asks of a task: check its data, build its model and loaders, size it, export it."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch
    from torch import nn


class Task:
    """One kind of training run. The engine is the same for every task: a task supplies the model (whose
    ``loss(*batch)`` DeepSpeed backpropagates), the data of one data-parallel rank (loaders with
    ``state_dict`` / ``load_state_dict`` for exact resumption) and what the model file must hold."""

    name = ""

    def check(self, cfg, build: bool) -> None:
        """The data can be read and fits the recipe (ConfigError otherwise); ``build``: this process may
        create the generated data (rank 0, before the others check)."""
        raise NotImplementedError

    def build_model(self, cfg) -> nn.Module:
        """The plain single-process model, the same on every rank for the same seed."""
        raise NotImplementedError

    def loaders(self, cfg, *, micro_batch: int, dp_rank: int, dp_size: int, seed: int):
        """(train loader, validation loader) of one data-parallel rank; iterating one is one epoch."""
        raise NotImplementedError

    def on_device(self, batch, device: torch.device) -> tuple:
        """A batch of the loaders as the positional arguments of ``model.loss``, on ``device``."""
        return tuple(t.to(device, non_blocking=True) for t in batch)

    def stats(self, cfg) -> tuple[int, float]:
        """(parameters, forward FLOPs per token of ``train.global_batch_tokens``), for the plan and MFU."""
        raise NotImplementedError

    def export(self, cfg) -> dict:
        """What ``model.pt`` holds besides the model config and weights, to rebuild the model from it."""
        return {"task": self.name, "task_config": {}}

    def model_from_export(self, model_cfg, task_config: dict) -> nn.Module:
        """The model a ``model.pt`` of this task describes (weights not loaded)."""
        raise NotImplementedError

    def validation_metrics(self, loss: float) -> dict:
        """Extra numbers of a validation loss, for the log line and metrics.jsonl."""
        return {}

    def summary(self, loss: float) -> str:
        """The end-of-run words for the last validation loss."""
        return f"validation loss {loss:.4f}"

    def finish(self, model_path, cfg) -> str | None:
        """A line to print once the model is written (rank 0), or None."""
        return None
