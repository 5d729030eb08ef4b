"""The evaluation runner: each sample is prefilled once and compressed every way asked for.

For every sample the runner prefills the prompt (query-aware protocol) or the context
(query-agnostic protocol) once, with a :class:`~lavakv.recording.PrefillRecord`, then derives the
cache of each ``(method, budget)`` from it, decodes greedily, scores the answer and commits the
row to the store before moving on. ``from_scratch=True`` instead prefills each pair with its own
compressing cache, as ``lavakv.generate`` does: the same predictions, for measuring the speed-up.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

from ..cache import CompressedCache, SequenceStats
from ..decoding import TokenFeed
from ..methods import Budget, Method, parse_spec
from ..prompting import context_length, pad_token_id, prompt_ids, split_prompt, stop_token_ids, truncate_middle
from ..recording import PrefillRecord
from .metrics import score
from .samples import Sample
from .shards import shard_members
from .store import ResultRow, ResultStore, run_done_keys

logger = logging.getLogger(__name__)

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
    """A sample's token ids as the run feeds them.

    ``prompt`` is the whole prompt tokenized at once, as the benchmark's own script feeds it, and
    what the query-aware protocol prefills; the query-agnostic protocol prefills ``context`` and
    feeds ``question`` (the two tokenized apart) after compression. ``question_whole`` is false
    when LongBench's middle cut reached into the question, which then sits in ``context`` (the
    query-agnostic protocol cannot run such a sample).
    """

    sample: Sample
    context: list[int]
    question: list[int]
    truncated: bool
    question_whole: bool = True
    prompt: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.prompt:
            self.prompt = self.context + self.question


def prepare(tokenizer, sample: Sample, chat_template: str, max_length: int) -> Prepared:
    """The sample's context and question ids, its prompt cut in the middle as LongBench's ``pred.py`` does.

    The whole prompt (``context + question``, without the chat wrapper) is tokenized; beyond
    ``max_length`` tokens its first and last ``max_length // 2`` tokens are decoded and joined
    (:func:`~lavakv.prompting.truncate_middle`), then the chat wrapper goes around the result for
    the datasets that use one. The generated answer is not counted, as in LongBench. The cut text
    is split where the sample's question starts, when the question survived whole.
    """
    if chat_template not in CHAT_TEMPLATE_MODES:
        raise ValueError(f"unknown chat template mode {chat_template!r}; valid: {', '.join(CHAT_TEMPLATE_MODES)}")
    use_template = sample.chat_template if chat_template == "auto" else chat_template == "on"
    if sample.error is not None:
        raise ValueError(sample.error)
    name = f"sample {sample.benchmark}/{sample.dataset}/{sample.sample_id}"
    prompt, truncated = truncate_middle(tokenizer, sample.prompt, max_length)
    context, question, whole = sample.context, sample.question, True
    if truncated:
        if sample.question and prompt.endswith(sample.question) and len(prompt) > len(sample.question):
            context = prompt[: len(prompt) - len(sample.question)]
        else:
            context, question, whole = prompt, "", not sample.question
    context_ids, question_ids = split_prompt(tokenizer, context, question, use_template, name, sample.answer_prefix)
    whole_ids = prompt_ids(tokenizer, context, question, use_template, sample.answer_prefix)
    return Prepared(sample, context_ids, question_ids, truncated, whole, whole_ids)


PROMPT_TOKENIZATION = "whole"
"""How a run tokenizes its prompts, recorded in its identity: the query-aware prompt at once (:func:`prompt_ids`)."""

LONGBENCH_CONTEXT_MARGIN = 500
"""``--max-length`` defaults to the model's context minus this, as LongBench's model table sets it (3500 for 4K)."""


DEFAULT_DECODE_BATCH = 32
"""Rows decoded together by default: a sample's ``(method, budget)`` pairs of comparable budgets."""
BUDGET_SPREAD = 4
"""The largest ratio of budgets decoded in one batch (its attention is as wide as its longest row)."""


