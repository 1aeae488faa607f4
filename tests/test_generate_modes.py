"""Every generate() mode for every preset: greedy, seeded sampling, beam search, num_return_sequences, a
streamer, use_cache=False, a continued cache, max_new_tokens=1, and the stats afterwards.

Every preset of `method_strings()` runs on the tiny LLaVA-1.5 (a left-padded batch: two rows of different
lengths); fastv, cls, transprune, sparsevlm and flowcut also run on the tiny Qwen2-VL (M-RoPE; a
left-padded batch with images of two sizes) and LLaVA-NeXT (one image: anyres tiles, newline tokens, and
no padding, so generate() drops the mask). ``--runslow`` adds the other presets there and on Qwen2.5-VL /
Qwen3-VL. Each mode checks what holds whatever the (random) weights are: the same tokens (and logits) as
the cached greedy run where the mode must not change them, the shapes and prompt rows where it does, and
keep-all equal to the unpatched model for beams and samples. One cached greedy run per model and preset
(`_greedy`) is the reference of the other modes.
"""

from __future__ import annotations

import pytest
import torch
from conftest import batch, budget_for, get_model, qwen_batch
from test_presets import LLAVA_FAMILY_ONLY, method_strings, options_for, setup_of
from transformers.generation.streamers import BaseStreamer

import vtprune
from vtprune.toy.tiny import tiny_llava_processor

KEEP = 12
NEW = 4  # tokens of the greedy reference; other modes generate 3 (no EOS: the tiny models never stop early)
NO_EOS = -1
REDUCED = ["fastv", "cls", "transprune", "sparsevlm", "flowcut"]

EXTRA = {"zoo": {"directions": 8}}  # 64 perturbed projector runs per prefill: the cost of the whole file
SLOW_MODES = {("cdpruner", "keep_all")}  # its greedy MAP over all 576 tokens of each image: about a minute


def _case_list() -> list:
    fast = [("llava", m) for m in method_strings()] + [(k, m) for k in ("qwen2_vl", "next") for m in REDUCED]
    slow = [(k, m) for k in ("qwen2_vl", "next") for m in method_strings() if m not in REDUCED]
    slow += [(k, m) for k in ("qwen2_5_vl", "qwen3_vl") for m in method_strings()]
    slow = [(k, m) for k, m in slow if not (k.startswith("qwen") and m in LLAVA_FAMILY_ONLY)]
    return [(k, m, False) for k, m in fast] + [(k, m, True) for k, m in slow]


def cases(mode: str) -> list:
    """``(kind, method)`` parameters of one mode, slow marks attached."""
    out = []
    for kind, method, slow in _case_list():
        marks = [pytest.mark.slow] if slow else []
        if (method, mode) in SLOW_MODES:
            marks = [pytest.mark.slow]
        out.append(pytest.param(kind, method, marks=marks, id=f"{kind}-{method}"))
    return out


# ---- inputs, setup, references --------------------------------------------------------------------

def _inputs(kind: str):
    if kind == "llava":
        return batch(tiny_llava_processor(), [1, 1])  # left-padded: rows of 589 and 598 real tokens
    if kind == "next":  # one wide image (3 tiles, unpadded rows): 1278 tokens; the padded batches are above
        return batch(tiny_llava_processor(next_=True), [1], sizes=((100, 340),))
    return qwen_batch(kind, "left_padded_2")


def _apply(model, method: str, keep=KEEP) -> None:
    stage, layer = setup_of(method, model)
    vtprune.apply(model, method=method, keep=budget_for(method, keep), layer=layer if stage == "llm" else None,
                  **options_for(method, model), **EXTRA.get(method, {}))


def _generate(model, inputs, **kwargs):
    kwargs = {"max_new_tokens": NEW - 1, "do_sample": False, "eos_token_id": NO_EOS, **kwargs}
    with torch.no_grad():
        return model.generate(**inputs, **kwargs)


class Collect(BaseStreamer):
    """A streamer that keeps what generate() hands it: first the prompt, then each step's ``[B]`` tokens."""

    def __init__(self) -> None:
        self.chunks: list[torch.Tensor] = []
        self.ended = False

    def put(self, value: torch.Tensor) -> None:
        self.chunks.append(value.clone())

    def end(self) -> None:
        self.ended = True


