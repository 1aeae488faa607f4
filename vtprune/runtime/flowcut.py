"""FlowCut's model side: staged pruning inside the vision tower, and the LLM stage at layer K.

`vtprune.scorers.flowcut` computes the scores and the schedule; this module feeds it from the model and
applies its decisions without changing any sequence length inside the vision tower:

- Hiding instead of dropping. A pruned patch stays in the tower, but every later vision layer masks its
  key column. In a bidirectional ViT this gives every live token exactly the states it would have had the
  patch been dropped (the pruned rows still compute, and are never used). So the vision tower runs at full
  length (FlowCut's ViT speed-up is not realised); the saving is on the LLM side.
- CLIP towers (LLaVA-1.5 / NeXT, and the original LLaVA codebase, whose ``CLIPVisionTower`` wraps the same
  ``CLIPVisionModel``: `clip_transformer`): a forward pre-hook on each layer's attention recomputes, from
  that layer's input, the CLS query row, the keys and the values (no attention map is built), updates the
  schedule, and passes the ``attention_mask`` that hides the pruned patches (on transformers 4.37, the
  repository's pin, expanded to the ``[R, 1, N, N]`` its ``CLIPAttention`` checks for).
- Qwen-VL towers split attention by ``cu_seqlens`` and pass ``attention_mask=None`` themselves, so the mask
  enters through the attention-function registry instead: each vision attention module gets a stand-in
  config whose ``_attn_implementation`` names `masked_vision_attention`, which adds the key mask of the
  chunk at hand and calls the model's own implementation (sdpa or eager). ``remove()`` restores the
  original config. Scores use the vision RoPE; frames (images, video frames) are scored and pruned apart;
  Qwen2.5-VL's window order is the tower's order, mapped back to raster order with the recorded scores.
- The result: the tower's run records per patch the cumulative score ``C`` of the survivors and ``-inf``
  for pruned patches, as the encoder-side scores (`VisionRecord.cls_attention`, the
  ``vision_cls_attention`` signal), in the adapter's usual layout (CLIP ``[tiles, patches + 1]``, CLS
  ``+inf``; Qwen-VL one row per merged token after the adapter's group mean).

Pre-LLM (LLaVA-1.5, transformers' or the repository's): the vision stage prunes each image to ``keep`` and
the pre-LLM stage keeps exactly its survivors; the LLM runs on the shortened sequence, as if the tower had
dropped the others.

In-LLM (LLaVA-NeXT, Qwen-VL): the vision stage prunes to an intermediate target (NeXT: ``ceil(keep / 2)``
patches per crop, or ``ceil(2 * keep * 576)`` of a crop's 576 for a fractional keep; Qwen-VL: ``2 * keep``
merge groups per image, ``ceil(2 * keep / frames)`` per frame of a video). Then:

- decoder layers ``0..K``, pre-hooks: the vision-pruned tokens' key columns are masked at prefill and at
  every decode step, so the survivors see exactly what they would see had the vision stage dropped the
  others (positions stay the original ones, 3-D on Qwen-VL, as in FlowCut-Qwen);
- layer ``K``, pre-hook: FlowCut's LLM score from the layer input (query: the last prompt token; the
  softmaxes run over the image's visible visual tokens), ``-inf`` for the vision-pruned ones, passed to the
  scorer as ``Signals.extras[LLM_SCORES]``; the usual in-LLM stage then keeps ``keep`` per image and drops
  the rest after layer ``K``.

Deviations from the reference code, on purpose: every image (tile, frame) is scheduled on its own (the
reference uses the batch maximum of the prune count, and FlowCut-Qwen one mean query over all images of
the call); Qwen-VL scores and prunes whole 2x2 merge groups (the reference prunes single patches and lets
the merger regroup unrelated ones); LLaVA-NeXT keeps original positions (the reference re-indexes them
contiguously after layer 1) and its image-newline tokens are never pruned. A crop's survivors inside the
padding that LLaVA-NeXT's unpadding removes are lost, so an image can end with fewer than ``keep`` tokens
when its crops are mostly padding.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import math
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from vtprune.adapters.attention_rows import _head_norm, _rotate_half
from vtprune.adapters.base import transformers_version
from vtprune.config import ConfigError
from vtprune.perthread import PerThread
from vtprune.runtime.llm_stages import MASK_4D, llm_implementation
from vtprune.runtime.stages import MethodStage, register_stage
from vtprune.scorers.base import IN_LLM, Scorer
from vtprune.scorers.compose import host_of
from vtprune.scorers.flowcut import (
    LLM_SCORES,
    FlowCutScorer,
    FlowTracker,
    cls_flow_scores,
    llm_flow_scores,
    mean_query_scores,
)
from vtprune.scorers.select import image_budget
from vtprune.signals import cls_scores
from vtprune.state import cache_of

if TYPE_CHECKING:
    from vtprune.adapters.base import Adapter
    from vtprune.state import PruneState

FLOWCUT_ATTENTION = "vtprune_flowcut_vision"  # registered attention function name (Qwen vision towers)
IMAGES = "flowcut_images"  # Session.extras: the prefill's image inputs
HIDDEN = "flowcut_hidden"  # Session.extras: [B, N] bool, the vision-pruned visual tokens
CANDIDATES = "flowcut_candidates"  # Session.extras: per sample [n_b] bool, vision-stage survivors
ANY_HIDDEN = "flowcut_any_hidden"  # Session.extras: host bool, whether the vision stage hid any token


# model types of LLaVA-1.5 (transformers' and the original LLaVA codebase's): one crop per image, pruned in
# the vision tower only, straight to ``keep`` patches (FlowCut's LLaVA-1.5 setting)
VISION_ONLY = ("llava", "llava_llama")

ENSEMBLE_ERROR = ("flowcut prunes inside the vision tower, so it cannot be an ensemble member; use it alone or "
                  "under wrappers (e.g. 'sink+flowcut')")


def flowcut_host(scorer: Scorer) -> FlowCutScorer | None:
    """The FlowCut host under any wrappers (``sink+flowcut``), or None for every other scorer.

    Raises `ConfigError` for an ensemble with a FlowCut member: FlowCut hides tokens inside the vision
    tower, which an ensemble of scores cannot undo.
    """
    return host_of(scorer, FlowCutScorer, ENSEMBLE_ERROR)


@register_stage(FlowCutScorer)
class FlowCutStage(MethodStage):
    """FlowCut's runtime work: its stages inside the vision tower and, where it prunes in the LLM too,
    the layers up to K hiding the tower-pruned tokens (`flowcut_hooks`)."""

    ensemble_error = ENSEMBLE_ERROR

    def hooks(self, adapter: Adapter, state: PruneState) -> list:
        return flowcut_hooks(adapter, state)


def flowcut_hooks(adapter: Adapter, state: PruneState) -> list:
    """Every hook FlowCut needs when the scorer is FlowCut (possibly wrapped); no hook otherwise."""
    if flowcut_host(state.scorer) is None:  # called through FlowCutStage: only for FlowCut setups
        return []
    model = adapter.model
    if model.config.model_type in VISION_ONLY and state.stage == IN_LLM:
        raise ConfigError(
            "flowcut prunes LLaVA-1.5 inside the vision tower only (the paper's setting): leave layer=None"
        )
    impl = vision_implementation(adapter)
    if "flash" in impl:
        raise ConfigError(
            f"flowcut hides pruned patches from later vision layers with an attention mask, which "
            f"{impl} cannot take: load the model with attn_implementation='sdpa' (or 'eager')"
        )
    if state.stage == IN_LLM and state.attention_contract != MASK_4D:
        raise ConfigError(
            f"flowcut's LLM stage hides the tower-pruned tokens from layers <= K with a 4-D attention mask, which "
            f"{llm_implementation(adapter.decoder_layers())} does not take: load the language model with attn_implementation='sdpa' (or 'eager')"
        )
    tower = QwenVisionStage(adapter, state) if adapter.vision_family == "qwen" else ClipVisionStage(adapter, state)
    handles = tower.install()
    if state.stage == IN_LLM:
        handles += LLMStage(adapter, state).install()
    return handles


def vision_implementation(adapter: Adapter) -> str:
    """The attention implementation of the vision tower: its config's (transformers' models), else that of
    its attention modules (the LLaVA repository, whose config has no ``vision_config``)."""
    vc = getattr(adapter.model.config, "vision_config", None)
    if vc is None:
        vc = adapter.vision_attention(-1).config
    return vc._attn_implementation or "eager"


def _hook(module: nn.Module, fn, pre: bool = True):
    if pre:
        return module.register_forward_pre_hook(fn, with_kwargs=True)
    return module.register_forward_hook(fn, with_kwargs=True)


def _hide(mask: torch.Tensor | None, dead: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A key mask ``[R, 1, 1|Q, N]`` hiding ``dead`` ``[R, N]`` columns, merged into ``mask`` if given."""
    if mask is None:
        bias = torch.zeros(dead.shape, dtype=dtype, device=dead.device)
        return bias.masked_fill(dead, torch.finfo(dtype).min)[:, None, None, :]
    cols = dead[:, None, None, :].to(mask.device)
    if mask.dtype == torch.bool:
        return mask & ~cols
    return mask.masked_fill(cols, torch.finfo(mask.dtype).min)


