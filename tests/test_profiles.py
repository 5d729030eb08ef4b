"""Per-head profiles: lavakv calibrate, HeadKV and DuoAttention budgets, and profiles that do not fit."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import random_prompt, tiny_model
from test_eval_registry import Digits, digits  # noqa: F401  (the fixture)

import lavakv
from lavakv.cachefile import head_identity
from lavakv.calibration import STREAMING_RECENT, STREAMING_SINK, measure_heads
from lavakv.cli import main
from lavakv.eval.evaluation import EvalConfig, evaluate
from lavakv.methods import parse_spec
from lavakv.methods.profiles import PROFILE_FORMAT, ProfileError, load_profile
from lavakv.recording import PrefillRecord

LAYERS, KV_HEADS, LENGTH = 4, 2, 160


def _write_profile(path, model, headkv=None, duo=None, **model_changes):
    identity = {**head_identity(model), **model_changes}
    generator = torch.Generator().manual_seed(3)
    profile = {
        "format": PROFILE_FORMAT,
        "model": identity,
        "headkv": headkv if headkv is not None else torch.rand(LAYERS, KV_HEADS, generator=generator).tolist(),
        "duo": duo if duo is not None else torch.rand(LAYERS, KV_HEADS, generator=generator).tolist(),
    }
    path.write_text(json.dumps(profile))
    return str(path)


@pytest.fixture
def model():
    return tiny_model("llama", num_hidden_layers=LAYERS, seed=5)


def test_headkv_gives_each_head_its_share_of_the_pool_and_keeps_exact_totals(model, tmp_path):
    importance = [[0.1, 0.5], [0.05, 0.05], [0.2, 0.0], [0.08, 0.02]]
    profile = _write_profile(tmp_path / "p.json", model, headkv=importance)
    record = PrefillRecord(model, torch.tensor([random_prompt(LENGTH, seed=2)]))
    budget, window, beta = 64, 32, 1.5
    stats = record.compress(f"headkv:profile={profile},beta={beta}", budget=budget).stats()
    assert stats.kept_entries == budget * KV_HEADS * LAYERS
    slots = budget - window
    weights = torch.tensor(importance, dtype=torch.float64) / sum(map(sum, importance))
    expected = weights * (slots // beta) * LAYERS * KV_HEADS + (slots - slots // beta)
    kept = torch.tensor([[len(p) - window for p in layer] for layer in stats.sequences[0].kept_positions])
    assert (kept - expected).abs().max() <= 1.0
    assert kept[0, 1] > kept[0, 0] and int(kept[2, 1]) == round(slots - slots // beta)


def test_duo_attention_fills_the_highest_gated_heads_whole_and_streams_the_rest(model, tmp_path):
    gates = [[0.1, 0.9], [0.2, 0.3], [0.95, 0.0], [0.4, 0.5]]
    profile = _write_profile(tmp_path / "p.json", model, duo=gates)
    record = PrefillRecord(model, torch.tensor([random_prompt(LENGTH, seed=3)]))
    budget, window = 60, 16
    stats = record.compress(f"duo-attention:profile={profile},window={window}", budget=budget).stats()
    assert stats.kept_entries == budget * KV_HEADS * LAYERS
    kept = stats.sequences[0].kept_positions
    total_prefix = (budget - window) * KV_HEADS * LAYERS
    streaming = 4
    spare = total_prefix - streaming * KV_HEADS * LAYERS
    full_heads = spare // (LENGTH - window - streaming)
    order = sorted(((g, layer, head) for layer, row in enumerate(gates) for head, g in enumerate(row)), reverse=True)
    for rank, (_, layer, head) in enumerate(order):
        positions = kept[layer][head]
        assert positions[:streaming] == [0, 1, 2, 3]
        assert positions[-window:] == list(range(LENGTH - window, LENGTH))
        if rank < full_heads:
            assert positions == list(range(LENGTH))
        elif rank > full_heads:
            assert len(positions) == streaming + window
    partial = kept[order[full_heads][1]][order[full_heads][2]]
    middle = partial[streaming:-window]
    assert middle == list(range(LENGTH - window - len(middle), LENGTH - window))


def test_measured_profiles_are_attention_shares_and_vanish_when_the_stream_sees_everything(model):
    ids = random_prompt(STREAMING_SINK + STREAMING_RECENT - 10, seed=4)
    shares, deviations = measure_heads(model, ids[:-3], ids[-3:], range(5, 9))
    assert shares.shape == deviations.shape == (LAYERS, 4)
    assert bool((shares >= 0).all() and (shares <= 1).all())
    assert float(deviations.abs().max()) < 1e-5
    long_ids = random_prompt(200, seed=5)
    _, far = measure_heads(model, long_ids[:-3], long_ids[-3:], range(20, 30))
    assert float(far.min()) > 0


def test_profiles_that_do_not_fit_get_one_line_errors(model, tmp_path, tokenizer):
    with pytest.raises(ProfileError, match="needs a per-head profile: give profile=PATH"):
        lavakv.CompressedCache(model, method="headkv", budget=40)
    with pytest.raises(ProfileError, match="profile file '/nowhere.json' does not exist"):
        lavakv.CompressedCache(model, method="headkv:profile=/nowhere.json", budget=40)
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ProfileError, match="is not readable JSON"):
        load_profile(str(bad))
    bad.write_text(json.dumps({"format": "other"}))
    with pytest.raises(ProfileError, match="is not a lavakv head profile \\(format 'other'"):
        load_profile(str(bad))
    wrong_shape = _write_profile(tmp_path / "shape.json", model, headkv=[[1.0, 2.0]])
    with pytest.raises(ProfileError, match="headkv must be 4 x 2 finite numbers >= 0, got shape \\(1, 2\\)"):
        load_profile(wrong_shape)
    other = _write_profile(tmp_path / "other.json", model, fingerprint="f" * 64)
    with pytest.raises(ProfileError, match="was measured on .* \\(weights ffffffffffff\\), not on this model"):
        lavakv.generate(model, tokenizer, random_prompt(80), method=f"duo-attention:profile={other}", budget=40)
    smaller = tiny_model("llama", num_hidden_layers=2)
    fits = _write_profile(tmp_path / "fits.json", model)
    with pytest.raises(
        ProfileError, match="\\(4 layers x 2 KV heads\\), not on this model .* \\(2 layers x 2 KV heads\\)"
    ):
        lavakv.CompressedCache(smaller, method=f"headkv:profile={fits}", budget=40)
    with pytest.raises(ValueError, match="cannot evict while decoding: its budgets come from a per-head profile"):
        lavakv.generate(
            model, tokenizer, random_prompt(80), method=f"headkv:profile={fits}", budget=40, decode_budget=50
        )
    assert parse_spec(f"headkv:profile={fits},temp=2").heads.temp == 2


def test_lavakv_calibrate_writes_a_profile_that_the_methods_take(smollm2, tmp_path, capsys):
    out = tmp_path / "smollm2.json"
    assert main(["calibrate", "--out", str(out), "--lengths", "600", "--depths", "0.5", "--needles", "1"]) == 0
    assert "headkv and duo profiles" in capsys.readouterr().out
    profile = load_profile(str(out))
    model, tokenizer = smollm2
    profile.check_model(head_identity(model))
    assert profile.table("headkv").shape == (30, 3) and float(profile.table("duo").max()) > 0
    ids = tokenizer("The quick brown fox jumps over the lazy dog. " * 30)["input_ids"]
    for method in (f"headkv:profile={out}", f"duo-attention:profile={out}"):
        result = lavakv.generate(model, tokenizer, ids, method=method, budget=64, max_new_tokens=2)
        assert result.stats.kept_entries == 64 * 3 * 30


def test_lavakv_eval_refuses_a_profiled_method_without_its_profile_before_any_sample(digits, tmp_path):  # noqa: F811
    config = EvalConfig(benchmarks=(Digits(),), out=str(tmp_path / "run"), methods=("headkv",), budgets=(32,))
    with pytest.raises(ProfileError, match="needs a per-head profile"):
        evaluate(config)
    assert (
        main(
            [
                "eval",
                "--benchmark",
                "digits-test",
                "--methods",
                "headkv",
                "--budgets",
                "32",
                "--out",
                str(tmp_path / "cli"),
            ]
        )
        == 2
    )


def test_lavakv_eval_runs_the_profiled_methods_from_their_profile(digits, tmp_path):  # noqa: F811
    profile = _write_profile(tmp_path / "p.json", digits)
    methods = (f"headkv:profile={profile}", f"duo-attention:profile={profile}")
    config = EvalConfig(
        benchmarks=(Digits(),), out=str(tmp_path / "run"), methods=methods, budgets=(48,), progress=False
    )
    result = evaluate(config)
    assert result.errors == 0 and {row.method for row in result.rows} == set(methods)
