"""Parity of vtprune's ``debias+pyramiddrop`` with the attention-debiasing release's patched PyramidDrop
(github.com/intcomp/attention-bias, read at e75ebe7; its ``PyramidDrop`` submodule pinned at Cooperx521/PyramidDrop
6444f30, ``patches/PyramidDrop.patch``): the kept visual tokens after each stage and the first-token logits.

The patch edits PyramidDrop's ``LlamaModel.pdrop_rank_drop`` (``llava/model/modeling_llama_pdrop.py``): at the first
stage only (``cur_num == 0``), where ``_cached_image_size`` is set (the eval loaders set it to the original
image's ``(width, height)``), the last instruction token's head-mean attention over the image is multiplied by
``generate_pad_mask(width, height, threshold=0.01)`` (0 for the patches of the 24 x 24 grid more than 1 %
padding by pad-to-square geometry; the budget is not lowered) and, with ``tag == "after"``
(``set_attention_score_frequency_file(tag, weight_file)``), by the weight file index for index
(``playground/data/weight/PyramidDrop/<task>.npy``, ``w_j = exp(-lambda j)``: lambda 3.99e-3 for GQA, the file
used here); its later stages rank by the plain attention. vtprune's ``debias+pyramiddrop`` defaults are that
patch's (`PyramidDropScorer.debias_release`: ``trend="exp:3.99e-3"``, ``pad_theta=0.01``, ``pad_mode="zero"``,
the first stage only), its padding read from the pixels.

What runs (both sides in the transformers 4.37 environment, as `pyramiddrop.py`, with its helpers in
`llava_repo_worker`): the release's ``llava`` package from a copy of ``REF/PyramidDrop`` in a temporary folder
with the modeling file's part of the patch applied by ``git apply``; ``LlavaLlamaForCausalLM_PDrop`` on the
weights of the tiny ``llava_llama`` model (32 layers, width 64, 576 tokens), ``layer_list [8, 16, 24]``,
``image_token_ratio_list [0.5, 0.25, 0.125]`` (the release's setting; vtprune ``keep=72``), the patch's
``set_attention_score_frequency_file("after", WEIGHT)`` and ``_cached_image_size`` as
``llava/eval/model_vqa_loader.py`` sets them, on LLaVA-1.5's ``vicuna_v1`` prompt with a 400 x 320 noise image
padded to a square by the repository's ``process_images`` (``image_aspect_ratio="pad"``): 144 of its 576
patches are more than 1 % padding (rows 0-2 and 21-23).

Rows, variants ``random`` and ``peaked``, modes as in `pyramiddrop.py` (``as released``: the release unchanged,
its first stage asserted, the later stages re-index positions; ``positions kept``: its next layers get the kept
rows' original positions, every stage and the logits asserted), vtprune with:

- ``trend="exp:<lambda>"`` with lambda fitted to the file (``log w_j`` linear in ``j``; the residual is in the
  note): asserted;
- its defaults (``exp:3.99e-3``, the file's lambda rounded): recorded, not asserted, so the rounding's effect
  is known;
- the fitted trend with ``every_stage=True`` (every stage debiased, vtprune's earlier default): recorded, not
  asserted, to show what the first-stage rule changes.

Without the correction (``trend="none", pad_theta=None``) the first stage's Jaccard against the release is
0.41-0.45, with the trend but no padding 0.60: both parts are exercised.

    python benchmarks/parity/debias_pyramiddrop.py --ref /path/to/attention-bias   # its PyramidDrop submodule populated
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import llava_repo_worker as worker  # noqa: E402
from common import env_name, run_check  # noqa: E402

METHOD = "debias-pyramiddrop"
PRESET = "debias+pyramiddrop"
ENV = env_name(METHOD)
LOGIT_TOLERANCE = 1e-4
LAYERS, HIDDEN, TOKENS = 32, 64, 576
MODEL = f"tiny llava_llama ({LAYERS} layers, width {HIDDEN}, {TOKENS} tokens)"
TINY = dict(layers=LAYERS, hidden=HIDDEN)
VARIANTS = ("random", "peaked")
MODES = ("as released", "positions kept")
LAYER_LIST, RATIOS = [8, 16, 24], [0.5, 0.25, 0.125]
KEEP = int(TOKENS * RATIOS[-1])  # 72
PATCH = "patches/PyramidDrop.patch"
MODELING = "llava/model/modeling_llama_pdrop.py"
WEIGHT = "playground/data/weight/PyramidDrop/gqa.npy"
IMAGE_SIZE = (400, 320)  # (width, height) of `llava_repo_worker.vicuna_inputs`' noise picture


def fitted_rate(weights) -> tuple[float, float]:
    """``(lambda, residual)``: ``log w_j = -lambda j`` least squares through 0, and the largest relative weight
    error ``|exp(-lambda j) / w_j - 1|``."""
    import numpy as np

    j = np.arange(weights.size, dtype=np.float64)
    rate = float(-(j @ np.log(weights)) / (j @ j))
    return rate, float(np.abs(np.exp(-rate * j) / weights - 1).max())


def patched_release(ref: Path, work: Path) -> Path:
    """A copy of ``REF/PyramidDrop``'s ``llava`` package in ``work`` with the modeling file's part of the patch
    applied (``git apply``); returns the folder to put first on ``PYTHONPATH``."""
    source = ref / "PyramidDrop"
    if not (source / MODELING).is_file():
        raise SystemExit(f"{METHOD} parity: {source / MODELING} is missing: populate the PyramidDrop submodule "
                         f"(Cooperx521/PyramidDrop 6444f30), e.g. `git -C {ref} submodule update --init PyramidDrop`")
    root = work / "release"
    shutil.copytree(source / "llava", root / "llava")
    if "set_attention_score_frequency_file" not in (root / MODELING).read_text():
        done = subprocess.run(["git", "apply", f"--include={MODELING}", str((ref / PATCH).resolve())], cwd=root,
                              capture_output=True, text=True)
        if done.returncode != 0 or "set_attention_score_frequency_file" not in (root / MODELING).read_text():
            raise SystemExit(f"{METHOD} parity: {PATCH} does not apply to {source / MODELING}: {done.stderr.strip()}")
    return root


# --- workers (run by compare() in the transformers 4.37 environment) -------------------------------------

def _vtprune_side(work: Path) -> None:
    """Both variants' weights and inputs, vtprune with the fitted and the default trend; writes ``vtprune.json``."""
    settings = json.loads((work / "options.json").read_text())["settings"]
    out = {}
    for variant in VARIANTS:
        factor = 8.0 if variant == "peaked" else None
        model, ids, images = worker.prepared_variant(work, variant, factor, **TINY)
        for name, extra in settings.items():
            logits, st = worker.vtprune_prefill(model, ids, images, PRESET, keep=KEEP, **extra)
            out[f"{variant}/{name}"] = {"layers": [s["layer"] for s in st.stages],
                                        "kept": [s["kept"][0].tolist() for s in st.stages],
                                        "logits": logits.tolist()}
    (work / "vtprune.json").write_text(json.dumps(out))


