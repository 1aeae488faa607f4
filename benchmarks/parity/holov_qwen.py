"""Parity of vtprune's ``holov`` on Qwen2.5-VL with HoloV's released Qwen code (github.com/obananas/HoloV).

Reference: commit 1d2e65e (1d2e65e961e698ff0e7d5bb4625489177dd9deba), ``qwen-model-HoloV/modeling_qwen2_5_vl.py``
(a patched copy of transformers' Qwen2.5-VL modeling file, for an older transformers 4.x: it does not import
on transformers 5) and ``qwen-model-HoloV/utils.py`` (``HoloV``, ``adjust_ids``, a ``scaled_dot_product_attention``
that also returns the weights).

What the release does. Its vision tower (``Qwen2_5_VisionTransformerPretrainedModel.forward``) runs the last
vision block (``layer_num == len(self.blocks) - 1``: full attention in Qwen2.5-VL, and in the tiny model here)
through its SDPA attention with ``output_attentions``, averages those weights over heads and over the queries
(the attention each patch receives), then over each run of 4 consecutive patches (one merge group); it
un-permutes the merger outputs (``reverse_indices``) but not those scores, which stay in window order. Its
``Qwen2_5_VLForConditionalGeneration.forward`` takes ``keep_num = int(image_token_len * prune_rate)``,
``num_patches = max(1, int(1024 / 576 * image_token_len / keep_num))`` and calls
``HoloV(image_tokens, image_attn, num_patches, keep_num)`` on ``image_tokens = inputs_embeds[:, image_token_start :
image_token_start + image_token_len]``, where ``image_token_start`` is the index of ``<|vision_start|>``
(``vision_start_token_id``), not of the first ``<|image_pad|>``: the slice holds that token and the image's first
``n - 1`` tokens, and the image's last token lies after the slice, so it reaches the LLM whatever HoloV picks.
The picked rows (crop order, descending attention inside a crop, zero vectors last) replace the slice, and
``adjust_ids`` gathers their M-RoPE positions (a zero vector gets the slice's last position: the image's
second-to-last token's). The pruned sequence goes to the LLM with the unpruned ``[1, L]`` attention mask, which
the release's transformers reduces to the causal mask (``_update_causal_mask``).

What runs here. The release's functions are taken from the file's source (``ast``, decorators and annotations
dropped) and executed on a tiny random-weight Qwen2.5-VL (``vtprune.toy.tiny_qwen``: 4 vision blocks, full
attention in 1 and 3, 112-pixel windows; one 300 x 400 noise image -> an 18 x 26 patch grid, 9 x 13 = 117 merged
tokens, whose window order differs from raster order): the tower's ``forward``, ``rot_pos_emb`` and
``get_window_index``, its rotary embedding class, the ``forward`` of its SDPA attention, block and merger,
``get_rope_index`` and the whole ``Qwen2_5_VLForConditionalGeneration.forward``, on stand-in ``self`` objects
whose parameters and sub-modules (patch embedding, norms, MLPs, the language model, ``lm_head``) are the tiny
model's; ``HoloV``, ``adjust_ids`` and ``scaled_dot_product_attention`` from ``utils.py``. The release's language
model call goes to the tiny model's transformers-5 language model with the mask ``None`` (the causal mask, which
the release's all-ones mask becomes). Budgets: ``prune_rate`` 0.111 / 0.222 / 0.333 (the LLaVA budgets' shares
64 / 128 / 192 of 576), ``keep = int(117 * prune_rate)`` = 12 / 25 / 38, ``num_patches`` 17 / 8 / 5 (the
release's rule, which vtprune's default ``num_crops`` follows). ``peaked``: `common.peaked` with factor 256
(its default 8 leaves this tower's received attention almost flat: coefficient of variation 0.4 %; 256: 42 %).

Rows, per variant (``random``, ``peaked``) and budget:

- ``aligned`` (asserted): the release's ``HoloV`` on the release tower's merger outputs (raster order) and its
  scores mapped to raster order (``scores[argsort(window_index)]``: the documented deviation undone): its kept
  set and zero-vector count against vtprune's; ``feature_max_abs``: the release tower's merger outputs against
  the model's own image embeddings; ``logit_max_abs``: vtprune's first-token logits against the unpatched
  language model on the prompt with the release's picks at their own positions in raster order and its zero
  vectors in the image's last unkept slots (vtprune's documented layout).
- ``window order`` (not asserted): the same with the release's window-order scores as they are (the documented
  deviation alone); logits as for ``aligned``.
- ``shifted slice`` (not asserted): ``HoloV`` on the release's own slice from ``<|vision_start|>`` with the
  scores in raster order (the slice's offset alone): the image tokens the LLM would receive (slice row ``j`` is
  image token ``j - 1``, and the image's last token); no logits.
- ``release`` (not asserted): the release's forward end to end; kept set: the image tokens its LLM receives;
  logits: the release's against vtprune's. The check asserts that the release's LLM input is the slice layout
  described above (rows and positions).
- ``overflow`` (asserted, one per variant): ``num_crops=39`` (crops of 3 tokens), 80 kept, the release's ``HoloV``
  with ``num_patches=39`` as in ``aligned`` (not the release's Qwen rule, which gives 2 here): crops run out of
  tokens in the peaked variant, so the release's zero-vector padding is compared (``zero_rows``: release, vtprune).

    python benchmarks/parity/holov_qwen.py --ref /path/to/HoloV
"""

