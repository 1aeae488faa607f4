"""`Param`: how a scorer declares one hyperparameter `vtprune tune` may search (`Scorer.tunable`).

A leaf module (standard library only), so scorers declare their search space without importing the
tuner; `vtprune.tune` does the searching and re-exports `Param`.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Param:
    """One searched hyperparameter: ``kind`` ``"int"`` / ``"float"`` (uniform in [low, high]), ``"log"``
    (log-uniform), or ``"choice"`` (one of ``choices``)."""

    kind: str
    low: float = 0.0
    high: float = 1.0
    choices: tuple = ()

    def sample(self, rng: random.Random) -> Any:
        """One value drawn with ``rng``."""
        if self.kind == "choice":
            return rng.choice(list(self.choices))
        if self.kind == "int":
            return rng.randint(int(self.low), int(self.high))
        if self.kind == "log":
            return float(math.exp(rng.uniform(math.log(self.low), math.log(self.high))))
        return float(rng.uniform(self.low, self.high))

    def contains(self, value: Any) -> bool:
        """Whether ``value`` lies in the declared range (or among the choices)."""
        if self.kind == "choice":
            return value in self.choices
        return self.low <= value <= self.high
