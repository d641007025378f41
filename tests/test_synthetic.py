"""The long-range synthetic tasks: deterministic samples whose answers sit where the scoring looks, at least
``distance`` after what they recall; a loader that resumes exactly and splits the stream over data-parallel ranks;
refusals of tasks that would not test a memory (one line); the recall eval's accuracy by distance."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from titans_scale.config import ConfigError, resolve
from titans_scale.data.config import SyntheticConfig
from titans_scale.data.synthetic import FILLER, SyntheticLoader, alphabet_size, make_sample

SEQ, VOCAB = 256, 128


@pytest.mark.parametrize("task", ["recall", "passkey", "copy"])
def test_samples_are_deterministic_and_answers_are_far_and_recalled(task):
    cfg = SyntheticConfig(task=task, items=8, distance=100)
    for index in range(20):
        s = make_sample(cfg, SEQ, VOCAB, "train", index)
        again = make_sample(cfg, SEQ, VOCAB, "train", index)
        assert all(np.array_equal(getattr(s, f), getattr(again, f)) for f in ("tokens", "positions", "answers", "distances"))
        assert s.tokens.shape == (SEQ,) and s.tokens.min() >= 1 and s.tokens.max() < VOCAB
        assert len(s.positions) == 8 and np.array_equal(s.tokens[s.positions + 1], s.answers)  # next token = answer
        assert (s.distances > 100).all()
        for answer, position, distance in zip(s.answers, s.positions, s.distances):
            assert s.tokens[position + 1 - distance] == answer  # the answer was written `distance` tokens before
        if task == "recall":  # the asked key is the token right before its written value
            for position, distance in zip(s.positions, s.distances):
                assert s.tokens[position - distance] == s.tokens[position]
        outside = np.ones(SEQ, bool)
        outside[np.concatenate([s.positions + 1, s.positions + 1 - s.distances])] = False
        filler_or_marker = np.isin(s.tokens[outside], np.r_[FILLER, 9, 10]) | (s.tokens[outside] < 16 + alphabet_size(VOCAB))
        assert filler_or_marker.all()
    assert not np.array_equal(make_sample(cfg, SEQ, VOCAB, "train", 0).tokens, make_sample(cfg, SEQ, VOCAB, "val", 0).tokens)
    # the training objective's answers (read off the tokens) are exactly the scored positions
    from titans_scale.data.synthetic import answer_weights

    samples = [make_sample(cfg, SEQ, VOCAB, "train", i) for i in range(8)]
    weights = answer_weights(torch.from_numpy(np.stack([s.tokens for s in samples])), cfg, VOCAB)
    for row, s in zip(weights, samples):
        assert row.nonzero().flatten().tolist() == sorted(s.positions.tolist())


def test_loader_resumes_exactly_and_splits_the_stream_over_ranks():
    cfg = SyntheticConfig(task="recall", items=8, distance=100)
    args = dict(seq_len=SEQ, vocab=VOCAB, split="train", micro_batch=3, dp_size=2)
    straight = SyntheticLoader(cfg, dp_rank=0, **args)
    batches = [b for _, b in zip(range(5), straight)]
    resumed = SyntheticLoader(cfg, dp_rank=0, **args)
    first = [b for _, b in zip(range(2), resumed)]
    state = resumed.state_dict()
    fresh = SyntheticLoader(cfg, dp_rank=0, **args)
    fresh.load_state_dict(state)
    rest = [b for _, b in zip(range(3), fresh)]
    assert all(torch.equal(a, b) for a, b in zip(batches, first + rest))
    other = next(iter(SyntheticLoader(cfg, dp_rank=1, **args)))
    assert not any(torch.equal(row, mine) for row in other for mine in batches[0])  # disjoint samples
    val = list(SyntheticLoader(cfg, dp_rank=0, **{**args, "split": "val"}))
    assert len(val) == cfg.val_samples // 6 and torch.equal(val[0][0], torch.from_numpy(make_sample(cfg, SEQ, VOCAB, "val", 0).tokens))
    with pytest.raises(ValueError, match="global batch"):
        SyntheticLoader(cfg, dp_rank=0, **{**args, "micro_batch": 4}).load_state_dict(state)


@pytest.mark.parametrize("overrides, words", [
    (["data.synthetic.distance=32"], "does not exceed model.window=32"),
    (["model.variant=mac", "model.segment_len=128", "model.window=16"], "does not exceed model.segment_len=128"),
    (["data.vocab_size=30"], "too small for data.synthetic.task=recall with items=8"),
    (["data.seq_len=150"], "data.seq_len=150 is too short"),
    (["data.synthetic.task=recal"], "is unknown; choose one of recall, passkey, copy"),
    (["model.vocab_size=100"], "model.vocab_size=100 is smaller than the task's"),
    (["parallel.sp=2"], "data.synthetic.loss=answers is not supported under sequence parallelism"),
])
def test_recall_recipes_refuse_what_would_not_test_a_memory(overrides, words):
    with pytest.raises(ConfigError) as err:
        resolve(["recipe=recall_mag", *overrides])
    assert words in str(err.value) and "\n" not in str(err.value)


def test_every_variant_has_a_recall_recipe_and_full_attention_needs_no_distance():
    from titans_scale.models import VARIANTS

    for variant in VARIANTS:
        cfg = resolve([f"recipe=recall_{variant}"])
        assert cfg.model.variant == variant and cfg.data.synthetic.task == "recall"
        assert cfg.data.synthetic.distance >= 4 * max(cfg.model.window, cfg.model.segment_len)
    resolve(["recipe=recall_transformer", "data.synthetic.distance=8"])  # full attention: no span to exceed


def test_recall_eval_scores_argmax_answers_by_distance(tmp_path, capsys):
    from titans_scale.eval.__main__ import main
    from titans_scale.eval.checkpoint import save_model
    from titans_scale.eval.recall import evaluate
    from titans_scale.models import build_model

    cfg = resolve(["recipe=recall_swa", "model.dim=32", "model.n_heads=2", "model.n_layers=1"])
    torch.manual_seed(0)
    path = save_model(build_model(cfg.model), tmp_path / "run" / "model.pt")
    (tmp_path / "run" / "config.yaml").write_text(f"data:\n  seq_len: {SEQ}\n  synthetic:\n    task: recall\n    items: 8\n    distance: 128\n")
    code = main(["recall", "--checkpoint", str(path.parent), "--samples", "12", "--batch-size", "5", "--out", str(tmp_path / "out")])
    out = capsys.readouterr().out
    assert code == 0 and "recall: items 8, distance >= 128" in out and "| distance" in out
    record = json.loads((tmp_path / "out" / "recall.json").read_text())
    assert (tmp_path / "out" / "recall.png").stat().st_size > 0
    model = build_model(cfg.model)
    model.load_state_dict(torch.load(path, weights_only=False)["state_dict"])
    task = SyntheticConfig(task="recall", items=8, distance=128, val_samples=12)
    direct = evaluate(model, task, SEQ, VOCAB, batch_size=12, device="cpu")
    assert record["accuracy"] == pytest.approx(direct["correct"].mean())
    assert sum(r["answers"] for r in record["by_distance"]) == 12 * 8
    assert sum(r["accuracy"] * r["answers"] for r in record["by_distance"]) == pytest.approx(direct["correct"].sum())
    code = main(["recall", "--checkpoint", str(path.parent), "--distance", "500"])
    assert code == 2 and capsys.readouterr().err.count("\n") == 1  # a sequence too short for that distance
