"""Shared plumbing of the parity checks: vtprune against a method's own released code.

Each ``benchmarks/parity/<method>.py`` compares, on the same tiny model (random weights, and a variant with
peaked vision attention so that scores are well separated), the visual tokens vtprune keeps with those the
release keeps, and (where the release's output reaches the LLM) the first-token logits. The release is
never copied here: the check takes the path of a checkout the user fetched (``--ref PATH`` or the
environment variable ``VTPRUNE_PARITY_<METHOD>``) and imports the release's own functions from it; without
a path it prints why it skipped and exits 0.

    python benchmarks/parity/<method>.py --ref /path/to/checkout      # prints rows, writes the JSON
    python benchmarks/parity/report.py                                # benchmarks/results/parity.md

A check module defines ``ENV = env_name(method)``, ``LOGIT_TOLERANCE``, ``compare(ref: Path) -> rows`` and
``main(argv) -> int`` (`reference_path`, then `write_rows`); ``tests/test_parity.py`` runs every check whose
variable is set and asserts Jaccard 1 and logits within the tolerance.

Rows: ``{"method", "model", "variant", "budget", "jaccard", "kept_equal", "logit_max_abs"}``, one per
(model, variant, budget), written to ``benchmarks/results/parity/<method>.json`` with the command and the
reference's commit.

Besides `reference_path` / `write_rows` (and `run_check`, a check's whole ``main``), the pieces the checks
share live here: importing a release's files (`load_file`, `fake_modules`, `load_llava_arch`,
`release_llava_package`, `release_arch_and_clip`, `release_clip_tower`, `release_next_self`, `release_next_prepare`), the tiny LLaVA-1.5 and NeXT inputs
(`tiny_llava_inputs`, `tiny_next_inputs`) and the language model run on a
release's visual rows (`lm_input_kwargs`, `lm_input_embeds`, `logits_on_visual_rows`, `logits_without_unkept`,
`traced_vtprune_run`). The checks whose release runs in the transformers 4.37 environment share
``benchmarks/parity/llava_repo_worker.py`` (the worker processes, the ``vicuna_v1`` inputs).
"""

from __future__ import annotations

import argparse
import ast
import importlib.util
import json
import os
import subprocess
import sys
import types
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parents[1] / "results" / "parity"


class StandIn:
    """``target`` as a release's code sees it (its ``self``): calling it runs ``fn(self, ...)``; the attributes
    given replace the target's, every other attribute is the target's, and attributes the release sets land
    on the stand-in, never on the tiny model."""

    def __init__(self, target: Any, fn: Any = None, **attrs: Any) -> None:
        self.__dict__.update(attrs, _target=target, _fn=fn)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.__dict__["_target"], name)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._fn(self, *args, **kwargs)


def strip_annotations(node: ast.AST) -> ast.AST:
    """``node`` (a function or class) with every decorator and annotation inside it removed, bodies unchanged:
    they name the release's transformers' docstring helpers and types, which transformers 5 lacks."""
    for n in ast.walk(node):
        if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)):
            n.decorator_list = []
            n.returns = None
            a = n.args
            for arg in [*a.posonlyargs, *a.args, *a.kwonlyargs, a.vararg, a.kwarg]:
                if arg is not None:
                    arg.annotation = None
    return node


def release_functions(path: Path, wanted: Iterable[Any], namespace: dict[str, Any], *, strip: bool = False,
                      hint: str = "") -> dict[Any, Any]:
    """The functions ``wanted`` of the Python file ``path``, compiled from its source (``ast``) and executed in
    ``namespace`` (the module globals they see: the release's imports, or stand-ins for them): a name for a
    module-level function (left in ``namespace`` under it, so the others can call it), ``(class, name)`` for
    a method (its function, not bound). ``strip``: `strip_annotations` first. Exits naming what is missing
    (``hint``: what ``--ref`` should be)."""
    path = Path(path)
    tree = ast.parse(path.read_text(), filename=str(path))
    found: dict[Any, ast.FunctionDef] = {}
    for node in tree.body:
        if isinstance(node, ast.FunctionDef):
            found[node.name] = node
        elif isinstance(node, ast.ClassDef):
            for item in node.body:
                if isinstance(item, ast.FunctionDef):
                    found.setdefault((node.name, item.name), item)
    wanted = list(wanted)
    missing = [k for k in wanted if k not in found]
    if missing:
        raise SystemExit(f"{path}: functions not found: {missing}{'; ' + hint if hint else ''}")
    out: dict[Any, Any] = {}
    for key in wanted:
        node = strip_annotations(found[key]) if strip else found[key]
        if not isinstance(key, str):
            node.name = f"{key[0]}__{key[1]}"  # a method: under its class's name, not as a module global
        exec(compile(ast.fix_missing_locations(ast.Module(body=[node], type_ignores=[])), str(path), "exec"),
             namespace)  # noqa: S102
        out[key] = namespace[node.name] if isinstance(key, str) else namespace.pop(node.name)
    return out


