"""Method parts, option routing, spec strings and budgets: what users write and the errors they get."""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import pytest
import torch
from conftest import random_prompt, tiny_model

import lavakv
from lavakv.methods import (
    HEAD_ALLOCATIONS,
    LAYER_ALLOCATIONS,
    PRESETS,
    SCORES,
    Budget,
    Method,
    OptionError,
    Score,
    parse_spec,
    register_score,
    split_specs,
)
from lavakv.recording import PrefillRecord

BUDGET, LENGTH = 48, 200


@pytest.fixture(scope="module")
def record():
    model = tiny_model("llama", num_hidden_layers=5, seed=3)
    return model, PrefillRecord(model, torch.tensor([random_prompt(LENGTH, seed=9)]))


COMPOSITIONS = [
    (score, heads, layers)
    for score, heads, layers in itertools.product(sorted(SCORES), sorted(HEAD_ALLOCATIONS), sorted(LAYER_ALLOCATIONS))
    if not (SCORES[score].two_stage and LAYER_ALLOCATIONS[layers].dynamic)
    and not any(part.reads_profile for part in (SCORES[score], HEAD_ALLOCATIONS[heads], LAYER_ALLOCATIONS[layers]))
    and SCORES[score].scoring_pass is None
]
"""Every composition a Method accepts without a profile file (two-stage scores take static layer allocations only;
the parts that read a per-head profile are tested with one in test_profiles.py, scores that read a scoring pass in
test_kvzip.py)."""


@pytest.mark.parametrize(("score", "heads", "layers"), COMPOSITIONS)
def test_every_composition_keeps_exact_totals_and_progressive_equals_one_shot(record, score, heads, layers):
    model, prefill = record
    method = Method(score=score, heads=heads, layers=layers)
    kept = {}
    for progressive in (True, False):
        stats = prefill.compress(method, budget=BUDGET, progressive=progressive).stats()
        kv_heads, num_layers = model.config.num_key_value_heads, model.config.num_hidden_layers
        assert stats.kept_entries == BUDGET * kv_heads * num_layers
        for layer in stats.sequences[0].kept_positions:
            for positions in layer:
                assert positions[-32:] == list(range(LENGTH - 32, LENGTH))
        kept[progressive] = stats.sequences[0].kept_positions
    assert kept[True] == kept[False]


@pytest.mark.parametrize(
    "spec",
    [
        "lava",
        "lava:heads=uniform",
        "lava:layers=uniform",
        "snapkv:layers=lava",
        "ada-snapkv:alpha=0.5,window=16",
        "cake:tau1=2",
        "lava:heads=uniform,layers=cake",
        "full",
    ],
)
def test_specs_parse_and_their_canonical_form_parses_back(spec):
    method = parse_spec(spec)
    assert method.spec == spec
    assert parse_spec(method.spec) == method


@pytest.mark.parametrize(
    ("written", "canonical"),
    [
        ("score=lava,heads=ada,layers=uniform", "lava:layers=uniform"),
        ("snapkv:heads=ada,alpha=0.3", "ada-snapkv:alpha=0.3"),
        ("cake:score=snapkv", "snapkv:layers=cake"),
        ("score=snapkv,heads=ada,layers=pyramid", "ada-pyramidkv"),
        ("lava:alpha=0.2", "lava"),
    ],
)
def test_equal_methods_have_one_spec_however_they_are_written(written, canonical):
    assert parse_spec(written).spec == canonical
    assert parse_spec(written) == parse_spec(canonical)


def test_specs_mean_what_they_say():
    assert parse_spec("lava:heads=uniform") == Method(score="lava", heads="uniform", layers="lava")
    assert parse_spec("lava:layers=uniform") == Method(score="lava", heads="ada", layers="uniform")
    assert parse_spec("snapkv:layers=lava") == Method(score="snapkv", heads="uniform", layers="lava")
    assert parse_spec("score=lava,heads=ada,layers=uniform") == parse_spec("lava:layers=uniform")
    tuned = parse_spec("ada-snapkv:alpha=0.5,window=16")
    assert tuned.heads.alpha == 0.5 and tuned.window == 16 and tuned.score == PRESETS["ada-snapkv"].score
    assert parse_spec("lava:kernel=5").score.kernel == 5
    assert not parse_spec("full").compresses
    assert parse_spec("score=snapkv").spec == "snapkv"
    assert Method.preset("lava", alpha=0.5).spec == "lava:alpha=0.5"


