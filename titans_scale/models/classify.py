"""Sequence classification on the same backbone (GenomicsBenchmarks-style DNA tasks).

The language model's embedding, blocks and final norm read the tokens (causally, as in pretraining, so
a pretrained ``TitansLM`` loads into them by name); a linear head maps one pooled hidden state to the
class logits:

    last   the hidden state at the sequence's last token: everything the model carried to the end
           (the memory's state, the attention's window) decides the class
    mean   the mean over the sequence's tokens

Sequences of a batch are padded on the right to one length; ``lengths`` says where each one ends (the
model is causal, so padding never reaches a real token).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import ModelConfig
from .layers import RMSNorm
from .model import build_blocks, init_blocks, run_blocks

POOLINGS = ("last", "mean")


class SequenceClassifier(nn.Module):
    """Token embedding, the blocks of ``cfg``, RMSNorm, then ``classifier`` on the pooled hidden state."""

    def __init__(self, cfg: ModelConfig, num_classes: int, pooling: str = "last"):
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"a classifier needs >= 2 classes, got {num_classes}")
        if pooling not in POOLINGS:
            raise ValueError(f"classify.pooling={pooling!r} is unknown; choose one of {', '.join(POOLINGS)}")
        self.cfg = cfg.validate()
        self.num_classes, self.pooling = num_classes, pooling
        self.embed = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.blocks = build_blocks(cfg)
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.classifier = nn.Linear(cfg.dim, num_classes)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        nn.init.normal_(self.embed.weight, std=self.cfg.init_std)
        nn.init.normal_(self.classifier.weight, std=self.cfg.init_std)
        nn.init.zeros_(self.classifier.bias)
        init_blocks(self, self.cfg)

    def forward(self, tokens: Tensor, lengths: Tensor) -> Tensor:
        """tokens (B, N) int64, lengths (B,) in [1, N] -> class logits (B, classes), in at least float32."""
        h, _ = run_blocks(self.blocks, self.embed(tokens), None, 0,
                          recompute=self.cfg.activation_checkpointing and self.training)
        h = self.norm(h)
        h = h.to(torch.promote_types(h.dtype, torch.float32))
        lengths = lengths.to(h.device).long()
        if self.pooling == "last":
            pooled = h[torch.arange(h.shape[0], device=h.device), lengths - 1]
        else:
            inside = (torch.arange(h.shape[1], device=h.device)[None, :] < lengths[:, None]).to(h.dtype)
            pooled = (h * inside[..., None]).sum(1) / lengths[:, None].to(h.dtype)
        return self.classifier(pooled.to(self.classifier.weight.dtype)).to(h.dtype)

    def loss(self, tokens: Tensor, lengths: Tensor, labels: Tensor) -> Tensor:
        """Mean cross-entropy of the class logits against the labels (B,)."""
        return F.cross_entropy(self(tokens, lengths), labels.long())

    def load_backbone(self, state_dict: dict) -> None:
        """The embedding, blocks and norm of a pretrained ``TitansLM`` (its LM head is left out); raises
        ValueError naming what does not fit."""
        wanted = {k: v for k, v in state_dict.items() if not k.startswith("head.")}
        own = {k for k in self.state_dict() if not k.startswith("classifier.")}
        missing, unknown = sorted(own - set(wanted)), sorted(set(wanted) - own)
        if missing or unknown:
            raise ValueError(f"the pretrained weights do not fit this model: missing {missing[:3]}, unknown {unknown[:3]}")
        for name, value in wanted.items():
            if tuple(value.shape) != tuple(self.state_dict()[name].shape):
                raise ValueError(f"the pretrained weight {name} has shape {tuple(value.shape)}, this model "
                                 f"{tuple(self.state_dict()[name].shape)}")
        self.load_state_dict(wanted, strict=False)
