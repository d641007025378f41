"""Tensor, sequence and data parallelism against one process: logits and the gradient of every parameter on
the same global batch (float64), for every variant, on gloo at world sizes 2 and 4 (one spawned job each:
starting a process that imports torch and megatron costs seconds)."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.distributed as dist

from titans_scale.config import ConfigError, ParallelConfig
from titans_scale.memory import MemoryConfig
from titans_scale.models import VARIANTS, ModelConfig, build_model

SEQ, BATCH, VOCAB = 32, 2, 64
FLOAT64 = 1e-10  # relative error allowed: everything runs in float64 (the vocab-parallel loss included)


def parallel_tiny(variant: str, **overrides) -> ModelConfig:
    fields = dict(vocab_size=VOCAB, dim=32, n_layers=2, n_heads=4, mlp_hidden=64, persistent_tokens=2, segment_len=8,
                  window=8, memory=MemoryConfig(chunk_size=4))
    return ModelConfig(variant=variant, **{**fields, **overrides})


def parallel_batch(batch: int = BATCH, seq: int = SEQ):
    tokens = torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(1))
    probe = torch.randn(batch, seq, VOCAB, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    return tokens, probe


def parallel_reference(variant: str) -> dict:
    """The single-process model, its logits, and the gradients of a probe loss (sum of logits x a fixed random
    tensor: exercises every logit in float64) and of its own next-token loss."""
    torch.manual_seed(0)
    model = build_model(parallel_tiny(variant)).double()
    tokens, probe = parallel_batch()
    logits, _ = model(tokens)
    (logits * probe).sum().backward()
    probe_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    loss = model.loss(tokens)
    loss.backward()
    loss_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    return dict(model=model, tokens=tokens, probe=probe, logits=logits.detach(), loss=loss.item(),
                probe_grads=probe_grads, loss_grads=loss_grads)


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item() / max(b.abs().max().item(), 1e-30)


def _worst(grads: dict, reference: dict, scale: float = 1.0) -> tuple[float, str]:
    errors = [(_relative(grads.get(n, torch.zeros_like(g)) * scale, g), n) for n, g in reference.items()]
    return max(errors)


def _sum_over(t: torch.Tensor, group) -> torch.Tensor:
    t = t.clone()
    dist.all_reduce(t, group=group)
    return t


def _compare(model, ref: dict, groups) -> dict:
    """Errors of a parallel model against the reference: logits of this rank's slice, probe gradients summed
    over the SP ranks, the loss and its gradients averaged over them (as DeepSpeed averages over DP x SP)."""
    from titans_scale.parallel import full_parameters

    tokens, probe = ref["tokens"], ref["probe"]
    part = slice(groups.sp_rank * SEQ // groups.sp, (groups.sp_rank + 1) * SEQ // groups.sp)
    logits, _ = model(tokens)
    (logits * probe[:, part]).sum().backward()
    grads = {n: _sum_over(g, groups.sp_group) for n, g in _complete(full_parameters(model, grads=True), ref).items()}
    out = {"logits": _relative(logits.detach(), ref["logits"][:, part]), "grads": _worst(grads, ref["probe_grads"])}
    model.zero_grad(set_to_none=True)
    loss = model.loss(tokens)
    loss.backward()
    grads = {n: _sum_over(g, groups.sp_group) for n, g in _complete(full_parameters(model, grads=True), ref).items()}
    out["loss"] = abs(_sum_over(loss.detach(), groups.sp_group).item() / groups.sp - ref["loss"]) / ref["loss"]
    out["loss_grads"] = _worst(grads, ref["loss_grads"], 1.0 / groups.sp)
    return out


def _complete(grads: dict, ref: dict) -> dict:
    """A parameter a rank did not use has no gradient: zeros, so that every rank reduces the same tensors."""
    return {n: grads.get(n, torch.zeros_like(g)) for n, g in ref["probe_grads"].items()}


# ----------------------------------------------------------------------------------------------------
# World size 2: TP=2, SP=2 (relay, all-to-all) against one process, every variant


def _incremental(model, ref: dict) -> float:
    """Prefill 20 tokens, then decode one at a time: the logits of every step against the full pass."""
    tokens = ref["tokens"]
    with torch.no_grad():
        logits, state = model(tokens[:, :20])
        steps = [logits]
        for t in range(20, SEQ):
            logits, state = model(tokens[:, t : t + 1], state)
            steps.append(logits)
    return _relative(torch.cat(steps, 1), ref["logits"])


def world2_job(rank: int, world: int) -> dict:
    warnings.filterwarnings("ignore")
    from titans_scale.parallel import init_parallel, parallelize

    refs = {v: parallel_reference(v) for v in VARIANTS}
    results = {}
    errors = []  # bad layouts stop at start-up with one line
    for bad in (lambda: init_parallel(tp=3, sp=1),
                lambda: parallelize(build_model(parallel_tiny("mag", n_heads=1)), ParallelConfig(tp=2), init_parallel(2, 1))):
        try:
            bad()
        except ConfigError as e:
            errors.append(str(e))
    results[("errors", "")] = errors
    groups = init_parallel(tp=2, sp=1)
    for variant, ref in refs.items():
        model = parallelize(copy.deepcopy(ref["model"]), ParallelConfig(tp=2), groups)
        results[("tp2", variant)] = _compare(model, ref, groups)
        results[("tp2 decode", variant)] = {"logits": _incremental(model, ref)}
    for variant in ("mag", "mac", "transformer"):
        model = parallelize(copy.deepcopy(refs[variant]["model"]), ParallelConfig(tp=2), groups, tp_sequence_parallel=True)
        results[("tp2 megatron-sp", variant)] = _compare(model, refs[variant], groups)
        results[("tp2 megatron-sp decode", variant)] = {"logits": _incremental(model, refs[variant])}
    groups = init_parallel(tp=1, sp=2)
    for scheme in ("relay", "all_to_all"):
        for variant, ref in refs.items():
            model = parallelize(copy.deepcopy(ref["model"]), ParallelConfig(sp=2, sp_scheme=scheme), groups)
            results[(f"sp2 {scheme}", variant)] = _compare(model, ref, groups)
    for variant in ("mal", "mac"):  # the wavefront over micro-batches, and the schedule without the wavefront
        ref = refs[variant]
        model = parallelize(copy.deepcopy(ref["model"]), ParallelConfig(sp=2), groups, micro_batches=2)
        results[("sp2 relay 2 micro-batches", variant)] = _compare(model, ref, groups)
        model = parallelize(copy.deepcopy(ref["model"]), ParallelConfig(sp=2), groups, wavefront=False)
        results[("sp2 relay no wavefront", variant)] = _compare(model, ref, groups)
    return results


def _check(results: list[dict]) -> None:
    failures = []
    for rank, per_rank in enumerate(results):
        messages = per_rank.pop(("errors", ""))
        assert len(messages) == 2 and "world size 2" in messages[0] and "n_heads=1" in messages[1], messages
        for (layout, variant), errors in per_rank.items():
            for key, value in errors.items():
                error, name = value if isinstance(value, tuple) else (value, "")
                if not error <= FLOAT64:
                    failures.append(f"rank {rank} {layout} {variant} {key}: {error:.2e} {name}")
    _summary(results)
    assert not failures, "\n".join(failures)


def _summary(results: list[dict]) -> None:
    """The worst relative error per layout and quantity over ranks and variants (shown with pytest -s)."""
    worst: dict = {}
    for per_rank in results:
        for (layout, _), errors in per_rank.items():
            for key, value in errors.items():
                error = value[0] if isinstance(value, tuple) else value
                worst.setdefault(layout, {})[key] = max(worst.get(layout, {}).get(key, 0.0), error)
    for layout, errors in worst.items():
        print(f"{layout:<32} " + "  ".join(f"{k} {v:.1e}" for k, v in errors.items()))


def test_world_size_2_tensor_and_sequence_parallel_match_one_process():
    from titans_scale.parallel.spawn import spawn

    _check(spawn(world2_job, 2))


# ----------------------------------------------------------------------------------------------------
# World size 4: TP=2 x SP=2, and TP=2 x DP=2 with DeepSpeed ZeRO-1 (one optimizer step)

# eps = 1 keeps Adam's first step smooth in the gradient (not its sign), so that the comparison measures how the
# gradients were reduced (TP shards, SP sums, DP means), not float32 noise in tiny gradients (megatron's
# vocab-parallel cross-entropy and ZeRO's master weights are float32). Clipping is off (a clip would hide a
# wrong scale), but DeepSpeed's gradient norm, which needs the TP layout, is compared.
LR, EPS = 1.0, 1.0


def _deepspeed_step(model, tokens: torch.Tensor, micro_batch: int) -> tuple[float, float]:
    """One optimizer step of the engine's own objective with DeepSpeed ZeRO-1 and torch AdamW: the loss and
    DeepSpeed's global gradient norm."""
    from titans_scale.train.distributed import MegatronGroups, quiet_imports, skip_shm_op

    quiet_imports()
    skip_shm_op()
    import deepspeed
    from deepspeed.utils import logger

    from titans_scale.train.engine import NextTokenObjective

    logger.setLevel("ERROR")
    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False, verbose=False)
    config = {"train_micro_batch_size_per_gpu": micro_batch, "gradient_accumulation_steps": 1, "gradient_clipping": 1e9,
              "zero_optimization": {"stage": 1}, "zero_allow_untested_optimizer": True, "steps_per_print": 2**31 - 1}
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, eps=EPS, weight_decay=0.1)
    engine, *_ = deepspeed.initialize(model=NextTokenObjective(model), optimizer=optimizer, config=config,
                                      mpu=MegatronGroups(), dist_init_required=False)
    loss = engine(tokens)
    engine.backward(loss)
    engine.step()
    return loss.item(), float(engine.get_global_grad_norm())


