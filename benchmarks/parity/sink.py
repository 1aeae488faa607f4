"""Parity of vtprune's ``sink`` wrapper (VAR visual attention sinks, Kang et al., ICLR 2025, "See What You Are
Told") with VAR's release (github.com/seilk/VisAttnSink, read at 98e62d6; MICV-yonsei/VisAttnSink shares its
history): the sink dimensions and tau, the visual sink tokens, and the tokens ``sink+fastv`` keeps.

VAR does not prune: it finds sink tokens and redistributes attention away from them (``HeadFork``,
``VARProcessor.attn_redist``). vtprune uses only its sink identification (``sink+<host>`` ranks the visual
sinks below every other token and refills the budget from the host's ranking), so what is compared is that
identification, then the kept set that follows from it; nothing of VAR's redistribution is run or compared.

The release identifies sinks in ``src/logic/logic.py``: ``DimProspector.run_logic(hs, layer)`` takes
``phi = |rmsnorm(hs)|`` (fp32, ``h * rsqrt(mean(h^2) + 1e-6)``, no weight), the max over ``LogicEngine.dim_sink``
and keeps the tokens (all of them, text too) with ``phi > tau`` as ``indices[layer]``; ``TunedLlamaModel.forward``
(``src/model/llava.py:314-316``) calls it in the prefill on the *input* of every decoder layer in
``sink_select_layers`` (``LogicEngine.activate(layer="all")``: layers 2 .. N-1), and ``HeadFork.run_logic``
(``logic.py:123``) keeps the visual ones (``im <= i < im + pa``). ``dim_sink`` is the constant
``DIM_SINK["llama-v2-7b"]`` (``src/logic/constants.py``); tau is ``activate``'s default and the config's 20
(``A_exps/lv1.5_7b.yml``). The release has no procedure that finds sink dimensions: they are constants.

What runs: the release's own ``src.logic`` and ``src.stash`` modules, imported from the checkout (its package
``src`` stands in for the repository's ``src/__init__``; nothing is copied): ``StashEngine.clear``,
``MetadataStation.export_model_config``, ``LogicEngine.clear`` / ``activate``, ``set_begin_pos`` /
``set_vis_len``, and ``DimProspector.run_logic`` on each layer its forward would call it for, fed the inputs
of the tiny model's decoder layers (recorded by pre-hooks in an unpatched forward). Its modeling files
(``src/model/llava.py``, ``src/llm_modeling``) target a transformers 4.4x commit (``env_pip.txt``: 33868a0) and
do not import on 5.x (``llava.py`` imports ``LLAMA_INPUTS_DOCSTRING`` and the scaling rotary classes, gone);
the three lines of its model loop that call ``run_logic`` and the one-line visual filter of ``HeadFork``
are re-stated here. That the plain model's residual stream is the release's for the visual tokens: in the prefill VAR
redistributes only the rows of queries after the image (``logic.py:179``, ``query_coord[im+pa <= query_coord]``),
which the causal mask hides from the image's and the first token's rows, so VAR at earlier layers changes
no visual (or first-token) state that ``run_logic`` reads.

Mapping: vtprune reads the *output* of decoder layer ``layer`` (the input of ``layer + 1``), so vtprune
``layer=K`` is the release's ``indices[K + 1]``: ``layer=1`` (FastV's K=2) is its first select layer (2),
``layer=2`` (vtprune's default, FastV's K=3) its layer 3. vtprune ``layer=0`` has no counterpart (the
release never looks at the input of layers 0 and 1).

Model: the tiny LLaVA-1.5 of ``vtprune.toy.tiny`` (4 layers, width 64, 576 visual tokens; eager attention,
so that the reference can read FastV's attention row), one prompt. ``phi <= sqrt(D)``, so the paper's
tau=20 (for D=4096) is scaled to the width on both sides: ``tau = 20 * sqrt(64 / 4096) = 2.5``. The tiny
model's "D_sink" (the role of the release's constant) is ``(7, 45)``. Variants: ``random`` (random
weights: the few visual tokens with ``phi > 2.5`` in those dims by chance) and ``planted`` (a weight
edit that plants massive activations: for each sink dim d one hidden unit u of the projector's first
linear, (3, 29), is sharpened x100 with its bias moved so that it fires on the 5 % of the image's tokens
with the largest pre-activation, and made d's only input (weight 0.2); the first token's embedding gets
1.0 in d, as BOS carries massive activations in real LLaMA models: ~8 % of the visual tokens become sinks
with phi well above tau, a few near it). Dims, both sides alike: ``fixed`` (vtprune ``sink.dims=[7, 45]``,
the release ``dim_sink = tensor([7, 45])``) and ``on the fly`` (vtprune's default when no dims are known:
the dims where the first token has ``phi > tau`` at that layer; the release has no such rule, so its
``dim_sink`` is set to the dims the release's own ``DimProspector.rmsnorm`` gives on the first token of
the same layer's input, and the row also asserts vtprune's ``last_dims`` equal them).

Rows: the published constants (``DIM_SINK`` vs ``KNOWN_SINK_DIMS``, tau 20; and the 13B dims as the release
runs them, not asserted: see below); per variant, layer and dims the visual sink set (vtprune's
``last_sinks`` from the ``sink+fastv`` runs at every budget against the release's ``indices[K + 1]``
visual part; ``hidden_max_abs``: the visual rows vtprune's wrapper reads against the release's input of
layer ``K + 1``); per budget (64/128/192) the kept set of ``sink+fastv`` against FastV's ranking (the
last prompt token's layer-K attention over the image, mean over heads, from the eager forward) with the
release's visual sinks moved below every other token (stable; VAR prunes nothing, so this is how its sink
set enters a pruning budget, the ``mode="drop"`` reading) and the first-token logits against the unpatched
model with that set's dropped keys masked after layer K; and ``fastv`` alone against that ranking (the
reference's host; FastV's own parity is ``fastv.py``).

Deviation recorded (``asserted: False``): the release never selects the 13B dims. ``LogicEngine.dim_sink`` is
``DIM_SINK["llama-v2-7b"]`` (``logic.py:15,29``), ``set_llm_name`` (``logic.py:58-62``) sets only
``llm_name`` and is never called (``src/inference.py``), ``clear`` (``logic.py:86``) resets to the 7B dims; so
on LLaVA-1.5-13B / LLaVA-1.6-Vicuna-13B it uses {1415, 2533}, where vtprune uses its constants' 13B
{2100, 4743}. Not compared: ``mode="keep"`` (no counterpart), bare ``sink`` (``sink+uniform``: the same wrapper
on another host), batches (the release's ``torch.nonzero(...)[:, 1]`` drops the batch axis: one sample).

    python benchmarks/parity/sink.py --ref /path/to/VisAttnSink
"""

