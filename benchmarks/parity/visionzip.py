"""Parity of vtprune's ``visionzip`` with VisionZip's released code (github.com/dvlab-research/VisionZip).

The release selects and merges in ``CLIPVisionTower_VisionZip.forward`` (``visionzip/clip_encoder.py``):
the head-summed CLS attention of ``attentions[-2]`` picks ``dominant - 1`` patches (``visionzip(model,
dominant, contextual)`` in ``visionzip/main.py`` passes ``dominant_num=dominant - 1``), which are sent
with CLS; the remaining patches are merged into ``contextual`` evenly spaced targets by the cosine of the
head-mean raw keys (``metric``) that its patched ``CLIP_EncoderLayer_forward`` / ``CLIPAttention_forward``
(``visionzip/utils.py``) store on ``layers[-2]``; ``encode_images_visionzip`` (``visionzip/llava_arch.py``)
projects ``[CLS, dominant, contextual]``, the image's tokens in the LLM.

Here those functions run unbound with minimal stand-ins for ``self``, on the tiny LLaVA-1.5 model's own
CLIP tower (eager attention, so that it returns attention maps as the release's transformers-4.37 tower
does) and the same pixels as vtprune's run: the tower's outputs come from transformers' CLIP, and the
release's ``CLIP_EncoderLayer_forward`` reruns the feature layer on the tower's own input to that layer
to produce ``metric`` (its output is checked against the tower's, ``tower_max_abs``). The release's
per-layer schedule (``r``: 1 at layer 22 of 24) is its way of naming ``layers[-2]``; the tiny tower has 3
layers, so the layer is named directly. Its target indices are recorded from the ``torch.isin`` call that
separates targets from the tokens merged into them.

Compared per (variant, budget), vtprune at its default (``order=None``: the release order on LLaVA-1.5):

- ``jaccard`` / ``kept_equal``: the release's tokens (its dominant patches and contextual targets, and the
  CLS token at the slot vtprune's documented layout gives it: the image's last remaining patch that is no
  target) against vtprune's kept slots.
- ``feature_max_abs``: the merged features: the release's contextual tokens (before the projector)
  against the projector inputs of the rows vtprune sends at the same places of the sequence.
- ``sequence_max_abs``: the release's projected sequence (64 rows at 64) against the visual rows the LLM
  receives from vtprune, row by row (same order: CLS, dominant patches, contextual tokens).
- ``logit_max_abs``: first-token logits of the same language model on the release's sequence (spliced
  into the prompt, contiguous positions, as ``prepare_inputs_labels_for_multimodal_visionzip``) and of
  vtprune's run.

Budgets: the release's 64 / 128 / 192 of LLaVA-1.5's 576 tokens (54 + 10, 108 + 20, 162 + 30; the tiny
tower has the same 24 x 24 grid). Input: a noise image (well separated CLS scores).

    python benchmarks/parity/visionzip.py --ref /path/to/VisionZip
"""

from __future__ import annotations

import importlib
import sys
import types
from contextlib import contextmanager
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    env_name,
    fake_modules,
    jaccard,
    llava_stubs,
    logits_on_visual_rows,
    peaked,
    run_check,
    tiny_llava_inputs,
    traced_vtprune_run,
)

METHOD = "visionzip"
ENV = env_name(METHOD)
LOGIT_TOLERANCE = 1e-4
FEATURE_TOLERANCE = 1e-4
SETTINGS = {64: (54, 10), 128: (108, 20), 192: (162, 30)}  # budget: the release's (dominant, contextual)
PROMPT = "USER: <image>\nWhat is in the picture? ASSISTANT:"
PACKAGE = "visionzip_release"


@contextmanager
def missing_attribute(module: Any, name: str):
    """``module.name`` as a placeholder class while the release imports it (transformers 5 dropped
    ``CLIPVisionTransformer``, which ``visionzip/utils.py`` imports but the compared functions never use)."""
    had = hasattr(module, name)
    if not had:
        setattr(module, name, type(name, (), {}))
    try:
        yield
    finally:
        if not had:
            delattr(module, name)


