"""Which entries one sequence keeps, layer by layer, as the prefill goes.

Static layer allocations (uniform, pyramid) know every layer's budget up front, so each layer
is final as soon as it is scored. Dynamic ones (LAVa, CAKE) need every layer's summary first:
with progressive compression the whole budget is re-divided among the layers seen so far after
each layer, and earlier layers shrink to their new budgets (plus a small slack that absorbs
rounding), so the cache never holds every layer's full prompt. The final selection is computed
from the retained candidates exactly as the one-shot selection is computed from all of them.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from .methods import Budget, LayerInput, Method
from .methods.registry import stable_rank

Row = tuple[torch.Tensor, torch.Tensor, torch.Tensor]

logger = logging.getLogger(__name__)


@dataclass
class Candidates:
    """The prefix entries one KV head still holds, in ascending position order."""

    positions: torch.Tensor
    keys: torch.Tensor
    values: torch.Tensor
    scores: torch.Tensor | None = None

    def take(self, count: int) -> Candidates:
        """The ``count`` best-scored entries, still in position order."""
        if count >= len(self.positions):
            return self
        chosen = stable_rank(self.scores)[:count].sort().values
        return Candidates(self.positions[chosen], self.keys[chosen], self.values[chosen], self.scores[chosen])

    @property
    def nbytes(self) -> int:
        extra = self.scores.nbytes if self.scores is not None else 0
        return self.keys.nbytes + self.values.nbytes + self.positions.nbytes + extra


@dataclass
class LayerEntries:
    """One layer of one sequence: per KV head, its prefix entries; the window is shared by all heads."""

    heads: list[Candidates]
    window_positions: torch.Tensor
    window_keys: torch.Tensor
    window_values: torch.Tensor
    final: bool = False

    def head_tensors(self, head: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Positions, keys and values head ``head`` keeps, prefix then window (ascending positions)."""
        prefix = self.heads[head]
        return (
            torch.cat([prefix.positions, self.window_positions]),
            torch.cat([prefix.keys, self.window_keys[head]]),
            torch.cat([prefix.values, self.window_values[head]]),
        )

    def counts(self) -> list[int]:
        return [len(head.positions) + len(self.window_positions) for head in self.heads]

    @property
    def nbytes(self) -> int:
        window = self.window_keys.nbytes + self.window_values.nbytes + self.window_positions.nbytes
        return window + sum(head.nbytes for head in self.heads)


RELEASED = LayerEntries([], torch.empty(0), torch.empty(0, 0, 0), torch.empty(0, 0, 0), final=True)


@dataclass
class PhaseClock:
    """Seconds a cache spent compressing, summed over layers and samples.

    ``score`` is computing the scores, ``allocate`` the layer and head allocations, and ``total``
    everything compression adds to a prefill (selection, copies and packing included), ``decode``
    the evictions of a decode budget while generating. Used by
    ``lavakv bench`` to show what compression costs on top of the model's own prefill.
    """

    seconds: dict[str, float] = field(
        default_factory=lambda: {"score": 0.0, "allocate": 0.0, "total": 0.0, "decode": 0.0}
    )

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] += time.perf_counter() - start