from __future__ import annotations

import ast
import logging
import math
import sys
import types
import typing
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    env_name,
    jaccard,
    load_file,
    peaked,
    run_check,
    single_threaded,
    strip_annotations,
)

METHOD = "holov-qwen"
VTPRUNE_METHOD = "holov"
ENV = env_name(METHOD)
LOGIT_TOLERANCE = 1e-4
FEATURE_TOLERANCE = 1e-4
MODEL = "tiny-qwen2.5-vl (9x13 merged grid, 117 tokens)"
RATES = (0.111, 0.222, 0.333)  # prune_rate: the share of the image's tokens kept
OVERFLOW = (80, 39)  # keep, num_crops: crops of 3 tokens, about 2 allocated to each (the overflow rows)
PEAK = 256.0  # common.peaked's factor (its default 8 leaves this tower's received attention almost flat)
IMAGE = (300, 400)  # height, width of the noise image
QUESTION = "What is in the picture?"
MODELING = "qwen-model-HoloV/modeling_qwen2_5_vl.py"
UTILS = "qwen-model-HoloV/utils.py"

# what runs from the release's modeling file: per class the methods named (None: the class itself), and under
# None its module-level functions
RELEASE_CODE = {
    None: ("rotate_half", "apply_rotary_pos_emb_vision"),
    "Qwen2_5_VisionRotaryEmbedding": None,
    "Qwen2_5_VLVisionSdpaAttention": ("forward",),
    "Qwen2_5_VLVisionBlock": ("forward",),
    "Qwen2_5_VLPatchMerger": ("forward",),
    "Qwen2_5_VisionTransformerPretrainedModel": ("forward", "rot_pos_emb", "get_window_index"),
    "Qwen2_5_VLForConditionalGeneration": ("forward", "get_rope_index"),
}


class _Output(dict):
    """Stand-in of a transformers ``ModelOutput``: keyword construction, attribute access, ``out[0]``."""

    def __getattr__(self, name: str) -> Any:
        return self.get(name)

    def __getitem__(self, key: Any) -> Any:
        return list(self.values())[key] if isinstance(key, int) else dict.__getitem__(self, key)


class _Self:
    """The ``self`` a release method sees: the given attributes and the release's methods (bound to this
    object), everything else (parameters, sub-modules, config values) looked up on ``base``."""

    def __init__(self, base: Any, methods: dict[str, Any] | None = None, **attrs: Any) -> None:
        self.__dict__["_base"] = base
        self.__dict__.update(attrs)
        for name, fn in (methods or {}).items():
            self.__dict__[name] = types.MethodType(fn, self)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.__dict__["_base"], name)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.forward(*args, **kwargs)


