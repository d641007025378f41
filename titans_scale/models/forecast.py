"""Long-term time-series forecasting on the same backbone: channel-independent, RevIN, patches, linear head.

Every channel of a multivariate window is forecast on its own with shared weights (channel independence,
as in PatchTST and the Titans paper's forecasting setup): a window (B, L, C) becomes B * C univariate series
of L steps, and the forecast (B * C, H) is folded back to (B, H, C).

    RevIN       each series minus its mean, over its standard deviation; the forecast is mapped back
    embedding   non-overlapping patches of P steps, one ``nn.Linear(P, D)`` each (P = 1: per-timestep)
    backbone    the Titans blocks of ``model.variant`` over the L / P patch embeddings, then RMSNorm
    head        the flattened (L / P) * D hidden states -> H future values, one ``nn.Linear``

``DLinear`` (Zeng et al., 2023) is the linear baseline: the window split into a moving-average trend and
the rest, each mapped to the horizon by one linear layer shared by the channels.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import ModelConfig
from .layers import RMSNorm
from .model import build_blocks, init_blocks, run_blocks

FORECASTERS = ("titans", "dlinear")


def revin(series: Tensor, eps: float = 1e-5) -> tuple[Tensor, Tensor, Tensor]:
    """Reversible instance normalisation (Kim et al., 2022), without its affine part (it would tie the
    weights to one data set's channels): ``(series - mean) / std`` over the last axis, with the mean and
    std to undo it on the forecast."""
    mean = series.mean(-1, keepdim=True)
    std = torch.sqrt(series.var(-1, keepdim=True, unbiased=False) + eps)
    return (series - mean) / std, mean, std


def check_shape(lookback: int, horizon: int, patch_len: int) -> None:
    """Raise ValueError naming the field when a forecaster cannot be built for these lengths."""
    if lookback < 1 or horizon < 1 or patch_len < 1:
        raise ValueError(f"data.seq_len={lookback} (lookback), forecast.horizon={horizon} and "
                         f"forecast.patch_len={patch_len} must be >= 1")
    if lookback % patch_len:
        raise ValueError(f"data.seq_len={lookback} (the lookback window) must be a multiple of forecast.patch_len="
                         f"{patch_len} (e.g. {max(patch_len, lookback // patch_len * patch_len)})")


class ChannelIndependent(nn.Module):
    """The part every forecaster shares: (B, L, C) windows -> normalised univariate series -> (B, H, C)."""

    def __init__(self, lookback: int, horizon: int, normalise: bool):
        super().__init__()
        self.lookback, self.horizon, self.normalise = lookback, horizon, normalise
        self.revin_eps = 1e-5  # only keeps a constant window finite

    def forecast(self, series: Tensor) -> Tensor:
        """(S, L) normalised series -> (S, H) forecasts; the model proper."""
        raise NotImplementedError

    def forward(self, window: Tensor) -> Tensor:
        """window (B, L, C) -> forecast (B, H, C), in at least float32 whatever the weights' precision."""
        if window.dim() != 3 or window.shape[1] != self.lookback:
            raise ValueError(f"window has shape {tuple(window.shape)}; expected (batch, {self.lookback}, channels)")
        B, L, C = window.shape
        series = window.to(torch.promote_types(window.dtype, torch.float32)).transpose(1, 2).reshape(B * C, L)
        if self.normalise:
            series, mean, std = revin(series, self.revin_eps)
        y = self.forecast(series).to(series.dtype)
        if self.normalise:
            y = y * std + mean
        return y.reshape(B, C, self.horizon).transpose(1, 2)

    def loss(self, window: Tensor, target: Tensor) -> Tensor:
        """Mean squared error of the forecast against the next H steps (B, H, C)."""
        forecast = self(window)
        return F.mse_loss(forecast, target.to(forecast.dtype))


class TitansForecaster(ChannelIndependent):
    """Patches of each series through the Titans blocks of ``cfg`` (any variant), then a flatten head."""

    def __init__(self, cfg: ModelConfig, lookback: int, horizon: int, patch_len: int, normalise: bool = True):
        super().__init__(lookback, horizon, normalise)
        check_shape(lookback, horizon, patch_len)
        self.cfg = cfg.validate()
        self.patch_len = patch_len
        self.patch_embed = nn.Linear(patch_len, cfg.dim)
        self.blocks = build_blocks(cfg)
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.head = nn.Linear(lookback // patch_len * cfg.dim, horizon)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        nn.init.normal_(self.patch_embed.weight, std=self.cfg.init_std)
        nn.init.zeros_(self.patch_embed.bias)
        nn.init.normal_(self.head.weight, std=self.cfg.init_std)
        nn.init.zeros_(self.head.bias)
        init_blocks(self, self.cfg)

    def forecast(self, series: Tensor) -> Tensor:
        patches = series.to(self.patch_embed.weight.dtype).unflatten(-1, (-1, self.patch_len))  # (S, N, P)
        h, _ = run_blocks(self.blocks, self.patch_embed(patches), None, 0,
                          recompute=self.cfg.activation_checkpointing and self.training)
        return self.head(self.norm(h).flatten(1))


class DLinear(ChannelIndependent):
    """The DLinear baseline: trend = moving average of the window (edges repeated), seasonal = the rest,
    forecast = Linear(seasonal) + Linear(trend), both L -> H and shared by the channels."""

    def __init__(self, lookback: int, horizon: int, kernel: int = 25, normalise: bool = True):
        super().__init__(lookback, horizon, normalise)
        check_shape(lookback, horizon, 1)
        if kernel < 1 or kernel % 2 == 0:
            raise ValueError(f"forecast.moving_average={kernel} must be an odd number >= 1")
        self.kernel = kernel
        self.seasonal = nn.Linear(lookback, horizon)
        self.trend = nn.Linear(lookback, horizon)
        with torch.no_grad():  # DLinear's start: every future step the mean of the window
            for linear in (self.seasonal, self.trend):
                linear.weight.fill_(1.0 / lookback)
                linear.bias.zero_()

    def forecast(self, series: Tensor) -> Tensor:
        series = series.to(self.trend.weight.dtype)
        half = (self.kernel - 1) // 2
        padded = torch.cat([series[:, :1].expand(-1, half), series, series[:, -1:].expand(-1, half)], 1)
        trend = F.avg_pool1d(padded.unsqueeze(1), self.kernel, stride=1).squeeze(1)
        return self.seasonal(series - trend) + self.trend(trend)


def build_forecaster(cfg: ModelConfig, *, kind: str, lookback: int, horizon: int, patch_len: int,
                     revin: bool, moving_average: int) -> ChannelIndependent:
    """The forecaster a recipe names: ``titans`` (the blocks of ``cfg``) or the ``dlinear`` baseline."""
    if kind == "dlinear":
        return DLinear(lookback, horizon, moving_average, revin)
    if kind != "titans":
        raise ValueError(f"forecast.model={kind!r} is unknown; choose one of {', '.join(FORECASTERS)}")
    return TitansForecaster(cfg, lookback, horizon, patch_len, revin)
