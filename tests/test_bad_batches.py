"""Batches in which one sample has no image: every preset runs, and each row gives what it gives alone.

The text-only row must equal the unpatched model on that row alone (there is nothing to prune in it), and
the image row the patched model on the image row alone, on LLaVA-1.5, LLaVA-NeXT and Qwen2-VL, left and
right padded.
"""

from __future__ import annotations

import pytest
import torch
from conftest import QWEN_IMAGE, batch, budget_for, get_model, get_qwen_processor, make_image, prompts
from test_presets import LLAVA_FAMILY_ONLY, method_strings, options_for, setup_of

import vtprune
from vtprune.toy.tiny import tiny_llava_processor

KINDS = ["llava", "next", "qwen2_vl"]
KEEP = 8
# presets, plus SparseVLM with its recycling on (test_presets turns it off)
CASES = [(m, {}) for m in method_strings()] + [("sparsevlm", {"recycle": True})]
SIZE = (300, 620)
QWEN_TEXTS = ["<|im_start|>user\nWhat is a cat? Tell me in a few words.<|im_end|>\n<|im_start|>assistant\n",
              f"<|im_start|>user\n{QWEN_IMAGE}What is in the picture?<|im_end|>\n<|im_start|>assistant\n"]

_PROCESSORS: dict = {}


def _llava_processor(kind: str):
    if kind not in _PROCESSORS:
        _PROCESSORS[kind] = tiny_llava_processor(next_=kind == "next")
    return _PROCESSORS[kind]


def inputs_for(kind: str, side: str):
    """``(batch [text-only, image], text row alone, image row alone)``: processor outputs."""
    if kind.startswith("qwen"):
        proc = get_qwen_processor(kind)
        proc.tokenizer.padding_side = side
        image = make_image(*SIZE, seed=0)
        both = proc(text=QWEN_TEXTS, images=[image], return_tensors="pt", padding=True)
        text = proc(text=QWEN_TEXTS[:1], return_tensors="pt")
        alone = proc(text=QWEN_TEXTS[1:], images=[image], return_tensors="pt")
        return both, text, alone
    proc = _llava_processor(kind)
    both = batch(proc, [0, 1], padding_side=side, sizes=(SIZE,))  # image seed 0, prompts([0, 1])
    texts = prompts([0, 1])
    text = proc(text=texts[:1], return_tensors="pt")
    alone = proc(images=[make_image(*SIZE, seed=0)], text=texts[1:], return_tensors="pt")
    return both, text, alone


def _run(model, inputs) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits ``[B, N_lm, V]`` and the mask ``[B, N_lm]`` of the sequence the language model saw (shortened
    by pre-LLM pruning)."""
    seen = {}
    lm = model.model.language_model
    handle = lm.register_forward_pre_hook(lambda m, a, k: seen.update(k), with_kwargs=True)
    try:
        with torch.no_grad():
            logits = model(**inputs).logits
    finally:
        handle.remove()
    mask = seen.get("attention_mask")
    if not isinstance(mask, torch.Tensor) or mask.dim() != 2:
        mask = torch.ones(logits.shape[:2], dtype=torch.bool)
    return logits, mask.bool()


def _rows(logits: torch.Tensor, mask: torch.Tensor, b: int) -> torch.Tensor:
    """Row ``b``'s logits at its real tokens ``[n_b, V]``."""
    return logits[b][mask[b].to(logits.device)]


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("kind", KINDS)
def test_text_only_sample_beside_an_image_sample(kind, side):
    model = get_model(kind)
    both, text, alone = inputs_for(kind, side)
    ref_text = _rows(*_run(model, text), 0)
    failures = []
    for method, extra in CASES:
        if method in LLAVA_FAMILY_ONLY and kind.startswith("qwen"):
            continue
        name = method + "".join(f" {k}={v}" for k, v in extra.items())
        try:
            _, layer = setup_of(method, model)
            vtprune.apply(model, method=method, keep=budget_for(method, KEEP), layer=layer, **{**options_for(method, model), **extra})
            logits, mask = _run(model, both)
            st = vtprune.stats(model)
            ref_image, ref_mask = _run(model, alone)
            st_alone = vtprune.stats(model)
            if side == "left":  # decoding runs too (generate() expects left padding)
                with torch.no_grad():
                    tokens = model.generate(**both, max_new_tokens=2, do_sample=False)
                assert tokens.shape == (2, both["input_ids"].shape[1] + 2)
        except Exception as exc:  # collect every preset's failure, not only the first
            failures.append(f"{name}: {type(exc).__name__}: {exc}")
            continue
        finally:
            vtprune.remove(model)
        try:
            assert st.visual_before[0] == st.visual_after[0] == 0 and st.kept[0].numel() == 0
            assert st.visual_before[1] == st_alone.visual_before[0] and st.visual_after[1] <= st.visual_before[1]
            torch.testing.assert_close(_rows(logits, mask, 0), ref_text, atol=3e-5, rtol=1e-4)
            if torch.equal(st.kept[1], st_alone.kept[0]):
                torch.testing.assert_close(_rows(logits, mask, 1), _rows(ref_image, ref_mask, 0), atol=3e-5, rtol=1e-4)
            else:  # a near-tie that padding flipped: the same count, and almost all the same tokens
                assert st.visual_after[1] == st_alone.visual_after[0]
                same = int(torch.isin(st.kept[1], st_alone.kept[0]).sum())
                assert same >= st.visual_after[1] - 2, (st.kept[1], st_alone.kept[0])
        except AssertionError as exc:
            failures.append(f"{name}: {exc}")
    assert not failures, "\n".join(failures)
