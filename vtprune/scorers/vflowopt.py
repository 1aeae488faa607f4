"""VFlowOpt: visual-information-flow importance from the vision tower, pruned progressively (before the
LLM with weighted recycling, then at two LLM layers), its hyperparameters searched by `vtprune tune`."""

from __future__ import annotations

from typing import Any

import torch

from vtprune.config import ConfigError
from vtprune.perthread import PerThread
from vtprune.scorers.base import PIXEL_VALUES, PRE_LLM, Scorer, Signals, register
from vtprune.scorers.select import image_budget
from vtprune.scorers.staged import depth_scaled, staged_plan

CONTEXT = "vflowopt_context"  # VisionRecord.extras: context rows, CLIP [tiles, patches + 1], Qwen-VL [tokens, 1]
IMPORTANCE = "vflowopt_importance"  # Session.extras: per sample I of the visual tokens the LLM stages see
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def _histogram_entropy(gray: torch.Tensor) -> torch.Tensor:
    """``[n]`` Shannon entropy (bits) of each row's 256-bin histogram; ``gray`` ``[n, L]`` long in 0..255."""
    hist = torch.zeros(gray.shape[0], 256, device=gray.device).scatter_add_(
        1, gray, torch.ones_like(gray, dtype=torch.float32))
    p = hist / hist.sum(dim=1, keepdim=True)
    return -(p * torch.log2(p.clamp(min=1e-12))).sum(dim=1)


def _to_gray(rgb: torch.Tensor, mean, std, channel_dim: int) -> torch.Tensor:
    """De-normalise processor pixels to 0..255 and average the channels (``channel_dim``): uint8 levels, long."""
    shape = [1] * rgb.dim()
    shape[channel_dim] = len(mean)
    m = torch.tensor(mean, dtype=torch.float32, device=rgb.device).view(shape)
    s = torch.tensor(std, dtype=torch.float32, device=rgb.device).view(shape)
    rgb = ((rgb.float() * s + m) * 255).clamp(0, 255)
    return rgb.mean(dim=channel_dim).to(torch.uint8).long()


def patch_entropy(pixels: torch.Tensor, patch: int, mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD) -> torch.Tensor:
    """``[P]`` Shannon entropy (bits) of each patch's 256-bin grayscale histogram, from one normalised tile
    ``[3, H, W]`` de-normalised to 0..255 (the reference reads the normalised values, which wrap)."""
    gray = _to_gray(pixels.cpu(), mean, std, channel_dim=0)  # [H, W]
    g = gray.shape[0] // patch
    cells = gray[: g * patch, : g * patch].reshape(g, patch, g, patch).permute(0, 2, 1, 3).reshape(g * g, -1)
    return _histogram_entropy(cells)


