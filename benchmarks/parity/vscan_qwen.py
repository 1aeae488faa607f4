"""Parity of vtprune's ``vscan`` on Qwen2.5-VL with VScan's released Qwen2.5-VL code
(github.com/Tencent/SelfEvolvingAgent, folder ``VScan/``, commit a82450e).

Reference files: ``VScan/qwen/model/qwen2_5_vl_custom.py`` (forwards written for the transformers 4.49-era
Qwen2.5-VL classes, which its eval scripts, e.g. ``qwen/eval/model_vqa_loader.py``, assign onto transformers'
classes) and ``VScan/qwen/model/qwen2_5_vl_utils.py`` (``window_selection``, ``token_merging``, ``repeat_kv``,
``apply_rotary_pos_emb_vision``). The modeling file imports classes that transformers 5 no longer has and
``flash_attn``, so it does not import here: the seven functions its eval scripts install are taken from the
file's source (``ast``) and executed unchanged, with the utils module imported as it is (``flash_attn`` stubbed;
the one function needing it, ``apply_rotary_pos_emb_flashatt``, is not called on the SDPA path):
``Qwen2_5_VLForConditionalGeneration_X.forward`` (the pre-LLM stage: scores, ``window_selection``, the zeroed
global top-k, ``token_merging(..., scaling=1)`` on the merger outputs, the pruned ``input_ids`` and M-RoPE
``position_ids``), ``Qwen2_5_VisionTransformerPretrainedModel_X.forward`` (the two scans' received attention:
sum over heads, mean over queries, mean of each 2 x 2 patch group, back to raster order),
``Qwen2_5_VLVisionBlock_X.forward``, ``Qwen2_5_VLVisionSdpaAttention_X.forward`` (the attention weights),
``Qwen2_5_VisionPatchEmbed_X.forward``, ``Qwen2_5_VLModel_X.forward`` (the LLM loop with the drop at
``layer_list``) and ``Qwen2_5_VLModel_X.layer_prune`` (the last token's head-mean attention, no RoPE).

They run on stand-in ``self`` objects (`common.StandIn`) whose parameters and sub-modules are the tiny model's. The stand-ins
supply only what the 4.49 classes provided and transformers 5 moved: the tower's ``rot_pos_emb`` and
``get_window_index`` (the same values from transformers 5's ``get_vision_position_ids`` / ``get_vision_window_index``
and the tower's ``inv_freq``), ``get_rope_index`` (transformers 5's, given the processor's ``mm_token_type_ids``),
the decoder layers' old calling convention (a 1-tuple), ``_update_causal_mask`` (``None`` for the unpadded prompt,
as 4.49's under SDPA: causal), and the two output containers. The check asserts that the release's tower,
so driven, reproduces the tiny model's own image embeddings (``tower_max_abs``).

Model: a tiny random-weight Qwen2.5-VL (``vtprune.toy.tiny_qwen``: 8 vision blocks with full attention in 1, 3, 5
and 7, the real model's pattern of every fourth block at a quarter of its depth; 112-pixel windows, 2 x 2 merger;
a 4-layer LLM), one 252 x 308 noise image: 18 x 22 patches, 9 x 11 = 99 merged tokens (window order differs from
raster order; the release's 4 x 4 selection windows are 2 x 2 with the border row and columns folded in).
Block indices: the release reads ``fullatt_block_indexes[0]`` (local) and the last block (global), 7 and 31 on
the real tower, 1 and 7 here; vtprune's default rule (the first full-attention block at a quarter of the depth,
the last full-attention block) resolves to the same blocks on both (``hidden_states`` 8 / 32 and 2 / 8), which the
check asserts. LLM layer: the release's ``layer_list [14]`` on 28 layers drops after 0-based layer 13, vtprune's
depth-scaled ``llm_layer`` (13 on 28); on the 4-layer LLM vtprune's is 2, so the release runs with
``layer_list [3]``.

Budgets (``budget`` = vtprune's ``keep``, the final count): ``keep`` 4 / 8 / 11 -> ``T = 3 keep`` = 12 / 24 / 33
before the LLM. The release's budgets are ratios (``image_token_ratio``, ``image_token_ratio_list``) that it floors
(``int(r * n)``); they are passed as ``(T + 0.5) / 99`` and ``(keep + 0.5) / T`` so that its own arithmetic gives
``T`` and ``keep``. One more budget is the release scripts' own ratios, 0.167 then 0.333: ``int(0.167 * 99)`` = 16,
``int(0.333 * 16)`` = 5, i.e. vtprune ``keep=5, pre_llm_factor=3.2`` (asserted), and vtprune's fraction for those
ratios, ``keep=1/18``, which rounds where the release floors (a documented deviation: not asserted).

Rows, per variant (``random``, ``peaked``) and budget:

- ``pre-llm``: the release without ``layer_list`` (pre-LLM only) against vtprune ``keep=T, pre_llm_factor=1``:
  the kept sets (``keep_indices``), the LLM's whole input sequence (``feature_max_abs``: text rows and the merged
  image rows) and its M-RoPE positions (``positions_equal``, in ``kept_equal``), first-token logits.
- ``llm``: the release with the LLM stage against vtprune ``keep``: the pre-LLM sets, the LLM stage's pick
  (``layer_prune``'s ``top_rank_index_x`` mapped through ``keep_indices``) against vtprune's final kept set
  (``jaccard``), the LLM input sequence, first-token logits of both whole pipelines (the release, like vtprune,
  keeps the kept tokens' positions after its drop).

    python benchmarks/parity/vscan_qwen.py --ref /work/refs/SelfEvolvingAgent   # or VTPRUNE_PARITY_VSCAN_QWEN=PATH
"""

