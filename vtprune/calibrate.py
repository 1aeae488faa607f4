"""``vtprune calibrate``: measure a model's positional trend and sink dimensions on calibration images.

For each image (and each prompt) one prefill runs with the host scorer applied through vtprune at
``keep=1.0`` (nothing is dropped), and records:

- the host's visual score vector per image span (``debias``'s trend): each image's scores are divided
  by their mean, averaged per bin of the normalised index ``x = j / (n - 1)``, and a cubic
  ``T(x) = 1 + c1 x + c2 x^2 + c3 x^3`` is fitted (`fit_trend`), forced positive and non-decreasing;
- ``phi`` (see `vtprune.scorers.sink.massive_activation`) of the first token and of the visual tokens at
  the input of decoder layers ``2 .. L-1`` (forward pre-hooks; attention is never materialised).
  ``D_sink`` = the dimensions where the first token has ``phi > tau`` in more than half of the
  (image, layer) pairs; the share of visual tokens they flag is reported too.

The result is a calibration file (format in `vtprune.calibration`).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

import vtprune
from vtprune.adapters import adapter_for
from vtprune.calibration import FORMAT, CalibrationError, text_hidden_size
from vtprune.scorers.base import Scorer, Signals
from vtprune.scorers.compose import Wrapper, build_scorer
from vtprune.scorers.sink import massive_activation

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
N_BINS = 64


def image_files(path: str | os.PathLike, limit: int | None = None) -> list[Path]:
    """The ``.png`` / ``.jpg`` files of a directory (sorted; at most ``limit``), or one image file.

    Raises `CalibrationError` for a missing path, a directory without images, or a non-positive limit.
    Files are decoded later (`load_image`), which names any file that is not a readable image.
    """
    p = Path(path).expanduser()
    if limit is not None and limit < 1:
        raise CalibrationError(f"--limit must be at least 1, got {limit}")
    if p.is_file():
        return [p]
    if not p.is_dir():
        raise CalibrationError(f"--images {str(p)!r} is neither a directory nor a file")
    files = sorted(f for f in p.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise CalibrationError(f"--images {str(p)!r} holds no .png or .jpg files; put calibration images there")
    return files[:limit] if limit else files


def load_image(path: Path):
    """An RGB PIL image; `CalibrationError` naming the file when it is not an image."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except (UnidentifiedImageError, OSError) as err:
        raise CalibrationError(f"{str(path)!r} is not a readable image ({err}); remove it from the directory") from None


class _Recorder(Wrapper):
    """Passes the host's scores through unchanged and keeps a copy per image span (not registered)."""

    name = "calibrate-record"
    description = "records host scores"

    def __init__(self, inner: Scorer) -> None:
        super().__init__(inner)
        self.spans: list[torch.Tensor] = []

    def transform(self, scores: list[torch.Tensor], signals: Signals) -> list[torch.Tensor]:
        lay = signals.layout
        for b in range(lay.batch_size):
            for idx in lay.image_slices(b):
                self.spans.append(scores[b][idx].detach().float().cpu())
        return scores


