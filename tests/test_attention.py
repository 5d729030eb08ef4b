"""The transformers glue: the cache protocol, the original attention kept, masks read, current calls."""

from __future__ import annotations

import pytest
import torch
from conftest import TINY_MODELS, random_prompt, tiny_model
from transformers.cache_utils import Cache, DynamicLayer

import lavakv
from lavakv.attention import (
    ATTENTION_NAME,
    CompressingCache,
    attention_name,
    hand_off,
    model_forward,
    original_attention,
    prepare_model,
    prompt_lengths,
)
from lavakv.recording import PrefillRecord, _RecordingCache


def _unprepared(kind: str, implementation: str):
    model = tiny_model(kind)
    model.set_attn_implementation(implementation)
    return model


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
@pytest.mark.parametrize("kind", list(TINY_MODELS))
def test_prepared_model_computes_exactly_what_its_own_attention_computes(kind, implementation):
    model = _unprepared(kind, implementation)
    ids = torch.tensor([random_prompt(70), random_prompt(70, seed=2)])
    mask = torch.ones_like(ids)
    mask[1, :9] = 0
    with torch.no_grad():
        before = model(ids, attention_mask=mask).logits
        prepare_model(model)
        after = model(ids, attention_mask=mask).logits
    assert model.config._attn_implementation == attention_name(implementation)
    assert original_attention(model.config._attn_implementation) == implementation
    torch.testing.assert_close(after, before, rtol=0, atol=0)


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
def test_the_prefill_runs_the_original_attention(implementation, tokenizer):
    model = _unprepared("llama", implementation)
    ids = random_prompt(90)
    plain = model.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False, pad_token_id=0)[0, 90:].tolist()
    out = lavakv.generate(prepare_model(model), tokenizer, ids, method="full", max_new_tokens=8)
    assert out.token_ids == plain
    cache = lavakv.CompressedCache(model, method="lava", budget=40)
    with torch.no_grad():
        logits = model_forward(model, cache, input_ids=torch.tensor([ids]), logits_to_keep=1).logits
        model.set_attn_implementation(implementation)
        reference = model(torch.tensor([ids]), logits_to_keep=1).logits
    torch.testing.assert_close(logits, reference, rtol=0, atol=0)


def test_prepare_is_idempotent_and_the_default_name_is_lavakv():
    model = tiny_model("llama")
    assert model.config._attn_implementation == ATTENTION_NAME == attention_name("sdpa")
    prepare_model(model)
    assert model.config._attn_implementation == ATTENTION_NAME
    assert original_attention("sdpa") is None and original_attention("lavakv_eager") == "eager"


def test_an_attention_lavakv_cannot_wrap_is_refused_by_name():
    model = _unprepared("llama", "flex_attention")
    with pytest.raises(NotImplementedError, match="cannot wrap the attention implementation 'flex_attention'.*eager"):
        prepare_model(model)
    model.config._attn_implementation_internal = "flash_attention_2"
    with pytest.raises(NotImplementedError, match="'flash_attention_2' .transformers finds flash kernels by"):
        prepare_model(model)


def test_a_left_over_hand_off_is_never_taken_by_another_call():
    from transformers import DynamicCache

    model = tiny_model("llama")
    ids = torch.tensor([random_prompt(40)])
    stale = lavakv.CompressedCache(model, method="full")
    hand_off(stale, 0, torch.zeros(1, 2, 40, 16), torch.zeros(1, 2, 40, 16))
    with torch.no_grad():
        plain = model_forward(model, DynamicCache(), input_ids=ids).logits
        model.set_attn_implementation("sdpa")
        reference = model(ids).logits
    torch.testing.assert_close(plain, reference, rtol=0, atol=0)


