"""Adapter base class and registry: what a model family must tell vtprune.

An adapter describes the model: its parts (the core module whose ``forward`` receives ``input_ids`` and
``pixel_values``, the decoder layers, the vision attention modules), the visual tokens of each image
(`ImageTokens`) and the layout they make (`build_layout`), how positions follow a shortened prompt, and
how to collect the signals a method declares (vision-side score rows, features). It installs nothing
itself: the runtime (`vtprune.runtime`) does, through this description.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from vtprune.adapters.attention_rows import vit_cls_attention, vit_context_relevance
from vtprune.config import ConfigError
from vtprune.kernels import compact
from vtprune.layout import VisualLayout
from vtprune.perthread import PerThread
from vtprune.state import PruneState, Session, VisionRecord


class UnsupportedModelError(TypeError):
    """The model (or its cache) is not one vtprune can patch; the message lists what is supported."""


@dataclass
class ImageTokens:
    """The visual tokens one image contributes to the sequence, ``n`` of them in order.

    - ``source``: ``[n]`` long, ``tile * (patches + 1) + column`` into the vision encoder's CLS attention
      rows ``[tiles of the whole call, patches + 1]`` (column 0 is CLS itself; tiles are counted across
      all images of the call), -1 for tokens the encoder did not produce.
    - ``coords``: ``[n, 3]`` long ``(segment, row, col)``.
    - ``prunable``: ``[n]`` bool.
    """

    source: torch.Tensor
    coords: torch.Tensor
    prunable: torch.Tensor


@dataclass
class ImageInputs:
    """The images of one prefill call, from the call's arguments or from the encoder's record.

    transformers' ``generate()`` runs the image encoder first and passes only ``mm_encoder_outputs``,
    so ``pixel_values`` may be None while ``record`` holds the geometry of the encoded images.
    """

    pixel_values: torch.Tensor | None
    image_sizes: Any
    strategy: str | None
    layer: Any
    record: VisionRecord | None

    def features(self) -> list[torch.Tensor] | None:
        """Per image ``[n_i, D]`` projected features, if the encoder has run for this call."""
        if self.record is None:
            return None
        out = self.record.output
        return list(out.pooler_output if hasattr(out, "pooler_output") else out[1])


def image_inputs(state: PruneState, kwargs: dict[str, Any]) -> ImageInputs:
    """Collect the images of a prefill call; use the encoder's record when only features were passed."""
    pixels = kwargs.get("pixel_values")
    enc = (kwargs.get("mm_encoder_outputs") or {}).get("image")
    strategy = kwargs.get("vision_feature_select_strategy")
    if pixels is not None or enc is None:
        return ImageInputs(pixels, kwargs.get("image_sizes"), strategy, kwargs.get("vision_feature_layer"), None)
    rec = match_record(state, state.vision_record, enc, "image")
    return ImageInputs(None, rec.geometry, rec.strategy or strategy, kwargs.get("vision_feature_layer"), rec)


def match_record(state: PruneState, rec: VisionRecord | None, enc: Any, modality: str) -> VisionRecord:
    """The record of the encoder run that produced ``enc`` (features passed in ``mm_encoder_outputs``)."""
    if rec is None:
        raise ValueError(
            f"the {modality} features passed in mm_encoder_outputs were not computed by this patched model's "
            f"get_{modality}_features, so vtprune cannot locate the {modality} tokens; pass the pixel inputs instead"
        )
    if len(enc.pooler_output) != rec.n_images:
        return _expanded_record(state, rec, enc)
    if rec.output is not enc:
        return VisionRecord(enc, rec.geometry, rec.strategy, rec.n_images, rec.cls_attention, rec.features,
                            extras=rec.extras)
    return rec


