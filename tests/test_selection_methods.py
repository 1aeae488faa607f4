"""Selection-type methods (DivPrune, ZOO-Prune) and the greedy selectors behind them, on constructed cases
where the right answer is known. Exactness on every tiny model is in tests/test_presets.py."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import batch, get_model

import vtprune
from vtprune.config import ConfigError
from vtprune.layout import VisualLayout
from vtprune.scorers import DivPrune
from vtprune.scorers.base import Signals
from vtprune.scorers.greedy import (
    cosine_matrix,
    dpp_map,
    max_min_diversity,
    minmax,
    order_scores,
    per_image,
    sensitivity_diversity,
)
from vtprune.scorers.select import image_budget, select_topk
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


# ---- device-resident greedy loops: same picks as plain host loops, no host syncs -------------------------


def _ref_max_min(x: torch.Tensor, k: int) -> list[int]:
    """DivPrune's max-min diversity, a plain host loop (the reference for `max_min_diversity`)."""
    n = x.shape[0]
    k = min(k, n)
    if n == 1:
        return [0]
    z = torch.nn.functional.normalize(x.float(), dim=-1)
    dist = 1.0 - z @ z.T
    nn_dist = torch.topk(dist, 2, dim=0, largest=False).values[1]
    picks = [int(torch.argmax(nn_dist).item())]
    closest = dist[picks[0]].clone()
    closest[picks[0]] = float("-inf")
    for _ in range(k - 1):
        j = int(torch.argmax(closest).item())
        picks.append(j)
        closest = torch.minimum(closest, dist[j])
        for p in picks:
            closest[p] = float("-inf")
    return picks


def _ref_sads(sensitivity: torch.Tensor, x: torch.Tensor, k: int) -> list[int]:
    """ZOO's SADS, a plain host loop."""
    k = min(k, x.shape[0])
    s = sensitivity.float()
    span = (s.max() - s.min()).item()
    s = (s - s.min()) / span if span > 0 else torch.ones_like(s)
    z = torch.nn.functional.normalize(x.float(), dim=-1)
    sim = z @ z.T
    picks = [int(torch.argmax(s).item())]
    nearest = sim[picks[0]].clone()
    for _ in range(k - 1):
        gain = s * (1.0 - nearest)
        for p in picks:
            gain[p] = float("-inf")
        j = int(torch.argmax(gain).item())
        picks.append(j)
        nearest = torch.maximum(nearest, sim[j])
    return picks


def _ref_dpp(kernel: torch.Tensor, k: int) -> list[int]:
    """Greedy DPP MAP (incremental Cholesky), a plain host loop."""
    n = kernel.shape[0]
    k = min(k, n)
    L = kernel.double()
    d2 = torch.diagonal(L).clone()
    rows = torch.zeros(k, n, dtype=L.dtype)
    picks: list[int] = []
    for t in range(k):
        j = int(torch.argmax(d2).item())
        picks.append(j)
        if t == k - 1:
            break
        dj = torch.sqrt(torch.clamp(d2[j], min=1e-12))
        e = (L[j] - rows[:t, j] @ rows[:t]) / dj
        rows[t] = e
        d2 = d2 - e * e
        for p in picks:
            d2[p] = float("-inf")
    return picks


def _random_case(seed: int, n: int, dim: int = 6):
    """Features with many exact ties (rows from {-1, 0, 1}: duplicates and equal cosines), quantised
    sensitivities (ties), and a DPP kernel over them."""
    gen = torch.Generator().manual_seed(seed)
    if seed % 2:
        x = torch.randint(-1, 2, (n, dim), generator=gen).float()
        x[x.abs().sum(1) == 0, 0] = 1.0
    else:
        x = torch.randn(n, dim, generator=gen)
    s = torch.randint(0, 4, (n,), generator=gen).float()
    z = torch.nn.functional.normalize(x, dim=-1)
    q = torch.rand(n, generator=gen) + 0.1
    return x, s, q[:, None] * (z @ z.T) * q[None, :]


@pytest.mark.parametrize("seed", range(8))
def test_greedy_selectors_pick_as_plain_host_loops(seed):
    for n, k in [(1, 1), (2, 1), (7, 3), (13, 13), (29, 11), (40, 50)]:
        x, s, kernel = _random_case(seed * 100 + n, n)
        assert max_min_diversity(x, k).tolist() == _ref_max_min(x, k), (n, k)
        assert sensitivity_diversity(s, x, k).tolist() == _ref_sads(s, x, k), (n, k)
        assert dpp_map(kernel, k).tolist() == _ref_dpp(kernel, k), (n, k)
    const = torch.full((5,), 3.0)
    torch.testing.assert_close(minmax(const), torch.ones(5))  # constant: all ones, no host read of the span


