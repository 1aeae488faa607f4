"""VScan: the scans and the merge on constructed cases, the release's settings and their depth scaling, and
the whole method on the tiny models against an independent re-implementation of the release (its loops in
``encode_images`` / ``window_cls_selection`` / ``token_merging`` on eager attention maps, its last-token
ranking at the drop layer, its Qwen ``window_selection`` greedy pass). Keep-all and generate() on every
tiny model are in tests/test_presets.py."""

from __future__ import annotations

import pytest
import torch
from conftest import batch, get_model, qwen_batch
from oracle import lm_on_kept, staged_masked_logits

import vtprune
from vtprune.adapters import adapter_for
from vtprune.adapters.base import ImageInputs
from vtprune.config import ConfigError
from vtprune.scorers import VScan
from vtprune.scorers.select import StageBudget, image_budget
from vtprune.scorers.vscan import (
    GLOBAL,
    LOCAL,
    capped_window_picks,
    global_picks,
    nearest_merge,
    qwen_windows,
    split_scans,
    window_topk,
)
from vtprune.toy.tiny_llava_repo import llava_repo_available

F = torch.nn.functional


# ---- the pure parts on constructed cases ------------------------------------------------------------
def test_budget_split_is_the_releases():
    assert split_scans(96) == (48, 48) and split_scans(288) == (144, 144) and split_scans(3) == (1, 2)
    assert split_scans(96, global_ratio=0.25) == (72, 24) and split_scans(7, global_ratio=1.0) == (0, 7)


def test_local_scan_takes_the_top_of_every_window_and_no_more():
    torch.manual_seed(0)
    a = torch.rand(1, 24, 24) * 0.1
    want = torch.zeros(24, 24, dtype=torch.bool)
    for wi in range(4):
        for wj in range(4):
            for rank, (r, c) in enumerate([(0, 5), (3, 3), (5, 0)]):
                a[0, 6 * wi + r, 6 * wj + c] = 1.0 - 0.1 * rank
                want[6 * wi + r, 6 * wj + c] = True
    a[0, :6, :6] += 5.0  # the best 36 of the map are one window: it still gives only its 3
    a[0, 0, 5] += 1.0  # (its 3: the planted ones stay on top inside the window)
    a[0, 3, 3] += 1.0
    a[0, 5, 0] += 1.0
    picks, n = window_topk(a, 48)  # 48 // 16 windows = 3 each
    assert n == 48 and torch.equal(picks[0], want)
    assert window_topk(a, 50)[1] == 48 and window_topk(a, 15)[1] == 0  # the release floors per window
    big = torch.zeros(1, 26, 26)
    big[0, 24:, :] = 9.0  # rows 24, 25 belong to no 6 x 6 window
    picks, n = window_topk(big, 16)
    assert n == 16 and not picks[0, 24:].any()
    small, n = window_topk(torch.arange(16.0).view(1, 4, 4), 3)  # a grid smaller than the window: one window
    assert n == 3 and small[0].flatten().nonzero().flatten().tolist() == [13, 14, 15]


def test_global_scan_skips_the_local_picks():
    s = torch.tensor([9.0, 8.0, 7.0, 7.0, 5.0, 1.0])
    taken = torch.tensor([True, False, True, False, False, False])
    got = global_picks(s, taken, 2)
    assert got.nonzero().flatten().tolist() == [0, 1, 2, 3]  # 8 and the earlier 7 (ties: the earlier token)
    assert torch.equal(global_picks(s, taken, 0), taken)


