"""Parity of vtprune's ``divprune`` with DivPrune's release (github.com/vbdi/divprune, read at 799e2d9): the kept
visual tokens and the first-token logits.

The release selects in ``LlavaMetaForCausalLM.prepare_inputs_labels_for_multimodal``
(``LLaVA/llava/model/llava_arch.py``, run with ``LAYER_INDEX=0``, ``SUBSET_RATIO`` the kept ratio): it calls
``LlavaMetaForCausalLM.DivPrune`` (with ``pairwise_cosine_similarity``) on the image's rows of the LLM input
embeddings (the projector outputs), keeps the returned rows in sequence order and hands the shortened
sequence to the LLM with default (contiguous) positions. ``DivPrune`` is called here unbound, with a stand-in
``self`` carrying the release's own ``pairwise_cosine_similarity``, on the projector outputs of the same
forward vtprune's run sees (the tiny LLaVA-1.5 model of ``vtprune.toy.tiny``: a 24 x 24 grid, 576 visual
tokens); the release's pruned sequence then runs through the same language model for the logits.

The release's span is ``new_input_embeds[0][35:35 + 576]`` (``SYS_TOKEN_LEN = 35``, LLaVA-1.5's vicuna_v1
system prompt with its tokenizer); here the span is the image's own place in the tiny prompt, the function
it feeds is unchanged. Budgets: ``SUBSET_RATIO`` = 64/576, 128/576, 192/576 (the paper's 192 / 128 / 64
tokens; the release rounds ``ratio * 576``) and the release default 0.098 (56 tokens); vtprune
``keep`` the same counts. No deviation of vtprune's concerns LLaVA-1.5 (its two are NeXT newline tokens
and per-image budgets).

    python benchmarks/parity/divprune.py --ref /path/to/divprune
"""

from __future__ import annotations

import sys
import types
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import env_name, jaccard, load_file, peaked, reference_path, write_rows  # noqa: E402

METHOD = "divprune"
ENV = env_name(METHOD)
LOGIT_TOLERANCE = 1e-4
TOKENS = 576
RATIOS = {64: 64 / TOKENS, 128: 128 / TOKENS, 192: 192 / TOKENS, 56: 0.098}  # budget: the release's SUBSET_RATIO
PROMPT = "USER: <image>\nWhat is in the picture? ASSISTANT:"


def load_release(ref: Path) -> Any:
    """The release's ``LlavaMetaForCausalLM`` (its ``llava_arch.py``; the imports its DivPrune never uses are
    stand-ins)."""
    unused = lambda *a, **k: None  # noqa: E731
    names = {
        "divprune_release": {},
        "divprune_release.multimodal_encoder": {},
        "divprune_release.multimodal_encoder.builder": {"build_vision_tower": unused},
        "divprune_release.multimodal_projector": {},
        "divprune_release.multimodal_projector.builder": {"build_vision_projector": unused},
        "llava": {},
        "llava.constants": {"IGNORE_INDEX": -100, "IMAGE_TOKEN_INDEX": -200, "DEFAULT_IMAGE_PATCH_TOKEN": "",
                            "DEFAULT_IM_START_TOKEN": "", "DEFAULT_IM_END_TOKEN": ""},
        "llava.mm_utils": {"get_anyres_image_grid_shape": unused},
    }
    saved = {name: sys.modules.get(name) for name in names}
    for name, attrs in names.items():
        module = types.ModuleType(name)
        module.__path__ = []
        module.__dict__.update(attrs)
        sys.modules[name] = module
    try:
        arch = load_file(ref / "LLaVA/llava/model/llava_arch.py", "divprune_release.llava_arch")
    finally:
        for name, old in saved.items():
            if old is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = old
    return arch.LlavaMetaForCausalLM


