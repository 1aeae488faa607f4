"""Parity of vtprune's ``sparsevlm`` with SparseVLM's release (github.com/Gumpest/SparseVLMs, read at 26a5f48, its
v1.5 scoring: ``USE_VERSION=1_0``, the default there; the same code as the ``v1.5`` branch at 734d900, which
vtprune's README row names): the kept visual tokens after each stage, the recycled tokens' clusters and the
first-token logits.

The release is a fork of the LLaVA codebase on transformers 4.37: ``LlavaLlamaDynamicForCausalLM``
(llava/model/language_model/sparse_llava_llama.py, what ``load_pretrained_model`` builds by default) runs
``LlamaDynamicvitModel.forward`` (modelling_sparse_llama.py): raters chosen once on the input embeddings, then
at layers 2, 6, 15 the layer's attention (its own SDPA stand-in returns the maps), ``attn_postprocess_topk``
(score.py: head mean, rater rows, visual columns, rater mean, top ``sparse_token_dict[RETAIN_TOKN][stage]``)
and, with ``s_flag``, ``cluster_and_merge`` (utils.py: DPC-kNN on the top 30 % (+1) of the deleted tokens,
``n // 10 + 1`` clusters) whose means are inserted after the kept visual tokens; positions are cut to
``0..N'-1``. Both sides run in the transformers 4.37 environment of ``scripts/setup_llava_repo.sh``
(``.venv-llava``, or the interpreter in ``$VTPRUNE_LLAVA_PYTHON``), each in its own process:

- vtprune: the tiny ``llava_llama`` model of ``vtprune.toy.tiny_llava_repo`` with 32 layers of width 64 (the
  release's layers, 576 tokens per image), the LLaVA repository's own ``llava`` package,
  ``vtprune.apply(model, "sparsevlm", keep=..., ratios=..., recycle=...)``;
- the release: its ``llava`` package first on ``sys.path`` (``einops``, which only ``cluster_and_merge``
  uses for two reshapes, is a stand-in doing exactly those where it is not installed; ``torch.cuda``'s
  timing events, which its forward records, are no-ops on the CPU), ``LlavaLlamaDynamicForCausalLM`` on the
  tiny model's config with vtprune's weights loaded (the ``peaked`` variant included), ``RETAIN_TOKN`` set
  in score.py, wrappers on ``attn_postprocess_topk`` and ``cluster_and_merge`` recording what they return.

Budgets: ``RETAIN_TOKN`` 192 / 128 / 96 / 64, the release's schedules (``sparse_token_dict``: [300, 200,
110], [303, 110, 36], [238, 48, 26], [66, 30, 17] kept after layers 2, 6, 15); vtprune ``ratios`` the first
two of 576 and ``keep`` the last. Prompt: LLaVA-1.5's ``vicuna_v1`` conversation with one image, batch 1.

Modes (the ``variant`` column). vtprune's documented deviations: kept tokens keep their original positions
(the release re-indexes them); recycling (its default) writes each cluster mean into the slot of its center
token and counts it in the budget (the release appends the means after the kept tokens, on top of the
budget). So:

- ``no recycling, positions kept``: vtprune ``recycle=False``; the release with ``s_flag`` returned False
  (its own no-merge branch) and each decoder layer handed its rows' original positions (its rotary tables
  not cut at the shortened length): every stage and the logits are compared.
- ``no recycling, as released``: the same without the positions: stage 1 is compared (later stages and the
  logits in ``note``, not asserted).
- ``recycling clusters, stage s``: the release as released (merging); at each stage vtprune's ``dpc_knn`` runs
  on the very tokens the release clusters: ``jaccard``/``kept_equal`` compare the cluster centers (the
  release's ``index_down``, in order) and ``feature_max_abs`` the cluster means, both against the release's
  ``cluster_and_merge`` on those tokens in float64 with its density noise (``1e-6 * torch.rand``, a random
  tie-break) replaced by ``1e-15 * i``: ties go to the later row, as vtprune breaks them, and nothing else
  moves (float32 densities are never that close unless equal). The as-released noisy call's centers and
  means, and vtprune's default preset (recycling) against the release as released, are in ``note``, not
  asserted: by design they differ (with 1 or 2 clusters the densities tie exactly, so the release's own
  centers are random there; with 1 cluster the mean is the same whichever is the center).

    python benchmarks/parity/sparsevlm.py --ref /path/to/SparseVLMs
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import llava_repo_worker as worker  # noqa: E402
from common import env_name, jaccard, run_check  # noqa: E402

METHOD = "sparsevlm"
ENV = env_name(METHOD)
LOGIT_TOLERANCE = 1e-4
FEATURE_TOLERANCE = 1e-4
LAYERS, HIDDEN, TOKENS = 32, 64, 576
MODEL = f"tiny llava_llama ({LAYERS} layers, width {HIDDEN}, {TOKENS} tokens)"
TINY = dict(layers=LAYERS, hidden=HIDDEN)  # tiny_llava_repo's options
VARIANTS = ("random", "peaked")
PRUNING_LAYERS = (2, 6, 15)  # the release's pruning_loc (0-based; it prunes these layers' outputs)
SCHEDULES = {192: (300, 200, 110), 128: (303, 110, 36), 96: (238, 48, 26), 64: (66, 30, 17)}  # v1.5
MODES = ("no recycling, positions kept", "no recycling, as released", "as released")


def vtprune_options(budget: int, recycle: bool) -> dict:
    s1, s2, s3 = SCHEDULES[budget]
    return {"keep": s3, "ratios": [s1 / TOKENS, s2 / TOKENS], "recycle": recycle}


# --- workers (run by compare() in the transformers 4.37 environment) -------------------------------------

def _vtprune_side(work: Path) -> None:
    """Build the inputs and the weights of both variants, run vtprune on them; writes ``vtprune.json``."""
    out = {}
    for variant in VARIANTS:
        factor = 8.0 if variant == "peaked" else None  # `peaked`'s default
        model, ids, images = worker.prepared_variant(work, variant, factor, **TINY)
        for budget in SCHEDULES:
            for recycle in (False, True):
                logits, st = worker.vtprune_prefill(model, ids, images, METHOD, **vtprune_options(budget, recycle))
                out[f"{variant}/{budget}/{recycle}"] = {"layers": [s["layer"] for s in st.stages],
                                                        "kept": [sorted(s["kept"][0].tolist()) for s in st.stages],
                                                        "logits": logits.tolist()}
    (work / "vtprune.json").write_text(json.dumps(out))


def _einops_stand_in() -> None:
    """``einops.rearrange`` for the two patterns ``cluster_and_merge`` uses, where einops is not installed."""
    import types

    try:
        import einops  # noqa: F401
        return
    except ImportError:
        pass
    patterns = {"b l r -> b l () r": 2, "b l r -> b () l r": 1}

    def rearrange(x, pattern):
        if pattern not in patterns:
            raise NotImplementedError(f"sparsevlm parity: the einops stand-in does not do {pattern!r}")
        return x.unsqueeze(patterns[pattern])

    module = types.ModuleType("einops")
    module.rearrange = rearrange
    sys.modules["einops"] = module


def _cpu_timing() -> None:
    """The release's forward times itself with CUDA events; on the CPU they do nothing."""
    import torch

    class Event:
        def __init__(self, *args, **kwargs):
            pass

        def record(self, *args, **kwargs):
            pass

        def elapsed_time(self, other):
            return 0.0

    if not torch.cuda.is_available():
        torch.cuda.Event = Event
        torch.cuda.synchronize = lambda *a, **k: None


