"""PruMerge and PruMerge+: adaptive IQR outliers of the CLS attention, merged with their key neighbours.

Constructed cases with a known answer (the IQR fence, PruMerge+'s sampling stride, the merge weights, the
extra token's slot, the cap), then end to end: on tiny LLaVA the merged embeddings equal a reference built
by hand from the unpatched vision tower (the release's one-head attention of the last layer, numpy
quartiles, loops over the neighbours), and on every tiny model the counts stay within ``keep`` and
generate() sees the same merged tokens as a plain forward.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import batch, get_model, one_sample_layout, qwen_batch
from oracle import lm_on_kept

import vtprune
from vtprune.config import ConfigError
from vtprune.scorers import build_scorer
from vtprune.scorers.prumerge import (
    iqr_outliers,
    merged_tokens,
    plan_prumerge,
    remainder_token,
    selection_scores,
    spatial_samples,
)

MODELS = ["llava", "next", "qwen2_vl", "qwen2_5_vl", "qwen3_vl"]
NO_EOS = 10_000


# ---- constructed cases -------------------------------------------------------------------------------
def test_iqr_fence_is_strict_and_uses_linear_quartiles():
    # sorted: six 0s, four 1s, 2.5, 2.6 -> Q1 = 0 (position 2.75), Q3 = 1 (position 8.25), fence 2.5
    a = torch.tensor([0.0, 1.0, 2.6, 0.0, 0.0, 1.0, 0.0, 2.5, 1.0, 0.0, 1.0, 0.0])
    assert torch.nonzero(iqr_outliers(a)).flatten().tolist() == [2]  # 2.5 sits on the fence: not an outlier
    x = torch.rand(200) ** 4
    q1, q3 = np.percentile(x.numpy(), [25, 75])
    assert torch.equal(iqr_outliers(x), torch.from_numpy(x.numpy() > q3 + 1.5 * (q3 - q1)))


def test_spatial_samples_follow_the_release_stride():
    # c outliers among n tokens: stride floor(floor(n / c) / 3), over 0 .. n - 2
    assert torch.nonzero(spatial_samples(30, torch.tensor(1))).flatten().tolist() == [0, 10, 20]
    assert torch.nonzero(spatial_samples(576, torch.tensor(32))).flatten().tolist() == list(range(0, 575, 6))
    assert spatial_samples(30, torch.tensor(0)).sum() == 3  # no outlier counts as one
    assert spatial_samples(9, torch.tensor(5)).sum() == 8  # stride 0 in the release: every token but the last


def test_selection_ranks_outliers_then_samples_and_keep_all_is_finite():
    a = torch.full((30,), 0.01)
    a[7], a[12] = 0.5, 0.9
    s = selection_scores(a, k=10)
    assert torch.isfinite(s).nonzero().flatten().tolist() == [7, 12] and s[12] > s[7]
    p = selection_scores(a, k=10, plus=True)  # 2 outliers: stride floor(15 / 3) = 5, samples 0, 5, 10, ...
    finite = torch.isfinite(p).nonzero().flatten().tolist()
    assert finite == sorted({7, 12, 0, 5, 10, 15, 20, 25})
    order = torch.sort(p, descending=True, stable=True).indices[:len(finite)].tolist()
    assert order == [12, 7, 0, 5, 10, 15, 20, 25]  # outliers by attention, then samples in sequence order
    assert torch.isfinite(selection_scores(torch.full((30,), 0.1), k=5)).nonzero().flatten().tolist() == [0]
    assert torch.isfinite(selection_scores(a, k=30)).all()  # keep-all


def test_merge_weights_equal_a_hand_computation():
    x = torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 1.0], [2.0, 2.0], [-1.0, 4.0], [0.5, 0.5]])
    keys = torch.tensor([
        [1.0, 0.0],  # token 0
        [0.0, 1.0],  # cos 0 with token 0
        [-1.0, 0.1],  # cos ~ -1
        [10.0, 1.0],  # cos ~0.995: nearest (large norm: cosine, not dot product, decides)
        [1.0, 1.0],  # cos ~0.707
        [1.0, 0.2],  # cos ~0.981: second nearest
    ])
    a = torch.tensor([0.3, 0.1, 0.05, 0.2, 0.25, 0.1])
    out = merged_tokens(x, keys, a, torch.tensor([0, 4]), neighbours=2)
    want0 = x[0] + 0.2 * x[3] + 0.1 * x[5]
    # token 4 ([1, 1]): cos 0.707 with 0, 0.707 with 1, 0.773 with 3, 0.832 with 5 -> neighbours 5 and 3
    want4 = x[4] + 0.1 * x[5] + 0.2 * x[3]
    torch.testing.assert_close(out, torch.stack([want0, want4]), atol=1e-6, rtol=0)
    torch.testing.assert_close(remainder_token(x, a, torch.tensor([0, 4])),
                               0.1 * x[1] + 0.05 * x[2] + 0.2 * x[3] + 0.1 * x[5], atol=1e-6, rtol=0)
    assert torch.equal(merged_tokens(x, keys, a, torch.tensor([2]), neighbours=0), x[[2]])


def test_plan_caps_the_adaptive_count_and_places_the_extra_token():
    lay = one_sample_layout([20, 20], fixed={0: 19})  # image 0 ends with a non-prunable token (a NeXT newline)
    a = torch.full((40,), 0.01)
    a[[2, 5, 8]] = torch.tensor([0.5, 0.7, 0.6])  # image 0: 3 outliers
    a[[21, 39]] = torch.tensor([0.8, 0.9])  # image 1: 2 outliers, the last token among them
    s = torch.zeros(40)
    s[:19] = selection_scores(a[:19], 6)  # image 0's candidates (19 is fixed: it scores 0)
    s[20:] = selection_scores(a[20:], 6)
    scores = [s]
    (plan,) = plan_prumerge(scores, lay, keep=6)
    # image 0: 3 outliers < cap 5, extra at its last non-kept candidate (18; 19 is fixed)
    # image 1: 2 outliers, extra at 38 (39 is kept)
    assert plan.kept.tolist() == [2, 5, 8, 18, 19, 21, 38, 39]
    assert plan.slots.tolist() == [2, 5, 8, 18, 21, 38, 39] and plan.per_image == [5, 3]
    (capped,) = plan_prumerge(scores, lay, keep=3)  # cap 2 (+ extra): the two highest outliers
    assert capped.kept.tolist() == [5, 8, 18, 19, 21, 38, 39]
    (no_extra,) = plan_prumerge(scores, lay, keep=2, extra_token=False)
    assert no_extra.kept.tolist() == [5, 8, 19, 21, 39] and all(not im.extra.numel() for im in no_extra.images)
    (full,) = plan_prumerge([a.clone()], lay, keep=1.0)  # keep-all scores are all finite
    assert full.kept.tolist() == list(range(40)) and not full.images and full.slots.numel() == 0


def test_options_are_validated_and_ensembles_refused(llava):
    with pytest.raises(ConfigError, match="neighbours"):
        build_scorer("prumerge", {"neighbours": -1})
    with pytest.raises(ConfigError, match="extra_token"):
        build_scorer("prumerge+", {"extra_token": 1})
    with pytest.raises(ConfigError, match="cannot be an ensemble member"):
        vtprune.apply(llava, method="ensemble", keep=8, members=["prumerge", "cls"])
    assert build_scorer("prumerge+", {}).plus and not build_scorer("prumerge", {}).plus


# ---- end to end: tiny LLaVA against a hand-built reference ---------------------------------------
def _run(model, inputs, method, keep, **options):
    vtprune.apply(model, method=method, keep=keep, **options)
    try:
        with torch.no_grad():
            logits = model(**inputs).logits
            gen = model.generate(**inputs, max_new_tokens=3, do_sample=False, output_logits=True,
                                 return_dict_in_generate=True, eos_token_id=NO_EOS)
        return logits, gen, vtprune.stats(model)
    finally:
        vtprune.remove(model)


def _prumerge_by_hand(a: torch.Tensor, keys: torch.Tensor, x: torch.Tensor, keep: int, plus: bool):
    """One image, with plain loops: the kept indices and the merged features ``[n, C]``."""
    n = a.numel()
    q1, q3 = np.percentile(a.numpy(), [25, 75])
    outliers = [j for j in range(n) if a[j] > q3 + 1.5 * (q3 - q1)]
    outliers = sorted(outliers, key=lambda j: -float(a[j])) or [int(a.argmax())]
    chosen = list(outliers)
    if plus:
        stride = max(1, (n // len(outliers)) // 3)
        taken = set(outliers)
        chosen += [j for j in range(0, n - 1, stride) if j not in taken]
    main = chosen[:keep - 1]
    taken = set(main)
    rest = [j for j in range(n) if j not in taken]
    extra = rest[-1]
    unit = keys / keys.norm(dim=-1, keepdim=True)
    new = x.clone()
    for i in main:
        others = [j for j in range(n) if j != i]
        cos = unit[others] @ unit[i]
        near = [others[j] for j in torch.topk(cos, 32).indices.tolist()]
        new[i] = x[i] + (a[near, None] * x[near]).sum(0)
    new[extra] = (a[rest, None] * x[rest]).sum(0)
    return sorted(main + [extra]), new


def _llava_by_hand(model, inputs, keep, plus):
    core = model.model
    attn = core.vision_tower.encoder.layers[-1].self_attn  # the release's layers[23]: the last layer
    cap = {}
    handle = attn.register_forward_pre_hook(lambda m, a, kw: cap.update(h=a[0] if a else kw["hidden_states"]),
                                            with_kwargs=True)
    with torch.no_grad():
        out = core.vision_tower(inputs["pixel_values"], output_hidden_states=True)
    handle.remove()
    kept, rows, counts = [], [], []
    with torch.no_grad():
        h = cap["h"]
        q, k = attn.q_proj(h), attn.k_proj(h)  # [T, 577, C], heads not split
        cls = torch.softmax(q[:, 0:1] @ k.transpose(1, 2) * k.shape[-1] ** -0.5, dim=-1)[:, 0, 1:]
        x = out.hidden_states[-2][:, 1:]
        for i in range(h.shape[0]):
            keep_i, merged = _prumerge_by_hand(cls[i], k[i, 1:], x[i], keep, plus)
            kept.append(keep_i)
            rows.append(core.multi_modal_projector(merged))
            counts.append(len(keep_i))
    return kept, rows


@pytest.mark.parametrize("method", ["prumerge", "prumerge+"])
def test_llava_merged_embeddings_equal_hand_computation(method, processor):
    model = get_model("llava")
    inputs = batch(processor, [1, 1])  # two samples, one image each
    keep = 200  # above the adaptive count: the count is the method's own
    pruned, gen, st = _run(model, inputs, method, keep)
    kept, rows = _llava_by_hand(model, inputs, keep, method == "prumerge+")
    assert [k.tolist() for k in st.kept] == kept
    assert all(1 < a < keep for a in st.visual_after) and st.contextual == st.visual_after  # every kept token merged
    ref, valid = lm_on_kept(model, inputs, st, visual_rows=rows)
    plain, _ = lm_on_kept(model, inputs, st)  # the same tokens without merging
    torch.testing.assert_close(pruned[valid], ref[valid], atol=2e-5, rtol=1e-4)
    assert not torch.allclose(pruned[valid], plain[valid], atol=1e-3)  # the merge changed the output
    torch.testing.assert_close(gen.logits[0], pruned[:, -1], atol=2e-5, rtol=1e-4)


def test_llava_keep_caps_the_count_and_plus_keeps_more(processor):
    model = get_model("llava")
    inputs = batch(processor, [1])
    counts = {}
    for method in ("prumerge", "prumerge+"):
        counts[method] = _run(model, inputs, method, 400)[2].visual_after[0]
        capped = _run(model, inputs, method, 5)[2]
        assert capped.visual_after == [5] and capped.contextual == [5]  # 4 highest + the extra token
        kept, _ = _llava_by_hand(model, inputs, 5, method == "prumerge+")
        assert capped.kept[0].tolist() == kept[0]
    assert counts["prumerge"] < counts["prumerge+"] < 400


# ---- every tiny model: counts within keep, generate() sees the same merge --------------------------
def _inputs(kind, processor, next_processor):
    if kind == "llava":
        return batch(processor, [1, 1])
    if kind == "next":
        return batch(next_processor, [1, 1], sizes=((300, 620), (400, 500)))
    return qwen_batch(kind, "left_padded_2")


@pytest.mark.parametrize("kind", MODELS)
@pytest.mark.parametrize("method", ["prumerge", "prumerge+"])
def test_counts_within_keep_on_every_model(kind, method, processor, next_processor):
    model = get_model(kind)
    inputs = _inputs(kind, processor, next_processor)
    keep = 12
    pruned, gen, st = _run(model, inputs, method, keep)
    for b, per_image in enumerate(st.per_image):
        assert all(0 < c for c in per_image)
        assert st.contextual[b] <= keep * len(per_image) and st.contextual[b] > 0
    if kind != "next":  # NeXT's newline tokens are kept on top of the budget
        assert all(c <= keep for per_image in st.per_image for c in per_image)
    else:
        assert st.contextual[0] <= keep
    plain, _ = lm_on_kept(model, inputs, st)
    assert not torch.allclose(pruned[:, -1], plain[:, -1], atol=1e-4)  # the merge reached the LM
    torch.testing.assert_close(gen.logits[0], pruned[:, -1], atol=2e-5, rtol=1e-4)
