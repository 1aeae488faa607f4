"""Visual-token exit (DyVTE): after an exit layer every visual token leaves the sequence, for the rest of
the prefill and for decoding.

Unlike the other methods, which keep a budget of visual tokens, an exit keeps none: from the exit layer on
the LLM attends only to text (which by then carries what it took from the image). Two rules decide where:

- fixed: exit after decoder layer ``layer`` for every sample;
- adaptive (``threshold=t``): per sample, after the first candidate layer at which the last prompt token's
  attention mass on the sample's visual tokens falls below ``t``.
"""

from __future__ import annotations

from typing import Any

import torch

from vtprune.config import ConfigError
from vtprune.scorers.base import IN_LLM, LLM_ATTENTION, Scorer, Signals, register
from vtprune.scorers.staged import depth_scaled

# VTW's released setting for LLaVA-1.5-7B (github.com/lzhxmu/VTW, `temp_cache.k = 15`, README `--k=15`): the
# visual tokens are removed from the input of decoder layer 15 of 32, i.e. after 0-based layer 14
RELEASED_EXIT = 14
# where the adaptive rule starts looking: after FastV's layer 2 (early fusion is over, Zhang et al.'s stage i)
FIRST_CANDIDATE = 2


@register
class DyVTEScorer(Scorer):
    """Visual-token exit, training-free (after "Accelerating Multimodal Large Language Models via Dynamic
    Visual-Token Exit and the Empirical Findings", Zhang et al., NeurIPS 2025; code
    github.com/DoubtedSteam/DyVTE).

    DyVTE's release decides the exit with a small trained router per layer (on the mean text state and the
    last token's state, batch 1) and then drops all 576 visual tokens from the sequence, positions of the
    text unchanged. No router weights exist for the models vtprune serves, so the decision is one of:

    - fixed (default, ``threshold=None``): exit after decoder layer ``layer``; default 14 on 32-layer LLMs,
      VTW's released withdrawal layer for LLaVA-1.5-7B (the training-free exit DyVTE compares against),
      the same depth fraction elsewhere (`depth_scaled`: 2 on the 4-layer toys, 12 on Qwen2-VL-7B's 28).
    - adaptive (``threshold=t``): after each candidate layer ``l`` in ``candidates`` (default from layer 2,
      scaled, to the last layer that has a layer after it), a sample exits once the head-mean attention
      mass that the last prompt token puts on all of its visual tokens at layer ``l`` is below ``t``
      (Zhang et al.: visual tokens stop contributing once the text has received the image information;
      the attention mass is the signal the model already computes for that). A sample whose mass never
      falls below ``t`` keeps every visual token. `vtprune tune` searches ``t`` (and the layer in fixed mode).

    Budget: an exit keeps 0 visual tokens, so ``keep`` does not set a count. ``keep=1.0`` switches the exit
    off (outputs identical to the unpatched model, as for every method); a fraction below 1 (such as the
    config default) means "exit"; an int count is refused. `PruneStats.exit_layers` reports each sample's
    exit layer (None where it kept its visual tokens).

    Cost: the adaptive rule recomputes one attention row at each candidate layer and reads the B masses
    from the device there (one host read per candidate layer until every sample has exited); the fixed
    rule reads nothing.
    """

    name = "dyvte"
    description = ("DyVTE visual-token exit: all visual tokens leave after an exit layer (fixed, VTW's layer, "
                   "or per sample once the text's attention to the image falls below threshold=t)")
    needs = frozenset({LLM_ATTENTION})
    stages = (IN_LLM,)
    accepts_auto_keep = False

    def __init__(self, threshold: float | None = None, candidates: list[int] | tuple[int, ...] | None = None) -> None:
        if threshold is not None and not (isinstance(threshold, (int, float)) and 0 < float(threshold) < 1):
            raise ConfigError(f"dyvte: threshold={threshold!r} must be an attention mass in (0, 1), or None for a "
                              "fixed exit layer")
        if candidates is not None:
            if threshold is None:
                raise ConfigError("dyvte: candidates=[...] are the layers the adaptive rule tries; give threshold=t "
                                  "with them, or layer=K alone for a fixed exit")
            candidates = [int(k) for k in candidates]
            if not candidates or candidates != sorted(set(candidates)) or candidates[0] < 0:
                raise ConfigError(f"dyvte: candidates={candidates} must be distinct, increasing layers >= 0")
        self.threshold = None if threshold is None else float(threshold)
        self.candidates = candidates
        self._exit = RELEASED_EXIT

    def bind(self, model: Any, adapter: Any) -> None:
        depth = len(adapter.decoder_layers())
        self._exit = depth_scaled(self.name, [RELEASED_EXIT], depth, adapter.min_layer())[0]
        if self.threshold is not None and self.candidates is None:
            first = depth_scaled(self.name, [FIRST_CANDIDATE], depth, adapter.min_layer())[0]
            self.candidates = list(range(first, depth - 1))

    @property
    def default_layer(self) -> int:  # type: ignore[override]
        return self.candidates[0] if self.threshold is not None and self.candidates else self._exit

    def needs_signal(self, name: str) -> bool:
        # the fixed rule reads no signal: no attention row is recomputed for it
        return self.threshold is not None and super().needs_signal(name)

    def schedule(self, model: Any, adapter: Any, layer: int, keep: Any) -> list[tuple[int, Any]]:
        if isinstance(keep, int) and not isinstance(keep, bool):
            raise ConfigError(f"dyvte: keep={keep} is a token count, but an exit keeps no visual token; leave keep "
                              "at its default (exit) or pass keep=1.0 (exit off)")
        if self.threshold is None:
            return [(layer, keep)]
        n = len(adapter.decoder_layers())
        if self.candidates[-1] > n - 2 or self.candidates[0] < adapter.min_layer():
            raise ConfigError(f"dyvte: candidates={self.candidates} must lie in {adapter.min_layer()}..{n - 2} on this "
                              f"{n}-layer model")
        if layer != self.candidates[0]:
            raise ConfigError(f"dyvte with threshold tries the exit after candidates={self.candidates}; set "
                              f"candidates=[...] instead of layer={layer}")
        return [(k, keep) for k in self.candidates]

    def tunable(self, model: Any, adapter: Any) -> dict[str, tuple[Any, Any]]:
        from vtprune.tunable import Param

        if self.threshold is None:
            return {}  # the exit layer is the pruning layer, which the tuner searches itself
        return {"threshold": (Param("log", 1e-3, 0.5), self.threshold)}

    def score(self, signals: Signals) -> torch.Tensor:
        """``[B, N_max]`` zeros (every token is equal: an exit keeps all of them or none)."""
        pad = signals.layout.padded
        return torch.zeros(signals.layout.batch_size, pad.width, device=pad.positions.device)

    def stage_select(self, scores: list[torch.Tensor], signals: Signals,
                     hidden: torch.Tensor) -> tuple[list[torch.Tensor], dict]:
        """Per sample all of its current visual tokens (no exit) or none (exit)."""
        lay = signals.layout
        if isinstance(signals.keep, float) and signals.keep >= 1.0:
            exits = [False] * lay.batch_size
        elif self.threshold is None:
            exits = [True] * lay.batch_size
        else:
            exits = (exit_mass(signals) < self.threshold).tolist()  # one read of [B] per candidate layer
        dev = hidden.device
        return [torch.arange(0 if gone else int(p.numel()), device=dev) for p, gone in zip(lay.positions, exits)], {}


def exit_mass(signals: Signals) -> torch.Tensor:
    """``[B]`` float32: per sample the last prompt token's head-mean attention summed over its current visual
    tokens at the stage's layer (0 for a sample without visual tokens, so it exits at once)."""
    att = signals.padded(LLM_ATTENTION)  # [B, N_max], -inf on padding slots
    return torch.where(torch.isfinite(att), att, torch.zeros_like(att)).sum(dim=1)
