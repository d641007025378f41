"""``python -m titans_scale.eval <task> --checkpoint run/model.pt ...``: one command per evaluation.

Tasks: perplexity, niah, babilong, harness (lm-eval tasks), recall (the synthetic tasks), lm_eval (lm-eval's
own command line with the titans_scale model registered); forecast and classify for the models of
task=forecast and task=classify; ``curves RUN_DIR`` draws a run's training curves.
``python -m titans_scale.eval <task> --help`` lists a task's options.
A mistake on the command line or in the inputs ends with one line on stderr and exit code 2.
"""

from __future__ import annotations

import difflib
import importlib
import sys

from .errors import ArgumentParser, EvalError, run_cli

TASKS = {
    "perplexity": ("perplexity", "loss and perplexity on validation shards or text files, any context length"),
    "niah": ("niah", "S-NIAH needle in a haystack: accuracy by context length and needle depth"),
    "babilong": ("babilong", "BABILong questions from local files: accuracy by task and context length"),
    "harness": ("harness", "lm-evaluation-harness tasks (piqa, hellaswag, ...) on the model"),
    "forecast": ("forecast", "time-series forecasting model: MSE and MAE per horizon on the test split"),
    "classify": ("classify", "sequence classifier (DNA): accuracy on the test split, per class"),
    "recall": ("recall", "synthetic long-range tasks (associative recall, pass-key, copy): accuracy by distance"),
}
ALIASES = {"ppl": "perplexity", "s-niah": "niah", "lm-eval": "lm_eval"}

USAGE = "usage: python -m titans_scale.eval <task> --checkpoint PATH [options]\n\ntasks:\n" + "\n".join(
    f"  {name:<11} {about}" for name, (_, about) in TASKS.items()
) + "\n  lm_eval     lm-eval's own command line (lm-eval run --model titans_scale --model_args checkpoint=PATH ...)" \
    "\n  curves      a run's loss and perplexity curves: python -m titans_scale.eval curves RUN_DIR (curves.png)" \
    "\n\n`python -m titans_scale.eval <task> --help` lists a task's options; docs/eval.md explains them."


def task_module(name: str):
    """The module of a task; the harness needs the optional lm-eval package."""
    try:
        return importlib.import_module(f"titans_scale.eval.{TASKS[name][0]}")
    except ModuleNotFoundError as err:
        if name == "harness" and err.name and err.name.split(".")[0] == "lm_eval":
            raise EvalError("lm-eval is not installed; pip install lm-eval==0.4.13 (the 'eval' extra of titans_scale)") from None
        raise


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)

    def dispatch() -> int:
        if not argv or argv[0] in ("-h", "--help", "help"):
            print(USAGE)
            return 0
        if argv[0] == "--version":
            from titans_scale import version_text

            print(version_text())
            return 0
        name = ALIASES.get(argv[0], argv[0])
        if name == "curves":
            from .curves import main as curves

            return curves(argv[1:])
        if name == "lm_eval":
            task_module("harness")
            from .harness import lm_eval_cli

            return lm_eval_cli(argv[1:])
        if name not in TASKS:
            close = difflib.get_close_matches(name, [*TASKS, "lm_eval", "curves"], n=1)
            hint = f"did you mean {close[0]}? " if close else ""
            raise EvalError(f"unknown evaluation {argv[0]!r}; {hint}choose one of {', '.join(TASKS)} or lm_eval")
        module = task_module(name)
        parser = ArgumentParser(prog=f"python -m titans_scale.eval {name}", description=TASKS[name][1])
        module.add_arguments(parser)
        from .cli import add_model_args, add_output_args

        add_model_args(parser, language=getattr(module, "LANGUAGE_MODEL", True))
        add_output_args(parser)
        module.run(parser.parse_args(argv[1:]))
        return 0

    return run_cli(dispatch)


if __name__ == "__main__":
    sys.exit(main())