from __future__ import annotations

import importlib
import inspect
import io
import math
import sys
import types
from collections.abc import Iterator
from contextlib import contextmanager, redirect_stdout
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    env_name,
    image_span,
    jaccard,
    run_check,
    single_threaded,
    tiny_llava_inputs,
    vtprune_run,
)

METHOD = "sink"
ENV = env_name(METHOD)
LOGIT_TOLERANCE = 1e-4
TOKENS, WIDTH = 576, 64
MODEL = "tiny-llava-1.5 (4 layers, width 64, 576 tokens, eager)"
PROMPT = "USER: <image>\nWhat is in the picture? ASSISTANT:"
TAU = 20.0 * math.sqrt(WIDTH / 4096)  # the paper's tau=20 at D=4096, scaled with phi's bound sqrt(D): 2.5
SINK_DIMS = (7, 45)  # the tiny model's D_sink (the role of the release's DIM_SINK constant)
UNITS = (3, 29)  # planted: the projector hidden unit driving each sink dim
SHARPEN, FIRE, GAIN, BOS_LEVEL = 100.0, 0.95, 0.2, 1.0
LAYERS = (1, 2)  # vtprune layer=K; the release's indices[K + 1]
BUDGETS = (64, 128, 192)
VARIANTS = ("random", "planted")
DIMS = ("fixed", "on the fly")


# --- the release ---------------------------------------------------------------------------------------------

