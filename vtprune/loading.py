"""Loading models and building inputs, shared by the command line and the applications above `vtprune.api`.

`resolve_model` / `load_model` turn a ``--model`` value (a built-in tiny random model, a trained toy model
shipped as package data, or a checkpoint directory) into a model and its processor; `default_prompt`
writes a one-image question (`QUESTION` by default) in the model's format; `synthetic_image` is the
seeded test image; `parse_options` reads ``--option NAME=VALUE`` pairs. `vtprune.cli`, `vtprune.tune`,
`vtprune.calibrate`, `vtprune.eval` and `vtprune.demo` import these from here, never from the CLI.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from vtprune.config import ConfigError

BUILTIN_MODELS = {
    "tiny-llava": dict(next_=False),
    "small-llava": dict(next_=False, hidden=512, layers=8, heads=8, vision_hidden=64, vision_layers=4),
    "tiny-llava-next": dict(next_=True),
    "tiny-qwen2-vl": dict(qwen="qwen2_vl"),
    "tiny-qwen2.5-vl": dict(qwen="qwen2_5_vl"),
    "tiny-qwen3-vl": dict(qwen="qwen3_vl"),
}

# trained built-ins: weights shipped as package data in vtprune/toy/weights/<name>/ (built by scripts/train_toy.py)
TOY_MODELS = ("toy-llava", "toy-qwen2vl")

QUESTION = "What is in the picture?"


class ModelNotFoundError(ValueError):
    """``--model`` names no built-in model, no built toy model and no local checkpoint directory."""


def parse_options(pairs: list[str]) -> dict:
    """``["NAME=VALUE", ...]`` (``--option``) as a dict; each VALUE is read as JSON when it parses, else kept a
    string. A pair without ``=`` is a `ConfigError` (the CLI exits 2 with it)."""
    options = {}
    for pair in pairs:
        if "=" not in pair:
            raise ConfigError(f"--option expects NAME=VALUE, got {pair!r}")
        name, value = pair.split("=", 1)
        try:
            options[name] = json.loads(value)
        except json.JSONDecodeError:
            options[name] = value
    return options


def toy_weights_dir(name: str) -> Path:
    """Where the trained toy model ``name`` (one of `TOY_MODELS`) is shipped: ``vtprune/toy/weights/<name>/``."""
    return Path(__file__).resolve().parent / "toy" / "weights" / name


def resolve_model(name: str) -> tuple[str, str | dict]:
    """``("builtin", spec)``, ``("toy", directory)`` or ``("dir", path)`` for a ``--model`` value.

    Raises `ModelNotFoundError` (with the fix) for an unknown name, a toy model whose weights are not
    built yet, or a path that is not a directory.
    """
    if name in BUILTIN_MODELS:
        return "builtin", dict(BUILTIN_MODELS[name])
    if name in TOY_MODELS:
        where = toy_weights_dir(name)
        if not where.is_dir():
            raise ModelNotFoundError(
                f"the trained toy model {name!r} is not built yet: its weights belong in {where}; "
                "build them with `python scripts/train_toy.py`, or use a tiny random model "
                f"({', '.join(BUILTIN_MODELS)}) or a local checkpoint directory"
            )
        return "toy", str(where)
    if os.path.isdir(name):
        return "dir", name
    raise ModelNotFoundError(
        f"--model {name!r} is neither a built-in model ({', '.join((*TOY_MODELS, *BUILTIN_MODELS))}) "
        "nor a local checkpoint directory (no downloads are made)"
    )


def load_model(name: str, attn: str = "sdpa", dtype=None):
    """A built-in model by name (tiny random, or a trained toy model), or a checkpoint directory saved
    with ``save_pretrained``. ``dtype`` (a ``torch.dtype``) is passed to ``from_pretrained``."""
    from vtprune.toy.tiny import tiny_llava, tiny_llava_processor
    from vtprune.toy.tiny_qwen import tiny_qwen, tiny_qwen_processor

    kind, where = resolve_model(name)  # ModelNotFoundError names the fix (the CLI exits 2 with it)
    if kind == "builtin":
        spec = where
        if "qwen" in spec:
            model, processor = tiny_qwen(spec["qwen"], attn_implementation=attn), tiny_qwen_processor(spec["qwen"])
        else:
            next_ = spec.pop("next_")
            model = tiny_llava(next_=next_, attn_implementation=attn, **spec)
            processor = tiny_llava_processor(next_=next_)
        model.config.name_or_path = name  # names its calibration file (vtprune.calibration)
        if dtype is not None:
            model = model.to(dtype)
        return model, processor
    from transformers import AutoModelForImageTextToText, AutoProcessor

    extra = {"dtype": dtype} if dtype is not None else {}
    model = AutoModelForImageTextToText.from_pretrained(where, attn_implementation=attn, **extra).eval()
    if kind == "toy":
        model.config.name_or_path = name
    return model, AutoProcessor.from_pretrained(where)


def default_prompt(model, processor, question: str = QUESTION) -> str:
    """A one-image question in the model's own format (its chat template when the processor has one)."""
    if getattr(processor, "chat_template", None):
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
        return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    if model.config.model_type.startswith("qwen"):
        return (f"<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>{question}<|im_end|>\n"
                "<|im_start|>assistant\n")
    return f"USER: <image>\n{question} ASSISTANT:"


def placeholder_in(model, processor, text: str) -> str | None:
    """The model's visual placeholder (``<image>``, ``<|image_pad|>``, ...) that ``text`` (a user's question)
    contains, or None. A question holding one would make the prompt carry more placeholders than images,
    which the processor rejects with an error about token counts; callers name the problem instead."""
    from vtprune.adapters import adapter_for

    tokenizer = getattr(processor, "tokenizer", processor)
    ids = set(tokenizer(text, add_special_tokens=False)["input_ids"])
    for token_id in adapter_for(model).visual_token_ids():
        if token_id in ids:
            return tokenizer.convert_ids_to_tokens(int(token_id))
    return None


def synthetic_image(seed: int = 0):
    """A 500 x 400 PIL image of a few coloured rectangles on a plain background, the same for the same ``seed``
    (what `vtprune run` and `vtprune bench` feed the model)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    h, w = 400, 500
    img = np.zeros((h, w, 3), dtype=np.uint8) + rng.integers(0, 255, 3, dtype=np.uint8)
    for _ in range(6):  # a few coloured rectangles on a plain background
        y, x = rng.integers(0, h - 60), rng.integers(0, w - 60)
        img[y:y + rng.integers(20, 120), x:x + rng.integers(20, 120)] = rng.integers(0, 255, 3)
    return Image.fromarray(img)
