"""Shared fixtures: tiny random LLaVA models (no downloads), their processors and test images."""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import numpy as np
import pytest
import torch
import transformers
from PIL import Image

import vtprune
from vtprune.toy.tiny import tiny_llava, tiny_llava_processor
from vtprune.toy.tiny_qwen import tiny_qwen, tiny_qwen_processor

# The suite also runs on transformers 4.37 (scripts/setup_llava_repo.sh: the original LLaVA codebase's
# environment), where only the tests marked `transformers4` apply.
TRANSFORMERS_MAJOR = int(transformers.__version__.split(".")[0])


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", default=False, help="run tests marked slow")


def pytest_configure(config):
    """Hypothesis: ``--runslow`` loads the ``vtprune-slow`` profile, whose ``max_examples`` (20x hypothesis'
    default of 100) the property tests (tests/test_properties.py) scale their CI example counts by."""
    try:
        from hypothesis import settings
    except ImportError:  # the transformers-4 environment (scripts/setup_llava_repo.sh) has no hypothesis
        return
    settings.register_profile("vtprune-slow", max_examples=2000)
    if config.getoption("--runslow"):
        settings.load_profile("vtprune-slow")


def pytest_collection_modifyitems(config, items):
    skip_slow = pytest.mark.skip(reason="slow: pass --runslow to run")
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    skip_v4 = pytest.mark.skip(reason=f"needs transformers 5 (this environment has {transformers.__version__}; "
                                      "only tests marked transformers4 run here)")
    for item in items:
        if TRANSFORMERS_MAJOR < 5 and "transformers4" not in item.keywords:
            item.add_marker(skip_v4)
        if "slow" in item.keywords and not config.getoption("--runslow"):
            item.add_marker(skip_slow)
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)


