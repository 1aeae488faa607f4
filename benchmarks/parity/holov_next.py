"""Parity of vtprune's ``holov`` with HoloV's release (github.com/obananas/HoloV, read at 1d2e65e) on LLaVA-NeXT:
the visual rows the LLM receives and the first-token logits.

The release's LLaVA path handles LLaVA-NeXT images (``llava/model/llava_arch.py``,
``LlavaMetaForCausalLM.prepare_inputs_labels_for_multimodal``, ``mm_patch_merge_type`` ``spatial_unpad``,
``image_aspect_ratio`` ``anyres``, lines 155-236): ``encode_images`` returns per tile the projector rows and
the head-mean CLS attention of its ``CLIPVisionTower`` (``clip_encoder.py``); the attention is reshaped,
permuted and unpadded as the features (``unpad_image``), the image's base tile is put first; the
``image_newline`` rows are commented out (lines 192-199 and 215-222), so the packed image has no newline
rows at all. Then one call ``HoloV(image_features, image_attns, num_patches=16, new_image_token_num=64)``
(line 239, ``llava/model/utils.py``) on the whole packed image: its budget is per image over all tiles, as
vtprune's. vtprune never makes the newline rows candidates and, by default (``newlines="drop"``), drops them as
the release does (``newlines="keep"`` keeps them beside the budget): its candidates are exactly the release's rows.

What runs: the release's ``prepare_inputs_labels_for_multimodal`` (with its ``encode_images``, ``unpad_image``,
the checkout's ``llava.mm_utils.get_anyres_image_grid_shape`` and ``HoloV``) on a stand-in ``self`` around the
tiny random-weight ``LlavaNextForConditionalGeneration`` of ``vtprune.toy.tiny`` (eager attention, anyres
pinpoints up to 672 x 672; its CLIP wrapped in the release's ``CLIPVisionTower``), on one 400 x 500 noise
image (a 2 x 2 grid: base tile + 4 tiles, unpadded: 2400 tokens + 38 newlines in HF's sequence), the
prompt's ``<image>`` as the release's single ``IMAGE_TOKEN_INDEX``, ``image_sizes`` (width, height) as the
LLaVA repository passes them. The only thing changed is the hard-coded budget: the module's ``HoloV`` is
wrapped for the call so that ``num_patches`` / ``new_image_token_num`` are the row's (``num_patches=16``,
the release's constant, is vtprune ``num_crops=16``) and its input and output are recorded. Re-stated here:
the stand-in ``self`` and config, the mapping of rows back to token indices by exact match with HF's
projector rows.

Cases (the ``model`` column), variants ``random`` and ``peaked``: ``num_crops=16`` at 64 / 128 / 192 (the
release's constant ``num_patches=16``, 16 crops of 150 tokens); ``default options`` at 64 / 128 / 192 (vtprune's
``int(1024 / 576 * n / k)`` over the 2400 candidates: 66 / 33 / 22, passed to the release as ``num_patches``;
uneven crops); ``num_crops=256 (overflow)`` at 1600 (crops of 9-10 tokens: in the peaked variant crops are
allotted more than they hold, so the release pads with zero vectors, 73 of them). Compared per case:

- ``packing``: the release's packed rows (HoloV's input) are HF's visual rows with the newline rows removed,
  in order (``packing_equal``; the kept indices are in HF's index space, newlines included);
  ``attention_max_abs``: vtprune's scored attention against the release's (``image_attns``), and
  ``function_equal``: vtprune's ``holov_picks`` on the release's own attention and rows keeps its picks.
- ``newlines kept`` (asserted; vtprune ``newlines="keep"``): vtprune's kept set (the tokens whose rows reach its LLM, mapped by value, and
  the newline slots; ``vtprune.stats().kept`` also lists the slots holding the zero vectors) against the
  release's picks plus the 38 newline indices; ``sequence_equal``: vtprune's LLM visual rows with the
  newline rows taken out are the release's rows in its order (zero vectors included, ``zero_rows`` the
  release's count; the script fails unless both hold); ``logit_max_abs`` is not given (the release's
  sequence has no newline rows, so its logits belong to the other row).
- ``as released`` (asserted; vtprune's default, ``newlines="drop"``): vtprune's LLM visual rows are the release's
  own LLM input rows in its order (``sequence_equal``, zero vectors included; the kept set by value), and
  ``logit_max_abs``: the first-token logits of the unpatched LLM on the release's ``new_input_embeds`` against
  vtprune's run.

    python benchmarks/parity/holov_next.py --ref /path/to/HoloV
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
    lm_input_embeds,
    peaked,
    release_arch_and_clip,
    release_next_prepare,
    release_next_self,
    run_check,
    single_threaded,
    tiny_next_inputs,
)

METHOD = "holov-next"
PRESET = "holov"
ENV = env_name(METHOD)
LOGIT_TOLERANCE = 1e-4
BUDGETS = (64, 128, 192)
NUM_PATCHES = 16  # the LLaVA release's constant (llava_arch.py line 239)
OVERFLOW = (1600, 256)  # 256 crops of 9-10 tokens, 1600 kept: in the peaked variant crops run out of tokens
PROMPT = "USER: <image>\nWhat is in the picture? ASSISTANT:"
IMAGE = (400, 500)  # height, width: a 2 x 2 anyres grid (672 x 672 pinpoint)


def _release(ref: Path) -> tuple[types.ModuleType, types.ModuleType]:
    """The release's ``llava_arch`` and ``clip_encoder`` modules (imported from the checkout)."""
    return release_arch_and_clip(ref, "obananas/HoloV", ["llava/model/utils.py", "llava/mm_utils.py"])