def _release_side(work: Path) -> None:
    """The release's forward on the same weights and inputs, in every mode; writes ``release.json``."""
    os.environ["USE_VERSION"] = "1_0"  # v1.5 scoring (the release's default)
    _einops_stand_in()
    _cpu_timing()
    import torch
    from llava.model.language_model import score
    from llava.model.language_model.sparse_llava_llama import LlavaLlamaDynamicForCausalLM

    if score.V2_0:
        raise SystemExit("sparsevlm parity: the release runs SparseVLM+ (USE_VERSION=2_0), not v1.5")
    for budget, schedule in SCHEDULES.items():
        if tuple(score.sparse_token_dict[budget]) != schedule:
            raise SystemExit(f"sparsevlm parity: the release's schedule for {budget} is "
                             f"{score.sparse_token_dict[budget]}, not {schedule}")
    out = {}
    for variant in VARIANTS:
        saved = torch.load(work / f"{variant}.pt")
        base, _, _ = worker.tiny_model(work, **TINY)
        base.config._attn_implementation = "sdpa"  # the release's decoder layer asserts it
        model = worker.release_model(LlavaLlamaDynamicForCausalLM, base.config, saved["state"])
        if list(model.model.pruning_loc) != list(PRUNING_LAYERS):
            raise SystemExit(f"sparsevlm parity: the release prunes after {model.model.pruning_loc}")
        for budget in SCHEDULES:
            for mode in MODES:
                score.RETAIN_TOKN = budget
                out[f"{variant}/{budget}/{mode}"] = _release_forward(model, saved["input_ids"], saved["images"], mode)
    (work / "release.json").write_text(json.dumps(out))


