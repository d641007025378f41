"""BABILong: bAbI reasoning questions over facts scattered in long distractor text, from local files.

Records are BABILong's: ``input`` (or ``context``), ``question``, ``target``. Files are JSON (a list of
records), JSON lines or parquet, e.g. the dataset's own layout ``<dir>/<length>/<task>.json`` or names like
``qa1_4k.jsonl``: the task (``qa1``..``qa20``) and context length (``0k``, ``4k``, ``128k``, ``1m``) come from
the path, or from a record's ``task`` / ``length`` fields. The model reads
``<context>\n{context}\n</context>\n\nQuestion: {question}\nAnswer:`` (``--template``) and answers greedily; as
in BABILong's scoring, the answer counts if, in its first line and first sentence, the target is the only
one of the task's labels that is not already named in the question (outside qa1-qa20: the target word
appears in the first line).
"""

from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path

import torch

from titans_scale.data.progress import Progress

from .errors import EvalError
from .inference import batch_size_arg, batches_by_length, greedy_continuations

DEFAULT_TEMPLATE = "<context>\n{context}\n</context>\n\nQuestion: {question}\nAnswer:"

# Answer vocabularies of the bAbI tasks (BABILong's metrics): a prediction naming several of them is wrong.
ROOMS = ("bathroom", "bedroom", "garden", "hallway", "kitchen", "office")
TASK_LABELS = {
    **{task: ROOMS for task in ("qa1", "qa2", "qa3", "qa4", "qa11", "qa12", "qa13")},
    "qa5": ("bill", "fred", "jeff", "mary", "apple", "football", "milk"),
    "qa6": ("no", "yes"), "qa7": ("none", "one", "three", "two"), "qa8": ("apple", "football", "milk", "nothing"),
    "qa9": ("no", "yes"), "qa10": ("maybe", "no", "yes"),
    "qa14": ("bedroom", "cinema", "kitchen", "office", "park", "school"), "qa15": ("cat", "mouse", "sheep", "wolf"),
    "qa16": ("gray", "green", "white", "yellow"), "qa17": ("no", "yes"), "qa18": ("no", "yes"),
    "qa19": ("e,e", "e,n", "e,s", "n,e", "n,n", "n,w", "s,e", "s,s", "s,w", "w,n", "w,s", "w,w"),
    "qa20": ("bedroom", "bored", "garden", "hungry", "kitchen", "thirsty", "tired"),
}
TASK_RE = re.compile(r"(?<![a-z0-9])(qa\d+)(?![0-9])", re.I)
LENGTH_RE = re.compile(r"(?<![a-z0-9])(\d+(?:\.\d+)?[km])(?![a-z0-9])", re.I)
SUFFIXES = (".json", ".jsonl", ".parquet")


def answer_text(output: str) -> str:
    """The part of a generated answer that is scored: first line, first sentence, lower case."""
    text = output.strip().split("\n")[0].lower()
    for stop in (".", "<context>", "<example>", "question"):
        text = text.split(stop)[0]
    return text


def is_correct(output: str, target: str, question: str, task: str) -> bool:
    """BABILong's scoring: the target is the only task label in the answer that the question does not name."""
    text, target = answer_text(output), target.strip().lower()
    labels = TASK_LABELS.get(task.lower())
    if labels is None:
        return re.search(rf"(?<!\w){re.escape(target)}(?!\w)", text) is not None
    asked = {label for label in labels if label in question.lower()}
    named = {label for label in labels if re.search(rf"(?<!\w){re.escape(label)}(?!\w)", text)} - asked
    return named == {target}


def length_value(label: str) -> float:
    """'4k' -> 4000, '1m' -> 1e6: for ordering the columns."""
    return float(label[:-1]) * (1e3 if label[-1].lower() == "k" else 1e6)


# ----------------------------------------------------------------------------------------------------
# Reading


def find_files(paths: list[str]) -> list[Path]:
    files: list[Path] = []
    for given in paths:
        path = Path(given)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in SUFFIXES)
            if not found:
                raise EvalError(f"--data {path} holds no {', '.join(SUFFIXES)} files")
            files += found
        elif path.is_file():
            files.append(path)
        else:
            raise EvalError(f"--data {path} does not exist; give BABILong .json/.jsonl/.parquet files or a directory of them")
    return files