@contextmanager
def release_src(root: Path) -> Iterator[None]:
    """The release's ``src`` package (its folder; ``src/__init__`` bypassed) importable while the block runs;
    any other ``src`` modules hidden meanwhile and restored afterwards."""
    saved = {k: v for k, v in sys.modules.items() if k == "src" or k.startswith("src.")}
    for k in saved:
        del sys.modules[k]
    package = types.ModuleType("src")
    package.__path__ = [str(root / "src")]
    sys.modules["src"] = package
    try:
        yield
    finally:
        for k in [k for k in sys.modules if k == "src" or k.startswith("src.")]:
            del sys.modules[k]
        sys.modules.update(saved)


def load_release(ref: Path) -> types.SimpleNamespace:
    """The release's ``src/logic/logic.py``, ``src/logic/constants.py`` and ``src/stash.py``."""
    with release_src(Path(ref)):
        return types.SimpleNamespace(logic=importlib.import_module("src.logic.logic"),
                                     constants=importlib.import_module("src.logic.constants"),
                                     stash=importlib.import_module("src.stash"))


def release_sinks(rel: types.SimpleNamespace, config: Any, layer_inputs: list[Any], start: int, layer: int,
                  dims: Any) -> dict[str, Any]:
    """The release's sink identification on one prompt: its per-sample setup (``inference.py:69-74``), its model
    loop's ``DimProspector.run_logic`` calls (``llava.py:314-316``) on ``layer_inputs`` (``[1, L, D]`` input of
    each decoder layer), ``dim_sink = dims``. Returns ``indices[layer]`` and its visual part (``HeadFork``'s
    filter, ``logic.py:123``) as indices into the image's tokens."""
    import torch

    engine, prospector = rel.logic.LogicEngine, rel.logic.DimProspector
    station, monitor = rel.stash.MetadataStation, rel.stash.ValueMonitor
    rel.stash.StashEngine.clear()
    engine.clear()
    with redirect_stdout(io.StringIO()):  # its "flag set" print
        station.activate()
    station.export_model_config(config)
    engine.activate(tau=TAU)  # layer="all": sink_select_layers = 2 .. N-1
    engine.dim_sink = torch.as_tensor(dims)
    station.set_begin_pos(key="image", idx=start)
    station.set_vis_len(TOKENS)
    for i in range(config.num_hidden_layers):
        if prospector._flag() and monitor.get_output_token_count() < 0:
            if isinstance(prospector.sink_select_layers, list) and i in prospector.sink_select_layers:
                prospector.run_logic(layer_inputs[i], layer=i)
    if layer not in prospector.sink_select_layers:
        raise SystemExit(f"{METHOD} parity: the release identifies no sinks at layer {layer} "
                         f"(its layers: {prospector.sink_select_layers})")
    sinks = engine.indices[layer]
    im, pa = station.segments["begin_pos"]["image"], station.metadata["vis_len"]
    visual = [int(i) - im for i in sinks if im <= i < im + pa]
    return {"all": [int(i) for i in sinks], "visual": sorted(visual), "layers": list(prospector.sink_select_layers)}


def release_first_token_dims(rel: types.SimpleNamespace, layer_input: Any) -> list[int]:
    """The dims where the release's ``DimProspector.rmsnorm`` of the first token exceeds tau (the on-the-fly rule,
    not in the release, evaluated with its phi)."""
    import torch

    phi = torch.abs(rel.logic.DimProspector.rmsnorm(layer_input[0, 0]))
    return torch.nonzero(phi > TAU).flatten().tolist()


# --- the tiny model -----------------------------------------------------------------------------------------

def plant(model: Any, inputs: Any) -> None:
    """The ``planted`` variant, in place: massive activations in `SINK_DIMS` of ~8 % of the visual tokens (the
    projector edit of the docstring) and of the first token (its embedding row)."""
    import torch

    proj = model.model.multi_modal_projector
    seen: dict[str, Any] = {}
    handle = proj.linear_1.register_forward_hook(lambda m, a, out: seen.update(pre=out.detach()))
    try:
        with torch.no_grad():
            model(**inputs, use_cache=False)
    finally:
        handle.remove()
    pre = seen["pre"].reshape(-1, seen["pre"].shape[-1]).float()
    bos = int(inputs["input_ids"][0, 0])
    with torch.no_grad():
        for d, u in zip(SINK_DIMS, UNITS):
            fire = torch.quantile(pre[:, u], FIRE)
            proj.linear_1.weight[u] *= SHARPEN
            proj.linear_1.bias[u] = SHARPEN * (proj.linear_1.bias[u] - fire)
            proj.linear_2.weight[d].zero_()
            proj.linear_2.weight[d, u] = GAIN
            proj.linear_2.bias[d] = 0.0
            model.get_input_embeddings().weight[bos, d] = BOS_LEVEL


