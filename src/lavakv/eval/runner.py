"""The evaluation runner: each sample is prefilled once and compressed every way asked for.

For every sample the runner prefills the prompt (query-aware protocol) or the context
(query-agnostic protocol) once, with a :class:`~lavakv.recording.PrefillRecord`, then derives the
cache of each ``(method, budget)`` from it, decodes greedily, scores the answer and commits the
row to the store before moving on. ``from_scratch=True`` instead prefills each pair with its own
compressing cache, as ``lavakv.generate`` does: the same predictions, for measuring the speed-up.
"""

from __future__ import annotations

import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from ..cache import CompressedCache
from ..generate import context_length, stop_token_ids
from ..methods import PRESETS
from ..recording import PrefillRecord
from .metrics import score
from .samples import Sample
from .store import ResultRow, ResultStore

PROTOCOLS = ("query-aware", "query-agnostic")
CHAT_TEMPLATE_MODES = ("auto", "on", "off")


@dataclass(frozen=True)
class Pair:
    """One way of compressing: a method and its budget (0 for the full cache), with the window it uses."""

    method: str
    budget: int
    window: int | None


def eval_window(method: str, budget: int, window: int | None) -> int | None:
    """The observation window for ``method`` at ``budget``.

    Given explicitly, ``window`` is used as is. Otherwise ``min(method window, budget // 2)``
    (16 at budget 32, the method's own 32 from budget 64 on), so that small budgets still leave
    room for the scored entries (a budget counts its window's tokens).
    """
    if method == "full":
        return None
    if window is not None:
        return window
    return min(PRESETS[method].window, budget // 2)


def make_pairs(methods: list[str], budgets: list[int], window: int | None = None) -> list[Pair]:
    """Every method at every budget; ``full`` once. Names and budgets are checked here, before any work."""
    if not methods:
        raise ValueError("give at least one method")
    if window is not None and (isinstance(window, bool) or not isinstance(window, int) or window < 1):
        raise ValueError(f"window must be an integer >= 1, got {window!r}")
    pairs: list[Pair] = []
    for name in methods:
        if name not in PRESETS:
            raise ValueError(f"unknown method {name!r}; valid: {', '.join(PRESETS)}")
        if name == "full":
            pairs.append(Pair("full", 0, None))
            continue
        if not budgets:
            raise ValueError(f"method {name!r} needs at least one budget (--budgets)")
        for budget in budgets:
            if isinstance(budget, bool) or not isinstance(budget, int) or budget < 2:
                raise ValueError(f"budgets must be integers >= 2, got {budget!r}")
            used = eval_window(name, budget, window)
            if used >= budget:
                raise ValueError(f"window {used} must be smaller than budget {budget} (the budget counts the window)")
            pairs.append(Pair(name, budget, used))
    return list(dict.fromkeys(pairs))


def encode_sample(tokenizer, sample: Sample, chat_template: bool) -> tuple[list[int], list[int]]:
    """Token ids of the context part and of the question part of ``sample``'s prompt."""
    if not chat_template or not getattr(tokenizer, "chat_template", None):
        context = tokenizer(sample.context)["input_ids"]
        question = tokenizer(sample.question, add_special_tokens=False)["input_ids"] if sample.question else []
        return list(context), list(question)
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": sample.prompt}], tokenize=False, add_generation_prompt=True
    )
    cut = _question_start(text, sample)
    context = tokenizer(text[:cut], add_special_tokens=False)["input_ids"]
    question = tokenizer(text[cut:], add_special_tokens=False)["input_ids"]
    return list(context), list(question)


def _question_start(text: str, sample: Sample) -> int:
    for piece in (sample.question, sample.question.strip()):
        if piece:
            index = text.rfind(piece)
            if index >= 0:
                return index
    index = text.rfind(sample.context.strip())
    if index < 0:
        raise ValueError(f"sample {sample.sample_id}: the chat template changed the prompt beyond recognition")
    return index + len(sample.context.strip())


def fit_context(
    context: list[int], question: list[int], max_new_tokens: int, max_length: int, name: str = "the sample"
) -> tuple[list[int], bool]:
    """Cut the middle of ``context`` so that the prompt plus the answer fit in ``max_length`` tokens.

    LongBench truncates in the middle because the instructions sit at both ends of its prompts.
    """
    room = max_length - len(question) - max_new_tokens
    if room < 2:
        raise ValueError(
            f"{name}: the question ({len(question)} tokens) and the answer ({max_new_tokens} tokens) leave no room "
            f"for the context in max_length={max_length} tokens"
        )
    if len(context) <= room:
        return context, False
    head = room // 2
    return context[:head] + context[len(context) - (room - head) :], True