def _multi_layout(images: list[list[tuple[int, list[int]]]]) -> VisualLayout:
    """Per sample, per image ``(length, non-prunable offsets)``; host copies given, as `build_layout` does."""
    pos, img, pr = [], [], []
    for spans in images:
        ids, p = [], []
        for i, (length, fixed) in enumerate(spans):
            ids += [i] * length
            p += [j not in fixed for j in range(length)]
        pos.append(torch.arange(len(ids)))
        img.append(torch.tensor(ids, dtype=torch.long))
        pr.append(torch.tensor(p, dtype=torch.bool))
    n = [int(t.numel()) for t in pos]
    return VisualLayout(pos, img, pr, [torch.arange(c) for c in n], [torch.zeros(c, 3, dtype=torch.long) for c in n],
                        seq_len=max(n), host_image=[t.clone() for t in img], host_prunable=[t.clone() for t in pr])


def _ref_per_image(lay: VisualLayout, keep, pick) -> list[torch.Tensor]:
    """`per_image` from the token kinds directly (host loop): picks score k - j, other candidates -1,
    non-prunable tokens 0."""
    out = []
    for b in range(lay.batch_size):
        img, pr = lay.image[b], lay.prunable[b]
        s = torch.zeros(img.numel())
        for i in range(int(img.max().item()) + 1 if img.numel() else 0):
            idx = [t for t in range(img.numel()) if int(img[t].item()) == i and bool(pr[t].item())]
            k, _ = image_budget(keep, len(idx))
            if k == 0:
                continue
            order = pick(b, torch.tensor(idx, dtype=torch.long), k).tolist()
            for t in idx:
                s[t] = -1.0
            for j, o in enumerate(order):
                s[idx[o]] = float(k - j)
        out.append(s)
    return out


LAYOUT = [[(9, [0, 4]), (6, []), (5, [0, 1, 2, 3, 4])], [(12, [11])]]  # one image without candidates


@pytest.mark.parametrize("keep", [3, 0.5, 100])
def test_per_image_matches_a_host_loop(keep):
    lay = _multi_layout(LAYOUT)
    feats = [_random_case(b + 3, int(p.numel()))[0] for b, p in enumerate(lay.positions)]
    sens = [_random_case(b + 3, int(p.numel()))[1] for b, p in enumerate(lay.positions)]
    pickers = {
        "divprune": lambda b, idx, k: max_min_diversity(feats[b][idx], k),
        "sads": lambda b, idx, k: sensitivity_diversity(sens[b][idx], feats[b][idx], k),
        "dpp": lambda b, idx, k: dpp_map(cosine_matrix(feats[b][idx]).clamp(min=0) + 0.1 * torch.eye(len(idx)), k),
    }
    for name, pick in pickers.items():
        got = per_image(lay, keep, pick)
        for g, e in zip(got, _ref_per_image(lay, keep, pick)):
            assert torch.equal(g, e), name


def test_greedy_selection_adds_no_host_syncs():
    """The selectors, `per_image` and the three selection scorers read nothing back from the device: under
    an `OpCounter` (which counts what would sync on a GPU: item / bool / nonzero / bool-mask indexing /
    tolist / cpu) vtprune records no sync. The layout's spans are built before, once per prefill."""
    from vtprune.eval.opcount import OpCounter
    from vtprune.scorers import CDPruner

    lay = _multi_layout(LAYOUT)
    _ = [sp.candidates for spans in lay.spans for sp in spans]  # built once per prefill, from host copies
    n = lay.counts()
    feats = [_random_case(b + 5, c)[0] for b, c in enumerate(n)]
    x, s, kernel = _random_case(1, 17)
    proj = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.GELU())
    zoo = ZOOScorer(directions=4)
    zoo.bind(None, _FakeAdapter(proj))
    sig = Signals(layout=lay, stage="pre-llm", keep=4, vision_features=feats,
                  hidden_states=[proj(f).detach() for f in feats],
                  instruction_embeds=[torch.randn(3, 5), torch.randn(2, 5)])
    with torch.no_grad(), OpCounter() as counter:
        max_min_diversity(x, 9)
        sensitivity_diversity(s, x, 9)
        dpp_map(kernel, 9)
        minmax(s)
        per_image(lay, 4, lambda b, idx, k: max_min_diversity(feats[b][idx], k))
        scores = [DivPrune().score(sig), zoo.score(sig), CDPruner().score(sig)]
    res = counter.result()
    assert res.vtprune_syncs == 0, res.format_sites()
    assert res.vtprune_ops > 0
    for per_sample in scores:
        assert [int(t.numel()) for t in per_sample] == n


