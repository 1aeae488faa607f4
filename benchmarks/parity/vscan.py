"""Parity of vtprune's ``vscan`` with VScan's released code (github.com/Tencent/SelfEvolvingAgent, ``VScan/``).

Pre-LLM stage (LLaVA-1.5): the release's ``encode_images`` (``llava/model/llava_arch.py``) runs on a stand-in
``self`` with the release's ``window_cls_selection`` and ``token_merging``, fed by the release's
``CLIPVisionTower`` (``multimodal_encoder/clip_encoder.py``: every layer's CLS rows, ``output_attentions=True``)
wrapped around the tiny model's own CLIP: local scan on ``attentions[5]``, global on ``attentions[-2]``, merged
on the projector outputs; the LLM receives ``image_features[index_mask]``. The tiny model keeps LLaVA-1.5's
24 x 24 grid (the release asserts 576 patches) and has a 24-layer CLIP, so ``attentions[5]`` and
``attentions[-2]`` are the layers vtprune's defaults choose (``hidden_states[6]`` and ``[-2]``) and the budgets
are the release's own: ``--visual_token_num 96 --image_token_list '[32]'`` is vtprune ``keep=32``
(``pre_llm_factor`` 3); 192 -> 64 and 288 -> 96 are the paper's other two settings. Compared: the kept sets
(``index_mask`` against vtprune's pre-LLM stage), ``merged_max_abs`` (the release's merged rows against the rows
vtprune's patched model hands the LLM), and, with ``pre_llm_factor=1`` (the release without ``--layer_list``),
the first-token logits of vtprune's model against the unpatched LLM on the release's sequence.

LLM stage: the release's ``LlamaModel.layer_prune`` (``llava/model/modeling_llama_x.py``, written for
transformers 4.37, so it runs in ``.venv-llava`` in a subprocess) on the hidden states vtprune's run had after
its drop layer (the tiny LLM has 4 layers: vtprune's depth-scaled ``llm_layer`` 2 is the release's
``layer_list [3]``; ``image_token_list [T, keep]``), with the LLM's weights loaded into the release's own model
class; its kept rows are mapped back to tokens by exact match. Skipped (printed) where ``.venv-llava`` is missing.
The LLM stage's logits are not compared: the release re-indexes positions after the drop, vtprune keeps them
(a documented deviation).

    python benchmarks/parity/vscan.py --ref /path/to/SelfEvolvingAgent   # (or its VScan/ folder)
"""

from __future__ import annotations

import importlib
import subprocess
import sys
import tempfile
import types
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import (  # noqa: E402
    env_name,
    image_span,
    jaccard,
    logits_on_visual_rows,
    peaked,
    release_arch_and_clip,
    release_clip_tower,
    release_llava_package,
    run_check,
    single_threaded,
    tiny_llava_inputs,
)

METHOD = "vscan"
ENV = env_name(METHOD)
LOGIT_TOLERANCE = 1e-4
MERGE_TOLERANCE = 1e-5
MODEL = "tiny-llava-1.5 (24x24 grid, 24-layer CLIP, 4-layer LLM)"
BUDGETS = (32, 64, 96)  # vtprune keep; the release's visual_token_num is 3x
PROMPT = "USER: <image>\nWhat is in the picture? ASSISTANT:"
LLAVA_PYTHON = HERE.parents[1] / ".venv-llava" / "bin" / "python"


def _root(ref: Path) -> Path:
    """The release's VScan folder (``ref`` itself or ``ref/VScan``)."""
    for root in (ref / "VScan", ref):
        if (root / "llava" / "model" / "llava_arch.py").is_file():
            return root
    raise SystemExit(f"{ref} is not a checkout of Tencent/SelfEvolvingAgent: no VScan/llava/model/llava_arch.py")


# ---- the pre-LLM stage (this environment) ----------------------------------------------------------
def _release_encoder(root: Path, model: Any) -> Any:
    """``(images, T) -> (features [B, 576, D] merged in place, index_mask [B, 576])`` by the release's
    ``encode_images`` on a stand-in ``self`` whose vision tower is the release's ``CLIPVisionTower`` around
    ``model``'s CLIP (eager attention, so that ``attentions`` are returned)."""

    arch, clip = release_arch_and_clip(root, "Tencent/SelfEvolvingAgent (VScan/)")
    tower = release_clip_tower(clip, model)
    core = types.SimpleNamespace(get_vision_tower=lambda: tower, mm_projector=model.model.multi_modal_projector)
    meta = arch.LlavaMetaForCausalLM

    def encode(images: Any, visual_token_num: int) -> tuple[Any, Any]:
        me = types.SimpleNamespace(get_model=lambda: core, get_visual_token_num=lambda: visual_token_num)
        me.window_cls_selection = types.MethodType(meta.window_cls_selection, me)
        me.token_merging = types.MethodType(meta.token_merging, me)
        features, index_mask, _ = meta.encode_images(me, images)
        return features, index_mask

    return encode


