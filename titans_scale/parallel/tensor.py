"""Tensor parallelism (Megatron style) for every Titans layer, applied to a plain model from outside.

Heads are split across the TP ranks: rank t owns heads ``[t H/tp, (t+1) H/tp)`` of every attention and
every memory, i.e. the rows of W_Q, W_K, W_V, the gate projections and W_G (megatron
``ColumnParallelLinear``), its channels of the short convolution, its heads' initial memory W_0 and
LayerNorm, and so the memory state of its heads: the memory recurrence needs no communication. Output
projections are ``RowParallelLinear``; the SwiGLU MLP is split Megatron-style (gate/up by columns, down
by rows); the embedding and the output head are split over the vocabulary (``VocabParallelEmbedding``,
``vocab_parallel_token_loss``). Every new weight is the exact shard of the single-process weight.

A tensor-parallel region starts at each mixer's and each MLP's input (identity forward, all-reduce of the
input gradient) and ends at the row-parallel projections (all-reduce forward). The column layers
themselves do no communication, so each region costs one all-reduce forward and one backward, however
many projections read the input. Replicated parameters that only ever see this rank's heads (the
memory's output RMSNorm scale, the persistent tokens) get their gradient summed over the TP group by a
gradient hook.

Megatron sequence parallelism (``sequence_parallel=True``): between the regions (norms, residuals,
embedding output) activations are sharded along the sequence; a region starts with an all-gather
(reduce-scatter of the gradient) and ends with a reduce-scatter where the region's output is the row
projection itself (attention, LMM, MLP), else an all-reduce then this rank's slice (MAG, MAC, whose
outputs combine their projections non-linearly). The norms outside the regions then see a slice of the
sequence, and their weight gradients are summed over the TP group by a hook, as Megatron's
``finalize_model_grads`` does. Calls whose token count ``tp`` does not divide (decoding) run unsharded.
"""

from __future__ import annotations

import functools
from contextlib import contextmanager

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd import Function

from titans_scale.memory import NeuralMemory
from titans_scale.models import Attention, LongTermMemory, MemoryAsContext, MemoryAsGate
from titans_scale.models.layers import SwiGLU

from . import comm
from .cpu_compat import megatron_config


class Region:
    """What the tensor-parallel layers of one model share: the TP group and the sequence-sharding switch."""

    def __init__(self, groups, sequence_parallel: bool):
        self.group, self.size, self.rank = groups.tp_group, groups.tp, groups.tp_rank
        self.sequence_parallel = sequence_parallel and groups.tp > 1
        self.shard = False  # True while a forward runs with the sequence sharded between regions

    @contextmanager
    def sharding(self, n_tokens: int):
        """Shard this call's sequence when Megatron-SP is on and ``tp`` divides its tokens."""
        shard = self.sequence_parallel and n_tokens % self.size == 0
        if self.sequence_parallel and not shard and torch.is_grad_enabled():
            raise ValueError(
                f"tensor-parallel sequence parallelism shards the {n_tokens} tokens of this call over tp={self.size} "
                f"ranks: make the (per-rank) sequence length a multiple of {self.size}, or turn sequence parallelism off"
            )
        previous, self.shard = self.shard, shard
        try:
            yield shard
        finally:
            self.shard = previous

    def enter(self, x: Tensor) -> Tensor:
        """A region's input: all-gather the sequence (sharded) or mark the replicated input (unsharded)."""
        if self.shard:
            return comm.gather(x, 1, self.group, grad="sum")
        return comm.copy_to(x, self.group)

    def leave(self, out: Tensor, scattered: bool) -> Tensor:
        """A region's output, back to this rank's slice of the sequence when sharded."""
        if not self.shard:
            return out
        return comm.reduce_scatter(out, 1, self.group) if scattered else comm.split(out, 1, self.group)


# ----------------------------------------------------------------------------------------------------
# Shards of the single-process weights


def shard(t: Tensor, dim: int, rank: int, size: int, parts: int = 1) -> Tensor:
    """This rank's shard of ``t`` along ``dim``; with ``parts`` > 1, ``t`` is ``parts`` blocks along ``dim``
    (e.g. the q | k | v channels of the short convolution) and each block is split."""
    blocks = t.chunk(parts, dim)
    return torch.cat([b.chunk(size, dim)[rank] for b in blocks], dim).clone()