def release_kept(meta_cls: Any, visual: Any, ratio: float) -> list[int]:
    """The release's ``DivPrune`` on ``visual`` ``[576, D]`` (a stand-in ``self`` with its own cosine helper):
    the kept rows, sorted (the release sorts its keep indices)."""
    import torch

    host = types.SimpleNamespace()
    host.pairwise_cosine_similarity = lambda m: meta_cls.pairwise_cosine_similarity(host, m)
    with torch.no_grad():
        picks, _ = meta_cls.DivPrune(host, visual, visual.shape[0], None, threshold_ratio=ratio)
    return sorted(picks.tolist())


def inputs_for(seed: int = 0) -> Any:
    import numpy as np
    from PIL import Image

    from vtprune.toy.tiny import tiny_llava_processor

    rng = np.random.default_rng(seed)
    image = Image.fromarray(rng.integers(0, 256, (400, 500, 3), dtype=np.uint8))
    return tiny_llava_processor()(images=[image], text=[PROMPT], return_tensors="pt")


def input_embeds(model: Any, inputs: Any) -> Any:
    """The language model's input embeddings ``[1, L, D]`` (projector outputs spliced in) of the unpatched model."""
    import torch

    seen: dict[str, Any] = {}
    lm = model.model.language_model
    handle = lm.register_forward_pre_hook(lambda m, a, k: seen.update(k), with_kwargs=True)
    try:
        with torch.no_grad():
            model(**inputs, use_cache=False)
    finally:
        handle.remove()
    return seen["inputs_embeds"]


def logits_on_kept(model: Any, embeds: Any, visual: Any, kept: list[int]) -> Any:
    """First-token logits ``[V]`` of the unpatched language model on ``embeds`` with the visual rows ``visual``
    (sequence positions) outside ``kept`` removed: the release's pruned sequence, contiguous positions."""
    import torch

    keep = torch.ones(embeds.shape[1], dtype=torch.bool)
    drop = torch.ones(visual.numel(), dtype=torch.bool)
    drop[kept] = False
    keep[visual[drop]] = False
    short = embeds[:, keep]
    lm = model.model.language_model
    with torch.no_grad():
        h = lm(inputs_embeds=short, attention_mask=torch.ones(1, short.shape[1], dtype=torch.long),
               use_cache=False).last_hidden_state
        return model.lm_head(h[:, -1])[0]


def compare(ref: Path) -> list[dict[str, Any]]:
    import torch

    import vtprune
    from vtprune.toy.tiny import tiny_llava

    meta_cls = load_release(ref)
    inputs = inputs_for()
    rows = []
    for variant in ("random", "peaked"):
        model = tiny_llava()
        if variant == "peaked":
            peaked(model)
        embeds = input_embeds(model, inputs)
        visual = torch.nonzero(inputs["input_ids"][0] == model.config.image_token_id).flatten()
        if visual.numel() != TOKENS:
            raise SystemExit(f"{METHOD} parity: the tiny model's prompt holds {visual.numel()} visual tokens, not {TOKENS}")
        for budget, ratio in RATIOS.items():
            theirs = release_kept(meta_cls, embeds[0, visual], ratio)
            vtprune.apply(model, METHOD, keep=budget)
            try:
                with torch.no_grad():
                    ours_logits = model(**inputs).logits[0, -1]
                ours = sorted(vtprune.stats(model).kept[0].tolist())
            finally:
                vtprune.remove(model)
            logit = float((ours_logits - logits_on_kept(model, embeds, visual, theirs)).abs().max())
            rows.append({"method": METHOD, "model": "tiny-llava-1.5 (576 tokens)", "variant": variant,
                         "budget": budget, "jaccard": jaccard(ours, theirs), "kept_equal": ours == theirs,
                         "logit_max_abs": logit,
                         "note": f"SUBSET_RATIO {ratio:.4f} (release keeps {len(theirs)}); vtprune keep={budget}"})
    return rows


def main(argv: list[str] | None = None) -> int:
    ref, args = reference_path(METHOD, argv, __doc__ or "")
    if ref is None:
        return 0
    rows = compare(ref)
    write_rows(METHOD, rows, ref, args, f"python benchmarks/parity/{METHOD}.py --ref {ref}")
    return 0 if all(r["kept_equal"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
