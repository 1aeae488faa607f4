"""`PruneConfig`: everything that defines one pruning setup, with a JSON round trip, and config files.

`load_config` reads a file written by `vtprune tune` (``TuneResult.save``, format `TUNED_FORMAT`) or by
``PruneConfig.to_json``; `is_config_path` tells such a path from a method name. Both live here, below
`vtprune.api`, so ``vtprune.apply(model, config="tuned.json")`` needs nothing from the tuner.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

TUNED_FORMAT = "vtprune-tuned/1"  # the "format" of a file written by `vtprune tune` (vtprune.tune.TuneResult)


class ConfigError(ValueError):
    """A pruning configuration (or its pairing with a model) is invalid; the message says how to fix it."""


AUTO_KEEP_FORMAT = "'auto:<mass>' with mass in (0, 1], optionally ',min=<int>' and ',max=<int>' (e.g. 'auto:0.95,min=16')"


@dataclass(frozen=True)
class AutoKeep:
    """An adaptive per-image budget: the fewest tokens whose normalised score mass reaches ``mass``.

    As ZipVL allocates its ratio from the score distribution: an image whose scores concentrate on few
    tokens keeps few, a flat one keeps many. ``min`` / ``max`` bound the count per image (``max`` None:
    no bound). Written ``"auto:0.95"``, ``"auto:0.95,min=16,max=256"`` (see `parse_auto_keep`).
    """

    mass: float
    min: int = 1
    max: int | None = None

    def __str__(self) -> str:
        text = f"auto:{self.mass:g}"
        if self.min != 1:
            text += f",min={self.min}"
        if self.max is not None:
            text += f",max={self.max}"
        return text


def parse_auto_keep(text: str) -> AutoKeep:
    """Parse ``"auto:0.95[,min=16][,max=256]"``; `ConfigError` naming the format otherwise."""
    def bad(why: str) -> ConfigError:
        return ConfigError(f"keep={text!r}: {why}; an adaptive budget is written {AUTO_KEEP_FORMAT}")

    head, _, rest = text.strip().partition(":")
    if head.strip().lower() != "auto" or not rest:
        raise bad("a string keep must be an adaptive budget")
    parts = [p.strip() for p in rest.split(",")]
    try:
        mass = float(parts[0])
    except ValueError:
        raise bad(f"the mass {parts[0]!r} is not a number") from None
    if not math.isfinite(mass) or not 0.0 < mass <= 1.0:
        raise bad(f"the mass {mass} is outside (0, 1]")
    bounds: dict[str, int] = {}
    for part in parts[1:]:
        name, eq, value = part.partition("=")
        name = name.strip().lower()
        if not eq or name not in ("min", "max") or name in bounds:
            raise bad(f"unknown or repeated bound {part!r}")
        try:
            bounds[name] = int(value)
        except ValueError:
            raise bad(f"the bound {part!r} is not an integer") from None
        if bounds[name] < 1:
            raise bad(f"the bound {part!r} must be at least 1")
    lo, hi = bounds.get("min", 1), bounds.get("max")
    if hi is not None and hi < lo:
        raise bad(f"max={hi} is below min={lo}")
    return AutoKeep(mass, lo, hi)


def auto_keep(keep: Any) -> AutoKeep | None:
    """The `AutoKeep` of a config's ``keep`` (a string or an AutoKeep), or None for a count / fraction."""
    if isinstance(keep, AutoKeep):
        return keep
    if isinstance(keep, str):
        return parse_auto_keep(keep)
    return None


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
    keep: int | float | str = field(
        default=0.25,
        metadata={
            "help": "Visual tokens kept per image: an int is a count (clamped, with a warning, to the "
            "image's prunable tokens), a float in (0, 1] a fraction. keep=1.0 keeps everything "
            "and gives outputs identical to the unpatched model. 'auto:0.95' keeps per image the "
            "fewest tokens whose normalised score mass reaches 0.95 (',min=16,max=256' bound it)."
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
        if isinstance(k, str) and not k.strip().lower().startswith("auto"):
            raise ConfigError(
                f"keep must be an int (tokens per image), a float in (0, 1] (fraction) or {AUTO_KEEP_FORMAT}, "
                f"got the string {k!r}" + (" (pass the number itself)" if k.strip().replace(".", "", 1).isdigit() else "")
            )
        if isinstance(k, (str, AutoKeep)):
            self.keep = str(auto_keep(k))  # validated and normalised ("auto:0.95,min=16"); JSON-safe
            k = None
        elif isinstance(k, bool) or not isinstance(k, (int, float)):
            raise ConfigError(
                f"keep must be an int (tokens per image), a float in (0, 1] (fraction) or {AUTO_KEEP_FORMAT}, "
                f"got {k!r}"
            )
        if isinstance(k, float):
            if not math.isfinite(k) or not 0.0 < k <= 1.0:
                raise ConfigError(
                    f"keep={k} is out of range: a float keep is a fraction in (0, 1]; "
                    "use an int for a token count (e.g. keep=64)"
                )
        elif k is not None and k <= 0:
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


def load_config(path: str | os.PathLike) -> PruneConfig:
    """A `PruneConfig` from a tuned file (`TuneResult.save`) or a plain ``PruneConfig.to_json`` file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} not found; write one with `vtprune tune ... --out FILE`")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise ConfigError(f"config file {str(path)!r} is not UTF-8 text ({exc.reason} at byte {exc.start}): "
                          "give the JSON file `vtprune tune --out` or PruneConfig.to_json wrote") from None
    except json.JSONDecodeError as exc:
        raise ConfigError(f"config file {str(path)!r} is not JSON ({exc})") from None
    if isinstance(data, dict) and data.get("format") == TUNED_FORMAT:
        data = data["config"]
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(path)!r} holds no PruneConfig object")
    return PruneConfig.from_dict(data)


def is_config_path(value: Any) -> bool:
    """Whether a string passed as ``config`` names a file rather than a method: a path object, a name ending
    in ``.json``, or one with a directory part. Never a bare name: ``"fastv"`` is the method even when a
    file called ``fastv`` sits in the working directory (give ``./fastv`` to mean the file)."""
    if isinstance(value, os.PathLike):
        return True
    return isinstance(value, str) and (value.endswith(".json") or os.sep in value or "/" in value)


SEED_RANGE = (0, 2**63 - 1)


def check_seed(value: Any, owner: str) -> int:
    """``value`` as a generator seed: an int in `SEED_RANGE` (not a bool, not a float), else `ConfigError`."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{owner}: seed={value!r} must be an integer (got {type(value).__name__})")
    lo, hi = SEED_RANGE
    if not lo <= value <= hi:
        raise ConfigError(f"{owner}: seed={value} is out of range; use an integer in [{lo}, 2**63 - 1]")
    return value
