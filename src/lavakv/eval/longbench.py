"""LongBench (and LongBench-E) reader: one :class:`Sample` per record, with LongBench's own prompts.

The prompt templates and generation lengths are LongBench's published ones (packaged under
``data/``, see ``data/NOTICE.md``) so that scores stay comparable with the literature. A data
directory may carry its own ``_prompts.json`` / ``_maxlen.json`` to override them per dataset.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

from lavakv.eval.jsonl import check_dir, read_samples, resolve_names, string_field
from lavakv.eval.samples import Sample, check_count

__all__ = ["LONGBENCH_DATASETS", "LongBenchSpec", "load_longbench", "longbench_prompts", "longbench_maxlen"]

LONGBENCH_E_SUFFIX = "_e"
logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LongBenchSpec:
    """How LongBench scores and feeds one dataset.

    ``chat_template`` is False for the few-shot and code-completion sets, which LongBench feeds to
    chat models as raw text because a chat wrapper breaks the pattern the model must continue.
    ``first_line`` marks the few-shot sets whose prediction is cut at its first line before scoring,
    since models keep inventing further examples. ``language`` is ``en``, ``zh`` or ``code``.
    """

    metric: str
    chat_template: bool = True
    first_line: bool = False
    language: str = "en"


LONGBENCH_DATASETS: dict[str, LongBenchSpec] = {
    "narrativeqa": LongBenchSpec("qa_f1"),
    "qasper": LongBenchSpec("qa_f1"),
    "multifieldqa_en": LongBenchSpec("qa_f1"),
    "multifieldqa_zh": LongBenchSpec("qa_f1_zh", language="zh"),
    "hotpotqa": LongBenchSpec("qa_f1"),
    "2wikimqa": LongBenchSpec("qa_f1"),
    "musique": LongBenchSpec("qa_f1"),
    "dureader": LongBenchSpec("rouge_l_zh", language="zh"),
    "gov_report": LongBenchSpec("rouge_l"),
    "qmsum": LongBenchSpec("rouge_l"),
    "multi_news": LongBenchSpec("rouge_l"),
    "vcsum": LongBenchSpec("rouge_l_zh", language="zh"),
    "trec": LongBenchSpec("classification", chat_template=False, first_line=True),
    "triviaqa": LongBenchSpec("qa_f1", chat_template=False, first_line=True),
    "samsum": LongBenchSpec("rouge_l", chat_template=False, first_line=True),
    "lsht": LongBenchSpec("classification", chat_template=False, first_line=True, language="zh"),
    "passage_count": LongBenchSpec("count"),
    "passage_retrieval_en": LongBenchSpec("retrieval"),
    "passage_retrieval_zh": LongBenchSpec("retrieval_zh", language="zh"),
    "lcc": LongBenchSpec("code_sim", chat_template=False, language="code"),
    "repobench-p": LongBenchSpec("code_sim", chat_template=False, language="code"),
}

LONGBENCH_CATEGORIES: dict[str, tuple[str, ...]] = {
    "single-doc QA": ("narrativeqa", "qasper", "multifieldqa_en", "multifieldqa_zh"),
    "multi-doc QA": ("hotpotqa", "2wikimqa", "musique", "dureader"),
    "summarization": ("gov_report", "qmsum", "multi_news", "vcsum"),
    "few-shot": ("trec", "triviaqa", "samsum", "lsht"),
    "synthetic": ("passage_count", "passage_retrieval_en", "passage_retrieval_zh"),
    "code": ("lcc", "repobench-p"),
}
"""LongBench's six task categories (Bai et al. 2023, Table 1); a LongBench-E file is in its dataset's category."""


def longbench_category(dataset: str) -> str | None:
    """The category of ``dataset`` (``qasper`` or ``qasper_e``), ``None`` for a name LongBench does not have."""
    base = dataset.removesuffix("_e")
    return next((name for name, members in LONGBENCH_CATEGORIES.items() if base in members), None)


_CONTEXT = "{context}"
_INPUT = "{input}"


def _read_packaged(name: str) -> dict:
    return json.loads(resources.files("lavakv.eval").joinpath("data", name).read_text(encoding="utf-8"))


@lru_cache(maxsize=1)
def _packaged_tables() -> tuple[dict[str, str], dict[str, int]]:
    return _read_packaged("longbench_prompts.json"), _read_packaged("longbench_maxlen.json")


def longbench_prompts() -> dict[str, str]:
    """LongBench's standard prompt template for each dataset (a copy: callers may edit it)."""
    return dict(_packaged_tables()[0])


def longbench_maxlen() -> dict[str, int]:
    """LongBench's standard ``max_new_tokens`` for each dataset (a copy: callers may edit it)."""
    return dict(_packaged_tables()[1])


