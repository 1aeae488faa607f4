"""LLaVA-PruMerge and PruMerge+: an adaptive number of CLS-attention outliers, each absorbing its nearest
neighbours by key similarity.

Shang et al., "LLaVA-PruMerge: Adaptive Token Reduction for Efficient Large Multimodal Models" (2024);
released code github.com/42Shawn/LLaVA-PruMerge, ``llava/model/multimodal_encoder/clip_encoder.py``
(``outlier_dectection``, ``token_prune_merge_advanced`` for PruMerge, ``token_prune_merge_advanced_plus``
for PruMerge+, the one the release's ``forward`` calls). This module holds the model-independent part
(which tokens, the merge rule) as pure functions; `vtprune.runtime.prumerge` records the attention and
keys while the vision tower runs and writes the merged features before the LLM.

Per image, over its ``n`` prunable tokens (release values in brackets):

1. Attention ``a``: the CLS query's attention of the key layer [the last CLIP layer, ``layers[23]``],
   computed as the release does, as *one* head over the concatenated heads:
   ``softmax(q_cls . k^T / sqrt(C))`` over all tokens, CLS included, with ``q = q_proj(h)``,
   ``k = k_proj(h)`` (full width ``C``), then the patch columns.
2. Outliers: ``a_j > Q3 + 1.5 (Q3 - Q1)``, quartiles by linear interpolation [``np.percentile``]. Their
   number is the adaptive count.
3. PruMerge+ adds spatially uniform tokens: with ``c`` outliers, every ``s``-th token of
   ``0 .. n - 2`` that is not an outlier, ``s = floor(floor(n / c) / 3)``
   [``arange(0, 575, int(int(1 / ratio) / 3))``, ``ratio = c / 576``].
4. Merge, per kept token ``i`` (outliers and samples alike): its ``neighbours`` [32] nearest other tokens
   ``J_i`` (all other tokens of the image, kept ones included) by cosine of the unit-normalised keys;
   ``x_i <- x_i + sum_{j in J_i} a_j x_j`` with the raw attention as weights [no normalisation: the
   release's ``/ torch.sum(weights)`` is commented out], on the original features ``x`` (the
   feature-layer features ``hidden_states[-2]`` before the projector).
5. One extra token ``sum_{j not kept} a_j x_j`` [``extra_one_token``, appended after the kept tokens].

Budget (``keep``, per image): a cap. The image keeps ``min(count, cap)`` tokens, outliers first (by
descending attention), then PruMerge+'s samples in sequence order; the cap is ``keep - 1`` when the
extra token is on (so at most ``keep`` tokens in all). ``keep=1.0`` (or a count of at least the image's
tokens) keeps every token unmerged: vtprune's keep-all contract, which the adaptive count would break.

Deviations from the release, on purpose:

- Layout: kept tokens stay in raster order at their own positions (the release orders them by
  attention, samples after outliers); the extra token takes the slot of the image's last token that is
  not kept (the release appends it at the end of the image's tokens).
- At least one outlier: an image without outliers keeps its highest-attention token (the release keeps
  none, and PruMerge+ divides by zero). ``s >= 1`` (the release's ``arange`` fails for ``s = 0``, more
  than a third of the tokens outliers). The sampled range ends at ``n - 2`` for any ``n`` (the release's
  ``575`` for LLaVA-1.5's 576). The count is the number of outliers (the release's
  ``int(N * (c / N))`` can truncate to ``c - 1`` in floating point).
- Quartiles per image (the release pools the whole batch, evaluated one image at a time); attention
  and merges in float32 (the release: the model's dtype).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from vtprune.config import ConfigError
from vtprune.layout import VisualLayout
from vtprune.scorers.base import PRE_LLM, VISION_CLS_ATTENTION, Scorer, Signals, register
from vtprune.scorers.greedy import minmax
from vtprune.scorers.select import image_budget, warn_clamped

NEIGHBOURS = 32  # the release's `torch.topk(cos_sim_matrix, k=int(32))`
IQR_FACTOR = 1.5  # upper fence Q3 + 1.5 IQR (`outlier_dectection`)
SAMPLE_DIVISOR = 3  # PruMerge+: sampling stride int(step_length / 3)
ATTENTION = "prumerge_attention"  # Signals.extras: per sample [n_b] the merge attention (set by the runtime)
_NEG_INF = float("-inf")


def iqr_outliers(attention: torch.Tensor, factor: float = IQR_FACTOR) -> torch.Tensor:
    """``[n]`` bool, True where ``attention`` ``[n]`` exceeds ``Q3 + factor * (Q3 - Q1)`` (linear quartiles,
    as ``np.percentile``). On the device, no host read."""
    a = attention.float()
    q1, q3 = torch.quantile(a, torch.tensor([0.25, 0.75], device=a.device))
    return a > q3 + factor * (q3 - q1)


def spatial_samples(n: int, n_outliers: torch.Tensor) -> torch.Tensor:
    """PruMerge+'s uniform tokens: ``[n]`` bool, every ``s``-th token of ``0 .. n - 2`` with
    ``s = max(1, floor(floor(n / c) / 3))``, ``c = max(1, n_outliers)`` (a device scalar: no host read)."""
    c = n_outliers.clamp(min=1)
    stride = torch.div(torch.div(n, c, rounding_mode="floor"), SAMPLE_DIVISOR, rounding_mode="floor").clamp(min=1)
    j = torch.arange(n, device=c.device)
    return (j % stride == 0) & (j < n - 1)


def selection_scores(attention: torch.Tensor, k: int, plus: bool = False) -> torch.Tensor:
    """One image's PruMerge ranking ``[n]`` float32: finite on the tokens it may keep, ``-inf`` elsewhere.

    Outliers score in ``[2, 3]`` by attention (the highest-attention token when there is none); PruMerge+'s
    samples in ``(1, 2)`` by sequence order (earlier first). With ``k >= n`` every token is finite (the
    attention itself): keep-all.
    """
    a = attention.float()
    n = int(a.numel())
    if k >= n:
        return a.clone()
    chosen = iqr_outliers(a)
    top = torch.zeros_like(chosen).index_fill_(0, torch.argmax(a, dim=0, keepdim=True), True)
    chosen = chosen | (top & ~chosen.any())
    scores = torch.where(chosen, 2.0 + minmax(a), torch.full_like(a, _NEG_INF))
    if plus:
        j = torch.arange(n, device=a.device, dtype=torch.float32)
        sampled = spatial_samples(n, chosen.sum()) & ~chosen
        scores = torch.where(sampled, 1.0 + (n - j) / (n + 1), scores)
    return scores


def merged_tokens(x: torch.Tensor, keys: torch.Tensor, attention: torch.Tensor, main: torch.Tensor,
                  neighbours: int = NEIGHBOURS) -> torch.Tensor:
    """PruMerge's merged features of the kept tokens ``main`` ``[m]`` (indices into the image's ``n`` tokens).

    Args:
        x: ``[n, C]`` features; keys: ``[n, d]``; attention: ``[n]`` (the weights).

    Returns ``[m, C]`` float32: ``x_i + sum_{j in J_i} a_j x_j``, ``J_i`` the ``min(neighbours, n - 1)`` other
    tokens of highest key cosine with ``i`` (ties: the earlier token).
    """
    n = int(x.shape[0])
    m = int(main.numel())
    kk = min(neighbours, n - 1)
    xf = x.float()
    if m == 0 or kk <= 0:
        return xf[main]
    unit = torch.nn.functional.normalize(keys.float(), dim=-1)
    sim = unit[main] @ unit.T  # [m, n]
    sim[torch.arange(m, device=sim.device), main] = _NEG_INF  # a token is not its own neighbour
    near = torch.sort(sim, dim=1, descending=True, stable=True).indices[:, :kk]  # [m, kk]
    w = attention.float().to(xf.device)[near]  # [m, kk]
    return xf[main] + torch.einsum("mk,mkc->mc", w, xf[near])


def remainder_token(x: torch.Tensor, attention: torch.Tensor, main: torch.Tensor) -> torch.Tensor:
    """The release's extra token: ``[C]`` float32 ``sum_{j not in main} a_j x_j``."""
    w = attention.float().to(x.device).clone()
    w[main] = 0.0
    return w @ x.float()


