"""SparseVLM: text raters chosen once on the input embeddings score the visual tokens at several LLM layers."""

from __future__ import annotations

from typing import Any

import torch

from vtprune.config import ConfigError
from vtprune.perthread import PerThread
from vtprune.scorers.base import IN_LLM, Scorer, Signals, register
from vtprune.scorers.staged import StagedLayers

RATERS = "sparsevlm_raters"  # Session.extras key: per sample the raters' original sequence positions
STAGE_INPUT = "sparsevlm_stage_input"  # Session.extras key: the current pruning layer's input [B, N_cur, D]


def select_raters(visual: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """Rater mask ``[T]`` of the text tokens ``text`` ``[T, D]`` given the visual embeddings ``visual`` ``[V, D]``.

    ``rel_t = mean_v softmax_t(visual_v . text_t)`` (unscaled logits); raters are the text tokens with
    ``rel_t > mean(rel)``; when none qualifies (all equal), every text token rates.
    """
    if text.shape[0] == 0:
        return torch.zeros(0, dtype=torch.bool, device=text.device)
    rel = torch.softmax(visual.float() @ text.float().T, dim=-1).mean(dim=0)
    raters = rel > rel.mean()
    return raters if bool(raters.any()) else torch.ones_like(raters)


def dpc_knn(x: torch.Tensor, clusters: int) -> tuple[torch.Tensor, torch.Tensor]:
    """DPC-kNN clustering of the rows of ``x`` ``[n, d]`` into ``clusters`` groups, as SparseVLM's release
    (``cluster_and_merge`` in llava/model/language_model/utils.py) computes it.

    Distance ``||x_i - x_j|| / sqrt(d)``; density ``rho_i = exp(-mean of the c smallest squared distances of
    row i)`` with ``c = clusters``, its own zero distance among them (so the ``c - 1`` nearest others count,
    divided by ``c``); ``delta_i`` = distance to the nearest denser row (the largest distance of the whole
    matrix for the densest row); centers = the top ``clusters`` by ``rho * delta`` (in that order); every
    row joins its nearest center. Returns ``(centers [c], assignment [n] in [0, c))``.

    Deviation: of two rows with the same density the later one counts as denser; the release adds uniform
    noise of up to 1e-6 to the densities (``torch.rand``), which breaks such ties at random and also reorders
    densities closer than that. Ties are structural, not rare: with 2 clusters a density is that of the
    nearest neighbour alone, so every mutual nearest pair ties, and without a tie-break both rows of the
    densest pair would become centers.
    """
    n, d = x.shape
    c = max(1, min(clusters, n))
    # the direct form: cdist's matmul shortcut leaves ~1e-2 on the diagonal of states of norm ~10
    dist = torch.cdist(x.float(), x.float(), compute_mode="donot_use_mm_for_euclid_dist") / d**0.5
    nearest = torch.topk(dist, c, dim=1, largest=False).values  # [n, c], the row's own 0 first
    rho = torch.exp(-(nearest**2).mean(dim=1))
    later = torch.arange(n, device=x.device)
    later = later[None, :] > later[:, None]  # [i, j]: j comes after i
    denser = (rho[None, :] > rho[:, None]) | ((rho[None, :] == rho[:, None]) & later)  # [i, j]: j is denser than i
    delta = torch.where(denser, dist, torch.full_like(dist, float("inf"))).min(dim=1).values
    delta = torch.where(torch.isfinite(delta), delta, dist.max())
    centers = torch.topk(rho * delta, c).indices
    assign = dist[:, centers].argmin(dim=1)
    assign[centers] = torch.arange(c, device=x.device)
    return centers, assign


@register
class SparseVLMScorer(StagedLayers, Scorer):
    """SparseVLM (Zhang et al., ICML 2025, "SparseVLM: Visual Token Sparsification for Efficient
    Vision-Language Model Inference"), scoring of its v1.5 release.

    - Raters, once per prefill on the LLM input embeddings: the text tokens after the last image whose
      relevance ``mean_v softmax_t(V T^T)`` (unscaled) exceeds the mean (`select_raters`).
    - At each pruning layer l: the head-mean attention of layer l with the raters as query rows and the
      visual tokens still present as columns (recomputed under SDPA, softmax over all keys, causal),
      averaged over the raters; layer l's outputs are pruned.
    - Stages: ``layers`` (default 0-based 2, 6, 15 on 32-layer LLMs, scaled to other depths by `depth_scaled`) keeping ``ratios`` of each image's tokens before the
      last stage (default 300 and 200 of 576, the release's 192-token schedule) and ``keep`` after it.

    - Recycling (``recycle=True``): of each stage's deleted tokens, the top ``recycle_fraction`` (+1) by
      score are clustered on their layer-l states with DPC-kNN (`dpc_knn`, ``n // 10 + 1`` clusters) and
      each cluster's mean becomes a recycled token. Our adaptation: it takes the slot (and the original
      position) of its cluster's center token, which is kept, and the budget counts it: the stage keeps
      the top ``budget - clusters`` by score plus the centers (the release inserts the recycled tokens
      after the kept ones and re-indexes positions).

    Deviations: kept tokens keep their original positions (as in SparseVLM+; v1 re-indexes them); the
    budget is per image. A sample without images (a text-only row of the batch) keeps nothing and recycles
    nothing.

    Debug records of the calling thread's last prefill (`vtprune.perthread.PerThread`: each thread sees
    its own): ``last_raters``, per sample the raters' sequence positions; ``last_recycled``, per stage
    ``{"stage": j, "rows": {sample: (kept indices of the centers, [c, D] cluster means)}}``.
    """

    name = "sparsevlm"
    description = "SparseVLM: text raters' attention at several LLM layers, staged, DPC-kNN recycling"
    stages = (IN_LLM,)
    last_raters = PerThread(factory=list)
    last_recycled = PerThread(factory=list)
    # attention-bias's patches/SparseVLMs.patch, first stage (layer 2) only: its GQA weight file (exp, lambda
    # 2.30e-3 per index), a pad mask (bilinear 24 x 24 resize of the pixel mask >= 0.5) multiplied in
    debias_release = {"trend": "exp:2.30e-3", "pad_theta": 0.5, "pad_mode": "zero",
                      "source": "SparseVLM GQA exponential"}

    PAPER_LAYERS = (2, 6, 15)  # 0-based, for 32-layer LLMs; other depths get them scaled (`depth_scaled`)

    def __init__(self, layers: list[int] | tuple[int, ...] | None = None,
                 ratios: list[float] | tuple[float, ...] = (300 / 576, 200 / 576), recycle: bool = True,
                 recycle_fraction: float = 0.3) -> None:
        if not 0 <= float(recycle_fraction) <= 1:
            raise ConfigError(f"sparsevlm: recycle_fraction={recycle_fraction} must be in [0, 1]")
        self.recycle, self.recycle_fraction = bool(recycle), float(recycle_fraction)
        self.init_stages(layers, ratios)

    def model_hooks(self, adapter: Any, state: Any) -> list:
        layers = adapter.decoder_layers()

        def raters_hook(module, args, kwargs):  # layer 0's input: the LLM input embeddings
            sess = state.session
            if not state.enabled or sess.phase != "prefill" or sess.layout is None:
                return None
            hidden = args[0] if args else kwargs["hidden_states"]
            lay, out = sess.layout, []
            for b in range(lay.batch_size):
                pos = lay.positions[b].to(hidden.device)
                last = int(pos.max()) if pos.numel() else -1
                text = torch.nonzero((torch.arange(sess.seq_len, device=hidden.device) > last)
                                     & sess.prompt_valid()[b].to(hidden.device)).flatten()
                out.append(text[select_raters(hidden[b, pos], hidden[b, text])])
            sess.extras[RATERS] = out
            return None

        def input_hook(module, args, kwargs):  # a pruning layer's input, for its own attention rows
            sess = state.session
            if state.enabled and sess.phase == "prefill" and sess.layout is not None:
                sess.extras[STAGE_INPUT] = args[0] if args else kwargs["hidden_states"]
            return None

        handles = [layers[0].register_forward_pre_hook(raters_hook, with_kwargs=True)]
        handles += [layers[k].register_forward_pre_hook(input_hook, with_kwargs=True) for k in self.layers]
        return handles

    def stage_signals(self, signals: Signals, hooks: Any, hidden: torch.Tensor, layer: int) -> None:
        from vtprune.adapters.attention_rows import llm_rows_attention
        from vtprune.layout import slots_of

        sess = hooks.state.session
        raters = sess.extras[RATERS]
        seq = sess.stage_seqs[-1][0] if sess.stage_seqs else None
        rows = [r if seq is None else slots_of(seq[b:b + 1], r[None].to(seq.device), sess.seq_len)[0]
                for b, r in enumerate(raters)]
        _, _, valid = hooks._current(sess)
        att = llm_rows_attention(hooks.layers[layer], sess.extras[STAGE_INPUT], sess.stage_rope, rows, valid)
        self.last_raters = [r.cpu() for r in raters]
        signals.extras = {**signals.extras, "rater_attention": [att[b, p] for b, p in enumerate(signals.layout.positions)]}

    @torch.no_grad()
    def stage_select(self, scores: list[torch.Tensor], signals: Signals,
                     hidden: torch.Tensor) -> tuple[list[torch.Tensor], dict]:
        """Per sample the kept indices (into the stage's visual tokens) and the recycled rows to write."""
        from vtprune.scorers.select import image_budget, select_topk

        lay = signals.layout
        if signals.stage_index == 0:
            self.last_recycled = []
        if not self.recycle:
            return select_topk(scores, lay, signals.keep), {}
        picked, writes, record = [], {}, {}
        for b in range(lay.batch_size):
            s = scores[b].float()
            parts, slots, vectors = [], [], []
            for idx in lay.image_slices(b):
                prunable = lay.prunable[b][idx]
                cand = idx[prunable]
                k, _ = image_budget(signals.keep, int(cand.numel()))
                order = torch.sort(s[cand.to(s.device)], descending=True, stable=True).indices.cpu()
                pool = int(self.recycle_fraction * (cand.numel() - k)) + 1 if k < cand.numel() else 0
                clusters = min(pool // 10 + 1, k - 1) if pool else 0
                if clusters < 1:
                    parts += [cand[order[:k]], idx[~prunable]]
                    continue
                chosen, deleted = order[: k - clusters], order[k - clusters:]
                recyc = deleted[: min(pool, deleted.numel())]
                states = hidden[b, lay.positions[b][cand[recyc]].to(hidden.device)]
                centers, assign = dpc_knn(states, clusters)
                means = torch.stack([states[assign == c].float().mean(dim=0) for c in range(centers.numel())])
                parts += [cand[chosen], cand[recyc[centers.cpu()]], idx[~prunable]]
                slots.append(cand[recyc[centers.cpu()]])
                vectors.append(means)
            if not parts:  # no image in this sample
                picked.append(torch.zeros(0, dtype=torch.long, device=lay.positions[b].device))
                continue
            picked.append(torch.sort(torch.cat(parts)).values)
            if slots:
                writes[b] = (torch.cat(slots), torch.cat(vectors))
                record[b] = writes[b]
        self.last_recycled.append({"stage": signals.stage_index, "rows": record})
        return picked, writes

    def score(self, signals: Signals) -> list[torch.Tensor]:
        if "rater_attention" not in signals.extras:
            raise RuntimeError("sparsevlm: its stage signals were not computed (it runs only inside the LLM stage)")
        return [a.float() for a in signals.extras["rater_attention"]]
