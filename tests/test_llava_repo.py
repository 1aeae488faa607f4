"""The original LLaVA codebase (``llava.model.LlavaLlamaForCausalLM``): the same exactness oracles as the
transformers adapters, on a tiny random model built from configs (its CLIP tower saved locally first).

Runs wherever the repository's code imports: in the transformers 4.37 environment of
``scripts/setup_llava_repo.sh`` (the repository's pin) and in the main transformers 5 environment
(``llava-torch`` installed with ``--no-deps``). The visual positions of the spliced sequence are
computed here independently of vtprune: each ``IMAGE_TOKEN_INDEX`` of an unpadded prompt becomes 576
rows at its place, and the batch is re-padded on ``config.tokenizer_padding_side``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from oracle import staged_masked_logits
from PIL import Image

import vtprune
from vtprune.toy.tiny_llava_repo import IMAGE_TOKEN_INDEX, llava_repo_available, tiny_llava_repo

if not llava_repo_available():
    pytest.skip("the LLaVA repository's code is not installed (pip install --no-deps llava-torch==1.2.2.post1)",
                allow_module_level=True)

import transformers  # noqa: E402
from llava.mm_utils import process_images, tokenizer_image_token  # noqa: E402

from vtprune.adapters import UnsupportedModelError  # noqa: E402
from vtprune.config import ConfigError  # noqa: E402

pytestmark = pytest.mark.transformers4

P = 576  # tokens per image (336 px, patch 14)
_MODELS: dict = {}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("llava-repo")


def get(workdir, padding_side: str = "right", attn: str = "sdpa", **kw):
    key = (padding_side, attn, tuple(sorted(kw.items())))
    if key not in _MODELS:
        _MODELS[key] = tiny_llava_repo(workdir, padding_side=padding_side, attn_implementation=attn, **kw)
    model, tok, ip = _MODELS[key]
    vtprune.remove(model)
    return model, tok, ip


def image(seed: int, h: int = 300, w: int = 420) -> Image.Image:
    return Image.fromarray((np.random.default_rng(seed).random((h, w, 3)) * 255).astype("uint8"))


QUESTIONS = ["What is in the picture?", "Which colour is the large shape? Answer with a single word."]


def make_batch(tok, ip, model, n_images: list[int], side: str):
    """Prompts with ``n_images[b]`` images each, padded on ``side``; the images of all prompts in order."""
    rows = []
    for b, k in enumerate(n_images):
        prompt = "USER: " + "<image>\n" * k + QUESTIONS[b % 2] + " ASSISTANT:"
        rows.append(tokenizer_image_token(prompt, tok, IMAGE_TOKEN_INDEX, return_tensors="pt"))
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), tok.pad_token_id, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for b, r in enumerate(rows):
        sl = slice(width - len(r), width) if side == "left" else slice(0, len(r))
        ids[b, sl], mask[b, sl] = r, 1
    pics = [image(10 * b + j, 280 + 40 * j, 400) for b, k in enumerate(n_images) for j in range(k)]
    images = process_images(pics, ip, model.config) if pics else None
    return ids, mask, images


def spliced_layout(ids, mask, side: str):
    """``(visual [B, N], valid [B, N])`` of the sequence the repository builds, computed independently."""
    lengths, starts = [], []
    for b in range(ids.shape[0]):
        u = ids[b][mask[b].bool()]
        where = torch.nonzero(u == IMAGE_TOKEN_INDEX).flatten().tolist()
        starts.append([i + j * (P - 1) for j, i in enumerate(where)])
        lengths.append(len(u) + len(where) * (P - 1))
    n = max(lengths)
    visual = torch.zeros(ids.shape[0], n, dtype=torch.bool)
    valid = torch.zeros_like(visual)
    for b, (length, st) in enumerate(zip(lengths, starts)):
        off = n - length if side == "left" else 0
        valid[b, off:off + length] = True
        for s in st:
            visual[b, off + s:off + s + P] = True
    return visual, valid


def dropped_from(stats, visual):
    dropped = visual.clone()
    for b in range(visual.shape[0]):
        pos = torch.nonzero(visual[b]).flatten()
        dropped[b, pos[stats.kept[b]]] = False
    return dropped


def masked_logits(model, inputs: dict, layer: int, dropped: torch.Tensor, valid: torch.Tensor, stages=None):
    """Unpatched forward (no cache) with ``dropped`` key columns hidden from the layers after ``layer``
    (or, with ``stages`` = ``[(K_j, dropped_j)]``, each stage's columns from the layers after K_j), on the
    repository's spliced sequence (``valid`` its real positions)."""
    return staged_masked_logits(model, inputs, stages or [(layer, dropped)], layers=model.model.layers, valid=valid)


@pytest.mark.parametrize("method", ["transprune", "sparsevlm"])
def test_staged_methods_drop_equals_staged_masking(workdir, method):
    model, tok, ip = get(workdir, "right", "eager")
    ids, mask, images = make_batch(tok, ip, model, [2, 1], "right")
    inputs = dict(input_ids=ids, attention_mask=mask, images=images)
    extra = {"recycle": False} if method == "sparsevlm" else {}  # recycled states: tests/test_sparsevlm.py
    vtprune.apply(model, method, keep=20, layers=[0, 1, 2], ratios=[0.5, 0.25], **extra)
    with torch.no_grad():
        pruned = model(**inputs).logits
    st = vtprune.stats(model)
    vtprune.remove(model)
    visual, valid = spliced_layout(ids, mask, "right")
    stages = [(s["layer"], dropped_from(_Kept(s["kept"]), visual)) for s in st.stages]
    ref = masked_logits(model, inputs, 0, None, valid, stages=stages)
    check = valid & ~stages[-1][1]
    assert st.visual_after == [40, 20]
    torch.testing.assert_close(pruned[check], ref[check], atol=3e-5, rtol=1e-4)


class _Kept:
    def __init__(self, kept):
        self.kept = kept


def repo_generate_works(model, tok, ip) -> bool:
    ids, _, images = make_batch(tok, ip, model, [1], "left")
    try:
        model.generate(ids, images=images, max_new_tokens=1, do_sample=False)
    except TypeError:  # transformers >= 5.24 passes `cache`, which the repository's forward() does not take
        return False
    return True


CASES = {
    "single": ([1], "right"),
    "right_padded_2": ([1, 1], "right"),
    "left_padded_2": ([1, 1], "left"),
    "two_images": ([2], "right"),
    "ragged_images": ([2, 1], "right"),
}


VFLOWOPT = {"llm_layers": [1, 2], "cell": 8}  # the tiny LLM's stages after the pre-LLM one (4 layers)


@pytest.mark.parametrize("method,kw", [("fastv", {"layer": 1}), ("cls", {}), ("random", {"layer": 2}),
                                       ("flowcut", {}), ("vflowopt", VFLOWOPT)])
def test_keep_all_is_identical(workdir, method, kw):
    model, tok, ip = get(workdir)
    ids, mask, images = make_batch(tok, ip, model, [1, 1], "right")
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask, images=images).logits
        vtprune.apply(model, method, keep=1.0, **kw)
        out = model(input_ids=ids, attention_mask=mask, images=images).logits
    st = vtprune.stats(model)
    vtprune.remove(model)
    assert st.visual_before == [P, P] and st.visual_after == [P, P]
    assert torch.equal(out, ref)


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_in_llm_drop_equals_masking(workdir, case, attn):
    n_images, side = CASES[case]
    model, tok, ip = get(workdir, side, attn)
    ids, mask, images = make_batch(tok, ip, model, n_images, side)
    inputs = dict(input_ids=ids, attention_mask=mask, images=images)
    vtprune.apply(model, "fastv", keep=40, layer=1)
    with torch.no_grad():
        pruned = model(**inputs).logits
    st = vtprune.stats(model)
    vtprune.remove(model)
    visual, valid = spliced_layout(ids, mask, side)
    assert st.visual_before == [P * k for k in n_images] and st.visual_after == [40 * k for k in n_images]
    dropped = dropped_from(st, visual)
    ref = masked_logits(model, inputs, 1, dropped, valid)
    assert pruned.shape == ref.shape
    check = valid & ~dropped
    torch.testing.assert_close(pruned[check], ref[check], atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("method", ["cls", "vtc-cls", "uniform", "divprune", "zoo"])
def test_pre_llm_equals_shortened_sequence(workdir, case, method):
    n_images, side = CASES[case]
    model, tok, ip = get(workdir, side)
    ids, mask, images = make_batch(tok, ip, model, n_images, side)
    vtprune.apply(model, method, keep=32)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, images=images).logits
    st = vtprune.stats(model)
    vtprune.remove(model)
    assert st.stage == "pre-llm" and st.visual_after == [32 * k for k in n_images]
    visual, valid = spliced_layout(ids, mask, side)
    dropped = dropped_from(st, visual)
    with torch.no_grad():
        embeds = model.prepare_inputs_labels_for_multimodal(ids, None, mask, None, None, images)[4]
    rows = [torch.nonzero(valid[b] & ~dropped[b]).flatten() for b in range(ids.shape[0])]
    width = max(len(r) for r in rows)
    short = torch.zeros(len(rows), width, embeds.shape[-1])
    short_mask = torch.zeros(len(rows), width, dtype=torch.long)
    for b, r in enumerate(rows):  # vtprune re-pads on the side the repository padded (left when unpadded)
        sl = slice(0, len(r)) if side == "right" and len(n_images) > 1 else slice(width - len(r), width)
        short[b, sl], short_mask[b, sl] = embeds[b, r], 1
    with torch.no_grad():
        ref = model(inputs_embeds=short, attention_mask=short_mask).logits
    assert out.shape == ref.shape
    check = short_mask.bool()
    torch.testing.assert_close(out[check], ref[check], atol=2e-5, rtol=1e-4)
    assert st.seq_len_after == short_mask.sum(1).tolist()