from __future__ import annotations

import ast
import math
import sys
import time
import types
import typing
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    StandIn,
    env_name,
    fake_modules,
    jaccard,
    load_file,
    peaked,
    release_functions,
    run_check,
    single_threaded,
)

METHOD = "vscan-qwen"
VTPRUNE_METHOD = "vscan"
ENV = env_name(METHOD)
LOGIT_TOLERANCE = 1e-4
FEATURE_TOLERANCE = 1e-5
MODEL = "tiny-qwen2.5-vl (8 vision blocks, full 1/3/5/7; 9x11 merged grid, 99 tokens; 4-layer LLM)"
BUDGETS = (4, 8, 11)  # vtprune keep; T = 3 keep before the LLM
SCRIPT_RATIOS = (0.167, 0.333)  # the release's scripts: --image-token-ratio 0.167 --image-token-ratio-list '[0.333]'
IMAGE = (252, 308)  # height, width of the noise image: 9 x 11 merged tokens
VISION_LAYERS, FULLATT = 8, [1, 3, 5, 7]
PROMPT = ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
          "<|vision_start|><|image_pad|><|vision_end|>What is in the picture?<|im_end|>\n<|im_start|>assistant\n")
CUSTOM = "qwen/model/qwen2_5_vl_custom.py"
UTILS = "qwen/model/qwen2_5_vl_utils.py"
# (class, function) of the modeling file that the release's eval scripts assign onto transformers' classes
RELEASE_FUNCTIONS = (
    ("Qwen2_5_VLForConditionalGeneration_X", "forward"),
    ("Qwen2_5_VisionPatchEmbed_X", "forward"),
    ("Qwen2_5_VisionTransformerPretrainedModel_X", "forward"),
    ("Qwen2_5_VLVisionBlock_X", "forward"),
    ("Qwen2_5_VLVisionSdpaAttention_X", "forward"),
    ("Qwen2_5_VLModel_X", "forward"),
    ("Qwen2_5_VLModel_X", "layer_prune"),
)


def _root(ref: Path) -> Path:
    """The release's VScan folder (``ref`` itself or ``ref/VScan``)."""
    for root in (ref / "VScan", ref):
        if (root / CUSTOM).is_file() and (root / UTILS).is_file():
            return root
    raise SystemExit(f"{ref} is not a checkout of Tencent/SelfEvolvingAgent: no VScan/{CUSTOM}")


