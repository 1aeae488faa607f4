"""Shared plumbing of the parity checks that run in the transformers 4.37 environment (``.venv-llava``).

Those checks (``dart``, ``fastv``, ``flowcut``, ``pyramiddrop``, ``sparsevlm``) compare vtprune with a release
that runs only inside its LLaVA fork, on the tiny ``llava_llama`` model of ``vtprune.toy.tiny_llava_repo``:
the check script re-runs itself as a worker (``<script> --worker SIDE PATH...``) in ``.venv-llava``, one
process per side where a side patches classes or needs the release's ``llava`` package first on
``sys.path``; the vtprune side saves each variant's weights and inputs for the release's side, and each side
writes its results as JSON into a temporary folder that the check then reads.

Only the standard library is imported here at module level: the workers import this file too.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
QUESTION = "<image>\nWhat is the colour of the large shape? Answer the question using a single word or phrase."


def llava_python() -> Path:
    """The interpreter of the transformers 4.37 environment (``$VTPRUNE_LLAVA_PYTHON`` or ``.venv-llava``); it
    may not exist."""
    return Path(os.environ.get("VTPRUNE_LLAVA_PYTHON") or ROOT / ".venv-llava" / "bin" / "python")


def require_llava_python(method: str) -> str:
    """`llava_python` as a string; raises SystemExit naming the fix (``scripts/setup_llava_repo.sh``) where it
    does not exist."""
    python = llava_python()
    if not python.exists():
        raise SystemExit(f"{method}: the release runs on transformers 4.37: create {python} with "
                         "`bash scripts/setup_llava_repo.sh` (or set VTPRUNE_LLAVA_PYTHON)")
    return str(python)


def vicuna_inputs(tokenizer: Any, image_processor: Any, config: Any, question: str = QUESTION) -> tuple[Any, Any]:
    """The release's evaluation input for one sample, built with the LLaVA repository's own functions (call it
    in a worker): ``input_ids`` ``[1, L]`` of LLaVA-1.5's ``vicuna_v1`` conversation with ``question`` (its
    ``<image>`` placeholder as ``IMAGE_TOKEN_INDEX``) and ``images`` ``[1, 3, H, W]``, a 320 x 400 noise image
    (``numpy.random.default_rng(7)``) through ``process_images``."""
    import numpy as np
    from llava.conversation import conv_templates
    from llava.mm_utils import process_images, tokenizer_image_token
    from PIL import Image

    from vtprune.toy.tiny_llava_repo import IMAGE_TOKEN_INDEX

    conv = conv_templates["vicuna_v1"].copy()
    conv.append_message(conv.roles[0], question)
    conv.append_message(conv.roles[1], None)
    ids = tokenizer_image_token(conv.get_prompt(), tokenizer, IMAGE_TOKEN_INDEX, return_tensors="pt")[None]
    picture = Image.fromarray((np.random.default_rng(7).random((320, 400, 3)) * 255).astype("uint8"))
    return ids, process_images([picture], image_processor, config)


def save_variant(path: Path, model: Any, input_ids: Any, images: Any) -> None:
    """Save ``model``'s state dict and the inputs to ``path`` (``{"state", "input_ids", "images"}``): what the
    release's side loads into its own model class."""
    import torch

    torch.save({"state": model.state_dict(), "input_ids": input_ids, "images": images}, path)


def run_worker(method: str, script: str | Path, args: Sequence[str | Path], pythonpath: Sequence[str | Path],
               what: str, *, python: str | Path | None = None, env: dict[str, str] | None = None,
               cwd: str | Path | None = None) -> None:
    """Run ``python script --worker *args`` (default interpreter: `require_llava_python`) with ``PYTHONPATH``
    ``pythonpath`` (first wins) plus ``env`` on top of this environment; raises SystemExit with its output
    where it fails (``what`` names it in the message, e.g. "the release side")."""
    python = str(python or require_llava_python(method))
    full = {**os.environ, "PYTHONPATH": os.pathsep.join(str(p) for p in pythonpath), **(env or {})}
    done = subprocess.run([python, str(script), "--worker", *(str(a) for a in args)], env=full, cwd=cwd,
                          capture_output=True, text=True, timeout=600)
    if done.returncode:
        raise SystemExit(f"{method} parity: {what} failed:\n{done.stdout}\n{done.stderr}")


