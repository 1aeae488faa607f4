"""Parity of vtprune's ``vispruner`` on LLaVA-NeXT with VisPruner's released code
(github.com/Theia-4869/VisPruner, read at aefa01a): the tokens its LLM receives and the first-token logits.

The release's LLaVA-NeXT path (``llava/model/llava_arch.py``, ``prepare_inputs_labels_for_multimodal``):
``encode_images`` runs VisPruner on the batch of all the image's tiles (the base tile and every crop, each
its whole 24 x 24 grid), ``visual_token_num`` tokens per tile (``important_ratio`` of them by the head-mean CLS
attention of ``attentions[-2]``, the rest by duplicate removal on the feature layer's features). It then
strips ``_unpad`` from ``mm_patch_merge_type``, so its LLM receives the base tile's picks and the crops' picks
in the padded crop grid's raster order: no unpadding, no newlines, ``T x visual_token_num`` rows. HF's
LLaVA-NeXT sequence holds the unpadded grid only: vtprune's default ``budget_per="tile"`` makes the same
per-tile picks (`vtprune.scorers.select.select_tiles`), keeps those that exist in HF's sequence and drops the
newlines, so its LLM input is the release's minus the picks that fall in the grid's padding (deviation by
design, counted in ``in_padding``).

What runs: the release's ``prepare_inputs_labels_for_multimodal`` (with its ``encode_images`` and
``CLIPVisionTower``, and the checkout's ``llava.mm_utils.get_anyres_image_grid_shape``) on a stand-in ``self``
(`common.release_next_self`) around the tiny random-weight ``LlavaNextForConditionalGeneration`` of
``vtprune.toy.tiny`` (eager attention: the tower returns attention maps); its index masks are recorded and
mapped onto HF's sequence by the release's own ``unpad_image`` (as the original LLaVA-NeXT code unpads, a
newline column per grid row, here not kept). Input: 630 x 672 noise images (a 2 x 2 anyres grid whose top and
bottom patch rows are padding; 2784 patch tokens + 46 newlines in HF's sequence), seeds 0-2, variants
``random`` and ``peaked``.

Rows (``budget``: the release's ``visual_token_num`` per tile = vtprune's ``keep``): the visual tokens vtprune
kept (HF's visual indices) against the release's picks in HF's sequence (``jaccard``, ``kept_equal``) and
vtprune's first-token logits against the unpatched model with the other tokens removed
(`common.logits_without_unkept`). Ties: as on LLaVA-1.5 (see `vispruner.py`), exact ties leave the release's
``argsort`` order unspecified where vtprune sorts stably, and here they are frequent: the padding patches are
near-identical, so float32 max-cosine scores near 1 tie. ``ties`` counts them per row (the CLS-attention
ranking after the important tokens, and each duplicate-removal round's scores among the ranks that stay,
replayed by `removal_ties`); only tie-free rows are asserted, and every variant needs one with a pick in the
padding (``in_padding`` > 0). A last row per variant records ``budget_per="image"`` (vtprune's per-image rule
over the unpadded image, newlines kept; not asserted).

    python benchmarks/parity/vispruner_next.py --ref /path/to/VisPruner
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
    jaccard,
    kept_and_logits_passed,
    logits_without_unkept,
    padding_summary,
    peaked,
    per_image_rule_row,
    release_arch_and_clip,
    release_next_hf_kept,
    release_next_prepare,
    release_next_self,
    run_check,
    single_threaded,
    tiny_next_inputs,
    vtprune_run,
)
from vispruner import residual_ties  # noqa: E402

from vtprune.scorers.vispruner import split_budget  # noqa: E402

METHOD = "vispruner-next"
PRESET = "vispruner"
ENV = env_name(METHOD)
LOGIT_TOLERANCE = 1e-4
BUDGETS = (32, 64, 128)  # the release's visual_token_num per tile = vtprune's keep
IMPORTANT_RATIO = 0.5
SEEDS = (0, 1, 2)
PROMPT = "USER: <image>\nWhat is in the picture? ASSISTANT:"
IMAGES = ((630, 672),)  # height, width: a 2 x 2 anyres grid with a padding band at the top and bottom


def _release(ref: Path) -> tuple[types.ModuleType, types.ModuleType]:
    return release_arch_and_clip(ref, "Theia-4869/VisPruner", ["llava/mm_utils.py"])


def _release_run(arch: types.ModuleType, clip: types.ModuleType, model: Any, inputs: Any, start: int, n: int,
                 visual_token_num: int) -> dict[str, Any]:
    """The release's ``prepare_inputs_labels_for_multimodal`` on one prompt: ``embeds`` (its ``new_input_embeds``
    ``[1, L, D]``), ``masks`` (its ``index_masks`` ``[T, 576]``, the base tile first), ``hf_kept`` (its picks
    that exist in HF's unpadded sequence, as HF visual indices: the mask unpadded by the release's own
    ``unpad_image`` as the original LLaVA-NeXT code does, a ``False`` newline column per grid row),
    ``in_padding`` (its picks that fall in the grid's padding) and ``attention`` (``[T, 576]``, each tile's
    head-mean CLS attention of the feature layer, for the tie count)."""
    import torch

    me = release_next_self(clip, model, get_visual_token_num=lambda: visual_token_num,
                           get_important_ratio=lambda: IMPORTANT_RATIO)
    plain_encode = types.MethodType(arch.LlavaMetaForCausalLM.encode_images, me)
    seen: dict[str, Any] = {}

    def encode(images):
        out = plain_encode(images)
        seen["masks"] = out[1].detach().clone()
        with torch.no_grad():
            att = model.model.vision_tower(images, output_attentions=True).attentions[-2]
        seen["attention"] = att[:, :, 0, 1:].mean(1)
        seen["features"] = model.model.vision_tower(images, output_hidden_states=True).hidden_states[-2][:, 1:]
        return out

    me.encode_images = encode
    out = release_next_prepare(arch, me, inputs, start, n, {})
    masks = seen["masks"].cpu()
    hf_kept, in_padding = release_next_hf_kept(arch, model, inputs, masks, n)
    return {"embeds": out[4], "masks": masks, "hf_kept": hf_kept, "in_padding": in_padding,
            "attention": seen["attention"], "features": seen["features"]}


def removal_ties(attention: Any, features: Any, budget: int) -> int:
    """Exact ties that make the release's ``argsort`` order matter in one tile: in its CLS-attention ranking
    after the important tokens (`vispruner.residual_ties`), and in each duplicate-removal round's max-cosine
    scores among the ranks that stay (their order is the next round's residual order). The rounds are
    replayed with vtprune's stable order (`vtprune.scorers.vispruner.remove_duplicates`'s steps)."""
    import torch

    from vtprune.scorers.vispruner import REMOVAL_STEP

    ties = residual_ties(attention, budget)
    important, diverse = split_budget(budget, IMPORTANT_RATIO)
    unit = torch.nn.functional.normalize(features.float(), dim=-1)
    residual = torch.sort(attention.float(), descending=True, stable=True).indices[important:]
    while True:
        r = min(REMOVAL_STEP, int(residual.numel()) - diverse)
        if r <= 0:
            return ties
        a, b = residual[0::2], residual[1::2]
        closest = (unit[a] @ unit[b].T).max(dim=1).values
        ranked = torch.sort(closest, descending=True, stable=True)
        kept = ranked.values[max(r - 1, 0):]
        ties += int((kept[1:] == kept[:-1]).sum())
        residual = torch.cat([a[ranked.indices[r:]], b])


def _vtprune_run(model: Any, inputs: Any, keep: int, **options: Any) -> dict[str, Any]:
    """vtprune's ``vispruner`` (`common.vtprune_run`): its kept visual tokens (sorted) and first-token logits."""
    kept, logits = vtprune_run(model, inputs, PRESET, keep=keep, **options)
    return {"kept": sorted(kept), "logits": logits}


