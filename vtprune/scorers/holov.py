"""HoloV: the budget spread over consecutive crops of the image by their attention, then top-k per crop.

Zou et al., "Don't Just Chase 'Highlighted Tokens' in MLLMs: Revisiting Visual Holistic Context Retention"
(NeurIPS 2025, arXiv 2510.02912); released code github.com/obananas/HoloV: ``llava/model/utils.py``
(``HoloV``), called in ``llava/model/llava_arch.py`` (``prepare_inputs_labels_for_multimodal``) on the
projector outputs with ``num_patches=16, new_image_token_num=64``, and the head-mean CLS row of CLIP's
feature layer (``llava/model/multimodal_encoder/clip_encoder.py``, ``feature_select``:
``attentions[select_layer][:, :, 0, 1:]``, layer -2); for Qwen2.5-VL ``qwen-model-HoloV/utils.py``
(the same function) and ``modeling_qwen2_5_vl.py`` (the attention each token receives in the last vision
block, mean over heads and queries, per 2x2 merge group; ``num_patches`` from the budget).

Per image, on its ``n`` prunable tokens in sequence order, with budget ``k < n``:

1. Crops (the release's "patches"): ``C`` runs of consecutive tokens, ``n // C`` long, the first
   ``n mod C`` one longer; empty runs are dropped. ``C`` defaults to the Qwen release's
   ``max(1, int(1024 / 576 * n / k))``, which is 16 for LLaVA-1.5 at ``k = 64`` (the LLaVA release's
   fixed value), 8 at 128, 5 at 192. On LLaVA-1.5's raster order a crop of 36 tokens is 1.5 grid rows.
2. Crop score (`crop_scores`): for a crop of ``m > 1`` tokens with attention ``x``, ``a = 1000 x``; ``S``
   the cosine matrix of the features (each divided by its norm + 1e-6), diagonal set to 0;
   ``mu_i = sum_j S_ij / (m - 1)``, ``v_i = sum_j (S_ij - mu_i)^2 / (m - 1)`` (the zeroed diagonal
   included); token scores ``t = a + w v mean|a| / (mean|v| + 1e-6)`` (``w = diversity_weight``, 0.09);
   the crop scores ``mean(t)``. A one-token crop scores its attention unscaled.
3. Allocation (`allocate`): ``p_c = s_c^power / (sum s^power + 1e-6)`` (power 1), ``floor(p_c k)``
   each; the ``k - sum`` left over go one each to the crops of largest ``p_c`` (not largest remainder).
4. Per crop: a crop allocated at least its size is kept whole; otherwise its top tokens by attention
   (the variance term only enters the allocation). The budget a crop cannot hold is lost, and the
   release fills the image's ``k`` slots with zero vectors instead.
5. Order: the crops in order, inside a crop by descending attention (a whole crop in its own order),
   then the zero vectors.

Note that the variance term is rescaled to the mean attention of its crop, so ``mean(t)`` is
``(1 + w) mean(a)`` up to the 1e-6: the allocation is in effect proportional to each crop's mean attention.
"""

from __future__ import annotations

from typing import Any

import torch

from vtprune.config import ConfigError
from vtprune.scorers.base import HIDDEN_STATES, PRE_LLM, VISION_CLS_ATTENTION, Scorer, Signals, register
from vtprune.scorers.select import image_budget

ATTENTION_SCALE = 1e3  # the release multiplies the attention by 1e3 before adding the variance term
DIVERSITY_WEIGHT = 0.09  # `alpha` in llava/model/utils.py, `beta` in qwen-model-HoloV/utils.py
EPS = 1e-6  # the release's `esp`: feature norms, the variance rescaling and the weight normalisation
CROPS_RATIO = 1024 / 576  # the Qwen release's num_patches = int(1024 / 576 * image_token_len / keep_num)
ORDERS = ("release", "raster")
OVERFLOWS = ("pad", "drop")


