"""References for exactness tests.

- In-LLM dropping (`masked_logits`): dropping tokens after layer K must give the same logits (on kept
  tokens) as running the unpatched model with no cache where the dropped tokens' key columns are masked
  out in every layer after K.
- Pre-LLM dropping (`lm_on_kept`): the unpatched language model run on what the unpatched model hands it,
  with the dropped visual columns removed (kept positions: contiguous for LLaVA, the original 3-D
  M-RoPE positions for Qwen-VL; Qwen3-VL's deepstack features of the kept tokens).
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
    return staged_masked_logits(model, inputs, [(layer, dropped)])


@torch.no_grad()
def staged_masked_logits(model, inputs: dict, stages: list[tuple[int, torch.Tensor]],
                         writes: dict | None = None, layers=None, valid: torch.Tensor | None = None) -> torch.Tensor:
    """`masked_logits` for staged pruning: ``stages`` = ``[(K_j, dropped_j [B, N])]``; layer l hides the
    columns dropped by every stage with K_j < l. ``writes`` = ``{K_j: [(b, positions, states)]}`` replaces
    those rows of layer K_j's output (recycled tokens written into kept slots).

    ``layers``: the decoder layers (default ``model.model.language_model.layers``); ``valid``: ``[B, N]``
    real keys of the sequence the layers see (default the inputs' attention mask; the LLaVA repository's
    spliced sequence is longer than its input ids). Where the model passes no mask, an additive float mask
    is written (transformers 4.37's eager attention adds whatever mask it gets).
    """
    assert not hasattr(model, "_vtprune_state"), "run the oracle on the unpatched model"
    layers = model.model.language_model.layers if layers is None else layers
    n = stages[0][1].shape[1]
    attn = inputs.get("attention_mask") if valid is None else valid
    causal = torch.ones(n, n, dtype=torch.bool).tril()

    def allowed_for(dropped):
        keys_ok = ~dropped if attn is None else (~dropped & attn.bool())
        allowed = (causal[None] & keys_ok[:, None, :]) | torch.eye(n, dtype=torch.bool)[None]
        return allowed[:, None]

    def make(allowed):
        def pre(module, args, kwargs):
            mask = kwargs.get("attention_mask")
            if mask is None:
                dtype = (args[0] if args else kwargs["hidden_states"]).dtype
                new = torch.zeros(allowed.shape, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)
            elif mask.dtype == torch.bool:
                new = mask & allowed
            else:
                new = mask.masked_fill(~allowed, torch.finfo(mask.dtype).min)
            kwargs["attention_mask"] = new
            return args, kwargs
        return pre

    handles = []
    for li in range(len(layers)):
        hidden = torch.zeros(stages[0][1].shape, dtype=torch.bool)
        for k, dropped in stages:
            if k < li:
                hidden |= dropped
        if bool(hidden.any()):
            handles.append(layers[li].register_forward_pre_hook(make(allowed_for(hidden)), with_kwargs=True))
    for li, rows in (writes or {}).items():
        def post(module, args, output, rows=rows):
            hidden = (output[0] if isinstance(output, tuple) else output).clone()
            for b, pos, states in rows:
                hidden[b, pos] = states.to(hidden.dtype)
            return (hidden, *output[1:]) if isinstance(output, tuple) else hidden
        handles.append(layers[li].register_forward_hook(post))
    try:
        return model(**inputs, use_cache=False).logits
    finally:
        for h in handles:
            h.remove()


def lm_on_kept(model, inputs, st, visual_rows: list[torch.Tensor] | None = None):
    """Logits of the unpatched LM on its own inputs with ``st``'s dropped visual columns removed.

    ``visual_rows``: per sample ``[n_b, D]`` replacement features of the visual tokens (the hand-built
    VisionZip features), written before shortening.
    """
    seen = {}
    lm = model.model.language_model
    handle = lm.register_forward_pre_hook(lambda m, a, k: seen.update(k), with_kwargs=True)
    with torch.no_grad():
        model(**inputs, use_cache=False)
    handle.remove()
    embeds, pos = seen["inputs_embeds"].clone(), seen.get("position_ids")
    dropped = dropped_positions(model, inputs["input_ids"], st)
    ids = inputs["input_ids"]
    visual = (ids == model.config.image_token_id) | (ids == getattr(model.config, "video_token_id", -1))
    if visual_rows is not None:
        for b, rows in enumerate(visual_rows):
            embeds[b, torch.nonzero(visual[b]).flatten()] = rows.to(embeds.dtype)
    keep_cols = [torch.nonzero(~dropped[b]).flatten() for b in range(dropped.shape[0])]
    width, bsz = max(len(r) for r in keep_cols), len(keep_cols)
    short = embeds.new_zeros(bsz, width, embeds.shape[-1])
    mask = torch.zeros(bsz, width, dtype=torch.long)
    kwargs = {}
    if pos is not None:  # Qwen: kept tokens keep their 3-D positions
        pos = pos[-3:]
        kwargs["position_ids"] = torch.zeros(3, bsz, width, dtype=pos.dtype)
    ds_mask = seen.get("visual_pos_masks")
    if ds_mask is not None:  # Qwen3-VL deepstack: the kept tokens' features
        kwargs["visual_pos_masks"] = torch.zeros(bsz, width, dtype=torch.bool)
        kwargs["deepstack_visual_embeds"] = [d[~dropped[ds_mask]] for d in seen["deepstack_visual_embeds"]]
    for b, r in enumerate(keep_cols):
        sl = slice(width - len(r), width)
        short[b, sl], mask[b, sl] = embeds[b, r], inputs["attention_mask"][b, r]
        if pos is not None:
            kwargs["position_ids"][:, b, sl] = pos[:, b, r]
        if ds_mask is not None:
            kwargs["visual_pos_masks"][b, sl] = ds_mask[b, r]
    with torch.no_grad():
        h = lm(inputs_embeds=short, attention_mask=mask, use_cache=False, **kwargs).last_hidden_state
        return model.lm_head(h), mask.bool()