@dataclass
class ImageMerge:
    """One pruned image of a sample: ``candidates`` ``[n]`` (its prunable tokens, sample visual indices),
    ``main`` ``[m]`` (positions into ``candidates`` of the tokens that absorb neighbours) and ``extra``
    ``[0 | 1]`` (the position that receives the extra token)."""

    candidates: torch.Tensor
    main: torch.Tensor
    extra: torch.Tensor


@dataclass
class MergePlan:
    """One sample's PruMerge selection: ``kept`` ``[k]`` sorted visual indices (non-prunable, main and
    extra tokens), ``images`` the pruned images' merges, ``slots`` the sorted visual indices written with
    merged features, ``per_image`` the kept count of each image (host ints)."""

    kept: torch.Tensor
    images: list[ImageMerge]
    slots: torch.Tensor
    per_image: list[int] = field(default_factory=list)


def _cat(parts: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long, device=device)


def plan_prumerge(scores: list[torch.Tensor], layout: VisualLayout, keep: int | float,
                  extra_token: bool = True, excludes: bool = True) -> list[MergePlan]:
    """The kept and merged tokens of every image of the batch.

    Args:
        scores: per sample ``[n_b]`` rankings (`selection_scores`; ``-inf``: not kept).
        keep: the per-image cap (see `image_budget`); an image whose budget covers all its tokens keeps
            them all, unmerged.
        excludes: whether ``scores`` may hold ``-inf``; then the finite counts of all pruned images are read
            in one host read for the batch (the adaptive count), else every token counts as finite.
    """
    spans = layout.spans
    vals = [[scores[b].float()[sp.candidates] for sp in spans[b]] for b in range(layout.batch_size)]
    budgets = [[image_budget(keep, sp.n_candidates) for sp in spans[b]] for b in range(layout.batch_size)]
    pruned = [(b, i) for b in range(layout.batch_size) for i, sp in enumerate(spans[b])
              if budgets[b][i][0] < sp.n_candidates]
    finite = {key: spans[key[0]][key[1]].n_candidates for key in pruned}
    if excludes and pruned:
        counts = torch.stack([(vals[b][i] > _NEG_INF).sum() for b, i in pruned]).tolist()  # the one host read
        finite = dict(zip(pruned, counts))
    clamped = [sp.n_candidates for b in range(layout.batch_size) for sp, (_, c) in zip(spans[b], budgets[b]) if c]
    plans = []
    for b in range(layout.batch_size):
        dev = layout.positions[b].device
        kept, slots, images, per_image = [], [], [], []
        for i, (sp, v) in enumerate(zip(spans[b], vals[b])):
            n, k = sp.n_candidates, budgets[b][i][0]
            kept.append(sp.fixed)
            if (b, i) not in finite:  # keep-all (or an image without prunable tokens)
                kept.append(sp.candidates)
                per_image.append(sp.length)
                continue
            cap = k - 1 if extra_token and k >= 2 else k
            m = max(1, min(cap, finite[(b, i)]))
            order = torch.sort(v, descending=True, stable=True).indices
            main = order[:m]
            extra = torch.zeros(0, dtype=torch.long, device=v.device)
            if extra_token and m < k and m < n:
                rest = torch.ones(n, dtype=torch.bool, device=v.device).index_fill_(0, main, False)
                extra = torch.argmax(torch.arange(n, device=v.device) * rest, dim=0, keepdim=True)  # last one
            mine = torch.cat([main, extra])
            kept.append(sp.candidates[mine])
            slots.append(sp.candidates[mine])
            images.append(ImageMerge(sp.candidates, main, extra))
            per_image.append(sp.length - n + int(mine.numel()))
        plans.append(MergePlan(torch.sort(_cat(kept, dev)).values, images, torch.sort(_cat(slots, dev)).values,
                               per_image))
    warn_clamped(keep, clamped)
    return plans