def test_labels_follow_the_tokens(workdir):
    """A caller's labels (lmms-eval's loglikelihood passes them) land on the same text tokens."""
    model, tok, ip = get(workdir)
    ids, mask, images = make_batch(tok, ip, model, [1, 2], "right")
    labels = torch.where(mask.bool() & (ids != IMAGE_TOKEN_INDEX), ids, torch.full_like(ids, -100))
    labels[:, :3] = -100
    with torch.no_grad():
        ref = model.prepare_inputs_labels_for_multimodal(ids, None, mask, None, labels, images)
        ref_loss = model(input_ids=ids, attention_mask=mask, images=images, labels=labels).loss
        vtprune.apply(model, "fastv", keep=1.0, layer=1)
        got = model.prepare_inputs_labels_for_multimodal(ids, None, mask, None, labels, images)
        loss = model(input_ids=ids, attention_mask=mask, images=images, labels=labels).loss
        vtprune.apply(model, "cls", keep=16)
        short_loss = model(input_ids=ids, attention_mask=mask, images=images, labels=labels).loss
    vtprune.remove(model)
    assert torch.equal(got[5], ref[5]) and torch.equal(got[2], ref[2]) and torch.equal(got[4], ref[4])
    assert torch.equal(loss, ref_loss)
    assert torch.isfinite(short_loss)  # the image rows carry no label: the text labels survive shortening


