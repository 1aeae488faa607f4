"""Pruning under the attention implementations whose masks are not sdpa's 4-D ones.

- FlashAttention-2 takes a 2-D key validity (or no mask) and applies causality itself; it cannot run here,
  so a stand-in with its contract (tests/fa2_standin.py) is registered through transformers'
  AttentionInterface / AttentionMaskInterface. benchmarks/attention_kernels_check.py runs the real kernel
  on a GPU.
- flex_attention takes a BlockMask. transformers compiles flex_attention and its block masks; on this CPU
  torch 2.14's inductor fails to build the kernels for dynamic shapes with masks that read tensors (padding:
  unpatched models fail too) and every compile costs seconds, so the tests run torch's eager flex_attention,
  the same BlockMask semantics without the compiled kernel (the GPU check compiles). transformers has no
  flex_attention for Qwen-VL models, so those cases skip.

Every comparison runs against the sdpa model with the same weights (same seed): keep-all == unpatched under
the same implementation, in-LLM drop == the masking oracle, pre-LLM == the shortened language model,
generate() == the sdpa-patched model's generate().
"""

from __future__ import annotations

import pytest
import torch
import transformers

if int(transformers.__version__.split(".")[0]) < 5:  # AttentionInterface / AttentionMaskInterface
    pytest.skip("the attention-implementation tests need transformers 5", allow_module_level=True)

from conftest import batch, get_model, qwen_batch  # noqa: E402
from fa2_standin import NAME as FLASH  # noqa: E402
from fa2_standin import register, standin_attention, standin_model  # noqa: E402
from oracle import dropped_positions, lm_on_kept, masked_logits, staged_masked_logits

import vtprune
from vtprune.runtime.llm_stages import MASK_2D, MASK_4D, MASK_FLEX, decode_mask, mask_contract, prefill_mask
from vtprune.toy.tiny import tiny_llava, tiny_llava_processor
from vtprune.toy.tiny_qwen import tiny_qwen

FLEX = "flex_attention"
IMPLS = [FLASH, FLEX]
KINDS = ["llava", "qwen2_vl"]
CASES = ["single", "left", "right", "ragged"]
LAYER = 1
STAGED = {"layers": [0, 1, 2], "ratios": [0.5, 0.25]}  # transprune on the 4-layer tiny models

_PROC = {}
_FLEX_MODELS: dict = {}


def processor():
    if "llava" not in _PROC:
        _PROC["llava"] = tiny_llava_processor()
    return _PROC["llava"]


def inputs_for(kind: str, case: str):
    """``single``: batch 1; ``left``/``right``: a padded batch of 2; ``ragged``: samples keeping different counts
    (LLaVA: 2 images and 1; Qwen-VL: images of different sizes and a fractional budget), left-padded."""
    side = "right" if case == "right" else "left"
    if kind == "llava":
        return batch(processor(), {"single": [1], "left": [1, 1], "right": [1, 1], "ragged": [2, 1]}[case], side)
    return qwen_batch(kind, "single" if case == "single" else "left_padded_2", side)


def keep_for(case: str):
    return 0.3 if case == "ragged" else 12  # a fraction of images of different sizes keeps different counts


def _eager_flex(monkeypatch):
    """Run transformers' flex_attention path without torch.compile (see the module docstring)."""
    import transformers.integrations.flex_attention as tfa
    import transformers.masking_utils as mu
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    monkeypatch.setattr(tfa, "compile_friendly_flex_attention",
                        lambda q, k, v, training=False, **kw: flex_attention(q, k, v, **kw))
    monkeypatch.setattr(mu, "create_block_mask", lambda *a, _compile=False, **kw: create_block_mask(*a, **kw))