def read_records(path: Path) -> list[dict]:
    """The records of one file (a JSON list, JSON lines, or parquet)."""
    try:
        if path.suffix.lower() == ".parquet":
            import pyarrow.parquet as pq

            return pq.read_table(path).to_pylist()
        text = path.read_text(encoding="utf-8")
        stripped = text.lstrip()
        if stripped.startswith("["):
            return json.loads(text)
        if stripped.startswith("{") and path.suffix.lower() == ".json":
            try:
                data = json.loads(text)
                return data if isinstance(data, list) else next((v for v in data.values() if isinstance(v, list)), [data])
            except json.JSONDecodeError:
                pass  # JSON lines under a .json name
        return [json.loads(line) for line in text.splitlines() if line.strip()]
    except (json.JSONDecodeError, UnicodeDecodeError, OSError) as err:
        raise EvalError(f"BABILong file {path} is not readable JSON / JSON lines / parquet ({str(err).splitlines()[0]})") from None
    except Exception as err:  # pyarrow's own errors
        raise EvalError(f"BABILong file {path} is not readable parquet ({str(err).splitlines()[0]})") from None


def load_records(paths: list[str], tasks: set[str] | None, max_samples: int | None) -> list[dict]:
    """Records with ``task`` and ``length`` filled in, at most ``max_samples`` per (task, length)."""
    out, counts = [], {}
    for path in find_files(paths):
        task_in_path = TASK_RE.findall(str(path))
        length_in_path = LENGTH_RE.findall(str(path))
        for i, record in enumerate(read_records(path)):
            if not isinstance(record, dict):
                raise EvalError(f"BABILong file {path} record {i + 1} is not an object with input, question and target")
            context = record.get("input", record.get("context"))
            missing = [name for name, v in (("input/context", context), ("question", record.get("question")),
                                            ("target", record.get("target"))) if v is None]
            if missing:
                raise EvalError(f"BABILong file {path} record {i + 1} has no {', '.join(missing)} field")
            task = str(record.get("task") or (task_in_path[-1] if task_in_path else "")).lower()
            length = str(record.get("length") or (length_in_path[-1] if length_in_path else "")).lower()
            if not task or not length:
                raise EvalError(f"BABILong file {path}: cannot tell its {'task' if not task else 'context length'}; name "
                                f"it like <length>/<task>.json or qa1_4k.jsonl, or give records 'task' and 'length' fields")
            if tasks and task not in tasks:
                continue
            key = (task, length)
            if max_samples is not None and counts.get(key, 0) >= max_samples:
                continue
            counts[key] = counts.get(key, 0) + 1
            out.append({"task": task, "length": length, "context": str(context), "question": str(record["question"]),
                        "target": str(record["target"]), "file": str(path)})
    if not out:
        raise EvalError(f"no BABILong records{' for tasks ' + ','.join(sorted(tasks)) if tasks else ''} in {', '.join(paths)}")
    return out


# ----------------------------------------------------------------------------------------------------
# Evaluation


def answers(model, tokenizer, prompts: list[list[int]], *, max_new_tokens: int, window: int | None, device) -> list[str]:
    """Greedy continuations of prompts (token lists, one batch) up to a newline, eos or ``max_new_tokens``."""
    def stop(tokens: list[int]) -> bool:
        return tokens[-1] == tokenizer.eos_id or "\n" in tokenizer.decode(tokens).lstrip()

    out = []
    for tokens in greedy_continuations(model, prompts, max_new_tokens, stop=stop, window=window, device=device):
        out.append(tokenizer.decode(tokens[:-1] if tokens and tokens[-1] == tokenizer.eos_id else tokens))
    return out


def evaluate(model, tokenizer, records: list[dict], *, template: str, max_new_tokens: int, window: int | None,
             device, batch_size: int | None = None, progress: Progress | None = None) -> list[dict]:
    """Every record answered and scored (records gain prompt_tokens, prediction and correct); prompts of
    similar length are answered together (``batch_size`` None: as many as keep a call at 8192 tokens)."""
    prompts = [tokenizer.encode(template.format(context=r["context"], question=r["question"])) for r in records]
    started, tokens, done = time.perf_counter(), 0, 0
    for batch in batches_by_length(prompts, len, batch_size, window):
        predictions = answers(model, tokenizer, [prompts[i] for i in batch], max_new_tokens=max_new_tokens,
                              window=window, device=device)
        for i, prediction in zip(batch, predictions):
            record = records[i]
            record.update(prompt_tokens=len(prompts[i]), prediction=prediction,
                          correct=is_correct(prediction, record["target"], record["question"], record["task"]))
            tokens += len(prompts[i])
        done += len(batch)
        if progress is not None:
            elapsed = time.perf_counter() - started
            progress.update(f"{done}/{len(records)} | {tokens / max(elapsed, 1e-9):.0f} prompt tok/s | "
                            f"ETA {elapsed / done * (len(records) - done):.0f}s")
    return records