def env_name(method: str) -> str:
    """``VTPRUNE_PARITY_<METHOD>``: the environment variable holding the path of ``method``'s checkout."""
    return f"VTPRUNE_PARITY_{method.upper().replace('+', 'PLUS').replace('-', '_')}"


def reference_path(method: str, argv: list[str] | None = None, doc: str = "") -> tuple[Path | None, argparse.Namespace]:
    """The checkout given by ``--ref`` or ``VTPRUNE_PARITY_<METHOD>`` (None: skip), and the parsed args
    (``--ref``, ``--out``)."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    env = env_name(method)
    ap.add_argument("--ref", default=os.environ.get(env), help=f"path of the release's checkout (or ${env})")
    ap.add_argument("--out", default=str(RESULTS), help="folder of the JSON rows")
    args = ap.parse_args(argv)
    if not args.ref:
        print(f"{method}: skipped: no reference checkout given (--ref PATH or {env}=PATH)")
        return None, args
    path = Path(args.ref).expanduser()
    if not path.is_dir():
        ap.error(f"--ref {path} is not a folder: give the path of a checkout of {method}'s release")
    return path, args


def load_file(path: Path, name: str, stubs: Iterable[str] = ()) -> types.ModuleType:
    """Import the single file ``path`` of a release as module ``name``; ``stubs``: module names its imports
    need that are irrelevant to the functions compared (replaced by empty modules, restored afterwards)."""
    with fake_modules({stub: {} for stub in stubs}):
        spec = importlib.util.spec_from_file_location(name, path)
        if spec is None or spec.loader is None:
            raise SystemExit(f"cannot import {path}: not a Python file")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module


def jaccard(a: Iterable[int], b: Iterable[int]) -> float:
    a, b = set(int(x) for x in a), set(int(x) for x in b)
    return len(a & b) / len(a | b) if a | b else 1.0


def commit_of(path: Path) -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(path), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None


def write_rows(method: str, rows: list[dict[str, Any]], ref: Path, args: argparse.Namespace, command: str) -> Path:
    """Print ``rows`` and write them with the command and the reference commit to ``OUT/<method>.json``."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for r in rows:
        logit = r.get("logit_max_abs")
        print(f"{method} {r['model']} {r['variant']} budget {r['budget']}: jaccard {r['jaccard']:.3f}"
              + (f", max |logit diff| {logit:.2e}" if logit is not None else ""))
    target = out / f"{method.replace('+', 'plus')}.json"
    target.write_text(json.dumps({"method": method, "command": command, "reference": str(ref.name),
                                  "reference_commit": commit_of(ref), "rows": rows}, indent=1))
    return target


def peaked(model: Any, factor: float = 8.0) -> Any:
    """The ``peaked`` variant: every vision-tower attention's query projection scaled by ``factor`` (in place),
    so that softmax attention concentrates on few keys and the methods' scores are well separated (ties
    between near-equal scores would otherwise decide parity)."""
    import torch

    with torch.no_grad():
        for name, module in model.named_modules():
            if ("vision" in name or "visual" in name) and name.endswith(("q_proj", "attn.qkv")):
                if name.endswith("attn.qkv"):  # Qwen-VL: fused qkv, the first third is q
                    third = module.weight.shape[0] // 3
                    module.weight[:third] *= factor
                    if module.bias is not None:
                        module.bias[:third] *= factor
                else:
                    module.weight.mul_(factor)
                    if module.bias is not None:
                        module.bias.mul_(factor)
    return model