def test_labels_are_readable():
    assert parse_spec("lava").label == "lava"
    assert parse_spec("lava:heads=uniform").label == "lava with uniform heads"
    assert parse_spec("ada-snapkv:alpha=0.5,window=16").label == "ada-snapkv with alpha=0.5, window=16"
    assert parse_spec("score=lava,heads=uniform,layers=cake").label == "lava with uniform heads, cake layers"


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("lavva", r"unknown method 'lavva'; valid presets: full, .*lava"),
        ("lava:heads=greedy", r"unknown heads 'greedy' in method spec 'lava:heads=greedy'; valid: ada, headkv"),
        ("lava:layers=", r"bad override 'layers=' .* expected name=value"),
        ("lava:alpha", r"bad override 'alpha'"),
        ("lava:", r"nothing after ':'"),
        ("lava:colour=3", r"unknown option 'colour' in method spec 'lava:colour=3'; 'lava' takes: window, kernel"),
        ("snapkv:alpha=0.5", r"unknown option 'alpha'.*'snapkv' takes: window, kernel, pooling$"),
        ("lava:kernel=x", r"kernel of lava score takes an integer, got 'x'"),
        ("lava:kernel=4", r"lava score: kernel must be an odd integer >= 1, got 4"),
        ("lava:alpha=2", r"ada heads: alpha must be a number in \[0, 1\], got 2.0"),
        ("lava:alpha=0.1,alpha=0.2", r"'alpha' is given twice"),
        ("full:window=8", r"keeps everything and takes no overrides"),
        ("heads=ada", r"names no score"),
        ("score=magic", r"unknown score 'magic'.*valid: cake, criticalkv, defensivekv, duo-attention"),
        ("", r"non-empty"),
    ],
)
def test_bad_specs_name_the_bad_part(spec, message):
    with pytest.raises(ValueError, match=message):
        parse_spec(spec)


def test_options_are_routed_to_the_part_that_declares_them():
    assert Method(score="lava", heads="ada", layers="lava", alpha=0.5) == Method.preset("lava", alpha=0.5)
    with pytest.raises(OptionError, match="has no option 'alphaa'"):
        Method(score="lava", heads="ada", alphaa=0.5)
    method = Method.preset("lava", alpha=0.5, kernel=3, window=16)
    assert method.heads.alpha == 0.5 and method.score.kernel == 3 and method.window == 16
    assert Method.preset("cake", tau2=2.0).layers.tau2 == 2.0
    assert Method.preset("pyramidkv", beta=10).layers.beta == 10
    assert Method.preset("streamingllm", sink=2).score.sink == 2


@pytest.mark.parametrize(
    ("preset", "options", "message"),
    [
        ("lava", {"alphaa": 0.3}, "method 'lava' has no option 'alphaa'; its options: window, kernel, pooling, alpha"),
        ("snapkv", {"alpha": 0.3}, "method 'snapkv' has no option 'alpha'; its options: window, kernel, pooling"),
        ("lava", {"beta": 10}, "method 'lava' has no option 'beta'"),
        ("full", {"window": 8}, "keeps everything and takes no options"),
    ],
)
def test_an_option_no_part_declares_is_an_error_listing_the_valid_ones(preset, options, message):
    with pytest.raises(OptionError) as error:
        Method.preset(preset, **options)
    assert message in str(error.value)
    assert isinstance(error.value, ValueError) and isinstance(error.value, TypeError)


def test_unused_option_is_refused_by_generate(tokenizer):
    with pytest.raises(ValueError, match="'snapkv' has no option 'alpha'"):
        lavakv.generate(tiny_model("llama"), tokenizer, random_prompt(80), method="snapkv", budget=40, alpha=0.5)


