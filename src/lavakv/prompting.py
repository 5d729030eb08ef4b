"""One prompt builder for ``generate`` and ``eval``: chat template, context/question split, truncation, limits.

A prompt is either one piece (query-aware: prefilled whole) or a context and a question whose
concatenation is the prompt (query-agnostic: the context is compressed, then the question is fed
through the compressed cache). ``generate`` and ``eval`` split a prompt the same way: the whole
prompt goes through the chat template once, and the templated text is cut where the question
starts, so the two parts decode to exactly the templated prompt.
"""

from __future__ import annotations

QUESTION_SEPARATOR = "\n\n"
"""What joins a context and its question in the query-agnostic protocol."""

Prompt = str | list[int] | list[dict]
"""A string, token ids, or a chat: ``{"role": ..., "content": ...}`` messages."""


def is_single_prompt(prompt) -> bool:
    """Whether ``prompt`` is one prompt (a string, a list of token ids, or a chat), not a batch of them."""
    if isinstance(prompt, str):
        return True
    if isinstance(prompt, (list, tuple)) and prompt:
        if all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            return True
        return all(isinstance(m, dict) for m in prompt)
    return False


def uses_chat_template(tokenizer, chat_template: bool) -> bool:
    """Whether a prompt is wrapped in the tokenizer's chat template (asked for, and the tokenizer has one)."""
    return bool(chat_template) and bool(getattr(tokenizer, "chat_template", None))