def unshard(t: Tensor, dim: int, parts: int, group) -> Tensor:
    """The inverse of ``shard``: the full tensor from every rank's shard (all-gather over ``group``)."""
    size = dist.get_world_size(group)
    pieces = [torch.empty_like(t) for _ in range(size)]
    dist.all_gather(pieces, t.contiguous(), group=group)
    per_rank = [p.chunk(parts, dim) for p in pieces]
    return torch.cat([torch.cat([r[i] for r in per_rank], dim) for i in range(parts)], dim)


def _mark(param: Tensor, dim: int, parts: int = 1) -> None:
    """Record how a parameter is sharded: for ``unshard``, and for DeepSpeed's and megatron's gradient norm
    (a parameter with ``tensor_model_parallel`` counts on every TP rank, others on TP rank 0 only)."""
    from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes

    param.tp_shard = (dim, parts)
    if not hasattr(param, "tensor_model_parallel"):
        set_tensor_model_parallel_attributes(param, True, dim, 1)


def _new_parameter(like: nn.Parameter, value: Tensor, dim: int, parts: int = 1) -> nn.Parameter:
    p = nn.Parameter(value, requires_grad=like.requires_grad)
    _mark(p, dim, parts)
    return p


class _SumOver:
    """Gradient hook: sum a replicated parameter's gradient over the TP group (it saw only this rank's
    heads, or only this rank's slice of the sequence)."""

    def __init__(self, group):
        self.group = group

    def __call__(self, grad: Tensor) -> Tensor:
        grad = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(grad, group=self.group)
        return grad


def _sum_grad_over_tp(param: nn.Parameter, region: Region) -> None:
    if param.requires_grad:
        param.register_hook(_SumOver(region.group))


# ----------------------------------------------------------------------------------------------------
# megatron-core layers, batch-first, returning their output only


def _no_init(weight: Tensor) -> None:  # weights are copied from the single-process model
    pass


def _column_parallel_linear_class():
    from megatron.core.tensor_parallel import ColumnParallelLinear

    class ColumnLinear(ColumnParallelLinear):
        """``ColumnParallelLinear`` holding this rank's rows of a single-process ``nn.Linear``. It does no
        communication itself: its input is a region's input (``Region.enter``)."""

        def __init__(self, linear: nn.Linear, region: Region):
            config = megatron_config(region.size, linear.weight.dtype, linear.weight.device)
            super().__init__(
                linear.in_features, linear.out_features, config=config, init_method=_no_init,
                bias=linear.bias is not None, gather_output=False, disable_grad_reduce=True, tp_group=region.group,
            )
            with torch.no_grad():
                self.weight.copy_(shard(linear.weight, 0, region.rank, region.size))
                if self.bias is not None:
                    self.bias.copy_(shard(linear.bias, 0, region.rank, region.size))
            self.weight.requires_grad_(linear.weight.requires_grad)
            _mark(self.weight, 0)
            if self.bias is not None:
                _mark(self.bias, 0)

        def forward(self, x: Tensor) -> Tensor:
            return super().forward(x)[0]

    return ColumnLinear


def _row_parallel_linear_class():
    from megatron.core.tensor_parallel import RowParallelLinear

    class RowLinear(RowParallelLinear):
        """``RowParallelLinear`` holding this rank's columns of a single-process ``nn.Linear`` (no bias): its
        output is all-reduced, or left partial for the region's reduce-scatter (``scatter_output``)."""

        def __init__(self, linear: nn.Linear, region: Region, scatter_output: bool = False):
            if linear.bias is not None:
                raise NotImplementedError("row-parallel projections with a bias are not used by titans_scale models")
            config = megatron_config(region.size, linear.weight.dtype, linear.weight.device)
            super().__init__(
                linear.in_features, linear.out_features, config=config, init_method=_no_init, bias=False,
                input_is_parallel=True, skip_bias_add=False, tp_group=region.group,
            )
            with torch.no_grad():
                self.weight.copy_(shard(linear.weight, 1, region.rank, region.size))
            self.weight.requires_grad_(linear.weight.requires_grad)
            _mark(self.weight, 1)
            self.region, self.scatter_output = region, scatter_output

        def forward(self, x: Tensor) -> Tensor:
            if self.scatter_output and self.region.shard:
                return F.linear(x, self.weight)  # partial sum: the region's exit reduce-scatters it
            return super().forward(x)[0]

    return RowLinear