_GREEDY: dict = {}
_UNPATCHED: dict = {}


def _greedy(kind: str, method: str) -> dict:
    """The cached greedy run of a preset (NEW tokens, a streamer, the logits) and the stats after it."""
    if (kind, method) not in _GREEDY:
        model, inputs = get_model(kind), _inputs(kind)
        streamer = Collect()
        try:
            _apply(model, method)
            out = _generate(model, inputs, max_new_tokens=NEW, streamer=streamer, output_logits=True,
                            return_dict_in_generate=True)
            st = vtprune.stats(model)
        finally:
            vtprune.remove(model)
        _GREEDY[kind, method] = {"tokens": out.sequences, "logits": out.logits, "streamer": streamer,
                                 "stats": st}
    return _GREEDY[kind, method]


def _unpatched(kind: str) -> dict:
    """The unpatched model's beams and seeded samples."""
    if kind not in _UNPATCHED:
        model, inputs = get_model(kind), _inputs(kind)
        beams = _generate(model, inputs, num_beams=2)
        torch.manual_seed(5)
        samples = _generate(model, inputs, do_sample=True)
        _UNPATCHED[kind] = {"beams": beams, "samples": samples}
    return _UNPATCHED[kind]


def _check_stats_describe(st, inputs, model, rows: int = 1) -> None:
    """``st`` describes the prompt (each row repeated ``rows`` times), not a decode step; a row that
    exited (``dyvte``) keeps no visual token and names its exit layer."""
    mask, ids = inputs["attention_mask"], inputs["input_ids"]
    placeholders = [getattr(model.config, name, None) for name in ("image_token_id", "video_token_id")]
    visual = torch.isin(ids, torch.tensor([t for t in placeholders if t is not None])).sum(1)
    expand = [int(n) for n in mask.sum(1) for _ in range(rows)]
    assert st.seq_len_before == expand
    assert st.visual_before == [int(n) for n in visual for _ in range(rows)]
    assert st.visual_after == [int(k.numel()) for k in st.kept]
    for a, b, exit_layer in zip(st.visual_after, st.visual_before, st.exit_layers):
        assert (a == 0) == (exit_layer is not None) and a < b


def _kept(st) -> list[list[int]]:
    return [k.tolist() for k in st.kept]


# ---- the modes ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind,method", cases("greedy"))
def test_greedy_streams_its_tokens_and_the_stats_describe_the_prompt(kind, method):
    model, inputs = get_model(kind), _inputs(kind)
    ref = _greedy(kind, method)
    tokens, streamer, n = ref["tokens"], ref["streamer"], inputs["input_ids"].shape[1]
    assert tokens.shape == (inputs["input_ids"].shape[0], n + NEW)
    assert torch.equal(tokens[:, :n], inputs["input_ids"])
    assert torch.equal(streamer.chunks[0], inputs["input_ids"]) and streamer.ended
    assert torch.equal(torch.stack([c.view(-1) for c in streamer.chunks[1:]], 1), tokens[:, n:])
    _check_stats_describe(ref["stats"], inputs, model)


@pytest.mark.parametrize("kind,method", cases("no_cache"))
def test_use_cache_false_answers_as_the_cached_run(kind, method):
    model, inputs = get_model(kind), _inputs(kind)
    ref = _greedy(kind, method)
    try:
        _apply(model, method)
        out = _generate(model, inputs, use_cache=False, max_new_tokens=2)  # a prefill, then a continuation
        st = vtprune.stats(model)
    finally:
        vtprune.remove(model)
    assert torch.equal(out, ref["tokens"][:, :out.shape[1]])
    assert _kept(st) == _kept(ref["stats"])  # the prompt's selection, not the last step's


@pytest.mark.parametrize("kind,method", cases("sample"))
def test_sampling_with_a_seed_is_reproducible(kind, method):
    model, inputs = get_model(kind), _inputs(kind)
    n = inputs["input_ids"].shape[1]
    runs = []
    try:
        _apply(model, method)
        for _ in range(2):
            torch.manual_seed(11)
            runs.append(_generate(model, inputs, do_sample=True))
    finally:
        vtprune.remove(model)
    assert runs[0].shape == (inputs["input_ids"].shape[0], n + NEW - 1)
    assert torch.equal(runs[0][:, :n], inputs["input_ids"])
    assert torch.equal(runs[0], runs[1])


