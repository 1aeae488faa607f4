"""The signal vocabulary: what an adapter can collect for a scorer, and where pruning happens.

The lowest layer of the one-way flow: adapters fill `Signals`, scorers read them; neither imports the
other for it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from vtprune.layout import VisualLayout

# Signal names a scorer may list in `needs`.
VISION_CLS_ATTENTION = "vision_cls_attention"
LLM_ATTENTION = "llm_attention"
HIDDEN_STATES = "hidden_states"
PIXEL_VALUES = "pixel_values"
VISION_FEATURES = "vision_features"
INSTRUCTION = "instruction"
FIRST_TOKEN_STATE = "first_token_state"
SIGNALS = (VISION_CLS_ATTENTION, LLM_ATTENTION, HIDDEN_STATES, PIXEL_VALUES, VISION_FEATURES, INSTRUCTION,
           FIRST_TOKEN_STATE)

PRE_LLM = "pre-llm"
IN_LLM = "llm"


@dataclass
class Signals:
    """What a scorer can read. Per-sample lists hold one entry per sample of the batch.

    - ``layout``: where the visual tokens are (`VisualLayout`).
    - ``stage``: ``"pre-llm"`` or ``"llm"``; ``layer``: the decoder layer for ``"llm"``.
    - ``keep``: the per-image budget of the config (for scorers that place tokens themselves).
    - ``vision_cls_attention``: per sample ``[n_b]`` float32, head-mean attention of the vision encoder's
      CLS query to each visual token (0 for tokens the encoder did not produce). On Qwen-VL, whose
      towers have no CLS token: the attention each merged token's 2x2 patch group receives in a
      full-attention block (mean over heads and queries of its image or frame).
    - ``llm_attention``: per sample ``[n_b]`` float32, head-mean attention of the last prompt token at
      decoder layer ``layer`` to each visual token (softmax over all keys).
    - ``hidden_states``: per sample ``[n_b, D]``, visual token states at the pruning point (projected
      image features pre-LLM, layer output in-LLM).
    - ``pixel_values``: the pixel input of the call's image encoding, as the processor gave it (all
      images of the call; LLaVA: ``[images or tiles, 3, H, W]``, Qwen-VL: flattened patches).
    - ``vision_features``: pre-LLM, per sample ``[n_b, C]`` float, each visual token's vision feature as
      it enters the projector (LLaVA family: the encoder's feature layer; Qwen-VL: the merger MLP's input,
      its 2x2 patches after the merger's norm, ``C = 4 x`` the tower width), so that
      ``Adapter.feature_projector()(vision_features)`` gives the token's embedding.
    - ``instruction`` (pre-LLM): per sample the real text tokens after the sample's last visual token:
      ``instruction_embeds`` ``[T_b, D]`` (LLM input embeddings) and ``instruction_ids`` ``[T_b]`` (None
      where the model was given embeddings only, as in the LLaVA repository).
    - ``first_token_state`` (in-LLM): ``[B, D]``, the pruning layer's output at each sample's first real
      token (the BOS / first prompt token, after left padding), the row where massive activations show
      the LLM's sink dimensions (VAR).
    - ``padded_scores``: the batched form of the score-like signals the runtime computed as one tensor
      (``{name: [B, N_max] float32}``, ``-inf`` on padding slots, see `VisualLayout.padded`):
      ``llm_attention`` and ``vision_cls_attention``; the per-sample lists above are views of it. Read
      it with `padded`; `require` gives the per-sample views (made on first use).
    - ``stage_index``: for staged in-LLM methods, which of the method's stages is selecting (0 first).
    - ``extras``: method-specific values that a method's own adapter-side stage computed for this prefill
      (``Session.extras``; FlowCut's LLM-stage scores), empty for other methods.
    - ``vision_record``: the encoder run of this prefill's images (a `VisionRecord`, its per-tile tensors
      expanded to generate()'s beams / return sequences); None where the prefill holds no image (in-LLM
      stages: read ``PruneState.vision_record``).
    - ``video_record``: the same for the prefill's videos (Qwen-VL); None where it holds none.
    - ``tile_cls_attention`` / ``tile_features`` (pre-LLM, for a scorer that selects per tile,
      `Scorer.per_tile`): every tile's whole encoder grid, all tiles of the call in order, before
      LLaVA-NeXT's unpadding: ``[T, S]`` float head-mean CLS attention and ``[T, S, C]`` features entering
      the projector (``S`` rows per tile, the CLS row first; `VisualLayout.source` indexes them once
      flattened), each set where the scorer needs the per-token signal of that name; ``tile_first``: the
      first row of a tile that is a visual token (1: the CLS row is not one; 0 under the ``"full"``
      feature strategy); ``tile_hidden_states``: ``[T, S, D]`` those features through the projector (the
      visual tokens as the LLM would receive them, padding rows included), set where the scorer needs
      ``hidden_states``; ``tile_counts``: the tiles of each image of the call, in order (sample-major, as
      `VisualLayout.spans`).
    """

    layout: VisualLayout
    stage: str
    layer: int | None = None
    keep: int | float = 1.0
    vision_cls_attention: list[torch.Tensor] | None = None
    llm_attention: list[torch.Tensor] | None = None
    hidden_states: list[torch.Tensor] | None = None
    pixel_values: torch.Tensor | None = None
    vision_features: list[torch.Tensor] | None = None
    instruction_embeds: list[torch.Tensor] | None = None
    instruction_ids: list[torch.Tensor] | None = None
    first_token_state: torch.Tensor | None = None
    stage_index: int = 0
    extras: dict = field(default_factory=dict)
    vision_record: Any = None
    video_record: Any = None
    padded_scores: dict = field(default_factory=dict)
    tile_cls_attention: torch.Tensor | None = None
    tile_features: torch.Tensor | None = None
    tile_first: int = 1
    tile_hidden_states: torch.Tensor | None = None
    tile_counts: list[int] = field(default_factory=list)

    def padded(self, name: str) -> torch.Tensor:
        """Signal ``name`` as ``[B, N_max]`` float32 (``-inf`` on padding): the runtime's batched tensor when
        it made one, else built from the per-sample list."""
        if name in self.padded_scores:
            return self.padded_scores[name]
        return pad_per_sample(self.require(name), self.layout)

    def require(self, name: str) -> Any:
        attr = "instruction_embeds" if name == INSTRUCTION else name
        value = getattr(self, attr)
        if value is None and name in self.padded_scores:  # per-sample views of the batched tensor, on demand
            value = per_sample(self.padded_scores[name], self.layout)
            setattr(self, attr, value)
        if value is None:
            raise RuntimeError(f"signal {name!r} was not provided by the adapter at stage {self.stage!r}")
        return value


def cls_scores(cls_rows: torch.Tensor, source: list[torch.Tensor]) -> list[torch.Tensor]:
    """Map CLS attention rows ``[T, P + 1]`` (all tiles of the call) onto tokens via ``source``.

    Returns per sample ``[n_b]`` float32; tokens without a source (newlines) get 0.
    """
    flat = cls_rows.flatten().float()
    out = []
    for src in source:
        src = src.to(flat.device)
        out.append(torch.where(src >= 0, flat[src.clamp(min=0)], torch.zeros((), device=flat.device)))
    return out


# A scorer's result: per sample ``[n_b]`` scores, or one padded ``[B, N_max]`` tensor (-inf on padding).
Scores = list[torch.Tensor] | torch.Tensor


def per_sample(scores: Scores, layout: VisualLayout) -> list[torch.Tensor]:
    """Scores as per-sample ``[n_b]`` tensors (views of a padded ``[B, N_max]`` tensor)."""
    if isinstance(scores, torch.Tensor):
        return [scores[b, :n] for b, n in enumerate(layout.counts())]
    return list(scores)


def pad_per_sample(values: list[torch.Tensor], layout: VisualLayout) -> torch.Tensor:
    """Per-sample ``[n_b]`` values -> ``[B, N_max]`` float32 on the layout's device, ``-inf`` on padding."""
    pad = layout.padded
    dev = pad.positions.device
    for b, v in enumerate(values):
        if v.shape != layout.positions[b].shape:
            raise ValueError(
                f"scorer returned {tuple(v.shape)} scores for sample {b}, expected {tuple(layout.positions[b].shape)}"
            )
    if all(int(v.numel()) == pad.width for v in values):
        return torch.stack([v.to(dev, torch.float32) for v in values]) if values else \
            torch.zeros(0, pad.width, device=dev)
    out = torch.full((layout.batch_size, pad.width), float("-inf"), device=dev)
    for b, v in enumerate(values):
        out[b, : v.numel()] = v.to(dev, torch.float32)
    return out


def gather_padded(rows: torch.Tensor, layout: VisualLayout) -> torch.Tensor:
    """``[B, N_max]`` float32: per sample ``rows`` ``[B, N]`` (a value per sequence position) at its visual
    tokens, ``-inf`` on padding slots (one gather)."""
    pad = layout.padded
    rows = rows.float()
    ext = torch.cat([rows, rows.new_full((rows.shape[0], 1), float("-inf"))], dim=1)
    idx = pad.positions.to(rows.device).clamp(max=rows.shape[1])
    return ext.gather(1, idx)


def cls_scores_padded(cls_rows: torch.Tensor, layout: VisualLayout) -> torch.Tensor:
    """`cls_scores` batched: ``[B, N_max]`` float32 (0 for tokens without a source, ``-inf`` on padding)."""
    pad = layout.padded
    flat = cls_rows.flatten().float()
    src = pad.source.to(flat.device)
    vals = torch.where(src >= 0, flat[src.clamp(min=0)], torch.zeros((), device=flat.device))
    return vals.masked_fill(~pad.valid.to(flat.device), float("-inf"))