def model_for(impl: str, kind: str, monkeypatch):
    """The tiny model of ``kind`` under ``impl`` (unpatched; weights equal to ``get_model(kind)``'s)."""
    if impl == FLASH:
        return standin_model(kind)
    from transformers.utils import is_torch_flex_attn_available

    if not is_torch_flex_attn_available():
        pytest.skip("this torch has no flex_attention")
    if kind.startswith("qwen"):
        pytest.skip("transformers has no flex_attention for Qwen-VL models (_supports_flex_attn is False)")
    _eager_flex(monkeypatch)
    if kind not in _FLEX_MODELS:
        # the vision tower stays on sdpa: flex there would only add compile time, the masks under test are the LLM's
        _FLEX_MODELS[kind] = tiny_llava(attn_implementation={"": "sdpa", "text_config": FLEX, "vision_config": "sdpa"})
    model = _FLEX_MODELS[kind]
    vtprune.remove(model)
    return model


def valid_of(inputs) -> torch.Tensor:
    return inputs["attention_mask"].bool()


def generate(model, inputs, **kw):
    with torch.no_grad():
        return model.generate(**inputs, max_new_tokens=4, do_sample=False, output_logits=True,
                              return_dict_in_generate=True, **kw)


def assert_same_generation(out, ref):
    assert torch.equal(out.sequences, ref.sequences)
    for step, expected in zip(out.logits, ref.logits):
        torch.testing.assert_close(step, expected, atol=3e-5, rtol=1e-4)


# ---- the implementations themselves ---------------------------------------------------------------------

def test_mask_contracts():
    register()
    assert mask_contract("sdpa") == MASK_4D and mask_contract("eager") == MASK_4D and mask_contract(None) == MASK_4D
    assert mask_contract("flash_attention_2") == MASK_2D and mask_contract("flash_attention_3") == MASK_2D
    assert mask_contract(FLEX) == MASK_FLEX
    assert mask_contract(FLASH) == MASK_2D  # registered with transformers' flash_attention_mask
    assert mask_contract("vtprune_unregistered") is None


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("case", ["left", "right"])
def test_unpatched_matches_sdpa(impl, kind, case, monkeypatch):
    """The implementations agree with sdpa on real tokens (padding rows differ: FlashAttention leaves them 0)."""
    model = model_for(impl, kind, monkeypatch)
    inputs = inputs_for(kind, case)
    with torch.no_grad():
        out = model(**inputs).logits
        ref = get_model(kind)(**inputs).logits
    torch.testing.assert_close(out[valid_of(inputs)], ref[valid_of(inputs)], atol=2e-5, rtol=1e-4)


class _Attn(torch.nn.Module):
    is_causal = True


def _ragged_plan(n: int, valid: torch.Tensor, keeps: list[list[int]]):
    """keep_seq / filler of an in-LLM plan keeping positions ``keeps[b]`` (fillers first, as the runtime builds)."""
    width = max(len(k) for k in keeps)
    keep_seq = torch.zeros(len(keeps), width, dtype=torch.long)
    filler = torch.zeros(len(keeps), width, dtype=torch.bool)
    for b, kept in enumerate(keeps):
        pad = width - len(kept)
        drops = [p for p in range(n) if p not in kept][:pad]
        keep_seq[b] = torch.tensor(drops + kept)
        filler[b, :pad] = True
    return keep_seq, filler


