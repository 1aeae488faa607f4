"""Parity of vtprune's ``visionzip`` on LLaVA-NeXT with VisionZip's released code
(github.com/dvlab-research/VisionZip, read at 3151f6d): the visual rows its LLM receives and the first-token
logits.

The release's LLaVA-NeXT path (``visionzip/llava_arch.py``): ``encode_images_visionzip_multi`` runs
``CLIPVisionTower_VisionZip.forward`` on the batch of all the image's tiles (the base tile and every crop, each
its whole 24 x 24 grid): per tile CLS + ``dominant - 1`` patches by CLS attention and ``contextual`` merged
tokens, projected. ``prepare_inputs_labels_for_multimodal_visionzip`` then sends the base tile's rows as they
come (CLS, dominant patches, contextual tokens) and, through ``restore_image_features_sorted``, every crop's
dominant patches in the raster order of the padded crop grid (no unpadding, no newline), every crop's CLS,
every crop's contextual tokens. vtprune's default (``budget_per="tile"``) sends that sequence
(`vtprune.scorers.visionzip.plan_visionzip_tiles`).

What runs: those two functions and ``restore_image_features_sorted``, unbound, on a stand-in ``self`` around the
tiny random-weight ``LlavaNextForConditionalGeneration`` of ``vtprune.toy.tiny`` (eager attention: its tower
returns attention maps), with the release's tower forward and its patched feature layer (`visionzip.TowerView`,
as on LLaVA-1.5). The LLaVA repository's ``get_anyres_image_grid_shape`` (which the release imports, not part of
VisionZip) is given as transformers' (width and height swapped to the LLaVA repository's order), so both sides
tile the image the same way. Input: 630 x 672 noise images (a 2 x 2 anyres grid with padding bands; 5 tiles),
seeds 0-1, variants ``random`` and ``peaked``; the release's settings 64 / 128 / 192 per tile (54 + 10,
108 + 20, 162 + 30).

Rows: ``sequence_max_abs`` (the release's visual rows, ``5 x budget`` of them, against the visual rows vtprune's
LLM receives, row by row), ``rows_equal`` (the same count) and ``logit_max_abs`` (first-token logits of the same
language model on the release's rows spliced into the prompt, contiguous positions, against vtprune's run).
``kept_equal`` (and ``jaccard`` 1.0) where the rows are equal in count and each within `ROW_TOLERANCE`: the
LLM input is what is compared, since the kept slots only fix positions (contiguous after the shortening). A
last row per variant records ``budget_per="image"`` (vtprune's per-image rule: other rows, not comparable
row by row; not asserted).

    python benchmarks/parity/visionzip_next.py --ref /path/to/VisionZip
"""

from __future__ import annotations

import sys
import types
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    env_name,
    image_span,
    logits_on_visual_rows,
    peaked,
    run_check,
    single_threaded,
    tiny_next_inputs,
    traced_vtprune_run,
    vtprune_run,
)
from visionzip import SETTINGS, TowerView, load_release  # noqa: E402

METHOD = "visionzip-next"
PRESET = "visionzip"
ENV = env_name(METHOD)
LOGIT_TOLERANCE = 1e-4
ROW_TOLERANCE = 1e-4
SEEDS = (0, 1)
PROMPT = "USER: <image>\nWhat is in the picture? ASSISTANT:"
IMAGES = ((630, 672),)  # height, width: a 2 x 2 anyres grid with a padding band at the top and bottom


def grid_shape(model: Any) -> Any:
    """The LLaVA repository's ``get_anyres_image_grid_shape`` (``(width, height)`` in, ``(cols, rows)`` out) from
    transformers' (``(height, width)`` in, ``(rows, cols)`` out) on ``model``'s pinpoints."""
    from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape

    def shape(image_size: Any, grid_pinpoints: Any, patch_size: int) -> tuple[int, int]:
        w, h = image_size
        rows, cols = get_anyres_image_grid_shape([h, w], model.config.image_grid_pinpoints, patch_size)
        return cols, rows

    return shape


