"""Parity of vtprune's ``dart`` on Qwen2.5-VL with DART's released Qwen2.5-VL code (github.com/ZichenWen1/DART,
read through the fork github.com/xqy1111111/DART; run at the fork's HEAD d6a5af6, whose ``Qwen2_5-VL/`` folder is
Zichen Wen's commit 38d7b9c, 2025-08-31, "apply DART on Qwen2_5-VL"; identical at 5a19452, the upstream commit the
LLaVA check ``dart.py`` uses: the fork's own later commits do not touch ``Qwen2_5-VL/``).

Reference file: ``Qwen2_5-VL/Qwen2_5VL_DART/modeling_qwen2_5_vl_self.py`` (a copy of transformers 4.54-era
``modeling_qwen2_5_vl.py`` whose language model is ``DART(Qwen2_5_VLTextModel)``). It imports names transformers 5
no longer has, so it does not import here: these functions are taken from the file's source (``ast``; type
annotations and decorators dropped, bodies unchanged) and executed: ``DART.forward`` (the LLM loop: before decoder
layer ``K = DART_config["K"]`` it takes layer ``K - 1``'s output through the final norm and its post-RoPE keys, calls
``get_retained_image_token``, keeps the prefix, the retained image tokens and the suffix in sequence order and
gathers ``position_ids`` / ``cache_position``, then recomputes the rotary tables), ``DART.get_retained_image_token``
(pivots by the keys' L1 norm, 4 image + 4 text, the text being everything after the image span; per pivot in
Python set order the ``int(N (1 - reduction_ratio) / 8)`` remaining image tokens least cosine-similar to it),
``Qwen2_5_VLDecoderLayer.forward`` and ``Qwen2_5_VLAttention.forward`` (which return the post-RoPE keys, before
``repeat_kv``), ``Qwen2_5_VLRotaryEmbedding.forward`` (its ``[3, B, L, d]`` tables), and the module-level
``rotate_half``, ``apply_multimodal_rotary_pos_emb``, ``repeat_kv`` and ``eager_attention_forward``.

They run on stand-in ``self`` objects (`common.StandIn`) whose parameters and sub-modules are the tiny model's (the attention
call is transformers 5's ``ALL_ATTENTION_FUNCTIONS["sdpa"]``, as in the file). Re-stated here, since transformers 5
moved them: ``create_causal_mask`` (``None`` for the one unpadded prompt, as 4.54's under SDPA: causal, which the
release's slicing skips), the decoder layers' ``attention_type`` (``"full_attention"``: no sliding layers), the
attention's ``rope_scaling["mrope_section"]`` (the tiny config's), the config flags the forward reads, and
``DART_config`` (as the release's lmms-eval wrapper would set it: ``K``, ``image_token_start_index`` = the first
``<|image_pad|>``, ``image_token_length`` = N, ``pivot_image_token 4``, ``pivot_text_token 4``, ``reduction_ratio``).
The LLM's input (``inputs_embeds``, ``position_ids``, ``attention_mask``) is what the tiny model's own
``Qwen2_5_VLModel`` passes its language model (recorded by a pre-hook), so the vision tower and M-RoPE indexing are
transformers 5's on both sides. The check asserts that the release's forward with ``DART_config=None`` reproduces
the tiny model's own first-token logits (``unpruned_max_abs``): the stand-ins are right.

Model: a tiny random-weight Qwen2.5-VL (``vtprune.toy.tiny_qwen``, 4 vision blocks, 4-layer LLM), one 252 x 308 noise
image: 18 x 22 patches, 9 x 11 = 99 merged tokens (window order differs from raster order; DART works on the LLM's
sequence, in raster order on both sides). Variants ``random`` and ``peaked`` (``common.peaked``, factor 256).

Budgets (``budget`` = vtprune's ``keep``): the release keeps its 4 image pivots plus ``TOKEN_TOPK =
int(N (1 - reduction_ratio) / 8)`` tokens per pivot; ``reduction_ratio = 1 - (8 t + 0.5) / N`` gives ``t`` = 1 / 2 / 4,
i.e. ``keep = 4 + 8 t`` = 12 / 20 / 36, vtprune ``keep=12/20/36`` at its default ``layer=1`` (the release's
``K = 2``, the README's ``--pruned_layer 2``). Rows: the kept image tokens (positions among the image's tokens),
first-token logits of both whole pipelines (both keep the kept tokens' positions after the drop). Two rows per
variant are recorded, not asserted: vtprune's option ``pivot_order="norm"``, and ``keep=39`` against the release at
36 (vtprune gives the remainder of ``keep - 4`` over the 8 pivots to the first pivots; the release floors).

    python benchmarks/parity/dart_qwen.py --ref /work/refs/DART-qwen     # or VTPRUNE_PARITY_DART_QWEN=PATH
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import StandIn, env_name, jaccard, peaked, release_functions, run_check, single_threaded  # noqa: E402

METHOD = "dart-qwen"
VTPRUNE_METHOD = "dart"
ENV = env_name(METHOD)
LOGIT_TOLERANCE = 1e-4
MODEL = "tiny-qwen2.5-vl (4 vision blocks; 9x11 merged grid, 99 tokens; 4-layer LLM)"
IMAGE = (252, 308)  # height, width of the noise image: 9 x 11 merged tokens
PEAKED_FACTOR = 256.0
PRUNED_LAYER = 2  # the release's K: the input of decoder layer 2 is pruned (vtprune: after layer 1)
PIVOTS = (4, 4)  # pivot_image_token, pivot_text_token
PER_PIVOT = (1, 2, 4)  # the release's TOKEN_TOPK
PROMPT = ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
          "<|vision_start|><|image_pad|><|vision_end|>What is in the picture?<|im_end|>\n<|im_start|>assistant\n")
MODELING = "Qwen2_5-VL/Qwen2_5VL_DART/modeling_qwen2_5_vl_self.py"
RELEASE_FUNCTIONS = (
    ("DART", "forward"),
    ("DART", "get_retained_image_token"),
    ("Qwen2_5_VLDecoderLayer", "forward"),
    ("Qwen2_5_VLAttention", "forward"),
    ("Qwen2_5_VLRotaryEmbedding", "forward"),
)
MODULE_FUNCTIONS = ("rotate_half", "apply_multimodal_rotary_pos_emb", "repeat_kv", "eager_attention_forward")


def _file(ref: Path) -> Path:
    path = ref / MODELING
    if not path.is_file():
        raise SystemExit(f"{ref} is not a checkout of DART with its Qwen2.5-VL code: no {MODELING}")
    return path


def _no_mask(config: Any = None, input_embeds: Any = None, attention_mask: Any = None, **_: Any) -> None:
    """4.54's ``create_causal_mask`` under SDPA for one unpadded prompt: ``None`` (the layers attend causally)."""
    assert attention_mask is None or bool((attention_mask == 1).all()), "one unpadded prompt"
    return None


