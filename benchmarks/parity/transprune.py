"""Parity of vtprune's ``transprune`` with TransPrune's release (github.com/liaolea/TransPrune, read at
c9e8284): the kept visual tokens after each of its three stages and the first-token logits.

The release is a fork of the LLaVA codebase on transformers 4.37: ``LlavaLlamaForCausalLM_TransPrune``
(llava/model/language_model/llava_llama_transprune.py, what ``load_pretrained_model(..., method='transprune')``
builds) runs ``LlamaModel.transprune_forward`` (llava/model/modeling_llama_transprune.py): the decoder layers
``LlamaDecoderLayer_TransPrune`` of ``accmulating_layer_list`` return their token transition weights
(``compute_transf_weight`` of the attention and MLP sublayers), and after each layer ``l`` with ``l + 1`` in
``pruning_layer_list`` ``transprune_rank_drop`` adds the normalised accumulated TTV to the normalised
instruction attention of layer ``l + 1`` and keeps the top ``int(576 * ratio)``. Both sides run in the
transformers 4.37 environment of ``scripts/setup_llava_repo.sh`` (``.venv-llava``, or the interpreter in
``$VTPRUNE_LLAVA_PYTHON``), each in its own process:

- vtprune: the tiny ``llava_llama`` model of ``vtprune.toy.tiny_llava_repo`` with 32 layers of width 64
  (LLaVA-1.5-7B's depth, 576 tokens per image), the repository's own ``llava`` package,
  ``vtprune.apply(model, "transprune", keep=K)`` (the default layers 6, 8, 11 and ratios 0.875, 0.625);
- the release: the same weights (the state dict, ``peaked`` variant included) loaded into
  ``LlavaLlamaForCausalLM_TransPrune`` with the release's ``llava`` package first on ``sys.path``, its
  lists set as ``llava/eval/model_vqa_loader.py`` sets them from the scripts/transprune/v1_5_test settings
  (``accmulating_layer_list [7..12]``, ``pruning_layer_list [7,9,12]``, ``image_token_ratio_list
  [0.875,0.625,0.125]``, the only setting there: 504, 360, 72 tokens), a wrapper on ``transprune_rank_drop``
  recording which rows of the sequence each stage returns (matched row by row to its input, exact copies).
  Its CUDA timing calls (``torch.cuda.Event`` / ``synchronize`` around the layers, no part of the selection)
  are no-ops on this CPU run, and its unused ``from sklearn.cluster import DBSCAN`` gets a stub module.

Budgets: the release's 72 and 64 / 128 / 192 (the last ratio ``(K + 0.5) / 576``, which the release floors to
``K``; the first two stages stay at 504 and 360). The prompt is LLaVA-1.5's ``vicuna_v1`` conversation with one
image, batch 1 (the release's evaluation; its TTV softmax runs over the whole batch, so it is exact for batch 1
only).

Modes (the ``variant`` column): vtprune keeps the original positions of the kept tokens where the release
re-indexes them contiguously (a documented deviation), so from the second stage on the two rank with
different RoPE positions. ``as released``: the release unchanged; its first stage is compared (the later
stages' Jaccard and the logit difference are reported in ``note``, not asserted). ``positions kept``: the
wrapper hands the next layers the kept rows' original ``position_ids`` instead of the re-indexed ones (and
the release's rotary tables are not cut at the shortened length, which only that needs): every stage and the
first-token logits are compared.

    python benchmarks/parity/transprune.py --ref /path/to/TransPrune
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import llava_repo_worker as worker  # noqa: E402
from common import env_name, run_check  # noqa: E402

METHOD = "transprune"
ENV = env_name(METHOD)
LOGIT_TOLERANCE = 1e-4
LAYERS, HIDDEN, TOKENS = 32, 64, 576  # LLaVA-1.5's depth and grid, a tiny width
MODEL = f"tiny llava_llama ({LAYERS} layers, width {HIDDEN}, {TOKENS} tokens)"
TINY = dict(layers=LAYERS, hidden=HIDDEN)  # tiny_llava_repo's options
VARIANTS = ("random", "peaked")
MODES = ("as released", "positions kept")
ACCUMULATING = [7, 8, 9, 10, 11, 12]  # the release's scripts (1-based: layer_idx + 1)
PRUNING = [7, 9, 12]
RATIOS = [0.875, 0.625]  # the first two stages (504 and 360 of 576)
BUDGETS = (72, 64, 128, 192)  # 72: the release's 0.125


def last_ratio(keep: int) -> float:
    """The release's last ``image_token_ratio_list`` entry for ``keep`` tokens (it floors ``576 * ratio``)."""
    return 0.125 if keep == 72 else (keep + 0.5) / TOKENS


