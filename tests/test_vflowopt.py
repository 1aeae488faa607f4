"""VFlowOpt: importance parts on constructed cases, the recycled features, and the LLM stages after the
pre-LLM one (staged masking on the shortened sequence the LLM sees)."""

from __future__ import annotations

import importlib
import math

import numpy as np
import pytest
import torch
from conftest import batch, get_model, qwen_batch, qwen_prompts
from oracle import staged_masked_logits
from PIL import Image

import vtprune
from vtprune.adapters.attention_rows import vit_context_relevance as context_relevance
from vtprune.adapters.qwen import window_order
from vtprune.config import ConfigError
from vtprune.scorers.vflowopt import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, merged_token_entropy, patch_entropy
from vtprune.toy.tiny_qwen import tiny_qwen
from vtprune.tune import search_space


class _Attn(torch.nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.q_proj, self.k_proj = torch.nn.Identity(), torch.nn.Identity()
        self.num_heads, self.head_dim, self.scale = 1, d, 1.0


def test_context_relevance_formula():
    torch.manual_seed(0)
    x = torch.randn(1, 6, 4)
    x[0, 0] *= 6  # a high-norm token: everyone attends it
    got = context_relevance(_Attn(4), x, t=1.5)[0]
    a = torch.softmax(x[0] @ x[0].T, dim=-1)
    r = a.mean(0)
    g = r > 1.5 * r.mean()
    assert 0 < int(g.sum()) < 6
    torch.testing.assert_close(got, a[g].mean(0))
    torch.testing.assert_close(context_relevance(_Attn(4), x, t=1e9)[0], a.mean(0))  # no global token: all rows


def test_patch_entropy_in_bits():
    gray = torch.zeros(28, 28)
    gray[:, 14:] = 100.0  # patch (0, 1) and (1, 1) are constant; make patch (0, 0) two-valued, half and half
    gray[:7, :14] = 200.0
    mean = torch.tensor(OPENAI_CLIP_MEAN)[:, None, None]
    std = torch.tensor(OPENAI_CLIP_STD)[:, None, None]
    pixels = (gray[None].expand(3, -1, -1) / 255 - mean) / std
    e = patch_entropy(pixels, 14)
    torch.testing.assert_close(e, torch.tensor([1.0, 0.0, 0.0, 0.0]), atol=1e-5, rtol=0)


def _visual_slots(ids, dropped_pre, image_id):
    """Per sample the shortened positions of its pre-LLM-kept visual tokens (left re-padding)."""
    out = []
    for b in range(ids.shape[0]):
        rows = torch.nonzero(~dropped_pre[b]).flatten()
        width = int((~dropped_pre).sum(1).max())
        off = width - rows.numel()
        out.append(off + torch.nonzero(ids[b, rows] == image_id).flatten())
    return out


def test_llm_stages_after_the_pre_llm_one_equal_staged_masking(processor):
    model = get_model("llava")
    inputs = batch(processor, [2, 1], padding_side="left")
    seen = {}
    lm = model.model.language_model
    handle = lm.register_forward_pre_hook(lambda m, a, k: seen.update(k), with_kwargs=True)
    vtprune.apply(model, "vflowopt", keep=16, llm_layers=[1, 2], vision_ratio=0.3, llm_ratio=0.5, cell=8)
    with torch.no_grad():
        pruned = model(**inputs).logits
    handle.remove()
    st = vtprune.stats(model)
    vtprune.remove(model)
    assert [s["layer"] for s in st.stages] == [None, 1, 2] and st.visual_after == [32, 16]
    ids, image_id = inputs["input_ids"], model.config.image_token_id
    visual = ids == image_id
    pre = st.stages[0]["kept"]
    dropped_pre = visual.clone()
    for b in range(ids.shape[0]):
        dropped_pre[b, torch.nonzero(visual[b]).flatten()[pre[b]]] = False
    slots = _visual_slots(ids, dropped_pre, image_id)
    embeds, mask = seen["inputs_embeds"], seen["attention_mask"]
    stages = []
    for s in st.stages[1:]:
        d = torch.zeros(mask.shape, dtype=torch.bool)
        for b in range(ids.shape[0]):
            keep = torch.isin(pre[b], s["kept"][b])
            d[b, slots[b][~keep]] = True
        stages.append((s["layer"], d))

    class _LM(torch.nn.Module):  # the unpatched language model + head on the shortened prompt
        def __init__(self):
            super().__init__()
            self.model = type("M", (), {"language_model": lm})()

        def forward(self, **kw):
            out = lm(**kw)
            return type("O", (), {"logits": model.lm_head(out.last_hidden_state)})()

    ref = staged_masked_logits(_LM(), {"inputs_embeds": embeds, "attention_mask": mask}, stages)
    check = mask.bool() & ~stages[-1][1]
    torch.testing.assert_close(pruned[check], ref[check], atol=3e-5, rtol=1e-4)


def _recycling_run(processor, **options):
    """VFlowOpt before the LLM only, on one LLaVA image: ``(inputs, projected features [576, D], the LLM's
    input kwargs, the scorer, stats)``."""
    model = get_model("llava")
    inputs = batch(processor, [1])
    with torch.no_grad():
        feats = model.model.get_image_features(pixel_values=inputs["pixel_values"], return_dict=True).pooler_output[0]
    seen = {}
    h = model.model.language_model.register_forward_pre_hook(lambda m, a, k: seen.update(k), with_kwargs=True)
    vtprune.apply(model, "vflowopt", llm_layers=[], **options)
    try:
        with torch.no_grad():
            model(**inputs)
        scorer = model._vtprune_state.scorer
        return inputs, feats, seen, scorer, vtprune.stats(model)
    finally:
        h.remove()
        vtprune.remove(model)


def test_recycled_slots_hold_importance_weighted_cell_means(processor):
    inputs, feats, seen, scorer, st = _recycling_run(processor, keep=40, vision_ratio=0.5, cell=12)
    imp = scorer.last_importance[0]
    kept = st.kept[0]
    assert st.visual_after == [kept.numel()] and kept.numel() <= 40 and st.contextual == [4]  # 2 x 2 cells of 12
    grid = torch.arange(576)
    cell = (grid // 24 // 12) * 2 + (grid % 24 // 12)
    order = torch.sort(imp, descending=True, stable=True).indices
    chosen, removed = order[:40 - 4], order[40 - 4:]
    ids = inputs["input_ids"][0]
    start = int(torch.nonzero(ids == get_model("llava").config.image_token_id)[0])
    short = seen["inputs_embeds"][0]
    for c in range(4):
        members = removed[cell[removed] == c]
        w = imp[members] / imp[members].sum()
        slot = members[int(torch.argmax(w))]
        assert int(slot) in kept.tolist()
        rank = int((kept < slot).sum())  # the slot's row among the kept visual rows of the shortened prompt
        expected = (w[:, None] * feats[members].float()).sum(0)
        torch.testing.assert_close(short[start + rank].float(), expected, atol=1e-5, rtol=1e-4)
    assert set(chosen.tolist()) <= set(kept.tolist())


def test_tune_searches_the_release_space(llava):
    space, start = search_space(llava, "vflowopt", {"llm_layers": [1, 2]})
    assert set(space) == {"vflowopt.t", "vflowopt.cell", "vflowopt.vision_ratio", "vflowopt.llm_ratio",
                          "vflowopt.alpha"}
    assert start["vflowopt.t"] == pytest.approx(34.76)


def test_refusals(llava):
    with pytest.raises(ConfigError, match="need at least 20 decoder layers"):
        vtprune.apply(llava, "vflowopt", keep=8, llm_layers=[9, 18])
    with pytest.raises(ConfigError, match="too early for Qwen3-VL"):  # its LLM stages come after deepstack
        vtprune.apply(get_model("qwen3_vl"), "vflowopt", keep=8, llm_layers=[1])
    with pytest.raises(ConfigError, match="pixel_mean and pixel_std together"):
        vtprune.apply(llava, "vflowopt", keep=8, llm_layers=[], pixel_mean=[0.5, 0.5, 0.5])


def test_small_budgets_recycle_the_cells_that_lose_the_most_importance(processor):
    """``keep <= cells``: the top token plus ``keep - 1`` recycled slots, given to the cells whose removed
    tokens carry the most importance; the image keeps exactly ``keep`` tokens."""
    inputs, feats, seen, scorer, st = _recycling_run(processor, keep=3, cell=12)  # 2 x 2 cells of 12 x 12
    imp, recycled = scorer.last_importance[0], scorer.last_recycled[0].cpu()
    grid = torch.arange(576)
    cell = (grid // 24 // 12) * 2 + (grid % 24 // 12)
    order = torch.sort(imp, descending=True, stable=True).indices
    top, removed = order[:1], order[1:]
    mass = torch.stack([imp[removed[cell[removed] == c]].clamp(min=0).sum() for c in range(4)])
    cells = sorted(torch.sort(mass, descending=True, stable=True).indices[:2].tolist())
    slots = [removed[cell[removed] == c][int(torch.argmax(imp[removed[cell[removed] == c]]))] for c in cells]
    assert st.visual_after == [3] and st.contextual == [2] and st.per_image == [[3]]
    assert recycled.tolist() == sorted(int(s) for s in slots)
    assert st.kept[0].tolist() == sorted([int(top[0]), *recycled.tolist()])
    ids = inputs["input_ids"][0]
    start = int(torch.nonzero(ids == get_model("llava").config.image_token_id)[0])
    for c, slot in zip(cells, slots):
        members = removed[cell[removed] == c]
        w = imp[members].clamp(min=0) / imp[members].clamp(min=0).sum()
        rank = int((st.kept[0] < slot).sum())
        expected = (w[:, None] * feats[members].float()).sum(0)
        torch.testing.assert_close(seen["inputs_embeds"][0][start + rank].float(), expected, atol=1e-5, rtol=1e-4)


# ---- Qwen-VL ------------------------------------------------------------------------------------------
def _eager_maps(kind, module):
    """Patch the Qwen vision eager attention to record ``module``'s probabilities, one ``[H, n, n]`` per
    segment; returns (records, restore)."""
    mod = importlib.import_module(f"transformers.models.{kind}.modeling_{kind}")
    original = mod.eager_attention_forward
    maps = []

    def spy(self, query, key, value, attention_mask, **kwargs):
        out, weights = original(self, query, key, value, attention_mask, **kwargs)
        if self is module:
            maps.append(weights[0].float())
        return out, weights

    mod.eager_attention_forward = spy
    return maps, lambda: setattr(mod, "eager_attention_forward", original)


@pytest.mark.parametrize("kind", ["qwen2_vl", "qwen2_5_vl"])
def test_qwen_global_tokens_are_those_receiving_more_than_t_times_the_mean(kind):
    """Hand computation from the eager attention map of the default block (the last full-attention one):
    per image, G = {patches whose received attention exceeds t x its mean}, c = mean of G's rows, then
    the mean over each 2x2 merge group (Qwen2.5-VL: window order mapped back to raster)."""
    model = tiny_qwen(kind, attn_implementation="eager")  # its own copy: sharpened below
    inputs = qwen_batch(kind, "left_padded_2")
    block = model.model.visual.blocks[-1].attn
    with torch.no_grad():  # random tiny weights attend almost uniformly: sharpen q and k so G is a real subset
        block.qkv.weight[: 2 * block.qkv.in_features] *= 8
    maps, restore = _eager_maps(kind, block)
    t = 1.2
    vtprune.apply(model, "vflowopt", keep=1.0, llm_layers=[], t=t)
    try:
        with torch.no_grad():
            model(**inputs)
        imp = model._vtprune_state.scorer.last_importance
    finally:
        restore()
        vtprune.remove(model)
    assert len(maps) == 2  # one segment per image
    vc = model.config.vision_config
    for b, (a, grid) in enumerate(zip(maps, inputs["image_grid_thw"])):
        a = a.mean(0)  # [n, n] head mean
        received = a.mean(0)
        glob = received > t * received.mean()
        assert 0 < int(glob.sum()) < a.shape[0]  # a real subset: differs from the received attention
        c = a[glob].mean(0).view(-1, 4).mean(1)  # per merged token (in the block's order)
        if kind == "qwen2_5_vl":
            order = window_order(grid[None], vc.spatial_merge_size, vc.window_size, vc.patch_size)
            c = torch.empty_like(c).index_put_((order,), c)
        torch.testing.assert_close(imp[b], c, atol=1e-7, rtol=1e-5)
        plain = received.view(-1, 4).mean(1)  # what cls scores: all queries, not the global ones
        assert float((c - (plain if kind == "qwen2_vl" else torch.empty_like(plain).index_put_((order,), plain)))
                     .abs().max() / c.abs().max()) > 0.05


def test_merged_token_entropy_on_constructed_patches():
    """Qwen rows [patches, C * T * p * p], 4 rows per merged token: a flat token has entropy 0, a token
    half one gray level and half another 1 bit, a token with 4 equally frequent levels 2 bits."""
    p, temporal = 14, 2
    levels = torch.zeros(3, 4, p * p)  # [tokens, 2x2 patches, pixels] gray levels
    levels[0] = 90.0
    levels[1, :2], levels[1, 2:] = 30.0, 200.0
    for i in range(4):
        levels[2, i] = 50.0 * i
    mean = torch.tensor(OPENAI_CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(OPENAI_CLIP_STD).view(1, 3, 1, 1)
    # +0.5: the de-normalisation truncates to uint8, so sit mid-level; [C, T, p * p] per row, as the processor
    rgb = ((levels.reshape(12, 1, 1, p * p) + 0.5) / 255).expand(12, 3, temporal, p * p)
    e = merged_token_entropy(((rgb - mean) / std).reshape(12, -1), merge=2)
    torch.testing.assert_close(e, torch.tensor([0.0, 1.0, 2.0]), atol=1e-5, rtol=0)


def test_qwen_entropy_term_from_a_constructed_image():
    """A 56 x 56 image is 2 x 2 merged tokens on Qwen2-VL: token 0 flat (0 bits), token 1 half black half
    white (1 bit). alpha adds alpha * softmax(E) over the image's tokens, so the added terms of tokens 1
    and 0 differ by a factor e^(1 - 0)."""
    px = np.random.default_rng(0).integers(0, 256, (56, 56, 3)).astype("uint8")
    px[:28, :28] = 128
    px[:28, 28:42], px[:28, 42:56] = 0, 255
    inputs = qwen_prompts("qwen2_vl", [([("i", Image.fromarray(px))], "What is it?")])
    model = get_model("qwen2_vl")
    out = {}
    for alpha in (0.0, 0.5):
        vtprune.apply(model, "vflowopt", keep=1.0, llm_layers=[], alpha=alpha)
        with torch.no_grad():
            model(**inputs)
        out[alpha] = model._vtprune_state.scorer.last_importance[0]
        vtprune.remove(model)
    added = (out[0.5] - out[0.0]) / 0.5  # softmax(E) over the 4 tokens
    assert added.shape == (4,) and float(added.sum()) == pytest.approx(1.0, abs=1e-5)
    assert float(added[1] / added[0]) == pytest.approx(math.e, rel=1e-4)
    assert float(added[2]) > float(added[1])  # random pixels: far more than 1 bit


def test_qwen_video_tokens_are_ranked_by_their_frames_context():
    """A video is ranked per frame by the context relevance alone: in a prefill holding an image and then
    a video, the video's importances are those of a prefill holding the video alone (the global tokens
    are found per image or frame), and the image's are those of the image alone."""
    model = get_model("qwen2_vl")
    vtprune.apply(model, "vflowopt", keep=1.0, llm_layers=[])
    try:
        imp = {}
        for case in ("mixed", "video", "single"):
            with torch.no_grad():
                model(**qwen_batch("qwen2_vl", case))
            imp[case] = model._vtprune_state.scorer.last_importance[0]
    finally:
        vtprune.remove(model)
    n_image = imp["single"].numel()
    assert imp["mixed"].numel() == n_image + imp["video"].numel()
    torch.testing.assert_close(imp["mixed"][:n_image], imp["single"], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(imp["mixed"][n_image:], imp["video"], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("depth, layers", [(28, [8, 17]), (32, [9, 19]), (4, [1, 2])])
def test_default_llm_layers_are_the_releases_on_its_28_layer_llm(depth, layers):
    """The release (LLaVA-OneVision-7B, a 28-layer Qwen2) drops before layers 9 and 18 (``illava_llm_k``
    9-18), i.e. after 0-based 8 and 17; other depths get the same fractions."""
    from types import SimpleNamespace

    from vtprune.scorers.vflowopt import VFlowOptScorer

    model = SimpleNamespace(config=SimpleNamespace(vision_config=SimpleNamespace(patch_size=14), model_type="llava"))
    adapter = SimpleNamespace(vision_family="clip", decoder_layers=lambda: [None] * depth, min_layer=lambda: 0)
    scorer = VFlowOptScorer()
    scorer.bind(model, adapter)
    assert scorer.llm_layers == layers
    explicit = VFlowOptScorer(llm_layers=[9, 18])
    explicit.bind(model, adapter)
    assert explicit.llm_layers == [9, 18]  # explicit layers are used as given