def accuracy_grid(records: list[dict]) -> tuple[list[str], list[str], list[list[float | None]]]:
    """Tasks (qa1, qa2, ...), lengths (short to long) and the accuracy of every (task, length)."""
    tasks = sorted({r["task"] for r in records}, key=lambda t: (int(t[2:]) if t[2:].isdigit() else 1 << 30, t))
    lengths = sorted({r["length"] for r in records}, key=length_value)
    grid = []
    for task in tasks:
        row = []
        for length in lengths:
            hits = [r["correct"] for r in records if r["task"] == task and r["length"] == length]
            row.append(sum(hits) / len(hits) if hits else None)
        grid.append(row)
    return tasks, lengths, grid


# ----------------------------------------------------------------------------------------------------
# Command


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True, nargs="+", help="BABILong .json/.jsonl/.parquet files or directories")
    parser.add_argument("--tasks", default=None, help="only these tasks, e.g. qa1,qa2,qa3,qa4,qa5 (default: all found)")
    parser.add_argument("--max-samples", type=int, default=None, help="at most this many records per task and length")
    parser.add_argument("--max-new-tokens", type=int, default=16, help="answer length limit (tokens)")
    parser.add_argument("--template", default=DEFAULT_TEMPLATE, help="prompt with {context} and {question}")
    parser.add_argument("--batch-size", type=batch_size_arg, default=None, metavar="N|auto",
                        help="questions answered together, shortest prompts first (default auto: as many as keep "
                             "a call at 8192 tokens)")


def run(args: argparse.Namespace) -> dict:
    from .cli import open_model, results_dir
    from .results import accuracy_heatmap, format_table, log_to_wandb, percent, write_json

    if "{context}" not in args.template or "{question}" not in args.template:
        raise EvalError("--template must contain {context} and {question}")
    if args.max_new_tokens < 1 or (args.max_samples is not None and args.max_samples < 1):
        raise EvalError("--max-new-tokens and --max-samples must be >= 1")
    tasks = {t.strip().lower() for t in args.tasks.split(",") if t.strip()} if args.tasks else None
    records = load_records(args.data, tasks, args.max_samples)
    loaded = open_model(args)
    out = results_dir(args, loaded)
    evaluate(loaded.model, loaded.tokenizer, records, template=args.template, max_new_tokens=args.max_new_tokens,
             window=loaded.window, device=loaded.device, batch_size=args.batch_size, progress=Progress("babilong"))
    task_names, lengths, grid = accuracy_grid(records)
    by_length = [_mean([row[j] for row in grid]) for j in range(len(lengths))]
    summary = {f"{t}/{n}": a for t, row in zip(task_names, grid) for n, a in zip(lengths, row) if a is not None}
    summary.update({f"mean/{n}": a for n, a in zip(lengths, by_length)})
    summary["mean"] = sum(r["correct"] for r in records) / len(records)
    table = format_table("task \\ length", task_names + ["mean"], lengths,
                         [[percent(v) for v in row] for row in grid] + [[percent(v) for v in by_length]])
    png = accuracy_heatmap(out / "babilong.png", grid, task_names, lengths,
                           title=f"BABILong: {loaded.path.parent.name} (mean {100 * summary['mean']:.1f}%)",
                           xlabel="context length", ylabel="task")
    record = {"task": "babilong", "checkpoint": str(loaded.path), "template": args.template,
              "accuracy": {t: {n: a for n, a in zip(lengths, row)} for t, row in zip(task_names, grid)},
              "summary": summary, "samples": [{k: v for k, v in r.items() if k != "context"} for r in records]}
    json_path = write_json(out / "babilong.json", record)
    print(f"BABILong accuracy % ({len(records)} questions)\n{table}")
    print(f"wrote {json_path} and {png}")
    log_to_wandb(args.wandb, out, "babilong", summary, config={"checkpoint": str(loaded.path), "data": args.data},
                 images={"accuracy": png}, model_file=loaded.path, project=args.wandb_project)
    return record


def _mean(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return sum(present) / len(present) if present else None
