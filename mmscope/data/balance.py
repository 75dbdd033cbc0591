"""Greedy balancing: choose the option used least so far, ties at random, with separate counts per scope.

The synthetic world and the probing datasets both build balanced data one choice at a time: which category to
ask next, which answer, which kind of hard negative. Picking the least-used option that the current scene
supports keeps every count within one of the others wherever the scenes allow it, without a global plan.

A scope is any hashable key (`("answer", "ChooseRel", "horizontal")`, `"kind"` …) that names one set of
counts. Ties are broken by one `rng.choice` over the tied options in sorted order, so the choices are a function
of the seed alone, never of the order in which a caller happens to list the options.
"""

from __future__ import annotations

import random
from collections import Counter, defaultdict
from collections.abc import Hashable, Sequence


class Balancer:
    """Least-used choices per scope, with the ties broken by `rng`."""

    def __init__(self, rng: random.Random):
        self.rng = rng
        self.counts: defaultdict[Hashable, Counter] = defaultdict(Counter)

    def rarest(self, scope: Hashable, options: Sequence) -> object:
        """The option counted least often in `scope` so far (ties at random); it is not counted."""
        counts = self.counts[scope]
        low = min(counts[o] for o in options)
        return self.rng.choice(sorted(o for o in options if counts[o] == low))

    def count(self, scope: Hashable, choice: object) -> None:
        """Count one use of `choice` in `scope` (for a caller that only keeps some of what `rarest` offers)."""
        self.counts[scope][choice] += 1

    def least_used(self, scope: Hashable, options: Sequence) -> object:
        """`rarest`, and count the choice."""
        choice = self.rarest(scope, options)
        self.count(scope, choice)
        return choice