def greedy_decode(
    model,
    cache,
    first_token: int,
    max_new_tokens: int,
    stop_ids: set[int],
    finished: Callable[[list[int]], bool] | None = None,
) -> list[int]:
    """Greedy tokens after ``first_token`` through ``cache``, until a stop token, ``finished`` or the limit."""
    tokens = [first_token]
    device = model.device
    with torch.inference_mode():
        while len(tokens) < max_new_tokens and tokens[-1] not in stop_ids:
            if finished is not None and finished(tokens):
                break
            step = torch.tensor([[tokens[-1]]], device=device)
            logits = model(input_ids=step, past_key_values=cache, use_cache=True, logits_to_keep=1).logits
            tokens.append(int(logits[0, -1].argmax()))
    return tokens


def first_line(text: str) -> str:
    """``text`` up to its first line break after leading whitespace."""
    stripped = text.lstrip()
    return text[: len(text) - len(stripped)] + stripped.split("\n", 1)[0]


def _continue_with(model, cache, question: list[int], prefill_logits: torch.Tensor) -> int:
    """The first answer token: from the prefill, or after feeding the question through ``cache``."""
    if not question:
        return int(prefill_logits[0].argmax())
    with torch.inference_mode():
        ids = torch.tensor([question], device=model.device)
        logits = model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1).logits
    return int(logits[0, -1].argmax())


def _method_options(pair: Pair) -> dict:
    return {} if pair.window is None or pair.window == PRESETS[pair.method].window else {"window": pair.window}


@dataclass
class Prepared:
    """A sample's token ids as the run feeds them."""

    sample: Sample
    context: list[int]
    question: list[int]
    truncated: bool


def prepare(tokenizer, sample: Sample, chat_template: str, max_length: int) -> Prepared:
    use_template = sample.chat_template if chat_template == "auto" else chat_template == "on"
    context, question = encode_sample(tokenizer, sample, use_template)
    name = f"sample {sample.benchmark}/{sample.dataset}/{sample.sample_id}"
    context, truncated = fit_context(context, question, sample.max_new_tokens, max_length, name)
    return Prepared(sample, context, question, truncated)


def evaluate_sample(
    model,
    tokenizer,
    prepared: Prepared,
    pairs: list[Pair],
    protocol: str,
    from_scratch: bool = False,
) -> Iterator[ResultRow]:
    """Rows for ``pairs`` on one sample, one at a time (the prefill is shared unless ``from_scratch``)."""
    sample = prepared.sample
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}; valid: {', '.join(PROTOCOLS)}")
    aware = protocol == "query-aware"
    prefilled = prepared.context + prepared.question if aware else prepared.context
    after_prefill = [] if aware else prepared.question
    input_ids = torch.tensor([prefilled], device=model.device)
    stop_ids = stop_token_ids(model, tokenizer)
    finished = None
    if sample.stop_at_newline:

        def finished(tokens: list[int]) -> bool:
            return "\n" in tokenizer.decode(tokens, skip_special_tokens=True).lstrip()

    record = None if from_scratch else PrefillRecord(model, input_ids)
    for pair in pairs:
        options = _method_options(pair)
        budget = pair.budget or None
        start = _now(model)
        if record is None:
            cache = CompressedCache(model, method=pair.method, budget=budget, **options)
            with torch.inference_mode():
                logits = model(input_ids=input_ids, past_key_values=cache, use_cache=True, logits_to_keep=1).logits
            prefill_seconds, compress_seconds = _now(model) - start, 0.0
            prefill_logits = logits[:, -1]
        else:
            cache = record.compress(pair.method, budget=budget, **options)
            prefill_seconds, compress_seconds = record.seconds, _now(model) - start
            prefill_logits = record.logits
        decode_start = _now(model)
        first = _continue_with(model, cache, after_prefill, prefill_logits)
        tokens = greedy_decode(model, cache, first, sample.max_new_tokens, stop_ids, finished)
        decode_seconds = _now(model) - decode_start
        prediction = tokenizer.decode([t for t in tokens if t not in stop_ids], skip_special_tokens=True)
        if sample.stop_at_newline:
            prediction = first_line(prediction)
        yield _row(sample, pair, prepared, cache, prediction, tokens, prefill_seconds, compress_seconds, decode_seconds)


