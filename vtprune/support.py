"""Which preset runs on which model family, found by trying: every preset is applied with its defaults to a
tiny random model of every adapter (32 decoder layers, as the 7B LLMs) and run on one image; a refusal is
recorded with its message.

The "models" column of the README's method table (`scripts/update_readme_models.py`) and
`vtprune methods --table` (the full grid) come from this matrix, so they cannot drift from the code
(`tests/test_support.py` regenerates it and compares).
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from typing import Any

# model families in table order: (config.model_type, label)
FAMILIES: tuple[tuple[str, str], ...] = (
    ("llava", "LLaVA-1.5"),
    ("llava_next", "LLaVA-NeXT"),
    ("qwen2_vl", "Qwen2-VL"),
    ("qwen2_5_vl", "Qwen2.5-VL"),
    ("qwen3_vl", "Qwen3-VL"),
    ("llava_llama", "LLaVA repo"),
)
# the tiny models get the 7B LLMs' depth, so that every method's default layers are the papers' (a 4-layer
# toy would refuse staged methods that a real 32-layer model runs)
DEPTH = 32
# options a preset cannot run without (an ensemble needs members): the table tries it with these
EXAMPLE_OPTIONS: dict[str, dict] = {"ensemble": {"members": ["fastv", "random"]}}


def preset_strings() -> list[str]:
    """Every registered preset as a runnable method string: a wrapper with a default host alone
    (``sink``), other wrappers over FastV (``debias+fastv``)."""
    from vtprune.scorers import registry

    out = []
    for name, cls in sorted(registry().items()):
        if getattr(cls, "is_wrapper", False):
            out.append(name if getattr(cls, "default_host", None) else f"{name}+fastv")
        else:
            out.append(name)
    return out


@dataclass
class Trial:
    """One tiny model and a one-image call for it."""

    model: Any
    inputs: dict


def _tiny(family: str, workdir: str) -> Trial | None:
    """A tiny random model of ``family`` and one prompt with one image; None where the family's code is
    not installed (the original LLaVA codebase)."""
    from vtprune.loading import default_prompt, synthetic_image

    image = synthetic_image(0)
    if family == "llava_llama":
        from vtprune.toy.tiny_llava_repo import IMAGE_TOKEN_INDEX, llava_repo_available, tiny_llava_repo

        if not llava_repo_available():
            return None
        from llava.mm_utils import process_images, tokenizer_image_token

        model, tok, processor = tiny_llava_repo(workdir, layers=DEPTH)
        ids = tokenizer_image_token("USER: <image>\nWhat is in the picture? ASSISTANT:", tok, IMAGE_TOKEN_INDEX,
                                    return_tensors="pt")[None]
        return Trial(model, {"input_ids": ids, "attention_mask": ids.new_ones(ids.shape),
                             "images": process_images([image], processor, model.config)})
    if family.startswith("qwen"):
        from vtprune.toy.tiny_qwen import tiny_qwen, tiny_qwen_processor

        model, processor = tiny_qwen(family, layers=DEPTH), tiny_qwen_processor(family)
    else:
        from vtprune.toy.tiny import tiny_llava, tiny_llava_processor

        next_ = family == "llava_next"
        model, processor = tiny_llava(next_=next_, layers=DEPTH), tiny_llava_processor(next_=next_)
    inputs = processor(images=[image], text=[default_prompt(model, processor)], return_tensors="pt")
    return Trial(model, dict(inputs))


def support_matrix(methods: list[str] | None = None) -> dict[str, dict[str, str | None]]:
    """``{method: {model_type: None (runs) or the refusal's message}}`` for every preset and family, on
    tiny random models with `DEPTH` decoder layers.

    A family whose code is not installed is absent from the inner dicts. A preset "runs" when
    `vtprune.apply` accepts it with its defaults and a forward on one image returns; a `ConfigError` (or
    `UnsupportedModelError`) is a refusal. Anything else is a bug and propagates.
    """
    import torch

    import vtprune
    from vtprune.config import ConfigError

    methods = preset_strings() if methods is None else methods
    out: dict[str, dict[str, str | None]] = {m: {} for m in methods}
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as workdir:
        for family, _ in FAMILIES:
            trial = _tiny(family, workdir)
            if trial is None:
                continue
            for method in methods:
                try:
                    vtprune.apply(trial.model, method=method, **EXAMPLE_OPTIONS.get(method, {}))
                    with torch.no_grad():
                        trial.model(**trial.inputs)
                    out[method][family] = None
                except ConfigError as err:
                    out[method][family] = " ".join(str(err).split())
                finally:
                    vtprune.remove(trial.model)
    return out


def markdown_table(matrix: dict[str, dict[str, str | None]]) -> str:
    """The matrix as a markdown table (yes, or "no" with a numbered note giving the refusal) and its notes."""
    families = [(f, label) for f, label in FAMILIES if any(f in row for row in matrix.values())]
    reasons: list[str] = []
    lines = ["| method | " + " | ".join(label for _, label in families) + " |",
             "|---|" + "---|" * len(families)]
    for method, row in matrix.items():
        cells = []
        for family, _ in families:
            why = row.get(family, "not installed")
            if why is None:
                cells.append("yes")
                continue
            if why not in reasons:
                reasons.append(why)
            cells.append(f"no ({reasons.index(why) + 1})")
        lines.append(f"| `{method}` | " + " | ".join(cells) + " |")
    notes = [f"({i}) {why}" for i, why in enumerate(reasons, 1)]
    return "\n".join(lines + ([""] + notes if notes else []))


def models_cell(row: dict[str, str | None]) -> str:
    """One method's "models" cell: ``all`` or ``all but <family> (<why>)``, ``none`` if nothing runs."""
    labels = dict(FAMILIES)
    refused = [(labels[f], why) for f, why in row.items() if why is not None]
    if not refused:
        return "all"
    if len(refused) == len(row):
        return "none: " + refused[0][1]
    return "all but " + "; ".join(f"{label} ({why})" for label, why in refused)


def with_models_column(readme: str, matrix: dict[str, dict[str, str | None]]) -> str:
    """``readme`` with the last cell ("models") of each row of its method table set from ``matrix``.

    The method table is the one whose header starts ``| method | where |``; a row ``| `name` | ...`` or
    ``| `name+<host>` | ...`` takes the cell of the preset whose first component is ``name``.
    """
    lines = readme.split("\n")
    for i in method_table_rows(lines):
        preset = row_preset(lines[i], matrix)
        head, _, _ = lines[i].rstrip().rstrip("|").rstrip().rpartition(" | ")
        lines[i] = f"{head} | {models_cell(matrix[preset])} |"
    return "\n".join(lines)


def method_table_rows(lines: list[str]) -> list[int]:
    """Indices of the body rows of the README's method table (the table whose header starts
    ``| method | where |``)."""
    rows, inside = [], False
    for i, line in enumerate(lines):
        if line.startswith("| method | where |"):
            inside = True
        elif inside and not line.startswith("|"):
            inside = False
        elif inside and not line.startswith("|---"):
            rows.append(i)
    return rows


def row_preset(line: str, presets: Any) -> str:
    """The preset a README method-table row describes: its first cell's name (``prumerge+``), or for a
    wrapper row ``debias+<host>`` the preset string starting with that wrapper (``debias+fastv``)."""
    name = line.split("|")[1].strip().strip("`")
    if name in presets:
        return name
    composed = [m for m in presets if "+" in m.rstrip("+") and m.split("+")[0] == name.split("+")[0]]
    if not composed and name.split("+")[0] in presets:
        return name.split("+")[0]  # a wrapper with a default host (sink)
    if not composed:
        raise ValueError(f"README method table: row {name!r} names no preset ({sorted(presets)})")
    return composed[0]
