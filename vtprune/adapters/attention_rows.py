"""Recompute single attention rows under SDPA instead of asking the model for eager attention maps.

Both functions compute only the query rows a scorer reads (O(N * D) work), in float32, and match the
eager attention probabilities of the same layer.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import nn


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _head_norm(attn: nn.Module, name: str, x: torch.Tensor) -> torch.Tensor:
    norm = getattr(attn, name, None)  # Qwen3-style per-head q_norm / k_norm
    return norm(x) if norm is not None else x


def takes_seq_len(rotary: nn.Module) -> bool:
    """True for transformers 4.37-style rotary modules: ``forward(x, seq_len)`` returns the table rows
    ``[:seq_len]``, which the attention then indexes by position."""
    return "seq_len" in inspect.signature(rotary.forward).parameters


@torch.no_grad()
def layer_rope(layer: nn.Module, hidden_in: torch.Tensor, kwargs: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """The RoPE ``(cos, sin)`` of a decoder layer call, each ``[B or 1, N, head_dim]``.

    transformers v5 (and 4.48+) pass them to the layer as ``position_embeddings``; older 4.x layers
    compute them inside attention from ``position_ids`` with their own ``self_attn.rotary_emb``.
    """
    rope = kwargs.get("position_embeddings")
    if rope is not None:
        return rope
    rotary = getattr(layer.self_attn, "rotary_emb", None)
    if rotary is None:
        raise RuntimeError(
            f"{type(layer).__name__} got no position_embeddings and its attention has no rotary_emb: "
            "vtprune cannot recompute the attention row of this transformers version"
        )
    n = hidden_in.shape[1]
    pos = kwargs.get("position_ids")
    if pos is None:
        pos = torch.arange(n, device=hidden_in.device)[None]
    if takes_seq_len(rotary):
        cos, sin = rotary(hidden_in, seq_len=int(pos.max()) + 1)
        return cos[pos], sin[pos]
    return rotary(hidden_in, pos)


@torch.no_grad()
def llm_query_attention(
    layer: nn.Module,
    hidden_in: torch.Tensor,
    position_embeddings: tuple[torch.Tensor, torch.Tensor],
    query_pos: torch.Tensor,
    key_valid: torch.Tensor,
) -> torch.Tensor:
    """Head-mean attention probabilities of one query row per sample at a Llama-style decoder layer.

    Args:
        layer: the decoder layer (``input_layernorm`` + ``self_attn`` with ``q_proj``/``k_proj``).
        hidden_in: ``[B, N, D]`` the layer's input hidden states.
        position_embeddings: ``(cos, sin)``, each ``[B or 1, N, head_dim]`` (M-RoPE already folded in).
        query_pos: ``[B]`` the query position per sample (the last prompt token).
        key_valid: ``[B, N]`` bool, False on padding keys.

    Returns:
        ``[B, N]`` float32: mean over heads of softmax(q . k^T * scaling) over the keys ``<= query_pos``
        that are not padding (zeros elsewhere), exactly the row eager attention would produce.
    """
    attn = layer.self_attn
    bsz, n, _ = hidden_in.shape
    head_dim = attn.head_dim
    x = layer.input_layernorm(hidden_in)
    batch = torch.arange(bsz, device=x.device)
    xq = x[batch, query_pos]  # [B, D]
    q = attn.q_proj(xq).view(bsz, 1, -1, head_dim).transpose(1, 2)  # [B, H, 1, d]
    k = attn.k_proj(x).view(bsz, n, -1, head_dim).transpose(1, 2)  # [B, Hkv, N, d]
    q = _head_norm(attn, "q_norm", q)
    k = _head_norm(attn, "k_norm", k)
    cos, sin = position_embeddings
    cos = cos.expand(bsz, -1, -1)
    sin = sin.expand(bsz, -1, -1)
    cq, sq = cos[batch, query_pos][:, None, None], sin[batch, query_pos][:, None, None]  # [B,1,1,d]
    q = q * cq + _rotate_half(q) * sq
    k = k * cos[:, None] + _rotate_half(k) * sin[:, None]
    groups = q.shape[1] // k.shape[1]
    if groups > 1:
        k = k.repeat_interleave(groups, dim=1)
    scaling = getattr(attn, "scaling", head_dim**-0.5)  # transformers 4.x attention has no .scaling
    logits = torch.matmul(q.float(), k.float().transpose(-1, -2)).squeeze(2) * scaling  # [B, H, N]
    allowed = key_valid.bool() & (torch.arange(n, device=x.device)[None, :] <= query_pos[:, None])
    logits = logits.masked_fill(~allowed[:, None, :], float("-inf"))
    return torch.softmax(logits, dim=-1).mean(dim=1)


@torch.no_grad()
def llm_rows_attention(
    layer: nn.Module,
    hidden_in: torch.Tensor,
    position_embeddings: tuple[torch.Tensor, torch.Tensor],
    rows: list[torch.Tensor],
    key_valid: torch.Tensor,
) -> torch.Tensor:
    """Mean over several query rows of the head-mean attention of a decoder layer, recomputed under SDPA.

    Args:
        layer: the decoder layer whose ``input_layernorm``, ``q_proj`` / ``k_proj`` (and ``q_norm`` /
            ``k_norm``) apply.
        hidden_in: ``[B, N, D]`` that layer's input.
        position_embeddings: ``(cos, sin)``, each ``[B or 1, N, head_dim]``.
        rows: per sample the query positions ``[R_b]`` (e.g. the instruction tokens).
        key_valid: ``[B, N]`` bool, False on padding (and filler) keys.

    Returns:
        ``[B, N]`` float32: for each key, the mean over the sample's query rows of the head-mean softmax
        probabilities (causal: a query sees keys up to its own position); zeros for a sample without rows.
    """
    attn = layer.self_attn
    bsz, n, _ = hidden_in.shape
    head_dim = attn.head_dim
    scaling = getattr(attn, "scaling", head_dim**-0.5)
    x = layer.input_layernorm(hidden_in)
    cos, sin = (t.expand(bsz, -1, -1) for t in position_embeddings)
    out = torch.zeros(bsz, n, dtype=torch.float32, device=x.device)
    for b in range(bsz):
        r = rows[b].to(x.device)
        if r.numel() == 0:
            continue
        q = attn.q_proj(x[b, r]).view(1, r.numel(), -1, head_dim).transpose(1, 2)  # [1, H, R, d]
        k = attn.k_proj(x[b]).view(1, n, -1, head_dim).transpose(1, 2)  # [1, Hkv, N, d]
        q, k = _head_norm(attn, "q_norm", q), _head_norm(attn, "k_norm", k)
        q = q * cos[b, r][None, None] + _rotate_half(q) * sin[b, r][None, None]
        k = k * cos[b][None, None] + _rotate_half(k) * sin[b][None, None]
        groups = q.shape[1] // k.shape[1]
        if groups > 1:
            k = k.repeat_interleave(groups, dim=1)
        logits = torch.matmul(q.float(), k.float().transpose(-1, -2))[0] * scaling  # [H, R, N]
        allowed = key_valid[b].bool()[None, :] & (torch.arange(n, device=x.device)[None, :] <= r[:, None])
        logits = logits.masked_fill(~allowed[None], float("-inf"))
        out[b] = torch.softmax(logits, dim=-1).mean(dim=(0, 1))
    return out


@torch.no_grad()
def vit_cls_attention(attn: nn.Module, hidden_in: torch.Tensor) -> torch.Tensor:
    """Head-mean attention of the CLS query (token 0) at a CLIP-style vision attention module.

    Args:
        attn: a module with ``q_proj``, ``k_proj``, ``num_heads``, ``head_dim``, ``scale``.
        hidden_in: ``[T, P + 1, C]`` the attention module's input (after the layer norm), T tiles.

    Returns:
        ``[T, P + 1]`` float32 attention probabilities of CLS to every token (CLS itself included).
    """
    t, n, _ = hidden_in.shape
    q = attn.q_proj(hidden_in[:, :1]).view(t, 1, attn.num_heads, attn.head_dim).transpose(1, 2)
    k = attn.k_proj(hidden_in).view(t, n, attn.num_heads, attn.head_dim).transpose(1, 2)
    logits = torch.matmul(q.float(), k.float().transpose(-1, -2)).squeeze(2) * attn.scale  # [T, H, N]
    return torch.softmax(logits, dim=-1).mean(dim=1)


def vit_rotated_qk(attn: nn.Module, hidden_in: torch.Tensor,
                   position_embeddings: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The post-RoPE queries and keys ``[H, S, d]`` float32 of a Qwen-VL vision attention call (fused ``qkv``,
    ``num_heads``); ``hidden_in`` ``[S, C]`` (after the block's norm), ``position_embeddings`` ``(cos, sin)``
    each ``[S, head_dim]``."""
    s = hidden_in.shape[0]
    q, k, _ = attn.qkv(hidden_in).reshape(s, 3, attn.num_heads, -1).float().unbind(1)  # [S, H, d]
    cos, sin = (x.float()[:, None, :] for x in position_embeddings)
    q = (q * cos + _rotate_half(q) * sin).transpose(0, 1)  # [H, S, d]
    k = (k * cos + _rotate_half(k) * sin).transpose(0, 1)
    return q, k


