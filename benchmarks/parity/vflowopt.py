"""Parity of vtprune's ``vflowopt`` with VFlowOpt's released code (github.com/sihany077/VFlowOpt).

The release is written for LLaVA-OneVision's SigLIP tower and a Qwen2 LLM (its own transformers-4.46
fork); vtprune's preset runs on CLIP towers and Qwen-VL, so the comparison is function-level, on the
tensors of the tiny LLaVA-1.5 model (24 x 24 = 576 patches, CLIP feature layer ``-2``, 4 LLM layers):

- Importance: the release's ``SigLipEncoderLayer.forward`` (``llava/model/multimodal_encoder/
  siglip_encoder.py``, ``perform_self_selection=True``: head-mean map, received attention, global tokens
  above ``t`` x mean, their mean row, ``+ alpha_v softmax(entropy)``) runs unbound with a stand-in
  ``self`` whose attention returns the head-wise attention map vtprune's run recorded at the feature layer
  (``[1, heads, 577, 577]``, CLS included, as vtprune's documented choice: the CLS token may be global);
  identity norms and a zero MLP (the map's relevance does not depend on them). The patches' 576 values
  are compared with vtprune's ``last_importance`` (``importance_max_abs``).
- Pre-LLM selection and recycling: the release does it inline in
  ``LlavaQwenTrainingFreeForCausalLM.prepare_inputs_labels_for_multimodal`` (``llava/model/language_model/
  llava_qwen_training_free.py``, the "token merging" block: sort by the attention map, drop the lowest
  ``reduce_tokens + int(N / m**2)``, group them by grid cell of ``m`` patches, write each group's
  map-weighted mean of the projected features into its most important member, keep it). That block's own
  source is taken from the file (``ast``) and executed on the release's importance and the projected
  features of the same image, with its SigLIP grid constants (729 tokens, 27 a side) replaced by the
  tower's (576, 24). Compared: the kept set (``jaccard``), the recycled slots (``recycled_equal``), and
  the recycled features and every kept row against the rows vtprune's LLM receives (``feature_max_abs``,
  ``sequence_max_abs``).
- LLM stages: the release's ``for r_val in illava_llm_r`` loop of ``Qwen2Model.forward_illava``
  (``src/transformers-4.46.0/.../qwen2/modeling_qwen2.py``, which drops, before each layer of
  ``illava_llm_k``, the lowest ``round(L (1 - r))`` by the same importance) is executed the same way on
  the pre-LLM survivors; its two masks give the tokens kept at each stage, compared with vtprune's
  ``stats().stages``. The release's layers (``illava_llm_k`` 9-18 on 28 layers, before those layers) are
  not compared here: on the 4-layer tiny LLM both the release's and vtprune's depth-scaled layers are 1, 2.

Budgets: the release's three configurations (its ``lmms_eval/models/llava_onevision_training_free.py``,
10 / 25 / 50 %): ``t``, ``m`` (vtprune's ``cell``), ``r`` (``vision_ratio``) and ``llm_r`` (the first:
``llm_ratio``; the second sets the final count, vtprune's ``keep``, 576 -> 67 -> 67 -> 41, 153 -> 150 ->
132, 417 -> 312 -> 152). ``alpha_v`` is 0 in all three (the entropy term is not compared).

Documented deviation (docstring of ``vtprune/scorers/vflowopt.py``): vtprune reserves one recycled slot
per grid cell inside the pre-LLM budget (``k - cells`` important tokens), the release reserves
``int(N / m**2)`` and then fills one slot per cell that lost tokens, so it may keep a few more. Rows
compare the release's block at vtprune's split (``reduce_tokens = N - int(N / m**2) - (k - cells)``,
the release's procedure otherwise unchanged); ``release_default_*`` keys record the release's own split
(its ``reduce_tokens = round(N (1 - r))``) against vtprune's default, equal at 50 %, a few tokens apart at
10 / 25 %.

    python benchmarks/parity/vflowopt.py --ref /path/to/VFlowOpt
"""

from __future__ import annotations