def run_two_sides(method: str, script: str | Path, ref: Path,
                  files: dict[str, str] | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """The usual two workers in a temporary folder WORK: ``script --worker vtprune WORK`` (``PYTHONPATH`` the
    repository) then ``script --worker release WORK`` (the checkout ``ref`` first, so that its ``llava``
    package is imported); returns the JSON each wrote, ``(WORK/vtprune.json, WORK/release.json)``. ``files``:
    name -> text written into WORK first (settings both workers read)."""
    with tempfile.TemporaryDirectory(prefix=f"parity-{method}-") as tmp:
        work = Path(tmp)
        for name, text in (files or {}).items():
            (work / name).write_text(text)
        for side, path in (("vtprune", [ROOT]), ("release", [Path(ref).resolve(), ROOT])):
            run_worker(method, Path(script).resolve(), [side, work], path, f"the {side} side")
        return json.loads((work / "vtprune.json").read_text()), json.loads((work / "release.json").read_text())


def worker_entry(sides: dict[str, Callable[..., None]]) -> None:
    """In a check's ``__main__``: where the command line is ``--worker SIDE PATH...``, run ``sides[SIDE]`` on
    the paths (as ``Path``) and exit 0; otherwise return (the check's ``main`` runs)."""
    if sys.argv[1:2] == ["--worker"]:
        side, *paths = sys.argv[2:]
        sides[side](*(Path(p) for p in paths))
        sys.exit(0)


def tiny_model(work: Path, **tiny: Any) -> tuple[Any, Any, Any]:
    """In a worker: ``tiny_llava_repo(work / "towers", seed=0, **tiny)``, the tiny ``llava_llama`` model (the
    LLaVA repository's classes, or the release's where its ``llava`` package comes first on ``sys.path``),
    its tokenizer and image processor; the same weights on every call with the same ``tiny``."""
    from vtprune.toy.tiny_llava_repo import tiny_llava_repo

    return tiny_llava_repo(work / "towers", seed=0, **tiny)


def prepared_variant(work: Path, name: str, factor: float | None, save: bool = True,
                     **tiny: Any) -> tuple[Any, Any, Any]:
    """In a worker: `tiny_model` ``(work, **tiny)`` made `peaked` by ``factor`` unless None, and its
    `vicuna_inputs`; with ``save``, `save_variant` to ``work / f"{name}.pt"``. Returns ``(model, input_ids
    [1, L], images [1, 3, H, W])``."""
    from common import peaked

    model, tokenizer, image_processor = tiny_model(work, **tiny)
    if factor is not None:
        peaked(model, factor)
    ids, images = vicuna_inputs(tokenizer, image_processor, model.config)
    if save:
        save_variant(work / f"{name}.pt", model, ids, images)
    return model, ids, images


def vtprune_prefill(model: Any, input_ids: Any, images: Any, method: str, **options: Any) -> tuple[Any, Any]:
    """vtprune's ``method`` (``vtprune.apply(model, method, **options)``, removed afterwards) on one prefill of
    the LLaVA repository's model: the first-token logits ``[V]`` and ``vtprune.stats(model)``."""
    import torch

    import vtprune

    vtprune.apply(model, method, **options)
    try:
        with torch.no_grad():
            logits = model(input_ids=input_ids, images=images, return_dict=True).logits[0, -1]
        return logits, vtprune.stats(model)
    finally:
        vtprune.remove(model)


def release_model(cls: Any, config: Any, state: dict[str, Any]) -> Any:
    """In a worker: the release's model class ``cls`` built on ``config`` (the tiny model's), its vision tower
    loaded, the weights ``state`` (`save_variant`'s ``"state"``) loaded strictly; in eval mode."""
    model = cls(config)
    tower = model.get_vision_tower()
    if not tower.is_loaded:
        tower.load_model()
    model.load_state_dict(state, strict=True)
    return model.eval()


def rank_drop_forward(model: Any, ids: Any, images: Any, keep_positions: bool, drop: str,
                      tokens: int) -> tuple[list[list[int]], list[float]]:
    """In a release worker: one prefill through a release whose LLM drops tokens in its method ``drop``
    (``pdrop_rank_drop``, ``transprune_rank_drop``: ``(cur_num, rank_layer, features, position_ids,
    attention_mask, labels) -> (position_ids, attention_mask, features, labels)``), wrapped to record, per
    stage, the image tokens (indices among the image's ``tokens``) it keeps. ``keep_positions``: the next
    layers get the kept rows' original positions (vtprune's documented deviation) and the rotary tables are
    not cut at the shortened length. Returns ``(kept per stage, first-token logits)``."""
    import torch

    lm = model.model
    plain = getattr(lm, drop)
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
            raise SystemExit(f"parity: a row returned by {drop} matches no single input row")
        rows = same.float().argmax(dim=1)
        origin["rows"] = origin["rows"][rows]
        start = lm.image_token_posi[0]
        image = origin["rows"][(origin["rows"] >= start) & (origin["rows"] < start + tokens)] - start
        kept.append(sorted(image.tolist()))
        if keep_positions:  # the kept rows' own positions (vtprune's documented deviation) instead of 0..N'-1
            new_pos = position_ids[:, rows]
        return new_pos, new_mask, new_features, new_labels

    ropes = [layer.self_attn.rotary_emb for layer in lm.layers]
    full = ids.shape[1] - 1 + tokens  # the spliced sequence's length: every original position has a table row

    def uncut(plain_rope):
        def forward(x, seq_len=None):
            return plain_rope(x, seq_len=max(full, seq_len or 0))
        return forward

    setattr(lm, drop, recorded)
    if keep_positions:
        for rope in ropes:
            rope.forward = uncut(rope.forward)
    try:
        with torch.no_grad():
            logits = model(input_ids=ids, images=images, return_dict=True).logits[0, -1]
    finally:
        delattr(lm, drop)
        for rope in ropes:
            vars(rope).pop("forward", None)
    return kept, logits.tolist()


def staged_rows(method: str, model: str, label: str, mine: dict[str, Any], rel: dict[str, Any],
                layer_list: Sequence[int], mode: str, note: str) -> list[dict[str, Any]]:
    """The rows of one staged comparison (`rank_drop_forward`'s release against vtprune's stages): ``mine`` /
    ``rel`` hold ``kept`` (per stage) and ``logits``; the release's ``layer_list`` names the layers that see
    the fewer tokens. ``mode`` ``"positions kept"``: every stage, the logits with the last; ``"as released"``:
    the first stage (the release re-indexes positions, so its later stages and logits go into the note).
    The variant column is ``"<label>, stage s (after layer l), <mode>"``."""
    from common import jaccard

    diff = max(abs(a - b) for a, b in zip(mine["logits"], rel["logits"]))
    rows = []
    for s in range(len(layer_list)) if mode == "positions kept" else range(1):
        a, b = mine["kept"][s], rel["kept"][s]
        row = {"method": method, "model": model,
               "variant": f"{label}, stage {s + 1} (after layer {layer_list[s] - 1}), {mode}",
               "budget": len(b), "jaccard": jaccard(a, b), "kept_equal": a == b,
               "logit_max_abs": diff if s == len(layer_list) - 1 else None,
               "note": f"{note}; vtprune stage layers {mine['layers']}"}
        if mode == "as released":
            later = [round(jaccard(x, y), 3) for x, y in zip(mine["kept"], rel["kept"])]
            row["note"] += f"; not asserted (re-indexed positions): Jaccard per stage {later}, max |logit diff| {diff:.2e}"
        rows.append(row)
    return rows
