"""``lavakv.generate``: prompts in, text and compression statistics out, greedily.

Prompts are built by :mod:`lavakv.prompting`, decoded by :class:`lavakv.decoding.TokenFeed`, and
the statistics come from the cache's read API (:meth:`lavakv.CompressedCache.stats`).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, fields

from transformers import GenerationConfig

from .cache import CompressedCache, SequenceStats, check_budget
from .decoding import TokenFeed
from .methods import Budget, Method, resolve_method
from .prompting import Prompt, check_fits, check_token_ids, encode_prompt, pad_token_id, split_prompt, stop_token_ids

QUESTION_SEPARATOR = "\n\n"
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
    text: str
    token_ids: list[int]
    stats: GenerationStats


def _batch(prompt) -> tuple[list, bool]:
    if isinstance(prompt, str):
        return [prompt], False
    if isinstance(prompt, (list, tuple)) and prompt and all(isinstance(p, (str, list, tuple)) for p in prompt):
        return list(prompt), True
    return [prompt], False


def generate(
    model,
    tokenizer,
    prompt: Prompt | list[Prompt],
    method: str | Method = "lava",
    budget: int | Budget | None = None,
    ratio: float | None = None,
    max_new_tokens: int = 64,
    chat_template: bool = True,
    question: str | list[str] | None = None,
    progressive: bool | None = None,
    **options,
) -> GenerationOutput | list[GenerationOutput]:
    """Generate greedily from ``prompt`` with the KV cache compressed by ``method``.

    ``prompt`` is a string, a list of token ids, or a list of either (a batch, left-padded,
    each prompt compressed on its own). ``method`` is a :class:`~lavakv.Method` or a method spec
    (``"lava"``, ``"lava:heads=uniform"``). ``budget`` is the number of prompt tokens kept per KV
    head per layer on average (window included); ``ratio`` gives it as a fraction of each
    prompt. With ``question`` (query-agnostic protocol) the prompt is the context: the prompt
    ``context + "\\n\\n" + question`` is split where the question starts, the context is
    prefilled and compressed alone, then the question is fed through the compressed cache.
    Method options (``window``, ``alpha``, ...) go in ``options``; one the method does not take
    is an error.
    """
    resolved = resolve_method(method, **options)
    resolved_budget = check_budget(resolved, budget, ratio)
    ignored = ignored_generation_settings(model)
    if ignored:
        logger.warning(
            "lavakv.generate decodes by plain argmax and ignores the model's generation config settings %s; "
            "for them, call model.generate(..., cache=lavakv.CompressedCache(model, ...))",
            ", ".join(ignored),
        )
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
    prompts, is_batch = _batch(prompt)
    if question is not None:
        questions = [question] * len(prompts) if isinstance(question, str) else list(question)
        if len(questions) != len(prompts):
            raise ValueError(f"got {len(questions)} questions for {len(prompts)} prompts")
        outputs = []
        for context, asked in zip(prompts, questions):
            if not isinstance(context, str) or not isinstance(asked, str):
                raise TypeError("the query-agnostic protocol takes the context and the question as strings")
            if not asked.strip():
                raise ValueError("the question is empty")
            context_ids, question_ids = split_prompt(tokenizer, context + QUESTION_SEPARATOR, asked, chat_template)
            outputs += _generate_ids(
                model, tokenizer, [context_ids], [question_ids], resolved, resolved_budget, max_new_tokens, progressive
            )
    else:
        encoded = [encode_prompt(tokenizer, p, chat_template) for p in prompts]
        outputs = _generate_ids(
            model, tokenizer, encoded, None, resolved, resolved_budget, max_new_tokens, progressive
        )
    return outputs if is_batch else outputs[0]


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
    method: Method,
    budget: Budget | None,
    max_new_tokens: int,
    progressive: bool | None,
) -> list[GenerationOutput]:
    """Prefill ``encoded`` (then feed ``questions`` through the compressed cache) and decode greedily."""
    vocab_size = getattr(model.config.get_text_config(), "vocab_size", None)
    for row, ids in enumerate(encoded):
        check_token_ids(ids, vocab_size, "the prompt" if len(encoded) == 1 else f"prompt {row} of the batch")
        asked = questions[row] if questions is not None else []
        check_token_ids(asked, vocab_size, "the question")
        check_fits(model, len(ids) + len(asked), max_new_tokens)
    cache = CompressedCache(model, method=method, budget=budget, progressive=progressive)
    feed = TokenFeed(model, cache)
    start = time.perf_counter()
    logits = feed.prefill(encoded, pad_token_id(tokenizer))
    if questions is not None:
        logits = feed.extend(questions)
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
            )
        )
    return outputs
