"""InfiniteBench reader for the English tasks, with this project's own short prompts.

Each prompt puts the long document first and the instruction and question after it, so that the
query-agnostic protocol can compress the document before it has seen the question. Generation
lengths are InfiniteBench's. Every task is fed as a plain prompt (``chat_template=False``): the
prompts end with an ``Answer:`` cue that a base model continues directly, and the runner can still
wrap them in a chat template when evaluating an instruction-tuned model.
"""

from __future__ import annotations

import string
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lavakv.eval.jsonl import check_dir, check_unique, read_jsonl, resolve_names, string_field
from lavakv.eval.samples import Sample, check_count

__all__ = ["INFINITEBENCH_TASKS", "InfiniteBenchTask", "load_infinitebench"]


@dataclass(frozen=True)
class InfiniteBenchTask:
    """How one task is prompted and scored.

    ``intro`` goes before the document, ``instruction`` after it and before the question. Tasks
    with ``choice`` list their options as lettered lines and need an ``options`` field.
    """

    metric: str
    max_new_tokens: int
    intro: str
    instruction: str
    choice: bool = False


INFINITEBENCH_TASKS: dict[str, InfiniteBenchTask] = {
    "passkey": InfiniteBenchTask(
        "first_int_match",
        6,
        "A pass key is hidden somewhere in the following text.",
        "Reply with the pass key only, as a number.",
    ),
    "number_string": InfiniteBenchTask(
        "first_int_match",
        12,
        "A long sequence of digits is hidden somewhere in the following text.",
        "Reply with that digit sequence only.",
    ),
    "kv_retrieval": InfiniteBenchTask(
        "kv_match",
        50,
        "The following JSON object maps keys to values.",
        "Look up the key named below and reply with its value only.",
    ),
    "longbook_qa_eng": InfiniteBenchTask(
        "qa_f1",
        40,
        "Read the following book.",
        "Using the book above, answer the question in as few words as possible.",
    ),
    "longbook_choice_eng": InfiniteBenchTask(
        "choice",
        40,
        "Read the following book.",
        "Using the book above, pick the option that answers the question. Reply with its letter only.",
        choice=True,
    ),
    "math_find": InfiniteBenchTask(
        "first_number_match",
        3,
        "The following is a list of numbers.",
        "Work out the value asked for below from the list above. Reply with one number only.",
    ),
    "code_debug": InfiniteBenchTask(
        "choice",
        5,
        "The following is the source code of a program. One of its functions contains a deliberate bug.",
        "Which of the functions below contains the bug? Reply with the letter of that option only.",
        choice=True,
    ),
}


def load_infinitebench(
    data_dir: str | Path,
    datasets: Iterable[str] | str | None = None,
    limit: int | None = None,
) -> list[Sample]:
    """Read InfiniteBench ``<task>.jsonl`` files from ``data_dir`` into samples.

    ``datasets=None`` takes every known task present in the directory, in sorted order; ``limit``
    keeps the first N samples of each task. Answers (a string, a number or a list) become a list of
    strings so that every metric sees one shape; choice tasks also carry ``extra["options"]``.
    """
    check_count(limit, "limit", minimum=0)
    root = check_dir(data_dir, "InfiniteBench")
    names = resolve_names(root, datasets, sorted(INFINITEBENCH_TASKS), "InfiniteBench task")
    samples: list[Sample] = []
    for name in names:
        task = INFINITEBENCH_TASKS[name]
        path = root / f"{name}.jsonl"
        seen: set[str] = set()
        for count, (line_no, record) in enumerate(read_jsonl(path)):
            if limit is not None and count >= limit:
                break
            where = f"{path}:{line_no}"
            context = string_field(record, "context", where)
            inp = string_field(record, "input", where)
            answers = _answers(record, where)
            options = _options(record, where) if task.choice else None
            sample_id = str(record["id"]) if record.get("id") is not None else f"{name}-{line_no}"
            check_unique(sample_id, seen, where)
            samples.append(
                Sample(
                    benchmark="infinitebench",
                    dataset=name,
                    sample_id=sample_id,
                    context=f"{task.intro}\n\n{context}",
                    question=_question(task, inp, options),
                    answers=answers,
                    max_new_tokens=task.max_new_tokens,
                    metric=task.metric,
                    chat_template=False,
                    extra={"options": options} if options is not None else {},
                )
            )
    return samples


def _question(task: InfiniteBenchTask, inp: str, options: list[str] | None) -> str:
    lines = [f"Question: {inp.strip()}"] if inp.strip() else []
    lines += [f"{letter}. {text}" for letter, text in zip(string.ascii_uppercase, options or [])]
    body = "\n".join(lines)
    return f"\n\n{task.instruction}\n\n{body}\nAnswer:" if body else f"\n\n{task.instruction}\nAnswer:"


def _answer_text(value: Any) -> str | None:
    """One answer as text; integral floats drop the ``.0`` that a model would never write."""
    if isinstance(value, bool):
        return None
    if isinstance(value, str):
        return value
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return str(int(value)) if value.is_integer() else repr(value)
    return None


def _answers(record: Mapping[str, Any], where: str) -> list[str]:
    if "answer" not in record:
        raise ValueError(f"{where}: missing required field 'answer'")
    raw = record["answer"]
    values = raw if isinstance(raw, list) else [raw]
    answers = [_answer_text(v) for v in values]
    if not answers or any(a is None for a in answers):
        raise ValueError(
            f"{where}: field 'answer' must be a string, a number or a non-empty list of them, got {raw!r:.200}"
        )
    return answers


def _options(record: Mapping[str, Any], where: str) -> list[str]:
    if "options" not in record:
        raise ValueError(f"{where}: missing required field 'options'")
    options = record["options"]
    if (
        not isinstance(options, list)
        or not 0 < len(options) <= len(string.ascii_uppercase)
        or not all(isinstance(o, str) for o in options)
    ):
        raise ValueError(f"{where}: field 'options' must be a list of 1 to 26 strings, got {options!r:.200}")
    return options
