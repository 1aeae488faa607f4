"""FlowCut: prune by the information flow through the CLS token, in stages inside the vision tower.

Tong et al., "FlowCut: Rethinking Redundancy via Information Flow for Efficient Vision-Language Models"
(NeurIPS 2025). This module holds the model-independent part as pure functions of q/k/v tensors: the
per-layer vision scores, the cumulative score and the entropy-adaptive schedule (`FlowTracker`), and the
LLM-stage score. `vtprune.runtime.flowcut` runs them inside the vision tower and at the LLM layer.

Vision stage, LLaVA family (per tile, ``T`` target patches, CLS kept apart). At every vision layer ``l``
up to the last pruning layer ``L``, while the tile has more than ``T`` live patches, from that layer's
attention inputs (over CLS and the live patches only):

- relay ``r_j``: head-mean attention of the CLS query to patch ``j``, normalised to sum 1 over patches;
- semantic ``e_j``: head-mean softmax (over CLS and the patches) of the *unscaled* ``v_CLS . v_j``, CLS
  column dropped, normalised to sum 1;
- value norm ``nu_j = ||head-mean v_j||_1``;
- score ``s = (r + e) * nu``; cumulative ``C = s`` at the first layer, then ``C <- 0.5 C + 0.5 s``.

Schedule: ``rho = L - l``; prune only when ``rho`` is even: keep the top ``max(N - n, T)`` patches by ``C``
with ``n = round((N - T) / sqrt(rho) * (1 - (H(r) / log N)^2))`` (``N`` live patches, ``H`` the entropy of
``r``); at ``rho = 0`` keep exactly ``T``. So after the last stage exactly ``T`` patches are live.

Vision stage, Qwen-VL (no CLS token; FlowCut-Qwen). The CLS stand-in is the mean query of the image's (or
frame's) live patches: ``a = head-mean softmax(q_mean . k / sqrt(d))``, score ``a * ||head-mean v||_1`` (no
semantic term). Here scores and pruning are per 2x2 merge group (group score = mean of its 4 patches,
group relay = sum of their attention), so whole groups survive and the merger never mixes patches.

LLM stage (LLaVA-NeXT, Qwen-VL), at the pruning layer from its input, with ``q`` the last prompt token:
``rel = head-mean softmax over the image's visual keys of q . k / sqrt(d)``, ``sem = head-mean softmax of
v_q . v_vis / sqrt(d)``, score ``(rel + sem) * ||head-mean v_vis||_1``; the top ``keep`` per image survive.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from vtprune.scorers.base import IN_LLM, PRE_LLM, VISION_CLS_ATTENTION, Scorer, Signals, register

LLM_SCORES = "flowcut_llm_scores"  # Signals.extras key: per sample [n_b] LLM-stage scores (-inf: hidden)


def pruning_layers(last_layer: int) -> list[int]:
    """The vision layers (0-based) after which FlowCut prunes: ``l <= last_layer`` with ``last_layer - l`` even.

    Examples: CLIP ViT-L/14 in LLaVA-1.5 (``last_layer=21``): 1, 3, ..., 21; Qwen2-VL's 32 blocks
    (``last_layer=31``): 1, 3, ..., 31; a 3-layer toy CLIP (``last_layer=0``): 0.
    """
    return [layer for layer in range(last_layer + 1) if (last_layer - layer) % 2 == 0]


def entropy_ratio(relay: torch.Tensor) -> float:
    """``H(p) / log N`` for ``p = relay / relay.sum()``, ``relay`` ``[N]`` non-negative (N >= 2)."""
    p = relay.float() / relay.float().sum().clamp_min(torch.finfo(torch.float32).tiny)
    h = -torch.special.xlogy(p, p).sum()
    return float(h / math.log(relay.numel()))


def keep_count(n_live: int, target: int, rho: int, relay: torch.Tensor) -> int:
    """How many units (patches or merge groups) stay live at a layer ``rho`` layers before the last stage.

    Args:
        n_live: ``N``, units live before this layer's pruning.
        target: ``T``, units live after the last stage.
        rho: last pruning layer minus this layer; FlowCut prunes only when it is even and >= 0.
        relay: ``[N]`` the relay (CLS or mean-query attention) of the live units, any scale.

    Returns:
        ``N`` when nothing is pruned here; ``T`` at ``rho = 0``; else ``max(N - n, T)`` with
        ``n = round((N - T) / sqrt(rho) * (1 - (H(r) / log N)^2))``: flat relays (high entropy) prune little.
    """
    if n_live <= target or rho < 0 or rho % 2:
        return n_live
    if rho == 0:
        return target
    n = round((n_live - target) / math.sqrt(rho) * (1.0 - entropy_ratio(relay) ** 2))
    return max(n_live - n, target)


def _masked_softmax(logits: torch.Tensor, live: torch.Tensor) -> torch.Tensor:
    return torch.softmax(logits.masked_fill(~live, float("-inf")), dim=-1)


def _normalise(x: torch.Tensor) -> torch.Tensor:
    return x / x.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)


@torch.no_grad()
def cls_flow_scores(
    q_cls: torch.Tensor, k: torch.Tensor, v: torch.Tensor, live: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """FlowCut's per-layer patch scores on a CLIP-style layer (token 0 is CLS), computed in float32.

    Args:
        q_cls: ``[R, H, d]`` the CLS query of each of ``R`` tiles.
        k, v: ``[R, H, N, d]`` keys and values of all tokens (CLS first).
        live: ``[R, N]`` bool, tokens the layer attends to (CLS and the live patches).
        scale: the attention scale (``1 / sqrt(d)``).

    Returns:
        ``score [R, N - 1]`` = (relay + semantic) * value norm and ``relay [R, N - 1]`` (the CLS attention,
        normalised over the live patches); both 0 on dead patches.
    """
    q_cls, k, v = q_cls.float(), k.float(), v.float()
    mask = live[:, None, :]
    attn = _masked_softmax(torch.einsum("rhd,rhnd->rhn", q_cls, k) * scale, mask).mean(dim=1)  # [R, N]
    sem = _masked_softmax(torch.einsum("rhd,rhnd->rhn", v[:, :, 0], v), mask).mean(dim=1)  # unscaled
    patches = live[:, 1:]
    relay = _normalise(attn[:, 1:] * patches)
    semantic = _normalise(sem[:, 1:] * patches)
    nu = v.mean(dim=1).abs().sum(dim=-1)[:, 1:]  # ||head-mean v||_1
    return (relay + semantic) * nu * patches, relay


@torch.no_grad()
def mean_query_scores(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, live: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """FlowCut-Qwen's per-layer patch scores for one image or frame (no CLS: the mean live query asks).

    Args:
        q, k: ``[H, n, d]`` queries and keys after the vision RoPE; v: ``[H, n, d]`` values.
        live: ``[n]`` bool, the live patches (the mean query and the softmax run over them only).
        scale: the attention scale (``1 / sqrt(d)``).

    Returns:
        ``score [n]`` = attention * ``||head-mean v||_1`` and ``attn [n]``, the head-mean attention of the
        mean query (sums to 1 over the live patches); both 0 on dead patches.
    """
    q, k, v = q.float(), k.float(), v.float()
    w = live.float()
    q_mean = (q * w[None, :, None]).sum(dim=1) / w.sum().clamp_min(1.0)  # [H, d]
    attn = _masked_softmax(torch.einsum("hd,hnd->hn", q_mean, k) * scale, live[None]).mean(dim=0)
    nu = v.mean(dim=0).abs().sum(dim=-1)
    return attn * nu * w, attn * w


@torch.no_grad()
def llm_flow_scores(
    q: torch.Tensor, k: torch.Tensor, v_q: torch.Tensor, v: torch.Tensor, domain: torch.Tensor, scale: float
) -> torch.Tensor:
    """FlowCut's LLM-stage score of one image's visual tokens, in float32.

    Args:
        q: ``[H, d]`` the query token's query (after RoPE); v_q: ``[H, d]`` its value.
        k, v: ``[H, n, d]`` keys (after RoPE) and values of the image's visual tokens (KV heads repeated).
        domain: ``[n]`` bool, the tokens the softmaxes run over (the ones the layer can see).
        scale: the attention scale (``1 / sqrt(d)``), used for both softmaxes as in FlowCut.

    Returns:
        ``[n]``: (relevance + semantic similarity) * ``||head-mean v||_1``; ``-inf`` outside ``domain``.
    """
    q, k, v_q, v = q.float(), k.float(), v_q.float(), v.float()
    rel = _masked_softmax(torch.einsum("hd,hnd->hn", q, k) * scale, domain[None]).mean(dim=0)
    sem = _masked_softmax(torch.einsum("hd,hnd->hn", v_q, v) * scale, domain[None]).mean(dim=0)
    score = (rel + sem) * v.mean(dim=0).abs().sum(dim=-1)
    return score.masked_fill(~domain, float("-inf"))


class FlowTracker:
    """Cumulative scores and live units of ``R`` rows (tiles, or Qwen frames) through one vision-tower run.

    Args:
        live: ``[R, U]`` bool, the units each row starts with (padding units False).
        targets: ``[R]`` long, ``T`` per row (a row with ``T >= N`` is never scored or pruned).
        last_layer: the last pruning layer ``L`` (0-based vision layer index).
    """

    def __init__(self, live: torch.Tensor, targets: torch.Tensor, last_layer: int) -> None:
        self.live = live.clone()
        self.targets = targets.to(live.device)
        self.last_layer = last_layer
        self.cum: torch.Tensor | None = None

    def active(self) -> torch.Tensor:
        """``[R]`` bool: rows that still hold more than their target."""
        return self.live.sum(dim=1) > self.targets

    def step(self, layer: int, score: torch.Tensor, relay: torch.Tensor) -> None:
        """Fold layer ``layer``'s scores ``[R, U]`` into ``C`` and prune where the schedule says so."""
        act = self.active()
        if not bool(act.any()):
            return
        rows = act[:, None] & self.live
        score = score.float()
        if self.cum is None:
            self.cum = torch.where(rows, score, torch.zeros_like(score))
        else:
            self.cum = torch.where(rows, 0.5 * self.cum + 0.5 * score, self.cum)
        rho = self.last_layer - layer
        if rho < 0 or rho % 2:
            return
        for r in torch.nonzero(act).flatten().tolist():
            idx = torch.nonzero(self.live[r]).flatten()
            k = keep_count(int(idx.numel()), int(self.targets[r]), rho, relay[r, idx])
            if k < idx.numel():
                order = torch.sort(self.cum[r, idx], descending=True, stable=True).indices[:k]
                row = torch.zeros_like(self.live[r])
                row[idx[order]] = True
                self.live[r] = row

    def final_scores(self) -> torch.Tensor:
        """``[R, U]`` float32: ``C`` on live units (0 where never scored), ``-inf`` on pruned ones."""
        cum = self.cum if self.cum is not None else torch.zeros(self.live.shape, device=self.live.device)
        return cum.masked_fill(~self.live, float("-inf"))


