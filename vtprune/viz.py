"""What pruning kept, drawn on the image: kept patches bright, pruned ones dark, or a score heatmap.

    from vtprune import viz
    grid = viz.token_grid(model, processor, image)              # the model's view and its token grid
    st = vtprune.stats(model)                                    # after a pruned forward on that image
    picture = viz.overlay(grid, st.kept[0], scores=st.scores[0])  # a PIL image

A `TokenGrid` says which pixels of the image each visual token covers: LLaVA-1.5 reads a square grid
of patches of the processor's resized and centre-cropped image (CLS dropped); Qwen2-VL / Qwen2.5-VL /
Qwen3-VL read one token per ``merge x merge`` group of patches of the image resized to the
processor's grid, row by row. LLaVA-NeXT's tiled layout (base image + tiles + row newlines) is not
drawn yet: `token_grid` says so.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

# a perceptually ordered ramp (dark blue -> purple -> orange -> yellow) for the score heatmap
_RAMP = np.array([[13, 8, 135], [126, 3, 168], [204, 71, 120], [248, 149, 64], [240, 249, 33]], dtype=np.float32)


@dataclass
class TokenGrid:
    """The model's view of one image and its visual-token grid.

    - ``view``: the image as the model's processor presents it (RGB, ``cols * cell`` x ``rows * cell``).
    - ``rows`` / ``cols``: the token grid; token ``i`` covers row ``i // cols``, column ``i % cols``.
    """

    view: Image.Image
    rows: int
    cols: int

    @property
    def tokens(self) -> int:
        return self.rows * self.cols


def token_grid(model, processor, image: Image.Image) -> TokenGrid:
    """The `TokenGrid` of ``image`` (one image) for ``model`` and its ``processor``.

    Raises ``ValueError`` for a model family whose token layout is not drawn (LLaVA-NeXT) and
    ``TypeError`` for something that is not a PIL image.
    """
    if not isinstance(image, Image.Image):
        raise TypeError(f"token_grid needs a PIL image, got {type(image).__name__}")
    image = image.convert("RGB")
    kind = model.config.model_type
    ip = processor.image_processor
    if kind == "llava":
        px = ip(images=[image], return_tensors="pt")["pixel_values"][0]  # [3, H, W] normalised
        mean = torch.tensor(ip.image_mean).view(3, 1, 1)
        std = torch.tensor(ip.image_std).view(3, 1, 1)
        pixels = ((px.float() * std + mean).clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
        patch = model.config.vision_config.patch_size
        return TokenGrid(Image.fromarray(pixels), px.shape[1] // patch, px.shape[2] // patch)
    if kind.startswith("qwen"):
        thw = ip(images=[image], return_tensors="pt")["image_grid_thw"][0].tolist()
        merge = getattr(ip, "merge_size", 2)
        patch = getattr(ip, "patch_size", 14)
        rows, cols = thw[1] // merge, thw[2] // merge
        cell = patch * merge
        return TokenGrid(image.resize((cols * cell, rows * cell), Image.BICUBIC), rows, cols)
    raise ValueError(
        f"overlays are drawn for LLaVA-1.5 and Qwen-VL images; {kind!r} (e.g. LLaVA-NeXT's tiles and row "
        "newlines) is not supported yet: use vtprune.stats(model).kept to read the kept indices"
    )


def _cells(grid: TokenGrid) -> tuple[int, int]:
    w, h = grid.view.size
    return h // grid.rows, w // grid.cols


def kept_mask(kept: torch.Tensor | list[int], tokens: int) -> np.ndarray:
    """``[tokens]`` bool: True at the ``kept`` visual-token indices (``ValueError`` for one out of range)."""
    idx = torch.as_tensor(kept, dtype=torch.long).flatten().cpu().numpy()
    if idx.size and (idx.min() < 0 or idx.max() >= tokens):
        raise ValueError(f"kept indices must lie in [0, {tokens}) (the image's visual tokens), got "
                         f"{int(idx.min())}..{int(idx.max())}: was the stats' sample a different image?")
    mask = np.zeros(tokens, dtype=bool)
    mask[idx] = True
    return mask


def heat_colours(scores: torch.Tensor | np.ndarray) -> np.ndarray:
    """``[n, 3]`` uint8 colours of ``scores`` [n] by rank-normalised value (``-inf``: black)."""
    s = torch.as_tensor(scores).float().flatten().cpu()
    finite = torch.isfinite(s)
    out = np.zeros((s.numel(), 3), dtype=np.uint8)
    if not bool(finite.any()):
        return out
    vals = s[finite]
    # ranks, not raw values: attention scores are heavy-tailed, a linear scale shows one bright token
    rank = torch.argsort(torch.argsort(vals, stable=True), stable=True).float()
    t = (rank / max(1, vals.numel() - 1)).numpy() * (len(_RAMP) - 1)
    lo = np.floor(t).astype(int).clip(0, len(_RAMP) - 2)
    frac = (t - lo)[:, None]
    out[finite.numpy()] = ((1 - frac) * _RAMP[lo] + frac * _RAMP[lo + 1]).round().astype(np.uint8)
    return out


def overlay(grid: TokenGrid, kept: torch.Tensor | list[int], scores: torch.Tensor | None = None, *,
            heatmap: bool = False, dim: float = 0.25, alpha: float = 0.55) -> Image.Image:
    """The model's view with pruned tokens darkened to ``dim`` of their brightness (kept ones as they are).

    With ``heatmap=True`` each token is tinted by its score's rank among the image's tokens
    (``scores`` ``[tokens]``, needed then; ``alpha`` is the tint's weight), and pruned tokens are
    still darkened, so both what was kept and why can be read. Returns a new RGB image the size of
    ``grid.view``.
    """
    mask = kept_mask(kept, grid.tokens)
    ch, cw = _cells(grid)
    pix = np.asarray(grid.view.convert("RGB"), dtype=np.float32)[: grid.rows * ch, : grid.cols * cw].copy()
    cells = pix.reshape(grid.rows, ch, grid.cols, cw, 3)
    if heatmap:
        if scores is None:
            raise ValueError("heatmap=True needs the scores (vtprune.stats(model).scores[b]); this method gave none")
        if torch.as_tensor(scores).numel() != grid.tokens:
            raise ValueError(f"got {torch.as_tensor(scores).numel()} scores for an image of {grid.tokens} visual tokens")
        tint = heat_colours(scores).astype(np.float32).reshape(grid.rows, 1, grid.cols, 1, 3)
        cells[:] = (1 - alpha) * cells + alpha * tint
    factor = np.where(mask, 1.0, dim).astype(np.float32).reshape(grid.rows, 1, grid.cols, 1, 1)
    cells *= factor
    return Image.fromarray(cells.reshape(pix.shape).clip(0, 255).round().astype(np.uint8))
