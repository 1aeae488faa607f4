"""Evaluation tasks: the built-in ``toy-shapes`` test split (and its noise-image control ``toy-shapes-noise``)
and user ``.jsonl`` files.

A task is a list of `EvalSample`: one image, one question, a reference answer, and how to score it
(`vtprune.eval.metrics`). Everything that can be checked before the model runs is checked in
`load_task` (unknown task, malformed line, missing image file) and raises `EvalError`; an image that
exists but cannot be decoded fails its sample only, at run time.

**The jsonl format**: one JSON object per line (blank lines are skipped; line numbers count them):

- ``"image"``: path of the image, relative to the jsonl file's directory (or absolute);
- ``"question"``: the question text;
- ``"answer"``: for an open question a string (numbers are turned into strings), scored by normalised
  exact match; with ``"choices"`` (a list of at least two strings, shown as lettered options) the
  0-based index of the correct choice, or its text, or its letter (``"B"``), scored as multiple choice;
- optional ``"id"`` (reported with each prediction) and ``"type"`` (accuracy is also broken down by
  it; default: the metric, ``exact_match`` or ``multiple_choice``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vtprune.eval.errors import EvalError
from vtprune.eval.metrics import LETTERS, choice_correct, exact_match, format_choices, normalise

TOY_SHAPES = "toy-shapes"
TOY_SHAPES_NOISE = "toy-shapes-noise"  # the same questions, images replaced by noise (a control)
TOY_SHAPES_CROWDED = "toy-shapes-crowded"  # 4-6 objects, no count questions: separates pruners
TOY_SHAPES_DEFAULT_LIMIT = 300
ONE_WORD = "Answer with one word."
MULTIPLE_CHOICE = "Answer with the option's letter from the given choices directly."


@dataclass
class EvalSample:
    """One question about one image, with its reference answer and how it is scored."""

    index: int  # position in the task
    question: str
    answer: str  # reference text (for multiple choice: the correct option's text)
    choices: list[str] | None = None  # multiple-choice options, or None for exact match
    answer_index: int | None = None  # multiple choice: the correct option (0-based)
    qtype: str = "exact_match"  # group for the per-type accuracy
    image_path: Path | None = None  # the image on disk (jsonl tasks) ...
    image: Any = None  # ... or in memory (toy-shapes)
    one_word: bool = False  # ask for a one-word answer
    id: Any = None  # the record's id, if any
    line: int | None = None  # the record's line in its jsonl file
    # toy tasks: the (row, col) cells on a cell_grid lattice of each object the question is about and of
    # every object in the image, one sorted list per object (the oracle covers objects before completing them)
    question_objects: list[list[tuple[int, int]]] | None = None
    scene_objects: list[list[tuple[int, int]]] | None = None
    cell_grid: int | None = None

    @property
    def metric(self) -> str:
        return "multiple_choice" if self.choices else "exact_match"

    @property
    def question_cells(self) -> list[tuple[int, int]] | None:
        """The sorted cells of the question's objects (toy tasks; None elsewhere)."""
        return None if self.question_objects is None else sorted({c for o in self.question_objects for c in o})

    @property
    def object_cells(self) -> list[tuple[int, int]] | None:
        """The sorted cells of every object in the image (toy tasks; None elsewhere)."""
        return None if self.scene_objects is None else sorted({c for o in self.scene_objects for c in o})

    def load_image(self):
        """The image as RGB ``PIL.Image`` (raises for an unreadable file: that sample then fails)."""
        if self.image is not None:
            return self.image.convert("RGB")
        from PIL import Image

        with Image.open(self.image_path) as im:
            return im.convert("RGB")

    def prompt_text(self) -> str:
        """The user text: the question, then the lettered options or the one-word instruction."""
        if self.choices:
            return f"{self.question}\n{format_choices(self.choices)}\n{MULTIPLE_CHOICE}"
        if self.one_word:
            return f"{self.question} {ONE_WORD}"
        return self.question

    def score(self, prediction: str) -> bool:
        if self.choices:
            return choice_correct(prediction, self.choices, self.answer_index)
        return exact_match(prediction, self.answer)


@dataclass
class Task:
    """A named list of samples; ``info`` goes into results.json (source file, chance accuracy, ...)."""

    name: str
    samples: list[EvalSample]
    info: dict[str, Any] = field(default_factory=dict)


def load_task(spec: str, limit: int | None = None, seed: int = 0) -> Task:
    """``"toy-shapes"`` or a path to a ``.jsonl`` file; at most ``limit`` samples (the first ones).

    Raises `EvalError` for an unknown task, a malformed line or a missing image file.
    """
    if limit is not None and limit <= 0:
        raise EvalError(f"--limit must be positive, got {limit}")
    if spec in (TOY_SHAPES, TOY_SHAPES_NOISE, TOY_SHAPES_CROWDED):
        return toy_shapes_task(limit or TOY_SHAPES_DEFAULT_LIMIT, seed, noise=spec == TOY_SHAPES_NOISE,
                               crowded=spec == TOY_SHAPES_CROWDED)
    path = Path(spec)
    if path.suffix == ".jsonl":
        if not path.is_file():
            raise EvalError(f"task file {spec} not found; give an existing .jsonl file")
        return jsonl_task(path, limit)
    raise EvalError(f"unknown task {spec!r}: use {TOY_SHAPES!r}, {TOY_SHAPES_NOISE!r}, {TOY_SHAPES_CROWDED!r} or the "
                    "path of a .jsonl file "
                    "(see the README)")


