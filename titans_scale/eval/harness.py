"""lm-evaluation-harness (0.4.x) adapter: the model class ``titans_scale`` and the commands that run it.

lm-eval 0.4.13 finds models only in its own registry (no entry-point discovery), so the class registers
itself when this module is imported. Three ways to use it:

- ``python -m titans_scale.eval harness --checkpoint run/model.pt --tasks piqa,hellaswag``: the short form,
  results in ``eval/harness.json`` and a table;
- ``python -m titans_scale.eval lm_eval --model titans_scale --model_args checkpoint=run/model.pt --tasks piqa``:
  lm-eval's own command line, every option of it, with the class registered first;
- Python: ``import titans_scale.eval.harness`` then ``lm_eval.simple_evaluate(model="titans_scale", ...)``.

The model reads every request whole, whatever its length (the memory carries the state across windows of
``window`` tokens, which only bound activation memory): no context is truncated, and
``loglikelihood_rolling`` scores each document in one stateful pass instead of overlapping windows.
"""

from __future__ import annotations

import argparse
import difflib
import json
import logging
import sys
import time
from pathlib import Path

import torch
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import normalize_gen_kwargs
from tqdm import tqdm

from .checkpoint import load_checkpoint, load_tokenizer, model_path, resolve_device
from .errors import EvalError
from .inference import DEFAULT_WINDOW, IncrementalDecoder, check_sampling, generate_tokens, token_logprobs

MODEL_NAME = "titans_scale"


