"""Tiny random-weight LLaVA models, built from configs with an in-process tokenizer.

No weights, tokenizers or datasets are downloaded: the tokenizer is a byte-level BPE trained here on a
small corpus, and the models are ``_from_config`` with small sizes (comments give the real sizes).
Used by the tests and by ``vtprune run`` before trained toy models exist.
"""

from __future__ import annotations

import functools

import torch

LLAVA_SPECIALS = ["<unk>", "<s>", "</s>", "<pad>", "<image>"]

_CORPUS = [
    "USER: <image>\nWhat is in the picture? ASSISTANT: A red square on a blue background.",
    "USER: Describe the image. ASSISTANT: There are two circles and a triangle.",
    "How many objects are there? Which colour is the large shape? Where is the small one?",
    "the quick brown fox jumps over the lazy dog 0123456789 left right top bottom centre",
    "Answer with a single word. yes no red green blue yellow circle square triangle",
]


def train_bpe(corpus: list[str], specials: list[str], vocab_size: int, bos: str | None = None):
    """A byte-level BPE ``tokenizers.Tokenizer`` trained in-process on ``corpus`` (specials are atomic).

    With ``bos``, a post-processor prepends that token to every encoded text.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    unk = "<unk>" if "<unk>" in specials else None
    tok = Tokenizer(models.BPE(unk_token=unk))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus, trainer=trainer)
    if bos is not None:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A $B", special_tokens=[(bos, tok.token_to_id(bos))])
    return tok


def llava_tokenizer(corpus: list[str], vocab_size: int):
    """A ``PreTrainedTokenizerFast`` with the LLaVA special tokens, BPE-trained on ``corpus``."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=train_bpe(corpus, LLAVA_SPECIALS, vocab_size, bos="<s>"),
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        extra_special_tokens={"image_token": "<image>"},
    )


@functools.cache
def tiny_llava_tokenizer(vocab_size: int = 400):
    """A byte-level BPE ``PreTrainedTokenizerFast`` with the LLaVA special tokens, trained in-process."""
    return llava_tokenizer(_CORPUS * 4, vocab_size)


def _text_config(vocab_size: int, hidden: int, layers: int, heads: int, kv_heads: int, intermediate: int | None = None):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,  # 4096 in LLaVA-1.5-7B
        intermediate_size=intermediate or hidden * 2,  # 11008
        num_hidden_layers=layers,  # 32
        num_attention_heads=heads,  # 32
        num_key_value_heads=kv_heads,  # 32
        max_position_embeddings=4096,
        pad_token_id=3,
        bos_token_id=1,
        eos_token_id=2,
    )


def _vision_config(hidden: int, layers: int, heads: int, image_size: int = 336, patch_size: int = 14,
                   intermediate: int | None = None):
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(
        image_size=image_size,  # 336 in LLaVA-1.5
        patch_size=patch_size,  # 14
        hidden_size=hidden,  # 1024
        intermediate_size=intermediate or hidden * 2,  # 4096
        num_hidden_layers=layers,  # 24
        num_attention_heads=heads,  # 16
        projection_dim=hidden,
    )


def tiny_llava(
    *,
    hidden: int = 64,
    layers: int = 4,
    heads: int = 4,
    kv_heads: int | None = None,
    vision_hidden: int = 32,
    vision_layers: int = 3,
    vision_heads: int = 4,
    attn_implementation: str = "sdpa",
    seed: int = 0,
    next_: bool = False,
    intermediate: int | None = None,
    vision_intermediate: int | None = None,
    vocab_size: int | None = None,
):
    """Build a tiny random ``LlavaForConditionalGeneration`` (or ``LlavaNextForConditionalGeneration``).

    The vision tower keeps LLaVA-1.5's geometry (336 px, patch 14: 576 patch tokens per image) so that
    token counts match the real model; only the widths and depths are small. ``intermediate`` /
    ``vision_intermediate`` (MLP widths, default twice the hidden size) and ``vocab_size`` (default the
    tiny tokenizer's) give real models' shapes (`vtprune bench --size 7b`).
    """
    from transformers import (
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
    )

    tok = tiny_llava_tokenizer()
    image_token_id = tok.convert_tokens_to_ids("<image>")
    text = _text_config(vocab_size or len(tok), hidden, layers, heads, kv_heads or heads, intermediate)
    vision = _vision_config(vision_hidden, vision_layers, vision_heads, intermediate=vision_intermediate)
    common = dict(
        image_token_id=image_token_id,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
    )
    torch.manual_seed(seed)
    if next_:
        cfg = LlavaNextConfig(
            vision_config=vision,
            text_config=text,
            image_grid_pinpoints=[[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]],
            image_seq_length=576,
            **common,
        )
        model = LlavaNextForConditionalGeneration._from_config(cfg, attn_implementation=attn_implementation)
    else:
        cfg = LlavaConfig(vision_config=vision, text_config=text, image_seq_length=576, **common)
        model = LlavaForConditionalGeneration._from_config(cfg, attn_implementation=attn_implementation)
    return model.eval()


def tiny_llava_next(**kwargs):
    """A tiny random ``LlavaNextForConditionalGeneration`` (anyres tiling, image-newline tokens)."""
    return tiny_llava(next_=True, **kwargs)


def tiny_llava_processor(next_: bool = False):
    """The matching processor (CLIP-style image processor + the in-process tokenizer)."""
    from transformers import (
        CLIPImageProcessorPil,
        LlavaNextImageProcessorPil,
        LlavaNextProcessor,
        LlavaProcessor,
    )

    tok = tiny_llava_tokenizer()
    size = {"shortest_edge": 336}
    crop = {"height": 336, "width": 336}
    if next_:
        ip = LlavaNextImageProcessorPil(
            size=size,
            crop_size=crop,
            image_grid_pinpoints=[[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]],
        )
        return LlavaNextProcessor(
            image_processor=ip,
            tokenizer=tok,
            patch_size=14,
            vision_feature_select_strategy="default",
            num_additional_image_tokens=1,
        )
    ip = CLIPImageProcessorPil(size=size, crop_size=crop)
    return LlavaProcessor(
        image_processor=ip,
        tokenizer=tok,
        patch_size=14,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    )
