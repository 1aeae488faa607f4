"""VScan: complementary global and local scans with token merging in the vision encoder, then a drop by the
text's attention at a middle LLM layer.

Zhang et al., "VScan: Rethinking Visual Token Reduction for Efficient Large Vision-Language Models" (TMLR
2026, arXiv 2505.22654); released code github.com/Tencent/SelfEvolvingAgent, folder ``VScan/``. This
module holds the model-independent parts as pure functions of scores and features (the scans, the merge,
the budget split) and the scorer that runs them; the model hooks record what they need while the vision
tower runs.

Stage 1, before the LLM, per tile (LLaVA-1.5: the image; LLaVA-NeXT: the base image and every crop, each
on its own 24 x 24 patch grid) with a budget of ``T`` tokens (release: ``encode_images`` in
``llava/model/llava_arch.py``; the CLS rows of every layer from ``feature_select`` in
``multimodal_encoder/clip_encoder.py``, head mean, patch columns of the softmax over all 577 keys):

1. Local scan (`window_topk`, the release's ``window_cls_selection``): the CLS attention of a *shallow*
   layer (``attentions[5]`` of CLIP-L's 24, the layer whose output is ``hidden_states[6]``), cut into
   non-overlapping ``window x window`` windows (6: 16 windows of 36 patches); each window keeps its
   ``int(T * (1 - global_ratio)) // windows`` highest patches (96 -> 48 local tokens, 3 per window).
2. Global scan (`global_picks`): the CLS attention of the *deep* layer (``attentions[-2]``, the layer
   producing LLaVA's feature layer ``hidden_states[-2]``), with the local picks excluded: its
   ``T - int(T * (1 - global_ratio))`` highest patches (``global_ratio`` 0.5: 48).
3. Merge (`nearest_merge`, the release's ``token_merging(..., scaling=1)``): on the projector outputs (the
   release projects first), every unselected patch of the tile joins the selected patch of highest cosine
   similarity; a selected patch becomes ``(scaling * x_i + sum of its members) / (scaling + members)``,
   the plain mean of itself and its members at ``scaling=1``. On LLaVA-NeXT the unselected patches that
   the model's unpadding removes are merged too, and selected patches it removes are lost, as in the
   release (the selection runs on the whole tile, ``prepare_inputs_labels_for_multimodal_x``).

Stage 2, inside the LLM (``LlamaModel.forward_x`` / ``layer_prune`` in ``llava/model/modeling_llama_x.py``):
the release's ``layer_list [16]`` ranks before 0-based layer 16 runs (``rank_layer = layer_idx + 1``) by the
head-mean attention of the last prompt token (``prompt_len + image_tokens - 1``) computed with layer 16's
``input_layernorm``, ``q_proj`` / ``k_proj`` and RoPE on layer 15's output, softmax over the causal keys,
the image columns; it keeps the top ``image_token_list [32]`` visual tokens. Here ``llm_layer`` names the
layer whose output is pruned (15 on 32-layer LLMs, the same depth fraction elsewhere: 13 on 28 layers,
which is the Qwen2.5-VL release's ``layer_list [14]``, 2 on the 4-layer toys).

Budget: ``keep`` is the final number of visual tokens per image (after the LLM stage). The pre-LLM stage
keeps ``T = round(pre_llm_factor * keep)`` per tile (Qwen-VL: per image or video), ``pre_llm_factor`` 3:
the release's scripts pass ``--visual_token_num 96 --image_token_list '[32]' --layer_list '[16]'`` (96
before the LLM, 32 from layer 16 on: 64 on average over the 32 layers, its "64 tokens" setting), and its
Qwen2.5-VL scripts keep 0.167 then 0.333 of those. So the paper's average budget ``B`` (64 / 128 / 192 on
LLaVA-1.5) is ``keep = B / 2`` (32 / 64 / 96: 96 / 192 / 288 before the LLM). The local scan's per-window
floor can leave a tile a few tokens short of ``T``, as in the release (``T = 36``: 16 + 18). A fraction
``keep=f`` keeps ``min(1, 3 f)`` of each tile's patches before the LLM and ``f / min(1, 3 f)`` of the tokens present at the
LLM stage (``f`` of the image where nothing is unpadded). ``keep=1.0`` (or a count covering a tile) keeps
the tile whole and unmerged, as the release's ``visual_token_num == 576`` path does.

Qwen2.5-VL (``qwen/model/qwen2_5_vl_custom.py``, ``qwen2_5_vl_utils.py``): no CLS token; the scores are the
attention each merged token receives (sum over heads, mean over the image's queries, mean of its 2x2 patch
group, vtprune's ``vision_cls_attention`` stand-in), local from the first full-attention block (7), global
from the last (31); the local scan is `capped_window_picks` (the release's ``window_selection``: windows of
4 x 4 merged tokens, the border rows and columns folded into the last window, the tokens taken in
descending score order with at most ``ceil(n_local / windows)`` per window); ``T // 2`` local tokens;
merged on the merger outputs; the LLM stage scores *without* RoPE (the release's ``layer_prune`` leaves
``apply_multimodal_rotary_pos_emb`` commented out) and keeps the original M-RoPE positions.

Deviations from the release, on purpose:

- Positions: kept tokens keep their positions at the LLM stage (LLaVA: the release re-indexes them
  contiguously after layer 16; Qwen-VL's release keeps them, as here).
- The LLM stage's budget is per image, over its prunable tokens: LLaVA-NeXT's image-newline tokens are
  never pruned and not counted (the release ranks them with the other image tokens of the sample and
  counts them in its 32).
- Scores and merges in float32 (the release: the model's fp16); ties go to the earlier token.
- Qwen-VL: per image or video (the release handles one image per prompt and takes its windows from the
  first grid); a grid smaller than a window is one window; if the capped windows cannot hold the local
  budget the best remaining tokens fill it (the release asserts). Budgets round (Qwen's release floors
  ``int(0.167 * N)``).
- Layers on other depths: the vision layers are those of the release's depth fractions (`VScanScorer`),
  the LLM layer is depth-scaled (`depth_scaled`).
- With ``vision_feature_select_strategy="full"`` the CLS token, a visual token there, is kept unmerged
  before the LLM.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from vtprune.config import ConfigError
from vtprune.scorers.base import PRE_LLM, Scorer, Signals, register
from vtprune.scorers.select import StageBudget, image_budget
from vtprune.scorers.staged import depth_scaled
from vtprune.signals import cls_scores

LOCAL = "vscan_local"  # VisionRecord.extras: the shallow layer's scores, CLIP [tiles, P + 1], Qwen-VL [tokens, 1]
GLOBAL = "vscan_global"  # VisionRecord.extras: the deep layer's scores, laid out the same way
PROJECTED = "vscan_projected"  # VisionRecord.extras (CLIP towers): [tiles, P (+ 1), D] the projector's outputs
ATTENTION = "vscan_attention"  # Signals.extras at the LLM stage: [B, N_max] the last prompt token's attention

GLOBAL_RATIO = 0.5  # the release's `global_ratio = 0.5` (encode_images)
CLIP_WINDOW = 6  # `window_cls_selection(..., window_size=6)`: 4 x 4 windows of a 24 x 24 tile
QWEN_WINDOW = 4  # `window_selection(..., window_size=4)`, in merged tokens
PRE_LLM_FACTOR = 3.0  # `--visual_token_num 96` before the LLM, `--image_token_list [32]` after layer 16
PAPER_LLM_LAYER = 15  # 0-based, pruned output, on 32 layers (the release's `layer_list [16]`)
SHALLOW_FRACTION = 0.25  # the local scan's layer: hidden_states[6] of CLIP-L's 24, block 7 of Qwen2.5-VL's 32


def split_scans(k: int, global_ratio: float = GLOBAL_RATIO) -> tuple[int, int]:
    """``(local target, global count)`` of a tile's budget ``k``: ``int(k * (1 - global_ratio))`` and the
    rest (the release's split). Examples at 0.5: 96 -> (48, 48), 36 -> (18, 18), 3 -> (1, 2)."""
    n_local = int(k * (1.0 - global_ratio))
    return n_local, k - n_local


def window_topk(scores: torch.Tensor, n_local: int, window: int = CLIP_WINDOW) -> tuple[torch.Tensor, int]:
    """The LLaVA release's local scan (``window_cls_selection``), batched over tiles.

    Args:
        scores: ``[T, g, g]`` a shallow layer's CLS attention of each tile's patch grid.
        n_local: the local target of a tile; each of the ``(g // window)**2`` non-overlapping windows (from
            the top left; rows and columns past the last whole window belong to none) keeps its
            ``n_local // windows`` highest patches (ties: the earlier patch of the window). A grid smaller
            than ``window`` is one window.

    Returns:
        ``[T, g, g]`` bool, the local picks, and their number per tile (host int, the same for every tile).
    """
    t, g, _ = scores.shape
    side = window if g >= window else g
    nw = g // side
    per = min(n_local // (nw * nw), side * side)
    out = torch.zeros(t, g, g, dtype=torch.bool, device=scores.device)
    if per <= 0:
        return out, 0
    span = nw * side
    cells = scores[:, :span, :span].reshape(t, nw, side, nw, side).permute(0, 1, 3, 2, 4).reshape(t, nw * nw, -1)
    top = torch.sort(cells.float(), dim=2, descending=True, stable=True).indices[..., :per]
    picked = torch.zeros(cells.shape, dtype=torch.bool, device=scores.device).scatter_(2, top, True)
    out[:, :span, :span] = picked.view(t, nw, nw, side, side).permute(0, 1, 3, 2, 4).reshape(t, span, span)
    return out, per * nw * nw


def qwen_windows(coords: torch.Tensor, window: int = QWEN_WINDOW) -> tuple[torch.Tensor, int]:
    """The Qwen release's windows of one image's (or video's) merged tokens: ``(window id [n], windows)``.

    ``coords`` ``[n, 3]`` long ``(frame, row, col)`` on the merged grid. Each frame has
    ``max(1, h // window) * max(1, w // window)`` windows; the rows and columns past the last whole window
    join the last one (the release's ``x == num_windows_h`` clamp)."""
    f, r, c = coords.unbind(1)
    h, w, frames = int(r.max()) + 1, int(c.max()) + 1, int(f.max()) + 1
    nh, nw = max(1, h // window), max(1, w // window)
    x = torch.div(r, window, rounding_mode="floor").clamp(max=nh - 1)
    y = torch.div(c, window, rounding_mode="floor").clamp(max=nw - 1)
    return (f * nh + x) * nw + y, frames * nh * nw


def capped_window_picks(scores: torch.Tensor, window_id: torch.Tensor, n_windows: int, n_local: int) -> torch.Tensor:
    """The Qwen release's local scan (``window_selection``): ``[n]`` bool, exactly ``min(n_local, n)`` picks.

    Tokens are taken in descending ``scores`` ``[n]`` (ties: the earlier token) while their window
    (``window_id`` ``[n]``) holds fewer than ``ceil(n_local / n_windows)`` picks. Should the capped windows
    hold fewer than ``n_local`` tokens, the best remaining ones fill the budget (the release asserts).
    """
    n = int(scores.numel())
    out = torch.zeros(n, dtype=torch.bool, device=scores.device)
    if n_local <= 0 or n == 0:
        return out
    cap = -(-n_local // max(1, n_windows))
    order = torch.sort(scores.float(), descending=True, stable=True).indices
    w = window_id.to(scores.device)[order]
    by_window = torch.sort(w, stable=True).indices  # ranks within each window stay in score order
    grouped = w[by_window]
    pos = torch.arange(n, device=scores.device)
    first = torch.ones(n, dtype=torch.bool, device=scores.device)
    first[1:] = grouped[1:] != grouped[:-1]
    start = torch.cummax(torch.where(first, pos, torch.zeros_like(pos)), dim=0).values
    rank = torch.empty_like(pos)
    rank[by_window] = pos - start
    # the greedy pass takes a token exactly when its rank in its window is below the cap: the eligible
    # tokens in score order, then (never in the release's cases) the others
    take = torch.sort((rank >= cap).to(torch.uint8), stable=True).indices[:n_local]
    out[order[take]] = True
    return out


def global_picks(scores: torch.Tensor, taken: torch.Tensor, n_global: int) -> torch.Tensor:
    """The global scan: ``taken`` ``[..., n]`` plus the ``n_global`` highest ``scores`` ``[..., n]`` outside it
    (ties: the earlier token), per row."""
    s = scores.float().masked_fill(taken, float("-inf"))
    if n_global <= 0:
        return taken.clone()
    top = torch.sort(s, dim=-1, descending=True, stable=True).indices[..., :n_global]
    return taken.clone().scatter_(-1, top, True)


def nearest_merge(x: torch.Tensor, kept: torch.Tensor, dropped: torch.Tensor,
                  scaling: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """The release's ``token_merging``, batched over rows (tiles).

    Args:
        x: ``[R, n, D]`` features (the projector or merger outputs).
        kept: ``[R, K]`` and ``dropped`` ``[R, M]``: indices into ``n`` of the selected and the other tokens.
        scaling: the selected token's own weight (1.0, the release's).

    Returns:
        ``merged`` ``[R, K, D]`` float32: ``(scaling * x_i + sum_{j -> i} x_j) / (scaling + c_i)``, every
        dropped token ``j`` joining the kept token of highest cosine similarity (ties: the earlier kept
        token), ``c_i`` the number that joined ``i``; and ``count`` ``[R, K]`` long, the ``c_i``.
    """
    xf = x.float()
    r, d = xf.shape[0], xf.shape[-1]
    xk = xf.gather(1, kept[..., None].expand(-1, -1, d))
    count = torch.zeros(kept.shape, dtype=torch.long, device=xf.device)
    if dropped.shape[1] == 0:
        return xk, count
    xd = xf.gather(1, dropped[..., None].expand(-1, -1, d))
    unit = torch.nn.functional.normalize
    near = torch.matmul(unit(xd, dim=-1), unit(xk, dim=-1).transpose(1, 2)).argmax(dim=-1)  # [R, M]
    acc = (xk * scaling).scatter_add(1, near[..., None].expand(-1, -1, d), xd)
    count.scatter_add_(1, near, torch.ones_like(near))
    return acc / (scaling + count)[..., None].float(), count.view(r, -1)


def _kept_first(selected: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``selected`` ``[R, n]`` bool with ``k`` True per row -> (kept ``[R, k]``, dropped ``[R, n - k]``), each in
    index order."""
    order = torch.sort((~selected).to(torch.uint8), dim=-1, stable=True).indices
    return order[..., :k], order[..., k:]


@register
class VScanScorer(Scorer):
    """VScan: global + local CLS-attention scans with merging before the LLM, then a drop by the last prompt
    token's attention after ``llm_layer``. See the module docstring for the algorithm, the budget and the
    deviations.

    - LLaVA-1.5 / NeXT and the original LLaVA codebase: the scans per tile on the CLS rows of the two vision
      layers (recorded by hooks on their attention, `Adapter.vision_layer_scores`), the merge on the
      projector's outputs (recorded by a hook on the projector: on NeXT they hold the patches the
      unpadding removes, which the release merges too).
    - Qwen2.5-VL (the release's), Qwen2-VL and Qwen3-VL (our adaptation, same rules): the received
      attention of a shallow and of the last full-attention block, per image or video, merged on the
      merger outputs (Qwen3-VL: the deepstack features of a kept token stay its own).

    Options:
        global_ratio: the global scan's share of the pre-LLM budget (0.5).
        pre_llm_factor: the pre-LLM count per tile as a multiple of ``keep`` (3.0, the release's 96 -> 32);
            1.0 prunes before the LLM only (the release without ``--layer_list``).
        llm_layer: the decoder layer whose output the LLM stage prunes (None: 15 on 32-layer LLMs, the
            same depth fraction elsewhere, at least the model's first prunable layer).
        vision_layers: ``(shallow, deep)`` ``hidden_states`` indices of the two scans' layers (None: the
            deep one is the adapter's feature layer, LLaVA ``-2``, Qwen-VL the last full-attention block;
            the shallow one the first usable layer at a quarter of the tower's depth, ``6`` on CLIP-L's
            24 layers (the release's ``attentions[5]``), block 7 of Qwen2.5-VL's 32, its first
            full-attention block).
        window: the local scan's window side (None: 6 patches on CLIP tiles, 4 merged tokens on Qwen-VL).
        scaling: the selected token's weight in its merge (1.0, the release's).
        merge: merge the unselected tokens into the selected ones (True); False drops them (the release's
            commented-out alternative).
        llm_rope: apply RoPE when scoring at the LLM stage (None: as the release, yes on the LLaVA family,
            no on Qwen-VL).

    `vtprune.stats` reports the pre-LLM stage (layer None) and the LLM stage in ``stages``, and
    ``contextual``: the kept tokens holding merged features.
    """

    name = "vscan"
    description = "VScan: global + local (windowed) CLS-attention scans with merging pre-LLM, then a middle-layer text-attention drop"
    stages = (PRE_LLM,)
    default_layer = None
    accepts_auto_keep = False  # the scans place a fixed number of tokens per tile
    requires = frozenset({"pre_llm_then_llm"})

    def __init__(self, global_ratio: float = GLOBAL_RATIO, pre_llm_factor: float = PRE_LLM_FACTOR,
                 llm_layer: int | None = None, vision_layers: list[int] | tuple[int, int] | None = None,
                 window: int | None = None, scaling: float = 1.0, merge: bool = True,
                 llm_rope: bool | None = None) -> None:
        def number(value: Any) -> bool:
            return isinstance(value, (int, float)) and not isinstance(value, bool)

        if not number(global_ratio) or not 0.0 <= float(global_ratio) <= 1.0:
            raise ConfigError(f"vscan: global_ratio must be a number in [0, 1], got {global_ratio!r}")
        if not number(pre_llm_factor) or float(pre_llm_factor) < 1.0:
            raise ConfigError(f"vscan: pre_llm_factor must be a number >= 1 (the pre-LLM count is "
                              f"pre_llm_factor x keep), got {pre_llm_factor!r}")
        if llm_layer is not None and (isinstance(llm_layer, bool) or not isinstance(llm_layer, int) or llm_layer < 0):
            raise ConfigError(f"vscan: llm_layer must be an int >= 0 or None, got {llm_layer!r}")
        if vision_layers is not None and (
                len(vision_layers) != 2 or any(isinstance(v, bool) or not isinstance(v, int) for v in vision_layers)):
            raise ConfigError(f"vscan: vision_layers must be two hidden_states indices (shallow, deep), "
                              f"got {vision_layers!r}")
        if window is not None and (isinstance(window, bool) or not isinstance(window, int) or window < 1):
            raise ConfigError(f"vscan: window must be an int >= 1 or None, got {window!r}")
        if not number(scaling) or float(scaling) <= 0:
            raise ConfigError(f"vscan: scaling must be a positive number, got {scaling!r}")
        if not isinstance(merge, bool):
            raise ConfigError(f"vscan: merge must be True or False, got {merge!r}")
        if llm_rope is not None and not isinstance(llm_rope, bool):
            raise ConfigError(f"vscan: llm_rope must be True, False or None (the release's choice), got {llm_rope!r}")
        self.global_ratio = float(global_ratio)
        self.pre_llm_factor = float(pre_llm_factor)
        self._default_layer = llm_layer is None
        self.llm_layer = PAPER_LLM_LAYER if llm_layer is None else llm_layer
        self.vision_layers = None if vision_layers is None else (int(vision_layers[0]), int(vision_layers[1]))
        self.window = window
        self.scaling = float(scaling)
        self.merge = merge
        self.llm_rope = llm_rope
        self._qwen = False
        self._layers: tuple[int, int] | None = None  # resolved (shallow, deep) hidden_states indices

    # ---- the model ----------------------------------------------------------------------------
    def bind(self, model: Any, adapter: Any) -> None:
        self._qwen = getattr(adapter, "vision_family", "clip") == "qwen"
        self._layers = self.scan_layers(adapter)
        if self._default_layer and self.pre_llm_factor > 1.0:  # the release's layer at this model's depth
            depth = len(adapter.decoder_layers())
            self.llm_layer = depth_scaled(self.name, [PAPER_LLM_LAYER], depth, adapter.min_layer())[0]

    def scan_layers(self, adapter: Any) -> tuple[int, int]:
        """``(shallow, deep)`` ``hidden_states`` indices of the local and the global scan on ``adapter``'s tower."""
        if self.vision_layers is not None:
            chosen = self.vision_layers
        else:
            depth = adapter.vision_depth()
            shallow = None
            for h in range(max(1, round(depth * SHALLOW_FRACTION)), depth + 1):
                try:  # the first layer there whose attention spans the image (Qwen2.5-VL: a full block)
                    adapter.vision_attention(h)
                except ValueError:
                    continue
                shallow = h
                break
            chosen = (shallow if shallow is not None else adapter.default_vision_layer(), adapter.default_vision_layer())
        for h in chosen:
            try:
                adapter.vision_attention(h)
            except ValueError as err:
                raise ConfigError(f"vscan: vision_layers={list(chosen)}: {err}") from None
        return chosen

    @property
    def rope_at_llm_stage(self) -> bool:
        return (not self._qwen) if self.llm_rope is None else self.llm_rope

    @property
    def window_side(self) -> int:
        return self.window if self.window is not None else (QWEN_WINDOW if self._qwen else CLIP_WINDOW)

    def llm_stages(self, model: Any, adapter: Any, keep: Any) -> tuple[Any, list[tuple[int, Any]]]:
        """``(pre-LLM budget per tile or Qwen-VL item, [(llm_layer, keep)])``; see the module docstring."""
        if self.pre_llm_factor == 1.0:
            return keep, []
        n = len(adapter.decoder_layers())
        if self.llm_layer > n - 2:
            raise ConfigError(f"vscan: llm_layer={self.llm_layer} needs at least {self.llm_layer + 2} decoder "
                              f"layers (it scores with the next layer), this model has {n}: pass llm_layer=K "
                              f"with K <= {n - 2}, or pre_llm_factor=1 to prune before the LLM only")
        if isinstance(keep, float):
            pre = min(1.0, self.pre_llm_factor * keep)
            return StageBudget(pre, 1), [(self.llm_layer, min(1.0, keep / pre))]
        return int(math.floor(self.pre_llm_factor * keep + 0.5)), [(self.llm_layer, keep)]

    def tunable(self, model: Any, adapter: Any) -> dict[str, tuple[Any, Any]]:
        from vtprune.tunable import Param

        return {"global_ratio": (Param("float", 0.0, 1.0), self.global_ratio),
                "pre_llm_factor": (Param("float", 1.0, 6.0), self.pre_llm_factor)}

    def model_hooks(self, adapter: Any, state: Any) -> list:
        """Record the two scans' scores (and, on CLIP towers, the projector's outputs) while encoding."""
        shallow, deep = self._layers if self._layers is not None else self.scan_layers(adapter)
        keys: dict[int, tuple[Any, list[str]]] = {}
        for key, layer in ((LOCAL, shallow), (GLOBAL, deep)):
            module = adapter.vision_attention(layer)
            keys.setdefault(id(module), (module, []))[1].append(key)

        def scores_hook(names: list[str]):
            def hook(mod, args, kwargs):
                extras = state.vision_extras
                if state.enabled and extras is not None:
                    with state.timer.part("score"):
                        row = adapter.vision_layer_scores(mod, args, kwargs)
                    for name in names:
                        extras[name] = row
                return None

            return hook

        handles = [m.register_forward_pre_hook(scores_hook(names), with_kwargs=True) for m, names in keys.values()]
        if not self._qwen:
            def projected(mod, args, output):
                extras = state.vision_extras
                if state.enabled and extras is not None:
                    prev = extras.get(PROJECTED)
                    extras[PROJECTED] = output if prev is None else torch.cat([prev, output])
                return None

            handles.append(adapter.merge_projector().register_forward_hook(projected))
        return handles

    # ---- scores -------------------------------------------------------------------------------
    @staticmethod
    def _recorded(signals: Signals, key: str) -> torch.Tensor:
        """The call's rows of ``key``, the images' then the videos' (the order of the layout's sources)."""
        parts = []
        for rec in (signals.vision_record, signals.video_record):
            if rec is None:
                continue
            value = rec.extras.get(key)
            if value is None:
                raise RuntimeError("vscan: the vision scans were not recorded for these images; they must be "
                                   "encoded by this patched model (pass pixel inputs, or let generate() encode them)")
            parts.append(value)
        if not parts:
            raise RuntimeError("vscan: this prefill has no encoded images to scan")
        return parts[0] if len(parts) == 1 else torch.cat([p.flatten().to(parts[0].device) for p in parts])

    def score(self, signals: Signals) -> list[torch.Tensor] | torch.Tensor:
        """Pre-LLM: per sample ``[n_b]`` the deep layer's attention (the global scan's criterion). LLM stage:
        ``[B, N_max]`` the last prompt token's attention (``-inf`` on padding)."""
        if signals.stage == PRE_LLM:
            return cls_scores(self._recorded(signals, GLOBAL), signals.layout.source)
        if ATTENTION not in signals.extras:
            raise RuntimeError("vscan: the LLM stage's attention was not computed")
        return signals.extras[ATTENTION]

    def stage_signals(self, signals: Signals, hooks: Any, hidden: torch.Tensor, layer: int) -> None:
        """The last prompt token's attention at layer ``layer + 1`` on layer ``layer``'s output ``hidden``
        ``[B, N_cur, D]`` (the drop layer's view of its input), RoPE per `rope_at_llm_stage`."""
        from vtprune.adapters.attention_rows import llm_query_attention
        from vtprune.signals import gather_padded

        sess = hooks.state.session
        _, query, valid = hooks._current(sess)
        cos, sin = sess.stage_rope
        rope = (cos, sin) if self.rope_at_llm_stage else (torch.ones_like(cos), torch.zeros_like(sin))
        att = llm_query_attention(hooks.layers[layer + 1], hidden, rope, query, valid)  # [B, N_cur]
        signals.extras = {**signals.extras, ATTENTION: gather_padded(att, signals.layout)}

    # ---- the pre-LLM stage --------------------------------------------------------------------
    @torch.no_grad()
    def select_and_merge(self, scores: list[torch.Tensor], signals: Signals, embeds: torch.Tensor,
                         budget: Any) -> tuple[list[torch.Tensor], torch.Tensor, list[torch.Tensor]]:
        """Scan and merge every tile (Qwen-VL: every image or video) with ``budget`` tokens each.

        ``scores``: per sample ``[n_b]`` the global scan's criterion (`score`, or a wrapper's version of it).
        Returns per sample the sorted kept visual indices, the embeddings ``[B, N, D]`` with the merged
        features in the kept slots that absorbed tokens (``embeds`` itself when none did), and per sample
        the sorted indices of those slots.
        """
        if self._qwen:
            return self._scan_items(scores, signals, embeds, budget)
        return self._scan_tiles(scores, signals, embeds, budget)

    def _scan_tiles(self, scores, signals, embeds, budget):
        """CLIP towers: the scans on each tile's whole patch grid, merged on the projector's outputs."""
        lay = signals.layout
        local = self._recorded(signals, LOCAL)  # [T, P + 1]
        tiles, stride = local.shape
        patches = stride - 1
        grid = math.isqrt(patches)
        if grid * grid != patches:
            raise ConfigError(f"vscan: its window scan needs square patch grids, this tower gives {patches} patches")
        k, _ = image_budget(budget, patches)
        every = [torch.arange(int(p.numel()), device=p.device) for p in lay.positions]
        if k >= patches:  # keep-all, unmerged (the release's visual_token_num == 576)
            return every, embeds, [e[:0] for e in every]
        dev = local.device
        n_local, n_global = split_scans(k, self.global_ratio)
        glob = self._recorded(signals, GLOBAL)[:, 1:].float().reshape(-1).clone()  # [T * P]
        where = []  # per sample: (patch tokens, tile, patch index)
        for b in range(lay.batch_size):
            src = lay.source[b].to(dev)
            patch = (src >= 0) & (src % stride != 0)
            tile = torch.div(src.clamp(min=0), stride, rounding_mode="floor")
            p = (src.clamp(min=0) % stride - 1).clamp(min=0)
            where.append((patch, tile, p))
            glob[(tile * patches + p)[patch]] = scores[b].to(dev).float()[patch]  # a wrapper's scores where present
        picks, n_picked = window_topk(local[:, 1:].float().view(tiles, grid, grid), n_local, self.window_side)
        selected = global_picks(glob.view(tiles, patches), picks.view(tiles, patches), n_global)
        kept_idx, drop_idx = _kept_first(selected, n_picked + n_global)
        rank = torch.full((tiles, patches), -1, dtype=torch.long, device=dev)
        rank.scatter_(1, kept_idx, torch.arange(kept_idx.shape[1], device=dev).expand_as(kept_idx).contiguous())
        merged = count = None
        if self.merge:
            proj = self._recorded(signals, PROJECTED)
            if proj.shape[:2] not in ((tiles, patches), (tiles, stride)):
                raise RuntimeError(f"vscan: the projector produced {tuple(proj.shape[:2])} rows, expected "
                                   f"{(tiles, patches)} for the {tiles} tiles scanned")
            x = proj[:, -patches:].to(dev)  # the patch rows (CLS first under the 'full' strategy)
            merged, count = nearest_merge(x, kept_idx, drop_idx, self.scaling)
        out, kept_all, slots_all = embeds, [], []
        for b, (patch, tile, p) in enumerate(where):
            r = rank[tile, p]
            prunable = lay.prunable[b].to(dev)
            keep = ~prunable | ~patch | (r >= 0)
            kept_all.append(torch.nonzero(keep).flatten().to(lay.positions[b].device))
            if merged is None:
                slots_all.append(kept_all[-1][:0])
                continue
            rc = r.clamp(min=0)
            gets = prunable & patch & (r >= 0) & (count[tile, rc] > 0)
            idx = torch.nonzero(gets).flatten()
            if idx.numel():
                if out is embeds:
                    out = embeds.clone()
                pos = lay.positions[b][idx.to(lay.positions[b].device)].to(out.device)
                out[b, pos] = merged[tile[idx], rc[idx]].to(out.device, out.dtype)
            slots_all.append(idx.to(lay.positions[b].device))
        return kept_all, out, slots_all

    def _scan_items(self, scores, signals, embeds, budget):
        """Qwen-VL: the scans on each image's (video's) merged tokens, merged on the merger outputs."""
        lay = signals.layout
        local = cls_scores(self._recorded(signals, LOCAL), lay.source)
        out, kept_all, slots_all = embeds, [], []
        for b in range(lay.batch_size):
            parts, slots = [], []
            for sp in lay.spans[b]:
                parts.append(sp.fixed)
                cand = sp.candidates
                n = sp.n_candidates
                k, _ = image_budget(budget, n)
                if k >= n:
                    parts.append(cand)
                    continue
                n_local, n_global = split_scans(k, self.global_ratio)
                wid, n_windows = qwen_windows(lay.coords[b][cand].cpu(), self.window_side)
                s = scores[b][cand.to(scores[b].device)]
                picks = capped_window_picks(local[b][cand.to(local[b].device)].to(s.device), wid, n_windows, n_local)
                selected = global_picks(s, picks, n_global)
                kept_idx, drop_idx = _kept_first(selected[None], n_local + n_global)
                kept_idx, drop_idx = kept_idx.to(cand.device), drop_idx.to(cand.device)
                parts.append(cand[kept_idx[0]])
                if not self.merge:
                    continue
                pos = lay.positions[b][cand]
                merged, count = nearest_merge(embeds[b, pos.to(embeds.device)][None], kept_idx.to(embeds.device),
                                              drop_idx.to(embeds.device), self.scaling)
                got = (count[0] > 0).to(cand.device)
                if bool(got.any()):
                    if out is embeds:
                        out = embeds.clone()
                    out[b, pos[kept_idx[0][got]].to(out.device)] = merged[0][got.to(merged.device)].to(out.dtype)
                    slots.append(cand[kept_idx[0][got]])
            dev = lay.positions[b].device
            kept_all.append(torch.sort(torch.cat(parts)).values if parts else torch.zeros(0, dtype=torch.long, device=dev))
            slots_all.append(torch.sort(torch.cat(slots)).values if slots else torch.zeros(0, dtype=torch.long, device=dev))
        return kept_all, out, slots_all
