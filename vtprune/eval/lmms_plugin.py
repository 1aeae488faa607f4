"""vtprune models for lmms-eval: its own Hugging Face model classes, pruned by vtprune.

    lmms-eval --model vtprune_llava_hf \
        --model_args pretrained=/data/llava-1.5-7b-hf,method=fastv,keep=64,layer=2 \
        --tasks mme --batch_size 1 --output_path results/

Registered through lmms-eval's ``lmms_eval.models`` entry-point group (see ``pyproject.toml``), so
installing vtprune next to lmms-eval (>= 0.7) is all it takes. Each model is lmms-eval's class with
the same arguments plus vtprune's:

- ``method`` (default ``fastv``), ``keep`` (an int per image or a fraction, default 64), ``layer``
  (the in-LLM pruning layer; default: the method's), and ``option_<name>=<value>`` for a method
  option (``option_seed=3``, ``option_vision_layer=-2``).

The model is patched once, after lmms-eval has loaded it (`vtprune.apply`); a bad method, budget or
layer fails there with vtprune's `ConfigError`, before any sample runs. lmms-eval's own generate
loop, batching and data parallelism (``accelerate launch``) are unchanged.
"""

from __future__ import annotations

import inspect
import os
from typing import Any

import vtprune

# our name -> {"simple"|"chat": (lmms-eval module, class)}: the lmms-eval classes a vtprune model wraps.
# lmms-eval picks the chat class when a model has one (it needs the processor's chat template, as real
# checkpoints have) and the simple class with --force_simple.
WRAPPED = {
    "vtprune_llava_hf": {"simple": ("lmms_eval.models.simple.llava_hf", "LlavaHf"),
                         "chat": ("lmms_eval.models.chat.llava_hf", "LlavaHf")},
    "vtprune_qwen2_vl": {"simple": ("lmms_eval.models.simple.qwen2_vl", "Qwen2_VL")},
    "vtprune_qwen2_5_vl": {"simple": ("lmms_eval.models.simple.qwen2_5_vl", "Qwen2_5_VL"),
                           "chat": ("lmms_eval.models.chat.qwen2_5_vl", "Qwen2_5_VL")},
}
# our class names: VtpruneLlavaHf, VtpruneLlavaHfChat, ...
CLASS_NAMES = {(name, kind): "Vtprune" + cls + ("Chat" if kind == "chat" else "")
               for name, kinds in WRAPPED.items() for kind, (_, cls) in kinds.items()}
OPTION_PREFIX = "option_"


def manifests() -> list:
    """The ``lmms_eval.models`` entry-point payload: one `ModelManifest` per vtprune model."""
    from lmms_eval.models.registry_v2 import ModelManifest

    def path(name, kind):
        return f"{__name__}.{CLASS_NAMES[name, kind]}" if kind in WRAPPED[name] else None

    return [ModelManifest(model_id=name, simple_class_path=path(name, "simple"), chat_class_path=path(name, "chat"))
            for name in WRAPPED]


def prune_arguments(method: Any = "fastv", keep: Any = 64, layer: Any = None, **options: Any) -> dict[str, Any]:
    """`vtprune.apply` keywords from ``--model_args`` values (lmms-eval has already turned "64" into 64).

    ``layer`` may be ``None``/``"none"``/``""`` (the method's default); ``keep`` an int or a float;
    options arrive without their ``option_`` prefix. Raises `vtprune.ConfigError` on a wrong type.
    """
    if isinstance(keep, str):
        try:
            keep = float(keep) if "." in keep else int(keep)
        except ValueError:
            raise vtprune.ConfigError(f"keep={keep!r}: give an int (tokens per image) or a fraction in (0, 1]") from None
    if isinstance(layer, str):
        if layer.strip().lower() in ("", "none", "default"):
            layer = None
        else:
            try:
                layer = int(layer)
            except ValueError:
                raise vtprune.ConfigError(f"layer={layer!r}: give an int (the in-LLM pruning layer) or none") from None
    # lmms-eval reads "-2" as the float -2.0 (only digit strings become ints): integral floats are ints
    options = {k: int(v) if isinstance(v, float) and v.is_integer() else v for k, v in options.items()}
    return dict(method=str(method), keep=keep, layer=layer, **options)


def _pruned_class(base: type, name: str) -> type:
    def __init__(self, method="fastv", keep=64, layer=None, **kwargs):
        options = {k[len(OPTION_PREFIX):]: kwargs.pop(k) for k in list(kwargs) if k.startswith(OPTION_PREFIX)}
        prune = prune_arguments(method, keep, layer, **options)
        if "device_map" in inspect.signature(base.__init__).parameters and not kwargs.get("device_map") \
                and int(os.environ.get("WORLD_SIZE", "1")) <= 1:
            # llava_hf's default device_map "" is refused by transformers >= 5.24: load onto the device
            kwargs["device_map"] = str(kwargs.get("device", "cuda"))
        base.__init__(self, **kwargs)
        vtprune.apply(self.model, **prune)
        self.vtprune_config = vtprune.config_of(self.model)

    doc = f"lmms-eval's {base.__name__}, pruned by vtprune (arguments: method, keep, layer, option_<name>)."
    return type(name, (base,), {"__init__": __init__, "__doc__": doc, "__module__": __name__})


def __getattr__(attr: str) -> type:
    """The wrapped classes, built on first use (importing this module does not import lmms-eval)."""
    import importlib

    for (name, kind), cls_name in CLASS_NAMES.items():
        if attr == cls_name:
            module, base = WRAPPED[name][kind]
            cls = _pruned_class(getattr(importlib.import_module(module), base), cls_name)
            globals()[cls_name] = cls
            return cls
    raise AttributeError(f"module {__name__!r} has no attribute {attr!r}")