def load_longbench(
    data_dir: str | Path,
    datasets: Iterable[str] | str | None = None,
    limit: int | None = None,
    max_words: int | None = None,
) -> list[Sample]:
    """Read LongBench / LongBench-E ``<name>.jsonl`` files from ``data_dir`` into samples.

    ``datasets=None`` takes every known dataset (plain or ``_e``) present in the directory, in sorted
    order; other files there are ignored. ``max_words`` keeps samples whose ``length`` field (words for
    English, characters for Chinese, as LongBench counts) is at most that, so a model with a short
    window can still be evaluated on the samples it can hold; ``limit`` then keeps the first N of each
    dataset in file order. A record that cannot be read (bad JSON, a missing or mistyped field, a
    duplicate id) becomes an error sample whose message names the file, line and field, and the run
    records it as an error row; a ``max_words`` that leaves no sample at all is an error naming how
    many it removed and the shortest length.
    """
    check_count(limit, "limit", minimum=0)
    check_count(max_words, "max_words", minimum=1)
    root = check_dir(data_dir, "LongBench")
    names = resolve_names(root, datasets, _longbench_names(), "LongBench dataset")
    prompts, maxlen = _tables_for(root)
    samples: list[Sample] = []
    too_long: dict[str, list[int]] = {}
    for name in names:
        base = _base_name(name)
        spec = LONGBENCH_DATASETS[base]
        path = root / f"{name}.jsonl"
        head, tail = _split_template(prompts[base], base)

        def build(record: dict, where: str, sample_id: str, name=name, spec=spec, head=head, tail=tail, base=base):
            inp = string_field(record, "input", where)
            context = string_field(record, "context", where)
            answers = _answers(record, where)
            language = record.get("language") or spec.language
            length = record.get("length")
            if max_words is not None:
                if length is None:
                    length = _approx_length(context + inp, language)
                elif not isinstance(length, int) or isinstance(length, bool):
                    raise ValueError(f"{where}: field 'length' must be an integer, got {length!r}")
                if length > max_words:
                    too_long.setdefault(name, []).append(length)
                    return None
            return Sample(
                benchmark="longbench",
                dataset=name,
                sample_id=sample_id,
                context=head.replace(_INPUT, inp) + context,
                question=tail.replace(_INPUT, inp),
                answers=answers,
                max_new_tokens=maxlen[base],
                metric=spec.metric,
                chat_template=spec.chat_template,
                extra={
                    "all_classes": record.get("all_classes"),
                    "length": length,
                    "language": language,
                    "first_line": spec.first_line,
                },
                stop_at_newline=spec.first_line,
            )

        samples += read_samples(path, "longbench", name, "_id", build, limit)
    _check_filtered(samples, too_long, names, max_words)
    return samples


def _check_filtered(samples: list[Sample], too_long: dict[str, list[int]], names: list[str], max_words: int) -> None:
    """Say when ``max_words`` emptied datasets: an error if it left nothing at all, else a warning for each."""
    removed = sum(len(lengths) for lengths in too_long.values())
    if removed and not samples:
        shortest = min(min(lengths) for lengths in too_long.values())
        chinese = any(LONGBENCH_DATASETS[_base_name(name)].language == "zh" for name in too_long)
        unit = "words long (characters for Chinese)" if chinese else "words long"
        raise ValueError(
            f"max_words={max_words} removed all {removed} samples of LongBench {', '.join(names)}: the shortest "
            f"is {shortest} {unit}; give max_words >= {shortest}"
        )
    kept = {sample.dataset for sample in samples}
    for name, lengths in too_long.items():
        if name not in kept:
            message = "max_words=%d removed all %d samples of LongBench %s (the shortest is %d words long)"
            logger.warning(message, max_words, len(lengths), name, min(lengths))


def _longbench_names() -> list[str]:
    return sorted([*LONGBENCH_DATASETS, *(n + LONGBENCH_E_SUFFIX for n in LONGBENCH_DATASETS)])


def _base_name(name: str) -> str:
    if name not in LONGBENCH_DATASETS and name.endswith(LONGBENCH_E_SUFFIX):
        return name[: -len(LONGBENCH_E_SUFFIX)]
    return name


def _split_template(template: str, dataset: str) -> tuple[str, str]:
    """Template text up to ``{context}`` and after it, so the document ends the compressed part."""
    if template.count(_CONTEXT) != 1:
        raise ValueError(f"prompt template for {dataset!r} must contain {_CONTEXT} exactly once: {template!r}")
    head, tail = template.split(_CONTEXT)
    return head, tail


def _approx_length(text: str, language: str) -> int:
    """LongBench's ``length`` when a record lacks it: characters for Chinese, words otherwise."""
    return len(text) if language == "zh" else len(text.split())


def _tables_for(root: Path) -> tuple[dict[str, str], dict[str, int]]:
    prompts, maxlen = longbench_prompts(), longbench_maxlen()
    prompts.update(_override(root / "_prompts.json", str))
    maxlen.update(_override(root / "_maxlen.json", int))
    return prompts, maxlen


def _override(path: Path, kind: type) -> dict:
    """The entries of a data-directory override file that name known datasets."""
    if not path.is_file():
        return {}
    try:
        table = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from err
    if not isinstance(table, dict):
        raise ValueError(f"{path}: expected a JSON object mapping dataset names to values")
    out = {}
    for name, value in table.items():
        if name not in LONGBENCH_DATASETS:
            continue
        if not isinstance(value, kind) or isinstance(value, bool):
            raise ValueError(f"{path}: entry {name!r} must be a {kind.__name__}, got {value!r}")
        if kind is str:
            _split_template(value, f"{name} in {path}")
        out[name] = value
    return out


def _answers(record: Mapping[str, Any], where: str) -> list[str]:
    if "answers" not in record:
        raise ValueError(f"{where}: missing required field 'answers'")
    answers = record["answers"]
    if not isinstance(answers, list) or not answers or not all(isinstance(a, str) for a in answers):
        raise ValueError(f"{where}: field 'answers' must be a non-empty list of strings, got {answers!r:.200}")
    return answers
