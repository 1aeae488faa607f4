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

CONTEXT = "vflowopt_context"  # VisionRecord.extras: [tiles, patches + 1] context relevance rows
IMPORTANCE = "vflowopt_importance"  # Session.extras: per sample I of the visual tokens the LLM stages see
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@torch.no_grad()
def context_relevance(attn: torch.nn.Module, hidden_in: torch.Tensor, t: float, block: int = 1) -> torch.Tensor:
    """``[T, N]`` float32 context relevance of a CLIP-style attention module's tokens, per tile.

    A = head-mean attention of the tile (N x N, recomputed from q and k); received ``r_j = mean_i A_ij``;
    global tokens ``G = {i : r_i > t mean(r)}`` (all tokens when none qualifies); ``c_j = mean_{i in G} A_ij``.
    """
    tiles, n, _ = hidden_in.shape
    out = torch.empty(tiles, n, dtype=torch.float32, device=hidden_in.device)
    for a in range(0, tiles, block):
        h = hidden_in[a:a + block]
        b = h.shape[0]
        q = attn.q_proj(h).view(b, n, attn.num_heads, attn.head_dim).transpose(1, 2).float()
        k = attn.k_proj(h).view(b, n, attn.num_heads, attn.head_dim).transpose(1, 2).float()
        probs = torch.softmax(q @ k.transpose(-1, -2) * attn.scale, dim=-1).mean(dim=1)  # [b, N, N]
        received = probs.mean(dim=1)  # [b, N]
        for i in range(b):
            g = received[i] > t * received[i].mean()
            rows = probs[i][g] if bool(g.any()) else probs[i]
            out[a + i] = rows.mean(dim=0)
    return out


def patch_entropy(pixels: torch.Tensor, patch: int, mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD) -> torch.Tensor:
    """``[P]`` Shannon entropy (bits) of each patch's 256-bin grayscale histogram, from one normalised tile
    ``[3, H, W]`` de-normalised to 0..255 (the reference reads the normalised values, which wrap)."""
    m = torch.tensor(mean, dtype=torch.float32)[:, None, None]
    s = torch.tensor(std, dtype=torch.float32)[:, None, None]
    rgb = ((pixels.float().cpu() * s + m) * 255).clamp(0, 255)
    gray = rgb.mean(dim=0).to(torch.uint8).long()  # [H, W]
    g = gray.shape[0] // patch
    cells = gray[: g * patch, : g * patch].reshape(g, patch, g, patch).permute(0, 2, 1, 3).reshape(g * g, -1)
    hist = torch.zeros(g * g, 256).scatter_add_(1, cells, torch.ones_like(cells, dtype=torch.float32))
    p = hist / hist.sum(dim=1, keepdim=True)
    return -(p * torch.log2(p.clamp(min=1e-12))).sum(dim=1)


@register
class VFlowOptScorer(Scorer):
    """VFlowOpt (Yang et al., ICCV 2025, "VFlowOpt: A Token Pruning Framework for LMMs with Visual
    Information Flow-Guided Optimization"), adapted to CLIP towers (LLaVA-1.5, LLaVA-NeXT).

    - Importance, at vision layer ``vision_layer`` (a ``hidden_states`` index, default the feature layer):
      ``I_j = c_j + alpha * softmax_j(E)`` with ``c`` the context relevance (`context_relevance`, threshold
      ``t``) and ``E`` the patch entropy (`patch_entropy`; ``alpha=0`` as in every released config).
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
    - Inside the LLM: after ``llm_layers`` (default 0-based 9, 18; the release's LLaVA-OneVision split),
      drop by the same I, keeping ``llm_ratio`` of the tokens present, then ``keep`` after the last.
    - ``vtprune tune`` searches ``t``, ``cell``, ``vision_ratio``, ``llm_ratio`` and ``alpha`` (the
      release's search space) with the same flow-guided objective as the paper.

    Defaults from the released 25 % configuration (t 34.76, cell 15.58, vision_ratio 0.265, llm_ratio
    0.983). Deviations: the CLS token counts among the queries that may be global; the tuned search is
    random search (the reference: GP Bayesian optimisation); Qwen-VL towers are not supported (no full
    attention map of a CLIP-style module to read); one recycled slot is reserved per grid cell (above).

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

    PAPER_LLM_LAYERS = (9, 18)  # 0-based, for 32-layer LLMs; other depths get them scaled (`depth_scaled`)

    def __init__(self, t: float = 34.76, cell: float = 15.58, alpha: float = 0.0, vision_ratio: float = 0.265,
                 llm_ratio: float = 0.983, llm_layers: list[int] | tuple[int, ...] | None = None,
                 vision_layer: int | None = None) -> None:
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
        self._state: Any = None
        self._patch = 14

    def needs_signal(self, name: str) -> bool:
        return name == PIXEL_VALUES and self.alpha != 0.0

    def bind(self, model: Any, adapter: Any) -> None:
        if adapter.vision_family != "clip":
            raise ConfigError("vflowopt reads a CLIP-style vision attention map: LLaVA-family models only")
        vc = getattr(model.config, "vision_config", None)
        if vc is not None:
            self._patch = int(vc.patch_size)
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
                extras[CONTEXT] = context_relevance(mod, args[0] if args else kwargs["hidden_states"], self.t)
            return None

        return [module.register_forward_pre_hook(hook, with_kwargs=True)]

    # ---- importance ------------------------------------------------------------------------------
    def _importance(self, signals: Signals) -> list[torch.Tensor]:
        rec = signals.vision_record
        if rec is None and self._state is not None:
            rec = self._state.vision_record
        rows = rec.extras.get(CONTEXT) if rec is not None else None
        if rows is None:
            raise RuntimeError("vflowopt: no context relevance was recorded while the images were encoded")
        flat = rows.flatten()
        stride = rows.shape[1]
        lay = signals.layout
        out = []
        for b in range(lay.batch_size):
            src = lay.source[b].to(flat.device)
            imp = torch.where(src >= 0, flat[src.clamp(min=0)], torch.zeros((), device=flat.device))
            if self.alpha != 0.0 and signals.pixel_values is not None:
                for idx in lay.image_slices(b):
                    s = src[idx.to(src.device)]
                    patches = s % stride - 1
                    tiles = s // stride
                    ent = torch.zeros(idx.numel())
                    for tile in torch.unique(tiles[patches >= 0]).tolist():
                        e = patch_entropy(signals.pixel_values[tile], self._patch)
                        sel = (tiles == tile) & (patches >= 0)
                        ent[sel.cpu()] = e[patches[sel].cpu()]
                    imp[idx.to(imp.device)] += self.alpha * torch.softmax(ent, 0).to(imp.device)
            out.append(imp)
        return out

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
