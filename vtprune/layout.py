"""`VisualLayout`: where the visual tokens of a batch sit, and which image and patch each one is."""

from __future__ import annotations

from dataclasses import dataclass

import torch


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
    """

    positions: list[torch.Tensor]
    image: list[torch.Tensor]
    prunable: list[torch.Tensor]
    source: list[torch.Tensor]
    coords: list[torch.Tensor]
    seq_len: int

    @property
    def batch_size(self) -> int:
        return len(self.positions)

    def counts(self) -> list[int]:
        return [int(p.numel()) for p in self.positions]

    def kept_per_image(self, b: int, kept: torch.Tensor) -> list[int]:
        """Per image of sample ``b``: how many of its tokens ``kept`` (indices into the visual tokens) holds."""
        n = len(self.image_slices(b))
        if n == 0:
            return []
        return torch.bincount(self.image[b][kept.to(self.image[b].device)], minlength=n).tolist()

    def image_slices(self, b: int) -> list[torch.Tensor]:
        """Per image of sample ``b``: the indices (into the sample's visual tokens) of its tokens."""
        img = self.image[b]
        if img.numel() == 0:
            return []
        return [torch.nonzero(img == i).flatten() for i in range(int(img.max()) + 1)]
