"""`vtprune eval`: tasks, metrics, the grid of cells, results.json / table / plot, and bad input.

The models are the tiny random built-ins: their answers are noise, so accuracy itself is not asserted
(except where the answer is known: keep=1.0 must reproduce the unpruned predictions).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from vtprune import loading
from vtprune.cli import main
from vtprune.eval.metrics import choice_correct, exact_match, format_choices, normalise, parse_choice
from vtprune.eval.runner import Cell, CellRun, SampleRecord
from vtprune.eval.tasks import EvalError, EvalSample, Task, load_task


def _image(path, seed=0, size=(64, 48)):
    rng = np.random.default_rng(seed)
    Image.fromarray((rng.random((size[1], size[0], 3)) * 255).astype("uint8")).save(path)
    return path


def _jsonl(path, records):
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in records) + "\n")
    return path


def _eval(capsys, *args):
    code = main(["eval", *args])
    out = capsys.readouterr()
    return code, out.out, out.err


# ---- metrics ------------------------------------------------------------------------------------------

def test_normalise_and_exact_match():
    assert normalise("  The Red-Circle!\n") == "the redcircle"
    assert normalise("Ｙｅｓ.") == "yes"  # NFKC: full-width letters
    assert exact_match("Red.", "red") and exact_match("red square", "red")  # one-word: first word only
    assert not exact_match("a red one", "red") and not exact_match("", "red") and not exact_match("...", "red")
    assert exact_match("Two dogs!", "two dogs") and not exact_match("two dogs running", "two dogs")


def test_choice_scoring_by_letter_then_text():
    choices = ["red", "dark blue", "dark"]
    assert format_choices(choices) == "A. red\nB. dark blue\nC. dark"
    for pred in ("B", "(B)", "B.", "B) dark blue", "b", " b. "):
        assert parse_choice(pred, choices) == 1, pred
    assert parse_choice("a circle", choices) is None  # a lowercase article is not option A
    assert parse_choice("Dark blue, surely", choices) == 1  # longest matching option text wins
    assert parse_choice("dark", choices) == 2 and parse_choice("Red", choices) == 0
    assert parse_choice("D", choices) is None and parse_choice("green", choices) is None
    assert choice_correct("C", choices, 2) and not choice_correct("A", choices, 2)


def test_jsonl_records_and_prompts(tmp_path):
    _image(tmp_path / "a.png")
    f = _jsonl(tmp_path / "t.jsonl", [
        {"image": "a.png", "question": "What colour?", "answer": "Red"},
        "",  # blank lines are skipped but counted
        {"image": "a.png", "question": "Which?", "choices": ["cat", "dog"], "answer": 1, "id": "x"},
        {"image": "a.png", "question": "Which?", "choices": ["cat", "dog"], "answer": "cat", "type": "pets"},
        {"image": "a.png", "question": "Which?", "choices": ["cat", "dog"], "answer": "B"},
    ])
    task = load_task(str(f))
    assert [s.line for s in task.samples] == [1, 3, 4, 5]
    assert [s.metric for s in task.samples] == ["exact_match"] + ["multiple_choice"] * 3
    assert [s.answer_index for s in task.samples[1:]] == [1, 0, 1] and task.samples[3].qtype == "multiple_choice"
    assert task.samples[2].qtype == "pets" and task.samples[1].id == "x"
    assert task.samples[1].prompt_text() == "Which?\nA. cat\nB. dog\nAnswer with the option's letter from the given choices directly."
    assert task.samples[0].prompt_text() == "What colour?" and task.samples[0].score("red.")
    assert load_task("toy-shapes", limit=2).samples[0].prompt_text().endswith("? Answer with one word.")
    assert len(load_task(str(f), limit=2).samples) == 2


def test_noise_control_task_keeps_questions_and_replaces_images():
    real, noise = load_task("toy-shapes", limit=5), load_task("toy-shapes-noise", limit=5)
    assert noise.name == "toy-shapes-noise" and noise.info["noise_images"] and not real.info["noise_images"]
    assert noise.info["chance_accuracy"] == real.info["chance_accuracy"]
    for a, b in zip(real.samples, noise.samples):
        assert (a.question, a.answer, a.qtype) == (b.question, b.answer, b.qtype)
        x, y = np.asarray(a.load_image()), np.asarray(b.load_image())
        assert x.shape == y.shape and not np.array_equal(x, y)
        assert y.std() > 60  # uniform noise, not a scene
    again = load_task("toy-shapes-noise", limit=5)
    assert np.array_equal(np.asarray(again.samples[3].load_image()), np.asarray(noise.samples[3].load_image()))


@pytest.mark.parametrize("record, message", [
    ('{"image": "a.png", "question": "q", "answer": "x"', "line 2 is not valid JSON"),
    ('["a.png", "q", "x"]', "expected an object"),
    ('{"image": "a.png", "answer": "x"}', 'no "question" field'),
    ('{"image": "a.png", "question": "q", "choices": ["a", "b"], "answer": 5}', "names none of the choices"),
    ('{"image": "a.png", "question": "q", "choices": "ab", "answer": 0}', '"choices" must be a list'),
])
def test_malformed_jsonl_line_names_its_number(tmp_path, record, message):
    _image(tmp_path / "a.png")
    f = _jsonl(tmp_path / "t.jsonl", [{"image": "a.png", "question": "q", "answer": "x"}, record])
    with pytest.raises(EvalError, match=message) as err:
        load_task(str(f))
    assert "t.jsonl:2:" in str(err.value)


def test_cell_metrics_retention_and_failures():
    samples = [EvalSample(index=i, question="q", answer="a", qtype="aabb"[i]) for i in range(4)]
    task = Task("t", samples)
    base = CellRun(Cell())
    pruned = CellRun(Cell("fastv", 2, stage="llm", resolved_layer=2))
    for i in range(4):
        base.records[i] = SampleRecord(i, "a", correct=i < 3, visual_before=10, kept=10, flops=4e9)
        pruned.records[i] = SampleRecord(i, "a", correct=i < 2, visual_before=10, kept=2, flops=1e9)
    pruned.records[3] = SampleRecord(3, error="RuntimeError: boom")
    pruned.prefill_s, pruned.e2e_s = [0.1, 0.3, 0.2], [1.0, 3.0, 2.0]
    b = base.metrics(task)
    m = pruned.metrics(task, b["accuracy"])
    assert b["accuracy"] == 0.75 and b["retention"] == 1.0 and b["visual_tokens"] == 10
    assert m["accuracy"] == 0.5 and m["retention"] == pytest.approx(2 / 3)  # a failed sample counts as wrong
    assert m["failed"] == 1 and m["visual_tokens"] == 2 and m["prefill_gflops"] == pytest.approx(1.0)
    assert m["prefill_ms"] == pytest.approx(200) and m["e2e_ms"] == pytest.approx(2000)
    assert m["accuracy_by_type"] == {"a": 1.0, "b": 0.0} and m["where"] == "LLM layer 2"
    assert pruned.metrics(task, 0.0)["retention"] is None  # undefined against a zero baseline


def test_flops_follow_the_pruning_point():
    from vtprune.eval.flops import layer_flops, llm_flops, vision_flops
    from vtprune.toy.tiny import tiny_llava

    assert layer_flops(10, 10, d=4, d_q=4, d_kv=2, inter=8, mlp_mats=3) == 960 + 1600 + 1920
    cfg = tiny_llava().config  # LLM: 4 layers, 64 wide, MLP 128, vocab 400

    def f(n):
        return layer_flops(n, n, 64, 64, 64, 128, 3)

    head = 2 * 64 * 400
    assert llm_flops(cfg, 600) == 4 * f(600) + head
    assert llm_flops(cfg, 600, 100, "pre-llm") == 4 * f(100) + head
    assert llm_flops(cfg, 600, 100, "llm", 1) == 2 * f(600) + 2 * f(100) + head  # layers 0..1 see all
    assert vision_flops(cfg, 2) == 2 * vision_flops(cfg, 1) > 0  # per tile


def test_cpu_peak_memory_sees_an_allocation():
    from vtprune.eval.memory import PeakMemory

    with PeakMemory("cpu") as m:
        x = np.ones(16 * 1024 * 1024)  # 128 MiB, touched
        del x
    if m.measure != "cpu-rss-peak-delta":
        pytest.skip("no /proc/self/clear_refs here")
    assert 120 < m.mib < 400


# ---- the command on tiny models -----------------------------------------------------------------------

def test_eval_toy_shapes_on_tiny_llava(tmp_path, capsys):
    out_dir = tmp_path / "out"
    code, out, _ = _eval(capsys, "--model", "tiny-llava", "--method", "fastv", "--method", "cls", "--keep", "16",
                         "--keep", "0.25", "--keep", "1.0", "--task", "toy-shapes", "--limit", "4",
                         "--batch-size", "2", "--out", str(out_dir), "--log-samples")
    assert code == 0
    rows = [line for line in out.splitlines() if line.startswith("| ")]
    assert rows[0].startswith("| method | keep | where | visual tokens | accuracy | retention")
    assert len(rows) == 1 + 1 + 6 and rows[1].startswith("| unpruned | - | - | 576.0 |")
    assert "| fastv | 16 | LLM layer 2 | 16.0 |" in out and "| cls | 0.25 | pre-LLM | 144.0 |" in out

    res = json.loads((out_dir / "results.json").read_text())
    assert res["config"]["method"] == ["fastv", "cls"] and res["config"]["keep"] == [16, 0.25, 1.0]
    assert set(res["versions"]) >= {"vtprune", "torch", "transformers"}
    assert res["task"]["samples"] == 4 and 0 < res["task"]["chance_accuracy"] < 1
    base, cells = res["baseline"], res["cells"]
    assert base["retention"] == 1.0 and base["visual_tokens"] == 576 and base["failed"] == 0
    assert [(c["method"], c["keep"]) for c in cells] == [(m, k) for m in ("fastv", "cls") for k in (16, 0.25, 1.0)]
    expected = {16: 16, 0.25: 144, 1.0: 576}
    for c in cells:
        assert c["visual_tokens"] == expected[c["keep"]] and c["visual_tokens_before"] == 576
        assert c["failed"] == 0 and c["timed_batches"] == 2 and c["prefill_ms"] > 0 and c["e2e_ms"] > 0
        assert c["peak_memory_mib"] is not None and c["peak_memory_mib"] >= 0
        assert c["stage"] == ("llm" if c["method"] == "fastv" else "pre-llm")
        assert len(c["predictions"]) == 4 and all(p["kept"] == expected[c["keep"]] for p in c["predictions"])
        if c["keep"] == 16:  # fewer tokens, fewer FLOPs; the vision tower is the same
            assert c["prefill_gflops"] < base["prefill_gflops"] and c["vision_gflops"] == base["vision_gflops"]
    # keep=1.0 reproduces the unpruned predictions: both see the same (left-padded) batches
    keep_all = next(c for c in cells if c["method"] == "fastv" and c["keep"] == 1.0)
    assert [p["prediction"] for p in keep_all["predictions"]] == [p["prediction"] for p in base["predictions"]]
    assert keep_all["accuracy"] == base["accuracy"]
    logged = base["predictions"][0]
    assert set(logged) >= {"question", "answer", "prediction", "correct", "kept"} and logged["kept"] == 576

    png = out_dir / "accuracy_vs_tokens.png"
    with Image.open(png) as im:
        im.verify()
        assert im.format == "PNG" and im.size[0] > 100 and im.size[1] > 100
    assert res["plot"] == str(png)


def test_eval_json_on_tiny_qwen(tmp_path, capsys):
    code, out, _ = _eval(capsys, "--model", "tiny-qwen2-vl", "--method", "fastv", "--keep", "16", "--limit", "4",
                         "--batch-size", "2", "--out", str(tmp_path), "--json", "--max-new-tokens", "2")
    assert code == 0
    res = json.loads(out)  # stdout is exactly the JSON document
    assert res == json.loads((tmp_path / "results.json").read_text())
    assert res["model"]["class"] == "Qwen2VLForConditionalGeneration"
    (cell,) = res["cells"]
    assert cell["visual_tokens"] == 16 and res["baseline"]["visual_tokens"] == 64  # 224 px: 8 x 8 merged tokens
    assert "predictions" not in cell and (tmp_path / "accuracy_vs_tokens.png").is_file()


def test_eval_saves_overlays_of_the_kept_tokens(tmp_path, capsys):
    import numpy as np
    from PIL import Image

    code, out, _ = _eval(capsys, "--model", "tiny-qwen2-vl", "--method", "fastv", "--method", "cls", "--keep", "16",
                         "--limit", "3", "--batch-size", "3", "--out", str(tmp_path), "--json", "--max-new-tokens", "1",
                         "--save-overlays", "--log-samples")
    assert code == 0
    res = json.loads(out)
    assert res["overlays"] == {"dir": str(tmp_path / "overlays"), "written": 6}
    from vtprune import viz
    from vtprune.eval.tasks import load_task
    from vtprune.loading import load_model

    model, processor = load_model("tiny-qwen2-vl")
    samples = {s.index: s for s in load_task("toy-shapes", 3).samples}
    for cell in res["cells"]:
        folder = tmp_path / "overlays" / f"{cell['method']}-keep16"
        for entry in cell["predictions"]:
            got = np.asarray(Image.open(folder / f"{entry['index']}.png")).astype(float)
            view = np.asarray(viz.token_grid(model, processor, samples[entry["index"]].load_image()).view).astype(float)
            assert got.shape == view.shape == (224, 224, 3) and len(entry["kept_indices"]) == 16
            kept = np.zeros((8, 1, 8, 1, 1), dtype=bool)
            kept.reshape(-1)[entry["kept_indices"]] = True
            expect = np.where(kept, view.reshape(8, 28, 8, 28, 3), np.round(view.reshape(8, 28, 8, 28, 3) * 0.25))
            assert np.abs(got - expect.reshape(got.shape)).max() <= 1  # kept cells as seen, pruned ones darkened


def test_eval_overlays_on_llava_next_are_skipped_with_a_note(tmp_path, capsys):
    code, out, err = _eval(capsys, "--model", "tiny-llava-next", "--method", "cls", "--keep", "16", "--limit", "1",
                           "--out", str(tmp_path), "--json", "--max-new-tokens", "1", "--save-overlays")
    assert code == 0 and "no overlays written" in err
    assert json.loads(out)["overlays"]["dir"] is None


def test_eval_jsonl_task_with_failing_samples(tmp_path, capsys):
    """Exact-match and multiple-choice records; an undecodable image, one the processor refuses and a question
    holding the image placeholder fail alone (in every cell, with a named reason) and the others are scored."""
    for i in range(4):
        _image(tmp_path / f"img{i}.png", seed=i, size=(140 + 28 * i, 112))
    (tmp_path / "corrupt.png").write_bytes(b"this is not a png")
    _image(tmp_path / "thin.png", size=(600, 2))  # aspect ratio 300: Qwen's processor raises
    records = [
        {"image": "img0.png", "question": "What colour is it?", "answer": "red"},
        {"image": "img1.png", "question": "Which shape?", "choices": ["circle", "square"], "answer": 1},
        {"image": "corrupt.png", "question": "What colour is it?", "answer": "blue"},
        {"image": "img2.png", "question": "How many?", "answer": "two"},
        {"image": "thin.png", "question": "Which?", "choices": ["yes", "no"], "answer": "no"},
        {"image": "img3.png", "question": "Which side?", "choices": ["left", "right"], "answer": "A"},
        {"image": "img3.png", "question": "What is <|image_pad|> here?", "answer": "red"},
    ]
    task = _jsonl(tmp_path / "task.jsonl", records)
    code, out, _ = _eval(capsys, "--model", "tiny-qwen2-vl", "--method", "cls", "--keep", "8", "--task", str(task),
                         "--batch-size", "2", "--out", str(tmp_path / "out"), "--log-samples",
                         "--max-new-tokens", "2")
    assert code == 0 and "3 sample(s) failed" in out
    res = json.loads((tmp_path / "out" / "results.json").read_text())
    assert res["task"]["metrics"] == ["exact_match", "multiple_choice"]
    assert [f["index"] for f in res["failed_samples"]] == [2, 4, 6]
    assert "corrupt.png" in res["failed_samples"][0]["error"] and "aspect ratio" in res["failed_samples"][1]["error"]
    assert "question: contains <|image_pad|>, the model's image placeholder" in res["failed_samples"][2]["error"]
    for row in (res["baseline"], *res["cells"]):
        assert row["samples"] == 7 and row["failed"] == 3
        assert row["accuracy"] == sum(p["correct"] for p in row["predictions"]) / 7
        preds = row["predictions"]
        assert [p["line"] for p in preds] == [1, 2, 3, 4, 5, 6, 7]
        assert all(("error" in p) == (p["index"] in (2, 4, 6)) for p in preds)
        assert all(isinstance(p["prediction"], str) for p in preds if p["index"] not in (2, 4, 6))
        assert preds[1]["metric"] == "multiple_choice" and preds[1]["choices"] == ["circle", "square"]
        assert preds[5]["answer_index"] == 0 and preds[5]["answer"] == "left"
    assert all(p["kept"] == 8 for p in res["cells"][0]["predictions"] if "error" not in p)
    # timed: batch [0, 1] and what is left of [2, 3]; the processor's failure sent [4, 5] one by one, untimed
    assert all(row["timed_batches"] == 2 for row in (res["baseline"], *res["cells"]))


def test_a_failing_batch_is_retried_sample_by_sample(monkeypatch):
    """A sample that makes the model raise fails alone: its batch-mate is rerun and scored."""
    from vtprune.eval import Runner, build_cells, load_task, validate_cells
    from vtprune.loading import default_prompt, load_model

    original = Runner._run_batch

    def flaky(self, samples, inputs):
        if any(s.index == 1 for s in samples):
            raise RuntimeError("sample 1 breaks the model")
        return original(self, samples, inputs)

    monkeypatch.setattr(Runner, "_run_batch", flaky)
    model, processor = load_model("tiny-qwen2-vl")
    task = load_task("toy-shapes", limit=4)
    cells = build_cells(["fastv", "random"], [8], layer=1, options={"seed": 3})
    validate_cells(model, cells)
    assert [(c.stage, c.resolved_layer) for c in cells] == [("llm", 1), ("llm", 1)]  # --layer reaches random too
    assert [c.options for c in cells] == [{}, {"seed": 3}]  # an option goes to the methods that declare it
    runs = Runner(model, processor, lambda s: default_prompt(model, processor, s.prompt_text()), batch_size=2,
                  max_new_tokens=1, progress=False).run(task, cells)
    assert len(runs) == 3 and runs[0].cell.method is None
    for run in runs:
        assert run.records[1].error == "RuntimeError: sample 1 breaks the model"
        assert all(run.records[i].error is None and run.records[i].prediction is not None for i in (0, 2, 3))
        assert len(run.prefill_s) == 1  # only the intact batch is timed
        m = run.metrics(task, 0.5)
        assert m["failed"] == 1 and m["visual_tokens"] == (64 if run.cell.method is None else 8)
    assert not hasattr(model, "_vtprune_state")  # the runner leaves the model unpatched


def test_toy_model_loads_from_package_weights(tmp_path, monkeypatch, capsys):
    from vtprune.toy.tiny import tiny_llava, tiny_llava_processor

    monkeypatch.setattr(loading, "toy_weights_dir", lambda name: tmp_path / "weights" / name)
    code, _, err = _eval(capsys, "--model", "toy-llava", "--out", str(tmp_path / "o"))
    assert code == 2 and "vtprune: error:" in err and "not built yet" in err and "scripts/train_toy.py" in err
    where = tmp_path / "weights" / "toy-llava"
    tiny_llava().save_pretrained(where)
    tiny_llava_processor().save_pretrained(where)
    code, out, _ = _eval(capsys, "--model", "toy-llava", "--method", "cls", "--keep", "8", "--limit", "2",
                         "--batch-size", "2", "--out", str(tmp_path / "o"), "--json", "--max-new-tokens", "1")
    assert code == 0
    res = json.loads(out)
    assert res["model"]["name"] == "toy-llava" and res["cells"][0]["visual_tokens"] == 8


# ---- bad input ----------------------------------------------------------------------------------------

def test_missing_image_names_the_path(tmp_path, capsys):
    _image(tmp_path / "a.png")
    task = _jsonl(tmp_path / "t.jsonl", [{"image": "a.png", "question": "q", "answer": "x"},
                                         {"image": "sub/missing.png", "question": "q", "answer": "x"}])
    code, out, err = _eval(capsys, "--model", "tiny-llava", "--task", str(task), "--out", str(tmp_path / "o"))
    assert code == 2 and out == ""
    assert err.startswith("vtprune: error:") and str(tmp_path / "sub" / "missing.png") in err and "t.jsonl:2" in err


def test_malformed_line_through_the_cli(tmp_path, capsys):
    _image(tmp_path / "a.png")
    task = _jsonl(tmp_path / "t.jsonl", [{"image": "a.png", "question": "q", "answer": "x"}, "",
                                         "{not json"])
    code, _, err = _eval(capsys, "--model", "tiny-llava", "--task", str(task), "--out", str(tmp_path / "o"))
    assert code == 2 and "line 3" in err and "not valid JSON" in err


@pytest.mark.parametrize("args, message", [
    (["--task", "mmbench"], "unknown task 'mmbench'"),
    (["--task", "nope.jsonl"], "task file nope.jsonl not found"),
    (["--method", "nope"], "known methods"),
    (["--model", "/no/such/checkpoint"], "neither a built-in model"),
    (["--limit", "0"], "--limit must be positive"),
    (["--batch-size", "0"], "--batch-size must be at least 1"),
])
def test_bad_input_is_a_clear_error(tmp_path, capsys, args, message):
    argv = {"--model": "tiny-llava", "--task": "toy-shapes", "--limit": "2", "--out": str(tmp_path / "o")}
    argv.update(zip(args[::2], args[1::2]))
    code, out, err = _eval(capsys, *[x for kv in argv.items() for x in kv])
    assert code == 2 and out == ""
    assert err.startswith("vtprune: error:") and message in err
    assert not (tmp_path / "o").exists()


def test_layer_given_as_an_option_points_at_the_layer_flag(tmp_path, capsys):
    """`--option layer=0` is a common slip for `--layer 0`: one line that names the flag, exit 2."""
    code, out, err = _eval(capsys, "--model", "tiny-llava", "--method", "fastv", "--option", "layer=0",
                           "--out", str(tmp_path / "o"))
    assert code == 2 and out == ""
    assert err.startswith("vtprune: error:") and "`--layer K`" in err and len(err.strip().splitlines()) == 1