def load_release(ref: Path) -> dict[str, types.ModuleType]:
    """The release's ``utils``, ``clip_encoder`` and ``llava_arch`` modules, imported as a package from
    ``ref/visionzip`` without its ``__init__`` (which patches a LLaVA installation)."""
    from transformers.models.clip import modeling_clip

    package = types.ModuleType(PACKAGE)
    package.__path__ = [str(ref / "visionzip")]
    saved = sys.modules.get(PACKAGE)
    sys.modules[PACKAGE] = package
    try:
        with missing_attribute(modeling_clip, "CLIPVisionTransformer"), fake_modules(llava_stubs()):
            return {name: importlib.import_module(f"{PACKAGE}.{name}") for name in ("utils", "clip_encoder", "llava_arch")}
    finally:
        for name in [m for m in sys.modules if m.startswith(PACKAGE + ".")]:
            sys.modules.pop(name)
        if saved is None:
            sys.modules.pop(PACKAGE, None)
        else:
            sys.modules[PACKAGE] = saved


class RecordingTorch(types.ModuleType):
    """``torch`` as the release's ``clip_encoder`` module sees it, recording the target indices it tests
    membership against (``torch.isin(arange(R), target_indices)``)."""

    def __init__(self, torch: Any, seen: list) -> None:
        super().__init__("torch")
        self._torch, self._seen = torch, seen

    def __getattr__(self, name: str) -> Any:
        return getattr(self._torch, name)

    def isin(self, elements: Any, test_elements: Any, *args: Any, **kwargs: Any) -> Any:
        self._seen.append(test_elements.clone())
        return self._torch.isin(elements, test_elements, *args, **kwargs)


def shape_heads(attn: Any):
    """transformers-4.37 ``CLIPAttention._shape``: ``[B, T, C] -> [B, heads, T, head_dim]``."""
    return lambda t, seq_len, bsz: t.view(bsz, seq_len, attn.num_heads, attn.head_dim).transpose(1, 2).contiguous()


class TowerView:
    """The release's ``self.vision_tower``: a call runs transformers' CLIP tower with hidden states and
    attention maps, then the release's own ``CLIP_EncoderLayer_forward`` / ``CLIPAttention_forward`` on the
    feature layer (``layers[-2]``), which stores the head-mean keys as ``metric`` on the layer stand-in
    that ``vision_model.encoder.layers[-2]`` returns."""

    def __init__(self, tower: Any, utils: types.ModuleType, dominant: int, contextual: int) -> None:
        layers = tower.encoder.layers
        layer = layers[-2]
        attn = layer.self_attn
        attn_self = types.SimpleNamespace(q_proj=attn.q_proj, k_proj=attn.k_proj, v_proj=attn.v_proj,
                                          out_proj=attn.out_proj, scale=attn.scale, num_heads=attn.num_heads,
                                          head_dim=attn.head_dim, dropout=attn.dropout, training=False)
        attn_self._shape = shape_heads(attn)
        self._info = {"dominant": dominant - 1, "contextual": contextual}  # as visionzip(model, dominant, ...)
        self.layer = types.SimpleNamespace(layer_norm1=layer.layer_norm1, layer_norm2=layer.layer_norm2,
                                           mlp=layer.mlp, _info={"r": []})
        self.layer.self_attn = lambda **kw: utils.CLIPAttention_forward(attn_self, **kw)
        self.vision_model = types.SimpleNamespace(
            encoder=types.SimpleNamespace(layers=[None] * (len(layers) - 2) + [self.layer, None]))
        self._tower, self._utils = tower, utils
        self.tower_max_abs = 0.0

    def __call__(self, images: Any, output_hidden_states: bool = True, output_attentions: bool = True) -> Any:
        out = self._tower(images, output_hidden_states=True, output_attentions=True)
        self.layer._info["r"] = [1]  # this layer stores its metric (the release's schedule: r > 0 here only)
        rerun = self._utils.CLIP_EncoderLayer_forward(self.layer, out.hidden_states[-3], None, None,
                                                      output_attentions=True)
        self.tower_max_abs = max(float((rerun[0] - out.hidden_states[-2]).abs().max()),
                                 float((rerun[1] - out.attentions[-2]).abs().max()))
        return out


