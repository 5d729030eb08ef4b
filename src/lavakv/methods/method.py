"""The :class:`Method`: a window and three registered parts, the presets, and method spec strings.

A method spec names a method in one string, for the command line and for result rows:

* a preset: ``lava``, ``snapkv``, ``full``...;
* a preset with overrides after a colon: ``lava:heads=uniform`` (LAVa without dynamic head
  budgets), ``lava:layers=uniform``, ``snapkv:layers=lava``, ``ada-snapkv:alpha=0.5,window=16``.
  ``score=``, ``heads=`` and ``layers=`` replace a part (the new part starts from its own
  defaults); any other ``name=value`` sets an option of the part that declares it;
* the bare form ``score=lava,heads=ada,layers=uniform`` (``heads`` and ``layers`` default to
  ``uniform``), with options after the parts.

:attr:`Method.spec` gives the canonical spec of a method, which parses back to an equal method.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

from .budget import Budget
from .plugins import load_plugins
from .registry import (
    REGISTRIES,
    HeadAllocation,
    LayerAllocation,
    OptionError,
    Part,
    Score,
    part_class,
)

PART_KINDS = ("score", "heads", "layers")
DEFAULT_WINDOW = 32


@dataclass(frozen=True, init=False)
class Method:
    """How to compress: an observation ``window`` plus a ``score``, ``heads`` and ``layers`` part.

    Parts are instances of registered part classes or their registered names:
    ``Method(score="lava", heads="uniform", layers="lava")`` is LAVa without dynamic head budgets.
    A method whose three parts are ``None`` keeps everything (the ``full`` preset). Options are
    keyword arguments routed to the part that declares them, in the constructor
    (``Method(score="lava", heads="ada", alpha=0.5)``), :meth:`preset` and :meth:`with_options`;
    ``window`` belongs to the method. Defaults follow the papers: window 32.
    """

    score: Score | None
    heads: HeadAllocation | None
    layers: LayerAllocation | None
    window: int

    def __init__(
        self,
        score: Score | str | None = "snapkv",
        heads: HeadAllocation | str | None = "uniform",
        layers: LayerAllocation | str | None = "uniform",
        window: int = DEFAULT_WINDOW,
        **options,
    ):
        for kind, value in (("score", score), ("heads", heads), ("layers", layers)):
            if isinstance(value, str):
                value = part_class(kind, value)()
            elif value is not None and not isinstance(value, _PART_BASES[kind]):
                raise TypeError(
                    f"{kind} must be a registered {kind} name or a {_PART_BASES[kind].__name__}, got {value!r}"
                )
            elif value is not None and REGISTRIES[kind].get(value.name) is not type(value):
                raise TypeError(
                    f"{type(value).__name__} is not a registered {kind}; register it with @{_DECORATORS[kind]}(name)"
                )
            object.__setattr__(self, kind, value)
        object.__setattr__(self, "window", window)
        present = [getattr(self, kind) is not None for kind in PART_KINDS]
        if any(present) and not all(present):
            raise ValueError("a method has a score, a head allocation and a layer allocation, or none (keep all)")
        if isinstance(self.window, bool) or not isinstance(self.window, int) or self.window < 0:
            raise ValueError(f"window must be an integer >= 0, got {self.window!r}")
        if self.window == 0 and self.score is not None and self.score.needs_window:
            raise ValueError(
                f"window must be >= 1 for the {self.score.name} score, which scores entries by the window's "
                "queries; window=0 (no observation window) suits scores that do not (knorm, keydiff, "
                "expected-attention)"
            )
        if self.score is not None and self.score.two_stage and self.layers.dynamic:
            raise ValueError(
                f"the {self.score.name} score ranks entries by budget (two stages), so it takes a static layer "
                f"allocation (uniform, pyramid), not {self.layers.name!r}"
            )
        if options:
            routed = self.with_options(**options)
            for kind in PART_KINDS:
                object.__setattr__(self, kind, getattr(routed, kind))

    @classmethod
    def preset_named(cls, name: str) -> Method:
        key = name.lower() if isinstance(name, str) else name
        if key not in PRESETS:
            load_plugins()
        if key not in PRESETS:
            raise ValueError(
                f"unknown method {name!r}; valid presets: {', '.join(PRESETS)} "
                "(or a spec such as 'lava:heads=uniform' or 'score=lava,heads=ada,layers=uniform')"
            )
        return PRESETS[key]

    @classmethod
    def preset(cls, name: str, **options) -> Method:
        """The named method ``name`` (see :data:`PRESETS`), with options routed to its parts."""
        return cls.preset_named(name).with_options(**options)

    @property
    def compresses(self) -> bool:
        return self.score is not None

    @property
    def progressive(self) -> bool:
        """Dynamic layer budgets are only final after the last layer: compress progressively."""
        return self.compresses and self.layers.dynamic

    @property
    def parts(self) -> dict[str, Part]:
        return {kind: getattr(self, kind) for kind in PART_KINDS} if self.compresses else {}

    def check_budget(self, budget: Budget) -> None:
        """Refuse a budget this method cannot honour, before any work: one not above a fixed window, or a
        token budget too small for a part's options (StreamingLLM's ``sink`` beside the window).

        A ratio budget is only known per prompt: :meth:`budget_problem` tells at compression time.
        """
        budget.check_window(self.window)
        if self.compresses and budget.tokens is not None:
            problem = self.budget_problem(budget.tokens, budget.window_for(self.window, budget.tokens))
            if problem is not None:
                raise ValueError(problem)

    def budget_problem(self, tokens: int, window: int) -> str | None:
        """Why ``tokens`` per KV head per layer with an observation ``window`` cannot serve this method's
        options, or ``None`` when they can (or nothing is compressed)."""
        if not self.compresses:
            return None
        kept = Budget.kept_window(window, tokens)
        for part in self.parts.values():
            try:
                part.check_slots(tokens - kept, tokens, kept)
            except ValueError as error:
                return f"method {self.spec!r}: {error}"
        return None

    def option_names(self) -> list[str]:
        """Every option this method takes: ``window`` and its parts' options."""
        if not self.compresses:
            return []
        return ["window"] + [name for part in self.parts.values() for name in part.option_names()]

    @property
    def needs_scoring_pass(self) -> bool:
        """Whether the score reads a separate forward pass over the prompt (a reconstruction, for KVzip)."""
        return self.compresses and self.score.scoring_pass is not None

    @property
    def reads_profile(self) -> bool:
        """Whether a part reads a per-head profile measured on one model."""
        return any(part.reads_profile for part in self.parts.values()) if self.compresses else False

    def check_model(self, identity: dict) -> None:
        """Refuse a model a part cannot serve (a profile measured on another model), naming both."""
        if self.compresses:
            for part in self.parts.values():
                part.check_model(identity)

    def with_options(self, **options) -> Method:
        """A copy with options changed, each routed to the part that declares it (validated again).

        An option that no part of this method declares is an :class:`OptionError` naming the
        method and its valid options.
        """
        if not options:
            return self
        if not self.compresses:
            raise OptionError(f"method {self.spec!r} keeps everything and takes no options, got {sorted(options)}")
        window = options.pop("window", self.window)
        updates: dict[str, dict] = {kind: {} for kind in PART_KINDS}
        for name, value in options.items():
            owners = [kind for kind, part in self.parts.items() if name in part.option_names()]
            if not owners:
                raise OptionError(
                    f"method {self.spec!r} has no option {name!r}; its options: {', '.join(self.option_names())}"
                )
            for kind in owners:
                updates[kind][name] = value
        parts = {kind: part.with_options(**updates[kind]) for kind, part in self.parts.items()}
        return Method(**parts, window=window)

    def with_part(self, kind: str, name: str) -> Method:
        """A copy whose ``kind`` part (score, heads or layers) is the registered ``name`` with its defaults."""
        if kind not in PART_KINDS:
            raise ValueError(f"unknown part {kind!r}; valid: {', '.join(PART_KINDS)}")
        if not self.compresses:
            raise OptionError(f"method {self.spec!r} keeps everything and has no {kind} part to replace")
        return dataclasses.replace(self, **{kind: part_class(kind, name)()})

    @property
    def spec(self) -> str:
        """The canonical method spec, the same for equal methods however they were written.

        A preset's name; else the preset of the same score that needs the fewest overrides (the
        first listed on a tie), with them; else, for a score no preset uses, the bare form.
        """
        if not self.compresses:
            return "full"
        candidates = []
        for name, preset in PRESETS.items():
            if preset == self:
                return name
            if preset.compresses and type(preset.score) is type(self.score):
                candidates.append((len(self._differences(preset)), name, preset))
        if candidates:
            _, name, preset = min(candidates, key=lambda item: item[0])
            return f"{name}:" + ",".join(self._differences(preset))
        return ",".join([f"{kind}={part.name}" for kind, part in self.parts.items()] + self._differences(None))

    @property
    def origin(self) -> str | None:
        """The preset this method's spec starts from (``None`` for the bare form)."""
        name = self.spec.partition(":")[0]
        return name if name in PRESETS else None

    @property
    def label(self) -> str:
        """A readable name: ``lava``, ``lava with uniform heads``, ``ada-snapkv with alpha=0.5, window=16``."""
        spec = self.spec
        if ":" in spec:
            preset, _, rest = spec.partition(":")
            return f"{preset} with " + ", ".join(_readable(item) for item in rest.split(","))
        if "=" in spec:
            parts = [f"{part.name} {kind}" for kind, part in self.parts.items()]
            options = self._differences(None)
            return " + ".join(parts) + (f" ({', '.join(options)})" if options else "")
        return spec

    def _differences(self, base: Method | None) -> list[str]:
        """Overrides that turn ``base`` (or each part's defaults) into this method, in spec syntax."""
        out = []
        for kind, part in self.parts.items():
            reference = getattr(base, kind) if base is not None else type(part)()
            if type(reference) is not type(part):
                out.append(f"{kind}={part.name}")
                reference = type(part)()
            defaults = reference.options()
            out += [f"{name}={_format(value)}" for name, value in part.options().items() if value != defaults[name]]
        reference_window = base.window if base is not None else DEFAULT_WINDOW
        if self.window != reference_window:
            out.append(f"window={self.window}")
        return list(dict.fromkeys(out))

    def __str__(self) -> str:
        return self.spec


