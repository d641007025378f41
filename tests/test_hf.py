"""The Hugging Face layout: an export loads back with equal logits through titans_scale.from_pretrained and,
in an interpreter where titans_scale cannot be imported and the hub is off, through transformers'
AutoModelForCausalLM / AutoTokenizer (generate() included) and lm-eval's ``hf`` model on a local task."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import DATA_ODDITIES, data_make_documents
from test_eval import eval_checkpoint, eval_cli
from test_eval_harness import harness_tasks


def hf_export(capsys, model_file: Path, tokenizer: str, out: Path, *extra: str) -> Path:
    from titans_scale.export import main

    code = main(["--checkpoint", str(model_file), "--tokenizer", tokenizer, "--out", str(out), *extra])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert f"wrote {out}" in captured.out
    return out


def hf_tokens(seed: int = 0, n: int = 40) -> torch.Tensor:
    return torch.randint(3, 400, (2, n), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("overrides", [{}, dict(variant="mag", tie_embeddings=True)], ids=["mac", "mag-tied"])
def test_export_round_trips_with_equal_logits(overrides, tmp_path, data_tokenizer_path, capsys):
    import titans_scale
    from titans_scale.eval.checkpoint import load_checkpoint

    model_file = eval_checkpoint(tmp_path, seed=1, **overrides)
    model, cfg = load_checkpoint(model_file)
    out = hf_export(capsys, model_file, data_tokenizer_path, tmp_path / "EXPORT")
    loaded = titans_scale.from_pretrained(out)
    assert loaded.cfg == cfg and not loaded.training
    assert (out / "tokenizer.model").read_bytes() == Path(data_tokenizer_path).read_bytes()
    tokens = hf_tokens()
    with torch.no_grad():
        expected, _ = model(tokens)
        assert torch.equal(loaded(tokens)[0], expected)
        # the state carries across pieces as in the original
        first, state = loaded(tokens[:, :17])
        model_first, model_state = model(tokens[:, :17])
        assert torch.equal(first, model_first)
        assert torch.equal(loaded(tokens[:, 17:], state)[0], model(tokens[:, 17:], model_state)[0])
    if cfg.tie_embeddings:
        assert loaded.head.weight is loaded.embed.weight
    # an export is a model wherever the evaluation commands take one: the same perplexity as from model.pt
    corpus = tmp_path / "docs.jsonl"
    corpus.write_text("".join(json.dumps({"text": d}) + "\n" for d in data_make_documents(2, seed=3, words=(10, 20))))
    results = []
    for source in (model_file, out):
        code, _, err = eval_cli(capsys, "perplexity", "--checkpoint", str(source), "--data", str(corpus), "--out",
                                str(tmp_path / f"ppl_{source.name}"), *(["--tokenizer", data_tokenizer_path] if source == model_file else []))
        assert code == 0, err
        results.append(json.loads((tmp_path / f"ppl_{source.name}" / "perplexity.json").read_text())["loss"])
    assert results[0] == results[1]


def test_export_refusals_are_one_line(tmp_path, data_tokenizer_path, capsys):
    import titans_scale
    from titans_scale.eval.errors import EvalError
    from titans_scale.export import main

    model_file = eval_checkpoint(tmp_path)
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "notes.txt").write_text("mine")
    for argv, says in ((["--checkpoint", str(model_file), "--tokenizer", data_tokenizer_path, "--out", str(taken)],
                        "exists and is not an export"),
                       (["--checkpoint", str(tmp_path / "none.pt")], "none.pt does not exist"),
                       (["--checkpoint", str(model_file), "--dtype", "int8"], "invalid choice: 'int8'")):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and says in err, err
    assert (taken / "notes.txt").read_text() == "mine"
    with pytest.raises(EvalError, match="is not a Hugging Face export"):
        titans_scale.from_pretrained(taken)
    # weights that do not fit the config: named, not a torch traceback
    out = hf_export(capsys, model_file, data_tokenizer_path, tmp_path / "EXPORT")
    config = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**config, "n_layers": 3}))
    with pytest.raises(EvalError, match="missing weights .*blocks.2"):
        titans_scale.from_pretrained(out)


def test_exported_code_needs_only_torch_transformers_and_sentencepiece():
    import ast

    from titans_scale.hf.layout import code_files

    files = code_files()
    assert {"configuration_titans.py", "modeling_titans.py", "tokenization_titans.py", "titans_models_model.py",
            "titans_memory_maths.py"} <= set(files)
    for name, text in files.items():
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.ImportFrom) and node.level:
                assert f"{node.module}.py" in files, (name, node.module)
            elif isinstance(node, (ast.Import, ast.ImportFrom)):
                top = {a.name.split(".")[0] for a in node.names} if isinstance(node, ast.Import) else {node.module.split(".")[0]}
                assert top <= {"__future__", "ast", "dataclasses", "math", "os", "shutil", "warnings", "torch",
                               "transformers", "sentencepiece", "triton"}, (name, top)


HF_SCRIPT = r'''
import json, sys
sys.modules["titans_scale"] = None  # the export must not need titans_scale
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

export, tokens, texts, out = sys.argv[1], torch.load(sys.argv[2]), json.loads(sys.argv[3]), sys.argv[4]
model = AutoModelForCausalLM.from_pretrained(export, trust_remote_code=True)
tok = AutoTokenizer.from_pretrained(export, trust_remote_code=True)
with torch.no_grad():
    output = model(tokens, labels=tokens)
prompt = torch.tensor([tok(texts[0])["input_ids"]])
greedy = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=8, do_sample=False,
                        eos_token_id=None, pad_token_id=0)
ids = [tok(t)["input_ids"] for t in texts]
torch.save({"logits": output.logits, "loss": output.loss, "greedy": greedy, "ids": ids,
            "decoded": [tok.decode(i) for i in ids], "class": type(model).__name__}, out)
try:
    model(prompt, attention_mask=torch.tensor([[0] + [1] * (prompt.shape[1] - 1)]))
except ValueError as err:
    print("refused padding:", err)
# lm-eval's own command line (what the console script `lm_eval` runs)
from lm_eval.__main__ import cli_evaluate
sys.argv = ["lm_eval", *sys.argv[5:]]
cli_evaluate()
'''


def test_transformers_and_lm_eval_load_an_export_offline(tmp_path, data_tokenizer_path, capsys):
    """Offline, without titans_scale: AutoModelForCausalLM gives the model's own logits and loss, generate()
    its greedy continuation, AutoTokenizer its tokenizer's ids and text; `lm_eval --model hf` scores a local
    multiple-choice task with the model's own log-probabilities."""
    from titans_scale.data.tokenizer import Tokenizer
    from titans_scale.eval.checkpoint import load_checkpoint
    from titans_scale.models import generate

    model_file = eval_checkpoint(tmp_path, seed=2, variant="mag", tie_embeddings=True)
    model, _ = load_checkpoint(model_file)
    out = hf_export(capsys, model_file, data_tokenizer_path, tmp_path / "EXPORT")
    tokens = hf_tokens(seed=5)
    torch.save(tokens, tmp_path / "tokens.pt")
    texts = ["The memory of a model learns", *DATA_ODDITIES, *data_make_documents(3, seed=9)]
    tasks = harness_tasks(tmp_path)
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "HF_DATASETS_CACHE": str(tmp_path / "hf"), "HF_MODULES_CACHE": str(tmp_path / "modules"),
           "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-c", HF_SCRIPT, str(out), str(tmp_path / "tokens.pt"), json.dumps(texts),
         str(tmp_path / "hf.pt"), "--model", "hf", "--model_args", f"pretrained={out},trust_remote_code=True",
         "--tasks", "tiny_choice", "--include_path", str(tasks), "--device", "cpu", "--output_path",
         str(tmp_path / "lm_eval"), "--log_samples"],
        capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "refused padding: Titans reads every token" in result.stdout
    got = torch.load(tmp_path / "hf.pt", weights_only=False)
    assert got["class"] == "TitansForCausalLM"

    tok = Tokenizer(data_tokenizer_path)
    with torch.no_grad():
        assert torch.equal(got["logits"], model(tokens)[0])
        assert got["loss"].item() == pytest.approx(model.loss(tokens).item(), rel=1e-6)
    prompt = torch.tensor([tok.encode(texts[0])])
    assert torch.equal(got["greedy"], generate(model, prompt, 8, temperature=0))
    assert got["ids"] == [tok.encode(t) for t in texts]
    assert got["decoded"] == [tok.decode(tok.encode(t)) for t in texts]

    # lm-eval's hf model: the loglikelihood of each choice is the model's own
    samples = next((tmp_path / "lm_eval").rglob("samples_tiny_choice*.jsonl")).read_text().splitlines()
    assert "tiny_choice" in result.stdout and len(samples) == 2
    for sample in map(json.loads, samples):
        doc = sample["doc"]
        for choice, resp in zip(doc["choices"], sample["resps"]):
            context = tok.encode(doc["question"])
            whole = tok.encode(doc["question"] + " " + choice)
            with torch.no_grad():
                logp = model(torch.tensor([whole[:-1]]))[0].log_softmax(-1)[0, len(context) - 1 :]
            expected = logp.gather(-1, torch.tensor(whole[len(context) :])[:, None]).sum().item()
            assert float(resp[0][0]) == pytest.approx(expected, rel=1e-5, abs=1e-5)


