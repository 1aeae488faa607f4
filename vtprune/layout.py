"""`VisualLayout`: where the visual tokens of a batch sit, and which image and patch each one is.

A layout is built once per prefill from a host copy of the token kinds (one device-to-host read per
prefill, see `build_layout`): everything whose *size* matters later (tokens per sample, per image,
prunable candidates per image) is then known on the host, so selection and compaction run on the
device with shapes known in advance and no further host syncs.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from functools import cached_property

import torch


@dataclass
class ImageSpan:
    """One image of one sample, in that sample's visual-token indices (known on the host).

    - ``start``, ``length``: the image's tokens are ``start .. start + length - 1``.
    - ``host_candidates``: ``[n_candidates]`` long (CPU), indices of its prunable tokens.
    - ``host_fixed``: ``[length - n_candidates]`` long (CPU), indices of its never-pruned tokens.
    - ``candidates`` / ``fixed``: the same on the layout's device (copied on first use).
    """

    start: int
    length: int
    host_candidates: torch.Tensor
    host_fixed: torch.Tensor
    device: torch.device

    @property
    def n_candidates(self) -> int:
        return int(self.host_candidates.numel())

    @cached_property
    def candidates(self) -> torch.Tensor:
        return self.host_candidates.to(self.device, non_blocking=True)

    @cached_property
    def fixed(self) -> torch.Tensor:
        return self.host_fixed.to(self.device, non_blocking=True)


@dataclass
class VisualLayout:
    """Visual tokens of a batch, per sample (all images of a sample concatenated in sequence order).

    For sample ``b`` with ``n_b`` visual tokens:

    - ``positions[b]``: ``[n_b]`` long, sequence positions of the visual tokens (sorted).
    - ``image[b]``: ``[n_b]`` long, index of the image (within the sample) each token belongs to.
    - ``prunable[b]``: ``[n_b]`` bool; False for tokens that are never pruned (LLaVA-NeXT image newlines).
    - ``source[b]``: ``[n_b]`` long, ``tile * patches_per_tile + patch`` inside the vision encoder's
      output of that image (-1 for tokens the encoder did not produce, e.g. newlines). Maps
      encoder-side scores (CLS attention) onto tokens.
    - ``coords[b]``: ``[n_b, 3]`` long, ``(segment, row, col)``: segment 0 is the base image grid,
      segment 1 LLaVA-NeXT's high-resolution grid; used by spatial baselines.
    - ``seq_len``: ``N``, the padded sequence length.
    - ``host_image`` / ``host_prunable``: the same as ``image`` / ``prunable`` on the CPU when the builder
      had them there (`build_layout`); a layout built from device tensors alone (later stages of staged
      pruning) copies them on first use (one host read).

    The per-image spans (`spans`) and the padded batch views (`padded`) derive from these, once.
    """

    positions: list[torch.Tensor]
    image: list[torch.Tensor]
    prunable: list[torch.Tensor]
    source: list[torch.Tensor]
    coords: list[torch.Tensor]
    seq_len: int
    host_image: list[torch.Tensor] | None = field(default=None, repr=False)
    host_prunable: list[torch.Tensor] | None = field(default=None, repr=False)

    @property
    def batch_size(self) -> int:
        return len(self.positions)

    @property
    def device(self) -> torch.device:
        return self.positions[0].device if self.positions else torch.device("cpu")

    def counts(self) -> list[int]:
        """Visual tokens per sample (host ints; no device read)."""
        return [int(p.numel()) for p in self.positions]

    # ---- host-known per-image structure -------------------------------------------------------
    @cached_property
    def spans(self) -> list[list[ImageSpan]]:
        """Per sample, per image, its `ImageSpan` (built once from the host copies)."""
        images = self.host_image if self.host_image is not None else [t.cpu() for t in self.image]
        prunable = self.host_prunable if self.host_prunable is not None else [t.cpu() for t in self.prunable]
        out = []
        for b, (img, pr) in enumerate(zip(images, prunable)):
            dev = self.positions[b].device
            spans = []
            n = int(img.numel())
            if n:
                bounds = torch.nonzero(img[1:] != img[:-1]).flatten() + 1  # host tensors: no device read
                starts = [0, *bounds.tolist()]
                idx = torch.arange(n)
                for s, e in zip(starts, [*starts[1:], n]):
                    p = pr[s:e]
                    spans.append(ImageSpan(s, e - s, idx[s:e][p], idx[s:e][~p], dev))
            out.append(spans)
        return out

    def all_candidates(self) -> VisualLayout:
        """The same tokens with every one of them prunable (no never-pruned tokens): the layout a scorer that
        ranks the never-pruned tokens inside the budget (`Scorer.ranks_fixed`) scores and selects on. Its
        spans hold every token of an image as candidates, so a budget counts them too. ``self`` when it
        has no never-pruned token (no device read: the host copies decide)."""
        host = self.host_prunable if self.host_prunable is not None else [t.cpu() for t in self.prunable]
        if all(bool(h.all()) for h in host):
            return self
        return replace(self, prunable=[torch.ones_like(p) for p in self.prunable],
                       host_prunable=[torch.ones_like(h) for h in host])

    def image_slices(self, b: int) -> list[torch.Tensor]:
        """Per image of sample ``b``: the indices (into the sample's visual tokens) of its tokens."""
        dev = self.positions[b].device
        return [torch.arange(s.start, s.start + s.length, device=dev) for s in self.spans[b]]

    def images_per_sample(self) -> list[int]:
        return [len(s) for s in self.spans]

    def kept_per_image(self, b: int, kept: torch.Tensor) -> list[int]:
        """Per image of sample ``b``: how many of its tokens ``kept`` (indices into the visual tokens) holds."""
        n = len(self.spans[b])
        if n == 0:
            return []
        img = self.host_image[b] if self.host_image is not None else self.image[b].cpu()
        return torch.bincount(img[kept.cpu()], minlength=n).tolist()

    @cached_property
    def padded(self) -> PaddedLayout:
        """The batch's visual tokens as padded ``[B, N_max]`` tensors (see `PaddedLayout`)."""
        return PaddedLayout.of(self)


@dataclass
class PaddedLayout:
    """Padded batch views of a `VisualLayout`, for batched selection (device tensors, host shapes).

    - ``width``: ``N_max``, the most visual tokens of any sample (host int).
    - ``positions``: ``[B, N_max]`` long, sequence positions; padding slots hold ``seq_len`` (one past the end).
    - ``valid``: ``[B, N_max]`` bool, False on padding slots.
    - ``candidates``: ``[I, P_max]`` long, per image of the batch (samples in order, images in order) the
      flat indices ``b * N_max + i`` of its prunable tokens, padded with ``B * N_max`` (a dummy slot).
    - ``candidate_valid``: ``[I, P_max]`` bool.
    - ``n_candidates``: per image, its number of prunable tokens (host ints); ``image_sample``: its sample.
    - ``fixed``: ``[F]`` long, flat indices of every never-pruned visual token.
    - ``source``: ``[B, N_max]`` long, `VisualLayout.source` padded with -1.
    """

    width: int
    positions: torch.Tensor
    valid: torch.Tensor
    candidates: torch.Tensor
    candidate_valid: torch.Tensor
    n_candidates: list[int]
    image_sample: list[int]
    fixed: torch.Tensor
    source: torch.Tensor

    @staticmethod
    def of(lay: VisualLayout) -> PaddedLayout:
        counts = lay.counts()
        bsz = lay.batch_size
        width = max(counts, default=0)
        dev = lay.device
        flat = [(b, s) for b, spans in enumerate(lay.spans) for s in spans]
        p_max = max((s.n_candidates for _, s in flat), default=0)
        cand = torch.full((len(flat), max(p_max, 1)), bsz * width, dtype=torch.long)
        cand_valid = torch.zeros(len(flat), max(p_max, 1), dtype=torch.bool)
        for i, (b, s) in enumerate(flat):
            cand[i, : s.n_candidates] = s.host_candidates + b * width
            cand_valid[i, : s.n_candidates] = True
        fixed = torch.cat([s.host_fixed + b * width for b, s in flat]) if flat else torch.zeros(0, dtype=torch.long)
        if bsz and all(c == width for c in counts):
            positions = torch.stack(lay.positions)
            source = torch.stack(lay.source)
            valid = torch.ones(bsz, width, dtype=torch.bool, device=dev)
        else:
            positions = torch.full((bsz, width), lay.seq_len, dtype=torch.long, device=dev)
            source = torch.full((bsz, width), -1, dtype=torch.long, device=dev)
            for b, (p, src) in enumerate(zip(lay.positions, lay.source)):
                positions[b, : p.numel()] = p
                source[b, : src.numel()] = src
            valid = (torch.arange(width)[None] < torch.tensor(counts)[:, None]).to(dev, non_blocking=True)
        return PaddedLayout(width, positions, valid, cand.to(dev, non_blocking=True),
                            cand_valid.to(dev, non_blocking=True), [s.n_candidates for _, s in flat],
                            [b for b, _ in flat], fixed.to(dev, non_blocking=True), source)


def last_true(mask: torch.Tensor) -> torch.Tensor:
    """``[B, N]`` bool -> ``[B]`` index of the last True per row (the last prompt token)."""
    n = mask.shape[1]
    idx = torch.arange(n, device=mask.device).expand_as(mask)
    return torch.where(mask, idx, torch.full_like(idx, -1)).max(dim=1).values.clamp(min=0)


def slots_of(keep_seq: torch.Tensor, positions: torch.Tensor, n: int) -> torch.Tensor:
    """Where original sequence ``positions`` ``[B, ...]`` sit in a compacted row ``keep_seq`` ``[B, N']``."""
    inv = torch.full((keep_seq.shape[0], n), -1, dtype=torch.long, device=keep_seq.device)
    inv.scatter_(1, keep_seq, torch.arange(keep_seq.shape[1], device=keep_seq.device).expand_as(keep_seq))
    return inv.gather(1, positions.to(keep_seq.device))