def test_generate_keep_all_and_pruned_decode_matches_masking(workdir):
    """Decode steps after in-LLM pruning (layers <= K cache N entries, later ones N') match the oracle."""
    model, tok, ip = get(workdir, "left")
    ids, mask, images = make_batch(tok, ip, model, [1, 1], "left")
    if not repo_generate_works(model, tok, ip):
        pytest.skip(f"the LLaVA repository's generate() does not run on transformers {transformers.__version__}")
    gen = dict(max_new_tokens=5, do_sample=False, output_scores=True, return_dict_in_generate=True)
    with torch.no_grad():
        ref = model.generate(ids, attention_mask=mask, images=images, **gen)
        vtprune.apply(model, "fastv", keep=1.0, layer=1)
        same = model.generate(ids, attention_mask=mask, images=images, **gen)
        vtprune.apply(model, "fastv", keep=24, layer=1)
        out = model.generate(ids, attention_mask=mask, images=images, **gen)
    st = vtprune.stats(model)
    vtprune.remove(model)
    assert torch.equal(same.sequences, ref.sequences)
    new = out.sequences[:, -len(out.scores):]
    full_ids = torch.cat([ids, new], 1)
    full_mask = torch.cat([mask, torch.ones_like(new)], 1)
    visual, valid = spliced_layout(full_ids, full_mask, "left")
    n = visual.shape[1] - new.shape[1]
    dropped = dropped_from(st, visual)
    # generate's positions count real tokens; given any position_ids, the repository builds exactly those
    inputs = dict(input_ids=full_ids, attention_mask=full_mask, images=images, position_ids=torch.zeros_like(full_ids))
    logits = masked_logits(model, inputs, 1, dropped, valid)
    for i, step in enumerate(out.scores):
        torch.testing.assert_close(step, logits[:, n - 1 + i], atol=3e-5, rtol=1e-4)