def _run_vtprune(model: Any, inputs: Any, keep: int, **options: Any) -> tuple[Any, Any, dict, Any, int]:
    """vtprune's patched forward: (last-position logits, stats, the LM's input kwargs, the output of the
    LLM-stage drop layer ``[B, N, D]`` before the drop, that layer)."""
    import torch

    import vtprune

    seen: dict[str, Any] = {}
    out: dict[int, Any] = {}

    def record(i: int):  # registered before vtprune's own hooks, so it sees a layer's output before any drop
        return lambda m, a, o: out.setdefault(i, (o[0] if isinstance(o, tuple) else o).detach().clone())

    hooks = [layer.register_forward_hook(record(i)) for i, layer in enumerate(model.model.language_model.layers)]
    hooks.append(model.model.language_model.register_forward_pre_hook(lambda m, a, kw: seen.update(kw),
                                                                      with_kwargs=True))
    vtprune.apply(model, METHOD, keep=keep, **options)
    layer = model._vtprune_state.scorer.llm_layer
    try:
        with torch.no_grad():
            logits = model(**inputs, use_cache=False).logits[:, -1]
        st = vtprune.stats(model)
    finally:
        for h in hooks:
            h.remove()
        vtprune.remove(model)
    return logits, st, seen, out.get(layer), layer


# ---- the LLM stage (the transformers 4.37 environment) -----------------------------------------------
def llm_stage_worker(root: str, src: str, dst: str) -> None:
    """Run the release's ``layer_prune`` on each saved job's hidden states (in ``.venv-llava``); writes per job
    and sample the kept indices into the image span."""
    import torch
    from transformers import LlamaConfig

    with release_llava_package(Path(root)):
        llama = importlib.import_module("llava.model.modeling_llama_x")
    results = []
    for job in torch.load(src):
        cfg = LlamaConfig(**job["config"])
        cfg._attn_implementation = "sdpa"
        model = llama.LlamaModel(cfg).eval()
        missing, unexpected = model.load_state_dict(job["state_dict"], strict=False)
        if [k for k in missing if "rotary" not in k] or [k for k in unexpected if "rotary" not in k]:
            raise SystemExit(f"weights do not fit the release's LlamaModel: missing {missing}, unexpected {unexpected}")
        model.layer_list = [job["rank_layer"]]
        model.image_token_list = [job["visual_token_num"], job["keep"]]  # the eval scripts' insert(0, visual_token_num)
        model.image_token_posi = job["image_index"]
        model.prompt_len = job["prompt_len"]
        model.image_tokens = job["image_tokens"]
        h = job["hidden"]
        with torch.no_grad():
            _, _, new, _ = model.layer_prune(cur_num=0, rank_layer=job["rank_layer"], features=h,
                                             position_ids=torch.arange(h.shape[1])[None], attention_mask=None,
                                             labels=None, selected_indices=None, sum_visual_attention=[],
                                             indices_attention=[])
        kept = []
        for b in range(h.shape[0]):
            s, t = job["image_index"][b], job["image_tokens"][b]
            span = h[b, s:s + t]
            rows = new[b, s:s + job["keep"]]
            same = (rows[:, None] == span[None]).all(-1)
            if not bool(same.any(-1).all()):
                raise SystemExit("layer_prune returned a row that is none of the image span's")
            kept.append(same.float().argmax(-1).tolist())
        results.append(kept)
    torch.save(results, dst)


def _llm_stage_job(model: Any, hidden: Any, rank_layer: int, image_index: list[int], prompt_len: list[int],
                   image_tokens: list[int], keep: int) -> dict[str, Any]:
    """What `llm_stage_worker` needs for one comparison: the LLM's config and weights, the hidden states
    ``[B, N, D]`` after layer ``rank_layer - 1`` and the release's bookkeeping (``prepare_inputs_labels_for_multimodal``:
    the image's position, the prompt's text length, the image tokens present)."""
    text = model.config.text_config
    config = {k: getattr(text, k) for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                                            "num_attention_heads", "num_key_value_heads", "rms_norm_eps",
                                            "max_position_embeddings", "pad_token_id", "bos_token_id", "eos_token_id")}
    rope = getattr(text, "rope_parameters", None) or {}
    config["rope_theta"] = float(rope.get("rope_theta", getattr(text, "rope_theta", 10000.0)))
    if rope.get("rope_type", "default") != "default":
        raise SystemExit(f"the tiny LLM's RoPE is {rope}: the release's layer_prune uses the default one")
    state = {k: v.detach().clone() for k, v in model.model.language_model.state_dict().items()}
    return {"config": config, "state_dict": state, "hidden": hidden.float(), "rank_layer": rank_layer,
            "visual_token_num": image_tokens[0], "keep": keep, "image_index": image_index,
            "prompt_len": prompt_len, "image_tokens": image_tokens}