def world4_job(rank: int, world: int) -> dict:
    warnings.filterwarnings("ignore")
    from titans_scale.parallel import full_parameters, init_parallel, parallelize

    results = {}
    groups = init_parallel(tp=2, sp=2)
    for variant, scheme in (("mag", "relay"), ("mac", "relay"), ("mal", "all_to_all")):
        ref = parallel_reference(variant)
        model = parallelize(copy.deepcopy(ref["model"]), ParallelConfig(tp=2, sp=2, sp_scheme=scheme), groups,
                            tp_sequence_parallel=True)
        results[(f"tp2 sp2 {scheme} megatron-sp", variant)] = _compare(model, ref, groups)

    # One DeepSpeed step against one process: the same global batch of 4 sequences
    torch.manual_seed(0)
    reference = build_model(parallel_tiny("mag")).double()
    tokens, _ = parallel_batch(batch=4)
    initial = copy.deepcopy(reference)
    optimizer = torch.optim.AdamW(reference.parameters(), lr=LR, eps=EPS, weight_decay=0.1)
    ref_loss = reference.loss(tokens)
    ref_loss.backward()
    ref_norm = torch.nn.utils.clip_grad_norm_(reference.parameters(), float("inf")).item()
    optimizer.step()
    expected = dict(reference.named_parameters())
    for layout, parallel in (("tp2 sp2", ParallelConfig(tp=2, sp=2)), ("tp2 dp2", ParallelConfig(tp=2, sp=1))):
        groups = init_parallel(parallel.tp, parallel.sp)
        mine = tokens.chunk(groups.dp)[groups.dp_rank]
        model = parallelize(copy.deepcopy(initial), parallel, groups)
        loss, norm = _deepspeed_step(model, mine, mine.shape[0])
        mean_loss = _sum_over(torch.tensor(loss, dtype=torch.float64), groups.dp_group).item() / dist.get_world_size(groups.dp_group)
        after = full_parameters(model)
        results[(f"{layout} deepspeed zero-1 step", "mag")] = {
            "loss": abs(mean_loss - ref_loss.item()) / ref_loss.item(),
            "grad norm": abs(norm - ref_norm) / ref_norm,
            "params": max((_relative(after[n] - initial.state_dict()[n], p.detach() - initial.state_dict()[n]), n)
                          for n, p in expected.items()),
        }
    return results