def _release_self(arch: types.ModuleType, clip: types.ModuleType, model: Any) -> Any:
    """A stand-in ``self`` for the release's ``LlavaMetaForCausalLM`` methods around ``model``
    (`release_next_self`, with the release's ``encode_images``)."""
    me = release_next_self(clip, model)
    me.encode_images = lambda images: arch.LlavaMetaForCausalLM.encode_images(me, images)
    return me


def _release_run(arch: types.ModuleType, me: Any, inputs: Any, start: int, n: int, k: int,
                 crops: int) -> dict[str, Any]:
    """The release's ``prepare_inputs_labels_for_multimodal`` with ``HoloV``'s budget set to ``k`` and
    ``num_patches`` to ``crops``: its packed
    rows (HoloV's input), HoloV's output rows and the LLM input embeddings."""
    seen: dict[str, Any] = {}
    plain = arch.HoloV

    def budgeted(image_tokens, attention, *args, **kwargs):
        seen["call"] = (*args, *kwargs.values())
        seen["packed"] = image_tokens.detach().clone()
        seen["attention"] = attention.detach().clone()
        out = plain(image_tokens, attention, num_patches=crops, new_image_token_num=k)
        seen["rows"] = out.detach().clone()
        return out

    out = release_next_prepare(arch, me, inputs, start, n, {"HoloV": budgeted})
    assert seen.get("call") == (16, 64), f"the release's HoloV call changed: {seen.get('call')}"
    return {"packed": seen["packed"][0], "attention": seen["attention"][0], "rows": seen["rows"][0], "embeds": out[4]}


def _index_rows(rows: Any, feats: Any) -> list[int]:
    """Per row of ``rows`` ``[k, D]`` the index of the identical row of ``feats`` ``[n, D]``; -1 for a zero row,
    -2 for a row matching none."""
    import torch

    same = (rows[:, None, :] == feats[None, :, :]).all(-1)
    zero = (rows == 0).all(-1)
    hit = same.any(-1)
    idx = torch.where(hit, same.float().argmax(-1), torch.full_like(zero, -2, dtype=torch.long))
    return torch.where(zero & ~hit, -1, idx).tolist()


