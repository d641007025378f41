"""S-NIAH, single needle in a haystack (RULER style; the Titans paper's S-NIAH-PK / -N / -W table).

One needle (a pass key, a 7-digit number or a UUID, the last two under a random key word) is hidden in a
haystack: RULER's repeated noise ("The grass is green. The sky is blue. ...") or real text from a corpus
file. Prompts are built in tokens, so a prompt of context length L is exactly L tokens (instruction,
haystack with the needle, question, answer prefix; the answer is generated after it), and the needle
starts at the sentence boundary of the haystack closest to depth x haystack length. Everything is seeded
(one random stream per needle kind, length, depth and sample), decoding is greedy, and a sample counts only
if the first word of the answer is exactly the needle's value.
"""

from __future__ import annotations

import argparse
import random
import re
import time
import uuid
from dataclasses import asdict, dataclass
from typing import Callable

import torch

from titans_scale.data.progress import Progress

from .errors import EvalError
from .inference import auto_batch_size, batch_size_arg, generate_tokens

NOISE = ("The grass is green.", "The sky is blue.", "The sun is yellow.", "Here we go.", "There and back again.")

ADJECTIVES = ("amber", "brave", "calm", "damp", "eager", "faint", "gentle", "hollow", "icy", "jolly", "keen", "lively",
              "mellow", "narrow", "odd", "proud", "quiet", "rapid", "silent", "tidy", "upper", "vivid", "wary", "young")
NOUNS = ("anchor", "badger", "canyon", "dolphin", "engine", "falcon", "garden", "harbor", "island", "jacket", "kettle",
         "lantern", "meadow", "needle", "orchard", "pepper", "quarry", "river", "saddle", "tunnel", "valley", "willow")


@dataclass(frozen=True)
class NeedleKind:
    """The wording of one needle kind: instruction, the needle sentence, question and answer prefix."""

    intro: str
    needle: str
    question: str
    answer_prefix: str
    value: Callable[[random.Random], str]
    keyed: bool = True  # a random key word names the value (RULER); the pass key has none


def _magic(kind: str, value: Callable[[random.Random], str]) -> NeedleKind:
    return NeedleKind(
        intro=f"A special magic {kind} is hidden within the following text. Make sure to memorize it. "
              f"I will quiz you about the {kind} afterwards.",
        needle=f"One of the special magic {kind}s for {{key}} is: {{value}}.",
        question=f"What is the special magic {kind} for {{key}} mentioned in the provided text?",
        answer_prefix=f"The special magic {kind} for {{key}} mentioned in the provided text is",
        value=value,
    )


NEEDLES = {
    "passkey": NeedleKind(
        intro="There is an important piece of information hidden inside a lot of irrelevant text. Find it and "
              "memorize it. I will quiz you about the important information there.",
        needle="The pass key is {value}. Remember it. {value} is the pass key.",
        question="What is the pass key?",
        answer_prefix="The pass key is",
        value=lambda rng: str(rng.randint(10_000, 99_999)),
        keyed=False,
    ),
    "number": _magic("number", lambda rng: str(rng.randint(1_000_000, 9_999_999))),
    "uuid": _magic("uuid", lambda rng: str(uuid.UUID(int=rng.getrandbits(128), version=4))),
}


@dataclass
class Sample:
    """One prompt: exactly ``length`` tokens, the needle's tokens at ``needle_start``."""

    needle: str
    length: int
    depth: float  # percent of the haystack before the needle, 0..100
    index: int
    key: str
    answer: str
    tokens: list[int]
    needle_start: int  # index of the needle's first token in the prompt
    needle_tokens: int
    haystack_start: int  # index of the haystack's first token; it ends before the question
    haystack_tokens: int  # haystack length, needle excluded


class Haystack:
    """Sentences to fill a context with, each tokenized on its own (so cuts fall between sentences)."""

    def __init__(self, tokenizer, corpus: str | None = None, max_tokens: int = 0):
        self.tokenizer = tokenizer
        self.name = corpus or "noise"
        self.sentences = [tokenizer.encode(s) for s in (NOISE if corpus is None else _corpus_sentences(corpus, tokenizer, max_tokens))]
        self.sentences = [s for s in self.sentences if s]
        if not self.sentences:
            raise EvalError(f"haystack {self.name} holds no text")

    def fill(self, budget: int, start: int) -> tuple[list[int], list[int]]:
        """``budget`` tokens of sentences from sentence ``start`` on (cycling), and the sentence boundaries in
        them (token offsets, 0 and ``budget`` included)."""
        tokens, bounds, i = [], [0], start
        while len(tokens) < budget:
            tokens.extend(self.sentences[i % len(self.sentences)])
            bounds.append(min(len(tokens), budget))
            i += 1
        return tokens[:budget], bounds


