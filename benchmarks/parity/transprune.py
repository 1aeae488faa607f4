"""Parity of vtprune's ``transprune`` with TransPrune's release (github.com/liaolea/TransPrune, read at
c9e8284): the kept visual tokens after each of its three stages and the first-token logits.

The release is a fork of the LLaVA codebase on transformers 4.37: ``LlavaLlamaForCausalLM_TransPrune``
(llava/model/language_model/llava_llama_transprune.py, what ``load_pretrained_model(..., method='transprune')``
builds) runs ``LlamaModel.transprune_forward`` (llava/model/modeling_llama_transprune.py): the decoder layers
``LlamaDecoderLayer_TransPrune`` of ``accmulating_layer_list`` return their token transition weights
(``compute_transf_weight`` of the attention and MLP sublayers), and after each layer ``l`` with ``l + 1`` in
``pruning_layer_list`` ``transprune_rank_drop`` adds the normalised accumulated TTV to the normalised
instruction attention of layer ``l + 1`` and keeps the top ``int(576 * ratio)``. Both sides run in the
transformers 4.37 environment of ``scripts/setup_llava_repo.sh`` (``.venv-llava``, or the interpreter in
``$VTPRUNE_LLAVA_PYTHON``), each in its own process:

- vtprune: the tiny ``llava_llama`` model of ``vtprune.toy.tiny_llava_repo`` with 32 layers of width 64
  (LLaVA-1.5-7B's depth, 576 tokens per image), the repository's own ``llava`` package,
  ``vtprune.apply(model, "transprune", keep=K)`` (the default layers 6, 8, 11 and ratios 0.875, 0.625);
- the release: the same weights (the state dict, ``peaked`` variant included) loaded into
  ``LlavaLlamaForCausalLM_TransPrune`` with the release's ``llava`` package first on ``sys.path``, its
  lists set as ``llava/eval/model_vqa_loader.py`` sets them from the scripts/transprune/v1_5_test settings
  (``accmulating_layer_list [7..12]``, ``pruning_layer_list [7,9,12]``, ``image_token_ratio_list
  [0.875,0.625,0.125]``, the only setting there: 504, 360, 72 tokens), a wrapper on ``transprune_rank_drop``
  recording which rows of the sequence each stage returns (matched row by row to its input, exact copies).
  Its CUDA timing calls (``torch.cuda.Event`` / ``synchronize`` around the layers, no part of the selection)
  are no-ops on this CPU run, and its unused ``from sklearn.cluster import DBSCAN`` gets a stub module.

Budgets: the release's 72 and 64 / 128 / 192 (the last ratio ``(K + 0.5) / 576``, which the release floors to
``K``; the first two stages stay at 504 and 360). The prompt is LLaVA-1.5's ``vicuna_v1`` conversation with one
image, batch 1 (the release's evaluation; its TTV softmax runs over the whole batch, so it is exact for batch 1
only).

Modes (the ``variant`` column): vtprune keeps the original positions of the kept tokens where the release
re-indexes them contiguously (a documented deviation), so from the second stage on the two rank with
different RoPE positions. ``as released``: the release unchanged; its first stage is compared (the later
stages' Jaccard and the logit difference are reported in ``note``, not asserted). ``positions kept``: the
wrapper hands the next layers the kept rows' original ``position_ids`` instead of the re-indexed ones (and
the release's rotary tables are not cut at the shortened length, which only that needs): every stage and the
first-token logits are compared.

    python benchmarks/parity/transprune.py --ref /path/to/TransPrune
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import env_name, jaccard, reference_path, write_rows  # noqa: E402

METHOD = "transprune"
ENV = env_name(METHOD)
LOGIT_TOLERANCE = 1e-4
ROOT = Path(__file__).resolve().parents[2]
LAYERS, HIDDEN, TOKENS = 32, 64, 576  # LLaVA-1.5's depth and grid, a tiny width
MODEL = f"tiny llava_llama ({LAYERS} layers, width {HIDDEN}, {TOKENS} tokens)"
VARIANTS = ("random", "peaked")
MODES = ("as released", "positions kept")
ACCUMULATING = [7, 8, 9, 10, 11, 12]  # the release's scripts (1-based: layer_idx + 1)
PRUNING = [7, 9, 12]
RATIOS = [0.875, 0.625]  # the first two stages (504 and 360 of 576)
BUDGETS = (72, 64, 128, 192)  # 72: the release's 0.125
QUESTION = "<image>\nWhat is the colour of the large shape? Answer the question using a single word or phrase."


def last_ratio(keep: int) -> float:
    """The release's last ``image_token_ratio_list`` entry for ``keep`` tokens (it floors ``576 * ratio``)."""
    return 0.125 if keep == 72 else (keep + 0.5) / TOKENS


