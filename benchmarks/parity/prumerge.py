"""Parity of vtprune's ``prumerge`` with LLaVA-PruMerge's released code (github.com/42Shawn/LLaVA-PruMerge).

The release prunes and merges inside ``CLIPVisionTower.token_prune_merge_advanced`` (PruMerge) and
``token_prune_merge_advanced_plus`` (PruMerge+, the one its ``forward`` calls), in
``llava/model/multimodal_encoder/clip_encoder.py``: hooks on ``layers[23]``'s ``q_proj`` / ``k_proj``, one
softmax over the concatenated heads, IQR outliers (``outlier_dectection``), each kept token merged with
its 32 nearest tokens by key cosine, plus one extra token. The function is called unbound, with a stand-in
``self``, on the tiny LLaVA-1.5 model's own CLIP tower (24 layers here, so that ``layers[23]`` is the last
layer, as in CLIP ViT-L/14-336; the transformers-4.37 ``vision_model`` attribute the release reaches
through is provided by a view) and the same pixels as vtprune's run. Its kept indices are the ``idx`` it
passes to ``complement_idx`` (recorded by wrapping that module-level function).

Compared per (variant, budget):

- ``jaccard`` / ``kept_equal``: the release's tokens (``idx``, and its extra token at the slot vtprune's
  documented layout gives it: the image's last token not in ``idx``) against vtprune's kept set.
- ``feature_max_abs``: the largest absolute difference of the merged feature rows (before the projector),
  the release's output rows against the rows vtprune projects into the LLM at the same slots.
- ``logit_max_abs``: None: the release feeds its tokens in its own order (outliers by attention, then
  samples, then the extra token), vtprune at their raster positions (a documented deviation), so the
  logits differ by construction; equal rows are the evidence that the LLM receives the same features.

Budgets: PruMerge's count is adaptive; ``keep`` is vtprune's cap. 575 (large enough not to cap: the
image's 576 tokens would be vtprune's keep-all) and the release's own token count (its outliers + the
extra token), the smallest cap that does not cap.

    python benchmarks/parity/prumerge.py --ref /path/to/LLaVA-PruMerge
"""

from __future__ import annotations

import sys
import types
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import env_name, jaccard, load_file, peaked, run_check, tiny_llava_inputs, traced_vtprune_run  # noqa: E402, E501

METHOD = "prumerge"
ENV = env_name(METHOD)
LOGIT_TOLERANCE = 1e-4  # unused: no logits are compared (see the module docstring)
FEATURE_TOLERANCE = 1e-4
UNCAPPED = 575
PROMPT = "USER: <image>\nWhat is in the picture? ASSISTANT:"
RELEASE_FUNCTIONS = {"prumerge": "token_prune_merge_advanced", "prumerge+": "token_prune_merge_advanced_plus"}


class TowerView:
    """The CLIP tower as the release reaches it (transformers 4.37: ``tower.vision_model.encoder.layers``);
    calling it runs the tower itself."""

    def __init__(self, tower: Any) -> None:
        self.vision_model = tower
        self._tower = tower

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._tower(*args, **kwargs)


def load_release(ref: Path) -> types.ModuleType:
    """The release's ``clip_encoder`` module (matplotlib, imported and unused there, stubbed)."""
    return load_file(ref / "llava/model/multimodal_encoder/clip_encoder.py", "prumerge_release_clip_encoder",
                     stubs=["matplotlib", "matplotlib.pyplot"])


def release_merge(module: types.ModuleType, method: str, tower: Any, pixels: Any) -> tuple[list[int], int, Any]:
    """The release's kept indices (``idx``, in its order), its outlier count and its output rows
    ``[len(idx) + 1, C]`` (merged kept tokens, then the extra token) for one image."""
    import torch

    cls = module.CLIPVisionTower
    host = types.SimpleNamespace(vision_tower=TowerView(tower), select_layer=-2, select_feature="patch",
                                 device=pixels.device, dtype=pixels.dtype)
    host.feature_select = lambda outs: cls.feature_select(host, outs)
    seen: dict[str, Any] = {}
    originals = {"complement_idx": module.complement_idx, "outlier_dectection": module.outlier_dectection}

    def recording_idx(idx: Any, dim: int) -> Any:
        seen["idx"] = idx.clone()
        return originals["complement_idx"](idx, dim)

    def recording_outliers(attn: Any) -> float:
        ratio = originals["outlier_dectection"](attn)
        seen["outliers"] = round(ratio * attn.numel())
        return ratio

    module.complement_idx, module.outlier_dectection = recording_idx, recording_outliers
    try:
        with torch.no_grad():
            rows = getattr(cls, RELEASE_FUNCTIONS[method])(host, pixels, if_adaptive=True)
    finally:
        module.complement_idx, module.outlier_dectection = originals.values()
    assert seen["idx"].shape[0] == 1, "one image per call"
    return seen["idx"][0].tolist(), seen["outliers"], rows[0]


