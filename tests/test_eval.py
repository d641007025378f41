"""Evaluation: perplexity (windowed = one pass = the model's own loss), S-NIAH prompts and scoring, BABILong,
and bad input (one line, exit 2). The eval_* helpers here are shared with test_eval_harness / test_generate."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import data_make_documents
from titans_scale.memory import MemoryConfig
from titans_scale.models import ModelConfig, build_model

EVAL_CFG = dict(variant="mac", vocab_size=400, dim=32, n_layers=2, n_heads=4, persistent_tokens=4, segment_len=16,
                window=16, memory=MemoryConfig(chunk_size=4))


def eval_checkpoint(root: Path, seed: int = 0, **overrides) -> Path:
    """A tiny MAC model (vocab 400, the data tests' tokenizer) written as a model file in root/run/."""
    from titans_scale.eval.checkpoint import save_model

    torch.manual_seed(seed)
    return save_model(build_model(ModelConfig(**{**EVAL_CFG, **overrides})), root / "run" / "model.pt")


def eval_model(path: Path, dtype=torch.float64):
    from titans_scale.eval.checkpoint import load_checkpoint

    model, _ = load_checkpoint(path, "cpu", dtype)
    return model


def eval_cli(capsys, *argv: str) -> tuple[int, str, str]:
    """``python -m titans_scale.eval argv`` in this process: (exit code, stdout, stderr)."""
    from titans_scale.eval.__main__ import main

    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture(scope="module")
def eval_files(tmp_path_factory, data_tokenizer_path):
    root = tmp_path_factory.mktemp("eval")
    docs = data_make_documents(4, seed=3, words=(10, 30))
    corpus = root / "docs.jsonl"
    corpus.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return {"root": root, "model": eval_checkpoint(root), "tokenizer": data_tokenizer_path, "corpus": corpus,
            "docs": docs}


def test_perplexity_equals_the_models_own_loss_windowed_or_not(eval_files, capsys):
    from titans_scale.data.tokenizer import Tokenizer
    from titans_scale.eval.perplexity import evaluate_sequences, sequences_of

    tok = Tokenizer(eval_files["tokenizer"])
    model = eval_model(eval_files["model"])
    sequences = [[tok.eos_id] + tok.encode(d) for d in eval_files["docs"]]  # one per document, after its boundary
    with torch.no_grad():
        losses = [model.loss(torch.tensor([s])).item() * (len(s) - 1) for s in sequences]
    expected = sum(losses) / sum(len(s) - 1 for s in sequences)

    # Windows of 11 tokens carrying the state, in right-padded batches: the same as one pass per document.
    windowed = evaluate_sequences(model, sequences, batch_size=3, window=11, pad_id=tok.eos_id)
    assert windowed.tokens == sum(len(s) - 1 for s in sequences) and windowed.sequences == len(sequences)
    assert windowed.loss == pytest.approx(expected, rel=1e-12, abs=0)
    assert sum(b["tokens"] for b in windowed.by_position()) == windowed.tokens

    # The command: the same number from the model file.
    out = eval_files["root"] / "ppl"
    code, stdout, _ = eval_cli(capsys, "perplexity", "--checkpoint", str(eval_files["model"]), "--tokenizer",
                               eval_files["tokenizer"], "--data", str(eval_files["corpus"]), "--dtype", "float64",
                               "--window", "24", "--batch-size", "2", "--out", str(out))
    assert code == 0 and "perplexity" in stdout
    record = json.loads((out / "perplexity.json").read_text())
    assert record["loss"] == pytest.approx(expected, rel=1e-12, abs=0)
    assert record["perplexity"] == pytest.approx(math.exp(expected), rel=1e-12)
    assert record["tokens"] == windowed.tokens and (out / "perplexity.png").stat().st_size > 0

    # --context N: the documents' stream (tokens + eos, as prepared for training) cut into N-token sequences.
    chunks, described = sequences_of(str(eval_files["corpus"]), tok, 40)
    chunks = list(chunks)
    stream = [t for d in eval_files["docs"] for t in tok.encode(d) + [tok.eos_id]]
    assert [t for c in chunks for t in c] == stream and {len(c) for c in chunks[:-1]} == {40}
    with torch.no_grad():
        by_hand = sum(model.loss(torch.tensor([c])).item() * (len(c) - 1) for c in chunks) / sum(len(c) - 1 for c in chunks)
    assert evaluate_sequences(model, chunks, batch_size=4, window=16).loss == pytest.approx(by_hand, rel=1e-12)
    assert described == {"source": "files", "context": 40}


def test_perplexity_on_prepared_validation_shards_logged_to_wandb(eval_files, capsys, data_documents, monkeypatch):
    from titans_scale.data import DataConfig, build_val_loader
    from titans_scale.data.prepare import prepare

    root = eval_files["root"]
    (root / "corpus.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in data_documents[:40]))
    shards = root / "shards"
    prepare(str(root / "corpus.jsonl"), eval_files["tokenizer"], 64, shards, workers=1, val_fraction=0.1, progress=False)
    cfg = DataConfig(data_dir=str(shards), tokenizer=eval_files["tokenizer"], seq_len=64, num_workers=0)
    model = eval_model(eval_files["model"])
    loader = build_val_loader(cfg, micro_batch=1, dp_rank=0, dp_size=1)
    with torch.no_grad():
        losses = [model.loss(batch).item() for batch in loader]  # what training's validation computes
    del loader
    out = root / "ppl-shards"
    for var in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(var, str(out / "wandb"))  # what the command sets; restored after the test
    code, _, err = eval_cli(capsys, "perplexity", "--checkpoint", str(eval_files["model"]), "--tokenizer",
                            eval_files["tokenizer"], "--data", str(shards), "--dtype", "float64", "--batch-size", "4",
                            "--wandb", "--out", str(out))
    record = json.loads((out / "perplexity.json").read_text())
    assert code == 0 and record["context"] == 64 and record["sequences"] == len(losses), err
    assert record["tokens"] == 63 * len(losses)
    assert record["loss"] == pytest.approx(sum(losses) / len(losses), rel=1e-12)
    runs = list((out / "wandb").rglob("offline-run-*/run-*.wandb"))  # offline, inside the output directory
    assert len(runs) == 1 and runs[0].stat().st_size > 0


# ----------------------------------------------------------------------------------------------- S-NIAH


def test_niah_prompts_are_deterministic_and_exact(eval_files):
    from titans_scale.data.tokenizer import Tokenizer
    from titans_scale.eval.niah import NEEDLES, Haystack, NeedleGenerator

    tok = Tokenizer(eval_files["tokenizer"])
    noise = Haystack(tok)
    corpus = Haystack(tok, str(eval_files["corpus"]), 2000)
    longest = max(map(len, noise.sentences + corpus.sentences))
    for haystack in (noise, corpus):
        one, two, other = (NeedleGenerator(tok, haystack, seed) for seed in (7, 7, 8))
        for needle in NEEDLES:
            for length in (420, 777):
                for depth in (0, 10, 50, 90, 100):
                    a, b = one.sample(needle, length, depth, 3), two.sample(needle, length, depth, 3)
                    assert a == b  # same seed, same everything
                    assert len(a.tokens) == length
                    text = NEEDLES[needle].needle.format(key=a.key, value=a.answer)
                    assert a.tokens[a.needle_start : a.needle_start + a.needle_tokens] == tok.encode(text)
                    assert a.haystack_tokens + a.needle_tokens + a.haystack_start < length
                    placed = a.needle_start - a.haystack_start
                    assert abs(placed - depth / 100 * a.haystack_tokens) <= longest / 2 + 1
                    if depth == 0:
                        assert placed == 0
                    if depth == 100:
                        assert placed == a.haystack_tokens  # right before the question
        answers = {one.sample("number", 500, 50, i).answer for i in range(5)}
        assert len(answers) == 5  # samples differ from each other
        assert other.sample("uuid", 500, 50, 0).answer != one.sample("uuid", 500, 50, 0).answer
    assert len(one.sample("passkey", 420, 50, 0).answer) == 5 and len(one.sample("number", 420, 50, 0).answer) == 7


def test_niah_scores_exact_matches_only():
    from titans_scale.eval.niah import exact_match

    assert exact_match(" 71432.", "71432") and exact_match("71432\nmore", "71432") and exact_match('71432" and', "71432")
    for wrong in ("714321", "7143", "The pass key is 71432", "", "x71432", "71432-5"):
        assert not exact_match(wrong, "71432")
    uuid = "0b1c6a8e-3f2d-4c5b-9a7e-1d2c3b4a5f6e"
    assert exact_match(f" {uuid}.", uuid) and not exact_match(uuid[:-1], uuid)


def test_niah_command_writes_table_json_and_heatmap(eval_files, capsys):
    out = eval_files["root"] / "niah"
    code, stdout, _ = eval_cli(capsys, "niah", "--checkpoint", str(eval_files["model"]), "--tokenizer",
                               eval_files["tokenizer"], "--needle", "passkey", "--lengths", "224,256", "--depths",
                               "0,100", "--samples", "2", "--batch-size", "2", "--window", "128", "--out", str(out))
    assert code == 0 and "S-NIAH passkey" in stdout and "| 100%" in stdout
    record = json.loads((out / "niah.json").read_text())
    assert (out / "niah-passkey.png").stat().st_size > 0
    assert len(record["samples"]) == 2 * 2 * 2
    for s in record["samples"]:
        from titans_scale.eval.niah import exact_match

        assert s["correct"] == exact_match(s["prediction"], s["answer"])
        cell = record["accuracy"]["passkey"][str(s["length"])][f"{s['depth']:g}"]
        hits = [t["correct"] for t in record["samples"] if (t["length"], t["depth"]) == (s["length"], s["depth"])]
        assert cell == sum(hits) / len(hits)


# ---------------------------------------------------------------------------------------------- BABILong


def test_babilong_scoring():
    from titans_scale.eval.babilong import is_correct

    q = "Where is Mary?"
    assert is_correct(" kitchen.", "kitchen", q, "qa1")
    assert is_correct("The kitchen\nbathroom", "kitchen", q, "qa1")  # only the first line counts
    assert not is_correct("kitchen or bathroom", "kitchen", q, "qa1")  # two labels: not an answer
    assert not is_correct("garden", "kitchen", q, "qa1")
    assert is_correct("kitchen, said the garden", "kitchen", "Where was the apple before the garden?", "qa3")
    assert not is_correct("kitchenette", "kitchen", q, "qa1")
    assert is_correct("Mary", "Mary", "Who gave the apple to Fred?", "qa5")
    assert is_correct("the answer is blue", "blue", "What color?", "qa99")  # no label set: target word in line 1


def test_babilong_command_accuracy_by_task_and_length(eval_files, capsys):
    data = eval_files["root"] / "babilong"
    (data / "4k").mkdir(parents=True)
    facts = "Mary moved to the kitchen. John went to the garden. "
    (data / "4k" / "qa1.json").write_text(json.dumps(
        [{"input": facts * 3, "question": "Where is Mary?", "target": "kitchen"}] * 2))
    (data / "qa2_8k.jsonl").write_text("".join(json.dumps(
        {"context": facts * 4, "question": "Where is John?", "target": "garden"}) + "\n" for _ in range(3)))
    out = eval_files["root"] / "babilong-out"
    code, stdout, _ = eval_cli(capsys, "babilong", "--checkpoint", str(eval_files["model"]), "--tokenizer",
                               eval_files["tokenizer"], "--data", str(data), "--max-new-tokens", "4", "--out", str(out))
    assert code == 0 and "| qa1" in stdout and "| qa2" in stdout and "4k" in stdout and "8k" in stdout
    record = json.loads((out / "babilong.json").read_text())
    assert set(record["accuracy"]) == {"qa1", "qa2"} and (out / "babilong.png").stat().st_size > 0
    assert record["accuracy"]["qa1"]["8k"] is None and len(record["samples"]) == 5
    assert {(s["task"], s["length"]) for s in record["samples"]} == {("qa1", "4k"), ("qa2", "8k")}


# --------------------------------------------------------------------------------------------- bad input


def test_bad_input_is_one_line_and_exit_2(eval_files, capsys, tmp_path):
    model, tok = str(eval_files["model"]), eval_files["tokenizer"]

    def fails(*argv, says):
        code, _, err = eval_cli(capsys, *argv)
        assert code == 2, err
        assert err.count("\n") == 1 and err.startswith("error: ") and "Traceback" not in err, err
        assert says in err, err

    fails("perplexity", "--checkpoint", str(tmp_path / "missing.pt"), "--data", "x.txt", says="missing.pt does not exist")
    fails("perplexity", "--checkpoint", model, "--data", str(tmp_path / "x.txt"), says="x.txt does not exist")
    fails("no-such-eval", says="unknown evaluation 'no-such-eval'")
    fails("niah", "--checkpoint", model, "--bogus", says="unrecognized arguments: --bogus")
    fails("niah", "--checkpoint", model, "--tokenizer", tok, "--needle", "passkey", "--lengths", "64", "--samples", "1",
          says="context length 64 is too short")
    fails("niah", "--checkpoint", model, "--needle", "word", says="unknown kind word")
    fails("perplexity", "--checkpoint", model, "--data", str(eval_files["corpus"]), says="which tokenizer?")

    # A model file of another config: weights that do not fit, a config key this model does not have, not a model.
    blob = torch.load(model, weights_only=False)
    other, data = tmp_path / "other.pt", str(eval_files["corpus"])
    torch.save({**blob, "config": {**blob["config"], "dim": 64, "memory": {**blob["config"]["memory"]}}}, other)
    fails("perplexity", "--checkpoint", str(other), "--data", data, says="weights do not fit its model config")
    torch.save({**blob, "config": {**blob["config"], "num_experts": 8}}, other)
    fails("perplexity", "--checkpoint", str(other), "--data", data, says="unknown config key 'num_experts'")
    other.write_text("not a checkpoint")
    fails("perplexity", "--checkpoint", str(other), "--data", data, says="is not a torch file")
    torch.save({"weights": 1}, other)
    fails("perplexity", "--checkpoint", str(other), "--data", data, says="not a titans_scale model file")


def test_cli_entry_point_reports_one_line():
    """The real ``python -m`` entry points (the same main() as above): exit 2 and a single stderr line."""
    done = subprocess.run([sys.executable, "-m", "titans_scale.eval", "perplexty", "--checkpoint", "x"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stderr == "error: unknown evaluation 'perplexty'; did you mean perplexity? choose one of perplexity, " \
                                                    "niah, babilong, harness, recall or lm_eval\n"
