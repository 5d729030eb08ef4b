"""What a budget means: tokens per KV head per layer (or a ratio of the prompt), and the window it includes.

A budget ``B`` is the average number of prompt entries kept per KV head per layer, *window
included*: every method keeps exactly ``min(B, n) * kv_heads * layers`` entries of an ``n``-token
prompt. ``ratio=r`` gives ``B = ceil(r * n)`` per prompt instead. The last ``window`` prompt
tokens are always kept and their queries score the rest, so how the window relates to a small
budget is a rule of its own, one of :data:`WINDOW_POLICIES`:

* ``"fixed"`` (the default): the method's window as configured. A token budget must exceed it;
  where a ratio budget comes out at or below it (a short prompt), the kept window shrinks to
  ``B - 1`` tokens so that at least one scored entry remains.
* ``"half"``: at most half the budget, ``min(window, B // 2)`` (at least 1), so that every
  budget from 2 up leaves room for scored entries. ``lavakv eval`` uses it unless a window is
  given, which makes budget 32 run with a window of 16 and budgets from 64 on with 32.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

WINDOW_POLICIES = ("fixed", "half")


@dataclass(frozen=True)
class Budget:
    """A budget in tokens per KV head per layer (``tokens``) or as a share of each prompt (``ratio``)."""

    tokens: int | None = None
    ratio: float | None = None
    window_policy: str = "fixed"

    def __post_init__(self) -> None:
        if self.tokens is not None and self.ratio is not None:
            raise ValueError(f"give either budget or ratio, not both (got budget={self.tokens}, ratio={self.ratio})")
        if self.tokens is None and self.ratio is None:
            raise ValueError("a budget needs tokens per KV head per layer or a ratio in (0, 1]")
        if self.tokens is not None and (isinstance(self.tokens, bool) or not isinstance(self.tokens, int)):
            raise ValueError(f"budget must be an integer number of tokens per KV head per layer, got {self.tokens!r}")
        if self.ratio is not None:
            number = isinstance(self.ratio, (int, float)) and not isinstance(self.ratio, bool)
            if not number or not 0 < self.ratio <= 1:
                raise ValueError(f"ratio must be in (0, 1], got {self.ratio!r}")
        if self.window_policy not in WINDOW_POLICIES:
            raise ValueError(f"unknown window policy {self.window_policy!r}; valid: {', '.join(WINDOW_POLICIES)}")
        minimum = 2 if self.window_policy == "half" else 1
        if self.tokens is not None and self.tokens < minimum:
            raise ValueError(f"budget must be an integer >= {minimum} tokens per KV head per layer, got {self.tokens}")

    @classmethod
    def of(
        cls, budget: int | Budget | None = None, ratio: float | None = None, window_policy: str = "fixed"
    ) -> Budget | None:
        """The budget of the user-facing ``budget=`` / ``ratio=`` arguments (``None`` when neither is given)."""
        if isinstance(budget, Budget):
            if ratio is not None:
                raise ValueError(f"give either a Budget or a ratio, not both (got {budget} and ratio={ratio})")
            return budget
        if budget is None and ratio is None:
            return None
        return cls(tokens=budget, ratio=ratio, window_policy=window_policy)

    def check_window(self, window: int) -> None:
        """Refuse a token budget that leaves no scored entry beside a fixed window."""
        if self.window_policy == "fixed" and self.tokens is not None and self.tokens <= window:
            raise ValueError(
                f"budget must be greater than the window ({window}) and than 0, got {self.tokens}; the budget "
                f"counts the window's tokens too (give a smaller window, e.g. window={max(1, self.tokens // 4)})"
            )

    def tokens_for(self, length: int) -> int:
        """Tokens per KV head per layer for a prompt of ``length`` tokens."""
        if self.ratio is not None:
            return max(1, math.ceil(self.ratio * length))
        return int(self.tokens)

    def window_for(self, window: int, tokens: int) -> int:
        """The observation window a method with ``window`` uses at a budget of ``tokens``."""
        if self.window_policy == "half" and window > 0:
            return max(1, min(window, tokens // 2))
        return window

    @staticmethod
    def kept_window(window: int, tokens: int) -> int:
        """Window tokens kept at a budget of ``tokens``: the window, but at most ``tokens - 1`` (never below 0)."""
        return max(0, min(window, tokens - 1))

    @property
    def label(self) -> str:
        return str(self.tokens) if self.tokens is not None else f"{self.ratio:g} of the prompt"
