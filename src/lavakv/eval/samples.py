"""What every benchmark hands the runner: one :class:`Sample` per prompt."""

from __future__ import annotations

from dataclasses import dataclass, field


def check_count(value: int | None, name: str, minimum: int) -> int | None:
    """One rule for ``--limit`` and sample counts everywhere: ``None`` or an integer >= ``minimum``."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < minimum):
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


@dataclass
class Sample:
    """One evaluation prompt, split into the part that is compressed and the part after it.

    The prompt is exactly ``context + question``. In the query-agnostic protocol only
    ``context`` is prefilled and compressed, then ``question`` is fed through the compressed
    cache; in the query-aware protocol the whole prompt is prefilled and compressed. Templates
    therefore put everything up to and including the long document in ``context`` and the
    instructions and question that follow it in ``question``.

    ``sample_id`` is stable across runs (it keys the results store), unique within
    ``(benchmark, dataset)``. ``metric`` names a function in :mod:`lavakv.eval.metrics`.
    ``chat_template`` is the benchmark's standard choice for this sample (the runner may
    override it). ``extra`` carries what metrics or plots need (``all_classes``, ``depth``,
    ``length``, ``first_line``...); it must be JSON-serialisable. ``stop_at_newline`` ends the
    answer at its first line break after some text (needle answers, and the LongBench datasets
    scored on their first line): for answers that are one line, so that a
    model rambling on (often repeating the question, needle words included) neither costs decode
    time nor earns credit. ``answer_prefix`` is the start of the answer that follows the prompt
    (after the chat template's assistant turn opens), as RULER words its prompts; the prediction
    is what the model writes after it. ``error`` says why the record could not be made into a
    prompt (see :func:`error_sample`); the runner records it as an error row of every pair.
    """

    benchmark: str
    dataset: str
    sample_id: str
    context: str
    question: str
    answers: list[str]
    max_new_tokens: int
    metric: str
    chat_template: bool = False
    extra: dict = field(default_factory=dict)
    stop_at_newline: bool = False
    answer_prefix: str = ""
    error: str | None = None

    @property
    def prompt(self) -> str:
        return self.context + self.question


def error_sample(benchmark: str, dataset: str, sample_id: str, error: str) -> Sample:
    """A record that could not be built: no prompt, and the reason, which its rows will carry."""
    return Sample(benchmark, dataset, sample_id, "", "", [], 1, "", error=error)


def interleave_datasets(samples: list[Sample]) -> list[Sample]:
    """The samples taken round-robin across their ``(benchmark, dataset)``, each dataset in its own order.

    A run evaluates samples in this order, so that a run stopped part way (and committed as it
    goes) holds about as many samples of every dataset, and its averages cover them all.
    """
    queues: dict[tuple[str, str], list[Sample]] = {}
    for sample in samples:
        queues.setdefault((sample.benchmark, sample.dataset), []).append(sample)
    ordered: list[Sample] = []
    for position in range(max((len(queue) for queue in queues.values()), default=0)):
        ordered += [queue[position] for queue in queues.values() if position < len(queue)]
    return ordered
