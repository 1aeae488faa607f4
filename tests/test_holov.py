"""HoloV: crops of consecutive tokens, a budget allocated by crop score, the top attention tokens per crop.

Constructed cases with a known answer (crop split, the crop score by hand, the allocation's floor and
leftover rule, a crop too small for its allocation), the vectorised selection against a per-crop loop
written from the release's description, then end to end: on tiny LLaVA the language model receives
exactly the release's sequence (its order and zero vectors), built by hand from the unpatched tower; on
Qwen-VL the kept tokens stay in raster order with zero vectors in the padding slots; LLaVA-NeXT, the
LLaVA repository, keep-all and the refusals.
"""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import batch, get_model, make_image, qwen_batch
from oracle import lm_on_kept

import vtprune
from vtprune.config import ConfigError
from vtprune.runtime.stages import CONTEXTUAL
from vtprune.scorers import build_scorer
from vtprune.scorers.holov import allocate, crop_scores, crop_sizes, default_crops, holov_picks


# ---- the release, per crop (a reference written from llava/model/utils.py's description) ----------------
def release_sequence(tokens: torch.Tensor, attention: torch.Tensor, crops: int, budget: int) -> torch.Tensor:
    """``[budget, D]``: the rows the release hands the LLM for one image (picks, then zero vectors)."""
    n = tokens.shape[0]
    q, r = divmod(n, crops)
    bounds, start = [], 0
    for c in range(crops):
        size = q + (1 if c < r else 0)
        if size:
            bounds.append((start, start + size))
        start += size
    scores = []
    for s, e in bounds:
        x, f = attention[s:e], tokens[s:e]
        if e - s == 1:
            scores.append(x.mean())
            continue
        u = f / (f.norm(dim=1, keepdim=True) + 1e-6)
        sim = (u @ u.T) * (1 - torch.eye(e - s))
        mu = sim.sum(1) / (e - s - 1)
        var = ((sim - mu[:, None]) ** 2).sum(1) / (e - s - 1)
        a = x * 1e3
        scores.append((a + 0.09 * var * (a.abs().mean() / (var.abs().mean() + 1e-6))).mean())
    s = torch.stack(scores)
    w = s / (s.sum() + 1e-6)
    alloc = (w * budget).floor().long()
    rest = budget - int(alloc.sum())
    if rest > 0:
        for i in torch.topk(w, min(rest, len(bounds))).indices.tolist():
            alloc[i] += 1
    rows = []
    for (s, e), a in zip(bounds, alloc.tolist()):
        if a >= e - s:
            rows.append(tokens[s:e])
        elif a > 0:
            rows.append(tokens[s:e][torch.topk(attention[s:e], a).indices])
    out = torch.cat(rows)
    return torch.cat([out, out.new_zeros(budget - out.shape[0], out.shape[1])])[:budget]


def picked_sequence(tokens, attention, crops, budget, **kw):
    picks, _ = holov_picks(attention, tokens, budget, crops, **kw)
    out = tokens[picks]
    return torch.cat([out, out.new_zeros(budget - out.shape[0], out.shape[1])])


# ---- constructed cases ----------------------------------------------------------------------------------
def test_crop_count_and_split_follow_the_release():
    assert [default_crops(576, k) for k in (64, 128, 192)] == [16, 8, 5]  # LLaVA-1.5: 16 is the release's
    assert default_crops(100, 1000) == 1
    assert crop_sizes(576, 16) == [36] * 16
    assert crop_sizes(10, 4) == [3, 3, 2, 2]  # the first n mod C crops are one longer
    assert crop_sizes(3, 5) == [1, 1, 1]  # empty crops are dropped


def test_crop_score_by_hand():
    """Features e0, e0, e1: cosine rows [0,1,0], [1,0,0], [0,0,0] (diagonal zeroed): means 1/2, 1/2, 0,
    variances 3/8, 3/8, 0 (mean 1/4); attention 1e-3 [1, 2, 3] -> a = [1, 2, 3], mean 2: token scores
    a + 0.09 * v * 2 / 0.25 = [1.27, 2.27, 3], crop score 2.18 = (1 + 0.09) * 2."""
    e = torch.eye(2)
    feats = torch.stack([e[0], e[0], e[1]])
    att = torch.tensor([1e-3, 2e-3, 3e-3])
    assert crop_scores(att, feats, [3]).item() == pytest.approx(2.18, abs=1e-4)
    # a one-token crop scores its raw attention (no 1e3 scale); two crops at once
    got = crop_scores(torch.tensor([1e-3, 2e-3, 3e-3, 0.5]), torch.cat([feats, e[:1]]), [3, 1])
    assert got.tolist() == pytest.approx([2.18, 0.5], abs=1e-4)
    # the variance term is rescaled to the attention: w = 0 gives the mean scaled attention
    assert crop_scores(att, feats, [3], diversity_weight=0.0).item() == pytest.approx(2.0, abs=1e-4)


