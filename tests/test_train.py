"""The training engine, driven for real on CPU (gloo, DeepSpeed, megatron-core groups, streaming shards):
exact resumption at world size 2 under ZeRO 2 (after a crash in the middle of writing a checkpoint) and ZeRO
3 (ZeRO 1: test_slurm's signalled job), gradient accumulation, refusal of a checkpoint of another model, and
the tiny recipe end to end. Every launch costs ~15 s of start-up, so runs that set up the same thing are
shared."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from conftest import data_make_documents

ROOT = Path(__file__).resolve().parent.parent
SEQ = 64
K = 3  # checkpoint every K steps; runs are 2K steps
LAUNCH = [sys.executable, "-m", "titans_scale.launch"]


# ---------------------------------------------------------------------------------------------- helpers
def train_free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Launched:
    """What a launch left behind: exit code, rank 0's stdout and stderr."""

    def __init__(self, returncode: int, stdout: str, stderr: str):
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr

    def __repr__(self) -> str:
        return f"exit {self.returncode}\n--- stdout\n{self.stdout[-4000:]}\n--- stderr\n{self.stderr[-4000:]}"


def train_launch(args: list[str], *, world: int = 1, env: dict | None = None, timeout: int = 300) -> Launched:
    """``python -m titans_scale.launch args`` as ``world`` processes started the way torchrun starts them
    (RANK / WORLD_SIZE / MASTER_* in the environment); a failed rank stops the others. ``env`` adds to the
    environment; a name given as None is removed from it."""
    port = train_free_port()
    procs = []
    for rank in range(world):
        penv = {**os.environ, "OMP_NUM_THREADS": "1" if world > 1 else os.environ.get("OMP_NUM_THREADS", "2"),
                **(env or {})}
        penv = {k: v for k, v in penv.items() if v is not None}
        if world > 1:
            penv.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        procs.append(subprocess.Popen(LAUNCH + [str(a) for a in args], cwd=ROOT, env=penv, text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    deadline = time.time() + timeout
    while any(p.poll() is None for p in procs):
        if time.time() > deadline or any(p.poll() not in (None, 0) for p in procs):
            time.sleep(2)  # let a failing rank's partners notice, then stop them
            for p in procs:
                if p.poll() is None:
                    p.kill()
            break
        time.sleep(0.1)
    outputs = [p.communicate() for p in procs]
    code = next((p.returncode for p in procs if p.returncode), 0)
    return Launched(code, outputs[0][0], outputs[0][1] + "".join(f"\n--- rank {r}\n{e}" for r, (_, e) in enumerate(outputs) if r))


def train_main(capsys, args: list) -> Launched:
    """``python -m titans_scale.launch args`` in this process, for refusals that come before any worker or
    process group starts (the command itself, junk-free stderr included, runs in test_config and test_launch)."""
    from titans_scale.launch import main

    code = main([str(a) for a in args])
    out = capsys.readouterr()
    return Launched(code, out.out, out.err)


def train_args(shards: dict, run_dir: Path, **overrides) -> list[str]:
    """A tiny MAG model on the test shards: 2K steps of 2 accumulated micro-batches of 2 sequences per rank."""
    args = {
        "recipe": "tiny", "model.dim": 32, "model.n_heads": 2, "model.n_layers": 2, "model.window": 32,
        "model.persistent_tokens": 4, "model.memory.chunk_size": 8, "model.memory.expansion": 2,
        "data.data_dir": shards["data_dir"], "data.tokenizer": shards["tokenizer"], "data.vocab_size": 400,
        "data.seq_len": SEQ, "train.steps": 2 * K, "train.global_batch_tokens": 2 * 2 * 2 * SEQ,
        "train.micro_batch": 2, "train.warmup_steps": 2, "train.checkpoint_every": K, "train.keep_last": 5,
        "train.eval_every": K, "train.eval_batches": 2, "train.log_every": 1, "train.sample_tokens": 0,
        "wandb.mode": "disabled", "run_dir": run_dir, "nproc": 1,
    }
    args.update({k.replace("__", "."): v for k, v in overrides.items()})
    return [f"{k}={v}" for k, v in args.items()]


def train_metrics(run_dir: Path) -> dict[str, dict[int, float]]:
    """{"loss": {step: loss}, "val_loss": {step: loss}} from a run's metrics.jsonl."""
    out = {"loss": {}, "val_loss": {}}
    for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        for key in out:
            if key in row:
                out[key][row["step"]] = row[key]
    return out


def train_params(run_dir: Path) -> dict[str, torch.Tensor]:
    """The exported model's parameters, read through load_model (every parameter present, shapes right)."""
    from titans_scale.train.checkpoint import load_model

    return {name: p.detach().clone() for name, p in load_model(Path(run_dir) / "model.pt")[0].state_dict().items()}


def assert_same_params(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), f"{name} differs: max |diff| {(a[name] - b[name]).abs().max()}"


@pytest.fixture(scope="module")
def shards(tmp_path_factory, data_tokenizer_path) -> dict:
    """Small shards made with the data path's own prepare (conftest's vocab-400 tokenizer)."""
    from titans_scale.data.prepare import prepare

    root = tmp_path_factory.mktemp("train_data")
    corpus = root / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": d}) + "\n" for d in data_make_documents(300, seed=5)))
    prepare(str(corpus), data_tokenizer_path, SEQ, root / "shards", val_fraction=0.1, progress=False)
    return {"data_dir": str(root / "shards"), "tokenizer": data_tokenizer_path, "root": root}


@pytest.fixture(scope="module")
def crashed_run(tmp_path_factory, shards) -> dict:
    """ZeRO-2 at world size 2, started with nproc=2 (our own elastic spawn), killed right after DeepSpeed
    wrote the first file of its final (step 2K) checkpoint: it has logged every step and exported the
    finished model (model.pt comes before the last save), i.e. it is the uninterrupted ZeRO-2 reference, but
    `latest` stays at step K. Its losses and weights are read before anything resumes it."""
    from titans_scale.train.checkpoint import CRASH_ENV

    run_dir = tmp_path_factory.mktemp("crashed_zero2")
    args = train_args(shards, run_dir, train__zero_stage=2, nproc=2)
    # one thread per worker, like the ranks that resume it (the suite's OMP_NUM_THREADS=2 would oversubscribe)
    crashed = train_launch(args, env={CRASH_ENV: str(2 * K), "OMP_NUM_THREADS": "1"})
    assert crashed.returncode != 0 and "[train]" in crashed.stdout, crashed
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {"run_dir": run_dir, "args": args, "metrics": train_metrics(run_dir), "params": train_params(run_dir),
            "stdout": crashed.stdout, "rows": rows}


# ------------------------------------------------------------------------------------------------ tests
def test_resume_continues_exactly(shards, crashed_run, tmp_path_factory, tmp_path):
    """ZeRO-3: train K steps, stop, resume to 2K (a fresh pair of processes from the step-K checkpoint): the
    loss at every step, the validation loss and the final parameters equal those of the uninterrupted run.
    (ZeRO-2 resumes the same way in the crash test below, ZeRO-1 in test_slurm's signalled job.)"""
    straight = tmp_path_factory.mktemp("straight_zero3")
    result = train_launch(train_args(shards, straight, train__zero_stage=3), world=2)
    assert result.returncode == 0, result
    checkpoint = straight / "checkpoints" / f"step_{K:08d}"
    result = train_launch(train_args(shards, tmp_path, train__zero_stage=3, resume=checkpoint), world=2)
    assert result.returncode == 0, result
    assert f"resuming from {checkpoint}" in result.stdout
    a, b = train_metrics(straight), train_metrics(tmp_path)
    assert sorted(b["loss"]) == list(range(K + 1, 2 * K + 1))  # only the steps after the checkpoint ran
    assert all(b["loss"][s] == a["loss"][s] for s in b["loss"]), (a, b)
    assert b["val_loss"][2 * K] == a["val_loss"][2 * K]
    zero3 = train_params(straight)
    assert_same_params(zero3, train_params(tmp_path))
    # the gathered ZeRO-3 export holds the weights a ZeRO-2 run trains. The two stages sum the same gradients
    # in another order, so they differ by float32 rounding; Adam divides by sqrt(v), so an element whose
    # gradient is as small as that rounding can step the other way. What holds on any machine: (1) no element
    # differs by more than both runs' Adam steps together, sum_t 2 lr_t B_t, B_t = Adam's bound on
    # |m_hat / sqrt(v_hat)| (decoupled weight decay only shrinks a difference); (2) the typical element,
    # whose gradient is far above rounding, agrees to far better than 1% of its update, where a wrong gather
    # would be off by the weights' own size.
    zero2 = crashed_run["params"]
    cfg = OmegaConf.load(straight / "config.yaml").train
    lrs = [json.loads(line)["lr"] for line in (straight / "metrics.jsonl").read_text().splitlines()
           if "loss" in json.loads(line)]
    bound = sum(2 * lr * adam_step_bound(cfg.beta1, cfg.beta2, t) for t, lr in enumerate(lrs, 1))
    initial = train_initial_params(straight)
    diffs = torch.cat([(zero3[n] - zero2[n]).abs().flatten() for n in zero3])
    updates = torch.cat([(zero2[n] - initial[n]).abs().flatten() for n in zero3])
    print(f"ZeRO-3 vs ZeRO-2: max |diff| {diffs.max():.1e} (Adam bound {bound:.1e}), median {diffs.median():.1e} "
          f"(median update {updates.median():.1e})")
    assert diffs.max() <= bound, (diffs.max(), bound)
    assert diffs.median() < 1e-2 * updates.median(), (diffs.median(), updates.median())


def adam_step_bound(beta1: float, beta2: float, t: int) -> float:
    """max |m_hat_t / sqrt(v_hat_t)| over all gradient histories (Cauchy-Schwarz on the two moving averages,
    with rho = beta1^2 / beta2 < 1): (1 - b1) / sqrt(1 - b2) * sqrt((1 - rho^t) / (1 - rho)) * sqrt(1 - b2^t)
    / (1 - b1^t); 1 at t = 1 (the first step is sign(g))."""
    rho = beta1**2 / beta2
    assert rho < 1
    return ((1 - beta1) / (1 - beta2) ** 0.5 * ((1 - rho**t) / (1 - rho)) ** 0.5 * (1 - beta2**t) ** 0.5
            / (1 - beta1**t))


def train_initial_params(run_dir: Path) -> dict[str, torch.Tensor]:
    """The weights a run started from: the model rebuilt from its exported config with the run's seed."""
    from titans_scale.models import build_model
    from titans_scale.train.checkpoint import load_model

    torch.manual_seed(OmegaConf.load(Path(run_dir) / "config.yaml").train.seed)
    return {n: p.detach().clone() for n, p in build_model(load_model(Path(run_dir) / "model.pt")[1]).state_dict().items()}


def test_crash_while_writing_a_checkpoint_resumes_from_the_previous_one(crashed_run):
    """The crashed ZeRO-2 run (see crashed_run) left a partial step-2K checkpoint and `latest` at step K.
    resume=auto (a fresh pair of processes started like torchrun) continues from step K and ends exactly where
    it ended: the losses of every step, the validation loss and the final parameters are identical."""
    run_dir, straight = crashed_run["run_dir"], crashed_run["metrics"]
    root = run_dir / "checkpoints"
    assert (root / "latest").read_text() == f"step_{K:08d}"
    partial = root / f"tmp-step_{2 * K:08d}"
    assert partial.is_dir() and not (partial / "meta.json").exists() and any(partial.iterdir())
    # written before the crash: steps 1..2K
    assert sorted(straight["loss"]) == list(range(1, 2 * K + 1)) and sorted(straight["val_loss"]) == [0, K, 2 * K]

    resumed = train_launch(crashed_run["args"], world=2)
    assert resumed.returncode == 0, resumed
    assert f"resuming from {root / f'step_{K:08d}'}" in resumed.stdout
    assert not partial.exists() and (root / "latest").read_text() == f"step_{2 * K:08d}"
    assert train_metrics(run_dir) == straight  # steps K+1..2K were redone, with the same losses
    assert_same_params(train_params(run_dir), crashed_run["params"])


# Adam's eps raised so the update stays linear in the gradient (see the accumulation test below): the
# parallel runs then differ from one process by float32 rounding only
SPLIT_RUN = dict(train__steps=K, train__eps=1e-3, train__checkpoint_every=K - 1, train__eval_every=0)


@pytest.fixture(scope="module")
def one_process_run(tmp_path_factory, shards) -> Path:
    """Also traced with torch's profiler (train.profile=true: numbers unchanged; its trace checked below)."""
    run_dir = tmp_path_factory.mktemp("one_process")
    result = train_launch(train_args(shards, run_dir, **SPLIT_RUN, train__profile="true"), world=1)
    assert result.returncode == 0, result
    assert f"[profile] steps {K}-{K} traced into {run_dir / 'profile' / 'trace_rank0.json'}" in result.stdout, result
    return run_dir


def test_profile_writes_a_trace_of_the_steps_after_the_first_two(one_process_run):
    trace = json.loads((one_process_run / "profile" / "trace_rank0.json").read_text())
    names = {event.get("name", "") for event in trace["traceEvents"]}
    assert "ProfilerStep#2" in names and not {"ProfilerStep#0", "ProfilerStep#1"} & names  # step K = 3, 0-based 2
    assert any("aten::mm" in name or "aten::addmm" in name for name in names)
    assert "Self CPU" in (one_process_run / "profile" / "ops_rank0.txt").read_text()


@pytest.mark.parametrize("layout", [dict(parallel__tp=2, train__zero_stage=2), dict(parallel__sp=2)],
                         ids=["tp2-zero2", "sp2-relay-zero1"])
def test_tensor_and_sequence_parallel_training_matches_one_process(layout, shards, one_process_run, tmp_path):
    """The engine splits the model (TP: heads and memories over 2 ranks; SP: the sequence's memory chunks,
    relayed) and trains the same global batches: per-step losses, the validation loss and the exported
    single-process weights equal those of one process up to float32 rounding; under TP, resuming from the
    sharded checkpoint continues bit-identically."""
    result = train_launch(train_args(shards, tmp_path, **SPLIT_RUN, **layout), world=2)
    assert result.returncode == 0, result
    assert "(dp 1)" in result.stdout, result.stdout
    a, b = train_metrics(one_process_run), train_metrics(tmp_path)
    assert a["loss"].keys() == b["loss"].keys() and a["val_loss"].keys() == b["val_loss"].keys()
    for key in a:
        for step in a[key]:
            assert abs(a[key][step] - b[key][step]) < 1e-5 * a[key][step], (key, step, a[key][step], b[key][step])
    # the exported weights: each parameter's update equals one process's up to rounding (float32 over 3 Adam
    # steps: about 1e-3 of the update; a wrong split or gather is off by the update's own size)
    from omegaconf import OmegaConf

    from titans_scale.models import build_model
    from titans_scale.train.checkpoint import load_model

    torch.manual_seed(OmegaConf.load(tmp_path / "config.yaml").train.seed)
    initial = build_model(load_model(tmp_path / "model.pt")[1]).state_dict()
    one, mine = train_params(one_process_run), train_params(tmp_path)
    assert mine.keys() == one.keys() == initial.keys()
    worst = max(((mine[n] - one[n]).norm().item() / (one[n] - p).norm().item(), n) for n, p in initial.items())
    print(f"{layout}: worst |update - one process's| / |update| over the exported weights {worst[0]:.1e} ({worst[1]})")
    assert worst[0] < 2e-2, worst
    if "parallel__tp" in layout:  # resumed from the TP-sharded checkpoint of step K - 1: bit-identical
        resumed = tmp_path / "resumed"
        checkpoint = tmp_path / "checkpoints" / f"step_{K - 1:08d}"
        result = train_launch(train_args(shards, resumed, **SPLIT_RUN, **layout, resume=checkpoint), world=2)
        assert result.returncode == 0, result
        again = train_metrics(resumed)
        assert again["loss"] == {K: b["loss"][K]} and again["val_loss"][K] == b["val_loss"][K]
        assert_same_params(train_params(resumed), mine)


def train_grad_norm_job(rank: int, world: int) -> list:
    """On each of 2 gloo ranks: for every ZeRO stage (fp32), ZeRO-1 under bf16, and ZeRO-1 with tp=2, two steps
    of 2 accumulated micro-batches of a tiny MAG model; returns (measured total, DeepSpeed's own norm) per
    step, or for ZeRO-0 (which keeps no norm) the norm of the whole gradients it holds."""
    from megatron.core import parallel_state

    from titans_scale.config import resolve
    from titans_scale.models import build_model
    from titans_scale.parallel import parallelize
    from titans_scale.train.distributed import init_distributed, megatron_groups
    from titans_scale.train.engine import Plan, build_engine
    from titans_scale.train.metrics import GradientNorms

    out = []
    for stage, tp, precision in ((0, 1, "fp32"), (1, 1, "fp32"), (2, 1, "fp32"), (3, 1, "fp32"), (1, 1, "bf16"), (1, 2, "fp32")):
        parallel_state.destroy_model_parallel()
        cfg = resolve(["model.dim=32", "model.n_heads=2", "model.n_layers=2", "model.window=16", "model.persistent_tokens=2",
                       "model.memory.chunk_size=8", "model.memory.expansion=2", "data.vocab_size=400", f"data.seq_len={SEQ}",
                       f"train.zero_stage={stage}", f"parallel.tp={tp}", f"train.precision={precision}"])
        world_info = init_distributed(cfg.parallel, megatron=True)
        plan = Plan(world, world // tp, SEQ, 2, 2, 2, 0, None)
        torch.manual_seed(0)
        model = parallelize(build_model(cfg.model), cfg.parallel)
        engine = build_engine(model, cfg, plan, world_info.device)
        groups = megatron_groups()
        norms = GradientNorms(model, dp_rank=groups.get_data_parallel_rank(), tp_rank=groups.get_tensor_model_parallel_rank())
        generator = torch.Generator().manual_seed(10 + groups.get_data_parallel_rank())
        for _ in range(2):
            for micro in range(2):
                engine.backward(engine(torch.randint(0, 400, (2, SEQ), generator=generator)))
                if micro == 1:
                    mine = norms.measure(world_info.device)
                    whole = torch.cat([p.grad.flatten() for p in model.parameters()]).norm().item() if stage == 0 else None
                engine.step()
            theirs = whole if stage == 0 else engine.get_global_grad_norm()
            assert theirs is not None, (stage, tp, precision)
            out.append((f"zero{stage} tp{tp} {precision}", mine, theirs))
    return out


def test_gradient_norms_count_every_element_once_under_zero_bf16_and_tp():
    """The total of the per-group gradient norms equals DeepSpeed's own clipping norm under ZeRO 1, 2, 3, the
    bf16 optimizer and tensor parallelism (the gradients partitioned, sharded or replicated differently), and
    the norm of the whole gradients under ZeRO 0; each group's share adds up to the total."""
    from titans_scale.parallel.spawn import spawn

    for label, mine, theirs in spawn(train_grad_norm_job, 2)[0]:
        assert set(mine) == {"total", "memory", "attention", "mlp", "embed", "other"}, mine
        assert abs(mine["total"] - theirs) < 1e-5 * theirs, (label, mine, theirs)  # float32 sums in another order
        assert abs(sum(v * v for g, v in mine.items() if g != "total") - mine["total"] ** 2) < 1e-9 * mine["total"] ** 2


def test_progress_line_and_metrics_rows_carry_gradient_norms_memory_and_speed(crashed_run):
    """Every metrics row of the ZeRO-2 run holds its gradient norm (total and per group), the clipping
    coefficient, tokens/s and peak memory; the progress line shows them."""
    rows = [r for r in crashed_run["rows"] if "loss" in r]
    assert [r["step"] for r in rows] == list(range(1, 2 * K + 1))
    for row in rows:
        groups = {k: v for k, v in row.items() if k.startswith("grad_norm/")}
        assert set(groups) == {f"grad_norm/{g}" for g in ("memory", "attention", "mlp", "embed", "other")}
        assert abs(sum(v * v for v in groups.values()) - row["grad_norm"] ** 2) < 1e-6 * row["grad_norm"] ** 2
        assert row["clip_coef"] == min(1.0, 1.0 / row["grad_norm"])  # the tiny recipe's grad_clip 1.0
        assert row["tokens_per_s"] > 0 and 0 < row["mfu"] < 1 and 0.01 < row["peak_memory_gb"] < 100
    line = next(line for line in crashed_run["stdout"].splitlines() if line.startswith("[train] step 2/"))
    assert " | grad " in line and "mem " in line and "att " in line and "tok/s" in line and "peak mem " in line, line


def test_refuses_a_checkpoint_of_another_model(shards, crashed_run, capsys):
    """Before any step: one line naming the fields that differ, exit code 2."""
    args = train_args(shards, crashed_run["run_dir"], train__zero_stage=2, nproc=2, model__dim=48, train__steps=4 * K)
    result = train_main(capsys, args)
    assert result.returncode == 2, result
    assert len(result.stderr.strip().splitlines()) == 1, result
    assert "model.dim: 32 -> 48" in result.stderr and "[train]" not in result.stdout


GRAD_ACCUM_SCRIPT = r"""
import sys, torch
from titans_scale.config import resolve
from titans_scale.models import build_model
from titans_scale.train.distributed import init_distributed, shutdown
from titans_scale.train.engine import build_engine, decays, make_plan

common = sys.argv[1:]
tokens = torch.randint(0, 400, (4, 64), generator=torch.Generator().manual_seed(1))
world = None

def one_step(micro_batch):
    global world
    cfg = resolve(common + [f"train.micro_batch={micro_batch}"])
    world = world or init_distributed(cfg.parallel, megatron=True)  # DeepSpeed gets megatron-core's groups
    plan = make_plan(cfg, 1)
    assert plan.grad_accum == 4 // micro_batch
    torch.manual_seed(0)
    model = build_model(cfg.model)
    engine = build_engine(model, cfg, plan, world.device)
    assert type(engine.mpu).__name__ == "MegatronGroups"
    for micro in tokens.split(micro_batch):
        loss = engine(micro)
        engine.backward(loss)
        engine.step()
    return {n: p.detach().clone() for n, p in model.named_parameters()}, cfg

def reference(cfg):
    # the same update without DeepSpeed: mean loss over the 4 sequences, clip, AdamW
    torch.manual_seed(0)
    model = build_model(cfg.model)
    t = cfg.train
    decay = [p for n, p in model.named_parameters() if decays(n, p)]
    rest = [p for n, p in model.named_parameters() if not decays(n, p)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": t.weight_decay}, {"params": rest, "weight_decay": 0.0}],
                            lr=t.lr, betas=(t.beta1, t.beta2), eps=t.eps)
    model.loss(tokens).backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
    opt.step()
    return {n: p.detach().clone() for n, p in model.named_parameters()}

one, cfg = one_step(4)
torch.manual_seed(0)
start = {n: p.detach().clone() for n, p in build_model(cfg.model).named_parameters()}
four, _ = one_step(1)
ref = reference(cfg)
worst = max((one[n] - four[n]).abs().max().item() for n in one)
worst_ref = max((one[n] - ref[n]).abs().max().item() for n in one)
moved = max((one[n] - p).abs().max().item() for n, p in start.items())
print(f"update up to {moved:.2e}; max |1x4 - 4x1| = {worst:.2e}; max |1x4 - torch reference| = {worst_ref:.2e}")
assert max(worst, worst_ref) < 1e-4 * moved, (worst, worst_ref, moved)  # float32 rounding of the weights
shutdown()
"""


def test_gradient_accumulation_matches_one_big_micro_batch(shards, tmp_path):
    """1 x micro-batch 4 and 4 x micro-batch 1 give the same update, and both the update of plain torch
    (mean loss, global-norm clipping, AdamW with weight decay on matrices only); ZeRO-2 with megatron-core's
    groups handed to DeepSpeed as its mpu. Adam's eps is raised to 1e-3
    so that the first update stays linear in the gradient (with eps 1e-8 it is sign(g) for every coordinate,
    and a coordinate whose gradient cancels to ~1e-9 flips with rounding); the comparison then checks the
    accumulated gradient: differences stay at the rounding of float32 weights, under 1e-4 of the update."""
    args = train_args(shards, tmp_path, train__zero_stage=2, train__global_batch_tokens=4 * SEQ,
                      train__warmup_steps=0, train__grad_clip=0.5, train__eps=1e-3, resume="never")
    result = subprocess.run([sys.executable, "-c", GRAD_ACCUM_SCRIPT, *args], cwd=ROOT, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    print(result.stdout.strip().splitlines()[-1])


def test_weight_decay_on_matrices_but_not_on_norms_or_biases():
    from titans_scale.config import resolve
    from titans_scale.models import build_model
    from titans_scale.train.engine import decays

    model = build_model(resolve(["model.dim=32", "model.n_heads=2", "model.n_layers=1"]).model)
    names = {n: decays(n, p) for n, p in model.named_parameters()}
    decayed = {n for n, d in names.items() if d}
    assert {"embed.weight", "head.weight", "blocks.0.mlp.up.weight", "blocks.0.mixers.0.attention.persistent",
            "blocks.0.mixers.0.memory.to_q.weight", "blocks.0.mixers.0.memory.initial_weights.0"} <= decayed
    assert not decayed & {"norm.weight", "blocks.0.mixers.0.memory.ln_weight", "blocks.0.mixers.0.memory.ln_bias",
                          "blocks.0.mixers.0.memory.to_theta.bias", "blocks.0.mixers.0.memory.out_norm_weight"}


def test_tiny_recipe_trains_end_to_end_and_validation_loss_falls(tmp_path):
    """The README's main job, shortened (a smaller model, 24 steps): bundled sample data (built on first use),
    two workers (the recipe's nproc=2, our own elastic spawn), train, validate, export, sample. The validation
    loss after the run is clearly below the one before."""
    run_dir = tmp_path / "tiny"
    args = ["recipe=tiny", "train.steps=24", "train.warmup_steps=4", "train.eval_every=12", "train.log_every=4",
            "train.checkpoint_every=12", "model.dim=64", "model.n_layers=1", "train.micro_batch=4",
            "train.global_batch_tokens=2048", f"run_dir={run_dir}", "train.sample_tokens=16"]
    # the workers' threads as a user gets them: spawn_workers shares the cores (the suite's
    # OMP_NUM_THREADS=2 in each worker would oversubscribe them, doubling the run's time)
    result = train_launch(args, env={"OMP_NUM_THREADS": None}, timeout=600)
    assert result.returncode == 0, result
    val = train_metrics(run_dir)["val_loss"]
    assert sorted(val) == [0, 12, 24]
    assert val[24] < val[0] - 0.5, val
    assert "[sample]" in result.stdout and "perplexity" in result.stdout
    assert f"[done]  curves in {run_dir / 'curves.png'}" in result.stdout and (run_dir / "curves.png").stat().st_size
    assert (run_dir / "model.pt").is_file() and (run_dir / "wandb").is_dir()
    assert list(run_dir.glob("wandb/wandb/offline-run-*/run-*.wandb"))  # where docs/training.md says to sync from
    assert result.stdout.count("[config] recipe 'tiny' resolved") == 1 and "train:\n  steps: 24" in result.stdout
    from titans_scale.train.checkpoint import load_model

    model, cfg = load_model(run_dir / "model.pt")
    assert cfg.dim == 64 and cfg.variant == "mag"
    assert model(torch.zeros(1, 4, dtype=torch.long))[0].shape == (1, 4, cfg.vocab_size)
    # the trained model in the Hugging Face layout (the run's tokenizer found from its checkpoint): equal logits
    import titans_scale
    from titans_scale.export import main as export_main

    assert export_main(["--checkpoint", str(run_dir)]) == 0
    exported = titans_scale.from_pretrained(run_dir / "hf")
    tokens = torch.randint(0, cfg.vocab_size, (2, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(exported(tokens)[0], model(tokens)[0])
    assert (run_dir / "hf" / "tokenizer.model").stat().st_size > 0


def test_schedule_warms_up_then_follows_the_cosine_to_min_lr():
    from titans_scale.train.schedule import build_scheduler, cosine_with_warmup, move_to

    kw = dict(total_steps=100, warmup_steps=10, lr=1e-3, min_lr=1e-4)
    lrs = [cosine_with_warmup(s, **kw) for s in range(100)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3)  # linear warmup to the peak
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:]))  # then it only falls
    assert lrs[55] == pytest.approx(1e-4 + 0.9e-3 * 0.5) and cosine_with_warmup(100, **kw) == pytest.approx(1e-4)

    def scheduler():
        return build_scheduler(torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1e-3), **kw)

    stepped, moved = scheduler(), scheduler()
    for _ in range(37):
        stepped.optimizer.step()
        stepped.step()
    move_to(moved, 37)  # what a resumed run does instead of loading the saved scheduler
    assert moved.get_last_lr() == stepped.get_last_lr() == [lrs[37]]
    assert moved.optimizer.param_groups[0]["lr"] == stepped.optimizer.param_groups[0]["lr"]
    moved.optimizer.step()
    moved.step()
    assert moved.get_last_lr() == [lrs[38]]


def test_latest_names_only_complete_checkpoints(tmp_path):
    from titans_scale.train.checkpoint import LATEST, META, find_checkpoint, resolve_resume

    root = tmp_path / "checkpoints"
    for step in (3, 6):
        (root / f"step_{step:08d}").mkdir(parents=True)
        (root / f"step_{step:08d}" / META).write_text(json.dumps({"step": step}))
    (root / "tmp-step_00000009").mkdir()  # an interrupted save: never a candidate
    assert find_checkpoint(root) == root / "step_00000006"  # no marker: the newest complete one
    (root / LATEST).write_text("step_00000003")
    assert find_checkpoint(root) == root / "step_00000003"
    (root / LATEST).write_text("step_00000009")  # a stale marker falls back to the newest complete one
    assert find_checkpoint(root) == root / "step_00000006"
    assert resolve_resume("auto", tmp_path) == root / "step_00000006"
    assert resolve_resume("never", tmp_path) is None
    assert resolve_resume(str(root / "step_00000003"), tmp_path / "elsewhere") == root / "step_00000003"
    assert resolve_resume("auto", tmp_path / "fresh") is None
