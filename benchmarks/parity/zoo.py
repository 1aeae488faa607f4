"""Parity of vtprune's ``zoo`` with ZOO-Prune's release (github.com/AIM-SKKU/ZOO-Prune): the kept visual tokens
and the first-token logits.

The release's code lived at commit 159f7f96 (the repository's current HEAD holds only a README), in
``LLaVA/llava/model/llava_arch.py``, for LLaVA-1.5 (``run_zoo_prune.sh``: ``LAYER_INDEX=0``, ``SUBSET_RATIO``
0.1112 / 0.2223 / 0.3334 for 64 / 128 / 192 tokens, ``NOISERECOV_NUM=64`` directions, ``NOISERECOV_INTENS=0.01``
the step ``h``). ``--ref`` is a folder holding that file at that path (a checkout of 159f7f96, or that file
alone).

What runs: the ZOO-Prune block of ``prepare_inputs_labels_for_multimodal`` (the ``LAYER_INDEX == '0'`` branch:
a bank of ``m`` random unit directions from the global torch generator, the projector on ``x +- h u`` for every
pre-projector feature ``x``, the mean central-difference norm as the importance, then
``self.select_tokens_sads`` on the projected features) is taken from the file's source (``ast``) and executed,
up to its ``selected_visual_tokens`` and before its index surgery at the hard-coded ``SYS_TOKEN_LEN = 35``, on
the pre-projector features and projector outputs of the same forward vtprune's run sees (the tiny LLaVA-1.5
model of ``vtprune.toy.tiny``: 576 visual tokens), with a stand-in ``self`` whose ``get_model().mm_projector``
is the model's projector and whose ``select_tokens_sads`` is the release's own. The global generator is
seeded with vtprune's ``seed`` (0) just before, so both draw the same directions. The release's kept rows,
in sequence order with contiguous positions, then run through the same language model for the logits.

Rows, both asserted: ``float16`` runs the block as it is (its ``.half()`` casts of the perturbed inputs, a
float16 copy of the model's projector, as the release's float16 7B model has) against vtprune's default
``precision="float16"``; ``float32`` runs the block with its two ``.half()`` casts removed (``ast``; the
model's float32 projector) against vtprune's ``precision="float32"``. ``cross`` (not asserted) records
how far the two precisions are from each other: vtprune's float32 against the release as is.

    python benchmarks/parity/zoo.py --ref /path/to/ZOO-Prune
"""

from __future__ import annotations

import ast
import copy
import sys
import types
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    env_name,
    jaccard,
    lm_input_embeds,
    load_llava_arch,
    logits_without_unkept,
    peaked,
    run_check,
    single_threaded,
    tiny_llava_inputs,
    vtprune_run,
)

METHOD = "zoo"
ENV = env_name(METHOD)
LOGIT_TOLERANCE = 1e-4
TOKENS = 576
RATIOS = {64: 0.1112, 128: 0.2223, 192: 0.3334}  # run_zoo_prune.sh's SUBSET_RATIO per token budget
DIRECTIONS, STEP, SEED = 64, 0.01, 0  # NOISERECOV_NUM, NOISERECOV_INTENS; vtprune's defaults
PROMPT = "USER: <image>\nWhat is in the picture? ASSISTANT:"
ARCH = "LLaVA/llava/model/llava_arch.py"


class _DropHalf(ast.NodeTransformer):
    """``x.half()`` -> ``x`` (the ``release, fp32`` rows)."""

    def visit_Call(self, node: ast.Call) -> Any:
        self.generic_visit(node)
        f = node.func
        if isinstance(f, ast.Attribute) and f.attr == "half" and not node.args and not node.keywords:
            return f.value
        return node


def release_block(path: Path, keep_half: bool) -> types.CodeType:
    """The statements of the release's ZOO-Prune branch (``if ... os.environ['LAYER_INDEX']=='0':`` in
    ``prepare_inputs_labels_for_multimodal``) up to and including the assignment of
    ``selected_visual_tokens``, compiled; ``keep_half=False`` removes the ``.half()`` casts."""
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef) and node.name == "prepare_inputs_labels_for_multimodal":
            for stmt in ast.walk(node):
                if isinstance(stmt, ast.If) and "LAYER_INDEX" in ast.unparse(stmt.test) and "'0'" in ast.unparse(stmt.test):
                    body = []
                    for s in stmt.body:
                        body.append(s)
                        if isinstance(s, ast.Assign) and any(getattr(t, "id", None) == "selected_visual_tokens"
                                                             for t in s.targets):
                            break
                    else:
                        raise SystemExit(f"{path}: the ZOO-Prune branch assigns no selected_visual_tokens")
                    module = ast.Module(body=body, type_ignores=[])
                    if not keep_half:
                        module = _DropHalf().visit(module)
                    return compile(ast.fix_missing_locations(module), str(path), "exec")
    raise SystemExit(f"{path}: no ZOO-Prune branch (LAYER_INDEX == '0') in prepare_inputs_labels_for_multimodal")


