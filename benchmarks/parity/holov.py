"""Parity of vtprune's ``holov`` with HoloV's released code (github.com/obananas/HoloV).

The release (LLaVA-1.5 path) encodes the images with its ``CLIPVisionTower`` (``clip_encoder.py``:
``output_attentions=True``, ``feature_select`` takes ``attentions[-2][:, :, 0, 1:]``), averages the heads and
projects (``LlavaMetaForCausalLM.encode_images`` in ``llava_arch.py``), then ``HoloV(features, attention,
num_patches, new_image_token_num)`` (``llava/model/utils.py``) returns per image ``new_image_token_num`` rows: the
picked projector rows crop by crop, then zero vectors for the budget the crops could not hold; those rows
replace the ``<image>`` placeholder in the LLM's input. Here those release functions run (imported from the
checkout, the tower wrapped around the tiny model's own CLIP; ``encode_images`` on a stand-in ``self``) on a
tiny LLaVA-1.5 with LLaVA-1.5's 24 x 24 grid (576 patches), so the budgets are the release's own, unscaled.

Compared per (variant, budget): the visual rows the LLM receives from vtprune's patched model (captured at
the language model's input) against the release's rows; both are mapped back to token indices by exact match
with the projector outputs (zero rows are the release's padding). ``jaccard`` / ``kept_equal``: the picked
token sets (and the same number of zero rows); ``sequence_equal``: the rows are identical in order too;
``logit_max_abs``: first-token logits of vtprune's patched model against the unpatched LLM run on the prompt
with the release's rows spliced in (positions contiguous, as in the release).

``num_patches``: the LLaVA release hard-codes 16 (with ``new_image_token_num=64``); vtprune's default is the
Qwen release's rule ``int(1024 / 576 * n / k)``: 16 at 64 (the same), 8 at 128, 5 at 192. The default rows
pass the rule's value to the release (``note``); the ``num_crops=16`` rows pass the LLaVA constant at 128 and
192. The ``overflow`` rows (64 crops of 9, 400 kept) let crops run out of tokens where the attention is
peaked, so that the release's zero padding is compared too (``zero_rows``: 23 and 14 in the peaked variant).

    python benchmarks/parity/holov.py --ref /path/to/HoloV
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
    logits_on_visual_rows,
    peaked,
    release_arch_and_clip,
    release_clip_tower,
    run_check,
    single_threaded,
    tiny_llava_inputs,
)

METHOD = "holov"
ENV = env_name(METHOD)
LOGIT_TOLERANCE = 1e-4
MODEL = "tiny-llava-1.5 (24x24 grid)"
BUDGETS = (64, 128, 192)
PROMPT = "USER: <image>\nWhat is in the picture? ASSISTANT:"


def _release(ref: Path) -> tuple[types.ModuleType, types.ModuleType]:
    """The release's ``llava_arch`` (``HoloV``, ``encode_images``) and ``clip_encoder`` modules."""
    return release_arch_and_clip(ref, "obananas/HoloV", ["llava/model/utils.py"])


def _release_encoder(arch: types.ModuleType, clip: types.ModuleType, model: Any) -> Any:
    """``images -> (features [B, 576, D], attention [B, 576])`` by the release's ``encode_images`` and its
    ``CLIPVisionTower`` around ``model``'s own CLIP (eager attention, so that ``attentions`` are returned)."""
    tower = release_clip_tower(clip, model)
    core = types.SimpleNamespace(get_vision_tower=lambda: tower, mm_projector=model.model.multi_modal_projector)
    me = types.SimpleNamespace(get_model=lambda: core)
    return lambda images: arch.LlavaMetaForCausalLM.encode_images(me, images)


def _index_rows(rows: Any, feats: Any) -> list[int]:
    """Per row of ``rows`` ``[k, D]`` the index of the identical row of ``feats`` ``[n, D]``; -1 for a zero row,
    -2 for a row matching none."""
    import torch

    same = (rows[:, None, :] == feats[None, :, :]).all(-1)  # [k, n]
    zero = (rows == 0).all(-1)
    hit = same.any(-1)
    idx = torch.where(hit, same.float().argmax(-1), torch.full_like(zero, -2, dtype=torch.long))
    return torch.where(zero & ~hit, -1, idx).tolist()