def unpatched_forward(model: Any, inputs: Any) -> tuple[list[Any], list[Any]]:
    """The input ``[1, L, D]`` of every decoder layer and every layer's attention ``[1, H, L, L]`` (eager)."""
    import torch

    layers = model.model.language_model.layers
    inputs_of: list[Any] = [None] * len(layers)

    def pre(i):
        def hook(module, args, kwargs):
            inputs_of[i] = (args[0] if args else kwargs["hidden_states"]).detach().clone()
        return hook

    handles = [layer.register_forward_pre_hook(pre(i), with_kwargs=True) for i, layer in enumerate(layers)]
    try:
        with torch.no_grad():
            out = model(**inputs, use_cache=False, output_attentions=True)
    finally:
        for h in handles:
            h.remove()
    return inputs_of, list(out.attentions)


def masked_logits(model: Any, inputs: Any, layer: int, dropped: Any) -> Any:
    """First-token logits ``[V]`` of the unpatched model with the ``dropped`` ``[L]`` (bool) key columns hidden in
    every decoder layer after ``layer``: pruning after ``layer`` with positions kept."""
    import torch

    n = dropped.shape[0]
    allowed = torch.ones(n, n, dtype=torch.bool).tril() & ~dropped[None, :] | torch.eye(n, dtype=torch.bool)

    def hook(module, args, kwargs):
        mask = kwargs.get("attention_mask")
        if mask is None:
            dtype = (args[0] if args else kwargs["hidden_states"]).dtype
            mask = torch.zeros(1, 1, n, n, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)
        elif mask.dtype == torch.bool:
            mask = mask & allowed
        else:
            mask = mask.masked_fill(~allowed, torch.finfo(mask.dtype).min)
        kwargs["attention_mask"] = mask
        return args, kwargs

    layers = model.model.language_model.layers
    handles = [layers[i].register_forward_pre_hook(hook, with_kwargs=True) for i in range(layer + 1, len(layers))]
    try:
        with torch.no_grad():
            return model(**inputs, use_cache=False).logits[0, -1]
    finally:
        for h in handles:
            h.remove()


def vtprune_sink(model: Any, inputs: Any, layer: int, budget: int, dims: tuple[int, ...] | None) -> dict[str, Any]:
    """vtprune's ``sink+fastv`` (``sink.tau=TAU``, ``sink.dims`` where given) on one prompt: kept set, logits,
    the wrapper's ``last_sinks`` / ``last_dims`` / ``dims_source`` and the visual rows it read."""
    import torch

    import vtprune
    from vtprune.scorers.base import HIDDEN_STATES
    from vtprune.scorers.sink import Sink
    from vtprune.state import STATE_ATTR

    options: dict[str, Any] = {"sink.tau": TAU}
    if dims is not None:
        options["sink.dims"] = list(dims)
    vtprune.apply(model, "sink+fastv", keep=budget, layer=layer, **options)
    try:
        sink = getattr(model, STATE_ATTR).scorer
        assert isinstance(sink, Sink), type(sink)
        seen: dict[str, Any] = {}
        plain = sink.transform

        def recorded(scores, signals):
            seen["hidden"] = signals.require(HIDDEN_STATES)[0].detach().clone()
            return plain(scores, signals)

        sink.transform = recorded
        with torch.no_grad():
            logits = model(**inputs, use_cache=False).logits[0, -1]
        st = vtprune.stats(model)
        return {"kept": sorted(st.kept[0].tolist()), "logits": logits, "layer": st.layer,
                "sinks": sink.last_sinks[0].tolist(), "dims": sorted(int(d) for d in sink.last_dims[0].tolist()),
                "source": sink.dims_source, "hidden": seen["hidden"]}
    finally:
        vtprune.remove(model)


