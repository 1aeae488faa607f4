"""Parity of vtprune's ``flowcut`` on Qwen2-VL with FlowCut's released Qwen2-VL code, tower stage and LLM stage
(github.com/TungChintao/FlowCut, folder ``FlowCut_Qwen/``, commit a2ecd24).

Reference files: ``FlowCut_Qwen/modeling_qwen2_vl_flowcut.py`` (forwards written for the transformers 4.45-era
Qwen2-VL classes, which ``FlowCut_Qwen/main.py``'s ``flowcut(model, target_num)`` assigns onto transformers'
classes, with ``model.visual.target_num = 2 * target_num`` and ``model.model.target_num = target_num``) and
``FlowCut_Qwen/utils_flowcut.py`` (``compute_score_vit``, ``adaptive_prune_ratio``; imported as it is). The
modeling file imports names transformers 5 no longer has, so it does not import here: the three tower
functions and the LLM attention are taken from its source (``ast``, line numbers kept) and executed unchanged:
``Qwen2VisionTransformerPretrainedModel_forward`` (the cumulative score ``0.5 C + 0.5 s``, the entropy-adaptive
prune count at every even ``remain_layer``, ``topk`` over single patches down to ``target = 4 * visual.target_num``
patches, i.e. ``8 * target_num`` patches, before the merger), ``Qwen2VLVisionBlock_forward`` and
``VisionSdpaAttention_forward`` (the mean query of all patches after the vision RoPE, its head-mean softmax
attention, times ``||head-mean v||_1``), and ``Qwen2VLSdpaAttention_forward``, whose ``prune`` branch (at
layer 1, as ``Qwen2VLModel_forward`` calls it) scores the visual tokens: the last token's query against their
keys (post-RoPE, softmax over the visual keys only) plus its value against theirs, times ``||head-mean v||_1``
(``compute_score_llm``), and returns the top ``target_num``.

Re-stated here (transformers 5 moved them): the tower's ``rot_pos_emb`` (4.45: per patch the h / w angles,
``[S, head_dim / 2]``, from transformers 5's ``get_vision_position_ids`` and the tower's ``inv_freq``) and 4.45's
``apply_rotary_pos_emb_vision(tensor, freqs)`` (``cos``/``sin`` of the angles repeated twice, rotate-half). The
LLM attention's 4.45 rotary tables (``[3, B, L, d]``, one per position axis) and ``apply_multimodal_rotary_pos_emb``
(the ``mrope_section`` chunks of each axis, rotate-half; transformers 5 composes the axes in its rotary module). The
stand-ins (`common.StandIn`) run the release's functions on the tiny model's own modules (``patch_embed``, blocks'
``norm1``/``norm2``/``mlp``/``attn.qkv``/``attn.proj``, ``merger``). The check asserts that the release's tower, so
driven and with nothing pruned, reproduces the tiny model's own image embeddings (row ``tower``).

Model: a tiny random-weight Qwen2-VL (``vtprune.toy.tiny_qwen.tiny_qwen("qwen2_vl")``: 4 vision blocks, 2 x 2
merger, 4-layer LLM), one 224 x 224 noise image: 16 x 16 patches, 8 x 8 = 64 merge groups. Variants ``random``
and ``peaked`` (the vision q scaled by 256: `common.peaked`). Budgets: vtprune ``keep`` = the release's
``target_num``: the tower keeps ``2 keep`` merge groups (vtprune) or ``8 keep`` single patches (the release).

Rows (the first-token logits are not compared: the tower stages keep different tokens by design, and given
the same LLM-stage pick vtprune's in-LLM drop equals masking, tested in ``tests/``):

- ``tower-groups`` (``asserted: False``): the merge groups vtprune keeps in the tower (its recorded encoder-side
  scores, ``-inf`` for pruned groups) against the groups holding the release's surviving patches (``jaccard``),
  and the patch sets (``patch_jaccard``). They differ by design: vtprune scores and prunes whole 2 x 2 merge
  groups (the group mean of the patch scores, the entropy of the group-summed attention, group counts), the
  release prunes single patches and its merger then regroups whichever 4 survivors are adjacent in sequence
  order (documented in README / ``vtprune/runtime/flowcut.py``).
- ``tower-group-scores`` (asserted; only where the release's schedule pruned nothing before its last block, so
  that both rank one cumulative score over all patches): vtprune's kept groups against the top ``2 keep`` groups
  by the group mean of the release's own per-block patch scores, accumulated ``0.5 C + 0.5 s`` (re-stated from
  the tower forward). On ``peaked`` the release prunes a few patches at ``remain_layer`` 2 and vtprune (group
  entropy and counts) none, so no row.
- ``layer0-scores`` (asserted): the release's block-0 patch scores (``VisionSdpaAttention_forward``'s ``score``)
  against vtprune's ``mean_query_scores`` on the same block-0 input (``feature_max_abs``), and the same top
  ``8 keep`` patches by that score (``jaccard``).
- ``llm-attention`` (asserted): the release's layer-1 attention forward (stand-in) on the shortened sequence
  reproduces the tiny model's own attention output (``feature_max_abs``), so its rotary and projections run as
  the model's.
- ``llm-stage`` (asserted): the LLM stage alone, given vtprune's tower survivors (``2 keep`` merged tokens): the
  release's pick from the sequence its LLM would receive had its tower kept them (the model's own LLM input,
  the other visual rows removed, original 3-D positions, as its tower leaves them) against vtprune's kept set
  (``jaccard``), and ``compute_score_llm``'s scores against vtprune's recorded LLM-stage scores
  (``feature_max_abs``). vtprune masks the tower-pruned tokens' keys where the release drops them: the same
  scores.

    python benchmarks/parity/flowcut_qwen.py --ref /work/refs/FlowCut   # or VTPRUNE_PARITY_FLOWCUT_QWEN=PATH
"""

