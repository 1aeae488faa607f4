"""Parity of vtprune's ``flowcut`` with FlowCut's own package, ``flowcut==1.0.2`` on PyPI (github.com/TungChintao/FlowCut).

The reference is the installed package, not a checkout: ``flowcut.flowcut(model, target_num=K)``
(``flowcut/main.py``) patches, at class level and irreversibly, transformers 4.37's ``CLIPAttention``,
``CLIPEncoderLayer``, ``CLIPEncoder`` and ``CLIPVisionTransformer`` (``flowcut/modeling_clip_flowcut.py``: the
per-layer score ``compute_score``, the entropy-adaptive count ``adaptive_prune_ratio``, the cumulative score,
patches dropped from the sequence), the LLaVA repository's ``CLIPVisionTower.forward`` (``clip_encoder.py``,
which also returns the kept patch indices) and ``LlavaMetaForCausalLM.prepare_inputs_labels_for_multimodal``
(``llava_arch.py``). On LLaVA-1.5 (``image_aspect_ratio="pad"``) the LLM is left alone. So it runs in the
transformers 4.37 environment of ``scripts/setup_llava_repo.sh`` (``.venv-llava``, or the interpreter in
``$VTPRUNE_LLAVA_PYTHON``), which installs the package, each side in its own process:

- vtprune: the tiny ``llava_llama`` model of ``vtprune.toy.tiny_llava_repo`` with LLaVA-1.5's vision geometry
  (a 24-layer CLIP tower, width 32, 336 px, patch 14: 576 patches, ``mm_vision_select_layer -2``; a 4-layer
  LLM of width 64), the repository's own ``llava`` package, ``vtprune.apply(model, "flowcut", keep=K)``;
- the package: the same weights (the state dict, ``peaked`` variant included) in a fresh model of the same
  config, ``flowcut.flowcut(model, target_num=K)``, a forward hook on the tower's ``CLIPVisionModel`` recording
  the kept patch indices it returns and its hidden states (the patches entering each layer).

Compared, for budgets 64, 128 and 192 of 576 (the paper's LLaVA-1.5 settings) on three variants: ``random``,
``peaked`` (`common.peaked`, the tower's query projections x 8) and ``peaked x64``. On the first two the tiny
tower's CLS attention is so flat (entropy ratio near 1) that the adaptive count rounds to 0 at every stage
before the last, which alone prunes (576 -> K after layer 21); x 64 makes it sharp enough for the
entropy-adaptive schedule to prune at every even-distance layer (576 -> 565 -> 555 -> ... -> 417 -> 64), so
the cumulative score and the count rule are exercised too. Compared: the kept patches (Jaccard, exact
order), the schedule (patches entering every vision layer: on vtprune's side the columns its key mask leaves
open), the LLM's ``inputs_embeds`` (``feature_max_abs``: the whole spliced sequence, text and the kept
patches' projected features) and the first-token logits. The prompt
is LLaVA-1.5's ``vicuna_v1`` conversation with one image, batch 1 (the package schedules a batch by its
maximum prune count, vtprune each image on its own: the same for one image).

    python benchmarks/parity/flowcut.py --ref      # the package installed in .venv-llava is the reference

``--ref`` needs no value (one given is ignored); ``VTPRUNE_PARITY_FLOWCUT`` set to anything
does the same. Without either, or where ``import flowcut`` fails in ``.venv-llava``, it prints why it skipped
and exits 0. ``tests/test_flowcut_package.py`` (marked ``transformers4``) runs the comparison in ``.venv-llava``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import llava_repo_worker as worker  # noqa: E402
from common import RESULTS, env_name, jaccard, write_rows  # noqa: E402

ROOT = worker.ROOT
METHOD = "flowcut"
ENV = env_name(METHOD)
LOGIT_TOLERANCE = 1e-4
FEATURE_TOLERANCE = 1e-4
PACKAGE = "flowcut==1.0.2"
VISION_LAYERS, VISION_HIDDEN, PATCHES = 24, 32, 576
MODEL = (f"tiny llava_llama (CLIP tower {VISION_LAYERS} layers, width {VISION_HIDDEN}, {PATCHES} patches; "
         "LLM 4 layers, width 64)")
TINY = dict(vision_layers=VISION_LAYERS, vision_hidden=VISION_HIDDEN)  # tiny_llava_repo's options
VARIANTS = {"random": None, "peaked": 8.0, "peaked x64": 64.0}  # name: `peaked`'s factor on the tower's q_proj
BUDGETS = (64, 128, 192)


def package_location(python: Path | None = None) -> Path | None:
    """The folder of the ``flowcut`` package ``python`` imports, or None (no interpreter, or no package)."""
    python = python or worker.llava_python()
    if not python.exists():
        return None
    done = subprocess.run([str(python), "-c", "import flowcut, os; print(os.path.dirname(flowcut.__file__))"],
                          capture_output=True, text=True, timeout=120, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    return Path(done.stdout.strip()) if done.returncode == 0 and done.stdout.strip() else None


# --- workers (run by compare() in the transformers 4.37 environment) -------------------------------------

def _file(variant: str) -> str:
    return variant.replace(" ", "-")


def _inputs_recorder(model, out: dict):
    """Record the ``inputs_embeds`` the LLM (``model.model``) receives; returns the hook handle."""
    def hook(module, args, kwargs):
        out["embeds"] = kwargs["inputs_embeds"].detach().clone()
    return model.get_model().register_forward_pre_hook(hook, with_kwargs=True)


def _vtprune_side(work: Path) -> None:
    """Build the inputs and both variants' weights, run vtprune's ``flowcut``; writes ``vtprune.json`` and
    ``<variant>.pt`` (state dict, input ids, pixels) for the package's side."""
    import torch

    import vtprune

    out = {}
    for variant in VARIANTS:
        model, ids, images = worker.prepared_variant(work, _file(variant), VARIANTS[variant], **TINY)
        clip = model.get_vision_tower().vision_tower.vision_model
        for k in BUDGETS:
            vtprune.apply(model, METHOD, keep=k)
            entering: list[int] = []

            def count(module, args, kwargs, entering=entering):  # runs after vtprune's hook: its mask
                mask = kwargs.get("attention_mask")
                n = args[0].shape[1] if args else kwargs["hidden_states"].shape[1]
                entering.append(n - 1 if mask is None else int((mask[0, 0, 0] == 0).sum()) - 1)

            handles = [layer.self_attn.register_forward_pre_hook(count, with_kwargs=True)
                       for layer in clip.encoder.layers]
            seen: dict = {}
            handles.append(_inputs_recorder(model, seen))
            try:
                with torch.no_grad():
                    logits = model(input_ids=ids, images=images, return_dict=True).logits[0, -1]
            finally:
                for h in handles:
                    h.remove()
            st = vtprune.stats(model)
            vtprune.remove(model)
            torch.save(seen["embeds"], work / f"vtprune-{_file(variant)}-{k}.embeds.pt")
            out[f"{variant}/{k}"] = {"kept": st.kept[0].tolist(), "schedule": entering, "logits": logits.tolist()}
    (work / "vtprune.json").write_text(json.dumps(out))


