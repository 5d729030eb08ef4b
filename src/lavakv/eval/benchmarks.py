"""The benchmarks ``lavakv eval`` knows: a registry of dataclasses whose fields are its options.

Each benchmark is a frozen dataclass registered under its name. Its fields are the ``lavakv
eval`` flags it reads (``lengths`` is ``--lengths``); a flag that none of a run's benchmarks has
as a field is an error, not a silent no-op. What the runner, the report and the plots need to
know of a benchmark (how it builds its samples, whether they come from files and are cut to
``--max-length``, which lengths fit, its task categories, whether it plots needle heat maps) is
asked of its class, so a new benchmark is one registered class.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from dataclasses import Field, dataclass, field, fields
from typing import ClassVar

from .samples import Sample, check_count

DEFAULT_NIAH_LENGTHS = (500, 1000, 2000)
DEFAULT_NIAH_DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)
DEFAULT_RULER_LENGTHS = (1024, 2048)
DEFAULT_RULER_SAMPLES = 3


def option(default, help: str, parse: Callable[[str], object] = str) -> Field:
    """A benchmark field that is also a ``lavakv eval`` flag: its help, and how the flag's text parses."""
    return field(default=default, metadata={"help": help, "parse": parse})


def _items(kind: type) -> Callable[[str], tuple]:
    def parse(text: str) -> tuple:
        items = [item.strip() for item in text.split(",") if item.strip()]
        try:
            return tuple(kind(item) for item in items)
        except ValueError:
            raise ValueError(f"takes a comma-separated list of {kind.__name__} values, got {text!r}") from None

    return parse


ints, floats, names = _items(int), _items(float), _items(str)
DATA_HELP = "directory of data files (ruler: the qa_1/qa_2 JSON; longbench, infinitebench: the JSONL)"
DATASETS_HELP = "comma-separated dataset or task names (default: all present)"


@dataclass(frozen=True)
class Benchmark:
    """One benchmark with its options; subclasses are registered with :func:`register_benchmark`."""

    name: ClassVar[str] = ""
    reads_files: ClassVar[bool] = False
    """Samples read from data files, whose prompts are cut to ``--max-length``; otherwise built to fit."""
    needle_heatmaps: ClassVar[bool] = False
    """Samples carry a needle ``depth`` and ``length``, plotted as score heat maps."""

    limit: int | None = option(
        None, "samples per dataset (niah: per length; ruler: per task and length, default 3)", int
    )

    def __post_init__(self) -> None:
        check_count(self.limit, "--limit", minimum=1)

    @classmethod
    def options(cls) -> tuple[str, ...]:
        """The option names (fields) this benchmark reads, as ``lavakv eval`` flags without ``--``."""
        return tuple(f.name for f in fields(cls))

    def samples(self, tokenizer, chat_template: bool = True) -> list[Sample]:
        """The samples; ``chat_template`` says whether prompts will be wrapped in the chat template."""
        raise NotImplementedError

    def check_fits(self, max_length: int, limit: str) -> None:
        """Refuse settings whose prompts cannot fit ``max_length`` tokens (``limit`` says where it comes from)."""

    @classmethod
    def category(cls, dataset: str) -> str | None:
        """The task category of ``dataset``; ``None`` for benchmarks without categories."""
        return None

    @classmethod
    def categories(cls, datasets: set[str]) -> dict[str, list[str]]:
        """The categories over ``datasets``, each with its datasets, in the benchmark's order."""
        found: dict[str, list[str]] = defaultdict(list)
        for dataset in sorted(datasets):
            category = cls.category(dataset)
            if category is not None:
                found[category].append(dataset)
        return dict(found)


BENCHMARKS: dict[str, type[Benchmark]] = {}