def _release_forward(model, ids, images, mode: str) -> dict:
    """One prefill through the release: per stage the image tokens (indices among the 576) it keeps, per
    merging stage the clusters, and the first-token logits."""
    import torch
    from llava.model.language_model import modelling_sparse_llama as sparse
    from llava.model.language_model import utils as release_utils

    from vtprune.scorers.sparsevlm import dpc_knn

    lm = model.model
    st = {"orig": None, "visual": torch.arange(TOKENS)}  # each row's original position; each visual row's index
    stages: list[list[int]] = []
    clusters: list[dict] = []
    plain_topk, plain_cluster, plain_points = sparse.attn_postprocess_topk, sparse.cluster_and_merge, release_utils.index_points

    def topk(self_attn_weights, v_token_start, v_token_num, text_token_start, t_token_idx, layer_idx):
        mask, s_flag, relation = plain_topk(self_attn_weights, v_token_start, v_token_num, text_token_start,
                                            t_token_idx, layer_idx)
        keep = mask[0].cpu()
        kept = st["visual"][keep]
        stages.append(sorted(kept[kept >= 0].tolist()))
        st["visual"] = kept
        start, n = int(v_token_start), int(v_token_num)
        orig = st["orig"]
        st["orig"] = torch.cat([orig[:start], orig[start:start + n][keep], orig[start + n:]])
        return mask, (s_flag if mode == "as released" else False), relation

    def centers_of(x, cluster_num, noise: bool):
        """The release's ``cluster_and_merge`` and its centers (``index_down``); ``noise=False``: in float64,
        its density noise ``1e-6 * torch.rand`` replaced by ``1e-15 * i`` (below any float32 density gap,
        above float64's resolution), i.e. exact ties go to the later row, as in vtprune."""
        seen = []

        def points(p, idx):
            seen.append(idx[0].clone())
            return plain_points(p, idx)

        def ramp(*size, **kwargs):  # torch.rand(density.shape, ...): [B, n] -> 1e-9 * i per row
            size = tuple(size[0]) if len(size) == 1 and not isinstance(size[0], int) else size
            return (torch.arange(size[-1], dtype=torch.float64) * 1e-9).expand(size)

        real_rand = torch.rand
        release_utils.index_points = points
        if not noise:
            x = x.double()
            torch.rand = ramp
        try:
            merged = plain_cluster(x, cluster_num)
        finally:
            release_utils.index_points = plain_points
            torch.rand = real_rand
        return merged, seen[0]

    def cluster(x, cluster_num):
        merged, noisy_centers = centers_of(x, cluster_num, noise=True)  # what the release's forward uses
        exact, exact_centers = centers_of(x, cluster_num, noise=False)
        ours, assign = dpc_knn(x[0], cluster_num)
        means = torch.stack([x[0][assign == c].float().mean(dim=0) for c in range(ours.numel())])
        clusters.append({"n": int(x.shape[1]), "clusters": int(cluster_num),
                         "release_centers": exact_centers.tolist(), "release_noisy_centers": noisy_centers.tolist(),
                         "vtprune_centers": ours.tolist(),
                         "feature_max_abs": float((means.double() - exact[0]).abs().max()),
                         "noisy_feature_max_abs": float((means - merged[0].float()).abs().max())
                         if merged.shape == exact.shape else None})
        st["visual"] = torch.cat([st["visual"], torch.full((int(cluster_num),), -1)])
        return merged

    layers = list(lm.layers)
    ropes = [layer.self_attn.rotary_emb for layer in layers]

    def wrap(layer):
        plain = layer.forward

        def forward(*args, **kwargs):
            hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            if st["orig"] is None:
                st["orig"] = torch.arange(hidden.shape[1])
                st["full"] = hidden.shape[1]
            if mode == "no recycling, positions kept":
                kwargs["position_ids"] = st["orig"][None].to(hidden.device)
            return plain(*args, **kwargs)
        return forward

    def uncut(plain_rope):
        def forward(x, seq_len=None):
            return plain_rope(x, seq_len=max(st.get("full") or 0, seq_len or 0))
        return forward

    sparse.attn_postprocess_topk, sparse.cluster_and_merge = topk, cluster
    for layer in layers:
        layer.forward = wrap(layer)
    if mode == "no recycling, positions kept":
        for rope in ropes:
            rope.forward = uncut(rope.forward)
    torch.manual_seed(0)  # the release's density noise: the same draw on every run
    try:
        with torch.no_grad():
            result = model(input_ids=ids, images=images, use_cache=True, return_dict=True)  # its layer outputs assume a cache
    finally:
        sparse.attn_postprocess_topk, sparse.cluster_and_merge = plain_topk, plain_cluster
        for module in layers + ropes:
            vars(module).pop("forward", None)
    if len(stages) != len(PRUNING_LAYERS):
        raise SystemExit(f"sparsevlm parity: the release selected {len(stages)} times in one prefill")
    return {"kept": stages, "clusters": clusters, "logits": result[2].logits[0, -1].tolist()}