def decode_groups(pairs: list[Pair], decode_batch: int) -> list[list[Pair]]:
    """The pairs of one sample in the batches they decode in, at most ``decode_batch`` rows each.

    Pairs go by increasing budget; a batch closes when it is full or when the next budget is more
    than :data:`BUDGET_SPREAD` times its smallest, since every row of a batch pays for the longest
    one. The full cache (and any method that keeps everything) decodes in batches of its own.
    """
    check_decode_batch(decode_batch)
    groups: list[list[Pair]] = []
    full = [pair for pair in pairs if pair.tokens == 0]
    for start in range(0, len(full), decode_batch):
        groups.append(full[start : start + decode_batch])
    batch: list[Pair] = []
    for pair in sorted((p for p in pairs if p.tokens), key=lambda p: p.tokens):
        if batch and (len(batch) == decode_batch or pair.tokens > BUDGET_SPREAD * batch[0].tokens):
            groups.append(batch)
            batch = []
        batch.append(pair)
    if batch:
        groups.append(batch)
    return groups


def check_decode_batch(decode_batch: int) -> int:
    if isinstance(decode_batch, bool) or not isinstance(decode_batch, int) or decode_batch < 1:
        raise ValueError(f"decode_batch must be an integer >= 1 (rows decoded together), got {decode_batch!r}")
    return decode_batch


@dataclass
class _Built:
    """One pair's compressed cache, with what its row records of it before decoding."""

    pair: Pair
    cache: CompressedCache
    stats: SequenceStats
    logits: torch.Tensor
    prefill_seconds: float
    compress_seconds: float


def evaluate_sample(
    model,
    tokenizer,
    prepared: Prepared,
    pairs: list[Pair],
    protocol: str,
    from_scratch: bool = False,
    decode_batch: int = DEFAULT_DECODE_BATCH,
) -> Iterator[ResultRow]:
    """Rows for ``pairs`` on one sample: one prefill, a cache per pair, decoded in batches of pairs.

    Pairs of comparable budgets decode together, ``decode_batch`` rows at most, each row through
    its own compressed cache and stopping on its own (:func:`decode_groups`); ``decode_batch=1``
    decodes one pair at a time. ``from_scratch`` prefills each pair with its own compressing
    cache instead of sharing one prefill. A pair that fails to compress or decode yields an error
    row and the others go on; a batch that fails is decoded again one pair at a time, so that only
    the failing pair is lost.
    """
    sample = prepared.sample
    prefilled, after_prefill = protocol_ids(prepared, protocol)
    decoder = _Decoder(model, tokenizer, sample, len(prefilled), after_prefill)
    record = None if from_scratch else PrefillRecord(model, torch.tensor([prefilled], device=model.device))
    for group in decode_groups(pairs, decode_batch):
        built = []
        for pair in group:
            try:
                built.append(_build(model, tokenizer, pair, record, prefilled))
            except Exception as error:  # noqa: BLE001 - one pair's failure is recorded, the run goes on
                yield error_row(sample, pair, error, prepared)
        yield from decoder.rows(built, prepared)


def protocol_ids(prepared: Prepared, protocol: str) -> tuple[list[int], list[int]]:
    """``(ids prefilled and compressed, ids fed after compression)`` of a sample under ``protocol``.

    Query-aware: the whole prompt, then nothing; query-agnostic: the context, then the question,
    refused when the middle cut reached into the question.
    """
    if check_protocol(protocol) == "query-aware":
        return prepared.prompt, []
    if not prepared.question_whole:
        raise ValueError(
            f"the middle cut to max_length reached into the question ({len(prepared.sample.question)} characters), "
            "which the query-agnostic protocol feeds after compression; give a larger --max-length or use "
            "--protocol query-aware"
        )
    return prepared.context, prepared.question


def decode_attention_path(model) -> str:
    """The decode attention of evaluation caches: ``"bucketed"`` on CPU, ``"auto"`` (FlexAttention) elsewhere.

    A batch of pairs holds rows of very different lengths (a budget of 128 beside a CAKE layer of
    1,600): ``"gather"`` would copy them into a padded view at every step of every layer, and one
    padded copy would make every row attend as far as the longest. ``"bucketed"`` copies them once
    per batch into groups of similar length and holds the copies while the batch decodes.
    """
    return "bucketed" if model.device.type == "cpu" else "auto"


