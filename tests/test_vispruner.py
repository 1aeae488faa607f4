"""VisPruner: important tokens by CLS attention, diverse tokens by iterative duplicate removal.

Constructed cases with a known answer (the budget split, an exact duplicate dropped and a distinct token
kept, the release's round structure), then end to end on tiny LLaVA: the kept set equals a selection
built by hand from the unpatched vision tower (head-mean CLS attention and features of the feature
layer), and on every tiny model the counts equal ``keep`` and the features used are the documented ones.
"""

from __future__ import annotations

import pytest
import torch
from conftest import batch, feature_layer_by_hand, get_model, next_tiles, qwen_batch, run_pruned

import vtprune
from vtprune.adapters import adapter_for
from vtprune.config import ConfigError
from vtprune.scorers import HIDDEN_STATES, VISION_CLS_ATTENTION, VISION_FEATURES, build_scorer
from vtprune.scorers.vispruner import remove_duplicates, split_budget, vispruner_order

MODELS = ["llava", "next", "qwen2_vl", "qwen2_5_vl", "qwen3_vl"]


def test_budget_split_truncates_like_the_release():
    assert split_budget(64) == (32, 32)
    assert split_budget(13) == (6, 7)  # int(6.5) = 6
    assert split_budget(1) == (0, 1)
    assert split_budget(10, 0.75) == (7, 3) and split_budget(10, 1.0) == (10, 0)


def test_duplicate_removal_drops_an_exact_duplicate_and_keeps_a_distinct_token():
    e = torch.eye(4)
    unit = torch.stack([e[0], e[1], e[2], e[2]])  # token 2 duplicates token 3; token 0 is distinct
    out = remove_duplicates(unit, torch.tensor([0, 1, 2, 3]), target=3)  # a = [0, 2], b = [1, 3]: r = 1
    assert out.tolist() == [0, 1, 3]
    # the duplicate leaves wherever it sits in the order: as an odd token its even twin goes
    out = remove_duplicates(unit, torch.tensor([3, 0, 1, 2]), target=3)  # a = [3, 1], b = [0, 2]
    assert 0 in out.tolist() and sorted(out.tolist()) == [0, 1, 2]


def _release_loop(unit: torch.Tensor, residual: list[int], target: int) -> list[int]:
    """The release's rounds, written with Python lists: drop min(8, R - target) even tokens of highest
    max-cosine to the odd ones; the survivors in descending score order, then the odd tokens."""
    while True:
        r = min(8, len(residual) - target)
        if r <= 0:
            return residual
        a, b = residual[0::2], residual[1::2]
        # the release's similarity product (the same matrix product as the implementation: later rounds
        # depend on the order of near-ties, so a differently rounded cosine would diverge)
        closest = (unit[a] @ unit[b].T).max(dim=1).values.tolist()
        score = dict(zip(a, closest))
        a = sorted(a, key=lambda i: -score[i])[r:]
        residual = a + b


def test_selection_equals_the_release_rounds_on_random_features():
    torch.manual_seed(0)
    att, feats = torch.rand(120), torch.randn(120, 16)
    unit = feats / feats.norm(dim=-1, keepdim=True)
    for k in (1, 13, 40, 119, 120):
        order = vispruner_order(att, feats, k)
        ranked = torch.argsort(att, descending=True).tolist()
        n_imp, n_div = split_budget(k)
        assert order.tolist() == ranked[:n_imp] + _release_loop(unit, ranked[n_imp:], n_div)
        assert len(set(order.tolist())) == k
    # important_ratio=1: the top-k by attention
    assert vispruner_order(att, feats, 10, 1.0).tolist() == torch.argsort(att, descending=True)[:10].tolist()


def test_options_are_validated():
    with pytest.raises(ConfigError, match="important_ratio"):
        build_scorer("vispruner", {"important_ratio": 1.5})
    with pytest.raises(ConfigError, match="budget_per"):
        build_scorer("vispruner", {"budget_per": "crop"})
    with pytest.raises(ConfigError, match="vision_layer"):
        build_scorer("vispruner", {"vision_layer": [-2]})
    with pytest.raises(ConfigError, match="adaptive|auto"):
        vtprune.apply(get_model("llava"), method="vispruner", keep="auto:0.9")
    vtprune.remove(get_model("llava"))


@pytest.mark.parametrize("kind,features", [("llava", VISION_FEATURES), ("next", VISION_FEATURES),
                                           ("qwen2_vl", HIDDEN_STATES), ("qwen3_vl", HIDDEN_STATES)])
def test_features_follow_the_tower(kind, features):
    model = get_model(kind)
    scorer = build_scorer("vispruner", {})
    scorer.bind(model, adapter_for(model))
    assert scorer.needs_signal(VISION_CLS_ATTENTION) and scorer.needs_signal(features)
    assert not scorer.needs_signal(({VISION_FEATURES, HIDDEN_STATES} - {features}).pop())


