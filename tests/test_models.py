"""The model zoo: causality, learning, stateful inference, sizes and FLOPs, config errors, generation."""

from dataclasses import replace

import pytest
import torch
from omegaconf import OmegaConf
from torch.utils.flop_counter import FlopCounterMode

from titans_scale.memory import MemoryConfig
from titans_scale.models import (
    PAPER_SIZES,
    VARIANTS,
    ModelConfig,
    build_model,
    generate,
    model_stats,
    paper_config,
)

VOCAB = 61


def tiny(variant: str, **overrides) -> ModelConfig:
    cfg = ModelConfig(
        variant=variant, vocab_size=VOCAB, dim=32, n_layers=2, n_heads=4, persistent_tokens=3,
        segment_len=8, window=8, memory=MemoryConfig(chunk_size=4),
    )
    return replace(cfg, **overrides)


def tiny_model(variant: str, dtype=torch.float64, seed: int = 0, **overrides):
    torch.manual_seed(seed)
    return build_model(tiny(variant, **overrides)).to(dtype)


# Every variant, plus models where only some layers carry a memory (the others are plain attention).
CASES = [(v, {}) for v in VARIANTS] + [
    ("mac", {"memory_layers": [1]}),
    ("lmm", {"memory_layers": [0]}),
    ("mag", {"memory_layers": [1], "persistent_tokens": 0}),
]
CASE_IDS = [v + ("-" + "-".join(f"{k}{val}" for k, val in o.items()) if o else "") for v, o in CASES]


@pytest.mark.parametrize("variant", VARIANTS)
def test_causal(variant):
    """Changing token t + 1 leaves the logits of tokens 0 .. t unchanged (and changes later ones)."""
    model = tiny_model(variant)
    tokens = torch.randint(0, VOCAB, (2, 29))
    t = 13
    changed = tokens.clone()
    changed[:, t + 1] = (changed[:, t + 1] + 1) % VOCAB
    with torch.no_grad():
        a, _ = model(tokens)
        b, _ = model(changed)
    torch.testing.assert_close(a[:, : t + 1], b[:, : t + 1], rtol=0, atol=1e-12)
    assert (a[:, t + 1 :] - b[:, t + 1 :]).abs().amax() > 1e-6


@pytest.mark.parametrize("variant", VARIANTS)
def test_overfits_one_batch(variant):
    model = tiny_model(variant, dtype=torch.float32)
    tokens = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(1))
    opt = torch.optim.Adam(model.parameters(), lr=2e-2)
    losses = []
    for _ in range(20):
        loss = model.loss(tokens)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


@pytest.mark.parametrize("variant,overrides", CASES, ids=CASE_IDS)
def test_pieces_and_single_tokens_equal_one_pass(variant, overrides):
    """Over 5 segments / windows: uneven pieces, and one token at a time, equal the whole-sequence pass."""
    model = tiny_model(variant, **overrides)
    tokens = torch.randint(0, VOCAB, (2, 41))
    with torch.no_grad():
        whole, end_state = model(tokens)
        for lengths in ([3, 1, 9, 8, 2, 17, 1], [1] * tokens.shape[1]):
            state, pieces, start = None, [], 0
            for n in lengths:
                logits, state = model(tokens[:, start : start + n], state)
                pieces.append(logits)
                start += n
            assert state.position == tokens.shape[1] == end_state.position
            torch.testing.assert_close(torch.cat(pieces, 1), whole, rtol=0, atol=1e-9)


@pytest.mark.parametrize("variant", ["mac", "mag"])
def test_activation_checkpointing_gives_identical_gradients(variant):
    """Per-block recomputation (model.activation_checkpointing), with and without the memory's chunk-state
    recomputation: the loss and every parameter's gradient equal those of the plain model exactly."""
    tokens = torch.randint(0, VOCAB, (2, 33), generator=torch.Generator().manual_seed(3))

    def gradients(**overrides):
        model = tiny_model(variant, **overrides)
        loss = model.loss(tokens)
        loss.backward()
        return loss.detach(), {n: p.grad for n, p in model.named_parameters()}

    loss, grads = gradients()
    for overrides in ({"activation_checkpointing": True},
                      {"activation_checkpointing": True, "memory": MemoryConfig(chunk_size=4, checkpoint_every=2)}):
        other_loss, other = gradients(**overrides)
        assert torch.equal(loss, other_loss)
        for name, g in grads.items():
            assert torch.equal(g, other[name]), (overrides, name, (g - other[name]).abs().max())


