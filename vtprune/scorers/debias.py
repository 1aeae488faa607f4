"""Attention debiasing (intcomp/attention-bias): divide out the host's positional trend; drop padding patches.

(a) Recency trend. Attention-based scores grow with a visual token's position in the sequence whatever
the image shows. With ``T`` a smooth increasing trend of the mean host score against the normalised
visual index ``x = j / (n - 1)`` of an image's span (``n`` its tokens), the corrected score is
``s'_j = s_j * T(0) / T(x_j)``. ``T`` is per model and host, fitted by ``vtprune calibrate``.

(b) Padding sinks. LLaVA-1.5 pads each image to a square with a constant colour before resizing; the
patches that are mostly padding carry no content but attract attention. They are excluded (score
``-inf``), so the image keeps fewer tokens when fewer than ``keep`` real patches exist, or (``pad_mode
="zero"``) scored 0, ranked last with the budget unchanged.

The release (github.com/intcomp/attention-bias) patches each host's own code with its own settings; a host
declares them as ``debias_release`` (trend, ``pad_theta``, ``pad_mode``), so that ``debias+<host>`` with
default options reproduces that patch. Its patches correct the host's first pruning stage only; so does
``every_stage=False`` (the default).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from vtprune.calibration import CalibrationError, find_calibration, load_calibration
from vtprune.config import ConfigError
from vtprune.perthread import PerThread
from vtprune.scorers.base import PIXEL_VALUES, PRE_LLM, Scorer, Signals, register
from vtprune.scorers.compose import Wrapper, method_string

# The release's weight files hold 576 values, w_j for the index j = 0..575 of LLaVA-1.5's image span;
# vtprune's trends are curves on x = j / (n - 1), so a per-index curve is converted at j = 575 x.
# Per-index specs (the `trend` option's strings and the hosts' `debias_release`):
#   "exp:<lambda>"        w_j = exp(-lambda j)
#   "cubic:<a1>,<a2>,<a3>" 1 / w_j = 1 + a1 j + a2 j^2 + a3 j^3
# FastV's file is the cubic 3.015e-3, -1.460e-5, 2.569e-8; hosts without a declared release use the
# exponential of the SparseVLM / GQA file, lambda = 2.30e-3.
REFERENCE_SPAN = 575
GENERIC_TREND = "exp:2.30e-3"
GENERIC_PADDING = {"pad_theta": 0.5, "pad_mode": "exclude"}  # FastV's patch: threshold 0.5, budget lowered

PAD_MODES = ("exclude", "zero")


@dataclass(frozen=True)
class Trend:
    """A positional trend ``T(x)`` on ``x`` in ``[0, 1]`` with ``T(0) = 1``.

    ``kind="cubic"``: ``coeffs = (1, c1, c2, c3)``, ``T(x) = sum_k c_k x^k``; ``kind="exp"``:
    ``coeffs = (rate,)``, ``T(x) = exp(rate * x)``; ``kind="none"``: ``T = 1``. ``source`` says where it
    came from (shown by ``Debias.trend_source``).
    """

    kind: str
    coeffs: tuple[float, ...]
    source: str
    layer: int | None = None  # the in-LLM layer the trend was fitted at (calibration files)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = x.double()
        if self.kind == "exp":
            return torch.exp(self.coeffs[0] * x)
        if self.kind == "none":
            return torch.ones_like(x)
        return sum(c * x**k for k, c in enumerate(self.coeffs))

    def weights(self, n: int) -> torch.Tensor:
        """``[n]`` float32 multipliers ``w_j = T(0) / T(j / (n - 1))`` for an image span of ``n`` tokens."""
        x = torch.arange(n, dtype=torch.float64) / max(1, n - 1)
        return (self(torch.zeros(1)) / self(x)).float()

    def check(self) -> Trend:
        """Raise `ConfigError` unless ``T`` is positive on ``[0, 1]``."""
        values = self(torch.linspace(0, 1, 201))
        if not bool(torch.isfinite(values).all()) or float(values.min()) <= 0:
            raise ConfigError(
                f"debias: the trend from {self.source} ({self.kind} {list(self.coeffs)}) is not positive on "
                "[0, 1]; re-run `vtprune calibrate` or pass trend='default'"
            )
        return self


def parse_trend(spec: str, source: str) -> Trend | None:
    """A per-index trend spec (``"exp:<lambda>"``, ``"cubic:<a1>,<a2>,<a3>"``, see above) as a `Trend` on
    ``x = j / 575``; None when ``spec`` is not of that form. Raises `ConfigError` on bad numbers."""
    kind, sep, rest = spec.partition(":")
    if not sep or kind not in ("exp", "cubic"):
        return None
    try:
        numbers = [float(v) for v in rest.split(",")]
    except ValueError:
        numbers = []
    if kind == "exp" and len(numbers) == 1:
        return Trend("exp", (numbers[0] * REFERENCE_SPAN,), f"{source} (exponential, lambda={numbers[0]:g} per index)").check()
    if kind == "cubic" and len(numbers) == 3:
        coeffs = tuple(a * REFERENCE_SPAN**k for k, a in enumerate(numbers, start=1))
        return Trend("cubic", (1.0, *coeffs), f"{source} (cubic per index {rest})").check()
    raise ConfigError(f"debias: trend={spec!r}: give 'exp:<lambda>' (w_j = exp(-lambda j)) or "
                      "'cubic:<a1>,<a2>,<a3>' (1/w_j = 1 + a1 j + a2 j^2 + a3 j^3), j the token's index at 576 tokens")


def release_settings(host: Scorer) -> dict[str, Any]:
    """The debias settings of ``host``'s release patch (its ``debias_release``: ``trend``, ``pad_theta``,
    ``pad_mode``, ``source``), the generic ones filled in for what it does not declare."""
    declared = dict(getattr(host, "debias_release", None) or {})
    return {"trend": GENERIC_TREND, **GENERIC_PADDING, "source": "", **declared}


def default_trend(host: Scorer) -> Trend:
    """The documented default: the trend of ``host``'s release patch (`release_settings`), else the
    exponential with lambda = 2.30e-3 per index."""
    settings = release_settings(host)
    label = f"default ({settings['source']})" if settings["source"] else "default"
    trend = parse_trend(settings["trend"], label)
    assert trend is not None, f"{type(host).__name__}.debias_release trend {settings['trend']!r}"
    return trend


def host_of(scorer: Scorer) -> Scorer:
    """The innermost (host) scorer under any wrappers."""
    while isinstance(scorer, Wrapper):
        scorer = scorer.inner
    return scorer


def trend_from_file(data: dict, path: Any, hosts: Sequence[str]) -> Trend | None:
    """The first trend of ``hosts`` in a loaded calibration file, or None."""
    entries = data.get("trend") or {}
    for host in hosts:
        entry = entries.get(host)
        if entry is None:
            continue
        coeffs = entry.get("coeffs")
        if not isinstance(coeffs, list) or len(coeffs) != 4 or not all(isinstance(c, (int, float)) for c in coeffs):
            raise CalibrationError(f"calibration file {str(path)!r}: trend[{host!r}].coeffs must be 4 numbers")
        c0 = float(coeffs[0])
        if c0 <= 0:
            raise CalibrationError(f"calibration file {str(path)!r}: trend[{host!r}] has T(0) <= 0")
        trend = Trend("cubic", tuple(float(c) / c0 for c in coeffs), f"{path} [{host}]", entry.get("layer"))
        return trend.check()
    return None


# ---- padding (LLaVA-1.5 pad-to-square) ------------------------------------------------------------
def _band(lines: torch.Tensor, tol: float) -> tuple[int, torch.Tensor]:
    """Leading lines of ``lines`` ``[L, C, M]`` (border first) equal to the first line's corner colour."""
    color = lines[0, :, 0]
    same = (lines - color[None, :, None]).abs().amax(dim=(1, 2)) <= tol
    return int(same.long().cumprod(0).sum()), color