@pytest.mark.parametrize(
    ("mask", "expected"),
    [
        (None, [5, 5]),
        (torch.tril(torch.ones(5, 5, dtype=torch.bool))[None, None].repeat(2, 1, 1, 1), [5, 5]),
    ],
)
def test_prompt_lengths_are_read_from_every_mask_format(mask, expected):
    assert prompt_lengths(mask, 2, 5) == expected


def test_prompt_lengths_from_an_additive_eager_mask():
    mask = torch.zeros(1, 1, 4, 4)
    mask[..., :2] = torch.finfo(torch.float32).min
    mask[0, 0, 2:, :2] = torch.finfo(torch.float32).min
    assert prompt_lengths(mask, 1, 4) == [2]


class _ProbeLayer(DynamicLayer):
    pass


class ProbeCache(Cache):
    """A minimal cache speaking the protocol: it keeps everything and logs what attention asks of it."""

    def __init__(self, num_layers: int):
        super().__init__(layers=[_ProbeLayer() for _ in range(num_layers)])
        self.calls: list[tuple[str, int]] = []
        self.prefilled: set[int] = set()

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        return hand_off(self, layer_idx, *super().update(key_states, value_states, layer_idx, *args, **kwargs))

    def is_prefilling(self, layer_idx):
        self.calls.append(("is_prefilling", layer_idx))
        return layer_idx not in self.prefilled

    def compress_layer(self, layer_idx, query, key, value, attention_mask, scaling, weights):
        self.calls.append(("compress_layer", layer_idx))
        self.prefilled.add(layer_idx)
        assert query.shape[2] == key.shape[2] == value.shape[2]
        output, rotary = weights
        assert output.shape[1] == query.shape[1] * query.shape[3]
        cos, sin = rotary(torch.arange(3))
        assert cos.shape == sin.shape == (3, query.shape[3])

    def attend(self, layer_idx, query, scaling, sliding_window):
        self.calls.append(("attend", layer_idx))
        layer = self.layers[layer_idx]
        keys = layer.keys.repeat_interleave(query.shape[1] // layer.keys.shape[1], dim=1)
        values = layer.values.repeat_interleave(query.shape[1] // layer.values.shape[1], dim=1)
        output = torch.nn.functional.scaled_dot_product_attention(query, keys, values, scale=scaling)
        return output.transpose(1, 2)


def test_the_protocol_is_three_calls_per_layer_in_order():
    model = tiny_model("llama")
    cache = ProbeCache(model.config.num_hidden_layers)
    assert isinstance(cache, CompressingCache)
    ids = torch.tensor([random_prompt(20)])
    with torch.no_grad():
        prefill = model_forward(model, cache, input_ids=ids).logits
        step = model_forward(model, cache, input_ids=torch.tensor([[5]])).logits
    layers = range(model.config.num_hidden_layers)
    expected = [(name, i) for i in layers for name in ("is_prefilling", "compress_layer")]
    expected += [(name, i) for i in layers for name in ("is_prefilling", "attend")]
    assert cache.calls == expected
    model.set_attn_implementation("sdpa")
    with torch.no_grad():
        reference = model(torch.cat([ids, torch.tensor([[5]])], dim=1)).logits
    torch.testing.assert_close(prefill, reference[:, :20], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(step[:, -1], reference[:, -1], rtol=1e-5, atol=1e-5)


def test_lavakv_caches_implement_the_protocol():
    model = tiny_model("llama")
    assert isinstance(lavakv.CompressedCache(model, method="snapkv", budget=40), CompressingCache)
    assert isinstance(_RecordingCache(4), CompressingCache)
    record = PrefillRecord(model, torch.tensor([random_prompt(60)]))
    assert len(record.layers) == 4


def test_a_cache_the_attention_never_picks_up_gets_a_clear_error():
    model = tiny_model("llama")
    model.set_attn_implementation("sdpa")
    cache = ProbeCache(model.config.num_hidden_layers)
    with pytest.raises(RuntimeError, match="prepare_model"):
        model_forward(model, cache, input_ids=torch.tensor([random_prompt(20)]))
