"""lavakv: KV-cache compression for HuggingFace transformers (LAVa and its baselines)."""

from .attention import CompressingCache, cache_argument, prepare_model, register_attention
from .cache import CacheStats, CompressedCache, ContinuationError, SequenceStats
from .generate import GenerationOutput, GenerationStats, compress, generate
from .methods import (
    PAPER_METHODS,
    PRESETS,
    Budget,
    HeadAllocation,
    LayerAllocation,
    Method,
    Score,
    parse_spec,
    register_head_allocation,
    register_layer_allocation,
    register_preset,
    register_score,
)
from .models import load_model

METHODS = PAPER_METHODS
"""The LAVa paper's methods; :data:`PRESETS` holds every preset, these and the later ones."""

__all__ = [
    "METHODS",
    "PRESETS",
    "Budget",
    "CacheStats",
    "CompressedCache",
    "CompressingCache",
    "ContinuationError",
    "GenerationOutput",
    "GenerationStats",
    "HeadAllocation",
    "LayerAllocation",
    "Method",
    "Score",
    "SequenceStats",
    "cache_argument",
    "compress",
    "generate",
    "load_model",
    "parse_spec",
    "prepare_model",
    "register_attention",
    "register_head_allocation",
    "register_layer_allocation",
    "register_preset",
    "register_score",
]
__version__ = "0.1.0"
