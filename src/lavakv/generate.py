"""``lavakv.generate``: prompts in, text and compression statistics out, greedily.

Prompts are built by :mod:`lavakv.prompting`, decoded by :class:`lavakv.decoding.TokenFeed`, and
the statistics come from the cache's read API (:meth:`lavakv.CompressedCache.stats`).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, fields

import torch
from transformers import GenerationConfig

from .cache import CacheConfig, CompressedCache, SequenceStats
from .decoding import TokenFeed
from .methods import Budget, Method
from .prompting import (
    QUESTION_SEPARATOR,
    Prompt,
    check_fits,
    check_token_ids,
    context_ids,
    encode_prompt,
    is_single_prompt,
    pad_token_id,
    question_ids,
    split_prompt,
    stop_token_ids,
    uses_chat_template,
)
from .recording import PrefillRecord

LOGITS_SETTINGS = (
    "repetition_penalty",
    "encoder_repetition_penalty",
    "no_repeat_ngram_size",
    "bad_words_ids",
    "sequence_bias",
    "suppress_tokens",
    "begin_suppress_tokens",
    "min_length",
    "min_new_tokens",
    "forced_bos_token_id",
    "forced_eos_token_id",
    "exponential_decay_length_penalty",
)
"""Generation-config settings that change greedy tokens, which ``lavakv.generate``'s plain argmax does not apply."""

logger = logging.getLogger(__name__)


@dataclass
class GenerationStats(SequenceStats):
    """What compression did for one prompt: the cache's :class:`~lavakv.cache.SequenceStats`, plus the run.

    ``method`` is the method's spec, ``peak_prefill_bytes`` the most key/value memory the cache held
    during the prefill (for the whole batch), ``generated_tokens`` the tokens returned for this
    prompt; ``prefill_seconds`` runs until the first token's logits, ``decode_seconds`` after.
    """

    method: str = ""
    peak_prefill_bytes: int = 0
    generated_tokens: int = 0
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0


@dataclass
class GenerationOutput:
    """One prompt's answer: its text, its token ids, the compression statistics.

    ``history`` is every token of the conversation so far, prompt then answer: pass it, followed
    by the next turn's ids, to continue through the same cache (``generate(..., cache=cache)``).
    """

    text: str
    token_ids: list[int]
    stats: GenerationStats
    history: list[int]


def _batch(prompt) -> tuple[list, bool]:
    if is_single_prompt(prompt):
        return [prompt], False
    if isinstance(prompt, (list, tuple)) and prompt and all(is_single_prompt(p) for p in prompt):
        return list(prompt), True
    return [prompt], False


