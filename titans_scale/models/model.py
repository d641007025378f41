"""The language model: token embedding, a stack of blocks (one per layer kind), RMSNorm, output head.

Interface used by the training engine, evaluation and generation:

- ``model(tokens, state=None) -> (logits, state)``: tokens (B, N) int64, logits (B, N, V). ``state`` is a
  ``ModelState`` (None: start of the sequence). Feeding a sequence in pieces, each call given the state the
  previous one returned, equals one call on the whole sequence (memories keep learning at inference).
- ``model.loss(tokens) -> scalar``: mean next-token cross-entropy inside each sample (predict
  ``tokens[:, 1:]`` from ``tokens[:, :-1]``).
- The pieces, for parallel wrappers: ``hidden_states(tokens, state)``, ``head`` (an ``nn.Linear``; tied
  to ``embed`` when configured) and ``token_loss(logits, targets) -> per-token losses``, an attribute
  that tensor parallelism replaces with ``vocab_parallel_token_loss`` (vocabulary shards). Every projection
  is a separate ``nn.Linear`` (``to_q``/``to_k``/``to_v``/``to_out``, ``gate``/``up``/``down``, the memory's
  own) with heads contiguous along the output features, ready for Column/RowParallelLinear.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from titans_scale.memory import NeuralMemory

from .attention import Attention
from .config import ModelConfig
from .layers import RMSNorm, SwiGLU
from .variants import build_block


def token_cross_entropy(logits: Tensor, targets: Tensor) -> Tensor:
    """Per-token cross-entropy, shaped like ``targets``; computed in at least float32."""
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    return F.cross_entropy(logits.flatten(0, -2), targets.flatten(), reduction="none").view_as(targets)


@dataclass
class ModelState:
    """Everything carried between pieces of a sequence: the tokens seen so far, and per layer per mixer
    its ``KVCache``, ``NeuralMemoryState``, ``GateState`` or ``ContextState``."""

    position: int
    layers: list[list]

    def detach(self) -> "ModelState":
        """For truncated backpropagation through time: keep the values, cut the graph."""
        return ModelState(self.position, [[s.detach() for s in layer] for layer in self.layers])


class TitansLM(nn.Module):
    """A Titans (or baseline) language model built from a validated ``ModelConfig``."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg.validate()
        self.embed = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.blocks = build_blocks(cfg)
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.head.weight = self.embed.weight
        self.token_loss = token_cross_entropy
        if not self.embed.weight.is_meta:  # a meta build is initialised after ``to_empty``
            self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Every parameter to its initialisation (also after ``to_empty`` from the meta device): normal(0,
        init_std) embedding and head, the blocks as ``init_blocks`` says."""
        nn.init.normal_(self.embed.weight, std=self.cfg.init_std)
        if not self.cfg.tie_embeddings:
            nn.init.normal_(self.head.weight, std=self.cfg.init_std)
        init_blocks(self, self.cfg)

    def hidden_states(self, tokens: Tensor, state: ModelState | None = None) -> tuple[Tensor, ModelState]:
        """The final normalised hidden states (B, N, D) and the state after the last token."""
        if tokens.dim() != 2 or tokens.shape[1] == 0:
            raise ValueError(f"tokens have shape {tuple(tokens.shape)}; expected (batch, tokens) with tokens >= 1")
        position = 0 if state is None else state.position
        x, layer_states = run_blocks(self.blocks, self.embed(tokens), None if state is None else state.layers, position,
                                     recompute=self.cfg.activation_checkpointing and self.training)
        return self.norm(x), ModelState(position + tokens.shape[1], layer_states)

    def forward(self, tokens: Tensor, state: ModelState | None = None) -> tuple[Tensor, ModelState]:
        h, state = self.hidden_states(tokens, state)
        return self.head(h), state

    def loss(self, tokens: Tensor, weights: Tensor | None = None) -> Tensor:
        """Mean next-token cross-entropy of each sample's tokens[:, 1:] given tokens[:, :-1]; with ``weights``
        (B, N - 1), the weighted mean (e.g. a synthetic task's answers only)."""
        if tokens.dim() != 2 or tokens.shape[1] < 2:
            raise ValueError(f"tokens have shape {tuple(tokens.shape)}; the loss needs (batch, tokens) with tokens >= 2")
        h, _ = self.hidden_states(tokens[:, :-1])
        losses = self.token_loss(self.head(h), tokens[:, 1:])
        return losses.mean() if weights is None else (losses * weights).sum() / weights.sum().clamp_min(1)


# ----------------------------------------------------------------------------------------------------
# The stack of blocks, shared by every model built on this backbone (language, forecasting, classification)


def build_blocks(cfg: ModelConfig) -> nn.ModuleList:
    """One block per layer, of the kind ``cfg.layer_kinds()`` gives it."""
    return nn.ModuleList(build_block(kind, cfg) for kind in cfg.layer_kinds())


def run_blocks(blocks: nn.ModuleList, x: Tensor, states: list | None, position: int,
               recompute: bool = False) -> tuple[Tensor, list]:
    """``x`` (B, N, D) through the blocks, each with its carried state (None: start of the sequence);
    returns the output and the new states. ``recompute``: keep only each block's input and run it again
    in backward (same inputs, no randomness: the same values)."""
    recompute = recompute and torch.is_grad_enabled()
    new_states = []
    for block, state in zip(blocks, states or [None] * len(blocks)):
        if recompute:
            x, state = checkpoint(block, x, state, position, use_reentrant=False)
        else:
            x, state = block(x, state, position)
        new_states.append(state)
    return x, new_states


@torch.no_grad()
def init_blocks(root: nn.Module, cfg: ModelConfig) -> None:
    """Initialise every block under ``root``: normal(0, init_std) projections, residual outputs scaled by
    1/sqrt(2 n_layers) (GPT-2), persistent tokens at unit scale like the normalised inputs they sit beside,
    norms at 1; the memory keeps its own initialisation of W_0, the gates and the convolution (design doc,
    section 1)."""
    std = cfg.init_std
    out_std = std / math.sqrt(2 * cfg.n_layers)
    for module in root.modules():
        if isinstance(module, Attention):
            inputs, output = (module.to_q, module.to_k, module.to_v), module.to_out
            if module.persistent is not None:
                nn.init.normal_(module.persistent, std=1.0)
        elif isinstance(module, SwiGLU):
            inputs, output = (module.gate, module.up), module.down
        elif isinstance(module, NeuralMemory):
            inputs, output = (module.to_q, module.to_k, module.to_v, module.to_gate), module.to_out
            module.reset_parameters()
        else:
            if isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)
            continue
        for linear in inputs:
            nn.init.normal_(linear.weight, std=std)
        nn.init.normal_(output.weight, std=out_std)


def build_model(cfg: ModelConfig) -> TitansLM:
    """The model of a config (validated); build under ``torch.device("meta")`` to size it without memory."""
    return TitansLM(cfg)
