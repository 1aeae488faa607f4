"""Greedy subset selection for the selection-type methods (DivPrune, ZOO's SADS, CDPruner's DPP MAP).

Each of these builds its kept set one token at a time, and the first ``k`` picks never depend on how many
more would follow, so a selection is turned into scores that `select_topk` reproduces exactly: the
``j``-th pick of ``k`` scores ``k - j``, every other token ``-1`` (finite, below every pick). The
budget ``k`` per image comes from `image_budget`, as `select_topk` computes it.

Everything runs on the device of its inputs without host syncs: the budget ``k`` (the loop length) is
known on the host, each pick stays a one-element device tensor (an ``argmax`` result) that indexes and
masks on the device, and picked tokens are tracked in a boolean mask (``masked_fill``, never ``x[mask]``).
Ties go to the earlier token (``torch.argmax`` returns the first maximum).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from vtprune.layout import VisualLayout
from vtprune.scorers.select import image_budget

_NEG_INF = float("-inf")


def order_scores(order: torch.Tensor, n: int) -> torch.Tensor:
    """``[n]`` float32 scores (on ``order``'s device) that rank ``order`` (``[k]`` indices, first pick
    first) on top, in that order."""
    k = int(order.numel())  # a shape: no device read
    s = torch.full((n,), -1.0, device=order.device)
    return s.scatter_(0, order.long(), torch.arange(k, 0, -1, dtype=torch.float32, device=order.device))


def per_image(layout: VisualLayout, keep, pick: Callable[[int, torch.Tensor, int], torch.Tensor]) -> list[torch.Tensor]:
    """Run ``pick(b, idx, k)`` on each image's prunable tokens ``idx`` (``[n_candidates]`` long indices into
    sample ``b``'s visual tokens, on the layout's device) with its budget ``k`` (a host int); ``pick``
    returns positions into ``idx`` in pick order. Per sample ``[n_b]`` float32 scores on the device of the
    picks (the layout's where an image has none); non-prunable tokens score 0 (`select_topk` keeps them
    anyway). Image structure and budgets come from the host-known `VisualLayout.spans`: no device read."""
    out = []
    for b, spans in enumerate(layout.spans):
        n_b = int(layout.positions[b].numel())
        s: torch.Tensor | None = None
        for span in spans:
            k, _ = image_budget(keep, span.n_candidates)
            if k == 0:
                continue
            order = pick(b, span.candidates, k)
            if s is None:
                s = torch.zeros(n_b, device=order.device)
            s.index_copy_(0, span.candidates.to(s.device), order_scores(order.to(s.device), span.n_candidates))
        out.append(s if s is not None else torch.zeros(n_b, device=layout.positions[b].device))
    return out


def minmax(x: torch.Tensor) -> torch.Tensor:
    """``x`` mapped to [0, 1] by its minimum and maximum; all ones when it is constant (on the device)."""
    lo = x.min()
    span = x.max() - lo
    return torch.where(span > 0, (x - lo) / span, torch.ones_like(x))


def cosine_matrix(x: torch.Tensor) -> torch.Tensor:
    """``[..., n, n]`` float32 cosine similarities of the rows of ``x`` ``[..., n, D]``."""
    z = torch.nn.functional.normalize(x.float(), dim=-1)
    return z @ z.transpose(-1, -2)


def _row(m: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
    """Row ``j`` (a one-element device index) of ``m``, without reading ``j`` on the host."""
    return m.index_select(0, j).squeeze(0)


def _empty(device: torch.device) -> torch.Tensor:
    return torch.zeros(0, dtype=torch.long, device=device)


def max_min_diversity(x: torch.Tensor, k: int) -> torch.Tensor:
    """DivPrune's max-min diversity: ``[k]`` row indices of ``x`` ``[n, D]`` in pick order (on ``x``'s device).

    With D = 1 - cos, the first pick has the largest nearest-neighbour distance (the second-smallest entry
    of its column, the smallest being its own 0); each next pick maximises its distance to the nearest
    token picked so far. Ties go to the earlier token.
    """
    n = x.shape[0]
    k = min(k, n)
    if k <= 0:
        return _empty(x.device)
    if n == 1:
        return torch.zeros(1, dtype=torch.long, device=x.device)
    dist = 1.0 - cosine_matrix(x)
    nn_dist = torch.topk(dist, 2, dim=0, largest=False).values[1]  # [n] nearest-neighbour distance
    j = torch.argmax(nn_dist, dim=0, keepdim=True)  # [1], stays on the device
    picks = [j]
    taken = torch.zeros(n, dtype=torch.bool, device=dist.device).index_fill_(0, j, True)
    closest = _row(dist, j).masked_fill(taken, _NEG_INF)
    for _ in range(k - 1):
        j = torch.argmax(closest, dim=0, keepdim=True)
        picks.append(j)
        taken.index_fill_(0, j, True)
        closest = torch.minimum(closest, _row(dist, j)).masked_fill_(taken, _NEG_INF)
    return torch.cat(picks)


def sensitivity_diversity(sensitivity: torch.Tensor, z: torch.Tensor, k: int) -> torch.Tensor:
    """ZOO's SADS: ``[k]`` indices in pick order from sensitivities ``[n]`` (min-max normalised here, in their
    own dtype, as the release does: a float16 sensitivity gives float16 weights) and features ``z`` ``[n, D]``
    (cosines in float32): first the most sensitive token, then repeatedly
    ``argmax_i  S_i * (1 - max_{p picked} cos(z_i, z_p))``. On ``z``'s device."""
    n = z.shape[0]
    k = min(k, n)
    if k <= 0:
        return _empty(z.device)
    s = minmax(sensitivity.to(z.device)).float()
    sim = cosine_matrix(z)
    j = torch.argmax(s, dim=0, keepdim=True)
    picks = [j]
    taken = torch.zeros(n, dtype=torch.bool, device=z.device).index_fill_(0, j, True)
    nearest = _row(sim, j)
    for _ in range(k - 1):
        gain = (s * (1.0 - nearest)).masked_fill_(taken, _NEG_INF)
        j = torch.argmax(gain, dim=0, keepdim=True)
        picks.append(j)
        taken.index_fill_(0, j, True)
        nearest = torch.maximum(nearest, _row(sim, j))
    return torch.cat(picks)