def _package_side(work: Path) -> None:
    """The package's ``flowcut(model, target_num=K)`` on the same weights and inputs; writes ``package.json``."""
    import torch

    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]  # this file is named flowcut.py too
    from flowcut import flowcut

    out = {}
    for variant in VARIANTS:
        saved = torch.load(work / f"{_file(variant)}.pt")
        model, _, _ = worker.tiny_model(work, **TINY)
        model.load_state_dict(saved["state"], strict=True)
        model.eval()
        clip = model.get_vision_tower().vision_tower  # transformers' CLIPVisionModel
        for k in BUDGETS:
            flowcut(model, target_num=k)  # class-level patches (idempotent); the target is set per call
            record: dict = {}

            def tower_output(module, args, kwargs, output, record=record):
                outputs, keep = output  # the package's CLIPVisionTransformer returns (outputs, kept indices)
                record["keep"] = keep[0].tolist()
                record["schedule"] = [h.shape[1] - 1 for h in outputs.hidden_states[:-1]]  # entering layer i

            handles = [clip.register_forward_hook(tower_output, with_kwargs=True), _inputs_recorder(model, record)]
            try:
                with torch.no_grad():
                    logits = model(input_ids=saved["input_ids"], images=saved["images"], return_dict=True).logits[0, -1]
            finally:
                for h in handles:
                    h.remove()
            torch.save(record["embeds"], work / f"package-{_file(variant)}-{k}.embeds.pt")
            out[f"{variant}/{k}"] = {"kept": record["keep"], "schedule": record["schedule"],
                                     "logits": logits.tolist()}
    (work / "package.json").write_text(json.dumps(out))