def test_merge_is_the_mean_of_a_kept_token_and_the_tokens_nearest_to_it():
    e1, e2 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    x = torch.stack([2 * e1, e2, e1 + 0.1 * e2, 3 * e1, e2 + 0.2 * e1, e1 + e2 * 0.99])[None]  # [1, 6, 2]
    kept, dropped = torch.tensor([[0, 1, 5]]), torch.tensor([[2, 3, 4]])
    merged, count = nearest_merge(x, kept, dropped)
    assert count.tolist() == [[2, 1, 0]]
    torch.testing.assert_close(merged[0, 0], (x[0, 0] + x[0, 2] + x[0, 3]) / 3)
    torch.testing.assert_close(merged[0, 1], (x[0, 1] + x[0, 4]) / 2)
    assert torch.equal(merged[0, 2], x[0, 5])  # nothing joined it: itself, exactly
    weighted, _ = nearest_merge(x, kept, dropped, scaling=2.0)  # the release's `scaling`: the kept token's weight
    torch.testing.assert_close(weighted[0, 0], (2 * x[0, 0] + x[0, 2] + x[0, 3]) / 4)


def test_qwen_windows_fold_the_border_into_the_last_window():
    r, c = torch.meshgrid(torch.arange(9), torch.arange(9), indexing="ij")
    coords = torch.stack([torch.zeros(81, dtype=torch.long), r.flatten(), c.flatten()], 1)
    wid, n = qwen_windows(coords, 4)  # 9 // 4 = 2 windows a side; row / column 8 join the second
    assert n == 4 and wid.view(9, 9)[8, 8] == 3 and wid.view(9, 9)[8, 0] == 2 and wid.view(9, 9)[3, 4] == 1
    video = torch.cat([coords, coords + torch.tensor([1, 0, 0])])
    wid, n = qwen_windows(video, 4)
    assert n == 8 and wid[81:].min() == 4  # each frame has its own windows