@pytest.mark.skipif(os.environ.get("TITANS_SCALE_TEST_760M") != "1",
                    reason="~1 min and 7 GiB of RAM: set TITANS_SCALE_TEST_760M=1 to run it")
def test_a_760m_shaped_model_round_trips(tmp_path, data_tokenizer_path):
    """The paper's 760M MAC (2.9 GiB of float32 weights): titans_scale.from_pretrained and, without titans_scale,
    AutoModelForCausalLM give its own logits."""
    import titans_scale
    from titans_scale.data.tokenizer import Tokenizer
    from titans_scale.hf.layout import export
    from titans_scale.models import build_model, paper_config

    torch.manual_seed(0)
    model = build_model(paper_config("760M", "mac")).eval()
    out = export(model, Tokenizer(data_tokenizer_path), tmp_path / "EXPORT")
    tokens = hf_tokens(n=40)
    with torch.no_grad():
        expected = model(tokens)[0]
        del model
        assert torch.equal(titans_scale.from_pretrained(out)(tokens)[0], expected)
    torch.save(tokens, tmp_path / "tokens.pt")
    script = ("import sys; sys.modules['titans_scale'] = None; import torch; "
              "from transformers import AutoModelForCausalLM as A; m = A.from_pretrained(sys.argv[1], trust_remote_code=True); "
              "torch.save(m(torch.load(sys.argv[2])).logits.detach(), sys.argv[3])")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules")}
    result = subprocess.run([sys.executable, "-c", script, str(out), str(tmp_path / "tokens.pt"), str(tmp_path / "hf.pt")],
                            capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert torch.equal(torch.load(tmp_path / "hf.pt"), expected)