@pytest.mark.parametrize("method,kw", [("cls", {}), ("fastv", {"layer": 1}), ("visionzip", {}), ("flowcut", {}),
                                       ("vflowopt", VFLOWOPT)])
def test_generate_after_pruning(workdir, method, kw):
    model, tok, ip = get(workdir, "left")
    ids, mask, images = make_batch(tok, ip, model, [2, 1], "left")
    if not repo_generate_works(model, tok, ip):
        pytest.skip(f"the LLaVA repository's generate() does not run on transformers {transformers.__version__}")
    vtprune.apply(model, method, keep=16, **kw)
    with torch.no_grad():
        out = model.generate(ids, attention_mask=mask, images=images, max_new_tokens=4, do_sample=False)
        again = model.generate(ids, attention_mask=mask, images=images, max_new_tokens=4, do_sample=False)
    st = vtprune.stats(model)
    vtprune.remove(model)
    assert out.shape[0] == 2 and torch.equal(out, again)
    assert st.visual_after == [32, 16]
    if method == "visionzip":  # 16 = 14 dominant + 2 contextual per image (54:10 of 64, rounded)
        assert st.contextual is not None and all(c > 0 for c in st.contextual)


def deep_tower_model(workdir):
    """A tiny repository model with a 6-layer tower (FlowCut scores after layers 0..3, prunes after 1 and 3)
    and sharper vision attention, so that its middle stage prunes."""
    key = ("deep-tower",)
    if key not in _MODELS:
        model, tok, ip = tiny_llava_repo(workdir, vision_layers=6, seed=1)
        for layer in _clip_layers(model):
            layer.self_attn.q_proj.weight.data *= 8
            layer.self_attn.k_proj.weight.data *= 8
        _MODELS[key] = (model, tok, ip)
    model, tok, ip = _MODELS[key]
    vtprune.remove(model)
    return model, tok, ip


def _clip(model):
    clip = model.get_vision_tower().vision_tower  # transformers' CLIPVisionModel (4.x: its .vision_model)
    return getattr(clip, "vision_model", clip)


def _clip_layers(model):
    return _clip(model).encoder.layers