def padding_bands(pixels: torch.Tensor, tol: float = 2e-3) -> tuple[int, int, int] | None:
    """Detect pad-to-square bands in one processed image ``[C, H, W]`` (any normalisation).

    Returns ``(axis, before, after)``: ``axis`` 0 for bands at the top and bottom (rows), 1 for left and
    right (columns), and their widths in pixels; None when the image has no such bands. A band is a run
    of identical lines (every pixel within ``tol`` of one colour) at the border; both bands of the axis
    must exist, share their colour and have nearly the same width (pad-to-square centres the image), the
    other axis must have none, and the bands must leave content between them.
    """
    p = pixels.float()
    with_bands, result = 0, None
    for axis, lines in ((0, p.permute(1, 0, 2)), (1, p.permute(2, 0, 1))):  # [H, C, W], [W, C, H]
        before, c1 = _band(lines, tol)
        after, c2 = _band(lines.flip(0), tol)
        if before == 0 or after == 0:
            continue
        with_bands += 1
        size = lines.shape[0]
        symmetric = abs(before - after) <= 2 + 0.02 * size
        same_color = float((c1 - c2).abs().max()) <= tol
        if symmetric and same_color and before + after < size:
            result = (axis, before, after)
    return result if with_bands == 1 else None  # bands on all four sides: a frame, not pad-to-square