import ast
import os
import sys
import textwrap
import types
from contextlib import contextmanager
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import env_name, jaccard, load_file, peaked, reference_path, write_rows  # noqa: E402

METHOD = "vflowopt"
ENV = env_name(METHOD)
LOGIT_TOLERANCE = 1e-4
FEATURE_TOLERANCE = 1e-4
IMPORTANCE_TOLERANCE = 1e-6
# the release's configurations (name: t, m, r, [llm_r at its two LLM stages]), alpha_v 0 in each
CONFIGS = {
    "10%": (39.26492840997221, 17.386981849158786, 0.11661529508161146, [1.0, 0.6011]),
    "25%": (34.759552803070484, 15.580797034937687, 0.2651026358526424, [0.9833433139039235, 0.8773258179532721]),
    "50%": (28.683047941520474, 11.756787150848968, 0.7233201448753168, [0.748747637472693, 0.487]),
}
PROMPT = "USER: <image>\nWhat is in the picture? ASSISTANT:"
ENCODER = "src/LLaVA-OneVision/llava/model/multimodal_encoder/siglip_encoder.py"
ARCH = "src/LLaVA-OneVision/llava/model/language_model/llava_qwen_training_free.py"
QWEN2 = "src/transformers-4.46.0/src/transformers/models/qwen2/modeling_qwen2.py"


@contextmanager
def extra_attributes(module: Any, names: list[str]):
    """Placeholder classes for names the release's fork adds to a transformers module (unused here)."""
    added = [n for n in names if not hasattr(module, n)]
    for n in added:
        setattr(module, n, type(n, (), {}))
    try:
        yield
    finally:
        for n in added:
            delattr(module, n)


def load_encoder(ref: Path) -> types.ModuleType:
    """The release's ``siglip_encoder`` module (its fork's output classes and ``llava.utils`` stubbed)."""
    import transformers.modeling_outputs as outputs

    fork = ["BaseModelOutputWithSourcecIndice", "BaseModelOutputWithPoolingAndSourceIndice",
            "BaseModelOutputWithPoolingAndAttnMaps"]
    saved = {name: sys.modules.get(name) for name in ("llava", "llava.utils")}
    sys.modules["llava"] = types.ModuleType("llava")
    utils = types.ModuleType("llava.utils")
    utils.rank0_print = print
    sys.modules["llava.utils"] = utils
    try:
        with extra_attributes(outputs, fork):
            return load_file(ref / ENCODER, "vflowopt_siglip_encoder")
    finally:
        for name, old in saved.items():
            if old is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = old


def _function(tree: ast.AST, name: str) -> ast.FunctionDef:
    hits = [n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name == name]
    if not hits:
        raise SystemExit(f"the release has no function {name}: is --ref a checkout of VFlowOpt?")
    return hits[0]


def release_block(path: Path, function: str, marker: str, kind: type) -> str:
    """The source of the first ``kind`` statement (``ast.If`` / ``ast.For``) of ``function`` in ``path``
    whose text contains ``marker``, dedented."""
    text = path.read_text()
    tree = ast.parse(text)
    for node in ast.walk(_function(tree, function)):
        if isinstance(node, kind):
            seg = ast.get_source_segment(text, node) or ""
            if marker in seg and not any(isinstance(c, kind) and marker in (ast.get_source_segment(text, c) or "")
                                         for c in ast.walk(node) if c is not node):
                return textwrap.dedent(" " * node.col_offset + seg)
    raise SystemExit(f"{path.name}: no block with {marker!r} in {function}")