def test_allocation_floors_then_gives_the_rest_to_the_largest_weights():
    assert allocate([0.75, 0.25], 4) == [3, 1]
    assert allocate([0.6, 0.4], 3) == [2, 1]  # floors 1 + 1, the one left to the larger weight
    assert allocate([0.5, 0.3, 0.2], 4) == [3, 1, 0]  # not largest remainder (which would give [2, 1, 1])
    assert allocate([0.25, 0.25, 0.25, 0.25], 2) == [1, 1, 0, 0]  # ties: the earlier crop
    assert allocate([0.0, 0.0], 5) == [1, 1]  # at most one extra per crop: 3 are not allocated
    torch.manual_seed(0)
    for _ in range(50):  # the allocation sums to the budget whenever the weights sum to about 1
        w = torch.rand(int(torch.randint(1, 40, ()))) + 1e-3
        w = (w / (w.sum() + 1e-6)).tolist()
        k = int(torch.randint(1, 300, ()))
        assert sum(allocate(w, k)) == k


def test_known_picks_and_order():
    """Two crops of 4 identical features, so the crop scores are (1 + w) x mean attention: crop 0 holds 70 %
    of the attention mass -> 3 of 4 tokens, by descending attention; crop 1 its single best token."""
    feats = torch.ones(8, 4)
    att = torch.tensor([0.05, 0.30, 0.20, 0.15, 0.02, 0.03, 0.20, 0.05])  # crop masses 0.7 and 0.3
    picks, alloc = holov_picks(att, feats, 4, 2)  # floors 2 + 1, the one left to crop 0
    assert alloc == [3, 1] and picks.tolist() == [1, 2, 3, 6]
    picks, alloc = holov_picks(att, feats, 2, 2)  # floors 1 + 0, the one left to crop 0
    assert alloc == [2, 0] and picks.tolist() == [1, 2]
    picks, alloc = holov_picks(att.flip(0), feats, 4, 2)  # crop order first, then descending attention
    assert alloc == [1, 3] and picks.tolist() == [1, 6, 5, 4]


def test_a_crop_smaller_than_its_allocation_is_kept_whole_and_the_rest_is_lost():
    """Crop 0 (4 tokens) holds 90 % of the mass: floor(5.4) = 5 and the leftover 1 -> 6 > 4: kept whole in
    its own order; crop 1 gets 0, so 2 of the 6 slots stay empty (the release's zero vectors)."""
    feats = torch.ones(8, 4)
    att = torch.tensor([0.3, 0.1, 0.4, 0.1, 0.025, 0.025, 0.025, 0.025])
    picks, alloc = holov_picks(att, feats, 6, 2)
    assert alloc == [6, 0] and picks.tolist() == [0, 1, 2, 3]
    seq = picked_sequence(feats, att, 2, 6)
    assert torch.equal(seq[4:], torch.zeros(2, 4)) and torch.equal(seq, release_sequence(feats, att, 2, 6))


def test_excluded_tokens_are_never_picked():
    feats = torch.randn(12, 8)
    att = torch.rand(12)
    att[[2, 7]] = float("-inf")
    for k in (1, 5, 10):
        picks, _ = holov_picks(att, feats, k, 3)
        assert not set(picks.tolist()) & {2, 7} and len(set(picks.tolist())) == picks.numel() <= k


@pytest.mark.parametrize("n,crops,k", [(576, 16, 64), (576, 8, 128), (576, 5, 192), (100, 7, 23), (30, 40, 5),
                                       (50, 50, 1), (200, 16, 150)])
def test_vectorised_selection_equals_the_per_crop_release(n, crops, k):
    torch.manual_seed(n + crops + k)
    feats = torch.randn(n, 16)
    for att in (torch.rand(n), torch.distributions.Exponential(1.0).sample((n,)) ** 4):  # flat, and peaked
        att = att / att.sum()
        torch.testing.assert_close(picked_sequence(feats, att, crops, k), release_sequence(feats, att, crops, k),
                                   atol=0, rtol=0)


