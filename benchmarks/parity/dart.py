"""Parity of vtprune's ``dart`` with DART's release (github.com/ZichenWen1/DART): the pivots, the kept visual
tokens at the pruning layer and the first-token logits.

The upstream repository could not be fetched here; the check was run on the fork github.com/xqy1111111/DART
at 5a19452 (Zichen Wen, 2025-08-31, the last upstream commit in the fork's history, before the fork's own
commits): extract that commit (``git archive 5a19452``) and pass its folder as ``--ref``.

The release is a fork of the LLaVA codebase on transformers 4.37 whose ``LlavaLlamaModel`` is built on
``DART`` (llava/model/language_model/modeling_llama_self.py): in ``DART.forward``, before decoder layer
``K = config.DART_config["K"]`` (``--pruned_layer 2``) runs, ``get_retained_image_token`` picks the image
tokens from layer ``K - 1``'s keys (their L1 norms choose the pivots) and its output through the final
norm (cosine similarities), and the sequence keeps those image tokens at their positions. Both sides run
in the transformers 4.37 environment of ``scripts/setup_llava_repo.sh`` (``.venv-llava``, or the
interpreter in ``$VTPRUNE_LLAVA_PYTHON``), each in its own process:

- vtprune: the tiny ``llava_llama`` model of ``vtprune.toy.tiny_llava_repo`` with 32 layers of width 64
  (LLaVA-1.5-7B's depth, 576 tokens per image), the LLaVA repository's own ``llava`` package,
  ``vtprune.apply(model, "dart", keep=...)`` (its default layer 1, pivots 4 + 4, release pivot order);
- the release: its own ``llava`` package first on ``sys.path`` (``einops``, imported there but unused, is
  stubbed), the same tiny model built by the same function (so the release's ``LlavaLlamaForCausalLM``
  on ``DART``) with vtprune's weights loaded (the ``peaked`` variant included), ``config.DART_config`` set
  as llava/eval/model_vqa_loader.py's ``configure_DART`` sets it, and a wrapper on
  ``get_retained_image_token`` recording the positions it returns.

Budgets: the release's ``--max_num_trunction M`` (scripts/v1_5/eval/*.sh; the README's run: 128) keeps the
4 image pivots plus ``M // 8`` tokens per pivot, so vtprune's ``keep = 4 + 8 * (M // 8)``: 196, 132, 68 for
M = 192, 128, 64 (the full 576-token grid, nothing to scale). ``M = 0`` keeps the image pivots alone
(``keep=4``): the row ``pivots`` compares them. ``image_token_start_index`` is the image's place in the
tiny prompt (the release's scripts pass 35, its place in LLaVA-1.5's vicuna_v1 prompt with its tokenizer);
the prompt is that conversation template with one image, batch 1 (the release asserts batch size 1).

    python benchmarks/parity/dart.py --ref /path/to/DART
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import llava_repo_worker as worker  # noqa: E402
from common import env_name, jaccard, run_check  # noqa: E402

METHOD = "dart"
ENV = env_name(METHOD)
LOGIT_TOLERANCE = 1e-4
LAYERS, HIDDEN, TOKENS = 32, 64, 576
MODEL = f"tiny llava_llama ({LAYERS} layers, width {HIDDEN}, {TOKENS} tokens)"
TINY = dict(layers=LAYERS, hidden=HIDDEN)  # tiny_llava_repo's options
VARIANTS = ("random", "peaked")
PRUNED_LAYER = 2  # the release's --pruned_layer: the input of layer 2 (vtprune: layer 1's output) is pruned
PIVOTS = (4, 4)  # --pivot_image_token, --pivot_text_token
TRUNCATIONS = (192, 128, 64, 0)  # --max_num_trunction; 0: the image pivots alone


def vtprune_keep(truncation: int) -> int:
    """The release keeps its image pivots plus ``M // (p + t)`` tokens for each of the ``p + t`` pivots."""
    p, t = PIVOTS
    return p + (p + t) * (truncation // (p + t))


# --- workers (run by compare() in the transformers 4.37 environment) -------------------------------------

def _vtprune_side(work: Path) -> None:
    """The weights of both variants and vtprune's kept sets and logits; writes ``vtprune.json``."""
    out = {}
    for variant in VARIANTS:
        factor = 8.0 if variant == "peaked" else None  # `peaked`'s default
        model, ids, images = worker.prepared_variant(work, variant, factor, **TINY)
        for m in TRUNCATIONS:
            logits, st = worker.vtprune_prefill(model, ids, images, METHOD, keep=vtprune_keep(m),
                                                image_pivots=PIVOTS[0],
                                         text_pivots=PIVOTS[1])
            out[f"{variant}/{m}"] = {"layer": st.layer, "kept": st.kept[0].tolist(), "logits": logits.tolist()}
    (work / "vtprune.json").write_text(json.dumps(out))


def _release_side(work: Path) -> None:
    """The release's forward on the same weights and inputs; writes ``release.json``."""
    import types

    sys.modules.setdefault("einops", types.ModuleType("einops")).rearrange = None  # imported, never used
    import torch

    from vtprune.toy.tiny_llava_repo import IMAGE_TOKEN_INDEX

    out = {}
    for variant in VARIANTS:
        saved = torch.load(work / f"{variant}.pt")
        model, _, _ = worker.tiny_model(work, **TINY)  # the release's package first: its LlavaLlamaForCausalLM on DART
        if type(model.model).__mro__[2].__name__ != "DART":
            raise SystemExit(f"dart parity: the release's llava package was not imported (got {type(model.model)})")
        model.load_state_dict(saved["state"], strict=True)
        ids, images = saved["input_ids"], saved["images"]
        start = int((ids[0] == IMAGE_TOKEN_INDEX).nonzero()[0, 0])
        lm = model.model
        plain = lm.get_retained_image_token
        for m in TRUNCATIONS:
            model.config.text_length = None  # LLaVA-1.5 (the loader sets it for 1.6 only)
            model.config.DART_config = {
                "K": PRUNED_LAYER, "image_token_start_index": start, "image_token_length": TOKENS,
                "max_num_trunction": m, "reduction_ratio": 1 - m / TOKENS, "retain_token_num_for_llava_next": 320,
                "pivot_image_token": PIVOTS[0], "pivot_text_token": PIVOTS[1],
            }
            got = []

            def recorded(config, last_layer_state, any_states, got=got, plain=plain, start=start):
                index = plain(config, last_layer_state, any_states)
                got.append(sorted((index - start).tolist()))
                return index

            lm.get_retained_image_token = recorded
            try:
                with torch.no_grad():
                    logits = model(input_ids=ids, images=images, return_dict=True).logits[0, -1]
            finally:
                del lm.get_retained_image_token
            if len(got) != 1:
                raise SystemExit(f"dart parity: the release selected {len(got)} times in one prefill")
            out[f"{variant}/{m}"] = {"kept": got[0], "logits": logits.tolist()}
    (work / "release.json").write_text(json.dumps(out))


# --- the check ---------------------------------------------------------------------------------------------

def compare(ref: Path) -> list[dict]:
    ours, theirs = worker.run_two_sides(METHOD, __file__, ref)
    rows = []
    for variant in VARIANTS:
        for m in TRUNCATIONS:
            mine, rel = ours[f"{variant}/{m}"], theirs[f"{variant}/{m}"]
            a, b = mine["kept"], rel["kept"]
            rows.append({
                "method": METHOD, "model": MODEL,
                "variant": f"{variant}, " + (f"max_num_trunction {m}" if m else "pivots (max_num_trunction 0)"),
                "budget": len(b), "jaccard": jaccard(a, b), "kept_equal": a == b,
                "logit_max_abs": max(abs(x - y) for x, y in zip(mine["logits"], rel["logits"])),
                "note": f"release --pruned_layer {PRUNED_LAYER} --pivot_image_token {PIVOTS[0]} --pivot_text_token "
                        f"{PIVOTS[1]} --max_num_trunction {m}; vtprune keep={vtprune_keep(m)}, pruned after "
                        f"layer {mine['layer']}",
            })
    return rows


def main(argv: list[str] | None = None) -> int:
    return run_check(METHOD, compare, argv, __doc__)


if __name__ == "__main__":
    worker.worker_entry({"vtprune": _vtprune_side, "release": _release_side})
    sys.exit(main())