def _llava_by_hand(model, inputs, k):
    """Per image: VisPruner's kept raster indices from the unpatched tower's feature layer."""
    cls, _, hidden = feature_layer_by_hand(model, inputs["pixel_values"])
    cls = cls.mean(dim=1)[:, 1:]  # head mean, patches
    x = hidden[:, 1:]
    unit = x / x.norm(dim=-1, keepdim=True)
    kept = []
    n_imp, n_div = split_budget(k)
    for i in range(cls.shape[0]):
        ranked = torch.argsort(cls[i], descending=True).tolist()
        kept.append(sorted(ranked[:n_imp] + _release_loop(unit[i], ranked[n_imp:], n_div)))
    return kept


def test_llava_selection_equals_hand_computation(processor):
    model = get_model("llava")
    inputs = batch(processor, [1, 1])
    keep = 40
    vtprune.apply(model, method="vispruner", keep=keep)
    try:
        with torch.no_grad():
            model(**inputs)
        st = vtprune.stats(model)
    finally:
        vtprune.remove(model)
    assert [k.tolist() for k in st.kept] == _llava_by_hand(model, inputs, keep)


@pytest.mark.parametrize("kind", MODELS)
def test_counts_equal_keep_on_every_model(kind, processor, next_processor):
    model = get_model(kind)
    if kind == "llava":
        inputs = batch(processor, [1, 1])
    elif kind == "next":
        inputs = batch(next_processor, [1], sizes=((300, 620),))
    else:
        inputs = qwen_batch(kind, "left_padded_2")
    # NeXT: the per-image rule (its default selects per tile, see below)
    st, lay, _ = run_pruned(model, inputs, "vispruner", keep=12, **({"budget_per": "image"} if kind == "next" else {}))
    for b, kept in enumerate(st.kept):
        items = len(lay.image_slices(b))
        assert int(lay.prunable[b][kept].sum()) == 12 * items  # exactly keep per image
        assert bool(torch.isin(torch.nonzero(~lay.prunable[b]).flatten(), kept).all())  # NeXT newlines stay


@pytest.mark.parametrize("keep", [12, 40])
def test_next_selects_per_tile_like_the_release(next_processor, keep):
    """The default on LLaVA-NeXT: VisPruner on every tile's whole grid with ``keep`` each (the release's
    ``encode_images``), the picks mapped onto HF's unpadded sequence by source row, newlines dropped."""
    model = get_model("next")
    inputs = batch(next_processor, [1], sizes=((300, 620),))
    st, lay, _ = run_pruned(model, inputs, "vispruner", keep=keep)
    picks = _llava_by_hand(model, {"pixel_values": next_tiles(model, inputs)}, keep)  # per tile, patch rows
    stride = model.config.vision_config.image_size // model.config.vision_config.patch_size
    stride = stride * stride + 1  # a tile's rows, CLS first
    src = lay.source[0].tolist()
    expected = [i for i, s in enumerate(src) if s >= 0 and (s % stride) - 1 in picks[s // stride]]
    kept = st.kept[0].tolist()
    assert kept == expected
    assert not (~lay.prunable[0][st.kept[0]]).any()  # the release feeds no newlines
    base = sum(1 for i in kept if src[i] // stride == 0)
    assert base == keep  # the base tile is a whole 24 x 24 grid in the sequence: exactly keep of it
    assert len(kept) <= len(picks) * keep
    assert st.per_image[0] == [len(kept)]


def test_next_per_tile_refuses_wrappers_and_ensembles():
    model = get_model("next")
    for method, kw in (("debias+vispruner", {}), ("ensemble", {"members": ["vispruner", "random"]})):
        with pytest.raises(ConfigError, match="budget_per='image'"):
            vtprune.apply(model, method=method, keep=12, **kw)
        vtprune.remove(model)
    vtprune.apply(model, method="debias+vispruner", keep=12, **{"vispruner.budget_per": "image"})
    vtprune.remove(model)
    llava = get_model("llava")  # untiled: the per-image path, so wrappers compose
    vtprune.apply(llava, method="debias+vispruner", keep=12)
    vtprune.remove(llava)


def test_batched_order_picks_as_one_call_per_tile():
    g = torch.Generator().manual_seed(1)
    att = torch.rand(3, 120, generator=g)
    feats = torch.randn(3, 120, 16, generator=g)
    for k in (1, 13, 40):
        batched = vispruner_order(att, feats, k)
        assert batched.shape == (3, k)
        for t in range(3):
            assert batched[t].tolist() == vispruner_order(att[t], feats[t], k).tolist()
