"""Greedy subset selection for the selection-type methods (DivPrune, ZOO's SADS, CDPruner's DPP MAP).

Each of these builds its kept set one token at a time, and the first ``k`` picks never depend on how many
more would follow, so a selection is turned into scores that `select_topk` reproduces exactly: the
``j``-th pick of ``k`` scores ``k - j``, every other token ``-1`` (finite, below every pick). The
budget ``k`` per image comes from `image_budget`, as `select_topk` computes it.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from vtprune.layout import VisualLayout
from vtprune.scorers.select import image_budget


def order_scores(order: torch.Tensor, n: int) -> torch.Tensor:
    """``[n]`` float32 scores that rank ``order`` (``[k]`` indices, first pick first) on top, in that order."""
    s = torch.full((n,), -1.0)
    k = int(order.numel())
    s[order.cpu()] = torch.arange(k, 0, -1, dtype=torch.float32)
    return s


def per_image(layout: VisualLayout, keep, pick: Callable[[int, torch.Tensor, int], torch.Tensor]) -> list[torch.Tensor]:
    """Run ``pick(b, idx, k)`` on each image's prunable tokens ``idx`` (indices into sample ``b``'s visual
    tokens) with its budget ``k``; ``pick`` returns positions into ``idx`` in pick order. Per sample ``[n_b]``
    scores (non-prunable tokens score 0: `select_topk` keeps them anyway)."""
    out = []
    for b in range(layout.batch_size):
        s = torch.zeros(int(layout.positions[b].numel()))
        for idx in layout.image_slices(b):
            idx = idx[layout.prunable[b][idx].cpu()]
            k, _ = image_budget(keep, int(idx.numel()))
            if k == 0:
                continue
            order = pick(b, idx, k).cpu()
            s[idx] = order_scores(order, int(idx.numel()))
        out.append(s)
    return out


def minmax(x: torch.Tensor) -> torch.Tensor:
    """``x`` mapped to [0, 1] by its minimum and maximum; all ones when it is constant."""
    span = x.max() - x.min()
    return (x - x.min()) / span if float(span) > 0 else torch.ones_like(x)


def cosine_matrix(x: torch.Tensor) -> torch.Tensor:
    """``[n, n]`` float32 cosine similarities of the rows of ``x`` ``[n, D]``."""
    z = torch.nn.functional.normalize(x.float(), dim=-1)
    return z @ z.T


def max_min_diversity(x: torch.Tensor, k: int) -> torch.Tensor:
    """DivPrune's max-min diversity: ``[k]`` row indices of ``x`` ``[n, D]`` in pick order.

    With D = 1 - cos, the first pick has the largest nearest-neighbour distance (the second-smallest entry
    of its column, the smallest being its own 0); each next pick maximises its distance to the nearest
    token picked so far. Ties go to the earlier token.
    """
    n = x.shape[0]
    k = min(k, n)
    dist = 1.0 - cosine_matrix(x)
    if n == 1:
        return torch.zeros(1, dtype=torch.long)
    nn_dist = torch.topk(dist, 2, dim=0, largest=False).values[1]  # [n] nearest-neighbour distance
    first = int(torch.argmax(nn_dist))
    picks = [first]
    closest = dist[first].clone()
    closest[first] = float("-inf")
    for _ in range(k - 1):
        j = int(torch.argmax(closest))
        picks.append(j)
        closest = torch.minimum(closest, dist[j])
        closest[picks] = float("-inf")
    return torch.tensor(picks, dtype=torch.long, device=x.device)


def sensitivity_diversity(sensitivity: torch.Tensor, z: torch.Tensor, k: int) -> torch.Tensor:
    """ZOO's SADS: ``[k]`` indices in pick order from sensitivities ``[n]`` (min-max normalised here) and
    features ``z`` ``[n, D]``: first the most sensitive token, then repeatedly
    ``argmax_i  S_i * (1 - max_{p picked} cos(z_i, z_p))``."""
    n = z.shape[0]
    k = min(k, n)
    s = minmax(sensitivity.float())
    sim = cosine_matrix(z)
    first = int(torch.argmax(s))
    picks = [first]
    nearest = sim[first].clone()
    for _ in range(k - 1):
        gain = s * (1.0 - nearest)
        gain[picks] = float("-inf")
        j = int(torch.argmax(gain))
        picks.append(j)
        nearest = torch.maximum(nearest, sim[j])
    return torch.tensor(picks, dtype=torch.long, device=z.device)


def dpp_map(kernel: torch.Tensor, k: int) -> torch.Tensor:
    """Greedy MAP inference of a DPP with kernel ``L`` ``[n, n]`` (incremental Cholesky, Chen et al. 2018):
    ``[k]`` indices in pick order. Each step picks the largest marginal gain ``d_j^2`` and updates the
    others by the new Cholesky row."""
    n = kernel.shape[0]
    k = min(k, n)
    L = kernel.double()
    d2 = torch.diagonal(L).clone()
    rows = torch.zeros(k, n, dtype=L.dtype, device=L.device)
    picks: list[int] = []
    for t in range(k):
        j = int(torch.argmax(d2))
        picks.append(j)
        if t == k - 1:
            break
        dj = torch.sqrt(torch.clamp(d2[j], min=1e-12))
        e = (L[j] - rows[:t, j] @ rows[:t]) / dj
        rows[t] = e
        d2 = d2 - e * e
        d2[picks] = float("-inf")
    return torch.tensor(picks, dtype=torch.long, device=kernel.device)
