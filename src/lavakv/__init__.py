"""lavakv: KV-cache compression for HuggingFace transformers (LAVa and its baselines)."""

from .attention import prepare_model, register_attention
from .cache import CompressedCache
from .generate import GenerationOutput, GenerationStats, generate
from .methods import PRESETS, Method, register_head_allocation, register_layer_allocation, register_score
from .models import load_model

METHODS = tuple(PRESETS)

__all__ = [
    "METHODS",
    "CompressedCache",
    "GenerationOutput",
    "GenerationStats",
    "Method",
    "generate",
    "load_model",
    "prepare_model",
    "register_attention",
    "register_head_allocation",
    "register_layer_allocation",
    "register_score",
]
__version__ = "0.1.0"
