"""The neural long-term memory: its maths (``maths``), and the layer built on it (``layer``)."""

from .config import MemoryConfig
from .layer import NeuralMemory, NeuralMemoryState, ShortConv, validate_memory
from .maths import MemoryState, chunk_coefficients, chunked_memory, initial_state, memory_read, memory_shapes, reference_memory

__all__ = [
    "MemoryConfig",
    "MemoryState",
    "NeuralMemory",
    "NeuralMemoryState",
    "ShortConv",
    "chunk_coefficients",
    "chunked_memory",
    "initial_state",
    "memory_read",
    "memory_shapes",
    "reference_memory",
    "validate_memory",
]