# --- the check ---------------------------------------------------------------------------------------------

def compare(ref: Path | None = None, python: Path | None = None) -> list[dict]:
    """Rows per (variant, budget). ``ref`` is not read (the reference is the installed package); ``python``:
    the transformers 4.37 interpreter with ``flowcut`` installed (default: `llava_repo_worker.llava_python`)."""
    import torch

    python = python or worker.llava_python()
    if package_location(python) is None:
        raise SystemExit(f"{METHOD} parity: {python} cannot import flowcut: create it with "
                         f"`bash scripts/setup_llava_repo.sh` (it installs {PACKAGE}) or set VTPRUNE_LLAVA_PYTHON")
    with tempfile.TemporaryDirectory(prefix="parity-flowcut-") as tmp:
        work = Path(tmp)
        here = str(Path(__file__).resolve())
        env = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
        for side in ("vtprune", "package"):  # separate processes: the package patches classes for good
            worker.run_worker(METHOD, here, [side, work], [ROOT], f"the {side} side", python=python, env=env,
                              cwd=ROOT)
        ours = json.loads((work / "vtprune.json").read_text())
        theirs = json.loads((work / "package.json").read_text())
        features = {}
        for key in ours:
            variant, k = key.split("/")
            a = torch.load(work / f"vtprune-{_file(variant)}-{k}.embeds.pt")
            b = torch.load(work / f"package-{_file(variant)}-{k}.embeds.pt")
            features[key] = float((a - b).abs().max()) if a.shape == b.shape else float("inf")
    rows = []
    for variant in VARIANTS:
        for k in BUDGETS:
            mine, pkg = ours[f"{variant}/{k}"], theirs[f"{variant}/{k}"]
            stages = [n for i, n in enumerate(pkg["schedule"]) if i == 0 or n != pkg["schedule"][i - 1]]
            rows.append({
                "method": METHOD, "model": MODEL, "variant": variant, "budget": k,
                "jaccard": jaccard(mine["kept"], pkg["kept"]), "kept_equal": mine["kept"] == pkg["kept"],
                "logit_max_abs": max(abs(x - y) for x, y in zip(mine["logits"], pkg["logits"])),
                "feature_max_abs": features[f"{variant}/{k}"],
                "schedule_equal": mine["schedule"] == pkg["schedule"], "stages": stages,
                "note": f"{PACKAGE} flowcut(model, target_num={k}) against vtprune keep={k}; patches entering "
                        f"the vision layers (distinct counts, the package's): {stages}",
            })
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ref", nargs="?", const=PACKAGE, default=os.environ.get(ENV),
                    help=f"run the comparison; the reference is the installed {PACKAGE} (a value is ignored; "
                         f"or set ${ENV})")
    ap.add_argument("--out", default=str(RESULTS), help="folder of the JSON rows")
    args = ap.parse_args(argv)
    if not args.ref:
        print(f"{METHOD}: skipped: not asked to run (--ref, or {ENV}=1; the reference is the installed {PACKAGE})")
        return 0
    location = package_location()
    if location is None:
        print(f"{METHOD}: skipped: {worker.llava_python()} cannot import flowcut (bash scripts/setup_llava_repo.sh "
              f"installs {PACKAGE})")
        return 0
    rows = compare(None)
    target = write_rows(METHOD, rows, location, args, f"python benchmarks/parity/{METHOD}.py --ref")
    written = json.loads(target.read_text())
    where = location.relative_to(ROOT) if location.is_relative_to(ROOT) else location
    written["reference"] = f"{PACKAGE} (PyPI), installed at {where}"
    written["reference_commit"] = None  # a wheel has none (git would name the repository holding .venv-llava)
    target.write_text(json.dumps(written, indent=1))
    for r in rows:
        print(f"  {r['variant']} {r['budget']}: features max |diff| {r['feature_max_abs']:.2e}, "
              f"schedule equal {r['schedule_equal']}")
    return 0 if all(r["kept_equal"] for r in rows) else 1


if __name__ == "__main__":
    worker.worker_entry({"vtprune": _vtprune_side, "package": _package_side})
    sys.exit(main())