def _templated(tokenizer, text: str) -> str:
    messages = [{"role": "user", "content": text}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def encode_prompt(tokenizer, prompt: Prompt, chat_template: bool) -> list[int]:
    """Token ids of one prompt: a string (through the chat template unless disabled), ids as they are, or a
    chat (its messages through the chat template, ending with the assistant's turn to speak)."""
    if isinstance(prompt, (list, tuple)) and prompt and all(isinstance(m, dict) for m in prompt):
        return _encode_chat(tokenizer, list(prompt))
    if isinstance(prompt, str):
        if not prompt.strip():
            raise ValueError("the prompt is empty")
        if uses_chat_template(tokenizer, chat_template):
            return list(tokenizer(_templated(tokenizer, prompt), add_special_tokens=False)["input_ids"])
        return list(tokenizer(prompt)["input_ids"])
    if isinstance(prompt, (list, tuple)) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        if not prompt:
            raise ValueError("the prompt is empty (no token ids)")
        return list(prompt)
    raise TypeError(
        f"a prompt must be a string, a list of token ids or a list of chat messages, got {type(prompt).__name__}"
    )


def _encode_chat(tokenizer, messages: list[dict]) -> list[int]:
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("a chat prompt needs a tokenizer with a chat template; give a string or token ids instead")
    for index, message in enumerate(messages):
        if not {"role", "content"} <= set(message) or not isinstance(message.get("content"), str):
            raise ValueError(f"chat message {index} must have a 'role' and a string 'content', got {message!r}")
    if messages[-1]["role"] == "assistant":
        raise ValueError("the chat ends with the assistant's message; end it with the turn to answer")
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def check_token_ids(ids: list[int], vocab_size: int | None, what: str = "the prompt") -> None:
    """Refuse token ids outside ``[0, vocab_size)`` with the bad id and the vocabulary size."""
    if vocab_size is None:
        return
    for position, token in enumerate(ids):
        if not 0 <= token < vocab_size:
            raise ValueError(
                f"token id {token} at position {position} of {what} is outside the model's vocabulary "
                f"of {vocab_size} ids (valid: 0 to {vocab_size - 1})"
            )


def split_prompt(
    tokenizer, context: str, question: str, chat_template: bool, name: str = "the prompt", answer_prefix: str = ""
) -> tuple[list[int], list[int]]:
    """Token ids of the context part and of the question part of the prompt ``context + question``.

    Without a template the context is tokenized with the tokenizer's special tokens and the
    question (which may be empty) without them. With one, the templated text is cut where the question starts, so the
    template's closing part (the assistant turn) goes with the question. ``answer_prefix`` (the
    start of the answer a benchmark such as RULER puts in the model's mouth) follows the template,
    in the assistant's turn, and goes with the question part.
    """
    if not isinstance(context, str) or not isinstance(question, str):
        raise TypeError("the query-agnostic protocol takes the context and the question as strings")
    if not context.strip():
        raise ValueError(f"{name}: the context is empty")
    if not uses_chat_template(tokenizer, chat_template):
        context_ids = tokenizer(context)["input_ids"]
        after = question + answer_prefix
        question_ids = tokenizer(after, add_special_tokens=False)["input_ids"] if after else []
        return list(context_ids), list(question_ids)
    text = _templated(tokenizer, context + question) + answer_prefix
    cut = _question_start(text[: len(text) - len(answer_prefix)], context, question, name)
    context_ids = tokenizer(text[:cut], add_special_tokens=False)["input_ids"]
    question_ids = tokenizer(text[cut:], add_special_tokens=False)["input_ids"]
    return list(context_ids), list(question_ids)


def prompt_ids(tokenizer, context: str, question: str, chat_template: bool, answer_prefix: str = "") -> list[int]:
    """Token ids of the whole prompt ``context + question``, tokenized at once as benchmarks' own scripts do.

    :func:`split_prompt` tokenizes the two parts apart, which can differ where they meet (a run of
    newlines split in two is two tokens, not one); a prompt fed whole is fed as these ids.
    """
    if not uses_chat_template(tokenizer, chat_template):
        return list(tokenizer(context + question + answer_prefix)["input_ids"])
    text = _templated(tokenizer, context + question) + answer_prefix
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


CHAT_MARKER = "\u2063lavakv-marker\u2063"
"""A string no prompt contains, to read where the chat template puts the user's message."""


def chat_text(tokenizer, text: str, chat_template: bool) -> str:
    """``text`` as the model reads it: inside the chat template's user turn when one is used, else as it is."""
    return _templated(tokenizer, text) if uses_chat_template(tokenizer, chat_template) else text


def _template_around(tokenizer) -> tuple[str, str]:
    """The chat template's text before and after the user's message."""
    text = _templated(tokenizer, CHAT_MARKER)
    cut = text.rfind(CHAT_MARKER)
    return text[:cut], text[cut + len(CHAT_MARKER) :]


def context_ids(tokenizer, context: str, chat_template: bool) -> list[int]:
    """The context part of the query-agnostic prompt ``context + "\n\n" + question``, whatever the question.

    Equal to :func:`split_prompt`'s first part (the template's opening and the context), so that a
    context compressed once can be asked any question later.
    """
    if not isinstance(context, str) or not context.strip():
        raise ValueError("the context is empty")
    text = context + QUESTION_SEPARATOR
    if not uses_chat_template(tokenizer, chat_template):
        return list(tokenizer(text)["input_ids"])
    before, _ = _template_around(tokenizer)
    return list(tokenizer(before + text, add_special_tokens=False)["input_ids"])


def question_ids(tokenizer, question: str, chat_template: bool) -> list[int]:
    """The question part of the query-agnostic prompt: :func:`split_prompt`'s second part, without the context."""
    if not isinstance(question, str) or not question.strip():
        raise ValueError(f"the question is empty, got {question!r}")
    if not uses_chat_template(tokenizer, chat_template):
        return list(tokenizer(question, add_special_tokens=False)["input_ids"])
    _, after = _template_around(tokenizer)
    return list(tokenizer(question + after, add_special_tokens=False)["input_ids"])


def _question_start(text: str, context: str, question: str, name: str) -> int:
    for piece in (question, question.strip()):
        if piece:
            index = text.rfind(piece)
            if index >= 0:
                return index
    index = text.rfind(context.strip())
    if index < 0:
        raise ValueError(f"{name}: the chat template changed the prompt beyond recognition")
    return index + len(context.strip())


def truncate_middle(tokenizer, text: str, max_length: int) -> tuple[str, bool]:
    """``text`` cut to ``max_length`` tokens in the middle, as LongBench's ``pred.py`` cuts its prompts.

    The text is tokenized as the tokenizer does by default (special tokens included); when it
    has more than ``max_length`` tokens, its first and last ``max_length // 2`` tokens are each
    decoded without special tokens and the two texts joined. LongBench cuts in the middle because
    its instructions sit at both ends of a prompt. Returns the text and whether it was cut.
    """
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 2:
        raise ValueError(f"max_length must be an integer >= 2 (tokens kept of a prompt), got {max_length!r}")
    ids = list(tokenizer(text)["input_ids"])
    if len(ids) <= max_length:
        return text, False
    half = max_length // 2
    head = tokenizer.decode(ids[:half], skip_special_tokens=True)
    tail = tokenizer.decode(ids[len(ids) - half :], skip_special_tokens=True)
    return head + tail, True


def context_length(model) -> int | None:
    """The model's context length in tokens, if its config states one."""
    return getattr(model.config.get_text_config(), "max_position_embeddings", None)


def check_fits(model, prompt_tokens: int, max_new_tokens: int) -> None:
    """Refuse a prompt that, with its answer, exceeds the model's context."""
    limit = context_length(model)
    if limit is not None and prompt_tokens + max_new_tokens > limit:
        raise ValueError(
            f"prompt of {prompt_tokens} tokens plus max_new_tokens={max_new_tokens} exceeds the model's context of "
            f"{limit} tokens"
        )


def stop_token_ids(model, tokenizer) -> set[int]:
    """End-of-sequence ids: the generation config's, else the tokenizer's."""
    eos = model.generation_config.eos_token_id
    if eos is not None:
        return set(eos if isinstance(eos, list) else [eos])
    return {tokenizer.eos_token_id} if getattr(tokenizer, "eos_token_id", None) is not None else set()


def pad_token_id(tokenizer) -> int:
    """The id used to left-pad a batch: the tokenizer's pad token, else its end-of-sequence token, else 0."""
    for name in ("pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, name, None)
        if value is not None:
            return value
    return 0
