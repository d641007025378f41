"""Export a trained model to the Hugging Face layout: ``python -m titans_scale.export --checkpoint run/model.pt``.

Writes safetensors weights, ``config.json``, the sentencepiece model and the model's own code into one folder
(default ``hf/`` beside the model file). Load it with ``titans_scale.from_pretrained(EXPORT)``, or without
titans_scale: ``AutoModelForCausalLM.from_pretrained(EXPORT, trust_remote_code=True)`` and ``AutoTokenizer``
alike; ``lm_eval --model hf --model_args pretrained=EXPORT,trust_remote_code=True`` evaluates it. The
evaluation and generation commands take an export wherever they take a model file.
"""

from __future__ import annotations

import sys
from pathlib import Path

from titans_scale.eval.errors import ArgumentParser, run_cli

DTYPES = ("float32", "bfloat16", "float16", "float64")


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="python -m titans_scale.export", description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True, help="model.pt written by a finished run, or its run directory")
    parser.add_argument("--tokenizer", default=None, help="sentencepiece .model (default: the one the run's recipe names)")
    parser.add_argument("--out", default=None, help="the export folder (default: hf/ beside the model file)")
    parser.add_argument("--dtype", default="float32", choices=DTYPES, help="of the exported weights")
    return parser


def main(argv: list[str] | None = None) -> int:
    def run() -> int:
        from titans_scale.eval.checkpoint import DTYPES as TORCH_DTYPES
        from titans_scale.eval.checkpoint import load_checkpoint, load_tokenizer, model_path
        from titans_scale.hf.layout import export
        from titans_scale.models import parameter_count

        args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
        path = model_path(args.checkpoint)
        out = Path(args.out) if args.out else path.parent / "hf"
        model, cfg = load_checkpoint(path, "cpu", "float32")
        tokenizer = load_tokenizer(path, args.tokenizer, cfg.vocab_size)
        export(model, tokenizer, out, TORCH_DTYPES[args.dtype])
        size = sum(f.stat().st_size for f in out.iterdir()) / 2**20
        print(f"wrote {out} ({cfg.variant}, {parameter_count(cfg) / 1e6:.1f}M parameters, {args.dtype}, {size:.1f} MiB); "
              f"load it with titans_scale.from_pretrained({str(out)!r}) or "
              f"AutoModelForCausalLM.from_pretrained({str(out)!r}, trust_remote_code=True)")
        return 0

    return run_cli(run)


if __name__ == "__main__":
    sys.exit(main())