def script_name(method: str) -> str:
    """The check's file name: ``<method>.py`` with ``+`` spelt ``plus`` and ``-`` spelt ``_``
    (``prumerge+`` -> ``prumergeplus.py``, ``holov-qwen`` -> ``holov_qwen.py``)."""
    return method.replace("+", "plus").replace("-", "_") + ".py"


def run_check(method: str, compare: Callable[[Path], list[dict[str, Any]]], argv: list[str] | None = None,
              doc: str = "", *, passed: Callable[[dict[str, Any]], bool] | None = None,
              summary: Callable[[list[dict[str, Any]]], None] | None = None) -> int:
    """A check's ``main``: `reference_path` (None: it printed "skipped", returns 0), ``rows = compare(ref)``,
    `write_rows` with the command ``python benchmarks/parity/<script_name(method)> --ref REF``,
    then ``summary(rows)`` (extra printed lines) where given. Returns the exit code: 0 where ``passed(row)``
    (default: ``row["kept_equal"]``) holds for every row, else 1."""
    ref, args = reference_path(method, argv, doc)
    if ref is None:
        return 0
    rows = compare(ref)
    write_rows(method, rows, ref, args, f"python benchmarks/parity/{script_name(method)} --ref {ref}")
    if summary is not None:
        summary(rows)
    passed = passed or (lambda r: r["kept_equal"])
    return 0 if all(passed(r) for r in rows) else 1


@contextmanager
def fake_modules(modules: dict[str, dict[str, Any]]) -> Iterator[None]:
    """Modules with the given attributes in ``sys.modules`` (each importable as a package too) while the
    block runs, the previous entries restored afterwards: the release's imports that the compared functions
    never use."""
    saved = {name: sys.modules.get(name) for name in modules}
    for name, attrs in modules.items():
        module = types.ModuleType(name)
        module.__path__ = []
        module.__dict__.update(attrs)
        sys.modules[name] = module
    try:
        yield
    finally:
        for name, old in saved.items():
            if old is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = old


def llava_stubs() -> dict[str, dict[str, Any]]:
    """Stand-ins (for `fake_modules`) of the LLaVA repository's ``llava.constants`` and ``llava.mm_utils``,
    which a release's ``llava_arch.py`` imports: the constants' values, ``get_anyres_image_grid_shape`` a
    no-op (LLaVA-1.5 never calls it)."""
    return {
        "llava": {},
        "llava.constants": {"IGNORE_INDEX": -100, "IMAGE_TOKEN_INDEX": -200, "DEFAULT_IMAGE_PATCH_TOKEN": "",
                            "DEFAULT_IM_START_TOKEN": "", "DEFAULT_IM_END_TOKEN": ""},
        "llava.mm_utils": {"get_anyres_image_grid_shape": lambda *a, **k: None},
    }


def load_llava_arch(path: Path, package: str) -> types.ModuleType:
    """A release's ``llava/model/llava_arch.py`` at ``path``, imported as ``<package>.llava_arch``: its relative
    imports of the vision-tower and projector builders and its ``llava.*`` imports are stand-ins
    (`llava_stubs`), so only the file's own code (``LlavaMetaForCausalLM``) is the release's."""
    unused = lambda *a, **k: None  # noqa: E731
    with fake_modules({
        package: {},
        f"{package}.multimodal_encoder": {},
        f"{package}.multimodal_encoder.builder": {"build_vision_tower": unused},
        f"{package}.multimodal_projector": {},
        f"{package}.multimodal_projector.builder": {"build_vision_projector": unused},
        **llava_stubs(),
    }):
        return load_file(path, f"{package}.llava_arch")


