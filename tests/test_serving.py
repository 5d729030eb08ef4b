"""The serving package's request options, block accounting and vLLM version check (no vLLM needed)."""

from __future__ import annotations

import math
import random

import pytest
import torch
from conftest import random_prompt, tiny_model
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

import lavakv
from lavakv.serving import (
    SUPPORTED_VLLM_VERSION,
    blocks_for_compressed,
    check_vllm_version,
    compression_of_request,
    server_compression,
    sub_blocks_needed,
)
from lavakv.serving.prompt import PromptCompression


def test_a_request_overrides_the_servers_method_and_budget():
    default = server_compression({"lavakv": {"method": "lava", "budget": 128}})
    assert (default.spec, default.budget, default.compresses) == ("lava", 128, True)
    assert compression_of_request({}, default) is default
    assert compression_of_request({"other_plugin": 1}, default) is default
    own = compression_of_request({"lavakv_method": "snapkv", "lavakv_budget": 256}, default)
    assert (own.spec, own.budget) == ("snapkv", 256)
    budget_only = compression_of_request({"lavakv_budget": 64}, default)
    assert (budget_only.spec, budget_only.budget) == ("lava", 64)
    full = compression_of_request({"lavakv_method": "full"}, default)
    assert full.compresses is False
    assert server_compression({}) is None
    assert compression_of_request({}, None) is None


@pytest.mark.parametrize(
    ("extra_args", "message"),
    [
        ({"lavakv_method": "lavaa", "lavakv_budget": 64}, "lavaa"),
        ({"lavakv_method": "lava", "lavakv_budget": 0}, "got 0"),
        ({"lavakv_method": "lava", "lavakv_budget": -3}, "got -3"),
        ({"lavakv_method": "lava", "lavakv_budget": "64"}, "'64'"),
        ({"lavakv_method": "snapkv:alpha=0.5", "lavakv_budget": 64}, "alpha"),
        ({"lavakv_method": "lava"}, "needs a budget"),
        ({"lavakv_budget": 64}, "without lavakv_method"),
        ({"lavakv_methd": "lava"}, "lavakv_methd"),
        ({"lavakv_method": "full", "lavakv_budget": 64}, "takes no budget"),
    ],
)
def test_a_bad_request_option_is_a_value_error_naming_it(extra_args, message):
    with pytest.raises(ValueError, match=message) as raised:
        compression_of_request(extra_args, None)
    assert "\n" not in str(raised.value)


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"lavakv": "lava"}, "must be a mapping"),
        ({"lavakv": {"method": "lava", "budget": 64, "window": 8}}, "'window'"),
        ({"lavakv": {"budget": 64}}, "needs a 'method'"),
        ({"lavakv": {"method": "nope", "budget": 64}}, "nope"),
    ],
)
def test_a_bad_server_default_is_refused_before_serving(config, message):
    with pytest.raises(ValueError, match=message):
        server_compression(config)


def test_the_vllm_version_check_refuses_another_release_in_one_line():
    assert check_vllm_version(SUPPORTED_VLLM_VERSION) == SUPPORTED_VLLM_VERSION
    assert check_vllm_version(SUPPORTED_VLLM_VERSION + "+cpu") == SUPPORTED_VLLM_VERSION + "+cpu"
    with pytest.raises(RuntimeError, match=r"built for vLLM 0\.32\.0, but vLLM 0\.31\.2 is installed") as raised:
        check_vllm_version("0.31.2")
    assert "\n" not in str(raised.value)


def test_the_compressed_block_bound_holds_for_any_split_of_the_same_total():
    """Whatever a method's head and layer budgets, the rows fit in the blocks the scheduler reserves."""
    rng = random.Random(0)
    layers, kv_heads, block_size = 30, 3, 32
    for budget in (64, 100, 128, 512):
        total = budget * layers * kv_heads
        for _ in range(50):
            cuts = sorted(rng.randrange(total + 1) for _ in range(layers * kv_heads - 1))
            per_head = [b - a for a, b in zip([0, *cuts], [*cuts, total])]
            for decoded in (0, 1, 31, 200):
                needed = sub_blocks_needed([rows + decoded for rows in per_head], block_size)
                reserved = blocks_for_compressed(budget, decoded, block_size)
                assert needed <= reserved * layers * kv_heads
                assert reserved <= math.ceil((budget + decoded) / block_size) + 1
    assert blocks_for_compressed(128, 0, 32) == 5
    with pytest.raises(ValueError, match="budget >= 1"):
        blocks_for_compressed(0, 0, 32)


