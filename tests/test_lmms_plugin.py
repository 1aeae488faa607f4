"""The lmms-eval plugin: vtprune's models resolve through lmms-eval's entry points, wrap lmms-eval's own
classes, and run lmms-eval's command on a local task with a toy model.

Skipped when lmms-eval is not installed (it is in the dev extra, so `scripts/setup.sh` and CI have it).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import vtprune
from vtprune.eval.lmms_plugin import CLASS_NAMES, WRAPPED, prune_arguments

lmms = pytest.importorskip("lmms_eval", reason="lmms-eval is not installed (pip install 'vtprune[lmms]')")

UTILS = '''
from PIL import Image

from vtprune.eval.metrics import exact_match


def doc_to_visual(doc):
    return [Image.open(doc["image"]).convert("RGB")]


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    return doc["question"] + " Answer with one word."


def process_results(doc, results):
    return {"exact_match": float(exact_match(results[0], doc["answer"]))}
'''


def _task_dir(root: Path, n: int) -> Path:
    """An lmms-eval task ``vtprune_toy_shapes`` over the first ``n`` toy-shapes test samples (a jsonl file)."""
    from vtprune.toy import shapes

    root.mkdir(parents=True, exist_ok=True)
    with open(root / "data.jsonl", "w") as f:
        for i in range(n):
            s = shapes.make_sample("test", i)
            s.image.save(root / f"{i}.png")
            f.write(json.dumps({"image": str(root / f"{i}.png"), "question": s.question, "answer": s.answer}) + "\n")
    (root / "utils.py").write_text(UTILS)
    (root / "vtprune_toy_shapes.yaml").write_text(f"""task: vtprune_toy_shapes
dataset_path: json
dataset_kwargs:
  data_files:
    test: {root / 'data.jsonl'}
test_split: test
output_type: generate_until
doc_to_visual: !function utils.doc_to_visual
doc_to_text: !function utils.doc_to_text
doc_to_target: answer
generation_kwargs:
  max_new_tokens: 3
  temperature: 0
  do_sample: false
process_results: !function utils.process_results
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
metadata:
  - version: 0.0
""")
    return root


def test_models_resolve_through_the_entry_points_and_wrap_lmms_classes():
    import importlib

    from lmms_eval.models import get_model

    for name, kinds in WRAPPED.items():
        for kind, (module, base) in kinds.items():
            cls = get_model(name, force_simple=kind == "simple")
            assert cls.__name__ == CLASS_NAMES[name, kind]
            assert issubclass(cls, getattr(importlib.import_module(module), base))
            assert cls.is_simple == (kind == "simple")


def test_prune_arguments_from_model_args():
    assert prune_arguments("cls", "0.25", "none") == dict(method="cls", keep=0.25, layer=None)
    assert prune_arguments("fastv", 64, "3", seed=1) == dict(method="fastv", keep=64, layer=3, seed=1)
    with pytest.raises(vtprune.ConfigError, match="keep='lots'"):
        prune_arguments("fastv", "lots")
    with pytest.raises(vtprune.ConfigError, match="layer='x'"):
        prune_arguments("fastv", 64, "x")


@pytest.fixture(scope="module")
def tiny_llava_dir(tmp_path_factory):
    from vtprune.toy.tiny import tiny_llava, tiny_llava_processor

    where = tmp_path_factory.mktemp("tiny-llava")
    tiny_llava().save_pretrained(where)
    tiny_llava_processor().save_pretrained(where)
    return where


def test_the_wrapped_model_is_patched_and_a_bad_method_fails_at_load(tiny_llava_dir):
    from lmms_eval.models import get_model

    cls = get_model("vtprune_llava_hf", force_simple=True)
    assert get_model("vtprune_llava_hf").__name__ == "VtpruneLlavaHfChat"
    lm = cls.create_from_arg_string(f"pretrained={tiny_llava_dir},method=cls,keep=16,option_vision_layer=-2",
                                    {"device": "cpu", "batch_size": 1})
    cfg = vtprune.config_of(lm.model)
    assert (cfg.method, cfg.keep, cfg.options) == ("cls", 16, {"vision_layer": -2})
    with pytest.raises(vtprune.ConfigError, match="unknown method"):
        cls.create_from_arg_string(f"pretrained={tiny_llava_dir},method=nope", {"device": "cpu", "batch_size": 1})


def _lmms_eval(tmp_path: Path, tasks: Path, model: str, model_args: str) -> dict:
    out = tmp_path / f"out-{model}-{abs(hash(model_args))}"
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_DATASETS_CACHE=str(tmp_path / "hf"),
               TOKENIZERS_PARALLELISM="false")
    cmd = [sys.executable, "-m", "lmms_eval", "--model", model, "--model_args", model_args,
           "--tasks", "vtprune_toy_shapes", "--include_path", str(tasks), "--device", "cpu", "--batch_size", "1",
           "--output_path", str(out), "--log_samples", "--force_simple"]  # the toys have no chat template
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = [json.loads(p.read_text()) for p in out.rglob("*_results.json")]
    samples = [json.loads(line) for p in out.rglob("*vtprune_toy_shapes*.jsonl") for line in p.read_text().splitlines()]
    assert len(results) == 1, list(out.rglob("*"))
    return {"accuracy": results[0]["results"]["vtprune_toy_shapes"]["exact_match,none"],
            "predictions": {s["doc_id"]: s["filtered_resps"] for s in samples}}


@pytest.mark.parametrize("toy", ["toy-llava"])
def test_lmms_eval_command_on_a_local_task_with_the_toy_model(toy, tmp_path):
    from vtprune.loading import toy_weights_dir

    where = toy_weights_dir(toy)
    if not where.is_dir():
        pytest.skip(f"{toy} is not built")
    tasks = _task_dir(tmp_path / "tasks", 24)
    plain = _lmms_eval(tmp_path, tasks, "llava_hf", f"pretrained={where},device_map=cpu")
    keep_all = _lmms_eval(tmp_path, tasks, "vtprune_llava_hf", f"pretrained={where},method=fastv,keep=1.0")
    rand = _lmms_eval(tmp_path, tasks, "vtprune_llava_hf", f"pretrained={where},method=random,keep=2")
    assert keep_all["predictions"] == plain["predictions"] and len(plain["predictions"]) == 24
    assert plain["accuracy"] >= 0.6  # the toy answers through lmms-eval's own prompt and generate loop
    assert rand["accuracy"] < plain["accuracy"]  # two visual tokens per image: pruning really ran