def merged_token_entropy(pixels: torch.Tensor, merge: int, mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD,
                         channels: int = 3) -> torch.Tensor:
    """``[P / merge**2]`` entropy (bits) of each Qwen-VL merged token's grayscale histogram, on the pixels'
    device.

    ``pixels`` ``[P, C * T * p * p]``: the processor's flattened patches (each row channel-major, then the
    temporal patch, then the ``p x p`` pixels), normalised with ``mean`` / ``std``; consecutive groups of
    ``merge**2`` rows are the 2x2 patches of one merged token in raster order (the processor's layout). A
    token's histogram counts all its pixels (its 2x2 patches, both temporal frames: for an image they are
    the same picture twice, which leaves the distribution unchanged).
    """
    n = pixels.shape[0]
    rows = pixels.reshape(n, channels, -1)  # [P, C, T * p * p]
    gray = _to_gray(rows, mean, std, channel_dim=1)  # [P, T * p * p]
    return _histogram_entropy(gray.reshape(n // merge**2, -1))


@register
class VFlowOptScorer(Scorer):
    """VFlowOpt (Yang et al., ICCV 2025, "VFlowOpt: A Token Pruning Framework for LMMs with Visual
    Information Flow-Guided Optimization"; github.com/sihany077/VFlowOpt, written for LLaVA-OneVision's
    SigLIP tower), on CLIP towers (LLaVA-1.5, LLaVA-NeXT) and Qwen2-VL / Qwen2.5-VL / Qwen3-VL.

    - Importance, at vision layer ``vision_layer`` (a ``hidden_states`` index, default the feature layer;
      Qwen-VL: a full-attention block, default the last): ``I_j = c_j + alpha * softmax_j(E)`` with ``c``
      the context relevance (the release's ``siglip_encoder.py``: received attention ``r = mean_i A_i``,
      global tokens ``G = {r > t mean(r)}``, ``c = mean_{i in G} A_i``; `Adapter.vision_context_rows`) and
      ``E`` the grayscale-histogram entropy of each token's pixels (``alpha=0`` in every released config).
    - Qwen-VL, whose towers have no CLS token either (as SigLIP): ``G`` and ``c`` are computed per image
      (or frame) from the patch-level attention map of the full-attention block
      (`vtprune.adapters.attention_rows.vit_global_context`) and averaged over each 2x2 merge group, the
      LLM token; ``E`` is the entropy of the token's 2x2 patches (`merged_token_entropy`), de-normalised with
      ``pixel_mean`` / ``pixel_std`` (default the OpenAI-CLIP values of the LLaVA and Qwen2/2.5-VL
      processors; 0.5 on Qwen3-VL, whose released processors normalise with 0.5). Recycling mixes the merger
      outputs (the LLM input, as VisionZip on Qwen-VL); ``cell`` counts merged tokens; the LLM stages come
      after Qwen3-VL's deepstack layers (``llm_layers >= adapter.min_layer()``). Videos are ranked per frame
      by the context term alone (their pixels are not a signal, so ``alpha`` applies to images).
    - Before the LLM: keep ``vision_ratio`` of each image's tokens (never fewer than ``keep``); the removed
      ones are grouped by grid cell (``cell`` patches a side, per tile) and each cell's I-weighted mean of
      projected features is written into the slot of its most important member, which is kept.
    - The budget holds the recycled tokens (as VisionZip's holds its contextual ones): an image's budget
      ``k`` splits into ``k - cells`` important tokens (the top by I) and one recycled slot per grid cell,
      ``cells`` the number of cells of the image (the release splits it the same way, reserving
      ``int(N / cell**2)`` merged tokens, which can fall short of the cells it then fills, so it may keep a
      few more than its budget). At least one token is important: when ``k <= cells`` the top token is
      kept and the ``k - 1`` slots go to the cells whose removed tokens carry the most importance (sum of
      ``max(I, 0)``, ties to the earlier cell); the removed tokens of the other cells are dropped without
      recycling (``keep=1`` recycles nothing). An image therefore keeps at most ``k`` tokens, its recycled
      ones included, and ``stats().contextual`` counts the recycled ones among the kept (after the LLM
      stages: those that survived them). See docs/methods.md.
    - Inside the LLM: after ``llm_layers`` drop by the same I, keeping ``llm_ratio`` of the tokens present,
      then ``keep`` after the last. Default 0-based 9, 19 on 32-layer LLMs, the same depth fractions
      elsewhere: 8, 17 on 28 layers, the release's LLaVA-OneVision-7B split (its ``illava_llm_k`` 9-18
      drops before layers 9 and 18 of that 28-layer LLM).
    - ``vtprune tune`` searches ``t``, ``cell``, ``vision_ratio``, ``llm_ratio`` and ``alpha`` (the
      release's search space) with the same flow-guided objective as the paper.

    Defaults from the released 25 % configuration (t 34.76, cell 15.58, vision_ratio 0.265, llm_ratio
    0.983). Deviations: the CLS token counts among the queries that may be global; when no token is global
    ``c = r`` (the release takes the mean of no rows, NaN); the tuned search is random search (the
    reference: GP Bayesian optimisation); the entropy reads de-normalised pixels; one recycled slot is
    reserved per grid cell (above). Qwen-VL (no released variant): the patch-level map and 2x2 group mean
    above; on Qwen3-VL the deepstack features of a recycled slot stay its own token's (only the main merger
    output is mixed).

    Debug records of the calling thread's last prefill (`vtprune.perthread.PerThread`: each thread sees
    its own): ``last_importance``, per sample the ``[n_b]`` importance I of its visual tokens (host);
    ``last_recycled``, per sample the sorted visual-token indices of its recycled slots (on the device).
    """

    requires = frozenset({"pre_llm_then_llm"})
    name = "vflowopt"
    description = "VFlowOpt: vision-flow importance, pruned before the LLM with recycling and at two LLM layers"
    stages = (PRE_LLM,)
    last_importance = PerThread(factory=list)
    last_recycled = PerThread(factory=list)

    # 0-based pruned outputs, for 32-layer LLMs; other depths get them scaled (`depth_scaled`). The release's
    # illava_llm_k 9-18 drops before layers 9 and 18 of LLaVA-OneVision-7B's 28 (after 8 and 17): the same
    # depth fractions of 32 layers are 9, 19, which `depth_scaled` maps back to exactly 8, 17 on 28 layers
    PAPER_LLM_LAYERS = (9, 19)

    def __init__(self, t: float = 34.76, cell: float = 15.58, alpha: float = 0.0, vision_ratio: float = 0.265,
                 llm_ratio: float = 0.983, llm_layers: list[int] | tuple[int, ...] | None = None,
                 vision_layer: int | None = None, pixel_mean: list[float] | tuple[float, ...] | None = None,
                 pixel_std: list[float] | tuple[float, ...] | None = None) -> None:
        if not 0 < float(vision_ratio) <= 1 or not 0 < float(llm_ratio) <= 1:
            raise ConfigError(f"vflowopt: vision_ratio={vision_ratio} and llm_ratio={llm_ratio} must be in (0, 1]")
        if float(cell) < 1:
            raise ConfigError(f"vflowopt: cell={cell} must be at least 1 patch")
        self._default_layers = llm_layers is None
        layers = [int(k) for k in (self.PAPER_LLM_LAYERS if llm_layers is None else llm_layers)]
        if layers != sorted(set(layers)):
            raise ConfigError(f"vflowopt: llm_layers={layers} must be distinct and increasing")
        self.t, self.cell, self.alpha = float(t), float(cell), float(alpha)
        self.vision_ratio, self.llm_ratio, self.llm_layers = float(vision_ratio), float(llm_ratio), layers
        self.vision_layer = vision_layer
        if (pixel_mean is None) != (pixel_std is None) or (pixel_mean is not None and len(pixel_mean) != len(pixel_std)):
            raise ConfigError(f"vflowopt: give pixel_mean and pixel_std together, one value per channel "
                              f"(got {pixel_mean!r} and {pixel_std!r})")
        self._norm = None if pixel_mean is None else (tuple(map(float, pixel_mean)), tuple(map(float, pixel_std)))
        self._state: Any = None
        self._patch = 14
        self._qwen_merge: int | None = None  # Qwen-VL: the merge size (one LLM token per merge x merge patches)
        self._pixel_norm = self._norm or (OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)  # the processor's (mean, std)

    def needs_signal(self, name: str) -> bool:
        return name == PIXEL_VALUES and self.alpha != 0.0

    QWEN3_PIXEL_NORM = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))  # Qwen3-VL's released preprocessor_config.json

    def bind(self, model: Any, adapter: Any) -> None:
        # the original LLaVA codebase's config has no vision_config: its CLIP tower's config has the patch size
        vc = getattr(model.config, "vision_config", None) or getattr(adapter.vision_attention(-1), "config", None)
        if vc is not None:
            self._patch = int(vc.patch_size)
        self._qwen_merge = int(vc.spatial_merge_size) if adapter.vision_family == "qwen" else None
        if self._norm is None:
            qwen3 = getattr(model.config, "model_type", None) == "qwen3_vl"
            self._pixel_norm = self.QWEN3_PIXEL_NORM if qwen3 else (OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)
        else:
            self._pixel_norm = self._norm
        if self._default_layers:  # the release's layers at the same depth fractions of this model
            depth = len(adapter.decoder_layers())
            self.llm_layers = depth_scaled(self.name, list(self.PAPER_LLM_LAYERS), depth, adapter.min_layer())

    def llm_stages(self, model: Any, adapter: Any, keep: Any) -> tuple[Any, list[tuple[int, Any]]]:
        n = len(adapter.decoder_layers())
        if self.llm_layers and self.llm_layers[-1] > n - 2:
            raise ConfigError(f"vflowopt: llm_layers={self.llm_layers} need at least {self.llm_layers[-1] + 2} "
                              f"decoder layers, this model has {n}: pass llm_layers=[...] (or [] for pre-LLM only)")
        if not self.llm_layers:
            return keep, []
        ratios = [self.vision_ratio, self.vision_ratio * self.llm_ratio][: len(self.llm_layers)]
        plan = staged_plan([-1, *self.llm_layers], ratios, keep)  # layer -1: the pre-LLM stage
        return plan[0][1], plan[1:]

    def tunable(self, model: Any, adapter: Any) -> dict[str, tuple[Any, Any]]:
        from vtprune.tunable import Param

        return {"t": (Param("float", 0.0, 50.0), self.t), "cell": (Param("float", 3.0, 24.0), self.cell),
                "vision_ratio": (Param("float", 0.25, 0.375), self.vision_ratio),
                "llm_ratio": (Param("float", 0.533, 1.0), self.llm_ratio),
                "alpha": (Param("float", -1.0, 1.0), self.alpha)}

    def model_hooks(self, adapter: Any, state: Any) -> list:
        self._state = state
        layer = self.vision_layer if self.vision_layer is not None else adapter.default_vision_layer()
        module = adapter.vision_attention(layer)

        def hook(mod, args, kwargs):
            extras = state.vision_extras
            if state.enabled and extras is not None:
                extras[CONTEXT] = adapter.vision_context_rows(mod, args, kwargs, self.t)
            return None

        return [module.register_forward_pre_hook(hook, with_kwargs=True)]

    # ---- importance ------------------------------------------------------------------------------
    def _importance(self, signals: Signals) -> list[torch.Tensor]:
        lay = signals.layout
        # the layout's sources run over the call's images, then its videos (Qwen-VL), one record each
        parts = [rec.extras.get(CONTEXT) for rec in (signals.vision_record, signals.video_record) if rec is not None]
        if not parts or any(p is None for p in parts):
            raise RuntimeError("vflowopt: no context relevance was recorded while the images were encoded")
        rows = torch.cat([p.to(parts[0].device) for p in parts], dim=0) if len(parts) > 1 else parts[0]
        if self._qwen_merge is not None and rows.shape[0] != sum(lay.counts()):
            raise RuntimeError(
                f"vflowopt: this prefill holds {sum(lay.counts())} visual tokens but its images and videos "
                f"recorded context relevance for {rows.shape[0]}")
        flat = rows.flatten()
        stride = rows.shape[1]
        entropy = None  # Qwen-VL: per merged token of the call
        if self.alpha != 0.0 and signals.pixel_values is not None and self._qwen_merge is not None:
            entropy = merged_token_entropy(signals.pixel_values, self._qwen_merge, *self._pixel_norm)
        out = []
        for b in range(lay.batch_size):
            src = lay.source[b].to(flat.device)
            imp = torch.where(src >= 0, flat[src.clamp(min=0)], torch.zeros((), device=flat.device))
            if self.alpha != 0.0 and signals.pixel_values is not None:
                for idx in lay.image_slices(b):
                    sources = src[idx.to(src.device)]
                    if entropy is not None:
                        if sources.numel() and int(sources.max()) >= entropy.shape[0]:
                            continue  # a video: its pixels are not a signal, the context term alone ranks it
                        ent = entropy[sources.to(entropy.device)]
                    else:
                        ent = self._tile_entropy(signals.pixel_values, sources, stride)
                    imp[idx.to(imp.device)] += self.alpha * torch.softmax(ent, 0).to(imp.device)
            out.append(imp)
        return out

    def _tile_entropy(self, pixels: torch.Tensor, s: torch.Tensor, stride: int) -> torch.Tensor:
        """``[n]`` (host) the patch entropy of the CLIP tokens with sources ``s`` (0 for CLS / newlines)."""
        patches = s % stride - 1
        tiles = s // stride
        ent = torch.zeros(s.numel())
        for tile in torch.unique(tiles[patches >= 0]).tolist():
            e = patch_entropy(pixels[tile], self._patch, *self._pixel_norm)
            sel = (tiles == tile) & (patches >= 0)
            ent[sel.cpu()] = e[patches[sel].cpu()]
        return ent

    def score(self, signals: Signals) -> list[torch.Tensor]:
        if signals.stage == PRE_LLM:
            scores = self._importance(signals)
            self.last_importance = [s.cpu() for s in scores]
            return scores
        return list(signals.extras[IMPORTANCE + "_current"])

    def stage_signals(self, signals: Signals, hooks: Any, hidden: torch.Tensor, layer: int) -> None:
        sess = hooks.state.session
        imp = sess.extras[IMPORTANCE]
        current = imp if not sess.stage_seqs else [i[k.to(i.device)] for i, k in zip(imp, sess.stage_kept[-1])]
        signals.extras = {**signals.extras, IMPORTANCE + "_current": current}

    # ---- the pre-LLM stage: selection and weighted recycling -----------------------------------
    @torch.no_grad()
    def select_and_merge(self, scores: list[torch.Tensor], signals: Signals, embeds: torch.Tensor,
                         budget: Any) -> tuple[list[torch.Tensor], torch.Tensor, list[torch.Tensor]]:
        """Keep the important tokens and one recycled slot per grid cell, within each image's budget.

        Returns per sample the sorted kept visual indices ``[k_b]``, the embeddings ``[B, N, D]`` with each
        recycled slot holding its cell's I-weighted mean of the removed tokens' features, and per sample the
        sorted visual indices ``[r_b]`` of the recycled slots (among the kept).
        """
        lay = signals.layout
        out = embeds
        kept_all, recycled_all = [], []
        for b in range(lay.batch_size):
            imp = scores[b].float()
            dev = lay.positions[b].device
            parts, recycled = [], []
            for idx in lay.image_slices(b):
                prunable = lay.prunable[b][idx]
                cand = idx[prunable]
                k, _ = image_budget(budget, int(cand.numel()))
                if k >= cand.numel():
                    parts += [cand, idx[~prunable]]
                    continue
                coords = lay.coords[b][cand].cpu()
                cell_id = (coords[:, 0] * 10_000 + (coords[:, 1] / self.cell).floor().long() * 100
                           + (coords[:, 2] / self.cell).floor().long())
                cells = torch.unique(cell_id)
                top = max(1, k - int(cells.numel()))  # important tokens; the rest of the budget recycles
                order = torch.sort(imp[cand.to(imp.device)], descending=True, stable=True).indices.cpu()
                chosen, removed = order[:top], order[top:]
                groups = []  # (removed members, their clamped importance) of each cell that has some
                for c in cells.tolist():
                    members = removed[cell_id[removed] == c]
                    if members.numel():
                        groups.append((members, imp[cand[members].to(imp.device)].clamp(min=0)))
                if len(groups) > k - top:  # fewer slots than cells: the cells losing the most importance
                    mass = torch.stack([w.sum() for _, w in groups]).cpu()
                    pick = torch.sort(mass, descending=True, stable=True).indices[: k - top]
                    groups = [groups[i] for i in sorted(pick.tolist())]
                slots = []
                for members, w in groups:
                    w = w / w.sum() if float(w.sum()) > 0 else torch.full_like(w, 1.0 / w.numel())
                    pos = lay.positions[b][cand[members].to(lay.positions[b].device)].to(out.device)
                    mix = (w.to(out.device, torch.float32)[:, None] * out[b, pos].float()).sum(dim=0)
                    slot = members[int(torch.argmax(w))]
                    if out is embeds:
                        out = embeds.clone()
                    out[b, lay.positions[b][cand[slot]].to(out.device)] = mix.to(out.dtype)
                    slots.append(slot)
                keep = torch.cat([chosen, torch.stack(slots)]) if slots else chosen
                parts += [cand[keep.to(cand.device)], idx[~prunable]]
                if slots:
                    recycled.append(cand[torch.stack(slots).to(cand.device)])
            kept_all.append(torch.sort(torch.cat(parts)).values if parts else torch.zeros(0, dtype=torch.long, device=dev))
            recycled_all.append(torch.sort(torch.cat(recycled)).values if recycled
                                else torch.zeros(0, dtype=torch.long, device=dev))
        self.last_recycled = recycled_all
        # the LLM stages rank the kept tokens by the same importance
        session = self._state.session if self._state is not None else None
        if session is not None:
            session.extras[IMPORTANCE] = [s[k.to(s.device)] for s, k in zip(scores, kept_all)]
        return kept_all, out, recycled_all
