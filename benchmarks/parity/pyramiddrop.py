"""Parity of vtprune's ``pyramiddrop`` with PyramidDrop's release (github.com/Cooperx521/PyramidDrop, read at
6444f30): the kept visual tokens after each of its three stages and the first-token logits.

The release is a fork of the LLaVA codebase on transformers 4.37: ``LlavaLlamaForCausalLM_PDrop``
(llava/model/language_model/llava_llama_pdrop.py, what ``load_pretrained_model(..., pdrop_infer=True)`` builds)
runs ``LlamaModel.pdrop_forward``, which after each layer ``l`` with ``l + 1`` in ``layer_list`` calls
``pdrop_rank_drop`` (llava/model/modeling_llama_pdrop.py): the last instruction token's attention in layer
``l + 1``, re-computed on its input, ranks the image tokens and the top ``int(576 * ratio)`` stay. Both sides
run in the transformers 4.37 environment of ``scripts/setup_llava_repo.sh`` (``.venv-llava``, or the
interpreter in ``$VTPRUNE_LLAVA_PYTHON``), each in its own process:

- vtprune: the tiny ``llava_llama`` model of ``vtprune.toy.tiny_llava_repo`` with 32 layers of width 64 (the
  layer indices of LLaVA-1.5-7B/13B's scripts, 576 tokens per image), the repository's own ``llava`` package,
  ``vtprune.apply(model, "pyramiddrop", ...)``;
- the release: the same weights (the state dict, ``peaked`` variant included) loaded into
  ``LlavaLlamaForCausalLM_PDrop`` with the release's ``llava`` package first on ``sys.path``, its
  ``layer_list`` / ``image_token_ratio_list`` set as ``llava/eval/model_vqa_loader.py`` sets them, a wrapper
  on ``pdrop_rank_drop`` recording which rows of the sequence each stage returns (matched row by row to
  its input, exact copies) without changing them.

The prompt is LLaVA-1.5's ``vicuna_v1`` conversation with one image, batch 1 (the release's evaluation).
Settings: ``release`` (``layer_list [8,16,24]``, ``image_token_ratio_list [0.5,0.25,0.125]``, the only
setting of its scripts/v1_5/pdrop_eval; vtprune's default with ``keep=72``) and ``shallow`` (the
authors' advice for small budgets in issue #29: ``[2,8,16]``, ``[0.19,0.0361,0.00686]``; vtprune
``layers=[1,7,15]`` and the release's floored counts as ``ratios`` / ``keep``).

Modes (the ``variant`` column): vtprune keeps the original positions of the kept tokens where the release
re-indexes them contiguously (a documented deviation), so from the second stage on the two rank with
different RoPE positions. ``as released``: the release unchanged; its first stage is compared (the later
stages' Jaccard and the logit difference are reported in ``note``, not asserted). ``positions kept``: the
wrapper hands the next layers the kept rows' original ``position_ids`` instead of the re-indexed ones
(and the release's rotary tables are not cut at the shortened length, which only that needs): every
stage and the first-token logits are compared.

    python benchmarks/parity/pyramiddrop.py --ref /path/to/PyramidDrop
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import llava_repo_worker as worker  # noqa: E402
from common import env_name, run_check  # noqa: E402

METHOD = "pyramiddrop"
ENV = env_name(METHOD)
LOGIT_TOLERANCE = 1e-4
LAYERS, HIDDEN, TOKENS = 32, 64, 576  # LLaVA-1.5's depth and grid, a tiny width
MODEL = f"tiny llava_llama ({LAYERS} layers, width {HIDDEN}, {TOKENS} tokens)"
TINY = dict(layers=LAYERS, hidden=HIDDEN)  # tiny_llava_repo's options
VARIANTS = ("random", "peaked")
MODES = ("as released", "positions kept")
SETTINGS = {  # name: (the release's layer_list, its image_token_ratio_list)
    "release": ([8, 16, 24], [0.5, 0.25, 0.125]),
    "shallow": ([2, 8, 16], [0.19, 0.0361, 0.00686]),
}


def vtprune_options(setting: str) -> dict:
    """vtprune's options for a setting: the release's ``layer_list`` names the layer *after which* nothing
    is left to prune yet (``rank_layer = layer_idx + 1``), vtprune the layer whose output is pruned."""
    layer_list, ratios = SETTINGS[setting]
    if setting == "release":
        return {"keep": int(TOKENS * ratios[-1])}  # the default layers on 32 layers: [7, 15, 23]
    counts = [int(TOKENS * r) for r in ratios]  # the release floors
    return {"layers": [layer - 1 for layer in layer_list], "ratios": [c / TOKENS for c in counts[:-1]],
            "keep": counts[-1]}


# --- workers (run by compare() in the transformers 4.37 environment) -------------------------------------

def _vtprune_side(work: Path) -> None:
    """Build the inputs and the weights of both variants, run vtprune on them; writes ``vtprune.json``."""
    out = {}
    for variant in VARIANTS:
        factor = 8.0 if variant == "peaked" else None  # `peaked`'s default
        model, ids, images = worker.prepared_variant(work, variant, factor, **TINY)
        for setting in SETTINGS:
            logits, st = worker.vtprune_prefill(model, ids, images, METHOD, **vtprune_options(setting))
            out[f"{variant}/{setting}"] = {"layers": [s["layer"] for s in st.stages],
                                           "kept": [s["kept"][0].tolist() for s in st.stages],
                                           "logits": logits.tolist()}
    (work / "vtprune.json").write_text(json.dumps(out))


def _release_side(work: Path) -> None:
    """The release's forward on the same weights and inputs, in both modes; writes ``release.json``."""
    import torch
    from llava.model.language_model.llava_llama_pdrop import LlavaLlamaForCausalLM_PDrop

    out = {}
    for variant in VARIANTS:
        saved = torch.load(work / f"{variant}.pt")
        base, _, _ = worker.tiny_model(work, **TINY)
        model = worker.release_model(LlavaLlamaForCausalLM_PDrop, base.config, saved["state"])
        lm = model.model
        for setting, (layer_list, ratios) in SETTINGS.items():
            for mode in MODES:
                lm.layer_list = list(layer_list)  # as llava/eval/model_vqa_loader.py sets them
                lm.image_token_ratio_list = [1.0, *ratios]
                kept, logits = worker.rank_drop_forward(model, saved["input_ids"], saved["images"],
                                                        mode == "positions kept", "pdrop_rank_drop", TOKENS)
                out[f"{variant}/{setting}/{mode}"] = {"kept": kept, "logits": logits}
    (work / "release.json").write_text(json.dumps(out))


# --- the check ---------------------------------------------------------------------------------------------

def compare(ref: Path) -> list[dict]:
    ours, theirs = worker.run_two_sides(METHOD, __file__, ref)
    rows = []
    for variant in VARIANTS:
        for setting, (layer_list, ratios) in SETTINGS.items():
            for mode in MODES:
                rows += worker.staged_rows(
                    METHOD, MODEL, f"{variant}, {setting}", ours[f"{variant}/{setting}"],
                    theirs[f"{variant}/{setting}/{mode}"], layer_list, mode,
                    f"layer_list {layer_list}, image_token_ratio_list {ratios}; vtprune {vtprune_options(setting)}")
    return rows


def main(argv: list[str] | None = None) -> int:
    return run_check(METHOD, compare, argv, __doc__)


if __name__ == "__main__":
    worker.worker_entry({"vtprune": _vtprune_side, "release": _release_side})
    sys.exit(main())
