"""The scoring signals vtprune recomputes, against transformers' own attention maps.

vtprune never asks the model for attention maps: it recomputes the rows a scorer reads from the layer
inputs (`vtprune.adapters.attention_rows`), so the model keeps running under SDPA. Each test here runs
the same weights unpatched under ``attn_implementation="eager"`` with ``output_attentions=True`` and
checks that the score vtprune ranked by (``vtprune.stats(model).scores``, visual tokens in sequence
order) is that map's row, head-averaged as the method does:

- FastV: row of the last prompt token (the query) at the pruning layer K, over the visual keys (LLaVA,
  Qwen2-VL's M-RoPE, left- and right-padded batches, two K).
- CLS / VTC-CLS / VisionZip: the vision tower's CLS row (query 0) over the patch keys at the feature
  layer (``vision_feature_layer``), summed over VTC-CLS's layers; on LLaVA-NeXT mapped onto the tokens by
  the model's own packing of tiles and newline tokens (LLaVA-1.5, LLaVA-NeXT).

The tolerances are float32 round-off (the rows are ~1e-3): every test also checks that the map of the
neighbouring layers is more than 10 tolerances away, so an off-by-one layer fails.

SparseVLM's and TransPrune's rows: tests/test_sparsevlm.py, tests/test_transprune.py; Qwen-VL's received
attention: tests/test_qwen.py.
"""

from __future__ import annotations

import pytest
import torch
from conftest import batch, get_model, qwen_batch

import vtprune
from vtprune.toy.tiny import tiny_llava_processor

ATOL, RTOL = 1e-6, 1e-5


def _twins(kind: str):
    """The cached SDPA model (patched by the tests) and its eager twin (the reference): the same weights."""
    model, eager = get_model(kind), get_model(kind, "eager")
    ref = eager.state_dict()
    assert all(torch.equal(v, ref[k]) for k, v in model.state_dict().items())
    return model, eager


def _far(a: torch.Tensor, b: torch.Tensor) -> bool:
    return bool((a - b).abs().max() > 10 * (ATOL + RTOL * b.abs().max()))


# ---- FastV: the query row at the pruning layer ------------------------------------------------------

FASTV_CASES = [("llava", "left"), ("llava", "right"), ("qwen2_vl", "left"), ("qwen2_vl", "right")]


def _fastv_inputs(kind: str, side: str):
    if kind == "llava":  # left: 2 and 1 images (rows of 1169 and 601 tokens); right: 1 and 1
        return batch(tiny_llava_processor(), [2, 1] if side == "left" else [1, 1], padding_side=side)
    return qwen_batch(kind, "left_padded_2", padding_side=side)  # images of two sizes: padded rows


@pytest.mark.parametrize("kind,side", FASTV_CASES, ids=[f"{k}-{s}" for k, s in FASTV_CASES])
def test_fastv_query_row_is_the_eager_attention_row(kind, side):
    model, eager = _twins(kind)
    inputs = _fastv_inputs(kind, side)
    mask = inputs["attention_mask"]
    assert not bool(mask.all())  # a padded batch
    with torch.no_grad():
        maps = eager(**inputs, output_attentions=True).attentions  # per layer [B, H, N, N]
    ids = inputs["input_ids"]
    query = mask.shape[1] - 1 - mask.flip(1).int().argmax(1)  # the last real token of each row
    visual = [torch.nonzero(ids[b] == model.config.image_token_id).flatten() for b in range(ids.shape[0])]
    rows = [m.float().mean(dim=1) for m in maps]  # FastV's head mean: [B, N, N]
    for k in (1, 2):
        try:
            vtprune.apply(model, method="fastv", keep=12, layer=k)
            with torch.no_grad():
                model(**inputs)
            st = vtprune.stats(model)
        finally:
            vtprune.remove(model)
        assert st.stage == "llm" and st.layer == k
        for b, vis in enumerate(visual):
            want = rows[k][b, query[b], vis]
            torch.testing.assert_close(st.scores[b], want, atol=ATOL, rtol=RTOL)
            for other in (k - 1, k + 1):  # the neighbouring layers are told apart
                assert _far(st.scores[b], rows[other][b, query[b], vis])
            assert _far(st.scores[b], rows[k][b, query[b] - 1, vis])  # and the query row from its neighbour


# ---- the vision tower's CLS row ------------------------------------------------------------------

CLS_KINDS = ["llava", "next"]


def _cls_inputs(kind: str):
    if kind == "llava":
        return batch(tiny_llava_processor(), [2, 1])
    return batch(tiny_llava_processor(next_=True), [1, 1], sizes=((300, 620), (400, 500)))  # 3 + 5 tiles


_CLS_REFERENCE: dict = {}


def _eager_cls_rows(kind: str) -> list[torch.Tensor]:
    """Per vision layer, the head-mean CLS row ``[tiles, P + 1]`` of the eager tower's own attention map,
    on the pixels the unpatched model feeds its tower."""
    if kind not in _CLS_REFERENCE:
        _, eager = _twins(kind)
        tower = eager.model.vision_tower
        seen = {}
        def grab(module, args, kwargs):
            seen["pixels"] = args[0] if args else kwargs["pixel_values"]

        handle = tower.register_forward_pre_hook(grab, with_kwargs=True)
        try:
            with torch.no_grad():
                eager(**_cls_inputs(kind))
        finally:
            handle.remove()
        with torch.no_grad():
            maps = tower(seen["pixels"], output_attentions=True).attentions  # per layer [T, H, P + 1, P + 1]
        _CLS_REFERENCE[kind] = [m[:, :, 0].float().mean(dim=1) for m in maps]
    return _CLS_REFERENCE[kind]