def toy_shapes_task(n: int, seed: int = 0, noise: bool = False, crowded: bool = False) -> Task:
    """The first ``n`` samples of the toy-shapes test split (`vtprune.toy.shapes`), one-word answers
    (``crowded=True``: of its crowded variant, ``toy-shapes-crowded``).

    ``noise=True`` is the control task ``toy-shapes-noise``: the same questions with every image replaced
    by uniform noise (deterministic by seed), so a model that really looks falls to chance accuracy.
    """
    import numpy as np
    from PIL import Image

    from vtprune.toy import shapes

    data = shapes.dataset("test", n, seed=seed, crowded=crowded)
    rng = np.random.default_rng([seed, 99])
    samples = []
    for i, s in enumerate(data):
        image = s.image
        if noise:
            image = Image.fromarray(rng.integers(0, 256, (*s.image.size[::-1], 3), dtype=np.uint8))
        samples.append(EvalSample(index=i, question=s.question, answer=s.answer, qtype=s.qtype, image=image,
                                  one_word=True, cell_grid=s.image.size[0] // shapes.CELL,
                                  question_objects=None if noise else [sorted(o.cells) for o in s.relevant],
                                  scene_objects=None if noise else [sorted(o.cells) for o in s.objects]))
    info = {"split": "test", "seed": seed, "chance_accuracy": shapes.chance_accuracy(data), "noise_images": noise,
            "crowded": crowded}
    return Task(TOY_SHAPES_NOISE if noise else TOY_SHAPES_CROWDED if crowded else TOY_SHAPES, samples, info)


def jsonl_task(path: Path, limit: int | None = None) -> Task:
    """Parse a jsonl task file (format in the module docstring); errors name the file and line."""
    samples: list[EvalSample] = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if limit is not None and len(samples) >= limit:
                break
            if not line.strip():
                continue
            samples.append(_parse_record(line, lineno, path, len(samples)))
    if not samples:
        raise EvalError(f"task file {path} has no records; write one JSON object per line")
    info = {"source": str(path), "metrics": sorted({s.metric for s in samples})}
    return Task(path.name, samples, info)


def _parse_record(line: str, lineno: int, path: Path, index: int) -> EvalSample:
    def fail(msg: str) -> EvalError:
        return EvalError(f"{path}:{lineno}: {msg}")

    try:
        rec = json.loads(line)
    except json.JSONDecodeError as err:
        raise fail(f"line {lineno} is not valid JSON ({err.msg}); write one JSON object per line") from None
    if not isinstance(rec, dict):
        raise fail(f"line {lineno} is a JSON {type(rec).__name__}, expected an object "
                   '{"image": ..., "question": ..., "answer": ...}')
    for key in ("image", "question", "answer"):
        if key not in rec:
            raise fail(f'line {lineno} has no "{key}" field; each record needs "image", "question" and "answer"')
    image, question = rec["image"], rec["question"]
    if not isinstance(image, str) or not image:
        raise fail(f'line {lineno}: "image" must be a path string, got {image!r}')
    if not isinstance(question, str) or not question.strip():
        raise fail(f'line {lineno}: "question" must be a non-empty string, got {question!r}')
    image_path = Path(image) if Path(image).is_absolute() else path.parent / image
    if not image_path.is_file():
        raise fail(f"line {lineno}: image file {image_path} not found (image paths are relative to the jsonl "
                   "file's directory)")
    qtype = rec.get("type")
    if qtype is not None and not isinstance(qtype, str):
        raise fail(f'line {lineno}: "type" must be a string, got {qtype!r}')
    common = dict(index=index, question=question.strip(), image_path=image_path, id=rec.get("id"), line=lineno)
    answer, choices = rec["answer"], rec.get("choices")
    if choices is None:
        if isinstance(answer, bool) or not isinstance(answer, (str, int, float)) or not str(answer).strip():
            raise fail(f'line {lineno}: "answer" must be a non-empty string (or give "choices" for multiple '
                       f"choice), got {answer!r}")
        return EvalSample(answer=str(answer), qtype=qtype or "exact_match", **common)
    if (not isinstance(choices, list) or len(choices) < 2 or len(choices) > len(LETTERS)
            or not all(isinstance(c, str) and c.strip() for c in choices)):
        raise fail(f'line {lineno}: "choices" must be a list of 2 to {len(LETTERS)} non-empty strings, '
                   f"got {choices!r}")
    k = _answer_index(answer, choices)
    if k is None:
        raise fail(f'line {lineno}: "answer" {answer!r} names none of the choices; give a 0-based index '
                   f"(0..{len(choices) - 1}), a choice's text or its letter (A..{LETTERS[len(choices) - 1]})")
    return EvalSample(answer=choices[k], choices=list(choices), answer_index=k,
                      qtype=qtype or "multiple_choice", **common)


def _answer_index(answer: Any, choices: list[str]) -> int | None:
    """The option an ``answer`` field names: an index, a choice's text (exact, then normalised), a letter."""
    if isinstance(answer, bool):
        return None
    if isinstance(answer, int):
        return answer if 0 <= answer < len(choices) else None
    if not isinstance(answer, str):
        return None
    for match in (lambda c: c == answer, lambda c: normalise(c) == normalise(answer)):
        hits = [i for i, c in enumerate(choices) if match(c)]
        if len(hits) == 1:
            return hits[0]
    letter = answer.strip().strip("().").upper()
    if len(letter) == 1 and letter in LETTERS[: len(choices)]:
        return LETTERS.index(letter)
    return None

