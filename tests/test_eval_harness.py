"""The lm-eval adapter end to end on local tasks (multiple choice, generation, rolling loglikelihood): the
numbers lm-eval records are the model's own log-probabilities and greedy continuations."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch

from test_eval import eval_checkpoint, eval_cli, eval_model

CHOICE = [
    {"question": "The sky is", "choices": ["blue", "green", "memory"], "label": 0},
    {"question": "The memory of a", "choices": ["model", "tree"], "label": 0},
]
GEN = [{"prompt": "Attention reads", "answer": " a"}, {"prompt": "The memory", "answer": " of"}]
ROLL = [{"text": "The memory of a model learns at test time."}]


def harness_tasks(root):
    """Three tasks defined like any lm-eval YAML task, over local JSON-lines files (no hub)."""
    tasks = root / "tasks"
    tasks.mkdir()
    for name, rows in (("choice", CHOICE), ("gen", GEN), ("roll", ROLL)):
        (tasks / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    common = "dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {path}\ntest_split: test\n"
    (tasks / "tiny_choice.yaml").write_text(
        "task: tiny_choice\n" + common.format(path=tasks / "choice.jsonl") +
        "output_type: multiple_choice\ndoc_to_text: '{{question}}'\ndoc_to_choice: '{{choices}}'\ndoc_to_target: label\n"
        "metric_list:\n  - metric: acc\n")
    (tasks / "tiny_gen.yaml").write_text(
        "task: tiny_gen\n" + common.format(path=tasks / "gen.jsonl") +
        "output_type: generate_until\ndoc_to_text: '{{prompt}}'\ndoc_to_target: '{{answer}}'\n"
        "generation_kwargs:\n  until: [\".\", \"\\n\\n\"]\n  max_gen_toks: 6\n  do_sample: false\n"
        "metric_list:\n  - metric: exact_match\n")
    (tasks / "tiny_roll.yaml").write_text(
        "task: tiny_roll\n" + common.format(path=tasks / "roll.jsonl") +
        "output_type: loglikelihood_rolling\ndoc_to_text: ''\ndoc_to_target: '{{text}}'\n"
        "metric_list:\n  - metric: word_perplexity\n")
    return tasks


@pytest.fixture
def offline_hub(monkeypatch, tmp_path):
    """Datasets from local files only, cached under tmp_path."""
    for var in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"):
        monkeypatch.setenv(var, "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf"))
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)


def test_harness_runs_local_tasks_with_the_models_own_numbers(tmp_path, data_tokenizer_path, offline_hub, capsys):
    from titans_scale.data.tokenizer import Tokenizer

    model_file = eval_checkpoint(tmp_path)
    tasks = harness_tasks(tmp_path)
    out = tmp_path / "out"
    code, stdout, err = eval_cli(capsys, "harness", "--checkpoint", str(model_file), "--tokenizer", data_tokenizer_path,
                                 "--tasks", "tiny_choice,tiny_gen,tiny_roll", "--include-path", str(tasks),
                                 "--dtype", "float64", "--batch-size", "2", "--bootstrap-iters", "0",
                                 "--log-samples", "--out", str(out))
    assert code == 0, err
    assert "tiny_choice" in stdout and "exact_match" in stdout
    record = json.loads((out / "harness.json").read_text())
    assert set(record["results"]) == {"tiny_choice", "tiny_gen", "tiny_roll"}

    tok, model = Tokenizer(data_tokenizer_path), eval_model(model_file)

    def logprob(context: list[int], continuation: list[int]) -> tuple[float, bool]:
        tokens = torch.tensor([context + continuation])
        with torch.no_grad():
            logits, _ = model(tokens[:, :-1])
        logp = logits.log_softmax(-1)[0, len(context) - 1 :]
        target = torch.tensor(continuation)
        return logp.gather(-1, target[:, None]).sum().item(), bool((logp.argmax(-1) == target).all())

    # Multiple choice: lm-eval's recorded loglikelihoods are log p(choice | question) of the model itself.
    for sample in record["samples"]["tiny_choice"]:
        doc = sample["doc"]
        for choice, resp in zip(doc["choices"], sample["resps"]):
            context = tok.encode(doc["question"])
            continuation = tok.encode(doc["question"] + " " + choice)[len(context) :]  # lm-eval's target_delimiter " "
            ll, greedy = logprob(context, continuation)
            assert resp[0][0] == pytest.approx(ll, rel=1e-9, abs=1e-9) and resp[0][1] == greedy
        lls = [r[0][0] for r in sample["resps"]]
        assert sample["acc"] == float(max(range(len(lls)), key=lls.__getitem__) == doc["label"])

    # Generation: greedy tokens (argmax of full passes) up to 6 tokens, cut at the first stop string.
    compared = []
    for sample in record["samples"]["tiny_gen"]:
        ids = tok.encode(sample["doc"]["prompt"])
        new = []
        with torch.no_grad():
            for _ in range(6):
                new.append(int(model(torch.tensor([ids + new]))[0][0, -1].argmax()))
        text = tok.decode(ids + new)[len(tok.decode(ids)) :] if tok.eos_id not in new else None
        if text is not None:
            cut = min([text.index(s) for s in (".", "\n\n") if s in text] + [len(text)])
            assert sample["resps"][0][0] == text[:cut]
            compared.append(text[:cut])
    assert any(compared)

    # Rolling loglikelihood: every token of the document given all before it (after the eos boundary).
    ids = [tok.eos_id] + tok.encode(ROLL[0]["text"])
    expected = logprob(ids[:1], ids[1:])[0]
    assert record["samples"]["tiny_roll"][0]["resps"][0][0] == pytest.approx(expected, rel=1e-9)


def test_harness_refuses_an_unknown_task_in_one_line(tmp_path, data_tokenizer_path, capsys):
    tasks = harness_tasks(tmp_path)
    code, _, err = eval_cli(capsys, "harness", "--checkpoint", str(eval_checkpoint(tmp_path)), "--tokenizer",
                            data_tokenizer_path, "--tasks", "tiny_choise", "--include-path", str(tasks),
                            "--no-default-tasks")
    assert code == 2 and err.count("\n") == 1
    assert "unknown lm-eval task 'tiny_choise'" in err and "did you mean tiny_choice" in err


def test_a_task_that_needs_the_hub_offline_is_one_line(tmp_path, data_tokenizer_path, offline_hub, capsys):
    """A task whose dataset lives on the Hugging Face hub (as piqa's does), with the hub unreachable."""
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "hub_choice.yaml").write_text(
        "task: hub_choice\ndataset_path: baber/piqa\noutput_type: multiple_choice\ntest_split: validation\n"
        "doc_to_text: '{{goal}}'\ndoc_to_choice: '{{[sol1, sol2]}}'\ndoc_to_target: label\nmetric_list:\n  - metric: acc\n")
    code, _, err = eval_cli(capsys, "harness", "--checkpoint", str(eval_checkpoint(tmp_path)), "--tokenizer",
                            data_tokenizer_path, "--tasks", "hub_choice", "--include-path", str(tasks), "--no-default-tasks")
    assert code == 2 and err.count("\n") == 1 and err.startswith("error: "), err
    assert "need their datasets from the Hugging Face hub, which cannot be reached" in err and "baber/piqa" in err