@pytest.mark.parametrize("q_len", [None, 1, 2])
def test_flash_unpadding_equals_4d_mask(q_len):
    """The kernel-level claim: unpadding a compacted row by its 2-D validity (fillers and padding False, left of
    or among the kept tokens) and applying causality over the valid tokens in order equals the gathered 4-D mask,
    in prefill (``q_len`` None) and in decode steps (bottom-right alignment)."""
    torch.manual_seed(0)
    n, heads, kv_heads, dim = 12, 4, 2, 8
    valid = torch.ones(3, n, dtype=torch.bool)
    valid[1, :3] = False  # left padding
    valid[2, -2:] = False  # right padding
    keeps = [[0, 1, 2, 5, 6, 9, 10, 11], [3, 4, 7, 11], [0, 2, 3, 4, 6, 8]]
    keep_seq, filler = _ragged_plan(n, valid, keeps)
    width = keep_seq.shape[1]
    mask4 = (torch.ones(n, n, dtype=torch.bool).tril()[None] & valid[:, None, :])[:, None]
    if q_len is None:
        m4 = prefill_mask(mask4, keep_seq, filler, n, True, MASK_4D)
        m2 = prefill_mask(valid, keep_seq, filler, n, True, MASK_2D)
        q_rows, kv = width, width
        real = valid.gather(1, keep_seq) & ~filler  # the rows that are real tokens
    else:
        kv_full = n + 3  # three tokens decoded after the prompt, the last q_len of them fed now
        valid_full = torch.cat([valid, torch.ones(3, 3, dtype=torch.bool)], dim=1)
        qpos = torch.arange(kv_full - q_len, kv_full)
        mask4 = ((torch.arange(kv_full)[None] <= qpos[:, None])[None] & valid_full[:, None, :])[:, None]
        m4 = decode_mask(mask4, keep_seq, filler, n, q_len, kv_full, True, MASK_4D)
        m2 = decode_mask(valid_full, keep_seq, filler, n, q_len, kv_full, True, MASK_2D)
        q_rows, kv = q_len, width + 3
        real = torch.ones(3, q_len, dtype=torch.bool)
    assert m2.shape == (3, kv) and m2.dtype == torch.bool
    q = torch.randn(3, heads, q_rows, dim)
    k, v = torch.randn(3, kv_heads, kv, dim), torch.randn(3, kv_heads, kv, dim)
    flash, _ = standin_attention(_Attn(), q, k, v, m2, scaling=dim ** -0.5)
    rep = heads // kv_heads
    ref = torch.nn.functional.scaled_dot_product_attention(
        q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1), attn_mask=m4).transpose(1, 2)
    torch.testing.assert_close(flash[real], ref[real], atol=1e-5, rtol=1e-5)


# ---- pruning under each implementation --------------------------------------------------------------------

@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("method,layer", [("fastv", LAYER), ("random", None)])
def test_keep_all_is_identical(impl, kind, method, layer, monkeypatch):
    model = model_for(impl, kind, monkeypatch)
    inputs = inputs_for(kind, "ragged")
    with torch.no_grad():
        ref = model(**inputs).logits
        ref_gen = generate(model, inputs)
        vtprune.apply(model, method=method, keep=1.0, layer=layer)
        out = model(**inputs).logits
        gen = generate(model, inputs)
    vtprune.remove(model)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
    assert_same_generation(gen, ref_gen)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("case", CASES)