def release_code(ref: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(code, glob)``: the release's functions and classes of `RELEASE_CODE` (``code[cls][name]`` for methods,
    ``code[name]`` otherwise), executed from ``modeling_qwen2_5_vl.py``'s source, and ``glob``, their module
    globals: ``torch``, ``nn``, ``F``, ``math``, ``logger``, the ``typing`` names, a ``ModelOutput`` stand-in and
    ``utils.py``'s ``HoloV``, ``adjust_ids`` and ``scaled_dot_product_attention`` (imported from the checkout;
    `Release.run` wraps ``glob["HoloV"]`` during a call to record it)."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    for f in (MODELING, UTILS):
        if not (ref / f).is_file():
            raise SystemExit(f"{ref} is not a checkout of obananas/HoloV: {f} is missing")
    utils = load_file(ref / UTILS, "holov_release_qwen_utils")
    path = ref / MODELING
    tree = ast.parse(path.read_text())
    g: dict[str, Any] = {"torch": torch, "nn": nn, "F": F, "math": math, "logger": logging.getLogger("holov_release"),
                         "CrossEntropyLoss": nn.CrossEntropyLoss, "Qwen2_5_VLCausalLMOutputWithPast": _Output,
                         "HoloV": utils.HoloV, "adjust_ids": utils.adjust_ids,
                         "scaled_dot_product_attention": utils.scaled_dot_product_attention,
                         "__name__": "holov_release"}
    g.update({name: getattr(typing, name) for name in ("Any", "Dict", "List", "Optional", "Tuple", "Union")})
    code: dict[str, Any] = {}
    found = {node.name: node for node in tree.body if isinstance(node, (ast.FunctionDef, ast.ClassDef))}
    for cls, names in RELEASE_CODE.items():
        if cls is not None and cls not in found:
            raise SystemExit(f"{path}: class {cls} not found (another revision of the release?)")
        if cls is None or names is None:
            nodes = [found[n] for n in (names or ())] if cls is None else [found[cls]]
            for node in nodes:
                exec(compile(ast.fix_missing_locations(ast.Module([strip_annotations(node)], [])), str(path), "exec"), g)
                code[node.name] = g[node.name]
            continue
        methods = {n.name: n for n in found[cls].body if isinstance(n, ast.FunctionDef)}
        code[cls] = {}
        for name in names:
            if name not in methods:
                raise SystemExit(f"{path}: {cls}.{name} not found (another revision of the release?)")
            scope: dict[str, Any] = {}
            tree_of = ast.fix_missing_locations(ast.Module([strip_annotations(methods[name])], []))
            exec(compile(tree_of, str(path), "exec"), g, scope)
            code[cls][name] = scope[name]
    return code, g


class Release:
    """The release's Qwen2.5-VL HoloV path around a transformers-5 ``Qwen2_5_VLForConditionalGeneration``:
    ``run(inputs, prune_rate)`` is its ``forward`` (the release's code, `release_code`) on ``model``'s
    parameters, recording what it computed (`calls`)."""

    def __init__(self, code: dict[str, Any], glob: dict[str, Any], model: Any) -> None:
        core = model.model
        visual = core.visual
        vc = model.config.vision_config
        self.glob = glob
        self.calls: dict[str, Any] = {}
        head_dim = vc.hidden_size // vc.num_heads
        attn, block, merger = (code["Qwen2_5_VLVisionSdpaAttention"], code["Qwen2_5_VLVisionBlock"],
                               code["Qwen2_5_VLPatchMerger"])
        blocks = [_Self(b, block, attn=_Self(b.attn, attn)) for b in visual.blocks]
        tower = code["Qwen2_5_VisionTransformerPretrainedModel"]
        # the release's own rotary table, built as its tower's __init__ builds it
        self.visual = _Self(visual, tower, blocks=blocks, merger=_Self(visual.merger, merger),
                            rotary_pos_emb=code["Qwen2_5_VisionRotaryEmbedding"](head_dim // 2))
        record = self.calls

        def visual_call(*args: Any, **kwargs: Any) -> Any:
            out = self.visual.forward(*args, **kwargs)
            record["visual"] = out
            return out

        def lm_call(input_ids=None, position_ids=None, attention_mask=None, inputs_embeds=None, **kwargs: Any) -> Any:
            import torch

            # the release passes the unpruned [1, L] mask; its transformers' _update_causal_mask makes an
            # all-ones mask the plain causal mask (sliced to the pruned length): None here
            assert attention_mask is None or bool((attention_mask == 1).all()), "one unpadded prompt"
            record["lm"] = {"inputs_embeds": inputs_embeds, "position_ids": position_ids}
            with torch.no_grad():
                out = core.language_model(inputs_embeds=inputs_embeds, position_ids=position_ids, use_cache=False)
            return _Output(last_hidden_state=out.last_hidden_state)

        config = _Self(model.config, output_attentions=False, output_hidden_states=False, use_return_dict=True,
                       prune_method="HoloV", prune_rate=None)
        self.config = config
        text = _Self(core.language_model, embed_tokens=core.language_model.embed_tokens)
        text.__dict__["forward"] = lm_call
        self.me = _Self(model, code["Qwen2_5_VLForConditionalGeneration"], config=config,
                        visual=_Self(visual, forward=visual_call), model=text, lm_head=model.lm_head, rope_deltas=None)

    def run(self, inputs: Any, prune_rate: float) -> Any:
        """First-token logits ``[V]`` of the release's forward on one prompt; `calls` holds ``visual`` (its
        tower's ``(merged features [n, D] raster, scores [n] window order)``), ``holov`` (the ``HoloV`` call's
        arguments and ``final_position``) and ``lm`` (the language model's input)."""
        import torch

        real = self.glob["HoloV"]

        def holov(image_tokens, attention, num_patches, new_image_token_num, *rest):
            out = real(image_tokens, attention, num_patches, new_image_token_num, *rest)
            self.calls["holov"] = {"image_tokens": image_tokens, "attention": attention, "num_patches": num_patches,
                                   "keep": new_image_token_num, "rows": out[0], "final_position": out[1]}
            return out

        self.calls.clear()
        self.config.__dict__["prune_rate"] = prune_rate
        self.me.__dict__["rope_deltas"] = None
        self.glob["HoloV"] = holov
        try:
            with torch.no_grad():
                out = self.me.forward(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                                      pixel_values=inputs["pixel_values"], image_grid_thw=inputs["image_grid_thw"],
                                      use_cache=False)
        finally:
            self.glob["HoloV"] = real
        return out.logits[0, -1]

    def window_index(self, grid_thw: Any) -> Any:
        """The release's ``get_window_index``: ``[n]``, the raster index of the merged token at each window slot."""
        return self.visual.get_window_index(grid_thw)[0]


def qwen_inputs() -> Any:
    """The tiny Qwen2.5-VL processor's outputs for one prompt with one 300 x 400 noise image."""
    import numpy as np
    from PIL import Image

    from vtprune.toy.tiny_qwen import tiny_qwen_processor

    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (*IMAGE, 3), dtype=np.uint8))
    text = f"<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>{QUESTION}<|im_end|>\n<|im_start|>assistant\n"
    return tiny_qwen_processor("qwen2_5_vl")(images=[image], text=[text], return_tensors="pt")