_PART_BASES = {"score": Score, "heads": HeadAllocation, "layers": LayerAllocation}
_DECORATORS = {"score": "register_score", "heads": "register_head_allocation", "layers": "register_layer_allocation"}


def _format(value) -> str:
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return repr(value) if isinstance(value, float) else str(value)


def _readable(item: str) -> str:
    name, _, value = item.partition("=")
    return f"{value} {name}" if name in PART_KINDS else item


PRESETS: dict[str, Method] = {
    "full": Method(score=None, heads=None, layers=None),
    "streamingllm": Method(score="streamingllm"),
    "h2o": Method(score="h2o"),
    "snapkv": Method(score="snapkv"),
    "pyramidkv": Method(score="snapkv", layers="pyramid"),
    "ada-snapkv": Method(score="snapkv", heads="ada"),
    "ada-pyramidkv": Method(score="snapkv", heads="ada", layers="pyramid"),
    "cake": Method(score="cake", layers="cake"),
    "lava": Method(score="lava", heads="ada", layers="lava"),
}


PAPER_METHODS = ("full", "streamingllm", "h2o", "snapkv", "pyramidkv", "ada-snapkv", "ada-pyramidkv", "cake", "lava")
"""The presets of the LAVa paper's comparison: what ``lavakv eval`` runs unless told otherwise."""


