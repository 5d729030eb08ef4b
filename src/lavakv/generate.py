"""``lavakv.generate``: prompts in, text and compression statistics out, through ``model.generate``."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from .cache import CompressedCache, check_budget
from .methods import Method, resolve_method

Prompt = str | list[int]


@dataclass
class GenerationStats:
    """What compression did for one prompt.

    ``kept_entries`` prompt entries are kept after prefill out of ``full_entries``
    (``prompt_length * kv_heads`` per layer, the window's length on a sliding-window layer);
    ``kv_bytes`` are the bytes of key/value tensors the cache holds for this prompt at the end
    (kept entries plus generated tokens) and
    ``full_kv_bytes`` what an uncompressed cache would hold. ``kept_positions[layer][kv_head]``
    lists the prompt positions kept; ``head_budgets[layer][kv_head]`` their count and
    ``layer_budgets[layer]`` the average per head.
    """

    method: str
    prompt_length: int
    budget: int
    window: int
    kept_entries: int
    full_entries: int
    kv_bytes: int
    full_kv_bytes: int
    index_bytes: int
    peak_prefill_bytes: int
    kept_positions: list[list[list[int]]] = field(repr=False)
    head_budgets: list[list[int]] = field(repr=False)
    layer_budgets: list[float] = field(repr=False)
    generated_tokens: int = 0
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0


@dataclass
class GenerationOutput:
    text: str
    token_ids: list[int]
    stats: GenerationStats


class _FirstStepClock(StoppingCriteria):
    """Records when the first token is out, which separates prefill time from decode time."""

    def __init__(self):
        self.first_step: float | None = None

    def __call__(self, input_ids, scores, **kwargs):
        if self.first_step is None:
            self.first_step = time.perf_counter()
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


def encode_prompt(tokenizer, prompt: Prompt, chat_template: bool) -> list[int]:
    """Token ids of one prompt: a string (through the chat template unless disabled) or ids as they are."""
    if isinstance(prompt, str):
        if not prompt.strip():
            raise ValueError("the prompt is empty")
        if chat_template and getattr(tokenizer, "chat_template", None):
            text = tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
            )
            return tokenizer(text, add_special_tokens=False)["input_ids"]
        return tokenizer(prompt)["input_ids"]
    if isinstance(prompt, (list, tuple)) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        if not prompt:
            raise ValueError("the prompt is empty (no token ids)")
        return list(prompt)
    raise TypeError(f"a prompt must be a string or a list of token ids, got {type(prompt).__name__}")


def _split_question(tokenizer, context: str, question: str, chat_template: bool) -> tuple[list[int], list[int]]:
    """Token ids of the context part and the question part of one query-agnostic prompt."""
    if not question.strip():
        raise ValueError("the question is empty")
    full = encode_prompt(tokenizer, context + "\n\n" + question, chat_template)
    text = tokenizer.decode(full)
    cut = text.rfind(question)
    context_ids = tokenizer(text[:cut], add_special_tokens=False)["input_ids"]
    question_ids = tokenizer(text[cut:], add_special_tokens=False)["input_ids"]
    return context_ids, question_ids


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
    budget: int | None = None,
    ratio: float | None = None,
    max_new_tokens: int = 64,
    chat_template: bool = True,
    question: str | list[str] | None = None,
    progressive: bool | None = None,
    **options,
) -> GenerationOutput | list[GenerationOutput]:
    """Generate greedily from ``prompt`` with the KV cache compressed by ``method``.

    ``prompt`` is a string, a list of token ids, or a list of either (a batch, left-padded,
    each prompt compressed on its own). ``budget`` is the number of prompt tokens kept per KV
    head per layer on average (window included); ``ratio`` gives it as a fraction of each
    prompt. With ``question`` (query-agnostic protocol) the prompt is the context: it is
    prefilled and compressed alone, then the question is fed through the compressed cache.
    Method options (``window``, ``alpha``, ...) go in ``options``.
    """
    resolved = resolve_method(method, **options)
    check_budget(resolved, budget, ratio)
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
    prompts, is_batch = _batch(prompt)
    if question is not None:
        questions = [question] * len(prompts) if isinstance(question, str) else list(question)
        if len(questions) != len(prompts):
            raise ValueError(f"got {len(questions)} questions for {len(prompts)} prompts")
        outputs = [
            _generate_one_query_agnostic(
                model, tokenizer, p, q, resolved, budget, ratio, max_new_tokens, chat_template, progressive
            )
            for p, q in zip(prompts, questions)
        ]
    else:
        encoded = [encode_prompt(tokenizer, p, chat_template) for p in prompts]
        outputs = _generate_ids(model, tokenizer, encoded, None, resolved, budget, ratio, max_new_tokens, progressive)
    return outputs if is_batch else outputs[0]


def _generate_one_query_agnostic(
    model, tokenizer, context, question, method, budget, ratio, max_new_tokens, chat_template, progressive
) -> GenerationOutput:
    if not isinstance(context, str):
        raise TypeError("the query-agnostic protocol takes the context as a string")
    context_ids, question_ids = _split_question(tokenizer, context, question, chat_template)
    return _generate_ids(
        model, tokenizer, [context_ids], question_ids, method, budget, ratio, max_new_tokens, progressive
    )[0]


def context_length(model) -> int | None:
    """The model's context length in tokens, if its config states one."""
    return getattr(model.config.get_text_config(), "max_position_embeddings", None)


def stop_token_ids(model, tokenizer) -> set[int]:
    """End-of-sequence ids: the generation config's, else the tokenizer's."""
    eos = model.generation_config.eos_token_id
    if eos is not None:
        return set(eos if isinstance(eos, list) else [eos])
    return {tokenizer.eos_token_id} if getattr(tokenizer, "eos_token_id", None) is not None else set()


def _generate_ids(model, tokenizer, encoded, question_ids, method, budget, ratio, max_new_tokens, progressive):
    limit = context_length(model)
    for ids in encoded:
        total = len(ids) + len(question_ids or []) + max_new_tokens
        if limit is not None and total > limit:
            raise ValueError(
                f"prompt of {len(ids) + len(question_ids or [])} tokens plus max_new_tokens={max_new_tokens} exceeds "
                f"the model's context of {limit} tokens"
            )
    device = model.device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    longest = max(len(ids) for ids in encoded)
    input_ids = torch.full((len(encoded), longest), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(encoded), longest), dtype=torch.long)
    for row, ids in enumerate(encoded):
        input_ids[row, longest - len(ids) :] = torch.tensor(ids)
        attention_mask[row, longest - len(ids) :] = 1
    input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)

    cache = CompressedCache(model, method=method, budget=budget, ratio=ratio, progressive=progressive)
    clock = _FirstStepClock()
    start = time.perf_counter()
    with torch.inference_mode():
        if question_ids is not None:
            model(input_ids=input_ids, attention_mask=attention_mask, past_key_values=cache, use_cache=True)
            question = torch.tensor([question_ids], device=device)
            input_ids = torch.cat([input_ids, question], dim=1)
            attention_mask = torch.cat([attention_mask, torch.ones_like(question)], dim=1)
        generated = model.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            past_key_values=cache,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=pad_id,
            stopping_criteria=StoppingCriteriaList([clock]),
        )
    end = time.perf_counter()
    first_step = clock.first_step or end
    new_tokens = generated[:, input_ids.shape[1] :]
    element_size = cache.layers[0].prefix_keys.element_size()
    head_dim = cache.layers[0].prefix_keys.shape[-1]
    outputs = []
    for row, stats in enumerate(cache.sequence_stats()):
        tokens = _strip_after_eos(new_tokens[row].tolist(), tokenizer, model)
        steps = cache.layers[0].appended
        kv_heads = len(stats.head_budgets[0])
        appended_entries = steps * kv_heads * cache.num_layers
        outputs.append(
            GenerationOutput(
                text=tokenizer.decode(tokens, skip_special_tokens=True),
                token_ids=tokens,
                stats=GenerationStats(
                    method=method.name,
                    prompt_length=stats.prompt_length,
                    budget=stats.budget,
                    window=stats.window,
                    kept_entries=stats.kept_entries,
                    full_entries=stats.full_entries,
                    kv_bytes=(stats.kept_entries + appended_entries) * 2 * head_dim * element_size,
                    full_kv_bytes=(stats.full_entries + appended_entries) * 2 * head_dim * element_size,
                    index_bytes=cache.index_bytes() // len(encoded),
                    peak_prefill_bytes=cache.peak_prefill_bytes,
                    kept_positions=stats.kept_positions,
                    head_budgets=stats.head_budgets,
                    layer_budgets=stats.layer_budgets,
                    generated_tokens=len(tokens),
                    prefill_seconds=first_step - start,
                    decode_seconds=end - first_step,
                ),
            )
        )
    if len(outputs) == 1:
        outputs[0].stats.kv_bytes = cache.kv_bytes()
    return outputs


def _strip_after_eos(tokens: list[int], tokenizer, model) -> list[int]:
    eos_ids = stop_token_ids(model, tokenizer)
    for index, token in enumerate(tokens):
        if token in eos_ids:
            return tokens[: index + 1]
    return tokens