from __future__ import annotations

import math
import sys
import typing
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    StandIn,
    env_name,
    image_span,
    jaccard,
    lm_input_kwargs,
    load_file,
    peaked,
    release_functions,
    run_check,
    single_threaded,
)

METHOD = "flowcut-qwen"
VTPRUNE_METHOD = "flowcut"
ENV = env_name(METHOD)
LOGIT_TOLERANCE = 1e-4
FEATURE_TOLERANCE = 1e-5
MODEL = "tiny-qwen2-vl (4 vision blocks; 8x8 merged grid, 64 tokens; 4-layer LLM)"
BUDGETS = (4, 8)  # vtprune keep = the release's target_num: 2 keep groups / 8 keep patches in the tower
PEAK = 256.0
IMAGE = (224, 224)
PROMPT = ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
          "<|vision_start|><|image_pad|><|vision_end|>What is in the picture?<|im_end|>\n<|im_start|>assistant\n")
MODELING = "FlowCut_Qwen/modeling_qwen2_vl_flowcut.py"
UTILS = "FlowCut_Qwen/utils_flowcut.py"
RELEASE_FUNCTIONS = ("Qwen2VisionTransformerPretrainedModel_forward", "Qwen2VLVisionBlock_forward",
                     "VisionSdpaAttention_forward", "Qwen2VLSdpaAttention_forward")
RECORDED: dict[str, Any] = {}  # the last output of the release's compute_score_llm (see `load_release`)


def _root(ref: Path) -> Path:
    for root in (ref, ref.parent):
        if (root / MODELING).is_file() and (root / UTILS).is_file():
            return root
    raise SystemExit(f"{ref} is not a checkout of TungChintao/FlowCut: no {MODELING}")


# ---- the release's code -----------------------------------------------------------------------------
def _old_apply_rotary_pos_emb_vision(tensor: Any, freqs: Any) -> Any:
    """transformers 4.45's ``apply_rotary_pos_emb_vision(tensor [1, S, H, d], freqs [S, d / 2])`` (re-stated)."""
    from transformers.models.qwen2_vl.modeling_qwen2_vl import rotate_half

    orig = tensor.dtype
    tensor = tensor.float()
    cos = freqs.cos().unsqueeze(1).repeat(1, 1, 2).unsqueeze(0).float()
    sin = freqs.sin().unsqueeze(1).repeat(1, 1, 2).unsqueeze(0).float()
    return ((tensor * cos) + (rotate_half(tensor) * sin)).to(orig)


