"""Synthetic long-context tasks in the style of RULER (Hsieh et al. 2024, "RULER: What's the real
context size of your long-context language models?"), written afresh for lavakv.

Each task fills a requested prompt length in tokens for the tokenizer at hand and is fully
determined by ``(seed, task, length, index)``. Compared with one needle in a haystack, these
stress what KV-cache compression loses first: several look-alike needles (multikey), facts that
must all be kept (multivalue, multiquery), chains spread over the context (``vt``), and counting
over the whole context (``cwe``, ``fwe``). Answers are scored with ``string_match_all``.
"""

from __future__ import annotations

import math
import random
import uuid
from collections.abc import Callable, Sequence
from functools import partial

from lavakv.eval.niah import (
    EssayHaystack,
    check_lengths,
    count_tokens,
    essay_vocabulary,
    fit_length,
    insert_sentences,
    prompt_tokens,
    sentence_boundaries,
)
from lavakv.eval.samples import Sample, check_count
from lavakv.passkey import NOISE_SENTENCES

RULER_TASKS: tuple[str, ...] = (
    "niah_single_words",
    "niah_single_numbers",
    "niah_single_uuids",
    "niah_multikey",
    "niah_multivalue",
    "niah_multiquery",
    "vt",
    "cwe",
    "fwe",
)

# Room for the whole answer: a UUID alone takes about 36 tokens when digits are single tokens.
_MAX_NEW_TOKENS = {
    "niah_single_uuids": 48,
    "niah_multivalue": 48,
    "niah_multiquery": 48,
    "vt": 32,
    "cwe": 64,
    "fwe": 32,
}
_UNBOUNDED = 10**9


def ruler_samples(
    tokenizer, tasks: list[str] | None, lengths: list[int], num_samples: int, seed: int = 0
) -> list[Sample]:
    """``num_samples`` samples per task and length, each prompt ``length`` tokens long for ``tokenizer``.

    ``tasks`` are names from :data:`RULER_TASKS` (``None``: all of them). Prompts land within 2 %
    (at least 8 tokens) below ``length``, never above it. Prompts are plain text
    (``chat_template=False``), the context holding the haystack and the question ending with an
    answer cue that a small base or instruct model can simply continue.
    """
    tasks = list(RULER_TASKS) if tasks is None else _check_tasks(tasks)
    lengths = check_lengths(lengths)
    check_count(num_samples, "num_samples", minimum=1)
    haystack: list[EssayHaystack] = []

    def essays() -> EssayHaystack:
        if not haystack:
            haystack.append(EssayHaystack(tokenizer))
        return haystack[0]

    samples = []
    for task in tasks:
        for length in lengths:
            for index in range(num_samples):
                rng = random.Random(f"ruler:{task}:{seed}:{length}:{index}")
                what = f"ruler {task} at length {length}"
                if task.startswith("niah_"):
                    context, question, answers, total = _niah(tokenizer, essays, task, rng, length, what)
                else:
                    build = {"vt": _variable_tracking, "cwe": _common_words, "fwe": _frequent_words}[task]
                    context, question, answers, total = build(tokenizer, rng, length, what)
                samples.append(
                    Sample(
                        benchmark="ruler",
                        dataset=task,
                        sample_id=f"len{length}-{index}",
                        context=context,
                        question=question,
                        answers=answers,
                        max_new_tokens=_MAX_NEW_TOKENS.get(task, 32),
                        metric="string_match_all",
                        chat_template=False,
                        extra={"length": length, "prompt_tokens": total},
                    )
                )
    return samples


def ruler_max_new_tokens(tasks: list[str] | None) -> int:
    """The most tokens an answer of ``tasks`` (``None``: every task) may take."""
    tasks = list(RULER_TASKS) if tasks is None else _check_tasks(tasks)
    return max(_MAX_NEW_TOKENS.get(task, 32) for task in tasks)


def _check_tasks(tasks: Sequence[str]) -> list[str]:
    if isinstance(tasks, str) or not tasks:
        raise ValueError(f"tasks must be a non-empty list of task names (or None for all), got {tasks!r}")
    unknown = [t for t in tasks if t not in RULER_TASKS]
    if unknown:
        raise ValueError(f"unknown RULER task(s) {unknown}; valid names: {', '.join(RULER_TASKS)}")
    if len(set(tasks)) != len(tasks):
        raise ValueError(f"tasks must not repeat, got {list(tasks)}")
    return list(tasks)


