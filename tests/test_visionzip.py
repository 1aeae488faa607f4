"""CLS-attention presets: ``vtc-cls`` (layer ensemble) and ``visionzip`` (dominant + contextual tokens).

Constructed cases with a known answer (planted attention, planted keys, budgets, default layer ranges),
then end to end on the tiny models: vtc-cls equals the unpatched language model on the shortened sequence,
visionzip equals a reference built by hand from the unpatched model's vision tower (LLaVA-1.5's default:
the release's sequence, CLS + dominant patches + contextual tokens, in the kept slots; raster order and
Qwen-VL: the merged values at the target slots; then shortened), and both run under generate().
"""

from __future__ import annotations

import importlib
from types import SimpleNamespace

import pytest
import torch
from conftest import batch, feature_layer_by_hand, get_model, next_tiles, one_sample_layout, qwen_batch
from oracle import lm_on_kept

import vtprune
from vtprune.adapters import adapter_for
from vtprune.adapters.qwen import window_order
from vtprune.config import ConfigError
from vtprune.scorers import build_scorer
from vtprune.scorers.cls import ensemble_layers
from vtprune.scorers.visionzip import contextual_assign, contextual_tokens, plan_visionzip, split_budget

MODELS = ["llava", "next", "qwen2_vl", "qwen2_5_vl", "qwen3_vl"]
NO_EOS = 10_000


def inputs_for(kind, case, processor, next_processor):
    if kind.startswith("qwen"):
        return qwen_batch(kind, case)
    n_images = [1] if case == "single" else [1, 1]
    if kind == "next":
        return batch(next_processor, n_images, sizes=((300, 620), (400, 500)))
    return batch(processor, n_images)


# ---- budgets, targets, assignment, merge rule ----------------------------------------------------
def test_split_budget_follows_the_paper_ratio():
    assert split_budget(64) == (54, 10)
    assert split_budget(128) == (108, 20)
    assert split_budget(192) == (162, 30)
    assert split_budget(12) == (10, 2)
    assert split_budget(16) == (13, 3)  # 2.5 rounds up
    assert split_budget(1) == (1, 0)  # at least one dominant token
    assert split_budget(64, 0.0) == (64, 0)


def test_contextual_targets_are_uniform_in_sequence_order():
    keys = torch.randn(10, 4)
    t, m, _ = contextual_assign(keys, 3)
    assert t.tolist() == [0, 3, 6] and m.tolist() == [1, 2, 4, 5, 7, 8, 9]
    assert contextual_assign(torch.randn(5, 4), 3)[0].tolist() == [0, 1, 2]  # step max(1, 5 // 3) = 1
    t, m, s = contextual_assign(torch.randn(2, 4), 3)  # fewer remaining tokens than contextual slots
    assert t.tolist() == [0, 1] and m.numel() == 0 and s.numel() == 0