def load_release(path: Path) -> dict[Any, Any]:
    """The release's functions, compiled from the file's source in a namespace of transformers 5's torch-level
    helpers (``ALL_ATTENTION_FUNCTIONS``, ``BaseModelOutputWithPast``, ``DynamicCache``) and the stand-ins."""
    import torch
    import torch.nn.functional as F
    from torch import nn
    from transformers.cache_utils import DynamicCache
    from transformers.modeling_outputs import BaseModelOutputWithPast
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    namespace: dict[str, Any] = {
        "torch": torch, "nn": nn, "F": F, "logger": logging.getLogger("dart_release"), "DynamicCache": DynamicCache,
        "BaseModelOutputWithPast": BaseModelOutputWithPast, "ALL_ATTENTION_FUNCTIONS": ALL_ATTENTION_FUNCTIONS,
        "create_causal_mask": _no_mask, "create_sliding_window_causal_mask": _no_mask,
    }
    return release_functions(path, (*RELEASE_FUNCTIONS, *MODULE_FUNCTIONS), namespace, strip=True)


def lm_inputs(model: Any, inputs: Any) -> dict[str, Any]:
    """The keyword arguments the tiny model's ``Qwen2_5_VLModel`` passes its language model."""
    import torch

    seen: dict[str, Any] = {}
    handle = model.model.language_model.register_forward_pre_hook(lambda m, a, k: seen.update(k), with_kwargs=True)
    try:
        with torch.no_grad():
            seen["logits"] = model(**inputs, use_cache=False).logits[0, -1]
    finally:
        handle.remove()
    return seen