def test_capped_greedy_takes_at_most_the_cap_per_window():
    wid, n = qwen_windows(torch.stack([torch.zeros(64, dtype=torch.long), torch.arange(64) // 8, torch.arange(64) % 8], 1), 4)
    s = torch.rand(64, generator=torch.Generator().manual_seed(1))
    s[wid == 0] += 10.0  # window 0 holds the 16 best tokens
    s[wid == 2] += 5.0
    top = {w: torch.argsort(s.masked_fill(wid != w, -1.0), descending=True)[:2].tolist() for w in range(4)}
    got = capped_window_picks(s, wid, n, 4).nonzero().flatten().tolist()  # cap 1: the best of each window
    assert sorted(got) == sorted(top[w][0] for w in range(4))
    got = capped_window_picks(s, wid, n, 6).nonzero().flatten().tolist()  # cap 2: windows 0, 2, then 1 (by score)
    w1_vs_w3 = [top[1][0], top[1][1]] if s[top[1][1]] > s[top[3][0]] else [top[1][0], top[3][0]]
    assert sorted(got) == sorted(top[0] + top[2] + w1_vs_w3)
    short = capped_window_picks(torch.tensor([5.0, 4.0, 3.0, 2.0, 1.0]), torch.tensor([0, 1, 1, 1, 1]), 2, 4)
    assert short.tolist() == [True, True, True, True, False]  # cap 2 holds 3: the best remaining one fills


# ---- the release's settings ----------------------------------------------------------------------------
class _Adapter:
    """An adapter stand-in: ``vision`` tower layers (``full``: the hidden_states indices whose attention spans
    the image), ``llm`` decoder layers."""

    def __init__(self, vision=24, llm=32, family="clip", feature=-2, full=None, first=0):
        self.vision, self.llm, self.vision_family, self.feature, self.full, self.first = vision, llm, family, feature, full, first

    def vision_depth(self):
        return self.vision

    def vision_attention(self, h):
        hh = h + self.vision + 1 if h < 0 else h
        if not 1 <= hh <= self.vision or (self.full is not None and hh not in self.full):
            raise ValueError(f"vision_layer={h} is not usable")
        return hh

    def default_vision_layer(self):
        return self.feature

    def decoder_layers(self):
        return [None] * self.llm

    def min_layer(self):
        return self.first


def test_defaults_are_the_releases_on_its_models():
    s = VScan()
    s.bind(None, _Adapter())  # LLaVA-1.5-7B: CLIP-L 24 layers, Vicuna 32
    assert (s.global_ratio, s.pre_llm_factor, s.scaling, s.merge) == (0.5, 3.0, 1.0, True)
    assert s.scan_layers(_Adapter()) == (6, -2)  # hidden_states[6] = the output of attentions[5]; [-2]
    assert s.window_side == 6 and s.llm_layer == 15 and s.rope_at_llm_stage  # layer_list [16]: drop before 16
    for keep, pre in [(32, 96), (64, 192), (96, 288)]:  # the paper's 64 / 128 / 192 on average over 32 layers
        assert s.llm_stages(None, _Adapter(), keep) == (pre, [(15, keep)])
        assert (pre * 16 + keep * 16) / 32 == 2 * keep
    q = VScan()
    qwen25 = _Adapter(vision=32, llm=28, family="qwen", feature=32, full=[8, 16, 24, 32])  # fullatt 7, 15, 23, 31
    q.bind(None, qwen25)
    assert q.scan_layers(qwen25) == (8, 32) and q.window_side == 4 and not q.rope_at_llm_stage
    assert q.llm_layer == 13  # the Qwen release's layer_list [14] on 28 layers
    pre, stages = q.llm_stages(None, qwen25, 1 / 18)  # its ratios: 0.167 of the tokens, then 0.333 of those
    assert isinstance(pre, StageBudget) and pre.fraction == pytest.approx(1 / 6) and stages[0][1] == pytest.approx(1 / 3)
    assert image_budget(pre, 600)[0] == 100
    assert q.scan_layers(_Adapter(vision=32, family="qwen", feature=32)) == (8, 32)  # Qwen2-VL: all blocks full
    assert q.scan_layers(_Adapter(vision=27, family="qwen", feature=27)) == (7, 27)  # Qwen3-VL-8B
    keep_all = VScan()
    keep_all.bind(None, _Adapter())
    assert keep_all.llm_stages(None, _Adapter(), 1.0) == (StageBudget(1.0, 1), [(15, 1.0)])
    only = VScan(pre_llm_factor=1)
    only.bind(None, _Adapter())
    assert only.llm_stages(None, _Adapter(), 32) == (32, [])


@pytest.mark.parametrize("depth, first, want", [(32, 0, 15), (28, 0, 13), (40, 0, 19), (4, 0, 2), (4, 2, 2)])
def test_llm_layer_keeps_the_releases_depth_fraction(depth, first, want):
    s = VScan()
    s.bind(None, _Adapter(llm=depth, first=first))
    assert s.llm_layer == want
    given = VScan(llm_layer=1)
    given.bind(None, _Adapter(llm=depth))
    assert given.llm_layer == 1


def test_options_and_models_are_checked(llava):
    for bad in ({"global_ratio": 1.5}, {"pre_llm_factor": 0.5}, {"llm_layer": -1}, {"vision_layers": [1]},
                {"window": 0}, {"scaling": 0}, {"merge": None}, {"llm_rope": "yes"}):
        with pytest.raises(ConfigError):
            VScan(**bad)
    with pytest.raises(ConfigError, match="llm_layer=3 needs at least 5 decoder layers"):
        vtprune.apply(llava, "vscan", keep=8, llm_layer=3)
    with pytest.raises(ConfigError, match="vision_layers=.*not usable"):  # Qwen2.5-VL: a window block
        vtprune.apply(get_model("qwen2_5_vl"), "vscan", keep=8, vision_layers=[1, 4])
    with pytest.raises(ConfigError, match="too early for Qwen3-VL"):  # its LLM stage comes after deepstack
        vtprune.apply(get_model("qwen3_vl"), "vscan", keep=8, llm_layer=1)
    with pytest.raises(ConfigError, match="adaptive budget"):
        vtprune.apply(llava, "vscan", keep="auto:0.9")


# ---- LLaVA-1.5 against the release ---------------------------------------------------------------------
def _cls_rows(model, pixels):
    """Eager CLS attention (head mean, patch columns) of every vision layer ``[L, T, P]``, and the projector's
    outputs ``[T, P, D]`` of the unpatched model."""
    with torch.no_grad():
        out = model.model.vision_tower(pixels, output_attentions=True, output_hidden_states=True)
        proj = model.model.multi_modal_projector(out.hidden_states[-2][:, 1:])
    assert len(out.attentions) == model.config.vision_config.num_hidden_layers
    return torch.stack([a[:, :, 0, 1:].float().mean(1) for a in out.attentions]), proj.float()


def _release_selection(shallow: torch.Tensor, deep: torch.Tensor, t: int, g: int = 24, win: int = 6) -> torch.Tensor:
    """``window_cls_selection`` + the zeroed global top-k of ``encode_images`` for one tile: ``[P]`` bool."""
    n_local = int(t * 0.5)
    per = n_local // (g // win) ** 2
    chosen = []
    for i in range(g // win):
        for j in range(g // win):
            block = shallow.view(g, g)[i * win:(i + 1) * win, j * win:(j + 1) * win].reshape(-1)
            for idx in torch.topk(block, per).indices.tolist():
                dy, dx = divmod(idx, win)
                chosen.append((i * win + dy) * g + j * win + dx)
    d = deep.clone()
    d[chosen] = 0
    chosen += torch.topk(d, t - n_local).indices.tolist()
    mask = torch.zeros(g * g, dtype=torch.bool)
    mask[chosen] = True
    return mask


def _release_merge(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``token_merging(scaling=1)``: ``[K, D]`` the kept rows (index order) averaged with their nearest others."""
    kept, rest = x[mask].clone(), x[~mask]
    near = F.cosine_similarity(rest[:, None], kept[None], dim=-1).argmax(1)
    total, n = kept.clone(), torch.ones(len(kept))
    for j, i in enumerate(near.tolist()):
        total[i] += rest[j]
        n[i] += 1
    return total / n[:, None]


class _LM(torch.nn.Module):
    """The unpatched language model + head of ``model``, for the oracle on a captured (shortened) prompt."""

    def __init__(self, model):
        super().__init__()
        self.lm, self.head = model.model.language_model, model.lm_head
        self.model = type("M", (), {"language_model": self.lm})()

    def forward(self, output_attentions=False, **kw):
        out = self.lm(**kw, output_attentions=output_attentions)
        return type("O", (), {"logits": self.head(out.last_hidden_state), "attentions": out.attentions})()


def _run(model, inputs, **kw):
    """The pruned forward: ``(logits, stats, the LM's input kwargs)``."""
    seen = {}
    handle = model.model.language_model.register_forward_pre_hook(lambda m, a, k: seen.update(k), with_kwargs=True)
    vtprune.apply(model, "vscan", **kw)
    try:
        with torch.no_grad():
            logits = model(**inputs).logits
        return logits, vtprune.stats(model), seen
    finally:
        handle.remove()
        vtprune.remove(model)


def test_llava_scans_merge_and_llm_stage_are_the_releases(processor):
    """keep=32, the release's 64-token setting: 96 tokens per image before the LLM (48 local, 3 per 6 x 6
    window of layer 0's CLS map, the tiny tower's attentions[5]; 48 global of attentions[-2]), merged on the
    projector outputs; after layer 2 (the toys' layer 15) the 32 with the highest attention of the last
    prompt token at layer 3 on the shortened prompt (eager, unpatched LM); and the logits of that drop equal
    masking its columns from layer 3 on."""
    model = get_model("llava", "eager")
    inputs = batch(processor, [1])
    rows, proj = _cls_rows(model, inputs["pixel_values"])
    logits, st, seen = _run(model, inputs, keep=32)
    assert [s["layer"] for s in st.stages] == [None, 2] and [s["visual_after"] for s in st.stages] == [[96], [32]]
    want = _release_selection(rows[0, 0], rows[-2, 0], 96)
    pre = st.stages[0]["kept"][0]
    assert torch.equal(pre, want.nonzero().flatten())
    ids = inputs["input_ids"][0]
    start = int(torch.nonzero(ids == model.config.image_token_id)[0])
    embeds = seen["inputs_embeds"]
    torch.testing.assert_close(embeds[0, start:start + 96].float(), _release_merge(proj[0], want), atol=1e-5, rtol=1e-4)
    near = F.cosine_similarity(proj[0][~want][:, None], proj[0][want][None], dim=-1).argmax(1)
    absorbed = pre[torch.unique(near)]  # the kept tokens that absorbed some
    # the LLM stage: layer 3's view of layer 2's output on the 96-token prompt
    lm = _LM(model)
    with torch.no_grad():
        att = lm(inputs_embeds=embeds, attention_mask=seen["attention_mask"], output_attentions=True).attentions
    row = att[3][0, :, -1].float().mean(0)[start:start + 96]
    final = torch.sort(pre[torch.topk(row, 32).indices]).values
    assert torch.equal(st.kept[0], final) and torch.equal(st.stages[1]["kept"][0], final)
    assert st.contextual == [int(torch.isin(final, absorbed).sum())]  # those of them that survived layer 2
    dropped = torch.zeros(embeds.shape[:2], dtype=torch.bool)
    dropped[0, start:start + 96] = ~torch.isin(pre, final)
    ref = staged_masked_logits(lm, {"inputs_embeds": embeds, "attention_mask": seen["attention_mask"]}, [(2, dropped)])
    check = seen["attention_mask"].bool() & ~dropped
    torch.testing.assert_close(logits[check], ref[check], atol=3e-5, rtol=1e-4)


def test_without_merge_and_llm_stage_it_is_a_plain_selection(processor):
    """merge=False, pre_llm_factor=1: the release's scans alone, so the LM sees the kept tokens unchanged.
    keep=48: 24 local tokens floor to 1 per window (16), + 24 global: 40 per image, as the release keeps."""
    model = get_model("llava")
    inputs = batch(processor, [1, 2])
    vtprune.apply(model, "vscan", keep=48, merge=False, pre_llm_factor=1)
    with torch.no_grad():
        pruned = model(**inputs).logits
    st = vtprune.stats(model)
    vtprune.remove(model)
    assert st.stages is None and st.visual_after == [40, 80] and st.contextual == [0, 0]
    expected, valid = lm_on_kept(model, inputs, st)
    torch.testing.assert_close(pruned[valid], expected[valid], atol=2e-5, rtol=1e-4)


def test_next_scans_every_tile_on_its_whole_grid(next_processor):
    """LLaVA-NeXT as the release: each tile (base and crops) gets the budget on its full 24 x 24 grid, the
    unpadding then drops what falls outside the image (selected tokens included), and the merge runs over the
    whole tile, the patches the unpadding removes included; newlines are kept."""
    model = get_model("next", "eager")
    inputs = batch(next_processor, [1], sizes=((200, 620),))  # a third of the crops is padding
    adapter = adapter_for(model)
    tiles = adapter.tiles_per_image(inputs["image_sizes"], 1)[0]
    rows, proj = _cls_rows(model, inputs["pixel_values"][0, :tiles])
    _, st, seen = _run(model, inputs, keep=12)  # 36 per tile: 16 local (1 per window) + 18 global
    src = adapter.image_tokens(ImageInputs(None, inputs["image_sizes"], None, None, None), 0)[0].source
    selected = torch.stack([_release_selection(rows[0, t], rows[-2, t], 36) for t in range(tiles)])
    assert int(selected.sum()) == tiles * 34
    patch = src % 577 - 1
    tile = torch.div(src, 577, rounding_mode="floor")
    keep = (src < 0) | selected[tile.clamp(min=0), patch.clamp(min=0)]
    assert torch.equal(st.stages[0]["kept"][0], keep.nonzero().flatten())
    assert bool((~keep & (src >= 0)).any()) and int(keep[src >= 0].sum()) < tiles * 34  # unpadding lost some
    ids = inputs["input_ids"][0]
    start = int(torch.nonzero(ids == model.config.image_token_id)[0])
    slots = start + torch.arange(int(keep.sum()))
    kept_src = src[keep]
    for t in range(tiles):
        merged = _release_merge(proj[t], selected[t])  # over the whole tile
        rank = torch.cumsum(selected[t].long(), 0) - 1
        mine = (kept_src >= 0) & (tile[keep] == t)
        got = seen["inputs_embeds"][0, slots[mine]].float()
        torch.testing.assert_close(got, merged[rank[patch[keep][mine]]], atol=1e-5, rtol=1e-4)


# ---- Qwen-VL -----------------------------------------------------------------------------------------
def _release_window_selection(scores, coords, n_local, win=4):
    """The Qwen release's greedy pass (``window_selection``), one image."""
    h, w = int(coords[:, 1].max()) + 1, int(coords[:, 2].max()) + 1
    nh, nw = max(1, h // win), max(1, w // win)
    cap = -(-n_local // (nh * nw))
    counter, out = {}, []
    for i in torch.argsort(scores, descending=True).tolist():
        key = (min(int(coords[i, 1]) // win, nh - 1), min(int(coords[i, 2]) // win, nw - 1))
        if counter.get(key, 0) < cap:
            counter[key] = counter.get(key, 0) + 1
            out.append(i)
        if len(out) == n_local:
            break
    return out


def test_qwen25_scans_the_first_and_last_full_blocks_and_scores_without_rope():
    """Qwen2.5-VL (the release's): the local scores are those of its first full-attention block, the global
    ones of its last (the same rows `cls` records for those layers, through the window order), the
    release's greedy window pass and zeroed top-k, the merge on the merger outputs, and the LLM stage's
    ranking by the last token's attention at layer 3 without RoPE."""
    model = get_model("qwen2_5_vl")  # fullatt blocks 1 and 3: hidden_states 2 and 4
    inputs = qwen_batch("qwen2_5_vl", "single")
    rows = {}
    for layer in (2, 4):
        vtprune.apply(model, "cls", keep=1.0, vision_layer=layer)
        with torch.no_grad():
            model(**inputs)
        rows[layer] = model._vtprune_state.vision_record.cls_attention.flatten()
        vtprune.remove(model)
    with torch.no_grad():
        feats = model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"]).pooler_output[0].float()
    hidden = {}
    layers = model.model.language_model.layers
    h = layers[2].register_forward_hook(lambda m, a, out: hidden.setdefault("x", out[0] if isinstance(out, tuple) else out))
    vtprune.apply(model, "vscan", keep=12)
    try:
        with torch.no_grad():
            model(**inputs)
        rec = model._vtprune_state.vision_record
        torch.testing.assert_close(rec.extras[LOCAL].flatten(), rows[2])
        torch.testing.assert_close(rec.extras[GLOBAL].flatten(), rows[4])
        st = vtprune.stats(model)
    finally:
        h.remove()
        vtprune.remove(model)
    n = feats.shape[0]
    t, gh, gw = inputs["image_grid_thw"][0].tolist()
    r = torch.arange(n)
    coords = torch.stack([torch.zeros_like(r), r // (gw // 2), r % (gw // 2)], 1)
    local = _release_window_selection(rows[2], coords, 18)
    deep = rows[4].clone()
    deep[local] = 0
    want = torch.zeros(n, dtype=torch.bool)
    want[local + torch.topk(deep, 18).indices.tolist()] = True
    pre = st.stages[0]["kept"][0]
    assert torch.equal(pre, want.nonzero().flatten())
    # the LLM stage: no RoPE, GQA heads repeated, the last token's row at layer 3
    attn = layers[3].self_attn
    x = layers[3].input_layernorm(hidden["x"])[0]
    d = attn.head_dim
    with torch.no_grad():
        q = attn.q_proj(x[-1:]).view(1, -1, d).transpose(0, 1)  # [H, 1, d]
        k = attn.k_proj(x).view(x.shape[0], -1, d).transpose(0, 1)  # [H_kv, N, d]
        k = k.repeat_interleave(q.shape[0] // k.shape[0], 0)
    probs = torch.softmax((q.float() @ k.float().transpose(1, 2)) * d ** -0.5, dim=-1)[:, 0].mean(0)
    ids = inputs["input_ids"][0]
    start = int(torch.nonzero(ids == model.config.image_token_id)[0])
    final = torch.sort(pre[torch.topk(probs[start:start + 36], 12).indices]).values
    assert torch.equal(st.kept[0], final)


def test_qwen_merges_on_the_merger_outputs_per_item():
    """Two samples (left padded), each image scanned and merged on its own merger outputs; Qwen2-VL, whose
    blocks are all full attention, scans hidden_states 1 and 4 of its 4 (a quarter of the depth, the last)."""
    model = get_model("qwen2_vl")
    inputs = qwen_batch("qwen2_vl", "left_padded_2")
    with torch.no_grad():
        feats = model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"]).pooler_output
    _, st, seen = _run(model, inputs, keep=12, pre_llm_factor=1)  # before the LLM only: 6 local + 6 global
    assert st.visual_after == [12, 12]
    ids = inputs["input_ids"]
    for b in range(2):
        x = feats[b].float()
        mask = torch.zeros(x.shape[0], dtype=torch.bool)
        mask[st.kept[b]] = True
        rows = torch.nonzero(seen["attention_mask"][b]).flatten()
        short = seen["inputs_embeds"][b, rows]
        start = int(torch.nonzero(ids[b][inputs["attention_mask"][b].bool()] == model.config.image_token_id)[0])
        torch.testing.assert_close(short[start:start + 12].float(), _release_merge(x, mask), atol=1e-5, rtol=1e-4)


@pytest.mark.skipif(not llava_repo_available(), reason="the LLaVA repository's code is not installed")
def test_llava_repository_prunes_as_transformers_llava_does(tmp_path):
    """The original LLaVA codebase (the release's own base): keep-all identical, and the same kept tokens at
    both stages and the same logits as transformers' LLaVA carrying its weights."""
    import test_llava_repo as repo

    model, tok, ip = repo.get(tmp_path)
    twin = repo.transformers_twin(model)
    ids, mask, images = repo.make_batch(tok, ip, model, [1, 1], "right")
    rows = []
    for b in range(2):
        row = ids[b][mask[b].bool()]
        cut = int(torch.nonzero(row == repo.IMAGE_TOKEN_INDEX)[0])
        rows.append(torch.cat([row[:cut], torch.full((repo.P,), twin.config.image_token_id), row[cut + 1:]]))
    width = max(len(r) for r in rows)
    hf_ids = torch.full((2, width), tok.pad_token_id)
    hf_mask = torch.zeros_like(hf_ids)
    for b, r in enumerate(rows):
        hf_ids[b, : len(r)], hf_mask[b, : len(r)] = r, 1
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask, images=images).logits
        vtprune.apply(model, "vscan", keep=1.0)
        same = model(input_ids=ids, attention_mask=mask, images=images).logits
        vtprune.apply(model, "vscan", keep=12)
        vtprune.apply(twin, "vscan", keep=12)
        ours = model(input_ids=ids, attention_mask=mask, images=images).logits
        theirs = twin(input_ids=hf_ids, attention_mask=hf_mask, pixel_values=images).logits[..., : model.config.vocab_size]
    st, st_twin = vtprune.stats(model), vtprune.stats(twin)
    vtprune.remove(model)
    vtprune.remove(twin)
    torch.testing.assert_close(same, ref, atol=1e-5, rtol=0)
    assert [s["visual_after"] for s in st.stages] == [[34, 34], [12, 12]]
    for a, b in zip(st.stages, st_twin.stages):
        assert all(torch.equal(x, y) for x, y in zip(a["kept"], b["kept"]))
    for b, n in enumerate([n - v + k for n, v, k in zip(st.seq_len_before, st.visual_before, [34, 34])]):
        torch.testing.assert_close(ours[b, :n], theirs[b, :n], atol=2e-5, rtol=1e-4)
