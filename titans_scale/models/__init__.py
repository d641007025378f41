"""Titans language models (LMM, MAC, MAG, MAL) and the Transformer++ / SWA baselines on one backbone."""

from .attention import Attention, KVCache, causal_attention, segment_attention, window_attention
from .config import LAYER_KINDS, MEMORY_VARIANTS, PAPER_SIZES, VARIANTS, ModelConfig, paper_config
from .generation import generate, sample_next
from .model import ModelState, TitansLM, build_model, token_cross_entropy
from .stats import model_stats, parameter_count
from .variants import Block, ContextState, GateState, LongTermMemory, MemoryAsContext, MemoryAsGate

__all__ = [
    "Attention",
    "Block",
    "ContextState",
    "GateState",
    "KVCache",
    "LAYER_KINDS",
    "LongTermMemory",
    "MEMORY_VARIANTS",
    "MemoryAsContext",
    "MemoryAsGate",
    "ModelConfig",
    "ModelState",
    "PAPER_SIZES",
    "TitansLM",
    "VARIANTS",
    "build_model",
    "causal_attention",
    "generate",
    "model_stats",
    "paper_config",
    "parameter_count",
    "sample_next",
    "segment_attention",
    "token_cross_entropy",
    "window_attention",
]