def _corpus_sentences(corpus: str, tokenizer, max_tokens: int) -> list[str]:
    """Sentences of a corpus (txt / jsonl / parquet), enough for ``max_tokens`` tokens (about 4 chars each)."""
    from titans_scale.data.corpus import check_corpus, iter_documents, resolve_corpus

    paths = resolve_corpus(corpus)
    check_corpus(paths)
    sentences, chars = [], 0
    for doc in iter_documents(paths):
        for sentence in re.split(r"(?<=[.!?])\s+|\n+", doc.text):
            if sentence.strip():
                sentences.append(sentence.strip())
                chars += len(sentence)
        if chars > 8 * max_tokens + 10_000:
            break
    return sentences


class NeedleGenerator:
    """Deterministic S-NIAH prompts: the same seed, kind, length, depth and index give the same sample."""

    def __init__(self, tokenizer, haystack: Haystack, seed: int = 0):
        self.tokenizer, self.haystack, self.seed = tokenizer, haystack, seed

    def sample(self, needle: str, length: int, depth: float, index: int) -> Sample:
        if needle not in NEEDLES:
            raise EvalError(f"needle {needle!r} is unknown; choose from {', '.join(NEEDLES)}")
        if not 0 <= depth <= 100:
            raise EvalError(f"depth {depth} must be a percentage in [0, 100]")
        kind = NEEDLES[needle]
        rng = random.Random(f"{self.seed}/{needle}/{length}/{depth}/{index}")
        key = f"{rng.choice(ADJECTIVES)}-{rng.choice(NOUNS)}" if kind.keyed else ""
        value = kind.value(rng)
        encode = self.tokenizer.encode
        prefix = encode(kind.intro + "\n")
        needle_ids = encode(kind.needle.format(key=key, value=value))
        suffix = encode("\n" + kind.question.format(key=key) + "\n" + kind.answer_prefix.format(key=key))
        budget = length - len(prefix) - len(needle_ids) - len(suffix)
        if budget < 0:
            need = length - budget
            raise EvalError(f"context length {length} is too short for the {needle} prompt: instruction, needle and "
                            f"question alone take {need} tokens; use lengths >= {need}")
        start = 0 if self.haystack.name == "noise" else rng.randrange(len(self.haystack.sentences))
        hay, bounds = self.haystack.fill(budget, start)
        cut = min(bounds, key=lambda b: (abs(b - depth / 100 * budget), b))
        tokens = prefix + hay[:cut] + needle_ids + hay[cut:] + suffix
        return Sample(needle, length, depth, index, key, value, tokens, len(prefix) + cut, len(needle_ids),
                      len(prefix), budget)


def exact_match(prediction: str, answer: str) -> bool:
    """Whether the answer's first word (trailing punctuation aside) is exactly the needle's value."""
    words = prediction.split()
    return bool(words) and words[0].rstrip(".,;:!?\"')]") == answer


# ----------------------------------------------------------------------------------------------------
# Evaluation


@torch.no_grad()
def answer_batch(model, tokenizer, samples: list[Sample], *, window: int | None, device) -> list[str]:
    """Greedy answers to prompts of one length (batched): the text up to a newline or eos."""
    steps = max(len(tokenizer.encode(" " + s.answer)) for s in samples) + 3
    prompt = torch.tensor([s.tokens for s in samples], dtype=torch.long, device=device)
    generated = [[] for _ in samples]
    for token in generate_tokens(model, prompt, steps, temperature=0.0, window=window):
        for row, t in zip(generated, token.tolist()):
            row.append(t)
    texts = []
    for row in generated:
        if tokenizer.eos_id in row:
            row = row[: row.index(tokenizer.eos_id)]
        texts.append(tokenizer.decode(row).split("\n")[0].strip())
    return texts


def evaluate(model, tokenizer, generator: NeedleGenerator, *, needles: list[str], lengths: list[int],
             depths: list[float], samples: int, batch_size: int | None, window: int | None, device,
             progress: Progress | None = None) -> tuple[dict, list[dict]]:
    """Accuracy[needle][length][depth] over ``samples`` prompts per cell, and every sample's record."""
    accuracy: dict[str, dict[int, dict[float, float]]] = {}
    records: list[dict] = []
    cells, done, started = len(needles) * len(lengths) * len(depths), 0, time.perf_counter()
    for needle in needles:
        accuracy[needle] = {}
        for length in lengths:
            accuracy[needle][length] = {}
            for depth in depths:
                batch = [generator.sample(needle, length, depth, i) for i in range(samples)]
                predictions = []
                rows = batch_size or auto_batch_size(len(batch[0].tokens), window)  # prompts of one length
                for start in range(0, len(batch), rows):
                    predictions += answer_batch(model, tokenizer, batch[start : start + rows], window=window, device=device)
                correct = [exact_match(p, s.answer) for p, s in zip(predictions, batch)]
                accuracy[needle][length][depth] = sum(correct) / len(correct)
                records += [{k: v for k, v in asdict(s).items() if k != "tokens"} | {"prediction": p, "correct": c}
                            for s, p, c in zip(batch, predictions, correct)]
                done += 1
                if progress is not None:
                    elapsed = time.perf_counter() - started
                    progress.update(f"{needle} {length_label(length)} depth {depth:g}%: "
                                    f"{100 * accuracy[needle][length][depth]:.0f}% | cell {done}/{cells} | "
                                    f"ETA {elapsed / done * (cells - done):.0f}s", force=True)
    return accuracy, records


