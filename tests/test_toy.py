"""The synthetic shapes task and the toy-model training script (smoke mode)."""

from __future__ import annotations

import importlib.util
import json
import os

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
        box = img[y0:y1, x0:x1].reshape(-1, 3)
        close = np.abs(box - np.array(shapes.COLOURS[o.colour])).max(-1) <= 20  # the object's colour (its lighter shade)
        assert close.mean() > 0.1
        assert mask[(y0 + y1) // 2 // 14, (x0 + x1) // 2 // 14]


def test_each_shape_has_its_own_fill_pattern():
    """A single patch tells the shape: solid circles, checkered squares, striped triangles."""
    pats = {s: shapes._texture(s, 0, 0, 12, 12) for s in shapes.SHAPES}
    assert pats["circle"].all()
    assert not pats["square"].all() and not pats["triangle"].all()
    assert not np.array_equal(pats["square"], pats["triangle"])
    assert pats["triangle"].all(axis=1).any()  # horizontal stripes


def test_question_types_and_answers_are_balanced():
    data = shapes.dataset("train", 600)
    kinds = {q: sum(s.qtype == q for s in data) for q in shapes.QTYPES}
    assert min(kinds.values()) > 50
    exist = [s.answer for s in data if s.qtype == "exist"]
    assert 0.35 < exist.count("yes") / len(exist) < 0.65
    assert 0.25 < shapes.chance_accuracy(data) < 0.5


def _train_toy():
    spec = importlib.util.spec_from_file_location("train_toy", os.path.join(ROOT, "scripts", "train_toy.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("arch", ["llava", "qwen2-vl"])
def test_training_script_smoke(tmp_path, arch):
    """`scripts/train_toy.py --smoke` runs every stage and writes a checkpoint that loads offline."""
    mod = _train_toy()
    out = tmp_path / "toy"
    staged = arch == "qwen2-vl"  # stages 0, 2a and 2b on one arch (time)
    scene = ["--text-steps", "1"] if staged else ["--scene-steps", "0"]
    assert mod.main(["--arch", arch, "--smoke", "--out", str(out), *scene]) == 0
    log = json.loads((out / "train_log.json").read_text())
    assert log["tower"]["steps"] == 3 and log["llm"]["steps"] == 3
    assert (log["text_lm"]["steps"] == 3 and log["text_lm"]["final_loss"] > 0) if staged else "text_lm" not in log
    if staged:
        assert log["scene_lm"]["steps"] == 3 and set(log["scene_lm"]["accuracy"]) <= {"all", "oracle", *shapes.QTYPES}
        assert log["align"]["steps"] == 3 and log["align"]["r2"] <= 1
    else:
        assert "scene_lm" not in log and "align" not in log
    for key in ("test_accuracy", "noise_accuracy"):
        assert set(log[key]) == {"all", *shapes.QTYPES} and 0 <= log[key]["all"] <= 1
    assert set(log["tower"]["heads"]) == set(mod.TOKEN_HEADS)
    if arch == "llava":  # stage 1 is saved beside the checkpoint and can be reused
        again = tmp_path / "again"
        assert mod.main(["--arch", arch, "--smoke", "--out", str(again), "--tower", f"{out}.stage1.pt"]) == 0
        log2 = json.loads((again / "train_log.json").read_text())
        assert log2["tower"]["loaded_from"] == f"{out}.stage1.pt" and log2["tower"]["heads"] == log["tower"]["heads"]
        import torch
        from safetensors.torch import load_file

        a, b = load_file(out / "model.safetensors"), load_file(again / "model.safetensors")
        towers = [k for k in a if "vision_tower" in k]
        assert towers and all(torch.equal(a[k], b[k]) for k in towers)
        # --init-from fine-tunes every weight of a checkpoint: only stage 2c runs, the tower stays frozen
        tuned = tmp_path / "tuned"
        assert mod.main(["--arch", arch, "--smoke", "--out", str(tuned), "--init-from", str(out),
                         "--scene-steps", "0", "--llm-lr", "1e-2"]) == 0
        log3 = json.loads((tuned / "train_log.json").read_text())
        assert log3["init_from"]["path"] == str(out) and log3["tower"]["loaded_from"] == str(out)
        assert "scene_lm" not in log3 and log3["llm"]["steps"] == 3
        c = load_file(tuned / "model.safetensors")
        assert all(torch.equal(a[k], c[k]) for k in towers)
        lm = [k for k in a if "language_model" in k]
        assert lm and any(not torch.equal(a[k], c[k]) for k in lm)  # the language model was trained on
        with pytest.raises(SystemExit):
            mod.main(["--arch", arch, "--smoke", "--out", str(tuned), "--init-from", str(out), "--tower-from", str(out)])
        # --frozen-attention keeps the first layers' query/key projections and input norms through stage 2
        frozen = tmp_path / "frozen"
        assert mod.main(["--arch", arch, "--smoke", "--out", str(frozen), "--init-from", str(out),
                         "--scene-steps", "0", "--llm-lr", "1e-2", "--frozen-attention", "1"]) == 0
        d = load_file(frozen / "model.safetensors")
        kept = [k for k in lm if ".layers.0." in k and any(n in k for n in ("q_proj", "k_proj", "input_layernorm"))]
        assert len(kept) == 3 and all(torch.equal(a[k], d[k]) for k in kept)
        rest = [k for k in lm if k not in kept]
        assert sum(not torch.equal(a[k], d[k]) for k in rest) > len(rest) // 2
        assert len(json.loads((frozen / "train_log.json").read_text())["frozen"]) == 3
        # --tower-tune runs stage 1 again on the loaded tower (here with the direction head), then stage 2c
        retuned = tmp_path / "retuned"
        assert mod.main(["--arch", arch, "--smoke", "--out", str(retuned), "--init-from", str(out),
                         "--scene-steps", "0", "--tower-tune", "5", "--direction", "1"]) == 0
        log4 = json.loads((retuned / "train_log.json").read_text())
        assert log4["tower"]["steps"] == 3 and log4["tower"]["direction"] == 1
        assert log4["tower"]["from"]["loaded_from"] == str(out) and set(log4["tower"]["heads"]) == {
            *mod.TOKEN_HEADS, "direction"}
        e = load_file(retuned / "model.safetensors")
        assert any(not torch.equal(a[k], e[k]) for k in towers)
        with pytest.raises(SystemExit):
            mod.main(["--arch", arch, "--smoke", "--out", str(retuned), "--tower-tune", "5"])
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(out)
    proc = AutoProcessor.from_pretrained(out)
    s = shapes.make_sample("test", 0)
    inputs = proc(images=[s.image], text=[mod.RECIPES[arch]().prompt(s.question)], return_tensors="pt")
    assert int((inputs["input_ids"] == model.config.image_token_id).sum()) == 64  # one token per 28 px cell
    assert os.path.getsize(out / "model.safetensors") < 20e6
    # the prompt the training script uses is the one `vtprune eval` builds for the same question
    from vtprune.eval.tasks import ONE_WORD
    from vtprune.loading import default_prompt

    assert default_prompt(model, proc, f"{s.question} {ONE_WORD}") == mod.RECIPES[arch]().prompt(s.question)


def test_feature_cache_is_reused_only_for_the_tower_that_wrote_it(tmp_path):
    """`--features` saves the tower's fingerprint: the same tower reads the cache back, a changed tower
    (as after `--tower-tune`), a short cache and an old bare-tensor file are recomputed."""
    import torch

    mod = _train_toy()
    recipe = mod.RECIPES["llava"]()
    torch.manual_seed(0)
    model = recipe.model(recipe.tokenizer(), _Small()).eval()
    path, feats = str(tmp_path / "f.pt"), torch.randn(4, 64, 32).half()
    torch.save({"features": feats, "tower": mod.tower_fingerprint(recipe, model)}, path)
    assert torch.equal(mod.load_cached_features(path, recipe, model, 3), feats[:3])
    assert mod.load_cached_features(path, recipe, model, 5) is None  # too few scenes
    with torch.no_grad():
        next(recipe.tower(model).parameters()).add_(1e-3)
    assert mod.load_cached_features(path, recipe, model, 3) is None  # another tower
    torch.save(feats, path)
    assert mod.load_cached_features(path, recipe, model, 3) is None  # no fingerprint
    assert mod.load_cached_features(None, recipe, model, 3) is None


def test_text_documents_are_text_only_and_cut_to_length():
    """Stage 0's documents: BOS first (LLaVA), the task's turns, never an image token, ``length`` long."""
    mod = _train_toy()
    recipe = mod.LlavaRecipe()
    tok = recipe.tokenizer()
    ids = mod.text_documents(recipe, tok, np.random.default_rng(0), 3, 40, 0)
    assert ids.shape == (3, 40) and (ids[:, 0] == tok.bos_token_id).all()
    assert not (ids == tok.convert_tokens_to_ids("<image>")).any()
    assert "ASSISTANT:" in tok.decode(ids[0]) and not (ids == ids[0]).all()  # documents differ


class _Small:
    hidden, layers, vision_hidden, vision_layers = 64, 2, 32, 1


@pytest.mark.parametrize("arch", ["llava", "qwen2-vl"])
def test_packed_turns_are_exactly_single_turn_prompts(arch):
    """Training packs several independent turns after one image; each turn must see exactly what a
    one-question prompt built by the processor gives the model: same tokens, same positions, same logits."""
    import torch

    mod = _train_toy()
    recipe = mod.RECIPES[arch]()
    tok = recipe.tokenizer()
    proc = recipe.processor(tok)
    torch.manual_seed(0)
    model = recipe.model(tok, _Small()).eval()
    s = shapes.make_sample("test", 2)
    seqs = [mod.sequence(recipe, tok, model, s.objects, np.random.default_rng(k), 3 - k) for k in range(2)]
    ids, labels, mask, pos = mod.pack(recipe, seqs, tok.pad_token_id)
    feats = torch.randn(2, 64 if arch == "llava" else 256, 32)  # LLaVA's patch features; Qwen's pre-merger patches
    with torch.no_grad():
        packed = model.model.language_model(inputs_embeds=recipe.embed(model, feats, ids), attention_mask=mask,
                                            position_ids=pos).last_hidden_state
    seg = torch.tensor(seqs[1][2])
    for turn in (1, 2):
        keep = (seg == 0) | (seg == turn)
        alone = torch.tensor(seqs[1][0])[keep][None]
        keep = torch.cat([keep, torch.zeros(ids.shape[1] - len(keep), dtype=torch.bool)])  # to the padded width
        with torch.no_grad():
            ref = model.model.language_model(inputs_embeds=recipe.embed(model, feats[1:], alone)).last_hidden_state
        if arch == "qwen2-vl":  # the model's own M-RoPE positions for the one-turn sequence
            ref_pos, _ = model.model.get_rope_index(alone, mm_token_type_ids=(alone == model.config.image_token_id).int(),
                                                    image_grid_thw=torch.tensor([[1, 16, 16]]))
            with torch.no_grad():
                ref = model.model.language_model(inputs_embeds=recipe.embed(model, feats[1:], alone),
                                                 position_ids=ref_pos).last_hidden_state
            assert torch.equal(pos[:, 1, keep], ref_pos[-3:, 0])
        torch.testing.assert_close(packed[1, keep], ref[0], atol=1e-5, rtol=1e-5)
    # the prompt part of a turn is token for token what the processor builds for that question
    for i in range(10):
        q = shapes.make_sample("test", i)
        one = proc(images=[q.image], text=[recipe.prompt(q.question)], return_tensors="pt")["input_ids"][0].tolist()
        assert recipe.start(tok, model) + recipe.turn(tok, q.question + mod.ONE_WORD) == one
    assert (labels != -100).sum() > 0 and (labels[ids == tok.pad_token_id] == -100).all()


def test_scene_objects_are_the_scenes_objects():
    for i in range(20):
        assert shapes.scene_objects("train", i) == shapes.make_scene("train", i)[1]


@pytest.mark.parametrize("arch", ["llava", "qwen2-vl"])
def test_recorded_turns_point_at_their_answers(arch):
    """`sequence(record=...)` marks the first answer token of every one-word turn, with its question type."""
    mod = _train_toy()
    recipe = mod.RECIPES[arch]()
    tok = recipe.tokenizer()
    model = recipe.model(tok, _Small)
    objs = shapes.scene_objects("test", 5)
    record: list = []
    ids, labels, _ = mod.sequence(recipe, tok, model, objs, np.random.default_rng(0), 20, 0.3, record)
    answers = [i for i in range(1, len(labels)) if labels[i] != -100 and labels[i - 1] == -100]
    assert 0 < len(record) < len(answers) == 20  # some turns were captions, which are not recorded
    assert {pos for pos, _ in record} < set(answers) and {k for _, k in record} <= set(shapes.QTYPES)
    words = set(shapes.ANSWERS)
    for pos, _ in record:
        assert tok.decode([ids[pos]]).strip() in words


def test_scene_tokens_are_the_sum_of_label_embeddings():
    import torch

    mod = _train_toy()
    scene = mod.SceneTokens(16)
    labels = torch.from_numpy(np.stack([mod.token_labels(shapes.scene_objects("test", i), 8) for i in range(3)]))
    out = scene(labels)
    assert out.shape == (3, 64, 16)
    bg = labels[:, 0] == 0
    assert torch.allclose(out[bg], sum(t.weight[0] for t in scene.tables).expand(int(bg.sum()), 16))
    assert not torch.allclose(out[~bg], out[bg][:1].expand(int((~bg).sum()), 16))


def test_token_labels_mark_every_object_token():
    mod = _train_toy()
    s = shapes.make_sample("test", 3)
    for grid in (16, 8):
        labels = mod.token_labels(s.objects, grid)
        assert labels.shape == (len(mod.SCENE_HEADS), grid * grid)
        assert np.array_equal(labels[0].reshape(grid, grid) > 0, s.object_mask(grid))
        assert set(labels[4][labels[0] > 0]) == {len(s.objects)}  # the count, on every object token
        assert list(mod.SCENE_HEADS)[:len(mod.TOKEN_HEADS)] == list(mod.TOKEN_HEADS)  # the tower's heads first
    labels = mod.token_labels(s.objects, 8)
    for o in s.objects:  # the (colour, shape) pair, on the object's tokens only
        pair = mod.PAIRS.index((o.colour, o.shape)) + 1
        assert {int(labels[5, r * 8 + c]) for r, c in o.cells} == {pair} and (labels[5] == pair).sum() == len(o.cells)
    assert set(labels[5][labels[0] == 0]) == {0}


def test_direction_labels_point_at_the_nearest_object():
    """The tower's `direction` head target: 0 on object tokens, else the compass step to the nearest object."""
    mod = _train_toy()

    def direction(objects, grid=8):
        return mod.nearest_object_direction(mod.token_labels(objects, grid)[0].reshape(grid, grid) > 0)

    small = shapes.ShapeObject("red", "circle", False, 2, 2)  # cell (2, 2)
    grid = direction([small]).reshape(8, 8)
    assert grid[2, 2] == 0 and (grid == 0).sum() == 1
    # 1 right, 3 up, 5 left, 7 down; 2, 4, 6, 8 the diagonals between
    assert (grid[2, 0], grid[0, 2], grid[2, 7], grid[7, 2]) == (1, 7, 5, 3)
    assert (grid[0, 0], grid[0, 4], grid[4, 4], grid[4, 0]) == (8, 6, 4, 2)
    big = shapes.ShapeObject("blue", "square", True, 5, 5)  # cells (5..6, 5..6); nearer than (2, 2) from (7, 7)
    grid = direction([small, big]).reshape(8, 8)
    assert grid[7, 7] == 4 and grid[6, 4] == 1 and grid[3, 2] == 3
    sample = shapes.make_sample("test", 3)  # on any grid the zeros are the object tokens
    for size in (8, 16):
        fine = direction(sample.objects, size).reshape(size, size)
        assert np.array_equal(fine == 0, sample.object_mask(size)) and fine.max() <= 8


@pytest.mark.parametrize("arch", ["llava", "qwen2-vl"])
def test_hidden_visual_tokens_are_pruning_before_the_language_model(arch):
    """`pack(seen=...)` with one set hidden from every part of a sequence gives each turn exactly what a
    one-question prompt pruned before the language model gives (those tokens removed, positions kept)."""
    import torch

    mod = _train_toy()
    recipe = mod.RECIPES[arch]()
    tok = recipe.tokenizer()
    torch.manual_seed(0)
    model = recipe.model(tok, _Small()).eval()
    s = shapes.make_sample("test", 4)
    cells: list = []
    seq = mod.sequence(recipe, tok, model, s.objects, np.random.default_rng(1), 3, 0.0, cells=cells)
    assert len(cells) == 3 and all(c and all(obj and all(0 <= i < 64 for i in obj) for obj in c) for c in cells)
    assert all({i for obj in c for i in obj} <= {r * 8 + col for o in s.objects for r, col in o.cells} for c in cells)
    first = [i for obj in cells[0] for i in obj]
    keep = torch.zeros(64, dtype=torch.bool)
    keep[torch.tensor([0, 9, 18, 27, 40, 63, *first])] = True
    seen = keep.expand(4, 64).clone()
    ids, _, mask, pos = mod.pack(recipe, [seq], tok.pad_token_id, model.config.image_token_id, [seen])
    feats = torch.randn(1, 64 if arch == "llava" else 256, 32)
    embeds = recipe.embed(model, feats, ids)
    with torch.no_grad():
        packed = model.model.language_model(inputs_embeds=embeds, attention_mask=mask, position_ids=pos).last_hidden_state
    seg = torch.tensor(seq[2])
    image = ids[0] == model.config.image_token_id
    dropped = torch.zeros_like(image)
    dropped[image.nonzero().flatten()[~keep]] = True
    for turn in (1, 2, 3):
        alone = ((seg == 0) | (seg == turn)) & ~dropped
        p = pos[..., alone] if arch == "llava" else pos[:, :, alone]
        with torch.no_grad():
            ref = model.model.language_model(inputs_embeds=embeds[:, alone], position_ids=p).last_hidden_state
        torch.testing.assert_close(packed[0, alone], ref[0], atol=1e-5, rtol=1e-5)
    # a turn that sees fewer tokens than the prefix: only its own rows change
    seen2 = seen.clone()
    seen2[2] = False
    seen2[2, [i for obj in cells[1] for i in obj]] = True
    _, _, mask2, _ = mod.pack(recipe, [seq], tok.pad_token_id, model.config.image_token_id, [seen2])
    with torch.no_grad():
        other = model.model.language_model(inputs_embeds=embeds, attention_mask=mask2, position_ids=pos).last_hidden_state
    assert torch.equal(other[0, seg != 2], packed[0, seg != 2]) and not torch.allclose(other[0, seg == 2], packed[0, seg == 2])


def test_visible_tokens_mix_good_and_bad_pruners():
    mod = _train_toy()
    rng = np.random.default_rng(0)
    cells = [[[3, 4, 11, 12]], [[40]], [[20, 21, 28, 29], [50]]]  # per turn, one cell list per object
    flat = [[i for obj in c for i in obj] for c in cells]
    assert all(mod.visible_tokens(rng, cells, 0.0) is None for _ in range(20))
    draws = [mod.visible_tokens(rng, cells, 1.0) for _ in range(400)]
    assert all(d is not None and d.shape == (4, 64) and str(d.dtype) == "torch.bool" for d in draws)
    rows = [(j, d[j]) for d in draws for j in (1, 2, 3)]
    full = [r for j, r in rows if r[flat[j - 1]].all()]
    assert 0.4 < len(full) / len(rows) < 0.8  # a good pruner's sets (plus random sets that happen to hold them)
    assert min(int(r.sum()) for _, r in rows) <= 4 and max(int(r.sum()) for _, r in rows) >= 50
    assert 0.3 < np.mean([bool(d[0].all()) for d in draws]) < 0.7  # pre-LLM pruning of the whole sequence


def test_visible_tokens_part_of_each_object_sees_every_object():
    """``part_of_each=1``: a good pruner's row holds at least one cell of every object of its turn and,
    for a big object, often not all four (as a pruner that covers objects first keeps at 7 tokens)."""
    mod = _train_toy()
    rng = np.random.default_rng(0)
    cells = [[[3, 4, 11, 12], [20, 21, 28, 29], [50]]]
    draws = [mod.visible_tokens(rng, cells, 1.0, part_of_each=1.0)[1] for _ in range(400)]
    # random (bad-pruner) rows hold every object by chance only when they are dense
    good = [r for r in draws if all(r[obj].any() for obj in cells[0])]
    assert len(good) / len(draws) > 0.5
    assert sum(not r[[3, 4, 11, 12]].all() for r in good) > len(good) // 4
    rng = np.random.default_rng(1)
    base = [mod.visible_tokens(rng, cells, 1.0)[1] for _ in range(400)]
    assert len(good) > sum(all(r[obj].any() for obj in cells[0]) for r in base)


@pytest.mark.parametrize("bad", ["valid", "nope"])
def test_bad_split_is_refused(bad):
    if bad == "valid":
        with pytest.raises(ValueError, match="unknown split"):
            shapes.make_sample(bad, 0)
    else:
        with pytest.raises(ValueError, match="unknown split"):
            shapes.dataset(bad, 1)


def test_llava_tower_starts_from_a_2d_sincos_position_table():
    import torch

    mod = _train_toy()
    table = mod.sincos_positions(8, 32)
    assert table.shape == (65, 32) and torch.equal(table[0], torch.zeros(32))  # CLS: no position
    grid = table[1:].reshape(8, 8, 32)
    assert torch.equal(grid[:, 0, :16], grid[:, 5, :16])  # the first half codes the row only
    assert torch.equal(grid[0, :, 16:], grid[6, :, 16:])  # the second half the column only
    assert len({tuple(r.tolist()) for r in table[1:]}) == 64  # every patch position is distinct
    recipe = mod.RECIPES["llava"]()
    tok = recipe.tokenizer()
    model = recipe.model(tok, _Small())
    assert torch.equal(model.model.vision_tower.embeddings.position_embedding.weight.detach(),
                       mod.sincos_positions(8, _Small.vision_hidden))
