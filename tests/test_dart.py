"""DART: the duplication-aware selection on constructed cases, the kept set on a tiny model against a
hand computation from hooks on the same layer, the release's pivot order and budget, option errors.
Exactness (drop == mask) on every tiny model is in tests/test_presets.py."""

from __future__ import annotations

import pytest
import torch
from conftest import batch, get_model

import vtprune
from vtprune.config import ConfigError
from vtprune.scorers.dart import DARTScorer, release_order, split_quota

EMPTY = torch.zeros(0, 2)


def test_duplicates_of_a_pivot_are_dropped_and_unique_tokens_kept():
    states = torch.tensor([[1.0, 0.0],  # 0: the image pivot
                           [1.0, 0.01], [2.0, 0.0],  # 1, 2: duplicates of it (cos ~1)
                           [-1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])  # 3, 4, 5: cos -1, 0, 0.71
    norms = torch.zeros(6)
    picks = DARTScorer.select(states, torch.tensor([0]), EMPTY, 3, norms)
    assert picks.tolist() == [0, 3, 4]  # the pivot, then its two least similar tokens
    # a text pivot along [0, 1] shares the budget: 3 more tokens, 2 for the image pivot, 1 for the text one,
    # which takes the remaining token least similar to it (2: cos 0, before 1: cos 0.01 and 5: cos 0.71)
    picks = DARTScorer.select(states, torch.tensor([0]), torch.tensor([[0.0, 1.0]]), 4, norms)
    assert picks.tolist() == [0, 3, 4, 2]


def test_pivot_order_decides_who_takes_a_contested_token():
    # pivots 0 = [1, 0] and 1 = [0, 1]; token 2 is the least similar to both; token 3 is the next for
    # pivot 0, token 4 for pivot 1: the pivot that picks first takes token 2, the other its second choice
    states = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, -1.0], [-0.5, 0.8], [0.8, -0.5]])
    image, norms = torch.tensor([0, 1]), torch.zeros(5)
    assert DARTScorer.select(states, image, EMPTY, 4, norms).tolist() == [0, 1, 2, 4]
    assert DARTScorer.select(states, image, EMPTY, 4, norms, order=[1, 0]).tolist() == [0, 1, 2, 3]


def test_release_order_is_the_python_set_order_of_the_positions():
    # CPython hashes small ints to themselves: the set visits 33 (slot 1) before 38 (slot 6)
    assert release_order([38], [33]) == [1, 0]
    assert release_order([33], [38]) == [0, 1]
    image, text = [200, 41, 517, 36], [601, 598, 600, 590]
    assert [([*image, *text])[i] for i in release_order(image, text)] == list(set(image + text))


def test_budget_split_reproduces_the_release():
    # the release's --max_num_trunction 128 with 4 + 4 pivots: 16 per pivot, plus the 4 image pivots
    assert split_quota(132 - 4, 8) == [16] * 8
    assert split_quota(10, 4) == [3, 3, 2, 2]  # a remainder goes to the first pivots in order


def _release_selection(x_in, out, rope, lm, layer, ids, mask, image_id, keep, n_image=4, n_text=4):
    """The release's `get_retained_image_token` written again over Python sets, for one sample."""
    attn = layer.self_attn
    cos, sin = rope
    k = attn.k_proj(layer.input_layernorm(x_in)).view(x_in.shape[0], -1, attn.head_dim)  # [N, H, d]
    half = attn.head_dim // 2
    k = k * cos[:, None] + torch.cat((-k[..., half:], k[..., :half]), dim=-1) * sin[:, None]
    l1 = k.flatten(1).abs().sum(-1)  # [N]
    states = lm.norm(out)
    visual = torch.nonzero(ids == image_id).flatten()
    text = torch.arange(int(visual.max()) + 1, ids.shape[0])[mask[int(visual.max()) + 1:].bool()]
    unpadded = mask.long().cumsum(0) - 1
    img_piv = visual[torch.topk(l1[visual], n_image).indices].tolist()
    txt_piv = text[torch.topk(l1[text], n_text).indices].tolist()
    quota = (keep - n_image) // (n_image + n_text)
    by_unpadded = {int(unpadded[p]): p for p in img_piv + txt_piv}
    kept, valid = set(img_piv), set(visual.tolist()) - set(img_piv)
    for u in list(set(int(unpadded[p]) for p in img_piv + txt_piv)):  # the release's set order
        pivot = by_unpadded[u]
        pool = sorted(valid)
        cos_sim = torch.nn.functional.cosine_similarity(states[pivot][None].float(), states[pool].float(), dim=-1)
        chosen = [pool[i] for i in torch.topk(-cos_sim, quota).indices.tolist()]
        kept.update(chosen)
        valid.difference_update(chosen)
    return sorted(int(torch.nonzero(visual == p)) for p in kept)


def test_kept_set_equals_the_release_computed_from_hooks(processor):
    """Left-padded batch of two: row 0's positions start after its padding in a plain forward, the release
    (batch 1) counts them from 0: the reference rotates its keys at the unpadded positions."""
    model = get_model("llava")
    inputs = batch(processor, [1, 1])
    keep, layer_k = 4 + 8 * 2, 1
    vtprune.apply(model, "dart", keep=keep, layer=layer_k)
    with torch.no_grad():
        model(**inputs)
    st = vtprune.stats(model)
    vtprune.remove(model)
    lm = model.model.language_model
    layer = lm.layers[layer_k]
    seen = {}
    hooks = [layer.register_forward_pre_hook(lambda m, a, k: seen.update(x=a[0] if a else k["hidden_states"]),
                                             with_kwargs=True),
             layer.register_forward_hook(lambda m, a, o: seen.update(out=o[0] if isinstance(o, tuple) else o))]
    with torch.no_grad():
        model(**inputs)
    for h in hooks:
        h.remove()
    mask = inputs["attention_mask"]
    with torch.no_grad():
        rope = lm.rotary_emb(seen["x"], (mask.long().cumsum(1) - 1).clamp(min=0))
        for b in range(2):
            want = _release_selection(seen["x"][b], seen["out"][b], (rope[0][b], rope[1][b]), lm, layer,
                                      inputs["input_ids"][b], mask[b], model.config.image_token_id, keep)
            assert st.kept[b].tolist() == want


def test_options_are_checked(llava):
    with pytest.raises(ConfigError, match="must be integers >= 0"):
        vtprune.apply(llava, "dart", keep=8, image_pivots=-1)
    with pytest.raises(ConfigError, match="at least one pivot"):
        vtprune.apply(llava, "dart", keep=8, image_pivots=0, text_pivots=0)
    with pytest.raises(ConfigError, match="pivot_norm='l3'"):
        vtprune.apply(llava, "dart", keep=8, pivot_norm="l3")
    with pytest.raises(ConfigError, match="pivot_order='first'"):
        vtprune.apply(llava, "dart", keep=8, pivot_order="first")
    with pytest.raises(ConfigError, match="adaptive budget"):
        vtprune.apply(llava, "dart", keep="auto:0.9")


def test_norm_order_and_l2_pivots_run_within_the_budget(llava, processor):
    inputs = batch(processor, [2, 1])
    for options in ({"pivot_order": "norm"}, {"pivot_norm": "l2"}, {"image_pivots": 0, "text_pivots": 2}):
        vtprune.apply(llava, "dart", keep=9, **options)
        with torch.no_grad():
            llava(**inputs)
        st = vtprune.stats(llava)
        assert st.layer == 1 and [sum(p) for p in st.per_image] == [18, 9] and st.per_image == [[9, 9], [9]]
