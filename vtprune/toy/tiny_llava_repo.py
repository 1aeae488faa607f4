"""Tiny random-weight models of the original LLaVA codebase (haotian-liu/LLaVA, ``pip install llava-torch``).

``LlavaLlamaForCausalLM`` normally downloads its CLIP tower (``mm_vision_tower="openai/clip-vit-large-
patch14-336"``). Here a tiny random ``CLIPVisionModel`` and its ``CLIPImageProcessor`` are saved with
``save_pretrained`` into a local folder first and ``mm_vision_tower`` points at it, so the repository's
own loading code (``CLIPVisionTower.load_model``, ``load_pretrained_model``) runs unchanged and offline.
Works under transformers 4.37 (the repository's pin) and 5.x wherever the ``llava`` package imports.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from vtprune.toy.tiny import _CORPUS, _vision_config, train_bpe

IMAGE_TOKEN_INDEX = -200  # llava.constants.IMAGE_TOKEN_INDEX: the placeholder id tokenizer_image_token inserts


def llava_repo_available() -> bool:
    """True when the LLaVA repository's model code imports (its ``__init__`` hides import errors)."""
    try:
        from llava.model.language_model.llava_llama import LlavaLlamaForCausalLM  # noqa: F401
    except Exception:
        return False
    return True


def tiny_repo_tokenizer():
    """A fast tokenizer with LLaVA's specials (``<unk> <s> </s> <pad>``), trained in-process; prepends ``<s>``."""
    from transformers import PreTrainedTokenizerFast

    tok = train_bpe(_CORPUS * 4, ["<unk>", "<s>", "</s>", "<pad>"], 400, bos="<s>")
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>", pad_token="<pad>")


def save_tiny_clip(folder: str | os.PathLike, *, hidden: int = 32, layers: int = 3, heads: int = 4,
                   image_size: int = 336, patch_size: int = 14, seed: int = 0) -> str:
    """Save a tiny random ``CLIPVisionModel`` + ``CLIPImageProcessor`` (336 px, patch 14: 576 patches)."""
    from transformers import CLIPImageProcessor, CLIPVisionModel

    folder = Path(folder)
    if not (folder / "config.json").exists():
        cfg = _vision_config(hidden, layers, heads, image_size=image_size, patch_size=patch_size)
        torch.manual_seed(seed)
        CLIPVisionModel(cfg).save_pretrained(folder)
        crop = {"height": image_size, "width": image_size}
        CLIPImageProcessor(size={"shortest_edge": image_size}, crop_size=crop).save_pretrained(folder)
    return str(folder)


def tiny_llava_repo(
    workdir: str | os.PathLike,
    *,
    hidden: int = 64,
    layers: int = 4,
    heads: int = 4,
    kv_heads: int | None = None,
    vision_hidden: int = 32,
    vision_layers: int = 3,
    select_feature: str = "patch",
    projector: str = "mlp2x_gelu",
    padding_side: str = "right",
    attn_implementation: str = "sdpa",
    seed: int = 0,
):
    """A tiny random ``llava.model.LlavaLlamaForCausalLM`` (LLaVA-1.5's geometry), its tokenizer and image processor.

    Args:
        workdir: folder for the saved tiny CLIP towers (one per ``vision_hidden`` x ``vision_layers``,
            reused when already there).
        select_feature: ``mm_vision_select_feature``: ``"patch"`` (576 tokens per image, LLaVA-1.5) or
            ``"cls_patch"`` (577, CLS first).
        padding_side: ``tokenizer_padding_side`` of the config (where the repository re-pads a batch
            after splicing the image features in: ``"right"`` by default, ``"left"``).

    Returns:
        ``(model, tokenizer, image_processor)``, the model in eval mode.
    """
    from llava.model.language_model.llava_llama import LlavaConfig, LlavaLlamaForCausalLM

    tok = tiny_repo_tokenizer()
    clip = save_tiny_clip(Path(workdir) / f"tiny-clip-vit-{vision_hidden}x{vision_layers}", hidden=vision_hidden,
                          layers=vision_layers)
    cfg = LlavaConfig(
        vocab_size=len(tok), hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads or heads, max_position_embeddings=4096,
        pad_token_id=3, bos_token_id=1, eos_token_id=2,
        mm_vision_tower=clip, mm_hidden_size=vision_hidden, mm_projector_type=projector,
        mm_vision_select_layer=-2, mm_vision_select_feature=select_feature, mm_patch_merge_type="flat",
        image_aspect_ratio="pad", mm_use_im_start_end=False, mm_use_im_patch_token=False,
        tokenizer_padding_side=padding_side,
    )
    cfg._attn_implementation = attn_implementation
    torch.manual_seed(seed)
    model = LlavaLlamaForCausalLM(cfg)
    tower = model.get_vision_tower()
    if not tower.is_loaded:
        tower.load_model()
    from transformers import CLIPImageProcessor

    return model.eval(), tok, CLIPImageProcessor.from_pretrained(clip)