class SequenceCompression:
    """Decides, layer after layer, the entries one sequence keeps (see the module docstring).

    ``budget`` is in tokens per KV head per layer and ``window`` the observation window after the
    budget's window policy (:class:`~lavakv.methods.Budget`); ``visible_lengths`` is, per layer,
    how many trailing prompt positions its attention can see.
    """

    def __init__(
        self,
        method: Method,
        length: int,
        budget: int,
        visible_lengths: list[int],
        progressive: bool,
        score_memo: dict | None = None,
        clock: PhaseClock | None = None,
        window: int | None = None,
    ):
        self.method = method
        self.clock = clock or PhaseClock()
        self.score_memo = score_memo
        self.length = length
        self.budget = budget
        self.num_layers = len(visible_lengths)
        self.visible_lengths = visible_lengths
        self.compresses = method.compresses and budget < max(visible_lengths)
        self.observed = method.window if window is None else window
        self.window = Budget.kept_window(self.observed, budget) if self.compresses else 0
        self.slots = budget - self.window
        self.caps = [max(0, visible - self.window) for visible in visible_lengths]
        self.total_slots = sum(min(self.slots, cap) for cap in self.caps)
        problem = method.budget_problem(budget, self.observed) if self.compresses else None
        if problem is not None:
            # Token budgets are refused up front (Method.check_budget); a ratio's tokens come per prompt.
            logger.warning(
                "%s; this %d-token prompt's budget is %d tokens, and it keeps what fits", problem, length, budget
            )
        self.progressive = progressive
        self.layers: list[LayerEntries | None] = [None] * self.num_layers
        self.summaries: list[float | None] = []
        self.layer_slots: list[int] | None = None
        if self.compresses:
            self.allocation = method.layers
            if not self.allocation.dynamic:
                self.layer_slots = self.allocation.allocate(None, self.caps, self.slots, self.total_slots)

    def add_layer(
        self, layer: int, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scaling: float
    ) -> None:
        """Score and (provisionally) compress ``layer``.

        ``query`` is ``[H, v, d]``, ``key`` and ``value`` ``[H_kv, v, d]``: the ``v`` positions the
        layer's last query can see (the whole prompt, or a sliding window's worth).
        """
        visible = key.shape[1]
        first_position = self.length - visible
        positions = torch.arange(first_position, self.length, device=key.device)
        prefix = self.caps[layer] if self.compresses else visible
        if not self.compresses or prefix == 0:
            heads = [
                self._own(Candidates(positions[:prefix], key[h, :prefix], value[h, :prefix]))
                for h in range(key.shape[0])
            ]
            self.layers[layer] = self._entries(heads, positions, key, value, prefix, final=True)
            self.summaries.append(None)
            self._after_layer(layer)
            return
        layer_input = LayerInput(query, key, value, scaling, observed=min(self.observed, visible), prefix_length=prefix)
        with self.clock.phase("score"):
            scores = self._score(layer, layer_input)
        with self.clock.phase("allocate"):
            self.summaries.append(self.allocation.summarize(layer_input, scores))
        heads = [
            Candidates(positions[:prefix], key[h, :prefix], value[h, :prefix], scores[h]) for h in range(key.shape[0])
        ]
        entries = self._entries(heads, positions, key, value, prefix, final=False)
        self.layers[layer] = entries
        if self.layer_slots is not None:
            self._select(layer, self.layer_slots[layer])
        elif self.progressive:
            seen = layer + 1
            with self.clock.phase("allocate"):
                slots = self.allocation.allocate(self.summaries, self.caps[:seen], self.slots, self.total_slots)
            for earlier in range(seen):
                self._retain(earlier, slots[earlier])
        else:
            entries.heads = [self._own(head) for head in entries.heads]
        self._after_layer(layer)

    def _score(self, layer: int, layer_input: LayerInput) -> torch.Tensor:
        """The layer's scores; with a memo, computed once per score and window (scores ignore budgets)."""
        score = self.method.score
        if self.score_memo is None:
            return score(layer_input).float()
        key = (layer, layer_input.prefix_length, layer_input.observed, score)
        if key not in self.score_memo:
            self.score_memo[key] = score(layer_input).float()
        return self.score_memo[key]

    def _entries(self, heads, positions, key, value, prefix, final) -> LayerEntries:
        return LayerEntries(
            heads=heads,
            window_positions=positions[prefix:],
            window_keys=key[:, prefix:].clone(),
            window_values=value[:, prefix:].clone(),
            final=final,
        )

    def _after_layer(self, layer: int) -> None:
        if layer == self.num_layers - 1 and self.compresses and self.layer_slots is None:
            with self.clock.phase("allocate"):
                self.layer_slots = self.allocation.allocate(self.summaries, self.caps, self.slots, self.total_slots)
            for index in range(self.num_layers):
                if not self.layers[index].final:
                    self._select(index, self.layer_slots[index])

    def _padded_scores(self, layer: int) -> torch.Tensor:
        heads = self.layers[layer].heads
        width = max(len(head.positions) for head in heads)
        padded = torch.full((len(heads), width), -math.inf, device=heads[0].scores.device)
        for index, head in enumerate(heads):
            padded[index, : len(head.scores)] = head.scores
        return padded

    def _select(self, layer: int, slots: int) -> None:
        """Final selection: each head keeps its own best ``cap_h`` entries under the head allocation."""
        entries = self.layers[layer]
        with self.clock.phase("allocate"):
            caps = self.method.heads.allocate(self._padded_scores(layer), slots)
        for head, cap in zip(entries.heads, caps):
            if cap > len(head.positions):
                raise RuntimeError(
                    f"internal error: layer {layer} needs {cap} entries for a head that retained {len(head.positions)}"
                )
        entries.heads = [self._detach(head.take(cap)) for head, cap in zip(entries.heads, caps)]
        entries.final = True

    def _retain(self, layer: int, slots: int) -> None:
        """Provisional shrink: keep enough candidates per head for any later, smaller budget.

        A later layer budget can exceed this one by at most one slot after rounding, which moves a
        head's share by at most ``kv_heads + 2``: that is the slack kept beyond the current need.
        A layer is shrunk only once it holds more than twice what it needs, so that each layer is
        re-selected a few times rather than after every later layer; memory stays within twice
        the need.
        """
        entries = self.layers[layer]
        with self.clock.phase("allocate"):
            needed = self.method.heads.retain(self._padded_scores(layer), slots)
        slack = len(entries.heads) + 2
        needs = [count + slack for count in needed]
        if all(len(head.positions) <= 2 * need for head, need in zip(entries.heads, needs)):
            entries.heads = [self._own(head) for head in entries.heads]
            return
        entries.heads = [self._own(head.take(need)) for head, need in zip(entries.heads, needs)]

    @staticmethod
    def _own(head: Candidates) -> Candidates:
        """Copy views of the layer's full tensors so that the full prompt cache can be freed."""
        if head.keys._base is None:
            return head
        scores = head.scores.clone() if head.scores is not None else None
        return Candidates(head.positions.clone(), head.keys.clone(), head.values.clone(), scores)

    @classmethod
    def _detach(cls, head: Candidates) -> Candidates:
        head = cls._own(head)
        return Candidates(head.positions, head.keys, head.values, None)

    def is_final(self, layer: int) -> bool:
        entries = self.layers[layer]
        return entries is not None and entries is not RELEASED and entries.final

    def release(self, layer: int) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Hand over a final layer's ``(positions, keys, values)`` per head; this object keeps nothing of it."""
        entries = self.layers[layer]
        tensors = [entries.head_tensors(head) for head in range(len(entries.heads))]
        self.layers[layer] = RELEASED
        return tensors

    @property
    def nbytes(self) -> int:
        """Bytes held by layers not yet handed to the cache."""
        return sum(entries.nbytes for entries in self.layers if entries is not None)