def _old_rotary_tables(inv_freq: Any, position_ids: Any) -> tuple[Any, Any]:
    """transformers 4.45's ``Qwen2VLRotaryEmbedding.forward`` (re-stated): ``cos``, ``sin`` ``[3, B, L, d]``, one
    table per position axis (temporal, height, width) from ``position_ids`` ``[3, B, L]``."""
    import torch

    freqs = position_ids[..., None].float() * inv_freq.float()
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos(), emb.sin()


def _old_apply_multimodal_rotary_pos_emb(q: Any, k: Any, cos: Any, sin: Any, mrope_section: list[int],
                                         unsqueeze_dim: int = 1) -> tuple[Any, Any]:
    """transformers 4.45's ``apply_multimodal_rotary_pos_emb`` (re-stated): the rotary dims cut into the
    ``mrope_section`` chunks (twice, for both halves), chunk ``i`` from axis ``i % 3``'s table, rotate-half."""
    import torch
    from transformers.models.qwen2_vl.modeling_qwen2_vl import rotate_half

    sections = list(mrope_section) * 2
    cos = torch.cat([m[i % 3] for i, m in enumerate(cos.split(sections, dim=-1))], dim=-1).unsqueeze(unsqueeze_dim)
    sin = torch.cat([m[i % 3] for i, m in enumerate(sin.split(sections, dim=-1))], dim=-1).unsqueeze(unsqueeze_dim)
    return (q * cos) + (rotate_half(q) * sin), (k * cos) + (rotate_half(k) * sin)


def load_release(root: Path) -> dict[str, Any]:
    """The release's `RELEASE_FUNCTIONS`, compiled from the modeling file's source in a namespace holding the
    names it imports: torch's, ``utils_flowcut`` (imported as it is; its ``compute_score_llm`` records its
    output in `RECORDED`), transformers 5's ``repeat_kv`` and ``Cache``, and the 4.45 rotary helpers (re-stated)."""
    import logging

    import torch
    import torch.nn as nn
    import torch.nn.functional as F
    from transformers.cache_utils import Cache
    from transformers.models.qwen2_vl.modeling_qwen2_vl import repeat_kv

    utils = load_file(root / UTILS, "flowcut_qwen_release_utils")
    path = root / MODELING

    def compute_score_llm(*args: Any) -> Any:
        RECORDED["llm_score"] = out = utils.compute_score_llm(*args)
        return out

    names: dict[str, Any] = {
        "torch": torch, "nn": nn, "F": F, "math": math, "Cache": Cache, "repeat_kv": repeat_kv,
        "logger": logging.getLogger("flowcut_qwen_release"),
        "apply_rotary_pos_emb_vision": _old_apply_rotary_pos_emb_vision,
        "apply_multimodal_rotary_pos_emb": _old_apply_multimodal_rotary_pos_emb,
        **{n: getattr(typing, n) for n in ("Any", "Dict", "List", "Optional", "Tuple", "Union")},
        **{n: getattr(utils, n) for n in ("compute_score_vit", "adaptive_prune_ratio")},
        "compute_score_llm": compute_score_llm,
    }
    return release_functions(path, RELEASE_FUNCTIONS, names, hint="is --ref a checkout of TungChintao/FlowCut?")


