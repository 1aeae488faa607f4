"""Property-based tests (hypothesis) over random batch compositions, budgets and presets.

Batches hold 1-3 samples with 0-3 images each (text-only samples included), left or right padding; on
Qwen-VL images of mixed sizes and videos. Properties:

- drop == mask: in-LLM pruning gives, on the kept tokens, the logits of the unpatched model with the
  dropped key columns masked after the pruning layer (stage by stage for staged methods); pre-LLM
  selection gives those of the unpatched language model on the shortened sequence (`oracle.py`);
- budgets: every image keeps between 1 and its budget of tokens (``keep`` clamped to its tokens, a
  fraction rounded, an adaptive budget's ``max``), the kept indices are sorted, distinct and in range,
  and the stats' counts agree with them;
- batch rows == single runs: each row of a padded batch keeps the tokens, and gives the logits, of that
  sample run alone (up to near-ties of a score, where float noise may pick either token);
- keep-all == unpatched: ``keep=1.0`` (or a count above every image's tokens) gives the unpatched logits
  and generated tokens.

CI runs a few examples per property with a fixed seed (``derandomize``); ``--runslow`` loads the
``vtprune-slow`` hypothesis profile (tests/conftest.py) and runs 20 times as many, randomly.
"""

from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass

import pytest

pytest.importorskip("hypothesis")

import torch  # noqa: E402
from conftest import EXITS, budget_for, get_model, make_image, make_video, qwen_prompts  # noqa: E402
from hypothesis import HealthCheck, Phase, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from oracle import dropped_positions, lm_on_kept, masked_logits, staged_masked_logits  # noqa: E402
from test_presets import LLAVA_FAMILY_ONLY, OWN_REFERENCE, RECYCLING, method_strings, options_for, setup_of  # noqa: E402

import vtprune  # noqa: E402
from vtprune.config import ConfigError, auto_keep  # noqa: E402
from vtprune.scorers import build_scorer  # noqa: E402
from vtprune.toy.tiny import tiny_llava_processor  # noqa: E402

SLOW_PROFILE = settings().max_examples > 100  # `--runslow` loaded the vtprune-slow profile


def examples(n: int) -> int:
    """``n`` examples in CI; the loaded profile's multiple of hypothesis' default 100 under ``--runslow``."""
    return max(1, n * settings().max_examples // 100)


def prop(n: int):
    return settings(max_examples=examples(n), deadline=None, database=None, derandomize=not SLOW_PROFILE,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large], print_blob=True,
                    # CI reports the first failing example as found (shrinking a model run takes many minutes)
                    phases=list(Phase) if SLOW_PROFILE else [Phase.explicit, Phase.generate])


PRESETS = method_strings()
IN_LLM_METHODS = ["fastv", "random", "uniform", "divprune", "debias+fastv", "sink", "transprune", "sparsevlm"]
PRE_LLM_SELECTIONS = ["cls", "vtc-cls", "random", "uniform", "divprune", "cdpruner", "zoo", "ensemble"]
STAGED = {"transprune", "sparsevlm"}
LLAVA_TOKENS = 576  # per image (336 px, patch 14)
QWEN_SIZES = [(56, 56), (84, 112), (112, 84), (140, 168), (196, 140)]


# ---- inputs -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Sample:
    """One prompt: its visual items in order (LLaVA: image seeds; Qwen: ``("i", size)`` / ``("v", None)``)
    and how many times the question repeats (prompt lengths differ, so batches are padded)."""

    items: tuple
    repeats: int


@functools.cache
def llava_processor():
    return tiny_llava_processor()


@functools.cache
def image(h: int, w: int, seed: int):
    return make_image(h, w, seed)


@functools.cache
def video(seed: int):
    return make_video(4, 84, 112, seed)


def llava_inputs(samples, side: str = "left"):
    proc = llava_processor()
    texts = ["USER: " + " ".join(["<image>"] * len(s.items)) + "\n" + "What is in the picture? " * s.repeats
             + "ASSISTANT:" for s in samples]
    images = [image(400, 500, seed) for s in samples for seed in s.items]
    proc.tokenizer.padding_side = side
    kwargs = dict(text=texts, return_tensors="pt", padding=True)
    if images:
        kwargs["images"] = images
    return proc(**kwargs)