def _vocab_parallel_embedding_class():
    from megatron.core.tensor_parallel import VocabParallelEmbedding

    class VocabEmbedding(VocabParallelEmbedding):
        """``VocabParallelEmbedding`` with this rank's rows of the embedding; sharded along the sequence
        right away under Megatron-SP."""

        def __init__(self, embedding: nn.Embedding, region: Region):
            config = megatron_config(region.size, embedding.weight.dtype, embedding.weight.device)
            super().__init__(embedding.num_embeddings, embedding.embedding_dim, init_method=_no_init, config=config,
                             tp_group=region.group)
            with torch.no_grad():
                self.weight.copy_(shard(embedding.weight, 0, region.rank, region.size))
            self.weight.requires_grad_(embedding.weight.requires_grad)
            _mark(self.weight, 0)
            self.region = region

        def forward(self, tokens: Tensor) -> Tensor:
            return self.region.leave(super().forward(tokens), scattered=False)

    return VocabEmbedding


class _VocabParallelCrossEntropy(Function):
    """Per-token cross-entropy of logits split over the vocabulary (this rank holds columns ``[rank V/tp,
    (rank + 1) V/tp)``), in the dtype the single-process loss uses (``token_cross_entropy``: the logits'
    dtype, at least float32). Megatron's ``vocab_parallel_cross_entropy`` always computes in float32,
    which puts float32 rounding into every gradient of a float64 model."""

    @staticmethod
    def forward(ctx, logits: Tensor, targets: Tensor, group, rank: int):
        x = logits.to(torch.promote_types(logits.dtype, torch.float32))
        x = x - comm._all_reduce(x.max(-1).values, group, "tp", dist.ReduceOp.MAX).unsqueeze(-1)
        local = targets - rank * x.shape[-1]
        outside = (local < 0) | (local >= x.shape[-1])
        local = local.masked_fill(outside, 0)
        picked = x.gather(-1, local.unsqueeze(-1)).squeeze(-1).masked_fill(outside, 0.0)
        exp = x.exp()
        both = comm._all_reduce(torch.stack([exp.sum(-1), picked]), group, "tp")  # sum of exp, target logit
        ctx.save_for_backward(exp.div_(both[0].unsqueeze(-1)), local, outside)  # exp becomes the softmax
        ctx.dtype = logits.dtype
        return both[0].log() - both[1]

    @staticmethod
    def backward(ctx, grad: Tensor):
        softmax, local, outside = ctx.saved_tensors
        grad_x = softmax.scatter_add(-1, local.unsqueeze(-1), (outside.to(softmax.dtype) - 1.0).unsqueeze(-1))
        return (grad_x * grad.unsqueeze(-1)).to(ctx.dtype), None, None, None


def vocab_parallel_token_loss(region: Region, logits: Tensor, targets: Tensor) -> Tensor:
    """Per-token cross-entropy of vocabulary-sharded logits, shaped like ``targets``."""
    return _VocabParallelCrossEntropy.apply(logits, targets, region.group, region.rank)


# ----------------------------------------------------------------------------------------------------
# Region boundaries, as wrappers of the modules' forward (parameter names stay those of the plain model)


def wrap_forward(module: nn.Module, wrapper, *args, method: str = "forward") -> None:
    """``module.forward(...)`` becomes ``wrapper(previous_forward, *args, ...)`` on this instance only."""
    setattr(module, method, functools.partial(wrapper, getattr(module, method), *args))


def _mixer_region(inner, region: Region, scattered: bool, x: Tensor, state, position: int):
    out, state = inner(region.enter(x), state, position)
    return region.leave(out, scattered), state


def _mlp_region(inner, region: Region, x: Tensor) -> Tensor:
    return region.leave(inner(region.enter(x)), scattered=True)


def _entered_input(inner, region: Region, x: Tensor, *args):
    """MAC writes its attention output y (replicated) into its memory: the memory's projections are a region."""
    return inner(comm.copy_to(x, region.group), *args)


def _gathered_heads(inner, region: Region, h: Tensor) -> Tensor:
    """MAC's retrieved h_i (this rank's heads) feed W_K, W_V, which read every head: gather the heads,
    normalise them, and enter the key/value projections' region."""
    return comm.copy_to(inner(comm.gather(h, 1, region.group, grad="split")), region.group)


def _hidden_states(inner, region: Region, tokens: Tensor, state=None):
    with region.sharding(tokens.shape[1]) as sharded:
        h, state = inner(tokens, state)
        if sharded:
            h = comm.gather(h, 1, region.group, grad="split")
    return h, state


def _full_vocabulary(inner, region: Region, tokens: Tensor, state=None):
    logits, state = inner(tokens, state)
    return comm.gather(logits, -1, region.group, grad="split"), state


def _head_region(inner, region: Region, h: Tensor) -> Tensor:
    return inner(comm.copy_to(h, region.group))


# ----------------------------------------------------------------------------------------------------
# Per module


