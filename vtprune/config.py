"""`PruneConfig`: everything that defines one pruning setup, with a JSON round trip."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import Any


class ConfigError(ValueError):
    """A pruning configuration (or its pairing with a model) is invalid; the message says how to fix it."""


@dataclass
class PruneConfig:
    """How to prune the visual tokens of a multimodal LLM.

    Example: ``PruneConfig(method="fastv", keep=64, layer=2)`` keeps 64 visual tokens per image after
    decoder layer 2, ranked by the attention of the last prompt token at layer 2.
    """

    method: str = field(
        default="fastv",
        metadata={"help": "Scoring method (preset) name; `vtprune.methods()` lists them."},
    )
    keep: int | float = field(
        default=0.25,
        metadata={
            "help": "Visual tokens kept per image: an int is a count (clamped, with a warning, to the "
            "image's prunable tokens), a float in (0, 1] a fraction. keep=1.0 keeps everything "
            "and gives outputs identical to the unpatched model."
        },
    )
    layer: int | None = field(
        default=None,
        metadata={
            "help": "In-LLM pruning point (0-based): decoder layers 0..layer see every token, layers "
            "after it see only the kept ones, and attention scores come from this layer. "
            "FastV's paper K equals layer + 1. None: the method's default (fastv: 2; pre-LLM "
            "methods such as cls, random, uniform prune before the LLM)."
        },
    )
    options: dict[str, Any] = field(
        default_factory=dict,
        metadata={"help": "Method-specific options, e.g. {'vision_layer': -2} for cls, {'seed': 0} for random."},
    )

    def __post_init__(self) -> None:
        if not isinstance(self.method, str) or not self.method:
            raise ConfigError(f"method must be a non-empty string, got {self.method!r}; see vtprune.methods()")
        self.method = self.method.lower()
        k = self.keep
        if isinstance(k, bool) or not isinstance(k, (int, float)):
            raise ConfigError(
                f"keep must be an int (tokens per image) or a float in (0, 1] (fraction), got {k!r}"
            )
        if isinstance(k, float):
            if not math.isfinite(k) or not 0.0 < k <= 1.0:
                raise ConfigError(
                    f"keep={k} is out of range: a float keep is a fraction in (0, 1]; "
                    "use an int for a token count (e.g. keep=64)"
                )
        elif k <= 0:
            raise ConfigError(f"keep={k} must be positive: at least one visual token per image is kept")
        if self.layer is not None and (isinstance(self.layer, bool) or not isinstance(self.layer, int)):
            raise ConfigError(f"layer must be an int (0-based decoder layer) or None, got {self.layer!r}")
        if self.layer is not None and self.layer < 0:
            raise ConfigError(f"layer={self.layer} must be >= 0 (0-based decoder layer index)")
        if not isinstance(self.options, dict):
            raise ConfigError(f"options must be a dict of method options, got {type(self.options).__name__}")

    # ---- serialisation -------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PruneConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown PruneConfig field(s) {unknown}; known fields: {sorted(known)}")
        return cls(**data)

    def to_json(self, **kwargs: Any) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, **kwargs)

    @classmethod
    def from_json(cls, text: str) -> PruneConfig:
        return cls.from_dict(json.loads(text))

    @classmethod
    def help(cls) -> dict[str, str]:
        """Field name -> help string."""
        return {f.name: f.metadata["help"] for f in dataclasses.fields(cls)}
