"""One patched model, several threads: each call keeps its own per-call state (`vtprune.perthread`).

Two threads generate from different prompts on the same model at the same time, several times each; every
answer and every thread's `vtprune.stats` must equal the sequential run's.
"""

from __future__ import annotations

import threading

import pytest
import torch
from conftest import QWEN_IMAGE, get_model, get_qwen_processor, make_image, prompts

import vtprune
from vtprune.toy.tiny import tiny_llava_processor

ROUNDS = 3


def _llava_inputs(next_: bool):
    proc = tiny_llava_processor(next_=next_)
    proc.tokenizer.padding_side = "left"
    a = proc(images=[make_image(400, 500, seed=1)], text=prompts([1])[:1], return_tensors="pt")
    text_b = "USER: <image>\nWhich colour is the largest object, and where is it? ASSISTANT:"
    b = proc(images=[make_image(300, 640, seed=2)], text=[text_b], return_tensors="pt")
    return a, b


def _qwen_inputs(kind: str):
    proc = get_qwen_processor(kind)
    proc.tokenizer.padding_side = "left"
    out = []
    for (h, w), seed, question in [((300, 400), 1, "What is in the picture?"),
                                   ((220, 330), 2, "Which colour is the largest object, and where is it?")]:
        text = f"<|im_start|>user\n{QWEN_IMAGE}{question}<|im_end|>\n<|im_start|>assistant\n"
        out.append(proc(text=[text], images=[make_image(h, w, seed=seed)], return_tensors="pt"))
    return out


def _generate(model, inputs) -> tuple[list[int], list[list[int]] | None]:
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=6, do_sample=False)
    st = vtprune.stats(model)
    return out[0].tolist(), ([k.tolist() for k in st.kept] if st is not None else None)