def sinks_last(fastv: Any, sinks: list[int], budget: int) -> list[int]:
    """Top ``budget`` of FastV's ranking (descending, stable) with ``sinks`` moved below every other token."""
    import torch

    order = torch.argsort(fastv, descending=True, stable=True).tolist()
    chosen = set(sinks)
    ranked = [j for j in order if j not in chosen] + [j for j in order if j in chosen]
    return sorted(ranked[:budget])


# --- the check ---------------------------------------------------------------------------------------------

def constant_rows(rel: types.SimpleNamespace) -> list[dict[str, Any]]:
    """The published D_sink and tau of both sides; the 13B dims as the release runs them (not asserted)."""
    from transformers import LlamaConfig, LlavaConfig

    from vtprune.scorers.fastv import FastVScorer
    from vtprune.scorers.sink import Sink, known_sink_dims

    engine, constants = rel.logic.LogicEngine, rel.constants
    release_tau = inspect.signature(engine.activate).parameters["tau"].default
    ours_tau = Sink(FastVScorer()).tau
    rows = []
    for name, key, hidden, inter in (("LLaVA-1.5-7B", "llama-v2-7b", 4096, 11008),
                                     ("LLaVA-1.5-13B", "llama-v2-13b", 5120, 13824)):
        cfg = LlavaConfig(text_config=LlamaConfig(hidden_size=hidden, intermediate_size=inter,
                                                  num_hidden_layers=1, num_attention_heads=32, vocab_size=32))
        ours = sorted(known_sink_dims(types.SimpleNamespace(config=cfg)) or [])
        theirs = sorted(constants.DIM_SINK[key].tolist())
        models = [m for m, llm in constants.MODEL_LLM.items() if llm == key]
        rows.append({"method": METHOD, "model": name, "variant": "published D_sink (constants) and tau", "budget": "-",
                     "jaccard": jaccard(ours, theirs), "kept_equal": ours == theirs and ours_tau == release_tau,
                     "logit_max_abs": None,
                     "note": f"release DIM_SINK[{key!r}] {theirs} (MODEL_LLM: {models}), vtprune KNOWN_SINK_DIMS "
                             f"(llama, {hidden}, {inter}) {ours}; tau: release activate() default {release_tau}, "
                             f"vtprune {ours_tau}"})
    # as run: activate() + the 13B name; dim_sink stays DIM_SINK["llama-v2-7b"]
    engine.clear()
    engine.set_llm_name("llava-v1.5-13b")
    used = sorted(engine.dim_sink.tolist())
    llm = engine.llm_name
    engine.clear()
    ours = sorted(constants.DIM_SINK["llama-v2-13b"].tolist())
    rows.append({"method": METHOD, "model": "LLaVA-1.5-13B", "variant": "D_sink as the release runs it", "budget": "-",
                 "jaccard": jaccard(ours, used), "kept_equal": ours == used, "logit_max_abs": None,
                 "asserted": False,
                 "note": f"after LogicEngine.set_llm_name('llava-v1.5-13b') (llm_name {llm!r}; never called by "
                         f"src/inference.py) dim_sink is {used} (logic.py:15,29 DIM_SINK['llama-v2-7b'], never "
                         f"reassigned); vtprune uses {ours} (not asserted)"})
    return rows