def _expanded_record(state: PruneState, rec: VisionRecord, enc: Any) -> VisionRecord:
    """Follow generate()'s expansion of the encoded images (num_beams / num_return_sequences > 1).

    generate() repeats each prompt's image group for each of its sequences, reusing the same feature
    tensors; map every expanded image back to its original by identity and gather the recorded
    geometry, CLS rows, method extras, pixel values and the tower's hidden states (per tile or per image)
    the same way.
    """
    ids = {id(t): j for j, t in enumerate(rec.features)}  # generate() may have expanded rec.output in place
    try:
        idx = [ids[id(t)] for t in enc.pooler_output]
    except KeyError:
        raise ValueError(
            "the image features in mm_encoder_outputs do not come from this patched model's "
            "get_image_features, so vtprune cannot locate the image tokens; pass pixel_values instead"
        ) from None
    sizes = rec.geometry
    if sizes is not None:
        sizes = sizes[torch.tensor(idx)] if isinstance(sizes, torch.Tensor) else [sizes[j] for j in idx]
    tiles = state.adapter.tiles_per_image(rec.geometry, rec.n_images)
    starts = [sum(tiles[:j]) for j in range(len(tiles))]
    rows = torch.cat([torch.arange(starts[j], starts[j] + tiles[j]) for j in idx])

    def expand(value: Any) -> Any:
        """A per-tile (``[tiles * k, ...]``: k rows per tile, Qwen-VL's patches per merged token) or
        per-image (``[n_images, ...]``) recorded tensor, expanded."""
        if not isinstance(value, torch.Tensor) or value.dim() == 0 or sum(tiles) == 0:
            return value
        if value.shape[0] % sum(tiles) == 0:
            k = value.shape[0] // sum(tiles)
            return value[(rows[:, None] * k + torch.arange(k)).flatten().to(value.device)]
        if value.shape[0] == rec.n_images:
            return value[torch.tensor(idx, device=value.device)]
        return value

    cls = expand(rec.cls_attention) if rec.cls_attention is not None else None
    extras = {k: expand(v) for k, v in rec.extras.items()}  # VisionZip's keys, VFlowOpt's context rows, ...
    hidden = getattr(enc, "hidden_states", None)
    if isinstance(hidden, (tuple, list)):  # the tower's per-tile hidden states (ZOO's projector input)
        enc = type(enc)(**{k: v for k, v in enc.items()})
        enc.hidden_states = tuple(expand(h) for h in hidden)
    return VisionRecord(enc, sizes, rec.strategy, len(idx), cls, list(enc.pooler_output),
                        pixel_values=expand(rec.pixel_values), extras=extras)