def register_benchmark(cls: type[Benchmark]) -> type[Benchmark]:
    """Class decorator: make ``cls`` known to ``lavakv eval --benchmark cls.name`` and to the report."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no name")
    if cls.name in BENCHMARKS and BENCHMARKS[cls.name] is not cls:
        raise ValueError(f"benchmark {cls.name!r} is already registered by {BENCHMARKS[cls.name].__name__}")
    BENCHMARKS[cls.name] = cls
    return cls


def benchmark_class(name: str) -> type[Benchmark]:
    """The registered class of ``name``; an unknown name is an error listing the valid ones."""
    if name not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {name!r}; valid: {', '.join(BENCHMARKS)}")
    return BENCHMARKS[name]


def create_benchmark(name: str, **options) -> Benchmark:
    """``name`` built with ``options`` (``None`` values mean the default); an option it lacks is an error."""
    cls = benchmark_class(name)
    options = {key: tuple(value) if isinstance(value, list) else value for key, value in options.items()}
    unknown = [key for key, value in options.items() if value is not None and key not in cls.options()]
    if unknown:
        raise ValueError(
            f"benchmark {name} takes no option {', '.join(unknown)}; its options: {', '.join(cls.options())}"
        )
    return cls(**{key: value for key, value in options.items() if value is not None})


def _fit_lengths(name: str, lengths: tuple[int, ...], new_tokens: int, max_length: int, limit: str) -> None:
    """The runner cuts the middle of a prompt that does not fit, and with it the needle the sample is about."""
    from .niah import check_lengths

    too_long = [length for length in check_lengths(list(lengths)) if length + new_tokens > max_length]
    if too_long:
        raise ValueError(
            f"{name} length {', '.join(map(str, too_long))} does not fit {limit} of {max_length} tokens "
            f"with max_new_tokens={new_tokens}: the prompt would be cut in the middle, needle included; "
            f"give --lengths of at most {max_length - new_tokens}"
        )


@register_benchmark
@dataclass(frozen=True)
class Niah(Benchmark):
    """Needle in a haystack over Paul Graham's essays: one sample per (length, depth); ``limit`` per length."""

    name: ClassVar[str] = "niah"
    needle_heatmaps: ClassVar[bool] = True

    lengths: tuple[int, ...] = option(DEFAULT_NIAH_LENGTHS, "prompt lengths in tokens", ints)
    depths: tuple[float, ...] = option(DEFAULT_NIAH_DEPTHS, "needle depths in [0, 1]", floats)
    seed: int = option(0, "seed of the generated samples", int)

    def samples(self, tokenizer, chat_template: bool = True) -> list[Sample]:
        from .niah import niah_samples

        samples = niah_samples(tokenizer, list(self.lengths), list(self.depths), seed=self.seed)
        if not self.limit:
            return samples
        per_length: dict[int, int] = defaultdict(int)
        kept = []
        for sample in samples:
            per_length[sample.extra["length"]] += 1
            if per_length[sample.extra["length"]] <= self.limit:
                kept.append(sample)
        return kept

    def check_fits(self, max_length: int, limit: str) -> None:
        from .niah import NIAH_MAX_NEW_TOKENS

        _fit_lengths(self.name, self.lengths, NIAH_MAX_NEW_TOKENS, max_length, limit)


@register_benchmark
@dataclass(frozen=True)
class Ruler(Benchmark):
    """RULER's synthetic tasks at each length; ``limit`` samples per task and length; ``qa_*`` read ``data``."""

    name: ClassVar[str] = "ruler"

    data: str | None = option(None, DATA_HELP)
    datasets: tuple[str, ...] | None = option(None, DATASETS_HELP, names)
    lengths: tuple[int, ...] = option(DEFAULT_RULER_LENGTHS, "prompt lengths in tokens, answer included", ints)
    seed: int = option(0, "seed of the generated samples", int)

    def samples(self, tokenizer, chat_template: bool = True) -> list[Sample]:
        from .ruler import ruler_samples

        tasks = None if self.datasets is None else list(self.datasets)
        count = self.limit or DEFAULT_RULER_SAMPLES
        return ruler_samples(
            tokenizer, tasks, list(self.lengths), count, seed=self.seed, chat_template=chat_template, data=self.data
        )

    def check_fits(self, max_length: int, limit: str) -> None:
        _fit_lengths(self.name, self.lengths, 0, max_length, limit)  # RULER's lengths count the answer's room


@dataclass(frozen=True)
class _FileBenchmark(Benchmark):
    reads_files: ClassVar[bool] = True

    data: str | None = option(None, DATA_HELP)
    datasets: tuple[str, ...] | None = option(None, DATASETS_HELP, names)

    def _data(self) -> str:
        if not self.data:
            raise ValueError(f"--benchmark {self.name} reads its samples from a directory: give --data DIR")
        return self.data


@register_benchmark
@dataclass(frozen=True)
class LongBench(_FileBenchmark):
    """LongBench / LongBench-E records from ``data``; ``max_words`` keeps the records a short model can hold."""

    name: ClassVar[str] = "longbench"

    max_words: int | None = option(None, "keep samples of at most this many words", int)

    def __post_init__(self) -> None:
        super().__post_init__()
        check_count(self.max_words, "--max-words", minimum=1)

    def samples(self, tokenizer, chat_template: bool = True) -> list[Sample]:
        from .longbench import load_longbench

        return load_longbench(self._data(), self.datasets, limit=self.limit, max_words=self.max_words)

    @classmethod
    def category(cls, dataset: str) -> str | None:
        from .longbench import longbench_category

        return longbench_category(dataset)

    @classmethod
    def categories(cls, datasets: set[str]) -> dict[str, list[str]]:
        from .longbench import LONGBENCH_CATEGORIES

        found = super().categories(datasets)
        return {name: found[name] for name in LONGBENCH_CATEGORIES if name in found}


@register_benchmark
@dataclass(frozen=True)
class InfiniteBench(_FileBenchmark):
    """InfiniteBench records from ``data``."""

    name: ClassVar[str] = "infinitebench"

    def samples(self, tokenizer, chat_template: bool = True) -> list[Sample]:
        from .infinitebench import load_infinitebench

        return load_infinitebench(self._data(), self.datasets, limit=self.limit)


def build_samples(benchmark: str, tokenizer, chat_template: bool = True, **options) -> list[Sample]:
    """The samples of ``benchmark`` built with ``options`` (its fields: ``lengths=``, ``limit=``...)."""
    return create_benchmark(benchmark, **options).samples(tokenizer, chat_template)