def test_lm_eval_finds_the_registered_model_class():
    from lm_eval.api.registry import get_model

    from titans_scale.eval.harness import TitansHarnessLM

    assert get_model("titans_scale") is TitansHarnessLM


def test_bare_lm_eval_command_finds_the_model(tmp_path, data_tokenizer_path):
    """lm-eval's own command, ``lm_eval --model titans_scale ...``, in a fresh interpreter: the start-up
    hook that scripts/setup.sh installs registers the class (lm-eval 0.4.13 has no plugin discovery)."""
    from titans_scale.lm_eval_plugin import PTH_NAME

    if not (Path(sysconfig.get_paths()["purelib"]) / PTH_NAME).exists():
        pytest.skip(f"{PTH_NAME} not installed (scripts/setup.sh or python -m titans_scale.lm_eval_plugin writes it)")
    tasks = harness_tasks(tmp_path)
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_CACHE": str(tmp_path / "hf")}
    lm_eval = Path(sys.executable).with_name("lm_eval")
    result = subprocess.run(
        [str(lm_eval), "--model", "titans_scale", "--model_args",
         f"checkpoint={eval_checkpoint(tmp_path)},tokenizer={data_tokenizer_path}", "--tasks", "tiny_choice",
         "--include_path", str(tasks), "--output_path", str(tmp_path / "out")],
        capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "tiny_choice" in result.stdout and "acc" in result.stdout, result.stdout


def test_start_up_hook_imports_nothing_of_titans_scale(tmp_path):
    """The .pth hook registers the model by name only: titans_scale is not imported at start-up (so
    ``python -m titans_scale.X`` in another checkout runs that checkout's code), and lm-eval still finds the
    class when asked. The hook module is written fresh into a private site directory."""
    from titans_scale.lm_eval_plugin import HOOK_MODULE, PTH_NAME, write_pth

    site_dir = tmp_path / "site"
    site_dir.mkdir()
    write_pth(str(site_dir))
    assert (site_dir / PTH_NAME).is_file() and (site_dir / f"{HOOK_MODULE}.py").is_file()
    other = tmp_path / "other" / "titans_scale"
    other.mkdir(parents=True)
    (other / "__init__.py").write_text("")
    (other / "probe.py").write_text("print('other checkout')\n")
    # a site directory processed like site-packages at start-up (site.addsitedir runs its .pth files)
    boot = (f"import site, sys; site.addsitedir({str(site_dir)!r}); "
            "assert 'titans_scale' not in sys.modules and {hook!r} in sys.modules; ").format(hook=HOOK_MODULE)
    env = {**os.environ, "PYTHONPATH": ""}
    probe = subprocess.run([sys.executable, "-c", boot + "import runpy; runpy.run_module('titans_scale.probe', run_name='__main__')"],
                           cwd=tmp_path / "other", capture_output=True, text=True, env=env, timeout=120)
    assert probe.returncode == 0 and probe.stdout == "other checkout\n", probe.stderr[-2000:]
    found = subprocess.run([sys.executable, "-c", boot + "import lm_eval.models; from lm_eval.api.registry import get_model; "
                            "assert 'titans_scale' not in sys.modules; print(get_model('titans_scale').__name__)"],
                           capture_output=True, text=True, env=env, timeout=300)
    assert found.returncode == 0 and found.stdout.strip() == "TitansHarnessLM", found.stderr[-2000:]
