"""A model in the Hugging Face layout, and back: ``export(model, tokenizer, EXPORT)``, ``from_pretrained(EXPORT)``.

    EXPORT/config.json            every ModelConfig field, plus model_type, architectures and auto_map
    EXPORT/model.safetensors      the weights under TitansForCausalLM's names ("model." + TitansLM's; a tied
                                  head is stored once, as the embedding)
    EXPORT/tokenizer.model        the sentencepiece model (tokenizer_config.json names TitansTokenizer)
    EXPORT/*.py                   the model's own code: titans_scale.models and titans_scale.memory as far as
                                  the wrappers reach, flattened into one folder with relative imports

so ``AutoModelForCausalLM.from_pretrained(EXPORT, trust_remote_code=True)`` needs neither titans_scale nor a
network. Writing and reading the layout needs only ``safetensors``; the wrappers need ``transformers``.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import os
import re
import shutil
from pathlib import Path

import torch

from titans_scale.eval.errors import EvalError

CONFIG, WEIGHTS, TOKENIZER = "config.json", "model.safetensors", "tokenizer.model"
PREFIX = "model."  # TitansForCausalLM keeps the TitansLM as ``model``
WRAPPERS = ("configuration_titans", "modeling_titans", "tokenization_titans")  # titans_scale.hf modules, kept by name
CODE_PACKAGES = ("models", "memory")  # titans_scale.<these> travel with an export, as titans_<package>[_<module>]
AUTO_MAP = {"AutoConfig": "configuration_titans.TitansConfig", "AutoModelForCausalLM": "modeling_titans.TitansForCausalLM"}
TOKENIZER_CLASS = "tokenization_titans.TitansTokenizer"


def _safetensors():
    try:
        import safetensors.torch
    except ModuleNotFoundError:
        raise EvalError("safetensors is not installed; pip install safetensors (the 'hf' extra of titans_scale)") from None
    return safetensors.torch


# ----------------------------------------------------------------------------------------------------
# The model's own code, flattened


def _flat_name(module: str) -> str:
    """The file name (no .py) a titans_scale module gets in an export."""
    parts = module.split(".")
    if parts[:2] == ["titans_scale", "hf"] and len(parts) == 3 and parts[2] in WRAPPERS:
        return parts[2]
    if len(parts) in (2, 3) and parts[0] == "titans_scale" and parts[1] in CODE_PACKAGES:
        return "titans_" + "_".join(parts[1:])
    raise RuntimeError(f"{module} is imported by the exported model code but does not travel with an export; "
                       f"keep the model code inside titans_scale.{{{','.join(CODE_PACKAGES)}}}")


def _source(module: str) -> tuple[str, bool]:
    """(source text, whether it is a package) of a titans_scale module."""
    spec = importlib.util.find_spec(module)
    return Path(spec.origin).read_text(encoding="utf-8"), spec.submodule_search_locations is not None


def code_files() -> dict[str, str]:
    """``{file name: source}`` of the wrappers and every titans_scale module they reach, each import of a
    titans_scale module rewritten to a relative import of its flat file."""
    sources: dict[str, str] = {}
    needs: dict[str, set[str]] = {}  # flat name -> the flat names it imports
    todo = [f"titans_scale.hf.{name}" for name in WRAPPERS]
    while todo:
        module = todo.pop()
        name = _flat_name(module)
        if name in sources:
            continue
        text, is_package = _source(module)
        package = module if is_package else module.rpartition(".")[0]
        lines = text.splitlines(keepends=True)
        needs[name] = set()
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.Import) and any(a.name.split(".")[0] == "titans_scale" for a in node.names):
                raise RuntimeError(f"{module}: use `from titans_scale.x import y` in model code, not `import titans_scale.x`")
            if not isinstance(node, ast.ImportFrom):
                continue
            if node.level:
                if node.module is None:
                    raise RuntimeError(f"{module}: `from . import x` cannot be exported; import from the module itself")
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                target = f"{base}.{node.module}"
            elif node.module.split(".")[0] == "titans_scale":
                target = node.module
            else:
                continue
            todo.append(target)
            needs[name].add(_flat_name(target))
            i = node.lineno - 1
            head, tail = lines[i][: node.col_offset], lines[i][node.col_offset :]
            lines[i] = head + re.sub(r"^from\s+[\w.]+\s+import", f"from .{_flat_name(target)} import", tail, count=1)
        sources[name] = "".join(lines)
    for name in WRAPPERS:  # transformers copies a remote-code file's own relative imports only, one level deep
        reach, stack = set(), [name]
        while stack:
            for dep in needs[stack.pop()] - reach:
                reach.add(dep)
                stack.append(dep)
        further = sorted(reach - needs[name] - {name})
        if further:
            sources[name] += ("\n# The files the imports above import in turn, named here so that transformers copies them too\n"
                              "# (it copies a remote-code file's own relative imports only).\n" +
                              "".join(f"from .{dep} import __doc__ as _  # noqa: E402,F401\n" for dep in further))
    return {f"{name}.py": text for name, text in sources.items()}


# ----------------------------------------------------------------------------------------------------
# Export


def export(model, tokenizer, out: str | os.PathLike, dtype: torch.dtype | None = None) -> Path:
    """Write ``model`` (a ``TitansLM``) and ``tokenizer`` (a ``titans_scale`` ``Tokenizer``) to ``out`` in the
    Hugging Face layout, weights in ``dtype`` (default: as they are). ``out`` is replaced as a whole: it must
    be missing, empty, or an earlier export."""
    from titans_scale import __version__
    from titans_scale.config import to_dict

    out = Path(out)
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / CONFIG).is_file())):
        raise EvalError(f"{out} exists and is not an export; choose a new directory for --out")
    cfg = model.cfg
    if tokenizer.vocab_size > cfg.vocab_size:
        raise EvalError(f"tokenizer {tokenizer.path} has {tokenizer.vocab_size} tokens but the model only "
                        f"{cfg.vocab_size}; pass the tokenizer the model was trained with")
    fields = to_dict(cfg)
    if fields["memory"]["backend"] == "triton":  # a GPU-only choice of training: auto picks it where it runs
        fields["memory"]["backend"] = "auto"
    state = {name: t.detach().cpu() for name, t in model.state_dict().items()}
    if cfg.tie_embeddings:
        state.pop("head.weight")
    dtype = dtype or state["embed.weight"].dtype
    state = {PREFIX + name: (t.to(dtype) if t.is_floating_point() else t).contiguous() for name, t in state.items()}
    config = {"architectures": ["TitansForCausalLM"], "model_type": "titans", "auto_map": AUTO_MAP, **fields,
              "tie_word_embeddings": cfg.tie_embeddings, "bos_token_id": tokenizer.bos_id,
              "eos_token_id": tokenizer.eos_id, "torch_dtype": str(dtype).removeprefix("torch."),
              "titans_scale_version": __version__}
    sp = tokenizer.sp
    tokenizer_config = {"tokenizer_class": "TitansTokenizer", "auto_map": {"AutoTokenizer": [TOKENIZER_CLASS, None]},
                        "unk_token": sp.id_to_piece(sp.unk_id()), "bos_token": sp.id_to_piece(sp.bos_id()),
                        "eos_token": sp.id_to_piece(sp.eos_id()), "clean_up_tokenization_spaces": False}

    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    _safetensors().save_file(state, str(tmp / WEIGHTS), metadata={"format": "pt"})
    os.chmod(tmp / WEIGHTS, 0o644)  # like the other files (safetensors writes it private)
    (tmp / CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    (tmp / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2) + "\n")
    (tmp / TOKENIZER).write_bytes(tokenizer.proto)
    for name, text in code_files().items():
        (tmp / name).write_text(text, encoding="utf-8")
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out


# ----------------------------------------------------------------------------------------------------
# Loading


def is_export(path: str | os.PathLike) -> bool:
    path = Path(path)
    return (path / CONFIG).is_file() and (path / WEIGHTS).is_file()


def read_model_config(path: str | os.PathLike):
    """The ``ModelConfig`` of an export (the fields of ``config.json`` that are ours), checked."""
    from titans_scale.config import ConfigError, to_dataclass
    from titans_scale.models import ModelConfig

    path = Path(path)
    if not is_export(path):
        raise EvalError(f"{path} is not a Hugging Face export (no {CONFIG} and {WEIGHTS}); write one with "
                        f"`python -m titans_scale.export --checkpoint run/model.pt --out {path}`")
    try:
        config = json.loads((path / CONFIG).read_text())
    except json.JSONDecodeError as err:
        raise EvalError(f"{path / CONFIG} is not valid JSON ({err.msg} at line {err.lineno})") from None
    names = {name for name in ModelConfig.__dataclass_fields__}
    try:
        return to_dataclass(ModelConfig, {k: v for k, v in config.items() if k in names}, prefix="model.").validate()
    except (ConfigError, ValueError) as err:
        raise EvalError(f"{path / CONFIG}: {err}") from None


def from_pretrained(path: str | os.PathLike, device: str | torch.device = "cpu", dtype: torch.dtype | None = None):
    """The ``TitansLM`` of an export, in eval mode on ``device`` (weights in ``dtype``, default as stored)."""
    from titans_scale.models import build_model

    path = Path(path)
    cfg = read_model_config(path)
    state = _safetensors().load_file(str(path / WEIGHTS), device=str(device))
    state = {name.removeprefix(PREFIX): t for name, t in state.items()}
    with torch.device("meta"):
        model = build_model(cfg)
    expected = set(model.state_dict()) - ({"head.weight"} if cfg.tie_embeddings else set())
    missing, unknown = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unknown:
        parts = [f"{len(items)} {what} ({', '.join(items[:3])}{', ...' if len(items) > 3 else ''})"
                 for what, items in (("missing weights", missing), ("unknown weights", unknown)) if items]
        raise EvalError(f"{path / WEIGHTS} does not fit {path / CONFIG}: {'; '.join(parts)}; re-export the model")
    try:
        model.load_state_dict(state, strict=False, assign=True)
    except RuntimeError as err:  # a shape that does not fit the config
        raise EvalError(f"{path / WEIGHTS} does not fit {path / CONFIG}: {str(err).splitlines()[-1].strip()}; "
                        f"re-export the model") from None
    if cfg.tie_embeddings:
        model.head.weight = model.embed.weight
    return model.to(dtype=dtype).eval() if dtype is not None else model.eval()
