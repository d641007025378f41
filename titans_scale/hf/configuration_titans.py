"""The Hugging Face config of a Titans model: ``config.json`` holds every ``ModelConfig`` field, flat."""

from __future__ import annotations

import dataclasses

from transformers import PretrainedConfig

from titans_scale.memory.config import MemoryConfig
from titans_scale.models.config import ModelConfig

MODEL_FIELDS = tuple(f.name for f in dataclasses.fields(ModelConfig))


def model_config(fields: dict) -> ModelConfig:
    """The validated ``ModelConfig`` of a flat dict of its fields (``memory`` a dict of ``MemoryConfig``)."""
    fields = dict(fields)
    memory = fields.pop("memory", None) or {}
    return ModelConfig(**fields, memory=MemoryConfig(**memory)).validate()


class TitansConfig(PretrainedConfig):
    """``ModelConfig``'s fields plus transformers' own; ``hidden_size`` and friends are aliases of ours."""

    model_type = "titans"
    attribute_map = {"hidden_size": "dim", "num_hidden_layers": "n_layers", "num_attention_heads": "n_heads"}

    def __init__(self, **kwargs):
        cfg = model_config({name: kwargs.pop(name) for name in MODEL_FIELDS if name in kwargs})
        for name, value in dataclasses.asdict(cfg).items():
            setattr(self, name, value)
        kwargs["tie_word_embeddings"] = cfg.tie_embeddings  # transformers ties the head to the embedding on this
        kwargs.setdefault("bos_token_id", 1)
        kwargs.setdefault("eos_token_id", 2)
        super().__init__(**kwargs)

    def model_config(self) -> ModelConfig:
        return model_config({name: getattr(self, name) for name in MODEL_FIELDS})
