"""InfiniteBench's English tasks with its own prompts and scoring (Zhang et al. 2024, OpenBMB/InfiniteBench).

Prompts are InfiniteBench's ``yarn_mistral_templates``, the set its repository uses for open base
models (Yarn-Mistral-7B-128K): plain text without a chat template, each ending with the start of
the answer ("The pass key is", "The correct option is:"). math_find's prompt starts with the
question InfiniteBench derives from the record ("What is the largest number in the following
list?"). Every template has the document in one place, so a sample's ``context`` is the template
up to and including the document and its ``question`` is the rest, which the query-agnostic
protocol feeds after compressing. Generation lengths are InfiniteBench's
(``DATA_NAME_TO_MAX_NEW_TOKENS``) and every task is scored by the rule of its ``compute_scores.py``
(see :mod:`lavakv.eval.metrics`); choice tasks get the label InfiniteBench builds, ``[option text,
option letter]``. Records are read in the layout of the published ``<task>.jsonl`` files: ``id``,
``context``, ``input``, ``answer`` and, for the choice tasks, ``options``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lavakv.eval.jsonl import check_dir, read_samples, resolve_names, string_field
from lavakv.eval.samples import Sample, check_count

__all__ = ["INFINITEBENCH_TASKS", "PROMPT_SET", "InfiniteBenchTask", "load_infinitebench"]

PROMPT_SET = "yarn_mistral_templates"
"""The InfiniteBench prompt set these tasks use, named as in its ``src/prompt.py``."""

_LETTERS = "ABCD"


@dataclass(frozen=True)
class InfiniteBenchTask:
    """How one task is prompted and scored.

    ``before`` is the template's text before the document and ``after`` the text after it, with
    ``{input}``, ``{func}``, ``{func_call}``, ``{prefix}`` and ``{OPTION_A}``..``{OPTION_D}`` filled
    from the record. Tasks with ``choice`` need four ``options`` and get ``[text, letter]`` answers.
    """

    metric: str
    max_new_tokens: int
    before: str
    after: str
    choice: bool = False


_OPTIONS = "\nA. {OPTION_A}\nB. {OPTION_B}\nC. {OPTION_C}\nD. {OPTION_D}"
_HIDDEN = "There is an important info hidden inside a lot of irrelevant text. Find it"

INFINITEBENCH_TASKS: dict[str, InfiniteBenchTask] = {
    "passkey": InfiniteBenchTask(
        "first_int_match",
        6,
        f"{_HIDDEN} and memorize them. I will quiz you about the important information there.\n\n",
        "\n\n{input}\n\nThe pass key is",
    ),
    "number_string": InfiniteBenchTask(
        "first_int_match",
        12,
        f"{_HIDDEN}. I will quiz you about the important information there.\n\n",
        "\n\n{input}\n\nThe sequence of digits is",
    ),
    "kv_retrieval": InfiniteBenchTask(
        "kv_retrieval_match",
        50,
        "Extract the value corresponding to the specified key in the JSON object below.\n\n",
        "\n\n{input}",
    ),
    "longbook_sum_eng": InfiniteBenchTask("rouge_lsum", 1200, "Summarize the book below.\n\n", "\n\nSummary:"),
    "longbook_choice_eng": InfiniteBenchTask(
        "book_choice",
        40,
        "Read the book and answer the question.\n\n",
        "\n\nQuestion: {input}" + _OPTIONS + "\n\nThe letter of the correct answer is",
        choice=True,
    ),
    "longbook_qa_eng": InfiniteBenchTask(
        "qa_f1",
        40,
        "Read the book and answer the question. Be very concise in your answer.\n\n",
        "\n\nQuestion: {input}\nAnswer:",
    ),
    "longdialogue_qa_eng": InfiniteBenchTask(
        "dialogue_name_match",
        40,
        'Below is a dialogue script where one random occurrence of a character name is replaced with "$$MASK$$", '
        "and you should try to guess who that character is.\n\n",
        "\n\nThe name that has been replaced with $$MASK$$ is likely",
    ),
    "math_find": InfiniteBenchTask("math_find_match", 3, "{prefix}\n\n", "\n\n{input}"),
    "math_calc": InfiniteBenchTask(
        "math_calc_prefix",
        30000,
        "Let us calculate the intermediate values of an expression.\n\nExpression: 1 + 3 + 4\nValues: [1, 4, 8]"
        "\n\nExpression: 8 - 3 + 2 - 4\nValues: [8, 5, 7, 3]\n\nExpression: ",
        "\nValues:",
    ),
    "code_run": InfiniteBenchTask(
        "code_run_match",
        5,
        "There is a function called {func} in the following Python code.\n\n",
        "\n\nPlease compute the exact value of {func_call}. The value of {func_call} is",
    ),
    "code_debug": InfiniteBenchTask(
        "code_debug_choice",
        5,
        "Following is a Python code where exactly one of the functions/methods has a deliberate error that makes it "
        "crash.\n\n",
        "\n\nOptions:" + _OPTIONS + "\n\nThe correct option is:",
        choice=True,
    ),
}

_MATH_FIND_TARGET = re.compile(r"The \w+ number")
_CODE_RUN_CALL = re.compile(r"func_[0-9]+\(-?[0-9]+\)")


def load_infinitebench(
    data_dir: str | Path,
    datasets: Iterable[str] | str | None = None,
    limit: int | None = None,
) -> list[Sample]:
    """Read InfiniteBench ``<task>.jsonl`` files from ``data_dir`` into samples.

    ``datasets=None`` takes every known task present in the directory, in sorted order; ``limit``
    keeps the first N records of each task. Answers (a string, a number or a list) become a list of
    strings; a record that cannot be read becomes an error sample naming its file, line and field.
    """
    check_count(limit, "limit", minimum=0)
    root = check_dir(data_dir, "InfiniteBench")
    names = resolve_names(root, datasets, sorted(INFINITEBENCH_TASKS), "InfiniteBench task")
    samples: list[Sample] = []
    for name in names:
        samples += read_samples(root / f"{name}.jsonl", "infinitebench", name, "id", _builder(name), limit)
    return samples


def _builder(name: str) -> Callable[[dict, str, str], Sample]:
    task = INFINITEBENCH_TASKS[name]

    def build(record: dict, where: str, sample_id: str) -> Sample:
        context = string_field(record, "context", where)
        fields = {"input": string_field(record, "input", where)}
        extra: dict[str, Any] = {"prompts": PROMPT_SET}
        if task.choice:
            options = _options(record, where)
            fields.update({f"OPTION_{letter}": option for letter, option in zip(_LETTERS, options)})
            answers = _choice_label(record, options, where)
            extra["options"] = options
        else:
            answers = _answers(record, where, keep_float=name == "math_find")
        if name == "math_find":
            fields["prefix"] = _math_find_question(fields["input"], where)
        if name == "code_run":
            fields["func_call"] = _code_run_call(fields["input"], where)
            fields["func"] = fields["func_call"].split("(", 1)[0]
        return Sample(
            benchmark="infinitebench",
            dataset=name,
            sample_id=sample_id,
            context=_fill(task.before, fields) + context,
            question=_fill(task.after, fields),
            answers=answers,
            max_new_tokens=task.max_new_tokens,
            metric=task.metric,
            chat_template=False,
            extra=extra,
        )

    return build


def _fill(template: str, fields: Mapping[str, str]) -> str:
    """``template`` with its ``{name}`` fields replaced; a literal replace, since documents hold braces."""
    for key, value in fields.items():
        template = template.replace("{" + key + "}", str(value))
    return template


def _math_find_question(inp: str, where: str) -> str:
    """The question InfiniteBench puts before math_find's list: "What is the largest number in the following list?".

    The target is the first "The <word> number" of the record's input, as InfiniteBench finds it.
    """
    found = _MATH_FIND_TARGET.search(inp)
    if found is None:
        raise ValueError(f"{where}: math_find field 'input' names no target ('The <word> number'), got {inp!r:.200}")
    return f"What is {found.group().lower()} in the following list?"


def _code_run_call(inp: str, where: str) -> str:
    """The call code_run asks about (``func_6577(-7)``): the first in the input, as InfiniteBench reads it."""
    found = _CODE_RUN_CALL.search(inp)
    if found is None:
        raise ValueError(f"{where}: code_run field 'input' names no call like 'func_1(-2)', got {inp!r:.200}")
    return found.group()


def _answer_text(value: Any, keep_float: bool) -> str | None:
    """One answer as text; integral floats drop the ``.0`` a model never writes, unless the type is scored."""
    if isinstance(value, bool):
        return None
    if isinstance(value, str):
        return value
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return repr(value) if keep_float or not value.is_integer() else str(int(value))
    return None


def _answers(record: Mapping[str, Any], where: str, keep_float: bool = False) -> list[str]:
    if "answer" not in record:
        raise ValueError(f"{where}: missing required field 'answer'")
    raw = record["answer"]
    values = raw if isinstance(raw, list) else [raw]
    answers = [_answer_text(v, keep_float) for v in values]
    if not answers or any(a is None for a in answers):
        raise ValueError(
            f"{where}: field 'answer' must be a string, a number or a non-empty list of them, got {raw!r:.200}"
        )
    return answers


def _options(record: Mapping[str, Any], where: str) -> list[str]:
    if "options" not in record:
        raise ValueError(f"{where}: missing required field 'options'")
    options = record["options"]
    if not isinstance(options, list) or len(options) != len(_LETTERS) or not all(isinstance(o, str) for o in options):
        raise ValueError(f"{where}: field 'options' must be a list of 4 strings (A-D), got {options!r:.200}")
    return options


def _choice_label(record: Mapping[str, Any], options: list[str], where: str) -> list[str]:
    """``[option text, option letter]``, InfiniteBench's label for choice tasks (its ``get_answer``)."""
    raw = _answers(record, where)
    if len(raw) == 2 and raw[1] in tuple(_LETTERS):
        return raw
    if len(raw) == 1 and raw[0] in options:
        return [raw[0], _LETTERS[options.index(raw[0])]]
    raise ValueError(
        f"{where}: field 'answer' must be one of the options {options!r:.200} (or [text, letter]), got {raw!r:.200}"
    )
