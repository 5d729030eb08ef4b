"""The three kinds of method parts, their registries, and the per-layer input they read.

A method is a *score* (one number per prefix entry and KV head), a *head allocation* (how a
layer's prefix slots are split among its KV heads) and a *layer allocation* (how the total is
split among layers). Each part is a small frozen dataclass whose fields are its options; it
validates them itself in ``__post_init__`` and is registered by name, so that a method spec such
as ``lava:heads=uniform`` or an external package can name it. :class:`lavakv.Method` composes
three parts and routes options to the part that declares them.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar, TypeVar

import torch


class OptionError(ValueError, TypeError):
    """A method option that no part of the method declares, or a value of the wrong type.

    Both a ``ValueError`` (a bad value) and a ``TypeError`` (Python's error for an unknown keyword).
    """


@dataclass(frozen=True)
class Part:
    """Base of scores, head allocations and layer allocations: the dataclass fields are the options."""

    kind: ClassVar[str] = "part"
    name: ClassVar[str] = ""
    reads_profile: ClassVar[bool] = False
    """Whether the part reads a per-head profile measured on one model (see :meth:`check_model`)."""

    @classmethod
    def option_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def option_types(cls) -> dict[str, type]:
        """Each option's Python type (``int``, ``float``, ``bool`` or ``str``), read from the annotations."""
        hints = typing.get_type_hints(cls)
        return {name: hints[name] for name in cls.option_names()}

    def options(self) -> dict[str, object]:
        return {name: getattr(self, name) for name in self.option_names()}

    def with_options(self, **options) -> Part:
        """A copy with some options changed, validated again; an unknown option is an :class:`OptionError`."""
        unknown = sorted(set(options) - set(self.option_names()))
        if unknown:
            valid = ", ".join(self.option_names()) or "none"
            raise OptionError(f"{self.label} has no option {', '.join(map(repr, unknown))}; its options: {valid}")
        return dataclasses.replace(self, **options)

    @property
    def label(self) -> str:
        return f"{self.name} {self.kind}"

    def fail(self, message: str) -> typing.NoReturn:
        raise ValueError(f"{self.label}: {message}")

    def check_int(self, option: str, minimum: int, odd: bool = False) -> None:
        value = getattr(self, option)
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum or (odd and value % 2 == 0):
            kind = "an odd integer" if odd else "an integer"
            self.fail(f"{option} must be {kind} >= {minimum}, got {value!r}")

    def check_number(self, option: str, low: float, high: float = math.inf, low_open: bool = False) -> None:
        value = getattr(self, option)
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if not number or not (low < value if low_open else low <= value) or not value <= high:
            bound = f"> {low:g}" if low_open else (f">= {low:g}" if high == math.inf else f"in [{low:g}, {high:g}]")
            self.fail(f"{option} must be a number {bound}, got {value!r}")

    def check_bool(self, option: str) -> None:
        value = getattr(self, option)
        if not isinstance(value, bool):
            self.fail(f"{option} must be true or false, got {value!r}")

    def check_choice(self, option: str, choices: tuple[str, ...]) -> None:
        value = getattr(self, option)
        if value not in choices:
            self.fail(f"unknown {option} {value!r}; valid: {', '.join(choices)}")

    def check_model(self, identity: dict) -> None:
        """Refuse a model this part cannot serve; ``identity`` has ``name``, ``num_layers``, ``num_kv_heads``
        and ``fingerprint`` (of the weights; ``None`` when only the config is known). Nothing by default."""

    def check_slots(self, slots: int, budget: int, window: int) -> None:
        """Refuse a budget too small for this part's options (nothing is too small by default).

        ``budget`` is the tokens per KV head per layer, ``window`` the tokens of it the kept window
        takes, and ``slots`` (``budget - window``) the prefix entries a head keeps on average.
        """


@dataclass(frozen=True)
class Score(Part):
    """One importance number per prefix entry and KV head: ``score(layer) -> [H_kv, m]``, higher kept first.

    ``rows_independent`` declares that each KV head's scores depend only on its own rows of the
    input (its keys, values and its group's queries); the cache then scores a whole batch in one
    call with the batch folded into the head dimension. A score that compares heads leaves it
    off and is called once per sequence. ``window_queries_only`` declares that it reads only the
    observation window's queries (``query[:, -observed:]``), so the prefill hands it just those.
    ``needs_window`` off declares a score that does not rank entries by the window's queries (keys
    or values alone, or statistics of every query), which may run without an observation window
    (``window=0``: every prompt entry competes, none is kept for free). ``needs_layer_weights``
    declares a score that reads :attr:`LayerInput.weights` (the layer's output projection, its
    rotary embedding), which the model hands over at prefill only.

    ``scoring_pass`` names a separate forward pass the score reads (``"reconstruction"``: the model
    reads the prompt again; :attr:`LayerInput.pass_query`, :attr:`LayerInput.pass_key`), which
    :meth:`lavakv.recording.PrefillRecord.reconstruct` runs once per prompt.

    A *two-stage* score (``two_stage``) ranks by budget: each head first keeps its
    :meth:`first_stage_slots` best entries by the score itself, then fills the rest of its slots
    by :meth:`second_stage`. Its ranking changes with the budget, so it takes static layer
    allocations only (progressive shrinking needs rankings that hold at every budget).
    """

    kind: ClassVar[str] = "score"
    rows_independent: ClassVar[bool] = False
    window_queries_only: ClassVar[bool] = False
    needs_window: ClassVar[bool] = True
    needs_layer_weights: ClassVar[bool] = False
    two_stage: ClassVar[bool] = False
    scoring_pass: ClassVar[str | None] = None

    def __call__(self, layer: LayerInput) -> torch.Tensor:
        raise NotImplementedError

    def second_stage(self, layer: LayerInput, scores: torch.Tensor) -> torch.Tensor:
        """A two-stage score's second ranking ``[H_kv, m]`` (higher kept first), given its first, ``scores``."""
        raise NotImplementedError(f"{self.label} is not a two-stage score")

    def first_stage_slots(self, slots: torch.Tensor) -> torch.Tensor:
        """How many of each head's ``slots`` a two-stage score fills by its first ranking."""
        raise NotImplementedError(f"{self.label} is not a two-stage score")


@dataclass(frozen=True)
class HeadAllocation(Part):
    """Splits a layer's ``H_kv * slots_per_head`` prefix slots among its KV heads.

    ``scores`` is ``[H_kv, M]`` and may hold ``-inf`` for candidates a head does not have; the
    result always sums to ``H_kv * slots_per_head`` when the heads have that many candidates.
    """

    kind: ClassVar[str] = "heads"

    def allocate(self, scores: torch.Tensor, slots_per_head: int) -> list[int]:
        raise NotImplementedError

    def at_layer(self, layer: int, num_layers: int, slots: int) -> HeadAllocation:
        """The allocation for layer ``layer`` of ``num_layers`` (``slots`` per head on average over the model):
        itself, unless it differs by layer (profiles)."""
        return self

    def retain(self, scores: torch.Tensor, slots_per_head: int) -> list[int]:
        """Candidates each head must keep so that a later, slightly different budget can still be served.

        Progressive compression shrinks a layer before its final budget is known; the selection adds
        a rounding slack on top of this. The default is the allocation itself.
        """
        return self.allocate(scores, slots_per_head)

    def allocate_batch(self, scores: torch.Tensor, slots_per_head: list[int]) -> torch.Tensor:
        """:meth:`allocate` for a batch: ``scores [B, H_kv, M]``, one ``slots_per_head`` per sequence -> ``[B, H_kv]``.

        The default calls :meth:`allocate` per sequence; allocations override it with tensor code.
        """
        return torch.tensor([self.allocate(row, slots) for row, slots in zip(scores, slots_per_head)], dtype=torch.long)

    def retain_batch(self, scores: torch.Tensor, slots_per_head: list[int]) -> torch.Tensor:
        """:meth:`retain` for a batch, shaped as :meth:`allocate_batch`."""
        return torch.tensor([self.retain(row, slots) for row, slots in zip(scores, slots_per_head)], dtype=torch.long)


@dataclass(frozen=True)
class LayerAllocation(Part):
    """Splits prefix slots per head among layers, each at most its cap (its number of prefix entries).

    ``dynamic`` allocations read one summary number per layer (``summarize``), so their budgets
    are only final once every layer has been seen; static ones know them up front and ignore
    ``summaries``. ``allocate(summaries, caps, slots, total)`` returns one slot count per layer:
    static allocations use every layer's cap and ``slots`` (the average), dynamic ones split
    ``total`` among the layers whose summaries are given, which is how progressive compression
    re-divides the whole budget among the layers seen so far.
    """

    kind: ClassVar[str] = "layers"
    dynamic: ClassVar[bool] = False

    def summarize(self, layer: LayerInput, scores: torch.Tensor) -> float | None:
        return None

    def summarize_batch(self, layer: LayerInput, scores: torch.Tensor) -> list[float | None]:
        """One summary per sequence of a batch folded into ``layer``'s heads; ``scores`` is ``[B, H_kv, m]``.

        The default calls :meth:`summarize` per sequence; allocations override it with tensor code.
        """
        if not self.dynamic:
            return [None] * scores.shape[0]
        parts = layer.split(scores.shape[0])
        return [self.summarize(part, row) for part, row in zip(parts, scores)]

    def allocate(self, summaries: list[float | None] | None, caps: list[int], slots: int, total: int) -> list[int]:
        raise NotImplementedError


SCORES: dict[str, type[Score]] = {}
HEAD_ALLOCATIONS: dict[str, type[HeadAllocation]] = {}
LAYER_ALLOCATIONS: dict[str, type[LayerAllocation]] = {}
REGISTRIES: dict[str, dict[str, type[Part]]] = {"score": SCORES, "heads": HEAD_ALLOCATIONS, "layers": LAYER_ALLOCATIONS}

PartT = TypeVar("PartT", bound=type[Part])


def _register(kind: str, base: type[Part], name: str) -> Callable[[PartT], PartT]:
    registry = REGISTRIES[kind]

    def wrap(cls: PartT) -> PartT:
        own_dataclass = isinstance(cls, type) and "__dataclass_fields__" in cls.__dict__
        if not (own_dataclass and issubclass(cls, base)):
            raise TypeError(f"a registered {kind} must be a frozen dataclass subclassing {base.__name__}, got {cls!r}")
        if not cls.__dict__["__dataclass_params__"].frozen:
            raise TypeError(f"{cls.__name__} must be a frozen dataclass (@dataclass(frozen=True))")
        missing = [f.name for f in dataclasses.fields(cls) if f.default is f.default_factory is dataclasses.MISSING]
        if missing:
            raise TypeError(f"{cls.__name__}: every option needs a default, {', '.join(missing)} has none")
        if not isinstance(name, str) or not name or any(c in name for c in ",:= "):
            raise ValueError(f"a {kind} name must be a non-empty string without ',', ':', '=' or spaces, got {name!r}")
        known = registry.get(name)
        if known is not None and known.__qualname__ != cls.__qualname__:
            raise ValueError(f"{kind} {name!r} is already registered by {known.__module__}.{known.__qualname__}")
        cls.name = name
        registry[name] = cls
        return cls

    return wrap


def register_score(name: str) -> Callable[[PartT], PartT]:
    """Class decorator: register a frozen :class:`Score` dataclass under ``name``."""
    return _register("score", Score, name)


def register_head_allocation(name: str) -> Callable[[PartT], PartT]:
    """Class decorator: register a frozen :class:`HeadAllocation` dataclass under ``name``."""
    return _register("heads", HeadAllocation, name)


def register_layer_allocation(name: str) -> Callable[[PartT], PartT]:
    """Class decorator: register a frozen :class:`LayerAllocation` dataclass under ``name``."""
    return _register("layers", LayerAllocation, name)


def part_class(kind: str, name: str) -> type[Part]:
    """The registered part ``name`` of ``kind`` (``score``, ``heads`` or ``layers``), or a clear error."""
    registry = REGISTRIES[kind]
    if name not in registry:
        from .plugins import load_plugins

        load_plugins()
    if name not in registry:
        raise ValueError(f"unknown {kind} {name!r}; valid: {', '.join(sorted(registry))}")
    return registry[name]


@dataclass(frozen=True)
class LayerWeights:
    """What a score may read of the layer itself, as plain tensors and a function (handed over at prefill).

    ``output`` is the output projection's weight ``[hidden, H * d]`` (``None`` when the layer has
    none); ``rotary(positions)`` returns the ``(cos, sin)`` ``[len(positions), d]`` that the
    model's rotary embedding applies at those positions (rotate-half convention, attention
    scaling included), ``None`` for a model without one.
    """

    output: torch.Tensor | None = None
    rotary: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None = None


@dataclass
class LayerInput:
    """One sequence's prefill tensors for one layer, with the window attention computed once, lazily.

    ``query`` is ``[H, q, d]``, the queries of the last ``q`` of the ``n`` positions (``q = n`` at
    prefill, the latest generated tokens while decoding); ``key`` and ``value`` are ``[H_kv, n, d]``
    (keys after RoPE);
    ``observed`` is the number of last queries that score the prefix (the window), ``prefix_length``
    the number ``m`` of leading entries that compete for slots (the rest is the kept window).
    ``first_position`` is the position of ``key[:, 0]`` in its sequence, ``layer_weights``
    what the model handed over of the layer (read through :attr:`weights`), ``layer_index`` the
    layer's index in the model; ``pass_query`` ``[H, r, d]`` and ``pass_key`` ``[H_kv, r, d]`` the
    queries and keys of a scoring pass's ``r`` tokens, which follow the prompt.
    """

    query: torch.Tensor
    key: torch.Tensor
    value: torch.Tensor
    scaling: float
    observed: int
    prefix_length: int
    _window_attention: torch.Tensor | None = field(default=None, repr=False)
    first_position: int = 0
    layer_weights: LayerWeights | None = field(default=None, repr=False)
    layer_index: int = 0
    pass_query: torch.Tensor | None = field(default=None, repr=False)
    pass_key: torch.Tensor | None = field(default=None, repr=False)

    @property
    def weights(self) -> LayerWeights:
        """The layer's weights, or a clear error where none were handed over (a decode budget's evictions)."""
        if self.layer_weights is None:
            raise ValueError(
                "this score reads the layer's weights, which the model hands over at prefill only; "
                "they are not available here"
            )
        return self.layer_weights

    @property
    def num_kv_heads(self) -> int:
        return self.key.shape[0]

    @property
    def group_size(self) -> int:
        return self.query.shape[0] // self.key.shape[0]

    @property
    def window_attention(self) -> torch.Tensor:
        """``A[h, j, i]``: softmax attention (float32, causal) of the last ``observed`` queries over all keys."""
        if self._window_attention is None:
            self._window_attention = attention_probabilities(
                self.query[:, -self.observed :],
                self.key,
                self.scaling,
                first_query_position=self.length - self.observed,
            )
        return self._window_attention

    @property
    def length(self) -> int:
        return self.key.shape[1]

    def split(self, batch: int) -> list[LayerInput]:
        """The ``batch`` sequences folded into this input's heads, each as its own input (views)."""
        heads, kv_heads = self.query.shape[0] // batch, self.key.shape[0] // batch
        attention = self._window_attention
        return [
            LayerInput(
                self.query[b * heads : (b + 1) * heads],
                self.key[b * kv_heads : (b + 1) * kv_heads],
                self.value[b * kv_heads : (b + 1) * kv_heads],
                self.scaling,
                self.observed,
                self.prefix_length,
                None if attention is None else attention[b * heads : (b + 1) * heads],
                self.first_position,
                self.layer_weights,
                self.layer_index,
                None if self.pass_query is None else self.pass_query[b * heads : (b + 1) * heads],
                None if self.pass_key is None else self.pass_key[b * kv_heads : (b + 1) * kv_heads],
            )
            for b in range(batch)
        ]


def attention_probabilities(
    query: torch.Tensor, key: torch.Tensor, scaling: float, first_query_position: int
) -> torch.Tensor:
    """Causal softmax attention ``[H, q, n]`` in float32 of ``query[H, q, d]`` over ``key[H_kv, n, d]``."""
    heads, q_len, _ = query.shape
    kv_heads, n, _ = key.shape
    grouped = query.float().reshape(kv_heads, heads // kv_heads * q_len, -1)
    logits = (grouped @ key.float().transpose(1, 2)).reshape(heads, q_len, n)
    logits.mul_(scaling)
    first_future = max(0, first_query_position + 1)
    if first_future < n:
        query_positions = torch.arange(first_query_position, first_query_position + q_len, device=key.device)
        future = torch.arange(first_future, n, device=key.device)[None, :] > query_positions[:, None]
        logits[:, :, first_future:].masked_fill_(future, -math.inf)
    return torch.softmax(logits, dim=-1)


def stable_rank(scores: torch.Tensor) -> torch.Tensor:
    """Indices sorting ``scores`` descending along the last dim; ties go to the lower index.

    Max-pooling produces plateaus of equal scores, so every selection uses this order to stay
    deterministic (progressive and one-shot compression must agree entry for entry).
    """
    return torch.sort(scores, dim=-1, descending=True, stable=True).indices


def round_to_total(shares: list[float], total: int, caps: list[int]) -> list[int]:
    """Round non-negative real ``shares`` to integers summing to ``min(total, sum(caps))``, each <= its cap.

    Floors first, then hands the remainder out by largest fractional part (ties to the lower
    index), then to any entry with room left, so no slot is ever lost or exceeded.
    """
    target = min(total, sum(caps))
    result = [min(cap, max(0, math.floor(share + 1e-9))) for share, cap in zip(shares, caps)]
    remainder = target - sum(result)
    if remainder < 0:
        for index in sorted(range(len(result)), key=lambda i: (shares[i] - result[i], -shares[i], i)):
            while remainder < 0 and result[index] > 0:
                result[index] -= 1
                remainder += 1
        return result
    order = sorted(range(len(result)), key=lambda i: (-(shares[i] - math.floor(shares[i] + 1e-9)), i))
    for index in order:
        if remainder == 0:
            break
        if result[index] < caps[index] and shares[index] > result[index]:
            result[index] += 1
            remainder -= 1
    for index in range(len(result)):
        room = min(remainder, caps[index] - result[index])
        result[index] += room
        remainder -= room
    return result


def proportional_shares(weights: list[float], caps: list[int], total: int) -> list[int]:
    """Split ``total`` in proportion to ``weights``, each share at most its cap (water-filling).

    Shares that hit their cap are fixed and the rest is re-split among the others, so a layer
    that is kept whole gives its unused slots to the remaining ones.
    """
    weights = [max(0.0, float(w)) if math.isfinite(w) else 0.0 for w in weights]
    if sum(weights) <= 0:
        weights = [1.0] * len(weights)
    shares = [0.0] * len(weights)
    active = [i for i in range(len(weights)) if caps[i] > 0]
    remaining = float(min(total, sum(caps)))
    while active:
        weight_sum = sum(weights[i] for i in active)
        if weight_sum <= 0:
            for i in active:
                shares[i] = remaining / len(active)
            break
        scale = remaining / weight_sum
        capped = [i for i in active if weights[i] * scale >= caps[i]]
        if not capped:
            for i in active:
                shares[i] = weights[i] * scale
            break
        for i in capped:
            shares[i] = float(caps[i])
            remaining -= caps[i]
        active = [i for i in active if i not in capped]
    return round_to_total(shares, total, caps)