def qwen_lm_inputs(model: Any, inputs: Any) -> dict[str, Any]:
    """What the unpatched Qwen-VL ``model`` hands its language model on ``inputs``: ``inputs_embeds`` ``[1, L, D]``
    and the 3-D M-RoPE ``position_ids`` ``[3, 1, L]``."""
    import torch

    seen: dict[str, Any] = {}
    handle = model.model.language_model.register_forward_pre_hook(lambda m, a, k: seen.update(k), with_kwargs=True)
    try:
        with torch.no_grad():
            model(**inputs, use_cache=False)
    finally:
        handle.remove()
    return {"inputs_embeds": seen["inputs_embeds"], "position_ids": seen["position_ids"][-3:]}


def qwen_logits_on(model: Any, full: dict[str, Any], index: list[int], zero: list[int] = ()) -> Any:
    """First-token logits ``[V]`` of ``model``'s unpatched language model on the rows ``index`` (sequence positions,
    in that order) of the full prompt's LLM input ``full`` (`qwen_lm_inputs`), each at its own M-RoPE position;
    the rows at the positions ``zero`` replaced by zero vectors."""
    import torch

    idx = torch.tensor(index, dtype=torch.long)
    with torch.no_grad():
        seq = full["inputs_embeds"][:, idx].clone()
        for z in zero:
            seq[:, index.index(z)] = 0
        pos = full["position_ids"][:, :, idx]
        hidden = model.model.language_model(inputs_embeds=seq, position_ids=pos, use_cache=False).last_hidden_state
        return model.lm_head(hidden[:, -1])[0]


def _vtprune(model: Any, inputs: Any, k: int, start: int, options: dict[str, Any]) -> dict[str, Any]:
    """vtprune's ``holov`` (``keep=k``, ``options``): its picks (kept visual indices without the zero-vector
    slots), zero slots (kept slots whose LLM input row is a zero vector) and first-token logits."""
    import torch

    import vtprune

    seen: dict[str, Any] = {}
    handle = model.model.language_model.register_forward_pre_hook(lambda m, a, kw: seen.update(kw), with_kwargs=True)
    vtprune.apply(model, VTPRUNE_METHOD, keep=k, **options)
    try:
        with torch.no_grad():
            logits = model(**inputs, use_cache=False).logits[0, -1]
        kept = vtprune.stats(model).kept[0].tolist()
    finally:
        handle.remove()
        vtprune.remove(model)
    rows = seen["inputs_embeds"][0, start:start + len(kept)]
    zero = [kept[j] for j in range(len(kept)) if bool((rows[j] == 0).all())]
    return {"picks": [i for i in kept if i not in zero], "zero": zero, "logits": logits}