def dpp_map(kernel: torch.Tensor, k: int) -> torch.Tensor:
    """Greedy MAP inference of a DPP with kernel ``L`` ``[n, n]`` (incremental Cholesky, Chen et al. 2018):
    ``[k]`` indices in pick order (on ``kernel``'s device). Each step picks the largest marginal gain
    ``d_j^2`` and updates the others by the new Cholesky row. A batch of kernels ``[B, n, n]`` (the tiles of
    an image) runs in one pass: ``[B, k]``, the same picks as one call per kernel."""
    single = kernel.dim() == 2
    L = (kernel[None] if single else kernel).double()
    b, n, _ = L.shape
    k = min(k, n)
    if k <= 0:
        return _empty(kernel.device) if single else torch.zeros(b, 0, dtype=torch.long, device=kernel.device)
    d2 = torch.diagonal(L, dim1=1, dim2=2).clone()  # [B, n]
    rows = torch.zeros(b, k, n, dtype=L.dtype, device=L.device)
    taken = torch.zeros(b, n, dtype=torch.bool, device=L.device)
    picks = []
    for t in range(k):
        j = torch.argmax(d2, dim=1, keepdim=True)  # [B, 1]
        picks.append(j)
        if t == k - 1:
            break
        taken.scatter_(1, j, True)
        dj = torch.sqrt(torch.clamp(d2.gather(1, j), min=1e-12))  # [B, 1]
        row = L.gather(1, j[:, :, None].expand(b, 1, n)).squeeze(1)  # [B, n]: row j of each kernel
        done = rows[:, :t]  # [B, t, n]
        e = (row - torch.bmm(done.gather(2, j[:, None, :].expand(b, t, 1)).transpose(1, 2), done).squeeze(1)) / dj
        rows[:, t] = e
        d2 = (d2 - e * e).masked_fill_(taken, _NEG_INF)
    out = torch.cat(picks, dim=1)
    return out[0] if single else out