@pytest.mark.parametrize("case", ["single", "ragged_images"])
def test_flowcut_prunes_inside_the_repository_tower(workdir, case):
    """FlowCut's vision stage inside the repository's CLIPVisionTower equals FlowCut run by dropping the
    pruned patches from the tower (tests/test_flowcut.py's reference): the same kept patches, the same
    features spliced into the prompt, and the unpatched LLM on that prompt gives the same logits."""
    from test_flowcut import reference_tower_flowcut

    n_images, side = CASES[case]
    model, tok, ip = deep_tower_model(workdir)
    ids, mask, images = make_batch(tok, ip, model, n_images, side)
    t = 24
    vtprune.apply(model, "flowcut", keep=t)
    with torch.no_grad():
        pruned = model(input_ids=ids, attention_mask=mask, images=images).logits
        short = model.prepare_inputs_labels_for_multimodal(ids, None, mask, None, None, images)
    st = vtprune.stats(model)
    vtprune.remove(model)
    assert st.stage == "pre-llm" and st.visual_after == [t * k for k in n_images]
    tower = model.get_vision_tower()
    kept, feats, stages = reference_tower_flowcut(_clip(model), tower.select_layer, model.get_model().mm_projector,
                                                  images, t)
    assert all(P > c[1] > t for c in stages)  # layer 1 pruned (so the masking mattered) ...
    assert all(c[-1] == t for c in stages)  # ... and the last one reached the target
    image = 0
    for b, k in enumerate(n_images):  # per sample the kept patches of its images, in order
        want = torch.cat([kept[image + j] + j * P for j in range(k)])
        assert torch.equal(st.kept[b], want)
        image += k
    _, _, short_mask, _, short_embeds, _ = short
    visual, valid = spliced_layout(ids, mask, side)
    dropped = dropped_from(st, visual)
    image = 0
    for b, k in enumerate(n_images):  # the spliced rows of the kept patches hold the dropped tower's features
        rows = torch.nonzero(short_mask[b].bool()).flatten()
        keep_rows = torch.nonzero(valid[b] & ~dropped[b]).flatten()
        vis_rows = rows[visual[b, keep_rows]]
        torch.testing.assert_close(short_embeds[b, vis_rows], torch.cat(feats[image:image + k]), atol=2e-5, rtol=1e-4)
        image += k
    with torch.no_grad():
        ref = model(inputs_embeds=short_embeds, attention_mask=short_mask).logits
    check = short_mask.bool()
    torch.testing.assert_close(pruned[check], ref[check], atol=2e-5, rtol=1e-4)


def test_vflowopt_generate_decodes_its_pruned_prompt(workdir):
    """VFlowOpt's pre-LLM stage and LLM stages under the repository's generate(): every decode step equals
    the pruned forward of the prompt plus the tokens generated so far (VFlowOpt's importance comes from the
    vision tower only, so that forward keeps the same tokens), a left-padded batch of two."""
    model, tok, ip = get(workdir, "left")
    ids, mask, images = make_batch(tok, ip, model, [1, 1], "left")
    if not repo_generate_works(model, tok, ip):
        pytest.skip(f"the LLaVA repository's generate() does not run on transformers {transformers.__version__}")
    vtprune.apply(model, "vflowopt", keep=24, **VFLOWOPT)
    with torch.no_grad():
        out = model.generate(ids, attention_mask=mask, images=images, max_new_tokens=4, do_sample=False,
                             output_scores=True, return_dict_in_generate=True)
        st = vtprune.stats(model)
        new = out.sequences[:, -len(out.scores):]
        full_ids, full_mask = torch.cat([ids, new], 1), torch.cat([mask, torch.ones_like(new)], 1)
        # generate's positions count real tokens; given any position_ids, the repository builds exactly those
        logits = model(input_ids=full_ids, attention_mask=full_mask, images=images,
                       position_ids=torch.zeros_like(full_ids)).logits
        st_full = vtprune.stats(model)
    vtprune.remove(model)
    assert [s["layer"] for s in st.stages] == [None, 1, 2] and st.visual_after == [24, 24]
    assert all(torch.equal(a, b) for a, b in zip(st.kept, st_full.kept))
    n = logits.shape[1] - new.shape[1]  # the shortened prompt's width
    for i, step in enumerate(out.scores):
        torch.testing.assert_close(step, logits[:, n - 1 + i], atol=3e-5, rtol=1e-4)


