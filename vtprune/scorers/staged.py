"""What the staged in-LLM methods (TransPrune, SparseVLM, VFlowOpt's LLM part) share: their options'
checks and the plan of (layer, budget) stages they hand to the LLM stage."""

from __future__ import annotations

from typing import Any, ClassVar

from vtprune.config import ConfigError, auto_keep
from vtprune.scorers.select import StageBudget


def check_stage_options(method: str, layers, ratios) -> tuple[list[int], list[float]]:
    """``layers`` distinct, increasing, >= 0; one ratio per stage before the last, decreasing in (0, 1]."""
    layers = [int(k) for k in layers]
    ratios = [float(r) for r in ratios]
    if not layers or layers != sorted(set(layers)) or layers[0] < 0:
        raise ConfigError(f"{method}: layers={layers} must be distinct, increasing and >= 0")
    if len(ratios) != len(layers) - 1:
        raise ConfigError(f"{method}: give one ratio per stage before the last: {len(layers) - 1} for "
                          f"layers={layers}, got ratios={ratios}")
    if any(not 0 < r <= 1 for r in ratios) or ratios != sorted(ratios, reverse=True):
        raise ConfigError(f"{method}: ratios={ratios} must be decreasing fractions in (0, 1]")
    return layers, ratios


REFERENCE_DEPTH = 32  # the papers' layers are those of 32-layer LLMs (Vicuna-7B, LLaMA-2-7B)


def depth_scaled(method: str, layers: list[int], depth: int, first: int = 0) -> list[int]:
    """A method's default ``layers`` (for a 32-layer LLM) at the same fractions of a ``depth``-layer one.

    Exact on 32 layers; elsewhere each layer ``l`` becomes ``round(l * depth / 32)``, then distinct and
    increasing, at least ``first`` (the model's smallest prunable layer) and at most ``depth - 2`` (every
    stage needs a layer after it). A model too shallow for that is refused, naming ``layers=[...]``.
    """
    if depth == REFERENCE_DEPTH and layers[0] >= first:
        return list(layers)
    n = len(layers)
    if depth - 2 - first + 1 < n:
        raise ConfigError(f"{method}: its {n} stages need at least {first + n + 1} decoder layers, this model "
                          f"has {depth}: pass layers=[...] with fewer stages")
    out = [max(first, round(k * depth / REFERENCE_DEPTH)) for k in layers]
    for i in range(1, n):  # distinct and increasing
        out[i] = max(out[i], out[i - 1] + 1)
    for i in range(n - 1, -1, -1):  # within the model, keeping them distinct
        out[i] = min(out[i], depth - 2 - (n - 1 - i))
    return out


def staged_schedule(method: str, adapter: Any, layers: list[int], ratios: list[float], layer: int,
                    keep: Any) -> list[tuple[int, Any]]:
    """`staged_plan` after checking the layers against the model (deepstack minimum, depth, ``layer=``)."""
    n = len(adapter.decoder_layers())
    if layers[0] < adapter.min_layer():
        raise ConfigError(f"{method}: {adapter.min_layer_reason(layers[0])}; pass layers=[...] from there on")
    if layer != layers[0]:
        raise ConfigError(f"{method} prunes after layers={layers}; set layers=[...] instead of layer={layer}")
    if layers[-1] > n - 2:
        raise ConfigError(
            f"{method}: layers={layers} need at least {layers[-1] + 2} decoder layers, this model has {n}: "
            f"pass layers=[...] (e.g. {list(range(max(0, n - 4), n - 1))}) and ratios=[...]"
        )
    return staged_plan(layers, ratios, keep)


def staged_plan(layers: list[int], ratios: list[float], keep: Any) -> list[tuple[int, Any]]:
    """``[(layer, budget)]``: the stages before the last keep ``ratios`` of each image's original tokens (as
    fractions of the tokens present, `StageBudget`, never below the final count), the last keeps ``keep``.

    A float ``keep`` is a fraction of the image's original tokens, as for one-stage methods; ``keep=1.0``
    therefore prunes nothing at any stage.
    """
    plan: list[tuple[int, Any]] = []
    fraction = isinstance(keep, float) and auto_keep(keep) is None
    floor = keep if isinstance(keep, int) else 1
    previous = 1.0
    for k, r in zip(layers, ratios):
        r = max(r, keep) if fraction else r
        plan.append((k, StageBudget(r / previous, floor)))
        previous = r
    plan.append((layers[-1], min(1.0, keep / previous) if fraction else keep))
    return plan


class StagedLayers:
    """The stage layers of a staged in-LLM scorer (mixed in before `Scorer`): ``PAPER_LAYERS`` (0-based
    pruned outputs of a 32-layer LLM) are the default ``layers``, scaled to the model's depth at `bind`
    (`depth_scaled`); explicit ``layers=[...]`` are used as given; the first stage is the default layer and
    `schedule` is `staged_schedule` over ``layers`` and ``ratios``."""

    name: ClassVar[str]
    PAPER_LAYERS: ClassVar[tuple[int, ...]] = ()

    def init_stages(self, layers, ratios) -> None:
        """Check and store ``layers`` (None: the paper's, scaled at `bind`) and ``ratios``."""
        self._default_layers = layers is None
        self.layers, self.ratios = check_stage_options(self.name, self.PAPER_LAYERS if layers is None else layers,
                                                       ratios)

    def bind(self, model: Any, adapter: Any) -> None:
        if self._default_layers:  # the paper's layers at the same depth fractions of this model
            depth = len(adapter.decoder_layers())
            self.layers = depth_scaled(self.name, list(self.PAPER_LAYERS), depth, adapter.min_layer())

    @property
    def default_layer(self) -> int:
        return self.layers[0]

    def schedule(self, model: Any, adapter: Any, layer: int, keep: Any) -> list[tuple[int, Any]]:
        return staged_schedule(self.name, adapter, self.layers, self.ratios, layer, keep)
