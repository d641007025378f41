"""The one place evaluation and generation open a trained model: ``model.pt`` and its tokenizer.

``model.pt`` is the consolidated file a finished run writes (``{"format", "config", "state_dict", "sha256"}``,
see ``titans_scale.train.checkpoint``); a Hugging Face export (``python -m titans_scale.export``) opens
alike. Reading it is the engine's ``load_model``; this module adds what a user
needs when something does not fit: one line naming the file, what is wrong and the fix. The tokenizer is
the one given, else the one the run's recipe names (found through the run's checkpoint metadata).
"""

from __future__ import annotations

import os
import pickle
import zipfile
from pathlib import Path

import torch
from torch import nn

from .errors import EvalError

MODEL_FILE = "model.pt"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}


def resolve_device(device: str | None) -> torch.device:
    """``auto`` (or None): the GPU when there is one, else the CPU."""
    if device in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError:
        raise EvalError(f"device {device!r} is not a torch device; use auto, cpu, cuda or cuda:N") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise EvalError(f"device {device!r} asked for, but torch sees no GPU; use --device cpu")
    return resolved


def resolve_dtype(dtype: str) -> torch.dtype:
    if dtype not in DTYPES:
        raise EvalError(f"dtype {dtype!r} is unknown; choose one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def model_path(checkpoint: str | os.PathLike) -> Path:
    """The model file of a path that names it or its run directory; a one-line error if there is none."""
    from titans_scale.hf.layout import is_export

    path = Path(checkpoint)
    if path.is_dir():
        if is_export(path):
            return path
        if (path / MODEL_FILE).is_file():
            return path / MODEL_FILE
        if (path / "meta.json").is_file() or (path / "checkpoints").is_dir():
            raise EvalError(
                f"{path} holds training checkpoints but no {MODEL_FILE}; a run writes <run_dir>/{MODEL_FILE} when it "
                f"finishes (train.export=true): pass that file"
            )
        raise EvalError(f"no {MODEL_FILE} in {path}; pass the model file a finished run wrote (<run_dir>/{MODEL_FILE})")
    if not path.is_file():
        raise EvalError(f"checkpoint {path} does not exist; pass the model file a finished run wrote (<run_dir>/{MODEL_FILE})")
    return path


def load_checkpoint(checkpoint: str | os.PathLike, device: str | torch.device | None = "cpu",
                    dtype: torch.dtype | str = torch.float32):
    """``(model, ModelConfig)`` of a model file, in eval mode on ``device`` in ``dtype``."""
    from titans_scale.config import ConfigError
    from titans_scale.train.checkpoint import load_model

    path = model_path(checkpoint)
    device = device if isinstance(device, torch.device) else resolve_device(device)
    dtype = resolve_dtype(dtype) if isinstance(dtype, str) else dtype
    if path.is_dir():  # a Hugging Face export
        from titans_scale.hf.layout import from_pretrained

        model = from_pretrained(path)
        return model.to(device=device, dtype=dtype), model.cfg
    try:
        model, cfg = load_model(path)
    except ConfigError as err:
        raise EvalError(str(err) if str(path) in str(err) else f"checkpoint {path}: {err}") from None
    except ValueError as err:  # ModelConfig.validate: a config this code cannot build
        raise EvalError(f"checkpoint {path} holds a model config this version cannot build: {err}") from None
    except Exception:  # not a torch file, not our format, or weights that do not fit the config
        raise EvalError(diagnose(path)) from None
    return model.to(device=device, dtype=dtype).eval(), cfg


def diagnose(path: Path) -> str:
    """Why a model file could not be loaded, in one line (only called after loading failed)."""
    try:
        blob = torch.load(path, map_location="cpu", weights_only=False)
    except (pickle.UnpicklingError, zipfile.BadZipFile, EOFError, RuntimeError, OSError, AttributeError) as err:
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
        return f"checkpoint {path} is not a torch file ({reason[:120]}); pass the {MODEL_FILE} a finished run wrote"
    if not isinstance(blob, dict) or not {"config", "state_dict"} <= set(blob):
        keys = ", ".join(map(str, blob)) if isinstance(blob, dict) else type(blob).__name__
        return (f"checkpoint {path} is not a titans_scale model file (it holds {keys}; expected config and "
                f"state_dict); pass the {MODEL_FILE} a finished run wrote")
    from titans_scale.tasks import model_from_blob

    expected = model_from_blob(blob, device="meta")[0].state_dict()
    found = blob["state_dict"]
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    reshaped = [f"{k} {tuple(found[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items()
                if k in found and tuple(found[k].shape) != tuple(v.shape)]
    parts = [f"{len(items)} {what} ({', '.join(items[:3])}{', ...' if len(items) > 3 else ''})"
             for what, items in (("missing weights", missing), ("unknown weights", unexpected),
                                 ("weights of another shape (file vs config)", reshaped)) if items]
    detail = "; ".join(parts) or "the weights do not load"
    return (f"checkpoint {path}: its weights do not fit its model config: {detail}; the file was edited or "
            f"written by another version: re-export it from its run")


def model_task(checkpoint: str | os.PathLike, expected: str | None = None) -> tuple[str, dict]:
    """(task, task_config) a model file was trained for ("lm" for a language model); with ``expected``, a
    file of another task is a one-line error naming the command that evaluates it."""
    path = model_path(checkpoint)
    blob = torch.load(path, map_location="cpu", weights_only=False)
    task = blob.get("task", "lm") if isinstance(blob, dict) else "lm"
    if expected is not None and task != expected:
        command = {"lm": "perplexity, niah, babilong or harness", "forecast": "forecast", "classify": "classify"}[task]
        raise EvalError(f"{path} is a model of task={task}, not {expected}; evaluate it with "
                        f"python -m titans_scale.eval {command}")
    return task, blob.get("task_config", {})


def save_model(model: nn.Module, path: str | os.PathLike) -> Path:
    """Write ``model`` (a ``TitansLM``) as a model file, atomically: for models built outside a training run."""
    from titans_scale.config import to_dict
    from titans_scale.train.checkpoint import write_model_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_model_file(path, to_dict(model.cfg), {k: v.detach().cpu() for k, v in model.state_dict().items()})
    return path


# ----------------------------------------------------------------------------------------------------
# The tokenizer


def load_tokenizer(checkpoint: str | os.PathLike, tokenizer: str | os.PathLike | None, vocab_size: int):
    """The tokenizer given, else the one the run's recipe names; checked against the model's vocabulary."""
    from titans_scale.data.tokenizer import Tokenizer

    path = Path(tokenizer) if tokenizer else run_tokenizer(model_path(checkpoint))
    if not path.is_file():
        raise EvalError(f"tokenizer {path} does not exist; pass --tokenizer PATH.model (the one the model was trained with)")
    tok = Tokenizer(path)
    if tok.vocab_size > vocab_size:
        raise EvalError(
            f"tokenizer {path} has {tok.vocab_size} tokens but the model only {vocab_size}; pass the tokenizer the "
            f"model was trained with (--tokenizer)"
        )
    return tok


def run_tokenizer(model_file: Path) -> Path:
    """The tokenizer of the run that wrote ``model_file``: its recipe's ``data.tokenizer`` (or the automatic
    one), read from the newest checkpoint's metadata, relative to the current directory or the run's."""
    from titans_scale.config import to_dataclass
    from titans_scale.data.config import DataConfig, resolve_tokenizer
    from titans_scale.train.checkpoint import find_checkpoint, read_meta

    if model_file.is_dir():  # a Hugging Face export carries its tokenizer
        return model_file / "tokenizer.model"
    run_dir = model_file.parent
    found = find_checkpoint(run_dir / "checkpoints")
    if found is None:
        raise EvalError(f"which tokenizer? {run_dir} has no training checkpoint that names one; pass --tokenizer PATH.model")
    data = read_meta(found)["config"].get("data", {})
    path = resolve_tokenizer(to_dataclass(DataConfig, data, prefix="data."))
    if not path.is_absolute() and not path.exists():  # relative to where the run was started
        for base in (run_dir, *run_dir.parents):
            if (base / path).is_file():
                return base / path
    return path
