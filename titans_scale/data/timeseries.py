"""Time series for long-term forecasting: the CSV layout of ETT / Weather / ECL / Traffic, the standard
splits and scaling, forecasting windows, and a generated series whose best possible MSE is known.

CSV layout: a header row, a date column first (its values are kept as text, never parsed), then one column
per numeric channel. Splits, as in the benchmarks' reference code (Informer / Autoformer / PatchTST):

    ett_hour    ETTh1/ETTh2: 12 months train, 4 validation, 4 test (30-day months, hourly rows)
    ett_minute  ETTm1/ETTm2: the same months in 15-minute rows
    ratio       every other data set: the first 70% of rows train, the last 20% test, the rest validation
    auto        ett_hour / ett_minute for files named ETTh* / ETTm*, else ratio

A validation or test window may look back into the split before it (its first forecast step is the
split's first row). Every channel is standardised with the mean and standard deviation of the training
rows, and errors are reported in those units, as the benchmarks report them.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import DataError

SPLITS = ("train", "val", "test")
SPLIT_KINDS = ("auto", "ett_hour", "ett_minute", "ratio")
MISSING = {"", "nan", "na", "n/a", "null", "none", "?"}


@dataclass
class Series:
    """A multivariate series read from a CSV: channel names and values (rows, channels), float64."""

    path: Path
    names: list[str]
    values: np.ndarray


def read_csv(path: str | Path, columns: list[str] | None = None) -> Series:
    """The numeric channels of a CSV (all columns after the date column, or ``columns``). Raises a one-line
    DataError naming the file, the line and the column of the first missing or non-numeric value."""
    path = Path(path)
    try:
        with open(path, newline="", encoding="utf-8") as f:
            header = next(csv.reader(f), None)
    except FileNotFoundError:
        raise DataError(f"CSV {path} does not exist; set forecast.csv to a local file (date column + numeric channels)") from None
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"CSV {path}: cannot read it as UTF-8 text ({type(err).__name__})") from None
    if not header or len(header) < 2:
        raise DataError(f"CSV {path} needs a header row with a date column and at least one channel column")
    names = [h.strip() for h in header[1:]]
    if columns:
        unknown = [c for c in columns if c not in names]
        if unknown:
            raise DataError(f"CSV {path} has no column {unknown[0]!r} (forecast.columns); it has {', '.join(names)}")
        keep = [names.index(c) + 1 for c in columns]
    else:
        keep = list(range(1, len(header)))
    try:  # the fast path; on any failure, the slow one finds and names the first bad cell
        values = np.loadtxt(path, delimiter=",", skiprows=1, usecols=keep, dtype=np.float64, ndmin=2,
                            encoding="utf-8")
        if np.isfinite(values).all() and _row_count(path) == len(values):
            return Series(path, [names[i - 1] for i in keep], values)
    except (ValueError, IndexError):
        pass
    return Series(path, [names[i - 1] for i in keep], _read_checked(path, header, keep))


def _row_count(path: Path) -> int:
    with open(path, newline="", encoding="utf-8") as f:
        return sum(1 for row in csv.reader(f) if row) - 1


def _read_checked(path: Path, header: list[str], keep: list[int]) -> np.ndarray:
    rows = []
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.reader(f)
        next(reader)
        for row in reader:
            line = reader.line_num
            if not row:
                continue
            if len(row) != len(header):
                raise DataError(f"CSV {path} line {line} has {len(row)} fields, the header {len(header)}; "
                                f"fix the row (every row: the date, then one value per channel)")
            out = []
            for i in keep:
                cell = row[i].strip()
                if cell.lower() in MISSING:
                    raise DataError(f"CSV {path} line {line}, column {header[i].strip()!r}: missing value; "
                                    f"fill it (e.g. with the previous value) or drop the row")
                try:
                    value = float(cell)
                except ValueError:
                    raise DataError(f"CSV {path} line {line}, column {header[i].strip()!r}: {cell[:20]!r} is not "
                                    f"a number") from None
                if not math.isfinite(value):
                    raise DataError(f"CSV {path} line {line}, column {header[i].strip()!r}: {cell!r} is not a "
                                    f"finite number")
                out.append(value)
            rows.append(out)
    if not rows:
        raise DataError(f"CSV {path} has a header but no rows")
    return np.array(rows, dtype=np.float64)


def split_kind(kind: str, path: Path) -> str:
    """``auto`` resolved from the file name (ETTh* -> ett_hour, ETTm* -> ett_minute, else ratio)."""
    if kind != "auto":
        return kind
    name = path.name.lower()
    return "ett_hour" if name.startswith("etth") else "ett_minute" if name.startswith("ettm") else "ratio"


def split_rows(n_rows: int, lookback: int, horizon: int, kind: str, path: Path) -> dict[str, tuple[int, int]]:
    """The rows each split's windows are cut from, (first, end), lookback of the split before included;
    a split too short for one window of lookback + horizon rows is a one-line DataError."""
    if kind in ("ett_hour", "ett_minute"):
        month = 30 * 24 * (4 if kind == "ett_minute" else 1)
        ends = [12 * month, 16 * month, 20 * month]
        if n_rows < ends[-1]:
            raise DataError(f"CSV {path} has {n_rows} rows, but the {kind} split needs {ends[-1]} (12 + 4 + 4 months); "
                            f"use forecast.split=ratio for a shorter file")
    else:
        train, test = int(n_rows * 0.7), int(n_rows * 0.2)
        ends = [train, n_rows - test, n_rows]
    starts = [0, ends[0] - lookback, ends[1] - lookback]
    rows = {}
    for i, (split, start, end) in enumerate(zip(SPLITS, starts, ends)):
        own = end - (ends[i - 1] if i else 0)  # the split's own rows (a later split looks back before them)
        if end - start < lookback + horizon:
            need = f"the horizon {horizon}" if i else f"lookback {lookback} + horizon {horizon}"
            raise DataError(f"CSV {path} has too few rows for a window: its {split} split has {own} rows ({n_rows} in "
                            f"all), a window needs {need} there; use a longer file or shorten data.seq_len / "
                            f"forecast.horizon")
        rows[split] = (start, end)
    return rows


@dataclass
class Scaler:
    """Per-channel standardisation with the training rows' mean and standard deviation."""

    mean: np.ndarray
    std: np.ndarray

    @classmethod
    def fit(cls, values: np.ndarray) -> "Scaler":
        std = values.std(0)
        return cls(values.mean(0), np.where(std > 0, std, 1.0))

    def __call__(self, values: np.ndarray) -> np.ndarray:
        return (values - self.mean) / self.std