def release_run(fns: dict, model: Any, seen: dict[str, Any], dart_config: dict[str, Any] | None) -> dict[str, Any]:
    """The release's ``DART.forward`` on the tiny language model's modules and its recorded input: the retained image
    tokens' positions (``get_retained_image_token``'s output; None without ``dart_config``) and first-token logits."""
    import torch

    text = model.model.language_model
    mrope = list(text.config.rope_parameters["mrope_section"])
    rotary = StandIn(text.rotary_emb, fns[("Qwen2_5_VLRotaryEmbedding", "forward")])
    layers = [StandIn(layer, fns[("Qwen2_5_VLDecoderLayer", "forward")], attention_type="full_attention",
                  self_attn=StandIn(layer.self_attn, fns[("Qwen2_5_VLAttention", "forward")],
                                rope_scaling={"mrope_section": mrope}))
              for layer in text.layers]
    config = StandIn(text.config, None, DART_config=dart_config, output_attentions=False, output_hidden_states=False,
                 use_cache=False, use_return_dict=True)
    got: list[Any] = []
    dart = StandIn(text, fns[("DART", "forward")], layers=layers, rotary_emb=rotary, config=config,
               has_sliding_layers=False, gradient_checkpointing=False, training=False)

    def retained(config: Any, last_layer_state: Any, any_states: Any) -> Any:
        index = fns[("DART", "get_retained_image_token")](dart, config, last_layer_state, any_states)
        got.append(index.detach().clone())
        return index

    dart.__dict__["get_retained_image_token"] = retained
    with torch.no_grad():
        out = dart(input_ids=None, attention_mask=seen.get("attention_mask"), position_ids=seen["position_ids"],
                   inputs_embeds=seen["inputs_embeds"], use_cache=False, output_attentions=False,
                   output_hidden_states=False, return_dict=True)
        logits = model.lm_head(out.last_hidden_state[:, -1])[0]
    if dart_config is not None and len(got) != 1:
        raise SystemExit(f"dart-qwen parity: the release selected {len(got)} times in one prefill")
    return {"retained": got[0] if got else None, "logits": logits}


def vtprune_run(model: Any, inputs: Any, **options: Any) -> dict[str, Any]:
    import torch

    import vtprune

    vtprune.apply(model, VTPRUNE_METHOD, **options)
    try:
        with torch.no_grad():
            logits = model(**inputs, use_cache=False).logits[0, -1]
        st = vtprune.stats(model)
    finally:
        vtprune.remove(model)
    return {"kept": st.kept[0], "layer": st.layer, "logits": logits}


def _inputs() -> Any:
    import numpy as np
    from PIL import Image

    from vtprune.toy.tiny_qwen import tiny_qwen_processor

    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (*IMAGE, 3), dtype=np.uint8))
    return tiny_qwen_processor("qwen2_5_vl")(images=[image], text=[PROMPT], return_tensors="pt")