def padding_fraction(pixels: torch.Tensor, grid: int, tol: float = 2e-3) -> torch.Tensor | None:
    """``[grid, grid]`` float: the fraction of each patch's area that is padding (None: no padding).

    ``pixels`` ``[C, H, W]`` with ``H = W = grid * patch``. Pixels in the resampling blur at the edge of a
    band count as content, so a fraction can be a pixel or two short of the exact geometry.
    """
    bands = padding_bands(pixels, tol)
    if bands is None:
        return None
    axis, before, after = bands
    size = pixels.shape[1 + axis]
    edges = torch.arange(grid + 1, dtype=torch.float64) * size / grid
    lo, hi = edges[:-1], edges[1:]
    pad = (torch.clamp(torch.minimum(hi, torch.tensor(float(before))) - lo, min=0)
           + torch.clamp(hi - torch.maximum(lo, torch.tensor(float(size - after))), min=0))
    frac = (pad / (hi - lo)).float()
    return frac[:, None].expand(grid, grid) if axis == 0 else frac[None, :].expand(grid, grid)


@register
class Debias(Wrapper):
    """Attention debiasing around any host scorer: ``debias+fastv``, ``debias+sink+fastv``, ...

    (a) ``s'_j = s_j * w_j``, ``w_j = T(0) / T(x_j)``, ``x_j = j / (n - 1)`` the index of token ``j``
    within its image's span of ``n`` visual tokens in sequence order (per image of the layout, so images
    with different token counts, LLaVA-NeXT and Qwen-VL, each get the whole curve; LLaVA-NeXT's newline
    tokens count in the span; a Qwen-VL video is one span over all its frames). Scores ``[n_b]`` per sample keep
    their shape; ``-inf`` stays ``-inf``. Meant for non-negative (attention-like) host scores.

    ``T`` (option ``trend``):
      - ``"auto"`` (default): the model's calibration file (`vtprune.calibration` lookup order) when it
        holds a trend for this host (key: the host's method string, then the innermost host's name),
        else the default;
      - ``"default"``: the trend of the host's release patch (its ``debias_release``): ``fastv``: FastV's
        cubic ``1 + 1.7336 x - 4.8271 x^2 + 4.8839 x^3`` (``1/w = 1 + 3.015e-3 j - 1.460e-5 j^2 +
        2.569e-8 j^3`` at ``j = 575 x``, ``w(1) = 0.358``); ``pyramiddrop``: ``exp(-3.99e-3 j)``, its GQA
        file; ``sparsevlm`` and hosts without a release: ``exp(-2.30e-3 j)`` (SparseVLM's GQA file);
      - ``"exp:<lambda>"`` / ``"cubic:<a1>,<a2>,<a3>"``: a per-index curve as the release's weight files
        hold them, ``w_j = exp(-lambda j)`` / ``1/w_j = 1 + a1 j + a2 j^2 + a3 j^3`` at ``j = 575 x`` (the
        release's per-task files: lambda 2.30e-3 to 3.99e-3);
      - ``"none"``: no trend correction (padding only);
      - a path: that calibration file, which must hold a trend for this host;
      - three numbers ``[c1, c2, c3]``: ``T(x) = 1 + c1 x + c2 x^2 + c3 x^3``.

    (b) ``pad_theta`` (``"auto"``: the host's release value, 0.01 for ``pyramiddrop``, else 0.5; None
    disables): LLaVA-1.5 (``model_type == "llava"``) only. The padding geometry is read from the processed
    image itself (``pixel_values`` ``[images, 3, H, W]``): constant bands of one colour at two opposite
    borders (`padding_bands`); patches of the ``image_size / patch_size`` grid whose area is more than
    ``pad_theta`` padding are, by ``pad_mode`` (``"auto"``: the host's release rule, ``"zero"`` for
    ``pyramiddrop`` and ``sparsevlm``, else ``"exclude"``), ``"exclude"``: scored ``-inf`` (the image's
    budget shrinks to its valid patches, FastV's patch) or ``"zero"``: scored 0 (ranked last, the budget
    unchanged, the PyramidDrop and SparseVLM patches). Images without such bands are not touched. Skipped
    on LLaVA-NeXT (its crops are resized, not padded) and Qwen-VL (native resolution, no padding), and for
    calls whose pixels are not available (``generate`` with beams).

    (c) ``every_stage`` (default False): a staged host's scores are corrected at its first pruning stage
    only (its pre-LLM stage where it has one, else its first in-LLM stage), as the release's PyramidDrop
    and SparseVLM patches do; True corrects every stage.

    Runs before or inside the LLM, wherever its host runs. After each correcting call ``last_padding``
    holds per sample the ``[p_b]`` visual-token indices treated as padding; ``trend_source`` says which ``T`` is
    in use.
    """

    name = "debias"
    own_excludes = True  # padding patches score -inf
    description = ("Attention debiasing: divide out the host's positional trend (calibrated or default); "
                   "LLaVA-1.5: exclude pad-to-square padding patches")

    last_padding = PerThread(factory=list)  # a per-call debugging record: each thread sees its own
    _after_pre_llm = PerThread(default=False)  # this thread's prefill corrected a pre-LLM stage already

    def __init__(self, inner: Scorer, trend: str | list[float] = "auto", pad_theta: float | str | None = "auto",
                 pad_mode: str = "auto", every_stage: bool = False) -> None:
        super().__init__(inner)
        self.trend = list(trend) if isinstance(trend, (list, tuple)) else trend
        self.pad_theta = pad_theta
        self.pad_mode = pad_mode
        self.every_stage = every_stage
        if pad_theta is not None and pad_theta != "auto" and (
                isinstance(pad_theta, bool) or not isinstance(pad_theta, (int, float)) or not 0 <= pad_theta < 1):
            raise ConfigError(f"debias: pad_theta must be a number in [0, 1), 'auto' (the host's release value) "
                              f"or None (disabled), got {pad_theta!r}")
        if pad_mode not in ("auto", *PAD_MODES):
            raise ConfigError(f"debias: pad_mode must be 'auto', 'exclude' (score -inf, budget lowered) or 'zero' "
                              f"(score 0, budget kept), got {pad_mode!r}")
        if not isinstance(every_stage, bool):
            raise ConfigError(f"debias: every_stage must be True or False, got {every_stage!r}")
        release = release_settings(host_of(inner))
        self._pad_theta = release["pad_theta"] if pad_theta == "auto" else pad_theta
        self._pad_mode = release["pad_mode"] if pad_mode == "auto" else pad_mode
        self._trend_file: str | None = None  # a calibration file given as `trend`, read at bind
        self._trend = self._initial_trend()
        self._pad = False  # set by bind for LLaVA-1.5
        self._grid = 0
        self._warned_layer = False
        self.last_padding: list[torch.Tensor] = []

    def _initial_trend(self) -> Trend:
        t = self.trend
        host = host_of(self.inner)
        if isinstance(t, list):
            if len(t) != 3 or not all(isinstance(c, (int, float)) and not isinstance(c, bool) for c in t):
                raise ConfigError(f"debias: trend as numbers must be [c1, c2, c3] (T = 1 + c1 x + c2 x^2 + c3 x^3), got {t!r}")
            return Trend("cubic", (1.0, *map(float, t)), "trend option").check()
        if not isinstance(t, str):
            raise ConfigError(f"debias: trend must be 'auto', 'default', 'none', 'exp:<lambda>', "
                              f"'cubic:<a1>,<a2>,<a3>', a file path or [c1, c2, c3], got {t!r}")
        if t == "none":
            return Trend("none", (), "trend='none'")
        if t in ("auto", "default"):
            return default_trend(host)
        spec = parse_trend(t, "trend option")
        if spec is not None:
            return spec
        self._trend_file = t
        if not Path(t).expanduser().is_file():
            raise ConfigError(
                f"debias: trend={t!r} is neither 'auto', 'default', 'none', 'exp:<lambda>', 'cubic:<a1>,<a2>,<a3>' "
                "nor an existing calibration file; write one with `vtprune calibrate --model <model> --images DIR`"
            )
        return default_trend(host)  # read at bind, against the model

    @property
    def trend_source(self) -> str:
        return self._trend.source

    def tunable(self, model: Any, adapter: Any) -> dict[str, tuple[Any, Any]]:
        from vtprune.tunable import Param

        return {"pad_theta": (Param("float", 0.05, 1.0), self._pad_theta)} if self._pad else {}

    def bind_self(self, model: Any, adapter: Any) -> None:
        host = host_of(self.inner)
        hosts = [method_string(self.inner), host.name]
        self._warned_layer = False
        if self.trend == "auto":
            self._trend = default_trend(host)
            path = find_calibration(model)
            if path is not None:
                self._trend = trend_from_file(load_calibration(path, model), path, hosts) or self._trend
        elif self._trend_file is not None:
            data = load_calibration(self._trend_file, model)
            found = trend_from_file(data, self._trend_file, hosts)
            if found is None:
                raise CalibrationError(
                    f"debias: the calibration file {self._trend_file!r} has no trend for host {hosts[-1]!r} "
                    f"(it has {sorted(data.get('trend') or {})}); run `vtprune calibrate --host {hosts[-1]} ...`"
                )
            self._trend = found
        grid = adapter.pad_grid() if adapter is not None else None
        self._pad = self._pad_theta is not None and grid is not None
        if self._pad:
            self._grid = int(grid)

    def needs_signal(self, name: str) -> bool:
        return (name == PIXEL_VALUES and self._pad) or super().needs_signal(name)

    def weights(self, signals: Signals) -> list[torch.Tensor]:
        """Per sample ``[n_b]`` float32 trend weights ``w_j`` (1 where no image span applies)."""
        lay = signals.layout
        out = []
        for b in range(lay.batch_size):
            w = torch.ones(int(lay.positions[b].numel()))
            for idx in lay.image_slices(b):
                w[idx.cpu()] = self._trend.weights(int(idx.numel()))
            out.append(w)
        return out

    def corrects(self, signals: Signals) -> bool:
        """Whether this call corrects the host's scores: always with ``every_stage``, else at the host's
        first stage of the prefill (a pre-LLM stage, or in-LLM stage 0 when no pre-LLM stage ran before it)."""
        if self.every_stage:
            return True
        if signals.stage == PRE_LLM:
            self._after_pre_llm = True
            return True
        if signals.stage_index != 0:
            return False
        first = not self._after_pre_llm
        self._after_pre_llm = False
        return first

    def transform(self, scores: list[torch.Tensor], signals: Signals) -> list[torch.Tensor]:
        if not self.corrects(signals):
            return scores
        self.last_padding = [torch.zeros(0, dtype=torch.long) for _ in scores]
        self._check_layer(signals)
        out = [s.float() * w.to(s.device) for s, w in zip(scores, self.weights(signals))]
        if self._pad and signals.pixel_values is not None:
            fill = float("-inf") if self._pad_mode == "exclude" else 0.0
            for b, s in enumerate(out):
                pad = self._padding_tokens(signals, b)
                if pad.numel():
                    idx = pad.to(s.device)
                    s[idx] = torch.where(s[idx] == float("-inf"), s[idx], fill)  # -inf (excluded) stays
                self.last_padding[b] = pad
        return out

    def _padding_tokens(self, signals: Signals, b: int) -> torch.Tensor:
        """Visual-token indices of sample ``b`` that are more than ``pad_theta`` padding (its resolved value)."""
        lay, g = signals.layout, self._grid
        pixels = signals.pixel_values
        found = []
        for idx in lay.image_slices(b):
            coords = lay.coords[b][idx].cpu()
            patch = idx.cpu()[coords[:, 0] == 0]  # the patch grid (not LLaVA's "full" CLS token)
            if patch.numel() == 0:
                continue
            tile = int(lay.source[b][patch[0]]) // (g * g + 1)
            if pixels.dim() != 4 or tile >= pixels.shape[0]:
                continue
            frac = padding_fraction(pixels[tile], g)
            if frac is None:
                continue
            rc = lay.coords[b][patch].cpu()
            found.append(patch[frac[rc[:, 1], rc[:, 2]] > self._pad_theta])
        return torch.sort(torch.cat(found)).values if found else torch.zeros(0, dtype=torch.long)

    def _check_layer(self, signals: Signals) -> None:
        fitted = self._trend.layer
        if fitted is not None and signals.layer is not None and fitted != signals.layer and not self._warned_layer:
            self._warned_layer = True
            warnings.warn(
                f"debias: the trend from {self._trend.source} was fitted at layer {fitted} but pruning runs at "
                f"layer {signals.layer}; calibrate with `vtprune calibrate --layer {signals.layer}`",
                stacklevel=2,
            )

