"""Calibration files: where they live, how they are named, loading and saving.

A calibration file is a small JSON document per model, written by ``vtprune calibrate`` and read by
the ``debias`` wrapper (the positional trend ``T`` of a host scorer) and the ``sink`` wrapper (the sink
dimensions ``D_sink`` of the LLM's residual stream)::

    {"format": 1, "model_type": "llava", "hidden_size": 4096, "name_or_path": "llava-1.5-7b-hf",
     "trend": {"fastv": {"layer": 2, "coeffs": [1.0, c1, c2, c3], "n_images": 50}},
     "sink": {"dims": [1415, 2533], "tau": 20.0, "layers": [2, ..., 31], "n_images": 50, ...}}

- ``trend[host].coeffs``: ``T(x) = c0 + c1 x + c2 x^2 + c3 x^3`` on the normalised visual index
  ``x = j / (n - 1)`` of an image's span, with ``c0 = 1`` (``T(0) = 1``), positive and non-decreasing on
  ``[0, 1]``. ``layer`` is the in-LLM layer the host was scored at (None: pre-LLM).
- ``sink.dims``: the residual-stream dimensions with massive activations (empty when none were found;
  ``note`` then says so).

The key of a model is the basename of ``config.name_or_path`` (``llava-1.5-7b-hf``), or
``<model_type>-<text hidden size>`` for a model without a name (``llava-64``). Lookup order (the first
existing file wins), after an explicit path given as a wrapper option:

1. ``$VTPRUNE_CALIBRATION_DIR/<key>.json``
2. ``~/.cache/vtprune/calibration/<key>.json`` (where ``vtprune calibrate`` writes by default)
3. ``vtprune/calibration/<key>.json`` shipped inside the package (built-in toy models)
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

from vtprune.config import ConfigError

FORMAT = 1
ENV_DIR = "VTPRUNE_CALIBRATION_DIR"


class CalibrationError(ConfigError):
    """A calibration file or a calibration input is unusable; the message says how to fix it."""


def text_hidden_size(config: Any) -> int:
    """The language model's hidden size (``D`` of the residual stream)."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return int(text.hidden_size)


def calibration_key(model: Any) -> str:
    """File stem for ``model``: ``name_or_path`` basename, else ``<model_type>-<hidden>``."""
    cfg = model.config
    name = str(getattr(cfg, "name_or_path", "") or "").rstrip("/\\")
    key = os.path.basename(name) if name else f"{cfg.model_type}-{text_hidden_size(cfg)}"
    return re.sub(r"[^A-Za-z0-9._-]", "_", key)


def user_dir() -> Path:
    """``~/.cache/vtprune/calibration``: the default output of ``vtprune calibrate``."""
    return Path.home() / ".cache" / "vtprune" / "calibration"


def package_dir() -> Path:
    """The calibration files shipped with vtprune (this directory)."""
    return Path(__file__).resolve().parent


def search_dirs() -> list[Path]:
    """Directories searched for ``<key>.json``, in order."""
    dirs = []
    if os.environ.get(ENV_DIR):
        dirs.append(Path(os.environ[ENV_DIR]).expanduser())
    return dirs + [user_dir(), package_dir()]


def default_output_path(model: Any) -> Path:
    return user_dir() / f"{calibration_key(model)}.json"


def find_calibration(model: Any) -> Path | None:
    """The first existing ``<key>.json`` in `search_dirs`, or None."""
    key = calibration_key(model)
    for d in search_dirs():
        path = d / f"{key}.json"
        if path.is_file():
            return path
    return None


def load_calibration(path: str | os.PathLike, model: Any = None) -> dict[str, Any]:
    """Read and check a calibration file; with ``model``, check that it was made for this kind of model.

    Raises `CalibrationError` for a missing or malformed file, an unknown format, or a file made for a
    different model type or hidden size.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise CalibrationError(f"calibration file {str(path)!r} does not exist; write one with `vtprune calibrate`")
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise CalibrationError(f"calibration file {str(path)!r} is not valid JSON ({err})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise CalibrationError(
            f"calibration file {str(path)!r} has format {data.get('format') if isinstance(data, dict) else None!r}, "
            f"expected {FORMAT}; re-run `vtprune calibrate`"
        )
    if model is not None:
        want = (model.config.model_type, text_hidden_size(model.config))
        got = (data.get("model_type"), data.get("hidden_size"))
        if got != want:
            raise CalibrationError(
                f"calibration file {str(path)!r} was made for model_type={got[0]!r} with hidden size {got[1]}, "
                f"but this model is model_type={want[0]!r} with hidden size {want[1]}; run `vtprune calibrate "
                "--model <this model> --images DIR` or pass the right file"
            )
    return data


def save_calibration(data: dict[str, Any], path: str | os.PathLike) -> Path:
    """Write ``data`` to ``path`` (parents created). Trend entries of other hosts already in a file for the
    same model are kept, so ``vtprune calibrate --host A`` then ``--host B`` fills one file."""
    path = Path(path).expanduser()
    merged = dict(data)
    if path.is_file():
        try:
            old = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            old = None
        same = isinstance(old, dict) and old.get("format") == FORMAT and all(
            old.get(k) == data.get(k) for k in ("model_type", "hidden_size")
        )
        if same and isinstance(old.get("trend"), dict):
            merged["trend"] = {**old["trend"], **data.get("trend", {})}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(merged, indent=2) + "\n")
    return path
