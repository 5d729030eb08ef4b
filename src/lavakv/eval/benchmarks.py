"""The benchmarks ``lavakv eval`` knows, and how each builds its samples."""

from __future__ import annotations

from .samples import Sample, check_count

BENCHMARKS = ("niah", "ruler", "longbench", "infinitebench")
FILE_BENCHMARKS = ("longbench", "infinitebench")
"""Benchmarks read from data files, whose prompts are cut to ``--max-length``; the others are built to fit."""
DEFAULT_NIAH_LENGTHS = [500, 1000, 2000]
DEFAULT_NIAH_DEPTHS = [0.0, 0.25, 0.5, 0.75, 1.0]
DEFAULT_RULER_LENGTHS = [1024, 2048]
DEFAULT_RULER_SAMPLES = 3


def build_samples(
    benchmark: str,
    tokenizer,
    data: str | None = None,
    datasets: list[str] | None = None,
    lengths: list[int] | None = None,
    depths: list[float] | None = None,
    limit: int | None = None,
    max_words: int | None = None,
    seed: int = 0,
    chat_template: bool = True,
) -> list[Sample]:
    """The samples of ``benchmark``; ``limit`` keeps the first N per dataset (per length for generated ones).

    ``chat_template`` says whether prompts will be wrapped in the tokenizer's chat template, which
    RULER counts in its lengths. RULER's ``qa_1`` / ``qa_2`` read their JSON files from ``data``.
    """
    check_count(limit, "--limit", minimum=1)
    check_count(max_words, "--max-words", minimum=1)
    if benchmark == "niah":
        from .niah import niah_samples

        samples = niah_samples(tokenizer, lengths or DEFAULT_NIAH_LENGTHS, depths or DEFAULT_NIAH_DEPTHS, seed=seed)
        if limit:
            per_length: dict[int, int] = {}
            kept = []
            for sample in samples:
                length = sample.extra["length"]
                per_length[length] = per_length.get(length, 0) + 1
                if per_length[length] <= limit:
                    kept.append(sample)
            samples = kept
        return samples
    if benchmark == "ruler":
        from .ruler import ruler_samples

        return ruler_samples(
            tokenizer,
            datasets,
            lengths or DEFAULT_RULER_LENGTHS,
            num_samples=limit or DEFAULT_RULER_SAMPLES,
            seed=seed,
            chat_template=chat_template,
            data=data,
        )
    if benchmark in ("longbench", "infinitebench"):
        if not data:
            raise ValueError(f"--benchmark {benchmark} reads its samples from a directory: give --data DIR")
        if benchmark == "longbench":
            from .longbench import load_longbench

            return load_longbench(data, datasets, limit=limit, max_words=max_words)
        from .infinitebench import load_infinitebench

        return load_infinitebench(data, datasets, limit=limit)
    raise ValueError(f"unknown benchmark {benchmark!r}; valid: {', '.join(BENCHMARKS)}")


def check_lengths_fit(
    benchmark: str, lengths: list[int] | None, datasets: list[str] | None, max_length: int, limit: str
) -> None:
    """Refuse generated prompt lengths that, with their answers, exceed ``max_length`` tokens.

    The runner cuts the middle of a prompt that does not fit, and with it the needle a NIAH or
    RULER sample is about, which then scores 0 without a word. ``limit`` says where
    ``max_length`` comes from ("the model's context", "--max-length"). Other benchmarks pass.
    """
    if benchmark == "niah":
        from .niah import NIAH_MAX_NEW_TOKENS, check_lengths

        lengths, new_tokens = check_lengths(lengths or DEFAULT_NIAH_LENGTHS), NIAH_MAX_NEW_TOKENS
    elif benchmark == "ruler":
        from .niah import check_lengths

        # RULER's lengths count the answer's room already.
        lengths, new_tokens = check_lengths(lengths or DEFAULT_RULER_LENGTHS), 0
    else:
        return
    too_long = [length for length in lengths if length + new_tokens > max_length]
    if too_long:
        raise ValueError(
            f"{benchmark} length {', '.join(map(str, too_long))} does not fit {limit} of {max_length} tokens "
            f"with max_new_tokens={new_tokens}: the prompt would be cut in the middle, needle included; "
            f"give --lengths of at most {max_length - new_tokens}"
        )