class Adapter:
    """Base class of model adapters, registered by ``config.model_type``.

    The defaults implement the LLaVA family (one image token id, a CLIP tower with a CLS token, 1-D
    positions); the Qwen-VL adapters override the geometry, scoring and position methods.
    """

    model_types: ClassVar[tuple[str, ...]] = ()
    description: ClassVar[str] = ""
    # name of the modality -> the core's encoder method whose runs are recorded
    encoders: ClassVar[dict[str, str]] = {"image": "get_image_features"}
    # "clip": a CLS token and one LLM token per patch; "qwen": no CLS, one LLM token per 2x2 patch group
    vision_family: ClassVar[str] = "clip"
    # the oldest transformers release the adapter works with (the transformers-v5 model classes need 5.0)
    min_transformers: ClassVar[str] = "5.0"
    # whether an image is several encoder tiles whose grids the model crops into its sequence (LLaVA-NeXT's
    # anyres unpadding): a scorer that selects per tile (`Scorer.per_tile`) does so only there
    tiled: ClassVar[bool] = False

    # host geometry of the encoder call running now in this thread (see the runtime's encoder wrapper)
    encoding_geometry = PerThread()

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self._host_copies: list[tuple[torch.Tensor, torch.Tensor]] = []

    def host_of(self, t: torch.Tensor) -> torch.Tensor:
        """A host copy of a small geometry tensor (``image_grid_thw``, ``image_sizes``), read from the device
        once per tensor object: the layout, the encoder hooks and the score mapping of one prefill share it."""
        for src, host in self._host_copies:
            if src is t:
                return host
        host = t.cpu()
        self.keep_host_copy(t, host)
        return host

    def record_geometry_on_host(self, rec: Any) -> Any:
        """An encoder record's geometry (`VisionRecord.geometry`) as a host copy (`host_of`) where it is a tensor."""
        return self.host_of(rec.geometry) if isinstance(rec.geometry, torch.Tensor) else rec.geometry

    def keep_host_copy(self, t: torch.Tensor, host: torch.Tensor) -> None:
        """Remember ``host`` as the host copy of ``t`` (read along with the prefill's token kinds)."""
        self._host_copies = [(t, host), *self._host_copies[:3]]

    # the model-call keywords holding small geometry tensors (`host_of`), read with the prefill's one read
    geometry_keys: ClassVar[tuple[str, ...]] = ()

    def geometry_inputs(self, kwargs: dict[str, Any], records: tuple[Any, ...] = ()) -> list[torch.Tensor]:
        """The geometry tensors whose host copies the layout will need and that have none yet: the call's
        (`geometry_keys`) and, where generate() encoded the images before the call, those of the latest
        encoder ``records`` (`VisionRecord.geometry`)."""
        found = [kwargs.get(k) for k in self.geometry_keys] + [getattr(r, "geometry", None) for r in records]
        out: list[torch.Tensor] = []
        for t in found:
            if isinstance(t, torch.Tensor) and t.numel() and not t.is_floating_point() \
                    and not any(t is u for u in out) and not any(t is src for src, _ in self._host_copies):
                out.append(t)
        return out

    def host_geometry(self, modality: str, bound: dict[str, Any]) -> Any:
        """The host copy of an encoder call's geometry argument (None where the family has none)."""
        return None

    def require_core(self, tower: str, loader: str) -> nn.Module:
        """``model.model`` with ``.language_model`` and the vision tower ``tower``, or a clear error."""
        core = getattr(self.model, "model", None)
        if core is None or not hasattr(core, "language_model") or not hasattr(core, tower):
            raise UnsupportedModelError(
                f"{type(self.model).__name__} is not a {self.model_types[0]} *ForConditionalGeneration model "
                f"(expected .model.language_model and .model.{tower}); pass the full model as loaded by "
                f"AutoModelForImageTextToText / {loader}"
            )
        return core

    # ---- what each family provides ------------------------------------------------------------
    # the defaults fit transformers v5's *ForConditionalGeneration layout (model.model.language_model)
    def core(self) -> nn.Module:
        """The module whose forward receives ``input_ids``, ``pixel_values`` and the cache."""
        return self.model.model

    def encoder_owner(self) -> nn.Module:
        """The module whose `encoders` methods run the vision encoder (the core in transformers v5)."""
        return self.core()

    def encoder_features(self, modality: str, out: Any, bound: dict[str, Any]) -> list[torch.Tensor]:
        """Per image ``[n_i, D]`` projected features of one encoder call's output ``out``."""
        return list(out.pooler_output if hasattr(out, "pooler_output") else out[1])

    def encoder_pixels(self, modality: str, bound: dict[str, Any]) -> Any:
        """The pixel input of one encoder call (its bound arguments ``bound``), as given."""
        return bound.get("pixel_values_videos" if modality == "video" else "pixel_values")

    def decoder_layers(self) -> nn.ModuleList:
        return self.core().language_model.layers

    def image_token_id(self) -> int:
        return int(self.model.config.image_token_id)

    def visual_token_ids(self) -> list[int]:
        """Placeholder token ids that the vision features replace (images, and videos where supported)."""
        return [self.image_token_id()]

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.core().get_input_embeddings()(input_ids)

    def vision_attention(self, layer: int) -> nn.Module:
        """The attention module of vision-encoder layer ``layer`` (an index into ``hidden_states``)."""
        raise NotImplementedError

    def default_vision_layer(self) -> int:
        raise NotImplementedError

    def vision_depth(self) -> int:
        """Number of layers of the vision tower."""
        vc = self.model.config.vision_config
        return int(getattr(vc, "num_hidden_layers", None) or vc.depth)

    def pad_grid(self) -> int | None:
        """Patch grid side of a square single-crop image (LLaVA-1.5: 24) where padding detection applies."""
        return None

    # capabilities a method may require (`Scorer.requires`) that this family lacks: name -> why (the error)
    lacks: ClassVar[dict[str, str]] = {}

    def check_scorer(self, scorer: Any) -> None:
        """Raise `ConfigError` for a method this model family cannot run (before the scorer binds)."""
        for need in sorted(scorer.requires):
            if need in self.lacks:
                raise ConfigError(self.lacks[need])

    def min_layer(self) -> int:
        """The smallest decoder layer after which in-LLM pruning may drop tokens."""
        return 0

    def check_layer(self, layer: int) -> None:
        check_layer(layer, len(self.decoder_layers()))
        if layer < self.min_layer():
            raise ConfigError(self.min_layer_reason(layer))

    def min_layer_reason(self, layer: int) -> str:
        return f"layer={layer} is below {self.min_layer()}"

    def image_inputs(self, state: PruneState, kwargs: dict[str, Any]) -> Any:
        """The images of a prefill call (`ImageInputs` for the LLaVA family)."""
        return image_inputs(state, kwargs)

    def image_tokens(self, images: ImageInputs, n_visual: int) -> list[ImageTokens]:
        """Per image of the call, in order, the tokens it contributes (``n_visual`` in all)."""
        raise NotImplementedError

    def build_layout(self, images: Any, kinds: torch.Tensor, device: torch.device) -> VisualLayout:
        """The `VisualLayout` of a prefill whose token kinds (see `token_kinds`) are ``kinds`` ``[B, N]`` (a
        host copy), its tensors on ``device``."""
        visual = kinds > 0
        return build_layout(visual, self.image_tokens(images, int(visual.sum())), device)

    def tiles_per_image(self, geometry: Any, n_images: int) -> list[int]:
        """How many rows of the recorded vision scores each image owns (its crops); one by default."""
        return [1] * n_images

    def record_geometry(self, modality: str, bound: dict[str, Any]) -> Any:
        """What to remember of an encoder call's arguments to lay out its tokens later."""
        return bound.get("image_sizes")

    def encode_images(self, images: ImageInputs) -> None:
        """Run the model's image encoder on ``images.pixel_values`` (recorded in ``state.vision_record``)."""
        raise NotImplementedError

    def ensure_encoded(self, state: PruneState, images: Any) -> None:
        """Encode the call's images unless ``generate()`` already did (pre-LLM pruning needs the features)."""
        if images.record is None:
            self.encode_images(images)
            images.record = state.vision_record

    def merge_visual_features(self, images: Any, embeds: torch.Tensor, kinds: torch.Tensor,
                              host_kinds: torch.Tensor | None = None) -> torch.Tensor:
        """``embeds`` ``[B, N, D]`` with the projected visual features written at the visual positions
        (``host_kinds``: a host copy of ``kinds``, to count the tokens without reading the device)."""
        visual = kinds > 0
        feat = torch.cat(images.features(), dim=0).to(embeds.device, embeds.dtype)
        n_visual = int((kinds if host_kinds is None else host_kinds).gt(0).sum())
        if feat.shape[0] != n_visual:
            raise ValueError(
                f"the prompts hold {n_visual} image tokens but the images produce {feat.shape[0]} features; "
                "let the model's processor build input_ids and pixel_values together"
            )
        return embeds.masked_scatter(visual[..., None].expand_as(embeds), feat)

    def vision_scores(self, images: Any) -> torch.Tensor:
        """The recorded encoder-side scores of the call, indexed by `ImageTokens.source` once flattened."""
        rows = images.record.cls_attention if images.record is not None else None
        if rows is None:
            raise RuntimeError("no CLS attention was recorded while the images were encoded")
        return rows

    def tile_first(self, images: Any) -> int:
        """The first row of a tile's encoder output (`vision_scores`, `merge_features`) that becomes a
        visual token: 1, the CLS row is none (CLIP-family adapters override it where the feature strategy
        keeps CLS)."""
        return 1

    def tile_grid(self, image_size: Any) -> tuple[int, int]:
        """``(rows, cols)`` of the crop grid of a ``tiled`` adapter's image of ``image_size``."""
        raise NotImplementedError(f"{type(self).__name__} has no tiled images")

    def merge_features(self, images: Any) -> torch.Tensor:
        """``[tiles, patches + 1, C]`` the vision features entering the projector, CLS row kept (VisionZip
        merges contextual tokens in this space; CLIP-family adapters). Qwen-VL: ``[merged tokens, 1, 4 C]``
        (the ``vision_features`` signal only)."""
        raise NotImplementedError

    def merge_projector(self) -> nn.Module:
        """The projector from `merge_features` space to LLM embeddings (CLIP-family adapters)."""
        raise NotImplementedError

    def feature_projector(self) -> nn.Module:
        """The per-token map from the ``vision_features`` signal to LLM embeddings (``[..., C] -> [..., D]``):
        the CLIP-family projector (`merge_projector`); Qwen-VL: its merger's MLP."""
        return self.merge_projector()

    def shortened_positions(self, sess: Session, original: dict[str, Any], kwargs: dict[str, Any],
                            dropped: torch.Tensor) -> None:
        """Set the position ids of the shortened prefill in ``kwargs`` (LLaVA: contiguous 1-D positions)."""
        pos = original.get("position_ids")
        if pos is not None:
            if pos.dim() != 2:
                raise ValueError(f"pre-LLM pruning expects 2D position_ids [batch, seq], got {tuple(pos.shape)}")
            removed_before = compact(dropped.long().cumsum(1), sess.pre_index)
            kwargs["position_ids"] = (compact(pos, sess.pre_index) - removed_before).masked_fill(~sess.pre_valid, 0)

    def decode_positions(self, sess: Session, kwargs: dict[str, Any]) -> None:
        """Map a decode step's position ids after pre-LLM pruning (LLaVA: shift by the tokens removed)."""
        pos = kwargs.get("position_ids")
        if pos is not None:
            kwargs["position_ids"] = pos - sess.pre_removed[:, None].to(pos.device)

    def after_shortening(self, state: PruneState, images: Any, visual: torch.Tensor, dropped: torch.Tensor) -> None:
        """Anything else the LLM needs about the kept visual tokens (Qwen3-VL: its deepstack features)."""

    def strip_image_inputs(self, kwargs: dict[str, Any]) -> None:
        """Remove the pixel inputs from ``kwargs`` once their features are in ``inputs_embeds``."""
        for key in ("pixel_values", "image_sizes", "mm_encoder_outputs"):
            kwargs.pop(key, None)

    def mutable_state(self) -> list[tuple[Any, str]]:
        """``(object, attribute)`` pairs of per-call state the model keeps on itself between calls (Qwen-VL's
        ``rope_deltas``), which the runtime may overwrite while pruning. While patched each becomes per-thread
        (`vtprune.perthread.PerThreadAttributes`: concurrent calls keep their own); `vtprune.apply` saves the
        values and `vtprune.remove` restores them. Default: none."""
        return []

    def extra_hooks(self, state: PruneState, features: bool = False) -> list:
        """Family-specific hooks (handles with ``remove()``). ``features``: the method merges in the
        projector's input space, so the vision features entering the projector must be recorded."""
        return []

    # ---- vision-side scores ---------------------------------------------------------------------
    def vision_score_row(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> torch.Tensor:
        """The score rows one hooked vision attention module contributes (summed over hooked layers)."""
        hidden = args[0] if args else kwargs["hidden_states"]
        return vit_cls_attention(module, hidden)

    def finish_vision_scores(self, modality: str, summed: torch.Tensor, bound: dict[str, Any]) -> torch.Tensor:
        """Turn the summed rows of one encoder call into the recorded ``cls_attention``."""
        return summed

    def vision_layer_scores(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> torch.Tensor:
        """One hooked vision attention call's scores on their own (not summed with other layers), laid out
        like the recorded ``cls_attention``: CLIP ``[tiles, patches + 1]`` CLS rows. For methods that record
        several layers separately (VScan's shallow and deep scans); call it from a hook that runs while the
        encoder does (the Qwen-VL layout needs the encoder call's geometry)."""
        return self.vision_score_row(module, args, kwargs)

    def vision_context_rows(self, module: nn.Module, args: tuple, kwargs: dict[str, Any], t: float) -> torch.Tensor:
        """VFlowOpt's context relevance at one vision attention call (what its global tokens, those receiving
        more than ``t`` times the mean attention, attend to), rows laid out like the recorded
        ``cls_attention``: CLIP ``[tiles, patches + 1]`` (`vit_context_relevance`)."""
        hidden = args[0] if args else kwargs["hidden_states"]
        return vit_context_relevance(module, hidden, t)

    def token_kinds(self, input_ids: torch.Tensor | None, embeds: torch.Tensor | None) -> torch.Tensor:
        """``[B, N]`` long: 0 for text, ``i + 1`` for the ``i``-th id of `visual_token_ids`."""
        ids = self.visual_token_ids()
        ref = input_ids if input_ids is not None else embeds
        kinds = torch.zeros(ref.shape[:2], dtype=torch.long, device=ref.device)
        for i, token in enumerate(ids):
            if input_ids is not None:
                hit = input_ids == token
            else:
                vec = self.embed(torch.tensor(token, device=embeds.device)).to(embeds.dtype)
                hit = (embeds == vec).all(-1)
            kinds = kinds.masked_fill(hit, i + 1)
        return kinds


def build_layout(visual: torch.Tensor, images: list[ImageTokens], device: torch.device | str) -> VisualLayout:
    """Assign the images, in order, to the visual tokens of each row of ``visual`` ``[B, N]`` (a host tensor).

    Everything is assembled on the host and reaches ``device`` in one copy; the layout keeps the host
    copies of the image ids and prunable flags, so the per-image structure needs no device read.
    """
    visual = visual.cpu()
    host_pos, host_img, host_prunable, host_src, host_coords = [], [], [], [], []
    it = 0
    for b in range(visual.shape[0]):
        pos = torch.nonzero(visual[b]).flatten()
        need, parts = int(pos.numel()), []
        while need > 0:
            if it >= len(images):
                raise ValueError(
                    f"sample {b} has {int(pos.numel())} image tokens but the images provided do not cover "
                    "them; check that every <image> placeholder has an image"
                )
            parts.append(images[it])
            need -= int(images[it].source.numel())
            it += 1
        if need < 0:
            raise ValueError(
                f"image tokens of sample {b} do not line up with whole images ({int(pos.numel())} tokens); "
                "let the processor expand the <image> placeholders"
            )
        host_pos.append(pos)
        host_img.append(torch.cat([torch.full((int(p.source.numel()),), i) for i, p in enumerate(parts)])
                        if parts else pos.new_zeros(0))
        host_prunable.append(torch.cat([p.prunable.cpu() for p in parts]) if parts
                             else torch.zeros(0, dtype=torch.bool))
        host_src.append(torch.cat([p.source.cpu() for p in parts]) if parts else pos.new_zeros(0))
        host_coords.append(torch.cat([p.coords.cpu() for p in parts]) if parts else pos.new_zeros(0, 3))
    if it != len(images):
        raise ValueError(f"{len(images)} images were given but the prompts hold placeholders for {it}")
    # one host-to-device copy: rows positions, image, prunable, source, coords (3)
    packed = torch.cat([torch.stack([p, i, r.long(), s, *c.long().T]) if p.numel() else torch.zeros(7, 0, dtype=torch.long)
                        for p, i, r, s, c in zip(host_pos, host_img, host_prunable, host_src, host_coords)], dim=1)
    dev = torch.device(device)
    if dev.type == "cuda":
        packed = packed.pin_memory()  # an asynchronous copy: the host does not wait for the device
    packed = packed.to(dev, non_blocking=True)
    flags = packed[2].bool()
    positions, image, prunable, source, coords = [], [], [], [], []
    off = 0
    for p in host_pos:
        n = int(p.numel())
        positions.append(packed[0, off:off + n])
        image.append(packed[1, off:off + n])
        prunable.append(flags[off:off + n])
        source.append(packed[3, off:off + n])
        coords.append(packed[4:7, off:off + n].T)
        off += n
    return VisualLayout(positions, image, prunable, source, coords, seq_len=visual.shape[1],
                        host_image=host_img, host_prunable=host_prunable)


_ADAPTERS: dict[str, type[Adapter]] = {}


def register_adapter(cls: type[Adapter]) -> type[Adapter]:
    for t in cls.model_types:
        _ADAPTERS[t] = cls
    return cls


def supported_model_types() -> list[str]:
    return sorted(_ADAPTERS)


def adapter_for(model: nn.Module) -> Adapter:
    """The adapter registered for ``model.config.model_type``; a clear error for anything else."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in _ADAPTERS:
        raise UnsupportedModelError(
            f"vtprune has no adapter for model type {model_type!r} ({type(model).__name__}); "
            f"supported model types: {', '.join(supported_model_types())}"
        )
    cls = _ADAPTERS[model_type]
    check_transformers(cls)
    return cls(model)


def transformers_version() -> tuple[int, ...]:
    import transformers

    return tuple(int(p) for p in re.findall(r"\d+", transformers.__version__)[:3])


def check_transformers(cls: type[Adapter]) -> None:
    """A clear error when the installed transformers is older than the adapter needs."""
    import transformers

    need = tuple(int(p) for p in cls.min_transformers.split("."))
    if transformers_version()[: len(need)] < need:
        raise UnsupportedModelError(
            f"the {cls.description} adapter needs transformers>={cls.min_transformers}, but "
            f"{transformers.__version__} is installed: pip install 'transformers>={cls.min_transformers}' "
            "(only the original LLaVA codebase's adapter, model type llava_llama, runs on transformers 4.37)"
        )


def check_layer(layer: int, n_layers: int) -> None:
    if not 0 <= layer <= n_layers - 2:
        raise ConfigError(
            f"layer={layer} is out of range for a language model with {n_layers} decoder layers: "
            f"in-LLM pruning needs 0 <= layer <= {n_layers - 2} (some layer must run after the pruning point)"
        )