def test_refuses_what_it_cannot_do(workdir):
    model, tok, ip = get(workdir)
    with pytest.raises(ConfigError, match="vision tower only"):  # LLaVA-1.5: FlowCut prunes before the LLM
        vtprune.apply(model, "flowcut", keep=32, layer=1)
    model.config.mm_patch_merge_type = "spatial_unpad"
    try:
        with pytest.raises(UnsupportedModelError, match="LLaVA-1.6 anyres"):
            vtprune.apply(model, "cls", keep=32)
    finally:
        model.config.mm_patch_merge_type = "flat"
    tower = model.get_vision_tower()
    tower.is_loaded = False
    try:
        with pytest.raises(UnsupportedModelError, match="load_model"):
            vtprune.apply(model, "cls", keep=32)
    finally:
        tower.is_loaded = True
    assert not hasattr(model, "_vtprune_state")


def test_untested_transformers_4_releases_are_refused(workdir, monkeypatch):
    model, tok, ip = get(workdir)
    monkeypatch.setattr(transformers, "__version__", "4.45.2")
    with pytest.raises(UnsupportedModelError, match="tested on transformers 4.37.*not on 4.45.2.*transformers==4.37.2"):
        vtprune.apply(model, "fastv", keep=8, layer=1)
    monkeypatch.setattr(transformers, "__version__", "4.36.2")
    with pytest.raises(UnsupportedModelError, match="needs transformers>=4.37"):
        vtprune.apply(model, "fastv", keep=8, layer=1)
    assert not hasattr(model, "_vtprune_state")


def test_cls_patch_feature_keeps_the_cls_row(workdir):
    """``mm_vision_select_feature="cls_patch"``: 577 tokens per image, CLS first, all prunable."""
    model, tok, ip = get(workdir, select_feature="cls_patch")
    ids, mask, images = make_batch(tok, ip, model, [1], "right")
    vtprune.apply(model, "cls", keep=1.0)
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask, images=images)
    st = vtprune.stats(model)
    scores = st.scores[0]
    vtprune.remove(model)
    assert st.visual_before == [P + 1]
    assert scores.shape == (P + 1,) and torch.isfinite(scores).all()


def test_load_pretrained_model_from_disk(workdir, tmp_path):
    """The repository's own loader on a saved tiny checkpoint (fp16 on the CPU, as it loads by default)."""
    from llava.model.builder import load_pretrained_model

    model, tok, ip = get(workdir)
    model.save_pretrained(tmp_path / "llava-v1.5-tiny")
    tok.save_pretrained(tmp_path / "llava-v1.5-tiny")
    try:
        tokenizer, loaded, processor, context = load_pretrained_model(
            str(tmp_path / "llava-v1.5-tiny"), None, "llava-v1.5-tiny", device_map="cpu", device="cpu")
    except (ImportError, ValueError, OSError) as exc:  # transformers 5 changed the loader's assumptions
        if transformers.__version__.startswith("4."):
            raise
        pytest.skip(f"the LLaVA repository's load_pretrained_model does not run on transformers "
                    f"{transformers.__version__}: {exc}")
    ids, mask, images = make_batch(tokenizer, processor, loaded, [1], "right")
    images = images.to(loaded.dtype)
    with torch.no_grad():
        ref = loaded(input_ids=ids, images=images).logits
        vtprune.apply(loaded, "fastv", keep=1.0, layer=1)
        same = loaded(input_ids=ids, images=images).logits
        vtprune.apply(loaded, "cls", keep=64)
        short = loaded(input_ids=ids, images=images).logits
    vtprune.remove(loaded)
    assert torch.equal(same, ref)
    assert short.shape[1] == ref.shape[1] - (P - 64)


