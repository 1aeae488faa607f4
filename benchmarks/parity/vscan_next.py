"""Parity of vtprune's ``vscan`` on LLaVA-NeXT with VScan's released code (github.com/Tencent/SelfEvolvingAgent,
``VScan/``, read at a82450e): the pre-LLM stage's sequence (scans and merge per tile, unpadding, newlines) and,
pre-LLM only, the first-token logits.

The release's LLaVA path handles LLaVA-NeXT images (``llava/model/llava_arch.py``,
``LlavaMetaForCausalLM.prepare_inputs_labels_for_multimodal``, ``mm_patch_merge_type`` forced to
``spatial_unpad``, ``image_aspect_ratio`` ``anyres``): ``encode_images`` runs on all tiles of the image at once
(the base tile and every crop, each a 24 x 24 grid, the release asserts 576 patches): per tile the local scan
(``window_cls_selection`` on the head-mean CLS row of CLIP's ``attentions[5]``), the global scan (``attentions[-2]``,
local picks zeroed), ``visual_token_num`` tokens per tile, every other patch merged into its most
cosine-similar pick (``token_merging``, on the projector outputs); then the crops' features and their
``index_mask`` are permuted, unpadded (``unpad_image``: picks in the padding are lost), a newline row appended
to every row of the crop grid (mask ``True``), and the base tile's picks put first. vtprune does the same
(`vtprune.scorers.vscan`: "each tile scanned and merged on its whole grid, newlines kept").

What runs: the release's ``prepare_inputs_labels_for_multimodal`` (with its ``encode_images``,
``window_cls_selection``, ``token_merging``, ``unpad_image`` and the checkout's
``llava.mm_utils.get_anyres_image_grid_shape``) on a stand-in ``self`` around the tiny random-weight
``LlavaNextForConditionalGeneration`` of ``vtprune.toy.tiny`` with a 24-layer CLIP (eager attention; its CLIP
wrapped in the release's ``CLIPVisionTower``, ``output_attentions``), one 400 x 500 noise image (a 2 x 2 anyres
grid: the base tile and 4 crops; 2400 patch tokens + 38 newlines in HF's sequence once unpadded), the prompt's
``<image>`` as the release's ``IMAGE_TOKEN_INDEX``, ``image_sizes`` (width, height) as the LLaVA repository
passes them. Re-stated here: the stand-in ``self`` and config.

Budgets: the release's ``visual_token_num`` ``T`` per tile (96, 192, 288: its LLaVA-1.5 settings) is vtprune's
``keep = T / 3`` (``pre_llm_factor=3``, whose LLM stage then keeps ``keep`` per image; the release's LLM stage,
``layer_prune``, is the code compared on LLaVA-1.5 in `vscan.py`, here its budget differs by design: it counts the
newlines in ``image_token_list``, vtprune's is over the prunable tokens) and ``keep = T`` with ``pre_llm_factor=1``
(pre-LLM only: the release run without ``--layer_list``). Rows, variants ``random`` and ``peaked``:

- ``pre-llm`` (asserted): vtprune's LLM input (``inputs_embeds`` as its language model receives it) against the
  release's ``new_input_embeds``: the same length, every row equal within 1e-5 (``merged_max_abs``: the merged
  features), for both ``pre_llm_factor`` 3 and 1; ``jaccard`` / ``kept_equal`` of the visual tokens vtprune kept
  (`PruneStats.stages[0]` / ``kept``, HF's visual indices, newlines included) against the release's, recovered by
  recording ``unpad_image``'s mask outputs (its kept rows in HF's order); ``logit_max_abs``: vtprune's
  first-token logits (``pre_llm_factor=1``) against the unpatched LLM on the release's ``new_input_embeds``.

    python benchmarks/parity/vscan_next.py --ref /path/to/SelfEvolvingAgent   # (or its VScan/ folder)
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
    peaked,
    release_arch_and_clip,
    release_next_prepare,
    release_next_self,
    run_check,
    single_threaded,
    tiny_next_inputs,
)
from vscan import _root as vscan_root  # noqa: E402

METHOD = "vscan-next"
PRESET = "vscan"
ENV = env_name(METHOD)
LOGIT_TOLERANCE = 1e-4
MERGE_TOLERANCE = 1e-5
BUDGETS = (96, 192, 288)  # the release's visual_token_num per tile; vtprune keep = T / 3 (factor 3) or T (factor 1)
PROMPT = "USER: <image>\nWhat is in the picture? ASSISTANT:"
IMAGE = (400, 500)  # height, width: a 2 x 2 anyres grid (672 x 672 pinpoint)


def _release(ref: Path) -> tuple[types.ModuleType, types.ModuleType]:
    """The release's ``llava_arch`` and ``clip_encoder`` modules, imported from its VScan folder
    (`vscan._root`), which must hold ``llava/mm_utils.py`` too (its anyres grid shape)."""
    return release_arch_and_clip(vscan_root(ref), "Tencent/SelfEvolvingAgent (VScan/)", ["llava/mm_utils.py"])


def _release_self(arch: types.ModuleType, clip: types.ModuleType, model: Any, visual_token_num: int) -> Any:
    """A stand-in ``self`` for the release's ``LlavaMetaForCausalLM`` methods around ``model``
    (`release_next_self`), its ``get_visual_token_num()`` returning ``visual_token_num``."""
    me = release_next_self(clip, model, get_visual_token_num=lambda: visual_token_num)
    meta = arch.LlavaMetaForCausalLM
    for name in ("encode_images", "window_cls_selection", "token_merging"):
        setattr(me, name, types.MethodType(getattr(meta, name), me))
    return me


def _release_run(arch: types.ModuleType, clip: types.ModuleType, model: Any, inputs: Any, start: int, n: int,
                 visual_token_num: int) -> dict[str, Any]:
    """The release's ``prepare_inputs_labels_for_multimodal``: ``embeds`` (its ``new_input_embeds`` ``[1, L, D]``)
    and ``kept`` (the visual tokens it keeps, as indices into HF's visual sequence: the base tile's patches,
    then the unpadded crop grid row by row with a newline after each row)."""
    import torch

    me = _release_self(arch, clip, model, visual_token_num)
    masks: list[Any] = []
    plain = arch.unpad_image

    def recorded(tensor, original_size):  # the release calls it on the features, then on the index mask
        out = plain(tensor, original_size)
        if out.dtype == torch.bool:
            masks.append(out.detach().clone())
        return out

    seen: dict[str, Any] = {}
    plain_encode = me.encode_images

    def encode(images):
        out = plain_encode(images)
        seen["base_mask"] = out[1][0].detach().clone()  # the base tile's index_mask
        return out

    me.encode_images = encode
    out = release_next_prepare(arch, me, inputs, start, n, {"unpad_image": recorded})
    assert len(masks) == 1, f"expected one unpadded index mask, got {len(masks)}"
    crop = masks[0][0]  # [rows, cols] of the crop grid, unpadded
    with_newlines = torch.cat([crop, torch.ones(crop.shape[0], 1, dtype=torch.bool)], dim=1).flatten()
    full = torch.cat([seen["base_mask"].cpu(), with_newlines.cpu()])
    assert full.numel() == n, f"the release's packed image has {full.numel()} slots, HF's {n}"
    return {"embeds": out[4], "kept": torch.nonzero(full).flatten().tolist()}


# ---- vtprune ----------------------------------------------------------------------------------------
def _vtprune_run(model: Any, inputs: Any, keep: int, **options: Any) -> dict[str, Any]:
    """vtprune's ``vscan`` (removed afterwards): its LLM input embeddings, first-token logits and the visual
    tokens its pre-LLM stage kept."""
    import torch

    import vtprune

    seen: dict[str, Any] = {}
    handle = model.model.language_model.register_forward_pre_hook(lambda m, a, kw: seen.update(kw), with_kwargs=True)
    vtprune.apply(model, PRESET, keep=keep, **options)
    try:
        with torch.no_grad():
            logits = model(**inputs, use_cache=False).logits[0, -1]
        st = vtprune.stats(model)
    finally:
        handle.remove()
        vtprune.remove(model)
    pre = st.stages[0]["kept"][0] if st.stages else st.kept[0]
    return {"embeds": seen["inputs_embeds"], "logits": logits, "kept": sorted(int(i) for i in pre)}


def _diff(a: Any, b: Any) -> float:
    return float((a.float() - b.float()).abs().max()) if a.shape == b.shape else float("inf")


@single_threaded
def compare(ref: Path) -> list[dict[str, Any]]:
    import torch

    from vtprune.toy.tiny import tiny_llava_next

    arch, clip = _release(ref)
    inputs = tiny_next_inputs(PROMPT, IMAGE)
    rows: list[dict[str, Any]] = []
    for variant in ("random", "peaked"):
        model = tiny_llava_next(vision_layers=24, attn_implementation="eager")  # eager: the tower returns attentions
        if variant == "peaked":
            peaked(model)
        start, n = image_span(model, inputs)
        name = f"tiny-llava-next ({IMAGE[0]}x{IMAGE[1]}: 5 tiles of 24x24, {n} visual tokens; 24-layer CLIP, 4-layer LLM)"
        for t in BUDGETS:
            rel = _release_run(arch, clip, model, inputs, start, n, t)
            with torch.no_grad():
                hidden = model.model.language_model(inputs_embeds=rel["embeds"], use_cache=False).last_hidden_state
                rel_logits = model.lm_head(hidden[:, -1])[0]
            staged = _vtprune_run(model, inputs, t // 3)
            alone = _vtprune_run(model, inputs, t, pre_llm_factor=1)
            merged = max(_diff(staged["embeds"], rel["embeds"]), _diff(alone["embeds"], rel["embeds"]))
            same = staged["kept"] == rel["kept"] and alone["kept"] == rel["kept"]
            rows.append({
                "method": METHOD, "model": name + ", pre-LLM scans + merge", "variant": variant, "budget": t // 3,
                "stage": "pre-llm", "jaccard": min(jaccard(staged["kept"], rel["kept"]), jaccard(alone["kept"], rel["kept"])),
                "kept_equal": bool(same and merged < MERGE_TOLERANCE), "merged_max_abs": merged,
                "logit_max_abs": float((alone["logits"] - rel_logits).abs().max()),
                "note": f"release visual_token_num={t} per tile ({len(rel['kept'])} of {n} visual slots reach its LLM); "
                        f"vtprune keep={t // 3} (pre_llm_factor 3) and keep={t} pre_llm_factor=1; logits: the latter "
                        "against the unpatched LLM on the release's new_input_embeds"})
    return rows


def summary(rows: list[dict[str, Any]]) -> None:
    for r in rows:
        print(f"  {r['variant']} keep {r['budget']}: kept equal {r['kept_equal']}, LLM input max |diff| "
              f"{r['merged_max_abs']:.2e}, logits max |diff| {r['logit_max_abs']:.2e}")


def main(argv: list[str] | None = None) -> int:
    return run_check(METHOD, compare, argv, __doc__ or "", summary=summary,
                     passed=lambda r: r["kept_equal"] and r["logit_max_abs"] < LOGIT_TOLERANCE)


if __name__ == "__main__":
    sys.exit(main())
