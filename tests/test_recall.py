"""Relevant-token recall on the toy tasks and the eval-only ``oracle`` method."""

from __future__ import annotations

import json

import numpy as np
import pytest

from vtprune.cli import main
from vtprune.eval.recall import cell_recall, token_cells
from vtprune.toy import shapes


def test_token_cells_map_a_finer_raster_onto_the_cells():
    assert token_cells(64, 8) == [(i // 8, i % 8) for i in range(64)]  # the toys: one token per cell
    under = token_cells(576, 8)  # 24 x 24 patches: 3 x 3 per cell
    assert under[0] == under[2] == under[48] == (0, 0) and under[3] == (0, 1) and under[72] == (1, 0)
    assert token_cells(577, 8) is None and token_cells(100, 8) is None  # not one square raster of the cells


def test_cell_recall_counts_covered_cells():
    cells = [(0, 0), (0, 1), (7, 7)]
    assert cell_recall([0, 1, 63], 64, cells, 8) == 1.0
    assert cell_recall([0, 5], 64, cells, 8) == pytest.approx(1 / 3)
    assert cell_recall([], 64, cells, 8) == 0.0
    assert cell_recall([2], 576, [(0, 0)], 8) == 1.0  # one of the cell's 9 patches covers it
    assert cell_recall([0], 64, [], 8) is None and cell_recall([0], 65, cells, 8) is None


def _objects():
    return [shapes.ShapeObject("red", "circle", False, 1, 1), shapes.ShapeObject("blue", "square", True, 4, 5),
            shapes.ShapeObject("red", "triangle", False, 6, 2)]


@pytest.mark.parametrize("qtype,relevant", [
    ("colour", None),  # the object whose shape is unique and was asked about
    ("count", {(1, 1), (4, 5), (4, 6), (5, 5), (5, 6), (6, 2)}),
])
def test_question_cells_are_the_asked_objects(qtype, relevant):
    objs = _objects()
    q, a, rel = shapes._question(np.random.default_rng(0), objs, qtype, 8)
    sample = shapes.Sample(None, q, a, qtype, objs, rel)
    if relevant is None:  # colour: the named shape's object alone
        named = next(o for o in objs if o.shape in q)
        relevant = set(named.cells)
        assert a == named.colour
    assert set(sample.cells("question")) == relevant
    assert set(sample.cells("objects")) == {c for o in objs for c in o.cells}


def test_absent_pair_names_the_objects_that_share_its_colour_or_shape():
    rng = np.random.default_rng(1)
    for _ in range(50):
        q, a, rel = shapes._question(rng, _objects(), "exist", 8)
        if a == "no":
            colour, shape = q.removesuffix("?").split()[-2:]
            assert rel and all(o.colour == colour or o.shape == shape for o in rel)
            assert {o.shape for o in _objects() if o.colour == colour or o.shape == shape} == {o.shape for o in rel}
            return
    pytest.fail("no absent-pair question in 50 draws")


def _eval(tmp_path, capsys, *args):
    code = main(["eval", "--model", "toy-llava", "--task", "toy-shapes", "--limit", "16", "--batch-size", "8",
                 "--max-new-tokens", "2", "--out", str(tmp_path), "--json", *args])
    out = capsys.readouterr()
    return code, (json.loads(out.out) if code == 0 else out.err)


def test_oracle_recalls_the_question_cells_and_bounds_the_selection(tmp_path, capsys):
    code, res = _eval(tmp_path, capsys, "--method", "oracle", "--method", "random", "--keep", "7", "--keep", "16",
                      "--log-samples")
    assert code == 0
    assert res["baseline"]["recall_question"] == 1.0 and res["baseline"]["recall_objects"] == 1.0
    cells = {(c["method"], c["keep"]): c for c in res["cells"]}
    from vtprune.eval.tasks import load_task

    task = load_task("toy-shapes", 16)
    for keep in (7, 16):
        oracle, rand = cells[("oracle", keep)], cells[("random", keep)]
        assert oracle["recall_question"] > rand["recall_question"]
        for s, p in zip(task.samples, oracle["predictions"]):  # every question cell kept while the budget holds
            assert p["kept"] == keep
            assert p["recall_question"] == pytest.approx(min(1.0, keep / len(s.question_cells)))
            if len(s.question_cells) <= keep:
                assert set(p["kept_indices"]) >= {r * 8 + c for r, c in s.question_cells}


def test_oracle_is_refused_outside_the_toy_tasks(tmp_path, capsys):
    code = main(["eval", "--model", "toy-llava", "--task", "toy-shapes-noise", "--limit", "2", "--method", "oracle",
                 "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2 and "oracle" in err and "toy tasks only" in err and "Traceback" not in err


def test_crowded_task_has_four_to_six_objects_and_no_counts():
    from vtprune.eval.tasks import load_task

    task = load_task("toy-shapes-crowded", 60)
    assert task.name == "toy-shapes-crowded" and task.info["crowded"]
    data = shapes.dataset("test", 60, crowded=True)
    assert all(4 <= len(s.objects) <= 6 for s in data) and {s.qtype for s in data} <= set(shapes.CROWDED_QTYPES)
    assert "count" not in {s.qtype for s in task.samples}
    # at 7 tokens not every object cell fits in most images: the method must choose
    assert sum(len(s.object_cells) > 7 for s in task.samples) > len(task.samples) // 2
    # its own random stream: the standard split is unchanged by the variant
    assert shapes.make_sample("test", 3).question == load_task("toy-shapes", 4).samples[3].question


def test_oracle_covers_every_question_object_before_completing_one():
    """Four big objects asked about (16 cells): at 4 tokens one cell of each, not all of the first."""
    from types import SimpleNamespace

    import torch

    from vtprune.eval.oracle import OracleScorer
    from vtprune.eval.tasks import EvalSample

    objs = [shapes.ShapeObject("red", "circle", True, 0, 0), shapes.ShapeObject("blue", "square", True, 0, 4),
            shapes.ShapeObject("green", "triangle", True, 4, 0), shapes.ShapeObject("red", "square", True, 6, 6)]
    small = shapes.ShapeObject("blue", "circle", False, 3, 3)  # not asked about
    groups = [sorted(o.cells) for o in objs]
    sample = EvalSample(index=0, question="How many shapes are there?", answer="four", qtype="count", cell_grid=8,
                        question_objects=groups, scene_objects=[*groups, sorted(small.cells)])
    assert sample.question_cells == sorted(c for g in groups for c in g)
    assert sample.object_cells == sorted({c for g in groups for c in g} | set(small.cells))
    layout = SimpleNamespace(batch_size=1, positions=[torch.arange(64)])
    score = OracleScorer([sample]).score(SimpleNamespace(layout=layout))[0]
    top = {(int(i) // 8, int(i) % 8) for i in score.topk(4).indices}
    assert all(len(top & set(g)) == 1 for g in groups)  # one cell of every object
    top16 = {(int(i) // 8, int(i) % 8) for i in score.topk(16).indices}
    assert top16 == set(sample.question_cells)  # the question's tier before the other object
    assert score.topk(17).indices[-1] == 3 * 8 + 3


def test_toy_llava_shallow_attention_is_not_question_aligned(tmp_path, capsys):
    """The shipped toy-llava keeps a text-pretrained attention in its first three layers
    (`scripts/train_toy.py --frozen-attention 3`): FastV's layer-2 text-to-image attention finds far fewer of
    the question's cells than the CLS attention of the tower, as on a real LLaVA-1.5, and loses accuracy."""
    code, res = _eval(tmp_path, capsys, "--method", "fastv", "--method", "cls", "--keep", "7")
    assert code == 0
    cells = {c["method"]: c for c in res["cells"]}
    assert cells["fastv"]["recall_question"] < 0.5 < cells["cls"]["recall_question"]
    assert cells["fastv"]["accuracy"] < cells["cls"]["accuracy"]