def transformers_twin(model):
    """transformers' ``LlavaForConditionalGeneration`` with the repository model's weights.

    The same CLIP tower, projector (``mlp2x_gelu`` = linear_1, GELU, linear_2) and Llama; its vocabulary
    has one extra id, the ``<image>`` placeholder the processor repeats 576 times.
    """
    from transformers import LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    rc = model.config
    vocab = rc.vocab_size + 1
    text = LlamaConfig(vocab_size=vocab, hidden_size=rc.hidden_size, intermediate_size=rc.intermediate_size,
                       num_hidden_layers=rc.num_hidden_layers, num_attention_heads=rc.num_attention_heads,
                       num_key_value_heads=rc.num_key_value_heads, max_position_embeddings=rc.max_position_embeddings,
                       pad_token_id=3, bos_token_id=1, eos_token_id=2)
    tower = model.get_vision_tower()
    cfg = LlavaConfig(vision_config=tower.config, text_config=text, image_token_id=vocab - 1, vision_feature_layer=-2,
                      vision_feature_select_strategy="default", projector_hidden_act="gelu", image_seq_length=P)
    twin = LlavaForConditionalGeneration._from_config(cfg, attn_implementation="sdpa").eval()
    with torch.no_grad():
        twin.model.vision_tower.load_state_dict(tower.vision_tower.state_dict())
        proj = model.get_model().mm_projector
        twin.model.multi_modal_projector.linear_1.load_state_dict(proj[0].state_dict())
        twin.model.multi_modal_projector.linear_2.load_state_dict(proj[2].state_dict())
        lm = {k: v for k, v in model.get_model().state_dict().items()
              if not k.startswith(("vision_tower.", "mm_projector.", "embed_tokens."))}
        missing = twin.model.language_model.load_state_dict(lm, strict=False).missing_keys
        assert missing == ["embed_tokens.weight"]
        twin.model.language_model.embed_tokens.weight[: rc.vocab_size] = model.get_model().embed_tokens.weight
        twin.lm_head.weight.zero_()
        twin.lm_head.weight[: rc.vocab_size] = model.lm_head.weight
    return twin


