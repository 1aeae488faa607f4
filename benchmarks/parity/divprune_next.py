"""Parity of vtprune's ``divprune`` with DivPrune's release (github.com/vbdi/divprune, read at 799e2d9) on
LLaVA-NeXT: the kept visual tokens and the first-token logits.

The release's LLaVA-NeXT path is the one of LLaVA-1.5 (``LLaVA/llava/model/llava_arch.py``,
``prepare_inputs_labels_for_multimodal``, run with ``LAYER_INDEX=0``, ``SUBSET_RATIO`` the kept ratio; its
``run_Divprune.sh`` names ``liuhaotian/llava-v1.6-vicuna-7b``): for a list of image features ("this is for
LLaVA 1.6") ``img_feature_len = image_features[0].shape[0]``, the whole image's packed sequence after
``spatial_unpad`` (base tile, then the unpadded high-resolution grid with one ``image_newline`` row per grid
row), and ``DivPrune`` runs once on those rows of the LLM input embeddings, keeping
``int(round(SUBSET_RATIO * img_feature_len))`` of them in sequence order, the shortened sequence handed to
the LLM with default (contiguous) positions. So its budget is per image over all tiles, as vtprune's; but
the newline rows are candidates like any other row and count in ``img_feature_len`` (llava_arch.py lines
355-375), as under vtprune's default ``newlines="rank"``.

What runs: the release's ``LlavaMetaForCausalLM.DivPrune`` (with its ``pairwise_cosine_similarity``, on a
stand-in ``self``; the file imported with `common.load_llava_arch`) on the LLM input embeddings of the same
forward vtprune's run sees: the tiny random-weight ``LlavaNextForConditionalGeneration`` of
``vtprune.toy.tiny`` (anyres pinpoints up to 672 x 672), one 400 x 500 noise image (a 2 x 2 grid: base tile
+ 4 tiles, unpadded, with newlines), variants ``random`` and ``peaked``. Modes (the ``variant`` column), both
asserted (kept set, and the first-token logits of the release's pruned sequence,
`common.logits_without_unkept`, against vtprune's run):

- ``default (as released)``: the release's ``DivPrune`` on every row of the image, newlines included, with
  ``threshold_ratio = budget / img_feature_len`` for an int budget (it keeps ``budget`` rows, at most one
  of the identical newline rows among them) and the ratio itself for 0.098, against vtprune's default.
- ``newlines='keep'``: the release's ``DivPrune`` on the image's rows other than the newline rows, with
  ``image_feature_length`` their count and ``threshold_ratio = budget / count`` (the release's rounding
  then keeps ``budget``), the newline rows added back, against vtprune's ``newlines="keep"``.

The release's span is ``new_input_embeds[0][35:35 + img_feature_len]`` (``SYS_TOKEN_LEN = 35``, vicuna_v1's
system prompt); here the image's own place in the tiny prompt. Budgets 64, 128, 192 tokens and
the release's ``SUBSET_RATIO=0.098`` (vtprune ``keep=0.098``).

    python benchmarks/parity/divprune_next.py --ref /path/to/divprune
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
    load_llava_arch,
    logits_without_unkept,
    peaked,
    run_check,
    single_threaded,
    tiny_next_inputs,
    vtprune_run,
)

METHOD = "divprune-next"
PRESET = "divprune"
ENV = env_name(METHOD)
LOGIT_TOLERANCE = 1e-4
BUDGETS: tuple[int | float, ...] = (64, 128, 192, 0.098)  # int: tokens kept; 0.098 the release's ratio
PROMPT = "USER: <image>\nWhat is in the picture? ASSISTANT:"
IMAGE = (400, 500)  # height, width: a 2 x 2 anyres grid (672 x 672 pinpoint)


def load_release(ref: Path) -> Any:
    """The release's ``LlavaMetaForCausalLM`` (its ``llava_arch.py``; the imports DivPrune never uses are stand-ins)."""
    return load_llava_arch(ref / "LLaVA/llava/model/llava_arch.py", "divprune_next_release").LlavaMetaForCausalLM