# ---- end to end -----------------------------------------------------------------------------------------
def _llava_release_rows(model, inputs, crops, k):
    """Per image the release's LLM rows, from the unpatched tower: head-mean CLS attention of the feature
    layer (``hidden_states[-2]``) and the projector outputs of its patches."""
    core = model.model
    attn = core.vision_tower.encoder.layers[-2].self_attn
    cap = {}
    handle = attn.register_forward_pre_hook(lambda m, a, kw: cap.update(h=a[0] if a else kw["hidden_states"]),
                                            with_kwargs=True)
    with torch.no_grad():
        out = core.vision_tower(inputs["pixel_values"], output_hidden_states=True)
        handle.remove()
        h = cap["h"]
        t, n = h.shape[:2]
        heads, hd = attn.num_heads, attn.head_dim
        q = attn.q_proj(h[:, :1]).view(t, 1, heads, hd).transpose(1, 2)
        kk = attn.k_proj(h).view(t, n, heads, hd).transpose(1, 2)
        cls = torch.softmax(q @ kk.transpose(-1, -2) * attn.scale, dim=-1).mean(dim=1)[:, 0, 1:]
        feats = core.multi_modal_projector(out.hidden_states[-2][:, 1:])
    return [release_sequence(feats[i], cls[i], crops, k) for i in range(t)]


@pytest.mark.parametrize("crops,k,sharpen", [(None, 64, 1.0), (64, 500, 4.0)], ids=["release-64", "overflow"])
def test_llava_feeds_the_llm_the_release_sequence(processor, crops, k, sharpen):
    """The default at 64 (16 crops of 36, about 4 picks each: the release's order inside the crops), and 64
    crops of 9 with 500 kept on a tower with sharper attention (q and k scaled): crops allocated more than
    they hold, so zero vectors too."""
    model = copy.deepcopy(get_model("llava"))
    attn = model.model.vision_tower.encoder.layers[-2].self_attn
    attn.q_proj.weight.data *= sharpen
    attn.k_proj.weight.data *= sharpen
    inputs = batch(processor, [1, 1])
    vtprune.apply(model, method="holov", keep=k, num_crops=crops)
    try:
        with torch.no_grad():
            pruned = model(**inputs).logits
        st = vtprune.stats(model)
    finally:
        vtprune.remove(model)
    rows = _llava_release_rows(model, inputs, crops or 16, k)
    assert st.visual_after == [k, k] and st.contextual == [int((r.abs().sum(1) == 0).sum()) for r in rows]
    assert all(c > 0 for c in st.contextual) == (crops == 64)
    visual = []  # the release's rows in the kept slots, in order: the LLM sees only their sequence
    for b, r in enumerate(rows):
        v = torch.zeros(576, r.shape[1])
        v[st.kept[b]] = r
        visual.append(v)
    expected, valid = lm_on_kept(model, inputs, st, visual_rows=visual)
    torch.testing.assert_close(pruned[valid], expected[valid], atol=2e-5, rtol=1e-4)
    raster, _ = lm_on_kept(model, inputs, st)  # the same kept set in raster order is another sequence
    assert not torch.allclose(pruned[valid], raster[valid], atol=1e-4)