def qwen_inputs(kind: str, samples, side: str = "left"):
    # seeds from the sample itself: alone, it sees the same pixels
    rows = [([(what, image(*size, seed=j)) if what == "i" else (what, video(j)) for j, (what, size) in enumerate(s.items)],
             "What is in the picture? " * s.repeats) for s in samples]
    return qwen_prompts(kind, rows, side)


def token_counts(kind: str, samples, inputs) -> list[list[int]]:
    """Per sample, the visual tokens of each of its images / videos, in prompt order."""
    if not kind.startswith("qwen"):
        return [[LLAVA_TOKENS] * len(s.items) for s in samples]
    grids = {"i": iter(inputs.get("image_grid_thw", torch.zeros(0, 3)).tolist()),
             "v": iter(inputs.get("video_grid_thw", torch.zeros(0, 3)).tolist())}
    out = []
    for s in samples:
        out.append([int(t * h * w) // 4 for t, h, w in (next(grids[what]) for what, _ in s.items)])
    return out


@st.composite
def llava_samples(draw, max_images: int = 5, max_batch: int = 3):
    samples, left = [], max_images
    for _ in range(draw(st.integers(1, max_batch))):
        n = draw(st.integers(0, min(3, left)))
        left -= n
        samples.append(Sample(tuple(draw(st.integers(0, 5)) for _ in range(n)), draw(st.integers(1, 3))))
    return samples


@st.composite
def qwen_samples(draw, max_items: int = 4, max_batch: int = 3):
    samples, left = [], max_items
    for _ in range(draw(st.integers(1, max_batch))):
        n = draw(st.integers(0, min(3, left)))
        left -= n
        items = tuple(("v", None) if draw(st.integers(0, 4)) == 0 else ("i", draw(st.sampled_from(QWEN_SIZES)))
                      for _ in range(n))
        samples.append(Sample(items, draw(st.integers(1, 3))))
    return samples


KEEPS = st.one_of(
    st.integers(1, 40),
    st.integers(41, 700),  # up to above an image's tokens: clamped, with a warning
    st.sampled_from([0.02, 0.1, 0.25, 0.5, 0.9]),
    st.floats(0.001, 1.0, allow_nan=False),
    st.sampled_from(["auto:0.5", "auto:0.9,min=4,max=40", "auto:0.3,max=12"]),
)
SIDES = st.sampled_from(["left", "right"])


# ---- running ------------------------------------------------------------------------------------
def layer_for(method: str, model, drawn: int | None) -> int | None:
    """The layer to pass: None for staged methods (their options) and pre-LLM use; at least the deepstack
    depth on Qwen3-VL."""
    if drawn is None or method in STAGED:
        return None
    depth = len(getattr(model.config.vision_config, "deepstack_visual_indexes", None) or [])
    return max(drawn, depth)


def default_layer(method: str, model) -> int | None:
    """The layer the preset tests run ``method`` at (None: pre-LLM, or staged methods' own layers)."""
    return setup_of(method, model)[1]


def apply(model, method: str, keep, layer: int | None) -> bool:
    """Apply; False where an adaptive budget is refused by a method that places its tokens itself."""
    options = options_for(method, model)
    keep = budget_for(method, keep)
    if auto_keep(keep) is not None and not build_scorer(method, options).accepts_auto_keep:
        with pytest.raises(ConfigError, match="adaptive budget"):
            vtprune.apply(model, method=method, keep=keep, layer=layer, **options)
        return False
    vtprune.apply(model, method=method, keep=keep, layer=layer, **options)
    return True


@torch.no_grad()
def run(model, inputs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # keep above an image's tokens
        return model(**inputs).logits


@torch.no_grad()
def generate(model, inputs):
    """Two greedy tokens (warnings of keep above an image's tokens silenced)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return model.generate(**inputs, max_new_tokens=2, do_sample=False)


def check_keep_all(model, inputs, method: str, keep) -> None:
    """Keep-all (``keep`` 1.0 or above every image's tokens): the unpatched logits and generated tokens."""
    ref, ref_tokens = run(model, inputs), generate(model, inputs)
    try:
        apply(model, method, keep, default_layer(method, model))
        out, tokens = run(model, inputs), generate(model, inputs)
    finally:
        vtprune.remove(model)
    assert out.shape == ref.shape
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
    assert torch.equal(tokens, ref_tokens)


def kept_rows(model, inputs, logits, st) -> list[torch.Tensor]:
    """Per sample, the logits of its real kept tokens in sequence order (read before `vtprune.remove`)."""
    if st is not None and st.stage == "pre-llm":
        valid = model._vtprune_state.session.pre_valid
        if valid is None:  # nothing shortened
            valid = inputs["attention_mask"].bool()
        return [logits[b][valid[b].to(logits.device)] for b in range(logits.shape[0])]
    real = inputs["attention_mask"].bool()
    if st is not None and st.stage == "llm":
        real = real & ~dropped_positions(model, inputs["input_ids"], st)
    return [logits[b][real[b]] for b in range(logits.shape[0])]


def budget(keep, n: int) -> int:
    """The most tokens an image of ``n`` prunable tokens may keep under ``keep``."""
    spec = auto_keep(keep)
    if spec is not None:
        return min(n, spec.max) if spec.max is not None else n
    if isinstance(keep, float):
        return max(1, min(n, int(round(keep * n))))
    return min(keep, n)


def check_budgets(st, keep, counts: list[list[int]]) -> None:
    assert len(st.kept) == len(counts)
    for b, per in enumerate(counts):
        n = sum(per)
        kept = st.kept[b].cpu()
        assert st.visual_before[b] == n, (b, st.visual_before, counts)
        assert kept.numel() == st.visual_after[b]
        if kept.numel():
            assert bool((kept[1:] > kept[:-1]).all()), f"sample {b}: kept indices not sorted and distinct"
            assert 0 <= int(kept.min()) and int(kept.max()) < n
        start = 0
        for i, m in enumerate(per):
            k = int(((kept >= start) & (kept < start + m)).sum())
            assert 1 <= k <= budget(keep, m), f"sample {b} image {i}: kept {k} of {m} under keep={keep!r}"
            start += m
        if st.per_image is not None:
            assert len(st.per_image[b]) == len(per) and sum(st.per_image[b]) == st.visual_after[b]


def check_oracle(model, inputs, pruned, st, method: str, valid_rows=None) -> None:
    """drop == mask (in-LLM) or == the unpatched LM on the shortened sequence (pre-LLM selections)."""
    if st.stage == "llm":
        dropped = dropped_positions(model, inputs["input_ids"], st)
        if st.stages:
            stages = [(s["layer"], dropped_positions(model, inputs["input_ids"], _with_kept(st, s["kept"])))
                      for s in st.stages]
            expected = staged_masked_logits(model, inputs, stages)
        else:
            expected = masked_logits(model, inputs, st.layer, dropped)
        check = inputs["attention_mask"].bool() & ~dropped
        torch.testing.assert_close(pruned[check], expected[check], atol=3e-5, rtol=1e-4)
        return
    expected, mask = lm_on_kept(model, inputs, st)
    for b, got in enumerate(valid_rows):
        want = expected[b][mask[b]]
        assert got.shape == want.shape, f"sample {b}: {tuple(got.shape)} kept rows, the shortened LM has {tuple(want.shape)}"
        torch.testing.assert_close(got, want, atol=3e-5, rtol=1e-4)


def _with_kept(st, kept):
    import dataclasses

    return dataclasses.replace(st, kept=kept)


def near_tie(single_scores: torch.Tensor, a: torch.Tensor, b: torch.Tensor, tol: float = 1e-4) -> bool:
    """Whether the kept sets ``a`` and ``b`` differ only in tokens whose scores tie (relative ``tol``)."""
    diff = sorted(set(a.tolist()) ^ set(b.tolist()))
    if not diff:
        return True
    vals = single_scores.float().cpu()[torch.tensor(diff)]
    return float(vals.max() - vals.min()) <= tol * (float(vals.abs().max()) or 1.0)


# ---- LLaVA-1.5 ----------------------------------------------------------------------------------
@prop(8)
@given(samples=llava_samples(), side=SIDES, method=st.sampled_from(IN_LLM_METHODS), keep=KEEPS,
       layer=st.integers(0, 2))
def test_llava_in_llm_drop_equals_mask(samples, side, method, keep, layer):
    model = get_model("llava")
    inputs = llava_inputs(samples, side)
    try:
        if not apply(model, method, keep, layer_for(method, model, layer)):
            return
        pruned = run(model, inputs)
        st_ = vtprune.stats(model)
    finally:
        vtprune.remove(model)
    if not any(s.items for s in samples):  # nothing to prune: the unpatched model
        torch.testing.assert_close(pruned, run(model, inputs), atol=1e-5, rtol=0)
        return
    assert st_.stage == "llm"
    check_budgets(st_, keep, token_counts("llava", samples, inputs))
    check_oracle(model, inputs, pruned, st_, method)


@prop(8)
@given(samples=llava_samples(), side=SIDES, method=st.sampled_from(PRE_LLM_SELECTIONS), keep=KEEPS)
def test_llava_pre_llm_equals_shortened_lm(samples, side, method, keep):
    model = get_model("llava")
    inputs = llava_inputs(samples, side)
    try:
        if not apply(model, method, keep, None):
            return
        pruned = run(model, inputs)
        st_ = vtprune.stats(model)
        rows = kept_rows(model, inputs, pruned, st_) if st_ is not None else None
    finally:
        vtprune.remove(model)
    if not any(s.items for s in samples):
        torch.testing.assert_close(pruned, run(model, inputs), atol=1e-5, rtol=0)
        return
    assert st_.stage == "pre-llm"
    check_budgets(st_, keep, token_counts("llava", samples, inputs))
    check_oracle(model, inputs, pruned, st_, method, rows)


@prop(10)
@given(samples=llava_samples(), side=SIDES, method=st.sampled_from([m for m in PRESETS if m not in EXITS]), keep=KEEPS)
def test_llava_every_preset_keeps_within_budget(samples, side, method, keep):
    """Every preset on random batches: no crash, per-image budgets, and generate() returns one row per
    sample."""
    model = get_model("llava")
    inputs = llava_inputs(samples, side)
    try:
        if not apply(model, method, keep, default_layer(method, model)):
            return
        run(model, inputs)
        st_ = vtprune.stats(model)
        tokens = generate(model, inputs)
    finally:
        vtprune.remove(model)
    assert tokens.shape[0] == len(samples) and inputs["input_ids"].shape[1] < tokens.shape[1]
    if any(s.items for s in samples):
        check_budgets(st_, keep, token_counts("llava", samples, inputs))


@prop(8)
@given(samples=llava_samples(max_images=4), side=SIDES, method=st.sampled_from(PRESETS),
       keep=st.sampled_from([1.0, 100_000]))
def test_llava_keep_all_is_the_unpatched_model(samples, side, method, keep):
    check_keep_all(get_model("llava"), llava_inputs(samples, side), method, keep)


BATCH_METHODS = ["uniform", "cls", "fastv", "divprune"]  # selections that depend on the sample only


def _batch_vs_single(kind: str, samples, side, method, keep, layer, make_inputs):
    model = get_model(kind)
    inputs = make_inputs(samples, side)
    try:
        if not apply(model, method, keep, layer_for(method, model, layer)):
            return
        logits = run(model, inputs)
        st_ = vtprune.stats(model)
        rows = kept_rows(model, inputs, logits, st_)
        singles = []
        for s in samples:
            one = make_inputs([s], side)
            out = run(model, one)
            st1 = vtprune.stats(model)
            singles.append((kept_rows(model, one, out, st1)[0], st1))
    finally:
        vtprune.remove(model)
    for b, (row, (single, st1)) in enumerate(zip(rows, singles)):
        if st_ is not None and st1 is not None and st_.kept[b].numel() + st1.kept[0].numel():
            a, c = st_.kept[b].cpu(), st1.kept[0].cpu()
            if not torch.equal(a, c):
                assert st1.scores is not None and near_tie(st1.scores[0], a, c), (
                    f"sample {b} keeps {sorted(set(a.tolist()) ^ set(c.tolist()))} differently in the batch")
                continue  # a near-tie decided differently: the logits differ legitimately
        assert row.shape == single.shape, f"sample {b}: {tuple(row.shape)} in the batch, {tuple(single.shape)} alone"
        torch.testing.assert_close(row, single, atol=1e-4, rtol=1e-4)


@prop(6)
@given(samples=llava_samples(max_images=4), side=SIDES, method=st.sampled_from(BATCH_METHODS), keep=KEEPS,
       layer=st.integers(0, 2))
def test_llava_batch_rows_equal_single_runs(samples, side, method, keep, layer):
    in_llm = method in ("fastv", "divprune")  # uniform and cls select before the LLM only
    _batch_vs_single("llava", samples, side, method, keep, layer if in_llm else None, llava_inputs)


# ---- Qwen-VL ------------------------------------------------------------------------------------
QWEN_KINDS = st.sampled_from(["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
QWEN_METHODS = ["fastv", "cls", "uniform", "random", "divprune"]


@prop(10)
@given(kind=QWEN_KINDS, samples=qwen_samples(), side=SIDES, method=st.sampled_from(QWEN_METHODS), keep=KEEPS,
       in_llm=st.booleans())
def test_qwen_drop_equals_mask_and_budgets(kind, samples, side, method, keep, in_llm):
    model = get_model(kind)
    inputs = qwen_inputs(kind, samples, side)
    layer = 2 if method == "fastv" or (in_llm and method != "cls") else None
    try:
        if not apply(model, method, keep, layer_for(method, model, layer)):
            return
        pruned = run(model, inputs)
        st_ = vtprune.stats(model)
        rows = kept_rows(model, inputs, pruned, st_) if st_ is not None else None
    finally:
        vtprune.remove(model)
    if not any(s.items for s in samples):
        torch.testing.assert_close(pruned, run(model, inputs), atol=1e-5, rtol=0)
        return
    check_budgets(st_, keep, token_counts(kind, samples, inputs))
    check_oracle(model, inputs, pruned, st_, method, rows)


@prop(6)
@given(kind=QWEN_KINDS, samples=qwen_samples(max_items=3), side=SIDES, method=st.sampled_from(BATCH_METHODS),
       keep=KEEPS)
def test_qwen_batch_rows_equal_single_runs(kind, samples, side, method, keep):
    _batch_vs_single(kind, samples, side, method, keep, 2 if method == "fastv" else None,
                     functools.partial(qwen_inputs, kind))


@prop(6)
@given(kind=QWEN_KINDS, samples=qwen_samples(), side=SIDES,
       method=st.sampled_from([m for m in PRESETS if m not in LLAVA_FAMILY_ONLY]), keep=st.sampled_from([1.0, 100_000]))
def test_qwen_keep_all_is_the_unpatched_model(kind, samples, side, method, keep):
    check_keep_all(get_model(kind), qwen_inputs(kind, samples, side), method, keep)


# ---- LLaVA-NeXT ---------------------------------------------------------------------------------
NEXT_SIZES = [(400, 500), (300, 620), (336, 336), (620, 300)]


@functools.cache
def next_processor():
    return tiny_llava_processor(next_=True)


def next_inputs(samples, side: str = "left"):
    proc = next_processor()
    texts = ["USER: " + " ".join(["<image>"] * len(s.items)) + "\n" + "What is in the picture? " * s.repeats
             + "ASSISTANT:" for s in samples]
    images = [image(*size, seed=j) for s in samples for j, size in enumerate(s.items)]
    proc.tokenizer.padding_side = side
    kwargs = dict(text=texts, return_tensors="pt", padding=True)
    if images:
        kwargs["images"] = images
    return proc(**kwargs)


@st.composite
def next_samples(draw):
    samples, left = [], 2
    for _ in range(draw(st.integers(1, 2))):
        n = draw(st.integers(0, left))
        left -= n
        samples.append(Sample(tuple(draw(st.sampled_from(NEXT_SIZES)) for _ in range(n)), draw(st.integers(1, 3))))
    return samples


@prop(4)
@given(samples=next_samples(), side=SIDES, method=st.sampled_from(["fastv", "cls", "uniform", "random"]),
       keep=KEEPS)
def test_next_drop_equals_mask_and_keep_all(samples, side, method, keep):
    model = get_model("next")
    inputs = next_inputs(samples, side)
    layer = 1 if method == "fastv" else None
    with torch.no_grad():
        ref = run(model, inputs)
    try:
        apply(model, method, 1.0, layer)
        same = run(model, inputs)
        if not apply(model, method, keep, layer):
            return
        pruned = run(model, inputs)
        st_ = vtprune.stats(model)
        rows = kept_rows(model, inputs, pruned, st_) if st_ is not None else None
    finally:
        vtprune.remove(model)
    torch.testing.assert_close(same, ref, atol=1e-5, rtol=0)
    if any(s.items for s in samples):
        check_oracle(model, inputs, pruned, st_, method, rows)


def test_properties_cover_the_registry():
    """The method lists above name registered presets (a renamed preset must not silently drop out)."""
    known = set(PRESETS)
    for name in IN_LLM_METHODS + PRE_LLM_SELECTIONS + QWEN_METHODS + BATCH_METHODS:
        assert name in known, name
    assert not (set(PRE_LLM_SELECTIONS) & (RECYCLING | OWN_REFERENCE))
