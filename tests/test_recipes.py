"""Every recipe in recipes/ resolves and validates (in-process, as `dry_run=true` resolves it), its batch
splits at the world size it is launched with, and each paper-scale recipe is the paper's model and setup:
the model of models.paper_config, within 5% of the size in its name, the per-size learning rate and token
budget, 0.5M tokens per step of 4096-token sequences."""

from __future__ import annotations

import math
import re
from dataclasses import replace

import pytest

from titans_scale.config import RECIPES_DIR, resolve
from titans_scale.models import VARIANTS, model_stats, paper_config
from titans_scale.train.engine import make_plan

RECIPES = sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))
PAPER = re.compile(r"(?P<variant>\w+)_(?P<size>\d+m)")
SIZES = {"170m": (3e-3, 15e9), "340m": (1.5e-3, 15e9), "400m": (1.5e-3, 15e9), "760m": (1.25e-3, 30e9)}
PAPER_DATA = ["data.data_dir=/shared/fineweb-edu/shards", "data.tokenizer=/shared/fineweb-edu/tokenizer-32k.model"]


def test_every_variant_has_a_small_recipe_and_four_paper_sizes():
    for variant in VARIANTS:
        assert variant in RECIPES
        for size in SIZES:
            assert f"{variant}_{size}" in RECIPES
    assert "tiny" in RECIPES


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_resolves_validates_and_splits_its_batch(name, tmp_path):
    paper = PAPER.fullmatch(name)
    cfg = resolve([f"recipe={name}", "dry_run=true", f"run_dir={tmp_path}", *(PAPER_DATA if paper else [])])
    assert cfg.dry_run and cfg.recipe == name
    plan = make_plan(cfg, 8 if paper else 1)  # one node of 8 GPUs; test_slurm_scripts checks each script's world
    assert plan.dp_size * plan.grad_accum * plan.micro_batch * plan.seq_len == cfg.train.global_batch_tokens
    if not paper:
        return
    variant, size = paper["variant"], paper["size"]
    params, _ = model_stats(cfg.model, cfg.data.seq_len)
    assert abs(params / (int(size[:-1]) * 1e6) - 1) < 0.05, params
    # the model of paper_config (the memory's activation checkpointing is a recipe choice, not the model)
    assert replace(cfg.model, memory=replace(cfg.model.memory, checkpoint_every=0)) == paper_config(size.upper(), variant)
    lr, tokens = SIZES[size]
    t = cfg.train
    assert (t.lr, t.tokens) == (lr, tokens) and t.min_lr == pytest.approx(lr / 10, rel=1e-12)
    assert t.weight_decay == 0.1 and t.warmup_steps > 0 and t.global_batch_tokens == 2**19 and cfg.data.seq_len == 4096
    assert plan.total_steps == math.ceil(tokens / 2**19) and plan.tokens_per_step == 2**19


def test_paper_recipe_refuses_to_start_without_its_data():
    from titans_scale.config import ConfigError

    with pytest.raises(ConfigError, match=r"data.data_dir, data.tokenizer must be set.*add data.data_dir=\.\.\. data"):
        resolve(["recipe=mag_340m"])


def test_tokenizer_readme_names_the_tokenizer_the_tiny_run_trains():
    from titans_scale.data.config import resolve_tokenizer

    text = (RECIPES_DIR.parent / "tokenizer" / "README.md").read_text()
    cfg = resolve(["recipe=tiny"])
    assert f"{cfg.data.vocab_size}-token tokenizer" in text
    assert f"sample/{resolve_tokenizer(cfg.data).name}" in text
    assert set(re.findall(r"tokenizer-v(\d+)\.model", text)) == {str(cfg.data.vocab_size)}
