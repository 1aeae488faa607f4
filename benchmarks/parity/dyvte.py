"""Parity of vtprune's ``dyvte`` (its default, the fixed visual-token exit) with Visual Tokens Withdrawal's release
(github.com/lzhxmu/VTW, read at a3d8cfc): the visual tokens left after the exit layer, the first-token logits
and the greedy tokens (and logits) of a few decoding steps.

DyVTE's own release (github.com/DoubtedSteam/DyVTE) decides the exit with trained per-layer routers that do not
exist for these models; it is out of scope here. vtprune's training-free default exits at VTW's released
withdrawal layer, so VTW's release is the reference.

The release is a LLaVA fork whose ``llava/model/language_model/VTW.py`` holds ``class temp_cache`` (the settings:
``use_vtw``, ``pe_type = "keep"``, ``mode = "vtw"``, ``k = 15``, ``image_token_nums``, ``system_token_nums``,
the last two set per sample by its ``llava_arch.py`` (lines 261-262: the image's feature count and the number
of text tokens before it)) and ``VTWLlamaModel.forward``. In its decoder loop (the branch without gradient
checkpointing, lines 308-314), on reaching the layer whose ``self_attn.layer_idx == temp_cache.k`` during the
prefill (``seq_length > 1``), it cuts the image span ``[system_token_nums, system_token_nums +
image_token_nums)`` out of ``hidden_states`` and ``position_ids`` (the text keeps its original positions, the
last prompt token stays). Layer ``k`` and every later layer therefore never see the image; their KV caches hold
only the text, so decoding never sees it there either, while layers ``0..k-1`` keep their full caches. Layer
``k`` is the first layer without the image: vtprune's ``layer = k - 1`` (the layer after whose output it
exits); the release's ``k = 15`` (its ``temp_cache`` default and README's ``--k=15`` for LLaVA-1.5-7B) is
vtprune's default ``layer=14`` on a 32-layer LLM.

What runs: ``VTW.py`` targets transformers 4.37 (its ``my_modeling_llama.py`` is a patched 4.37
``modeling_llama``; ``DynamicCache.from_legacy_cache``, ``get_usable_length`` and tuple-returning decoder layers
do not exist in 5.x), so it is not imported. Its ``class temp_cache`` and the withdrawal statement (the
``if temp_cache.use_vtw:`` block at lines 308-328 of ``VTWLlamaModel.forward``) are taken from the file with
``ast`` at run time and executed as they are (nothing of them is copied here). The decoder loop around them is
re-stated on the tiny model's own transformers 5.25 ``LlamaModel`` pieces, as the release's loop runs with SDPA
on one unpadded prompt: per layer the withdrawal statement, then the layer on the (possibly shortened) hidden
states with the rotary embeddings of the current ``position_ids``, no mask (SDPA causal in the prefill, no mask
for one decoded token: 4.37's ``_prepare_4d_causal_attention_mask_for_sdpa`` drops an all-ones mask in both
cases; the release does not cut its 4D mask in this branch, so with eager attention it would fail on the mask
size; its attention classes, lines 403/508/704, size the rotary tables by ``position_ids.max() + 1`` so that the
gap works, which 5.25's rotary embedding on ``position_ids`` matches), a ``DynamicCache``; after the layers the final norm and ``lm_head``. Decoding feeds the greedy token at
position ``past_key_values_length`` = layer 0's (full) cache length, as the release's ``position_ids`` default
does (``get_usable_length`` reads layer 0). ``temp_cache.system_token_nums`` / ``image_token_nums`` are set to
the tiny prompt's image span (the values its ``llava_arch.py`` would compute for this prompt).

vtprune runs ``vtprune.apply(model, "dyvte", ...)`` on the tiny HF LLaVA-1.5 model (``tiny_llava``: 32 layers of
width 64, 576 visual tokens, SDPA), its first-token logits from ``model(**inputs)``, its decoding from
``model.generate`` (greedy). Settings: the release's ``k = 15`` against vtprune's default (no ``layer``) and
``layer=14``; ``k = 16`` and ``k = 20`` (its ``serve/cli.py`` settings for 7B and 13B) against ``layer=15`` and
``layer=19``. Kept set: the visual tokens present in the sequence after the exit (the release: the image
positions among the ``position_ids`` that layer ``k`` receives; vtprune: ``stats().kept``); both are empty, and
the Jaccard of two empty sets is defined as 1. Budget 0: the visual tokens left after the exit. A recorded
(not asserted) row per variant compares vtprune's ``layer = k - 2`` with the release's ``k = 15``, to show
that the logits tell neighbouring exit layers apart.

    python benchmarks/parity/dyvte.py --ref /path/to/VTW
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    env_name,
    image_span,
    jaccard,
    peaked,
    run_check,
    single_threaded,
    tiny_llava_inputs,
)

METHOD = "dyvte"
ENV = env_name(METHOD)
LOGIT_TOLERANCE = 1e-4
LAYERS, HIDDEN, TOKENS = 32, 64, 576
MODEL = f"tiny-llava-1.5 ({LAYERS} layers, width {HIDDEN}, {TOKENS} tokens)"
PROMPT = "USER: <image>\nWhat is in the picture? ASSISTANT:"
VARIANTS = ("random", "peaked")
KS = (15, 16, 20)  # the release's temp_cache.k (default / README 15; serve/cli.py 16 for 7B, 20 otherwise)
STEPS = 4  # greedy decoding steps compared
RELEASE_FILE = "llava/model/language_model/VTW.py"


def load_release(ref: Path) -> tuple[type, Any, str]:
    """``(temp_cache, withdraw, where)``: the release's ``class temp_cache`` and its withdrawal statement, taken
    from ``VTW.py`` with ``ast``; ``withdraw(temp_cache, decoder_layer, hidden_states, position_ids, seq_length,
    past_key_values) -> (hidden_states, position_ids)`` runs that statement unchanged."""
    import random

    import torch

    path = ref / RELEASE_FILE
    tree = ast.parse(path.read_text(), filename=str(path))
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "temp_cache")
    model = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "VTWLlamaModel")
    forward = next(n for n in model.body if isinstance(n, ast.FunctionDef) and n.name == "forward")
    blocks = [n for n in ast.walk(forward) if isinstance(n, ast.If) and ast.unparse(n.test) == "temp_cache.use_vtw"]
    # two such blocks: under gradient checkpointing (training) and the inference branch (the last one)
    block = max(blocks, key=lambda b: b.lineno)
    if "hidden_states[:, :temp_cache.system_token_nums]" not in ast.unparse(block):
        raise SystemExit(f"{METHOD} parity: {path}:{block.lineno} is not the withdrawal this check knows")
    args = ["temp_cache", "decoder_layer", "hidden_states", "position_ids", "seq_length", "past_key_values"]
    fn = ast.FunctionDef(
        name="withdraw", args=ast.arguments(posonlyargs=[], args=[ast.arg(a) for a in args], kwonlyargs=[],
                                            kw_defaults=[], defaults=[]),
        body=[block, ast.parse("return hidden_states, position_ids").body[0]], decorator_list=[], returns=None,
        type_params=[])
    module = ast.fix_missing_locations(ast.Module(body=[cls, fn], type_ignores=[]))
    ns: dict[str, Any] = {"torch": torch, "random": random}
    exec(compile(module, str(path), "exec"), ns)
    return ns["temp_cache"], ns["withdraw"], f"{RELEASE_FILE}:{cls.lineno} (temp_cache), :{block.lineno}-{block.end_lineno}"


def release_run(model: Any, inputs: Any, withdraw: Any, temp_cache: type, k: int) -> dict[str, Any]:
    """The release's withdrawal at ``k`` driven on the tiny model's layers (the re-stated loop of the docstring):
    the image tokens left at layer ``k``, the sequence length each layer saw, the first-token logits and
    ``STEPS`` greedy tokens with their logits."""
    import torch
    from transformers import DynamicCache

    lm = model.model.language_model
    start, n = image_span(model, inputs)
    temp_cache.use_vtw, temp_cache.pe_type, temp_cache.mode = True, "keep", "vtw"
    temp_cache.k, temp_cache.system_token_nums, temp_cache.image_token_nums = k, start, n
    with torch.no_grad():
        seen: dict[str, Any] = {}
        handle = lm.register_forward_pre_hook(lambda m, a, kw: seen.update(kw), with_kwargs=True)
        try:
            model(**inputs, use_cache=False)
        finally:
            handle.remove()
        embeds = seen["inputs_embeds"]
        cache = DynamicCache(config=lm.config)
        hidden = embeds
        position_ids = torch.arange(embeds.shape[1]).unsqueeze(0)
        lengths, image_left, logits, tokens = [], None, [], []
        for step in range(STEPS):
            seq_length = hidden.shape[1]
            for layer in lm.layers:
                hidden, position_ids = withdraw(temp_cache, layer, hidden, position_ids, seq_length, cache)
                if step == 0:
                    lengths.append(int(hidden.shape[1]))
                    if layer.self_attn.layer_idx == k:
                        pos = position_ids[0]
                        image_left = sorted((pos[(pos >= start) & (pos < start + n)] - start).tolist())
                pe = lm.rotary_emb(hidden, position_ids=position_ids)
                hidden = layer(hidden, attention_mask=None, position_ids=position_ids, cache=cache, use_cache=True,
                               position_embeddings=pe)
            out = model.lm_head(lm.norm(hidden)[:, -1])[0]
            logits.append(out)
            tokens.append(int(out.argmax()))
            hidden = lm.embed_tokens(torch.tensor([[tokens[-1]]]))
            position_ids = torch.tensor([[cache.get_seq_length(0)]])  # the release: past_key_values_length (layer 0)
    return {"kept": image_left, "lengths": lengths, "logits": logits, "tokens": tokens,
            "cache": [cache.get_seq_length(i) for i in (0, k - 1, k, LAYERS - 1)]}


def vtprune_side(model: Any, inputs: Any, **options: Any) -> dict[str, Any]:
    """vtprune's ``dyvte`` with ``options``: kept visual tokens, exit layer, first-token logits, greedy decoding."""
    import torch

    import vtprune

    vtprune.apply(model, METHOD, **options)
    try:
        with torch.no_grad():
            first = model(**inputs).logits[0, -1]
            st = vtprune.stats(model)
            kept, layer, exits = st.kept[0].tolist(), st.layer, list(st.exit_layers)
            gen = model.generate(**inputs, max_new_tokens=STEPS, min_new_tokens=STEPS, do_sample=False,
                                 output_logits=True, return_dict_in_generate=True)
    finally:
        vtprune.remove(model)
    steps = [lg[0] for lg in gen.logits]
    tokens = gen.sequences[0, inputs["input_ids"].shape[1]:].tolist()
    return {"kept": sorted(kept), "layer": layer, "exits": exits, "logits": [first] + steps[1:],
            "step_logits": steps, "tokens": tokens}