def test_detached_state_continues_the_sequence():
    model = tiny_model("mac")
    tokens = torch.randint(0, VOCAB, (1, 20))
    with torch.no_grad():
        whole, _ = model(tokens)
    _, state = model(tokens[:, :11])
    rest, _ = model(tokens[:, 11:], state.detach())
    assert not rest.requires_grad or rest.grad_fn is not None
    torch.testing.assert_close(rest.detach(), whole[:, 11:], rtol=0, atol=1e-9)


def test_retrieval_queries_are_the_memory_queries():
    """MAC's retrieval stream uses the memory's own W_Q and q-convolution, as ``project`` does (in pieces too)."""
    memory = tiny_model("mac").blocks[0].mixers[0].memory
    x = torch.randn(2, 10, 32, dtype=torch.float64)
    q, *_ = memory.project(x, memory.init_state(2).conv)
    first, cache = memory.query(x[:, :3], None)
    rest, _ = memory.query(x[:, 3:], cache)
    torch.testing.assert_close(torch.cat([first, rest], 2), q, rtol=0, atol=1e-14)


# ----------------------------------------------------------------------------------------------------
# Sizes and FLOPs


@pytest.mark.parametrize("size", list(PAPER_SIZES))
def test_paper_sizes_within_5_percent(size):
    nominal = float(size.rstrip("M")) * 1e6
    for variant in VARIANTS:
        cfg = paper_config(size, variant)
        with torch.device("meta"):
            model = build_model(cfg)
        count = sum(p.numel() for p in model.parameters())
        assert count == model_stats(cfg, 4096)[0]
        assert abs(count - nominal) <= 0.05 * nominal, (size, variant, count)


@pytest.mark.parametrize("variant,overrides", CASES + [("mac", {"tie_embeddings": True}), ("lmm", {"memory": MemoryConfig(chunk_size=4, depth=1)})])
def test_stats_match_the_module(variant, overrides):
    """Parameter count exact; forward FLOPs = torch's count of the matrix products + attention scores."""
    cfg = tiny(variant, **overrides)
    model = build_model(cfg)
    params, flops = model_stats(cfg, 40)
    assert params == sum(p.numel() for p in model.parameters())
    tokens = torch.randint(0, VOCAB, (1, 40))
    with FlopCounterMode(display=False) as counter:
        model(tokens)
    # SDPA on CPU is not counted by FlopCounterMode: add 4 D per visible (query, key) pair by brute force.
    pairs = 0
    for kind in cfg.layer_kinds():
        for t in range(40):
            if kind == "full":
                seen = t + 1
            elif kind == "mac":
                seen = 2 * (t % cfg.segment_len + 1)
            elif kind == "lmm":
                seen = -cfg.persistent_tokens
            else:
                seen = min(t + 1, cfg.window)
            pairs += cfg.persistent_tokens + seen
    measured = (counter.get_total_flops() + 4 * cfg.dim * pairs) / 40
    assert abs(flops - measured) <= 0.01 * measured, (flops, measured)


# ----------------------------------------------------------------------------------------------------
# Configuration