def generate(
    model,
    tokenizer,
    prompt: Prompt | list[Prompt] | None = None,
    method: str | Method | None = None,
    budget: int | Budget | None = None,
    ratio: float | None = None,
    max_new_tokens: int = 64,
    chat_template: bool = True,
    question: str | list[str] | None = None,
    progressive: bool | None = None,
    questions: list[str] | None = None,
    cache: CompressedCache | None = None,
    decode_budget: int | None = None,
    decode_interval: int | None = None,
    attention_path: str | None = None,
    **options,
) -> GenerationOutput | list[GenerationOutput]:
    """Generate greedily from ``prompt`` with the KV cache compressed by ``method`` (default ``"lava"``).

    ``prompt`` is a string, a list of token ids, a chat (a list of ``{"role", "content"}``
    messages), or a list of these (a batch, left-padded, each prompt compressed on its own).
    ``method`` is a :class:`~lavakv.Method` or a method spec (``"lava"``, ``"lava:heads=uniform"``).
    ``budget`` is the number of prompt tokens kept per KV head per layer on average (window
    included); ``ratio`` gives it as a fraction of each prompt. Method options (``window``,
    ``alpha``, ...) go in ``options``; one the method does not take is an error.

    * ``question`` (query-agnostic protocol): the prompt is the context; the prompt ``context +
      "\n\n" + question`` is split where the question starts, the context is prefilled and
      compressed alone, then the question is fed through the compressed cache.
    * ``questions``: one context, many questions. The context is prefilled and compressed once;
      each question goes through its own copy of the compressed cache, and the answers are
      decoded together as one batch. Returns one output per question, each with the tokens
      ``question=`` gives it alone.
    * ``cache``: decode through this :class:`~lavakv.CompressedCache` (its method and budget
      apply). An empty one is filled by the prompt. One that holds a conversation continues it
      when ``prompt`` is the whole history (``out.history`` plus the next turn's ids, or the chat
      so far): only the new tokens are fed, and a prompt that does not extend what it holds is
      refused. One that holds a compressed context (:func:`compress`, :meth:`CompressedCache.load`)
      answers ``question=`` or ``questions=`` with no prompt, through copies: it is left unchanged,
      ready for the next question.
    * ``decode_budget`` / ``decode_interval`` (default 32): bound the cache while generating (see
      :class:`~lavakv.CompressedCache`). ``attention_path`` names the decode attention backend
      (default ``"auto"``; see :mod:`lavakv.backends`).
    """
    _warn_ignored_settings(model)
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
    given = dict(
        method=method,
        budget=budget,
        ratio=ratio,
        progressive=progressive,
        decode_budget=decode_budget,
        decode_interval=decode_interval,
        attention_path=attention_path,
        **options,
    )
    settings = _settings(cache, given)
    if questions is not None and question is not None:
        raise ValueError("give either question= or questions=, not both")
    held = cache is not None and cache.batch_size > 0
    if held and (question is not None or questions is not None):
        return _ask_held_context(model, tokenizer, prompt, question, questions, cache, chat_template, max_new_tokens)
    if prompt is None:
        raise ValueError("give a prompt (or a cache holding a context, with question= or questions=)")
    if questions is not None:
        return _ask_many(model, tokenizer, prompt, questions, cache, settings, chat_template, max_new_tokens)
    prompts, is_batch = _batch(prompt)
    if held:
        return _continue_conversation(
            model, tokenizer, prompts, is_batch, cache, question, chat_template, max_new_tokens
        )
    if question is not None:
        outputs = _query_agnostic(model, tokenizer, prompts, question, cache, settings, chat_template, max_new_tokens)
    else:
        encoded = [encode_prompt(tokenizer, p, chat_template) for p in prompts]
        built = cache if cache is not None else CompressedCache(model, settings=settings)
        outputs = _generate_ids(model, tokenizer, encoded, None, built, max_new_tokens)
    return outputs if is_batch else outputs[0]


def _warn_ignored_settings(model) -> None:
    ignored = ignored_generation_settings(model)
    if ignored:
        logger.warning(
            "lavakv.generate decodes by plain argmax and ignores the model's generation config settings %s; "
            "for them, call model.generate(..., cache=lavakv.CompressedCache(model, ...))",
            ", ".join(ignored),
        )


def _ask_held_context(model, tokenizer, prompt, question, questions, cache, chat_template, max_new_tokens):
    """Questions asked of a cache that holds a compressed context, through copies of it."""
    if prompt is not None:
        raise ValueError("this cache already holds the context: give the question(s) without a prompt")
    asked = [question] if questions is None else _question_list(questions)
    if not all(isinstance(q, str) for q in asked):
        raise TypeError("question= takes a string (questions= a list of strings) with a cache")
    check_prompt_format(cache, tokenizer, chat_template)
    ids = [question_ids(tokenizer, q, chat_template) for q in asked]
    outputs = _ask(model, tokenizer, cache, ids, max_new_tokens, time.perf_counter(), own=False)
    return outputs if questions is not None else outputs[0]