class Release:
    """The release's importance, pre-LLM block and LLM-stage loop, callable on tensors."""

    def __init__(self, ref: Path, n: int, side: int) -> None:
        self.encoder = load_encoder(ref)
        merging = release_block(ref / ARCH, "prepare_inputs_labels_for_multimodal", "illava_vit_m", ast.If)
        # SigLIP's 27 x 27 grid is written into the block; the tiny CLIP tower has 24 x 24
        assert merging.count("729") == 3 and merging.count("// 27") == 1 and merging.count("% 27") == 1, merging
        merging = merging.replace("729", str(n)).replace("// 27", f"// {side}").replace("% 27", f"% {side}")
        self.merging = compile(merging, str(ref / ARCH), "exec")
        stages = release_block(ref / QWEN2, "forward_illava", "for r_val in illava_llm_r", ast.For)
        self.stages = compile(stages, str(ref / QWEN2), "exec")

    def importance(self, attn: Any, t: float) -> Any:
        """``[P + 1]`` context relevance from the head-wise map ``attn`` ``[1, H, P + 1, P + 1]``."""
        import torch

        hidden = torch.zeros(1, attn.shape[-1], 4)
        stand_in = types.SimpleNamespace(
            layer_norm1=lambda x: x, layer_norm2=lambda x: x, mlp=lambda x: torch.zeros_like(x),
            self_attn=lambda hidden_states, attention_mask, output_attentions: (torch.zeros_like(hidden_states), attn))
        self.encoder.entropies = torch.zeros(1, attn.shape[-1])  # alpha_v = 0: the term adds 0 x softmax
        out = self.encoder.SigLipEncoderLayer.forward(stand_in, hidden, None, perform_self_selection=True,
                                                      t=t, alpha_v=0.0)
        return out[-1][0]

    def select(self, importance: Any, features: Any, m: float, r: float, reduce_tokens: int | None) -> dict:
        """The release's pre-LLM block on ``importance`` ``[P]`` and ``features`` ``[P, D]``: ``kept`` (sorted
        indices), ``slots`` (recycled, sorted), ``rows`` ``[k, D]`` (kept rows in order) and ``map`` ``[k]``."""
        import torch

        n = importance.shape[0]
        if reduce_tokens is None:  # the release's own: round(N (1 - r))
            reduce_tokens = round(n * (1 - r))
        env = {"torch": torch, "os": os, "json": __import__("json"), "image_attn_map": importance.clone(),
               "image_feature": features.clone(), "illava_config": {"enable_illava_vit": True, "illava_vit_m": m},
               "reduce_tokens": reduce_tokens, "image_token_length": n, "local_w": int(n ** 0.5)}
        saved = os.environ.get("VIT_ATTN_MAP")
        try:
            exec(self.merging, env)
        finally:
            if saved is None:
                os.environ.pop("VIT_ATTN_MAP", None)
            else:
                os.environ["VIT_ATTN_MAP"] = saved
        kept = torch.nonzero(env["to_keep_mask"]).flatten()
        slots = sorted(int(g[importance[g].argmax()]) for g in env["low_k_groups"])
        return {"kept": kept.tolist(), "slots": slots, "rows": env["image_feature"], "map": env["image_attn_map"]}

    def llm_stages(self, importance: Any, ratios: list[float]) -> list[Any]:
        """Per LLM stage the keep mask ``[L_s]`` over the tokens present, from the release's loop."""
        import torch

        n = importance.shape[0]
        env = {"torch": torch, "combined_attn": importance.clone(), "illava_llm_r": ratios, "image_token_length": n,
               "len_hidden_states": n, "illava_llm_image_token_start_index": 0, "del_musks": [],
               "hidden_states": torch.zeros(1, n, 1), "round": round}
        exec(self.stages, env)
        masks, present = [], n
        for mask in env["del_musks"]:  # each over the sequence present at its stage (here: the visual tokens)
            masks.append(mask[:present])
            present = int(mask[:present].sum())
        return masks