def register_preset(name: str, method: Method) -> Method:
    """Make ``method`` available by ``name`` as a preset (a method spec, ``lavakv eval --methods``...).

    A name already taken by another method is refused; registering the same method again is a no-op.
    """
    if not isinstance(name, str) or not name or name != name.lower() or any(c in name for c in ",:= "):
        raise ValueError(
            f"a preset name must be a non-empty lower-case string without ',', ':', '=' or spaces, got {name!r}"
        )
    if not isinstance(method, Method):
        raise TypeError(f"a preset is a Method, got {method!r}")
    if name in PRESETS and PRESETS[name] != method:
        raise ValueError(f"preset {name!r} is already registered as {PRESETS[name].spec!r}")
    PRESETS[name] = method
    return method


def parse_value(part: type[Part], name: str, text: str, spec: str):
    """``text`` converted to the type of ``part``'s option ``name``; a bad value names the spec."""
    kind = part.option_types()[name]
    if kind is bool:
        words = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}
        if text.strip().lower() not in words:
            raise OptionError(f"{name} of {part.name} {part.kind} takes true or false, got {text!r} in {spec!r}")
        return words[text.strip().lower()]
    try:
        if kind is int:
            return int(text)
        if kind is float:
            return float(text)
    except ValueError:
        kind_name = "an integer" if kind is int else "a number"
        raise OptionError(f"{name} of {part.name} {part.kind} takes {kind_name}, got {text!r} in {spec!r}") from None
    return text