def _concurrent(model, inputs: list, expected: list) -> list[str]:
    """Run one thread per input, ``ROUNDS`` generations each, all starting together; the mismatches."""
    errors: list[str] = []
    barrier = threading.Barrier(len(inputs))

    def work(i: int) -> None:
        try:
            barrier.wait()
            for r in range(ROUNDS):
                got = _generate(model, inputs[i])
                if got != expected[i]:
                    errors.append(f"thread {i}, round {r}: {got} != {expected[i]}")
        except Exception as exc:  # a crash in a thread is a failure too
            errors.append(f"thread {i}: {type(exc).__name__}: {exc}")

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(inputs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return errors


CASES = [
    ("llava", "fastv", {"keep": 8, "layer": 1}),
    ("llava", "cls", {"keep": 8}),
    ("llava", "visionzip", {"keep": 10}),
    ("llava", "sparsevlm", {"keep": 8, "layers": [0, 1, 2], "ratios": [0.5, 0.25]}),  # with recycling
    ("llava", "debias+fastv", {"keep": 8, "layer": 1}),
    ("next", "fastv", {"keep": 16, "layer": 1}),
    ("next", "cls", {"keep": 16}),
    ("qwen2_vl", "fastv", {"keep": 8, "layer": 1}),
    ("qwen2_vl", "cls", {"keep": 8}),
    # methods with per-call state of their own: FlowCut's tower tracker (CLIP) and run (Qwen-VL), SparseVLM's
    # raters and recycled rows, VFlowOpt's importance, CDPruner's relevance
    ("llava", "flowcut", {"keep": 8}),
    ("next", "flowcut", {"keep": 16}),
    ("qwen2_vl", "flowcut", {"keep": 8}),
    ("qwen2_vl", "sparsevlm", {"keep": 8, "layers": [0, 1, 2], "ratios": [0.5, 0.25]}),  # with recycling
    ("llava", "vflowopt", {"keep": 8, "llm_layers": [1, 2], "cell": 8}),
    ("llava", "cdpruner", {"keep": 8}),
]


@pytest.mark.parametrize("kind,method,options", CASES, ids=[f"{k}-{m}" for k, m, _ in CASES])
def test_two_threads_one_model_match_sequential_runs(kind, method, options):
    model = get_model(kind)
    inputs = _qwen_inputs(kind) if kind.startswith("qwen") else _llava_inputs(kind == "next")
    try:
        vtprune.apply(model, method=method, **options)
        expected = [_generate(model, x) for x in inputs]
        assert expected[0][1] != expected[1][1] or expected[0][0] != expected[1][0]  # the two calls differ
        errors = _concurrent(model, inputs, expected)
        assert not errors, "\n".join(errors)
    finally:
        vtprune.remove(model)


# per method, its per-call debug records (`vtprune.perthread.PerThread` attributes of the scorer)
RECORDS = [
    ("sparsevlm", {"keep": 8, "layers": [0, 1, 2], "ratios": [0.5, 0.25]}, ["last_raters", "last_recycled"]),
    ("vflowopt", {"keep": 8, "llm_layers": [1, 2], "cell": 8}, ["last_importance", "last_recycled"]),
    ("cdpruner", {"keep": 8}, ["last_relevance"]),
    ("transprune", {"keep": 8, "layers": [1, 2], "ratios": [0.5]}, ["last_parts"]),
]


@pytest.mark.parametrize("method,options,names", RECORDS, ids=[m for m, _, _ in RECORDS])
def test_debug_records_are_per_thread(method, options, names):
    """A scorer's ``last_*`` records of a call in another thread stay that thread's: this thread, which ran
    nothing, sees empty ones, and its own call later does not change what the other thread recorded."""
    model = get_model("llava")
    a, b = _llava_inputs(False)
    try:
        vtprune.apply(model, method=method, **options)
        scorer = model._vtprune_state.scorer
        seen, recorded, done = {}, threading.Event(), threading.Event()

        def work():
            try:
                _generate(model, a)
                seen["before"] = {n: getattr(scorer, n) for n in names}
            finally:
                recorded.set()
            done.wait(60)
            seen["after"] = {n: getattr(scorer, n) for n in names}

        worker = threading.Thread(target=work)
        worker.start()
        try:
            recorded.wait(60)
            assert "before" in seen and all(len(seen["before"][n]) for n in names), "the worker recorded nothing"
            assert all(getattr(scorer, n) == [] for n in names), "this thread sees the worker's records"
            _generate(model, b)
            mine = {n: getattr(scorer, n) for n in names}
        finally:
            done.set()
            worker.join()
        for n in names:
            assert seen["after"][n] is seen["before"][n] and mine[n] is not seen["before"][n], n
    finally:
        vtprune.remove(model)


def test_unpatched_qwen_threads_are_also_exact_while_patched_with_keep_all():
    """transformers' Qwen-VL keeps the prefill's ``rope_deltas`` on the model between calls; while patched
    that attribute is per-thread, so keep-all under two threads equals the unpatched sequential answers."""
    model = get_model("qwen2_vl")
    inputs = _qwen_inputs("qwen2_vl")
    expected = [_generate(model, x) for x in inputs]
    assert expected[0][1] is None  # unpatched: no stats
    try:
        vtprune.apply(model, method="cls", keep=1.0)
        patched = [_generate(model, x) for x in inputs]
        assert [p[0] for p in patched] == [e[0] for e in expected]  # keep-all == unpatched
        errors = _concurrent(model, inputs, patched)
        assert not errors, "\n".join(errors)
        assert type(model.model).__name__ == "Qwen2VLModel"
    finally:
        vtprune.remove(model)
    assert type(model.model) is model.model.__class__ and "rope_deltas" not in type(model.model).__dict__


def test_stats_read_from_another_thread_see_the_latest_prefill():
    model = get_model("llava")
    a, _ = _llava_inputs(False)
    try:
        vtprune.apply(model, method="cls", keep=5)
        worker = threading.Thread(target=lambda: _generate(model, a))
        worker.start()
        worker.join()
        st = vtprune.stats(model)  # this thread ran no prefill: the latest of any thread
        assert st is not None and st.visual_after == [5]
    finally:
        vtprune.remove(model)


def test_remove_leaves_no_per_thread_store_and_models_still_deepcopy():
    """``remove()`` takes the per-thread stores off the model's modules; a patched model deep-copies too
    (the copy starts with no per-call state: a ``threading.local`` itself could not be copied)."""
    import copy

    model = get_model("qwen2_vl")
    inputs = _qwen_inputs("qwen2_vl")[0]
    try:
        vtprune.apply(model, method="fastv", keep=8, layer=1)
        with torch.no_grad():
            model(**inputs)
        copy.deepcopy(model)
    finally:
        vtprune.remove(model)
    left = [(name, k) for name, m in model.named_modules() for k in vars(m) if k.startswith("_vtprune")]
    assert left == []
    copy.deepcopy(model)