@pytest.mark.skipif(int(transformers.__version__.split(".")[0]) < 5, reason="transformers' LLaVA adapter needs 5.x")
@pytest.mark.parametrize("method,kw", [
    (None, {}), ("fastv", {"keep": 64, "layer": 1}), ("cls", {"keep": 64}), ("vtc-cls", {"keep": 48}),
    ("visionzip", {"keep": 64}), ("debias+fastv", {"keep": 32, "layer": 2}), ("uniform", {"keep": 36}),
    ("divprune", {"keep": 24}), ("zoo", {"keep": 24, "directions": 16}), ("flowcut", {"keep": 40}),
    ("vflowopt", {"keep": 24, **VFLOWOPT}),
])
def test_same_result_as_the_transformers_llava_with_the_same_weights(workdir, method, kw):
    """The repository's model and transformers' LLaVA carrying its weights prune alike: same kept tokens,
    same logits on the real tokens (one sample and a right-padded batch of two). VFlowOpt: the same tokens
    after its pre-LLM stage and after each LLM stage, the logits of every token the LLM received."""
    model, tok, ip = get(workdir)
    twin = _MODELS.setdefault(("twin",), transformers_twin(model))
    vtprune.remove(twin)
    ids, mask, images = make_batch(tok, ip, model, [1, 1], "right")
    rows = []
    for b in range(ids.shape[0]):
        row = ids[b][mask[b].bool()]
        cut = int(torch.nonzero(row == IMAGE_TOKEN_INDEX)[0])
        rows.append(torch.cat([row[:cut], torch.full((P,), twin.config.image_token_id), row[cut + 1:]]))
    width = max(len(r) for r in rows)
    hf_ids = torch.full((len(rows), width), tok.pad_token_id)
    hf_mask = torch.zeros_like(hf_ids)
    for b, r in enumerate(rows):
        hf_ids[b, : len(r)], hf_mask[b, : len(r)] = r, 1
    if method is not None:
        vtprune.apply(model, method, **kw)
        vtprune.apply(twin, method, **kw)
    with torch.no_grad():
        ours = model(input_ids=ids, attention_mask=mask, images=images).logits
        theirs = twin(input_ids=hf_ids, attention_mask=hf_mask, pixel_values=images).logits[..., : model.config.vocab_size]
    st, st_twin = vtprune.stats(model), vtprune.stats(twin)
    vtprune.remove(model)
    vtprune.remove(twin)
    lengths = hf_mask.sum(1).tolist()
    if method is not None:
        assert all(torch.equal(a, b) for a, b in zip(st.kept, st_twin.kept))
        assert st.seq_len_after == st_twin.seq_len_after
        assert (st.stages is None) == (st_twin.stages is None)
        for ours_stage, twin_stage in zip(st.stages or [], st_twin.stages or []):
            assert ours_stage["layer"] == twin_stage["layer"]
            assert all(torch.equal(a, b) for a, b in zip(ours_stage["kept"], twin_stage["kept"]))
        first = st.stages[0]["visual_after"] if st.stages else st.visual_after  # what the LLM received
        lengths = [n - v + k for n, v, k in zip(st.seq_len_before, st.visual_before, first)]
    for b, n in enumerate(lengths):
        torch.testing.assert_close(ours[b, :n], theirs[b, :n], atol=2e-5, rtol=1e-4)


@pytest.mark.skipif(int(transformers.__version__.split(".")[0]) < 5, reason="transformers' LLaVA adapter needs 5.x")
def test_cdpruner_clip_relevance_reaches_the_instruction_ids(workdir, tmp_path):
    """cdpruner's relevance='clip' decodes the instruction's ids: the repository's runtime hands over the
    spliced prompt's text ids, so it keeps the tokens transformers' LLaVA with the same weights keeps."""
    pytest.importorskip("open_clip")
    from conftest import register_tiny_clip

    clip = register_tiny_clip(tmp_path, "vtprune-tiny-clip-repo")
    model, tok, ip = get(workdir)
    tok.save_pretrained(tmp_path / "tok")
    twin = _MODELS.setdefault(("twin",), transformers_twin(model))
    vtprune.remove(twin)
    ids, mask, images = make_batch(tok, ip, model, [1], "right")
    row = ids[0]
    cut = int(torch.nonzero(row == IMAGE_TOKEN_INDEX)[0])
    hf_ids = torch.cat([row[:cut], torch.full((P,), twin.config.image_token_id), row[cut + 1:]])[None]
    kw = dict(keep=16, relevance="clip", clip_model=clip, tokenizer=str(tmp_path / "tok"))
    kept = []
    try:
        for m, inputs in [(model, dict(input_ids=ids, attention_mask=mask, images=images)),
                          (twin, dict(input_ids=hf_ids, attention_mask=torch.ones_like(hf_ids), pixel_values=images))]:
            torch.manual_seed(0)  # the tiny CLIP is built from its config at apply: the same weights for both
            vtprune.apply(m, "cdpruner", **kw)
            with torch.no_grad():
                m(**inputs)
            kept.append(vtprune.stats(m).kept[0])
            vtprune.apply(m, "cdpruner", keep=16)  # relevance='text': a different selection
            with torch.no_grad():
                m(**inputs)
            kept.append(vtprune.stats(m).kept[0])
    finally:
        vtprune.remove(model)
        vtprune.remove(twin)
    assert torch.equal(kept[0], kept[2]) and torch.equal(kept[1], kept[3])
    assert not torch.equal(kept[0], kept[1])