def with_sinks(model: Any, inputs: Any, strength: float = 50.0) -> Any:
    """Attention sinks at the feature layer (in place): its key projection gains ``strength u d^T`` (``u``
    the unit mean query of this input, ``d`` a fixed random unit direction), so that the few tokens whose
    layer input lies furthest along ``d`` receive far more than the mean attention, as the global tokens of
    trained towers do. Without them no token of a random tiny tower receives ``t`` (28-39) times the mean:
    the release's relevance is then the mean of no rows (NaN), vtprune's documented fallback ``c = r``."""
    import torch

    from vtprune.adapters.base import adapter_for

    adapter = adapter_for(model)
    module = adapter.vision_attention(adapter.default_vision_layer())
    seen: dict[str, Any] = {}
    handle = module.register_forward_hook(
        lambda m, a, k, out: seen.update(x=k["hidden_states"] if "hidden_states" in k else a[0]), with_kwargs=True)
    try:
        with torch.no_grad():
            model.model.get_image_features(pixel_values=inputs["pixel_values"])
    finally:
        handle.remove()
    with torch.no_grad():
        u = module.q_proj(seen["x"][0]).mean(0)
        d = torch.randn(u.shape[0], generator=torch.Generator().manual_seed(0))
        module.k_proj.weight += strength * torch.outer(u / u.norm(), d / d.norm()).to(module.k_proj.weight.dtype)
    return model


def inputs_for(seed: int = 0) -> Any:
    import numpy as np
    from PIL import Image

    from vtprune.toy.tiny import tiny_llava_processor

    rng = np.random.default_rng(seed)
    image = Image.fromarray(rng.integers(0, 256, (400, 500, 3), dtype=np.uint8))
    return tiny_llava_processor()(images=[image], text=[PROMPT], return_tensors="pt")


def vtprune_run(model: Any, inputs: Any, options: dict[str, Any], keep: int) -> dict[str, Any]:
    """vtprune's importance, stages, recycled slots, the LLM's visual input rows and the feature layer's
    head-wise attention map recorded from the same forward."""
    import torch

    import vtprune

    seen: dict[str, Any] = {}
    vtprune.apply(model, METHOD, keep=keep, **options)
    state = model._vtprune_state
    adapter, scorer = state.adapter, state.scorer
    layer = scorer.vision_layer if scorer.vision_layer is not None else adapter.default_vision_layer()
    handles = [adapter.vision_attention(layer).register_forward_hook(lambda m, a, out: seen.update(attn=out[1])),
               model.model.language_model.register_forward_pre_hook(lambda m, a, k: seen.update(k), with_kwargs=True)]
    try:
        with torch.no_grad():
            model(**inputs, use_cache=False)
        st = vtprune.stats(model)
        importance = scorer.last_importance[0].clone()
        recycled = scorer.last_recycled[0].cpu().tolist()
        layers = list(scorer.llm_layers)
    finally:
        for h in handles:
            h.remove()
        vtprune.remove(model)
    stages = [[int(i) for i in s["kept"][0].tolist()] for s in st.stages]
    ids = inputs["input_ids"][0]
    start = int(torch.nonzero(ids == model.config.image_token_id)[0])
    rows = seen["inputs_embeds"][0, start:start + len(stages[0])]
    return {"importance": importance, "stages": stages, "recycled": recycled, "rows": rows, "attn": seen["attn"],
            "layers": layers}