# ---- the release's code -----------------------------------------------------------------------------
class _Output(types.SimpleNamespace):
    """Stand-in for the release's output containers (``BaseModelOutputWithPast``,
    ``Qwen2_5_VLCausalLMOutputWithPast``, whose transformers-5 fields are renamed): ``[0]`` is the first field."""

    def __getitem__(self, i: int) -> Any:
        return [v for v in vars(self).values() if v is not None][i]


def load_release(root: Path) -> dict[tuple[str, str], Any]:
    """The release's `RELEASE_FUNCTIONS`, compiled from ``qwen2_5_vl_custom.py``'s source (line numbers kept) in
    a namespace holding the names that file imports: torch's, and those of ``qwen2_5_vl_utils.py`` (imported as
    it is, ``flash_attn`` stubbed)."""
    import numpy as np
    import torch
    import torch.nn as nn
    import torch.nn.functional as F
    from transformers.cache_utils import DynamicCache
    from transformers.utils import logging

    unused = lambda *a, **k: None  # noqa: E731
    with fake_modules({"flash_attn": {"flash_attn_func": unused, "flash_attn_varlen_func": unused},
                       "flash_attn.layers": {}, "flash_attn.layers.rotary": {"apply_rotary_emb": unused}}):
        utils = load_file(root / UTILS, "vscan_qwen_release_utils")
    path = root / CUSTOM
    text = path.read_text()
    tree = ast.parse(text)
    names: dict[str, Any] = {
        "torch": torch, "nn": nn, "F": F, "np": np, "math": math, "time": time, "sys": sys, "os": __import__("os"),
        "CrossEntropyLoss": nn.CrossEntropyLoss, "DynamicCache": DynamicCache, "logger": logging.get_logger(METHOD),
        "BaseModelOutputWithPast": _Output, "Qwen2_5_VLCausalLMOutputWithPast": _Output,
        **{n: getattr(typing, n) for n in ("List", "Optional", "Tuple", "Union", "Any")},
    }
    for node in tree.body:  # `from qwen.model.qwen2_5_vl_utils import ...`: those names, from the release's utils
        if isinstance(node, ast.ImportFrom) and node.module and node.module.endswith("qwen2_5_vl_utils"):
            names.update({a.asname or a.name: getattr(utils, a.name) for a in node.names})
    if "token_merging" not in names or "window_selection" not in names:
        raise SystemExit(f"{path}: its import of qwen2_5_vl_utils (token_merging, window_selection) is missing")
    return release_functions(path, RELEASE_FUNCTIONS, names, hint="is --ref a checkout of Tencent/SelfEvolvingAgent?")


def _old_decoder_layer(self: StandIn, hidden_states: Any, attention_mask: Any = None, position_embeddings: Any = None,
                       output_attentions: bool = False, use_cache: bool = False, **_: Any) -> tuple:
    """transformers 4.49's decoder-layer convention (keyword arguments, a tuple back) around a 5.x layer."""
    assert not output_attentions and not use_cache
    return (self._target(hidden_states, attention_mask=attention_mask, position_embeddings=position_embeddings),)


def _no_mask(attention_mask: Any, input_tensor: Any, cache_position: Any, past_key_values: Any,
             output_attentions: bool) -> None:
    """4.49's ``_update_causal_mask`` under SDPA for an unpadded prompt: ``None`` (the layers attend causally)."""
    assert attention_mask is None or bool((attention_mask == 1).all()), "one unpadded prompt"
    return None