@contextmanager
def release_llava_package(root: Path) -> Iterator[None]:
    """Import the release's ``llava`` modules from the checkout folder ``root`` while the block runs: its
    ``llava/__init__`` files (which import the whole model fork) are bypassed, any installed or earlier
    imported ``llava`` is hidden meanwhile and restored afterwards."""
    saved = {k: v for k, v in sys.modules.items() if k == "llava" or k.startswith("llava.")}
    for k in saved:
        del sys.modules[k]
    for pkg in ("llava", "llava.model"):
        module = types.ModuleType(pkg)
        module.__path__ = [str(root / pkg.replace(".", "/"))]
        sys.modules[pkg] = module
    try:
        yield
    finally:
        for k in [k for k in sys.modules if k == "llava" or k.startswith("llava.")]:
            del sys.modules[k]
        sys.modules.update(saved)


def release_arch_and_clip(root: Path, repo: str, required: Iterable[str] = ()) -> tuple[types.ModuleType, types.ModuleType]:
    """A release's ``llava.model.llava_arch`` and ``llava.model.multimodal_encoder.clip_encoder`` modules, imported
    from its checkout folder ``root`` (`release_llava_package`); exits naming ``repo`` where one of those files or
    of ``required`` (paths under ``root``) is missing."""
    import importlib

    for f in ("llava/model/llava_arch.py", "llava/model/multimodal_encoder/clip_encoder.py", *required):
        if not (Path(root) / f).is_file():
            raise SystemExit(f"{root} is not a checkout of {repo}: {f} is missing")
    with release_llava_package(root):
        arch = importlib.import_module("llava.model.llava_arch")
        clip = importlib.import_module("llava.model.multimodal_encoder.clip_encoder")
    return arch, clip


def tiny_llava_inputs(prompt: str, count: int = 1, seed: int = 0, draw: str = "integers",
                      images: list[Any] | None = None) -> Any:
    """Processor inputs (``input_ids``, ``attention_mask``, ``pixel_values``) of the tiny LLaVA-1.5 model
    (`vtprune.toy.tiny.tiny_llava_processor`) for ``count`` copies of ``prompt``, each with one 400 x 500
    noise image drawn from ``numpy.random.default_rng(seed)`` in turn: ``draw="integers"`` uniform integer
    pixels 0..255, ``"floats"`` ``uint8(uniform[0, 1) * 255)``. ``images`` (PIL images) replaces the noise."""
    import numpy as np
    from PIL import Image

    from vtprune.toy.tiny import tiny_llava_processor

    if images is None:
        rng = np.random.default_rng(seed)
        if draw == "integers":
            images = [Image.fromarray(rng.integers(0, 256, (400, 500, 3), dtype=np.uint8)) for _ in range(count)]
        elif draw == "floats":
            images = [Image.fromarray((rng.random((400, 500, 3)) * 255).astype("uint8")) for _ in range(count)]
        else:
            raise ValueError(f"draw={draw!r}: give 'integers' or 'floats'")
    extra = {"padding": True} if len(images) > 1 else {}
    return tiny_llava_processor()(images=images, text=[prompt] * len(images), return_tensors="pt", **extra)


def tiny_next_inputs(prompt: str, size: tuple[int, int] = (400, 500), seed: int = 0) -> Any:
    """Processor inputs of the tiny LLaVA-NeXT model (`vtprune.toy.tiny.tiny_llava_processor(next_=True)`) for
    ``prompt`` with one ``size`` (height, width) integer-noise image from ``numpy.random.default_rng(seed)``:
    400 x 500 is a 2 x 2 anyres grid (the base tile + 4 crops)."""
    import numpy as np
    from PIL import Image

    from vtprune.toy.tiny import tiny_llava_processor

    image = Image.fromarray(np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8))
    return tiny_llava_processor(next_=True)(images=[image], text=[prompt], return_tensors="pt")


def release_clip_tower(clip: types.ModuleType, model: Any) -> Any:
    """The release's ``CLIPVisionTower`` (its ``clip_encoder`` module ``clip``) around ``model``'s own CLIP,
    built without loading weights: ``select_layer`` the model's feature layer, ``patch`` features."""
    import torch

    tower = clip.CLIPVisionTower.__new__(clip.CLIPVisionTower)
    torch.nn.Module.__init__(tower)
    tower.select_layer = model.config.vision_feature_layer  # -2, LLaVA-1.5's mm_vision_select_layer
    tower.select_feature = "patch"
    tower.vision_tower = model.model.vision_tower
    tower.is_loaded = True
    return tower