@pytest.mark.parametrize(
    "overrides,words",
    [
        ({"variant": "rnn"}, ["model.variant", "lmm, mac, mag, mal, transformer, swa"]),
        ({"variant": "mag", "window": 10}, ["model.window=10", "chunk_size=4"]),
        ({"variant": "mal", "window": 6}, ["model.window=6", "chunk_size=4"]),
        ({"variant": "mac", "segment_len": 10}, ["model.segment_len=10", "chunk_size=4"]),
        ({"variant": "mac", "persistent_tokens": 9}, ["model.persistent_tokens=9", "segment_len=8"]),
        ({"n_heads": 3}, ["model.n_heads=3", "dim=32"]),
        ({"memory_layers": [0, 2]}, ["model.memory_layers", "[0, 1]"]),
        ({"memory_layers": "some"}, ["model.memory_layers", "'all'"]),
        ({"persistent_tokens": -1}, ["model.persistent_tokens"]),
    ],
)
def test_bad_config_raises_one_clear_error(overrides, words):
    with pytest.raises(ValueError) as error:
        replace(tiny("mac"), **overrides).validate()
    message = str(error.value)
    assert "\n" not in message
    for word in words:
        assert word in message, message


def test_windows_of_baselines_need_no_chunk_alignment():
    tiny("swa", window=10).validate()
    tiny("transformer", segment_len=10, window=10).validate()


def test_config_merges_with_omegaconf():
    """The lead composes ModelConfig into the recipe schema: dotlist overrides must type-check."""
    schema = OmegaConf.structured(ModelConfig)
    merged = OmegaConf.merge(schema, OmegaConf.from_dotlist(["memory_layers=[0,2]", "memory.chunk_size=8", "variant=mag"]))
    cfg = OmegaConf.to_object(merged)
    assert cfg.memory_layers == [0, 2] and cfg.memory.chunk_size == 8 and isinstance(cfg.memory, MemoryConfig)


def test_meta_build_then_reset_parameters():
    """Build on meta, materialise, initialise: every parameter gets a finite value."""
    with torch.device("meta"):
        model = build_model(tiny("mag"))
    model.to_empty(device="cpu")
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(float("nan"))
    model.reset_parameters()
    assert all(torch.isfinite(p).all() for p in model.parameters())


# ----------------------------------------------------------------------------------------------------
# Generation


@pytest.mark.parametrize("variant", ["mac", "mag", "transformer"])
def test_greedy_generation_is_argmax_of_full_passes(variant):
    model = tiny_model(variant)
    prompt = torch.randint(0, VOCAB, (2, 6))
    out = generate(model, prompt, max_new_tokens=12, temperature=0)
    assert out.shape == (2, 18) and torch.equal(out[:, :6], prompt)
    with torch.no_grad():
        for t in range(6, 18):
            logits, _ = model(out[:, :t])
            assert torch.equal(out[:, t], logits[:, -1].argmax(-1))


def test_sampling_is_reproducible_with_a_seed():
    model = tiny_model("mal", dtype=torch.float32)
    prompt = torch.randint(0, VOCAB, (7,))
    runs = [
        generate(model, prompt, 10, temperature=0.8, top_k=20, top_p=0.9, generator=torch.Generator().manual_seed(s))
        for s in (3, 3, 4)
    ]
    assert runs[0].shape == (17,)
    assert torch.equal(runs[0], runs[1]) and not torch.equal(runs[0], runs[2])
    top1 = generate(model, prompt, 5, top_k=1, generator=torch.Generator().manual_seed(0))
    assert torch.equal(top1, generate(model, prompt, 5, temperature=0))


@pytest.mark.parametrize("kwargs", [{"temperature": -1}, {"top_k": 0}, {"top_p": 0.0}, {"max_new_tokens": -1}])
def test_bad_generation_arguments(kwargs):
    model = tiny_model("swa")
    args = {"max_new_tokens": 2, **kwargs}
    with pytest.raises(ValueError):
        generate(model, torch.zeros(3, dtype=torch.long), **args)


def test_bad_token_shapes():
    model = tiny_model("mac")
    with pytest.raises(ValueError, match="tokens >= 2"):
        model.loss(torch.zeros(2, 1, dtype=torch.long))
    with pytest.raises(ValueError, match="expected \\(batch, tokens\\)"):
        model(torch.zeros(5, dtype=torch.long))
