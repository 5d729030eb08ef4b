"""``lavakv calibrate``: measure per-head profiles on the loaded model from synthetic retrieval prompts.

The prompts are needle-in-a-haystack prompts built from the shipped essays (no downloads), with
needles other than the one ``lavakv eval``'s NIAH asks for by default: each hides one needle
sentence at a depth and asks for it, and the needle's answer is appended, so one
prefill gives the queries that produce every answer token (teacher forcing). For each layer and
query head, over the answer tokens of every prompt:

- ``headkv``: the share of the head's attention that lands on the needle's tokens. HeadKV scores
  heads by a retrieval-reasoning test (its paper builds on the retrieval-head test of Wu et al.,
  which counts the steps where a head's most attended token is the needle token being copied, and
  widens it to the top attended tokens and to reasoning prompts, while generating). Here the
  answer is teacher-forced and the whole attention mass on the needle counts, which ranks the
  same kind of heads with far fewer prompts.
- ``duo``: how much the head's output changes when it only sees the first ``sink`` tokens and the
  last ``recent`` ones: ``||o_full - o_streaming|| / ||o_full||``. DuoAttention learns a gate per
  head by optimizing the model's output with every head mixed between full and streaming
  attention on synthetic passkey data; here each head's own output deviation is measured
  directly, with no training, which is what the learned gate stands for.

Query heads are averaged into their KV head. The file records the model it was measured on (see
:mod:`lavakv.methods.profiles`) and how.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path

import torch

from .cachefile import head_identity
from .eval.niah import NEEDLES, niah_samples
from .methods.profiles import PROFILE_FORMAT
from .methods.registry import attention_probabilities
from .recording import PrefillRecord

logger = logging.getLogger(__name__)

DEFAULT_LENGTHS = (1000, 2000)
DEFAULT_DEPTHS = (0.1, 0.3, 0.5, 0.7, 0.9)
DEFAULT_NEEDLES = 4
STREAMING_SINK = 4
STREAMING_RECENT = 64


def calibration_prompts(tokenizer, lengths, depths, needles: int) -> list[tuple[list[int], list[int], range]]:
    """``(prompt ids, answer ids, needle token positions)`` for each length, depth and needle.

    The needles are the last ``needles`` of the shipped ones, so that a profile is not measured on
    the needle that ``lavakv eval``'s NIAH asks for by default (the first, ``seed=0``).
    """
    if isinstance(needles, bool) or not isinstance(needles, int) or not 1 <= needles <= len(NEEDLES):
        raise ValueError(f"needles must be an integer from 1 to {len(NEEDLES)}, got {needles!r}")
    prompts = []
    for seed in range(len(NEEDLES) - needles, len(NEEDLES)):
        for sample in niah_samples(tokenizer, list(lengths), list(depths), seed=seed):
            ids = (
                tokenizer(sample.context)["input_ids"]
                + tokenizer(sample.question, add_special_tokens=False)["input_ids"]
            )
            answer = tokenizer(" " + sample.answers[0], add_special_tokens=False)["input_ids"]
            start = sample.extra["needle_start_token"]
            span = len(tokenizer(sample.extra["needle"], add_special_tokens=False)["input_ids"])
            prompts.append((ids, answer, range(start, start + span)))
    return prompts


def measure_heads(model, ids: list[int], answer: list[int], needle: range) -> tuple[torch.Tensor, torch.Tensor]:
    """``(needle share, streaming deviation)``, each ``[num_layers, H]``, over the answer tokens of one prompt."""
    record = PrefillRecord(model, torch.tensor([ids + answer]))
    first, steps = len(ids) - 1, len(answer)
    shares, deviations = [], []
    for query, key, value, scaling, _ in record.layers:
        queries = query[0, :, first : first + steps]
        probabilities = attention_probabilities(queries, key[0], scaling, first_query_position=first)
        heads, kv_heads = queries.shape[0], key.shape[1]
        values = value[0].float().repeat_interleave(heads // kv_heads, dim=0)
        shares.append(probabilities[:, :, needle.start : needle.stop].sum(dim=-1).mean(dim=-1))
        positions = torch.arange(probabilities.shape[-1])
        query_positions = torch.arange(first, first + steps)
        visible = (positions[None, :] < STREAMING_SINK) | (
            positions[None, :] > query_positions[:, None] - STREAMING_RECENT
        )
        streaming = probabilities * visible
        streaming = streaming / streaming.sum(dim=-1, keepdim=True)
        full_out, streaming_out = probabilities @ values, streaming @ values
        deviation = (full_out - streaming_out).norm(dim=-1) / full_out.norm(dim=-1).clamp_min(1e-12)
        deviations.append(deviation.mean(dim=-1))
    return torch.stack(shares), torch.stack(deviations)


def calibrate(
    model,
    tokenizer,
    out: str | Path,
    lengths=DEFAULT_LENGTHS,
    depths=DEFAULT_DEPTHS,
    needles: int = DEFAULT_NEEDLES,
) -> dict:
    """Measure both profiles on ``model`` and write them to ``out``; returns what was written."""
    identity = head_identity(model)
    prompts = calibration_prompts(tokenizer, lengths, depths, needles)
    start = time.perf_counter()
    shares = deviations = None
    for index, (ids, answer, needle) in enumerate(prompts):
        share, deviation = measure_heads(model, ids, answer, needle)
        shares = share if shares is None else shares + share
        deviations = deviation if deviations is None else deviations + deviation
        logger.info("calibrate: prompt %d of %d (%d tokens)", index + 1, len(prompts), len(ids))
    kv_heads = identity["num_kv_heads"]
    per_kv = [
        (table / len(prompts)).reshape(table.shape[0], kv_heads, -1).mean(dim=-1) for table in (shares, deviations)
    ]
    profile = {
        "format": PROFILE_FORMAT,
        "model": identity,
        "procedure": {
            "prompts": len(prompts),
            "lengths": list(lengths),
            "depths": list(depths),
            "needles": needles,
            "headkv": "mean share of attention on the needle's tokens while the answer is teacher-forced",
            "duo": (
                f"mean relative change of the head's output when it sees only the first {STREAMING_SINK} and the "
                f"last {STREAMING_RECENT} tokens"
            ),
            "seconds": round(time.perf_counter() - start, 1),
        },
        "headkv": _rounded(per_kv[0]),
        "duo": _rounded(per_kv[1]),
    }
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(profile, indent=1) + "\n", encoding="utf-8")
    return profile


def _rounded(table: torch.Tensor) -> list[list[float]]:
    return [[0.0 if not math.isfinite(v) else round(float(v), 6) for v in row] for row in table.tolist()]
