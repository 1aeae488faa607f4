"""VisionZip: dominant tokens by CLS attention, plus contextual tokens merged from the rest by key similarity.

Yang et al., "VisionZip: Longer is Better but Not Necessary in Vision Language Models" (CVPR 2025);
released code github.com/dvlab-research/VisionZip (``visionzip/clip_encoder.py``,
``CLIPVisionTower_VisionZip.forward``; ``visionzip/main.py``, ``visionzip(model, dominant, contextual)``).
This module holds the model-independent part: the budget split, the selection plan and the merge rule,
as pure functions of scores, keys and features. `vtprune.runtime.visionzip` records the keys
while the vision tower runs and applies the plan to the model's features before the LLM.

Per image with budget ``k`` (a float ``keep`` is first converted to a count, see `image_budget`):

1. ``k = D + C`` with VisionZip's ratio 54:10 (`split_budget`: 64 = 54 + 10, 128 = 108 + 20,
   192 = 162 + 30, the release's ``dominant`` / ``contextual`` arguments).
2. Dominant: the CLS token and the ``D - 1`` patches of highest CLS attention at the feature layer (the
   release's ``visionzip(model, dominant=54)`` keeps CLS + 53 patches; it sums over heads, the head mean
   used here ranks the same).
3. Contextual: the ``R`` remaining patches, in sequence order. Targets are the remaining tokens at
   ``0, s, 2s, ...`` with ``s = max(1, R // C)`` (the first ``C``); every other remaining token joins the
   target whose unit-normalised key has the highest cosine with its own (ties: the earlier target).
   Contextual token ``c`` = ``x_target + mean of x over its members`` (``x_target`` when it has none).
4. Order (``order="release"``): the LLM receives the release's sequence, CLS, the dominant patches in
   raster order, then the contextual tokens in target order. The image keeps ``k`` slots (its dominant
   patches, its targets and one slot for CLS: its last remaining token that is no target); the LLaVA
   family's positions are contiguous, so a slot only fixes a position, and the slots are filled in that
   order.

LLaVA-NeXT (``budget_per="tile"``, the default): all of the above per tile, each tile's whole 24 x 24 grid,
and the LLM receives the release's sequence over the tiles (`plan_visionzip_tiles`, `TileZipPlan`).

``order="raster"`` (the behaviour before the release order was the default, the only one on Qwen-VL, and
per image on LLaVA-NeXT with ``budget_per="image"``): no CLS token, all ``D`` dominant tokens are patches,
and each contextual token sits at its target's slot, so the kept tokens stay in raster order (and keep the
target's position, Qwen's M-RoPE included).

Deviations from the release: a ``keep`` covering the image (LLaVA-NeXT: a tile) keeps it whole (no CLS,
nothing merged); Qwen-VL (see `VisionZipScorer`); ties among the CLS scores go to the earlier token (a
stable sort; the release's ``topk`` leaves them unspecified).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from vtprune.config import ConfigError
from vtprune.kernels import recycle
from vtprune.layout import VisualLayout
from vtprune.scorers.base import PRE_LLM, VISION_CLS_ATTENTION, Scorer, Signals, register
from vtprune.scorers.select import image_budget, warn_clamped

CONTEXTUAL_RATIO = 10 / 64  # VisionZip's dominant:contextual split, 54:10
ORDERS = ("release", "raster")


def split_budget(k: int, contextual_ratio: float = CONTEXTUAL_RATIO) -> tuple[int, int]:
    """``(D, C)``, dominant and contextual counts with ``D + C = k``; ``C = round(k * contextual_ratio)``.

    At least one dominant token is kept when ``k >= 1``. Examples at the default ratio: 64 -> (54, 10),
    128 -> (108, 20), 192 -> (162, 30), 12 -> (10, 2).
    """
    if k <= 0:
        return 0, 0
    c = min(k - 1, int(math.floor(k * contextual_ratio + 0.5)))
    return k - c, c


def contextual_assign(keys: torch.Tensor, n_ctx: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Choose contextual targets among ``R`` remaining tokens and assign the others by key cosine.

    Args:
        keys: ``[R, d]`` keys of the remaining tokens, in sequence order (any float dtype).
        n_ctx: ``C``, the number of contextual tokens wanted (fewer when ``R < C``).

    Returns:
        ``targets [C']`` and ``members [R - C']``, indices into the ``R`` tokens (ascending), and
        ``slot [R - C']``: for each member, the index into ``targets`` of the target of highest cosine.
        Every shape follows from ``R`` and ``n_ctx`` on the host: nothing is read from the device.
    """
    r = keys.shape[0]
    dev = keys.device
    c = min(n_ctx, r)
    if c <= 0:  # no contextual token: the remaining tokens are simply dropped
        empty = torch.zeros(0, dtype=torch.long, device=dev)
        return empty, empty, empty
    step = max(1, r // c)  # c * step <= r: row j of the grid is target j * step, then its step - 1 followers
    grid = torch.arange(c * step, device=dev).view(c, step)
    targets = grid[:, 0].contiguous()
    members = torch.cat([grid[:, 1:].flatten(), torch.arange(c * step, r, device=dev)])  # ascending
    unit = torch.nn.functional.normalize(keys.float(), dim=-1)
    cos = unit[members] @ unit[targets].T  # [R - C, C]
    slot = cos.argmax(dim=1) if members.numel() else torch.zeros(0, dtype=torch.long, device=dev)
    return targets, members, slot


def contextual_tokens(
    x: torch.Tensor, targets: torch.Tensor, members: torch.Tensor, slot: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """VisionZip's contextual tokens: ``x_target + mean(x_members)`` per target, through `kernels.recycle`.

    Args:
        x: ``[N, D]`` features.
        targets: ``[C]`` rows of ``x`` that become contextual tokens.
        members: ``[M]`` rows of ``x`` merged into them; ``slot``: ``[M]`` index into ``targets`` of each.

    Returns:
        ``ctx [C, D]`` in ``x.dtype`` (sums in float32) and ``merged [C]`` bool, True where the target
        received at least one member (elsewhere ``ctx`` is ``x_target``, bit-exact).
    """
    c = int(targets.numel())
    merged = torch.zeros(c, dtype=torch.bool, device=x.device)
    merged[slot] = True
    if c == 0 or members.numel() == 0:
        return x[targets], merged
    out = recycle(
        x.float()[None], targets[None], members[None], slot[None],
        torch.ones(1, int(members.numel()), device=x.device), into="new", num_slots=c,
    ).out[0]  # [C + C, D]: the targets, then the mean of each target's members (zeros when none)
    ctx = (out[:c] + out[c:]).to(x.dtype)
    return torch.where(merged[:, None], ctx, x[targets]), merged


@dataclass
class ZipPlan:
    """One sample's VisionZip selection, as indices into that sample's visual tokens (``[n_b]``).

    - ``kept``: ``[k]`` sorted, the slots the LLM sees (dominant, contextual targets, CLS slots,
      non-prunable).
    - ``sequence``: ``[k]`` what fills them, in order: slot ``kept[i]`` receives the (merged) token
      ``sequence[i]``, or the CLS token of its image where ``i`` is in ``cls_at``. Raster order:
      ``sequence == kept``; release order: per image its CLS slot, its dominant patches, its targets.
    - ``cls_at``: ``[m]`` positions into ``sequence`` that carry an image's CLS token (release order; the
      entry there is a token of that image, its CLS slot).
    - ``targets``: ``[C]`` the contextual tokens (their features are replaced).
    - ``members``: ``[M]`` the tokens merged into them; ``slot``: ``[M]`` index into ``targets``.
    - ``per_image``: per image of the sample, how many of its tokens ``kept`` holds (host ints; dominant,
      contextual targets, CLS slot and non-prunable tokens).
    """

    kept: torch.Tensor
    targets: torch.Tensor
    members: torch.Tensor
    slot: torch.Tensor
    per_image: list[int] = field(default_factory=list)
    sequence: torch.Tensor | None = None
    cls_at: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.sequence is None:
            self.sequence = self.kept
        if self.cls_at is None:
            self.cls_at = torch.zeros(0, dtype=torch.long, device=self.kept.device)


def _cat(parts: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long, device=device)


def plan_visionzip(
    scores: list[torch.Tensor],
    keys: list[torch.Tensor],
    layout: VisualLayout,
    keep: int | float,
    contextual_ratio: float = CONTEXTUAL_RATIO,
    excludes: bool = True,
    with_cls: list[list[bool]] | None = None,
) -> list[ZipPlan]:
    """Dominant and contextual tokens of every image of the batch.

    Args:
        scores: per sample ``[n_b]`` dominance scores (CLS attention; ``-inf`` excludes a token from both
            roles and from merging: the image keeps at most its finite-scored tokens, at least one).
        keys: per sample ``[n_b, d]`` keys for the contextual matching.
        layout: the batch's `VisualLayout`; the budget applies per image to its prunable tokens, and
            non-prunable tokens (LLaVA-NeXT newlines) are always kept and never merged.
        keep: per-image budget (see `image_budget`), split by `split_budget`.
        excludes: whether ``scores`` may hold ``-inf`` (`Scorer.excludes`). Then the finite counts of all
            images are read in one host read for the batch; with False nothing is read (every score is
            taken as finite). All other sizes come from the layout's host-known spans, so the plan
            issues device work of host-known shapes only.
        with_cls: per sample, per image, whether it follows the release order (CLS among its ``D``
            dominant tokens, the sequence CLS / dominant / contextual); None: raster order everywhere.
            An image whose budget covers it is kept whole in raster order either way.
    """
    spans = layout.spans
    vals: list[list[torch.Tensor]] = []  # per sample, per image: the scores of its candidates
    for b in range(layout.batch_size):
        s = scores[b].float()
        if s.shape != layout.positions[b].shape:
            raise ValueError(
                f"scorer returned {tuple(s.shape)} scores for sample {b}, expected {tuple(layout.positions[b].shape)}"
            )
        vals.append([s[sp.candidates] for sp in spans[b]])
    allowed = [[sp.n_candidates for sp in spans[b]] for b in range(layout.batch_size)]
    if excludes:
        finite = [(v > float("-inf")).sum() for vs in vals for v in vs if v.numel()]
        if finite:
            host = iter(torch.stack(finite).tolist())  # the one host read, for the whole batch
            allowed = [[next(host) if n else 0 for n in ns] for ns in allowed]
    plans, clamped = [], []
    for b in range(layout.batch_size):
        kept, sequence, cls_at, targets, members, slot, per_image = [], [], [], [], [], [], []
        n_targets = n_kept = 0
        for i, (sp, v, n_ok) in enumerate(zip(spans[b], vals[b], allowed[b])):
            n = sp.n_candidates
            k, was_clamped = image_budget(keep, n)
            if was_clamped:
                clamped.append(n)
            cand = sp.candidates
            if n_ok < n:  # excluded tokens: keep the finite-scored ones (the first token when none is)
                n_ok = max(n_ok, 1)
                ok = torch.sort((~(v > float("-inf"))).to(torch.uint8), stable=True).indices[:n_ok]  # sequence order
                cand, v = cand[ok], v[ok]
                k = min(k, n_ok)
            cls = bool(with_cls and with_cls[b][i]) and 0 < k < n
            n_dom, n_ctx = split_budget(k, contextual_ratio)
            n_patch = n_dom - 1 if cls else n_dom  # the release's dominant count includes CLS
            parts = [sp.fixed]
            if k:
                order = torch.sort(v, descending=True, stable=True).indices
                dominant = torch.sort(cand[order[:n_patch]]).values
                rest = cand[torch.sort(order[n_patch:]).values]  # the non-dominant tokens, sequence order
                t, m, sl = contextual_assign(keys[b][rest], n_ctx)
                parts += [dominant, rest[t]]
                slot.append(sl + n_targets)
                targets.append(rest[t])
                members.append(rest[m])
                n_targets += int(t.numel())  # a shape: host-known
                if cls:  # the CLS token's slot: the last remaining token that is no target (one exists: k < n)
                    spare = rest[m] if t.numel() else rest
                    cls_slot = spare[spare.numel() - 1:]
                    parts.insert(1, cls_slot)
            image_kept = _cat(parts, sp.fixed.device)
            sorted_kept = torch.sort(image_kept).values
            kept.append(sorted_kept)
            if cls:
                cls_at.append(n_kept + int(sp.fixed.numel()))  # the fixed tokens (none in practice) first
            sequence.append(image_kept if cls else sorted_kept)
            n_kept += int(image_kept.numel())
            per_image.append(int(image_kept.numel()))
        dev = layout.positions[b].device
        plans.append(ZipPlan(_cat(kept, dev), _cat(targets, dev), _cat(members, dev), _cat(slot, dev), per_image,
                             sequence=_cat(sequence, dev),
                             cls_at=torch.tensor(cls_at, dtype=torch.long).to(dev, non_blocking=True)))
    warn_clamped(keep, clamped)
    return plans


@dataclass
class TileZipPlan:
    """One image's VisionZip plan per tile (the release's LLaVA-NeXT sequence), as rows of the call's tile
    table (``tile * S + row``, ``S`` rows per tile, CLS first; `Signals.tile_features`).

    - ``rows``: ``[L]`` the release's sequence, in order: the base tile's CLS, dominant patches and
      contextual tokens; every crop's dominant patch in the raster order of the padded crop grid; every
      crop's CLS; every crop's contextual tokens. A contextual entry holds its target's row.
    - ``ctx_at``: ``[C_all]`` the positions in ``rows`` of the contextual tokens (in order).
    - ``members`` / ``slot``: ``[M]`` the rows merged into contextual token ``slot`` (an index into ``ctx_at``).
    - ``own``: ``[P]`` the positions in ``rows`` of the dominant patches (the rows that may have a token of
      their own in the unpadded sequence).
    """

    rows: torch.Tensor
    ctx_at: torch.Tensor
    members: torch.Tensor
    slot: torch.Tensor
    own: torch.Tensor


def plan_visionzip_tiles(cls_rows: torch.Tensor, keys: torch.Tensor, tile_counts: list[int],
                         grids: list[tuple[int, int]], keep: int | float,
                         contextual_ratio: float = CONTEXTUAL_RATIO) -> list[TileZipPlan | None]:
    """VisionZip per tile as its LLaVA-NeXT release runs (``CLIPVisionTower_VisionZip.forward`` on the batch of
    tiles, ``prepare_inputs_labels_for_multimodal_visionzip`` / ``restore_image_features_sorted``): every tile
    keeps CLS + ``D - 1`` dominant patches + ``C`` contextual tokens (``D + C = keep``, `split_budget`).

    Args:
        cls_rows: ``[T, S]`` CLS attention of every tile of the call (row 0: CLS itself).
        keys: ``[T, S, d]`` the key layer's head-mean keys.
        tile_counts: the tiles of each image, in order (the base tile first, then the crops).
        grids: per image ``(rows, cols)`` of its crop grid.
        keep: the per-tile budget (see `image_budget`, over a tile's ``S - 1`` patches).

    Returns per image its `TileZipPlan`, or None where the budget covers a tile (the image is kept whole).
    Every shape follows from the counts and the budget: nothing is read from the device.
    """
    tiles, stride = cls_rows.shape
    n = stride - 1
    k, _ = image_budget(keep, n)
    if k >= n:
        return [None] * len(tile_counts)
    dev = cls_rows.device
    if k == 0:  # nothing of the image is kept
        empty = torch.zeros(0, dtype=torch.long, device=dev)
        return [TileZipPlan(empty, empty, empty, empty, empty) for _ in tile_counts]
    n_dom, n_ctx = split_budget(k, contextual_ratio)
    n_patch = max(n_dom - 1, 0)  # the release's dominant count includes CLS
    side = int(round(math.sqrt(n)))
    per_tile = []
    for t in range(tiles):
        order = torch.sort(cls_rows[t, 1:].float(), descending=True, stable=True).indices
        dominant = torch.sort(order[:n_patch]).values + 1  # rows, raster order
        rest = torch.sort(order[n_patch:]).values + 1
        targets, members, slot = contextual_assign(keys[t, rest.to(keys.device)], n_ctx)
        base = t * stride
        per_tile.append((base + dominant, base + rest[targets.to(dev)], base + rest[members.to(dev)], slot.to(dev)))
    plans: list[TileZipPlan | None] = []
    first = 0
    for count, (grid_rows, grid_cols) in zip(tile_counts, grids):
        image = list(range(first, first + count))
        first += count
        if grid_rows * grid_cols != count - 1:
            raise ValueError(f"an image of {count} tiles cannot have a {grid_rows} x {grid_cols} crop grid")
        cls = [torch.tensor([t * stride], device=dev) for t in image]
        crops = image[1:]
        # the crops' dominant patches in the padded crop grid's raster order
        crop_rows = [per_tile[t][0] for t in crops]
        if crop_rows:
            grid_key = []
            for c, rows in enumerate(crop_rows):
                r, col = divmod(c, grid_cols)
                patch = rows - crops[c] * stride - 1
                i, j = patch // side, patch % side
                grid_key.append((r * side + i) * (grid_cols * side) + col * side + j)
            flat = torch.cat(crop_rows)
            crop_dominant = flat[torch.sort(torch.cat(grid_key), stable=True).indices]
        else:
            crop_dominant = torch.zeros(0, dtype=torch.long, device=dev)
        base = image[0]
        head = [cls[0], per_tile[base][0]]
        contextual = [per_tile[t][1] for t in image]  # the base tile's, then every crop's
        parts = [*head, contextual[0], crop_dominant, *cls[1:], *contextual[1:]]
        rows = torch.cat(parts)
        sizes = [int(p.numel()) for p in parts]  # host-known
        starts = [sum(sizes[:i]) for i in range(len(sizes))]
        ctx_at = torch.cat([torch.arange(starts[2], starts[2] + sizes[2])]
                           + [torch.arange(starts[i], starts[i] + sizes[i]) for i in range(4 + len(crops), len(parts))])
        own = torch.cat([torch.arange(starts[1], starts[1] + sizes[1]), torch.arange(starts[3], starts[3] + sizes[3])])
        offsets = [0]
        for t in image:
            offsets.append(offsets[-1] + int(per_tile[t][1].numel()))
        members = torch.cat([per_tile[t][2] for t in image])
        slot = torch.cat([per_tile[t][3] + offsets[i] for i, t in enumerate(image)])
        plans.append(TileZipPlan(rows, ctx_at.to(dev), members, slot, own.to(dev)))
    return plans


@register
class VisionZipScorer(Scorer):
    """VisionZip: ``D`` dominant tokens by CLS attention + ``C`` contextual tokens merged by key cosine.

    See the module docstring for the algorithm and the two orders. Pre-LLM only. The score is the
    dominance criterion (so wrappers such as ``debias+visionzip`` act on it); the merge is carried out by
    `vtprune.runtime.visionzip` in each model's feature space:

    - LLaVA-1.5 (transformers' and the LLaVA repository's): CLS row and raw ``k_proj`` keys (head mean)
      of the feature layer (CLIP layer 22, ``hidden_states[-2]``); contextual tokens are merged on the
      vision features *before* the projector and then projected. By default the LLM receives the
      release's sequence: CLS (the feature layer's CLS row, projected), ``D - 1`` dominant patches,
      ``C`` contextual tokens (64 = CLS + 53 + 10).
    - LLaVA-NeXT (default ``budget_per="tile"``, the release): every tile (the base image and each crop,
      its whole 24 x 24 grid) keeps CLS + ``D - 1`` dominant patches + ``C`` contextual tokens of its own
      (``keep`` per tile), and the LLM receives the release's sequence: the base tile's CLS, dominant
      patches and contextual tokens, then every crop's dominant patches in the raster order of the padded
      crop grid (no unpadding), every crop's CLS, every crop's contextual tokens; no newline
      (`plan_visionzip_tiles`). The padding's patches are sent as the release sends them (vtprune projects
      the tiles' features itself), so the LLM input is the release's. The image keeps ``tiles x keep``
      slots: the dominant patches that have a token in the unpadded sequence hold theirs, the others take
      the image's last remaining tokens (positions are contiguous, so a slot only fixes a position); an
      image whose unpadded sequence is shorter than that is kept whole. ``budget_per="image"`` (or
      ``order="raster"``): the budget, the targets and the matching run per image over all its tiles in
      sequence order, no CLS token is sent and image-newline tokens are kept and never merged.
    - Qwen2-VL / 2.5-VL / 3-VL (our adaptation, raster order): dominant by the attention received in the
      last full-attention block (pooled per 2x2 merge group); keys = mean of the 4 patch keys of each
      merge group (pre-RoPE ``k``, head mean; mapped back from Qwen2.5-VL's window order); the *merger
      outputs* are averaged (the merger is nonlinear); a contextual token keeps its target's M-RoPE
      position. Qwen3-VL's deepstack features of a contextual token are its target's (not merged).

    Options:
        vision_layer: the ``hidden_states`` index of the layer whose CLS row and keys are used
            (default: the adapter's feature layer: LLaVA ``-2``, Qwen the last full-attention block).
        contextual_ratio: fraction of the budget given to contextual tokens (10/64, VisionZip's 54:10).
        order: ``"release"`` (CLS + dominant patches + contextual tokens, the release's sequence: LLaVA-1.5,
            and LLaVA-NeXT per tile) or ``"raster"`` (no CLS, ``D`` dominant patches, contextual tokens at
            their targets' slots, per image); None (default): release where the model allows it, raster
            on Qwen-VL.
        budget_per: ``"tile"`` (the release on LLaVA-NeXT) or ``"image"`` (per image, raster order).

    `vtprune.stats` reports ``contextual`` (contextual tokens per sample, included in ``visual_after``;
    the CLS slot is among the kept tokens but is not contextual).
    """

    accepts_auto_keep = False  # places a fixed number of tokens itself
    name = "visionzip"
    description = "VisionZip: dominant CLS-attention tokens + contextual tokens merged by key similarity (54:10), pre-LLM"
    needs = frozenset({VISION_CLS_ATTENTION})
    stages = (PRE_LLM,)
    default_layer = None
    recycles = True  # the pre-LLM stage calls `plan` and merges features instead of a plain top-k

    def tunable(self, model: Any, adapter: Any) -> dict[str, tuple[Any, Any]]:
        from vtprune.tunable import Param

        return {"contextual_ratio": (Param("float", 0.0, 0.5), self.contextual_ratio)}

    def __init__(self, vision_layer: int | None = None, contextual_ratio: float = CONTEXTUAL_RATIO,
                 order: str | None = None, budget_per: str = "tile") -> None:
        if budget_per not in ("tile", "image"):
            raise ConfigError(f"visionzip: budget_per must be 'tile' (the release) or 'image', got {budget_per!r}")
        self.budget_per = budget_per
        if vision_layer is not None and (isinstance(vision_layer, bool) or not isinstance(vision_layer, int)):
            raise ValueError(f"vision_layer must be one int (a hidden_states index) or None, got {vision_layer!r}")
        if isinstance(contextual_ratio, bool) or not isinstance(contextual_ratio, (int, float)) \
                or not 0.0 <= float(contextual_ratio) < 1.0:
            raise ValueError(f"contextual_ratio must be a number in [0, 1), got {contextual_ratio!r}")
        if order is not None and order not in ORDERS:
            raise ConfigError(f"visionzip: order must be one of {ORDERS} or None (release where possible), got {order!r}")
        self.vision_layer = vision_layer
        self.contextual_ratio = float(contextual_ratio)
        self.order = order
        self.release_order = order != "raster"  # resolved per model in `bind`

    def bind(self, model: Any, adapter: Any) -> None:
        qwen = getattr(adapter, "vision_family", "clip") == "qwen"
        if qwen and self.order == "release":
            raise ConfigError("visionzip: order='release' sends the CLS token first, but Qwen-VL towers have no CLS "
                              "token and their tokens keep their own M-RoPE positions; use order='raster' or None")
        self.release_order = self.order == "release" or (self.order is None and not qwen)
        # LLaVA-NeXT: the release's per-tile sequence (`plan_visionzip_tiles`), unless the per-image rule is asked for
        self.per_tile = getattr(adapter, "tiled", False) and self.budget_per == "tile" and self.order != "raster"

    def plan_tiles(self, cls_rows: torch.Tensor, keys: torch.Tensor, tile_counts: list[int],
                   grids: list[tuple[int, int]], keep: int | float) -> list[TileZipPlan | None]:
        """The per-image `TileZipPlan` of the release's LLaVA-NeXT path (see `plan_visionzip_tiles`)."""
        return plan_visionzip_tiles(cls_rows, keys, tile_counts, grids, keep, self.contextual_ratio)

    def cls_images(self, layout: VisualLayout, patches: int) -> list[list[bool]] | None:
        """Per sample, per image, whether it follows the release order: images of exactly ``patches``
        tokens (one tile, CLS not among them); None when the order is raster. An explicit
        ``order="release"`` refuses other images (`ConfigError`)."""
        if not self.release_order:
            return None
        flags = [[sp.length == patches and sp.n_candidates == sp.length for sp in spans] for spans in layout.spans]
        if self.order == "release":
            for spans, fl in zip(layout.spans, flags):
                for sp, ok in zip(spans, fl):
                    if not ok:
                        raise ConfigError(
                            f"visionzip: order='release' reproduces the release's LLaVA-1.5 sequence (an image of one "
                            f"tile, {patches} patches, CLS first), but this image has {sp.length} tokens (LLaVA-NeXT's "
                            f"tiles, or CLS among them); use order='raster' or None, or on LLaVA-NeXT the release's "
                            f"per-tile sequence, budget_per='tile' (the default)")
        return flags

    def score(self, signals: Signals) -> list[torch.Tensor]:
        return list(signals.require(VISION_CLS_ATTENTION))

    def plan(self, scores: list[torch.Tensor], keys: list[torch.Tensor], layout: VisualLayout,
             keep: int | float, excludes: bool = True, with_cls: list[list[bool]] | None = None) -> list[ZipPlan]:
        """The per-sample `ZipPlan` for dominance ``scores`` and matching ``keys`` (see `plan_visionzip`).

        ``excludes``: whether ``scores`` may hold ``-inf`` (the scoring wrapper's `Scorer.excludes`); only
        then is the batch's finite count read (once). ``with_cls``: the images in release order
        (`cls_images`)."""
        return plan_visionzip(scores, keys, layout, keep, self.contextual_ratio, excludes, with_cls)