def _release_llm_stage(root: Path, jobs: list[dict[str, Any]]) -> list[list[list[int]]] | None:
    """`llm_stage_worker` on ``jobs`` in ``.venv-llava`` (one subprocess); None where that environment is missing."""
    import torch

    if not LLAVA_PYTHON.is_file():
        print(f"vscan: LLM stage not compared: {LLAVA_PYTHON} (transformers 4.37, scripts/setup_llava_repo.sh) is missing")
        return None
    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp) / "jobs.pt", Path(tmp) / "kept.pt"
        torch.save(jobs, src)
        code = f"import sys; sys.path.insert(0, {str(HERE)!r}); import vscan; vscan.llm_stage_worker(*sys.argv[1:])"
        done = subprocess.run([str(LLAVA_PYTHON), "-c", code, str(root), str(src), str(dst)], capture_output=True,
                              text=True, timeout=300)
        if done.returncode != 0:
            raise SystemExit(f"the release's layer_prune failed in {LLAVA_PYTHON}:\n{done.stderr[-3000:]}")
        return torch.load(dst)


# ---- the comparison ---------------------------------------------------------------------------------
@single_threaded
def compare(ref: Path) -> list[dict[str, Any]]:
    import torch

    from vtprune.toy.tiny import tiny_llava

    root = _root(ref)
    inputs = tiny_llava_inputs(PROMPT, count=2, draw="floats")
    ids = inputs["input_ids"]
    rows, jobs, pending = [], [], []
    for variant in ("random", "peaked"):
        model = tiny_llava(vision_layers=24, attn_implementation="eager")  # eager: the tower returns attentions
        if variant == "peaked":
            peaked(model)
        encode = _release_encoder(root, model)
        start, n = image_span(model, inputs)
        for keep in BUDGETS:
            t = 3 * keep
            with torch.no_grad():
                feats, mask = encode(inputs["pixel_values"], t)
            theirs = [torch.nonzero(m).flatten() for m in mask]
            their_rows = torch.stack([f[m] for f, m in zip(feats, mask)])  # what the release hands the LLM
            _, st, seen, hidden, layer = _run_vtprune(model, inputs, keep)
            pre = st.stages[0]["kept"]
            our_rows = seen["inputs_embeds"][:, start:start + t].float()
            jac = min(jaccard(a.tolist(), b.tolist()) for a, b in zip(theirs, pre))
            same = all(torch.equal(a.cpu(), b.cpu()) for a, b in zip(theirs, pre))
            merged = float((our_rows - their_rows.float()).abs().max()) if our_rows.shape == their_rows.shape else float("inf")
            # the release without --layer_list (pre-LLM only): the LLM sees its rows, so the logits compare
            logits, st1, _, _, _ = _run_vtprune(model, inputs, t, pre_llm_factor=1)
            ref_logits = logits_on_visual_rows(model, inputs, their_rows)
            same1 = all(torch.equal(a.cpu(), b.cpu()) for a, b in zip(theirs, st1.kept))
            rows.append({"method": METHOD, "model": MODEL + ", pre-LLM scans + merge", "variant": variant,
                         "budget": keep, "stage": "pre-llm", "jaccard": jac,
                         "kept_equal": bool(same and same1 and merged < MERGE_TOLERANCE), "merged_max_abs": merged,
                         "logit_max_abs": float((logits - ref_logits).abs().max()),
                         "note": f"release visual_token_num={t}; logits: vtprune keep={t} pre_llm_factor=1 against the "
                                 f"LLM on the release's rows (its run without --layer_list)"})
            # the LLM stage, on the hidden states vtprune ranked
            text_len = ids.shape[1] - n
            batch = ids.shape[0]
            jobs.append(_llm_stage_job(model, hidden, layer + 1, [start] * batch, [text_len] * batch, [t] * batch, keep))
            pending.append((variant, keep, t, layer, pre, st.kept))
    picks_all = _release_llm_stage(root, jobs) if jobs else None
    for (variant, keep, t, layer, pre, kept), picks in zip(pending, picks_all or []):
        final = [torch.sort(p[torch.tensor(k, dtype=torch.long)]).values for p, k in zip(pre, picks)]
        rows.append({"method": METHOD, "model": MODEL + ", LLM stage (layer_prune)", "variant": variant,
                     "budget": keep, "stage": "llm",
                     "jaccard": min(jaccard(a.tolist(), b.tolist()) for a, b in zip(final, kept)),
                     "kept_equal": all(torch.equal(a.cpu(), b.cpu()) for a, b in zip(final, kept)),
                     "logit_max_abs": None,
                     "note": f"release layer_list=[{layer + 1}], image_token_list=[{t}, {keep}] on vtprune's "
                             f"hidden states after layer {layer}"})
    return rows


def summary(rows: list[dict[str, Any]]) -> None:
    for r in rows:
        extra = f", merged max |diff| {r['merged_max_abs']:.2e}" if "merged_max_abs" in r else ""
        print(f"  {r['stage']} {r['variant']} keep {r['budget']}: kept equal {r['kept_equal']}{extra} ({r['note']})")


def main(argv: list[str] | None = None) -> int:
    return run_check(METHOD, compare, argv, __doc__ or "", summary=summary)


if __name__ == "__main__":
    sys.exit(main())
