"""Typed configuration of the tasks beyond language modelling: time-series forecasting and sequence
classification (DNA). ``task`` in the run config picks one; its section here says what it reads and
what the model's head is. The sections of the other tasks are ignored."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

TASKS = ("lm", "forecast", "classify")
HORIZONS = (96, 192, 336, 720)  # the benchmarks' forecast lengths


@dataclass
class GeneratedSeriesConfig:
    """The series forecasting uses when ``forecast.csv`` is unset (data/timeseries.py: GeneratedSeries)."""

    rows: int = 14400
    channels: int = 4
    noise: float = 0.5
    sharpness: float = 12.0
    seed: int = 0


@dataclass
class ForecastConfig:
    """Long-term forecasting: the CSV, its split, the horizon and the forecaster. The lookback window is
    ``data.seq_len``; ``train.global_batch_tokens`` counts input steps (windows x lookback)."""

    csv: Optional[str] = None  # date column + numeric channels; None = the generated series (see `generated`)
    columns: Optional[list[str]] = None  # the channels to forecast; None = every column after the date
    split: str = "auto"  # auto | ett_hour | ett_minute | ratio (data/timeseries.py)
    horizon: int = 96  # steps to forecast: 96, 192, 336 or 720 in the benchmarks
    model: str = "titans"  # titans (the blocks of model.variant) | dlinear (the linear baseline)
    patch_len: int = 8  # steps per input embedding (1 = one embedding per time step)
    revin: bool = True  # normalise each input window, map the forecast back
    moving_average: int = 25  # DLinear's trend kernel
    generated: GeneratedSeriesConfig = field(default_factory=GeneratedSeriesConfig)


@dataclass
class MotifTaskConfig:
    """The long-range classification task used when ``classify.data_dir`` is unset (data/dna.py: MotifTask)."""

    length: int = 256  # bases per sequence
    train: int = 2000  # sequences per split
    test: int = 500
    seed: int = 0


@dataclass
class ClassifyConfig:
    """Sequence classification of DNA in the GenomicsBenchmarks layout: ``data_dir/train/<class>/*`` and
    ``data_dir/test/<class>/*``, one sequence per file. Sequences are padded to ``data.seq_len`` (a longer
    one is refused)."""

    data_dir: Optional[str] = None  # None = the generated long-range task (see `generated`)
    val_fraction: float = 0.1  # of the train sequences held out for validation (seeded by data.split_seed)
    pooling: str = "last"  # last (the state at the last base) | mean (over the bases)
    init_from: Optional[str] = None  # model.pt of a pretrained DNA language model: its embedding and blocks
    generated: MotifTaskConfig = field(default_factory=MotifTaskConfig)


def validate_task_config(task: str, forecast: ForecastConfig, classify: ClassifyConfig) -> None:
    """Raise ValueError naming the field and the fix."""
    if task not in TASKS:
        raise ValueError(f"task={task!r} is unknown; choose one of {', '.join(TASKS)}")
    if task == "forecast":
        from titans_scale.data.timeseries import SPLIT_KINDS
        from titans_scale.models.forecast import FORECASTERS

        f = forecast
        if f.split not in SPLIT_KINDS:
            raise ValueError(f"forecast.split={f.split!r} is unknown; choose one of {', '.join(SPLIT_KINDS)}")
        if f.model not in FORECASTERS:
            raise ValueError(f"forecast.model={f.model!r} is unknown; choose one of {', '.join(FORECASTERS)}")
        for name in ("horizon", "patch_len", "moving_average"):
            if getattr(f, name) < 1:
                raise ValueError(f"forecast.{name}={getattr(f, name)} must be >= 1")
        if f.moving_average % 2 == 0:
            raise ValueError(f"forecast.moving_average={f.moving_average} must be odd (a centred window)")
        g = f.generated
        if g.rows < 10 or g.channels < 1 or not g.noise > 0 or not g.sharpness > 0:
            raise ValueError("forecast.generated needs rows >= 10, channels >= 1, noise > 0 and sharpness > 0")
    if task == "classify":
        from titans_scale.models.classify import POOLINGS

        c = classify
        if c.pooling not in POOLINGS:
            raise ValueError(f"classify.pooling={c.pooling!r} is unknown; choose one of {', '.join(POOLINGS)}")
        if not 0.0 < c.val_fraction < 1.0:
            raise ValueError(f"classify.val_fraction={c.val_fraction} must be in (0, 1)")
        g = c.generated
        if g.length < 64 or g.train < 2 or g.test < 2:
            raise ValueError("classify.generated needs length >= 64 and train, test >= 2 sequences")
