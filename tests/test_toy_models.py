"""The shipped toy models (`toy-llava`, `toy-qwen2vl`): they load offline, they answer, and they look.

Skipped for a toy model whose weights are not in the package (built by `scripts/train_toy.py`).
The full quality bar (300 samples, every scorer) is `benchmarks/toy_quality.py`; these are quick checks.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import vtprune
from vtprune.eval.tasks import ONE_WORD, load_task
from vtprune.loading import TOY_MODELS, default_prompt, load_model, toy_weights_dir

N = 48


def _model(name):
    if not toy_weights_dir(name).is_dir():
        pytest.skip(f"{name} is not built (vtprune/toy/weights/{name}/)")
    return load_model(name)


def _answers(model, processor, samples) -> list[str]:
    processor.tokenizer.padding_side = "left"
    out = []
    for i in range(0, len(samples), 16):
        chunk = samples[i:i + 16]
        inputs = processor(images=[s.load_image() for s in chunk], return_tensors="pt", padding=True,
                           text=[default_prompt(model, processor, f"{s.question} {ONE_WORD}") for s in chunk])
        with torch.no_grad():
            gen = model.generate(**inputs, max_new_tokens=2, do_sample=False)
        out += processor.tokenizer.batch_decode(gen[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    return out


def _accuracy(task, answers) -> float:
    return float(np.mean([s.score(a) for s, a in zip(task.samples, answers)]))


@pytest.mark.parametrize("name", TOY_MODELS)
def test_toy_model_answers_from_the_image(name):
    model, processor = _model(name)
    task = load_task("toy-shapes", limit=N)
    acc = _accuracy(task, _answers(model, processor, task.samples))
    noise = load_task("toy-shapes-noise", limit=N)
    noise_acc = _accuracy(noise, _answers(model, processor, noise.samples))
    assert acc >= 0.8, f"{name}: {acc:.0%} on {N} test samples"
    assert noise_acc <= task.info["chance_accuracy"] + 0.2 < acc, (acc, noise_acc)


@pytest.mark.parametrize("name", TOY_MODELS)
def test_toy_model_keep_all_is_identical_and_pruning_changes_answers(name):
    model, processor = _model(name)
    task = load_task("toy-shapes", limit=16)
    ref = _answers(model, processor, task.samples)
    vtprune.apply(model, method="cls", keep=1.0)
    assert _answers(model, processor, task.samples) == ref
    vtprune.remove(model)
    vtprune.apply(model, method="random", keep=2)  # two visual tokens per image: the objects are mostly gone
    assert _accuracy(task, _answers(model, processor, task.samples)) < _accuracy(task, ref)
