"""Selection-type methods (DivPrune, ZOO-Prune) and the greedy selectors behind them, on constructed cases
where the right answer is known. Exactness on every tiny model is in tests/test_presets.py."""

from __future__ import annotations

import pytest
import torch
from conftest import batch, get_model

import vtprune
from vtprune.config import ConfigError
from vtprune.layout import VisualLayout
from vtprune.scorers import DivPrune
from vtprune.scorers.base import Signals
from vtprune.scorers.greedy import (
    dpp_map,
    max_min_diversity,
    order_scores,
    sensitivity_diversity,
)
from vtprune.scorers.select import select_topk
from vtprune.scorers.zoo import ZOOScorer, projector_sensitivity


def clusters(sizes: list[int], dim: int = 8, noise: float = 1e-3, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows around ``len(sizes)`` orthogonal directions; returns ``(x [n, dim], cluster id [n])``."""
    gen = torch.Generator().manual_seed(seed)
    rows, ids = [], []
    for c, k in enumerate(sizes):
        base = torch.zeros(dim)
        base[c] = 1.0
        rows.append(base + noise * torch.randn(k, dim, generator=gen))
        ids += [c] * k
    return torch.cat(rows), torch.tensor(ids)


def _layout(n: int) -> VisualLayout:
    return VisualLayout([torch.arange(n)], [torch.zeros(n, dtype=torch.long)], [torch.ones(n, dtype=torch.bool)],
                        [torch.arange(n)], [torch.zeros(n, 3, dtype=torch.long)], seq_len=n)


def test_max_min_diversity_takes_one_per_cluster_first():
    x, ids = clusters([10, 3, 1, 6])
    order = max_min_diversity(x, 4)
    assert sorted(ids[order].tolist()) == [0, 1, 2, 3]
    assert int(order[0]) == 13  # the lone token of cluster 2: the largest nearest-neighbour distance
    assert max_min_diversity(x, 30).numel() == 20  # never more than there are


def test_pick_order_survives_select_topk():
    x, _ = clusters([5, 5, 5])
    order = max_min_diversity(x, 7)
    kept = select_topk([order_scores(order, 15)], _layout(15), 7)
    assert kept[0].tolist() == sorted(order.tolist())


def test_sensitivity_diversity_prefers_sensitive_then_diverse():
    x, ids = clusters([4, 4])
    s = torch.tensor([0.1, 0.2, 0.9, 0.3, 0.5, 0.4, 0.45, 0.2])
    order = sensitivity_diversity(s, x, 2)
    assert int(order[0]) == 2  # the most sensitive token
    assert int(ids[order[1]]) == 1  # next: the other cluster, whose best is token 4 (0.5)
    assert int(order[1]) == 4


def test_dpp_map_picks_quality_and_avoids_duplicates():
    x = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])  # token 1 duplicates token 0
    z = torch.nn.functional.normalize(x, dim=-1)
    quality = torch.tensor([1.0, 0.9, 0.5])
    kernel = quality[:, None] * (z @ z.T) * quality[None, :]
    assert dpp_map(kernel, 2).tolist() == [0, 2]  # the duplicate adds no volume


def test_projector_sensitivity_of_a_linear_map_is_the_mean_direction_gain():
    torch.manual_seed(0)
    lin = torch.nn.Linear(6, 5)
    dirs = torch.nn.functional.normalize(torch.randn(7, 6), dim=-1)
    x = torch.randn(4, 6)
    s = projector_sensitivity(lin, x, dirs, h=0.01)
    expected = (dirs @ lin.weight.T).norm(dim=-1).mean()
    torch.testing.assert_close(s, expected.expand(4), atol=1e-4, rtol=1e-4)


class _FakeAdapter:
    def __init__(self, projector):
        self.projector = projector

    def merge_projector(self):
        return self.projector


def test_zoo_keeps_the_tokens_the_projector_responds_to():
    """ReLU projector: tokens deep in the dead region have zero sensitivity and are kept last."""
    proj = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU())
    with torch.no_grad():
        proj[0].weight.copy_(torch.eye(4))
        proj[0].bias.zero_()
    feats = torch.cat([torch.full((5, 4), -5.0), torch.rand(3, 4) + 1.0])  # tokens 5..7 are active
    feats[:5] += torch.randn(5, 4) * 0.1
    scorer = ZOOScorer(directions=16)
    scorer.bind(None, _FakeAdapter(proj))
    sig = Signals(layout=_layout(8), stage="pre-llm", keep=3, vision_features=[feats], hidden_states=[proj(feats)])
    kept = select_topk(scorer.score(sig), sig.layout, 3)
    assert kept[0].tolist() == [5, 6, 7]
    assert torch.all(scorer.last_sensitivity[0][:5] == 0) and torch.all(scorer.last_sensitivity[0][5:] > 0.5)


def test_divprune_scorer_on_constructed_states():
    x, ids = clusters([6, 6, 6])
    sig = Signals(layout=_layout(18), stage="pre-llm", keep=3, hidden_states=[x])
    kept = select_topk(DivPrune().score(sig), sig.layout, 3)
    assert sorted(ids[kept[0]].tolist()) == [0, 1, 2]


def test_divprune_kept_set_is_more_spread_than_random_on_a_model(processor):
    """On a tiny model, the smallest pairwise distance within DivPrune's kept projector outputs beats
    that of random selections of the same size (the max-min objective)."""
    model = get_model("llava")
    inputs = batch(processor, [1])
    with torch.no_grad():
        feats = model.model.get_image_features(pixel_values=inputs["pixel_values"], return_dict=True).pooler_output[0]

    def min_distance(kept):
        z = torch.nn.functional.normalize(feats[kept].float(), dim=-1)
        d = 1 - z @ z.T
        return float(d[~torch.eye(len(kept), dtype=torch.bool)].min())

    got = {}
    for method, options in [("divprune", {}), ("random", {"seed": 0}), ("random", {"seed": 1})]:
        vtprune.apply(model, method, keep=16, **options)
        with torch.no_grad():
            model(**inputs)
        got[(method, options.get("seed"))] = min_distance(vtprune.stats(model).kept[0])
    vtprune.remove(model)
    assert got[("divprune", None)] > max(got[("random", 0)], got[("random", 1)]), got


@pytest.mark.parametrize("method", ["divprune", "zoo"])
def test_selection_methods_refuse_adaptive_budgets(llava, method):
    with pytest.raises(ConfigError, match="adaptive budget cannot be chosen"):
        vtprune.apply(llava, method, keep="auto:0.9")


def test_zoo_options_are_checked(llava):
    with pytest.raises(ConfigError, match="directions=0"):
        vtprune.apply(llava, "zoo", keep=8, directions=0)
    with pytest.raises(ConfigError, match="prunes before the LLM"):
        vtprune.apply(llava, "zoo", keep=8, layer=1)