def release_divprune(meta_cls: Any, rows: Any, ratio: float) -> list[int]:
    """The release's ``DivPrune`` on ``rows`` ``[n, D]`` with ``image_feature_length = n``: the picks, sorted."""
    import torch

    host = types.SimpleNamespace()
    host.pairwise_cosine_similarity = lambda m: meta_cls.pairwise_cosine_similarity(host, m)
    with torch.no_grad():
        picks, _ = meta_cls.DivPrune(host, rows, rows.shape[0], None, threshold_ratio=ratio)
    return sorted(picks.tolist())


@single_threaded
def compare(ref: Path) -> list[dict[str, Any]]:
    import torch

    from vtprune.toy.tiny import tiny_llava_next

    meta_cls = load_release(ref)
    inputs = tiny_next_inputs(PROMPT, IMAGE)
    rows: list[dict[str, Any]] = []
    for variant in ("random", "peaked"):
        model = tiny_llava_next()
        if variant == "peaked":
            peaked(model)
        embeds = lm_input_embeds(model, inputs)
        start, n = image_span(model, inputs)
        visual = embeds[0, start:start + n]
        is_nl = (visual == model.model.image_newline.to(visual.dtype)).all(-1)
        newlines = torch.nonzero(is_nl).flatten().tolist()
        prunable = torch.nonzero(~is_nl).flatten()
        m = prunable.numel()
        if not newlines or n <= 576:
            raise SystemExit(f"{METHOD} parity: expected a tiled image with newline rows (n={n}, newlines={len(newlines)})")
        model_name = f"tiny-llava-next ({IMAGE[0]}x{IMAGE[1]}: {n} visual tokens, {len(newlines)} newlines)"
        for budget in BUDGETS:
            # the default (newlines="rank"), as released: the newlines are candidates and count in
            # img_feature_len, so an int budget counts every row of the image and a ratio keeps round(r * n)
            ours, ours_logits = vtprune_run(model, inputs, PRESET, keep=budget)
            ours = sorted(ours)
            ratio_all = budget if isinstance(budget, float) else budget / n
            released = release_divprune(meta_cls, visual, ratio_all)
            nl_picked = len(set(released) & set(newlines))
            logit_all = float((ours_logits - logits_without_unkept(model, inputs, released, embeds)).abs().max())
            rows.append({"method": METHOD, "model": model_name, "variant": f"{variant}, default (as released)",
                         "budget": budget, "jaccard": jaccard(ours, released), "kept_equal": ours == released,
                         "logit_max_abs": logit_all,
                         "note": f"release DivPrune on all {n} rows of the image (img_feature_len {n}), "
                                 f"threshold_ratio {ratio_all:.4f}: keeps {len(released)} rows, {nl_picked} of "
                                 f"them newlines; vtprune keep={budget} (keeps {len(ours)}, "
                                 f"{len(set(ours) & set(newlines))} newlines)"})
            # newlines="keep": the release's function on the other rows, the newline rows added back
            k = int(round(budget * m)) if isinstance(budget, float) else budget
            kept, kept_logits = vtprune_run(model, inputs, PRESET, keep=budget, newlines="keep")
            kept = sorted(kept)
            ratio = budget if isinstance(budget, float) else k / m
            picks = release_divprune(meta_cls, visual[prunable], ratio)
            theirs = sorted(prunable[picks].tolist() + newlines)
            logit = float((kept_logits - logits_without_unkept(model, inputs, theirs, embeds)).abs().max())
            rows.append({"method": METHOD, "model": model_name, "variant": f"{variant}, newlines='keep'",
                         "budget": budget, "jaccard": jaccard(kept, theirs), "kept_equal": kept == theirs,
                         "logit_max_abs": logit,
                         "note": f"release DivPrune on the {m} non-newline rows, threshold_ratio {ratio:.4f} "
                                 f"(keeps {len(picks)}), + {len(newlines)} newlines; vtprune keep={budget}, "
                                 f"newlines='keep' (keeps {len(kept)}); Jaccard of its non-newline rows with "
                                 f"the default's {jaccard(set(kept) - set(newlines), set(ours) - set(newlines)):.3f}"})
    return rows


def main(argv: list[str] | None = None) -> int:
    return run_check(METHOD, compare, argv, __doc__ or "")


if __name__ == "__main__":
    sys.exit(main())