def _bounds(cu_seqlens: torch.Tensor | list[int]) -> list[int]:
    return cu_seqlens.tolist() if isinstance(cu_seqlens, torch.Tensor) else list(cu_seqlens)


def _column_sums(q: torch.Tensor, k: torch.Tensor, scaling: float, query_block: int,
                 weights: torch.Tensor | None = None) -> torch.Tensor:
    """``[n]``: the sum over heads and queries (each weighted by ``weights`` ``[n_q]`` when given) of
    softmax(q . k^T * scaling) for one segment (``q`` ``[H, n_q, d]``, ``k`` ``[H, n, d]``), built
    ``query_block`` query rows at a time."""
    acc = torch.zeros(k.shape[1], dtype=torch.float32, device=k.device)
    for qa in range(0, q.shape[1], query_block):
        probs = torch.softmax(torch.matmul(q[:, qa:qa + query_block], k.transpose(-1, -2)) * scaling, dim=-1)
        if weights is not None:
            probs = probs * weights[None, qa:qa + query_block, None]
        acc += probs.sum(dim=(0, 1))
    return acc


@torch.no_grad()
def vit_received_attention(
    attn: nn.Module,
    hidden_in: torch.Tensor,
    cu_seqlens: torch.Tensor | list[int],
    position_embeddings: tuple[torch.Tensor, torch.Tensor],
    query_block: int = 256,
) -> torch.Tensor:
    """Attention each token receives in a Qwen-VL vision block (no CLS token there to ask).

    Args:
        attn: a Qwen vision attention module (fused ``qkv``, ``num_heads``, ``scaling``).
        hidden_in: ``[S, C]`` the module's input (after the block's norm), all images of the call.
        cu_seqlens: ``[n_segments + 1]`` segment boundaries (images or frames) the block attends within, as
            a tensor (read once) or host ints.
        position_embeddings: ``(cos, sin)``, each ``[S, head_dim]`` (the vision 2-D RoPE).
        query_block: queries per chunk: the probabilities are built ``query_block`` rows at a time, so
            memory stays ``O(query_block * segment)`` per head, never a full map.

    Returns:
        ``[S]`` float32: for token j of a segment, the mean over heads and over the segment's queries of
        softmax(q . k^T * scaling)[:, j] (the column mean of the block's attention map).
    """
    s = hidden_in.shape[0]
    q, k = vit_rotated_qk(attn, hidden_in, position_embeddings)
    out = torch.zeros(s, dtype=torch.float32, device=hidden_in.device)
    bounds = _bounds(cu_seqlens)
    for a, b in zip(bounds[:-1], bounds[1:]):
        acc = _column_sums(q[:, a:b], k[:, a:b], attn.scaling, query_block)
        out[a:b] = acc / (q.shape[0] * (b - a))
    return out


