"""The public API: apply/remove/disabled/stats/methods, PruneConfig, and clear errors on bad input."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import batch, get_model

import vtprune
from vtprune import ConfigError, PruneConfig, UnsupportedModelError


def test_methods_lists_presets():
    m = vtprune.methods()
    assert {"fastv", "cls", "random", "uniform"} <= set(m)
    assert all(isinstance(v, str) and v for v in m.values())


def test_config_json_round_trip_and_help():
    cfg = PruneConfig(method="random", keep=0.5, layer=3, options={"seed": 7})
    again = PruneConfig.from_json(cfg.to_json())
    assert again == cfg
    assert json.loads(cfg.to_json())["options"] == {"seed": 7}
    assert set(PruneConfig.help()) == {"method", "keep", "layer", "options"}
    with pytest.raises(ConfigError, match="unknown PruneConfig field"):
        PruneConfig.from_dict({"method": "fastv", "kepp": 3})


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(keep=0), "must be positive"),
        (dict(keep=-3), "must be positive"),
        (dict(keep=0.0), "out of range"),
        (dict(keep=1.5), "out of range"),
        (dict(keep=float("nan")), "out of range"),
        (dict(keep=True), "keep must be an int"),
        (dict(keep="64"), "keep must be an int"),
        (dict(layer=-1), "layer=-1 must be >= 0"),
        (dict(layer=1.0), "layer must be an int"),
    ],
)
def test_config_rejects_bad_values(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        PruneConfig(**kwargs)


def test_apply_accepts_config_or_keywords(llava, processor):
    inputs = batch(processor, [1])
    vtprune.apply(llava, PruneConfig(method="fastv", keep=16, layer=1))
    with torch.no_grad():
        llava(**inputs)
    a = vtprune.stats(llava)
    vtprune.apply(llava, "fastv", keep=16, layer=1)
    with torch.no_grad():
        llava(**inputs)
    b = vtprune.stats(llava)
    assert vtprune.config_of(llava) == PruneConfig(method="fastv", keep=16, layer=1)
    assert all(torch.equal(x, y) for x, y in zip(a.kept, b.kept))
    with pytest.raises(ConfigError, match="not both"):
        vtprune.apply(llava, PruneConfig(), keep=3)


def test_stats_content(llava, processor):
    inputs = batch(processor, [2, 1])
    vtprune.apply(llava, method="fastv", keep=10, layer=2)
    with torch.no_grad():
        llava(**inputs)
    st = vtprune.stats(llava)
    assert st.method == "fastv" and st.stage == "llm" and st.layer == 2
    assert st.visual_before == [1152, 576] and st.visual_after == [20, 10]
    for k, n in zip(st.kept, st.visual_before):
        assert k.dtype == torch.long and torch.all(k[1:] > k[:-1]) and int(k.max()) < n
    real = inputs["attention_mask"].sum(1).tolist()
    assert st.seq_len_before == real
    assert st.seq_len_after == [real[0] - 1132, real[1] - 566]
    assert "20/1152" in st.summary()
    # kept indices are per image: each image keeps 10 of its own 576 tokens
    assert int((st.kept[0] < 576).sum()) == 10


def test_remove_restores_exactly(llava, processor):
    inputs = batch(processor, [1])
    pre_hooks = {n: (dict(m._forward_pre_hooks), dict(m._forward_hooks)) for n, m in llava.named_modules()}
    keys = list(llava.state_dict())
    with torch.no_grad():
        ref = llava(**inputs).logits
        vtprune.apply(llava, method="fastv", keep=8, layer=1)
        assert list(llava.state_dict()) == keys  # no module was replaced
        pruned = llava(**inputs).logits
        vtprune.remove(llava)
        after = llava(**inputs).logits
    assert not torch.allclose(pruned, ref)
    assert torch.equal(after, ref)
    assert "get_image_features" not in vars(llava.model)
    now = {n: (dict(m._forward_pre_hooks), dict(m._forward_hooks)) for n, m in llava.named_modules()}
    assert now == pre_hooks
    assert vtprune.stats(llava) is None
    vtprune.remove(llava)  # idempotent


def test_apply_twice_replaces(llava, processor):
    inputs = batch(processor, [1])
    n_hooks = lambda: sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in llava.modules())  # noqa: E731
    base = n_hooks()
    vtprune.apply(llava, method="fastv", keep=8, layer=1)
    once = n_hooks()
    vtprune.apply(llava, method="cls", keep=8)
    vtprune.apply(llava, method="fastv", keep=8, layer=1)
    assert n_hooks() == once > base
    vtprune.apply(llava, method="cls", keep=12)
    with torch.no_grad():
        llava(**inputs)
    st = vtprune.stats(llava)
    assert st.method == "cls" and st.visual_after == [12]


def test_disabled_context(llava, processor):
    inputs = batch(processor, [1])
    with torch.no_grad():
        ref = llava(**inputs).logits
        vtprune.apply(llava, method="cls", keep=8)
        pruned = llava(**inputs).logits
        with vtprune.disabled(llava):
            off = llava(**inputs).logits
        again = llava(**inputs).logits
    assert torch.equal(off, ref)
    assert torch.equal(again, pruned) and again.shape[1] < ref.shape[1]


def test_keep_larger_than_image_is_clamped_with_warning(llava, processor):
    inputs = batch(processor, [1])
    vtprune.apply(llava, method="cls", keep=1000)
    with pytest.warns(UserWarning, match="exceeds the prunable visual tokens"):
        with torch.no_grad():
            llava(**inputs)
    assert vtprune.stats(llava).visual_after == [576]


def test_unknown_method_lists_known(llava):
    with pytest.raises(ConfigError, match="known methods: .*cls.*fastv"):
        vtprune.apply(llava, method="fastvv", keep=8)


def test_unknown_option_lists_options(llava):
    with pytest.raises(ConfigError, match="has no option.*'sed'.*seed=0"):
        vtprune.apply(llava, method="random", keep=8, sed=3)


def test_layer_out_of_range(llava):
    with pytest.raises(ConfigError, match="out of range.*4 decoder layers.*0 <= layer <= 2"):
        vtprune.apply(llava, method="fastv", keep=8, layer=3)


def test_stage_mismatch(llava):
    with pytest.raises(ConfigError, match="prunes before the LLM"):
        vtprune.apply(llava, method="cls", keep=8, layer=1)


def test_bad_vision_layer(llava):
    with pytest.raises(ValueError, match="vision_layer=7 is out of range"):
        vtprune.apply(llava, method="cls", keep=8, vision_layer=7)


def test_unsupported_model_names_type_and_supported():
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32,
                                         num_hidden_layers=1, num_attention_heads=2))
    with pytest.raises(UnsupportedModelError, match="'llama'.*supported model types: llava, llava_llama, llava_next"):
        vtprune.apply(model, method="fastv", keep=8)


def test_transformers5_adapters_say_so_on_transformers4(llava, monkeypatch):
    """On transformers 4.x (the LLaVA repository's environment) the v5 adapters refuse with the fix."""
    import transformers

    monkeypatch.setattr(transformers, "__version__", "4.37.2")
    with pytest.raises(UnsupportedModelError, match=r"needs transformers>=5\.0, but 4\.37\.2 is installed: pip install"):
        vtprune.apply(llava, method="fastv", keep=8, layer=1)
    assert not hasattr(llava, "_vtprune_state")


def test_static_cache_is_refused_for_in_llm_pruning(llava, processor):
    from transformers import StaticCache

    inputs = batch(processor, [1])
    vtprune.apply(llava, method="fastv", keep=8, layer=1)
    cache = StaticCache(config=llava.config, max_cache_len=700)
    with pytest.raises(UnsupportedModelError, match="only DynamicCache.*StaticCache.*before the LLM only"):
        with torch.no_grad():
            llava(**inputs, past_key_values=cache)
    with pytest.raises(UnsupportedModelError, match="only DynamicCache"):
        llava.generate(**inputs, max_new_tokens=2, cache_implementation="static")


@pytest.mark.parametrize("method", ["cls", "random", "divprune"])
@pytest.mark.parametrize("n_images,side", [([1], "left"), ([1, 1], "left"), ([1, 2], "right")])
def test_static_cache_generates_like_the_dynamic_cache_for_pre_llm_methods(llava, processor, method, n_images, side):
    """Pre-LLM pruning leaves every layer the same length: generate(cache_implementation="static") gives the
    tokens of the default (dynamic) cache, batch 1, left-padded and right-padded ragged batches."""
    inputs = batch(processor, n_images, padding_side=side)
    vtprune.apply(llava, method=method, keep=8)
    ref = llava.generate(**inputs, max_new_tokens=5, do_sample=False)
    out = llava.generate(**inputs, max_new_tokens=5, do_sample=False, cache_implementation="static")
    assert torch.equal(out, ref)
    assert vtprune.stats(llava).visual_after == [8 * n for n in n_images]


@pytest.mark.parametrize("kind", ["qwen2_vl", "next"])
def test_static_cache_on_qwen_and_next(kind, next_processor):
    from conftest import get_model, qwen_batch

    model = get_model(kind)
    inputs = qwen_batch(kind, "left_padded_2") if kind.startswith("qwen") else batch(next_processor, [1, 1])
    vtprune.apply(model, method="cls", keep=8)
    ref = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    out = model.generate(**inputs, max_new_tokens=4, do_sample=False, cache_implementation="static")
    assert torch.equal(out, ref)


def test_text_only_prompt_passes_through(llava, processor):
    ids = processor.tokenizer(["USER: hello there ASSISTANT:"], return_tensors="pt")
    with torch.no_grad():
        ref = llava(**ids).logits
        vtprune.apply(llava, method="fastv", keep=8, layer=1)
        out = llava(**ids).logits
    assert torch.equal(out, ref)
    assert vtprune.stats(llava) is None


def test_forward_outside_generate_then_decode_with_returned_cache(llava, processor):
    """A manual prefill + decode loop (cache created inside the model) stays consistent."""
    inputs = batch(processor, [1, 1], padding_side="left")
    vtprune.apply(llava, method="fastv", keep=16, layer=1)
    with torch.no_grad():
        pos0 = (inputs["attention_mask"].cumsum(-1) - 1).clamp(min=0)  # as generate() computes them
        out = llava(**inputs, position_ids=pos0, use_cache=True)
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        mask = torch.cat([inputs["attention_mask"], torch.ones_like(nxt)], 1)
        pos = mask.sum(1, keepdim=True) - 1
        step = llava(input_ids=nxt, attention_mask=mask, position_ids=pos, past_key_values=out.past_key_values)
        gen = llava.generate(**inputs, max_new_tokens=2, do_sample=False, output_logits=True,
                             return_dict_in_generate=True)
    torch.testing.assert_close(step.logits[:, -1], gen.logits[1], atol=1e-5, rtol=1e-5)
    cache = out.past_key_values
    assert cache.layers[1].get_seq_length() > cache.layers[2].get_seq_length()


@pytest.mark.parametrize("kind,method,layer", [("llava", "cls", None), ("llava", "fastv", 1), ("next", "cls", None)])
def test_beam_search_and_several_sequences(kind, method, layer, processor, next_processor):
    """generate() repeats the encoded images per beam; pruning follows and keeps beams identical."""
    model = get_model(kind)
    proc = next_processor if kind == "next" else processor
    inputs = batch(proc, [1, 1], padding_side="left")
    vtprune.apply(model, method=method, keep=8, layer=layer)
    with torch.no_grad():
        greedy = model.generate(**inputs, max_new_tokens=3, do_sample=False)
        multi = model.generate(**inputs, max_new_tokens=3, do_sample=False, num_beams=2, num_return_sequences=2)
        beams1 = model.generate(**inputs, max_new_tokens=3, do_sample=False, num_beams=1, num_return_sequences=1)
    st = vtprune.stats(model)  # of the last generate: one row per sequence
    vtprune.remove(model)
    assert multi.shape[0] == 4 and multi.shape[1] == greedy.shape[1]
    assert torch.equal(beams1, greedy)
    with torch.no_grad():
        vtprune.apply(model, method=method, keep=8, layer=layer)
        model.generate(**inputs, max_new_tokens=1, do_sample=False, num_beams=2)
        expanded = vtprune.stats(model)
    vtprune.remove(model)
    assert len(st.kept) == 2 and len(expanded.kept) == 4
    for b in range(2):  # both beams of a prompt keep what the single-sequence run kept
        assert torch.equal(expanded.kept[2 * b], st.kept[b]) and torch.equal(expanded.kept[2 * b + 1], st.kept[b])


def test_empty_method_is_refused_not_read_as_fastv(llava):
    with pytest.raises(ConfigError):
        vtprune.apply(llava, method="")
    with pytest.raises(ConfigError):
        vtprune.apply(llava, "")
    assert vtprune.config_of(llava) is None


@pytest.mark.parametrize("method", ["random", "zoo"])
@pytest.mark.parametrize("seed", [1.5, True, 2**70, -1, "3"])
def test_seeds_must_be_integers_in_range(llava, method, seed):
    with pytest.raises(ConfigError, match="seed="):
        vtprune.apply(llava, method=method, keep=8, seed=seed)


def test_a_large_valid_seed_runs(llava, processor):
    vtprune.apply(llava, method="random", keep=8, seed=2**63 - 1)
    with torch.no_grad():
        llava(**batch(processor, [1]))
    assert vtprune.stats(llava).visual_after == [8]


def test_non_utf8_config_file_is_a_clear_error(llava, tmp_path):
    path = tmp_path / "tuned.json"
    path.write_bytes(b'{"method": "fastv\xff\xfe"}')
    with pytest.raises(ConfigError, match="not UTF-8"):
        vtprune.apply(llava, config=str(path))


def test_a_bare_method_name_is_never_read_as_a_file(llava, processor, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "fastv").write_text("not a config")
    vtprune.apply(llava, "fastv", keep=8)
    assert vtprune.config_of(llava).method == "fastv"
    with pytest.raises(ConfigError, match="not JSON"):  # a path spelled as one is still a file
        vtprune.apply(llava, config="./fastv")


def test_remove_restores_qwen_rope_deltas():
    from conftest import get_model, qwen_batch

    model = get_model("qwen2_vl")
    core = model.model
    sentinel = torch.full((1, 1), -7)
    core.rope_deltas = sentinel
    vtprune.apply(model, method="cls", keep=8)
    model.generate(**qwen_batch("qwen2_vl", "single"), max_new_tokens=2, do_sample=False)
    assert core.rope_deltas is not sentinel  # pruning set it for the shortened cache
    vtprune.remove(model)
    assert core.rope_deltas is sentinel