@pytest.mark.parametrize("kind,method", cases("return_sequences"))
def test_num_return_sequences_samples_each_prompt_twice(kind, method):
    model, inputs = get_model(kind), _inputs(kind)
    ids, n = inputs["input_ids"], inputs["input_ids"].shape[1]
    try:
        _apply(model, method)
        torch.manual_seed(3)
        out = _generate(model, inputs, do_sample=True, num_return_sequences=2)
        st = vtprune.stats(model)
    finally:
        vtprune.remove(model)
    assert out.shape == (2 * ids.shape[0], n + NEW - 1)
    assert torch.equal(out[:, :n], ids.repeat_interleave(2, dim=0))  # row 2b and 2b + 1: prompt b
    _check_stats_describe(st, inputs, model, rows=2)


@pytest.mark.parametrize("kind,method", cases("beam"))
def test_beam_search_returns_one_row_per_prompt(kind, method):
    model, inputs = get_model(kind), _inputs(kind)
    ids, n = inputs["input_ids"], inputs["input_ids"].shape[1]
    try:
        _apply(model, method)
        out = _generate(model, inputs, num_beams=2)
        st = vtprune.stats(model)
    finally:
        vtprune.remove(model)
    assert out.shape == (ids.shape[0], n + NEW - 1)
    assert torch.equal(out[:, :n], ids)
    _check_stats_describe(st, inputs, model, rows=2)  # the prefill ran on the beams' expanded batch


@pytest.mark.parametrize("kind,method", cases("keep_all"))
def test_keep_all_beams_and_samples_equal_the_unpatched_model(kind, method):
    """Keep-all changes nothing, also where generate() expands the batch and draws random numbers: the
    scorers take none from the global generator."""
    model, inputs = get_model(kind), _inputs(kind)
    ref = _unpatched(kind)
    try:
        _apply(model, method, keep=1.0)
        assert torch.equal(_generate(model, inputs, num_beams=2), ref["beams"])
        torch.manual_seed(5)
        samples = _generate(model, inputs, do_sample=True)
    finally:
        vtprune.remove(model)
    assert torch.equal(samples, ref["samples"])


@pytest.mark.parametrize("restart", ["full", "new"])
@pytest.mark.parametrize("kind,method", cases("continue"))
def test_a_continued_cache_equals_one_longer_generate(kind, method, restart):
    """generate(), then generate() again from its cache (``return_dict_in_generate=True``): the same tokens
    and logits as one generate() of all of them. ``restart="full"``: two tokens, then the whole sequence
    so far (generate() feeds what the cache lacks); ``"new"``: max_new_tokens=1 (the prefill only: the
    greedy run's first token and logits), then only that token with the whole mask."""
    model, inputs = get_model(kind), _inputs(kind)
    ref = _greedy(kind, method)
    mask, n = inputs["attention_mask"], inputs["input_ids"].shape[1]
    first_new = 2 if restart == "full" else 1
    try:
        _apply(model, method)
        first = _generate(model, inputs, max_new_tokens=first_new, output_logits=True,
                          return_dict_in_generate=True)
        st = vtprune.stats(model)
        seq = first.sequences
        longer = torch.cat([mask, mask.new_ones(mask.shape[0], first_new)], dim=1)
        again = {"input_ids": seq if restart == "full" else seq[:, -1:], "attention_mask": longer}
        second = _generate(model, again, cache=first.cache, max_new_tokens=NEW - first_new,
                           output_logits=True, return_dict_in_generate=True)
        st_after = vtprune.stats(model)
    finally:
        vtprune.remove(model)
    assert torch.equal(seq, ref["tokens"][:, :n + first_new])
    got = second.sequences if restart == "full" else torch.cat([seq[:, :-1], second.sequences], dim=1)
    assert torch.equal(got, ref["tokens"])
    for a, b in zip([*first.logits, *second.logits], ref["logits"], strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert _kept(st) == _kept(ref["stats"]) and _kept(st_after) == _kept(st)  # the restart is no new prefill
