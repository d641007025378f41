"""Generate text from a trained model: ``python -m titans_scale.generate --checkpoint run/model.pt --prompt "..."``.

The prompt is read once (in windows that carry the state), then tokens are sampled one at a time and fed
back: the memories keep learning from the prompt and from what the model writes. Text is printed as it is
produced; the speed of reading the prompt and of generating is reported at the end (stderr).
"""

from __future__ import annotations

import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch

from titans_scale.eval.errors import ArgumentParser, EvalError, run_cli


@dataclass
class Generation:
    """A prompt's continuation and how fast it came."""

    prompt: str
    text: str
    prompt_tokens: int
    tokens: list[int]
    stop: str  # "eos" or "length"
    prompt_seconds: float  # reading the prompt (to the first new token)
    generate_seconds: float  # the other new tokens

    @property
    def prompt_tokens_per_s(self) -> float:
        return self.prompt_tokens / max(self.prompt_seconds, 1e-9)

    @property
    def tokens_per_s(self) -> float:
        return max(len(self.tokens) - 1, 0) / max(self.generate_seconds, 1e-9)


def generate_text(model, tokenizer, prompt: str, *, max_new_tokens: int = 256, temperature: float = 0.8,
                  top_k: int | None = None, top_p: float | None = None, seed: int = 0, stop_at_eos: bool = True,
                  prefix_eos: bool = False, window: int | None = None, device: torch.device | str = "cpu",
                  on_text: Callable[[str], None] | None = None) -> Generation:
    """Continue ``prompt``; ``on_text`` receives the text as it is produced (whole characters only).
    The same seed and settings give the same text; temperature 0 is greedy."""
    from titans_scale.eval.inference import DEFAULT_WINDOW, IncrementalDecoder, check_sampling, generate_tokens

    check_sampling(temperature, top_k, top_p, max_new_tokens)
    ids = ([tokenizer.eos_id] if prefix_eos else []) + tokenizer.encode(prompt)
    if not ids:
        raise EvalError("the prompt is empty; give some text (or --prefix-eos to start from a document boundary)")
    device = torch.device(device)
    generator = torch.Generator(device=device).manual_seed(seed)
    decoder = IncrementalDecoder(tokenizer, ids)
    prompt_tensor = torch.tensor([ids], dtype=torch.long, device=device)
    tokens, pieces, stop = [], [], "length"
    started = time.perf_counter()
    first = None
    for token in generate_tokens(model, prompt_tensor, max_new_tokens, temperature=temperature, top_k=top_k,
                                 top_p=top_p, generator=generator, window=window or DEFAULT_WINDOW):
        t = int(token[0])
        first = first or time.perf_counter()
        if stop_at_eos and t == tokenizer.eos_id:
            stop = "eos"
            break
        tokens.append(t)
        piece = decoder.push(t)
        if piece:
            pieces.append(piece)
            if on_text is not None:
                on_text(piece)
    end = time.perf_counter()
    first = first or end
    rest = decoder.flush()
    if rest:
        pieces.append(rest)
        if on_text is not None:
            on_text(rest)
    return Generation(prompt, "".join(pieces), len(ids), tokens, stop, first - started, end - first)


def build_parser() -> ArgumentParser:
    from titans_scale.eval.cli import add_model_args

    parser = ArgumentParser(prog="python -m titans_scale.generate", description=__doc__.splitlines()[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", help="the text to continue")
    source.add_argument("--prompt-file", help="a file holding the text to continue ('-': stdin)")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    parser.add_argument("--top-k", type=int, default=None, help="sample among the k most likely tokens")
    parser.add_argument("--top-p", type=float, default=None, help="nucleus sampling: the smallest set with this mass")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ignore-eos", action="store_true", help="keep going past the end-of-document token")
    parser.add_argument("--prefix-eos", action="store_true", help="start from a document boundary (eos) before the prompt")
    parser.add_argument("--no-echo", action="store_true", help="print only the continuation, not the prompt")
    parser.add_argument("--no-stream", action="store_true", help="print the text at the end instead of as it comes")
    parser.add_argument("--out", default=None, help="also write the prompt, text, tokens and speeds to this JSON file")
    add_model_args(parser)
    return parser


def read_prompt(args) -> str:
    if args.prompt is not None:
        return args.prompt
    if args.prompt_file == "-":
        return sys.stdin.read()
    path = Path(args.prompt_file)
    if not path.is_file():
        raise EvalError(f"--prompt-file {path} does not exist")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise EvalError(f"--prompt-file {path} is not UTF-8 text") from None


def main(argv: list[str] | None = None) -> int:
    def run() -> int:
        from titans_scale.eval.cli import open_model
        from titans_scale.eval.inference import check_sampling

        args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
        prompt = read_prompt(args)
        check_sampling(args.temperature, args.top_k, args.top_p, args.max_new_tokens)
        loaded = open_model(args)
        stream = not args.no_stream
        if not args.no_echo:
            print(prompt, end="", flush=True)

        def show(text: str) -> None:
            print(text, end="", flush=True)

        result = generate_text(loaded.model, loaded.tokenizer, prompt, max_new_tokens=args.max_new_tokens,
                               temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed,
                               stop_at_eos=not args.ignore_eos, prefix_eos=args.prefix_eos, window=loaded.window,
                               device=loaded.device, on_text=show if stream else None)
        print(result.text if not stream else "", flush=True)
        print(f"[generate] prompt {result.prompt_tokens} tokens in {result.prompt_seconds:.2f} s "
              f"({result.prompt_tokens_per_s:.1f} tok/s) | {len(result.tokens)} new tokens "
              f"({result.tokens_per_s:.1f} tok/s) | stop: {result.stop}", file=sys.stderr, flush=True)
        if args.out:
            from titans_scale.eval.results import write_json

            out = Path(args.out)
            out.parent.mkdir(parents=True, exist_ok=True)
            settings = {k: getattr(args, k) for k in ("checkpoint", "temperature", "top_k", "top_p", "seed", "max_new_tokens")}
            write_json(out, {**asdict(result), **settings, "tokens_per_s": result.tokens_per_s,
                             "prompt_tokens_per_s": result.prompt_tokens_per_s})
        return 0

    return run_cli(run)


if __name__ == "__main__":
    sys.exit(main())
