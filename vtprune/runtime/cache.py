"""Which KV caches a pruned model can use, the masks generate() prepares for them, and reading both without
touching device memory."""

from __future__ import annotations

from typing import Any

import torch

from vtprune.adapters.base import UnsupportedModelError

try:
    from torch.nn.attention.flex_attention import BlockMask
except ImportError:  # a torch without flex_attention (transformers 4.37's environment)
    BlockMask = None


def is_block_mask(mask: Any) -> bool:
    """Whether ``mask`` is flex_attention's `BlockMask` (what the layers of a flex_attention model get)."""
    return BlockMask is not None and isinstance(mask, BlockMask)


def is_prepared_mask(mask: Any) -> bool:
    """Whether ``mask`` is a mask generate() prepared for a static cache: a 4D tensor, a `BlockMask`, or a dict of
    them per attention type (rather than the tokenizer's 2D mask)."""
    return isinstance(mask, dict) or is_block_mask(mask) or (isinstance(mask, torch.Tensor) and mask.dim() == 4)


def full_attention_mask(mask: Any) -> torch.Tensor:
    """The full-attention entry of a per-attention-type mask dict (Qwen-VL under a static cache), or ``mask``."""
    if isinstance(mask, dict):
        return mask.get("full_attention", next(iter(mask.values())))
    return mask


def validity_from_4d(mask: Any, n: int) -> torch.Tensor:
    """``[B, n]`` long validity of a prefill from generate()'s 4D mask ``[B, 1, n, L]`` or `BlockMask` (a static
    cache's): the last prompt row attends exactly to the real tokens before it (bool: True attends; float: 0
    attends). FlashAttention's mask of a static cache is the 2D validity itself."""
    if isinstance(mask, torch.Tensor) and mask.dim() == 2:
        return mask[:, :n].long()
    if is_block_mask(mask):  # evaluate its mask_mod on that one row
        from torch.nn.attention.flex_attention import create_mask

        base = mask.mask_mod
        bsz = mask.shape[0]
        dev = mask.kv_num_blocks.device
        row = create_mask(lambda b, h, q, kv: base(b, h, q + (n - 1), kv), bsz, 1, 1, n, device=dev)[:, 0, 0]
        return row.long()
    row = mask[:, 0, n - 1, :n]
    return (row if row.dtype == torch.bool else row == 0).long()


def query_length(kwargs: dict[str, Any]) -> int:
    """Tokens this forward feeds (``input_ids`` or ``inputs_embeds`` ``[B, q, ...]``), 0 without either."""
    ref = kwargs.get("input_ids") if kwargs.get("input_ids") is not None else kwargs.get("inputs_embeds")
    return int(ref.shape[1]) if ref is not None else 0


def is_static_cache(cache: Any) -> bool:
    """Whether ``cache`` is a transformers-5 cache whose layers are all full-attention static layers."""
    layers = getattr(cache, "layers", None)
    if not layers:
        return False
    from transformers.cache_utils import StaticLayer

    return all(type(layer) is StaticLayer for layer in layers)


def check_cache(cache: Any, uniform: bool = False) -> None:
    """Only a plain DynamicCache (full-attention layers) can hold layers of different lengths; when every
    layer keeps the same tokens (``uniform``: pruning before the LLM only) a full-attention StaticCache works
    too."""
    if cache is None:
        return
    from transformers.cache_utils import DynamicCache

    if isinstance(cache, (tuple, list)):  # transformers 4.x legacy cache: one (key, value) pair per layer
        ok = all(isinstance(entry, (tuple, list)) and len(entry) == 2 for entry in cache)
    elif not hasattr(cache, "layers"):  # transformers 4.x DynamicCache: per-layer key/value lists
        ok = type(cache) is DynamicCache
    else:
        from transformers.cache_utils import DynamicLayer

        ok = isinstance(cache, DynamicCache) and all(type(layer) is DynamicLayer for layer in cache.layers)
        ok = ok or (uniform and is_static_cache(cache))
    if not ok:
        kinds = sorted({type(layer).__name__ for layer in getattr(cache, "layers", [])})
        static = ("a full-attention StaticCache (cache_implementation='static') works with methods that prune "
                  "before the LLM only (cls, random, uniform, visionzip, divprune, ...); " if not uniform else "")
        raise UnsupportedModelError(
            f"vtprune supports only DynamicCache with full-attention layers, got {type(cache).__name__} "
            f"(layers: {kinds or 'n/a'}). Pruned layers cache fewer entries than unpruned ones, which "
            "static, quantized, offloaded and sliding-window caches cannot hold; "
            f"{static}otherwise use the default cache (do not pass cache_implementation=...) or pass a DynamicCache()."
        )