def squares_image(seed: int = 0) -> Any:
    """A 336 x 336 PIL image of a few coloured squares on a flat background: its CLS attention has a tail of
    outliers (34 on the tiny tower, about LLaVA-1.5's typical 32) where a noise image has 1-4."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    pixels = np.zeros((336, 336, 3), np.uint8) + rng.integers(0, 256, 3, dtype=np.uint8)
    for _ in range(6):
        y, x = rng.integers(0, 300, 2)
        side = rng.integers(10, 80)
        pixels[y:y + side, x:x + side] = rng.integers(0, 256, 3)
    return Image.fromarray(pixels)


def vtprune_rows(model: Any, inputs: Any, method: str, keep: int) -> tuple[list[int], dict[int, Any]]:
    """vtprune's kept visual indices (sorted) and, per kept index, the feature row (before the projector)
    that the LLM received there (`traced_vtprune_run`)."""
    run = traced_vtprune_run(model, inputs, method, keep=keep)
    return run["kept"], dict(zip(run["kept"], run["inputs"]))


def compare_method(ref: Path, method: str) -> list[dict[str, Any]]:
    from vtprune.toy.tiny import tiny_llava

    module = load_release(ref)
    inputs = tiny_llava_inputs(PROMPT, images=[squares_image()])
    out = []
    for variant in ("random", "peaked"):
        # the release's layers[23]: the last of 24; eager attention, as the release's transformers-4.37 tower
        model = tiny_llava(vision_layers=24, attn_implementation="eager")
        if variant == "peaked":
            peaked(model)
        idx, outliers, release = release_merge(module, method, model.model.vision_tower, inputs["pixel_values"])
        rest = sorted(set(range(576)) - set(idx))
        extra = rest[-1]  # vtprune's slot for the release's extra token (the last token not kept)
        theirs = {i: release[r] for r, i in enumerate(idx)} | {extra: release[-1]}
        for keep in (UNCAPPED, len(theirs)):
            kept, ours = vtprune_rows(model, inputs, method, keep)
            equal = sorted(theirs) == kept
            diff = max(float((ours[i].float() - theirs[i].float()).abs().max()) for i in kept) if equal else None
            out.append({"method": method, "model": "tiny-llava-1.5 (24 vision layers)", "variant": variant,
                        "budget": keep, "jaccard": jaccard(kept, theirs), "kept_equal": equal,
                        "logit_max_abs": None, "feature_max_abs": diff,
                        "release_count": len(idx), "release_outliers": outliers,
                        "note": "adaptive count: keep is a cap above it; the release's extra token is placed at "
                                "vtprune's documented slot (the last token not kept); logits not compared "
                                "(the release orders its tokens by attention, vtprune keeps raster order)"})
    return out


def compare(ref: Path) -> list[dict[str, Any]]:
    return compare_method(ref, METHOD)


def run(method: str, argv: list[str] | None, doc: str) -> int:
    """``main`` of `prumerge` and `prumergeplus`: `run_check` on `compare_method`, passing where the kept sets
    are equal and the merged feature rows within `FEATURE_TOLERANCE`."""
    def summary(rows: list[dict[str, Any]]) -> None:
        for r in rows:
            print(f"  {r['variant']} keep {r['budget']}: release keeps {r['release_count']} + 1, "
                  f"max |merged feature diff| {r['feature_max_abs']}")

    return run_check(method, lambda ref: compare_method(ref, method), argv, doc, summary=summary,
                     passed=lambda r: r["kept_equal"] and r["feature_max_abs"] is not None
                     and r["feature_max_abs"] < FEATURE_TOLERANCE)


def main(argv: list[str] | None = None) -> int:
    return run(METHOD, argv, __doc__ or "")


if __name__ == "__main__":
    sys.exit(main())
