"""PyramidDrop: every stage keeps the top tokens by the last prompt token's attention at the drop layer
(eager attention of the unpatched model, the earlier stages' drops applied by masking), the release's
layers and budgets, option errors. Exactness (staged drop == staged masking) is in tests/test_presets.py."""

from __future__ import annotations

import pytest
import torch
from conftest import batch, get_model

import vtprune
from vtprune.adapters import adapter_for
from vtprune.config import ConfigError
from vtprune.scorers.pyramiddrop import PyramidDropScorer
from vtprune.scorers.select import image_budget
from vtprune.scorers.staged import staged_plan


class _Depth:
    """An adapter stand-in with ``depth`` decoder layers."""

    def __init__(self, depth: int) -> None:
        self.depth = depth

    def decoder_layers(self):
        return [None] * self.depth

    def min_layer(self) -> int:
        return 0


@pytest.mark.parametrize("depth, want", [(32, [7, 15, 23]), (28, [6, 13, 20]), (40, [9, 19, 29])])
def test_default_layers_are_the_releases_at_its_depth_fractions(depth, want):
    scorer = PyramidDropScorer()
    scorer.bind(None, _Depth(depth))
    assert scorer.layers == want and scorer.default_layer == want[0]


def test_default_layers_on_the_tiny_models():
    for kind in ("llava", "qwen2_vl"):
        scorer = PyramidDropScorer()
        scorer.bind(None, adapter_for(get_model(kind)))
        assert scorer.layers == [0, 1, 2]
    explicit = PyramidDropScorer(layers=[1, 2], ratios=[0.5])
    explicit.bind(None, _Depth(32))
    assert explicit.layers == [1, 2]  # given layers are used as given


@pytest.mark.parametrize("keep", [72, 0.125])
def test_budgets_are_the_releases_lambda_schedule(keep):
    """576 -> 288 -> 144 -> 72: the release's image_token_ratio_list [0.5, 0.25, 0.125] (lambda 0.5)."""
    plan = staged_plan([7, 15, 23], [0.5, 0.25], keep)
    n, counts = 576, []
    for _, budget in plan:
        n, _ = image_budget(budget, n)
        counts.append(n)
    assert counts == [288, 144, 72]


def _eager_rows(model, inputs, hidden_after: dict[int, torch.Tensor]) -> tuple:
    """Eager attention maps of the unpatched model where layer l hides the key columns
    ``hidden_after[k]`` ``[B, N]`` of every k < l (the earlier stages' drops, as masking)."""
    layers = model.model.language_model.layers
    n = inputs["input_ids"].shape[1]
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    handles = []
    for li in range(len(layers)):
        hidden = torch.zeros(inputs["input_ids"].shape, dtype=torch.bool)
        for k, dropped in hidden_after.items():
            if k < li:
                hidden |= dropped
        if not bool(hidden.any()):
            continue
        allowed = (causal[None] & ~hidden[:, None, :] & inputs["attention_mask"].bool()[:, None, :]) | torch.eye(n, dtype=torch.bool)

        def pre(module, args, kwargs, allowed=allowed[:, None]):
            mask = kwargs.get("attention_mask")
            kwargs["attention_mask"] = mask & allowed if mask.dtype == torch.bool else \
                mask.masked_fill(~allowed, torch.finfo(mask.dtype).min)
            return args, kwargs

        handles.append(layers[li].register_forward_pre_hook(pre, with_kwargs=True))
    try:
        with torch.no_grad():
            return model(**inputs, output_attentions=True, use_cache=False).attentions
    finally:
        for h in handles:
            h.remove()


def test_each_stage_keeps_the_top_tokens_by_the_drop_layers_attention(processor):
    """Stages after layers 0 and 1 rank with layers 1 and 2 (the drop layers, on their inputs): the last
    prompt token's head-mean eager attention row, stage 1 with stage 0's drops masked."""
    model = get_model("llava", "eager")
    inputs = batch(processor, [1, 1])  # left padded: the last prompt token is the last position of each row
    vtprune.apply(model, "pyramiddrop", keep=16, layers=[0, 1], ratios=[0.5])
    with torch.no_grad():
        model(**inputs)
    st = vtprune.stats(model)
    vtprune.remove(model)
    ids = inputs["input_ids"]
    visual = [torch.nonzero(row == model.config.image_token_id).flatten() for row in ids]
    att = _eager_rows(model, inputs, {})
    dropped = torch.zeros(ids.shape, dtype=torch.bool)
    for b in range(2):
        row = att[1][b, :, -1].float().mean(0)[visual[b]]  # layer 1's attention, last prompt token
        want = torch.sort(torch.topk(row, 288).indices).values
        assert torch.equal(st.stages[0]["kept"][b], want)
        dropped[b, visual[b]] = True
        dropped[b, visual[b][want]] = False
    att = _eager_rows(model, inputs, {0: dropped})
    for b in range(2):
        kept0 = st.stages[0]["kept"][b]
        row = att[2][b, :, -1].float().mean(0)[visual[b][kept0]]
        assert float(att[2][b, :, -1][:, dropped[b]].abs().max()) == 0.0  # the masking hides stage 0's drops
        want = torch.sort(kept0[torch.topk(row, 16).indices]).values
        assert torch.equal(st.stages[1]["kept"][b], want)
        assert not torch.equal(want, torch.sort(torch.topk(att[1][b, :, -1].float().mean(0)[visual[b]], 16).indices).values)


def test_options_and_layers_are_checked(llava):
    with pytest.raises(ConfigError, match="need at least 25 decoder layers, this model has 4"):
        vtprune.apply(llava, "pyramiddrop", keep=8, layers=[7, 15, 23])
    with pytest.raises(ConfigError, match="need at least 5 decoder layers"):  # the drop layer must exist
        vtprune.apply(llava, "pyramiddrop", keep=8, layers=[1, 3], ratios=[0.5])
    with pytest.raises(ConfigError, match="one ratio per stage before the last"):
        vtprune.apply(llava, "pyramiddrop", keep=8, layers=[0, 2])
    with pytest.raises(ConfigError, match="decreasing fractions"):
        vtprune.apply(llava, "pyramiddrop", keep=8, layers=[0, 1, 2], ratios=[0.25, 0.5])
    with pytest.raises(ConfigError, match="distinct, increasing"):
        vtprune.apply(llava, "pyramiddrop", keep=8, layers=[2, 1], ratios=[0.5])
    with pytest.raises(ConfigError, match="instead of layer=1"):
        vtprune.apply(llava, "pyramiddrop", keep=8, layer=1)


def test_staged_counts_and_generate(processor):
    model = get_model("llava")
    inputs = batch(processor, [2, 1], padding_side="left")
    vtprune.apply(model, "pyramiddrop", keep=0.125)  # the release's lambda = 0.5 on the toy's layers 0, 1, 2
    with torch.no_grad():
        tokens = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    st = vtprune.stats(model)
    vtprune.remove(model)
    assert [s["visual_after"] for s in st.stages] == [[576, 288], [288, 144], [144, 72]]
    assert tokens.shape[0] == 2 and "after LLM layer 0, after LLM layer 1, after LLM layer 2" in st.summary()