def _now(model) -> float:
    """A timestamp after the device's queued work is done (CUDA runs asynchronously)."""
    if model.device.type == "cuda":
        torch.cuda.synchronize(model.device)
    return time.perf_counter()


def _row(sample, pair, prepared, cache, prediction, tokens, prefill_s, compress_s, decode_s) -> ResultRow:
    return ResultRow(
        benchmark=sample.benchmark,
        dataset=sample.dataset,
        sample_id=sample.sample_id,
        method=pair.method,
        budget=pair.budget,
        window=pair.window,
        prediction=prediction,
        score=float(score(sample, prediction)),
        answers=list(sample.answers),
        prompt_tokens=len(prepared.context) + len(prepared.question),
        truncated=prepared.truncated,
        kept_entries=cache.kept_entries(),
        full_entries=cache.full_entries(),
        kv_bytes=cache.kv_bytes(),
        new_tokens=len(tokens),
        prefill_seconds=prefill_s,
        compress_seconds=compress_s,
        decode_seconds=decode_s,
        layer_budgets=[round(float(layer.counts.float().mean()), 3) for layer in cache.layers],
        extra=sample.extra,
    )


def parse_shard(text: str | None) -> tuple[int, int]:
    """``"i/N"`` -> ``(i, N)`` with ``0 <= i < N``; ``None`` -> ``(0, 1)``."""
    if text is None:
        return 0, 1
    try:
        index, count = (int(part) for part in text.split("/"))
    except ValueError:
        raise ValueError(f"--shard must look like i/N (for example 0/2), got {text!r}") from None
    if count < 1 or not 0 <= index < count:
        raise ValueError(f"--shard i/N needs N >= 1 and 0 <= i < N, got {text!r}")
    return index, count


def run(
    model,
    tokenizer,
    samples: list[Sample],
    pairs: list[Pair],
    store: ResultStore,
    protocol: str = "query-aware",
    chat_template: str = "auto",
    max_length: int | None = None,
    shard: tuple[int, int] = (0, 1),
    from_scratch: bool = False,
    progress: bool = True,
    on_row: Callable[[ResultRow], None] | None = None,
    description: str = "eval",
    overall=None,
) -> int:
    """Evaluate every pending ``(sample, pair)`` of this shard into ``store``; returns the rows written."""
    if chat_template not in CHAT_TEMPLATE_MODES:
        raise ValueError(f"unknown chat template mode {chat_template!r}; valid: {', '.join(CHAT_TEMPLATE_MODES)}")
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}; valid: {', '.join(PROTOCOLS)}")
    if max_length is None:
        max_length = context_length(model) or 2**31
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1:
        raise ValueError(f"max_length must be an integer >= 1, got {max_length!r}")
    work = plan(samples, pairs, store, shard)
    bar = _progress(sum(len(pending) for _, pending in work), description, progress)
    written = 0
    try:
        for sample, pending in work:
            prepared = prepare(tokenizer, sample, chat_template, max_length)
            for row in evaluate_sample(model, tokenizer, prepared, pending, protocol, from_scratch):
                written += store.add(row)
                bar.update(1)
                if overall is not None:
                    overall.update(1)
                if on_row is not None:
                    on_row(row)
    finally:
        bar.close()
    return written


def plan(
    samples: list[Sample], pairs: list[Pair], store: ResultStore, shard: tuple[int, int] = (0, 1)
) -> list[tuple[Sample, list[Pair]]]:
    """This shard's samples with the pairs the store does not hold yet.

    A sample's shard is a hash of its key, so processes agree on it whatever else they were asked.
    """
    index, count = shard
    done = store.done_keys()
    ids = [(s.benchmark, s.dataset, s.sample_id) for s in samples]
    seen = set()
    for key in ids:
        if key in seen:
            raise ValueError(f"two samples share the id {'/'.join(key)}; sample ids must be unique")
        seen.add(key)
    work = []
    for position, sample in enumerate(samples):
        if zlib.crc32("/".join(ids[position]).encode()) % count != index:
            continue
        pending = [p for p in pairs if (*ids[position], p.method, p.budget) not in done]
        if pending:
            work.append((sample, pending))
    return work


def _progress(total: int, description: str, enabled: bool, position: int = 1):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=description, unit="run", disable=not enabled, dynamic_ncols=True, position=position)
