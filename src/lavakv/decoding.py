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
    ) -> list[list[int]]:
        """Greedy tokens of every row from the next-token ``logits [B, V]`` on, each row stopping on its own.

        A row stops after a token in ``stop_ids`` (kept in its list), after ``finished(tokens)``
        returns true, or at ``max_new_tokens``. Rows that stopped are fed their last token until
        every row has stopped; what they produce then is discarded.
        """
        rows = logits.shape[0]
        tokens: list[list[int]] = [[] for _ in range(rows)]
        done = [False] * rows
        while True:
            chosen = logits.argmax(dim=-1).tolist()
            for row in range(rows):
                if done[row]:
                    continue
                tokens[row].append(chosen[row])
                done[row] = (
                    len(tokens[row]) >= max_new_tokens
                    or chosen[row] in stop_ids
                    or (finished is not None and finished(tokens[row]))
                )
            if all(done):
                return tokens
            logits = self.extend([[row_tokens[-1]] for row_tokens in tokens])