# ---- vision stage: CLIP towers (LLaVA-1.5, LLaVA-NeXT) ---------------------------------------------
def last_clip_layer(feature_layer: int | list[int], depth: int) -> int:
    """The last FlowCut pruning layer of a ``depth``-layer CLIP tower feeding ``hidden_states[feature_layer]``.

    It is the layer before the one whose output the projector reads, so that exactly the target patches
    enter the feature layer: LLaVA-1.5 (24 layers, ``-2``) gives 21, a 3-layer toy tower gives 0. For a
    list of feature layers the earliest one counts.
    """
    layers = [feature_layer] if isinstance(feature_layer, int) else list(feature_layer)
    first = min(x + depth + 1 if x < 0 else x for x in layers)  # hidden_states index; layer first-1 feeds it
    last = first - 2
    if last < 0:
        raise ConfigError(
            f"flowcut needs at least one vision layer before the feature layer (vision_feature_layer="
            f"{feature_layer} of a {depth}-layer tower)"
        )
    return last


def clip_transformer(adapter: Adapter) -> nn.Module:
    """The CLIP vision transformer FlowCut hooks (its forward takes the pixels, its ``encoder.layers`` are the
    vision layers): the adapter's ``vision_encoder()`` where it names one (the LLaVA repository, whose
    ``CLIPVisionTower`` wraps transformers' ``CLIPVisionModel``), else the core's ``vision_tower``."""
    named = getattr(adapter, "vision_encoder", None)
    return named() if named is not None else adapter.core().vision_tower


