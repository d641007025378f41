"""Evaluation of trained models: perplexity, S-NIAH, BABILong, and lm-evaluation-harness tasks.

One command per evaluation (``python -m titans_scale.eval <task>``, see ``__main__``), each writing a JSON
result file (and a PNG where a picture helps) into ``eval/`` beside the model file. The pieces:

    checkpoint   the one place a model file and its tokenizer are opened (one-line errors)
    inference    stateful reading in windows, token streaming, incremental decoding
    perplexity   loss / perplexity over shards or files, any context length
    niah         RULER-style single needle in a haystack
    babilong     BABILong questions from local files
    harness      the lm-eval model class ``titans_scale`` (imports lm-eval)
    recall       the synthetic long-range tasks (associative recall, pass-key, copy) by distance
    results      JSON, tables, heat-maps, wandb

Names load on first use, so ``import titans_scale.eval`` stays light (no lm-eval, no matplotlib).
"""

from __future__ import annotations

from titans_scale._lazy import lazy_getattr

_EXPORTS = {
    "EvalError": "errors",
    "load_checkpoint": "checkpoint",
    "load_tokenizer": "checkpoint",
    "save_model": "checkpoint",
    "read": "inference",
    "token_logprobs": "inference",
    "generate_tokens": "inference",
    "IncrementalDecoder": "inference",
    "evaluate_sequences": "perplexity",
    "NeedleGenerator": "niah",
    "Haystack": "niah",
    "exact_match": "niah",
    "is_correct": "babilong",
    "TitansHarnessLM": "harness",
}

__all__ = sorted(_EXPORTS)


__getattr__ = lazy_getattr(__name__, _EXPORTS)