@register_model(MODEL_NAME)
class TitansHarnessLM(TemplateLM):
    """A titans_scale model file behind lm-eval's ``loglikelihood``, ``loglikelihood_rolling`` and
    ``generate_until``. ``--model_args checkpoint=PATH[,tokenizer=PATH,dtype=float32,window=2048,
    max_gen_toks=256,prefix_eos=False]``; lm-eval's ``--device`` and ``--batch_size`` apply."""

    def __init__(self, checkpoint: str, tokenizer: str | None = None, device: str | None = None,
                 dtype: str = "float32", batch_size: int | str | None = 1, max_batch_size: int | None = None,
                 window: int = DEFAULT_WINDOW, max_gen_toks: int = 256, prefix_eos: bool = False, **unused):
        super().__init__()
        if unused:
            logging.getLogger(__name__).warning("titans_scale ignores model_args %s", ", ".join(sorted(unused)))
        path = model_path(checkpoint)
        if device == "cuda:0" and not torch.cuda.is_available():  # lm-eval's default device, not the user's choice
            logging.getLogger(__name__).warning("no GPU: titans_scale evaluates on the CPU (--device cpu)")
            device = "cpu"
        self._device = resolve_device(device)
        self.model, self.cfg = load_checkpoint(path, self._device, dtype)
        self.tok = load_tokenizer(path, tokenizer, self.cfg.vocab_size)
        self.checkpoint = path
        self.batch_size = 8 if batch_size in (None, "auto") or str(batch_size).startswith("auto") else int(batch_size)
        self.window = int(window) if window else None
        self.max_gen_toks = int(max_gen_toks)
        self.prefix_eos = bool(prefix_eos)

    # -- what TemplateLM needs
    @property
    def eot_token_id(self) -> int:
        return self.tok.eos_id

    @property
    def max_length(self) -> int:  # asked by some tasks; nothing is truncated here
        return 1 << 30

    @property
    def tokenizer_name(self) -> str:
        return f"sentencepiece-{self.tok.sha256[:16]}"

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        return self.tok.encode(string)

    def tok_decode(self, tokens) -> str:
        return self.tok.decode(tokens)

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        return None  # a pretrained base model: no chat format

    def get_model_info(self) -> dict:
        return {"checkpoint": str(self.checkpoint), "variant": self.cfg.variant, "window": self.window}

    # -- scoring
    def _context(self, ids: list[int]) -> list[int]:
        """With ``prefix_eos``, the context starts at a document boundary (eos), as documents did in training."""
        return [self.eot_token_id] + ids if self.prefix_eos and ids[:1] != [self.eot_token_id] else ids

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """(sum of log p(continuation | context), whether greedy decoding gives the continuation) per request,
        from batches of whole sequences (right-padded: a causal model's scores do not see padding)."""
        results: list[tuple[float, bool] | None] = [None] * len(requests)
        sequences = [(self._context(context) + continuation, len(continuation)) for _, context, continuation in requests]
        order = sorted(range(len(requests)), key=lambda i: -len(sequences[i][0]))
        bar = tqdm(total=len(requests), disable=disable_tqdm or self.rank != 0, desc="loglikelihood")
        for start in range(0, len(order), self.batch_size):
            batch = order[start : start + self.batch_size]
            logprobs, greedy = self._score([sequences[i][0] for i in batch])
            for row, i in enumerate(batch):
                tokens, n = sequences[i]
                span = slice(len(tokens) - 1 - n, len(tokens) - 1)  # predictions of the continuation's tokens
                answer = (logprobs[row, span].sum().item(), bool(greedy[row, span].all()))
                results[i] = answer
                self.cache_hook.add_partial("loglikelihood", requests[i][0], answer)
            bar.update(len(batch))
        bar.close()
        return results

    def _score(self, sequences: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(map(len, sequences))
        tokens = torch.full((len(sequences), width), self.eot_token_id, dtype=torch.long)
        for i, seq in enumerate(sequences):
            tokens[i, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        logprobs, greedy = token_logprobs(self.model, tokens.to(self._device), self.window)
        return logprobs.double().cpu(), greedy.cpu()

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """log p(document) = the sum over its tokens, each given all the tokens before it and the eos that
        marks a document start: one stateful pass per document."""
        results = []
        for request in tqdm(requests, disable=disable_tqdm or self.rank != 0, desc="loglikelihood_rolling"):
            (text,) = request.args
            ids = [self.eot_token_id] + self.tok_encode(text)
            value = self._score([ids])[0][0].sum().item() if len(ids) > 1 else 0.0
            results.append(value)
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), value)
        return results

    # -- generation
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy (or, with do_sample, sampled) continuations, cut at the first stop string or eos."""
        results = []
        generator = torch.Generator(device=self._device).manual_seed(1234)
        for request in tqdm(requests, disable=disable_tqdm or self.rank != 0, desc="generate_until"):
            context, raw_kwargs = request.args
            kwargs = normalize_gen_kwargs(raw_kwargs, default_max_gen_toks=self.max_gen_toks)
            until = [s for s in kwargs.get("until", []) if s]
            temperature = float(kwargs.get("temperature", 0.0)) if kwargs.get("do_sample") else 0.0
            top_k, top_p = kwargs.get("top_k"), kwargs.get("top_p")
            check_sampling(temperature, top_k, top_p, kwargs["max_gen_toks"])
            text = self._generate(context, until, kwargs["max_gen_toks"], temperature, top_k, top_p, generator)
            results.append(text)
            self.cache_hook.add_partial("generate_until", (context, raw_kwargs), text)
        return results

    def _generate(self, context: str, until: list[str], max_tokens: int, temperature: float, top_k, top_p,
                  generator) -> str:
        ids = self._context(self.tok_encode(context)) or [self.eot_token_id]
        decoder, text = IncrementalDecoder(self.tok, ids), ""
        prompt = torch.tensor([ids], dtype=torch.long, device=self._device)
        for token in generate_tokens(self.model, prompt, max_tokens, temperature=temperature, top_k=top_k,
                                     top_p=top_p, generator=generator, window=self.window):
            if int(token[0]) == self.eot_token_id:
                break
            text += decoder.push(int(token[0]))
            if any(stop in text for stop in until):
                break
        text += decoder.flush()
        cut = min((text.index(stop) for stop in until if stop in text), default=len(text))
        return text[:cut]


# ----------------------------------------------------------------------------------------------------
# Commands


def task_manager(tasks: list[str], include_path: list[str] | None, default_tasks: bool = True):
    """lm-eval's TaskManager for ``tasks``; an unknown task name is a one-line error with close names. When
    every task is in ``include_path``, lm-eval's own index of ~15K tasks (tens of seconds) is not built."""
    from lm_eval.tasks import TaskManager

    if include_path:
        for path in include_path:
            if not Path(path).exists():
                raise EvalError(f"--include-path {path} does not exist; give a directory of task YAML files")
        local = TaskManager(include_path=include_path, include_defaults=False)
        if all(_known(local, t) for t in tasks) or not default_tasks:
            manager = local
        else:
            manager = TaskManager(include_path=include_path)
    else:
        manager = TaskManager()
    unknown = [t for t in tasks if not _known(manager, t)]
    if unknown:
        close = difflib.get_close_matches(unknown[0], manager.all_tasks, n=3)
        hint = f"did you mean {', '.join(close)}? " if close else ""
        where = "" if default_tasks else f" in {', '.join(include_path or [])}"
        raise EvalError(f"unknown lm-eval task {unknown[0]!r}{where}; {hint}list them with `lm-eval ls tasks`, or "
                        f"add your own YAML tasks with --include-path DIR")
    return manager