def _fit_prompt(
    tokenizer, build: Callable[[int], str], question: str, length: int, max_size: int, slope: float, what: str
) -> tuple[str, int]:
    """The context built at the largest size whose prompt fits ``length``, and its prompt tokens."""
    seen: dict[int, tuple[str, int]] = {}

    def measure(size: int) -> int:
        context = build(size)
        seen[size] = (context, prompt_tokens(tokenizer, context, question))
        return seen[size][1]

    return seen[fit_length(measure, length, max_size, slope, what)]


def _distinct(make: Callable[[], str], count: int, taken: set[str] | None = None) -> list[str]:
    """``count`` different values from ``make``, none of them in ``taken`` (which is updated)."""
    taken = set() if taken is None else taken
    values: list[str] = []
    while len(values) < count:
        value = make()
        if value not in taken:
            taken.add(value)
            values.append(value)
    return values


def _magic_value(rng: random.Random, kind: str) -> str:
    if kind == "number":
        return str(rng.randint(1_000_000, 9_999_999))
    if kind == "uuid":
        return str(uuid.UUID(int=rng.getrandbits(128), version=4))
    return rng.choice(_long_words())


def _long_words() -> list[str]:
    return [w for w in essay_vocabulary() if len(w) >= 5]


def _niah(tokenizer, essays: Callable[[], EssayHaystack], task: str, rng: random.Random, length: int, what: str):
    """Magic-value needles at random sentence boundaries of the essays; the question asks for some of them."""
    kind = {"niah_single_words": "word", "niah_single_uuids": "uuid"}.get(task, "number")
    words = _long_words()
    num_keys = {"niah_multikey": 4, "niah_multiquery": 4}.get(task, 1)
    keys = _distinct(lambda: f"{rng.choice(words)}-{rng.choice(words)}", num_keys)
    values = _distinct(lambda: _magic_value(rng, kind), 4 if task == "niah_multivalue" else num_keys)
    if task == "niah_multivalue":
        needles = [(keys[0], value) for value in values]
    else:
        needles = list(zip(keys, values))
    sentences = [f"The special magic {kind} for {key} is: {value}." for key, value in needles]

    if task in ("niah_multivalue", "niah_multiquery"):
        if task == "niah_multivalue":
            asked, answers = keys, values
        else:
            asked = rng.sample(keys, rng.randint(2, 4))
            answers = [dict(needles)[key] for key in asked]
        names = asked[0] if len(asked) == 1 else ", ".join(asked[:-1]) + " and " + asked[-1]
        question = (
            f"\n\nQuestion: What are all the special magic {kind}s for {names} mentioned in the text above?\n"
            f"Answer: The special magic {kind}s for {names} are:"
        )
    else:
        target = rng.randrange(len(needles))
        key, answers = needles[target][0], [needles[target][1]]
        question = (
            f"\n\nQuestion: What is the special magic {kind} for {key} mentioned in the text above?\n"
            f"Answer: The special magic {kind} for {key} is:"
        )
    instruction = (
        f"Some special magic {kind}s are hidden in the text below. Memorize them: you will be asked about "
        "them afterwards.\n\n"
    )
    layout_seed = rng.getrandbits(64)
    haystack = essays()

    def build(size: int) -> str:
        layout = random.Random(layout_seed)
        text = haystack.text(size)
        bounds = sentence_boundaries(text)
        if len(bounds) >= len(sentences):
            places = layout.sample(bounds, len(sentences))
        else:
            places = [layout.choice(bounds) for _ in sentences]
        return instruction + insert_sentences(text, list(zip(places, sentences)))[0]

    context, total = _fit_prompt(tokenizer, build, question, length, len(haystack), 1.0, what)
    return context, question, answers, total


def _variable_tracking(tokenizer, rng: random.Random, length: int, what: str):
    """Chains of ``VAR A = 12345``, ``VAR B = A``... scattered through filler; asks for every name holding one value."""
    hops, chains = 4, 3
    letters = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
    names = _distinct(lambda: "".join(rng.choice(letters) for _ in range(5)), chains * (hops + 1))
    values = _distinct(lambda: str(rng.randint(10_000, 99_999)), chains)
    statements = []
    for c in range(chains):
        chain = names[c * (hops + 1) : (c + 1) * (hops + 1)]
        statements.append([f"VAR {chain[0]} = {values[c]}."] + [f"VAR {b} = {a}." for a, b in zip(chain, chain[1:])])
    instruction = (
        "The text below hides variable assignments, each starting with VAR, among filler sentences. "
        "Keep track of them.\n\n"
    )
    question = (
        f"\n\nQuestion: Following the assignments in the text above, which variables end up holding the value "
        f"{values[0]}?\nAnswer: The variables that hold {values[0]} are:"
    )
    layout_seed = rng.getrandbits(64)

    def build(size: int) -> str:
        layout = random.Random(layout_seed)
        order = [c for c in range(chains) for _ in range(hops + 1)]
        layout.shuffle(order)
        places = sorted(layout.randint(0, size) for _ in order)
        pending = [list(reversed(chain)) for chain in statements]
        at: dict[int, list[str]] = {}
        for place, c in zip(places, order):
            at.setdefault(place, []).append(pending[c].pop())
        sentences = []
        for i in range(size + 1):
            sentences.extend(at.get(i, ()))
            if i < size:
                sentences.append(NOISE_SENTENCES[i % len(NOISE_SENTENCES)])
        return instruction + " ".join(sentences)

    slope = count_tokens(tokenizer, " ".join(NOISE_SENTENCES)) / len(NOISE_SENTENCES)
    context, total = _fit_prompt(tokenizer, build, question, length, _UNBOUNDED, slope, what)
    return context, question, names[: hops + 1], total


