"""Compressing while decoding: the decode budget's per-layer targets and evictions."""

from __future__ import annotations

import torch

from ..methods import Method
from ..methods.registry import round_to_total
from ..selection import PhaseClock, select_while_decoding
from .layer import CompressedLayer


class DecodeEviction:
    """Keeps every layer of a cache within its share of ``decode_budget`` while decoding.

    Whenever a row of a layer holds ``interval`` entries per head beyond its target, that row is
    compressed back to the target over prompt and generated entries alike, ranked by the
    method's own score from the layer's latest queries and split among heads by its own head
    allocation. The state (queries, counts, targets) lives on the layers; this object holds the
    policy and counts the evictions.
    """

    def __init__(self, method: Method, decode_budget: int, interval: int, clock: PhaseClock):
        self.method = method
        self.decode_budget = decode_budget
        self.interval = interval
        self.clock = clock
        self.evictions = 0

    def start(self, layers: list[CompressedLayer], bounds: list[int]) -> None:
        """At the end of the prefill (``bounds``: each row's prompt end): targets, then evict where already due."""
        targets = self.layer_targets(layers, bounds)
        for index, layer in enumerate(layers):
            layer.decode_targets = [row[index] for row in targets]
        for layer in layers:
            self.evict_if_due(layer)

    def after_step(self, layer: CompressedLayer, query: torch.Tensor) -> None:
        """A decode step's queries join the layer's latest ones; evict if the layer is due."""
        steps = query.shape[2]
        layer.remember_queries(query, [count + steps for count in layer.recent_counts], self.method.window)
        self.evict_if_due(layer)

    def layer_targets(self, layers: list[CompressedLayer], bounds: list[int]) -> list[list[int]]:
        """Per sequence and layer, the entries per head the decode budget gives it (at least 1; exact total).

        A decode budget at or above what the prefill kept adds the same room to every layer on top of
        its prefill budget (so a budget above the total length never evicts); a smaller one shrinks
        every layer in proportion to its prefill budget.
        """
        kept = [layer.storage.count_before(bounds).float().mean(dim=-1).tolist() for layer in layers]
        count = len(layers)
        total = self.decode_budget * count
        targets = []
        for row in range(len(bounds)):
            shares = [layer[row] for layer in kept]
            mean = sum(shares) / count
            if self.decode_budget >= mean:
                wanted = [share + self.decode_budget - mean for share in shares]
            else:
                wanted = [share * self.decode_budget / max(mean, 1e-9) for share in shares]
            spare = total - count
            rounded = round_to_total([max(0.0, w - 1) for w in wanted], spare, [spare] * count)
            targets.append([1 + extra for extra in rounded])
        return targets

    def evict_if_due(self, layer: CompressedLayer) -> None:
        """Compress the rows of a layer that hold ``interval`` entries per head beyond their target."""
        held = layer.storage.row_lengths().float().mean(dim=-1).tolist()
        due = [mean >= target + self.interval for mean, target in zip(held, layer.decode_targets)]
        if any(due):
            with self.clock.phase("decode"):
                self._evict(layer, due)

    def _evict(self, layer: CompressedLayer, due: list[bool]) -> None:
        storage = layer.storage
        recent, counts = layer.recent_queries, list(layer.recent_counts)
        next_position = storage.append_start + storage.steps
        chosen = []
        for row in range(storage.batch):
            lengths = storage.row_lengths()[row].tolist()
            if not due[row]:
                chosen.append([torch.arange(count) for count in lengths])
                continue
            heads = [storage.full_row(row, head) for head in range(storage.kv_heads)]
            queries = recent[row, :, recent.shape[2] - counts[row] :]
            indices, kept_window = select_while_decoding(
                self.method,
                heads,
                queries,
                layer.scaling,
                layer.decode_targets[row],
                next_position,
                layer.sliding_window,
            )
            chosen.append(indices)
            counts[row] = min(counts[row], kept_window)
        layer.set_storage(storage.keep(chosen))
        layer.recent_counts = counts
        self.evictions += 1