def hub_unreachable(err: BaseException) -> str | None:
    """The first line of the error behind ``err`` when a dataset could not be fetched from the Hugging Face hub
    (offline mode, no network, a dataset the hub does not have), else None."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        module = type(err).__module__.split(".")[0]
        if isinstance(err, ConnectionError) or module in ("huggingface_hub", "requests", "urllib3") or \
                type(err).__name__ in ("DatasetNotFoundError", "DataFilesNotFoundError"):
            return f"{type(err).__name__}: {(str(err).strip().splitlines() or [''])[0]}"
        err = err.__cause__ or err.__context__
    return None


def _known(manager, task: str) -> bool:
    return task in manager.all_tasks or bool(manager.match_tasks([task])) or Path(task).is_file()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tasks", required=True, help="comma-separated lm-eval tasks, e.g. piqa,hellaswag,arc_easy")
    parser.add_argument("--include-path", action="append", default=None, help="directory of your own task YAMLs (repeatable)")
    parser.add_argument("--no-default-tasks", action="store_true", help="only the tasks under --include-path")
    parser.add_argument("--num-fewshot", type=int, default=None)
    parser.add_argument("--limit", type=float, default=None, help="documents per task (or a fraction of them)")
    parser.add_argument("--batch-size", type=int, default=8, help="sequences per forward pass (loglikelihood)")
    parser.add_argument("--max-gen-toks", type=int, default=256, help="default generation limit (tasks may set theirs)")
    parser.add_argument("--prefix-eos", action="store_true",
                        help="start every context with eos, the document boundary the model saw in training")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--bootstrap-iters", type=int, default=1000, help="for standard errors; 0 = none")
    parser.add_argument("--log-samples", action="store_true", help="keep every document's requests and answers in the JSON")


def run(args: argparse.Namespace) -> dict:
    from lm_eval import simple_evaluate
    from lm_eval.utils import handle_non_serializable, make_table

    from .results import log_to_wandb, output_dir, write_json

    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if not tasks:
        raise EvalError("--tasks names no task (e.g. --tasks piqa,hellaswag)")
    if args.no_default_tasks and not args.include_path:
        raise EvalError("--no-default-tasks needs --include-path DIR (where your tasks are)")
    manager = task_manager(tasks, args.include_path, default_tasks=not args.no_default_tasks)
    lm = TitansHarnessLM(args.checkpoint, tokenizer=args.tokenizer, device=args.device, dtype=args.dtype,
                         batch_size=args.batch_size, window=args.window, max_gen_toks=args.max_gen_toks,
                         prefix_eos=args.prefix_eos)
    out = output_dir(args.out, lm.checkpoint)
    started = time.perf_counter()
    try:
        results = simple_evaluate(model=lm, tasks=tasks, task_manager=manager, num_fewshot=args.num_fewshot,
                                  limit=args.limit, log_samples=args.log_samples, random_seed=args.seed,
                                  numpy_random_seed=args.seed, torch_random_seed=args.seed,
                                  fewshot_random_seed=args.seed, bootstrap_iters=args.bootstrap_iters)
    except Exception as err:
        reason = hub_unreachable(err)
        if reason is None:
            raise
        raise EvalError(f"lm-eval task(s) {', '.join(tasks)} need their datasets from the Hugging Face hub, which "
                        f"cannot be reached ({reason}); run once where it can (the datasets cache then serves them "
                        f"offline), or give local tasks with --include-path DIR (docs/eval.md)") from None
    seconds = time.perf_counter() - started
    print(make_table(results))
    record = {"task": "harness", "checkpoint": str(lm.checkpoint), "tasks": tasks, "seconds": round(seconds, 3),
              "results": results["results"], "versions": results.get("versions"), "n-shot": results.get("n-shot"),
              "config": results.get("config")}
    if args.log_samples:
        record["samples"] = results.get("samples")
    json_path = write_json(out / "harness.json", json.loads(json.dumps(record, default=handle_non_serializable)))
    print(f"wrote {json_path}")
    summary = {f"{task}/{metric.split(',')[0]}": value for task, metrics in results["results"].items()
               for metric, value in metrics.items() if isinstance(value, (int, float)) and "stderr" not in metric}
    log_to_wandb(args.wandb, out, "harness", summary, config={"checkpoint": str(lm.checkpoint), "tasks": tasks},
                 model_file=lm.checkpoint, project=args.wandb_project)
    return record


def lm_eval_cli(argv: list[str]) -> int:
    """lm-eval's own command line (``lm-eval run --model titans_scale ...``) with this model registered."""
    from lm_eval.__main__ import cli_evaluate

    sys.argv = ["lm-eval", *argv]
    cli_evaluate()
    return 0


def lm_eval_main() -> None:
    """Console-script form of ``lm_eval_cli`` (e.g. ``titans-lm-eval run --model titans_scale ...``)."""
    from .errors import run_cli

    sys.exit(run_cli(lambda: lm_eval_cli(sys.argv[1:])))