def release_rows(modules: dict[str, types.ModuleType], model: Any, inputs: Any, start: int, n: int,
                 budget: int) -> Any:
    """The release's visual rows for one prompt (``[L, D]``): its ``prepare_inputs_labels_for_multimodal_visionzip``
    output between the text before and after the image."""
    import torch

    arch = modules["llava_arch"]
    dominant, contextual = SETTINGS[budget]
    view = TowerView(model.model.vision_tower, modules["utils"], dominant, contextual)
    pixels = inputs["pixel_values"]
    tower = types.SimpleNamespace(vision_tower=view, device=pixels.device, dtype=pixels.dtype,
                                  config=model.config.vision_config)
    tower.forward = lambda images: modules["clip_encoder"].CLIPVisionTower_VisionZip.forward(tower, images)
    core = types.SimpleNamespace(get_vision_tower=lambda: tower, mm_projector=model.model.multi_modal_projector,
                                 embed_tokens=model.get_input_embeddings())
    config = types.SimpleNamespace(mm_patch_merge_type="spatial_unpad", image_aspect_ratio="anyres",
                                   image_grid_pinpoints=[list(p) for p in model.config.image_grid_pinpoints])
    me = types.SimpleNamespace(get_vision_tower=lambda: tower, get_model=lambda: core, config=config,
                               device=model.device, model=types.SimpleNamespace(image_newline=model.model.image_newline))
    me.encode_images_visionzip_multi = types.MethodType(arch.encode_images_visionzip_multi, me)
    me.restore_image_features_sorted = types.MethodType(arch.restore_image_features_sorted, me)
    ids = inputs["input_ids"]
    release_ids = torch.cat([ids[:, :start], torch.full((1, 1), -200, dtype=ids.dtype), ids[:, start + n:]], dim=1)
    h, w = (int(x) for x in inputs["image_sizes"][0])
    saved = arch.get_anyres_image_grid_shape
    arch.get_anyres_image_grid_shape = grid_shape(model)
    try:
        with torch.no_grad():
            out = arch.prepare_inputs_labels_for_multimodal_visionzip(
                me, release_ids, None, None, None, None, pixels, image_sizes=[(w, h)])
    finally:
        arch.get_anyres_image_grid_shape = saved
    embeds = out[4][0]
    after = ids.shape[1] - start - n
    return embeds[start:embeds.shape[0] - after]


@single_threaded
def compare(ref: Path) -> list[dict[str, Any]]:
    from vtprune.toy.tiny import tiny_llava_next

    modules = load_release(ref)
    rows: list[dict[str, Any]] = []
    for variant in ("random", "peaked"):
        model = tiny_llava_next(attn_implementation="eager")
        if variant == "peaked":
            peaked(model)
        for size in IMAGES:
            for seed in SEEDS:
                inputs = tiny_next_inputs(PROMPT, size, seed=seed)
                start, n = image_span(model, inputs)
                tiles = int(inputs["pixel_values"].shape[1])
                name = f"tiny-llava-next ({size[0]}x{size[1]}: {tiles} tiles of 24x24, {n} visual tokens)"
                for budget in SETTINGS:
                    theirs = release_rows(modules, model, inputs, start, n, budget)
                    ours = traced_vtprune_run(model, inputs, PRESET, keep=budget)
                    same = tuple(ours["rows"].shape) == tuple(theirs.shape)
                    gap = float((ours["rows"] - theirs).abs().max()) if same else None
                    equal = same and gap < ROW_TOLERANCE
                    logits = logits_on_visual_rows(model, inputs, theirs[None])[0]
                    rows.append({
                        "method": METHOD, "model": name, "weights": variant, "variant": f"{variant}, seed {seed}",
                        "budget": budget, "jaccard": 1.0 if equal else 0.0, "kept_equal": equal, "rows_equal": same,
                        "sequence_max_abs": gap,
                        "logit_max_abs": float((ours["logits"] - logits).abs().max()),
                        "note": f"the release's {theirs.shape[0]} visual rows ({tiles} tiles x {budget}: CLS + "
                                f"{SETTINGS[budget][0] - 1} dominant + {SETTINGS[budget][1]} contextual each) against "
                                f"vtprune's {ours['rows'].shape[0]}; eager attention, noise image"})
                if seed == SEEDS[0]:
                    budget = 64
                    kept, _ = vtprune_run(model, inputs, PRESET, keep=budget, budget_per="image")
                    rows.append({
                        "method": METHOD, "model": name, "weights": variant,
                        "variant": f"{variant}, seed {seed}, budget_per='image'", "budget": budget,
                        "jaccard": 0.0, "kept_equal": False, "rows_equal": False, "sequence_max_abs": None,
                        "logit_max_abs": None, "asserted": False,
                        "note": f"vtprune's per-image rule ({len(kept)} rows: {budget} of the unpadded image's "
                                "patch tokens in raster order, newlines beside them; no CLS): recorded, not asserted"})
    return rows


def passed(row: dict[str, Any]) -> bool:
    return row.get("asserted") is False or (
        row["rows_equal"] and row["sequence_max_abs"] < ROW_TOLERANCE and row["logit_max_abs"] < LOGIT_TOLERANCE)


def summary(rows: list[dict[str, Any]]) -> None:
    for r in rows:
        if r.get("asserted") is not False:
            print(f"  {r['variant']} {r['budget']}: LLM visual rows {r['sequence_max_abs']}, logits {r['logit_max_abs']:.2e}")


def main(argv: list[str] | None = None) -> int:
    return run_check(METHOD, compare, argv, __doc__ or "", passed=passed, summary=summary)


if __name__ == "__main__":
    sys.exit(main())
