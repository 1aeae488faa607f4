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
from common import (  # noqa: E402
    env_name,
    jaccard,
    lm_input_embeds,
    load_llava_arch,
    logits_without_unkept,
    peaked,
    run_check,
    tiny_llava_inputs,
    vtprune_run,
)

METHOD = "divprune"
ENV = env_name(METHOD)
LOGIT_TOLERANCE = 1e-4
TOKENS = 576
RATIOS = {64: 64 / TOKENS, 128: 128 / TOKENS, 192: 192 / TOKENS, 56: 0.098}  # budget: the release's SUBSET_RATIO
PROMPT = "USER: <image>\nWhat is in the picture? ASSISTANT:"


def load_release(ref: Path) -> Any:
    """The release's ``LlavaMetaForCausalLM`` (its ``llava_arch.py``; the imports its DivPrune never uses are
    stand-ins)."""
    return load_llava_arch(ref / "LLaVA/llava/model/llava_arch.py", "divprune_release").LlavaMetaForCausalLM


def release_kept(meta_cls: Any, visual: Any, ratio: float) -> list[int]:
    """The release's ``DivPrune`` on ``visual`` ``[576, D]`` (a stand-in ``self`` with its own cosine helper):
    the kept rows, sorted (the release sorts its keep indices)."""
    import torch

    host = types.SimpleNamespace()
    host.pairwise_cosine_similarity = lambda m: meta_cls.pairwise_cosine_similarity(host, m)
    with torch.no_grad():
        picks, _ = meta_cls.DivPrune(host, visual, visual.shape[0], None, threshold_ratio=ratio)
    return sorted(picks.tolist())


def compare(ref: Path) -> list[dict[str, Any]]:
    import torch

    from vtprune.toy.tiny import tiny_llava

    meta_cls = load_release(ref)
    inputs = tiny_llava_inputs(PROMPT)
    rows = []
    for variant in ("random", "peaked"):
        model = tiny_llava()
        if variant == "peaked":
            peaked(model)
        embeds = lm_input_embeds(model, inputs)
        visual = torch.nonzero(inputs["input_ids"][0] == model.config.image_token_id).flatten()
        if visual.numel() != TOKENS:
            raise SystemExit(f"{METHOD} parity: the tiny model's prompt holds {visual.numel()} visual tokens, not {TOKENS}")
        for budget, ratio in RATIOS.items():
            theirs = release_kept(meta_cls, embeds[0, visual], ratio)
            ours, ours_logits = vtprune_run(model, inputs, METHOD, keep=budget)
            ours = sorted(ours)
            logit = float((ours_logits - logits_without_unkept(model, inputs, theirs, embeds)).abs().max())
            rows.append({"method": METHOD, "model": "tiny-llava-1.5 (576 tokens)", "variant": variant,
                         "budget": budget, "jaccard": jaccard(ours, theirs), "kept_equal": ours == theirs,
                         "logit_max_abs": logit,
                         "note": f"SUBSET_RATIO {ratio:.4f} (release keeps {len(theirs)}); vtprune keep={budget}"})
    return rows


def main(argv: list[str] | None = None) -> int:
    return run_check(METHOD, compare, argv, __doc__ or "")


if __name__ == "__main__":
    sys.exit(main())