def release_next_self(clip: types.ModuleType, model: Any, **attrs: Any) -> Any:
    """A stand-in ``self`` for a release's ``LlavaMetaForCausalLM`` methods around the LLaVA-NeXT ``model``
    (`release_clip_tower`, its projector and token embeddings; config ``spatial_unpad`` / ``anyres`` with the
    model's pinpoints; ``model.image_newline``), plus ``attrs``."""
    tower = release_clip_tower(clip, model)
    core = types.SimpleNamespace(get_vision_tower=lambda: tower, mm_projector=model.model.multi_modal_projector,
                                  embed_tokens=model.get_input_embeddings())
    config = types.SimpleNamespace(mm_patch_merge_type="spatial_unpad", image_aspect_ratio="anyres",
                                    image_grid_pinpoints=[list(p) for p in model.config.image_grid_pinpoints])
    return types.SimpleNamespace(get_model=lambda: core, get_vision_tower=lambda: tower, config=config,
                                  device=model.device,
                                  model=types.SimpleNamespace(image_newline=model.model.image_newline), **attrs)


def release_next_prepare(arch: types.ModuleType, me: Any, inputs: Any, start: int, n: int,
                         patched: dict[str, Any], **call_kwargs: Any) -> Any:
    """A release's ``LlavaMetaForCausalLM.prepare_inputs_labels_for_multimodal`` (its ``llava_arch`` module
    ``arch``) on the stand-in ``me`` (`release_next_self`) for HF LLaVA-NeXT processor ``inputs`` of one
    prompt: the image span ``input_ids[:, start:start + n]`` replaced by the single ``IMAGE_TOKEN_INDEX`` (-200)
    the LLaVA repository uses, ``image_sizes`` as (width, height); the module attributes ``patched`` (name ->
    replacement: recording wrappers) set on ``arch`` during the call; ``call_kwargs`` go to the call (CDPruner's
    ``texts``). Returns its output tuple."""
    import torch

    ids = inputs["input_ids"]
    release_ids = torch.cat([ids[:, :start], torch.full((1, 1), -200, dtype=ids.dtype), ids[:, start + n:]], dim=1)
    h, w = (int(x) for x in inputs["image_sizes"][0])
    saved = {name: getattr(arch, name) for name in patched}
    for name, fn in patched.items():
        setattr(arch, name, fn)
    try:
        with torch.no_grad():
            return arch.LlavaMetaForCausalLM.prepare_inputs_labels_for_multimodal(
                me, release_ids, None, None, None, None, inputs["pixel_values"], image_sizes=[(w, h)], **call_kwargs)
    finally:
        for name, fn in saved.items():
            setattr(arch, name, fn)


def release_next_hf_kept(arch: types.ModuleType, model: Any, inputs: Any, masks: Any, n: int) -> tuple[list[int], int]:
    """A per-tile release's ``index_masks`` (``[T, 576]``, the base tile first, the crops in the anyres grid's
    order) on HF's unpadded LLaVA-NeXT sequence of ``n`` visual tokens: the kept HF visual indices (the crops'
    mask unpadded by the release's own ``unpad_image`` as the original LLaVA-NeXT code unpads, a ``False``
    newline column per grid row) and how many picks fall in the grid's padding (no HF token)."""
    import torch

    h, w = (int(x) for x in inputs["image_sizes"][0])
    tower = model.config.vision_config
    pinpoints = [list(p) for p in model.config.image_grid_pinpoints]
    cols, rows = arch.get_anyres_image_grid_shape((w, h), pinpoints, tower.image_size)
    masks = masks.cpu()
    side = tower.image_size // tower.patch_size
    crops = masks[1:].view(rows, cols, side, side).permute(0, 2, 1, 3).reshape(1, rows * side, cols * side)
    unpadded = arch.unpad_image(crops, (w, h))[0]
    hf = torch.cat([masks[0], torch.cat([unpadded, torch.zeros(unpadded.shape[0], 1, dtype=torch.bool)], 1).flatten()])
    assert hf.numel() == n, f"the release's mask maps to {hf.numel()} slots, HF's image has {n}"
    return torch.nonzero(hf).flatten().tolist(), int(masks.sum()) - int(hf.sum())


