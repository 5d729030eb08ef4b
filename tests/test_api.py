"""The public API and CLI: clear errors for bad input, protocols, loading."""

from __future__ import annotations

import pytest
import torch
from conftest import plain_generate, random_prompt, tiny_model
from transformers import GPT2Config, GPT2LMHeadModel

import lavakv
from lavakv.cli import main


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"method": "magic", "budget": 64}, ValueError, "unknown method 'magic'.*lava"),
        ({"method": "snapkv", "budget": 32}, ValueError, "greater than the window"),
        ({"method": "snapkv", "budget": 0}, ValueError, "budget"),
        ({"method": "snapkv", "budget": -5}, ValueError, "budget"),
        ({"method": "snapkv", "ratio": 0.0}, ValueError, r"ratio must be in \(0, 1\]"),
        ({"method": "snapkv", "ratio": 1.5}, ValueError, r"ratio must be in \(0, 1\]"),
        ({"method": "snapkv", "budget": 64, "ratio": 0.5}, ValueError, "not both"),
        ({"method": "snapkv"}, ValueError, "needs a budget"),
        ({"method": "snapkv", "budget": 64, "max_new_tokens": 0}, ValueError, "max_new_tokens"),
        ({"method": "snapkv", "budget": 64, "alpha": 2.0}, ValueError, "alpha"),
        ({"method": "snapkv", "budget": 64, "colour": 2}, TypeError, "colour"),
    ],
)
def test_bad_arguments_are_refused_before_anything_runs(kwargs, error, message, tokenizer):
    model = tiny_model("llama")
    with pytest.raises(error, match=message):
        lavakv.generate(model, tokenizer, random_prompt(50), **kwargs)


@pytest.mark.parametrize("prompt", ["", "   ", []])
def test_empty_prompt_is_refused(prompt, tokenizer):
    with pytest.raises(ValueError, match="empty"):
        lavakv.generate(tiny_model("llama"), tokenizer, prompt, method="snapkv", budget=64)


def test_prompt_longer_than_the_context_is_refused(tokenizer):
    model = tiny_model("llama", max_position_embeddings=128)
    with pytest.raises(ValueError, match="exceeds the model's context of 128"):
        lavakv.generate(model, tokenizer, random_prompt(130), method="snapkv", budget=64)


def test_unsupported_architecture_names_its_type():
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50))
    with pytest.raises(NotImplementedError, match="'gpt2'"):
        lavakv.prepare_model(model)


def test_missing_model_path_and_unreadable_gguf(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        lavakv.load_model(tmp_path / "nowhere")
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"not a gguf file at all")
    with pytest.raises(ValueError, match="is not a GGUF file"):
        lavakv.load_model(broken)
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(ValueError, match="no config.json"):
        lavakv.load_model(tmp_path / "empty_dir")


def test_load_model_reads_a_transformers_directory(tmp_path):
    model = tiny_model("qwen2")
    model.save_pretrained(tmp_path / "tiny")
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel({str(i): i for i in range(96)} | {"[UNK]": 95}, unk_token="[UNK]"))
    PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="0").save_pretrained(tmp_path / "tiny")
    loaded, tokenizer = lavakv.load_model(tmp_path / "tiny")
    assert loaded.config._attn_implementation == "lavakv"
    torch.testing.assert_close(loaded.model.embed_tokens.weight, model.model.embed_tokens.weight)


def test_query_agnostic_protocol_with_full_cache_matches_the_whole_prompt():
    from lavakv.generate import _generate_ids

    model = tiny_model("llama")
    context, question = random_prompt(120, seed=1), random_prompt(10, seed=2)

    class Tok:
        pad_token_id = 0
        eos_token_id = None

        def decode(self, ids, **kwargs):
            return ""

    expected = plain_generate(model, context + question, 6)
    full = lavakv.CompressedCache(model, method="full")
    got = _generate_ids(model, Tok(), [context], [question], full, 6)[0]
    assert got.token_ids == expected
    lava = lavakv.CompressedCache(model, method="lava", budget=40)
    compressed = _generate_ids(model, Tok(), [context], [question], lava, 6)[0]
    assert compressed.stats.kept_entries == 40 * 2 * 4
    assert compressed.stats.prompt_length == 120


def test_cli_reports_bad_input_without_a_traceback(capsys):
    assert main(["generate", "--method", "nope", "--prompt", "hi", "--model", "/no/such/model"]) == 2
    assert "unknown method 'nope'" in capsys.readouterr().err
    assert main(["generate", "--method", "snapkv", "--prompt", "hi", "--model", "/no/such/model"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["generate", "--prompt-file", "/no/such/file.txt"]) == 2
    assert "prompt file not found" in capsys.readouterr().err
