"""Adaptive budgets: ``keep="auto:0.95"`` keeps per image the fewest tokens reaching that score mass."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import batch, get_model
from oracle import dropped_positions, masked_logits

import vtprune
from vtprune.config import AutoKeep, ConfigError, PruneConfig, parse_auto_keep
from vtprune.layout import VisualLayout
from vtprune.loading import load_model, toy_weights_dir
from vtprune.scorers.select import mass_budget, select_topk


def test_mass_budget_on_constructed_scores():
    s = torch.tensor([0.5, 0.3, 0.1, 0.05, 0.05])
    assert mass_budget(s, AutoKeep(0.5)) == 1  # 0.5 reached by the top token
    assert mass_budget(s, AutoKeep(0.8)) == 2
    assert mass_budget(s, AutoKeep(0.81)) == 3
    assert mass_budget(s, AutoKeep(1.0)) == 5
    assert mass_budget(s, AutoKeep(0.8, min=4)) == 4
    assert mass_budget(s, AutoKeep(0.99, max=2)) == 2
    assert mass_budget(s, AutoKeep(0.5, min=9)) == 5  # never more than the image has
    assert mass_budget(torch.zeros(10), AutoKeep(0.95)) == 10  # flat: the mass share is the token share
    assert mass_budget(torch.ones(10), AutoKeep(0.5)) == 5
    # negative scores (log-probabilities, debiased values) are shifted by their minimum: weights 3, 2, 0
    assert mass_budget(torch.tensor([-1.0, -2.0, -4.0]), AutoKeep(0.6)) == 1
    assert mass_budget(torch.tensor([-1.0, -2.0, -4.0]), AutoKeep(0.61)) == 2


def _layout(sizes: list[int]) -> VisualLayout:
    n = sum(sizes)
    image = torch.cat([torch.full((k,), i) for i, k in enumerate(sizes)])
    coords = torch.zeros(n, 3, dtype=torch.long)
    return VisualLayout([torch.arange(n)], [image], [torch.ones(n, dtype=torch.bool)],
                        [torch.arange(n)], [coords], seq_len=n)


def test_select_topk_chooses_the_count_per_image():
    peaked = torch.tensor([10.0, 0.1, 0.1, 0.1, 0.1, 0.1])  # one token holds most of the mass
    flat = torch.ones(6)
    lay = _layout([6, 6])
    kept = select_topk([torch.cat([peaked, flat])], lay, "auto:0.9")
    assert lay.kept_per_image(0, kept[0]) == [1, 6]
    assert kept[0].tolist() == [0, 6, 7, 8, 9, 10, 11]
    kept = select_topk([torch.cat([peaked, flat])], lay, "auto:0.9,min=2,max=4")
    assert lay.kept_per_image(0, kept[0]) == [2, 4]
    # -inf (excluded) tokens carry no mass and are never kept
    s = torch.tensor([1.0, 1.0, float("-inf"), float("-inf")])
    assert select_topk([s], _layout([4]), "auto:1.0")[0].tolist() == [0, 1]


def test_config_parses_normalises_and_round_trips():
    cfg = PruneConfig(method="fastv", keep="AUTO:0.90, max=128", layer=2)
    assert cfg.keep == "auto:0.9,max=128"
    assert PruneConfig.from_json(cfg.to_json()) == cfg
    assert parse_auto_keep(cfg.keep) == AutoKeep(0.9, 1, 128)
    assert PruneConfig(keep=AutoKeep(0.95, min=8)).keep == "auto:0.95,min=8"
    for bad, why in [("auto", "must be an adaptive budget"), ("auto:0", r"outside \(0, 1\]"),
                     ("auto:x", "not a number"), ("auto:0.9,min=0", "at least 1"),
                     ("auto:0.9,min=9,max=3", "below min"), ("auto:0.9,top=3", "unknown or repeated"),
                     ("most", "keep must be an int"), ("64", r"pass the number itself")]:
        with pytest.raises(ConfigError, match=why):
            PruneConfig(keep=bad)


@pytest.mark.parametrize("method", ["uniform", "visionzip", "debias+visionzip", "flowcut"])
def test_methods_that_place_fixed_counts_refuse_auto(llava, method):
    with pytest.raises(ConfigError, match="adaptive budget cannot be chosen"):
        vtprune.apply(llava, method, keep="auto:0.9")
    assert not hasattr(llava, "_vtprune_state")


def test_auto_in_llm_drop_equals_masking_with_ragged_counts(processor):
    """Per-image counts differ across samples (a ragged batch): still the masking oracle."""
    model = get_model("llava")
    inputs = batch(processor, [2, 1], padding_side="left")
    vtprune.apply(model, "random", keep="auto:0.6", layer=1)  # each image draws its own score mass
    with torch.no_grad():
        pruned = model(**inputs).logits
    st = vtprune.stats(model)
    vtprune.remove(model)
    assert len({st.per_image[0][0], st.per_image[0][1], st.per_image[1][0]}) > 1, st.per_image
    assert all(0 < c < 576 for counts in st.per_image for c in counts)
    assert [sum(c) for c in st.per_image] == st.visual_after
    dropped = dropped_positions(model, inputs["input_ids"], st)
    ref = masked_logits(model, inputs, 1, dropped)
    check = inputs["attention_mask"].bool() & ~dropped
    torch.testing.assert_close(pruned[check], ref[check], atol=2e-5, rtol=1e-4)


def test_auto_on_the_trained_toy_adapts_per_image():
    """On toy-llava the CLS mass of some images concentrates more than others: counts vary per image."""
    if not toy_weights_dir("toy-llava").is_dir():
        pytest.skip("toy-llava is not built")
    from vtprune.eval.tasks import load_task

    model, processor = load_model("toy-llava")
    task = load_task("toy-shapes", limit=12)
    processor.tokenizer.padding_side = "left"
    from vtprune.loading import default_prompt

    inputs = processor(images=[s.load_image() for s in task.samples], return_tensors="pt", padding=True,
                       text=[default_prompt(model, processor, s.question) for s in task.samples])
    vtprune.apply(model, "cls", keep="auto:0.5,min=2,max=40")
    with torch.no_grad():
        model.generate(**inputs, max_new_tokens=2, do_sample=False)
    st = vtprune.stats(model)
    vtprune.remove(model)
    counts = [c[0] for c in st.per_image]
    assert len(set(counts)) > 1, counts
    assert all(2 <= c <= 40 for c in counts)


def test_cli_eval_accepts_auto(tmp_path, capsys):
    if not toy_weights_dir("toy-llava").is_dir():
        pytest.skip("toy-llava is not built")
    from vtprune.cli import main

    main(["eval", "--model", "toy-llava", "--method", "cls", "--keep", "auto:0.8,max=32", "--limit", "8",
          "--out", str(tmp_path / "ev"), "--json"])
    data = json.loads(capsys.readouterr().out)
    text = json.dumps(data)
    assert "auto:0.8,max=32" in text
    with pytest.raises(SystemExit):
        main(["eval", "--model", "toy-llava", "--method", "cls", "--keep", "auto:2"])
    assert "outside (0, 1]" in capsys.readouterr().err