def llava_python() -> str:
    """The interpreter of the transformers 4.37 environment (``$VTPRUNE_LLAVA_PYTHON`` or ``.venv-llava``)."""
    python = os.environ.get("VTPRUNE_LLAVA_PYTHON") or str(ROOT / ".venv-llava" / "bin" / "python")
    if not Path(python).exists():
        raise SystemExit(f"{METHOD}: the release runs on transformers 4.37: create {python} with "
                         "`bash scripts/setup_llava_repo.sh` (or set VTPRUNE_LLAVA_PYTHON)")
    return python


# --- workers (run by compare() in the transformers 4.37 environment) -------------------------------------

def _tiny(work: Path):
    from vtprune.toy.tiny_llava_repo import tiny_llava_repo

    return tiny_llava_repo(work / "towers", layers=LAYERS, hidden=HIDDEN, seed=0)


def _vtprune_side(work: Path) -> None:
    """Build the inputs and the weights of both variants, run vtprune on them; writes ``vtprune.json``."""
    import numpy as np
    import torch
    from common import peaked
    from llava.conversation import conv_templates
    from llava.mm_utils import process_images, tokenizer_image_token
    from PIL import Image

    import vtprune
    from vtprune.toy.tiny_llava_repo import IMAGE_TOKEN_INDEX

    out = {}
    for variant in VARIANTS:
        model, tok, ip = _tiny(work)
        if variant == "peaked":
            peaked(model)
        conv = conv_templates["vicuna_v1"].copy()
        conv.append_message(conv.roles[0], QUESTION)
        conv.append_message(conv.roles[1], None)
        ids = tokenizer_image_token(conv.get_prompt(), tok, IMAGE_TOKEN_INDEX, return_tensors="pt")[None]
        picture = Image.fromarray((np.random.default_rng(7).random((320, 400, 3)) * 255).astype("uint8"))
        images = process_images([picture], ip, model.config)
        torch.save({"state": model.state_dict(), "input_ids": ids, "images": images}, work / f"{variant}.pt")
        for keep in BUDGETS:
            vtprune.apply(model, METHOD, keep=keep)
            with torch.no_grad():
                logits = model(input_ids=ids, images=images, return_dict=True).logits[0, -1]
            st = vtprune.stats(model)
            vtprune.remove(model)
            out[f"{variant}/{keep}"] = {"layers": [s["layer"] for s in st.stages],
                                        "kept": [s["kept"][0].tolist() for s in st.stages],
                                        "logits": logits.tolist()}
    (work / "vtprune.json").write_text(json.dumps(out))


class _NoEvent:
    """Stand-in for ``torch.cuda.Event``: the release times its layers with CUDA events (no part of pruning)."""

    def __init__(self, *args, **kwargs) -> None:
        pass

    def record(self, *args, **kwargs) -> None:
        pass

    def elapsed_time(self, other) -> float:
        return 0.0


def _release_side(work: Path) -> None:
    """The release's forward on the same weights and inputs, in both modes; writes ``release.json``."""
    import types

    import torch
    import transformers.modeling_utils  # noqa: F401  (before the stub: transformers probes for sklearn)

    cluster = types.ModuleType("sklearn.cluster")  # imported (DBSCAN) by the release's modeling file, never used
    cluster.DBSCAN = None
    sys.modules.setdefault("sklearn", types.ModuleType("sklearn"))
    sys.modules.setdefault("sklearn.cluster", cluster)
    torch.cuda.Event = _NoEvent  # CPU run: the release's CUDA timing becomes a no-op
    torch.cuda.synchronize = lambda *args, **kwargs: None
    from llava.model.language_model.llava_llama_transprune import LlavaLlamaForCausalLM_TransPrune

    out = {}
    for variant in VARIANTS:
        saved = torch.load(work / f"{variant}.pt")
        base, _, _ = _tiny(work)
        model = LlavaLlamaForCausalLM_TransPrune(base.config)
        tower = model.get_vision_tower()
        if not tower.is_loaded:
            tower.load_model()
        model.load_state_dict(saved["state"], strict=True)
        model.eval()
        lm = model.model
        for keep in BUDGETS:
            for mode in MODES:
                lm.accmulating_layer_list = list(ACCUMULATING)  # as llava/eval/model_vqa_loader.py sets them
                lm.pruning_layer_list = list(PRUNING)
                lm.image_token_ratio_list = [1.0, *RATIOS, last_ratio(keep)]
                kept, logits = _release_forward(model, saved["input_ids"], saved["images"], mode == "positions kept")
                out[f"{variant}/{keep}/{mode}"] = {"kept": kept, "logits": logits}
    (work / "release.json").write_text(json.dumps(out))