def release_run(fns: dict, model: Any, inputs: Any, ratio: float, layer_list: list[int],
                ratio_list: list[float]) -> dict[str, Any]:
    """The release's ``Qwen2_5_VLForConditionalGeneration.forward`` (with its tower and LLM forwards) on the tiny
    model's modules: ``image_token_ratio=ratio``, ``layer_list``, ``image_token_ratio_list``. Returns its
    ``keep_indices``, the unmerged merger outputs, the LLM's input (``inputs_embeds``, ``position_ids``), the LLM
    stage's picks (``layer_prune``'s ``top_rank_index_x``, one per stage) and the first-token logits."""
    import torch
    from transformers.vision_utils import get_vision_position_ids, get_vision_window_index

    visual = model.model.visual
    text = model.model.language_model
    seen: dict[str, Any] = {"picks": []}
    inv_freq = visual.rotary_pos_emb.inv_freq

    def rot_pos_emb(grid_thw):  # 4.49's helper: per patch (merge-unit order) the h and w angles, [S, head_dim / 2]
        pos = get_vision_position_ids(grid_thw, visual.spatial_merge_size)
        return (pos[..., None].float() * inv_freq.to(pos.device)).flatten(1)

    def get_window_index(grid_thw):  # 4.49's helper: the window permutation and window boundaries (a list)
        index, cu = get_vision_window_index(grid_thw, visual.spatial_merge_size, visual.window_size, visual.patch_size)
        return index, cu.tolist()

    def tower(self, *args, **kwargs):
        out = fns[("Qwen2_5_VisionTransformerPretrainedModel_X", "forward")](self, *args, **kwargs)
        seen["image_embeds"] = out[0].detach().clone()
        return out

    blocks = [StandIn(b, fns[("Qwen2_5_VLVisionBlock_X", "forward")],
                  attn=StandIn(b.attn, fns[("Qwen2_5_VLVisionSdpaAttention_X", "forward")])) for b in visual.blocks]
    vis = StandIn(visual, tower, blocks=blocks, rot_pos_emb=rot_pos_emb, get_window_index=get_window_index,
              patch_embed=StandIn(visual.patch_embed, fns[("Qwen2_5_VisionPatchEmbed_X", "forward")]))

    def lm_forward(self, **kwargs):
        seen["inputs_embeds"] = kwargs["inputs_embeds"].detach().clone()
        seen["position_ids"] = kwargs["position_ids"].detach().clone()
        return fns[("Qwen2_5_VLModel_X", "forward")](self, **kwargs)

    lm = StandIn(text, lm_forward, layers=[StandIn(layer, _old_decoder_layer) for layer in text.layers],
             _update_causal_mask=_no_mask, gradient_checkpointing=False, layer_list=list(layer_list),
             image_token_ratio_list=list(ratio_list))

    def layer_prune(**kwargs):
        out = fns[("Qwen2_5_VLModel_X", "layer_prune")](lm, **kwargs)
        seen["picks"].append(out[-1].detach().clone())
        return out

    lm.__dict__["layer_prune"] = layer_prune
    mm_types = inputs["mm_token_type_ids"]

    def get_rope_index(input_ids, image_grid_thw, video_grid_thw, second_per_grid_ts, attention_mask):
        return model.model.get_rope_index(input_ids, mm_types, image_grid_thw, video_grid_thw, second_per_grid_ts,
                                          attention_mask)

    cg = StandIn(model, fns[("Qwen2_5_VLForConditionalGeneration_X", "forward")], visual=vis, model=lm,
             rope_deltas=None, get_rope_index=get_rope_index, image_token_ratio=ratio)
    with torch.no_grad():
        out = cg(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                 pixel_values=inputs["pixel_values"], image_grid_thw=inputs["image_grid_thw"], use_cache=False,
                 output_attentions=False, output_hidden_states=False, return_dict=True)
    seen["keep_indices"] = None if lm.keep_indices is None else lm.keep_indices.detach().clone()
    seen["logits"] = out.logits[0, -1]
    return seen


# ---- vtprune ----------------------------------------------------------------------------------------
def vtprune_run(model: Any, inputs: Any, **options: Any) -> dict[str, Any]:
    """vtprune's ``vscan`` (removed afterwards): stats, the LLM's input kwargs, the scan layers, first-token logits."""
    import torch

    import vtprune

    seen: dict[str, Any] = {}
    handle = model.model.language_model.register_forward_pre_hook(lambda m, a, kw: seen.update(kw), with_kwargs=True)
    vtprune.apply(model, VTPRUNE_METHOD, **options)
    scorer = model._vtprune_state.scorer
    try:
        with torch.no_grad():
            logits = model(**inputs, use_cache=False).logits[0, -1]
        st = vtprune.stats(model)
    finally:
        handle.remove()
        vtprune.remove(model)
    return {"stats": st, "inputs_embeds": seen["inputs_embeds"], "position_ids": seen["position_ids"],
            "layers": scorer._layers, "llm_layer": scorer.llm_layer, "logits": logits}