def _release_side(work: Path) -> None:
    """The patched release on the same weights and inputs, in both modes; writes ``release.json``."""
    import torch
    from llava.model.language_model.llava_llama_pdrop import LlavaLlamaForCausalLM_PDrop

    weight = json.loads((work / "options.json").read_text())["weight"]
    out = {}
    for variant in VARIANTS:
        saved = torch.load(work / f"{variant}.pt")
        base, _, _ = worker.tiny_model(work, **TINY)
        model = worker.release_model(LlavaLlamaForCausalLM_PDrop, base.config, saved["state"])
        lm = model.model
        lm.layer_list, lm.image_token_ratio_list = list(LAYER_LIST), [1.0, *RATIOS]
        lm.set_attention_score_frequency_file("after", weight)  # as llava/eval/model_vqa_loader.py (patched)
        lm._cached_image_size = IMAGE_SIZE  # model.model._cached_image_size = image_sizes[0]
        for mode in MODES:
            kept, logits = worker.rank_drop_forward(model, saved["input_ids"], saved["images"],
                                                    mode == "positions kept", "pdrop_rank_drop", TOKENS)
            out[f"{variant}/{mode}"] = {"kept": kept, "logits": logits}
    (work / "release.json").write_text(json.dumps(out))


# --- the check ---------------------------------------------------------------------------------------------

def compare(ref: Path) -> list[dict]:
    import numpy as np

    weight = (ref / WEIGHT).resolve()
    if not weight.is_file():
        raise SystemExit(f"{ref} is not a checkout of intcomp/attention-bias: no {WEIGHT}")
    rate, residual = fitted_rate(np.load(weight))
    settings = {"fitted": {"trend": f"exp:{rate!r}"}, "default": {},
                "every stage": {"trend": f"exp:{rate!r}", "every_stage": True}}
    with tempfile.TemporaryDirectory(prefix=f"parity-{METHOD}-") as tmp:
        release = patched_release(ref, Path(tmp))
        ours, theirs = worker.run_two_sides(METHOD, __file__, release,
                                            files={"options.json": json.dumps({"settings": settings, "weight": str(weight)})})
    rows = []
    for variant in VARIANTS:
        for name in settings:
            trend = {"fitted": f"exp:{rate:.6g} fitted to {WEIGHT} (residual {residual:.1e})",
                     "default": "the defaults (exp:3.99e-3)",
                     "every stage": f"exp:{rate:.6g}, every_stage=True (vtprune's earlier default)"}[name]
            for mode in MODES:
                staged = worker.staged_rows(
                    METHOD, MODEL, f"{variant}, {name} trend", ours[f"{variant}/{name}"], theirs[f"{variant}/{mode}"],
                    LAYER_LIST, mode, f"release tag 'after', layer_list {LAYER_LIST}, ratios {RATIOS}, pad threshold "
                    f"0.01; vtprune {PRESET} keep={KEEP}, {trend}")
                for row in staged if name != "fitted" else ():
                    row["asserted"] = False
                    row["note"] += ("; not asserted (the rounded lambda)" if name == "default" else
                                    "; not asserted (the release debiases the first stage only)")
                rows += staged
    return rows


def main(argv: list[str] | None = None) -> int:
    return run_check(METHOD, compare, argv, __doc__,
                     passed=lambda r: r.get("asserted") is False or r["kept_equal"])


if __name__ == "__main__":
    worker.worker_entry({"vtprune": _vtprune_side, "release": _release_side})
    sys.exit(main())
