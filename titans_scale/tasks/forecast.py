"""Long-term time-series forecasting: CSV windows in, MSE against the next ``forecast.horizon`` steps."""

from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import asdict
from pathlib import Path

from titans_scale.config import ConfigError

from .base import Task
from .config import ForecastConfig, GeneratedSeriesConfig


def generated_csv(g: GeneratedSeriesConfig) -> Path:
    """Where the generated series of these parameters lives: <data root>/timeseries/generated-<hash>.csv."""
    from titans_scale.data.config import data_root

    digest = hashlib.blake2s(json.dumps(asdict(g), sort_keys=True).encode(), digest_size=6).hexdigest()
    return data_root() / "timeseries" / f"generated-{digest}.csv"


def ensure_generated(g: GeneratedSeriesConfig) -> Path:
    from titans_scale.data.default import _file_lock, _lock_path
    from titans_scale.data.timeseries import GeneratedSeries

    path = generated_csv(g)
    with _file_lock(_lock_path(path)):
        if not path.exists():
            GeneratedSeries(**asdict(g)).write(path)
    return path


def csv_path(f: ForecastConfig) -> Path:
    return Path(f.csv) if f.csv else generated_csv(f.generated)


@functools.lru_cache(maxsize=4)
def _load(path: str, columns: tuple | None, lookback: int, horizon: int, split: str):
    from titans_scale.data.timeseries import load_forecast_data

    return load_forecast_data(path, lookback, horizon, split, list(columns) if columns else None)


def forecast_data(f: ForecastConfig, lookback: int, horizon: int | None = None):
    """The CSV of ``f`` read, split and scaled (cached per process); DataErrors as they come."""
    path = csv_path(f)
    return _load(str(path), tuple(f.columns) if f.columns else None, lookback, horizon or f.horizon, f.split)


def model_args(f: ForecastConfig | dict, lookback: int) -> dict:
    get = f.get if isinstance(f, dict) else lambda k: getattr(f, k)
    return dict(kind=get("model"), lookback=lookback, horizon=get("horizon"), patch_len=get("patch_len"),
                revin=get("revin"), moving_average=get("moving_average"))


class Forecasting(Task):
    name = "forecast"

    def check(self, cfg, build: bool) -> None:
        from titans_scale.data.errors import DataError
        from titans_scale.models.forecast import check_shape

        f = cfg.forecast
        if cfg.parallel.tp > 1 or cfg.parallel.sp > 1:
            raise ConfigError("task=forecast runs data parallel only; set parallel.tp=1 parallel.sp=1")
        try:
            check_shape(cfg.data.seq_len, f.horizon, f.patch_len if f.model == "titans" else 1)
            if build and not f.csv:
                ensure_generated(f.generated)
            forecast_data(f, cfg.data.seq_len)
        except (DataError, ValueError) as e:
            raise ConfigError(str(e).splitlines()[0]) from None

    def build_model(self, cfg):
        from titans_scale.models.forecast import build_forecaster

        return build_forecaster(cfg.model, **model_args(cfg.forecast, cfg.data.seq_len))

    def loaders(self, cfg, *, micro_batch: int, dp_rank: int, dp_size: int, seed: int):
        from titans_scale.data.samples import SampleLoader

        windows = forecast_data(cfg.forecast, cfg.data.seq_len).windows
        args = dict(micro_batch=micro_batch, dp_rank=dp_rank, dp_size=dp_size, seed=seed)
        return (SampleLoader(windows["train"], shuffle=cfg.data.shuffle, name="train split", **args),
                SampleLoader(windows["val"], shuffle=False, name="validation split", **args))

    def stats(self, cfg) -> tuple[int, float]:
        """Parameters, and forward FLOPs per input step of a window (all its channels)."""
        import torch

        from titans_scale.models.stats import backbone_flops_per_token

        f, L = cfg.forecast, cfg.data.seq_len
        with torch.device("meta"):
            params = sum(p.numel() for p in self.build_model(cfg).parameters())
        try:
            channels = len(forecast_data(f, L).names)
        except Exception:  # sizing only; check() reports data problems
            channels = 1
        if f.model == "dlinear":
            per_series = 2 * 2 * L * f.horizon
        else:
            n, d = L // f.patch_len, cfg.model.dim
            per_series = n * (backbone_flops_per_token(cfg.model, n) + 2 * f.patch_len * d) + 2 * n * d * f.horizon
        return params, channels * per_series / L

    def export(self, cfg) -> dict:
        return {"task": self.name, "task_config": {**asdict(cfg.forecast), "lookback": cfg.data.seq_len}}

    def model_from_export(self, model_cfg, task_config: dict):
        from titans_scale.models.forecast import build_forecaster

        return build_forecaster(model_cfg, **model_args(task_config, task_config["lookback"]))

    def summary(self, loss: float) -> str:
        return f"validation MSE {loss:.4f} (standardised)"