def _diff(a: Any, b: Any) -> float:
    return float((a - b).abs().max())


@single_threaded
def compare(ref: Path) -> list[dict[str, Any]]:
    from vtprune.toy.tiny import tiny_llava

    temp_cache, withdraw, where = load_release(ref)
    default_k = int(temp_cache.k)
    inputs = tiny_llava_inputs(PROMPT)
    rows = []
    for variant in VARIANTS:
        model = tiny_llava(layers=LAYERS, hidden=HIDDEN)
        if variant == "peaked":
            peaked(model)
        start, n = image_span(model, inputs)
        if n != TOKENS:
            raise SystemExit(f"{METHOD} parity: the tiny prompt holds {n} visual tokens, not {TOKENS}")
        runs = {k: release_run(model, inputs, withdraw, temp_cache, k) for k in KS}
        settings = [(default_k, {}, "vtprune default")] + [(k, {"layer": k - 1}, f"layer={k - 1}") for k in KS]
        for k, options, label in settings:
            rel = runs[k]
            mine = vtprune_side(model, inputs, **options)
            first = _diff(mine["logits"][0], rel["logits"][0])
            decode = max(_diff(a, b) for a, b in zip(mine["step_logits"], rel["logits"]))
            tokens_equal = mine["tokens"] == rel["tokens"]
            kept_equal = mine["kept"] == rel["kept"] == [] and mine["layer"] == k - 1 and tokens_equal
            rows.append({
                "method": METHOD, "model": MODEL, "variant": f"{variant}, k={k} ({label})", "budget": 0,
                "jaccard": jaccard(mine["kept"], rel["kept"]), "kept_equal": kept_equal,
                "logit_max_abs": max(first, decode),
                "note": (f"release {where}: temp_cache.k={k}, system_token_nums={start}, image_token_nums={n}; "
                         f"sequence per layer {rel['lengths'][k - 1]} (layer {k - 1}) -> {rel['lengths'][k]} "
                         f"(layer {k}); caches after decoding (layers 0/{k - 1}/{k}/{LAYERS - 1}) {rel['cache']}; "
                         f"visual tokens after the exit: release {len(rel['kept'])}, vtprune {len(mine['kept'])} "
                         f"(Jaccard of two empty sets := 1); vtprune {label}: exit after layer {mine['layer']} "
                         f"(exit_layers {mine['exits']}); first-token max |logit diff| {first:.2e}, over {STEPS} "
                         f"greedy steps {decode:.2e}; tokens release {rel['tokens']}, vtprune {mine['tokens']}"),
            })
        # not asserted: vtprune one layer early against the release's default k, so the logits must differ
        rel = runs[default_k]
        early = vtprune_side(model, inputs, layer=default_k - 2)
        rows.append({
            "method": METHOD, "model": MODEL, "variant": f"{variant}, k={default_k} vs vtprune layer={default_k - 2}",
            "budget": 0, "jaccard": jaccard(early["kept"], rel["kept"]), "kept_equal": False,
            "logit_max_abs": _diff(early["logits"][0], rel["logits"][0]), "asserted": False,
            "note": (f"recorded, not asserted: vtprune exiting one layer earlier (after layer {early['layer']}) than "
                     f"the release's k={default_k} (after layer {default_k - 1}) gives first-token max |logit diff| "
                     f"{_diff(early['logits'][0], rel['logits'][0]):.2e}: the check tells neighbouring exit "
                     f"layers apart"),
        })
    return rows


def main(argv: list[str] | None = None) -> int:
    return run_check(METHOD, compare, argv, __doc__ or "", passed=lambda r: r.get("asserted") is False or
                     (r["kept_equal"] and r["jaccard"] == 1.0 and r["logit_max_abs"] < LOGIT_TOLERANCE))


if __name__ == "__main__":
    sys.exit(main())
