"""CDPruner: the conditional DPP on constructed cases, and both relevance sources on tiny models (the CLIP one
with a tiny random open_clip model built from a config, no download). Exactness on every tiny model with
the text relevance is in tests/test_presets.py."""

from __future__ import annotations

import pytest
import torch
from conftest import batch, get_model, next_tiles, register_tiny_clip, run_pruned

import vtprune
from vtprune.config import ConfigError
from vtprune.layout import VisualLayout
from vtprune.scorers import CDPruner
from vtprune.scorers.base import Signals
from vtprune.scorers.cdpruner import dpp_kernel, normalise_relevance
from vtprune.scorers.select import select_topk
from vtprune.toy.tiny import tiny_llava_tokenizer

open_clip = pytest.importorskip("open_clip")


def _layout(n: int) -> VisualLayout:
    return VisualLayout([torch.arange(n)], [torch.zeros(n, dtype=torch.long)], [torch.ones(n, dtype=torch.bool)],
                        [torch.arange(n)], [torch.zeros(n, 3, dtype=torch.long)], seq_len=n)


def test_kernel_and_normalisation():
    s = torch.eye(3)
    r = torch.tensor([0.0, 0.5, 1.0])
    torch.testing.assert_close(dpp_kernel(s, r, None), torch.diag(r**2))  # the release's kernel (no theta)
    torch.testing.assert_close(dpp_kernel(s, r, 0.5), torch.diag(torch.exp(0.5 * r) ** 2))  # the paper's
    torch.testing.assert_close(dpp_kernel(s, r, 0.0), s)  # exp(0): relevance has no weight
    # the release's (r - min + 1e-6) / (max - min): the least relevant token keeps a small weight
    torch.testing.assert_close(normalise_relevance(torch.tensor([2.0, 4.0, 3.0])),
                               torch.tensor([0.5e-6, 1.0 + 0.5e-6, 0.5 + 0.5e-6]), atol=1e-9, rtol=0)
    assert torch.equal(normalise_relevance(torch.full((4,), 3.0)), torch.ones(4))  # constant: all ones
    assert CDPruner().theta is None


def test_default_kernel_follows_the_release_not_the_papers_theta():
    """Two near-duplicate relevant tokens and one irrelevant orthogonal token, keep 2. The release's kernel
    (q = r) gives the irrelevant token a weight of ~1e-6, so the second pick is the near-duplicate;
    the paper's theta=0.5 (q = exp(r / 2), at least 1) lets diversity win: the orthogonal token."""
    z = torch.tensor([[1.0, 0.0, 0.0], [1.0, 0.05, 0.0], [0.0, 0.0, 1.0]])
    words = torch.tensor([[1.0, 0.0, 0.0]])
    sig = Signals(layout=_layout(3), stage="pre-llm", keep=2, hidden_states=[z], instruction_embeds=[words])
    picks = {}
    for theta in (None, 0.5):
        scores = CDPruner(theta=theta).score(sig)[0]
        picks[theta] = sorted(select_topk([scores], sig.layout, 2)[0].tolist())
        assert int(torch.argmax(scores)) == 0  # the most relevant token first
    assert picks[None] == [0, 1] and picks[0.5] == [0, 2]


