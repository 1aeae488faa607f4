"""The demo's work, without any UI: check the inputs, answer pruned and unpruned, draw what was kept.

`DemoEngine` holds one model and its processor; `DemoEngine.ask` is what the Gradio app calls for
every request (the app only wires widgets to it), so tests drive it directly with a tiny model.
Every bad input raises `DemoInputError` with a message meant for the person at the UI.
"""

from __future__ import annotations

import statistics
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image

import vtprune
from vtprune import viz

MAX_SIDE = 1024  # larger images are downscaled to this longest side before the processor sees them
MAX_PIXELS = 40_000_000  # larger ones (e.g. 8000 x 6000) are refused before they are decoded
MAX_QUESTION = 500  # characters


class DemoInputError(ValueError):
    """A request the demo cannot run; the message says what to change."""


@dataclass
class Answer:
    """One request's outcome.

    ``pruned`` / ``unpruned``: generated text; ``overlay``: the model's view with pruned tokens dark
    (or the score heatmap); ``kept`` / ``total``: visual tokens kept and before; ``prefill_ms`` /
    ``unpruned_prefill_ms``: median prefill times, measured back to back; ``stage``: where it pruned;
    ``notes``: what was adjusted (a downscaled image, a clamped budget, no scores for the heatmap).
    """

    pruned: str
    unpruned: str
    overlay: Image.Image | None
    kept: int
    total: int
    prefill_ms: float
    unpruned_prefill_ms: float
    stage: str
    notes: list[str]

    def summary(self) -> str:
        speed = self.unpruned_prefill_ms / self.prefill_ms if self.prefill_ms else float("nan")
        lines = [f"**visual tokens kept**: {self.kept} of {self.total} ({self.stage})",
                 f"**prefill**: pruned {self.prefill_ms:.1f} ms, unpruned {self.unpruned_prefill_ms:.1f} ms "
                 f"({speed:.2f}x, median of 3, same process)"]
        return "\n\n".join(lines + [f"_note: {n}_" for n in self.notes])


def load_image(source: Any) -> tuple[Image.Image, list[str]]:
    """An RGB PIL image from a path or a PIL image, downscaled to `MAX_SIDE`; and notes of what was done.

    Raises `DemoInputError` for no image, a file that is not an image, or one over `MAX_PIXELS`.
    """
    notes: list[str] = []
    if source is None or (isinstance(source, str) and not source.strip()):
        raise DemoInputError("no image: upload an image (PNG or JPEG) or pick an example")
    if isinstance(source, Image.Image):
        img = source
    else:
        path = Path(str(source))
        try:
            img = Image.open(path)
            w, h = img.size
            if w * h > MAX_PIXELS:
                raise DemoInputError(f"the image is {w} x {h} pixels, over the demo's limit of {MAX_PIXELS:,}: "
                                     f"upload a smaller one (at most about {MAX_SIDE * 4} px a side)")
            img.load()
        except DemoInputError:
            raise
        except Image.DecompressionBombError:
            raise DemoInputError("the image is far too large to decode safely: upload a smaller one") from None
        except Exception as err:  # PIL raises several types for non-images and truncated files
            raise DemoInputError(f"{path.name} is not an image the demo can read ({type(err).__name__}): "
                                 "upload a PNG or JPEG") from None
    w, h = img.size
    if w * h > MAX_PIXELS:
        raise DemoInputError(f"the image is {w} x {h} pixels, over the demo's limit of {MAX_PIXELS:,}")
    img = img.convert("RGB")
    if max(w, h) > MAX_SIDE:
        scale = MAX_SIDE / max(w, h)
        img = img.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.BICUBIC)
        notes.append(f"the {w} x {h} image was downscaled to {img.size[0]} x {img.size[1]}")
    return img, notes


def parse_keep(value: Any, total: int) -> int | float:
    """The budget from the UI: a whole count of visual tokens in [1, ``total``] (``"7"``, ``7``) or a
    fraction in (0, 1] (``"0.25"``, ``0.25``; ``"1.0"`` keeps every token, ``"1"`` keeps one).

    Raises `DemoInputError` for anything else: empty, not a number, zero or negative, a count above
    ``total``, a fraction above 1 that is not a whole number.
    """
    def out_of_range(why: str) -> DemoInputError:
        return DemoInputError(f"budget {value!r} is out of range: {why}; give a count from 1 to {total} "
                              "(this image's visual tokens) or a fraction in (0, 1]")

    if isinstance(value, bool) or value is None or (isinstance(value, str) and not value.strip()):
        raise DemoInputError("no budget: give the visual tokens to keep (e.g. 7) or a fraction (e.g. 0.25)")
    if isinstance(value, str):
        text = value.strip()
        try:
            value = int(text)
        except ValueError:
            try:
                value = float(text)
            except ValueError:
                raise DemoInputError(f"budget {text!r} is not a number: give a count (e.g. 7) or a fraction "
                                     "(e.g. 0.25)") from None
    if isinstance(value, float) and value.is_integer() and value > 1:
        value = int(value)
    if isinstance(value, int):
        if value < 1:
            raise out_of_range("keep at least one token")
        if value > total:
            raise out_of_range(f"the image has only {total} visual tokens")
        return value
    if not (0 < value <= 1):
        raise out_of_range("a fraction lies in (0, 1]")
    return float(value)


