"""Parity of vtprune's ``cdpruner`` with CDPruner's released code (github.com/Theia-4869/CDPruner).

The release selects its tokens in ``LlavaMetaForCausalLM.encode_images`` (``llava/model/llava_arch.py``):
cosine similarity of the projector outputs, relevance ``mean_m -cos(image embedding, text embedding)``
min-max normalised as ``(r - min + 1e-6) / (max - min)``, kernel ``diag(r) S diag(r)`` (its ``theta``
lines are commented out), greedy DPP MAP of ``visual_token_num`` tokens, an index mask in raster order.
``encode_images`` is called unbound with a stand-in ``self`` whose vision tower returns, for the tiny
LLaVA-1.5 model's own CLIP tower and the same pixels as vtprune's run, what the release's
``CLIPVisionTower.forward`` returns: the feature layer's patch features (``hidden_states[-2][:, 1:]``),
their CLIP image embeddings (the CLIP model's post-layernorm and projection) and the CLIP text
embeddings of the instruction. The CLIP model is a tiny random open_clip model (vision width 32, the
tiny tower's), saved once and given to vtprune as ``clip_pretrained``, so both sides use the same weights;
the release reads its CLIP through transformers' ``CLIPVisionModelWithProjection`` /
``CLIPTextModelWithProjection`` and its forward runs on CUDA streams, so that part is not called.
The text is the one vtprune's ``relevance="clip"`` decodes (the prompt after the image, one 77-token
chunk).

Compared per (variant, budget), vtprune with ``relevance="clip"`` (the release's relevance; vtprune's
default ``"text"`` needs no CLIP and has no counterpart in the release) and its default ``theta=None``
(the release's kernel):

- ``jaccard`` / ``kept_equal``: the release's index mask against vtprune's kept set.
- ``logit_max_abs``: first-token logits of the same language model on the release's pruned sequence (its
  mask applied to the visual tokens, raster order, as ``prepare_inputs_labels_for_multimodal``) and of
  vtprune's run.

Budgets: the release's 64 / 128 / 192 of LLaVA-1.5's 576 tokens (the tiny tower has the same grid). The
tiny model's language model is 256 wide here (`LLM_WIDTH`; the tests' tiny model: 64): the similarity
kernel has the rank of the projector outputs' width, so past that many picks every marginal gain is
rounding noise and the release's float32 and vtprune's float64 greedy MAP pick different tokens (on the
64-wide model Jaccard falls to 0.35 at 192); LLaVA-1.5's 4096 is far above its 576 tokens.

    python benchmarks/parity/cdpruner.py --ref /path/to/CDPruner
"""

from __future__ import annotations

import json
import sys
import tempfile
import types
from contextlib import contextmanager
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import env_name, jaccard, load_file, peaked, reference_path, write_rows  # noqa: E402