@register
class PruMergeScorer(Scorer):
    """LLaVA-PruMerge: IQR outliers of the CLS attention, each merging its 32 nearest tokens by key cosine.

    See the module docstring for the algorithm, the budget rule and the deviations. Pre-LLM only; the
    count is adaptive, so ``keep`` is a cap (one host read per prefill for the counts). The score is the
    selection (`selection_scores`); the merge is carried out by `vtprune.runtime.prumerge`:

    - LLaVA-1.5 / NeXT: attention and keys of the key layer as the release computes them (one head over
      the concatenated ``q_proj`` / ``k_proj`` outputs, keys full width); merged on the vision features
      before the projector, then projected. NeXT (our adaptation): per image over all its tiles together
      (each tile's own CLS row), image-newline tokens kept and never merged.
    - Qwen2-VL / 2.5-VL / 3-VL (our adaptation; no CLS token): the attention is vtprune's Qwen
      ``vision_cls_attention`` of the key layer (the attention each merge group receives, head mean), the
      keys the mean of the 4 pre-RoPE full-width patch keys of each merge group, and the merger outputs
      are merged (the merger is nonlinear). Qwen3-VL's deepstack features of a kept token stay its own.

    Options:
        neighbours: tokens each kept token absorbs (32, the release's).
        extra_token: add the release's extra token, the attention-weighted sum of the tokens not kept
            (True, as the release).
        vision_layer: ``hidden_states`` index of the key layer (None: the last CLIP layer, as the release's
            ``layers[23]`` of 24; Qwen-VL: the adapter's feature layer, its last full-attention block).

    `vtprune.stats` reports ``contextual``: the kept tokens written with merged features.
    """

    name = "prumerge"
    description = "LLaVA-PruMerge: adaptive IQR outliers of CLS attention + key-similarity merging, pre-LLM"
    needs = frozenset({VISION_CLS_ATTENTION})  # on Qwen-VL only (see `needs_signal`)
    stages = (PRE_LLM,)
    default_layer = None
    accepts_auto_keep = False  # the count is the method's own (keep caps it)
    excludes = True  # tokens outside the adaptive selection score -inf
    plus: ClassVar[bool] = False  # PruMerge+: add spatially uniform samples

    def __init__(self, neighbours: int = NEIGHBOURS, extra_token: bool = True, vision_layer: int | None = None) -> None:
        if isinstance(neighbours, bool) or not isinstance(neighbours, int) or neighbours < 0:
            raise ConfigError(f"{self.name}: neighbours must be an int >= 0, got {neighbours!r}")
        if not isinstance(extra_token, bool):
            raise ConfigError(f"{self.name}: extra_token must be True or False, got {extra_token!r}")
        if vision_layer is not None and (isinstance(vision_layer, bool) or not isinstance(vision_layer, int)):
            raise ConfigError(f"{self.name}: vision_layer must be one int (a hidden_states index) or None, "
                              f"got {vision_layer!r}")
        self.neighbours = neighbours
        self.extra_token = extra_token
        self.vision_layer = vision_layer
        self._qwen = False

    def bind(self, model: Any, adapter: Any) -> None:
        self._qwen = getattr(adapter, "vision_family", "clip") == "qwen"

    def needs_signal(self, name: str) -> bool:
        # CLIP towers: the runtime stage computes the release's attention itself
        return name == VISION_CLS_ATTENTION and self._qwen

    def key_layer(self, adapter: Any) -> int:
        """``hidden_states`` index of the layer whose attention and keys are used."""
        if self.vision_layer is not None:
            return self.vision_layer
        return adapter.default_vision_layer() if self._qwen else -1

    def score(self, signals: Signals) -> list[torch.Tensor]:
        attention = signals.extras.get(ATTENTION)
        if attention is None:
            raise RuntimeError(f"{self.name}: no merge attention for this prefill; it is computed by the "
                               "runtime's PruMerge stage (vtprune.runtime.prumerge)")
        out = []
        for b, spans in enumerate(signals.layout.spans):
            a = attention[b]
            s = torch.zeros(a.shape[0], device=a.device)
            for sp in spans:
                k, _ = image_budget(signals.keep, sp.n_candidates)
                if k:
                    cand = sp.candidates.to(a.device)
                    s.index_copy_(0, cand, selection_scores(a[cand], k, self.plus))
            out.append(s)
        return out


@register
class PruMergePlusScorer(PruMergeScorer):
    """PruMerge+: PruMerge's outliers plus spatially uniform tokens (every ``floor(floor(n / c) / 3)``-th
    token, ``c`` outliers: about three times as many tokens), all merged the same way.

    The release's default (``forward`` calls ``token_prune_merge_advanced_plus``). Options as ``prumerge``.
    """

    name = "prumerge+"
    description = "PruMerge+: PruMerge's outliers + spatially uniform tokens, merged by key similarity, pre-LLM"
    plus = True