def default_crops(n: int, k: int) -> int:
    """The Qwen release's crop count for ``n`` tokens and budget ``k``, evaluated in the same float order:
    16 for 576 -> 64, 8 for 576 -> 128, 5 for 576 -> 192."""
    return max(1, int((CROPS_RATIO * n) / k))


def crop_sizes(n: int, num_crops: int) -> list[int]:
    """The release's split of ``n`` tokens into ``num_crops`` runs: the first ``n mod C`` have ``n // C + 1``
    tokens, the others ``n // C``; empty runs are left out (``C > n``). Examples: (576, 16) -> 16 x 36;
    (10, 4) -> [3, 3, 2, 2]; (3, 5) -> [1, 1, 1]."""
    q, r = divmod(n, num_crops)
    return [q + (1 if c < r else 0) for c in range(num_crops) if q + (1 if c < r else 0) > 0]


def _crop_index(sizes: list[int], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """``(index [C, m], valid [C, m])`` with ``m`` the longest crop: row ``c`` holds crop ``c``'s token indices
    (clamped on the padding columns, which ``valid`` marks False)."""
    m = max(sizes)
    size = torch.tensor(sizes)
    start = torch.cumsum(size, 0) - size
    col = torch.arange(m)
    valid = col[None] < size[:, None]
    index = torch.minimum(start[:, None] + col[None], (start + size - 1)[:, None])
    return index.to(device, non_blocking=True), valid.to(device, non_blocking=True)


def crop_scores(attention: torch.Tensor, features: torch.Tensor, sizes: list[int],
                diversity_weight: float = DIVERSITY_WEIGHT) -> torch.Tensor:
    """``[C]`` float32 crop scores (step 2 of the module docstring), all crops at once.

    Args:
        attention: ``[n]`` the tokens' attention (finite, non-negative).
        features: ``[n, D]`` their features for the cosine similarity (the LLM input embeddings).
        sizes: crop lengths (`crop_sizes`), summing to ``n``.
    """
    index, valid = _crop_index(sizes, attention.device)
    size = torch.tensor(sizes, dtype=torch.float32).to(attention.device, non_blocking=True)
    vf = valid.float()
    feats = features.float().to(attention.device)[index]  # [C, m, D]
    unit = feats / (feats.norm(dim=-1, keepdim=True) + EPS)
    sim = unit @ unit.transpose(1, 2)  # [C, m, m]
    m = sim.shape[-1]
    pair = vf[:, :, None] * vf[:, None, :] * (1.0 - torch.eye(m, device=sim.device))
    sim = sim * pair  # the diagonal and the padding columns are 0
    others = (size - 1.0).clamp(min=1.0)[:, None]  # one-token crops are scored below
    mean = sim.sum(-1) / others  # [C, m]
    var = (((sim - mean[..., None]) ** 2) * vf[:, None, :]).sum(-1) / others  # the zeroed diagonal counts
    scaled = attention.float()[index] * ATTENTION_SCALE * vf
    mean_att = scaled.abs().sum(-1) / size
    mean_var = (var.abs() * vf).sum(-1) / size
    tokens = scaled + diversity_weight * var * (mean_att / (mean_var + EPS))[:, None]
    score = (tokens * vf).sum(-1) / size
    return torch.where(size > 1, score, attention.float()[index[:, 0]])


def allocate(weights: list[float], k: int) -> list[int]:
    """Tokens per crop from normalised crop weights (host floats, float32 values): ``floor(w_c * k)``,
    then one more to each of the ``k - sum`` crops of largest weight (ties: the earlier crop; at most one
    per crop, so with more left over than crops the rest is not allocated)."""
    w = torch.tensor(weights, dtype=torch.float32)
    alloc = torch.floor(w * k).long()
    rest = k - int(alloc.sum())
    if rest > 0:
        top = torch.sort(w, descending=True, stable=True).indices[: min(rest, len(weights))]
        alloc[top] += 1
    return alloc.tolist()


def holov_picks(attention: torch.Tensor, features: torch.Tensor, k: int, num_crops: int | None = None,
                diversity_weight: float = DIVERSITY_WEIGHT, power: float = 1.0) -> tuple[torch.Tensor, list[int]]:
    """One image's HoloV selection in the release's order (steps 1-5 of the module docstring).

    Args:
        attention: ``[n]`` attention per candidate token; ``-inf`` excludes a token (wrappers such as
            ``sink``): it scores 0 in its crop and is never picked, so its crop holds one token less.
        features: ``[n, D]`` their features.
        k: the image's budget, ``1 <= k < n``.
        num_crops: ``C`` (None: `default_crops`).

    Returns:
        ``(picks, alloc)``: ``[p]`` long indices into the candidates in the release's order (``p <= k``; the
        ``k - p`` slots the release fills with zero vectors are not in it) and the tokens allocated to
        each crop (host ints, summing to ``k`` unless more were left over than crops). One host read.
    """
    n = int(attention.numel())
    sizes = crop_sizes(n, num_crops if num_crops is not None else default_crops(n, k))
    att = attention.float()
    excluded = torch.isneginf(att)
    att0 = att.masked_fill(excluded, 0.0)
    index, valid = _crop_index(sizes, att.device)
    s = crop_scores(att0, features, sizes, diversity_weight) ** power
    w = s / (s.sum() + EPS)
    finite = (valid & ~excluded[index]).sum(-1)
    host = torch.cat([w, finite.float()]).cpu()  # the one read: allocation sizes decide the shapes
    alloc = allocate(host[: len(sizes)].tolist(), k)
    holds = host[len(sizes):].long().tolist()
    m = index.shape[1]
    ranked = torch.where(valid & ~excluded[index], att[index], float("-inf"))
    rank = torch.sort(ranked, dim=1, descending=True, stable=True).indices  # [C, m], finite first
    holds_t = torch.tensor(holds).to(att.device, non_blocking=True)
    first = torch.arange(m, device=att.device)[None] < holds_t[:, None]
    raster = torch.sort(torch.where(first, rank, m), dim=1).values.clamp(max=m - 1)  # a whole crop's order
    whole = torch.tensor([a >= size for a, size in zip(alloc, sizes)]).to(att.device, non_blocking=True)
    order = torch.where(whole[:, None], raster, rank)
    take = [min(max(a, 0), h) for a, h in zip(alloc, holds)]
    flat = torch.tensor([c * m + j for c, t in enumerate(take) for j in range(t)], dtype=torch.long)
    picks = index.gather(1, order).flatten()[flat.to(att.device, non_blocking=True)]
    if picks.numel() == 0:  # every token excluded: keep the first, as the generic selection does
        picks = torch.zeros(1, dtype=torch.long, device=att.device)
    return picks, alloc


@register
class HoloVScorer(Scorer):
    """HoloV: the budget allocated over consecutive crops by crop score, top attention tokens per crop.

    See the module docstring for the algorithm and its source. Pre-LLM only; query-free. ``score`` returns
    the attention (so wrappers such as ``debias`` correct it before the allocation); the crop allocation and
    the per-crop picks are the method's own selection (`select_and_merge`).

    - LLaVA-1.5 / NeXT / the LLaVA repository: head-mean CLS attention of ``vision_layer`` (default the
      feature layer, -2, as the release) and the projector outputs for the similarity, as the release.
      The LLM receives exactly the release's sequence: the kept slots are filled in the release's order
      (step 5), the zero vectors last (positions are contiguous, so a slot only fixes a position).
    - Qwen2-VL / 2.5-VL / 3-VL: the attention received in the last full-attention block (vtprune's Qwen
      ``vision_cls_attention``: mean over heads and the image's queries, per 2x2 group, as the release)
      and the merger outputs. Kept tokens stay in raster order with their own M-RoPE positions.

    Deviations from the release:
        - ``keep`` covering the image keeps it whole (the release would re-allocate and lose tokens).
        - LLaVA-NeXT: the budget is per image over its base and high-resolution tokens, as the release;
          the image-newline tokens are never candidates and, as in the release (its newline rows are
          commented out), dropped (``newlines="keep"``: kept beside the budget).
        - Qwen-VL: raster order (the release orders as in step 5 and carries the positions along); the zero
          vectors sit at the image's last unkept slots with those slots' positions (the release gives
          them the position of its slice's last row, the image's second-to-last token; on Qwen3-VL they
          still receive that slot's deepstack features).
          The release reads its Qwen2.5-VL attention in window order without undoing ``window_index``
          (so scores and tokens are misaligned there); vtprune's scores are in raster order.
          The release's Qwen2.5-VL slice of the image starts at ``<|vision_start|>``, one token early:
          HoloV scores that token and the image's first ``n - 1`` (each with the next token's score),
          and the image's last token always reaches the LLM; vtprune selects among the image's own
          ``n`` tokens (parity with both layouts: ``benchmarks/parity/holov_qwen.py``).
        - Ties in the top-k go to the earlier token or crop (``torch.topk``'s tie order is unspecified);
          scores are computed in float32 (the release: the model's dtype for the similarity).

    Options:
        num_crops: crops per image (None: the Qwen release's ``max(1, int(1024 / 576 * n / k))``;
            16 reproduces the LLaVA release's fixed ``num_patches`` at every budget).
        diversity_weight: ``w`` of the variance term (0.09, the release's).
        power: the allocation's exponent on the crop scores (1, the Qwen release's ``power``).
        order: ``"release"`` (step 5; needs contiguous positions, so LLaVA family only) or ``"raster"``
            (kept tokens in sequence order); None: release on the LLaVA family, raster on Qwen-VL.
        overflow: ``"pad"`` (the release: the budget a crop cannot hold becomes zero-vector tokens, so an
            image keeps exactly ``k``; `stats().contextual` counts them) or ``"drop"`` (it is not spent).
        vision_layer: the ``hidden_states`` index of the attention layer (None: the feature layer).
        newlines: ``"drop"`` (the release) or ``"keep"``: LLaVA-NeXT's image-newline tokens (the image's
            never-pruned tokens) when the image is pruned.
    """

    name = "holov"
    description = "HoloV: budget allocated over consecutive crops by attention, top-k per crop, pre-LLM"
    needs = frozenset({VISION_CLS_ATTENTION, HIDDEN_STATES})
    stages = (PRE_LLM,)
    default_layer = None
    accepts_auto_keep = False  # the allocation places a fixed number of tokens per image

    def __init__(self, num_crops: int | None = None, diversity_weight: float = DIVERSITY_WEIGHT,
                 power: float = 1.0, order: str | None = None, overflow: str = "pad",
                 vision_layer: int | None = None, newlines: str = "drop") -> None:
        if num_crops is not None and (isinstance(num_crops, bool) or not isinstance(num_crops, int) or num_crops < 1):
            raise ConfigError(f"holov: num_crops must be a positive int or None (the release's rule), got {num_crops!r}")
        for opt, value in (("diversity_weight", diversity_weight), ("power", power)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or float(value) < 0:
                raise ConfigError(f"holov: {opt} must be a non-negative number, got {value!r}")
        if order is not None and order not in ORDERS:
            raise ConfigError(f"holov: order must be one of {ORDERS} or None, got {order!r}")
        if overflow not in OVERFLOWS:
            raise ConfigError(f"holov: overflow must be one of {OVERFLOWS}, got {overflow!r}")
        if newlines not in ("drop", "keep"):
            raise ConfigError(f"holov: newlines must be 'drop' (the release) or 'keep', got {newlines!r}")
        if vision_layer is not None and (isinstance(vision_layer, bool) or not isinstance(vision_layer, int)):
            raise ConfigError(f"holov: vision_layer must be one int (a hidden_states index) or None, "
                              f"got {vision_layer!r}")
        self.num_crops = num_crops
        self.diversity_weight = float(diversity_weight)
        self.power = float(power)
        self.order = order
        self.overflow = overflow
        self.vision_layer = vision_layer
        self.newlines = newlines
        self._release_order = order != "raster"

    def bind(self, model: Any, adapter: Any) -> None:
        mrope = getattr(adapter, "vision_family", "clip") == "qwen"
        if mrope and self.order == "release":
            raise ConfigError("holov: order='release' needs contiguous positions, but Qwen-VL tokens keep their own "
                              "M-RoPE positions, so reordering them moves them elsewhere; use order='raster' or None")
        self._release_order = self.order == "release" or (self.order is None and not mrope)

    def tunable(self, model: Any, adapter: Any) -> dict[str, tuple[Any, Any]]:
        from vtprune.tunable import Param

        return {"power": (Param("float", 0.0, 4.0), self.power),
                "diversity_weight": (Param("float", 0.0, 1.0), self.diversity_weight)}

    def score(self, signals: Signals) -> torch.Tensor:
        return signals.padded(VISION_CLS_ATTENTION)  # [B, N_max]: the allocation's input, -inf on padding

    @torch.no_grad()
    def select_and_merge(self, scores: list[torch.Tensor], signals: Signals, embeds: torch.Tensor,
                         budget: Any) -> tuple[list[torch.Tensor], torch.Tensor, list[torch.Tensor]]:
        """Per image, HoloV's picks, and the release's zero vectors in the slots it could not fill.

        Args:
            scores: per sample ``[n_b]`` attention (this scorer's, or a wrapper's correction of it).
            embeds: ``[B, N, D]`` the LLM input embeddings (visual rows: projector / merger outputs).

        Returns per sample the sorted kept visual indices ``[k_b]`` (picks, padding slots and never-pruned
        tokens), the embeddings with the kept slots rewritten (release order: every kept prunable slot of
        an image holds the release's sequence; raster order: only the padding slots, set to 0), and per
        sample the sorted visual indices of the slots that hold zero vectors.
        """
        lay = signals.layout
        feats = signals.require(HIDDEN_STATES)
        out = embeds
        kept_all, zero_all = [], []
        for b, spans in enumerate(lay.spans):
            pos = lay.positions[b].to(embeds.device)
            parts, zeros = [], []
            for span in spans:
                cand = span.candidates
                n = span.n_candidates
                k, _ = image_budget(budget, n)
                if k >= n:  # keep-all keeps the image whole, newlines included
                    parts += [span.fixed, cand]
                    continue
                if self.newlines == "keep":
                    parts.append(span.fixed)
                dev = scores[b].device
                picks, _ = holov_picks(scores[b][cand.to(dev)], feats[b][cand.to(feats[b].device)], k,
                                       self.num_crops, self.diversity_weight, self.power)
                picks = picks.to(cand.device)
                n_pad = k - int(picks.numel()) if self.overflow == "pad" else 0
                taken = torch.zeros(n, dtype=torch.bool, device=cand.device).index_fill_(0, picks, True)
                free = torch.where(taken, -1, torch.arange(n, device=cand.device))
                pads = torch.topk(free, n_pad).indices  # the image's last unkept slots
                slots = torch.sort(torch.cat([picks, pads])).values
                parts.append(cand[slots])
                if self._release_order:
                    rows = embeds[b, pos[cand[picks].to(pos.device)]]
                    rows = torch.cat([rows, rows.new_zeros(n_pad, rows.shape[-1])])
                    target = pos[cand[slots].to(pos.device)]
                    filled = cand[slots[slots.numel() - n_pad:]]
                else:
                    if n_pad == 0:
                        continue
                    target = pos[cand[pads].to(pos.device)]
                    rows = embeds.new_zeros(n_pad, embeds.shape[-1])
                    filled = cand[pads]
                if out is embeds:
                    out = embeds.clone()
                out[b, target] = rows
                if n_pad:
                    zeros.append(filled)
            dev = lay.positions[b].device
            kept_all.append(torch.sort(torch.cat(parts).to(dev)).values if parts
                            else torch.zeros(0, dtype=torch.long, device=dev))
            zero_all.append(torch.sort(torch.cat(zeros).to(dev)).values if zeros
                            else torch.zeros(0, dtype=torch.long, device=dev))
        return kept_all, out, zero_all