def _feature_index(model) -> int:
    """The ``hidden_states`` index of the vision feature layer (``-2``: the last layer but one's output)."""
    depth = model.config.vision_config.num_hidden_layers
    layer = model.config.vision_feature_layer
    return layer + depth + 1 if layer < 0 else layer


def _assert_scores_are(st, per_token: list[list[torch.Tensor]]) -> None:
    """``st.scores[b]`` are sample ``b``'s per-image token scores ``per_token[b]``, concatenated."""
    for b, images in enumerate(per_token):
        torch.testing.assert_close(st.scores[b], torch.cat(images), atol=ATOL, rtol=RTOL)


def _per_token(model, kind: str, rows: torch.Tensor, inputs) -> list[list[torch.Tensor]]:
    """CLS rows ``[tiles, P + 1]`` -> per sample, per image, the score of each of its visual tokens in
    sequence order (LLaVA-NeXT: the model's own packing of the tiles, newline tokens 0)."""
    patches = rows[:, 1:]  # strategy "default": the LLM gets the patch tokens, not CLS
    if kind == "llava":
        per_image = list(patches)
    else:
        from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

        cfg = model.config
        tiles = [image_size_to_num_patches(s, cfg.image_grid_pinpoints, cfg.vision_config.image_size)
                 for s in inputs["image_sizes"]]
        feats = [t[..., None].double() for t in patches.split(tiles)]
        packed, _ = model.model.pack_image_features(feats, inputs["image_sizes"], "default",
                                                    image_newline=torch.zeros(1, dtype=torch.float64))
        per_image = [p[:, 0].float() for p in packed]
    ids = inputs["input_ids"]
    counts = [int(n) for n in (ids == model.config.image_token_id).sum(1)]
    out, i = [], 0
    for n in counts:
        mine = []
        while sum(int(t.numel()) for t in mine) < n:
            mine.append(per_image[i])
            i += 1
        out.append(mine)
    assert i == len(per_image)
    return out


def _run(model, inputs, method: str, **options):
    try:
        vtprune.apply(model, method=method, keep=12, **options)
        with torch.no_grad():
            model(**inputs)
        return vtprune.stats(model), model._vtprune_state.vision_record
    finally:
        vtprune.remove(model)


@pytest.mark.parametrize("kind", CLS_KINDS)
def test_cls_row_is_the_eager_cls_attention_row(kind):
    model, _ = _twins(kind)
    inputs = _cls_inputs(kind)
    rows = _eager_cls_rows(kind)
    h = _feature_index(model)
    assert h == len(rows) - 1  # the tiny tower: 3 layers, feature layer -2 -> hidden_states[2], layer 1
    st, record = _run(model, inputs, "cls")
    want = rows[h - 1]  # hidden_states[h] is the output of layer h - 1
    torch.testing.assert_close(record.cls_attention, want, atol=ATOL, rtol=RTOL)  # [T, P + 1], CLS key too
    for other in range(len(rows)):
        if other != h - 1:
            assert _far(record.cls_attention, rows[other])
    _assert_scores_are(st, _per_token(model, kind, want, inputs))


@pytest.mark.parametrize("kind", CLS_KINDS)
def test_vtc_cls_sums_the_eager_cls_rows_up_to_the_feature_layer(kind):
    model, _ = _twins(kind)
    inputs = _cls_inputs(kind)
    rows = _eager_cls_rows(kind)
    h = _feature_index(model)
    st, _ = _run(model, inputs, "vtc-cls")
    layers = range(max(1, h - 6), h + 1)  # the 7 hidden_states indices ending at the feature layer: 1, 2 here
    want = sum(rows[i - 1] for i in layers)
    assert _far(want, rows[h - 1])  # more than one layer
    _assert_scores_are(st, _per_token(model, kind, want, inputs))
    st, _ = _run(model, inputs, "vtc-cls", vision_layer=[1, 3])  # explicit layers
    want = rows[0] + rows[2]
    _assert_scores_are(st, _per_token(model, kind, want, inputs))


@pytest.mark.parametrize("kind", CLS_KINDS)
def test_visionzip_dominant_tokens_are_the_top_eager_cls_rows(kind):
    model, _ = _twins(kind)
    inputs = _cls_inputs(kind)
    rows = _eager_cls_rows(kind)
    want = rows[_feature_index(model) - 1]
    st, record = _run(model, inputs, "visionzip")
    torch.testing.assert_close(record.cls_attention, want, atol=ATOL, rtol=RTOL)
    # keep 12 = 10 dominant + 2 contextual (54:10); on LLaVA-1.5 the release's order: CLS + 9 dominant patches
    dominant = 9 if kind == "llava" else 10
    for b, images in enumerate(_per_token(model, kind, want, inputs)):
        kept, start = set(st.kept[b].tolist()), 0
        for scores in images:
            top = torch.topk(scores, dominant).indices + start  # newline tokens score 0: never among them
            assert set(top.tolist()) <= kept
            start += scores.numel()
