"""Tiny random-weight models built from configs, and the embedded SmolLM2 for integration tests."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    GemmaConfig,
    GemmaForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

import lavakv
from lavakv import backends
from lavakv.backends import BACKENDS

COMMON = dict(
    vocab_size=96,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=2048,
    pad_token_id=0,
    eos_token_id=None,
    bos_token_id=None,
)

TINY_MODELS = {
    "llama": (LlamaConfig, LlamaForCausalLM, {}),
    "llama-mha": (LlamaConfig, LlamaForCausalLM, {"num_key_value_heads": 4}),
    "mistral-sliding": (MistralConfig, MistralForCausalLM, {"sliding_window": 96}),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM, {}),
    "qwen3": (Qwen3Config, Qwen3ForCausalLM, {"head_dim": 16}),
    "gemma": (GemmaConfig, GemmaForCausalLM, {"head_dim": 16}),
    "gemma3": (
        Gemma3TextConfig,
        Gemma3ForCausalLM,
        {"head_dim": 16, "sliding_window": 80, "layer_types": ["sliding_attention", "full_attention"] * 2},
    ),
}


def tiny_model(kind: str = "llama", seed: int = 0, **overrides):
    """A random-weight model of ``kind``, switched to lavakv's attention."""
    config_class, model_class, extra = TINY_MODELS[kind]
    torch.manual_seed(seed)
    config = config_class(**{**COMMON, **extra, **overrides})
    model = model_class(config).eval()
    return lavakv.prepare_model(model)


class TinyTokenizer:
    """Token ids in, space-separated ids out: enough of a tokenizer for random models."""

    pad_token_id = 0
    eos_token_id = None
    chat_template = None

    def decode(self, ids, **kwargs):
        return " ".join(str(i) for i in ids)

    def __call__(self, text, add_special_tokens=True):
        """Numbers are their own ids; any other word gets a fixed id from its letters."""
        return {"input_ids": [int(t) % 96 if t.isdigit() else sum(map(ord, t)) % 95 + 1 for t in text.split()]}


def random_prompt(length: int, seed: int = 1) -> list[int]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(1, 96, (length,), generator=generator).tolist()


def plain_generate(model, ids: list[int], max_new_tokens: int) -> list[int]:
    """Greedy tokens from transformers' own generate with its default cache."""
    attn = model.config._attn_implementation
    model.set_attn_implementation("sdpa")
    try:
        out = model.generate(torch.tensor([ids]), max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=0)
    finally:
        model.set_attn_implementation(attn)
    return out[0, len(ids) :].tolist()


@pytest.fixture
def tokenizer():
    return TinyTokenizer()


def pytest_collection_modifyitems(config, items):
    """Every test that uses the embedded model carries the ``smollm2`` marker, so ``-m "not smollm2"`` skips it."""
    for item in items:
        if "smollm2" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.smollm2)


@pytest.fixture(scope="session")
def smollm2():
    try:
        return lavakv.load_model()
    except FileNotFoundError as error:
        pytest.skip(f"embedded model unavailable: {error}")


@pytest.fixture(params=list(BACKENDS))
def path(request, monkeypatch):
    """Every registered decode attention backend; FlexAttention runs uncompiled here (exact, no compiling in CI).

    Width buckets cost nothing to open here, so that the tiny rows of tests split into several.
    """
    monkeypatch.setattr(backends, "COMPILE_FLEX", False)
    monkeypatch.setattr(backends, "BUCKET_CALL_ENTRIES", 1)
    return request.param
