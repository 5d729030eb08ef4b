"""Model files on disk: a file that is not GGUF is refused up front, stale staging folders are cleaned."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

import lavakv
from lavakv import models
from lavakv.cli import main


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """An empty lavakv cache directory, with lavakv's records reaching caplog (the CLI stops propagation)."""
    folder = tmp_path / "cache"
    folder.mkdir()
    monkeypatch.setenv("LAVAKV_CACHE", str(folder))
    monkeypatch.setattr(logging.getLogger("lavakv"), "propagate", True)
    return folder


def _fake_staging(parent, name: str, pid: int | None, payload_bytes: int = 3 * 2**20):
    """A staging folder as a killed conversion leaves it: a partial weights file and, with ``pid``, a lock file."""
    folder = parent / name
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"\0" * payload_bytes)
    if pid is not None:
        (folder / models.STAGING_LOCK).write_text(str(pid))
    return folder


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


@pytest.mark.parametrize("content", [b"hi\n", b"", b"version https://git-lfs.github.com/spec/v1\n"])
def test_a_file_that_is_not_gguf_is_refused_before_converting(content, tmp_path, cache, caplog):
    path = tmp_path / "x.gguf"
    path.write_bytes(content)
    with caplog.at_level(logging.INFO, logger="lavakv"):
        with pytest.raises(ValueError) as error:
            lavakv.load_model(str(path))
    message = str(error.value)
    assert str(path) in message and "GGUF magic bytes" in message
    assert "\n" not in message
    assert not any("converting" in record.getMessage() for record in caplog.records)
    assert not list(cache.iterdir())


def test_cli_names_the_file_that_is_not_gguf(tmp_path, cache, capsys):
    path = tmp_path / "x.gguf"
    path.write_text("hi\n")
    assert main(["generate", "--model", str(path), "--prompt", "hello"]) == 2
    err = capsys.readouterr().err
    assert f"lavakv: error: {path} is not a GGUF file" in err
    assert "converting" not in err
    assert len(err.strip().splitlines()) == 1


def test_stale_staging_folders_are_removed_and_live_ones_kept(cache, caplog):
    dead = _fake_staging(cache, ".converting-dead", pid=_dead_pid())
    old = _fake_staging(cache, ".converting-old", pid=None)
    stamp = time.time() - models.UNLOCKED_GRACE_SECONDS - 60
    os.utime(old, (stamp, stamp))
    fresh = _fake_staging(cache, ".converting-fresh", pid=None)
    other = _fake_staging(cache, ".assembling-dead", pid=_dead_pid())
    converted = cache / "SmolLM2-abc"
    converted.mkdir()
    with caplog.at_level(logging.INFO, logger="lavakv"):
        removed = models.remove_stale_staging(cache, ".converting-")
    assert sorted(removed) == sorted([dead, old])
    assert not dead.exists() and not old.exists()
    assert fresh.exists() and other.exists() and converted.exists()
    logged = [record.getMessage() for record in caplog.records if "removed" in record.getMessage()]
    assert len(logged) == 2
    assert all("3.0 MiB" in line for line in logged)
    assert any(str(dead) in line for line in logged)


def test_a_staging_folder_of_a_live_process_survives_until_it_is_killed(cache):
    """A process converting holds its folder's lock: cleaning keeps it; after ``kill -9`` it is removed."""
    script = textwrap.dedent(
        f"""
        import sys, time
        from pathlib import Path
        from lavakv import models
        with models._staging(Path({str(cache)!r}), ".converting-") as staging:
            (staging / "model.safetensors").write_bytes(b"\\0" * 2**20)
            print(staging, flush=True)
            time.sleep(120)
        """
    )
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        staging = cache / os.path.basename(child.stdout.readline().strip())
        assert staging.name.startswith(".converting-") and staging.is_dir()
        assert (staging / models.STAGING_LOCK).read_text() == str(child.pid)
        assert models.remove_stale_staging(cache) == []
        assert staging.is_dir()
        # The pid alone would not do: the lock decides, even when the pid names a live process.
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
        assert models.remove_stale_staging(cache) == [staging]
        assert not staging.exists()
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        child.stdout.close()


def test_a_conversion_cleans_stale_folders_first_and_leaves_none_itself(tmp_path, cache, caplog):
    dead = _fake_staging(cache, ".converting-dead", pid=_dead_pid())
    path = tmp_path / "broken.gguf"
    path.write_bytes(models.GGUF_MAGIC + b"\0" * 64)
    with caplog.at_level(logging.INFO, logger="lavakv"):
        with pytest.raises(ValueError, match="cannot read GGUF file"):
            models.convert_gguf(path)
    messages = [record.getMessage() for record in caplog.records]
    assert not dead.exists()
    assert not list(cache.glob(".converting-*"))
    removal = next(i for i, line in enumerate(messages) if "removed" in line and str(dead) in line)
    conversion = next(i for i, line in enumerate(messages) if line.startswith("converting broken.gguf"))
    assert removal < conversion
