"""Makes lm-eval's own command line know ``--model titans_scale`` (``lm_eval --model titans_scale ...``).

lm-eval 0.4.13 looks models up only in its own registry, filled when ``lm_eval.models`` is imported, and
discovers no plugins. ``python -m titans_scale.lm_eval_plugin`` (run by ``scripts/setup.sh``) copies this
file into site-packages as the stand-alone module ``titans_scale_lm_eval_hook`` and writes a one-line
``titans_scale_lm_eval.pth`` that imports it at interpreter start-up. It imports nothing of titans_scale (so
``python -m titans_scale.X`` in another checkout runs that checkout's code, not the installed copy's) and
only adds an import hook that registers the model class, lazily by name, right after ``lm_eval.models`` has
filled the registry: titans_scale is imported when lm-eval is asked for the model, not before.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
from pathlib import Path

MODEL_NAME = "titans_scale"
TARGET = "titans_scale.eval.harness:TitansHarnessLM"
PTH_NAME = "titans_scale_lm_eval.pth"
HOOK_MODULE = "titans_scale_lm_eval_hook"  # this file, copied beside the .pth (no titans_scale import at start-up)
WATCHED = "lm_eval.models"


def register() -> None:
    """Register the model class under its name (a lazy placeholder: imported when lm-eval asks for it),
    while titans_scale is installed."""
    import importlib.util

    from lm_eval.api.registry import model_registry

    if MODEL_NAME not in model_registry and importlib.util.find_spec("titans_scale") is not None:
        model_registry.register(MODEL_NAME, target=TARGET)


class _RegisterAfterImport(importlib.abc.MetaPathFinder):
    """Finds ``lm_eval.models`` like the normal path finder, and registers once its module has run."""

    def find_spec(self, name, path, target=None):
        if name != WATCHED:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        run = spec.loader.exec_module

        def exec_module(module):
            run(module)
            register()

        spec.loader.exec_module = exec_module
        return spec


def install() -> None:
    """Called from the .pth file at start-up."""
    if WATCHED in sys.modules:
        register()
    elif not any(isinstance(f, _RegisterAfterImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _RegisterAfterImport())


def write_pth(site_packages: str | None = None) -> Path:
    """Write the hook module and the .pth file into this interpreter's site-packages (or ``site_packages``)."""
    import sysconfig

    root = Path(site_packages or sysconfig.get_paths()["purelib"])
    (root / f"{HOOK_MODULE}.py").write_text(Path(__file__).read_text(encoding="utf-8"), encoding="utf-8")
    path = root / PTH_NAME
    # one line starting with "import" (site.py executes those); silent when the hook module is gone
    path.write_text(f"import importlib.util as _u; _u.find_spec({HOOK_MODULE!r}) and "
                    f"__import__({HOOK_MODULE!r}).install()\n")
    return path


if __name__ == "__main__":
    print(f"wrote {write_pth()}: `lm_eval --model {MODEL_NAME} ...` now finds the titans_scale model")