class DemoEngine:
    """One model behind the demo. Requests are served one at a time (``lock``): pruning patches the
    model instance, so two requests must never interleave."""

    def __init__(self, model, processor, *, max_new_tokens: int = 8, repeats: int = 3, name: str = "model"):
        from vtprune.loading import default_prompt

        self.model, self.processor, self.name = model.eval(), processor, name
        self.max_new_tokens, self.repeats = max_new_tokens, repeats
        self._prompt = default_prompt
        self.lock = threading.Lock()
        self.tokenizer = getattr(processor, "tokenizer", processor)

    def methods(self) -> list[str]:
        """The pruning methods offered: every registered one that configures on this model."""
        out = []
        for name in vtprune.methods():
            try:
                vtprune.apply(self.model, method=name, keep=1.0)
                out.append(name)
            except (vtprune.ConfigError, vtprune.UnsupportedModelError):
                pass
            finally:
                vtprune.remove(self.model)
        return out

    def _inputs(self, image: Image.Image, question: str):
        text = self._prompt(self.model, self.processor, question)
        return self.processor(images=[image], text=[text], return_tensors="pt").to(self.model.device)

    def _generate(self, inputs) -> str:
        out = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=False)
        return self.tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()

    def _prefill_ms(self, inputs) -> float:
        times = []
        for _ in range(self.repeats):
            t0 = time.perf_counter()
            self.model(**inputs, logits_to_keep=1)
            times.append(time.perf_counter() - t0)
        return statistics.median(times) * 1e3

    def ask(self, image: Any, question: str, method: str, keep: Any, heatmap: bool = False) -> Answer:
        """Answer ``question`` about ``image`` unpruned and pruned with ``method`` at ``keep``."""
        question = (question or "").strip()
        if not question:
            raise DemoInputError("the question is empty: type a question about the image")
        if len(question) > MAX_QUESTION:
            raise DemoInputError(f"the question has {len(question)} characters; keep it under {MAX_QUESTION}")
        if not method:
            raise DemoInputError(f"no method: choose one of {', '.join(vtprune.methods())}")
        from vtprune.loading import placeholder_in

        placeholder = placeholder_in(self.model, self.processor, question)
        if placeholder is not None:
            raise DemoInputError(f"the question contains {placeholder}, the model's image placeholder: remove it "
                                 "(the demo places the image in the prompt itself)")
        img, notes = load_image(image)
        try:
            grid = viz.token_grid(self.model, self.processor, img)
        except ValueError as err:
            grid, notes = None, notes + [str(err)]
        with self.lock, torch.inference_mode():
            inputs = self._inputs(img, question)
            total = int(sum((inputs["input_ids"][0] == t).sum() for t in self._visual_ids()))
            budget = parse_keep(keep, total)
            try:
                vtprune.apply(self.model, method=method, keep=budget)
            except (vtprune.ConfigError, vtprune.UnsupportedModelError) as err:
                raise DemoInputError(f"{method} cannot run here: {err}") from None
            try:
                pruned = self._generate(inputs)
                st = vtprune.stats(self.model)
                pruned_ms = self._prefill_ms(inputs)
                with vtprune.disabled(self.model):
                    unpruned = self._generate(inputs)
                    unpruned_ms = self._prefill_ms(inputs)
            finally:
                vtprune.remove(self.model)
        scores = st.scores[0] if st.scores is not None else None
        picture = None
        if grid is not None:
            if heatmap and scores is None:
                notes.append(f"{method} selects without a score per token: the heatmap is not available")
            picture = viz.overlay(grid, st.kept[0], scores, heatmap=heatmap and scores is not None)
        where = "before the LLM" if st.stage == "pre-llm" else f"after LLM layer {st.layer}"
        return Answer(pruned, unpruned, picture, int(st.visual_after[0]), int(st.visual_before[0]),
                      pruned_ms, unpruned_ms, where, notes)

    def _visual_ids(self) -> list[int]:
        from vtprune.adapters import adapter_for

        return adapter_for(self.model).visual_token_ids()