def release_tower(fns: dict, model: Any, inputs: Any, visual_target: int) -> dict[str, Any]:
    """The release's tower forward on the tiny model's modules with ``visual.target_num = visual_target``:
    the merger output, the surviving patches (indices in the tower's order, recovered from the rows the
    merger receives) and block 0's patch scores and input."""
    import torch
    from transformers.models.qwen2_vl.modeling_qwen2_vl import get_vision_position_ids

    visual = model.model.visual
    inv_freq = visual.rotary_pos_emb.inv_freq
    seen: dict[str, Any] = {"outs": []}

    def rot_pos_emb(grid_thw):  # 4.45's helper: per patch the h and w angles, [S, head_dim / 2]
        pos = get_vision_position_ids(grid_thw, visual.spatial_merge_size)
        return (pos[..., None].float() * inv_freq.to(pos.device)).flatten(1)

    def attn_fn(index):
        def run(self, hidden_states, **kw):
            out = fns["VisionSdpaAttention_forward"](self, hidden_states, **kw)
            seen.setdefault("scores", []).append(out[1].detach().clone().flatten())
            if index == 0:
                seen["score0"], seen["input0"] = out[1].detach().clone(), hidden_states.detach().clone()
            return out
        return run

    def block_fn(self, hidden_states, **kw):
        out = fns["Qwen2VLVisionBlock_forward"](self, hidden_states, **kw)
        seen["outs"].append((kw["rotary_pos_emb"].detach().clone(), out[0].detach().clone()))
        return out

    def merger(hidden_states):
        seen["merger_in"] = hidden_states.detach().clone()
        return visual.merger(hidden_states)

    blocks = [StandIn(b, block_fn, attn=StandIn(b.attn, attn_fn(i))) for i, b in enumerate(visual.blocks)]
    vis = StandIn(visual, fns["Qwen2VisionTransformerPretrainedModel_forward"], blocks=blocks,
              rot_pos_emb=rot_pos_emb, merger=merger, target_num=visual_target)
    with torch.no_grad():
        full_rope = rot_pos_emb(inputs["image_grid_thw"])
        merged = vis(inputs["pixel_values"], grid_thw=inputs["image_grid_thw"])
    rope, last = seen["outs"][-1]
    rows = seen["merger_in"]
    local = [int(torch.nonzero((last == r).all(-1)).flatten()[0]) for r in rows]  # among the last block's rows
    patches = []
    for i in local:  # the last block's row i: its patch, by its (unique) rotary angles in the full tower
        patches.append(int(torch.nonzero((full_rope == rope[i]).all(-1)).flatten()[0]))
    lengths = [int(r.shape[0]) for r, _ in seen["outs"]] + [int(rows.shape[0])]  # per block input, merger input
    return {"merged": merged, "patches": patches, "lengths": lengths, "scores": seen["scores"], "score0": seen["score0"].flatten(), "input0": seen["input0"]}


def release_llm_stage(fns: dict, model: Any, inputs: Any, lm_in: dict[str, Any], survivors: list[int],
                      keep: int) -> dict[str, Any]:
    """The release's LLM stage (``Qwen2VLSdpaAttention_forward`` with its ``prune`` kwargs, as its
    ``Qwen2VLModel_forward`` calls it at layer 1) on the sequence the release's LLM would receive had its tower
    kept the merged tokens ``survivors`` (indices among the image's tokens): the model's own LLM input (``lm_in``,
    `common.lm_input_kwargs`) with the
    other visual rows removed, original 3-D positions kept (as the release's tower does). Returns ``kept``
    (visual indices, sorted: ``survivors[keep_indices]``), ``scores`` ``[len(survivors)]`` (its
    ``compute_score_llm``), and ``attn`` / ``own`` (its attention output and the tiny model's own on that
    input, for the sanity row)."""
    import torch

    start, n = image_span(model, inputs)
    seen: dict[str, Any] = {}
    lm = model.model.language_model
    length = lm_in["inputs_embeds"].shape[1]
    rows = torch.tensor(list(range(start)) + [start + i for i in survivors] + list(range(start + n, length)))
    embeds, positions = lm_in["inputs_embeds"][:, rows], lm_in["position_ids"][:, :, rows]
    attn = lm.layers[1].self_attn
    handles = [attn.register_forward_pre_hook(lambda m, a, k: seen.update(layer_in=k["hidden_states"]), with_kwargs=True),
               attn.register_forward_hook(lambda m, a, out: seen.update(own=out[0]))]
    try:
        with torch.no_grad():
            lm(inputs_embeds=embeds, position_ids=positions, attention_mask=torch.ones(embeds.shape[:2], dtype=torch.long),
               use_cache=False)
    finally:
        for h in handles:
            h.remove()
    stand_in = StandIn(attn, fns["Qwen2VLSdpaAttention_forward"],
                       rope_scaling={"mrope_section": list(model.config.text_config.rope_parameters["mrope_section"])})
    with torch.no_grad():
        out = stand_in(seen["layer_in"], attention_mask=None, position_ids=None, past_key_value=None,
                       position_embeddings=_old_rotary_tables(lm.rotary_emb.inv_freq, positions),
                       prune=True, visual_token_pos=start, visual_token_num=len(survivors), target_num=keep)
    kept = sorted(survivors[int(i)] for i in out[-1].flatten())
    return {"kept": kept, "scores": RECORDED["llm_score"].flatten().float(), "attn": out[0], "own": seen["own"]}