@pytest.mark.gpu
def test_greedy_selection_on_cuda_stays_there_without_syncs():
    """On a GPU: the selectors and the three scorers run with CUDA's sync debug mode set to raise, keep
    their results on the device, and pick as on the CPU."""
    from vtprune.scorers import CDPruner

    dev = torch.device("cuda")
    cpu_lay = _multi_layout(LAYOUT)
    lay = VisualLayout([t.to(dev) for t in cpu_lay.positions], [t.to(dev) for t in cpu_lay.image],
                       [t.to(dev) for t in cpu_lay.prunable], [t.to(dev) for t in cpu_lay.source],
                       [t.to(dev) for t in cpu_lay.coords], cpu_lay.seq_len, cpu_lay.host_image, cpu_lay.host_prunable)
    _ = [sp.candidates for spans in lay.spans for sp in spans]
    torch.manual_seed(0)  # Gaussian features (even seeds): no near-ties that float noise could flip
    feats = [_random_case(2 * b + 4, c)[0] for b, c in enumerate(lay.counts())]
    words = [torch.randn(3, 5), torch.randn(2, 5)]
    x, _, kernel = _random_case(2, 17)
    s = torch.rand(17)
    proj = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.GELU())

    def run(device, layout):
        p = copy.deepcopy(proj).to(device)
        zoo = ZOOScorer(directions=4)
        zoo.bind(None, _FakeAdapter(p))
        with torch.no_grad():
            sig = Signals(layout=layout, stage="pre-llm", keep=4, vision_features=[f.to(device) for f in feats],
                          hidden_states=[p(f.to(device)) for f in feats],
                          instruction_embeds=[w.to(device) for w in words])
            args = [t.to(device) for t in (x, s, kernel)]
            torch.cuda.synchronize()
            if device.type == "cuda":
                torch.cuda.set_sync_debug_mode("error")
            try:
                out = [max_min_diversity(args[0], 9), sensitivity_diversity(args[1], args[0], 9), dpp_map(args[2], 9),
                       *DivPrune().score(sig), *zoo.score(sig), *CDPruner().score(sig)]
            finally:
                torch.cuda.set_sync_debug_mode(0)
        return out

    on_gpu = run(dev, lay)
    assert all(t.device.type == "cuda" for t in on_gpu)
    on_cpu = run(torch.device("cpu"), cpu_lay)
    for g, c in zip(on_gpu, on_cpu):  # picks, then scores (integers encoding the picks): exactly as on the CPU
        assert torch.equal(g.cpu(), c)


@pytest.mark.parametrize("layer", [None, 1])
def test_divprune_ranks_next_newlines_inside_the_budget(next_processor, layer):
    """DivPrune's release ranks LLaVA-NeXT's image-newline rows with the others (default newlines='rank'):
    an image keeps exactly ``keep`` tokens, newlines counted, at most one of the identical newline rows,
    and before the LLM they are the max-min picks over all the image's LLM input rows; newlines='keep'
    keeps every newline beside ``keep`` others. A padded batch of two image sizes."""
    model = get_model("next")
    inputs = batch(next_processor, [1, 1], sizes=((300, 620), (400, 500)))
    seen = {}

    def record(module, args, kwargs):
        seen.setdefault("embeds", kwargs["inputs_embeds"])

    hook = model.model.language_model.register_forward_pre_hook(record, with_kwargs=True)
    try:
        with torch.no_grad():
            model(**inputs)  # unpatched: the LLM input rows
        hook.remove()
        runs = {}
        for newlines in ("rank", "keep"):
            vtprune.apply(model, "divprune", keep=24, layer=layer, newlines=newlines)
            with torch.no_grad():
                model(**inputs)
            runs[newlines] = (vtprune.stats(model).kept, model._vtprune_state.session.layout)
    finally:
        hook.remove()
        vtprune.remove(model)
    for newlines, (kept, lay) in runs.items():
        for b in range(2):
            fixed = torch.nonzero(~lay.prunable[b]).flatten()
            assert fixed.numel() > 0  # the tiled image has row newlines
            n_fixed_kept = int(torch.isin(kept[b], fixed).sum())
            if newlines == "keep":
                assert kept[b].numel() == 24 + fixed.numel() and n_fixed_kept == fixed.numel()
                continue
            assert kept[b].numel() == 24 and n_fixed_kept <= 1
            if layer is None:
                rows = seen["embeds"][b, lay.positions[b]]
                expected = max_min_diversity(rows, 24)
                assert sorted(kept[b].tolist()) == sorted(expected.tolist())


def test_divprune_refuses_an_unknown_newline_mode(llava):
    with pytest.raises(ConfigError, match="newlines must be 'rank'"):
        vtprune.apply(llava, "divprune", keep=8, newlines="drop")
