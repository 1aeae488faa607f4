"""CDPruner: a conditional DPP over the visual tokens, diversity from the projector outputs, quality from
their relevance to the instruction.

Released code: github.com/Theia-4869/CDPruner, ``llava/model/llava_arch.py``
(``LlavaMetaForCausalLM.encode_images``). The release builds the kernel from the plain normalised
relevance, ``L = diag(r) S diag(r)``: its ``theta`` lines (``relevance = exp(theta / (2 (1 - theta)) r)``
with ``theta = 0.5``) are commented out. That kernel is the default here (``theta=None``); the paper's
exponential form is the option ``theta=<float>``.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import torch

from vtprune.config import ConfigError
from vtprune.perthread import PerThread
from vtprune.scorers.base import (
    HIDDEN_STATES,
    INSTRUCTION,
    PRE_LLM,
    VISION_FEATURES,
    Scorer,
    Signals,
    register,
)
from vtprune.scorers.greedy import cosine_matrix, dpp_map, order_scores, per_image
from vtprune.scorers.select import image_budget

RELEVANCE = ("clip", "text")
RELEVANCE_EPS = 1e-6  # the release's offset in its min-max normalisation


def normalise_relevance(r: torch.Tensor) -> torch.Tensor:
    """The release's min-max normalisation ``(r - min + 1e-6) / (max - min)`` (the least relevant token keeps
    a small positive weight); all ones when ``r`` is constant (where the release would divide by zero)."""
    lo = r.min()
    span = r.max() - lo
    return torch.where(span > 0, (r - lo + RELEVANCE_EPS) / span, torch.ones_like(r))


def dpp_kernel(similarity: torch.Tensor, relevance: torch.Tensor, theta: float | None) -> torch.Tensor:
    """``L = diag(q) S diag(q)``: ``q = r`` for ``theta=None`` (the release's kernel), the paper's
    ``q = exp(theta / (2 (1 - theta)) r)`` for a float ``theta`` in [0, 1) (0: ``q = 1``, diversity only).

    ``similarity``: ``[..., n, n]``; ``relevance``: ``[..., n]`` (normalised, `normalise_relevance`)."""
    q = relevance if theta is None else torch.exp(theta / (2.0 * (1.0 - theta)) * relevance)
    return q[..., :, None] * similarity * q[..., None, :]


def toy_clip_dir(name: str):
    """The package folder of a shipped toy CLIP (``toy-llava-clip``), or None."""
    from pathlib import Path

    folder = Path(__file__).resolve().parents[1] / "toy" / "weights" / name
    return folder if (folder / f"{name}.json").is_file() and (folder / "open_clip_model.bin").is_file() else None


class ClipText:
    """An open_clip model's text side and the LLaVA tower's head: ``ln_post`` + ``proj`` of its vision tower.

    ``name`` is an open_clip model name (``ViT-L-14-336`` for LLaVA-1.5's tower); ``pretrained`` a local
    checkpoint file or an open_clip pretrained tag (a tag downloads into the user's cache; vtprune itself
    never downloads).
    """

    def __init__(self, name: str, pretrained: str | None) -> None:
        try:
            import open_clip
        except ImportError:
            raise ConfigError("cdpruner's clip relevance needs open_clip: pip install 'vtprune[clip]'") from None
        shipped = toy_clip_dir(name)
        if shipped is not None:  # the toy models' own CLIP (scripts/train_toy_clip.py), shipped as package data
            open_clip.add_model_config(shipped / f"{name}.json")
            pretrained = pretrained or str(shipped / "open_clip_model.bin")
        try:
            model = open_clip.create_model(name, pretrained=pretrained or None)
        except RuntimeError as exc:
            raise ConfigError(f"cdpruner: open_clip could not build {name!r} ({exc}); see open_clip.list_models()") from None
        self.model = model.eval().float()
        self.tokenizer = open_clip.get_tokenizer(name)
        self.context = int(getattr(self.model, "context_length", 77) or 77)

    @torch.no_grad()
    def image_embeddings(self, features: torch.Tensor) -> torch.Tensor:
        """``[n, C]`` tower features (the LLaVA feature layer) -> ``[n, E]`` CLIP image-space embeddings."""
        visual = self.model.visual
        x = visual.ln_post(features.float().to(next(visual.parameters()).device))
        return x @ visual.proj if getattr(visual, "proj", None) is not None else x

    @torch.no_grad()
    def text_embeddings(self, text: str) -> torch.Tensor:
        """``[chunks, E]``: the instruction in chunks of the text tower's context (as the reference splits it)."""
        words = text.split()
        chunk = max(1, self.context - 2)
        parts = [" ".join(words[a:a + chunk]) for a in range(0, max(1, len(words)), chunk)] or [""]
        tokens = self.tokenizer(parts).to(next(self.model.parameters()).device)
        return self.model.encode_text(tokens).float()


@register
class CDPrunerScorer(Scorer):
    """CDPruner (Zhang et al., 2025, "Beyond Attention or Similarity: Maximizing Conditional Diversity for
    Token Pruning in MLLMs"): greedy MAP of a DPP whose kernel joins diversity and instruction relevance.

    Per image: ``S`` = cosine similarity of the projector outputs; relevance ``r`` min-max normalised over
    the image as the release does (``(r - min + 1e-6) / (max - min)``); kernel ``L = diag(q) S diag(q)``
    with ``q = r`` (``theta=None``, the release: its ``theta`` term is commented out) or the paper's
    ``q = exp(theta r / (2 (1 - theta)))`` (``theta=0.5`` in the paper); the kept set is the greedy DPP MAP
    of the image's budget (incremental Cholesky, float64; the release runs it in float32). A selection:
    adaptive budgets are refused.

    LLaVA-NeXT (``budget_per``): ``"tile"`` (the default, the release's ``encode_images`` on the batch of
    tiles) runs the DPP on every tile's whole 24 x 24 grid with ``keep`` each, the similarity from that
    tile's projector outputs (padding rows included), the relevance min-max normalised over all tiles of
    the image together, and drops the image-newline tokens (the release strips ``_unpad`` and feeds no
    newlines; `vtprune.scorers.select.select_tiles`). Deviations: HF's sequence holds only the unpadded
    grid, so picks in the crops' padding have no token (the image keeps fewer than ``tiles x keep``); the
    release normalises over the call's tiles (one image per call there). ``"image"``: the DPP per image
    over its unpadded tokens of all tiles, newlines kept beside the budget.

    Relevance (``relevance=``):
    - ``"clip"`` (the paper's): ``r_i = mean_m -cos(e_i, t_m)`` with ``e_i`` the token's feature-layer
      vision feature through the CLIP tower's ``ln_post`` and projection, ``t_m`` the CLIP text embeddings
      of the instruction in 77-token chunks, from the open_clip model ``clip_model`` with weights
      ``clip_pretrained`` (the reference's sign is kept: its relevance is the *negative* cosine). The
      instruction text is decoded with the model's tokenizer (``tokenizer=PATH``, default the model's own
      directory). LLaVA-family models only (the tower's features are needed).
    - ``"text"`` (our stand-in where no CLIP text tower fits, e.g. Qwen-VL): ``r_i = mean_m cos(z_i, w_m)``
      with ``z_i`` the projector output and ``w_m`` the LLM input embeddings of the instruction tokens.

    Options: ``relevance`` ("text"), ``theta`` (None: the release's kernel; a float in [0, 1): the paper's
    exponential weighting), ``clip_model``, ``clip_pretrained``, ``tokenizer``, ``budget_per`` ("tile").

    After each scoring call ``last_relevance`` holds, per image of the batch, its min-max normalised
    relevance ``r`` (on the device), a debug record of the calling thread (`vtprune.perthread.PerThread`:
    each thread sees its own).
    """

    name = "cdpruner"
    description = "CDPruner: conditional DPP (projector-output diversity x instruction relevance); pre-LLM"
    needs = frozenset({HIDDEN_STATES, INSTRUCTION})
    stages = (PRE_LLM,)
    accepts_auto_keep = False
    last_relevance = PerThread(factory=list)

    def __init__(self, relevance: str = "text", theta: float | None = None, clip_model: str | None = None,
                 clip_pretrained: str | None = None, tokenizer: str | None = None, budget_per: str = "tile") -> None:
        if budget_per not in ("tile", "image"):
            raise ConfigError(f"cdpruner: budget_per must be 'tile' (the release) or 'image', got {budget_per!r}")
        self.budget_per = budget_per
        if relevance not in RELEVANCE:
            raise ConfigError(f"cdpruner: relevance={relevance!r} must be one of {RELEVANCE}")
        if theta is not None and (isinstance(theta, bool) or not isinstance(theta, (int, float))
                                  or not 0.0 <= float(theta) < 1.0):
            raise ConfigError(f"cdpruner: theta={theta} must be in [0, 1) (the paper's exponential weighting), "
                              "or None for the release's kernel diag(r) S diag(r)")
        if relevance == "clip" and not clip_model:
            raise ConfigError("cdpruner: relevance='clip' needs clip_model=<open_clip name> (e.g. 'ViT-L-14-336') "
                              "and clip_pretrained=<checkpoint file>")
        self.relevance, self.theta = relevance, None if theta is None else float(theta)
        self.clip_model, self.clip_pretrained, self.tokenizer = clip_model, clip_pretrained, tokenizer
        self._clip: ClipText | None = None
        self._tokenizer: Any = None

    def needs_signal(self, name: str) -> bool:
        return name in self.needs or (name == VISION_FEATURES and self.relevance == "clip")

    def tunable(self, model: Any, adapter: Any) -> dict[str, tuple[Any, Any]]:
        from vtprune.tunable import Param

        return {"theta": (Param("float", 0.0, 0.95), self.theta)}

    def bind(self, model: Any, adapter: Any) -> None:
        self.per_tile = self.budget_per == "tile" and getattr(adapter, "tiled", False)
        self.drops_fixed = self.per_tile  # the release feeds no newlines
        if self.relevance != "clip":
            return
        try:
            adapter.merge_projector()
        except NotImplementedError:
            raise ConfigError(
                "cdpruner relevance='clip' reads the LLaVA tower's features, so it runs on LLaVA-family models only; "
                "use relevance='text' here"
            ) from None
        candidates = [self.tokenizer] if self.tokenizer else [getattr(model.config, "_name_or_path", None),
                                                              getattr(model, "name_or_path", None)]
        path = next((c for c in candidates if c and os.path.isdir(str(c))), None)
        if path is None:
            raise ConfigError("cdpruner relevance='clip' decodes the instruction with the model's tokenizer: pass "
                              "tokenizer=<local tokenizer directory>")
        from transformers import AutoTokenizer

        try:
            self._tokenizer = AutoTokenizer.from_pretrained(str(path))
        except (OSError, ValueError) as exc:
            raise ConfigError(f"cdpruner: no tokenizer could be loaded from {path!r} ({exc}); pass tokenizer=PATH") from None
        self._clip = ClipText(self.clip_model, self.clip_pretrained)
        width = self._clip.model.visual.ln_post.normalized_shape[0]
        depth_width = getattr(getattr(model.config, "vision_config", None), "hidden_size", None) or getattr(
            model.config, "mm_hidden_size", None)
        if depth_width is not None and int(depth_width) != int(width):
            raise ConfigError(f"cdpruner: the open_clip model {self.clip_model!r} is {width} wide but the model's "
                              f"vision tower is {depth_width} wide; name the CLIP the tower was built from")

    @torch.no_grad()
    def _text(self, signals: Signals, b: int) -> torch.Tensor:
        """``[chunks, E]`` normalised CLIP embeddings of sample ``b``'s instruction."""
        ids = signals.instruction_ids
        if ids is None:
            raise RuntimeError("cdpruner relevance='clip' needs the instruction token ids, which this model "
                               "call does not have (embeddings only); use relevance='text'")
        text = self._tokenizer.decode(ids[b].tolist(), skip_special_tokens=True)
        return torch.nn.functional.normalize(self._clip.text_embeddings(text), dim=-1)

    @torch.no_grad()
    def _relevance(self, signals: Signals, b: int, z: torch.Tensor, feats: torch.Tensor | None,
                   text: torch.Tensor | None) -> torch.Tensor:
        """``[..., n]`` raw relevance of sample ``b``'s tokens with projector outputs ``z`` ``[..., n, D]``
        (float32) and, for ``relevance="clip"``, tower features ``feats`` ``[..., n, C]`` and the sample's CLIP
        text ``text`` (`_text`)."""
        if self.relevance == "text":
            words = signals.instruction_embeds[b].float().to(z.device)
            if words.shape[0] == 0:
                return torch.ones(z.shape[:-1], device=z.device)
            return (torch.nn.functional.normalize(z, dim=-1) @ torch.nn.functional.normalize(words, dim=-1).T).mean(-1)
        e = torch.nn.functional.normalize(self._clip.image_embeddings(feats.flatten(0, -2)), dim=-1)
        return -(e @ text.to(e.device).T).mean(-1).view(feats.shape[:-1])

    def _texts(self, signals: Signals) -> Callable[[int], torch.Tensor | None]:
        """Sample ``b`` -> its CLIP text embeddings, encoded once per sample (None for ``relevance="text"``)."""
        texts: dict[int, torch.Tensor] = {}

        def text(b: int) -> torch.Tensor | None:
            if self.relevance == "clip" and b not in texts:
                texts[b] = self._text(signals, b)
            return texts.get(b)

        return text

    def score(self, signals: Signals) -> list[torch.Tensor]:
        signals.require(HIDDEN_STATES)
        signals.require(INSTRUCTION)
        self.last_relevance = []  # per image, on the device (a debugging record; no host copy)
        text = self._texts(signals)  # one CLIP text encoding per sample, shared by its images

        def pick(b: int, idx: torch.Tensor, k: int) -> torch.Tensor:
            z = signals.hidden_states[b][idx.to(signals.hidden_states[b].device)]
            feats = None
            if self.relevance == "clip":
                feats = signals.require(VISION_FEATURES)[b][idx.to(signals.vision_features[b].device)]
            r = normalise_relevance(self._relevance(signals, b, z.float(), feats, text(b)).float())
            self.last_relevance.append(r)
            sim = cosine_matrix(z)
            return dpp_map(dpp_kernel(sim, r.to(sim.device), self.theta), k)

        return per_image(signals.layout, signals.keep, pick)

    @torch.no_grad()
    def score_tiles(self, signals: Signals) -> torch.Tensor:
        """``[T, S]`` pick-order scores of every tile's grid (`order_scores`; rows before ``tile_first`` -inf):
        per image, the relevance of all its tiles' rows normalised together, then the DPP MAP of each tile
        with the per-tile budget."""
        hidden = signals.tile_hidden_states
        if hidden is None:
            raise RuntimeError("cdpruner: the per-tile signals were not recorded for this call")
        signals.require(INSTRUCTION)
        first = signals.tile_first
        tiles, stride = hidden.shape[:2]
        k, _ = image_budget(signals.keep, stride - first)
        out = torch.full((tiles, stride), float("-inf"), device=hidden.device)
        samples = [b for b, n in enumerate(signals.layout.images_per_sample()) for _ in range(n)]  # per image
        text = self._texts(signals)
        self.last_relevance = []
        start = 0
        for image, count in enumerate(signals.tile_counts):
            b = samples[image]
            z = hidden[start:start + count, first:].float()  # [t, n, D]
            feats = signals.tile_features[start:start + count, first:] if self.relevance == "clip" else None
            r = normalise_relevance(self._relevance(signals, b, z, feats, text(b)).flatten())
            self.last_relevance.append(r)
            kernels = dpp_kernel(cosine_matrix(z), r.view(count, -1).to(z.device), self.theta)  # [t, n, n]
            picks = dpp_map(kernels, k)  # [t, k]: every tile in one pass
            for t in range(count):
                out[start + t, first:] = order_scores(picks[t], stride - first).to(out.device)
            start += count
        return out