METHOD = "cdpruner"
ENV = env_name(METHOD)
LOGIT_TOLERANCE = 1e-4
BUDGETS = (64, 128, 192)
LLM_WIDTH = 256  # above the largest budget: the DPP kernel's rank (see the module docstring)
PROMPT = "USER: <image>\nWhat is the color of the large square in the picture? ASSISTANT:"
CLIP_NAME = "vtprune-parity-tiny-clip"
CLIP_CONFIG = {"embed_dim": 16,
               "vision_cfg": {"image_size": 336, "layers": 1, "width": 32, "head_width": 8, "patch_size": 14},
               "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 4, "layers": 1}}


@contextmanager
def fake_modules(modules: dict[str, dict[str, Any]]):
    """Modules with the given attributes in ``sys.modules`` for an import (restored afterwards): the
    release's imports that the compared function never uses."""
    saved = {name: sys.modules.get(name) for name in modules}
    for name, attrs in modules.items():
        module = types.ModuleType(name)
        module.__path__ = []  # importable as a package too
        module.__dict__.update(attrs)
        sys.modules[name] = module
    try:
        yield
    finally:
        for name, old in saved.items():
            if old is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = old


def load_release(ref: Path) -> Any:
    """The release's ``LlavaMetaForCausalLM`` class."""
    unused = lambda *a, **k: None  # noqa: E731
    with fake_modules({
        "cdpruner_release": {},
        "cdpruner_release.multimodal_encoder": {},
        "cdpruner_release.multimodal_encoder.builder": {"build_vision_tower": unused},
        "cdpruner_release.multimodal_projector": {},
        "cdpruner_release.multimodal_projector.builder": {"build_vision_projector": unused},
        "llava": {},
        "llava.constants": {"IGNORE_INDEX": -100, "IMAGE_TOKEN_INDEX": -200, "DEFAULT_IMAGE_PATCH_TOKEN": "",
                            "DEFAULT_IM_START_TOKEN": "", "DEFAULT_IM_END_TOKEN": ""},
        "llava.mm_utils": {"get_anyres_image_grid_shape": unused},
    }):
        arch = load_file(ref / "llava/model/llava_arch.py", "cdpruner_release.llava_arch")
    return arch.LlavaMetaForCausalLM


def tiny_clip(folder: Path) -> tuple[str, str, Any]:
    """A tiny random open_clip model registered under `CLIP_NAME` and saved to ``folder``: its name, the
    checkpoint path and the model (the same weights vtprune loads from that path)."""
    import open_clip
    import torch

    config = folder / f"{CLIP_NAME}.json"
    config.write_text(json.dumps(CLIP_CONFIG))
    open_clip.add_model_config(config)
    torch.manual_seed(0)
    model = open_clip.create_model(CLIP_NAME).eval().float()
    weights = folder / "open_clip_model.bin"
    torch.save(model.state_dict(), weights)
    return CLIP_NAME, str(weights), model


def instruction_text(model: Any, inputs: Any) -> str:
    """The prompt after the (last) image token, decoded as vtprune's ``relevance="clip"`` decodes it."""
    import torch

    from vtprune.toy.tiny import tiny_llava_tokenizer

    ids = inputs["input_ids"][0]
    last = int(torch.nonzero(ids == model.config.image_token_id).max())
    return tiny_llava_tokenizer().decode(ids[last + 1:].tolist(), skip_special_tokens=True)


def release_mask(meta_cls: Any, model: Any, clip: Any, pixels: Any, text: str, budget: int) -> Any:
    """The release's ``index_masks`` ``[1, 576]``: its ``encode_images`` with a stand-in vision tower that
    returns the feature layer's patch features, their CLIP image embeddings and the text embeddings."""
    import open_clip
    import torch

    def tower(images: Any, texts: Any = None) -> tuple[Any, Any, Any]:
        out = model.model.vision_tower(images, output_hidden_states=True)
        features = out.hidden_states[model.config.vision_feature_layer][:, 1:]
        visual = clip.visual
        image_embeds = visual.ln_post(features.float()) @ visual.proj  # post-layernorm, visual projection
        text_embeds = clip.encode_text(open_clip.get_tokenizer(CLIP_NAME)([texts]))  # one 77-token chunk
        return features, image_embeds, text_embeds

    core = types.SimpleNamespace(get_vision_tower=lambda: tower, mm_projector=model.model.multi_modal_projector)
    host = types.SimpleNamespace(get_model=lambda: core, visual_token_num=budget)
    with torch.no_grad():
        _, masks = meta_cls.encode_images(host, pixels, texts=text)
    return masks


def inputs_for(seed: int = 0) -> Any:
    import numpy as np
    from PIL import Image

    from vtprune.toy.tiny import tiny_llava_processor

    rng = np.random.default_rng(seed)
    image = Image.fromarray(rng.integers(0, 256, (400, 500, 3), dtype=np.uint8))
    return tiny_llava_processor()(images=[image], text=[PROMPT], return_tensors="pt")


def logits_on_mask(model: Any, inputs: Any, mask: Any) -> Any:
    """First-token logits ``[V]`` of the unpatched model with the visual tokens outside ``mask`` ``[576]``
    removed (the release's pruned sequence; contiguous positions)."""
    import torch

    seen: dict[str, Any] = {}
    lm = model.model.language_model
    handle = lm.register_forward_pre_hook(lambda m, a, k: seen.update(k), with_kwargs=True)
    with torch.no_grad():
        model(**inputs, use_cache=False)
    handle.remove()
    ids = inputs["input_ids"][0]
    visual = torch.nonzero(ids == model.config.image_token_id).flatten()
    keep = torch.ones(ids.numel(), dtype=torch.bool)
    keep[visual[~mask.cpu()]] = False
    short = seen["inputs_embeds"][:, keep]
    with torch.no_grad():
        h = lm(inputs_embeds=short, attention_mask=torch.ones(1, short.shape[1], dtype=torch.long),
               use_cache=False).last_hidden_state
        return model.lm_head(h[:, -1])[0]


def compare(ref: Path) -> list[dict[str, Any]]:
    import torch

    import vtprune
    from vtprune.toy.tiny import tiny_llava, tiny_llava_tokenizer

    meta_cls = load_release(ref)
    inputs = inputs_for()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        name, weights, clip = tiny_clip(folder)
        tiny_llava_tokenizer().save_pretrained(folder / "tokenizer")
        options = {"relevance": "clip", "clip_model": name, "clip_pretrained": weights,
                   "tokenizer": str(folder / "tokenizer")}
        for variant in ("random", "peaked"):
            model = tiny_llava(hidden=LLM_WIDTH)
            if variant == "peaked":
                peaked(model)
            text = instruction_text(model, inputs)
            for budget in BUDGETS:
                mask = release_mask(meta_cls, model, clip, inputs["pixel_values"], text, budget)[0]
                theirs = torch.nonzero(mask).flatten().tolist()
                vtprune.apply(model, METHOD, keep=budget, **options)
                try:
                    with torch.no_grad():
                        ours_logits = model(**inputs).logits[0, -1]
                    ours = vtprune.stats(model).kept[0].tolist()
                finally:
                    vtprune.remove(model)
                logit = float((ours_logits - logits_on_mask(model, inputs, mask)).abs().max())
                rows.append({"method": METHOD, "model": f"tiny-llava-1.5 (LLM width {LLM_WIDTH})", "variant": variant, "budget": budget,
                             "jaccard": jaccard(ours, theirs), "kept_equal": sorted(ours) == theirs,
                             "logit_max_abs": logit,
                             "note": "relevance='clip' (a tiny random open_clip model, the same weights on both "
                                     "sides), vtprune's default theta=None (the release's kernel diag(r) S diag(r)); "
                                     "noise image"})
    return rows


def main(argv: list[str] | None = None) -> int:
    ref, args = reference_path(METHOD, argv, __doc__ or "")
    if ref is None:
        return 0
    rows = compare(ref)
    write_rows(METHOD, rows, ref, args, f"python benchmarks/parity/cdpruner.py --ref {ref}")
    return 0 if all(r["kept_equal"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