# ---- vtprune ----------------------------------------------------------------------------------------
def vtprune_tower(model: Any, inputs: Any, keep: int) -> dict[str, Any]:
    """vtprune's ``flowcut`` (removed afterwards): ``groups``, the merge groups its tower stage keeps (tower
    order); ``kept``, the visual tokens its LLM stage keeps (`PruneStats.kept`, sorted); ``scores`` ``[64]``,
    its LLM-stage scores (`PruneStats.scores`, ``-inf`` for the tower-pruned tokens)."""
    import torch

    import vtprune

    seen: dict[str, Any] = {}
    vtprune.apply(model, VTPRUNE_METHOD, keep=keep)
    state = model._vtprune_state
    handle = model.model.visual.register_forward_hook(
        lambda m, a, out: seen.update(acc=state.cls_accumulator.detach().clone()))
    try:
        with torch.no_grad():
            model(**inputs, use_cache=False)
        st = vtprune.stats(model)
    finally:
        handle.remove()
        vtprune.remove(model)
    acc = seen["acc"]
    return {"groups": [int(g) for g in torch.nonzero(torch.isfinite(acc[::4])).flatten()],
            "kept": sorted(int(i) for i in st.kept[0]), "scores": st.scores[0].float(), "layer": st.layer}


def vtprune_layer0(model: Any, hidden: Any, inputs: Any) -> Any:
    """vtprune's ``mean_query_scores`` on block 0's (normed) input, as its tower stage computes them."""
    import torch
    from transformers.models.qwen2_vl.modeling_qwen2_vl import get_vision_position_ids

    from vtprune.adapters.attention_rows import _rotate_half
    from vtprune.scorers.flowcut import mean_query_scores

    visual = model.model.visual
    attn = visual.blocks[0].attn
    pos = get_vision_position_ids(inputs["image_grid_thw"], visual.spatial_merge_size)
    freqs = (pos[..., None].float() * visual.rotary_pos_emb.inv_freq).flatten(1)
    emb = torch.cat([freqs, freqs], dim=-1)
    cos, sin = emb.cos()[:, None, :], emb.sin()[:, None, :]
    s = hidden.shape[0]
    with torch.no_grad():
        q, k, v = attn.qkv(hidden).reshape(s, 3, attn.num_heads, -1).float().unbind(1)
        q = (q * cos + _rotate_half(q) * sin).transpose(0, 1)
        k = (k * cos + _rotate_half(k) * sin).transpose(0, 1)
        score, _ = mean_query_scores(q, k, v.transpose(0, 1), torch.ones(s, dtype=torch.bool), attn.scaling)
    return score


# ---- the comparison ---------------------------------------------------------------------------------
def _inputs() -> Any:
    import numpy as np
    from PIL import Image

    from vtprune.toy.tiny_qwen import tiny_qwen_processor

    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (*IMAGE, 3), dtype=np.uint8))
    return tiny_qwen_processor("qwen2_vl")(images=[image], text=[PROMPT], return_tensors="pt")


def _row(variant: str, budget: Any, stage: str, jac: float, equal: bool, feature: float | None, note: str,
         asserted: bool, **extra: Any) -> dict[str, Any]:
    return {"method": METHOD, "model": MODEL, "variant": variant, "budget": budget, "stage": stage,
            "jaccard": jac, "kept_equal": equal, "logit_max_abs": None, "feature_max_abs": feature,
            "note": note, "asserted": asserted, **extra}


