"""One greedy decoding loop for ``generate`` and ``eval``: left-padded batches, stops per row.

:class:`TokenFeed` feeds token ids to a model through a cache and keeps each row's next position,
so that left-padded rows get the positions they would get alone (as transformers' ``generate``
computes them from the attention mask). :meth:`TokenFeed.greedy` then takes the argmax token of
every row until each row has hit a stop token, its ``finished`` test or ``max_new_tokens``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .attention import model_forward

DEVICE_CHECK_EVERY = 16
"""Decode steps between reads of the chosen tokens on an accelerator (see :meth:`TokenFeed.greedy`)."""


class TokenFeed:
    """Token ids into ``model`` through ``cache``, row by row positions included.

    ``lengths`` are the real tokens each row already has in ``cache`` (a cache derived from a
    recorded prefill); leave it out and start with :meth:`prefill`.
    """

    def __init__(self, model, cache, lengths: list[int] | None = None):
        self.model = model
        self.cache = cache
        self.device = model.device
        self.next_position = None if lengths is None else torch.tensor(lengths, device=self.device)[:, None]

    def prefill(self, rows: list[list[int]], pad_id: int) -> torch.Tensor:
        """Left-pad ``rows`` into one batch and prefill it; returns the last position's logits ``[B, V]``."""
        if self.next_position is not None:
            raise RuntimeError("this feed's cache already holds a prompt")
        longest = max(len(ids) for ids in rows)
        input_ids = torch.full((len(rows), longest), pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), longest), dtype=torch.long)
        for row, ids in enumerate(rows):
            input_ids[row, longest - len(ids) :] = torch.tensor(ids, dtype=torch.long)
            mask[row, longest - len(ids) :] = 1
        input_ids, mask = input_ids.to(self.device), mask.to(self.device)
        padded = bool((mask == 0).any())
        positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1) if padded else None
        self.next_position = mask.sum(-1, keepdim=True)
        return self._forward(input_ids, mask if padded else None, positions)

    def extend(self, ids: list[list[int]] | torch.Tensor) -> torch.Tensor:
        """Feed ``ids[B, q]`` after what the cache holds; returns the last position's logits ``[B, V]``."""
        if self.next_position is None:
            raise RuntimeError("prefill the feed before extending it")
        ids = torch.as_tensor(ids, dtype=torch.long, device=self.device)
        steps = torch.arange(ids.shape[1], device=self.device)[None, :]
        positions = self.next_position + steps
        self.next_position = self.next_position + ids.shape[1]
        return self._forward(ids, None, positions)

    def _forward(self, input_ids, attention_mask, position_ids) -> torch.Tensor:
        with torch.inference_mode():
            output = model_forward(
                self.model,
                self.cache,
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids,
                logits_to_keep=1,
            )
        return output.logits[:, -1]

    def greedy(
        self,
        logits: torch.Tensor,
        max_new_tokens: int,
        stop_ids: set[int],
        finished: Callable[[list[int]], bool] | None = None,
        check_every: int | None = None,
        drop_finished: bool = False,
    ) -> list[list[int]]:
        """Greedy tokens of every row from the next-token ``logits [B, V]`` on, each row stopping on its own.

        A row stops after a token in ``stop_ids`` (kept in its list), after ``finished(tokens)``
        returns true, or at ``max_new_tokens``. Chosen tokens stay on the model's device and are
        fed straight back; they are read to the host only every ``check_every`` steps (default: every
        step on CPU, where reading costs nothing, and every :data:`DEVICE_CHECK_EVERY` steps on an
        accelerator, where each read waits for the device), so a decode step never waits for the
        host. Rows that stopped keep being fed until every row has stopped; what they produce then
        is discarded, so the tokens are those of a loop that checks every step.

        ``drop_finished=True`` instead takes stopped rows out of the batch (and out of the cache,
        which then holds only the rows still running) once a quarter of the batch has stopped, so
        that a few long answers do not keep the whole batch being fed; for callers that read
        nothing of the cache afterwards.
        """
        if check_every is None:
            check_every = 1 if self.device.type == "cpu" else DEVICE_CHECK_EVERY
        if check_every < 1:
            raise ValueError(f"check_every must be at least 1, got {check_every}")
        rows = logits.shape[0]
        tokens: list[list[int]] = [[] for _ in range(rows)]
        done = [False] * rows
        running = list(range(rows))
        pending: list[torch.Tensor] = []
        step = 0
        while True:
            chosen = logits.argmax(dim=-1)
            pending.append(chosen)
            step += 1
            if step % check_every == 0 or step >= max_new_tokens:
                block = torch.stack(pending, dim=1).tolist()
                pending = []
                for batch_row, new in enumerate(block):
                    row = running[batch_row]
                    for token in new:
                        if done[row]:
                            break
                        tokens[row].append(token)
                        done[row] = (
                            len(tokens[row]) >= max_new_tokens
                            or token in stop_ids
                            or (finished is not None and finished(tokens[row]))
                        )
                if all(done):
                    return tokens
                if drop_finished:
                    live = [index for index, row in enumerate(running) if not done[row]]
                    if len(live) <= 0.75 * len(running):
                        keep = torch.tensor(live, device=self.device)
                        self.cache.batch_select_indices(keep)
                        self.next_position = self.next_position[keep]
                        chosen = chosen[keep]
                        running = [running[index] for index in live]
            logits = self.extend(chosen[:, None])
