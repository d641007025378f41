"""What a run trains, on the one engine: ``task=lm`` (next-token language modelling: text, or DNA with
``data.alphabet=dna``), ``task=forecast`` (long-term time-series forecasting) or ``task=classify``
(sequence classification of DNA). Each task supplies its data, model and model-file contents
(``base.Task``); the engine, parallelism, checkpoints and launch are the same for all."""

from __future__ import annotations

from .base import Task
from .config import TASKS, ClassifyConfig, ForecastConfig, validate_task_config


def get_task(name: str) -> Task:
    """The task of ``task=name``."""
    if name == "forecast":
        from .forecast import Forecasting

        return Forecasting()
    if name == "classify":
        from .classify import Classification

        return Classification()
    if name == "lm":
        from .lm import LanguageModelling

        return LanguageModelling()
    raise ValueError(f"task={name!r} is unknown; choose one of {', '.join(TASKS)}")


def model_name(cfg) -> str:
    """The model a run trains, in a word: the variant, or a forecasting run's baseline; with its task."""
    name = "dlinear" if cfg.task == "forecast" and cfg.forecast.model == "dlinear" else cfg.model.variant
    return name if cfg.task == "lm" else f"{cfg.task} {name}"


def model_from_blob(blob: dict, device: str = "cpu"):
    """``(model, ModelConfig)`` of a ``model.pt``'s contents, weights not loaded (``device="meta"`` to
    only size it); a file without ``task`` is a language model (files written before tasks existed)."""
    import torch

    from titans_scale.config import to_dataclass
    from titans_scale.models.config import ModelConfig

    cfg = to_dataclass(ModelConfig, blob["config"], prefix="model.")
    with torch.device(device):
        model = get_task(blob.get("task", "lm")).model_from_export(cfg, blob.get("task_config", {}))
    return model, cfg


__all__ = ["TASKS", "ClassifyConfig", "ForecastConfig", "Task", "get_task", "model_from_blob", "model_name", "validate_task_config"]
