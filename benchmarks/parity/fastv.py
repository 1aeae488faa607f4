"""Parity of vtprune's ``fastv`` with FastV's release (github.com/pkunlp-icler/FastV, read at d165972): the kept
visual tokens and the first-token logits.

The release is a modified transformers 4.31 (``src/transformers/src/transformers/models/llama/modeling_llama.py``)
that the LLaVA evaluation (``src/FastV/inference/eval/inference_aokvqa.py``) drives through ``model.config``:
``use_fast_v``, ``fast_v_inplace``, ``fast_v_sys_length`` (36 in its scripts: the image's place in LLaVA-1.5's
prompt), ``fast_v_image_token_length`` (576), ``fast_v_attention_rank`` (the kept image tokens) and
``fast_v_agg_layer`` (K). Its ``LlamaModel.forward`` (the inplace branch, the one
``eval_aokvqa_latency_fastv_inplace.sh`` runs, with ``output_attentions=True`` as the eval passes), on reaching
decoder layer ``K``, averages layer ``K - 1``'s attention maps over heads, takes the last token's row over the
image span, keeps its top ``fast_v_attention_rank`` image tokens (all other tokens stay), gathers the hidden
states and hands the kept rows their original positions (its rotary tables are built for 1000 positions
so that gaps work). K names the first layer that sees fewer tokens: vtprune's ``layer = K - 1`` (the layer
whose output it prunes).

Both sides run in one process of the transformers 4.37 environment of ``scripts/setup_llava_repo.sh``
(``.venv-llava``, or ``$VTPRUNE_LLAVA_PYTHON``): the release's file is imported as a module of the installed
transformers package (its relative imports resolve there; nothing of it is copied), its ``LlamaModel`` built
on the tiny ``llava_llama`` model's config (32 layers of width 64, 576 tokens per image, from
``vtprune.toy.tiny_llava_repo``) with the ``fast_v_*`` fields set, and the tiny model's language-model
weights loaded into it (the vision tower and projector are the tiny model's). Its input embeddings are the
tiny model's ``prepare_inputs_labels_for_multimodal`` output, the logits its ``lm_head`` on the release's
final hidden state. The kept set is read from the ``position_ids`` the release passes to layer ``K`` (its
``keep_indexs``); a wrapper records them without changing anything.

Settings: ``K = 2`` (the paper's and the inplace script's ``Ks=(2)``; vtprune ``layer=1``) and ``K = 3``
(vtprune's default ``layer=2``; the release's lmms-eval variant ``fastv_kvcache.py`` hard-codes ``K = 3``,
ratio 0.5). Budgets: ``fast_v_attention_rank`` 64 / 128 / 192 (the token-count settings) and 288
(R = 50 %, the paper's headline; the script's rank list is 72 / 144 / 288 / 432). ``fast_v_sys_length`` is the
image's place in the tiny prompt (the vicuna_v1 template with one image, batch 1).

    python benchmarks/parity/fastv.py --ref /path/to/FastV
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import llava_repo_worker as worker  # noqa: E402
from common import env_name, jaccard, run_check  # noqa: E402

ROOT = worker.ROOT
METHOD = "fastv"
ENV = env_name(METHOD)
LOGIT_TOLERANCE = 1e-4
LAYERS, HIDDEN, TOKENS = 32, 64, 576
MODEL = f"tiny llava_llama ({LAYERS} layers, width {HIDDEN}, {TOKENS} tokens)"
VARIANTS = ("random", "peaked")
KS = (2, 3)  # the release's fast_v_agg_layer; vtprune layer = K - 1 (its default 2 is K = 3)
RANKS = (64, 128, 192, 288)  # fast_v_attention_rank
RELEASE_FILE = "src/transformers/src/transformers/models/llama/modeling_llama.py"


# --- the worker (run by compare() in the transformers 4.37 environment) ----------------------------------

def _release_module(ref: Path):
    """The release's modeling_llama.py as a module of the installed transformers' llama package."""
    import importlib.util

    name = "transformers.models.llama.fastv_release_modeling_llama"
    spec = importlib.util.spec_from_file_location(name, ref / RELEASE_FILE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def _release_model(release, model, sys_length: int, rank: int, k: int):
    """The release's ``LlamaModel`` with the tiny model's language-model weights and the FastV fields set."""
    import copy

    config = copy.deepcopy(model.config)
    config.use_fast_v, config.fast_v_inplace = True, True
    config.fast_v_sys_length, config.fast_v_image_token_length = sys_length, TOKENS
    config.fast_v_attention_rank, config.fast_v_agg_layer = rank, k
    config._attn_implementation = "eager"
    lm = release.LlamaModel(config).eval()
    state = {n: t for n, t in model.model.state_dict().items() if not n.startswith(("vision_tower.", "mm_projector."))}
    missing, unexpected = lm.load_state_dict(state, strict=False)
    if unexpected or any(not n.endswith("rotary_emb.inv_freq") for n in missing):
        raise SystemExit(f"fastv parity: weights do not fit the release's LlamaModel: missing {missing}, "
                         f"unexpected {unexpected}")
    return lm


def _worker(ref: Path, work: Path) -> None:
    import torch

    from vtprune.toy.tiny_llava_repo import IMAGE_TOKEN_INDEX

    release = _release_module(ref)
    out = {}
    for variant in VARIANTS:
        factor = 8.0 if variant == "peaked" else None  # `peaked`'s default
        model, ids, images = worker.prepared_variant(work, variant, factor, save=False, layers=LAYERS, hidden=HIDDEN)
        start = int((ids[0] == IMAGE_TOKEN_INDEX).nonzero()[0, 0])
        with torch.no_grad():
            spliced = model.prepare_inputs_labels_for_multimodal(ids, None, None, None, None, images)
        embeds = spliced[4]
        for k in KS:
            for rank in RANKS:
                logits, st = worker.vtprune_prefill(model, ids, images, METHOD, keep=rank, layer=k - 1)
                ours = {"layer": st.layer, "kept": sorted(st.kept[0].tolist()), "logits": logits.tolist()}

                lm = _release_model(release, model, start, rank, k)
                seen = []
                plain = lm.layers[k].forward

                def recorded(*args, plain=plain, seen=seen, **kwargs):
                    seen.append(kwargs["position_ids"][0].clone())
                    return plain(*args, **kwargs)

                lm.layers[k].forward = recorded
                with torch.no_grad():
                    h = lm(inputs_embeds=embeds, output_attentions=True, use_cache=False, return_dict=True)
                    rel_logits = model.lm_head(h.last_hidden_state[:, -1])[0]
                pos = seen[0]
                image = pos[(pos >= start) & (pos < start + TOKENS)] - start
                theirs = {"kept": sorted(image.tolist()), "logits": rel_logits.tolist(),
                          "seq_after": int(pos.numel()), "seq_before": int(embeds.shape[1])}
                out[f"{variant}/{k}/{rank}"] = {"vtprune": ours, "release": theirs, "sys_length": start}
    (work / "fastv.json").write_text(json.dumps(out))


# --- the check ---------------------------------------------------------------------------------------------

def compare(ref: Path) -> list[dict]:
    with tempfile.TemporaryDirectory(prefix="parity-fastv-") as tmp:
        work = Path(tmp)
        worker.run_worker(METHOD, Path(__file__).resolve(), ["both", Path(ref).resolve(), work], [ROOT],
                          "the worker")
        result = json.loads((work / "fastv.json").read_text())
    rows = []
    for variant in VARIANTS:
        for k in KS:
            for rank in RANKS:
                r = result[f"{variant}/{k}/{rank}"]
                mine, rel = r["vtprune"], r["release"]
                default = " (vtprune's default layer)" if k - 1 == 2 else ""
                note = ""
                if k == KS[0]:  # the paper's K against vtprune's default layer (K = 3): not asserted
                    d = result[f"{variant}/{KS[1]}/{rank}"]["vtprune"]
                    note = (f"; vtprune's default (layer=2, K=3) against this K={k} release: Jaccard "
                            f"{jaccard(d['kept'], rel['kept']):.3f}, max |logit diff| "
                            f"{max(abs(a - b) for a, b in zip(d['logits'], rel['logits'])):.2e} (not asserted)")
                rows.append({
                    "method": METHOD, "model": MODEL, "variant": f"{variant}, K={k}{default}", "budget": rank,
                    "jaccard": jaccard(mine["kept"], rel["kept"]), "kept_equal": mine["kept"] == rel["kept"],
                    "logit_max_abs": max(abs(a - b) for a, b in zip(mine["logits"], rel["logits"])),
                    "note": f"release inplace: fast_v_agg_layer {k}, fast_v_attention_rank {rank}, fast_v_sys_length "
                            f"{r['sys_length']} (sequence {rel['seq_before']} -> {rel['seq_after']}); vtprune "
                            f"keep={rank}, layer={k - 1} (pruned after layer {mine['layer']})" + note,
                })
    return rows


def main(argv: list[str] | None = None) -> int:
    return run_check(METHOD, compare, argv, __doc__)


if __name__ == "__main__":
    worker.worker_entry({"both": _worker})  # both sides in one process
    sys.exit(main())
