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
from ..decoding import TokenFeed
from ..methods import Budget, Method, parse_spec
from ..prompting import context_length, fit_context, pad_token_id, split_prompt, stop_token_ids
from ..recording import PrefillRecord
from .metrics import score
from .samples import Sample
from .store import ResultRow, ResultStore

PROTOCOLS = ("query-aware", "query-agnostic")
CHAT_TEMPLATE_MODES = ("auto", "on", "off")
EVAL_WINDOW_POLICY = "half"
"""Without an explicit window, each method's window is at most half the budget (see ``lavakv.methods.budget``)."""
EVAL_WINDOW_IDENTITY = "auto: min(32, budget // 2)"
"""How a run's identity records the ``half`` policy (unchanged, so that earlier runs resume); each row
records the window it used."""


def check_protocol(protocol: str) -> str:
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}; valid: {', '.join(PROTOCOLS)}")
    return protocol


@dataclass(frozen=True)
class Pair:
    """One way of compressing: a method and its budget (``None`` for a method that keeps everything).

    ``spec`` names the method in result rows: the canonical spec of the method asked for, before a
    run-wide ``--window`` (which the run's identity records) is applied.
    """

    method: Method
    budget: Budget | None
    spec: str

    @property
    def tokens(self) -> int:
        """The budget in tokens per KV head per layer; 0 for the full cache (how rows store it)."""
        return 0 if self.budget is None else self.budget.tokens

    @property
    def window(self) -> int | None:
        """The observation window the method uses at this budget (``None`` for the full cache)."""
        if self.budget is None:
            return None
        return self.budget.window_for(self.method.window, self.budget.tokens)

    @property
    def key(self) -> tuple[str, int]:
        return (self.spec, self.tokens)


def make_pairs(methods: list[str | Method], budgets: list[int], window: int | None = None) -> list[Pair]:
    """Every method (a spec or a Method) at every budget; a method that keeps everything once.

    Without ``window`` each method's window is at most half the budget (the ``half`` policy: 16
    at budget 32, the method's own 32 from budget 64 on); with it, every method uses ``window``
    and every budget must exceed it. Specs and budgets are checked here, before any work.
    """
    if not methods:
        raise ValueError("give at least one method")
    if window is not None and (isinstance(window, bool) or not isinstance(window, int) or window < 1):
        raise ValueError(f"window must be an integer >= 1, got {window!r}")
    policy = "fixed" if window is not None else EVAL_WINDOW_POLICY
    pairs: list[Pair] = []
    for asked in methods:
        method = parse_spec(asked)
        spec = method.spec
        if not method.compresses:
            pairs.append(Pair(method, None, spec))
            continue
        if window is not None:
            method = method.with_options(window=window)
        if not budgets:
            raise ValueError(f"method {spec!r} needs at least one budget (--budgets)")
        for tokens in budgets:
            budget = Budget(tokens=tokens, window_policy=policy)
            method.check_budget(budget)
            pairs.append(Pair(method, budget, spec))
    unique: dict[tuple[str, int], Pair] = {}
    for pair in pairs:
        unique.setdefault(pair.key, pair)
    return list(unique.values())


def first_line(text: str) -> str:
    """``text`` up to its first line break after leading whitespace."""
    stripped = text.lstrip()
    return text[: len(text) - len(stripped)] + stripped.split("\n", 1)[0]


@dataclass
class Prepared:
    """A sample's token ids as the run feeds them."""

    sample: Sample
    context: list[int]
    question: list[int]
    truncated: bool


def prepare(tokenizer, sample: Sample, chat_template: str, max_length: int) -> Prepared:
    """The sample's context and question ids (one split for both protocols), cut in the middle to fit."""
    if chat_template not in CHAT_TEMPLATE_MODES:
        raise ValueError(f"unknown chat template mode {chat_template!r}; valid: {', '.join(CHAT_TEMPLATE_MODES)}")
    use_template = sample.chat_template if chat_template == "auto" else chat_template == "on"
    name = f"sample {sample.benchmark}/{sample.dataset}/{sample.sample_id}"
    context, question = split_prompt(tokenizer, sample.context, sample.question, use_template, name)
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
    aware = check_protocol(protocol) == "query-aware"
    prefilled = prepared.context + prepared.question if aware else prepared.context
    after_prefill = [] if aware else prepared.question
    stop_ids = stop_token_ids(model, tokenizer)
    finished = None
    if sample.stop_at_newline:

        def finished(tokens: list[int]) -> bool:
            return "\n" in tokenizer.decode(tokens, skip_special_tokens=True).lstrip()

    record = None if from_scratch else PrefillRecord(model, torch.tensor([prefilled], device=model.device))
    for pair in pairs:
        start = _now(model)
        if record is None:
            cache = CompressedCache(model, method=pair.method, budget=pair.budget)
            feed = TokenFeed(model, cache)
            logits = feed.prefill([prefilled], pad_token_id(tokenizer))
            prefill_seconds, compress_seconds = _now(model) - start, 0.0
        else:
            cache = record.compress(pair.method, budget=pair.budget)
            feed = TokenFeed(model, cache, lengths=[len(prefilled)])
            logits = record.logits
            prefill_seconds, compress_seconds = record.seconds, _now(model) - start
        decode_start = _now(model)
        if after_prefill:
            logits = feed.extend([after_prefill])
        tokens = feed.greedy(logits, sample.max_new_tokens, stop_ids, finished)[0]
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
    stats = cache.stats(positions=False)
    sequence = stats.sequences[0]
    return ResultRow(
        benchmark=sample.benchmark,
        dataset=sample.dataset,
        sample_id=sample.sample_id,
        method=pair.spec,
        budget=pair.tokens,
        window=pair.window,
        prediction=prediction,
        score=float(score(sample, prediction)),
        answers=list(sample.answers),
        prompt_tokens=len(prepared.context) + len(prepared.question),
        truncated=prepared.truncated,
        kept_entries=stats.kept_entries,
        full_entries=stats.full_entries,
        kv_bytes=stats.kv_bytes,
        new_tokens=len(tokens),
        prefill_seconds=prefill_s,
        compress_seconds=compress_s,
        decode_seconds=decode_s,
        layer_budgets=[round(value, 3) for value in sequence.layer_budgets],
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
    check_protocol(protocol)
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
        pending = [p for p in pairs if (*ids[position], *p.key) not in done]
        if pending:
            work.append((sample, pending))
    return work


def _progress(total: int, description: str, enabled: bool, position: int = 1):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=description, unit="run", disable=not enabled, dynamic_ncols=True, position=position)