class Windows:
    """Forecasting samples of one split: sample i is rows [i, i + L) as input and [i + L, i + L + H) as
    target, all channels, standardised, float32."""

    def __init__(self, values: np.ndarray, lookback: int, horizon: int):
        self.values = np.ascontiguousarray(values, dtype=np.float32)
        self.lookback, self.horizon = lookback, horizon

    def __len__(self) -> int:
        return len(self.values) - self.lookback - self.horizon + 1

    def batch(self, indices: np.ndarray):
        """(input (b, L, C), target (b, H, C)) float32 tensors for these samples."""
        import torch

        L, H = self.lookback, self.horizon
        rows = np.asarray(indices)[:, None] + np.arange(L + H)[None, :]
        both = torch.from_numpy(self.values[rows])
        return both[:, :L], both[:, L:]


@dataclass
class ForecastData:
    """A CSV read, split and standardised: ``windows[split]``, the scaler, and the channel names."""

    path: Path
    names: list[str]
    windows: dict[str, Windows]
    scaler: Scaler
    split: str


def load_forecast_data(path: str | Path, lookback: int, horizon: int, split: str = "auto",
                       columns: list[str] | None = None) -> ForecastData:
    series = read_csv(path, columns)
    kind = split_kind(split, series.path)
    rows = split_rows(len(series.values), lookback, horizon, kind, series.path)
    scaler = Scaler.fit(series.values[: rows["train"][1]])
    scaled = scaler(series.values)
    windows = {name: Windows(scaled[start:end], lookback, horizon) for name, (start, end) in rows.items()}
    return ForecastData(series.path, series.names, windows, scaler, kind)