@single_threaded
def compare(ref: Path) -> list[dict[str, Any]]:
    import torch

    from vtprune.toy.tiny_qwen import tiny_qwen

    fns = load_release(_file(ref))
    inputs = _inputs()
    rows = []
    for variant in ("random", "peaked"):
        model = tiny_qwen("qwen2_5_vl")
        if variant == "peaked":
            peaked(model, PEAKED_FACTOR)
        image = inputs["input_ids"][0] == model.config.image_token_id
        start, n = int(torch.nonzero(image)[0]), int(image.sum())
        assert bool(image[start:start + n].all()), "one contiguous image span"
        seen = lm_inputs(model, inputs)
        unpruned = float((release_run(fns, model, seen, None)["logits"] - seen["logits"]).abs().max())
        if not unpruned < LOGIT_TOLERANCE:
            raise SystemExit(f"the release's DART.forward without DART_config, driven here, does not reproduce the "
                             f"tiny model's logits (max |diff| {unpruned:.2e}): the stand-ins are wrong")
        for t in PER_PIVOT:
            ratio = 1 - (sum(PIVOTS) * t + 0.5) / n
            assert int(n * (1 - ratio) / sum(PIVOTS)) == t
            keep = PIVOTS[0] + sum(PIVOTS) * t
            cfg = {"K": PRUNED_LAYER, "image_token_start_index": start, "image_token_length": n,
                   "pivot_image_token": PIVOTS[0], "pivot_text_token": PIVOTS[1], "reduction_ratio": ratio}
            theirs = release_run(fns, model, seen, cfg)
            kept_t = torch.sort(theirs["retained"].long() - start).values
            ours = vtprune_run(model, inputs, keep=keep, image_pivots=PIVOTS[0], text_pivots=PIVOTS[1])
            kept_o = torch.sort(ours["kept"].long()).values
            rows.append({
                "method": METHOD, "model": MODEL, "variant": variant, "budget": keep,
                "jaccard": jaccard(kept_t.tolist(), kept_o.tolist()),
                "kept_equal": bool(torch.equal(kept_t.cpu(), kept_o.cpu())),
                "logit_max_abs": float((ours["logits"] - theirs["logits"]).abs().max()),
                "feature_max_abs": None, "unpruned_max_abs": unpruned,
                "counts": {"release": int(kept_t.numel()), "vtprune": int(kept_o.numel())},
                "note": f"release DART_config K={PRUNED_LAYER} pivot_image_token {PIVOTS[0]} pivot_text_token "
                        f"{PIVOTS[1]} reduction_ratio={ratio:.4g} (its TOKEN_TOPK int({n} (1 - r) / 8) = {t}), "
                        f"image_token_start_index={start}, image_token_length={n}; vtprune keep={keep}, pruned after "
                        f"layer {ours['layer']}; logits of both whole pipelines",
            })
            if t == PER_PIVOT[-1]:  # recorded, not asserted: how far vtprune's other choices are from the release
                extra = [({"keep": keep, "pivot_order": "norm"}, "vtprune option pivot_order='norm' (pivots by "
                          "norm, not the release's Python set order)"),
                         ({"keep": keep + 3}, f"vtprune keep={keep + 3}: keep - 4 = {keep - 1} not a multiple of 8, "
                          "the remainder goes to the first pivots (a documented deviation: the release floors)")]
                for opts, label in extra:
                    other = vtprune_run(model, inputs, image_pivots=PIVOTS[0], text_pivots=PIVOTS[1], **opts)
                    kept_x = torch.sort(other["kept"].long()).values
                    rows.append({
                        "method": METHOD, "model": MODEL, "budget": opts["keep"],
                        "variant": variant + (", pivot_order=norm" if "pivot_order" in opts else ", remainder"),
                        "jaccard": jaccard(kept_t.tolist(), kept_x.tolist()),
                        "kept_equal": bool(torch.equal(kept_t.cpu(), kept_x.cpu())),
                        "logit_max_abs": (float((other["logits"] - theirs["logits"]).abs().max())),
                        "feature_max_abs": None, "unpruned_max_abs": unpruned,
                        "counts": {"release": int(kept_t.numel()), "vtprune": int(kept_x.numel())},
                        "note": f"release as at budget {keep} (TOKEN_TOPK {t}); {label}; not asserted",
                        "asserted": False,
                    })
    return rows


def passed(row: dict[str, Any]) -> bool:
    if row.get("asserted") is False:
        return True
    return row["kept_equal"] and row["jaccard"] == 1.0 and row["logit_max_abs"] < LOGIT_TOLERANCE


def summary(rows: list[dict[str, Any]]) -> None:
    for r in rows:
        print(f"  {r['variant']} keep {r['budget']}: kept equal {r['kept_equal']}, counts {r['counts']}, "
              f"unpruned release vs model {r['unpruned_max_abs']:.2e}"
              f"{'' if r.get('asserted', True) else ' (not asserted)'}")


def main(argv: list[str] | None = None) -> int:
    return run_check(METHOD, compare, argv, __doc__ or "", passed=passed, summary=summary)


if __name__ == "__main__":
    sys.exit(main())