def release_kept(meta_cls: Any, block: types.CodeType, pre: Any, projected: Any, projector: Any,
                 ratio: float) -> list[int]:
    """Run the release's block on pre-projector features ``pre`` ``[1, 576, C]`` and projector outputs
    ``projected`` ``[1, 576, D]``: its kept visual indices, sorted (the release sorts its keep indices)."""
    import torch
    import torch.nn.functional as F

    host = types.SimpleNamespace()
    host.get_model = lambda: types.SimpleNamespace(mm_projector=projector)
    host.select_tokens_sads = lambda *a, **k: meta_cls.select_tokens_sads(host, *a, **k)
    environ = {"LAYER_INDEX": "0", "SUBSET_RATIO": str(ratio), "NOISERECOV_NUM": str(DIRECTIONS),
               "NOISERECOV_INTENS": str(STEP)}
    scope = {"torch": torch, "F": F, "os": types.SimpleNamespace(environ=environ), "self": host,
             "pre_image_features": pre, "image_features": projected}
    torch.manual_seed(SEED)  # the release draws its directions from the global generator
    with torch.no_grad():
        exec(block, scope)
    return sorted(scope["selected_visual_tokens"].tolist())


def projector_io(model: Any, inputs: Any) -> tuple[Any, Any]:
    """``(input, output)`` of the multimodal projector in an unpatched forward: ``[1, 576, C]``, ``[1, 576, D]``."""
    import torch

    seen: list[tuple[Any, Any]] = []
    handle = model.model.multi_modal_projector.register_forward_hook(lambda m, a, out: seen.append((a[0], out)))
    try:
        with torch.no_grad():
            model(**inputs, use_cache=False)
    finally:
        handle.remove()
    return seen[0]


@single_threaded
def compare(ref: Path) -> list[dict[str, Any]]:
    import torch

    from vtprune.toy.tiny import tiny_llava

    path = ref / ARCH
    if not path.is_file():
        raise SystemExit(f"{METHOD} parity: {path} is missing; --ref must hold ZOO-Prune's {ARCH} (commit 159f7f96)")
    with torch.random.fork_rng():
        meta_cls = load_llava_arch(path, "zoo_release").LlavaMetaForCausalLM
    blocks = {"float16": release_block(path, keep_half=True), "float32": release_block(path, keep_half=False)}
    inputs = tiny_llava_inputs(PROMPT)
    rows = []
    for variant in ("random", "peaked"):
        model = tiny_llava()
        if variant == "peaked":
            peaked(model)
        embeds = lm_input_embeds(model, inputs)
        pre, projected = projector_io(model, inputs)
        if pre.shape[1] != TOKENS:
            raise SystemExit(f"{METHOD} parity: the tiny model's image has {pre.shape[1]} visual tokens, not {TOKENS}")
        projectors = {"float16": copy.deepcopy(model.model.multi_modal_projector).half(),
                      "float32": model.model.multi_modal_projector}
        for budget, ratio in RATIOS.items():
            ours: dict[str, tuple[list[int], Any]] = {}
            for precision in blocks:
                kept, logits = vtprune_run(model, inputs, METHOD, keep=budget, precision=precision)
                ours[precision] = (sorted(kept), logits)
            theirs = {p: release_kept(meta_cls, blocks[p], pre, projected, projectors[p], ratio) for p in blocks}
            for name, mine, release in [("float16", "float16", "float16"), ("float32", "float32", "float32"),
                                        ("cross: vtprune float32, release as is", "float32", "float16")]:
                kept, logits = ours[mine]
                logit = float((logits - logits_without_unkept(model, inputs, theirs[release], embeds)).abs().max())
                asserted = mine == release
                rows.append({"method": METHOD, "model": "tiny-llava-1.5 (576 tokens)", "variant": f"{variant}, {name}",
                             "budget": budget, "jaccard": jaccard(kept, theirs[release]),
                             "kept_equal": kept == theirs[release], "logit_max_abs": logit, "asserted": asserted,
                             "note": f"SUBSET_RATIO {ratio} (release keeps {len(theirs[release])}), NOISERECOV_NUM "
                                     f"{DIRECTIONS}, NOISERECOV_INTENS {STEP}, directions from seed {SEED}; "
                                     f"release {'as is' if release == 'float16' else 'without .half()'}; vtprune "
                                     f"keep={budget}, precision={mine}" + ("" if asserted else "; not asserted")})
    return rows


def main(argv: list[str] | None = None) -> int:
    return run_check(METHOD, compare, argv, __doc__ or "", passed=lambda r: r["kept_equal"] or not r["asserted"])


if __name__ == "__main__":
    sys.exit(main())
