"""Which entries a batch of sequences keeps, layer by layer, as the prefill goes.

Sequences of one prompt length share their budget, window and layer caps, so they are compressed
together as one :class:`GroupCompression`: scores for the whole group come from one call (the
batch is folded into the head dimension, which every score treats row by row), allocations and
selections are tensor operations over all of its (sequence, KV head) rows, and each layer's kept
entries come out already packed for :class:`~lavakv.ragged.RaggedKV`. A padded batch forms one
group per run of equal lengths.

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

from .methods import Budget, LayerInput, LayerWeights, Method
from .methods.registry import stable_rank

Row = tuple[torch.Tensor, torch.Tensor, torch.Tensor]

CPU_SCORE_PART_BYTES = 8 * 2**20
"""On a CPU, the most window-attention bytes one scoring call of a group computes at once."""

logger = logging.getLogger(__name__)


@dataclass
class Candidates:
    """The prefix entries each row (``sequence * kv_heads + head``) of one layer still holds.

    Either *dense*, every row holding the same entries (``keys [size, H_kv, m, d]``, ``positions
    [m]``, ``scores [R, m]``, possibly views of the layer's full prefill tensors), or *packed*, rows of
    ``counts[r]`` entries back to back (``keys [N, d]``, ``positions [N]``, ``scores [N]``). Within
    a row, entries are in ascending position order.
    """

    positions: torch.Tensor
    keys: torch.Tensor
    values: torch.Tensor
    counts: torch.Tensor
    scores: torch.Tensor | None = None

    @property
    def dense(self) -> bool:
        return self.keys.dim() == 4

    @property
    def rows(self) -> int:
        return self.counts.shape[0]

    def valid(self) -> torch.Tensor:
        """``[R, longest]``: which slots of a row-padded layout hold an entry."""
        longest = int(self.counts.max()) if self.rows else 0
        return torch.arange(longest, device=self.counts.device)[None, :] < self.counts[:, None]

    def padded_scores(self) -> torch.Tensor:
        """``[R, longest]`` scores, ``-inf`` where a row has no entry."""
        if self.dense:
            return self.scores
        valid = self.valid()
        padded = torch.full(valid.shape, -math.inf, device=self.scores.device)
        padded[valid] = self.scores
        return padded

    def take(self, wanted: torch.Tensor, padded: torch.Tensor | None = None) -> Candidates:
        """Each row's ``wanted[r]`` best-scored entries (ties to the earlier position), packed and owned.

        ``padded`` is :meth:`padded_scores` when the caller already built it.
        """
        counts = self.counts
        wanted = torch.minimum(wanted.to(counts.device), counts)
        padded = self.padded_scores() if padded is None else padded
        order = stable_rank(padded)
        rank = torch.empty_like(order)
        rank.scatter_(1, order, torch.arange(padded.shape[1], device=padded.device).expand_as(order))
        keep = rank < wanted[:, None]
        if self.dense:
            positions, scores = self.positions.expand(keep.shape)[keep], self.scores[keep]
            entries = keep.view(self.keys.shape[:-1])
        else:
            keep = keep[self.valid()]
            positions, scores, entries = self.positions[keep], self.scores[keep], keep
        return Candidates(positions, self.keys[entries], self.values[entries], wanted, scores)

    def owned(self) -> Candidates:
        """A copy of any views of the layer's full tensors, so that the full prompt cache can be freed."""
        if self.keys._base is None:
            return self
        scores = None if self.scores is None else self.scores.clone()
        return Candidates(self.positions.clone(), self.keys.clone(), self.values.clone(), self.counts, scores)

    def flat(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Packed ``(positions [N], keys [N, d], values [N, d])``."""
        if not self.dense:
            return self.positions, self.keys, self.values
        dim = self.keys.shape[-1]
        return self.positions.repeat(self.rows), self.keys.reshape(-1, dim), self.values.reshape(-1, dim)

    @property
    def nbytes(self) -> int:
        extra = self.scores.nbytes if self.scores is not None else 0
        return self.keys.nbytes + self.values.nbytes + self.positions.nbytes + extra


@dataclass
class LayerEntries:
    """One layer of a group: its rows' prefix candidates; the window ``[size, H_kv, w, d]`` is kept by every row."""

    prefix: Candidates
    window_positions: torch.Tensor
    window_keys: torch.Tensor
    window_values: torch.Tensor
    final: bool = False

    def packed(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(positions [N], keys [N, d], values [N, d], counts [R])``: each row's prefix then window."""
        positions, keys, values = self.prefix.flat()
        counts = self.prefix.counts
        *_, window, dim = self.window_keys.shape
        if window == 0:
            return positions, keys, values, counts
        rows = counts.shape[0]
        if self.prefix.dense:
            length = self.prefix.keys.shape[-2]
            full_positions = torch.cat([self.prefix.positions, self.window_positions]).repeat(rows)
            full_keys = torch.cat([self.prefix.keys, self.window_keys], dim=-2).reshape(-1, dim)
            full_values = torch.cat([self.prefix.values, self.window_values], dim=-2).reshape(-1, dim)
            return full_positions, full_keys, full_values, torch.full_like(counts, length + window)
        totals = counts + window
        starts = totals.cumsum(0) - totals
        row_of_entry = torch.repeat_interleave(torch.arange(rows, device=counts.device), counts)
        column = torch.arange(len(positions), device=counts.device) - (counts.cumsum(0) - counts)[row_of_entry]
        prefix_slots = starts[row_of_entry] + column
        window_slots = (starts + counts)[:, None] + torch.arange(window, device=counts.device)
        size = len(positions) + rows * window
        out_positions = positions.new_empty(size)
        out_keys, out_values = keys.new_empty(size, dim), values.new_empty(size, dim)
        for out, prefix, tail in (
            (out_positions, positions, self.window_positions.expand(rows, -1)),
            (out_keys, keys, self.window_keys),
            (out_values, values, self.window_values),
        ):
            out[prefix_slots] = prefix
            out[window_slots.reshape(-1)] = tail.reshape(rows * window, *out.shape[1:])
        return out_positions, out_keys, out_values, totals

    @property
    def nbytes(self) -> int:
        window = self.window_keys.nbytes + self.window_values.nbytes + self.window_positions.nbytes
        return window + self.prefix.nbytes


RELEASED = object()


@dataclass
class PhaseClock:
    """Seconds a cache spent compressing, summed over layers and samples.

    ``score`` is computing the scores, ``allocate`` the layer and head allocations, and ``total``
    everything compression adds to a prefill (selection, copies and packing included), ``decode``
    the evictions of a decode budget while generating, ``pass`` a scoring pass over the prompt
    (KVzip's reconstruction). Used by
    ``lavakv bench`` to show what compression costs on top of the model's own prefill.
    """

    seconds: dict[str, float] = field(
        default_factory=lambda: {"score": 0.0, "allocate": 0.0, "total": 0.0, "decode": 0.0, "pass": 0.0}
    )

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] += time.perf_counter() - start


class GroupCompression:
    """Decides, layer after layer, the entries ``size`` sequences of one prompt length keep (module docstring).

    ``budget`` is in tokens per KV head per layer and ``window`` the observation window after the
    budget's window policy (:class:`~lavakv.methods.Budget`); ``visible_lengths`` is, per layer,
    how many trailing prompt positions its attention can see. Dynamic layer allocations give each
    sequence its own layer budgets (from its own summaries); everything else is shared.
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
        size: int = 1,
    ):
        self.method = method
        self.size = size
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
        self.layers: list = [None] * self.num_layers
        self.second_stage: dict[int, torch.Tensor] = {}
        self.summaries: list[list[float | None]] = []
        self.layer_slots: list[list[int]] | None = None
        if self.compresses:
            self.allocation = method.layers
            if not self.allocation.dynamic:
                static = self.allocation.allocate(None, self.caps, self.slots, self.total_slots)
                self.layer_slots = [static] * size

    def add_layer(
        self,
        layer: int,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        scaling: float,
        weights: LayerWeights | None = None,
        scoring_pass: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> None:
        """Score and (provisionally) compress ``layer`` for every sequence of the group.

        ``query`` is ``[size, H, v, d]``, ``key`` and ``value`` ``[size, H_kv, v, d]``: the ``v``
        positions the layer's last query can see (the whole prompt, or a sliding window's worth).
        ``weights`` is what the model hands over of the layer, for scores that read it, and
        ``scoring_pass`` the ``(queries [size, H, r, d], keys [size, H_kv, r, d])`` of a pass over
        the prompt, for scores that read one.
        Candidates stay views of these tensors until a selection copies the entries it keeps.
        """
        size, kv_heads, visible, _ = key.shape
        positions = torch.arange(self.length - visible, self.length, device=key.device)
        prefix = self.caps[layer] if self.compresses else visible
        counts = torch.full((size * kv_heads,), prefix, dtype=torch.long, device=key.device)
        window = (positions[prefix:], key[:, :, prefix:].clone(), value[:, :, prefix:].clone())
        if not self.compresses or prefix == 0:
            candidates = Candidates(positions[:prefix], key[:, :, :prefix], value[:, :, :prefix], counts).owned()
            self.layers[layer] = LayerEntries(candidates, *window, final=True)
            self.summaries.append([None] * size)
            self._after_layer(layer)
            return
        observed = min(self.observed, visible)
        if self.method.score.window_queries_only:
            query = query[:, :, query.shape[2] - observed :]
        parts = self._score_inputs(layer, query, key, value, scaling, observed, prefix, weights, scoring_pass)
        with self.clock.phase("score"):
            scores = self._score(layer, parts, observed, prefix)
            if self.method.score.two_stage:
                self.second_stage[layer] = self._second_stage(layer, parts, scores, observed, prefix)
        with self.clock.phase("allocate"):
            self.summaries.append(self._summarize(parts, scores.view(size, kv_heads, prefix)))
        candidates = Candidates(positions[:prefix], key[:, :, :prefix], value[:, :, :prefix], counts, scores)
        entries = LayerEntries(candidates, *window)
        self.layers[layer] = entries
        if self.layer_slots is not None:
            self._select(layer, [slots[layer] for slots in self.layer_slots])
        elif self.progressive:
            seen = layer + 1
            with self.clock.phase("allocate"):
                slots = [
                    self.allocation.allocate(
                        [summaries[sample] for summaries in self.summaries],
                        self.caps[:seen],
                        self.slots,
                        self.total_slots,
                    )
                    for sample in range(size)
                ]
            for earlier in range(seen):
                self._retain(earlier, [row[earlier] for row in slots])
        else:
            entries.prefix = entries.prefix.owned()
        self._after_layer(layer)

    def _score_inputs(
        self, layer, query, key, value, scaling, observed, prefix, weights, scoring_pass
    ) -> list[tuple[int, LayerInput]]:
        """``(sequences, input)`` parts covering the group, each with its sequences folded into the heads.

        One part for the whole group where the score treats heads independently; on a CPU, parts
        whose window attention fits in :data:`CPU_SCORE_PART_BYTES` (larger intermediates run from
        main memory and cost more per sequence than several small calls); one sequence per part
        for a score that compares heads.
        """
        size = key.shape[0]
        per_part = 1
        if self.method.score.rows_independent:
            per_part = size
            if key.device.type == "cpu":
                one = query.shape[1] * observed * key.shape[2] * 4
                per_part = max(1, min(size, CPU_SCORE_PART_BYTES // max(one, 1)))
        parts = []
        first_position = self.length - key.shape[2]
        for first in range(0, size, per_part):
            q, k, v = (t[first : first + per_part].flatten(0, 1) for t in (query, key, value))
            pass_query, pass_key = (
                (None, None)
                if scoring_pass is None
                else (t[first : first + per_part].flatten(0, 1) for t in scoring_pass)
            )
            part = LayerInput(
                q,
                k,
                v,
                scaling,
                observed,
                prefix,
                first_position=first_position,
                layer_weights=weights,
                layer_index=layer,
                pass_query=pass_query,
                pass_key=pass_key,
            )
            parts.append((q.shape[0] // query.shape[1], part))
        return parts

    def _score(self, layer: int, parts: list[tuple[int, LayerInput]], observed: int, prefix: int) -> torch.Tensor:
        """The layer's scores ``[size * H_kv, m]``; with a memo, computed once per score and window."""
        score = self.method.score
        key = (layer, prefix, observed, score)
        if self.score_memo is not None and key in self.score_memo:
            return self.score_memo[key]
        scores = torch.cat([score(part).float() for _, part in parts]) if len(parts) > 1 else score(parts[0][1]).float()
        if self.score_memo is not None:
            self.score_memo[key] = scores
        return scores

    def _second_stage(
        self, layer: int, parts: list[tuple[int, LayerInput]], scores: torch.Tensor, observed: int, prefix: int
    ) -> torch.Tensor:
        """A two-stage score's second ranking ``[size * H_kv, m]``, memoized like the first."""
        score = self.method.score
        key = (layer, prefix, observed, score, "second stage")
        if self.score_memo is not None and key in self.score_memo:
            return self.score_memo[key]
        second, first = [], 0
        for _, part in parts:
            rows = part.key.shape[0]
            second.append(score.second_stage(part, scores[first : first + rows]).float())
            first += rows
        second = torch.cat(second) if len(second) > 1 else second[0]
        if self.score_memo is not None:
            self.score_memo[key] = second
        return second

    def _summarize(self, parts: list[tuple[int, LayerInput]], scores: torch.Tensor) -> list[float | None]:
        summaries, first = [], 0
        for sequences, part in parts:
            summaries += self.allocation.summarize_batch(part, scores[first : first + sequences])
            first += sequences
        return summaries

    def _after_layer(self, layer: int) -> None:
        if layer == self.num_layers - 1 and self.compresses and self.method.layers.dynamic:
            with self.clock.phase("allocate"):
                self.layer_slots = [
                    self.allocation.allocate(
                        [summaries[sample] for summaries in self.summaries], self.caps, self.slots, self.total_slots
                    )
                    for sample in range(self.size)
                ]
            for index in range(self.num_layers):
                if not self.layers[index].final:
                    self._select(index, [slots[index] for slots in self.layer_slots])

    def _row_scores(self, layer: int) -> torch.Tensor:
        padded = self.layers[layer].prefix.padded_scores()
        return padded.view(self.size, -1, padded.shape[-1])

    def _select(self, layer: int, slots: list[int]) -> None:
        """Final selection: each head keeps its own best ``cap_h`` entries under the head allocation."""
        entries = self.layers[layer]
        scores = self._row_scores(layer)
        with self.clock.phase("allocate"):
            heads = self.method.heads.at_layer(layer, self.num_layers, self.slots)
            caps = heads.allocate_batch(scores, slots).reshape(-1)
        counts = entries.prefix.counts.cpu()
        if bool((caps > counts).any()):
            raise RuntimeError(
                f"internal error: layer {layer} needs {caps.tolist()} entries per head, but its heads retained "
                f"{counts.tolist()}"
            )
        ranking = scores.flatten(0, 1)
        if self.method.score.two_stage:
            ranking = self._two_stage_ranking(layer, ranking, caps)
        taken = entries.prefix.take(caps, ranking)
        entries.prefix = Candidates(taken.positions, taken.keys, taken.values, taken.counts)
        entries.final = True

    def _two_stage_ranking(self, layer: int, scores: torch.Tensor, caps: torch.Tensor) -> torch.Tensor:
        """Each row's first-stage entries (its best by ``scores``) first, then the rest by the second stage."""
        first = self.method.score.first_stage_slots(caps).to(scores.device)
        order = stable_rank(scores)
        rank = torch.empty_like(order)
        rank.scatter_(1, order, torch.arange(scores.shape[1], device=scores.device).expand_as(order))
        second = self.second_stage.pop(layer).to(scores.device)
        return torch.where(rank < first[:, None], math.inf, second)

    def _retain(self, layer: int, slots: list[int]) -> None:
        """Provisional shrink: keep enough candidates per head for any later, smaller budget.

        A later layer budget can exceed this one by at most one slot after rounding, which moves a
        head's share by at most ``kv_heads + 2``: that is the slack kept beyond the current need.
        A layer is shrunk only once some head holds more than twice what it needs, so that each
        layer is re-selected a few times rather than after every later layer; memory stays within
        twice the need.
        """
        entries = self.layers[layer]
        scores = self._row_scores(layer)
        with self.clock.phase("allocate"):
            heads = self.method.heads.at_layer(layer, self.num_layers, self.slots)
            needed = heads.retain_batch(scores, slots).reshape(-1)
        needs = needed + scores.shape[1] + 2
        counts = entries.prefix.counts.cpu()
        if bool((counts <= 2 * needs).all()):
            entries.prefix = entries.prefix.owned()
            return
        entries.prefix = entries.prefix.take(needs, scores.flatten(0, 1))

    def is_final(self, layer: int) -> bool:
        entries = self.layers[layer]
        return entries is not None and entries is not RELEASED and entries.final

    def release(self, layer: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Hand over a final layer, packed: ``(positions, keys, values, lengths [size, H_kv])``; nothing stays here.

        Each (sequence, head) row holds its prefix entries then the window, in position order;
        positions count from the start of the sequence's own prompt.
        """
        positions, keys, values, counts = self.layers[layer].packed()
        self.layers[layer] = RELEASED
        return positions, keys, values, counts.cpu().view(self.size, -1)

    @property
    def nbytes(self) -> int:
        """Bytes held by layers not yet handed to the cache."""
        return sum(entries.nbytes for entries in self.layers if entries is not None and entries is not RELEASED)


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