def _check4(results: list[dict]) -> None:
    failures = []
    for rank, per_rank in enumerate(results):
        for (layout, variant), errors in per_rank.items():
            for key, value in errors.items():
                error, name = value if isinstance(value, tuple) else (value, "")
                tolerance = FLOAT64 if layout.endswith("megatron-sp") and not key.startswith("loss") else 1e-5
                if not error <= tolerance:
                    failures.append(f"rank {rank} {layout} {variant} {key}: {error:.2e} {name}")
    _summary(results)
    assert not failures, "\n".join(failures)


def test_world_size_4_tp_x_sp_and_tp_x_dp_with_deepspeed_match_one_process():
    from titans_scale.parallel.spawn import spawn

    _check4(spawn(world4_job, 4))


# ----------------------------------------------------------------------------------------------------
# In-process: refused layouts, and the relay's state description


@pytest.mark.parametrize(
    "call, words",
    [
        (lambda p: p.check_model(parallel_tiny("mag", n_heads=4), 3, 1, "relay"), ["n_heads=4", "tp=3"]),
        (lambda p: p.check_model(parallel_tiny("mag"), 2, 4, "all_to_all"), ["2 memory heads", "sp=4"]),
        (lambda p: p.check_model(parallel_tiny("swa", vocab_size=63), 2, 1, "relay"), ["vocab_size=63", "64"]),
        (lambda p: p.check_sequence(parallel_tiny("lmm"), 24, 1, 4, "relay"), ["6 tokens", "chunk_size=4", "16"]),
        (lambda p: p.check_sequence(parallel_tiny("mac"), 32, 1, 8, "relay"), ["4 tokens", "segment_len=8", "64"]),
        (lambda p: p.check_sequence(parallel_tiny("mag"), 8, 1, 2, "all_to_all"), ["halo", "4 tokens"]),
        (lambda p: p.check_sequence(parallel_tiny("swa"), 30, 1, 4, "relay"), ["30", "sp=4"]),
        (lambda p: p.validate_parallel(parallel_tiny("mag"), ParallelConfig(tp=2, sp=2), world_size=6),
         ["world size 6", "parallel.tp * parallel.sp = 2 * 2"]),
        (lambda p: p.check_zero_stage(parallel_tiny("mac"), 2, "all_to_all", 3), ["zero_stage=3", "zero_stage=1"]),
        (lambda p: p.check_zero_stage(parallel_tiny("mag"), 2, "relay", 2), ["zero_stage=2", "relay", "all_to_all"]),
        (lambda p: p.check_model(parallel_tiny("mag", activation_checkpointing=True), 1, 2, "relay"),
         ["activation_checkpointing", "sp=2", "checkpoint_every"]),
    ],
)
def test_bad_layouts_are_refused_with_one_line(call, words):
    from titans_scale import parallel

    with pytest.raises(ConfigError) as info:
        call(parallel)
    message = str(info.value)
    assert "\n" not in message and all(w in message for w in words), message


def test_relay_state_description_round_trips_and_sends_shared_tensors_once():
    from titans_scale.parallel.relay import flatten_state, state_bytes, unflatten_state

    model = build_model(parallel_tiny("mac")).double()
    _, state = model(parallel_batch()[0][:, :16])  # two whole segments: the segment memory is the memory
    layer = state.layers[0]
    tensors, spec = flatten_state(layer)
    rebuilt = unflatten_state(spec, tensors)
    again, _ = flatten_state(rebuilt)
    assert len(again) == len(tensors) and all(a is b for a, b in zip(again, tensors))
    context = rebuilt[0]
    assert context.segment_memory.weights[0] is context.memory.memory.weights[0]
    assert state_bytes(layer) == sum(t.numel() * 8 for t in tensors)