@pytest.mark.parametrize("method", ["snapkv", "ada-snapkv", "pyramidkv", "cake", "lava", "streamingllm"])
def test_a_prompt_compressed_from_the_engines_tensors_keeps_what_the_transformers_path_keeps(method):
    """Fed each layer's queries, keys and values as an engine's attention receives them, the serving
    path keeps exactly the (layer, head) positions of CompressedCache on the same prompt."""

    model = tiny_model("llama")
    ids = torch.tensor([random_prompt(150, seed=4)])
    budget = 40
    cache = lavakv.CompressedCache(model, method=method, budget=budget)
    with torch.inference_mode():
        model(ids, **lavakv.cache_argument(model, cache), use_cache=True)
    expected = cache.stats().sequences[0].kept_positions

    captured = []

    def capture(module, query, key, value, attention_mask, scaling=None, **kwargs):
        captured.append((query[0].transpose(0, 1), key[0].transpose(0, 1), value[0].transpose(0, 1), scaling))
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, **kwargs)

    AttentionInterface.register("serving_capture", capture)
    plain = tiny_model("llama")
    plain.set_attn_implementation("serving_capture")
    with torch.inference_mode():
        plain(ids)
    num_layers = len(captured)
    compression = compression_of_request({"lavakv_method": method, "lavakv_budget": budget}, None)
    prompt = PromptCompression(compression, ids.shape[1], num_layers)
    for layer, (query, key, value, scaling) in enumerate(captured):
        prompt.add_layer(layer, query, key, value, scaling)
    got = []
    for layer in range(num_layers):
        assert prompt.is_final(layer)
        positions, keys, values = prompt.kept(layer)
        assert keys.shape[0] == sum(len(p) for p in positions) == values.shape[0]
        got.append([p.tolist() for p in positions])
    assert sum(len(p) for layer in got for p in layer) == budget * num_layers * len(got[0])
    assert got == [[list(p) for p in layer] for layer in expected]