# ---- the comparison ---------------------------------------------------------------------------------
def _inputs() -> Any:
    import numpy as np
    from PIL import Image

    from vtprune.toy.tiny_qwen import tiny_qwen_processor

    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (*IMAGE, 3), dtype=np.uint8))
    return tiny_qwen_processor("qwen2_5_vl")(images=[image], text=[PROMPT], return_tensors="pt")


def _sequence_diff(ours: Any, theirs: Any) -> float:
    return float((ours.float() - theirs.float()).abs().max()) if ours.shape == theirs.shape else float("inf")


def _positions_equal(ours: Any, theirs: Any) -> bool:
    import torch

    return ours.shape[-1] == theirs.shape[-1] and torch.equal(ours[-3:].cpu(), theirs[-3:].cpu())


@single_threaded
def compare(ref: Path) -> list[dict[str, Any]]:
    import torch

    from vtprune.toy.tiny_qwen import tiny_qwen

    fns = load_release(_root(ref))
    inputs = _inputs()
    rows = []
    for variant in ("random", "peaked"):
        model = tiny_qwen("qwen2_5_vl", vision_layers=VISION_LAYERS, fullatt_blocks=FULLATT)
        if variant == "peaked":
            peaked(model)
        visual = model.model.visual
        n = int((inputs["input_ids"] == model.config.image_token_id).sum())
        with torch.no_grad():
            own = model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"]).pooler_output[0]
        unpruned = release_run(fns, model, inputs, 1.0, [], [])
        tower = _sequence_diff(unpruned["image_embeds"], own)
        if not tower < FEATURE_TOLERANCE:
            raise SystemExit(f"the release's tower, driven here, does not reproduce the model's image embeddings "
                             f"(max |diff| {tower:.2e}): the stand-ins are wrong")
        budgets = [(k, 3 * k, None) for k in BUDGETS]
        t_script = int(SCRIPT_RATIOS[0] * n)
        k_script = int(SCRIPT_RATIOS[1] * t_script)
        budgets.append((k_script, t_script, SCRIPT_RATIOS))
        for keep, t, script in budgets:
            ratio, ratio_list = SCRIPT_RATIOS if script else ((t + 0.5) / n, (keep + 0.5) / t)
            where = (f"release image_token_ratio={ratio:.4g} (its int(r * {n}) = {t})"
                     + ("" if script else f", vtprune keep={keep}") + "; release blocks "
                     f"{visual.fullatt_block_indexes[0]} (local, fullatt_block_indexes[0]) and "
                     f"{len(visual.blocks) - 1} (global, the last)")
            # pre-LLM only: the release without layer_list, vtprune keep=T pre_llm_factor=1
            theirs = release_run(fns, model, inputs, ratio, [], [])
            ours = vtprune_run(model, inputs, keep=t, pre_llm_factor=1)
            assert ours["layers"] == (visual.fullatt_block_indexes[0] + 1, len(visual.blocks)), ours["layers"]
            kept_t = theirs["keep_indices"].long()
            assert kept_t.numel() == t, (kept_t.numel(), t)
            kept_o = ours["stats"].kept[0]
            pos_eq = _positions_equal(ours["position_ids"], theirs["position_ids"])
            rows.append({"method": METHOD, "model": MODEL + ", pre-LLM scans + merge", "variant": variant,
                         "budget": keep, "stage": "pre-llm", "jaccard": jaccard(kept_t.tolist(), kept_o.tolist()),
                         "kept_equal": bool(torch.equal(kept_t.cpu(), kept_o.cpu()) and pos_eq),
                         "positions_equal": pos_eq,
                         "feature_max_abs": _sequence_diff(ours["inputs_embeds"], theirs["inputs_embeds"]),
                         "logit_max_abs": float((ours["logits"] - theirs["logits"]).abs().max()),
                         "tower_max_abs": tower,
                         "note": f"{where}; T={t} before the LLM (release without layer_list, vtprune keep={t} "
                                 f"pre_llm_factor=1); features: the LLM's whole input sequence"})
            # both stages
            options = {"keep": keep} if script is None else {"keep": keep, "pre_llm_factor": t / keep}
            variants = [("", options, True)]
            if script is not None:
                variants.append((", vtprune keep=1/18 (its fraction for the scripts' ratios)", {"keep": 1 / 18}, False))
            for label, opts, asserted in variants:
                ours = vtprune_run(model, inputs, **opts)
                rank_layer = ours["llm_layer"] + 1
                theirs = release_run(fns, model, inputs, ratio, [rank_layer], [ratio_list])
                kept_t = theirs["keep_indices"].long()
                (pick,) = theirs["picks"]
                final_t = torch.sort(kept_t[pick.long()]).values
                pre_o, final_o = ours["stats"].stages[0]["kept"][0], ours["stats"].kept[0]
                same = (pre_o.shape == kept_t.shape and torch.equal(pre_o.cpu(), kept_t.cpu())
                        and final_o.shape == final_t.shape and torch.equal(final_o.cpu(), final_t.cpu()))
                pos_eq = _positions_equal(ours["position_ids"], theirs["position_ids"])
                row = {"method": METHOD, "model": MODEL + ", both stages (layer_prune)", "variant": variant,
                       "budget": keep if asserted else "1/18", "stage": "llm",
                       "jaccard": jaccard(final_t.tolist(), final_o.tolist()),
                       "pre_llm_jaccard": jaccard(kept_t.tolist(), pre_o.tolist()),
                       "kept_equal": bool(same and pos_eq), "positions_equal": pos_eq,
                       "counts": {"release": [int(kept_t.numel()), int(final_t.numel())],
                                  "vtprune": [int(pre_o.numel()), int(final_o.numel())]},
                       "feature_max_abs": _sequence_diff(ours["inputs_embeds"], theirs["inputs_embeds"]),
                       "logit_max_abs": (float((ours["logits"] - theirs["logits"]).abs().max())
                                         if ours["logits"].shape == theirs["logits"].shape else None),
                       "tower_max_abs": tower,
                       "note": f"{where}{label}; release layer_list=[{rank_layer}] image_token_ratio_list="
                               f"[{ratio_list:.4g}] (its int(r * T) = {int(final_t.numel())}), vtprune llm_layer="
                               f"{ours['llm_layer']}; logits of both whole pipelines"}
                if not asserted:
                    row["asserted"] = False
                    counts = row["counts"]
                    row["note"] += ("; documented deviation (vtprune rounds a fraction's counts, the release floors "
                                    f"int(0.167 N)): counts release {counts['release']}, vtprune {counts['vtprune']}"
                                    f"{' (equal at this N)' if counts['release'] == counts['vtprune'] else ''}; "
                                    "not asserted")
                rows.append(row)
    return rows


def passed(row: dict[str, Any]) -> bool:
    if row.get("asserted") is False:
        return True
    return (row["kept_equal"] and row["jaccard"] == 1.0 and row["logit_max_abs"] is not None
            and row["logit_max_abs"] < LOGIT_TOLERANCE and row["feature_max_abs"] < FEATURE_TOLERANCE)


def summary(rows: list[dict[str, Any]]) -> None:
    for r in rows:
        extra = f", counts {r['counts']}" if "counts" in r else ""
        print(f"  {r['stage']} {r['variant']} keep {r['budget']}: kept equal {r['kept_equal']}, positions equal "
              f"{r['positions_equal']}, features max |diff| {r['feature_max_abs']:.2e}, tower {r['tower_max_abs']:.2e}"
              f"{extra}{'' if r.get('asserted', True) else ' (not asserted)'}")


def main(argv: list[str] | None = None) -> int:
    return run_check(METHOD, compare, argv, __doc__ or "", passed=passed, summary=summary)


if __name__ == "__main__":
    sys.exit(main())