def _ask_many(model, tokenizer, prompt, questions, cache, settings, chat_template, max_new_tokens):
    """One context compressed once, each question through its own copy, answered as one batch."""
    if cache is not None:
        raise ValueError("questions= with a prompt builds its own caches; give a cache holding the context instead")
    if not isinstance(prompt, str):
        raise TypeError("questions= takes one context as a string")
    start = time.perf_counter()
    ids = [question_ids(tokenizer, q, chat_template) for q in _question_list(questions)]
    built = _compress(model, tokenizer, prompt, chat_template, settings)
    return _ask(model, tokenizer, built, ids, max_new_tokens, start, own=True)


def _settings(cache: CompressedCache | None, given: dict) -> CacheConfig | None:
    """The config of the caches ``generate`` builds; with a ``cache`` given, none may be set."""
    if cache is None:
        return CacheConfig.build(**{"method": "lava", **{k: v for k, v in given.items() if v is not None}})
    extra = [name for name, value in given.items() if value is not None]
    if extra:
        raise ValueError(
            f"a cache brings its own method, budget and settings; leave out {', '.join(extra)} "
            f"(this cache: {cache.method.spec!r} at {cache.budget})"
        )
    return None


def _continue_conversation(model, tokenizer, prompts, is_batch, cache, question, chat_template, max_new_tokens):
    if question is not None:
        raise ValueError("a cache that holds a conversation takes the whole history as prompt, not question=")
    if is_batch or cache.batch_size != 1:
        raise ValueError(
            f"continuing goes one conversation per cache; this cache holds {cache.batch_size} sequences and got "
            f"{len(prompts)} prompts (cache.copy() or cache.batch_select_indices([i]) gives one)"
        )
    return _continue(model, tokenizer, prompts[0], cache, chat_template, max_new_tokens)


def _query_agnostic(model, tokenizer, prompts, question, cache, settings, chat_template, max_new_tokens):
    """Each context prefilled and compressed alone, then its question fed through the compressed cache."""
    questions_per_prompt = [question] * len(prompts) if isinstance(question, str) else list(question)
    if len(questions_per_prompt) != len(prompts):
        raise ValueError(f"got {len(questions_per_prompt)} questions for {len(prompts)} prompts")
    if cache is not None and len(prompts) > 1:
        raise ValueError("a cache holds one batch: give it one context with question=, or use questions=")
    outputs = []
    for context, asked in zip(prompts, questions_per_prompt):
        context_part, question_part = _split(tokenizer, context, asked, chat_template)
        built = cache if cache is not None else CompressedCache(model, settings=settings)
        outputs += _generate_ids(model, tokenizer, [context_part], [question_part], built, max_new_tokens)
        cache = None
    return outputs


def _split(tokenizer, context, asked, chat_template) -> tuple[list[int], list[int]]:
    if not isinstance(context, str) or not isinstance(asked, str):
        raise TypeError("the query-agnostic protocol takes the context and the question as strings")
    if not asked.strip():
        raise ValueError("the question is empty")
    return split_prompt(tokenizer, context + QUESTION_SEPARATOR, asked, chat_template)


def compress(
    model,
    tokenizer,
    context: str | list[int],
    method: str | Method = "lava",
    budget: int | Budget | None = None,
    ratio: float | None = None,
    chat_template: bool = True,
    progressive: bool | None = None,
    decode_budget: int | None = None,
    decode_interval: int | None = None,
    attention_path: str = "auto",
    **options,
) -> CompressedCache:
    """Prefill and compress a context once, for questions later (query-agnostic protocol).

    ``context`` is text (the context part of the prompt ``context + "\n\n" + question``, chat
    template included) or token ids. The cache answers with ``generate(model, tokenizer,
    cache=cache, question=...)`` or ``questions=[...]``, and :meth:`~CompressedCache.save` keeps
    it on disk. A text context records whether the chat template was used, and questions must
    be asked the same way.
    """
    settings = CacheConfig.build(
        method, budget, ratio, progressive, decode_budget, decode_interval, attention_path, **options
    )
    return _compress(model, tokenizer, context, chat_template, settings)


