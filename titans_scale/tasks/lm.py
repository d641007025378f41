"""Next-token language modelling on prepared token shards: text with a sentencepiece tokenizer, or DNA
with one token per base (``data.alphabet=dna``, a FASTA corpus)."""

from __future__ import annotations

from pathlib import Path

import torch

from titans_scale.config import ConfigError

from .base import Task


class LanguageModelling(Task):
    name = "lm"

    def check(self, cfg, build: bool) -> None:
        """Builds the bundled sample data (or the generated genome) when it is the default and missing
        (``build``), then checks that the shards were made with the recipe's tokenizer, vocabulary
        (data.vocab_size) and sequence length, and that the model's vocabulary holds the tokenizer's."""
        from titans_scale import data
        from titans_scale.data.config import resolve_data_dir, resolve_tokenizer
        from titans_scale.data.loader import check_seq_len

        if cfg.data.synthetic.task:  # generated: nothing to read (resolve() checked the task against the model)
            return
        try:
            if build:
                data.ensure_default_data(cfg.data)
            tokenizer = data.Tokenizer(resolve_tokenizer(cfg.data))
            if not cfg.data.remote:  # remote shards are checked by the loader once their metadata is fetched
                data_dir = resolve_data_dir(cfg.data)
                meta = data.check_shards(data_dir, tokenizer, verify="none")
                check_seq_len(meta, cfg.data, data_dir)
        except ConfigError:
            raise
        except (ValueError, OSError) as e:
            raise ConfigError(str(e).splitlines()[0]) from None
        if cfg.train.eval_batches and not cfg.data.remote and "val" not in meta["splits"]:
            how = ("were auto-prepared with data.val_fraction=0" if not cfg.data.data_dir
                   else "were prepared with --val-fraction 0")
            raise ConfigError(f"the shards in {data_dir} have no validation split (they {how}); train without validation "
                              f"with train.eval_batches=0, or use shards with one")
        if tokenizer.vocab_size != cfg.data.vocab_size:
            where = f"the shards in {resolve_data_dir(cfg.data)} were" if not cfg.data.remote else "the data is"
            raise ConfigError(f"{where} made with a {tokenizer.vocab_size}-token tokenizer ({tokenizer.path}) but the recipe's "
                              f"vocabulary is data.vocab_size={cfg.data.vocab_size}; set data.vocab_size={tokenizer.vocab_size} "
                              f"(and model.vocab_size where the recipe fixes it), or use data of a {cfg.data.vocab_size}-token tokenizer")
        if tokenizer.vocab_size > cfg.model.vocab_size:
            raise ConfigError(f"model.vocab_size={cfg.model.vocab_size} is smaller than the tokenizer's "
                              f"{tokenizer.vocab_size} tokens; set model.vocab_size={tokenizer.vocab_size}")

    def build_model(self, cfg):
        from titans_scale.models import build_model

        return build_model(cfg.model)

    def loaders(self, cfg, *, micro_batch: int, dp_rank: int, dp_size: int, seed: int):
        from titans_scale import data

        args = dict(micro_batch=micro_batch, dp_rank=dp_rank, dp_size=dp_size, timeout_s=cfg.train.collective_timeout_s)
        val = data.build_val_loader(cfg.data, **args) if cfg.train.eval_batches else None
        return data.build_train_loader(cfg.data, seed=seed, **args), val

    def on_device(self, batch, device: torch.device) -> tuple:
        return (batch.to(device, torch.long, non_blocking=True),)

    def stats(self, cfg) -> tuple[int, float]:
        from titans_scale.models import model_stats

        return model_stats(cfg.model, cfg.data.seq_len)

    def model_from_export(self, model_cfg, task_config: dict):
        from titans_scale.models import build_model

        return build_model(model_cfg)

    def validation_metrics(self, loss: float) -> dict:
        import math

        return {"val_ppl": math.exp(min(loss, 50.0))}

    def summary(self, loss: float) -> str:
        import math

        return f"validation loss {loss:.4f} | perplexity {math.exp(min(loss, 50.0)):.2f}"

    def finish(self, model_path: Path, cfg) -> str | None:
        """A short continuation of ``train.sample_prompt`` by the exported model (seeded, top-k sampling)."""
        if not cfg.train.sample_tokens or cfg.data.synthetic.task:
            return None
        from titans_scale import data
        from titans_scale.data.config import resolve_tokenizer
        from titans_scale.models import generate
        from titans_scale.train.checkpoint import load_model

        model, _ = load_model(model_path)
        tokenizer = data.Tokenizer(resolve_tokenizer(cfg.data))
        prompt = torch.tensor(tokenizer.encode(cfg.train.sample_prompt), dtype=torch.long)
        generator = torch.Generator().manual_seed(cfg.train.seed)
        out = generate(model, prompt, cfg.train.sample_tokens, temperature=0.8, top_k=40, generator=generator)
        return f"[sample] {tokenizer.decode(out.tolist())!r}"