def test_assignment_follows_highest_cosine_not_dot_product():
    # 4 remaining tokens, 2 contextual: targets are tokens 0 and 2
    keys = torch.tensor([
        [100.0, 0.0],  # target 0: large norm, would win every dot product
        [0.5, 0.866],  # cosine 0.5 with target 0, ~0.99 with target 1 -> slot 1
        [0.6, 0.8],  # target 1
        [3.0, 0.1],  # cosine ~1 with target 0 -> slot 0
    ])
    t, m, s = contextual_assign(keys, 2)
    assert t.tolist() == [0, 2] and m.tolist() == [1, 3] and s.tolist() == [1, 0]
    # and on random keys it is the argmax of the cosine
    keys = torch.randn(40, 8) * torch.rand(40, 1) * 10
    t, m, s = contextual_assign(keys, 5)
    unit = keys / keys.norm(dim=-1, keepdim=True)
    assert torch.equal(s, (unit[m] @ unit[t].T).argmax(dim=1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_contextual_token_is_target_plus_mean_of_members(dtype):
    x = torch.randn(12, 6).to(dtype)
    targets = torch.tensor([1, 5, 9])
    members = torch.tensor([0, 2, 3, 7, 8])
    slot = torch.tensor([0, 0, 2, 0, 2])  # target 5 receives nothing
    ctx, merged = contextual_tokens(x, targets, members, slot)
    xf = x.float()
    want = torch.stack([
        xf[1] + xf[[0, 2, 7]].mean(0),
        xf[5],
        xf[9] + xf[[3, 8]].mean(0),
    ]).to(dtype)
    assert merged.tolist() == [True, False, True] and ctx.dtype == dtype
    torch.testing.assert_close(ctx, want, atol=1e-6, rtol=0)
    assert torch.equal(ctx[1], x[5])  # no member: the target itself, bit-exact


def test_plan_picks_planted_dominant_tokens_and_merges_the_rest():
    lay = one_sample_layout([30, 30], fixed={0: 29})  # image 0 ends with a non-prunable token (a NeXT newline)
    torch.manual_seed(0)
    scores = torch.rand(60) * 0.1
    planted = [[3, 7, 11, 12, 20], [31, 40, 41, 50, 59]]
    scores[planted[0] + planted[1]] = 1.0 + torch.arange(10.0)
    scores[33] = float("-inf")  # excluded: neither dominant, target nor member
    keys = torch.randn(60, 4)
    (plan,) = plan_visionzip([scores], [keys], lay, keep=6)  # 6 = 5 dominant + 1 contextual per image
    rest0 = [i for i in range(29) if i not in planted[0]]
    rest1 = [i for i in range(30, 60) if i not in planted[1] and i != 33]
    assert plan.targets.tolist() == [rest0[0], rest1[0]]  # step R // 1: the first remaining token
    assert plan.kept.tolist() == sorted(planted[0] + planted[1] + [29, rest0[0], rest1[0]])
    assert sorted(plan.members.tolist()) == rest0[1:] + rest1[1:]
    assert plan.slot.tolist() == [0] * (len(rest0) - 1) + [1] * (len(rest1) - 1)


def test_plan_in_release_order_sends_cls_first_then_dominant_then_contextual():
    """VisionZip's release: ``D`` dominant tokens include CLS, so ``D - 1`` patches; the sequence is CLS, the
    dominant patches (raster order), the contextual tokens (target order); CLS takes the image's last
    remaining slot that is no target."""
    lay = one_sample_layout([30, 30])
    torch.manual_seed(0)
    scores = torch.rand(60) * 0.1
    planted = [[3, 7, 11, 12, 20], [31, 40, 41, 50, 59]]
    scores[planted[0] + planted[1]] = 1.0 + torch.arange(10.0)  # image 0: 20 ranks first, 3 last
    keys = torch.randn(60, 4)
    with_cls = [[True, False]]  # image 0 in release order, image 1 raster
    (plan,) = plan_visionzip([scores], [keys], lay, keep=7, with_cls=with_cls)  # 7 = 6 dominant + 1 contextual
    dom0 = [3, 7, 11, 12, 20]  # 6 dominant incl. CLS: the 5 planted patches
    rest0 = [i for i in range(30) if i not in dom0]
    top1 = sorted(torch.topk(scores[30:], 6).indices.add(30).tolist())  # raster: 6 dominant patches
    rest1 = [i for i in range(30, 60) if i not in top1]
    cls_slot = rest0[-1]  # the last remaining token of image 0 that is no target (target: rest0[0])
    assert plan.kept.tolist() == sorted(dom0 + [rest0[0], cls_slot]) + sorted(top1 + [rest1[0]])
    assert plan.sequence.tolist() == [cls_slot, *dom0, rest0[0]] + sorted(top1 + [rest1[0]])
    assert plan.cls_at.tolist() == [0] and plan.per_image == [7, 7]
    assert plan.targets.tolist() == [rest0[0], rest1[0]]
    assert sorted(plan.members.tolist()) == rest0[1:] + rest1[1:]  # the CLS slot's token is merged as well
    # without a contextual token the CLS slot is the last non-dominant token; keep covering the image: raster
    (one,) = plan_visionzip([scores[:30]], [keys[:30]], one_sample_layout([30]), keep=1, with_cls=[[True]])
    assert one.kept.tolist() == [29] and one.cls_at.tolist() == [0] and one.targets.numel() == 0
    (whole,) = plan_visionzip([scores[:30]], [keys[:30]], one_sample_layout([30]), keep=30, with_cls=[[True]])
    assert whole.kept.tolist() == list(range(30)) and whole.cls_at.numel() == 0 and whole.members.numel() == 0


def test_plan_keep_all_merges_nothing():
    lay = one_sample_layout([20])
    (plan,) = plan_visionzip([torch.rand(20)], [torch.randn(20, 4)], lay, keep=1.0)
    assert plan.kept.tolist() == list(range(20)) and plan.members.numel() == 0


def test_options_are_validated():
    with pytest.raises(ConfigError, match="vision_layer must be one int"):
        build_scorer("visionzip", {"vision_layer": [-2, -3]})
    with pytest.raises(ConfigError, match="contextual_ratio"):
        build_scorer("visionzip", {"contextual_ratio": 1.5})
    with pytest.raises(ConfigError, match="n_layers"):
        build_scorer("vtc-cls", {"n_layers": 0})
    with pytest.raises(ConfigError, match="order must be one of"):
        build_scorer("visionzip", {"order": "appended"})


def test_release_order_is_refused_where_the_release_has_no_such_sequence(next_processor):
    with pytest.raises(ConfigError, match="Qwen-VL towers have no CLS token"):
        vtprune.apply(get_model("qwen2_vl"), method="visionzip", keep=12, order="release")
    model = get_model("next")  # tiled images: the release's sequence is per tile; per image it has none
    vtprune.apply(model, method="visionzip", keep=12, order="release", budget_per="image")
    try:
        with pytest.raises(ConfigError, match="order='release' reproduces the release's LLaVA-1.5 sequence"):
            with torch.no_grad():
                model(**batch(next_processor, [1], sizes=((300, 620),)))
        vtprune.apply(model, method="visionzip", keep=12, budget_per="image")  # None: raster per image
        with torch.no_grad():
            model(**batch(next_processor, [1], sizes=((300, 620),)))
        assert model._vtprune_state.scorer.release_order  # resolved for the model; the image decides
        assert vtprune.stats(model).contextual == [2]
        for order in ("release", None):  # per tile (the default): 3 tiles, 2 contextual tokens each
            vtprune.apply(model, method="visionzip", keep=12, **({"order": order} if order else {}))
            with torch.no_grad():
                model(**batch(next_processor, [1], sizes=((300, 620),)))
            assert vtprune.stats(model).contextual == [6] and vtprune.stats(model).visual_after == [36]
        with pytest.raises(ConfigError, match="budget_per"):
            vtprune.apply(model, method="visionzip", keep=12, budget_per="crop")
    finally:
        vtprune.remove(model)


# ---- vtc-cls: default layer ranges and the planted layer ensemble -------------------------------
def _stub(feature: int, depth: int, full: list[int] | None = None):
    model = SimpleNamespace(config=SimpleNamespace(vision_config=SimpleNamespace(num_hidden_layers=depth)))
    adapter = SimpleNamespace(default_vision_layer=lambda: feature, vision_depth=lambda: depth)
    if full is not None:
        adapter.full_attention_blocks = lambda: full
    return model, adapter


def test_vtc_cls_default_ranges_on_real_geometries():
    assert ensemble_layers(*_stub(-2, 24), 7) == list(range(17, 24))  # CLIP layers 16..22
    assert ensemble_layers(*_stub(32, 32, [7, 15, 23, 31]), 7) == [8, 16, 24, 32]  # Qwen2.5-VL-7B
    assert ensemble_layers(*_stub(32, 32, list(range(32))), 7) == list(range(26, 33))  # Qwen2-VL-7B
    assert ensemble_layers(*_stub(-2, 24), 3) == [21, 22, 23]


@pytest.mark.parametrize("kind,want", [("llava", [1, 2]), ("next", [1, 2]), ("qwen2_vl", [1, 2, 3, 4]),
                                       ("qwen2_5_vl", [2, 4]), ("qwen3_vl", [1, 2, 3, 4])])
def test_vtc_cls_default_layers_of_the_tiny_models(kind, want):
    model = get_model(kind)
    try:
        vtprune.apply(model, method="vtc-cls", keep=8)
        assert model._vtprune_state.scorer.vision_layer == want
        adapter = model._vtprune_state.adapter
        hooked = {id(adapter.vision_attention(layer)) for layer in want}
        vision = [m for m in model.modules() if id(m) in hooked]
        assert all(m._forward_pre_hooks for m in vision) and len(vision) == len(want)
        vtprune.apply(model, method="vtc-cls", keep=8, vision_layer=[-1])  # explicit layers override
        assert model._vtprune_state.scorer.vision_layer == [-1]
    finally:
        vtprune.remove(model)


def _planted_rows(model, kind, inputs, layers: dict[int, dict[tuple[int, ...], float]]):
    """A fake `vision_score_row`: hidden_states index -> {tokens: value}, tokens = merged raster indices."""
    adapter = adapter_for(model)
    modules = {id(adapter.vision_attention(h)): plant for h, plant in layers.items()}
    seen = []

    def fake(module, args, kwargs):
        seen.append(id(module))
        plant = modules.get(id(module), {})
        hidden = args[0] if args else kwargs["hidden_states"]
        if kind == "llava":
            row = torch.zeros(hidden.shape[0], hidden.shape[1])
            for tokens, v in plant.items():
                row[:, 1 + torch.tensor(tokens)] = v  # column 0 is CLS
            return row
        grid = inputs["image_grid_thw"]
        n = int(grid.prod()) // 4
        v = torch.zeros(n)
        for tokens, val in plant.items():
            v[list(tokens)] = val
        if kind == "qwen2_5_vl":
            v = v[window_order(grid, 2, 112, 14)]
        return v.repeat_interleave(4)  # per patch; the adapter pools per 2x2 group

    return fake, seen, set(modules)


@pytest.mark.parametrize("kind", ["llava", "qwen2_vl", "qwen2_5_vl"])
def test_vtc_cls_sums_planted_rows_over_its_layers(kind, processor):
    model = get_model(kind)
    inputs = batch(processor, [1]) if kind == "llava" else qwen_batch(kind, "single")
    first, last = {"llava": (1, 2), "qwen2_vl": (1, 4), "qwen2_5_vl": (2, 4)}[kind]
    a, b, c = tuple(range(0, 5)), tuple(range(10, 15)), tuple(range(20, 25))
    # the first layer plants A at 1.0; the feature layer plants B at 0.6 and C at 0.9: the sum ranks A first
    fake, seen, hooked = _planted_rows(model, kind, inputs, {first: {a: 1.0}, last: {b: 0.6, c: 0.9}})
    picks = {}
    try:
        for method, opts in (("vtc-cls", {}), ("cls", {}), ("vtc-cls", {"n_layers": 1})):
            vtprune.apply(model, method=method, keep=5, **opts)
            model._vtprune_state.adapter.vision_score_row = fake
            with torch.no_grad():
                model(**inputs)
            picks[method, len(opts)] = vtprune.stats(model).kept[0].tolist()
    finally:
        vtprune.remove(model)
    assert picks["vtc-cls", 0] == list(a)
    assert picks["cls", 0] == list(c) and picks["vtc-cls", 1] == list(c)  # the feature layer alone
    assert hooked <= set(seen)


# ---- end to end: the unpatched language model on the kept tokens ----------------------------------
def _run(model, inputs, method, keep, layout=False):
    vtprune.apply(model, method=method, keep=keep)
    try:
        with torch.no_grad():
            logits = model(**inputs).logits
            lay = model._vtprune_state.session.layout
            gen = model.generate(**inputs, max_new_tokens=3, do_sample=False, output_logits=True,
                                 return_dict_in_generate=True, eos_token_id=NO_EOS)
        out = (logits, gen, vtprune.stats(model))
        return (*out, lay) if layout else out
    finally:
        vtprune.remove(model)


@pytest.mark.parametrize("kind", MODELS)
def test_vtc_cls_equals_lm_on_shortened_sequence(kind, processor, next_processor):
    model = get_model(kind)
    inputs = inputs_for(kind, "left_padded_2", processor, next_processor)
    pruned, gen, st = _run(model, inputs, "vtc-cls", 10)
    ref, valid = lm_on_kept(model, inputs, st)
    assert st.stage == "pre-llm" and st.contextual is None
    assert pruned.shape[1] == ref.shape[1] < inputs["input_ids"].shape[1]
    torch.testing.assert_close(pruned[valid], ref[valid], atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(gen.logits[0], pruned[:, -1], atol=2e-5, rtol=1e-4)


# ---- visionzip: a reference built by hand from the unpatched vision tower ---------------------------
def _plan_by_hand(dom: torch.Tensor, keys: torch.Tensor, k: int, with_cls: bool = False):
    """Plain-loop VisionZip on one image: dominant top-D (D - 1 patches with CLS), targets every s-th
    remaining, cosine argmax; with CLS also the CLS slot (the last remaining token that is no target)."""
    d, c = split_budget(k)
    dominant = sorted(torch.topk(dom, d - int(with_cls)).indices.tolist())
    rest = [i for i in range(dom.numel()) if i not in set(dominant)]
    step = max(1, len(rest) // c)
    targets = rest[::step][:c]
    groups = {t: [] for t in targets}
    for i in rest:
        if i in groups:
            continue
        cos = [float(torch.nn.functional.cosine_similarity(keys[i], keys[t], dim=0)) for t in targets]
        groups[targets[max(range(c), key=lambda j: (cos[j], -j))]].append(i)
    cls_slot = [i for i in rest if i not in groups][-1:] if with_cls else []
    return sorted(dominant + targets + cls_slot), dominant, groups, cls_slot


def _merge_by_hand(x: torch.Tensor, groups) -> torch.Tensor:
    x = x.clone()
    for t, members in groups.items():
        if members:
            x[t] = x[t] + x[members].mean(0)
    return x


def _llava_by_hand(model, inputs, k, with_cls: bool):
    """Per image: kept raster indices and the projected features of its visual tokens as the LLM gets them
    before shortening: merged values at the targets (raster order), or in release order the kept slots
    refilled with CLS, the dominant patches and the contextual tokens."""
    project = model.model.multi_modal_projector
    probs, kk, hidden = feature_layer_by_hand(model, inputs["pixel_values"])
    t = hidden.shape[0]
    with torch.no_grad():
        cls = probs.sum(dim=1)[:, 1:]  # head sum
        keys = kk.mean(dim=1)[:, 1:]
        x = hidden[:, 1:]
        kept, rows = [], []
        for i in range(t):
            keep_i, dominant, groups, cls_slot = _plan_by_hand(cls[i], keys[i], k, with_cls)
            kept.append(keep_i)
            merged = project(_merge_by_hand(x[i], groups))
            if with_cls:  # the release's sequence in the kept slots
                seq = torch.cat([project(hidden[i, :1]), merged[dominant], merged[list(groups)]])
                merged[keep_i] = seq
            rows.append(merged)
    return kept, rows


def _qwen2_by_hand(model, inputs, k):
    """Qwen2-VL per image: received attention and group-mean keys of the last block, merged merger outputs."""
    core = model.model
    attn = core.visual.blocks[-1].attn
    cap = {}
    handle = attn.register_forward_pre_hook(lambda m, a, kw: cap.update(h=a[0], kw=kw), with_kwargs=True)
    with torch.no_grad():
        feats = core.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"]).pooler_output
    handle.remove()
    mod = importlib.import_module(type(model).__module__)
    h, kw = cap["h"], cap["kw"]
    s = h.shape[0]
    kept, rows = [], []
    with torch.no_grad():
        q, kk, _ = attn.qkv(h).reshape(s, 3, attn.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
        raw_keys = kk.mean(dim=1)  # pre-RoPE, head mean
        q, kk = mod.apply_rotary_pos_emb_vision(q, kk, *kw["position_embeddings"])
        bounds = kw["cu_seqlens"].tolist()
        for i, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
            p = torch.softmax(torch.einsum("qhd,khd->hqk", q[a:b].float(), kk[a:b].float()) * attn.scaling, -1)
            received = p.mean(dim=(0, 1)).view(-1, 4).mean(1)
            keys = raw_keys[a:b].view(-1, 4, raw_keys.shape[-1]).mean(1)
            keep_i, _, groups, _ = _plan_by_hand(received, keys, k)
            kept.append(keep_i)
            rows.append(_merge_by_hand(feats[i], groups))
    return kept, rows


@pytest.mark.parametrize("kind,order", [("llava", None), ("llava", "raster"), ("qwen2_vl", None)])
@pytest.mark.parametrize("case", ["single", "left_padded_2"])
def test_visionzip_equals_hand_built_reference(kind, order, case, processor, next_processor):
    """LLaVA-1.5's default is the release's sequence (CLS + 12 dominant patches + 3 contextual at 16);
    ``order="raster"`` and Qwen-VL: 13 dominant patches, contextual tokens at their targets' slots."""
    model = get_model(kind)
    inputs = inputs_for(kind, case, processor, next_processor)
    keep = 16  # 13 dominant + 3 contextual per image (16 * 10 / 64 = 2.5, rounded up)
    vtprune.apply(model, method="visionzip", keep=keep, **({"order": order} if order else {}))
    try:
        with torch.no_grad():
            pruned = model(**inputs).logits
            gen = model.generate(**inputs, max_new_tokens=3, do_sample=False, output_logits=True,
                                 return_dict_in_generate=True, eos_token_id=NO_EOS)
        st = vtprune.stats(model)
    finally:
        vtprune.remove(model)
    release = kind == "llava" and order is None
    kept, rows = _llava_by_hand(model, inputs, keep, release) if kind == "llava" else _qwen2_by_hand(model, inputs, keep)
    assert [k.tolist() for k in st.kept] == kept  # one image per sample
    assert st.visual_after == [keep] * len(kept) and st.contextual == [3] * len(kept)
    ref, valid = lm_on_kept(model, inputs, st, visual_rows=rows)
    plain, _ = lm_on_kept(model, inputs, st)  # the same tokens without merging (nor reordering)
    torch.testing.assert_close(pruned[valid], ref[valid], atol=2e-5, rtol=1e-4)
    assert not torch.allclose(pruned[valid], plain[valid], atol=1e-3)  # the merge changed the output
    torch.testing.assert_close(gen.logits[0], pruned[:, -1], atol=2e-5, rtol=1e-4)
    if kind == "llava":  # the two orders differ: the release's sequence is not a raster-order reading
        other, other_rows = _llava_by_hand(model, inputs, keep, not release)
        assert other != kept


@pytest.mark.parametrize("kind", MODELS)
def test_visionzip_generate_on_every_model(kind, processor, next_processor):
    model = get_model(kind)
    cases = ("single", "left_padded_2") + (("mixed",) if kind.startswith("qwen") else ())  # mixed: image + video
    for case in cases:
        inputs = inputs_for(kind, case, processor, next_processor)
        pruned, gen, st, lay = _run(model, inputs, "visionzip", 12, layout=True)
        n = inputs["input_ids"].shape[1]
        assert gen.sequences.shape == (inputs["input_ids"].shape[0], n + 3)
        items = [len(lay.image_slices(b)) for b in range(lay.batch_size)]
        if kind == "next":  # per tile (the release): 12 of every tile, newlines dropped
            tiles = adapter_for(model).tiles_per_image(inputs["image_sizes"], len(inputs["image_sizes"]))
            items = [sum(tiles[sum(items[:b]):sum(items[:b + 1])]) for b in range(lay.batch_size)]
        for b, kept in enumerate(st.kept):
            fixed = ~lay.prunable[b]
            assert (int(fixed.sum()) > 0) == (kind == "next")
            if kind == "next":
                assert not bool(torch.isin(torch.nonzero(fixed).flatten(), kept).any())  # the release: no newline
                assert len(kept) == 12 * items[b]  # per tile: CLS + 9 dominant + 2 contextual
                continue
            assert bool(torch.isin(torch.nonzero(fixed).flatten(), kept).all())
            assert int(lay.prunable[b][kept].sum()) == 12 * items[b]  # per item: 10 dominant + 2 contextual
        assert st.contextual == [2 * i for i in items]
        # generate() encodes the images before the prefill: the same merged tokens as a plain forward
        torch.testing.assert_close(gen.logits[0], pruned[:, -1], atol=2e-5, rtol=1e-4)


def test_visionzip_planted_dominant_tokens_and_uniform_targets(processor):
    """Keep 12 = 10 dominant + 2 contextual. Default (the release's): CLS and 9 patches (the planted tokens
    tie: the first 9), the 10th planted patch is a remaining one; raster: all 10 planted patches."""
    model = get_model("llava")
    inputs = batch(processor, [1])
    planted = tuple(range(100, 110))
    fake, _, _ = _planted_rows(model, "llava", inputs, {2: {planted: 1.0}})
    kept = {}
    for order in (None, "raster"):
        vtprune.apply(model, method="visionzip", keep=12, **({"order": order} if order else {}))
        model._vtprune_state.adapter.vision_score_row = fake
        try:
            with torch.no_grad():
                model(**inputs)
            st = vtprune.stats(model)
        finally:
            vtprune.remove(model)
        assert "2 contextual" in st.summary() and st.visual_after == [12]
        kept[order] = st.kept[0].tolist()
    rest = [i for i in range(576) if i not in planted[:9]]  # 567 remaining: step 283
    assert kept[None] == sorted([*planted[:9], rest[0], rest[283], 575])  # 575: the CLS slot
    rest = [i for i in range(576) if i not in planted]
    assert kept["raster"] == sorted([*planted, rest[0], rest[283]])  # step 566 // 2 = 283


def test_visionzip_keep_all_is_identity_and_beams_run(processor):
    """Beam search expands the encoded images; the recorded keys expand with them, so VisionZip merges
    each beam's copy as it merges the prompt (the beams' prefill keeps the prompt's tokens)."""
    model = get_model("llava")
    inputs = batch(processor, [1])
    with torch.no_grad():
        ref = model(**inputs).logits
        vtprune.apply(model, method="visionzip", keep=1.0)
        try:
            assert torch.equal(model(**inputs).logits, ref)
            vtprune.apply(model, method="visionzip", keep=12)
            model(**inputs)
            kept = vtprune.stats(model).kept[0]
            out = model.generate(**inputs, max_new_tokens=2, num_beams=2, do_sample=False)
            st = vtprune.stats(model)
            assert out.shape[0] == 1 and len(st.kept) == 2
            assert all(torch.equal(k, kept) for k in st.kept)
        finally:
            vtprune.remove(model)


def test_visionzip_in_an_ensemble_is_refused(llava):
    with pytest.raises(ConfigError, match="cannot be an ensemble member"):
        vtprune.apply(llava, method="ensemble", keep=8, members=["visionzip", "cls"])
    assert vtprune.config_of(llava) is None


def test_wrapped_visionzip_uses_the_wrapped_scores(processor):
    """A wrapper changes the dominance scores; the merge still runs (stats report contextual tokens)."""
    from vtprune.scorers.compose import Wrapper

    class Reverse(Wrapper):
        name = "reverse-test"
        description = "test"

        def transform(self, scores, signals):
            return [-s for s in scores]

    model = get_model("llava")
    inputs = batch(processor, [1])
    picks = {}
    try:
        for scorer in (build_scorer("visionzip", {}), Reverse(build_scorer("visionzip", {}))):
            vtprune.apply(model, scorer, keep=12)
            with torch.no_grad():
                model(**inputs)
            picks[type(scorer).__name__] = vtprune.stats(model)
    finally:
        vtprune.remove(model)
    a, b = picks["VisionZipScorer"], picks["Reverse"]
    assert a.contextual == b.contextual == [2]
    assert set(a.kept[0].tolist()) != set(b.kept[0].tolist())


def test_qwen25_group_keys_come_back_in_raster_order():
    """Keys recorded in Qwen2.5-VL's window order are pooled per merge group and mapped back to raster order."""
    from transformers.vision_utils import get_vision_window_index

    from vtprune.runtime.visionzip import token_keys

    model = get_model("qwen2_5_vl")
    inputs = qwen_batch("qwen2_5_vl", "left_padded_2")  # two images of different sizes
    attn = model.model.visual.blocks[-1].attn
    cap = {}
    handle = attn.register_forward_pre_hook(lambda m, a, kw: cap.update(h=a[0]), with_kwargs=True)
    vtprune.apply(model, method="visionzip", keep=12)
    try:
        with torch.no_grad():
            model(**inputs)
        state = model._vtprune_state
        images = SimpleNamespace(record=state.vision_record, video_record=None)
        got = token_keys(state.adapter, images, state.session.layout.source)
    finally:
        handle.remove()
        vtprune.remove(model)
    s = cap["h"].shape[0]
    with torch.no_grad():
        raw = attn.qkv(cap["h"]).reshape(s, 3, attn.num_heads, -1)[:, 1].float().mean(1)
    groups = raw.view(-1, 4, raw.shape[-1]).mean(1)  # window order
    index, _ = get_vision_window_index(inputs["image_grid_thw"], spatial_merge_size=2, window_size=112, patch_size=14)
    raster = torch.empty_like(groups)
    raster[index] = groups
    assert not torch.equal(index, torch.arange(index.numel()))  # the order really differs
    torch.testing.assert_close(torch.cat(got), raster, atol=1e-6, rtol=0)


# ---- no host syncs in VisionZip's planning and merge -------------------------------------------------
_VZ_FILES = ("vtprune/scorers/visionzip.py", "vtprune/runtime/visionzip.py")
_SYNC_OPS = {"nonzero", "_local_scalar_dense", "is_nonzero", "item", "masked_select"}


def _vz_frame(frame) -> str | None:
    """``file:line`` when the innermost frame outside torch is in one of VisionZip's two files."""
    import os

    torch_dir = os.path.dirname(torch.__file__) + os.sep
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(torch_dir):
        frame = frame.f_back
    if frame is None:
        return None
    path = frame.f_code.co_filename.replace(os.sep, "/")
    hit = next((f for f in _VZ_FILES if path.endswith(f)), None)
    return f"{hit}:{frame.f_lineno}" if hit else None


class _VisionZipSyncs:
    """Would-be GPU host syncs issued from VisionZip's files: dispatched sync ops (``nonzero``, ``.item()`` /
    ``int(t)`` / ``bool(t)``, ``unique``, bool-mask indexing) and ``Tensor.tolist`` / ``Tensor.cpu`` calls."""

    def __init__(self):
        self.sites: list[tuple[str, str]] = []

    def __enter__(self):
        import sys

        from torch.utils._python_dispatch import TorchDispatchMode

        sites = self.sites

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                kwargs = kwargs or {}
                name = func.overloadpacket.__name__
                is_sync = name in _SYNC_OPS or name.startswith(("unique", "_unique"))
                if name in ("index", "index_put", "index_put_", "_index_put_impl_") and len(args) > 1:
                    is_sync = any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8)
                                  for i in (args[1] or ()))
                if is_sync:
                    where = _vz_frame(sys._getframe(1))
                    if where:
                        sites.append((f"aten::{name}", where))
                return func(*args, **kwargs)

        self._saved = {m: torch.Tensor.__dict__.get(m) for m in ("tolist", "cpu")}
        for method in self._saved:
            original = getattr(torch.Tensor, method)

            def wrapper(t, *a, _original=original, _method=method, **kw):
                where = _vz_frame(sys._getframe(1))
                if where:
                    sites.append((f"Tensor.{_method}", where))
                return _original(t, *a, **kw)

            setattr(torch.Tensor, method, wrapper)
        self._mode = Mode()
        self._mode.__enter__()
        return self

    def __exit__(self, *exc):
        self._mode.__exit__(*exc)
        for method, previous in self._saved.items():
            if previous is None:
                delattr(torch.Tensor, method)
            else:
                setattr(torch.Tensor, method, previous)


def test_plan_reads_the_host_only_for_excluding_scores():
    lay = one_sample_layout([30, 25, 8], fixed={1: 24})
    torch.manual_seed(1)
    scores, keys = torch.rand(63), torch.randn(63, 4)
    _ = lay.spans  # built once per prefill from the host copies, outside VisionZip
    with _VisionZipSyncs() as syncs, pytest.warns(UserWarning, match="exceeds the prunable"):  # image 2: 8 < 12
        plans = plan_visionzip([scores], [keys], lay, keep=12, excludes=False)
    assert syncs.sites == []
    (plan,) = plans
    assert plan.per_image == lay.kept_per_image(0, plan.kept) == [12, 13, 8]  # newline included; 8 < 12: all
    excluded = scores.clone()
    excluded[[0, 5, 40]] = float("-inf")
    excluded[55:] = float("-inf")  # image 2: no finite score, keeps one token
    with _VisionZipSyncs() as syncs, pytest.warns(UserWarning, match="exceeds the prunable"):
        (ex,) = plan_visionzip([excluded], [keys], lay, keep=12, excludes=True)
    assert len(syncs.sites) == 1 and syncs.sites[0][0] == "Tensor.tolist"  # one read for the whole batch
    assert ex.per_image == lay.kept_per_image(0, ex.kept) == [12, 13, 1]
    assert not set(ex.kept.tolist()) & {0, 5, 40} and ex.kept.tolist()[-1] == 55
    assert not set(ex.members.tolist()) & {0, 5, 40, *range(55, 63)}
    # with finite scores both paths plan the same
    with pytest.warns(UserWarning, match="exceeds the prunable"):
        (same,) = plan_visionzip([scores], [keys], lay, keep=12, excludes=True)
    for a, b in zip((plan.kept, plan.targets, plan.members, plan.slot), (same.kept, same.targets, same.members,
                                                                         same.slot)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("kind", ["llava", "next", "qwen2_5_vl"])
def test_visionzip_prefill_issues_no_host_sync_from_its_files(kind, processor, next_processor):
    """A pruned prefill: VisionZip's scoring glue, plan and merge add no host read; an excluding wrapper
    (debias) adds exactly one (the finite counts of the batch)."""
    model = get_model(kind)
    inputs = inputs_for(kind, "mixed" if kind.startswith("qwen") else "left_padded_2", processor, next_processor)
    for method, want in (("visionzip", 0), ("debias+visionzip", 1)):
        # NeXT: the default selects per tile (no per-token scores for debias to correct): debias per image
        per_image = {"visionzip.budget_per": "image"} if kind == "next" and method != "visionzip" else {}
        vtprune.apply(model, method=method, keep=12, **per_image)
        try:
            assert model._vtprune_state.scorer.excludes == (want == 1)
            with torch.no_grad(), _VisionZipSyncs() as syncs:
                model(**inputs)
            st = vtprune.stats(model)
        finally:
            vtprune.remove(model)
        assert len(syncs.sites) == want, syncs.sites
        assert st.contextual and all(c > 0 for c in st.contextual)


def test_next_default_sends_the_release_sequence_per_tile(next_processor):
    """LLaVA-NeXT's default (the release, per tile): the LLM's visual rows are the base tile's CLS and its
    ``D - 1`` dominant patches (raster order), its contextual tokens, then the crops' dominant patches in the
    padded crop grid's raster order, then each crop's CLS: checked against the unpatched tower by hand."""
    from vtprune.scorers.visionzip import split_budget

    model = get_model("next")
    inputs = batch(next_processor, [1], sizes=((300, 620),))  # 3 tiles: the base and a 1 x 2 crop grid
    keep = 12
    dominant, contextual = split_budget(keep)
    seen = {}
    vtprune.apply(model, method="visionzip", keep=keep)
    handle = model.model.language_model.register_forward_pre_hook(lambda m, a, k: seen.update(k), with_kwargs=True)
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        handle.remove()
        vtprune.remove(model)
    ids = inputs["input_ids"][0]
    start = int(torch.nonzero(ids == model.config.image_token_id).min())
    rows = seen["inputs_embeds"][0, start:start + 3 * keep]
    assert seen["inputs_embeds"].shape[1] == ids.numel() - int((ids == model.config.image_token_id).sum()) + 3 * keep
    probs, _, hidden = feature_layer_by_hand(model, next_tiles(model, inputs))
    cls = probs.mean(dim=1)[:, 1:]  # head mean, patches
    with torch.no_grad():
        projected = model.model.multi_modal_projector(hidden)  # [3, 577, D]
    top = [torch.sort(torch.sort(cls[t], descending=True, stable=True).indices[:dominant - 1]).values for t in range(3)]
    want = torch.cat([projected[0, :1], projected[0, 1 + top[0]]])
    torch.testing.assert_close(rows[:dominant], want, atol=1e-5, rtol=1e-4)
    side = 24
    crops = [(c, p) for c in (1, 2) for p in top[c].tolist()]
    crops.sort(key=lambda cp: (cp[1] // side) * (2 * side) + (cp[0] - 1) * side + cp[1] % side)  # grid raster
    want = torch.stack([projected[c, 1 + p] for c, p in crops] + [projected[1, 0], projected[2, 0]])
    torch.testing.assert_close(rows[keep:keep + len(crops) + 2], want, atol=1e-5, rtol=1e-4)
