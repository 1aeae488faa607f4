"""ZOO-Prune: zeroth-order sensitivity of the projector, with sensitivity-aware diversity selection."""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from vtprune.config import ConfigError, check_seed
from vtprune.perthread import PerThread
from vtprune.scorers.base import HIDDEN_STATES, PRE_LLM, VISION_FEATURES, Scorer, Signals, register
from vtprune.scorers.greedy import per_image, sensitivity_diversity


def projector_sensitivity(projector: nn.Module, x: torch.Tensor, directions: torch.Tensor, h: float,
                          chunk: int = 8192, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``[n]`` in ``dtype``: ``S_i = mean_j || (M(x_i + h u_j) - M(x_i - h u_j)) / (2h) ||`` for the per-token map M.

    Args:
        projector: M, applied row-wise (``[..., C] -> [..., D]``), in ``dtype``.
        x: ``[n, C]`` inputs (pre-projector features of one image); ``x +- h u`` is formed in x's dtype.
        directions: ``[m, C]`` unit directions, shared by every token (one bank per call).
        chunk: token-direction pairs per projector pass (bounds the memory to ``chunk x D``).
        dtype: the perturbed inputs are cast to it before the projector, and the differences, their norms
            and the mean over directions are taken in it (default: float32). ZOO-Prune's release casts to
            float16 (``.half()``) and computes in float16.
    """
    dtype = dtype or torch.float32
    n, m = x.shape[0], directions.shape[0]
    step = h * directions.to(x.dtype)  # [m, C]
    per = max(1, chunk // m)  # tokens per pass
    out = torch.empty(n, dtype=dtype, device=x.device)
    for a in range(0, n, per):
        xs = x[a:a + per, None, :]  # [t, 1, C]
        delta = projector((xs + step).to(dtype)) - projector((xs - step).to(dtype))  # [t, m, D]
        out[a:a + per] = (delta.to(dtype).norm(dim=-1) / (2 * h)).mean(dim=1)
    return out


@register
class ZOOScorer(Scorer):
    """ZOO-Prune (arXiv 2509.24837): which tokens the projector is most sensitive to, kept diverse.

    Per image: perturb each token's pre-projector feature ``x_i`` along ``m`` random unit directions ``u_j``
    (one bank for every token, drawn from ``seed``) by ``+-h``; the sensitivity ``S_i`` is the mean norm of
    the central difference of the projector. Selection (SADS): the most sensitive token first, then
    repeatedly ``argmax S_i (1 - max_{p picked} cos(z_i, z_p))`` with ``S`` min-max normalised and ``z``
    the unperturbed projector outputs.

    Options: ``directions`` (m, 64), ``h`` (0.01), ``seed`` (0), ``chunk`` (token-direction pairs per pass),
    ``precision`` ("float16", the release's: the perturbed inputs are cast to float16 and a float16 copy of
    the projector computes the differences, as its ``.half()`` casts do on every model; or "float32": a
    float32 copy, in which ``h = 0.01`` stays above the rounding of features near 1, while in float16 the
    central differences are partly rounding. On the tiny LLaVA model the two keep 45-73 % the same tokens
    (Jaccard), benchmarks/results/parity.md).
    LLaVA-family models (LLaVA-1.5, NeXT, the LLaVA repository: the multimodal projector, its input the
    feature layer) and Qwen2-VL / Qwen2.5-VL / Qwen3-VL: the projector is the MLP of the merger whose
    outputs enter the LLM (Qwen3-VL's deepstack mergers are not perturbed), its input per merged token the
    4 patches of the last vision block's output after the merger's norm, concatenated (``[4 C]``; the norm
    acts per patch, so it stays outside the perturbed map, as the feature layer's own norm does on LLaVA).
    Pre-LLM only. Query-free, no attention.
    Cost: ``2 m`` projector passes per visual token (chunked). Follows the release (github.com/AIM-SKKU/
    ZOO-Prune at 159f7f96, LLaVA-1.5; the repository's HEAD now holds only a README): 64 directions,
    h=0.01, the SADS rule and float16 by default; benchmarks/parity/zoo.py runs its code against this one
    (the same kept tokens at 64 / 128 / 192, float16 against the release as is, float32 against the
    release without its casts).
    Deviations: on a float16 model the release's SADS takes the cosines of the float16 projector outputs
    in float16, vtprune in float32; the release draws its directions from the unseeded global generator, vtprune from ``seed``
    (the same directions as the release run after ``torch.manual_seed(seed)`` on a float32 model).
    """

    name = "zoo"
    description = "ZOO-Prune: zeroth-order projector sensitivity + sensitivity-aware diversity (query-free); pre-LLM"
    needs = frozenset({VISION_FEATURES, HIDDEN_STATES})
    stages = (PRE_LLM,)
    accepts_auto_keep = False

    last_sensitivity = PerThread(factory=list)  # a per-call debugging record: each thread sees its own

    PRECISIONS = {"float16": torch.float16, "float32": torch.float32}

    def __init__(self, directions: int = 64, h: float = 0.01, seed: int = 0, chunk: int = 8192,
                 precision: str = "float16") -> None:
        if int(directions) < 1:
            raise ConfigError(f"zoo: directions={directions} must be at least 1")
        if not float(h) > 0:
            raise ConfigError(f"zoo: h={h} must be positive")
        if precision not in self.PRECISIONS:
            raise ConfigError(f"zoo: precision={precision!r} is not one of {sorted(self.PRECISIONS)} "
                              "('float16': the release's arithmetic, 'float32': exact central differences)")
        self.directions, self.h, self.chunk = int(directions), float(h), int(chunk)
        self.precision = precision
        self._dtype = self.PRECISIONS[precision]
        self.seed = check_seed(seed, "zoo")
        self._projector: nn.Module | None = None
        self.last_sensitivity: list[torch.Tensor] = []

    def tunable(self, model: Any, adapter: Any) -> dict[str, tuple[Any, Any]]:
        from vtprune.tunable import Param

        return {"h": (Param("log", 1e-4, 1.0), self.h)}

    def bind(self, model: Any, adapter: Any) -> None:
        # `feature_projector` (Adapter); an adapter-like object without it offers its merge_projector
        projector_of = getattr(adapter, "feature_projector", None) or adapter.merge_projector
        try:
            projector = projector_of()
        except NotImplementedError:
            raise ConfigError(
                f"zoo perturbs the projector input, which vtprune does not reach on {type(model).__name__} "
                "(LLaVA-family and Qwen-VL models only); use divprune or cls there"
            ) from None
        self._projector = copy.deepcopy(projector).to(self._dtype).eval()
        for p in self._projector.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def score(self, signals: Signals) -> list[torch.Tensor]:
        feats = signals.require(VISION_FEATURES)
        hidden = signals.require(HIDDEN_STATES)
        if self._projector is None:
            raise RuntimeError("zoo: the scorer was not bound to a model (use vtprune.apply)")
        dim = feats[0].shape[-1] if feats else 0
        gen = torch.Generator().manual_seed(self.seed)
        self.last_sensitivity = []  # per image, on the projector's device (a debugging record; no host copy)
        proj_device = next(self._projector.parameters()).device
        bank = torch.nn.functional.normalize(torch.randn(self.directions, dim, generator=gen), dim=-1).to(
            proj_device, non_blocking=True)  # host-to-device only

        def pick(b: int, idx: torch.Tensor, k: int) -> torch.Tensor:
            x = feats[b][idx.to(feats[b].device)].to(proj_device)  # the release perturbs in the features' dtype
            if self._dtype == torch.float32:
                x = x.float()
            s = projector_sensitivity(self._projector, x, bank, self.h, self.chunk, self._dtype)
            self.last_sensitivity.append(s)
            return sensitivity_diversity(s, hidden[b][idx.to(hidden[b].device)].to(proj_device), k)

        return per_image(signals.layout, signals.keep, pick)