# --- workers (run by compare() in the transformers 4.37 environment) -------------------------------------

def _vtprune_side(work: Path) -> None:
    """Build the inputs and the weights of both variants, run vtprune on them; writes ``vtprune.json``."""
    out = {}
    for variant in VARIANTS:
        factor = 8.0 if variant == "peaked" else None  # `peaked`'s default
        model, ids, images = worker.prepared_variant(work, variant, factor, **TINY)
        for keep in BUDGETS:
            logits, st = worker.vtprune_prefill(model, ids, images, METHOD, keep=keep)
            out[f"{variant}/{keep}"] = {"layers": [s["layer"] for s in st.stages],
                                        "kept": [s["kept"][0].tolist() for s in st.stages],
                                        "logits": logits.tolist()}
    (work / "vtprune.json").write_text(json.dumps(out))


class _NoEvent:
    """Stand-in for ``torch.cuda.Event``: the release times its layers with CUDA events (no part of pruning)."""

    def __init__(self, *args, **kwargs) -> None:
        pass

    def record(self, *args, **kwargs) -> None:
        pass

    def elapsed_time(self, other) -> float:
        return 0.0


def _release_side(work: Path) -> None:
    """The release's forward on the same weights and inputs, in both modes; writes ``release.json``."""
    import types

    import torch
    import transformers.modeling_utils  # noqa: F401  (before the stub: transformers probes for sklearn)

    cluster = types.ModuleType("sklearn.cluster")  # imported (DBSCAN) by the release's modeling file, never used
    cluster.DBSCAN = None
    sys.modules.setdefault("sklearn", types.ModuleType("sklearn"))
    sys.modules.setdefault("sklearn.cluster", cluster)
    torch.cuda.Event = _NoEvent  # CPU run: the release's CUDA timing becomes a no-op
    torch.cuda.synchronize = lambda *args, **kwargs: None
    from llava.model.language_model.llava_llama_transprune import LlavaLlamaForCausalLM_TransPrune

    out = {}
    for variant in VARIANTS:
        saved = torch.load(work / f"{variant}.pt")
        base, _, _ = worker.tiny_model(work, **TINY)
        model = worker.release_model(LlavaLlamaForCausalLM_TransPrune, base.config, saved["state"])
        lm = model.model
        for keep in BUDGETS:
            for mode in MODES:
                lm.accmulating_layer_list = list(ACCUMULATING)  # as llava/eval/model_vqa_loader.py sets them
                lm.pruning_layer_list = list(PRUNING)
                lm.image_token_ratio_list = [1.0, *RATIOS, last_ratio(keep)]
                kept, logits = worker.rank_drop_forward(model, saved["input_ids"], saved["images"],
                                                        mode == "positions kept", "transprune_rank_drop", TOKENS)
                out[f"{variant}/{keep}/{mode}"] = {"kept": kept, "logits": logits}
    (work / "release.json").write_text(json.dumps(out))


# --- the check ---------------------------------------------------------------------------------------------

def compare(ref: Path) -> list[dict]:
    ours, theirs = worker.run_two_sides(METHOD, __file__, ref)
    rows = []
    for variant in VARIANTS:
        for keep in BUDGETS:
            ratios = [*RATIOS, last_ratio(keep)]
            for mode in MODES:
                rows += worker.staged_rows(
                    METHOD, MODEL, f"{variant}, keep {keep}", ours[f"{variant}/{keep}"],
                    theirs[f"{variant}/{keep}/{mode}"], PRUNING, mode,
                    f"accmulating_layer_list {ACCUMULATING}, pruning_layer_list {PRUNING}, image_token_ratio_list "
                    f"{ratios}; vtprune keep={keep} (default layers and ratios)")
    return rows


def main(argv: list[str] | None = None) -> int:
    return run_check(METHOD, compare, argv, __doc__)


if __name__ == "__main__":
    worker.worker_entry({"vtprune": _vtprune_side, "release": _release_side})
    sys.exit(main())