def _compress(model, tokenizer, context: str | list[int], chat_template: bool, settings: CacheConfig):
    ids = (
        context_ids(tokenizer, context, chat_template)
        if isinstance(context, str)
        else encode_prompt(tokenizer, context, chat_template)
    )
    check_token_ids(ids, getattr(model.config.get_text_config(), "vocab_size", None), "the context")
    check_fits(model, len(ids), 1)
    cache = CompressedCache(model, settings=settings)
    if isinstance(context, str):
        cache.prompt_format = prompt_format(tokenizer, chat_template)
    TokenFeed(model, cache).prefill([ids], pad_token_id(tokenizer))
    return cache


def prompt_format(tokenizer, chat_template: bool) -> str:
    """``"chat"`` when prompts go through the tokenizer's chat template, ``"plain"`` otherwise."""
    return "chat" if uses_chat_template(tokenizer, chat_template) else "plain"


def check_prompt_format(cache: CompressedCache, tokenizer, chat_template: bool) -> None:
    """Refuse questions built another way than the compressed context they are asked of."""
    asked = prompt_format(tokenizer, chat_template)
    if cache.prompt_format is not None and cache.prompt_format != asked:
        flag = "chat_template=False (--no-chat-template)" if cache.prompt_format == "plain" else "chat_template=True"
        raise ValueError(
            f"the context was compressed as a {cache.prompt_format} prompt but the question would be a {asked} one; "
            f"ask with {flag}"
        )


def _question_list(questions) -> list[str]:
    if isinstance(questions, str) or not isinstance(questions, (list, tuple)) or not questions:
        raise ValueError(f"questions= takes a non-empty list of question strings, got {questions!r}")
    return list(questions)


def _ask(model, tokenizer, cache: CompressedCache, questions: list[list[int]], max_new_tokens, start, own: bool):
    """Feed each question through a copy of the compressed context in ``cache``; decode the answers as one batch.

    A cache of the caller's (``own=False``) is left as it was. One of this module's own serves the
    last question itself, and the copies' storage is let go once they are stacked into the batch.
    """
    if cache.batch_size != 1:
        raise ValueError(f"questions are asked of a cache holding one context; this one holds {cache.batch_size}")
    held = cache.token_ids(0)
    vocab_size = getattr(model.config.get_text_config(), "vocab_size", None)
    for ids in questions:
        check_token_ids(ids, vocab_size, "the question")
        check_fits(model, len(held) + len(ids), max_new_tokens)
    copies, logits = [], []
    for index, ids in enumerate(questions):
        copy = cache if own and index == len(questions) - 1 else cache.copy()
        logits.append(TokenFeed(model, copy, lengths=[len(held)]).extend([ids]))
        copies.append(copy)
    batch = CompressedCache.stack(copies) if len(copies) > 1 else copies[0]
    if len(copies) > 1:
        for copy in copies:
            copy.release()
    feed = TokenFeed(model, batch, lengths=[len(held) + len(ids) for ids in questions])
    prompts = [held + ids for ids in questions]
    return _decode(model, tokenizer, feed, batch, torch.cat(logits), prompts, max_new_tokens, start)


def _continue(model, tokenizer, prompt, cache: CompressedCache, chat_template, max_new_tokens):
    """Feed what ``prompt`` adds to the conversation ``cache`` holds, then decode."""
    ids = encode_prompt(tokenizer, prompt, chat_template)
    new = cache.continuation(ids)
    check_token_ids(new, getattr(model.config.get_text_config(), "vocab_size", None), "the new tokens")
    check_fits(model, len(ids), max_new_tokens)
    start = time.perf_counter()
    feed = TokenFeed(model, cache, lengths=[len(ids) - len(new)])
    logits = feed.extend([new])
    return _decode(model, tokenizer, feed, cache, logits, [ids], max_new_tokens, start)[0]