def parse_spec(spec: str) -> Method:
    """The :class:`Method` a spec string names (see the module docstring); a bad spec names the bad part."""
    if isinstance(spec, Method):
        return spec
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"a method spec must be a non-empty string, got {spec!r}")
    text = spec.strip()
    if ":" in text:
        name, _, rest = text.partition(":")
        method = Method.preset_named(name.strip())
        if not rest.strip():
            raise ValueError(f"method spec {text!r} has nothing after ':'; give name=value overrides")
        overrides = _pairs(rest, text)
    elif "=" in text:
        overrides = _pairs(text, text)
        keys = [key for key, _ in overrides]
        if "score" not in keys:
            raise ValueError(f"method spec {text!r} names no score; the bare form starts with score=NAME")
        method = Method()
    else:
        return Method.preset_named(text)
    return apply_overrides(method, overrides, text)


def apply_overrides(method: Method, overrides: list[tuple[str, str]], spec: str) -> Method:
    """``method`` with spec-style ``name=value`` overrides applied: parts first, then options."""
    options: dict[str, object] = {}
    for key, value in overrides:
        if key in PART_KINDS:
            if value not in REGISTRIES[key]:
                raise ValueError(
                    f"unknown {key} {value!r} in method spec {spec!r}; valid: {', '.join(sorted(REGISTRIES[key]))}"
                )
            method = method.with_part(key, value)
    if not method.compresses and len(overrides):
        raise OptionError(f"method {spec!r}: 'full' keeps everything and takes no overrides")
    for key, value in overrides:
        if key in PART_KINDS:
            continue
        if key == "window":
            options[key] = parse_value(_WindowOption, key, value, spec)
            continue
        owners = [part for part in method.parts.values() if key in part.option_names()]
        if not owners:
            valid = ", ".join(method.option_names())
            raise OptionError(f"unknown option {key!r} in method spec {spec!r}; {method.spec!r} takes: {valid}")
        options[key] = parse_value(type(owners[0]), key, value, spec)
    return method.with_options(**options)


@dataclass(frozen=True)
class _WindowOption(Part):
    """The method's own option, typed like a part's for parsing."""

    kind: ClassVar[str] = "method"
    name: ClassVar[str] = "the"

    window: int = DEFAULT_WINDOW


def _pairs(text: str, spec: str) -> list[tuple[str, str]]:
    pairs = []
    for item in text.split(","):
        key, equals, value = item.partition("=")
        key, value = key.strip(), value.strip()
        if not equals or not key or not value:
            raise ValueError(f"bad override {item.strip()!r} in method spec {spec!r}: expected name=value")
        if key in dict(pairs):
            raise ValueError(f"{key!r} is given twice in method spec {spec!r}")
        pairs.append((key, value))
    return pairs


def split_specs(text: str) -> list[str]:
    """Split a comma-separated list of method specs, whose own overrides are comma-separated too.

    An item without ``=`` or with ``:`` starts a new spec, and so does ``score=...`` (the bare
    form starts with it; to replace a preset's score, write ``preset:score=...``). Any other
    ``name=value`` item continues the spec before it when that spec has overrides and does not set
    ``name`` yet: ``lava,ada-snapkv:alpha=0.5,window=16,score=lava,heads=ada`` is three specs.
    """
    specs: list[list[str]] = []
    for raw in text.split(","):
        item = raw.strip()
        if not item:
            continue
        if "=" in item and ":" not in item and item.partition("=")[0].strip() != "score" and specs:
            current = specs[-1]
            keys = {part.split(":")[-1].partition("=")[0].strip() for part in current if "=" in part}
            if "=" in current[-1] and item.partition("=")[0].strip() not in keys:
                current.append(item)
                continue
        specs.append([item])
    return [",".join(items) for items in specs]


def declared_options() -> dict[str, list[type[Part]]]:
    """Every option name any registered part declares (plus ``window``), with the parts that declare it."""
    options: dict[str, list[type[Part]]] = {"window": [_WindowOption]}
    for kind in PART_KINDS:
        for part in REGISTRIES[kind].values():
            for name in part.option_names():
                options.setdefault(name, []).append(part)
    return options


def resolve_method(method: str | Method, **options) -> Method:
    """A :class:`Method` from a spec string or a Method, with options routed to its parts."""
    if isinstance(method, Method):
        return method.with_options(**options)
    if not isinstance(method, str):
        raise TypeError(f"method must be a spec string or a lavakv.Method, got {type(method).__name__}")
    return parse_spec(method).with_options(**options)