def register_tiny_clip(folder, name: str) -> str:
    """Register with open_clip a tiny random CLIP (config written to ``folder``) whose vision width (32) matches
    the tiny LLaVA towers; returns its name (for cdpruner's ``clip_model``)."""
    import json

    import open_clip

    cfg = {"embed_dim": 16,
           "vision_cfg": {"image_size": 336, "layers": 1, "width": 32, "head_width": 8, "patch_size": 14},
           "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 4, "layers": 1}}
    path = Path(folder) / f"{name}.json"
    path.write_text(json.dumps(cfg))
    open_clip.add_model_config(path)
    return name


EXITS = {"dyvte"}  # visual-token exits: every visual token leaves at the exit (0 kept); they refuse token counts


def budget_for(method: str, keep):
    """The budget a test that sweeps presets gives ``method``: an exit (`EXITS`) takes no token count, so a
    count covering every image (>= 10 000, a keep-all test) becomes 1.0 and any other count 0.5 ("exit")."""
    if method.split("+")[-1] in EXITS and isinstance(keep, int) and not isinstance(keep, bool):
        return 1.0 if keep >= 10_000 else 0.5
    return keep


def make_image(h: int, w: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray((rng.random((h, w, 3)) * 255).astype("uint8"))


_MODELS: dict = {}


def get_model(kind: str, attn: str = "sdpa"):
    """A cached tiny model, unpatched: ``"llava"``, ``"next"`` or a Qwen kind (``"qwen2_vl"``, ...)."""
    key = (kind, attn)
    if key not in _MODELS:
        if kind.startswith("qwen"):
            _MODELS[key] = tiny_qwen(kind, attn_implementation=attn)
        else:
            _MODELS[key] = tiny_llava(next_=kind == "next", attn_implementation=attn)
    model = _MODELS[key]
    vtprune.remove(model)
    return model


@pytest.fixture
def llava():
    model = get_model("llava")
    yield model
    vtprune.remove(model)


@pytest.fixture
def llava_next():
    model = get_model("next")
    yield model
    vtprune.remove(model)


@pytest.fixture(scope="session")
def processor():
    return tiny_llava_processor()


@pytest.fixture(scope="session")
def next_processor():
    return tiny_llava_processor(next_=True)


def prompts(n_images: list[int]) -> list[str]:
    """One prompt per sample with the given number of <image> placeholders, of different lengths."""
    out = []
    for i, n in enumerate(n_images):
        imgs = " ".join(["<image>"] * n)
        out.append(f"USER: {imgs}\n" + "What is in the picture? " * (i + 1) + "ASSISTANT:")
    return out


def batch(proc, n_images: list[int], padding_side: str = "left", sizes=((400, 500),)):
    """Processor outputs for samples holding ``n_images[b]`` images each."""
    images, k = [], 0
    for n in n_images:
        for _ in range(n):
            h, w = sizes[k % len(sizes)]
            images.append(make_image(h, w, seed=k))
            k += 1
    proc.tokenizer.padding_side = padding_side
    return proc(images=images, text=prompts(n_images), return_tensors="pt", padding=True)


def feature_layer_by_hand(model, pixel_values) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The unpatched CLIP tower's feature layer (``hidden_states[-2]``) on ``pixel_values`` ``[T, 3, H, W]``,
    recomputed from the input of the layer that outputs it: the CLS row of its attention per head
    ``[T, heads, patches + 1]``, its raw keys per head ``[T, heads, patches + 1, head_dim]`` and the layer's
    output ``[T, patches + 1, C]`` (CLS row first)."""
    core = model.model
    attn = core.vision_tower.encoder.layers[-2].self_attn  # CLIP layer whose output is hidden_states[-2]
    cap = {}
    handle = attn.register_forward_pre_hook(lambda m, a, kw: cap.update(h=a[0] if a else kw["hidden_states"]),
                                            with_kwargs=True)
    with torch.no_grad():
        out = core.vision_tower(pixel_values, output_hidden_states=True)
    handle.remove()
    h, t, n = cap["h"], cap["h"].shape[0], cap["h"].shape[1]
    heads, hd = attn.num_heads, attn.head_dim
    with torch.no_grad():
        q = attn.q_proj(h[:, :1]).view(t, 1, heads, hd).transpose(1, 2)
        kk = attn.k_proj(h).view(t, n, heads, hd).transpose(1, 2)
        cls = torch.softmax(q @ kk.transpose(-1, -2) * attn.scale, dim=-1)[:, :, 0]
    return cls, kk, out.hidden_states[-2]


def run_pruned(model, inputs, method: str, **options):
    """``vtprune.apply(model, method, **options)``, one forward on ``inputs``, removed afterwards: the stats, the
    prefill's layout and the bound scorer."""
    vtprune.apply(model, method=method, **options)
    try:
        with torch.no_grad():
            model(**inputs)
        state = model._vtprune_state
        return vtprune.stats(model), state.session.layout, state.scorer
    finally:
        vtprune.remove(model)


def next_tiles(model, inputs) -> torch.Tensor:
    """A LLaVA-NeXT call's real tiles, ``[T, 3, H, W]``, as its `get_image_features` flattens them."""
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches
    cfg = model.config
    counts = [image_size_to_num_patches(tuple(s.tolist()), cfg.image_grid_pinpoints, cfg.vision_config.image_size)
              for s in inputs["image_sizes"]]
    return torch.cat([px[:n] for px, n in zip(inputs["pixel_values"], counts)])


_PROCESSORS: dict = {}


def get_qwen_processor(kind: str):
    if kind not in _PROCESSORS:
        _PROCESSORS[kind] = tiny_qwen_processor(kind)
    return _PROCESSORS[kind]


def make_video(frames: int, h: int, w: int, seed: int) -> np.ndarray:
    """``[frames, h, w, 3]`` uint8 random frames."""
    rng = np.random.default_rng(1000 + seed)
    return (rng.random((frames, h, w, 3)) * 255).astype("uint8")


QWEN_IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"
QWEN_VIDEO = "<|vision_start|><|video_pad|><|vision_end|>"

# case -> per sample, the visual items of its prompt in order ("i": image, "v": video)
QWEN_CASES = {
    "single": ["i"],
    "left_padded_2": ["i", "i"],  # two samples of different lengths and image sizes
    "two_images": ["ii"],
    "video": ["v"],
    "mixed": ["iv"],
}


def qwen_batch(kind: str, case: str, padding_side: str = "left"):
    """Processor outputs for a Qwen-VL test case (see ``QWEN_CASES``)."""
    sizes = [(300, 400), (220, 330), (260, 260)]
    rows, n_images, n_videos = [], 0, 0
    for b, items in enumerate(QWEN_CASES[case]):
        media = []
        for it in items:
            if it == "i":
                h, w = sizes[n_images % len(sizes)]
                media.append(("i", make_image(h, w, seed=n_images)))
                n_images += 1
            else:
                media.append(("v", make_video(4, 200, 260, seed=n_videos)))
                n_videos += 1
        rows.append((media, "What is in the picture? " * (b + 1)))
    return qwen_prompts(kind, rows, padding_side)


def qwen_prompts(kind: str, rows: list, padding_side: str = "left"):
    """Processor outputs of a Qwen-VL batch: ``rows`` = per sample ``(media, question)``, ``media`` a list of
    ``("i", PIL image)`` / ``("v", video frames)`` placed before the question in that order."""
    proc = get_qwen_processor(kind)
    texts, images, videos = [], [], []
    for media, question in rows:
        body = ""
        for what, item in media:
            (images if what == "i" else videos).append(item)
            body += QWEN_IMAGE if what == "i" else QWEN_VIDEO
        texts.append(f"<|im_start|>user\n{body}{question}<|im_end|>\n<|im_start|>assistant\n")
    proc.tokenizer.padding_side = padding_side
    kwargs = dict(text=texts, return_tensors="pt", padding=True)
    if images:
        kwargs["images"] = images
    if videos:
        kwargs["videos"] = videos
    return proc(**kwargs)


def one_sample_layout(sizes: list[int], fixed: dict[int, int] | None = None):
    """A `VisualLayout` of one sample with images of ``sizes`` visual tokens (positions from 3, 10 text
    tokens); ``fixed``: image -> local index of a non-prunable token (a NeXT newline)."""
    from vtprune.layout import VisualLayout

    n = sum(sizes)
    image = torch.cat([torch.full((s,), i) for i, s in enumerate(sizes)])
    prunable = torch.ones(n, dtype=torch.bool)
    start = 0
    for i, s in enumerate(sizes):
        if fixed and i in fixed:
            prunable[start + fixed[i]] = False
        start += s
    return VisualLayout([torch.arange(n) + 3], [image], [prunable], [torch.arange(n)],
                        [torch.zeros(n, 3, dtype=torch.long)], seq_len=n + 10)