def _build(model, tokenizer, pair: Pair, record: PrefillRecord | None, prefilled: list[int]) -> _Built:
    start = _now(model)
    path = decode_attention_path(model)
    if pair.method.needs_scoring_pass:
        if record is None:
            record = PrefillRecord(model, torch.tensor([prefilled], device=model.device))
        record.reconstruct(tokenizer)
        start = _now(model) - record.scoring_pass_seconds
    if record is None:
        cache = CompressedCache(model, method=pair.method, budget=pair.budget, attention_path=path)
        logits = TokenFeed(model, cache).prefill([prefilled], pad_token_id(tokenizer))
        prefill_seconds, compress_seconds = _now(model) - start, 0.0
    else:
        cache = record.compress(pair.method, budget=pair.budget, attention_path=path)
        logits = record.logits
        prefill_seconds, compress_seconds = record.seconds, _now(model) - start
    stats = cache.stats(positions=False).sequences[0]
    return _Built(pair, cache, stats, logits, prefill_seconds, compress_seconds)


class _Decoder:
    """Greedy answers of one sample for batches of compressed caches, and their rows."""

    def __init__(self, model, tokenizer, sample: Sample, prefilled: int, after_prefill: list[int]):
        self.model, self.tokenizer, self.sample = model, tokenizer, sample
        self.prefilled, self.after_prefill = prefilled, after_prefill
        self.stop_ids = stop_token_ids(model, tokenizer)
        self.finished = None
        if sample.stop_at_newline:

            def finished(tokens: list[int]) -> bool:
                return "\n" in tokenizer.decode(tokens, skip_special_tokens=True).lstrip()

            self.finished = finished

    def rows(self, built: list[_Built], prepared: Prepared) -> Iterator[ResultRow]:
        if not built:
            return
        try:
            answers, seconds = self._decode(built)
        except Exception as error:  # noqa: BLE001 - retried pair by pair below
            if len(built) == 1:
                yield error_row(self.sample, built[0].pair, error, prepared)
                return
            logger.warning("decoding %d rows together failed (%s); decoding them one at a time", len(built), error)
            for one in built:
                yield from self.rows([one], prepared)
            return
        for one, tokens in zip(built, answers):
            one.cache.release()
            yield self._row(one, prepared, tokens, seconds / len(built), len(built))

    def _decode(self, built: list[_Built]) -> tuple[list[list[int]], float]:
        start = _now(self.model)
        caches = [one.cache for one in built]
        cache = caches[0] if len(caches) == 1 else CompressedCache.stack(caches, mixed_methods=True)
        feed = TokenFeed(self.model, cache, lengths=[self.prefilled] * len(caches))
        if self.after_prefill:
            logits = feed.extend([self.after_prefill] * len(caches))
        else:
            logits = torch.cat([one.logits for one in built])
        tokens = feed.greedy(logits, self.sample.max_new_tokens, self.stop_ids, self.finished, drop_finished=True)
        if len(caches) > 1:
            cache.release()
        return tokens, _now(self.model) - start

    def _row(self, one: _Built, prepared: Prepared, tokens: list[int], decode_seconds: float, rows: int) -> ResultRow:
        prediction = self.tokenizer.decode([t for t in tokens if t not in self.stop_ids], skip_special_tokens=True)
        if self.sample.stop_at_newline:
            prediction = first_line(prediction)
        sample, pair, stats = self.sample, one.pair, one.stats
        return ResultRow(
            **_row_key(sample, pair),
            prediction=prediction,
            score=float(score(sample, prediction)),
            answers=list(sample.answers),
            prompt_tokens=len(prepared.prompt),
            truncated=prepared.truncated,
            kept_entries=stats.kept_entries,
            full_entries=stats.full_entries,
            kv_bytes=stats.kv_bytes,
            new_tokens=len(tokens),
            prefill_seconds=one.prefill_seconds,
            compress_seconds=one.compress_seconds,
            decode_seconds=decode_seconds,
            layer_budgets=[round(value, 3) for value in stats.layer_budgets],
            extra=sample.extra,
            decode_rows=rows,
        )


def _row_key(sample: Sample, pair: Pair) -> dict:
    """The fields that key a result row (and its window)."""
    return {
        "benchmark": sample.benchmark,
        "dataset": sample.dataset,
        "sample_id": sample.sample_id,
        "method": pair.spec,
        "budget": pair.tokens,
        "window": pair.window,
    }