@register
class FlowCutScorer(Scorer):
    """FlowCut (Tong et al., NeurIPS 2025): information-flow scores, pruned in stages in the vision tower.

    Where it prunes (the paper's settings; the default layer follows the model, see `bind`):

    - LLaVA-1.5 (transformers' and the original LLaVA codebase's): inside the vision tower only, straight
      to ``keep`` patches per image, handed to the pre-LLM stage (``layer=None``).
    - LLaVA-NeXT: ``ceil(keep / 2)`` patches per crop in the tower, then ``keep`` per image at LLM layer 1.
    - Qwen2-VL / Qwen2.5-VL: ``2 * keep`` merged tokens per image in the tower (whole 2x2 merge groups),
      then ``keep`` at LLM layer 1. Qwen3-VL: the LLM stage runs at the first layer after its deepstack
      layers (``len(deepstack_visual_indexes)``), the earliest vtprune allows there.

    An explicit ``layer=K`` moves the LLM stage (LLaVA-NeXT, Qwen-VL). The last vision pruning layer is the
    one before the layer whose output feeds the projector (CLIP: 21 of 24 in LLaVA-1.5, 0 in a 3-layer toy
    tower), or the last block (Qwen-VL). Pruned patches stay in the tower, hidden from later vision layers
    by masking their key columns (exactly what dropping them gives the kept patches), so the vision tower
    runs at full length: the saving is on the LLM side. See `vtprune.runtime.flowcut`.
    """

    accepts_auto_keep = False  # places a fixed number of tokens itself
    excludes = True  # tokens pruned in the vision tower score -inf
    requires = frozenset({"vision_tower_masking"})
    name = "flowcut"
    description = (
        "FlowCut: cumulative CLS-flow scores pruned in stages inside the vision tower "
        "(pre-LLM on LLaVA-1.5; + LLM layer 1 on LLaVA-NeXT / Qwen-VL)"
    )
    needs = frozenset({VISION_CLS_ATTENTION})
    stages = (PRE_LLM, IN_LLM)
    vision_layer: tuple = ()  # no generic CLS hook: flowcut hooks every vision layer itself

    def __init__(self) -> None:
        self._default_layer: int | None = None

    @property
    def default_layer(self) -> int | None:  # type: ignore[override]
        return self._default_layer

    def bind(self, model: Any, adapter: Any) -> None:
        """LLaVA-1.5 prunes before the LLM (vision stage only); other models add the LLM stage at layer 1."""
        self._default_layer = None if model.config.model_type in ("llava", "llava_llama") else 1

    def score(self, signals: Signals) -> list[torch.Tensor]:
        if signals.stage == IN_LLM:
            scores = signals.extras.get(LLM_SCORES)
            if scores is None:
                raise RuntimeError("flowcut: no LLM-stage scores were computed for this prefill")
            return list(scores)
        return list(signals.require(VISION_CLS_ATTENTION))  # C of the vision-stage survivors, -inf else