def test_relevant_first_then_diverse():
    """Two groups of near-duplicate tokens; the instruction points at group B: the first pick is B's most
    relevant token, the second comes from group A (a second B token adds no volume)."""
    a = torch.tensor([[1.0, 0.0, 0.0]]).repeat(3, 1) + 1e-3 * torch.randn(3, 3)
    b = torch.tensor([[0.0, 1.0, 0.2]]).repeat(3, 1) + 1e-3 * torch.randn(3, 3)
    z = torch.cat([a, b])
    words = torch.tensor([[0.0, 1.0, 0.0]])
    sig = Signals(layout=_layout(6), stage="pre-llm", keep=2, hidden_states=[z], instruction_embeds=[words])
    scorer = CDPruner(theta=0.9)
    scores = scorer.score(sig)[0]
    assert int(torch.argmax(scores)) >= 3  # a group-B token first
    kept = select_topk([scores], sig.layout, 2)[0]
    assert sorted(int(k) // 3 for k in kept) == [0, 1]


def test_options_are_checked(llava):
    with pytest.raises(ConfigError, match="relevance='bogus'"):
        vtprune.apply(llava, "cdpruner", keep=8, relevance="bogus")
    with pytest.raises(ConfigError, match="needs clip_model"):
        vtprune.apply(llava, "cdpruner", keep=8, relevance="clip")
    with pytest.raises(ConfigError, match=r"theta=1.0 must be in \[0, 1\)"):
        vtprune.apply(llava, "cdpruner", keep=8, theta=1.0)
    with pytest.raises(ConfigError, match="or None for the release's kernel"):
        vtprune.apply(llava, "cdpruner", keep=8, theta="0.5")


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    """A tiny open_clip model whose vision width (32) matches the tiny LLaVA tower, and a saved tokenizer."""
    folder = tmp_path_factory.mktemp("clip")
    name = register_tiny_clip(folder, "vtprune-tiny-clip")
    tok = folder / "tokenizer"
    tiny_llava_tokenizer().save_pretrained(tok)
    return name, str(tok)


def test_clip_relevance_matches_an_independent_computation(processor, tiny_clip):
    name, tok = tiny_clip
    model = get_model("llava")
    inputs = batch(processor, [1])
    torch.manual_seed(0)
    vtprune.apply(model, "cdpruner", keep=8, relevance="clip", clip_model=name, tokenizer=tok)
    scorer = model._vtprune_state.scorer
    with torch.no_grad():
        model(**inputs)
    st = vtprune.stats(model)
    got = scorer.last_relevance[0].cpu()  # recorded on the model's device
    clip = scorer._clip.model
    vtprune.remove(model)
    assert st.visual_after == [8]
    # independently: the feature layer (-2) patch features -> ln_post -> proj, against the instruction text
    with torch.no_grad():
        out = model.model.vision_tower(inputs["pixel_values"], output_hidden_states=True)
        feats = out.hidden_states[-2][0, 1:]
        e = torch.nn.functional.normalize(clip.visual.ln_post(feats) @ clip.visual.proj, dim=-1)
        ids = inputs["input_ids"][0]
        last_image = int(torch.nonzero(ids == model.config.image_token_id).max())
        text = tiny_llava_tokenizer().decode(ids[last_image + 1:].tolist(), skip_special_tokens=True)
        t = torch.nn.functional.normalize(clip.encode_text(open_clip.get_tokenizer(name)([text])), dim=-1)
        r = -(e @ t.T).mean(1)
        expected = (r - r.min() + 1e-6) / (r.max() - r.min())  # the release's normalisation
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)


def test_clip_relevance_refuses_a_mismatched_tower_and_qwen(tiny_clip):
    name, tok = tiny_clip
    with pytest.raises(ConfigError, match="LLaVA-family models only"):
        vtprune.apply(get_model("qwen2_vl"), "cdpruner", keep=8, relevance="clip", clip_model=name, tokenizer=tok)
    with pytest.raises(ConfigError, match="is 768 wide but the model's vision tower is 32 wide"):
        vtprune.apply(get_model("llava"), "cdpruner", keep=8, relevance="clip", clip_model="ViT-B-32", tokenizer=tok)


