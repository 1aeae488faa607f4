"""A CPU stand-in for FlashAttention-2, registered with transformers under `NAME`.

FlashAttention-2 needs a CUDA GPU. This module implements its contract in plain torch so that the code
paths of a model loaded with ``attn_implementation="flash_attention_2"`` run on the CPU (what reaches the
kernel, not the kernel's speed):

- the mask is a 2-D key validity ``[batch, keys]`` (1/True: a real token) or None; anything else is an
  error, as it is for the real kernel, which cannot take a 4-D mask;
- with a mask, every row is unpadded to its valid tokens, in order, as in ``_upad_input`` of
  transformers' flash-attention utilities: queries are the valid tokens when the query is as long as the
  keys, the one query of each row when it is 1 long, the last ``q_len`` validity columns otherwise;
  padded query rows come back as zeros;
- without a mask: ``cu_seq_lens_*`` given (Qwen-VL's vision tower) means variable-length segments; a
  batch of one whose ``position_ids`` are not one contiguous run is split into packed segments where the
  position equals its minimum; otherwise each row is one sequence;
- causality comes from ``is_causal`` alone and is aligned bottom-right, as in flash_attn >= 2.1: with
  ``q_len < k_len`` (a decode step), query ``i`` of a segment sees keys ``j <= i + k_len - q_len``; a query
  that sees no key returns zeros.

The name contains "flash", so transformers treats the model as a flash-attention model everywhere else
too (Qwen-VL's vision attention passes ``cu_seqlens``, generate() keeps the 2-D mask of a static cache).
Such a name cannot go through ``from_pretrained``/``_from_config`` (transformers tries to load it as a
Hub kernel), so `standin_model` builds the model under sdpa and switches its configs.
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask

NAME = "vtprune_flash_standin"


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, scale: float) -> torch.Tensor:
    """One segment: ``q`` ``[Lq, H, D]``, ``k``/``v`` ``[Lk, Hkv, D]`` -> ``[Lq, H, D]``."""
    lq, lk = q.shape[0], k.shape[0]
    out = q.new_zeros(q.shape)
    if lq == 0 or lk == 0:
        return out
    groups = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(groups, dim=1)
    v = v.repeat_interleave(groups, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q.float(), k.float()) * scale
    if causal:
        seen = torch.arange(lk)[None, :] <= torch.arange(lq)[:, None] + (lk - lq)  # bottom-right aligned
        scores = scores.masked_fill(~seen.to(scores.device), float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # a query that sees no key: zeros
    return torch.einsum("hqk,khd->qhd", probs, v.float()).to(q.dtype)


def flash_attn_func(q, k, v, causal: bool = False, softmax_scale: float | None = None) -> torch.Tensor:
    """Dense rows: ``q`` ``[B, Lq, H, D]``, ``k``/``v`` ``[B, Lk, Hkv, D]``."""
    scale = softmax_scale if softmax_scale is not None else q.shape[-1] ** -0.5
    return torch.stack([_attend(q[b], k[b], v[b], causal, scale) for b in range(q.shape[0])])


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, causal: bool = False,
                           softmax_scale: float | None = None) -> torch.Tensor:
    """Segments of flattened tokens: ``q`` ``[Tq, H, D]``, ``k``/``v`` ``[Tk, Hkv, D]``, ``cu_seqlens_*`` ``[S + 1]``."""
    scale = softmax_scale if softmax_scale is not None else q.shape[-1] ** -0.5
    out = q.new_zeros(q.shape)
    cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    for s in range(len(cq) - 1):
        out[cq[s]:cq[s + 1]] = _attend(q[cq[s]:cq[s + 1]], k[ck[s]:ck[s + 1]], v[ck[s]:ck[s + 1]], causal, scale)
    return out


def _packed_starts(position_ids: torch.Tensor | None, bsz: int) -> torch.Tensor | None:
    """Segment starts of a packed batch of one (positions that are not a single contiguous run)."""
    if position_ids is None or bsz != 1 or position_ids.shape[-1] == 1:
        return None
    if position_ids.dim() != 2:
        raise ValueError(f"FlashAttention-2 stand-in: position_ids must be [batch, seq], got {tuple(position_ids.shape)}")
    pos = position_ids.reshape(-1)
    if torch.equal(pos, torch.arange(pos.numel(), device=pos.device) + pos.min()):
        return None
    return torch.nonzero(pos == pos.min()).flatten()


def standin_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling: float | None = None,
                      sliding_window=None, softcap=None, is_causal: bool | None = None, s_aux=None,
                      position_ids=None, cu_seq_lens_q=None, cu_seq_lens_k=None, max_length_q=None,
                      max_length_k=None, **kwargs):
    """The registered attention function: ``query`` ``[B, H, Lq, D]``, ``key``/``value`` ``[B, Hkv, Lk, D]``
    (transformers' layout) -> ``([B, Lq, H, D], None)``, as transformers' flash-attention integration returns."""
    if sliding_window is not None or softcap is not None or s_aux is not None:
        raise NotImplementedError("FlashAttention-2 stand-in: no sliding window, softcap or attention sinks")
    if attention_mask is not None and not (isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 2):
        shape = tuple(attention_mask.shape) if hasattr(attention_mask, "shape") else type(attention_mask).__name__
        raise TypeError(f"FlashAttention-2 takes a 2-D padding mask [batch, keys] or None, got {shape}")
    q, k, v = (t.transpose(1, 2) for t in (query, key, value))  # [B, L, H, D]
    causal = module.is_causal if is_causal is None else is_causal
    scale = scaling if scaling is not None else q.shape[-1] ** -0.5
    bsz, q_len = q.shape[:2]
    if attention_mask is not None:
        mask = attention_mask.bool()
        if k.shape[1] > mask.shape[1]:  # a static cache: keys beyond the mask are unused slots
            k, v = k[:, :mask.shape[1]], v[:, :mask.shape[1]]
        if k.shape[1] != mask.shape[1]:
            raise ValueError(f"FlashAttention-2: mask of {mask.shape[1]} keys for {k.shape[1]} keys")
        out = q.new_zeros(q.shape)
        for b in range(bsz):
            if q_len == k.shape[1]:
                rows = mask[b]
            elif q_len == 1:
                rows = torch.ones(1, dtype=torch.bool, device=q.device)
            else:  # transformers' unpadding assumes the queries are the last columns
                rows = mask[b, -q_len:]
            out[b, rows] = _attend(q[b, rows], k[b, mask[b]], v[b, mask[b]], causal, scale)
        return out, None
    if all(x is not None for x in (cu_seq_lens_q, cu_seq_lens_k, max_length_q, max_length_k)):
        flat = flash_attn_varlen_func(*(t.reshape(-1, *t.shape[2:]) for t in (q, k, v)), cu_seq_lens_q,
                                      cu_seq_lens_k, causal=causal, softmax_scale=scale)
        return flat.view(bsz, -1, *flat.shape[1:]), None
    starts = _packed_starts(position_ids, bsz)
    if starts is not None:
        cu = torch.cat([starts, torch.tensor([q_len], device=starts.device)])
        flat = flash_attn_varlen_func(q[0], k[0], v[0], cu, cu, causal=causal, softmax_scale=scale)
        return flat[None], None
    return flash_attn_func(q, k, v, causal=causal, softmax_scale=scale), None


def register() -> str:
    """Register the stand-in and FlashAttention's mask function under `NAME` (idempotent); returns the name."""
    AttentionInterface.register(NAME, standin_attention)
    AttentionMaskInterface.register(NAME, flash_attention_mask)  # without it transformers passes no mask at all
    return NAME


_MODELS: dict = {}


def standin_model(kind: str):
    """A cached tiny model of ``kind`` (conftest's kinds) whose configs name the stand-in; its weights are those of
    ``conftest.get_model(kind)`` (same seed). Unpatched on return."""
    import vtprune
    from vtprune.toy.tiny import tiny_llava
    from vtprune.toy.tiny_qwen import tiny_qwen

    register()
    if kind not in _MODELS:
        model = tiny_qwen(kind) if kind.startswith("qwen") else tiny_llava(next_=kind == "next")
        model.config._attn_implementation = NAME  # the setter recurses into the text and vision configs
        _MODELS[kind] = model
    model = _MODELS[kind]
    vtprune.remove(model)
    return model
