"""Tiny random-weight Qwen2-VL, Qwen2.5-VL and Qwen3-VL models, built from configs, no downloads.

The geometry is the real one (patch 14 or 16, 2x2 merger, temporal patch 2, M-RoPE, Qwen2.5-VL's window
attention with full-attention blocks, Qwen3-VL's deepstack); only widths and depths are small (comments
give the 7B/8B values). The tokenizer is a byte-level BPE trained in-process with Qwen's special tokens.
"""

from __future__ import annotations

import functools

import torch

QWEN_SPECIALS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
    "<|image_pad|>", "<|video_pad|>",
]

QWEN_KINDS = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")

_CORPUS = [
    "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>What is in the picture?<|im_end|>\n",
    "<|im_start|>assistant\nA red square on a blue background.<|im_end|>",
    "How many objects are there? Which colour is the large shape? Where is the small one?",
    "Describe the video. What moves from left to right? the quick brown fox jumps over the lazy dog",
    "Answer with a single word. yes no red green blue yellow circle square triangle 0123456789",
]


@functools.cache
def tiny_qwen_tokenizer(vocab_size: int = 400):
    """A byte-level BPE ``PreTrainedTokenizerFast`` with the Qwen-VL special tokens, trained in-process."""
    from transformers import PreTrainedTokenizerFast

    from vtprune.toy.tiny import train_bpe

    return PreTrainedTokenizerFast(
        tokenizer_object=train_bpe(_CORPUS * 4, QWEN_SPECIALS, vocab_size),
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        extra_special_tokens={"image_token": "<|image_pad|>", "video_token": "<|video_pad|>"},
    )


def _ids() -> dict[str, int]:
    tok = tiny_qwen_tokenizer()
    names = dict(image_token_id="<|image_pad|>", video_token_id="<|video_pad|>",
                 vision_start_token_id="<|vision_start|>", vision_end_token_id="<|vision_end|>")
    return {k: tok.convert_tokens_to_ids(v) for k, v in names.items()}


def tiny_qwen(
    kind: str = "qwen2_vl",
    *,
    hidden: int = 64,
    layers: int = 4,
    heads: int = 4,
    kv_heads: int = 2,
    vision_hidden: int = 32,
    vision_layers: int = 4,
    vision_heads: int = 4,
    attn_implementation: str = "sdpa",
    seed: int = 0,
    intermediate: int | None = None,
    vision_intermediate: int | None = None,
    vocab_size: int | None = None,
    fullatt_blocks: list[int] | None = None,
):
    """Build a tiny random ``Qwen2VLForConditionalGeneration`` / ``Qwen2_5_VL...`` / ``Qwen3VL...``.

    ``kind`` is the ``model_type``: ``"qwen2_vl"``, ``"qwen2_5_vl"`` or ``"qwen3_vl"``. ``intermediate``
    / ``vision_intermediate`` (MLP widths, default twice the hidden size), ``vocab_size`` (default the
    tiny tokenizer's) and ``fullatt_blocks`` (Qwen2.5-VL's full-attention vision blocks, default the
    second and the last) give real models' shapes (`vtprune bench --size 7b`).
    """
    if kind not in QWEN_KINDS:
        raise ValueError(f"kind must be one of {QWEN_KINDS}, got {kind!r}")
    import transformers as tf

    tok = tiny_qwen_tokenizer()
    head_dim = hidden // heads  # 128 in the 7B models
    section = [head_dim // 2 - 2 * (head_dim // 6), head_dim // 6, head_dim // 6]  # [16, 24, 24] at 128
    text = dict(
        vocab_size=vocab_size or len(tok),
        hidden_size=hidden,  # 3584 (Qwen2-VL-7B), 4096 (Qwen3-VL-8B)
        intermediate_size=intermediate or hidden * 2,  # 18944
        num_hidden_layers=layers,  # 28, 36
        num_attention_heads=heads,  # 28, 32
        num_key_value_heads=kv_heads,  # 4, 8
        max_position_embeddings=4096,
        rope_parameters={"rope_type": "default", "rope_theta": 1e4, "mrope_section": section},
        bos_token_id=None,
        eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"),
        pad_token_id=tok.convert_tokens_to_ids("<|endoftext|>"),
    )
    vision = dict(depth=vision_layers, num_heads=vision_heads, spatial_merge_size=2, temporal_patch_size=2)
    if kind == "qwen2_vl":
        mlp_ratio = vision_intermediate // vision_hidden if vision_intermediate else 2  # 4 in Qwen2-VL-7B
        vision.update(embed_dim=vision_hidden, hidden_size=hidden, mlp_ratio=mlp_ratio, patch_size=14)  # 1280, 32 deep
        cfg = tf.Qwen2VLConfig(text_config=text, vision_config=vision, **_ids())
        cls = tf.Qwen2VLForConditionalGeneration
    elif kind == "qwen2_5_vl":
        vision.update(hidden_size=vision_hidden, out_hidden_size=hidden,
                      intermediate_size=vision_intermediate or vision_hidden * 2, patch_size=14, window_size=112,
                      fullatt_block_indexes=fullatt_blocks or [1, vision_layers - 1])  # [7, 15, 23, 31] of 32
        cfg = tf.Qwen2_5_VLConfig(text_config=text, vision_config=vision, **_ids())
        cls = tf.Qwen2_5_VLForConditionalGeneration
    else:
        text["head_dim"] = head_dim
        text["rope_parameters"] = dict(text["rope_parameters"], mrope_interleaved=True)
        vision.update(hidden_size=vision_hidden, out_hidden_size=hidden,
                      intermediate_size=vision_intermediate or vision_hidden * 2, patch_size=16, num_position_embeddings=256,  # 2304 (48 x 48)
                      deepstack_visual_indexes=[0, 1])  # [8, 16, 24] of 27
        cfg = tf.Qwen3VLConfig(text_config=text, vision_config=vision, **_ids())
        cls = tf.Qwen3VLForConditionalGeneration
    torch.manual_seed(seed)
    return cls._from_config(cfg, attn_implementation=attn_implementation).eval()


def tiny_qwen_processor(kind: str = "qwen2_vl", *, max_pixels: int = 320 * 320):
    """The matching processor (Qwen image and video processors + the in-process tokenizer).

    ``max_pixels`` bounds the tokens per image (320 x 320 px gives at most about 130 merged tokens).
    """
    import transformers as tf

    patch = 16 if kind == "qwen3_vl" else 14
    size = {"shortest_edge": 4 * patch * patch, "longest_edge": max_pixels}
    common = dict(patch_size=patch, merge_size=2, temporal_patch_size=2, size=size)
    if kind == "qwen3_vl":
        image = tf.Qwen2VLImageProcessorPil(**common)
        video = tf.Qwen3VLVideoProcessor(**common, fps=2, min_frames=2, max_frames=8, do_sample_frames=False)
        return tf.Qwen3VLProcessor(image_processor=image, tokenizer=tiny_qwen_tokenizer(), video_processor=video)
    image = tf.Qwen2VLImageProcessorPil(**common)
    video = tf.Qwen2VLVideoProcessor(**common, do_sample_frames=False)
    proc_cls = tf.Qwen2VLProcessor if kind == "qwen2_vl" else tf.Qwen2_5_VLProcessor
    return proc_cls(image_processor=image, tokenizer=tiny_qwen_tokenizer(), video_processor=video)