@single_threaded
def compare(ref: Path) -> list[dict[str, Any]]:
    """Rows per variant: the tower without pruning (asserted), block-0 scores (asserted), per budget the
    tower-stage kept groups (recorded, not asserted: groups vs patches by design)."""
    import torch

    from vtprune.toy.tiny_qwen import tiny_qwen

    fns = load_release(_root(ref))
    inputs = _inputs()
    rows = []
    for variant in ("random", "peaked"):
        model = tiny_qwen("qwen2_vl").eval()
        if variant == "peaked":
            peaked(model, PEAK)
        grid = inputs["image_grid_thw"]
        n_patches = int(grid.prod())
        with torch.no_grad():
            own = model.model.get_image_features(inputs["pixel_values"], grid)
        own = torch.cat(list(own.pooler_output if hasattr(own, "pooler_output") else own))
        full = release_tower(fns, model, inputs, n_patches)  # target >= sequence: nothing pruned
        lm_in = lm_input_kwargs(model, inputs)  # the unpruned LLM input, shared by the budgets' LLM stages
        diff = float((full["merged"] - own).abs().max())
        rows.append(_row(variant, "all", "tower", 1.0, full["patches"] == list(range(n_patches)), diff,
                     "the release's tower (stand-ins, nothing pruned) against the model's own image embeddings",
                     True))
        ours0 = vtprune_layer0(model, full["input0"], inputs)
        theirs0 = full["score0"].float()
        top = 8 * BUDGETS[0]
        a, b = torch.topk(ours0, top).indices.tolist(), torch.topk(theirs0, top).indices.tolist()
        rows.append(_row(variant, f"top {top}", "layer0-scores", jaccard(a, b), sorted(a) == sorted(b),
                         float((ours0 - theirs0).abs().max()),
                         "block-0 patch scores: release VisionSdpaAttention_forward vs vtprune mean_query_scores",
                         True))
        for keep in BUDGETS:
            rel = release_tower(fns, model, inputs, 2 * keep)
            groups_rel = sorted({p // 4 for p in rel["patches"]})
            ours = vtprune_tower(model, inputs, keep)
            groups_ours = ours["groups"]
            patches_ours = [4 * g + i for g in groups_ours for i in range(4)]
            rows.append(_row(
                variant, keep, "tower-groups", jaccard(groups_ours, groups_rel), groups_ours == groups_rel, None,
                f"documented deviation: vtprune keeps {len(groups_ours)} whole merge groups, the release "
                f"{len(rel['patches'])} single patches in {len(groups_rel)} groups (merger regroups them)",
                False, patch_jaccard=jaccard(patches_ours, rel["patches"]),
                release_patches=len(rel["patches"]), vtprune_groups=len(groups_ours),
                release_lengths=rel["lengths"]))
            if rel["lengths"][:-1] == [n_patches] * len(model.model.visual.blocks):  # one prune, after the last block
                cum = None
                for sc in rel["scores"]:  # the release's cumulative score, 0.5 C + 0.5 s (re-stated)
                    cum = sc.float() if cum is None else 0.5 * cum + 0.5 * sc.float()
                top = torch.topk(cum.view(-1, 4).mean(dim=1), 2 * keep).indices.sort().values.tolist()
                rows.append(_row(
                    variant, keep, "tower-group-scores", jaccard(groups_ours, top), groups_ours == top, None,
                    "the release pruned nothing before its last block: vtprune's kept groups against the top "
                    f"{2 * keep} groups by the group mean of the release's own cumulative patch scores", True))
            survivors = [int(i) for i in torch.nonzero(torch.isfinite(ours["scores"])).flatten()]
            assert survivors == groups_ours, "vtprune's LLM stage scores exactly its tower survivors"
            llm = release_llm_stage(fns, model, inputs, lm_in, survivors, keep)
            if keep == BUDGETS[0]:
                rows.append(_row(
                    variant, "all", "llm-attention", 1.0, True, float((llm["attn"] - llm["own"]).abs().max()),
                    "the release's LLM attention (layer 1, stand-in, 4.45 rotary re-stated) on the shortened "
                    "sequence against the tiny model's own attention output", True))
            rows.append(_row(
                variant, keep, "llm-stage", jaccard(ours["kept"], llm["kept"]), ours["kept"] == llm["kept"],
                float((ours["scores"][survivors] - llm["scores"]).abs().max()),
                f"the LLM stage at layer {ours['layer']} given vtprune's tower survivors ({len(survivors)} merged "
                "tokens): the release's pick (its attention forward, prune kwargs) vs vtprune's", True))
    return rows


def main(argv: list[str] | None = None) -> int:
    return run_check(METHOD, compare, argv, __doc__,
                     passed=lambda r: r.get("asserted") is False or (
                         r["kept_equal"] and (r["feature_max_abs"] is None or r["feature_max_abs"] <= FEATURE_TOLERANCE)))


if __name__ == "__main__":
    sys.exit(main())