def release_run(modules: dict[str, types.ModuleType], model: Any, pixels: Any, budget: int) -> dict[str, Any]:
    """The release's selection and sequence for one image: ``kept`` (patch indices: dominant patches,
    contextual targets, and the CLS slot of vtprune's layout), ``contextual`` ``[C, C_v]`` (before the
    projector), ``sequence`` ``[budget, D]`` (projected, in the release's order) and ``tower_max_abs``."""
    import torch

    dominant, contextual = SETTINGS[budget]
    view = TowerView(model.model.vision_tower, modules["utils"], dominant, contextual)
    tower = types.SimpleNamespace(vision_tower=view, device=pixels.device, dtype=pixels.dtype)
    tower.forward = lambda images: modules["clip_encoder"].CLIPVisionTower_VisionZip.forward(tower, images)
    core = types.SimpleNamespace(get_vision_tower=lambda: tower, mm_projector=model.model.multi_modal_projector)
    host = types.SimpleNamespace(get_model=lambda: core)
    seen: list = []
    encoder = modules["clip_encoder"]
    encoder.torch = RecordingTorch(torch, seen)
    try:
        with torch.no_grad():
            raw, indices = encoder.CLIPVisionTower_VisionZip.forward(tower, pixels)
            sequence = modules["llava_arch"].encode_images_visionzip(host, pixels)
    finally:
        encoder.torch = torch
    n = model.model.vision_tower.config.image_size // model.model.vision_tower.config.patch_size
    chosen = set(indices[0].tolist())  # CLS (0) and the dominant tokens, in the tower's 1 + n * n rows
    assert 0 in chosen and len(chosen) == dominant
    remaining = [i - 1 for i in range(1, n * n + 1) if i not in chosen]  # patch indices, the release's row order
    targets = [remaining[j] for j in seen[0].tolist()]  # two calls per run (forward, encode_images): equal
    spare = [p for p in remaining if p not in set(targets)]
    kept = sorted([i - 1 for i in chosen if i] + targets + spare[-1:])
    return {"kept": kept, "contextual": raw[0, dominant:], "sequence": sequence[0], "tower_max_abs": view.tower_max_abs}


def compare(ref: Path) -> list[dict[str, Any]]:
    from vtprune.toy.tiny import tiny_llava

    modules = load_release(ref)
    inputs = tiny_llava_inputs(PROMPT)
    rows = []
    for variant in ("random", "peaked"):
        model = tiny_llava(attn_implementation="eager")  # the release's CLIP tower returns attention maps
        if variant == "peaked":
            peaked(model)
        for budget, (dominant, contextual) in SETTINGS.items():
            theirs = release_run(modules, model, inputs["pixel_values"], budget)
            ours = traced_vtprune_run(model, inputs, METHOD, keep=budget)
            logit = float((ours["logits"] - logits_on_visual_rows(model, inputs, theirs["sequence"][None])[0]).abs().max())
            rows.append({
                "method": METHOD, "model": "tiny-llava-1.5", "variant": variant, "budget": budget,
                "jaccard": jaccard(ours["kept"], theirs["kept"]), "kept_equal": ours["kept"] == theirs["kept"],
                "logit_max_abs": logit,
                "feature_max_abs": float((ours["inputs"][dominant:] - theirs["contextual"]).abs().max()),
                "sequence_max_abs": float((ours["rows"] - theirs["sequence"]).abs().max()),
                "tower_max_abs": theirs["tower_max_abs"],
                "note": f"vtprune default (order=None: release order, CLS + {dominant - 1} dominant patches + "
                        f"{contextual} contextual); eager attention, noise image",
            })
    return rows


def summary(rows: list[dict[str, Any]]) -> None:
    for r in rows:
        print(f"  {r['variant']} {r['budget']}: contextual features {r['feature_max_abs']:.2e}, LLM visual rows "
              f"{r['sequence_max_abs']:.2e}, the release's feature-layer rerun vs the tower {r['tower_max_abs']:.2e}")


def main(argv: list[str] | None = None) -> int:
    return run_check(METHOD, compare, argv, __doc__ or "", summary=summary)


if __name__ == "__main__":
    sys.exit(main())
