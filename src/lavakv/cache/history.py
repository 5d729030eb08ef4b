"""The token ids a compressed cache has been fed, and the checks that inputs continue them."""

from __future__ import annotations

import torch

FRESH_START = (
    "Pass the whole history (the ids it holds, see cache.token_ids(), then the new ones), or start afresh with a new "
    "CompressedCache; cache.copy() keeps a compressed context to reuse for another question."
)


class ContinuationError(ValueError):
    """Inputs that do not continue what a :class:`~lavakv.cache.CompressedCache` holds."""


class TokenHistory:
    """Per sequence, the token ids fed so far (prompt, then every token after it), known or not.

    A forward pass's ids are *staged* when the model's pre-hook sees them and join the history
    when the pass reaches the cache (:meth:`commit`); decode steps' ids are kept as pending
    tensors and flushed to lists only when read, so decoding never syncs to read them. Inputs
    given as embeddings, or fed by a call that bypassed the forward hook, make the history unknown.
    """

    def __init__(self, rows: list[list[int]] | None = None, known: bool = True):
        self.rows = rows
        self.known = known
        self.pending: list[torch.Tensor] = []
        self.staged: torch.Tensor | None = None
        self.staged_mask: torch.Tensor | None = None
        self.observed = False

    def stage(self, input_ids: torch.Tensor | None, attention_mask: torch.Tensor | None = None) -> None:
        """Ids (and, for the prompt, its mask) of the forward pass about to run."""
        self.observed = True
        self.staged = None if input_ids is None else input_ids.detach()
        self.staged_mask = attention_mask
        if input_ids is None:
            self.known = False

    def commit(self, prompt: bool) -> None:
        """The forward reached the cache: the staged ids join the history (``prompt``: they start it)."""
        staged, self.staged = self.staged, None
        if not self.observed:
            self.known = False
        self.observed = False
        if staged is None:
            return
        if prompt:
            ids, mask = staged.cpu(), self.staged_mask
            if mask is not None and mask.dim() == 2 and mask.shape == ids.shape:
                real = mask.detach().cpu().bool()
                self.rows = [row[keep].tolist() for row, keep in zip(ids, real)]
            else:
                self.rows = ids.tolist()
            self.pending = []
        elif self.rows is not None:
            self.pending.append(staged)

    def flush(self) -> list[list[int]] | None:
        """Every row's ids as lists (pending decode steps included), or ``None`` when never fed."""
        if self.rows is not None and self.pending:
            fed = torch.cat([chunk.cpu() for chunk in self.pending], dim=-1).tolist()
            for row, ids in zip(self.rows, fed):
                row.extend(ids)
            self.pending = []
        return self.rows

    def known_rows(self) -> list[list[int]] | None:
        """Copies of the rows when they are known, else ``None``."""
        rows = self.flush() if self.known else None
        return None if rows is None else [list(row) for row in rows]

    def select(self, rows: list[int]) -> None:
        """Keep the given sequences' histories, in that order."""
        history = self.flush()
        self.rows = None if history is None else [list(history[row]) for row in rows]

    def token_ids(self, sequence: int = 0) -> list[int]:
        """The ids one sequence was fed; an error when they are unknown."""
        if not self.known or self.rows is None:
            raise RuntimeError(
                "this cache's token ids are unknown: it was fed inputs_embeds, or by a call that bypassed the "
                "model's forward"
            )
        return list(self.flush()[sequence])

    def continuation(self, ids: list[int], sequence: int = 0) -> list[int]:
        """The tokens of ``ids`` after the held ones; a :class:`ContinuationError` if ``ids`` do not start with them."""
        held = self.token_ids(sequence)
        differ = next((i for i, (a, b) in enumerate(zip(held, ids)) if a != b), None)
        if differ is None and len(ids) <= len(held):
            raise ContinuationError(
                f"the inputs ({len(ids)} tokens) add nothing to the {len(held)} tokens this CompressedCache holds; "
                "pass the whole history followed by new tokens"
            )
        if differ is not None:
            raise ContinuationError(
                f"this CompressedCache holds another prompt: the inputs differ from its {len(held)} held tokens at "
                f"token {differ} (id {ids[differ]} instead of {held[differ]}). {FRESH_START}"
            )
        return list(ids[len(held) :])

    def check_prefix(self, input_ids: torch.Tensor, held: int, padding: list[int]) -> None:
        """Refuse a whole history (``model.generate``'s ``input_ids``) that does not start with the held tokens."""
        if not self.known or self.rows is None:
            return
        if input_ids.dim() != 2 or input_ids.shape[0] != len(padding) or input_ids.shape[1] <= held:
            return
        for row, (ids, history, pad) in enumerate(zip(input_ids[:, :held].tolist(), self.flush(), padding)):
            given = ids[pad:]
            differ = next((i for i, (a, b) in enumerate(zip(history, given)) if a != b), None)
            if differ is not None:
                which = f" (sequence {row})" if len(padding) > 1 else ""
                raise ContinuationError(
                    f"this CompressedCache holds another prompt{which}: the inputs differ from its {len(history)} held "
                    f"tokens at token {differ} (id {given[differ]} instead of {history[differ]}). {FRESH_START}"
                )


def check_continues(
    input_ids: torch.Tensor | None,
    attention_mask: torch.Tensor | None,
    position_ids: torch.Tensor | None,
    held: int,
    padding: list[int],
) -> None:
    """Refuse a forward pass's inputs that do not continue ``held`` tokens of sequences left-padded by ``padding``.

    They must hold as many sequences, add tokens, come with an attention mask (when given) spanning
    the held tokens plus the new ones, and start at the positions after each sequence's held ones.
    """
    new = None if input_ids is None else input_ids.shape[-1]
    if input_ids is not None and padding and input_ids.shape[0] != len(padding):
        raise ContinuationError(
            f"these inputs hold {input_ids.shape[0]} sequences, but this CompressedCache holds {len(padding)}; "
            "cache.batch_repeat_interleave(n) or batch_select_indices([...]) reshapes it first"
        )
    if new == 0:
        raise ContinuationError(
            f"no new tokens to feed: the inputs are not longer than the {held} tokens this CompressedCache holds, "
            f"so they cannot continue it. {FRESH_START}"
        )
    if attention_mask is not None and attention_mask.dim() == 2 and new is not None:
        if attention_mask.shape[-1] != held + new:
            raise ContinuationError(
                f"this CompressedCache holds {held} tokens of a prompt, but these inputs ({new} new tokens with an "
                f"attention mask over {attention_mask.shape[-1]}) continue a history of "
                f"{attention_mask.shape[-1] - new} tokens: it holds another prompt. {FRESH_START}"
            )
    if position_ids is not None and new is not None and 1 < new <= position_ids.shape[-1] and padding:
        first = position_ids.reshape(-1, position_ids.shape[-1])[:, -new].tolist()
        expected = [held - pad for pad in padding]
        if len(first) == len(expected) and first != expected:
            raise ContinuationError(
                f"these inputs start at positions {first}, but this CompressedCache holds tokens up to "
                f"positions {expected}: they do not continue what it holds. {FRESH_START}"
            )