@single_threaded
def compare(ref: Path) -> list[dict[str, Any]]:

    from vtprune.toy.tiny import tiny_llava_next

    arch, clip = _release(ref)
    rows: list[dict[str, Any]] = []
    for variant in ("random", "peaked"):
        model = tiny_llava_next(attn_implementation="eager")  # eager: the tower returns attentions
        if variant == "peaked":
            peaked(model)
        for size in IMAGES:
            for seed in SEEDS:
                rows += _rows(arch, clip, model, variant, size, seed)
    return rows


def _rows(arch: types.ModuleType, clip: types.ModuleType, model: Any, variant: str, size: tuple[int, int],
          seed: int) -> list[dict[str, Any]]:
    """The rows of one variant on one noise image: every budget, and at the first seed the per-image rule."""
    inputs = tiny_next_inputs(PROMPT, size, seed=seed)
    start, n = image_span(model, inputs)
    tiles = int(inputs["pixel_values"].shape[1])
    name = f"tiny-llava-next ({size[0]}x{size[1]}: {tiles} tiles of 24x24, {n} visual tokens)"
    common = {"method": METHOD, "model": name, "weights": variant, "seed": seed}
    rows: list[dict[str, Any]] = []
    for t in BUDGETS:
        rel = _release_run(arch, clip, model, inputs, start, n, t)
        ours = _vtprune_run(model, inputs, t)
        ties = sum(removal_ties(a, f, t) for a, f in zip(rel["attention"], rel["features"]))
        reference = logits_without_unkept(model, inputs, rel["hf_kept"])
        rows.append({
            **common, "variant": f"{variant}, seed {seed}", "budget": t,
            "jaccard": jaccard(ours["kept"], rel["hf_kept"]), "kept_equal": ours["kept"] == rel["hf_kept"],
            "logit_max_abs": float((ours["logits"] - reference).abs().max()), "ties": ties, "asserted": not ties,
            "in_padding": rel["in_padding"],
            "note": f"release visual_token_num={t} per tile: {int(rel['masks'].sum())} picks, its LLM input "
                    f"{rel['embeds'].shape[1]} rows (no unpadding, no newlines), {rel['in_padding']} picks in the "
                    f"grid's padding (absent from HF's sequence); vtprune keep={t} keeps {len(ours['kept'])}, "
                    "the release's other picks" + (
                        f"; {ties} exact tie(s) in the release's rankings: argsort order unspecified, not asserted"
                        if ties else "")})
    if seed == SEEDS[0]:
        t = BUDGETS[1]
        per_image = _vtprune_run(model, inputs, t, budget_per="image")
        rel = _release_run(arch, clip, model, inputs, start, n, t)
        rows.append(per_image_rule_row(common, variant, seed, t, per_image["kept"], rel["hf_kept"]))
    return rows


def main(argv: list[str] | None = None) -> int:
    return run_check(METHOD, compare, argv, __doc__ or "",
                     passed=lambda row: kept_and_logits_passed(row, LOGIT_TOLERANCE),
                     summary=lambda rows: padding_summary(METHOD, rows))


if __name__ == "__main__":
    sys.exit(main())
