"""Parity of vtprune's ``debias+fastv`` with the attention-debiasing release (github.com/intcomp/attention-bias, read
at e75ebe7, its ``FastV`` submodule pinned at pkunlp-icler/FastV d165972): the kept visual tokens and the
first-token logits.

The release is a set of patches to the pruning methods' own code (``patches/<host>.patch``, applied by
``scripts/apply_patches.sh`` to the submodules of ``git clone --recursive``) and weight files
(``playground/data/weight/<host>/*.npy``, 576 float64 values, one per visual-token index). For FastV
(``scripts/run_fastv.sh``: ``TAG=after``, ``WEIGHT=playground/data/weight/FastV/weight.npy`` for every task;
``scripts/FastV/*.sh``: ``Ks=2``, ``fast-v-sys-length 36``, ``fast-v-image-token-length 576``) the patch edits
FastV's ``LlamaModel.forward`` (``src/transformers/src/transformers/models/llama/modeling_llama.py``), in the
attention-mask branch (``fast_v_inplace`` stays at its config default False; the eval loader never sets it):
on reaching decoder layer ``K`` it takes layer ``K - 1``'s attention averaged over heads, the last token's row
over the image span, and, with ``tag == "after"``,

- where ``_cached_image_size`` is set (the eval loader sets it to the original image's ``(width, height)``):
  multiplies the scores by ``generate_pad_mask(width, height, threshold=0.5)`` (0 for the patches of the
  24 x 24 grid more than half padding by pad-to-square geometry, else 1) and lowers the rank to the count of
  valid patches where that is smaller;
- multiplies them by ``np.load(weight)`` index for index, and keeps the top ``fast_v_attention_rank``; the
  other image tokens are masked out of every later layer's attention (the sequence keeps its length and
  positions).

FastV's ``weight.npy`` is exactly ``1 / (1 + 3.0152e-3 j - 1.4598e-5 j^2 + 2.5691e-8 j^3)`` (a cubic in the index
``j``, residual 2e-15): vtprune's ``Debias`` multiplies by ``T(0) / T(j / (n - 1))``, so the release's curve is
vtprune's ``trend=[c1, c2, c3]`` with the cubic refitted here from the file (least squares in ``x = j / 575``).
vtprune has no option taking a weight per index; the cubic option is its documented route and reproduces the
file to float64 rounding (the fit's residual is in each row's note).

What runs: the release's ``modeling_llama.py`` (read from ``REF/FastV``, the submodule at d165972; the
modeling-file part of ``patches/FastV.patch`` is applied with ``git apply`` to a copy in a temporary folder
where the checkout's file is not yet patched; ``scripts/apply_patches.sh`` itself refuses the patch at the
pinned commit, whose tree lacks the patch's eval loaders) imported as a module of the installed transformers'
llama package; its ``LlamaModel`` built on the tiny LLaVA-1.5 model's text config (``vtprune.toy.tiny``: 576
visual tokens, so the 576-entry file applies index for index) with the ``fast_v_*`` fields, the tiny model's
language-model weights, ``define_attention_map("after", REF/playground/data/weight/FastV/weight.npy)`` and
``_cached_image_size`` as the eval loader sets them, run on the tiny model's own input embeddings with
``output_attentions=True`` (as the loader's ``generate`` passes). The image is a 500 x 400 noise picture
padded to a square by the release's own ``expand2square`` (``REF/FastV/src/LLaVA/llava/mm_utils.py``, with
LLaVA-1.5's background ``image_mean * 255``): 96 of the 576 patches are padding (rows 0-1 and 22-23), so
budget 512 exercises the lowered rank. The kept set is read from the attention mask the release hands
layer ``K``; the logits are the tiny model's ``lm_head`` on the release's final hidden state.

vtprune: ``debias+fastv`` with ``layer = K - 1 = 1`` (the release's ``Ks=2``; vtprune's fastv ``layer`` is the
layer whose output it prunes, FastV's K the first layer that sees fewer tokens, as in the fastv check),
``pad_theta=0.5`` (its default, the release's threshold; vtprune reads the padding from the pixels) and

- ``trend=[c1, c2, c3]`` fitted from the release's file (asserted: Jaccard 1, logits within 1e-4);
- ``trend="auto"`` (its default: no calibration file for the tiny model, so FastV's rounded cubic; not
  asserted, recorded with its Jaccard and logit difference so the rounding's effect is known).

Variants ``random`` and ``peaked`` (`common.peaked`), budgets 64 / 128 / 192 (``fast_v_attention_rank``) and 512.
The weights decide most of the set: with ``trend='none'`` (padding only) vtprune's Jaccard against the release
is 0.10 / 0.20-0.21 / 0.26 at 64 / 128 / 192 (1 at 512, where all 480 valid patches stay), and plain ``fastv``'s
0.09 / 0.14 / 0.18 / 0.74.
``debias+pyramiddrop`` is compared in `debias_pyramiddrop.py`. Not compared: ``debias+sparsevlm``: its patch
debiases SparseVLMs' first stage (``layer_idx == 2`` in ``score.py``) with a pad mask from a bilinear 24 x 24
resize of the pixel mask (``>= 0.5``), which vtprune approximates by the area rule (``pad_theta=0.5``,
``pad_mode="zero"``, its ``debias_release``); the patch targets SparseVLMs' v1.5 branch (734d900), whose decoder
layer calls ``self.flash_attn``, an attribute its ``__init__`` leaves commented out (FlashAttention-2 only), so
that branch does not run here (vtprune's ``sparsevlm`` itself is compared with the release's main branch,
26a5f48, in `sparsevlm.py`).

    python benchmarks/parity/debias.py --ref /path/to/attention-bias
"""

