"""The :class:`Method` configuration: a score, a head allocation and a layer allocation, plus options."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from .registry import HEAD_ALLOCATIONS, LAYER_ALLOCATIONS, SCORES

POOLINGS = ("max", "avg", "none")


@dataclass(frozen=True)
class Method:
    """How to compress: ``score`` + ``heads`` + ``layers``, each a registered name, and their options.

    ``Method.preset("lava")`` gives a named method; ``Method(score="lava", heads="uniform", layers="lava")``
    composes freely (for instance LAVa without dynamic head budgets). ``name="full"`` keeps everything.
    Defaults follow the papers: window 32, max-pool kernel 7, floor alpha 0.2, PyramidKV beta 20,
    CAKE gamma 200 and tau1 = tau2 = 1, StreamingLLM 4 sink tokens.
    """

    score: str = "snapkv"
    heads: str = "uniform"
    layers: str = "uniform"
    window: int = 32
    kernel: int = 7
    pooling: str = "max"
    alpha: float = 0.2
    beta: float = 20
    gamma: float = 200.0
    tau1: float = 1.0
    tau2: float = 1.0
    sink: int = 4
    name: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        if self.name == "full":
            return
        _check_choice("score", self.score, SCORES)
        _check_choice("heads", self.heads, HEAD_ALLOCATIONS)
        _check_choice("layers", self.layers, LAYER_ALLOCATIONS)
        _check_int("window", self.window, minimum=1)
        _check_int("kernel", self.kernel, minimum=1)
        if self.kernel % 2 == 0:
            raise ValueError(f"kernel must be an odd integer >= 1, got {self.kernel}")
        _check_int("sink", self.sink, minimum=0)
        if self.pooling not in POOLINGS:
            raise ValueError(f"unknown pooling {self.pooling!r}; valid: {', '.join(POOLINGS)}")
        if not 0 <= self.alpha <= 1:
            raise ValueError(f"alpha must be in [0, 1], got {self.alpha}")
        if not self.beta >= 1:
            raise ValueError(f"beta must be >= 1, got {self.beta}")
        if not self.gamma >= 0:
            raise ValueError(f"gamma must be >= 0, got {self.gamma}")
        for tau in ("tau1", "tau2"):
            if not getattr(self, tau) > 0:
                raise ValueError(f"{tau} must be > 0, got {getattr(self, tau)}")
        if not self.name:
            object.__setattr__(self, "name", f"{self.score}+{self.heads}+{self.layers}")

    @property
    def compresses(self) -> bool:
        return self.name != "full"

    @property
    def progressive(self) -> bool:
        """Dynamic layer budgets are only final after the last layer: compress progressively."""
        return self.compresses and LAYER_ALLOCATIONS[self.layers].dynamic

    @classmethod
    def preset(cls, name: str, **options) -> Method:
        """The named method ``name`` (see :data:`PRESETS`), with options overridden."""
        key = name.lower()
        if key not in PRESETS:
            raise ValueError(f"unknown method {name!r}; valid: {', '.join(PRESETS)}")
        return dataclasses.replace(PRESETS[key], **options) if options else PRESETS[key]

    def with_options(self, **options) -> Method:
        """A copy with some options changed (validated again)."""
        unknown = set(options) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise TypeError(f"unknown method option(s) {sorted(unknown)}; valid: {OPTION_NAMES}")
        return dataclasses.replace(self, **options)


OPTION_NAMES = ["window", "kernel", "pooling", "alpha", "beta", "gamma", "tau1", "tau2", "sink"]


def _check_choice(kind: str, value: str, registry: dict) -> None:
    if value not in registry:
        raise ValueError(f"unknown {kind} {value!r}; valid: {', '.join(sorted(registry))}")


def _check_int(name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


PRESETS: dict[str, Method] = {
    "full": Method(name="full"),
    "streamingllm": Method(score="streamingllm", name="streamingllm"),
    "h2o": Method(score="h2o", name="h2o"),
    "snapkv": Method(score="snapkv", name="snapkv"),
    "pyramidkv": Method(score="snapkv", layers="pyramid", name="pyramidkv"),
    "ada-snapkv": Method(score="snapkv", heads="ada", name="ada-snapkv"),
    "ada-pyramidkv": Method(score="snapkv", heads="ada", layers="pyramid", name="ada-pyramidkv"),
    "cake": Method(score="cake", layers="cake", pooling="avg", kernel=5, name="cake"),
    "lava": Method(score="lava", heads="ada", layers="lava", name="lava"),
}


def resolve_method(method: str | Method, **options) -> Method:
    """A :class:`Method` from a preset name or a Method, with options applied."""
    if isinstance(method, Method):
        return method.with_options(**options) if options else method
    if not isinstance(method, str):
        raise TypeError(f"method must be a name or a lavakv.Method, got {type(method).__name__}")
    base = Method.preset(method)
    return base.with_options(**options) if options else base
