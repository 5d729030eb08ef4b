"""The test suite's own contract: ``-m "not smollm2"`` never loads the embedded model."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parent


def _collected(*options: str) -> list[str]:
    command = [sys.executable, "-m", "pytest", "--collect-only", "-q", *options, str(TESTS / "test_eval_runner.py")]
    output = subprocess.run(command, capture_output=True, text=True, cwd=TESTS.parent, timeout=300).stdout
    return [line for line in output.splitlines() if "::" in line]


def test_tests_that_use_the_embedded_model_are_deselected_by_not_smollm2():
    everything = _collected()
    without = _collected("-m", "not smollm2")
    users = {"test_chat_template_split_keeps_question_separate", "test_the_query_aware_prompt_is_tokenized_whole"}
    assert all(any(name in test for test in everything) for name in users)
    assert not any(name in test for test in without for name in users)
    assert len(without) < len(everything)