def error_row(sample: Sample, pair: Pair, error: BaseException, prepared: Prepared | None = None) -> ResultRow:
    """The row of a pair that could not be built or run: its key, the error's message, zeros elsewhere."""
    message = f"{type(error).__name__}: {error}"
    logger.warning(
        "%s/%s/%s %s budget %d: %s", sample.benchmark, sample.dataset, sample.sample_id, pair.spec, pair.tokens, message
    )
    if isinstance(error, torch.OutOfMemoryError) and torch.cuda.is_available():
        torch.cuda.empty_cache()
    return ResultRow(
        **_row_key(sample, pair),
        prediction="",
        score=0.0,
        answers=list(sample.answers),
        prompt_tokens=0 if prepared is None else len(prepared.prompt),
        truncated=False if prepared is None else prepared.truncated,
        kept_entries=0,
        full_entries=0,
        kv_bytes=0,
        new_tokens=0,
        prefill_seconds=0.0,
        compress_seconds=0.0,
        decode_seconds=0.0,
        layer_budgets=[],
        extra=sample.extra,
        decode_rows=0,
        error=message,
    )


def _now(model) -> float:
    """A timestamp after the device's queued work is done (CUDA runs asynchronously)."""
    if model.device.type == "cuda":
        torch.cuda.synchronize(model.device)
    return time.perf_counter()


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
    decode_batch: int = DEFAULT_DECODE_BATCH,
    retry_errors: bool = False,
) -> int:
    """Evaluate every pending ``(sample, pair)`` of this shard into ``store``; returns the rows written.

    Pending means held by no store file of ``store``'s run directory (error rows count as done
    unless ``retry_errors``). A sample that cannot be prepared or prefilled gets an error row for
    each of its pending pairs, and the run goes on with the next sample.
    """
    check_protocol(protocol)
    check_decode_batch(decode_batch)
    if max_length is None:
        max_length = context_length(model) or 2**31
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 2:
        raise ValueError(f"max_length must be an integer >= 2 (tokens kept of a prompt), got {max_length!r}")
    work = plan(samples, pairs, store, shard, retry_errors=retry_errors)
    bar = progress_bar(sum(len(pending) for _, pending in work), description, progress)
    written = 0
    try:
        for sample, pending in work:
            for row in _sample_rows(
                model, tokenizer, sample, pending, protocol, chat_template, max_length, from_scratch, decode_batch
            ):
                written += store.add(row)
                bar.update(1)
                if overall is not None:
                    overall.update(1)
                if on_row is not None:
                    on_row(row)
    finally:
        bar.close()
    return written


def _sample_rows(model, tokenizer, sample, pending, protocol, chat_template, max_length, from_scratch, decode_batch):
    """One sample's rows; a failure before any pair is built makes an error row of every pending pair."""
    done: set[tuple[str, int]] = set()
    prepared = None
    try:
        prepared = prepare(tokenizer, sample, chat_template, max_length)
        for row in evaluate_sample(model, tokenizer, prepared, pending, protocol, from_scratch, decode_batch):
            done.add((row.method, row.budget))
            yield row
    except Exception as error:  # noqa: BLE001 - one bad sample never stops a run
        for pair in pending:
            if pair.key not in done:
                yield error_row(sample, pair, error, prepared)


def plan(
    samples: list[Sample],
    pairs: list[Pair],
    store: ResultStore,
    shard: tuple[int, int] = (0, 1),
    retry_errors: bool = False,
) -> list[tuple[Sample, list[Pair]]]:
    """This shard's samples with the pairs no store file of the run directory holds yet.

    Shards are balanced to within one sample (:func:`shard_members`) and do not depend on which
    rows are done, so an interrupted shard resumes the same samples. Error rows count as done
    unless ``retry_errors``.
    """
    index, count = shard
    done = run_done_keys(store.directory, errors=not retry_errors) | store.done_keys(errors=not retry_errors)
    ids = [(s.benchmark, s.dataset, s.sample_id) for s in samples]
    seen = set()
    for key in ids:
        if key in seen:
            raise ValueError(f"two samples share the id {'/'.join(key)}; sample ids must be unique")
        seen.add(key)
    members = shard_members(ids, count)[index]
    work = []
    for position, sample in enumerate(samples):
        if position not in members:
            continue
        pending = [p for p in pairs if (*ids[position], *p.key) not in done]
        if pending:
            work.append((sample, pending))
    return work


def progress_bar(total: int, description: str, enabled: bool, position: int = 1):
    """A tqdm bar of result rows (``position`` 0 for the bar over all benchmarks, 1 for one benchmark's)."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=description, unit="run", disable=not enabled, dynamic_ncols=True, position=position)