# ----------------------------------------------------------------------------------------------------
# A generated series with a known optimum


@dataclass
class GeneratedSeries:
    """The parameters of a generated series (hourly rows, ``channels`` channels). Channel c is

        x_c(t) = level_c + slope_c t / rows                     trend
               + a_c (exp(k (cos 2 pi (t - p_c) / 24 - 1)) - m) a daily peak (many harmonics)
               + b_c sin(2 pi t / 12 + q_c)                     a half-day cycle
               + d_c sin(2 pi t / 96 + r_c)                     a four-day cycle
               + noise_c e(t),  e(t) i.i.d. standard normal

    Everything but the noise is a fixed function of t, and the input window fixes t modulo 96 (and, up to
    the noise, the level): the best forecast is the noise-free series, and the best possible MSE on
    standardised values is the mean over channels of noise_c^2 / (training std of channel c)^2."""

    rows: int = 14400
    channels: int = 4
    noise: float = 0.5
    sharpness: float = 4.0  # k: the daily peak's width is about 24 / (2 pi sqrt(k)) hours
    seed: int = 0

    def parameters(self) -> dict[str, np.ndarray]:
        rng = np.random.default_rng(self.seed)
        c = self.channels
        return {
            "level": rng.uniform(-2, 2, c), "slope": rng.uniform(-3, 3, c), "peak": rng.uniform(1.5, 3, c),
            "peak_phase": rng.uniform(0, 24, c), "half_day": rng.uniform(0.3, 1.0, c),
            "half_day_phase": rng.uniform(0, 2 * np.pi, c), "four_day": rng.uniform(0.5, 1.5, c),
            "four_day_phase": rng.uniform(0, 2 * np.pi, c), "noise": np.full(c, self.noise),
        }

    def clean(self) -> np.ndarray:
        """The noise-free series (rows, channels)."""
        p = self.parameters()
        t = np.arange(self.rows, dtype=np.float64)[:, None]
        k = self.sharpness
        peak = np.exp(k * (np.cos(2 * np.pi * (t - p["peak_phase"]) / 24) - 1))
        peak -= np.exp(-k) * np.i0(k)  # its mean over a day
        return (p["level"] + p["slope"] * t / self.rows + p["peak"] * peak
                + p["half_day"] * np.sin(2 * np.pi * t / 12 + p["half_day_phase"])
                + p["four_day"] * np.sin(2 * np.pi * t / 96 + p["four_day_phase"]))

    def values(self) -> np.ndarray:
        noise = np.random.default_rng([self.seed, 1]).standard_normal((self.rows, self.channels))
        return self.clean() + noise * self.parameters()["noise"]

    def write(self, path: Path) -> Path:
        """The series as a CSV (hourly dates from 2016-07-01 00:00, channels x0, x1, ...), written atomically,
        with ``<name>.json`` beside it holding these parameters."""
        from .files import write_atomic

        values = self.values()
        start = np.datetime64("2016-07-01T00:00")
        lines = ["date," + ",".join(f"x{c}" for c in range(self.channels))]
        for i, row in enumerate(values):
            stamp = str(start + np.timedelta64(i, "h")).replace("T", " ")
            lines.append(stamp + ":00," + ",".join(f"{v:.6f}" for v in row))
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path.with_suffix(".json"), json.dumps(self.__dict__).encode())
        write_atomic(path, ("\n".join(lines) + "\n").encode())
        return path

    def optimum_mse(self, scaler: Scaler) -> float:
        """The best possible MSE on values standardised by ``scaler``: the noise variance, in those units."""
        return float(np.mean(self.parameters()["noise"] ** 2 / scaler.std**2))


def generated_series_of(csv_path: Path) -> GeneratedSeries | None:
    """The parameters of a CSV written by ``GeneratedSeries.write`` (from the JSON beside it), else None."""
    meta = Path(csv_path).with_suffix(".json")
    if not meta.is_file():
        return None
    try:
        return GeneratedSeries(**json.loads(meta.read_text()))
    except (ValueError, TypeError):
        return None