def _raster_reference(model: Any, full: dict[str, Any], start: int, n: int, picks: list[int], zeros: int) -> Any:
    """Logits of the unpatched language model on the prompt with the image's ``picks`` at their own positions in
    raster order and ``zeros`` zero vectors in the image's last unkept slots (vtprune's Qwen-VL layout)."""
    free = [i for i in range(n) if i not in set(picks)]
    pads = free[len(free) - zeros:] if zeros else []
    length = full["inputs_embeds"].shape[1]
    image = sorted(picks + pads)
    index = list(range(start)) + [start + i for i in image] + list(range(start + n, length))
    return qwen_logits_on(model, full, index, [start + i for i in pads])


def _check_release_layout(release: Release, full: dict[str, Any], vision_start: int, n: int) -> None:
    """The release's LLM input is what the module docstring says: the prompt up to ``<|vision_start|>``, the
    picked rows of the slice ``[vision_start, vision_start + n)`` (zero vectors for its padding, at the slice's
    last position), then the rest from the image's last token on, each row at its own position."""
    import torch

    fp = release.calls["holov"]["final_position"].tolist()
    lm = release.calls["lm"]
    emb, pos = full["inputs_embeds"], full["position_ids"]
    length = emb.shape[1]
    rows = list(range(vision_start)) + [vision_start + (j if j >= 0 else n - 1) for j in fp] \
        + list(range(vision_start + n, length))
    want = emb[:, rows].clone()
    for slot, j in enumerate(fp):
        if j < 0:
            want[:, vision_start + slot] = 0
    assert lm["inputs_embeds"].shape == want.shape, "the release's LLM input has the slice layout"
    assert torch.allclose(lm["inputs_embeds"], want, atol=1e-5, rtol=0), "the release's LLM rows are the slice's picks"
    assert torch.equal(lm["position_ids"], pos[:, :, rows]), "the release's LLM positions are the picks' own"


def _kept(final_position: Any) -> tuple[list[int], int]:
    """``(picks, zero rows)`` of a ``HoloV`` ``final_position`` (its -1 entries are the zero-vector padding)."""
    fp = final_position.tolist()
    return [int(i) for i in fp if i >= 0], sum(1 for i in fp if i < 0)


def _received(final_position: Any, n: int) -> tuple[list[int], int, bool]:
    """``(image tokens, zero rows, vision start kept)`` the LLM receives from a ``HoloV`` ``final_position`` over
    the release's slice: slice index ``j`` is image token ``j - 1`` (``j = 0``: ``<|vision_start|>``), and the
    image's last token, after the slice, always reaches the LLM."""
    picks, zeros = _kept(final_position)
    return sorted({j - 1 for j in picks if j >= 1} | {n - 1}), zeros, 0 in picks


KINDS = {
    "aligned": "the release's HoloV on its tower's merger outputs (raster order) and its scores mapped to raster order "
               "(the documented deviation undone); logits: the release's picks in raster order at their own "
               "positions, zero vectors in the image's last unkept slots (vtprune's layout)",
    "overflow": "the release's HoloV on its tower's merger outputs and its scores mapped to raster order, as "
                "aligned; logits in vtprune's layout (its zero vectors in the image's last unkept slots)",
    "window order": "the release's HoloV on its tower's merger outputs and its scores in window order, as it leaves "
                    "them (the documented deviation alone, not asserted); logits in vtprune's layout",
    "shifted slice": "the release's HoloV on its own slice of the LLM input, which starts at <|vision_start|>, and "
                     "the scores mapped to raster order (the slice's offset alone, not asserted): slice row j is "
                     "image token j - 1 and gets token j's score, the image's last token always reaches the LLM",
    "release": "the release's forward as released (window-order scores, the slice from <|vision_start|>; not "
               "asserted); logits: the release's own LLM input (crop order, each row at its own positions)",
}