def lm_input_kwargs(model: Any, inputs: Any) -> dict[str, Any]:
    """The keyword arguments (``inputs_embeds``, ``position_ids``, ...) the language model of ``model``
    (unpatched) receives in a forward on ``inputs``, recorded by a pre-hook."""
    import torch

    seen: dict[str, Any] = {}
    lm = model.model.language_model
    handle = lm.register_forward_pre_hook(lambda m, a, k: seen.update(k), with_kwargs=True)
    try:
        with torch.no_grad():
            model(**inputs, use_cache=False)
    finally:
        handle.remove()
    return seen


def lm_input_embeds(model: Any, inputs: Any) -> Any:
    """The language model's input embeddings ``[B, L, D]`` (text embeddings with the projector outputs spliced
    in) in a forward of ``model`` (an HF LLaVA model, unpatched) on ``inputs`` (`lm_input_kwargs`)."""
    return lm_input_kwargs(model, inputs)["inputs_embeds"]


def image_span(model: Any, inputs: Any) -> tuple[int, int]:
    """``(start, n)``: the image placeholder span ``input_ids[:, start:start + n]``, the same single contiguous
    span in every prompt (asserted)."""
    import torch

    image = inputs["input_ids"] == model.config.image_token_id
    start, n = int(torch.nonzero(image[0])[0]), int(image[0].sum())
    assert bool((image.sum(1) == n).all()) and bool(image[:, start:start + n].all()), "one image span per prompt"
    return start, n


def logits_on_visual_rows(model: Any, inputs: Any, rows: Any) -> Any:
    """First-token (last-position) logits ``[B, V]`` of ``model``'s unpatched language model and ``lm_head`` on
    the prompts with each image span (`image_span`) replaced by ``rows`` ``[B, k, D]``: a release's sequence
    of visual rows, contiguous positions."""
    import torch

    start, n = image_span(model, inputs)
    with torch.no_grad():
        text = model.get_input_embeddings()(inputs["input_ids"])
        seq = torch.cat([text[:, :start], rows.to(text.dtype), text[:, start + n:]], dim=1)
        hidden = model.model.language_model(inputs_embeds=seq, use_cache=False).last_hidden_state
        return model.lm_head(hidden[:, -1])


def logits_without_unkept(model: Any, inputs: Any, kept: Iterable[int], embeds: Any = None) -> Any:
    """First-token logits ``[V]`` (one prompt) of ``model``'s unpatched LLM on its own input embeddings
    (``embeds`` ``[1, L, D]``, default `lm_input_embeds`) with the visual tokens outside ``kept`` (indices
    among the image's tokens) removed: a release's pruned sequence, raster order, contiguous positions."""
    import torch

    if embeds is None:
        embeds = lm_input_embeds(model, inputs)
    start, _ = image_span(model, inputs)
    index = torch.tensor(sorted(int(i) for i in kept), dtype=torch.long)
    return logits_on_visual_rows(model, inputs, embeds[:, start + index])[0]


def vtprune_run(model: Any, inputs: Any, method: str, **options: Any) -> tuple[list[int], Any]:
    """vtprune's ``method`` (``vtprune.apply(model, method, **options)``, removed afterwards) on one prompt:
    ``(kept, logits)``, the kept visual indices of sample 0 in vtprune's order and the first-token logits
    ``[V]``."""
    import torch

    import vtprune

    vtprune.apply(model, method, **options)
    try:
        with torch.no_grad():
            logits = model(**inputs).logits[0, -1]
        return vtprune.stats(model).kept[0].tolist(), logits
    finally:
        vtprune.remove(model)


