"""SparseVLM: raters on a constructed case and on a model, the rater attention against eager attention.
Exactness (staged drop == staged masking) on every tiny model is in tests/test_presets.py."""

from __future__ import annotations

import pytest
import torch
from conftest import batch, get_model
from oracle import staged_masked_logits

import vtprune
from vtprune.config import ConfigError
from vtprune.scorers.sparsevlm import dpc_knn, select_raters


def test_raters_are_the_text_tokens_the_image_attends_to():
    visual = torch.tensor([[4.0, 0.0], [5.0, 0.0]])
    text = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.9, 0.0], [0.0, -1.0]])  # tokens 0 and 2 align with the image
    assert select_raters(visual, text).tolist() == [True, False, True, False]
    assert select_raters(visual, torch.zeros(3, 2)).tolist() == [True, True, True]  # all equal: everyone rates


def test_scores_are_layer_attention_of_the_raters(processor):
    model = get_model("llava", "eager")
    inputs = batch(processor, [1])
    vtprune.apply(model, "sparsevlm", keep=16, layers=[1, 2], ratios=[0.5], recycle=False)
    with torch.no_grad():
        model(**inputs)
    st = vtprune.stats(model)
    scorer = model._vtprune_state.scorer
    raters = scorer.last_raters[0]
    vtprune.remove(model)
    seen = {}
    h = model.model.language_model.layers[0].register_forward_pre_hook(
        lambda m, a, k: seen.update(x=a[0] if a else k["hidden_states"]), with_kwargs=True)
    with torch.no_grad():
        out = model(**inputs, output_attentions=True)
    h.remove()
    ids = inputs["input_ids"][0]
    visual = torch.nonzero(ids == model.config.image_token_id).flatten()
    text = torch.arange(int(visual.max()) + 1, ids.shape[0])
    x = seen["x"][0]
    expected_raters = text[select_raters(x[visual], x[text])]
    assert torch.equal(raters, expected_raters) and 0 < raters.numel() < text.numel()
    # stage 0 at layer 1: its kept tokens are the top half by the raters' mean head-mean attention
    att = out.attentions[1][0][:, raters].float().mean(dim=(0, 1))[visual]
    want = torch.sort(torch.topk(att, 288).indices).values
    assert torch.equal(st.stages[0]["kept"][0], want)


def test_layers_are_checked(llava):
    with pytest.raises(ConfigError, match="need at least 17 decoder layers, this model has 4"):
        vtprune.apply(llava, "sparsevlm", keep=8, layers=[2, 6, 15])


def test_dpc_knn_finds_the_clusters():
    torch.manual_seed(0)
    centres = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    x = torch.cat([c + 0.1 * torch.randn(5, 2) for c in centres])
    heads, assign = dpc_knn(x, 3)
    assert sorted((heads // 5).tolist()) == [0, 1, 2]  # one centre per true cluster
    for g in range(3):
        assert len(set(assign[g * 5:(g + 1) * 5].tolist())) == 1


def test_dpc_knn_density_counts_the_row_itself():
    # SparseVLM's cluster_and_merge: rho_i = exp(-mean of the c smallest squared distances of row i), its own 0
    # among them; so with c = 2 only the nearest neighbour counts. A tight pair (0, 0.1) far from an evenly
    # spaced group (step 0.5): the pair is densest (0.1 < 0.5), the densest row's delta is the largest
    # distance of all, the group's densest row (its last, ties to the later row) has delta 21.4.
    # Counting the two nearest others instead would make the pair sparse (its second neighbour is 20 away).
    x = torch.tensor([[0.0], [0.1], [20.0], [20.5], [21.0], [21.5]])
    centers, assign = dpc_knn(x, 2)
    assert centers.tolist() == [1, 5]
    assert assign.tolist() == [0, 0, 1, 1, 1, 1]


def test_dpc_knn_breaks_density_ties_towards_the_later_row():
    # With c = 2 every mutual nearest pair ties exactly. The pair (10, 10.2) is densest: only its later row
    # may count as densest (delta = the largest distance), its earlier one is 0.2 from a denser row, so the
    # second center is the other pair's later row (9 from the denser pair), not the tight pair's twin.
    x = torch.tensor([[0.0], [1.0], [10.0], [10.2]])
    centers, assign = dpc_knn(x, 2)
    assert centers.tolist() == [3, 1]
    assert assign.tolist() == [1, 1, 0, 0]


def _dropped(ids, kept, image_id):
    visual = ids == image_id
    d = visual.clone()
    for b in range(ids.shape[0]):
        d[b, torch.nonzero(visual[b]).flatten()[kept[b]]] = False
    return d


@pytest.mark.parametrize("case", [[1], [2, 1]])
def test_recycling_equals_masking_with_the_recycled_states_written(processor, case):
    """Recycled tokens take their cluster center's slot: the oracle masks the dropped columns and writes the
    recorded cluster means into those rows of the pruning layer's output."""
    model = get_model("llava")
    inputs = batch(processor, case, padding_side="left")
    vtprune.apply(model, "sparsevlm", keep=24, layers=[0, 1, 2], ratios=[0.5, 0.25])
    with torch.no_grad():
        pruned = model(**inputs).logits
    st = vtprune.stats(model)
    record = model._vtprune_state.scorer.last_recycled
    vtprune.remove(model)
    ids, image_id = inputs["input_ids"], model.config.image_token_id
    assert st.visual_after == [24 * n for n in case] and any(r["rows"] for r in record)
    stages = [(s["layer"], _dropped(ids, s["kept"], image_id)) for s in st.stages]
    writes = {}
    for j, r in enumerate(record):
        prev = st.stages[j - 1]["kept"] if j > 0 else None
        for b, (sub_idx, states) in r["rows"].items():
            visual_idx = sub_idx if prev is None else prev[b][sub_idx]  # into the sample's visual tokens
            pos = torch.nonzero(ids[b] == image_id).flatten()[visual_idx]
            writes.setdefault(st.stages[j]["layer"], []).append((b, pos, states))
            assert set(visual_idx.tolist()) <= set(st.stages[j]["kept"][b].tolist())
    ref = staged_masked_logits(model, inputs, stages, writes)
    check = inputs["attention_mask"].bool() & ~stages[-1][1]
    torch.testing.assert_close(pruned[check], ref[check], atol=3e-5, rtol=1e-4)