def test_toy_llava_own_clip(tmp_path):
    """The toy LLaVA's own CLIP (scripts/train_toy_clip.py) separates object from background patches the way
    CDPruner's negated relevance expects: trained on pooled image embeddings, a caption's cosine is *lower*
    on its image's object patches than on the background (CLIP's known "opposite visualisation" of patch
    tokens, the reason the reference negates the cosine), so -cos ranks the objects first. And cdpruner's
    CLIP relevance runs with it on the toy."""
    from vtprune.loading import default_prompt, load_model, toy_weights_dir
    from vtprune.scorers.cdpruner import ClipText, toy_clip_dir
    from vtprune.toy import shapes

    if toy_clip_dir("toy-llava-clip") is None or not toy_weights_dir("toy-llava").is_dir():
        pytest.skip("toy-llava-clip is not built (scripts/train_toy_clip.py)")
    model, processor = load_model("toy-llava")
    clip = ClipText("toy-llava-clip", None)
    samples = [shapes.make_sample("test", i) for i in range(24)]
    px = processor.image_processor([s.image for s in samples], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        feats = model.model.vision_tower(pixel_values=px, output_hidden_states=True).hidden_states[
            model.config.vision_feature_layer][:, 1:]
    obj, bg = [], []
    for i, s in enumerate(samples):
        e = torch.nn.functional.normalize(clip.image_embeddings(feats[i]), dim=-1)
        t = torch.nn.functional.normalize(clip.text_embeddings(shapes.describe(s.objects)), dim=-1)[0]
        mask = torch.as_tensor(s.object_mask(8).reshape(-1), dtype=torch.bool)
        cos = e @ t
        obj.append(float(cos[mask].mean()))
        bg.append(float(cos[~mask].mean()))
    assert sum(bg) / len(bg) > sum(obj) / len(obj) + 0.05, (obj, bg)  # -cos: objects more relevant
    processor.tokenizer.padding_side = "left"
    inputs = processor(images=[s.image for s in samples[:4]], padding=True, return_tensors="pt",
                       text=[default_prompt(model, processor, s.question) for s in samples[:4]])
    vtprune.apply(model, "cdpruner", keep=7, relevance="clip", clip_model="toy-llava-clip")
    with torch.no_grad():
        model.generate(**inputs, max_new_tokens=2, do_sample=False)
    st = vtprune.stats(model)
    rel = model._vtprune_state.scorer.last_relevance
    vtprune.remove(model)
    assert st.visual_after == [7] * 4 and all(torch.isfinite(r).all() for r in rel)


def _greedy_logdet(kernel: torch.Tensor, k: int) -> list[int]:
    """Greedy DPP MAP by determinants (independent of the incremental Cholesky): each step adds the
    token that maximises ``det L[S + j]``."""
    chosen: list[int] = []
    for _ in range(k):
        best, arg = -float("inf"), -1
        for j in range(kernel.shape[0]):
            if j in chosen:
                continue
            idx = torch.tensor(chosen + [j])
            d = float(torch.linalg.det(kernel[idx][:, idx]))
            if d > best:
                best, arg = d, j
        chosen.append(arg)
    return chosen


def _next_run(next_processor, keep, **options):
    model = get_model("next")
    inputs = batch(next_processor, [1], sizes=((300, 620),))
    st, lay, scorer = run_pruned(model, inputs, "cdpruner", keep=keep, **options)
    return model, inputs, st, lay, list(scorer.last_relevance)


def test_next_selects_per_tile_like_the_release(next_processor):
    """The default on LLaVA-NeXT: the DPP on every tile's whole grid with ``keep`` each, from the tile's
    projector outputs (padding rows included) and the text relevance normalised over all the image's tiles,
    mapped onto HF's unpadded sequence, newlines dropped."""
    keep = 6
    model, inputs, st, lay, _ = _next_run(next_processor, keep)
    core = model.model
    with torch.no_grad():
        hidden = core.vision_tower(next_tiles(model, inputs), output_hidden_states=True).hidden_states[-2][:, 1:]
        z = torch.nn.functional.normalize(core.multi_modal_projector(hidden).double(), dim=-1)  # [T, 576, D]
        ids = inputs["input_ids"][0]
        after = ids[int(torch.nonzero(ids == model.config.image_token_id).max()) + 1:]  # the instruction
        words = torch.nn.functional.normalize(model.get_input_embeddings()(after).double(), dim=-1)
    r = (z @ words.T).mean(-1)  # [T, 576]
    r = (r - r.min() + 1e-6) / (r.max() - r.min())  # the release's normalisation, over all tiles at once
    picks = [set(_greedy_logdet(r[t, :, None] * (z[t] @ z[t].T) * r[t, None, :], keep)) for t in range(z.shape[0])]
    stride = z.shape[1] + 1
    src = lay.source[0].tolist()
    expected = [i for i, s in enumerate(src) if s >= 0 and (s % stride) - 1 in picks[s // stride]]
    assert st.kept[0].tolist() == expected
    assert not (~lay.prunable[0][st.kept[0]]).any()  # the release feeds no newlines
    assert sum(1 for i in expected if src[i] // stride == 0) == keep  # the base tile: exactly keep


def test_next_relevance_is_normalised_over_the_image_tiles_together(next_processor):
    _, inputs, st, lay, relevance = _next_run(next_processor, 8)
    tiles = int(inputs["pixel_values"].shape[1])
    assert len(relevance) == 1 and relevance[0].numel() == tiles * 576  # one image: every tile's rows at once
    r = relevance[0]
    span = float(r.max() - r.min())
    assert span == pytest.approx(1.0, abs=1e-5) and float(r.min()) < 1e-4
    per_image = _next_run(next_processor, 8, budget_per="image")
    assert (~per_image[3].prunable[0][per_image[2].kept[0]]).any()  # budget_per='image': newlines kept
    assert int(per_image[3].prunable[0][per_image[2].kept[0]].sum()) == 8
    with pytest.raises(ConfigError, match="budget_per"):
        CDPruner(budget_per="tiles")


def test_batched_dpp_map_picks_as_one_call_per_kernel():
    from vtprune.scorers.greedy import dpp_map

    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 50, 16, generator=g)
    r = torch.rand(4, 50, generator=g)
    unit = torch.nn.functional.normalize(x, dim=-1)
    kernels = dpp_kernel(unit @ unit.transpose(1, 2), r, None)
    batched = dpp_map(kernels, 12)
    assert batched.shape == (4, 12)
    for t in range(4):
        assert batched[t].tolist() == dpp_map(kernels[t], 12).tolist()
        assert len(set(batched[t].tolist())) == 12
    assert dpp_map(kernels, 0).shape == (4, 0)
