"""An analytic FLOPs estimate of one sample's prefill, from the model config and the pruning point.

FLOPs count a multiply-add as 2. One transformer layer over ``n`` tokens attending to ``c`` tokens:

    F(n, c) = 2 n d (2 d_q + 2 d_kv)      q, k, v, o projections
            + 4 n c d_q                    scores QK^T and the weighted sum AV (full square, as FastV counts)
            + 2 n g d i                    MLP: g = 3 matrices when gated (SwiGLU), else 2

with ``d`` the width, ``d_q`` = heads x head_dim, ``d_kv`` = kv heads x head_dim, ``i`` the MLP width.

- **LLM**: ``sum over layers l of F(n_l, n_l)`` plus the LM head on one position (``2 d V``; the prefill
  runs with ``logits_to_keep=1``). ``n_l`` is the sample's sequence length without padding: unpruned,
  every layer sees all ``N`` tokens; pre-LLM pruning, every layer sees the shortened ``N'``; in-LLM
  pruning after layer ``K``, layers ``0..K`` see ``N`` and layers ``K+1..`` see ``N'``
  (`PruneStats.seq_len_before` / ``seq_len_after``).
- **Vision tower** (the same pruned or not: pruning happens after it; FlowCut's in-tower key masks
  are not counted as savings), per image: CLIP (LLaVA): every layer on ``P + 1`` tokens per tile (one
  tile for LLaVA-1.5, the anyres tiles for LLaVA-NeXT), plus the patch embedding ``2 P (3 p^2) d_v``
  and the 2-layer projector on ``P`` features. Qwen-VL: every block on the image's ``t h w`` patches
  (Qwen2.5-VL's window blocks attend within ``(window / p)^2`` patches), plus the patch embedding
  ``2 P (3 T p^2) d_v`` and the 2x2 merger MLP (Qwen3-VL: one more per deepstack level).

Norms, activations, rotary embeddings and softmax are not counted (a few percent at most).
"""

from __future__ import annotations

from typing import Any


def layer_flops(n: int, context: int, d: int, d_q: int, d_kv: int, inter: int, mlp_mats: int) -> float:
    """``F(n, c)`` of the module docstring: one transformer layer, ``n`` queries over ``context`` keys."""
    return float(2 * n * d * (2 * d_q + 2 * d_kv) + 4 * n * context * d_q + 2 * n * mlp_mats * d * inter)


def _text_dims(config: Any) -> dict[str, int]:
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    d = text.hidden_size
    heads = text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or d // heads
    kv = getattr(text, "num_key_value_heads", None) or heads
    return dict(d=d, d_q=heads * head_dim, d_kv=kv * head_dim, inter=text.intermediate_size,
                layers=text.num_hidden_layers, vocab=text.vocab_size)


def llm_flops(config: Any, seq_before: int, seq_after: int | None = None, stage: str | None = None,
              layer: int | None = None) -> float:
    """LLM prefill FLOPs of one sample: unpruned (``stage=None``), ``"pre-llm"`` or ``"llm"`` after ``layer``."""
    t = _text_dims(config)

    def f(n: int) -> float:
        return layer_flops(n, n, t["d"], t["d_q"], t["d_kv"], t["inter"], 3)

    if stage is None or seq_after is None:
        body = t["layers"] * f(seq_before)
    elif stage == "pre-llm":
        body = t["layers"] * f(seq_after)
    else:
        early = min(t["layers"], (layer or 0) + 1)
        body = early * f(seq_before) + (t["layers"] - early) * f(seq_after)
    return body + 2.0 * t["d"] * t["vocab"]


def vision_flops(config: Any, geometry: Any) -> float | None:
    """Vision tower (+ projector) FLOPs of one image; ``geometry`` is the tile count (LLaVA) or ``(t, h, w)``.

    None for a model type this estimate does not know.
    """
    v = config.vision_config
    kind = config.model_type
    if kind in ("llava", "llava_next"):
        d_v, p = v.hidden_size, v.patch_size
        patches = (v.image_size // p) ** 2
        tile = (v.num_hidden_layers * layer_flops(patches + 1, patches + 1, d_v, d_v, d_v, v.intermediate_size, 2)
                + 2.0 * patches * 3 * p * p * d_v)
        d = _text_dims(config)["d"]
        projector = 2.0 * patches * (d_v * d + d * d)
        return int(geometry) * (tile + projector)
    if kind in ("qwen2_vl", "qwen2_5_vl", "qwen3_vl"):
        t, h, w = (int(x) for x in geometry)
        n = t * h * w
        p, m = v.patch_size, v.spatial_merge_size
        if kind == "qwen2_vl":
            d_v, inter, mats, d_out = v.embed_dim, int(v.embed_dim * v.mlp_ratio), 2, v.hidden_size
        else:
            d_v, inter, d_out = v.hidden_size, v.intermediate_size, v.out_hidden_size
            mats = 3 if kind == "qwen2_5_vl" else 2
        full = set(getattr(v, "fullatt_block_indexes", None) or range(v.depth))
        window = min(n, (getattr(v, "window_size", 0) // p) ** 2) if kind == "qwen2_5_vl" else n
        blocks = sum(layer_flops(n, n if i in full else window, d_v, d_v, d_v, inter, mats) for i in range(v.depth))
        embed = 2.0 * n * 3 * v.temporal_patch_size * p * p * d_v
        merged, width = n // (m * m), d_v * m * m
        mergers = 1 + len(getattr(v, "deepstack_visual_indexes", None) or [])
        return blocks + embed + mergers * 2.0 * merged * (width * width + width * d_out)
    return None


def image_geometry(config: Any, inputs: Any) -> list[Any] | None:
    """Per image of a batch (one image per sample in `vtprune eval`): what `vision_flops` needs, or None."""
    kind = config.model_type
    if kind == "llava" and "pixel_values" in inputs:
        return [1] * int(inputs["pixel_values"].shape[0])
    if kind == "llava_next" and "image_sizes" in inputs:
        from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

        return [image_size_to_num_patches(tuple(int(x) for x in size), config.image_grid_pinpoints,
                                          config.vision_config.image_size) for size in inputs["image_sizes"]]
    if "image_grid_thw" in inputs:
        return [tuple(int(x) for x in g) for g in inputs["image_grid_thw"]]
    return None