def length_label(n: int) -> str:
    """4096 -> '4K', 1000 -> '1000'."""
    return f"{n // 1024}K" if n % 1024 == 0 else str(n)


# ----------------------------------------------------------------------------------------------------
# Command


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--needle", default="passkey,number,uuid", help=f"needle kinds: {', '.join(NEEDLES)}")
    parser.add_argument("--lengths", default="1k,2k,4k,8k,16k", help="context lengths in tokens (k = 1024)")
    parser.add_argument("--depths", default="0,25,50,75,100", help="needle depths, percent of the haystack")
    parser.add_argument("--samples", type=int, default=10, help="prompts per length and depth")
    parser.add_argument("--haystack", default="noise",
                        help="'noise' (RULER's repeated sentences) or a corpus: .txt/.jsonl/.parquet file, directory or glob")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=batch_size_arg, default=None, metavar="N|auto",
                        help="prompts per forward pass (default auto: as many as keep a call at 8192 tokens)")


def parse_settings(args: argparse.Namespace) -> tuple[list[str], list[int], list[float]]:
    from .cli import parse_int_list

    needles = [n.strip() for n in args.needle.split(",") if n.strip()]
    unknown = [n for n in needles if n not in NEEDLES]
    if unknown or not needles:
        raise EvalError(f"--needle {args.needle!r}: unknown kind {', '.join(unknown) or '(none)'}; choose from {', '.join(NEEDLES)}")
    lengths = parse_int_list(args.lengths, "--lengths")
    try:
        depths = [float(d) for d in args.depths.split(",") if d.strip()]
    except ValueError:
        raise EvalError(f"--depths {args.depths!r} must be comma-separated percentages, e.g. 0,25,50,75,100") from None
    if not depths or any(not 0 <= d <= 100 for d in depths):
        raise EvalError(f"--depths {args.depths!r} must be percentages in [0, 100]")
    if args.samples < 1:
        raise EvalError("--samples must be >= 1")
    return needles, lengths, depths


def run(args: argparse.Namespace) -> dict:
    from .cli import open_model, results_dir
    from .results import accuracy_heatmap, format_table, log_to_wandb, percent, write_json

    needles, lengths, depths = parse_settings(args)
    loaded = open_model(args)
    tokenizer = loaded.tokenizer
    haystack = Haystack(tokenizer, None if args.haystack == "noise" else args.haystack, max(lengths))
    generator = NeedleGenerator(tokenizer, haystack, args.seed)
    for needle in needles:  # refuse a length too short for a prompt before any model work
        generator.sample(needle, min(lengths), depths[0], 0)
    out = results_dir(args, loaded)
    accuracy, records = evaluate(loaded.model, tokenizer, generator, needles=needles, lengths=lengths, depths=depths,
                                 samples=args.samples, batch_size=args.batch_size, window=loaded.window,
                                 device=loaded.device, progress=Progress("niah"))
    columns = [length_label(n) for n in lengths]
    summary, images, tables = {}, {}, []
    for needle in needles:
        grid = [[accuracy[needle][n][d] for n in lengths] for d in depths]
        by_length = [sum(accuracy[needle][n].values()) / len(depths) for n in lengths]
        mean = sum(by_length) / len(by_length)
        summary[f"{needle}/mean"] = mean
        summary.update({f"{needle}/{length_label(n)}": a for n, a in zip(lengths, by_length)})
        tables.append(f"S-NIAH {needle} (haystack: {haystack.name}), accuracy % over {args.samples} samples\n" +
                      format_table("depth \\ length", [f"{d:g}%" for d in depths] + ["mean"], columns,
                                   [[percent(v) for v in row] for row in grid] + [[percent(v) for v in by_length]]))
        images[needle] = accuracy_heatmap(out / f"niah-{needle}.png", grid, [f"{d:g}%" for d in depths], columns,
                                          title=f"S-NIAH {needle}: {loaded.path.parent.name} (mean {100 * mean:.1f}%)",
                                          xlabel="context length (tokens)", ylabel="needle depth")
    record = {"task": "niah", "checkpoint": str(loaded.path), "haystack": haystack.name, "needles": needles,
              "lengths": lengths, "depths": depths, "samples_per_cell": args.samples, "seed": args.seed,
              "accuracy": {k: {str(n): {f"{d:g}": a for d, a in row.items()} for n, row in v.items()} for k, v in accuracy.items()},
              "summary": summary, "samples": records}
    json_path = write_json(out / "niah.json", record)
    print("\n\n".join(tables))
    print(f"wrote {json_path} and {', '.join(str(p) for p in images.values())}")
    log_to_wandb(args.wandb, out, "niah", summary, config={k: v for k, v in record.items() if k not in ("samples", "accuracy")},
                 images=images, model_file=loaded.path, project=args.wandb_project)
    return record