def _compare_one(model: Any, inputs: Any, encode: Any, holov: Any, k: int, num_patches: int,
                 options: dict[str, Any]) -> dict[str, Any]:
    import torch

    import vtprune

    ids = inputs["input_ids"]
    start, n = image_span(model, inputs)
    with torch.no_grad():
        feats, attention = encode(inputs["pixel_values"])
        release_rows = holov(feats, attention, num_patches=num_patches, new_image_token_num=k)  # [B, k, D]
        release_logits = logits_on_visual_rows(model, inputs, release_rows)
    seen: dict[str, Any] = {}
    handle = model.model.language_model.register_forward_pre_hook(lambda m, a, kw: seen.update(kw), with_kwargs=True)
    vtprune.apply(model, METHOD, keep=k, **options)
    try:
        with torch.no_grad():
            logits = model(**inputs, use_cache=False).logits[:, -1]
    finally:
        handle.remove()
        vtprune.remove(model)
    ours_rows = seen["inputs_embeds"][:, start:start + k]
    jac, equal, seq_equal, zeros = [], True, True, []
    for b in range(ids.shape[0]):
        theirs = _index_rows(release_rows[b], feats[b])
        ours = _index_rows(ours_rows[b].to(feats.dtype), feats[b])
        assert -2 not in theirs, "the release returned a row that is no projector output"
        picked_theirs, picked_ours = [i for i in theirs if i >= 0], [i for i in ours if i >= 0]
        jac.append(jaccard(picked_theirs, picked_ours))
        equal &= set(picked_theirs) == set(picked_ours) and theirs.count(-1) == ours.count(-1) and -2 not in ours
        seq_equal &= theirs == ours
        zeros.append(theirs.count(-1))
    return {"jaccard": min(jac), "kept_equal": bool(equal), "sequence_equal": bool(seq_equal),
            "zero_rows": zeros, "logit_max_abs": float((logits - release_logits).abs().max())}


@single_threaded
def compare(ref: Path) -> list[dict[str, Any]]:
    from vtprune.scorers.holov import default_crops
    from vtprune.toy.tiny import tiny_llava

    arch, clip = _release(ref)
    inputs = tiny_llava_inputs(PROMPT, count=2, draw="floats")
    rows = []
    for variant in ("random", "peaked"):
        model = tiny_llava(attn_implementation="eager")  # eager: the release's tower returns attentions
        if variant == "peaked":
            peaked(model)
        encode = _release_encoder(arch, clip, model)
        n = model.config.image_seq_length
        cases = []
        for k in BUDGETS:
            crops = default_crops(n, k)
            note = "default options; release num_patches=16, new_image_token_num=64 (its llava_arch.py call)" if k == 64 \
                else f"default options; release num_patches={crops} (the Qwen release's rule int(1024/576*n/k), as vtprune)"
            cases.append((k, crops, {}, note, MODEL))
        for k in BUDGETS[1:]:
            cases.append((k, 16, {"num_crops": 16}, "num_crops=16; release num_patches=16 (the LLaVA release's constant)",
                          MODEL + ", num_crops=16"))
        cases.append((400, 64, {"num_crops": 64}, "overflow: num_crops=64, 400 kept; release num_patches=64: crops can "
                                                  "run out of tokens (zero_rows: the release's zero-vector padding)",
                      MODEL + ", num_crops=64 (overflow)"))
        for k, crops, options, note, name in cases:
            got = _compare_one(model, inputs, encode, arch.HoloV, k, crops, options)
            rows.append({"method": METHOD, "model": name, "variant": variant, "budget": k, **got, "note": note})
    return rows


def summary(rows: list[dict[str, Any]]) -> None:
    for r in rows:
        print(f"  {r['variant']} {r['budget']}: sequence equal {r['sequence_equal']}, zero rows {r['zero_rows']}"
              f" ({r['note']})")


def main(argv: list[str] | None = None) -> int:
    return run_check(METHOD, compare, argv, __doc__ or "", summary=summary)


if __name__ == "__main__":
    sys.exit(main())
