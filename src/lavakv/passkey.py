"""Passkey-retrieval prompts (Mohtashami & Jaggi, 2023, "Landmark Attention"): a number hidden in filler text.

Used by ``lavakv demo`` and the quality check in ``benchmarks/``: a quick, deterministic way to see
whether a compressed cache still holds the one sentence that matters.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

NOISE_SENTENCES = (
    "The grass is green.",
    "The sky is blue.",
    "The sun is yellow.",
    "Here we go.",
    "There and back again.",
)
"""The repeated noise of passkey retrieval, also RULER's noise haystack."""
FILLER = " ".join(NOISE_SENTENCES) + " "
INTRO = (
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
    "I will quiz you about the important information there.\n\n"
)
QUESTION = "What is the pass key? The pass key is"


@dataclass(frozen=True)
class PasskeyPrompt:
    text: str
    passkey: str
    depth: float
    tokens: int


def passkey_prompt(tokenizer, tokens: int, depth: float, seed: int = 0) -> PasskeyPrompt:
    """A plain-text prompt of about ``tokens`` tokens with a 5-digit passkey at relative ``depth`` in [0, 1]."""
    if not 0 <= depth <= 1:
        raise ValueError(f"depth must be in [0, 1], got {depth}")
    passkey = str(random.Random(seed).randint(10000, 99999))
    needle = f"The pass key is {passkey}. Remember it. {passkey} is the pass key. "
    fixed = len(tokenizer(INTRO + needle + "\n\n" + QUESTION)["input_ids"])
    per_filler = len(tokenizer(FILLER * 10)["input_ids"]) / 10
    repeats = max(1, round((tokens - fixed) / per_filler))
    before = round(repeats * depth)
    text = INTRO + FILLER * before + needle + FILLER * (repeats - before) + "\n\n" + QUESTION
    return PasskeyPrompt(text, passkey, depth, len(tokenizer(text)["input_ids"]))


def passkey_token_positions(tokenizer, ids: list[int], passkey: str) -> list[int]:
    """Positions in ``ids`` of the tokens that spell ``passkey``, every occurrence (for needle-retention counts)."""
    pieces = [tokenizer.decode([token]) for token in ids]
    positions: list[int] = []
    for start in range(len(pieces)):
        joined = ""
        for end in range(start, min(start + len(passkey) + 3, len(pieces))):
            joined += pieces[end].strip()
            if joined == passkey:
                positions.extend(range(start, end + 1))
                break
            if not passkey.startswith(joined):
                break
    return sorted(set(positions))
