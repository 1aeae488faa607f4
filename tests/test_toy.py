"""The synthetic shapes task and the toy-model training script (smoke mode)."""

from __future__ import annotations

import importlib.util
import json
import os
import sys

import numpy as np
import pytest

from vtprune.toy import shapes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_samples_are_deterministic_by_seed_and_index():
    a, b = shapes.make_sample("test", 5), shapes.make_sample("test", 5)
    assert a.question == b.question and a.answer == b.answer
    assert np.array_equal(np.asarray(a.image), np.asarray(b.image))
    c = shapes.make_sample("test", 5, seed=1)
    assert not np.array_equal(np.asarray(a.image), np.asarray(c.image))
    train, test = shapes.make_sample("train", 5), shapes.make_sample("test", 5)
    assert not np.array_equal(np.asarray(train.image), np.asarray(test.image))


def test_answers_follow_the_objects():
    for s in shapes.dataset("test", 200):
        assert s.answer in shapes.ANSWERS and s.image.size == (224, 224)
        objs = s.objects
        assert 1 <= len(objs) <= 4
        if s.qtype == "count":
            assert s.answer == shapes.COUNTS[len(objs) - 1]
        elif s.qtype == "colour":
            assert s.answer in [o.colour for o in objs if o.shape in s.question]
        elif s.qtype == "side":
            o = next(o for o in objs if f"{o.colour} {o.shape}" in s.question)
            assert s.answer == ("left" if o.col < 4 else "right")
        elif s.qtype == "exist":
            present = any(f" {o.colour} {o.shape}?" in s.question for o in objs)
            assert s.answer == ("yes" if present else "no")


def test_objects_are_drawn_where_the_mask_says():
    s = shapes.make_sample("test", 3)
    img = np.asarray(s.image).astype(int)
    mask = s.object_mask(16)  # 14 px patches
    assert 0 < mask.sum() < 64
    for o in s.objects:
        x0, y0, x1, y1 = o.box()
        centre = img[(y0 + y1) // 2, (x0 + x1) // 2]
        assert np.abs(centre - np.array(shapes.COLOURS[o.colour])).max() <= 20  # the object's colour
        assert mask[(y0 + y1) // 2 // 14, (x0 + x1) // 2 // 14]


def test_question_types_and_answers_are_balanced():
    data = shapes.dataset("train", 600)
    kinds = {q: sum(s.qtype == q for s in data) for q in shapes.QTYPES}
    assert min(kinds.values()) > 50
    exist = [s.answer for s in data if s.qtype == "exist"]
    assert 0.35 < exist.count("yes") / len(exist) < 0.65
    assert 0.25 < shapes.chance_accuracy(data) < 0.5


def test_training_script_smoke(tmp_path):
    """`scripts/train_toy.py --smoke` runs every stage and writes a checkpoint that loads offline."""
    spec = importlib.util.spec_from_file_location("train_toy", os.path.join(ROOT, "scripts", "train_toy.py"))
    mod = importlib.util.module_from_spec(spec)
    sys.modules["train_toy"] = mod
    spec.loader.exec_module(mod)
    out = tmp_path / "toy"
    assert mod.main(["--smoke", "--out", str(out)]) == 0
    log = json.loads((out / "train_log.json").read_text())
    assert log["tower"]["steps"] == 3 and log["llm"]["steps"] == 3 and 0 <= log["test_accuracy"] <= 1
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(out)
    proc = AutoProcessor.from_pretrained(out)
    s = shapes.make_sample("test", 0)
    inputs = proc(images=[s.image], text=[mod.PROMPT + s.question + mod.SUFFIX], return_tensors="pt")
    assert int((inputs["input_ids"] == model.config.image_token_id).sum()) == 256
    assert os.path.getsize(out / "model.safetensors") < 20e6


@pytest.mark.parametrize("bad", ["valid", "nope"])
def test_bad_split_is_refused(bad):
    if bad == "valid":
        with pytest.raises(ValueError, match="unknown split"):
            shapes.make_sample(bad, 0)
    else:
        with pytest.raises(ValueError, match="unknown split"):
            shapes.dataset(bad, 1)