def select_while_decoding(
    method: Method,
    heads: list[Row],
    queries: torch.Tensor,
    scaling: float,
    target: int,
    next_position: int,
    sliding_window: int | None = None,
) -> tuple[list[torch.Tensor], int]:
    """Which entries one sequence's layer keeps when a decode budget compresses it back to ``target`` per head.

    ``heads`` are each KV head's held ``(positions, keys, values)`` in position order, the latest
    generated tokens last; ``queries [H, w, d]`` are those tokens' queries. The method's own
    score, computed from these queries as at prefill from the window's, ranks each head's
    entries; its own head allocation splits ``target`` per head (window included, on average)
    among the heads; the last ``window`` entries are always kept. On a sliding-window layer
    entries the next query can no longer see are dropped first. Returns the kept indices of
    each head (ascending) and how many trailing entries every head kept.
    """
    counts = [len(positions) for positions, _, _ in heads]
    kv_heads = len(heads)
    if sum(counts) <= target * kv_heads:
        return [torch.arange(count) for count in counts], queries.shape[1]
    window = min(method.window, target - 1, min(counts))
    observed = max(1, min(method.window, queries.shape[1], min(counts)))
    group = queries.shape[0] // kv_heads
    prefixes = [count - window for count in counts]
    padded = torch.full((kv_heads, max(prefixes)), -math.inf)
    for head, ((positions, keys, values), prefix) in enumerate(zip(heads, prefixes)):
        if prefix == 0:
            continue
        layer = LayerInput(
            queries[head * group : (head + 1) * group, -observed:].to(keys.dtype),
            keys[None],
            values[None],
            scaling,
            observed=observed,
            prefix_length=prefix,
        )
        scores = method.score(layer).float()[0].cpu()
        if sliding_window:
            unseen = (next_position - positions[:prefix].long().cpu()) >= sliding_window
            scores = scores.masked_fill(unseen, -math.inf)
        padded[head, :prefix] = scores
    caps = method.heads.allocate(padded, target - window)
    kept = []
    for head, (cap, prefix, count) in enumerate(zip(caps, prefixes, counts)):
        chosen = stable_rank(padded[head, :prefix])[:cap].sort().values
        kept.append(torch.cat([chosen, torch.arange(prefix, count)]))
    return kept, window
