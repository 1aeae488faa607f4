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
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    env_name,
    jaccard,
    load_llava_arch,
    logits_without_unkept,
    peaked,
    run_check,
    tiny_llava_inputs,
    vtprune_run,
)

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


def load_release(ref: Path) -> Any:
    """The release's ``LlavaMetaForCausalLM`` class."""
    return load_llava_arch(ref / "llava/model/llava_arch.py", "cdpruner_release").LlavaMetaForCausalLM


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


def clip_relevance_options(folder: Path) -> tuple[Any, dict[str, Any]]:
    """The tiny open_clip model (`tiny_clip`, saved in ``folder`` with the tiny tokenizer) and the options that
    give vtprune's ``cdpruner`` the release's relevance with it (``relevance="clip"``, the same weights)."""
    from vtprune.toy.tiny import tiny_llava_tokenizer

    name, weights, clip = tiny_clip(folder)
    tiny_llava_tokenizer().save_pretrained(folder / "tokenizer")
    return clip, {"relevance": "clip", "clip_model": name, "clip_pretrained": weights,
                  "tokenizer": str(folder / "tokenizer")}


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


def compare(ref: Path) -> list[dict[str, Any]]:
    import torch

    from vtprune.toy.tiny import tiny_llava

    meta_cls = load_release(ref)
    inputs = tiny_llava_inputs(PROMPT)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        clip, options = clip_relevance_options(folder)
        for variant in ("random", "peaked"):
            model = tiny_llava(hidden=LLM_WIDTH)
            if variant == "peaked":
                peaked(model)
            text = instruction_text(model, inputs)
            for budget in BUDGETS:
                mask = release_mask(meta_cls, model, clip, inputs["pixel_values"], text, budget)[0]
                theirs = torch.nonzero(mask).flatten().tolist()
                ours, ours_logits = vtprune_run(model, inputs, METHOD, keep=budget, **options)
                logit = float((ours_logits - logits_without_unkept(model, inputs, theirs)).abs().max())
                rows.append({"method": METHOD, "model": f"tiny-llava-1.5 (LLM width {LLM_WIDTH})", "variant": variant, "budget": budget,
                             "jaccard": jaccard(ours, theirs), "kept_equal": sorted(ours) == theirs,
                             "logit_max_abs": logit,
                             "note": "relevance='clip' (a tiny random open_clip model, the same weights on both "
                                     "sides), vtprune's default theta=None (the release's kernel diag(r) S diag(r)); "
                                     "noise image"})
    return rows


def main(argv: list[str] | None = None) -> int:
    return run_check(METHOD, compare, argv, __doc__ or "")


if __name__ == "__main__":
    sys.exit(main())