def _vtprune_run(model: Any, inputs: Any, start: int, k: int,
                 options: dict[str, Any]) -> tuple[list[int], Any, Any, Any]:
    """vtprune's ``holov`` with ``options``: kept indices, the LLM's visual rows, first-token logits and the
    attention its ``holov_picks`` scored (recorded by a wrapper that changes nothing)."""
    import torch

    import vtprune
    from vtprune.scorers import holov as scorer

    seen: dict[str, Any] = {}
    plain = scorer.holov_picks

    def recorded(attention, *args, **kwargs):
        seen["attention"] = attention.detach().clone()
        return plain(attention, *args, **kwargs)

    handle = model.model.language_model.register_forward_pre_hook(lambda m, a, kw: seen.update(kw), with_kwargs=True)
    scorer.holov_picks = recorded
    vtprune.apply(model, PRESET, keep=k, **options)
    try:
        with torch.no_grad():
            logits = model(**inputs, use_cache=False).logits[0, -1]
        kept = vtprune.stats(model).kept[0].tolist()
    finally:
        scorer.holov_picks = plain
        handle.remove()
        vtprune.remove(model)
    return kept, seen["inputs_embeds"][0, start:start + len(kept)], logits, seen["attention"]


@single_threaded
def compare(ref: Path) -> list[dict[str, Any]]:
    import torch

    from vtprune.scorers.holov import default_crops, holov_picks
    from vtprune.toy.tiny import tiny_llava_next

    arch, clip = _release(ref)
    inputs = tiny_next_inputs(PROMPT, IMAGE)
    rows: list[dict[str, Any]] = []
    for variant in ("random", "peaked"):
        model = tiny_llava_next(attn_implementation="eager")  # eager: the release's tower returns attentions
        if variant == "peaked":
            peaked(model)
        me = _release_self(arch, clip, model)
        embeds = lm_input_embeds(model, inputs)
        start, n = image_span(model, inputs)
        visual = embeds[0, start:start + n]
        is_nl = (visual == model.model.image_newline.to(visual.dtype)).all(-1)
        newlines = torch.nonzero(is_nl).flatten().tolist()
        prunable = torch.nonzero(~is_nl).flatten()
        if not newlines or n <= 576:
            raise SystemExit(f"{METHOD} parity: expected a tiled image with newline rows (n={n}, newlines={len(newlines)})")
        base = f"tiny-llava-next ({IMAGE[0]}x{IMAGE[1]}: {n} visual tokens, {len(newlines)} newlines)"
        m = int(prunable.numel())
        cases = [(k, NUM_PATCHES, {"num_crops": NUM_PATCHES}, f"{base}, num_crops={NUM_PATCHES}") for k in BUDGETS]
        cases += [(k, default_crops(m, k), {}, f"{base}, default options") for k in BUDGETS]
        cases.append((OVERFLOW[0], OVERFLOW[1], {"num_crops": OVERFLOW[1]},
                      f"{base}, num_crops={OVERFLOW[1]} (overflow)"))
        for k, crops, options, model_name in cases:
            rel = _release_run(arch, me, inputs, start, n, k, crops)
            packing_equal = rel["packed"].shape == visual[prunable].shape and bool((rel["packed"] == visual[prunable]).all())
            theirs_seq = _index_rows(rel["rows"], visual)
            assert -2 not in theirs_seq, "the release returned a row that is no projector output"
            theirs = sorted(i for i in theirs_seq if i >= 0)
            zeros_theirs = theirs_seq.count(-1)
            with torch.no_grad():
                hidden = model.model.language_model(inputs_embeds=rel["embeds"], use_cache=False).last_hidden_state
                rel_logits = model.lm_head(hidden[:, -1])[0]

            kept, our_rows, our_logits, our_attention = _vtprune_run(model, inputs, start, k,
                                                                     {**options, "newlines": "keep"})
            attention_diff = float((our_attention.float() - rel["attention"].float()).abs().max())
            # vtprune's selection function on the release's own attention and packed rows
            fn_picks, _ = holov_picks(rel["attention"], rel["packed"], k, crops)
            fn_equal = sorted(prunable[fn_picks].tolist()) == theirs
            # the newline rows are identical vectors: they are told apart by vtprune's kept indices, not by value
            our_rows = our_rows.to(visual.dtype)
            nl_row = (our_rows == model.model.image_newline.to(visual.dtype)).all(-1)
            ours_seq = _index_rows(our_rows[~nl_row], visual)
            # the kept set compared: the tokens whose rows reach the LLM (by value) + the newline slots kept
            # (vtprune.stats' kept also lists the slots that hold the zero vectors, the release's padding)
            assert len(our_rows) == len(kept), "one LLM row per kept slot"
            ours = sorted([i for i in ours_seq if i >= 0] + [i for i in sorted(kept) if i in set(newlines)])
            ours_no_nl = ours_seq
            nl_in_rows = int(nl_row.sum())
            with_nl = sorted(theirs + newlines)
            equal = (ours == with_nl and nl_in_rows == len(newlines) and ours_no_nl.count(-1) == zeros_theirs
                     and -2 not in ours_seq and sorted(i for i in ours_seq if i >= 0) == theirs)
            rows.append({
                "method": METHOD, "model": model_name, "variant": f"{variant}, newlines kept", "budget": k,
                "jaccard": jaccard(ours, with_nl), "kept_equal": bool(equal),
                "sequence_equal": ours_no_nl == theirs_seq, "packing_equal": packing_equal,
                "zero_rows": zeros_theirs, "function_equal": fn_equal, "attention_max_abs": attention_diff,
                "logit_max_abs": None,
                "note": f"release prepare_inputs_labels_for_multimodal (spatial_unpad, anyres), HoloV num_patches "
                        f"{crops}, new_image_token_num {k} on its {rel['packed'].shape[0]} packed rows "
                        f"(packing equal to HF's non-newline rows: {packing_equal}), + the {len(newlines)} newline "
                        f"indices; vtprune keep={k}, {options or 'default options'}: {len(our_rows)} LLM rows, "
                        f"{nl_in_rows} newlines, {ours_no_nl.count(-1)} zero rows (release {zeros_theirs}); "
                        f"vtprune.stats kept {len(kept)}",
            })
            # the default (newlines="drop", the release): its LLM input is the release's, logits included
            _, rows_d, logits_d, _ = _vtprune_run(model, inputs, start, k, options)
            seq_d = _index_rows(rows_d.to(visual.dtype), visual)
            logit = float((logits_d - rel_logits).abs().max())
            rows.append({
                "method": METHOD, "model": model_name, "variant": f"{variant}, as released", "budget": k,
                "jaccard": jaccard(sorted(i for i in seq_d if i >= 0), theirs),
                "kept_equal": seq_d == theirs_seq,  # the same rows in the same order: the same kept set
                "sequence_equal": seq_d == theirs_seq, "logit_max_abs": logit,
                "note": f"vtprune's default (newlines='drop', {options or 'default options'}) against the release's "
                        f"own LLM input {tuple(rel['embeds'].shape)} ({k} visual rows): its {len(rows_d)} visual rows "
                        f"in order, {seq_d.count(-1)} zero rows (release {zeros_theirs}); logits of the unpatched "
                        f"LLM on the release's new_input_embeds",
            })
    return rows


def summary(rows: list[dict[str, Any]]) -> None:
    for r in rows:
        if "packing_equal" in r:
            print(f"  {r['model'].split('), ')[-1]} {r['variant']} {r['budget']}: kept equal {r['kept_equal']}, "
                  f"sequence equal {r['sequence_equal']}, packing equal {r['packing_equal']}, zero rows "
                  f"{r['zero_rows']}, vtprune's function on the release's inputs equal {r['function_equal']}, "
                  f"max |attention diff| {r['attention_max_abs']:.1e}")


def main(argv: list[str] | None = None) -> int:
    return run_check(METHOD, compare, argv, __doc__ or "", summary=summary,
                     passed=lambda r: r.get("asserted") is False or (r["kept_equal"] and r["sequence_equal"]))


if __name__ == "__main__":
    sys.exit(main())