from __future__ import annotations

import copy
import shutil
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    env_name,
    fake_modules,
    image_span,
    jaccard,
    llava_stubs,
    lm_input_embeds,
    load_file,
    peaked,
    run_check,
    single_threaded,
    tiny_llava_inputs,
    vtprune_run,
)

METHOD = "debias"
ENV = env_name(METHOD)
LOGIT_TOLERANCE = 1e-4
TOKENS, GRID = 576, 24
K = 2  # the release's Ks (scripts/FastV/*.sh); vtprune layer = K - 1
BUDGETS = (64, 128, 192, 512)  # fast_v_attention_rank; 512 exceeds the image's 480 valid patches
IMAGE_SIZE = (500, 400)  # (width, height) of the noise picture before pad-to-square
PROMPT = "USER: <image>\nWhat is in the picture? ASSISTANT:"
MODEL = "tiny-llava-1.5 (576 tokens)"
PATCH = "patches/FastV.patch"
WEIGHT = "playground/data/weight/FastV/weight.npy"
FASTV_MODELING = "src/transformers/src/transformers/models/llama/modeling_llama.py"
MM_UTILS = "src/LLaVA/llava/mm_utils.py"
MODULE = "transformers.models.llama.debias_release_modeling_llama"


def patched_modeling_file(ref: Path, work: Path) -> Path:
    """The release's FastV ``modeling_llama.py`` with the debiasing patch: the checkout's own file where
    ``scripts/apply_patches.sh`` already patched it, else a copy in ``work`` patched with ``git apply`` (only the
    modeling file's part of ``patches/FastV.patch``)."""
    source = ref / "FastV" / FASTV_MODELING
    if not source.is_file():
        raise SystemExit(f"{METHOD} parity: {source} is missing: populate the FastV submodule (pkunlp-icler/FastV "
                         f"d165972), e.g. `git -C {ref} submodule update --init FastV`")
    if "define_attention_map" in source.read_text():
        return source
    target = work / FASTV_MODELING
    target.parent.mkdir(parents=True)
    shutil.copyfile(source, target)
    done = subprocess.run(["git", "apply", f"--include={FASTV_MODELING}", str((ref / PATCH).resolve())], cwd=work,
                          capture_output=True, text=True)
    if done.returncode != 0 or "define_attention_map" not in target.read_text():
        raise SystemExit(f"{METHOD} parity: {PATCH} does not apply to {source}: {done.stderr.strip()}")
    return target


def load_release(path: Path) -> Any:
    """The patched file as a module of the installed transformers' llama package (its relative imports resolve
    there)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(MODULE, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[MODULE] = module
    spec.loader.exec_module(module)
    return module


def fitted_trend(weights: Any) -> tuple[list[float], float]:
    """``([c1, c2, c3], residual)``: the cubic ``T(x) = 1 + c1 x + c2 x^2 + c3 x^3`` (``x = j / 575``) least-squares
    fitted to ``1 / w`` of the release's file, and its largest relative weight error ``|T(0) / T(x_j) / w_j - 1|``."""
    import numpy as np

    x = np.arange(weights.size) / (weights.size - 1)
    c = np.polynomial.polynomial.polyfit(x, 1.0 / weights, 3)
    c = c / c[0]
    fit = 1.0 / np.polynomial.polynomial.polyval(x, c)
    return [float(v) for v in c[1:]], float(np.abs(fit / weights - 1).max())