class ClipVisionStage:
    """Hooks on a CLIP tower: schedule the patches of every tile, hide the pruned ones from later layers.

    One object serves every call of the patched model; the running tower call's `FlowTracker` is per-thread
    (`vtprune.perthread`), so two threads encoding at once each schedule their own patches.
    """

    tracker = PerThread()  # FlowTracker | None: the tower call running in this thread

    def __init__(self, adapter: Adapter, state: PruneState) -> None:
        self.adapter, self.state = adapter, state
        model = adapter.model
        self.tower = clip_transformer(adapter)
        self.layers = self.tower.encoder.layers
        vc = self.tower.config
        self.patches = (vc.image_size // vc.patch_size) ** 2
        feature = getattr(model.config, "vision_feature_layer", None)
        if feature is None:  # the LLaVA repository: its tower's mm_vision_select_layer
            feature = adapter.default_vision_layer()
        self.last = last_clip_layer(feature, len(self.layers))
        self.per_crop = model.config.model_type not in VISION_ONLY  # LLaVA-NeXT: half the budget per crop
        # transformers 4.x's CLIPAttention takes only a full [R, 1, Q, K] attention_mask (it checks the size)
        self.full_mask = transformers_version()[0] < 5

    def install(self) -> list:
        handles = [_hook(self.tower, self._start), _hook(self.tower, self._finish, pre=False)]
        for i, layer in enumerate(self.layers):
            handles.append(_hook(layer.self_attn, self._layer_hook(i)))
        return handles

    def target(self) -> int:
        """Patches each tile keeps in the tower."""
        keep, p = self.state.config.keep, self.patches
        if not self.per_crop:
            return image_budget(keep, p)[0]
        if isinstance(keep, float):
            return min(p, math.ceil(2 * keep * p))
        return min(p, math.ceil(keep / 2))

    def _start(self, module, args, kwargs):
        self.tracker = None
        if self.state.enabled:
            pixels = args[0] if args else kwargs["pixel_values"]
            tiles = pixels.shape[0]
            live = torch.ones(tiles, self.patches, dtype=torch.bool, device=pixels.device)
            targets = torch.full((tiles,), self.target(), dtype=torch.long)
            self.tracker = FlowTracker(live, targets, self.last)
        return None

    def _layer_hook(self, index: int):
        def hook(module, args, kwargs):
            tracker = self.tracker
            if tracker is None:
                return None
            hidden = args[0] if args else kwargs["hidden_states"]  # [R, P + 1, C], after layer_norm1
            live = torch.cat([torch.ones_like(tracker.live[:, :1]), tracker.live], dim=1)  # CLS stays
            changed = not bool(live.all())
            if changed:
                mask = _hide(kwargs.get("attention_mask"), ~live, hidden.dtype)
                kwargs["attention_mask"] = mask.expand(-1, -1, hidden.shape[1], -1) if self.full_mask else mask
            if index <= self.last and bool(tracker.active().any()):
                r, n, _ = hidden.shape
                h, d = module.num_heads, module.head_dim
                with torch.no_grad():
                    q = module.q_proj(hidden[:, 0]).view(r, h, d)
                    k = module.k_proj(hidden).view(r, n, h, d).transpose(1, 2)
                    v = module.v_proj(hidden).view(r, n, h, d).transpose(1, 2)
                score, relay = cls_flow_scores(q, k, v, live, module.scale)
                tracker.step(index, score, relay)
            return (args, kwargs) if changed else None

        return hook

    def _finish(self, module, args, kwargs, output):
        tracker, self.tracker = self.tracker, None
        if tracker is not None:
            scores = tracker.final_scores()
            cls = torch.full_like(scores[:, :1], float("inf"))  # CLS, a visual token only with "full" features
            self.state.cls_accumulator = torch.cat([cls, scores], dim=1)  # [tiles, P + 1], recorded as is
        return None


# ---- vision stage: Qwen-VL towers -------------------------------------------------------------------
class _Run:
    """One Qwen tower run: frames as tracker rows, and the patch mask the attention function applies."""

    def __init__(self, tracker: FlowTracker, starts: list[int], groups: list[int], n_patches: int) -> None:
        self.tracker = tracker
        self.starts, self.groups = starts, groups  # per frame: first patch, merge groups
        self.n_patches = n_patches
        self.mask_rows: torch.Tensor | None = None  # [S] bool live patches of the block running, or None
        self.offset = 0  # patches consumed by the attention calls of the block running

    def live_patches(self) -> torch.Tensor:
        """``[S]`` bool over the tower's patch order (4 consecutive patches per merge group)."""
        out = torch.zeros(self.n_patches, dtype=torch.bool, device=self.tracker.live.device)
        for r, (a, g) in enumerate(zip(self.starts, self.groups)):
            out[a:a + 4 * g] = self.tracker.live[r, :g].repeat_interleave(4)
        return out


class _AttentionConfig:
    """Stands in for a Qwen vision attention module's config: the same fields, but its attention runs
    through `masked_vision_attention`, which finds the model's own implementation in ``vt_base``."""

    def __init__(self, config: Any, stage: QwenVisionStage, base) -> None:
        object.__setattr__(self, "vt_config", config)
        object.__setattr__(self, "vt_stage", stage)
        object.__setattr__(self, "vt_base", base)

    @property
    def _attn_implementation(self) -> str:
        return FLOWCUT_ATTENTION

    def __getattr__(self, name: str) -> Any:
        return getattr(object.__getattribute__(self, "vt_config"), name)


class _ConfigSwap:
    """Give ``module`` a stand-in config; ``remove()`` restores the original."""

    def __init__(self, module: nn.Module, config: Any) -> None:
        self.module, self.original, self.config = module, module.config, config
        module.config = config

    def remove(self) -> None:
        if self.module.config is self.config:
            self.module.config = self.original


def masked_vision_attention(module, query, key, value, attention_mask, **kwargs):
    """Registered attention function of FlowCut's Qwen vision attention modules.

    Called once per ``cu_seqlens`` chunk with ``query/key/value`` ``[1, H, n, d]``, in sequence order; adds
    a key mask hiding the chunk's pruned patches, then runs the model's own implementation.
    """
    cfg = module.config
    run = cfg.vt_stage.run
    if run is not None and run.mask_rows is not None:
        n = key.shape[2]
        rows = run.mask_rows[run.offset:run.offset + n]
        run.offset += n
        if not bool(rows.all()):
            attention_mask = _hide(attention_mask, ~rows[None].to(query.device), query.dtype)
    return cfg.vt_base(module, query, key, value, attention_mask, **kwargs)


def _register_attention() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(FLOWCUT_ATTENTION, masked_vision_attention)


class QwenVisionStage:
    """Hooks on a Qwen-VL tower: schedule whole merge groups per frame, hide the pruned ones.

    The running tower call's `_Run` (its tracker, and the patch mask and offset the attention function
    reads) is per-thread, as `ClipVisionStage.tracker`.
    """

    run = PerThread()  # _Run | None: the tower call running in this thread

    def __init__(self, adapter: Adapter, state: PruneState) -> None:
        self.adapter, self.state = adapter, state
        self.visual = adapter.core().visual
        self.blocks = self.visual.blocks
        self.last = len(self.blocks) - 1  # FlowCut-Qwen: rho = last block - l
        self.merge = adapter._merge() ** 2

    def install(self) -> list:
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        _register_attention()
        handles = []
        try:
            for i, block in enumerate(self.blocks):
                attn = block.attn
                impl = attn.config._attn_implementation or "eager"
                eager = importlib.import_module(type(attn).__module__).eager_attention_forward
                base = ALL_ATTENTION_FUNCTIONS.get_interface(impl, eager)  # the model's own implementation
                handles.append(_ConfigSwap(attn, _AttentionConfig(attn.config, self, base)))
                handles.append(_hook(attn, self._block_hook(i)))
            handles += [_hook(self.visual, self._start), _hook(self.visual, self._finish, pre=False)]
        except Exception:
            for h in reversed(handles):
                h.remove()
            raise
        return handles

    def _start(self, module, args, kwargs):
        self.run = None
        if not self.state.enabled:
            return None
        grid = kwargs.get("grid_thw", args[1] if len(args) > 1 else None)
        keep = self.state.config.keep
        starts, groups, targets, offset = [], [], [], 0
        for t, h, w in grid.tolist():
            g = h * w // self.merge
            item_target = image_budget(keep, t * g)[0]
            for _ in range(t):
                starts.append(offset)
                groups.append(g)
                targets.append(min(g, math.ceil(2 * item_target / t)))
                offset += h * w
        device = (args[0] if args else kwargs["hidden_states"]).device
        live = torch.arange(max(groups), device=device)[None] < torch.tensor(groups, device=device)[:, None]
        tracker = FlowTracker(live, torch.tensor(targets), self.last)
        self.run = _Run(tracker, starts, groups, offset)
        return None

    def _block_hook(self, index: int):
        def hook(module, args, kwargs):
            run = self.run
            if run is None:
                return None
            run.offset = 0
            live = run.live_patches()
            run.mask_rows = None if bool(live.all()) else live  # what this block's attention hides
            tracker = run.tracker
            if index <= self.last and bool(tracker.active().any()):
                hidden = args[0] if args else kwargs["hidden_states"]  # [S, C], after norm1
                self._step(module, hidden, kwargs["position_embeddings"], live, index)
            return None

        return hook

    @torch.no_grad()
    def _step(self, attn: nn.Module, hidden: torch.Tensor, rope, live: torch.Tensor, index: int) -> None:
        run, m = self.run, self.merge
        tracker = run.tracker
        s = hidden.shape[0]
        q, k, v = attn.qkv(hidden).reshape(s, 3, attn.num_heads, -1).float().unbind(1)  # [S, H, d]
        cos, sin = (x.float()[:, None, :] for x in rope)
        q = (q * cos + _rotate_half(q) * sin).transpose(0, 1)  # [H, S, d]
        k = (k * cos + _rotate_half(k) * sin).transpose(0, 1)
        v = v.transpose(0, 1)
        score = torch.zeros(tracker.live.shape, device=tracker.live.device)
        relay = torch.zeros_like(score)
        for r in torch.nonzero(tracker.active()).flatten().tolist():
            a, g = run.starts[r], run.groups[r]
            seg = slice(a, a + m * g)
            patch_score, attn_p = mean_query_scores(q[:, seg], k[:, seg], v[:, seg], live[seg], attn.scaling)
            score[r, :g] = patch_score.view(g, m).mean(dim=1)
            relay[r, :g] = attn_p.view(g, m).sum(dim=1)
        tracker.step(index, score, relay)

    def _finish(self, module, args, kwargs, output):
        run, self.run = self.run, None
        if run is None:
            return None
        final = run.tracker.final_scores()
        out = torch.empty(run.n_patches, device=final.device)
        for r, (a, g) in enumerate(zip(run.starts, run.groups)):
            out[a:a + self.merge * g] = final[r, :g].repeat_interleave(self.merge)
        self.state.cls_accumulator = out  # [S] in the tower's order; the adapter pools groups, maps to raster
        return None


# ---- LLM stage (in-LLM: LLaVA-NeXT, Qwen-VL) --------------------------------------------------------
class LLMStage:
    """Decoder-layer hooks: hide the vision-pruned tokens in layers ``0..K``; score at layer ``K``."""

    def __init__(self, adapter: Adapter, state: PruneState) -> None:
        self.adapter, self.state = adapter, state
        self.layers = adapter.decoder_layers()
        self.k = state.layer
        self.signature = inspect.signature(adapter.core().forward)

    def install(self) -> list:
        handles = [_hook(self.adapter.core(), self._capture)]
        for i in range(self.k + 1):
            handles.append(_hook(self.layers[i], self._layer_hook(i)))
        return handles

    def _capture(self, module, args, kwargs):
        sess = self.state.session
        if self.state.enabled and sess.phase == "prefill" and sess.layout is not None:
            if args:
                kwargs = dict(self.signature.bind_partial(*args, **kwargs).arguments)
                kwargs.update(kwargs.pop("kwargs", {}) or {})
            sess.extras[IMAGES] = self.adapter.image_inputs(self.state, kwargs)
        return None

    def _records(self, images: Any) -> Any:
        """``images`` with the records of encoders that ran inside this forward filled in."""
        state = self.state
        fill = {}
        if getattr(images, "record", None) is None and getattr(images, "pixel_values", None) is not None:
            fill["record"] = state.vision_record
        if getattr(images, "video_record", "absent") is None and images.pixel_values_videos is not None:
            fill["video_record"] = state.video_record
        return dataclasses.replace(images, **fill) if fill else images

    def hidden_tokens(self) -> torch.Tensor:
        """``[B, N]`` bool, the visual tokens the vision stage pruned (computed once per prefill)."""
        sess = self.state.session
        if HIDDEN not in sess.extras:
            lay = sess.layout
            images = self._records(sess.extras.get(IMAGES))
            per_token = cls_scores(self.adapter.vision_scores(images), lay.source)
            hidden = torch.zeros(len(lay.positions), lay.seq_len, dtype=torch.bool, device=lay.positions[0].device)
            cands = []
            for b, s in enumerate(per_token):
                cand = (s > float("-inf")).to(hidden.device) | ~lay.prunable[b]
                hidden[b, lay.positions[b][~cand]] = True
                cands.append(cand)
            sess.extras[HIDDEN], sess.extras[CANDIDATES] = hidden, cands
            sess.extras[ANY_HIDDEN] = bool(hidden.any())  # read once at prefill; decode steps use the flag
        return sess.extras[HIDDEN]

    def _layer_hook(self, index: int):
        def hook(module, args, kwargs):
            sess = self.state.session
            if sess.layout is None or sess.phase not in ("prefill", "decode") or not self.state.enabled:
                return None
            if sess.phase == "decode" and HIDDEN not in sess.extras:
                return None
            hidden = self.hidden_tokens()
            x = args[0] if args else kwargs["hidden_states"]
            if sess.phase == "prefill" and index == self.k:
                sess.extras[LLM_SCORES] = self._scores(module, x, kwargs["position_embeddings"])
            if not sess.extras[ANY_HIDDEN]:
                return None
            kwargs["attention_mask"] = self._mask(kwargs, hidden, x, index)
            return args, kwargs

        return hook

    def _mask(self, kwargs: dict, hidden: torch.Tensor, x: torch.Tensor, index: int) -> torch.Tensor:
        """The 4D mask of a layer ``<= K`` with the hidden columns masked (prefill or decode step)."""
        sess = self.state.session
        mask = kwargs.get("attention_mask")
        q_len = x.shape[1]
        if sess.phase == "prefill":
            kv_len = sess.seq_len
        elif mask is not None:
            kv_len = mask.shape[-1]
        else:
            kv_len = cache_of(kwargs).layers[index].get_seq_length() + q_len
        key = (sess.phase, id(mask), q_len, kv_len)
        cache = sess.extras.setdefault("flowcut_masks", {})
        if key not in cache:
            cols = torch.zeros(hidden.shape[0], kv_len, dtype=torch.bool, device=hidden.device)
            cols[:, :hidden.shape[1]] = hidden
            if mask is None:  # sdpa without padding: causal over the last q_len positions
                qpos = torch.arange(kv_len - q_len, kv_len, device=x.device)
                causal = torch.arange(kv_len, device=x.device)[None] <= qpos[:, None]
                mask_in = torch.zeros(q_len, kv_len, dtype=x.dtype, device=x.device)
                mask_in = mask_in.masked_fill(~causal, torch.finfo(x.dtype).min)[None, None]
                mask_in = mask_in.expand(hidden.shape[0], 1, q_len, kv_len)
            else:
                mask_in = mask.expand(hidden.shape[0], *mask.shape[1:])
            out = _hide(mask_in, cols, x.dtype).clone()
            if sess.phase == "prefill":  # a hidden token still attends to itself (its row stays finite)
                diag = torch.diag_embed(hidden)[:, None]
                out = out.masked_fill(diag, True if out.dtype == torch.bool else 0.0)
            cache.clear()  # one entry per call
            cache[key] = (mask, out)
        return cache[key][1]

    @torch.no_grad()
    def _scores(self, layer: nn.Module, hidden_in: torch.Tensor, rope) -> list[torch.Tensor]:
        """Per sample ``[n_b]`` FlowCut LLM-stage scores at this layer (``-inf`` on vision-pruned tokens)."""
        sess = self.state.session
        lay = sess.layout
        cands = sess.extras[CANDIDATES]
        attn = layer.self_attn
        hd = attn.head_dim
        x = layer.input_layernorm(hidden_in)
        bsz = x.shape[0]
        cos, sin = (c.expand(bsz, -1, -1) for c in rope)
        out = []
        for b in range(bsz):
            vis = lay.positions[b].to(x.device)
            if vis.numel() == 0:  # a sample without images (a text-only row of the batch)
                out.append(torch.zeros(0, device=x.device))
                continue
            qp = int(sess.query_pos[b])
            q = _head_norm(attn, "q_norm", attn.q_proj(x[b, qp]).view(-1, hd))  # [H, d]
            k = _head_norm(attn, "k_norm", attn.k_proj(x[b, vis]).view(vis.numel(), -1, hd))  # [n, Hkv, d]
            v = attn.v_proj(x[b, torch.cat([vis.new_tensor([qp]), vis])]).view(vis.numel() + 1, -1, hd)
            q = q * cos[b, qp] + _rotate_half(q) * sin[b, qp]
            k = k * cos[b, vis][:, None] + _rotate_half(k) * sin[b, vis][:, None]
            groups = q.shape[0] // k.shape[1]
            k = k.repeat_interleave(groups, dim=1).transpose(0, 1)  # [H, n, d]
            v = v.repeat_interleave(groups, dim=1).transpose(0, 1)  # [H, n + 1, d]
            cand = cands[b].to(x.device)
            scores = torch.full((vis.numel(),), float("-inf"), device=x.device)
            for idx in lay.image_slices(b):
                idx = idx.to(x.device)
                scores[idx] = llm_flow_scores(q, k[:, idx], v[:, 0], v[:, 1:][:, idx], cand[idx], attn.scaling)
            out.append(scores)
        return out