def _sub_blocks_short(rows_per_pair: list[int], prompt: int, keep: int, decoded: int, block_size: int) -> int:
    """The most sub-blocks a compressed request lacks while decoding, with the scheduler's blocks.

    It holds its first ``keep`` blocks and the block of the prompt's last position; vLLM adds a block
    each time a decoded position passes the blocks it has. Every pair takes a sub-block when its
    tail is full.
    """
    pairs = len(rows_per_pair)
    prompt_blocks = -(-prompt // block_size)
    held = min(keep, prompt_blocks) + (1 if prompt_blocks - 1 >= keep else 0)
    free = held * pairs - sub_blocks_needed(rows_per_pair, block_size)
    short = max(0, -free)
    blocks = prompt_blocks
    rows = list(rows_per_pair)
    for step in range(decoded):
        position = prompt + step
        while position >= blocks * block_size:
            blocks += 1
            free += pairs
        for pair in range(pairs):
            if rows[pair] % block_size == 0:
                free -= 1
            rows[pair] += 1
        short = max(short, -free)
    return short


def test_a_compressed_request_never_runs_out_of_sub_blocks_while_decoding():
    """The blocks the scheduler leaves a request always hold its packed rows and every decoded row."""
    from lavakv.serving.accounting import compression_frees_blocks, kept_prompt_blocks

    rng = random.Random(1)
    layers, kv_heads, block_size = 30, 3, 32
    pairs = layers * kv_heads
    for budget in (32, 64, 100, 128, 512):
        for _ in range(30):
            prompt = rng.randrange(budget + 1, 4 * budget + 200)
            if not compression_frees_blocks(prompt, budget, block_size):
                continue
            uniform = [budget] * pairs
            assert (
                _sub_blocks_short(uniform, prompt, kept_prompt_blocks(budget, block_size, False), 70, block_size) == 0
            )
            cuts = sorted(rng.randrange(budget * pairs + 1) for _ in range(pairs - 1))
            ragged = [b - a for a, b in zip([0, *cuts], [*cuts, budget * pairs])]
            assert _sub_blocks_short(ragged, prompt, kept_prompt_blocks(budget, block_size, True), 70, block_size) == 0
    assert kept_prompt_blocks(128, 32, ragged=False) == 4 and kept_prompt_blocks(128, 32) == 5


def test_a_ragged_request_would_run_short_without_its_rounding_block():
    """The ragged rule's extra block is needed: without it some head splits run out mid-decode."""
    rng = random.Random(2)
    pairs, block_size, budget = 90, 32, 64
    shorts = []
    for _ in range(40):
        cuts = sorted(rng.randrange(budget * pairs + 1) for _ in range(pairs - 1))
        ragged = [b - a for a, b in zip([0, *cuts], [*cuts, budget * pairs])]
        prompt = rng.randrange(budget + 1, 600)
        shorts.append(_sub_blocks_short(ragged, prompt, budget // block_size, 40, block_size))
    assert max(shorts) > 0


def test_methods_with_the_same_rows_everywhere_are_not_ragged():
    plain = {
        name: compression_of_request({"lavakv_method": name, "lavakv_budget": 64}, None)
        for name in ("snapkv", "streamingllm", "knorm", "lava", "ada-snapkv", "pyramidkv", "cake")
    }
    assert [name for name, c in plain.items() if not c.ragged] == ["snapkv", "streamingllm", "knorm"]


def test_a_step_plan_sorts_rows_into_prefills_to_compress_compressed_decodes_and_vllms_own():
    from lavakv.serving.cpu_layout import PackedRequest
    from lavakv.serving.vllm.state import BatchRow, ServingState

    serving = ServingState(torch.zeros(4 * 10, 3, 32, 128), num_layers=4, isa="vec")
    lava = compression_of_request({"lavakv_method": "lava", "lavakv_budget": 64}, None)
    serving.packed["decoding"] = PackedRequest(4, 10, 3, 32)
    serving.known_blocks["decoding"] = 3
    plan = serving.begin_step(
        [
            BatchRow("decoding", 0, 1, 300, [0, 1, 2, 7], lava),
            BatchRow("new", 1, 200, 0, list(range(3, 10)), lava),
            BatchRow("plain", 201, 1, 50, [8], None),
        ]
    )
    assert [p.request_id for p in plan.prefills] == ["new"] and (plan.prefills[0].start, plan.prefills[0].end) == (
        1,
        201,
    )
    assert [(d.request_id, d.row, d.batch_index) for d in plan.decodes] == [("decoding", 0, 0)]
    assert plan.stock_rows.tolist() == list(range(1, 202))
    assert len(serving.packed["decoding"].free) == 4 * 3 and serving.known_blocks["decoding"] == 4
    with pytest.raises(RuntimeError, match="split across steps"):
        serving.begin_step([BatchRow("late", 0, 100, 100, [1, 2, 3, 4, 5, 6], lava)])
    with pytest.raises(RuntimeError, match="one token per step"):
        serving.begin_step([BatchRow("decoding", 0, 2, 301, [0, 1, 2, 7], lava)])
    serving.forget(["decoding"])
    assert "decoding" not in serving.packed


def test_the_vllm_platform_plugin_is_off_unless_asked_for(monkeypatch):
    from lavakv.serving import vllm as plugin

    monkeypatch.delenv("LAVAKV_VLLM", raising=False)
    assert plugin.platform_plugin() is None


@pytest.mark.parametrize(
    "spec, named",
    [
        ("expected-attention", "layer's weights"),
        ("kvzip", "scoring pass"),
        ("headkv:profile=docs/results/smollm2-heads.json", "per-head profile"),
    ],
)
def test_methods_serving_cannot_run_yet_are_refused_naming_them(spec, named):
    compression = compression_of_request({"lavakv_method": spec, "lavakv_budget": 64}, None)
    with pytest.raises(ValueError, match=named) as refused:
        PromptCompression.check_servable(compression)
    assert spec.split(":")[0] in str(refused.value)
    PromptCompression.check_servable(compression_of_request({"lavakv_method": "lava", "lavakv_budget": 64}, None))