@torch.no_grad()
def vit_global_context(
    attn: nn.Module,
    hidden_in: torch.Tensor,
    cu_seqlens: torch.Tensor | list[int],
    position_embeddings: tuple[torch.Tensor, torch.Tensor],
    t: float,
    query_block: int = 256,
) -> torch.Tensor:
    """VFlowOpt's context relevance in a Qwen-VL vision block: what the *global* tokens attend to.

    Per segment (image or frame), with ``A`` the head-mean attention map: received ``r_j = mean_i A_ij``
    (`vit_received_attention`); global queries ``G = {i : r_i > t mean(r)}``; ``c_j = mean_{i in G} A_ij``,
    or ``r_j`` when no token qualifies. Two blockwise passes over the queries (the second weights each
    query row by its membership of ``G``), so no full map is built and the device is never read.

    Args: as `vit_received_attention`, plus ``t`` the global-token threshold.

    Returns:
        ``[S]`` float32 context relevance of each patch.
    """
    s = hidden_in.shape[0]
    q, k = vit_rotated_qk(attn, hidden_in, position_embeddings)
    heads = q.shape[0]
    out = torch.zeros(s, dtype=torch.float32, device=hidden_in.device)
    bounds = _bounds(cu_seqlens)
    for a, b in zip(bounds[:-1], bounds[1:]):
        qs, ks = q[:, a:b], k[:, a:b]
        received = _column_sums(qs, ks, attn.scaling, query_block) / (heads * (b - a))
        glob = (received > t * received.mean()).float()  # [n]
        count = glob.sum()
        context = _column_sums(qs, ks, attn.scaling, query_block, weights=glob) / (heads * count.clamp(min=1))
        out[a:b] = torch.where(count > 0, context, received)
    return out


