"""vtprune.viz: token grids per model family, kept/pruned overlays, score heatmaps, and the stats' scores."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import vtprune
from vtprune import viz
from vtprune.loading import default_prompt, load_model


def _grid(rows=2, cols=3, cell=4, seed=0) -> viz.TokenGrid:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(40, 200, (rows * cell, cols * cell, 3), dtype=np.uint8)
    return viz.TokenGrid(Image.fromarray(pixels), rows, cols)


def _cell(arr: np.ndarray, grid: viz.TokenGrid, i: int, cell=4) -> np.ndarray:
    r, c = divmod(i, grid.cols)
    return arr[r * cell:(r + 1) * cell, c * cell:(c + 1) * cell].astype(np.float32)


def test_overlay_keeps_kept_tokens_and_darkens_the_rest():
    grid = _grid()
    src = np.asarray(grid.view)
    out = np.asarray(viz.overlay(grid, torch.tensor([0, 4]), dim=0.25))
    assert out.shape == src.shape
    for i in range(grid.tokens):
        if i in (0, 4):
            np.testing.assert_array_equal(_cell(out, grid, i), _cell(src, grid, i))
        else:
            np.testing.assert_allclose(_cell(out, grid, i), np.round(_cell(src, grid, i) * 0.25), atol=1)


def test_heatmap_tints_by_score_rank_and_still_darkens_pruned_tokens():
    grid = viz.TokenGrid(Image.new("RGB", (12, 8), (128, 128, 128)), 2, 3)
    scores = torch.tensor([0.1, 5.0, 0.3, float("-inf"), 2.0, 0.2])
    colours = viz.heat_colours(scores)
    assert colours[3].tolist() == [0, 0, 0]  # -inf: excluded, black
    brightness = colours.astype(int).sum(1)
    order = [0, 5, 2, 4, 1]  # ascending score among the finite ones
    assert all(brightness[a] < brightness[b] for a, b in zip(order, order[1:]))  # the ramp brightens with rank
    kept = [1, 4]
    out = np.asarray(viz.overlay(grid, kept, scores, heatmap=True, alpha=0.5))
    for i in range(6):
        r, c = divmod(i, 3)
        pixel = out[r * 4 + 1, c * 4 + 1].astype(float)
        tinted = 0.5 * 128 + 0.5 * colours[i].astype(float)
        expect = tinted if i in kept else tinted * 0.25
        np.testing.assert_allclose(pixel, np.round(expect), atol=1)


def test_overlay_rejects_indices_outside_the_image_and_a_heatmap_without_scores():
    grid = _grid()
    with pytest.raises(ValueError, match=r"kept indices must lie in \[0, 6\)"):
        viz.overlay(grid, [0, 6])
    with pytest.raises(ValueError, match="needs the scores"):
        viz.overlay(grid, [0], None, heatmap=True)
    with pytest.raises(ValueError, match="got 5 scores for an image of 6"):
        viz.overlay(grid, [0], torch.zeros(5), heatmap=True)
    with pytest.raises(TypeError, match="PIL image"):
        viz.token_grid(None, None, np.zeros((4, 4, 3)))


def _picture(w=500, h=400) -> Image.Image:
    rng = np.random.default_rng(1)
    return Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))


def _prune(model, processor, image, method="fastv", keep=0.1):
    vtprune.apply(model, method=method, keep=keep)
    inputs = processor(images=[image], text=[default_prompt(model, processor)], return_tensors="pt")
    with torch.inference_mode():
        model(**inputs)
    st = vtprune.stats(model)
    vtprune.remove(model)
    return st, inputs


@pytest.mark.parametrize("name", ["tiny-llava", "tiny-qwen2-vl", "tiny-qwen2.5-vl"])
def test_token_grid_matches_the_visual_tokens_and_the_kept_indices_draw(name):
    model, processor = load_model(name)
    image = _picture()
    grid = viz.token_grid(model, processor, image)
    st, inputs = _prune(model, processor, image)
    assert grid.tokens == st.visual_before[0]  # one grid cell per visual token of the prompt
    assert grid.view.size[0] % grid.cols == 0 and grid.view.size[1] % grid.rows == 0
    if model.config.model_type == "llava":
        assert (grid.rows, grid.cols) == (24, 24) and grid.view.size == (336, 336)
    else:  # Qwen: the image keeps its aspect ratio (500 x 400 -> a wider than tall grid)
        assert grid.cols > grid.rows
    picture = viz.overlay(grid, st.kept[0], st.scores[0], heatmap=True)
    assert picture.size == grid.view.size


def test_llava_view_is_what_the_processor_feeds_the_tower():
    model, processor = load_model("tiny-llava")
    image = _picture()
    grid = viz.token_grid(model, processor, image)
    # re-normalising the view gives the processor's pixel values back (up to 8-bit rounding)
    px = processor.image_processor(images=[image], return_tensors="pt")["pixel_values"][0]
    again = processor.image_processor(images=[grid.view], return_tensors="pt", do_resize=False,
                                      do_center_crop=False)["pixel_values"][0]
    std = torch.tensor(processor.image_processor.image_std).view(3, 1, 1)
    assert float(((again - px).abs() * std).max()) <= 1.0 / 255 + 1e-4


def test_llava_next_layout_is_refused_with_a_pointer_to_the_stats():
    model, processor = load_model("tiny-llava-next")
    with pytest.raises(ValueError, match="not supported yet.*vtprune.stats"):
        viz.token_grid(model, processor, _picture())


@pytest.mark.parametrize("method", ["fastv", "cls"])
def test_stats_scores_are_what_the_selection_ranked(method):
    model, processor = load_model("tiny-llava")
    st, _ = _prune(model, processor, _picture(), method=method, keep=20)
    scores = st.scores[0].float().cpu()
    assert scores.shape == (576,)
    top = torch.sort(scores, descending=True, stable=True).indices[:20]
    assert torch.equal(torch.sort(top).values, st.kept[0])


def test_visionzip_stats_carry_no_scores():
    model, processor = load_model("tiny-llava")
    st, _ = _prune(model, processor, _picture(), method="visionzip", keep=32)
    assert st.scores is None and st.visual_after[0] == 32