def test_in_llm_drop_equals_masking(impl, kind, case, monkeypatch):
    model = model_for(impl, kind, monkeypatch)
    inputs = inputs_for(kind, case)
    vtprune.apply(model, method="fastv", keep=keep_for(case), layer=LAYER)
    with torch.no_grad():
        pruned = model(**inputs).logits
    st = vtprune.stats(model)
    vtprune.remove(model)
    if case == "ragged":
        assert len(set(st.visual_after)) > 1  # fillers
    sdpa = get_model(kind)
    dropped = dropped_positions(sdpa, inputs["input_ids"], st)
    ref = masked_logits(sdpa, inputs, LAYER, dropped)
    check = valid_of(inputs) & ~dropped
    torch.testing.assert_close(pruned[check], ref[check], atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("kind", KINDS)
def test_staged_drop_equals_staged_masking(impl, kind, monkeypatch):
    import dataclasses

    model = model_for(impl, kind, monkeypatch)
    inputs = inputs_for(kind, "ragged")
    vtprune.apply(model, method="transprune", keep=12, **STAGED)
    with torch.no_grad():
        pruned = model(**inputs).logits
    st = vtprune.stats(model)
    vtprune.remove(model)
    sdpa = get_model(kind)
    stages = [(s["layer"], dropped_positions(sdpa, inputs["input_ids"], dataclasses.replace(st, kept=s["kept"])))
              for s in st.stages]
    assert len(stages) == 3
    ref = staged_masked_logits(sdpa, inputs, stages)
    check = valid_of(inputs) & ~stages[-1][1]
    torch.testing.assert_close(pruned[check], ref[check], atol=3e-5, rtol=1e-4)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("case", CASES)
def test_pre_llm_equals_shortened_lm(impl, kind, case, monkeypatch):
    model = model_for(impl, kind, monkeypatch)
    inputs = inputs_for(kind, case)
    vtprune.apply(model, method="random", keep=keep_for(case))
    with torch.no_grad():
        pruned = model(**inputs).logits
    st = vtprune.stats(model)
    vtprune.remove(model)
    expected, valid = lm_on_kept(get_model(kind), inputs, st)
    assert pruned.shape[1] == expected.shape[1]
    # the oracle re-pads on the left; the runtime keeps the batch's side: compare each sample's real rows in order
    for b, n_real in enumerate(valid.sum(1).tolist()):
        rows = slice(0, n_real) if case == "right" else slice(pruned.shape[1] - n_real, None)
        torch.testing.assert_close(pruned[b, rows], expected[b][valid[b]], atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("method,options", [("fastv", {"layer": LAYER}), ("transprune", STAGED), ("random", {})])
def test_generate_matches_sdpa(impl, kind, method, options, monkeypatch):
    """Decode steps with the cache (layers <= K hold N entries, later ones N'; fillers hidden) under the kernel's
    mask contract give the sdpa-patched model's tokens and logits."""
    model = model_for(impl, kind, monkeypatch)
    sdpa = get_model(kind)
    inputs = inputs_for(kind, "ragged")
    outs = []
    for m in (model, sdpa):
        vtprune.apply(m, method=method, keep=keep_for("ragged"), **options)
        outs.append(generate(m, inputs))
        vtprune.remove(m)
    assert_same_generation(*outs)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("kind", KINDS)
def test_static_cache_pre_llm_matches_sdpa(impl, kind, monkeypatch):
    """A static cache: generate() hands FlashAttention models a 2-D mask (Qwen-VL: in a dict) and flex models a
    BlockMask; pre-LLM shortening reads the validity from either."""
    model = model_for(impl, kind, monkeypatch)
    sdpa = get_model(kind)
    inputs = inputs_for(kind, "ragged")
    outs = []
    for m in (model, sdpa):
        vtprune.apply(m, method="random", keep=keep_for("ragged"))
        outs.append(generate(m, inputs, cache_implementation="static"))
        vtprune.remove(m)
    assert_same_generation(*outs)


# ---- what cannot be supported is refused at apply ---------------------------------------------------------

def test_implementation_without_mask_function_is_refused():
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    name = "vtprune_test_nomask"
    AttentionInterface.register(name, sdpa_attention_forward)  # no AttentionMaskInterface entry: no mask at all
    model = tiny_llava()  # a fresh model: its config is changed
    model.config._attn_implementation = name
    for method, layer in (("fastv", LAYER), ("random", None)):
        with pytest.raises(vtprune.ConfigError, match=f"{name}.*AttentionMaskInterface"):
            vtprune.apply(model, method=method, keep=12, layer=layer)
        assert not hasattr(model, "_vtprune_state")


def test_flowcut_llm_stage_refused_under_flash():
    register()
    model = tiny_qwen("qwen2_vl")  # a fresh model: its config is changed
    model.config.text_config._attn_implementation = FLASH  # vision tower on sdpa, LLM on the FlashAttention contract
    with pytest.raises(vtprune.ConfigError, match=f"flowcut.*{FLASH}.*sdpa"):
        vtprune.apply(model, method="flowcut", keep=12, layer=2)