@torch.no_grad()
def vit_context_relevance(attn: nn.Module, hidden_in: torch.Tensor, t: float, block: int = 1) -> torch.Tensor:
    """``[T, N]`` float32 VFlowOpt context relevance of a CLIP-style attention module's tokens, per tile.

    A = head-mean attention of the tile (N x N, recomputed from q and k); received ``r_j = mean_i A_ij``;
    global tokens ``G = {i : r_i > t mean(r)}`` (all tokens when none qualifies); ``c_j = mean_{i in G} A_ij``.
    ``attn``: ``q_proj``, ``k_proj``, ``num_heads``, ``head_dim``, ``scale``; ``hidden_in`` ``[T, N, C]``.
    """
    tiles, n, _ = hidden_in.shape
    out = torch.empty(tiles, n, dtype=torch.float32, device=hidden_in.device)
    for a in range(0, tiles, block):
        h = hidden_in[a:a + block]
        b = h.shape[0]
        q = attn.q_proj(h).view(b, n, attn.num_heads, attn.head_dim).transpose(1, 2).float()
        k = attn.k_proj(h).view(b, n, attn.num_heads, attn.head_dim).transpose(1, 2).float()
        probs = torch.softmax(q @ k.transpose(-1, -2) * attn.scale, dim=-1).mean(dim=1)  # [b, N, N]
        received = probs.mean(dim=1)  # [b, N]
        for i in range(b):
            g = received[i] > t * received[i].mean()
            rows = probs[i][g] if bool(g.any()) else probs[i]
            out[a + i] = rows.mean(dim=0)
    return out