def compare(ref: Path) -> list[dict[str, Any]]:
    import torch

    from vtprune.toy.tiny import tiny_llava

    inputs = inputs_for()
    rows: list[dict[str, Any]] = []
    release = None
    for variant in ("random", "peaked"):
        model = tiny_llava(attn_implementation="eager")  # the feature layer's attention map is recorded
        if variant == "peaked":
            peaked(model)
        with_sinks(model, inputs)
        with torch.no_grad():
            features = model.model.get_image_features(pixel_values=inputs["pixel_values"],
                                                      return_dict=True).pooler_output[0].float()
        n = features.shape[0]
        side = int(round(n ** 0.5))
        if release is None:
            release = Release(ref, n, side)
        for name, (t, m, r, llm_r) in CONFIGS.items():
            pre = n - round(n * (1 - r))  # both sides: the pre-LLM count
            final = pre
            for ratio in llm_r:
                final -= round(final * (1 - ratio))
            options = {"t": t, "cell": m, "vision_ratio": r, "llm_ratio": llm_r[0], "alpha": 0.0}
            ours = vtprune_run(model, inputs, options, final)
            imp = release.importance(ours["attn"].float(), t)[1:]  # the patches' relevance (slot 0: CLS)
            received = ours["attn"][0].float().mean(0).mean(0)
            globals_ = int((received > t * received.mean()).sum())  # the release's global tokens (CLS included)
            cells = len({(int(y / m), int(x / m)) for y in range(side) for x in range(side)})  # grid cells
            top = max(1, pre - cells)
            merged = int(n / (m * m))
            theirs = release.select(imp, features, m, r, reduce_tokens=n - merged - top)
            default = release.select(imp, features, m, r, reduce_tokens=None)
            masks = release.llm_stages(theirs["map"], llm_r)
            stage_sets, present = [], torch.tensor(theirs["kept"])
            for mask in masks:
                present = present[mask.cpu()]
                stage_sets.append(sorted(present.tolist()))
            ours_rows = ours["rows"].float()
            slot_rank = [ours["stages"][0].index(s) for s in ours["recycled"]]
            their_rank = [theirs["kept"].index(s) for s in theirs["slots"]]
            same_rows = ours_rows.shape == theirs["rows"].shape
            stage_equal = [ours["stages"][i + 1] == stage_sets[i] for i in range(min(len(stage_sets),
                                                                                      len(ours["stages"]) - 1))]
            rows.append({
                "method": METHOD, "model": "tiny-llava-1.5", "variant": variant, "budget": final,
                "config": name, "pre_llm": len(ours["stages"][0]),
                "jaccard": min([jaccard(ours["stages"][0], theirs["kept"])]
                               + [jaccard(ours["stages"][i + 1], stage_sets[i]) for i in range(len(stage_equal))]),
                "kept_equal": ours["stages"][0] == theirs["kept"] and all(stage_equal)
                and len(stage_equal) == len(stage_sets) and ours["recycled"] == theirs["slots"],
                "pre_llm_jaccard": jaccard(ours["stages"][0], theirs["kept"]),
                "stage_jaccards": [jaccard(ours["stages"][i + 1], stage_sets[i]) for i in range(len(stage_equal))],
                "stage_counts": {"vtprune": [len(s) for s in ours["stages"]],
                                 "release": [len(theirs["kept"])] + [len(s) for s in stage_sets]},
                "recycled_equal": ours["recycled"] == theirs["slots"],
                "global_tokens": globals_,
                "importance_max_abs": float((ours["importance"].float() - imp.cpu()).abs().max()),
                "feature_max_abs": float((ours_rows[slot_rank] - theirs["rows"][their_rank]).abs().max())
                if ours["recycled"] == theirs["slots"] and slot_rank else None,
                "sequence_max_abs": float((ours_rows - theirs["rows"]).abs().max()) if same_rows else None,
                "logit_max_abs": None,
                "release_default_pre_llm": len(default["kept"]),
                "release_default_jaccard": jaccard(ours["stages"][0], default["kept"]),
                "note": f"release's block at vtprune's split ({top} important + one slot per cell of {cells}; "
                        f"the release's own split keeps {len(default['kept'])}, vtprune {pre}: documented "
                        f"deviation); LLM stages at vtprune layers {ours['layers']}; alpha 0; eager attention, "
                        f"noise image",
            })
    return rows


def main(argv: list[str] | None = None) -> int:
    ref, args = reference_path(METHOD, argv, __doc__ or "")
    if ref is None:
        return 0
    rows = compare(ref)
    write_rows(METHOD, rows, ref, args, f"python benchmarks/parity/vflowopt.py --ref {ref}")
    for r in rows:
        print(f"  {r['variant']} {r['config']}: {r['global_tokens']} global tokens, importance "
              f"{r['importance_max_abs']:.2e}, pre-LLM jaccard "
              f"{r['pre_llm_jaccard']:.3f}, stages {r['stage_jaccards']} counts {r['stage_counts']}, recycled "
              f"equal {r['recycled_equal']}, recycled features {r['feature_max_abs']}, rows {r['sequence_max_abs']}; "
              f"the release's own split: {r['release_default_pre_llm']} kept, jaccard "
              f"{r['release_default_jaccard']:.3f}")
    ok = all(r["kept_equal"] and r["global_tokens"] > 0 and r["importance_max_abs"] < IMPORTANCE_TOLERANCE
             for r in rows)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