def _common_words(tokenizer, rng: random.Random, length: int, what: str):
    """A numbered word list where 10 words repeat far more often than the rest; asks for those 10."""
    vocabulary = rng.sample(essay_vocabulary(), len(essay_vocabulary()))
    common, rare = vocabulary[:10], vocabulary[10:]
    instruction = "Below is a numbered list of words. Some of them are repeated many times.\n\n"
    question = (
        "\n\nQuestion: Which 10 words appear most often in the numbered list above?\n"
        "Answer: The 10 most common words in the list are:"
    )
    layout_seed = rng.getrandbits(64)
    probe = "\n".join(f"{i}. {w}" for i, w in enumerate(rare[:200], 1))
    per_line = count_tokens(tokenizer, probe) / 200
    lines = (length - prompt_tokens(tokenizer, instruction, question)) / per_line

    def build(repeats: int, size: int) -> str:
        layout = random.Random(layout_seed)
        kinds = min(len(rare), math.ceil(size / 3))
        items = common * repeats
        for k in range(kinds):
            items += [rare[k]] * (size // kinds + (k < size % kinds))
        layout.shuffle(items)
        return instruction + "\n".join(f"{i}. {w}" for i, w in enumerate(items, 1))

    # Common words repeat 30 times, fewer in short prompts but at least 4; rare words repeat 3 times
    # (more once the vocabulary runs out), always fewer than the common ones.
    estimate = max(4, min(30, int(0.03 * lines)))
    fits = (r for r in range(estimate, 4, -1) if prompt_tokens(tokenizer, build(r, 0), question) <= length)
    repeats = next(fits, 4)
    max_size = (repeats - 1) * len(rare)
    context, total = _fit_prompt(tokenizer, partial(build, repeats), question, length, max_size, per_line, what)
    return context, question, list(common), total


def _frequent_words(tokenizer, rng: random.Random, length: int, what: str):
    """Made-up words with Zipf-like counts (the r-th most common appears about K/r times); asks for the top 3."""
    letters = "abcdefghijklmnopqrstuvwxyz"
    taken: set[str] = set()
    words: list[str] = []

    def word(i: int) -> str:
        while len(words) <= i:
            words.extend(_distinct(lambda: "".join(rng.choice(letters) for _ in range(rng.randint(4, 6))), 1, taken))
        return words[i]

    instruction = "Below is a long sequence of made-up words. Some of them occur far more often than others.\n\n"
    question = (
        "\n\nQuestion: Which three made-up words occur most often in the sequence above?\n"
        "Answer: The three most frequent made-up words are:"
    )
    layout_seed = rng.getrandbits(64)
    per_word = count_tokens(tokenizer, " ".join(word(i) for i in range(200))) / 200
    budget = (length - prompt_tokens(tokenizer, instruction, question)) / per_word

    def zipf_total(top: int) -> int:
        return sum(top // r for r in range(1, top + 1))

    def build(top: int, size: int) -> str:
        layout = random.Random(layout_seed)
        items = [word(r - 1) for r in range(1, top + 1) for _ in range(top // r)]
        items += [word(top + i) for i in range(size)]
        layout.shuffle(items)
        return instruction + " ".join(items)

    # A top count of at least 12 keeps the counts of ranks 1-4 strictly decreasing: the answer is unique.
    # Singleton words fill what the Zipf part leaves.
    largest, above = 12, max(12, int(budget))
    while largest < above:
        middle = (largest + above + 1) // 2
        largest, above = (middle, above) if zipf_total(middle) <= budget else (largest, middle - 1)
    fits = (t for t in range(largest, 12, -1) if prompt_tokens(tokenizer, build(t, 0), question) <= length)
    top = next(fits, 12)
    context, total = _fit_prompt(tokenizer, partial(build, top), question, length, _UNBOUNDED, per_word, what)
    return context, question, [word(0), word(1), word(2)], total