def ignored_generation_settings(model) -> list[str]:
    """The :data:`LOGITS_SETTINGS` the model's generation config sets away from transformers' defaults."""
    config = getattr(model, "generation_config", None)
    if config is None:
        return []
    default = GenerationConfig()
    return [
        f"{name}={getattr(config, name)!r}"
        for name in LOGITS_SETTINGS
        if getattr(config, name, None) != getattr(default, name, None)
    ]


def _generate_ids(
    model,
    tokenizer,
    encoded: list[list[int]],
    questions: list[list[int]] | None,
    cache: CompressedCache,
    max_new_tokens: int,
) -> list[GenerationOutput]:
    """Prefill ``encoded`` (then feed ``questions`` through the compressed cache) and decode greedily."""
    if cache.method.needs_scoring_pass and cache.batch_size <= 0:
        return [
            output
            for row, ids in enumerate(encoded)
            for output in _generate_reconstructed(
                model, tokenizer, ids, None if questions is None else questions[row], cache.settings, max_new_tokens
            )
        ]
    vocab_size = getattr(model.config.get_text_config(), "vocab_size", None)
    for row, ids in enumerate(encoded):
        check_token_ids(ids, vocab_size, "the prompt" if len(encoded) == 1 else f"prompt {row} of the batch")
        asked = questions[row] if questions is not None else []
        check_token_ids(asked, vocab_size, "the question")
        check_fits(model, len(ids) + len(asked), max_new_tokens)
    feed = TokenFeed(model, cache)
    start = time.perf_counter()
    logits = feed.prefill(encoded, pad_token_id(tokenizer))
    if questions is not None:
        logits = feed.extend(questions)
    prompts = [ids + (questions[row] if questions is not None else []) for row, ids in enumerate(encoded)]
    return _decode(model, tokenizer, feed, cache, logits, prompts, max_new_tokens, start)


def _generate_reconstructed(model, tokenizer, ids, question, settings, max_new_tokens) -> list[GenerationOutput]:
    """One prompt through a method that scores from a reconstruction pass (KVzip): recorded, read again, compressed."""
    vocab_size = getattr(model.config.get_text_config(), "vocab_size", None)
    check_token_ids(ids, vocab_size, "the prompt")
    asked = question or []
    check_token_ids(asked, vocab_size, "the question")
    check_fits(model, 2 * len(ids) + len(asked), max_new_tokens)
    start = time.perf_counter()
    record = PrefillRecord(model, torch.tensor([ids], device=model.device))
    record.reconstruct(tokenizer)
    cache = record.compress(
        settings.method,
        budget=settings.budget,
        progressive=settings.progressive,
        decode_budget=settings.decode_budget,
        decode_interval=settings.decode_interval,
        attention_path=settings.attention_path,
    )
    feed = TokenFeed(model, cache, lengths=[len(ids)])
    logits = record.logits if question is None else feed.extend([asked])
    return _decode(model, tokenizer, feed, cache, logits, [ids + asked], max_new_tokens, start)


def _decode(model, tokenizer, feed, cache, logits, prompts, max_new_tokens, start) -> list[GenerationOutput]:
    """Greedy tokens from ``logits`` on, with each row's statistics."""
    first_step = time.perf_counter()
    tokens = feed.greedy(logits, max_new_tokens, stop_token_ids(model, tokenizer))
    end = time.perf_counter()
    stats = cache.stats()
    outputs = []
    for row, sequence in enumerate(stats.sequences):
        figures = {f.name: getattr(sequence, f.name) for f in fields(SequenceStats)}
        outputs.append(
            GenerationOutput(
                text=tokenizer.decode(tokens[row], skip_special_tokens=True),
                token_ids=tokens[row],
                stats=GenerationStats(
                    **figures,
                    method=stats.method,
                    peak_prefill_bytes=stats.peak_prefill_bytes,
                    generated_tokens=len(tokens[row]),
                    prefill_seconds=first_step - start,
                    decode_seconds=end - first_step,
                ),
                history=list(prompts[row]) + list(tokens[row]),
            )
        )
    return outputs