def _release_forward(model, ids, images, keep_positions: bool) -> tuple[list[list[int]], list[float]]:
    """One prefill through the release; per stage the image tokens (indices among the 576) it keeps."""
    import torch

    lm = model.model
    plain = lm.transprune_rank_drop
    origin = {}  # "rows": for each current row of the sequence its original position
    kept: list[list[int]] = []

    def recorded(cur_num, rank_layer, features, position_ids, attention_mask, labels):
        new_pos, new_mask, new_features, new_labels = plain(
            cur_num=cur_num, rank_layer=rank_layer, features=features, position_ids=position_ids,
            attention_mask=attention_mask, labels=labels)
        before, after = features[0], new_features[0]
        if "rows" not in origin:
            origin["rows"] = torch.arange(before.shape[0])
        same = (after[:, None, :] == before[None, :, :]).all(dim=-1)  # [N_after, N_before]
        if not bool((same.sum(dim=1) == 1).all()):
            raise SystemExit("transprune parity: a row returned by transprune_rank_drop matches no single input row")
        rows = same.float().argmax(dim=1)
        origin["rows"] = origin["rows"][rows]
        start = lm.image_token_posi[0]
        image = origin["rows"][(origin["rows"] >= start) & (origin["rows"] < start + TOKENS)] - start
        kept.append(sorted(image.tolist()))
        if keep_positions:  # the kept rows' own positions (vtprune's documented deviation) instead of 0..N'-1
            new_pos = position_ids[:, rows]
        return new_pos, new_mask, new_features, new_labels

    ropes = [layer.self_attn.rotary_emb for layer in lm.layers]
    full = ids.shape[1] - 1 + TOKENS  # the spliced sequence's length: every original position has a table row

    def uncut(plain_rope):
        def forward(x, seq_len=None):
            return plain_rope(x, seq_len=max(full, seq_len or 0))
        return forward

    lm.transprune_rank_drop = recorded
    if keep_positions:
        for rope in ropes:
            rope.forward = uncut(rope.forward)
    try:
        with torch.no_grad():
            logits = model(input_ids=ids, images=images, return_dict=True).logits[0, -1]
    finally:
        del lm.transprune_rank_drop
        for rope in ropes:
            vars(rope).pop("forward", None)
    return kept, logits.tolist()


# --- the check ---------------------------------------------------------------------------------------------

def compare(ref: Path) -> list[dict]:
    python = llava_python()
    with tempfile.TemporaryDirectory(prefix="parity-transprune-") as tmp:
        work = Path(tmp)
        here = str(Path(__file__).resolve())
        for side, path in (("vtprune", [ROOT]), ("release", [Path(ref).resolve(), ROOT])):
            env = {**os.environ, "PYTHONPATH": os.pathsep.join(str(p) for p in path)}
            done = subprocess.run([python, here, "--worker", side, str(work)], env=env, capture_output=True,
                                  text=True, timeout=600)
            if done.returncode:
                raise SystemExit(f"{METHOD} parity: the {side} side failed:\n{done.stdout}\n{done.stderr}")
        ours = json.loads((work / "vtprune.json").read_text())
        theirs = json.loads((work / "release.json").read_text())
    rows = []
    for variant in VARIANTS:
        for keep in BUDGETS:
            mine = ours[f"{variant}/{keep}"]
            ratios = [*RATIOS, last_ratio(keep)]
            for mode in MODES:
                rel = theirs[f"{variant}/{keep}/{mode}"]
                diff = max(abs(a - b) for a, b in zip(mine["logits"], rel["logits"]))
                stages = range(len(PRUNING)) if mode == "positions kept" else range(1)
                for s in stages:
                    a, b = mine["kept"][s], rel["kept"][s]
                    last = s == len(PRUNING) - 1
                    row = {"method": METHOD, "model": MODEL,
                           "variant": f"{variant}, keep {keep}, stage {s + 1} (after layer {PRUNING[s] - 1}), {mode}",
                           "budget": len(b), "jaccard": jaccard(a, b), "kept_equal": a == b,
                           "logit_max_abs": diff if last else None,
                           "note": f"accmulating_layer_list {ACCUMULATING}, pruning_layer_list {PRUNING}, "
                                   f"image_token_ratio_list {ratios}; vtprune keep={keep} (default layers and "
                                   f"ratios); vtprune stage layers {mine['layers']}"}
                    if mode == "as released":
                        later = [round(jaccard(x, y), 3) for x, y in zip(mine["kept"], rel["kept"])]
                        row["note"] += (f"; not asserted (re-indexed positions): Jaccard per stage {later}, "
                                        f"max |logit diff| {diff:.2e}")
                    rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    ref, args = reference_path(METHOD, argv, __doc__)
    if ref is None:
        return 0
    rows = compare(ref)
    write_rows(METHOD, rows, ref, args, f"python benchmarks/parity/{METHOD}.py --ref {ref}")
    return 0 if all(r["kept_equal"] for r in rows) else 1


if __name__ == "__main__":
    if sys.argv[1:2] == ["--worker"]:
        side, work = sys.argv[2], Path(sys.argv[3])
        (_vtprune_side if side == "vtprune" else _release_side)(work)
        sys.exit(0)
    sys.exit(main())
