"""Keep plans: the sequence rows a pruned prefill keeps, built on the device from a `Selection`.

Every size here (row counts, plan width, how many filler slots a row needs, which side the batch is
padded on) is known on the host before any device read: the layout's token counts and the selection's
budgets are host ints. The plans are therefore built with sorts and gathers alone, no host syncs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vtprune.scorers.select import Selection


@dataclass
class KeepPlan:
    """In-LLM: the rows the layers after a pruning point see.

    - ``keep_seq``: ``[B, W]`` long, kept sequence positions; row ``b`` holds ``pad_b`` *filler* slots first
      (dropped tokens, hidden from every other token, so ragged rows line up), then its kept positions
      (text, padding and kept visual tokens) in increasing order.
    - ``filler``: ``[B, W]`` bool, True on filler slots.
    - ``ragged``: whether any row has fillers (host bool: decides whether masks must hide them).
    - ``lengths``: per row its real slots ``W - pad_b`` (host ints).
    """

    keep_seq: torch.Tensor
    filler: torch.Tensor
    ragged: bool
    lengths: list[int]

    @property
    def width(self) -> int:
        return int(self.keep_seq.shape[1])


def kept_sequence_mask(sel: Selection, visual: torch.Tensor) -> torch.Tensor:
    """``[B, N]`` bool: True on every non-visual position and on the kept visual tokens.

    ``visual`` ``[B, N]`` bool marks the visual tokens of the sequence the selection's layout describes.
    """
    bsz, n = visual.shape
    pad = sel.layout.padded
    keep = torch.cat([~visual, visual.new_zeros(bsz, 1)], dim=1)  # column N: the padding slots' target
    keep.scatter_(1, pad.positions.to(visual.device), sel.mask.to(visual.device))
    return keep[:, :n]


def in_llm_plan(sel: Selection, visual: torch.Tensor) -> KeepPlan:
    """The `KeepPlan` of a first in-LLM pruning point from the batch's ``visual`` ``[B, N]`` mask."""
    bsz, n = visual.shape
    keep = kept_sequence_mask(sel, visual)
    counts = [n - v + k for v, k in zip(sel.layout.counts(), sel.counts)]
    width = max(counts)
    pads = [width - c for c in counts]
    dev = visual.device
    pos = torch.arange(n, device=dev).expand(bsz, n)
    if any(pads):
        drop = ~keep
        rank = drop.long().cumsum(1) - 1
        need = torch.tensor(pads)[:, None].to(dev, non_blocking=True)
        filler_key = torch.where(drop & (rank < need), pos, 3 * n)
        key = torch.where(keep, n + pos, filler_key)
    else:
        key = torch.where(keep, pos, n + pos)
    keep_seq = torch.sort(key, dim=1, stable=True).indices[:, :width]
    filler = (torch.arange(width)[None] < torch.tensor(pads)[:, None]).to(dev, non_blocking=True)
    return KeepPlan(keep_seq, filler, any(pads), counts)


@dataclass
class ShortPlan:
    """Pre-LLM: the shortened sequence the LLM sees.

    - ``index``: ``[B, W]`` long, the original positions of its rows (0 in re-padding slots).
    - ``valid``: ``[B, W]`` bool, True on real tokens.
    - ``dropped``: ``[B, N]`` bool, True on the dropped visual tokens.
    - ``ragged``: whether rows were re-padded (host bool); ``side``: ``"left"`` or ``"right"``.
    - ``lengths``: per row its real tokens after shortening (host ints).
    """

    index: torch.Tensor
    valid: torch.Tensor
    dropped: torch.Tensor
    ragged: bool
    side: str
    lengths: list[int]


def pre_llm_plan(sel: Selection, visual: torch.Tensor, valid2d: torch.Tensor, host_valid: torch.Tensor) -> ShortPlan:
    """Shorten every row to its non-dropped tokens (padding slots stay, so positions do not move), re-padded
    on the side the batch is padded on (left when it is unpadded).

    ``visual`` / ``valid2d`` ``[B, N]`` bool on the device; ``host_valid`` the same validity on the host.
    """
    bsz, n = visual.shape
    dropped = visual & ~kept_sequence_mask(sel, visual)
    removed = [v - k for v, k in zip(sel.layout.counts(), sel.counts)]
    rows = [n - r for r in removed]
    width = max(rows)
    side = padding_side(host_valid)
    dev = visual.device
    pos = torch.arange(n, device=dev).expand(bsz, n)
    order = torch.sort(torch.where(dropped, n + pos, pos), dim=1, stable=True).indices[:, :width]
    if width == min(rows):
        index = order
        valid = valid2d.gather(1, index)
    else:
        shift = torch.tensor([width - r if side == "left" else 0 for r in rows])
        src = torch.arange(width)[None] - shift[:, None]
        ok = (src >= 0) & (src < torch.tensor(rows)[:, None])
        ok_d = ok.to(dev, non_blocking=True)
        index = order.gather(1, src.clamp(0, width - 1).to(dev, non_blocking=True)).masked_fill(~ok_d, 0)
        valid = valid2d.gather(1, index) & ok_d
    real = host_valid.sum(1).tolist()
    return ShortPlan(index, valid, dropped, width != min(rows), side, [r - d for r, d in zip(real, removed)])


def padding_side(host_valid: torch.Tensor) -> str:
    """``"right"`` when some row ends in padding and every row starts with a real token, else ``"left"``."""
    if not bool(host_valid[:, -1].all()) and bool(host_valid[:, 0].all()):
        return "right"
    return "left"
