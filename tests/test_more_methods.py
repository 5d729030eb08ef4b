"""Methods beyond the LAVa paper's (KNorm, KeyDiff, TOVA), methods without a window, and method plugins."""

from __future__ import annotations

import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from conftest import random_prompt, tiny_model
from test_eval_registry import Digits, digits  # noqa: F401  (the fixture)
from transformers import DynamicCache

import lavakv
from lavakv.cli import main
from lavakv.eval.evaluation import EvalConfig, evaluate
from lavakv.methods import PRESETS, SCORES, Method, parse_spec, plugins
from lavakv.methods.tova import TovaScore


def _full_keys(model, ids: list[int]) -> list[torch.Tensor]:
    """Every layer's prompt keys ``[H_kv, n, d]`` (after RoPE) from a plain full-cache prefill."""
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(torch.tensor([ids]), **lavakv.cache_argument(model, cache), use_cache=True)
    return [layer.keys[0].float() for layer in cache.layers]


def _kept(model, ids: list[int], method: str, budget: int) -> list[list[list[int]]]:
    out = lavakv.generate(model, None, ids, method=method, budget=budget, max_new_tokens=1)
    return out.stats.kept_positions


@pytest.mark.parametrize("method", ["knorm", "keydiff"])
def test_query_free_methods_keep_each_heads_best_keys_and_no_window(method, tokenizer):
    model = tiny_model("llama", num_hidden_layers=3, seed=2)
    ids = random_prompt(90, seed=5)
    out = lavakv.generate(model, tokenizer, ids, method=method, budget=20, max_new_tokens=1)
    assert out.stats.kept_entries == 20 * 2 * 3
    for layer, keys in enumerate(_full_keys(model, ids)):
        if method == "knorm":
            scores = -keys.norm(dim=-1)
        else:
            anchor = F.normalize(keys, dim=-1).mean(dim=1, keepdim=True)
            scores = -F.cosine_similarity(keys, anchor, dim=-1)
        for head, positions in enumerate(out.stats.kept_positions[layer]):
            expected = torch.sort(scores[head], descending=True, stable=True).indices[:20].sort().values
            assert positions == expected.tolist()


def test_tova_scores_by_the_last_query_averaged_over_every_head():
    attention = torch.rand(4, 1, 10).softmax(dim=-1)
    from test_methods import hand_layer

    layer = hand_layer(attention, values=torch.ones(2, 10, 2))
    scores = TovaScore()(layer)
    assert scores.shape == (2, 9)
    torch.testing.assert_close(scores[0], attention[:, 0, :9].mean(dim=0))
    assert torch.equal(scores[0], scores[1])


@pytest.mark.parametrize("budget", [8, 33, 64])
def test_tova_keeps_the_same_positions_in_every_head_and_the_last_token(budget, tokenizer):
    model = tiny_model("llama", num_hidden_layers=4, seed=1)
    out = lavakv.generate(model, tokenizer, random_prompt(120), method="tova", budget=budget, max_new_tokens=1)
    assert out.stats.kept_entries == budget * 2 * 4
    for layer in out.stats.kept_positions:
        assert layer[0] == layer[1] and layer[0][-1] == 119 and len(layer[0]) == budget


def test_the_new_presets_are_specs_and_take_their_parts_options():
    assert {"knorm", "keydiff", "tova"} <= set(PRESETS) and {"knorm", "keydiff", "tova"} <= set(SCORES)
    assert parse_spec("knorm").window == 0 and parse_spec("tova").window == 1
    assert parse_spec("knorm:heads=ada") == Method(score="knorm", heads="ada", window=0)
    assert parse_spec(parse_spec("keydiff:layers=pyramid").spec) == parse_spec("keydiff:layers=pyramid")
    assert "knorm" not in lavakv.METHODS and len(lavakv.METHODS) == 9


def test_a_window_of_zero_is_refused_for_scores_that_read_the_windows_queries():
    with pytest.raises(ValueError, match="window must be >= 1 for the snapkv score"):
        parse_spec("snapkv:window=0")
    with pytest.raises(ValueError, match="window must be an integer >= 0, got -1"):
        Method(score="knorm", window=-1)
    with pytest.raises(ValueError, match="unknown option 'sink' in method spec 'knorm:sink=4'; 'knorm' takes: window"):
        parse_spec("knorm:sink=4")


PLUGIN = """
from dataclasses import dataclass
from typing import ClassVar

import torch

from lavakv.methods import Method, Score, register_preset, register_score


@register_score("earliest-test")
@dataclass(frozen=True)
class EarliestScore(Score):
    rows_independent: ClassVar[bool] = True

    def __call__(self, layer):
        return -torch.arange(layer.prefix_length, dtype=torch.float32).expand(layer.num_kv_heads, -1).clone()


register_preset("earliest-test", Method(score="earliest-test", window=4))
"""


def _install(directory, monkeypatch, distribution: str, entry: str) -> None:
    """A distribution's metadata in ``directory`` (put on sys.path) with one ``lavakv.methods`` entry point."""
    info = directory / f"{distribution}-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {distribution}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[lavakv.methods]\n{entry}\n")
    monkeypatch.syspath_prepend(str(directory))
    monkeypatch.setattr(plugins, "_loaded", set())


@pytest.fixture
def plugin_package(tmp_path, monkeypatch):
    """An installed distribution (on sys.path) whose ``lavakv.methods`` entry point registers a score and a preset."""
    (tmp_path / "earliest_parts.py").write_text(textwrap.dedent(PLUGIN))
    _install(tmp_path, monkeypatch, "earliest_parts", "earliest = earliest_parts")
    yield
    SCORES.pop("earliest-test", None)
    PRESETS.pop("earliest-test", None)
    sys.modules.pop("earliest_parts", None)


def test_a_plugin_package_registers_parts_used_by_specs_and_lavakv_eval(plugin_package, digits, tmp_path):  # noqa: F811
    assert "earliest-test" not in PRESETS
    method = parse_spec("earliest-test")
    assert method.score.name == "earliest-test" and method.window == 4
    assert parse_spec("score=earliest-test,heads=ada").heads.name == "ada"
    config = EvalConfig(
        benchmarks=(Digits(),), out=str(tmp_path / "run"), methods=("earliest-test",), budgets=(32,), progress=False
    )
    result = evaluate(config)
    assert result.errors == 0 and {row.method for row in result.rows} == {"earliest-test"}
    command = ["eval", "--benchmark", "digits-test", "--methods", "earliest-test", "--budgets", "32"]
    assert main([*command, "--out", str(tmp_path / "cli"), "--quiet"]) == 0


def test_a_plugin_that_fails_to_load_is_named(tmp_path, monkeypatch):
    _install(tmp_path, monkeypatch, "broken_parts", "broken = no_such_module_here")
    with pytest.raises(RuntimeError, match="entry point 'broken' \\(no_such_module_here\\) failed to load"):
        parse_spec("no-such-method")