@pytest.mark.parametrize("kind", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
def test_qwen_keeps_raster_order_and_zero_fills_the_padding_slots(kind):
    """On Qwen-VL the picks keep their own slots (and M-RoPE positions); the budget the crops could not hold
    becomes zero vectors in the image's last unkept slots. The picks are HoloV's on the attention the
    method ranked (`stats().scores`) and the merger outputs. The last vision block's q and k are scaled (on a
    copy) so that its attention is peaked enough for some crops to overflow."""
    model = copy.deepcopy(get_model(kind))
    qkv = model.model.visual.blocks[-1].attn.qkv
    width = qkv.weight.shape[1]
    qkv.weight.data[: 2 * width] *= 40.0
    if qkv.bias is not None:
        qkv.bias.data[: 2 * width] *= 40.0
    inputs = qwen_batch(kind, "left_padded_2")
    vtprune.apply(model, method="holov", keep=60, num_crops=20)
    try:
        with torch.no_grad():
            pruned = model(**inputs).logits
        st = vtprune.stats(model)
        sess = model._vtprune_state.session
        zeros, lay = sess.extras[CONTEXTUAL], sess.layout
    finally:
        vtprune.remove(model)
    seen = {}
    handle = model.model.language_model.register_forward_pre_hook(lambda m, a, kw: seen.update(kw), with_kwargs=True)
    with torch.no_grad():
        model(**inputs, use_cache=False)
    handle.remove()
    assert st.visual_after == [60, 60] and st.contextual == [int(z.numel()) for z in zeros]
    assert sum(st.contextual) > 0
    visual = []
    for b in range(2):
        pos = lay.positions[b]
        feats = seen["inputs_embeds"][b, pos]
        picks, _ = holov_picks(st.scores[b], feats, 60, 20)
        free = sorted(set(range(pos.numel())) - set(picks.tolist()))
        pads = free[len(free) - st.contextual[b]:]
        assert st.kept[b].tolist() == sorted(picks.tolist() + pads) and zeros[b].tolist() == pads
        v = feats.clone()
        v[pads] = 0
        visual.append(v)
    expected, valid = lm_on_kept(model, inputs, st, visual_rows=visual)
    torch.testing.assert_close(pruned[valid], expected[valid], atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("kind", ["llava", "next", "qwen2_5_vl"])
def test_keep_all_is_identical_and_counts_are_exact(kind, processor, next_processor):
    model = get_model(kind)
    if kind == "llava":
        inputs = batch(processor, [1, 1])
    elif kind == "next":
        inputs = batch(next_processor, [1], sizes=((300, 620),))
    else:
        inputs = qwen_batch(kind, "left_padded_2")
    try:
        with torch.no_grad():
            ref = model(**inputs).logits
            vtprune.apply(model, method="holov", keep=1.0)
            same = model(**inputs).logits
            runs = {}
            for newlines in ("drop", "keep"):
                vtprune.apply(model, method="holov", keep=12, newlines=newlines)
                model(**inputs)
                runs[newlines] = (vtprune.stats(model), model._vtprune_state.session.layout)
                tokens = model.generate(**inputs, max_new_tokens=2, do_sample=False)
                assert tokens.shape[0] == inputs["input_ids"].shape[0]
    finally:
        vtprune.remove(model)
    assert torch.equal(same, ref)
    for newlines, (st, lay) in runs.items():
        for b, kept in enumerate(st.kept):
            assert int(lay.prunable[b][kept].sum()) == 12 * len(lay.image_slices(b))  # pad: exactly keep per image
            fixed = torch.nonzero(~lay.prunable[b]).flatten()  # NeXT newlines: dropped (the release) or kept
            assert bool(torch.isin(fixed, kept).all() if newlines == "keep" else not torch.isin(fixed, kept).any())
            assert fixed.numel() > 0 or kind != "next"


def test_llava_repository_model(tmp_path):
    from vtprune.toy.tiny_llava_repo import IMAGE_TOKEN_INDEX, llava_repo_available, tiny_llava_repo

    if not llava_repo_available():
        pytest.skip("the LLaVA repository's code is not installed")
    from llava.mm_utils import process_images, tokenizer_image_token

    model, tok, ip = tiny_llava_repo(tmp_path)
    ids = tokenizer_image_token("USER: <image>\nWhat is in the picture? ASSISTANT:", tok, IMAGE_TOKEN_INDEX,
                                return_tensors="pt")[None]
    images = process_images([make_image(300, 420, 0)], ip, model.config)
    try:
        with torch.no_grad():
            ref = model(input_ids=ids, images=images).logits
            vtprune.apply(model, "holov", keep=1.0)
            same = model(input_ids=ids, images=images).logits
            vtprune.apply(model, "holov", keep=40)
            out = model(input_ids=ids, images=images).logits
        st = vtprune.stats(model)
    finally:
        vtprune.remove(model)
    assert torch.equal(same, ref)
    assert st.stage == "pre-llm" and st.visual_after == [40] and out.shape[1] == ref.shape[1] - (576 - 40)


def test_options_are_validated():
    for bad in ({"num_crops": 0}, {"num_crops": 2.5}, {"power": -1}, {"diversity_weight": "x"},
                {"order": "sorted"}, {"overflow": "spread"}, {"vision_layer": [-2]}):
        with pytest.raises(ConfigError, match=next(iter(bad))):
            build_scorer("holov", bad)
    qwen = get_model("qwen2_vl")
    with pytest.raises(ConfigError, match="M-RoPE"):
        vtprune.apply(qwen, method="holov", keep=12, order="release")
    vtprune.remove(qwen)
    llava = get_model("llava")
    with pytest.raises(ConfigError, match="adaptive|auto"):
        vtprune.apply(llava, method="holov", keep="auto:0.9")
    vtprune.remove(llava)