def fit_trend(spans: Iterable[torch.Tensor], bins: int = N_BINS) -> list[float]:
    """Fit ``T`` to score vectors (one ``[n]`` vector per image span) -> ``[1, c1, c2, c3]``.

    Each span is divided by its mean (every image weighs the same), placed on ``x = j / (n - 1)`` and
    averaged per bin. The least-squares cubic through the bin means is made non-decreasing (isotonic
    regression on a grid: a falling stretch is flattened to its mean, not to its peak), floored at 5 % of its maximum (a trend corrects by at most 20x) and refitted;
    if the refit still dips or crosses zero, a non-decreasing line replaces it. Finally ``T(0) = 1``.
    """
    sums = torch.zeros(bins, dtype=torch.float64)
    counts = torch.zeros(bins, dtype=torch.float64)
    for s in spans:
        s = s.double()
        x = torch.arange(s.numel(), dtype=torch.float64) / max(1, s.numel() - 1)
        ok = torch.isfinite(s)
        if int(ok.sum()) < 2:
            continue
        mean = float(s[ok].mean())
        if mean <= 0:
            raise CalibrationError(
                "the host scores of an image have a non-positive mean; debias's multiplicative trend needs "
                "non-negative, attention-like scores: calibrate an attention-based host (e.g. --host fastv)"
            )
        b = (x[ok] * bins).long().clamp(max=bins - 1)
        sums.index_add_(0, b, s[ok] / mean)
        counts.index_add_(0, b, torch.ones_like(b, dtype=torch.float64))
    have = counts > 0
    if int(have.sum()) < 4:
        raise CalibrationError("too few visual scores to fit a trend; give more (or larger) images")
    centers = (torch.arange(bins, dtype=torch.float64) + 0.5) / bins
    xs, ys = centers[have], sums[have] / counts[have]

    def cubic(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        basis = torch.stack([x**k for k in range(4)], dim=1)
        return torch.linalg.lstsq(basis, y[:, None]).solution[:, 0]

    def values(c: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return sum(c[k] * x**k for k in range(4))

    grid = torch.linspace(0, 1, 201, dtype=torch.float64)
    v = isotonic(values(cubic(xs, ys), grid))
    v = v.clamp(min=0.05 * float(v.max().clamp(min=1e-12)))
    c = cubic(grid, v)
    fitted = values(c, grid)
    if float(fitted.min()) <= 0 or float(torch.diff(fitted).min()) < -1e-9 * float(fitted.abs().max()):
        slope = max(0.0, float(torch.linalg.lstsq(torch.stack([torch.ones_like(grid), grid], 1), v[:, None])
                               .solution[1, 0]))
        intercept = float((v - slope * grid).mean())
        if intercept <= 0:
            intercept, slope = float(v.mean()), 0.0
        c = torch.tensor([intercept, slope, 0.0, 0.0], dtype=torch.float64)
    return [1.0] + [round(float(ck / c[0]), 12) + 0.0 for ck in c[1:]]  # drop float dust of flat fits


def isotonic(y: torch.Tensor) -> torch.Tensor:
    """The non-decreasing sequence closest to ``y`` ``[n]`` in least squares (pool adjacent violators)."""
    blocks: list[list[float]] = []  # [mean, count]
    for v in y.tolist():
        blocks.append([v, 1.0])
        while len(blocks) > 1 and blocks[-2][0] > blocks[-1][0]:
            m2, c2 = blocks.pop()
            m1, c1 = blocks.pop()
            blocks.append([(m1 * c1 + m2 * c2) / (c1 + c2), c1 + c2])
    return torch.cat([torch.full((int(c),), m, dtype=y.dtype) for m, c in blocks])


def sink_layers(n_layers: int) -> list[int]:
    """Decoder layers whose *input* is inspected: ``2 .. L-1`` (all layers of models with <= 2)."""
    return list(range(2, n_layers)) if n_layers > 2 else list(range(n_layers))


@torch.no_grad()
def calibrate(
    model: Any,
    processor: Any,
    images: Sequence[Any],
    *,
    host: str = "fastv",
    layer: int | None = None,
    prompts: Sequence[str] | None = None,
    tau: float = 20.0,
    progress: bool | None = None,
    name_or_path: str | None = None,
) -> dict[str, Any]:
    """Run the calibration and return the calibration file's content (see `vtprune.calibration`).

    Args:
        model, processor: a supported VLM and its processor. Any vtprune patch on ``model`` is removed.
        images: PIL images or image paths.
        host: the host scorer whose trend is fitted (a method string, e.g. ``"fastv"``); it runs at
            ``keep=1.0``, so nothing is dropped while recording.
        layer: in-LLM layer for the host (None: the host's default).
        prompts: full prompts with the image placeholder (default: a question in the model's format);
            every image runs with every prompt.
        tau: the sink threshold (``phi <= sqrt(D)``: tiny models need ``tau < sqrt(D)``).
        progress: show a tqdm bar (None: only when attached to a terminal).
    """
    from tqdm.auto import tqdm

    if not images:
        raise CalibrationError("no calibration images given")
    if prompts is None:
        from vtprune.loading import default_prompt

        prompts = [default_prompt(model, processor)]
    adapter = adapter_for(model)
    visual_ids = adapter.visual_token_ids()
    layers = adapter.decoder_layers()
    inspect = sink_layers(len(layers))
    hidden = text_hidden_size(model.config)
    recorder = _Recorder(build_scorer(host, {}))

    first_hits = torch.zeros(hidden, dtype=torch.long)  # per dim: (image, layer) pairs with phi > tau
    visual_hits: list[tuple[int, torch.Tensor]] = []  # per (image, layer): (n visual, [m, 2] (token, dim))
    n_pairs = 0
    current: dict[str, Any] = {}

    def capture(module, args, kwargs):
        nonlocal n_pairs
        h = (args[0] if args else kwargs["hidden_states"])[0]
        if h.shape[0] != current["n"]:
            return None  # a pruned length (cannot happen at keep=1.0)
        phi = massive_activation(h)
        first_hits.add_((phi[current["first"]] > tau).long().cpu())
        vis = phi[current["visual"]] > tau
        visual_hits.append((int(vis.shape[0]), torch.nonzero(vis).cpu()))
        n_pairs += 1
        return None

    handles = []
    try:
        vtprune.apply(model, recorder, keep=1.0, layer=layer)
        used_layer = model._vtprune_state.layer  # the host's default layer when layer is None
        handles = [layers[i].register_forward_pre_hook(capture, with_kwargs=True) for i in inspect]
        jobs = [(im, p) for im in images for p in prompts]
        bar = tqdm(jobs, desc="vtprune calibrate", unit="prefill", disable=None if progress is None else not progress)
        for im, prompt in bar:
            pil = load_image(Path(im)) if isinstance(im, (str, os.PathLike)) else im
            inputs = processor(images=[pil], text=[prompt], return_tensors="pt")
            ids = inputs["input_ids"][0]
            visual = torch.zeros_like(ids, dtype=torch.bool)
            for t in visual_ids:
                visual |= ids == t
            if not bool(visual.any()):
                raise CalibrationError(f"the prompt {prompt!r} has no image placeholder; put the model's image token in it")
            mask = inputs.get("attention_mask")
            first = int(torch.nonzero(mask[0]).min()) if mask is not None else 0
            current.update(n=int(ids.numel()), first=first, visual=torch.nonzero(visual).flatten())
            model(**inputs, use_cache=False, logits_to_keep=1)
    finally:
        for h in handles:
            h.remove()
        vtprune.remove(model)

    dims = [int(d) for d in torch.nonzero(first_hits * 2 > n_pairs).flatten()] if n_pairs else []
    flagged, total = 0, 0
    if dims:
        dim_set = torch.tensor(dims)
        for n_vis, hits in visual_hits:
            total += n_vis
            if hits.numel():
                flagged += int(torch.unique(hits[torch.isin(hits[:, 1], dim_set), 0]).numel())
    sink: dict[str, Any] = {
        "dims": dims, "tau": float(tau), "layers": inspect, "n_images": len(images),
        "visual_sink_fraction": flagged / total if total else 0.0,
    }
    if not dims:
        top = int(first_hits.max()) if n_pairs else 0
        sink["note"] = (f"no sink dimensions found: the first token never had phi > {tau} in most of the "
                        f"{n_pairs} (image, layer) pairs (best dimension: {top}); this model shows no "
                        "massive activations at this tau")
    return {
        "format": FORMAT,
        "model_type": model.config.model_type,
        "hidden_size": hidden,
        "name_or_path": name_or_path or str(getattr(model.config, "name_or_path", "") or ""),
        "trend": {host.lower(): {"layer": used_layer, "coeffs": fit_trend(recorder.spans),
                                 "n_images": len(images)}},
        "sink": sink,
    }