@single_threaded
def compare(ref: Path) -> list[dict[str, Any]]:
    import torch

    from vtprune.toy.tiny_qwen import tiny_qwen

    code, glob = release_code(ref)
    holov = glob["HoloV"]
    inputs = qwen_inputs()
    ids = inputs["input_ids"][0]
    rows = []
    for variant in ("random", "peaked"):
        model = tiny_qwen("qwen2_5_vl")
        if variant == "peaked":
            peaked(model, PEAK)
        cfg = model.config
        image = torch.nonzero(ids == cfg.image_token_id).flatten()
        start, n = int(image[0]), int(image.numel())
        vision_start = int(torch.nonzero(ids == cfg.vision_start_token_id)[0])
        assert vision_start == start - 1 and bool((image == start + torch.arange(n)).all())
        full = qwen_lm_inputs(model, inputs)
        release = Release(code, glob, model)
        raster_of = torch.argsort(release.window_index(inputs["image_grid_thw"]))  # window slot of each raster token
        cases = [(rate, None) for rate in RATES] + [(None, OVERFLOW)]
        for rate, overflow in cases:
            if rate is not None:  # the overflow case reuses the last run's tower outputs
                release_logits = release.run(inputs, rate)
                _check_release_layout(release, full, vision_start, n)
            call = release.calls["holov"]
            feats, window_scores = release.calls["visual"]
            assert torch.equal(call["attention"], window_scores), "HoloV gets the tower's scores as they are"
            feature_diff = float((feats - full["inputs_embeds"][0, start:start + n]).abs().max())
            if overflow is None:
                k, crops = int(call["keep"]), int(call["num_patches"])
                ours = _vtprune(model, inputs, k, start, {})
                where = f"prune_rate {rate}: keep {k} of {n}, num_patches {crops} (the release's rule)"
                kinds = ("aligned", "window order", "shifted slice", "release")
            else:
                k, crops = overflow
                ours = _vtprune(model, inputs, k, start, {"num_crops": crops})
                where = (f"overflow: num_crops={crops}, keep {k} of {n}; the release's HoloV with num_patches={crops} "
                         "(not its Qwen rule, which gives 2 here): crops can run out of tokens (zero_rows: the "
                         "release's zero-vector padding, release then vtprune)")
                kinds = ("overflow",)
            for kind in kinds:
                logit_diff = None
                if kind in ("aligned", "overflow", "window order"):
                    scores = window_scores if kind == "window order" else window_scores[raster_of]
                    with torch.no_grad():
                        _, fp = holov(feats[None], scores, crops, k)
                    picks, zeros = _kept(fp)
                    logits = _raster_reference(model, full, start, n, picks, zeros)
                    logit_diff = float((ours["logits"] - logits).abs().max())
                    extra = ""
                else:
                    if kind == "shifted slice":
                        with torch.no_grad():
                            _, fp = holov(call["image_tokens"], window_scores[raster_of], crops, k)
                    else:
                        fp = call["final_position"]
                        logit_diff = float((ours["logits"] - release_logits).abs().max())
                    picks, zeros, first = _received(fp, n)
                    extra = f" (<|vision_start|> kept: {'yes' if first else 'no'}; {len(picks)} image tokens received)"
                equal = set(picks) == set(ours["picks"]) and zeros == len(ours["zero"])
                row = {"method": METHOD, "model": f"{MODEL}, {kind}", "variant": variant, "budget": k,
                       "jaccard": jaccard(picks, ours["picks"]), "kept_equal": bool(equal),
                       "zero_rows": [zeros, len(ours["zero"])], "logit_max_abs": logit_diff,
                       "feature_max_abs": feature_diff if kind in ("aligned", "overflow") else None,
                       "note": f"{where}; {KINDS[kind]}{extra}"}
                if kind not in ("aligned", "overflow"):
                    row["asserted"] = False
                rows.append(row)
    return rows


def summary(rows: list[dict[str, Any]]) -> None:
    for r in rows:
        print(f"  {r['variant']} {r['budget']} {r['model'].rsplit(', ', 1)[-1]}: kept equal {r['kept_equal']}, "
              f"zero rows (release, vtprune) {r['zero_rows']}")


def main(argv: list[str] | None = None) -> int:
    return run_check(METHOD, compare, argv, __doc__ or "", passed=lambda r: r["kept_equal"] or r.get("asserted") is False, summary=summary)


if __name__ == "__main__":
    sys.exit(main())