def traced_vtprune_run(model: Any, inputs: Any, method: str, **options: Any) -> dict[str, Any]:
    """vtprune's ``method`` (``vtprune.apply(model, method, **options)``, removed afterwards) on one prompt,
    with each visual row the LLM receives traced back to the projector call whose output it is: ``kept``
    (vtprune's kept visual indices), ``rows`` ``[k, D]`` (the LLM input rows from the image's first slot,
    ``k = len(kept)``), ``inputs`` ``[k, C_v]`` (per row the projector input, of the last call producing it:
    a merge's, after the plain features) and ``logits`` ``[V]`` (first token)."""
    import torch

    import vtprune

    calls: list[tuple[Any, Any]] = []
    seen: dict[str, Any] = {}
    proj = model.model.multi_modal_projector
    vtprune.apply(model, method, **options)
    handles = [proj.register_forward_hook(lambda m, a, out: calls.append((a[0].detach(), out.detach()))),
               model.model.language_model.register_forward_pre_hook(lambda m, a, k: seen.update(k), with_kwargs=True)]
    try:
        with torch.no_grad():
            logits = model(**inputs, use_cache=False).logits[0, -1]
        kept = vtprune.stats(model).kept[0].tolist()
    finally:
        for h in handles:
            h.remove()
        vtprune.remove(model)
    start, n = image_span(model, inputs)
    embeds = seen["inputs_embeds"][0]
    assert embeds.shape[0] == inputs["input_ids"].shape[1] - n + len(kept), "the LLM input is the shortened sequence"
    rows = embeds[start:start + len(kept)]
    ins = torch.cat([a.reshape(-1, a.shape[-1]) for a, _ in calls])
    outs = torch.cat([o.reshape(-1, o.shape[-1]) for _, o in calls])
    inputs_of = []
    for slot, row in enumerate(rows):
        hit = torch.nonzero((outs == row).all(dim=-1)).flatten()
        assert hit.numel() >= 1, f"the LLM row of visual token {kept[slot]} is no projector output"
        inputs_of.append(ins[hit[-1]])
    return {"kept": kept, "rows": rows, "inputs": torch.stack(inputs_of), "logits": logits}


def per_image_rule_row(common: dict[str, Any], variant: str, seed: int, budget: int, kept: list[int],
                       release_kept: list[int], **extra: Any) -> dict[str, Any]:
    """The recorded row of a per-tile check (VisPruner, CDPruner on LLaVA-NeXT): vtprune's ``budget_per="image"``
    rule (``kept``, sorted visual indices) against the release's per-tile picks in HF's sequence; not asserted.
    ``common``: the row's method / model / weights / seed entries; ``extra``: entries before the note."""
    return {**common, "variant": f"{variant}, seed {seed}, budget_per='image'", "budget": budget,
            "jaccard": jaccard(kept, release_kept), "kept_equal": kept == release_kept,
            "logit_max_abs": None, "asserted": False, **extra,
            "note": f"vtprune's per-image rule (keep={budget} of the unpadded image's patch tokens, newlines beside "
                    f"it: {len(kept)} kept) against the release's picks in HF's sequence ({len(release_kept)}): "
                    "recorded, not asserted"}


def kept_and_logits_passed(row: dict[str, Any], tolerance: float) -> bool:
    """A per-tile check's row passes: recorded only, or the same kept set and logits within ``tolerance``."""
    return not row["asserted"] or (row["kept_equal"] and row["logit_max_abs"] < tolerance)


def padding_summary(method: str, rows: list[dict[str, Any]]) -> None:
    """Per variant, how many asserted rows a per-tile check has and how many of them have picks in the
    grid's padding; exits where a variant has none (the deviation the check must exercise)."""
    for variant in ("random", "peaked"):
        asserted = [r for r in rows if r["weights"] == variant and r["asserted"]]
        padded = [r for r in asserted if r["in_padding"]]
        print(f"{variant}: {len(asserted)} tie-free rows asserted, {len(padded)} of them with picks in the padding")
        if not padded:
            raise SystemExit(f"{method} parity: no tie-free input with picks in the padding for the {variant} "
                             "variant; add a seed to SEEDS")


def single_threaded(compare: Callable[[Path], list[dict[str, Any]]]) -> Callable[[Path], list[dict[str, Any]]]:
    """``compare`` run with one torch thread (restored afterwards): the tiny matrices are fastest on one thread,
    which also does not contend with other jobs."""
    def run(ref: Path) -> list[dict[str, Any]]:
        import torch

        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return compare(ref)
        finally:
            torch.set_num_threads(threads)

    run.__doc__ = compare.__doc__
    return run
