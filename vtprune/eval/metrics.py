"""Scoring one prediction: normalised exact match and multiple-choice accuracy.

**Normalisation** (`normalise`): Unicode NFKC, lowercase, every punctuation or symbol character
(Unicode categories ``P*`` and ``S*``) removed, runs of whitespace collapsed to one space, ends
stripped. ``"  The Red-Circle!"`` becomes ``"the redcircle"``.

**Exact match** (`exact_match`): the normalised prediction equals the normalised reference. When the
normalised reference is a single word (a *one-word answer*, as in every toy-shapes question), only the
first word of the normalised prediction is compared, so ``"Red."`` and ``"red square"`` both match
``"red"``, but ``"a red one"`` does not. An empty prediction never matches.

**Multiple choice** (`parse_choice`, `choice_correct`): options are shown as ``A. text`` lines
(`format_choices`). A prediction selects option *k* by, in this order:

1. **its letter**: the first whitespace-separated token of the prediction, with the characters
   ``()[]{}.,:;`` around it removed, is the letter of an option (``"B"``, ``"(B)"``, ``"B."``,
   ``"B) blue"``); a lowercase letter counts only when it is the whole prediction (``"b"``), so that
   the article in ``"a circle"`` is not read as option A;
2. **its text**: the normalised prediction equals an option's normalised text, or begins with it
   followed by a space; when several options qualify the longest one wins (``"dark blue"`` over
   ``"dark"``).

Otherwise no option is selected and the prediction is wrong.
"""

from __future__ import annotations

import string
import unicodedata

LETTERS = string.ascii_uppercase
_STRIP = "()[]{}.,:;"


def normalise(text: str) -> str:
    """Lowercase, drop punctuation and symbols, collapse whitespace (see the module docstring)."""
    text = unicodedata.normalize("NFKC", text).lower()
    kept = "".join(ch for ch in text if unicodedata.category(ch)[0] not in "PS")
    return " ".join(kept.split())


def exact_match(prediction: str, answer: str) -> bool:
    """Normalised exact match; first word only for a one-word reference (see the module docstring)."""
    pred, ref = normalise(prediction), normalise(answer)
    if not pred:
        return False
    if len(ref.split()) == 1:
        return pred.split()[0] == ref
    return pred == ref


def format_choices(choices: list[str]) -> str:
    """The options as lettered lines: ``"A. red\\nB. blue"``."""
    if len(choices) > len(LETTERS):
        raise ValueError(f"at most {len(LETTERS)} choices are supported, got {len(choices)}")
    return "\n".join(f"{LETTERS[i]}. {c}" for i, c in enumerate(choices))


def parse_choice(prediction: str, choices: list[str]) -> int | None:
    """The index of the option a prediction selects (by letter, then by text), or None."""
    text = prediction.strip()
    if text:
        first = text.split()[0].strip(_STRIP)
        letters = LETTERS[: len(choices)]
        if len(first) == 1 and first in letters:
            return letters.index(first)
        if len(first) == 1 and first.upper() in letters and text.strip(_STRIP) == first:
            return letters.index(first.upper())
    pred = normalise(prediction)
    if not pred:
        return None
    best, best_len = None, -1
    for i, choice in enumerate(choices):
        c = normalise(choice)
        if c and (pred == c or pred.startswith(c + " ")) and len(c) > best_len:
            best, best_len = i, len(c)
    return best


def choice_correct(prediction: str, choices: list[str], answer: int) -> bool:
    """Whether the prediction selects option ``answer`` (0-based)."""
    return parse_choice(prediction, choices) == answer