# --- the check ---------------------------------------------------------------------------------------------

def _logit_diff(a: list[float], b: list[float]) -> float:
    return max(abs(x - y) for x, y in zip(a, b))


def compare(ref: Path) -> list[dict]:
    ours, theirs = worker.run_two_sides(METHOD, __file__, ref)
    rows = []
    for variant in VARIANTS:
        for budget, schedule in SCHEDULES.items():
            plain, default = ours[f"{variant}/{budget}/False"], ours[f"{variant}/{budget}/True"]
            base = {"method": METHOD, "model": MODEL}
            setting = f"RETAIN_TOKN {budget} {list(schedule)}; vtprune {vtprune_options(budget, False)}"
            for mode in MODES[:2]:
                rel = theirs[f"{variant}/{budget}/{mode}"]
                diff = _logit_diff(plain["logits"], rel["logits"])
                stages = range(len(PRUNING_LAYERS)) if mode == MODES[0] else range(1)
                for s in stages:
                    a, b = plain["kept"][s], rel["kept"][s]
                    last = s == len(PRUNING_LAYERS) - 1
                    row = {**base, "variant": f"{variant}, RETAIN_TOKN {budget}, stage {s + 1} (after layer "
                                              f"{PRUNING_LAYERS[s]}), {mode}",
                           "budget": len(b), "jaccard": jaccard(a, b), "kept_equal": a == b,
                           "logit_max_abs": diff if last else None,
                           "note": f"{setting}; vtprune stage layers {plain['layers']}"}
                    if mode == MODES[1]:
                        later = [round(jaccard(x, y), 3) for x, y in zip(plain["kept"], rel["kept"])]
                        row["note"] += (f"; not asserted (re-indexed positions): Jaccard per stage {later}, "
                                        f"max |logit diff| {diff:.2e}")
                    rows.append(row)
            rel = theirs[f"{variant}/{budget}/as released"]
            kept_vs = [round(jaccard(x, y), 3) for x, y in zip(default["kept"], rel["kept"])]
            for s, c in enumerate(rel["clusters"]):
                a, b = c["vtprune_centers"], c["release_centers"]
                rows.append({**base, "variant": f"{variant}, RETAIN_TOKN {budget}, stage {s + 1} (after layer "
                                                f"{PRUNING_LAYERS[s]}), recycling clusters",
                             "budget": c["clusters"], "jaccard": jaccard(a, b), "kept_equal": a == b,
                             "logit_max_abs": None, "feature_max_abs": c["feature_max_abs"],
                             "note": f"cluster_and_merge on the release's {c['n']} tokens into {c['clusters']} "
                                     f"(float64, density noise 1e-15 * i); as released (its random noise): centers Jaccard "
                                     f"{jaccard(a, c['release_noisy_centers']):.3f}, max |mean diff| "
                                     f"{c['noisy_feature_max_abs']}; not asserted: vtprune's default "
                                     f"(recycle=True) against the release as released: kept Jaccard per stage "
                                     f"{kept_vs}, max |logit diff| {_logit_diff(default['logits'], rel['logits']):.2e}"})
    return rows


def summary(rows: list[dict]) -> None:
    features = [r["feature_max_abs"] for r in rows if r.get("feature_max_abs") is not None]
    print(f"{METHOD} recycling clusters: {len(features)} stages, max |cluster mean diff| {max(features):.2e}")


def main(argv: list[str] | None = None) -> int:
    return run_check(METHOD, compare, argv, __doc__, summary=summary)


if __name__ == "__main__":
    worker.worker_entry({"vtprune": _vtprune_side, "release": _release_side})
    sys.exit(main())
