"""DART: keep the visual tokens least duplicated by a few pivot tokens, at an early LLM layer."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from vtprune.config import ConfigError
from vtprune.scorers.base import IN_LLM, Scorer, Signals, register
from vtprune.scorers.greedy import order_scores
from vtprune.scorers.select import image_budget

KEYS = "dart_keys"  # Session.extras key: the pruning layer's k_proj output [B, N_cur, H_kv * d] (prefill)
FEATURES = "dart_features"  # Signals.extras key: the stage's `_Features`

ORDERS = ("release", "norm")
NORMS = {"l1": 1, "l2": 2}


def rotated_keys(attn: nn.Module, k_raw: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """The keys attention ``attn`` uses: ``k_raw`` ``[B, N, H_kv * d]`` (its ``k_proj`` output) with the per-head
    ``k_norm`` (Qwen3) and RoPE ``rope`` (``(cos, sin)``, each ``[B or 1, N, d]``) applied: ``[B, H_kv, N, d]``."""
    bsz, n, _ = k_raw.shape
    d = attn.head_dim
    k = k_raw.view(bsz, n, -1, d).transpose(1, 2)
    norm = getattr(attn, "k_norm", None)
    if norm is not None:
        k = norm(k)
    cos, sin = (t.expand(bsz, -1, -1)[:, None].to(k.dtype) for t in rope)
    half = d // 2
    rotated = torch.cat((-k[..., half:], k[..., :half]), dim=-1)
    return k * cos + rotated * sin


def rebased_rope(rope: tuple[torch.Tensor, torch.Tensor], first: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """RoPE tables ``(cos, sin)`` (each ``[B or 1, N, d]``) re-based so that each sample's first real token
    (``first`` ``[B]``) sits at position 0: the angle of every token minus the first one's
    (``cos(a - b) = cos a cos b + sin a sin b``, ``sin(a - b) = sin a cos b - cos a sin b``, per dimension).

    Attention is unchanged by a common shift of positions, a key's L1 norm is not: re-based, a left-padded
    row (whose positions HF LLaVA counts from the padding in a plain forward, from its first token in
    generate) gets the keys the release computes on that sample alone (batch 1, positions from 0). M-RoPE
    tables re-base the same way, the first token's three components being equal.
    """
    cos, sin = rope
    bsz = first.shape[0]
    cos, sin = cos.expand(bsz, -1, -1), sin.expand(bsz, -1, -1)
    at = first.to(cos.device)[:, None, None].expand(-1, 1, cos.shape[-1])
    c0, s0 = cos.gather(1, at), sin.gather(1, at)  # [B, 1, d]
    scale = (c0 * c0 + s0 * s0).clamp(min=1e-12)  # 1 unless the tables carry an attention scaling (YaRN)
    return (cos * c0 + sin * s0) / scale.sqrt(), (sin * c0 - cos * s0) / scale.sqrt()


def release_order(image_positions: list[int], text_positions: list[int]) -> list[int]:
    """The order in which the release visits its pivots, as indices into ``image ++ text`` pivots.

    The release iterates ``list(set(image_indices + query_indices))`` over the pivots' sequence positions
    (``get_retained_image_token``), i.e. CPython's set order; reproduced here with a Python set of the same
    integers built in the same insertion order.
    """
    positions = [*image_positions, *text_positions]
    where = {p: i for i, p in enumerate(positions)}
    return [where[p] for p in set(positions)]


def split_quota(budget: int, pivots: int) -> list[int]:
    """``budget`` tokens over ``pivots`` pivots: ``budget // pivots`` each, one more for the first
    ``budget % pivots`` (the release gives each pivot ``budget // pivots`` and no remainder)."""
    base, extra = divmod(budget, pivots)
    return [base + (1 if j < extra else 0) for j in range(pivots)]


def least_similar_picks(states: torch.Tensor, taken: torch.Tensor, pivots: torch.Tensor,
                        quotas: list[int]) -> torch.Tensor:
    """Greedy duplication-aware picks: pivot ``j`` in turn takes the ``quotas[j]`` tokens not yet taken whose
    states are least cosine-similar to it.

    Args:
        states: ``[n, D]`` the candidates' states.
        taken: ``[n]`` bool, tokens already kept (the image pivots); updated in place.
        pivots: ``[m, D]`` the pivot states, in the order they pick.
        quotas: ``m`` host ints summing to at most ``n - taken.sum()``.

    Returns ``[sum(quotas)]`` long indices into ``states`` in pick order (on ``states``' device, no host read).
    """
    z = nn.functional.normalize(states.float(), dim=-1)
    sims = z @ nn.functional.normalize(pivots.float(), dim=-1).T  # [n, m]
    picks = []
    for j, q in enumerate(quotas):
        if q == 0:
            continue
        pick = torch.topk(sims[:, j].masked_fill(taken, float("inf")), q, largest=False).indices
        taken.index_fill_(0, pick, True)
        picks.append(pick)
    return torch.cat(picks) if picks else torch.zeros(0, dtype=torch.long, device=states.device)


@dataclass
class _Features:
    """What the stage hands `DARTScorer.score` (current coordinates, ``B`` samples).

    - ``states``: ``[B, N_cur, D]`` the pruning layer's output through the model's final norm.
    - ``norms``: ``[B, N_cur]`` float32 norm of each token's key at the pruning layer (all heads).
    - ``text``: ``[B, N_cur]`` bool, the instruction: real prompt tokens after the sample's last visual token.
    - ``n_text``: host ints, the instruction's length per sample.
    - ``unpadded``: ``[B, N_cur]`` long, each token's position among its sample's real tokens (the
      release's sequence index, for its pivot order).
    """

    states: torch.Tensor
    norms: torch.Tensor
    text: torch.Tensor
    n_text: list[int]
    unpadded: torch.Tensor


def final_norm(adapter: Any) -> nn.Module:
    """The language model's final norm: the ``norm`` of the module that holds the decoder layers."""
    layers = adapter.decoder_layers()
    for module in adapter.core().modules():
        if getattr(module, "layers", None) is layers and isinstance(getattr(module, "norm", None), nn.Module):
            return module.norm
    raise ConfigError("dart: cannot find the language model's final norm (a module holding the decoder layers "
                      "and a `norm`), whose output DART compares tokens on; this model is not supported")


@register
class DARTScorer(Scorer):
    """DART (Wen et al., EMNLP 2025, "Stop Looking for Important Tokens in Multimodal Language Models:
    Duplication Matters More"; release github.com/ZichenWen1/DART, read at 5a19452 in a fork's history:
    ``DART.forward`` / ``get_retained_image_token`` in llava/model/language_model/modeling_llama_self.py,
    the same in Qwen2-VL/Qwen2VL_DART; scripts/v1_5/eval/*.sh for the defaults).

    Per image, after decoder layer ``layer`` (default 1: the release's ``--pruned_layer 2`` prunes the
    input of layer 2, i.e. layer 1's output):

    - Pivots: the ``image_pivots`` (default 4) visual tokens and the ``text_pivots`` (default 4) instruction
      tokens (the prompt after the sample's last image) with the largest L1 norm of their key at this layer
      (post-RoPE, all heads concatenated: the layer's ``key_states``; rotated at positions counted from the
      sample's first real token, the release's batch-1 positions, `rebased_rope`). Image pivots are kept.
    - Each pivot in turn keeps the ``q`` remaining visual tokens least cosine-similar to it, comparing the
      layer output passed through the model's final norm (the release's ``self.norm(layer_outputs[0])``);
      text pivots select but are not kept.
    - Budget: ``keep = p + sum of quotas``: after the ``p = min(image_pivots, keep)`` image pivots, the other
      ``keep - p`` are split over the ``p + t`` pivots (`split_quota`). The release gives each pivot
      ``max_num_trunction // (p + t)`` and keeps the image pivots on top, so its ``--max_num_trunction 128``
      run keeps 4 + 8 x 16 = 132 tokens: ``keep=132`` here reproduces it (192 -> 196, 64 -> 68; on
      LLaVA-NeXT its ``retain_token_num_for_llava_next 320``: 4 + 8 x 40 = 324; its Qwen2-VL code takes
      ``int(N (1 - reduction_ratio) / 8)`` per pivot).
    - Order: pivots pick in the release's order (``pivot_order="release"``, `release_order`: the CPython set
      order of their positions among the sample's real tokens; one host read of all pivot positions per
      prefill); ``pivot_order="norm"``: image pivots then text pivots, each by decreasing key norm.

    A selection, not a ranking: scores encode the pick order (`scorers.greedy`), so adaptive budgets are
    refused. Options beyond the release (ours): ``pivot_norm="l2"`` (the keys' L2 norm, unchanged by RoPE),
    ``pivot_order="norm"``; ``image_pivots`` / ``text_pivots`` are the release's ``--pivot_image_token`` /
    ``--pivot_text_token``.

    Deviations: the budget is per image (the release: batch size 1, one image per prompt; with several
    images of a sample each picks its own image pivots and shares the sample's text pivots); kept tokens
    keep their positions, as in the release; when ``keep - p`` does not divide over the pivots the first
    ones in order take one more (the release's budget always divides); LLaVA-NeXT newline tokens are kept
    and never candidates (the release's candidates are all image tokens). Host reads per prefill, whatever
    the batch size: the instruction lengths, and with ``pivot_order="release"`` the pivot positions.
    """

    name = "dart"
    description = "DART: keep the visual tokens least similar to key-norm pivots at LLM layer K (default 1)"
    stages = (IN_LLM,)
    default_layer = 1
    accepts_auto_keep = False

    def __init__(self, image_pivots: int = 4, text_pivots: int = 4, pivot_norm: str = "l1",
                 pivot_order: str = "release") -> None:
        if int(image_pivots) != image_pivots or int(text_pivots) != text_pivots or image_pivots < 0 or text_pivots < 0:
            raise ConfigError(f"dart: image_pivots={image_pivots} and text_pivots={text_pivots} must be integers >= 0")
        if image_pivots + text_pivots == 0:
            raise ConfigError("dart: image_pivots=0 and text_pivots=0 leave nothing to compare against; "
                              "give at least one pivot (the release: 4 and 4)")
        if pivot_norm not in NORMS:
            raise ConfigError(f"dart: pivot_norm={pivot_norm!r} is not one of {sorted(NORMS)}")
        if pivot_order not in ORDERS:
            raise ConfigError(f"dart: pivot_order={pivot_order!r} is not one of {list(ORDERS)}")
        self.image_pivots, self.text_pivots = int(image_pivots), int(text_pivots)
        self.pivot_norm, self.pivot_order = pivot_norm, pivot_order
        self._norm: nn.Module | None = None

    def bind(self, model: Any, adapter: Any) -> None:
        self._norm = final_norm(adapter)

    def model_hooks(self, adapter: Any, state: Any) -> list:
        layer = state.schedule[0][0] if state.schedule else state.layer

        def keys_hook(module, args, output):  # the pruning layer's own key projection, on its input
            sess = state.session
            if state.enabled and sess.phase == "prefill" and sess.layout is not None:
                sess.extras[KEYS] = output
            return None

        return [adapter.decoder_layers()[layer].self_attn.k_proj.register_forward_hook(keys_hook)]

    def stage_signals(self, signals: Signals, hooks: Any, hidden: torch.Tensor, layer: int) -> None:
        """Key norms and normed states of layer ``layer`` (output ``hidden`` ``[B, N_cur, D]``)."""
        sess = hooks.state.session
        attn = hooks.layers[layer].self_attn
        valid = sess.attention_2d.to(hidden.device)
        seq = sess.stage_seqs[-1][0] if sess.stage_seqs else None
        current = valid if seq is None else valid.gather(1, seq) & ~sess.stage_seqs[-1][1]
        first = current.int().argmax(dim=1)  # [B] each sample's first real token
        keys = rotated_keys(attn, sess.extras.pop(KEYS), rebased_rope(sess.stage_rope, first))  # [B, H_kv, N_cur, d]
        norms = keys.float().transpose(1, 2).flatten(2).norm(p=NORMS[self.pivot_norm], dim=-1)  # [B, N_cur]
        states = self._norm(hidden) if self._norm is not None else hidden
        lay = signals.layout
        pad = lay.padded
        n = hidden.shape[1]
        last = torch.full((lay.batch_size,), -1, dtype=torch.long, device=pad.positions.device)  # last visual
        if pad.width:
            last = torch.where(pad.valid, pad.positions, -1).max(dim=1).values
        prompt = sess.prompt_valid().to(hidden.device)
        unpadded = valid.long().cumsum(dim=1) - 1  # [B, N] in original coordinates
        if seq is not None:  # after an earlier stage: the current coordinates of the compacted sequence
            prompt, unpadded = prompt.gather(1, seq) & current, unpadded.gather(1, seq)
        text = (torch.arange(n, device=hidden.device)[None] > last.to(hidden.device)[:, None]) & prompt
        n_text = text.sum(dim=1).tolist()  # one read: the text pivots' counts are loop lengths
        signals.extras = {**signals.extras, FEATURES: _Features(states, norms, text, n_text, unpadded)}

    def score(self, signals: Signals) -> list[torch.Tensor]:
        """Per sample ``[n_b]`` float32 scores encoding each image's picks in order (`greedy.order_scores`)."""
        feats = signals.extras.get(FEATURES)
        if feats is None:
            raise RuntimeError("dart: its stage signals were not computed (it runs only inside the LLM stage)")
        lay = signals.layout
        dev = feats.states.device
        images = []  # per image to select: (sample, its span, budget, candidates' current positions, image pivots)
        text = []  # per sample its text pivots' current positions [t], by decreasing key norm
        for b, spans in enumerate(lay.spans):
            t = min(self.text_pivots, feats.n_text[b])
            text.append(torch.topk(feats.norms[b].masked_fill(~feats.text[b], float("-inf")), t).indices)
            for span in spans:
                k, _ = image_budget(signals.keep, span.n_candidates)
                if k:
                    pos = lay.positions[b].to(dev)[span.candidates.to(dev)]
                    images.append((b, span, k, pos, torch.topk(feats.norms[b, pos], min(self.image_pivots, k)).indices))
        orders: list[list[int] | None] = [None] * len(images)
        if self.pivot_order == "release" and images:  # one read: every image's pivot positions
            rows = [torch.cat([feats.unpadded[b, pos[piv]], feats.unpadded[b, text[b]]]) for b, _, _, pos, piv in images]
            host = torch.cat(rows).tolist()
            at = 0
            for i, (row, (_, _, _, _, piv)) in enumerate(zip(rows, images)):
                n_img = int(piv.numel())
                orders[i] = release_order(host[at:at + n_img], host[at + n_img:at + row.numel()])
                at += row.numel()
        out = [torch.zeros(int(p.numel()), device=dev) for p in lay.positions]
        for (b, span, k, pos, piv), order in zip(images, orders):
            picks = self.select(feats.states[b, pos], piv, feats.states[b, text[b]], k, feats.norms[b, pos], order)
            out[b].index_copy_(0, span.candidates.to(dev), order_scores(picks, span.n_candidates))
        return out

    @staticmethod
    def select(states: torch.Tensor, image: torch.Tensor, text_states: torch.Tensor, k: int,
               norms: torch.Tensor, order: list[int] | None = None) -> torch.Tensor:
        """``[k]`` indices into one image's candidates in pick order: its image pivots, then each pivot's picks.

        Args:
            states: ``[n, D]`` the candidates' (normed) states.
            image: ``[p]`` the image pivots (indices into ``states``, by decreasing key norm), kept.
            text_states: ``[t, D]`` the sample's text pivots' states, by decreasing key norm.
            k: the image's budget (host int, ``p <= k <= n``).
            norms: ``[n]`` the candidates' key norms (they decide alone when there is no pivot at all).
            order: the pivots' picking order as indices into ``image ++ text`` (None: that order).
        """
        p = int(image.numel())
        m = p + int(text_states.shape[0])
        if m == 0:  # image_pivots=0 and no instruction: the keys' norms alone decide
            return torch.topk(norms.float(), k).indices
        pivots = torch.cat([states[image], text_states.to(states.dtype)])  # [m, D]
        if order is not None:
            pivots = pivots[torch.tensor(order, device=pivots.device)]
        taken = torch.zeros(states.shape[0], dtype=torch.bool, device=states.device).index_fill_(0, image, True)
        picks = least_similar_picks(states, taken, pivots, split_quota(k - p, m))
        return torch.cat([image, picks])
