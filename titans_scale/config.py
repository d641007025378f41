"""The one configuration schema of a run, and the one place that resolves a recipe plus overrides into it.

A recipe is a YAML file in ``recipes/`` (``recipe=NAME`` or a path). It may start from other recipes with
``base: NAME`` (or a list of names; later ones win, the recipe itself wins over all of them), so a paper-scale
recipe is a few lines over a shared base. Command-line overrides are dotted ``key=value`` pairs, merged last.
The result is checked against the dataclasses below: an unknown key or a wrong type is a ``ConfigError``
naming the key (with the closest valid one), never a silent no-op.
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from titans_scale.data.config import DataConfig, validate_data_config
from titans_scale.models.config import ModelConfig
from titans_scale.tasks.config import ClassifyConfig, ForecastConfig, validate_task_config

RECIPES_DIR = Path(__file__).resolve().parent.parent / "recipes"
CHOICES = {
    "train.optimizer": ("torch_adamw", "deepspeed_adamw"),
    "train.precision": ("auto", "fp32", "bf16"),
    "train.zero_stage": (0, 1, 2, 3),
    "parallel.sp_scheme": ("relay", "all_to_all"),
    "wandb.mode": ("offline", "online", "disabled"),
}


class ConfigError(ValueError):
    """A mistake the user can fix in the recipe or on the command line; printed as one line, exit code 2."""


@dataclass
class TrainConfig:
    """The optimisation: how long, how big a batch, which schedule, how often to log, evaluate and save."""

    steps: int = 0  # optimizer steps; 0: derive from ``tokens``
    tokens: int = 0  # training tokens, used when steps == 0 (rounded up to whole steps)
    global_batch_tokens: int = 16384  # tokens per optimizer step over all data-parallel ranks
    micro_batch: int = 8  # sequences per rank per forward/backward; accumulation fills the global batch
    lr: float = 3e-3  # peak learning rate, reached after the warmup
    min_lr: float = 3e-4  # the cosine ends here
    warmup_steps: int = 0  # linear warmup from lr / warmup_steps to lr
    weight_decay: float = 0.1  # on matrices, not on biases or normalisation gains (train/engine.py: decays)
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # max global gradient norm; 0 = off
    zero_stage: int = 1  # DeepSpeed ZeRO stage 0, 1, 2 or 3
    optimizer: str = "torch_adamw"  # torch_adamw | deepspeed_adamw (DeepSpeed's fused/CPU Adam, JIT-built once)
    precision: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | fp32 | bf16
    checkpoint_every: int = 0  # save every K steps (and always at the end); 0 = only at the end
    keep_last: int = 2  # complete checkpoints to keep
    eval_every: int = 0  # validation every K steps (and always at the end); 0 = only at the end
    eval_batches: int = 4  # micro-batches per rank per validation
    log_every: int = 10  # a progress line every K steps
    seed: int = 0
    peak_flops: float = 0.0  # per process, for the MFU estimate; 0 = auto (see docs/training.md)
    sample_tokens: int = 48  # length of the sample generated at the end (0 = none)
    sample_prompt: str = "The"
    export: bool = True  # write the consolidated model.pt at the end
    profile: bool = False  # trace 3 optimizer steps (after 2) with torch's profiler into <run_dir>/profile/
    collective_timeout_s: float = 1800.0  # a rank waiting this long at a collective stops with one line


@dataclass
class ParallelConfig:
    """How the world is split: tensor and sequence parallel sizes; data parallel is what remains."""

    tp: int = 1  # tensor parallel: heads split across ranks
    sp: int = 1  # sequence parallel: memory chunks split across ranks
    sp_scheme: str = "relay"  # relay | all_to_all (design doc, section 4)
    sequence_parallel: bool = False  # Megatron's sequence parallelism of norms / residuals inside TP
    sp_micro_batches: int = 1  # the relay's wavefront: micro-batches in flight along the SP ranks


@dataclass
class WandbConfig:
    """Weights & Biases logging; offline by default (files under the run directory, no network)."""

    project: Optional[str] = None
    entity: Optional[str] = None
    mode: str = "offline"  # offline | online | disabled
    name: Optional[str] = None


@dataclass
class RunConfig:
    """Everything a run needs: what to train, on what, how, and where to write."""

    task: str = "lm"  # lm (next-token: text, or DNA with data.alphabet=dna) | forecast | classify (titans_scale/tasks)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    forecast: ForecastConfig = field(default_factory=ForecastConfig)  # task=forecast: CSV, horizon, forecaster
    classify: ClassifyConfig = field(default_factory=ClassifyConfig)  # task=classify: class folders, head
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)
    recipe: str = ""  # the recipe this run was resolved from (set by the resolver)
    run_dir: str = ""  # where checkpoints, metrics and wandb files go; "" = runs/<recipe>
    resume: str = "auto"  # auto: newest complete checkpoint in run_dir | never | a checkpoint path
    nproc: int = 1  # processes to start on this machine (ignored under torchrun, deepspeed or srun)
    dry_run: bool = False  # resolve, check and print the plan, then stop before training


# ----------------------------------------------------------------------------------------------------
# Resolving a recipe


def recipe_path(name: str, recipes_dir: Path = RECIPES_DIR) -> Path:
    """The YAML file of a recipe name (``tiny``, ``base/cpu``) or path; a missing one lists close names."""
    candidate = Path(name)
    if candidate.suffix in (".yaml", ".yml") and candidate.is_file():
        return candidate
    path = recipes_dir / f"{name}.yaml"
    if path.is_file():
        return path
    known = sorted(str(p.relative_to(recipes_dir).with_suffix("")) for p in recipes_dir.rglob("*.yaml"))
    nested = [k for k in known if k.endswith("/" + name) and not k.startswith("base/")]
    if len(nested) == 1:  # a recipe in a topic folder by its own name: ts_ettm1 = timeseries/ts_ettm1
        return recipes_dir / f"{nested[0]}.yaml"
    close = difflib.get_close_matches(name, known, n=3, cutoff=0.5)
    hint = f"did you mean {' or '.join(close)}?" if close else f"known recipes: {', '.join(k for k in known if '/' not in k)}"
    raise ConfigError(f"recipe {name!r} not found in {recipes_dir}; {hint}")


def _load_recipe(name: str, recipes_dir: Path, chain: tuple[str, ...] = ()) -> DictConfig:
    """A recipe merged over its bases (``base:``), bases first, cycles refused."""
    path = recipe_path(name, recipes_dir)
    if str(path) in chain:
        raise ConfigError(f"recipe {path} includes itself through base: {' -> '.join(chain + (str(path),))}")
    try:
        cfg = OmegaConf.load(path)
    except Exception as e:  # a YAML syntax error: name the file and the first line of the message
        raise ConfigError(f"recipe {path} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(cfg, DictConfig):
        raise ConfigError(f"recipe {path} must be a mapping of keys to values")
    bases = cfg.pop("base", None)
    if bases is None:
        return cfg
    bases = list(bases) if isinstance(bases, ListConfig) else [bases]
    merged = OmegaConf.create()
    for base in bases:
        merged = OmegaConf.merge(merged, _load_recipe(str(base), recipes_dir, chain + (str(path),)))
    return OmegaConf.merge(merged, cfg)


def _dotted_keys(schema: type, prefix: str = "") -> list[str]:
    """Every valid dotted key of a dataclass schema (sections and leaves)."""
    keys = []
    hints = typing.get_type_hints(schema)
    for f in dataclasses.fields(schema):
        key = prefix + f.name
        keys.append(key)
        if dataclasses.is_dataclass(hints[f.name]):
            keys += _dotted_keys(hints[f.name], key + ".")
    return keys


def _suggest(key: str, schema: type) -> str:
    """' (did you mean X?)' for the closest valid dotted key, matching the whole key or its last part."""
    valid = _dotted_keys(schema)
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.6)
    if not close:
        leaf = key.rsplit(".", 1)[-1]
        by_leaf = {k.rsplit(".", 1)[-1]: k for k in reversed(valid)}
        leaves = difflib.get_close_matches(leaf, list(by_leaf), n=1, cutoff=0.75)
        close = [by_leaf[leaves[0]]] if leaves else []
    return f" (did you mean {close[0]}?)" if close else ""


def _check_keys(data: Any, schema: type, root: type, prefix: str = "") -> None:
    """Refuse keys that the schema does not have, and scalars given where a section is expected."""
    hints = typing.get_type_hints(schema)
    for key, value in data.items():
        full = f"{prefix}{key}"
        if key not in hints:
            raise ConfigError(f"unknown config key {full!r}{_suggest(full, root)}")
        if dataclasses.is_dataclass(hints[key]):
            if not isinstance(value, dict):
                example = dataclasses.fields(hints[key])[0].name
                raise ConfigError(f"{full!r} is a section, not a value; set its fields, e.g. {full}.{example}=...")
            _check_keys(value, hints[key], root, full + ".")


def to_dataclass(schema: type, data: Any, prefix: str = "") -> Any:
    """Validate a mapping against a dataclass schema (keys and types) and build the typed object."""
    data = data if isinstance(data, DictConfig) else OmegaConf.create(data or {})
    _check_keys(OmegaConf.to_container(data, resolve=False), schema, schema)
    try:
        merged = OmegaConf.merge(OmegaConf.structured(schema), data)
        return OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:
        key = prefix + (e.full_key or "")
        detail = str(e.msg or e).splitlines()[0]
        raise ConfigError(f"bad value for {key!r}: {detail}") from None


def parse_overrides(args: list[str]) -> DictConfig:
    """``key=value`` command-line pairs into a config; a pair without '=' is an error."""
    for arg in args:
        if "=" not in arg or arg.startswith("="):
            raise ConfigError(f"argument {arg!r} is not key=value (e.g. train.steps=100 or recipe=tiny)")
    try:
        return OmegaConf.from_dotlist(list(args))
    except OmegaConfBaseException as e:
        raise ConfigError(f"cannot parse overrides {' '.join(args)!r}: {str(e).splitlines()[0]}") from None


def _merged(args: list[str] | None, recipe: str | None, recipes_dir: Path) -> tuple[str, DictConfig]:
    """(recipe name, the recipe merged with the command's overrides), not yet checked."""
    overrides = parse_overrides(list(args or []))
    name = str(overrides.pop("recipe", None) or recipe or "tiny")
    return name, OmegaConf.merge(_load_recipe(name, recipes_dir), overrides)


def open_keys(args: list[str] | None = None, *, recipe: str | None = None, recipes_dir: Path = RECIPES_DIR) -> list[str]:
    """The keys the recipe leaves open (``???``) that the command does not set."""
    return sorted(OmegaConf.missing_keys(_merged(args, recipe, recipes_dir)[1]))


def resolve(args: list[str] | None = None, *, recipe: str | None = None, recipes_dir: Path = RECIPES_DIR) -> RunConfig:
    """The run configuration of ``recipe=NAME key=value ...`` (recipe ``tiny`` when none is named). A dry run
    may leave the data open (a paper recipe's ``data.*: ???``): it plans and estimates from the recipe alone,
    the open keys read as null (``open_keys`` names them)."""
    name, merged = _merged(args, recipe, recipes_dir)
    merged.recipe = name
    missing = sorted(OmegaConf.missing_keys(merged))
    if missing and merged.get("dry_run") is True and all(key.startswith("data.") for key in missing):
        for key in missing:
            OmegaConf.update(merged, key, None)
        missing = []
    if missing:  # a value the recipe leaves to the user (``???``), e.g. a paper recipe's data paths
        given = " ".join(f"{key}=..." for key in missing)
        raise ConfigError(f"{', '.join(missing)} must be set: recipe {name!r} leaves {'it' if len(missing) == 1 else 'them'} "
                          f"open (???); add {given} to the command (or dry_run=true to plan without the data)")
    try:
        OmegaConf.resolve(merged)  # ${...} interpolations inside recipes
    except OmegaConfBaseException as e:
        raise ConfigError(f"recipe {name!r}: {str(e).splitlines()[0]}") from None
    cfg = to_dataclass(RunConfig, merged)
    if not cfg.run_dir:  # a forecasting recipe runs once per horizon: one directory each
        suffix = f"_h{cfg.forecast.horizon}" if cfg.task == "forecast" else ""
        cfg.run_dir = str(Path("runs") / (Path(name).stem + suffix))
    return validate(cfg)


def validate(cfg: RunConfig) -> RunConfig:
    """Check values (ranges, choices) that types alone do not; each failure names the key and the fix."""
    for key, allowed in CHOICES.items():
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if value not in allowed:
            raise ConfigError(f"{key}={value!r} is not allowed; choose one of {', '.join(map(str, allowed))}")
    t = cfg.train
    if t.steps < 0 or t.tokens < 0 or (t.steps == 0 and t.tokens == 0):
        raise ConfigError("set how long to train: train.steps=N (optimizer steps) or train.tokens=N (> 0)")
    for name in ("global_batch_tokens", "micro_batch", "log_every", "keep_last"):
        if getattr(t, name) < 1:
            raise ConfigError(f"train.{name}={getattr(t, name)} must be >= 1")
    for name in ("warmup_steps", "checkpoint_every", "eval_every", "eval_batches", "sample_tokens"):
        if getattr(t, name) < 0:
            raise ConfigError(f"train.{name}={getattr(t, name)} must be >= 0")
    if not (t.lr > 0 and 0 <= t.min_lr <= t.lr):
        raise ConfigError(f"need train.lr > 0 and 0 <= train.min_lr <= train.lr (got lr={t.lr}, min_lr={t.min_lr})")
    if not (0 <= t.beta1 < 1 and 0 <= t.beta2 < 1):
        raise ConfigError(f"train.beta1={t.beta1} and train.beta2={t.beta2} must be in [0, 1)")
    if t.weight_decay < 0 or t.grad_clip < 0 or t.eps <= 0 or t.peak_flops < 0:
        raise ConfigError("train.weight_decay, train.grad_clip and train.peak_flops must be >= 0, train.eps > 0")
    if not t.collective_timeout_s > 0:
        raise ConfigError(f"train.collective_timeout_s={t.collective_timeout_s} must be > 0 (seconds)")
    p = cfg.parallel
    if p.tp < 1 or p.sp < 1 or p.sp_micro_batches < 1:
        raise ConfigError(f"parallel.tp={p.tp}, parallel.sp={p.sp} and parallel.sp_micro_batches={p.sp_micro_batches} "
                          f"must be >= 1")
    if cfg.nproc < 1:
        raise ConfigError(f"nproc={cfg.nproc} must be >= 1")
    if cfg.resume not in ("auto", "never") and not Path(cfg.resume).exists():
        raise ConfigError(f"resume={cfg.resume!r}: no such checkpoint; use auto, never or a checkpoint directory")
    try:
        validate_task_config(cfg.task, cfg.forecast, cfg.classify)
        cfg.model.validate()
        validate_data_config(cfg.data)
        if cfg.data.synthetic.task:
            from titans_scale.data.synthetic import attention_spans, check_task

            check_task(cfg.data.synthetic, cfg.data.seq_len, cfg.data.vocab_size, attention_spans(cfg.model))
            if cfg.data.synthetic.loss == "answers" and cfg.parallel.sp > 1:
                raise ConfigError("data.synthetic.loss=answers is not supported under sequence parallelism; "
                                  "use data.synthetic.loss=all or parallel.sp=1")
            if cfg.model.vocab_size < cfg.data.vocab_size:
                raise ConfigError(f"model.vocab_size={cfg.model.vocab_size} is smaller than the task's data.vocab_size="
                                  f"{cfg.data.vocab_size}; set model.vocab_size={cfg.data.vocab_size}")
    except ConfigError:
        raise
    except ValueError as e:
        raise ConfigError(str(e)) from None
    return cfg


def data_parallel_size(parallel: ParallelConfig, world_size: int) -> int:
    """dp = world / (tp * sp), refused when it does not divide (the one world check, also of the parallel API)."""
    if parallel.tp < 1 or parallel.sp < 1:
        raise ConfigError(f"parallel.tp={parallel.tp} and parallel.sp={parallel.sp} must be >= 1")
    model_parallel = parallel.tp * parallel.sp
    if world_size % model_parallel:
        raise ConfigError(
            f"world size {world_size} is not a multiple of parallel.tp * parallel.sp = {parallel.tp} * {parallel.sp}; "
            f"change nproc or the parallel sizes"
        )
    return world_size // model_parallel


def config_text(cfg: RunConfig) -> str:
    """The resolved config as printed at the start of every run (and by a dry run): a header, then YAML."""
    return f"[config] recipe {cfg.recipe!r} resolved (saved as <run_dir>/config.yaml):\n" + \
        OmegaConf.to_yaml(OmegaConf.structured(cfg)).rstrip()


def to_dict(cfg: Any) -> dict:
    """A plain, JSON-able dict of a config (for checkpoints, wandb and model files)."""
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)


def config_diff(old: dict, new: dict, prefix: str = "") -> list[str]:
    """``key: old -> new`` for every leaf that differs between two config dicts."""
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key, "<absent>"), new.get(key, "<absent>")
        if isinstance(a, dict) and isinstance(b, dict):
            out += config_diff(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return out