@single_threaded
def compare(ref: Path) -> list[dict[str, Any]]:
    import torch

    from vtprune.toy.tiny import tiny_llava

    rel = load_release(Path(ref))
    rows = constant_rows(rel)
    inputs = tiny_llava_inputs(PROMPT)
    kept_rows = []
    for variant in VARIANTS:
        model = tiny_llava(attn_implementation="eager")
        cfg = model.config.text_config
        if cfg.hidden_size != WIDTH:
            raise SystemExit(f"{METHOD} parity: the tiny model's width is {cfg.hidden_size}, not {WIDTH}")
        if variant == "planted":
            plant(model, inputs)
        start, n = image_span(model, inputs)
        if n != TOKENS:
            raise SystemExit(f"{METHOD} parity: the tiny prompt holds {n} visual tokens, not {TOKENS}")
        layer_inputs, attentions = unpatched_forward(model, inputs)
        for layer in LAYERS:
            release_layer = layer + 1
            fastv = attentions[layer][0, :, -1, start:start + n].float().mean(0)
            for budget in BUDGETS:  # the reference's host: FastV's ranking
                want = sinks_last(fastv, [], budget)
                ours, logits = vtprune_run(model, inputs, "fastv", keep=budget, layer=layer)
                dropped = torch.zeros(inputs["input_ids"].shape[1], dtype=torch.bool)
                dropped[start:start + n] = True
                dropped[start + torch.tensor(want)] = False
                kept_rows.append({
                    "method": METHOD, "model": MODEL, "variant": f"{variant}, layer={layer}, fastv alone (the host)",
                    "budget": budget, "jaccard": jaccard(ours, want), "kept_equal": sorted(ours) == want,
                    "logit_max_abs": float((logits - masked_logits(model, inputs, layer, dropped)).abs().max()),
                    "note": f"vtprune fastv layer={layer} against the top {budget} of the last prompt token's layer-{layer} "
                            "attention over the image (mean over heads, eager forward)"})
            for mode in DIMS:
                given = SINK_DIMS if mode == "fixed" else None
                dims = list(SINK_DIMS) if mode == "fixed" else release_first_token_dims(rel, layer_inputs[release_layer])
                rel_sinks = release_sinks(rel, cfg, layer_inputs, start, release_layer, dims)
                theirs = rel_sinks["visual"]
                runs = {budget: vtprune_sink(model, inputs, layer, budget, given) for budget in BUDGETS}
                first = runs[BUDGETS[0]]
                same_sinks = all(r["sinks"] == theirs for r in runs.values())
                same_dims = all(r["dims"] == sorted(dims) for r in runs.values())
                hidden = float((first["hidden"] - layer_inputs[release_layer][0, start:start + n]).abs().max())
                rows.append({
                    "method": METHOD, "model": MODEL, "variant": f"{variant}, layer={layer}, dims {mode}: visual sinks",
                    "budget": "-", "jaccard": jaccard(first["sinks"], theirs), "kept_equal": same_sinks and same_dims,
                    "logit_max_abs": None, "hidden_max_abs": hidden,
                    "note": f"release DimProspector indices[{release_layer}] (select layers {rel_sinks['layers']}, "
                            f"dim_sink {sorted(dims)}, tau {TAU}): {len(theirs)} visual sinks of "
                            f"{len(rel_sinks['all'])} sink tokens; vtprune layer={layer} (pruned after layer "
                            f"{first['layer']}): {len(first['sinks'])} sinks, dims {first['dims']} ({first['source']})"
                            + ("" if mode == "fixed" else "; release dims: the first token's phi > tau by the "
                               "release's rmsnorm (the release has no rule: constants)")})
                for budget, run in runs.items():
                    want = sinks_last(fastv, theirs, budget)
                    dropped = torch.zeros(inputs["input_ids"].shape[1], dtype=torch.bool)
                    dropped[start:start + n] = True
                    dropped[start + torch.tensor(want)] = False
                    removed = len(set(sinks_last(fastv, [], budget)) - set(want))
                    kept_rows.append({
                        "method": METHOD, "model": MODEL, "variant": f"{variant}, layer={layer}, dims {mode}: sink+fastv",
                        "budget": budget, "jaccard": jaccard(run["kept"], want), "kept_equal": run["kept"] == want,
                        "logit_max_abs": float((run["logits"] - masked_logits(model, inputs, layer, dropped)).abs().max()),
                        "note": f"reference: FastV's top {budget} with the release's {len(theirs)} visual sinks "
                                f"ranked last ({removed} of FastV's picks replaced); vtprune sink+fastv layer={layer}, "
                                f"sink.tau={TAU}" + (f", sink.dims={list(SINK_DIMS)}" if given else ", dims on the fly")})
    return rows + kept_rows


def main(argv: list[str] | None = None) -> int:
    return run_check(METHOD, compare, argv, __doc__ or "",
                     passed=lambda r: r.get("asserted") is False or r["kept_equal"])


if __name__ == "__main__":
    sys.exit(main())