def release_run(release: Any, model: Any, embeds: Any, start: int, rank: int, weight: Path) -> dict[str, Any]:
    """The release's debiased FastV (``tag="after"``) on ``embeds``: the kept image indices (from the attention
    mask it hands layer ``K``), the first-token logits and its padding mask."""
    import torch

    text = model.config.text_config
    config = copy.deepcopy(text)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        config.rope_scaling = None  # the 4.31 file reads rope_scaling["type"] where set; plain rope, base 10000
    config.use_fast_v, config.fast_v_inplace = True, False
    config.fast_v_sys_length, config.fast_v_image_token_length = start, TOKENS
    config.fast_v_attention_rank, config.fast_v_agg_layer = rank, K
    config._attn_implementation = "eager"  # the file's own attention (it computes the maps FastV reads)
    lm = release.LlamaModel(config).eval()
    missing, unexpected = lm.load_state_dict(model.model.language_model.state_dict(), strict=False)
    if unexpected or any(".rotary_emb." not in n for n in missing):
        raise SystemExit(f"{METHOD} parity: weights do not fit the release's LlamaModel: missing {missing}, "
                         f"unexpected {unexpected}")
    lm.reset_fastv()  # as the eval loader: model.model.reset_fastv(); model.model.define_attention_map(tag, weight)
    lm.define_attention_map("after", str(weight))
    lm._cached_image_size = IMAGE_SIZE  # model.model._cached_image_size = image_sizes[0]
    seen = []
    plain = lm.layers[K].forward

    def recorded(*args, **kwargs):
        seen.append(kwargs["attention_mask"].clone())
        return plain(*args, **kwargs)

    lm.layers[K].forward = recorded
    with torch.no_grad():
        out = lm(inputs_embeds=embeds, output_attentions=True, use_cache=False, return_dict=True)
        logits = model.lm_head(out.last_hidden_state[:, -1])[0]
    row = seen[0][0, 0, -1, start:start + TOKENS]  # the last query's additive mask over the image keys
    kept = torch.nonzero(row > torch.finfo(row.dtype).min / 2).flatten().tolist()
    pad = release.generate_pad_mask(*IMAGE_SIZE, threshold=0.5)
    return {"kept": kept, "logits": logits, "valid": int(pad.sum())}


@single_threaded
def compare(ref: Path) -> list[dict[str, Any]]:
    import numpy as np
    from PIL import Image

    from vtprune.scorers.debias import default_trend, padding_fraction
    from vtprune.scorers.fastv import FastVScorer
    from vtprune.toy.tiny import tiny_llava, tiny_llava_processor

    weight = ref / WEIGHT
    weights = np.load(weight)
    if weights.shape != (TOKENS,):
        raise SystemExit(f"{METHOD} parity: {weight} holds {weights.shape} values, not {TOKENS}")
    trend, residual = fitted_trend(weights)
    default = default_trend(FastVScorer()).weights(TOKENS).double().numpy()
    default_gap = float(np.abs(default / weights - 1).max())

    with fake_modules(llava_stubs()):
        expand2square = load_file(ref / "FastV" / MM_UTILS, "debias_release_mm_utils").expand2square
    mean = tiny_llava_processor().image_processor.image_mean
    noise = np.random.default_rng(0).integers(0, 256, (IMAGE_SIZE[1], IMAGE_SIZE[0], 3), dtype=np.uint8)
    picture = expand2square(Image.fromarray(noise), tuple(int(x * 255) for x in mean))
    inputs = tiny_llava_inputs(PROMPT, images=[picture])
    frac = padding_fraction(inputs["pixel_values"][0], GRID)
    ours_pad = int((frac > 0.5).sum()) if frac is not None else 0

    rows = []
    with tempfile.TemporaryDirectory(prefix="parity-debias-") as tmp:
        release = load_release(patched_modeling_file(ref, Path(tmp)))
        try:
            for variant in ("random", "peaked"):
                model = tiny_llava()
                if variant == "peaked":
                    peaked(model)
                start, n = image_span(model, inputs)
                if n != TOKENS:
                    raise SystemExit(f"{METHOD} parity: the tiny prompt holds {n} visual tokens, not {TOKENS}")
                embeds = lm_input_embeds(model, inputs)
                for budget in BUDGETS:
                    theirs = release_run(release, model, embeds, start, budget, weight)
                    base = (f"release: tag after, fast_v_agg_layer {K}, fast_v_attention_rank {budget}, "
                            f"fast_v_sys_length {start}, {TOKENS - theirs['valid']} padding patches "
                            f"(generate_pad_mask threshold 0.5), keeps {len(theirs['kept'])}; vtprune keep={budget}, "
                            f"layer={K - 1}, pad_theta=0.5 ({ours_pad} padding patches from the pixels)")
                    for label, options, note in (
                        ("release weights", {"trend": trend},
                         f"trend={[round(c, 6) for c in trend]} fitted to 1/w of {WEIGHT} (max relative weight "
                         f"error {residual:.1e})"),
                        ("vtprune default trend", {},
                         f"trend='auto' (FastV's rounded cubic; max relative weight difference to the file "
                         f"{default_gap:.1e}); not asserted"),
                    ):
                        kept, logits = vtprune_run(model, inputs, "debias+fastv", keep=budget, layer=K - 1, **options)
                        kept = sorted(kept)
                        row = {"method": METHOD, "model": MODEL, "variant": f"{variant}, {label}", "budget": budget,
                               "jaccard": jaccard(kept, theirs["kept"]), "kept_equal": kept == theirs["kept"],
                               "logit_max_abs": float((logits - theirs["logits"]).abs().max()),
                               "note": f"{base}, {note}; vtprune keeps {len(kept)}"}
                        if not options:
                            row["asserted"] = False
                        rows.append(row)
        finally:
            sys.modules.pop(MODULE, None)
    return rows


def main(argv: list[str] | None = None) -> int:
    return run_check(METHOD, compare, argv, __doc__ or "",
                     passed=lambda r: r["kept_equal"] or r.get("asserted") is False)


if __name__ == "__main__":
    sys.exit(main())