def test_a_list_of_specs_splits_where_each_spec_starts():
    text = "lava,lava:heads=uniform,ada-snapkv:alpha=0.5,window=16,score=lava,heads=ada,score=snapkv,full"
    assert split_specs(text) == [
        "lava",
        "lava:heads=uniform",
        "ada-snapkv:alpha=0.5,window=16",
        "score=lava,heads=ada",
        "score=snapkv",
        "full",
    ]
    assert split_specs("lava:score=snapkv,alpha=0.3") == ["lava:score=snapkv,alpha=0.3"]


def test_an_external_part_with_its_own_option_is_one_registration(tokenizer):
    @register_score("test-earliest")
    @dataclass(frozen=True)
    class EarliestScore(Score):
        """Keeps the earliest prefix entries (for this test only); ``offset`` shifts nothing but must be >= 0."""

        offset: int = 0

        def __post_init__(self) -> None:
            self.check_int("offset", minimum=0)

        def __call__(self, layer):
            positions = torch.arange(layer.prefix_length, dtype=torch.float32)
            return (-positions).expand(layer.num_kv_heads, -1).clone()

    try:
        method = parse_spec("score=test-earliest,offset=2")
        assert method.score.offset == 2 and method.spec == "score=test-earliest,heads=uniform,layers=uniform,offset=2"
        assert method.label == "test-earliest score + uniform heads + uniform layers (offset=2)"
        out = lavakv.generate(tiny_model("llama"), tokenizer, random_prompt(120), method=method, budget=40)
        assert out.stats.kept_positions[0][0] == list(range(8)) + list(range(88, 120))
        with pytest.raises(ValueError, match="test-earliest score: offset must be an integer >= 0"):
            parse_spec("score=test-earliest,offset=-1")
        with pytest.raises(ValueError, match="already registered"):
            register_score("snapkv")(EarliestScore)
    finally:
        SCORES.pop("test-earliest")


def test_parts_must_be_frozen_dataclasses_with_defaults():
    class NotADataclass(Score):
        pass

    with pytest.raises(TypeError, match="frozen dataclass"):
        register_score("test-bad")(NotADataclass)

    @dataclass(frozen=True)
    class NoDefault(Score):
        strength: float

    with pytest.raises(TypeError, match="strength has none"):
        register_score("test-bad")(NoDefault)
    assert "test-bad" not in SCORES

    @dataclass(frozen=True)
    class Unregistered(type(PRESETS["lava"].score)):
        pass

    with pytest.raises(TypeError, match="Unregistered is not a registered score; register it with @register_score"):
        Method(score=Unregistered())


def test_budgets_in_tokens_or_ratio_and_the_window_policies():
    assert Budget(128).tokens_for(1000) == 128
    assert Budget(ratio=0.25).tokens_for(1001) == 251
    assert Budget(ratio=0.01).tokens_for(10) == 1
    assert Budget(64).window_for(32, 64) == 32
    assert Budget(32, window_policy="half").window_for(32, 32) == 16
    assert Budget(64, window_policy="half").window_for(32, 64) == 32
    assert Budget.kept_window(32, 20) == 19
    Budget(33).check_window(32)
    with pytest.raises(ValueError, match=r"greater than the window \(32\)"):
        Budget(32).check_window(32)
    Budget(32, window_policy="half").check_window(32)
    for kwargs, message in [
        ({"tokens": 64, "ratio": 0.5}, "not both"),
        ({}, "needs tokens"),
        ({"tokens": 1.5}, "integer number of tokens"),
        ({"tokens": 0}, ">= 1"),
        ({"tokens": 1, "window_policy": "half"}, ">= 2"),
        ({"ratio": 0.0}, r"ratio must be in \(0, 1\]"),
        ({"tokens": 64, "window_policy": "wide"}, "unknown window policy 'wide'; valid: fixed, half"),
    ]:
        with pytest.raises(ValueError, match=message):
            Budget(**kwargs)


def test_a_method_that_keeps_everything_takes_no_budget(tokenizer):
    with pytest.raises(ValueError, match="'full' keeps every entry and takes no budget"):
        lavakv.generate(tiny_model("llama"), tokenizer, random_prompt(50), method="full", budget=32)