def _shard_attention(attention: Attention, region: Region, Column, Row, scatter_output: bool) -> None:
    for name in ("to_q", "to_k", "to_v"):
        setattr(attention, name, Column(getattr(attention, name), region))
    attention.to_out = Row(attention.to_out, region, scatter_output)
    attention.heads //= region.size
    if attention.persistent is not None:
        _sum_grad_over_tp(attention.persistent, region)


def _shard_memory(memory: NeuralMemory, region: Region, Column, Row, scatter_output: bool) -> None:
    rank, size = region.rank, region.size
    for name in ("to_q", "to_k", "to_v", "to_gate", "to_theta", "to_eta", "to_alpha"):
        if getattr(memory, name) is not None:
            setattr(memory, name, Column(getattr(memory, name), region))
    memory.to_out = Row(memory.to_out, region, scatter_output)
    conv = memory.conv  # channels are [q | k | v], heads contiguous in each
    conv.weight = _new_parameter(conv.weight, shard(conv.weight.detach(), 0, rank, size, parts=3), 0, parts=3)
    conv.bias = _new_parameter(conv.bias, shard(conv.bias.detach(), 0, rank, size, parts=3), 0, parts=3)
    for i, w in enumerate(memory.initial_weights):
        memory.initial_weights[i] = _new_parameter(w, shard(w.detach(), 0, rank, size), 0)
    if memory.ln is not None:
        memory.ln_weight = _new_parameter(memory.ln_weight, shard(memory.ln_weight.detach(), 0, rank, size), 0)
        memory.ln_bias = _new_parameter(memory.ln_bias, shard(memory.ln_bias.detach(), 0, rank, size), 0)
    _sum_grad_over_tp(memory.out_norm_weight, region)
    memory.heads //= size


def tensor_parallelize(model: nn.Module, groups, sequence_parallel: bool = False) -> Region:
    """Replace the model's layers by tensor-parallel ones holding this rank's shards (in place)."""
    region = Region(groups, sequence_parallel)
    Column, Row, Embedding = _column_parallel_linear_class(), _row_parallel_linear_class(), _vocab_parallel_embedding_class()
    cfg = model.cfg
    for block in model.blocks:
        for mixer in block.mixers:
            # a mixer whose output is its row projection ends its region with a reduce-scatter under SP
            direct = isinstance(mixer, (Attention, LongTermMemory))
            if isinstance(mixer, Attention):
                _shard_attention(mixer, region, Column, Row, direct)
            elif isinstance(mixer, LongTermMemory):
                _shard_memory(mixer.memory, region, Column, Row, direct)
            elif isinstance(mixer, MemoryAsGate):
                _shard_attention(mixer.attention, region, Column, Row, False)
                _shard_memory(mixer.memory, region, Column, Row, False)
            elif isinstance(mixer, MemoryAsContext):
                _shard_attention(mixer.attention, region, Column, Row, False)
                _shard_memory(mixer.memory, region, Column, Row, False)
                wrap_forward(mixer.memory, _entered_input, region)
                wrap_forward(mixer.retrieved_norm, _gathered_heads, region)
            else:
                raise NotImplementedError(f"no tensor-parallel plan for mixer {type(mixer).__name__}")
            wrap_forward(mixer, _mixer_region, region, direct)
        mlp: SwiGLU = block.mlp
        mlp.gate, mlp.up = Column(mlp.gate, region), Column(mlp.up, region)
        mlp.down = Row(mlp.down, region, True)
        wrap_forward(mlp, _mlp_region, region)
        if region.sequence_parallel:
            for norm in [*block.mixer_norms, block.mlp_norm]:
                _sum_grad_over_tp(norm.weight, region)
    if region.sequence_parallel:
        _sum_grad_over_tp(model.norm.weight, region)
    embed = Embedding(model.embed, region)
    head = Column(model.head, region)
    if cfg.tie_embeddings:
        head.weight = embed.weight
    model.embed, model.head = embed, head
    wrap_forward(model.head, _head_region, region)
    model.token_loss = functools.partial(vocab_parallel_token_loss, region)
    wrap_forward(model, _hidden_states, region, method="hidden_states")
    wrap_forward(model, _full_vocabulary, region)
    return region


def full_tensor(t: Tensor, param: nn.Parameter, groups) -> Tensor:
    """The single-process value of a parameter (or of its gradient ``t``) from this rank's shard."""
    spec = getattr(param, "tp_shard", None)
    if spec is None or groups.tp == 1:
        return t
    return unshard(t, *spec, groups.tp_group)
