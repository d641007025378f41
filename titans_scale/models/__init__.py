"""Titans language models (LMM, MAC, MAG, MAL) and the Transformer++ / SWA baselines on one backbone; the
same blocks as a time-series forecaster (``forecast``) and a sequence classifier (``classify``)."""

from .attention import Attention, KVCache, causal_attention, segment_attention, window_attention
from .classify import SequenceClassifier
from .config import LAYER_KINDS, MEMORY_VARIANTS, PAPER_SIZES, VARIANTS, ModelConfig, paper_config
from .generation import generate, sample_next
from .forecast import DLinear, TitansForecaster, build_forecaster
from .model import ModelState, TitansLM, build_blocks, build_model, init_blocks, run_blocks, token_cross_entropy
from .stats import model_stats, parameter_count
from .variants import Block, ContextState, GateState, LongTermMemory, MemoryAsContext, MemoryAsGate

__all__ = [
    "Attention",
    "Block",
    "DLinear",
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
    "SequenceClassifier",
    "TitansForecaster",
    "TitansLM",
    "VARIANTS",
    "build_blocks",
    "build_forecaster",
    "build_model",
    "causal_attention",
    "generate",
    "init_blocks",
    "model_stats",
    "paper_config",
    "parameter_count",
    "run_blocks",
    "sample_next",
    "segment_attention",
    "token_cross_entropy",
    "window_attention",
]
