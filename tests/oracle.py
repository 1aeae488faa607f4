"""The reference for in-LLM dropping: keep every token, hide the dropped ones from layers > K.

Dropping tokens after layer K must give the same logits (on kept tokens) as running the unpatched model
with no cache where the dropped tokens' key columns are masked out in every layer after K.
"""

from __future__ import annotations

import torch

import vtprune


def dropped_positions(model, input_ids: torch.Tensor, stats: vtprune.PruneStats) -> torch.Tensor:
    """``[B, N]`` bool: True on visual tokens (image or video placeholders) that `stats` says were dropped."""
    visual = torch.zeros_like(input_ids, dtype=torch.bool)
    for name in ("image_token_id", "video_token_id"):
        token = getattr(model.config, name, None)
        if token is not None:
            visual |= input_ids == token
    dropped = visual.clone()
    for b in range(input_ids.shape[0]):
        pos = torch.nonzero(visual[b]).flatten()
        dropped[b, pos[stats.kept[b]]] = False
    return dropped


@torch.no_grad()
def masked_logits(model, inputs: dict, layer: int, dropped: torch.Tensor) -> torch.Tensor:
    """Unpatched forward (no cache) with ``dropped`` ``[B, N]`` key columns hidden after ``layer``."""
    assert not hasattr(model, "_vtprune_state"), "run the oracle on the unpatched model"
    layers = model.model.language_model.layers
    n = dropped.shape[1]
    keys_ok = ~dropped
    attn = inputs.get("attention_mask")
    if attn is not None:
        keys_ok = keys_ok & attn.bool()
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    allowed = causal[None] & keys_ok[:, None, :]
    allowed = allowed | torch.eye(n, dtype=torch.bool)[None]  # a hidden token still sees itself
    allowed = allowed[:, None]  # [B, 1, N, N]

    def pre(module, args, kwargs):
        mask = kwargs.get("attention_mask")
        if mask is None or mask.dtype == torch.bool:
            new = allowed if mask is None else (mask & allowed)
        else:
            new = mask.masked_fill(~allowed, torch.finfo(mask.dtype).min)
        kwargs["attention_mask"] = new
        return args, kwargs

    handles = [lay.register_forward_pre_hook(pre, with_kwargs=True) for lay in layers[layer + 1:]]
    try:
        return model(**inputs, use_cache=False).logits
    finally:
        for h in handles:
            h.remove()
