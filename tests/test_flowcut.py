"""FlowCut: schedule, planted cases, key masking == dropping in both tower kinds, and exactness end to end.

References built here drop tokens physically (the paper's mechanism) and compute the scores the plain way
(full attention rows of the remaining tokens), while vtprune hides pruned tokens with key masks and
recomputes the rows it needs; the two must agree. The in-LLM reference runs the unpatched language model
on the patched run's own inputs (the features of the masked vision tower), hiding the vision-pruned tokens
in layers <= K and the dropped ones after K, as tests/oracle.py does for a single pruning point.
"""

from __future__ import annotations

import importlib
import inspect
import math

import pytest
import torch
from conftest import batch, get_model, qwen_batch
from oracle import dropped_positions

import vtprune
from vtprune.adapters.qwen import window_order
from vtprune.config import ConfigError
from vtprune.runtime import flowcut as fs
from vtprune.scorers.flowcut import (
    FlowTracker,
    cls_flow_scores,
    keep_count,
    llm_flow_scores,
    mean_query_scores,
    pruning_layers,
)
from vtprune.toy.tiny import tiny_llava
from vtprune.toy.tiny_qwen import tiny_qwen

NO_EOS = 10_000  # an id outside the vocabulary: decode the full length
QWEN = ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"]


# ---- schedule ---------------------------------------------------------------------------------------
def test_pruning_layers_and_last_layer():
    assert pruning_layers(21) == list(range(1, 22, 2))  # LLaVA-1.5: after CLIP layers 1, 3, ..., 21
    assert pruning_layers(0) == [0]
    assert pruning_layers(4) == [0, 2, 4]
    assert fs.last_clip_layer(-2, 24) == 21 and fs.last_clip_layer(-2, 3) == 0 and fs.last_clip_layer(23, 24) == 21
    with pytest.raises(ConfigError, match="before the feature layer"):
        fs.last_clip_layer(1, 3)


def test_keep_count_formula():
    n, t = 576, 64
    flat, peaked = torch.ones(n), torch.zeros(n)
    peaked[3] = 1.0
    assert keep_count(n, t, 3, peaked) == n  # odd rho: no pruning here
    assert keep_count(n, t, 0, flat) == t  # the last stage goes straight to the target
    assert keep_count(n, t, 4, flat) == n  # a flat relay (entropy ratio 1) prunes nothing
    assert keep_count(n, t, 4, peaked) == n - round((n - t) / 2)  # entropy 0: (N - T) / sqrt(rho)
    half = torch.cat([torch.ones(n // 2), torch.zeros(n // 2)])  # H / log N = log(N/2) / log N
    want = n - round((n - t) / math.sqrt(2) * (1 - (math.log(n / 2) / math.log(n)) ** 2))
    assert keep_count(n, t, 2, half) == want
    assert keep_count(t, t, 0, flat[:t]) == t


@pytest.mark.parametrize("n,t,last", [(576, 64, 21), (576, 192, 21), (576, 128, 0), (117, 8, 31),
                                      (2880, 64, 3), (50, 49, 5), (10, 1, 7), (40, 40, 3)])
def test_schedule_reaches_exactly_the_target(n, t, last):
    gen = torch.Generator().manual_seed(n + t + last)
    rows = 3  # a peaked, a flat and a random relay per layer
    tracker = FlowTracker(torch.ones(rows, n, dtype=torch.bool), torch.full((rows,), t), last)
    stages = set(pruning_layers(last))
    for layer in range(last + 3):
        relay = torch.stack([torch.softmax(8 * torch.randn(n, generator=gen), 0), torch.ones(n),
                             torch.rand(n, generator=gen)])
        before = tracker.live.sum(1)
        tracker.step(layer, torch.rand(rows, n, generator=gen), relay * tracker.live)
        after = tracker.live.sum(1)
        assert bool((after <= before).all()) and bool((after >= min(t, n)).all())
        if layer not in stages:
            assert torch.equal(after, before)
    assert tracker.live.sum(1).tolist() == [t] * rows
    scores = tracker.final_scores()
    assert bool(torch.isfinite(scores[tracker.live]).all()) and bool((scores[~tracker.live] == -math.inf).all())


# ---- planted cases ----------------------------------------------------------------------------------
def _planted(n: int, planted: torch.Tensor, heads: int = 2, d: int = 8, seed: int = 0):
    """Keys aligned with a query direction and large values on the planted tokens, noise elsewhere."""
    gen = torch.Generator().manual_seed(seed)
    u = torch.nn.functional.normalize(torch.randn(heads, d, generator=gen), dim=-1)
    k = 0.3 * torch.randn(heads, n, d, generator=gen)
    v = 0.1 * torch.randn(heads, n, d, generator=gen)
    k[:, planted] = 4.0 * u[:, None]
    v[:, planted] += torch.randn(heads, planted.numel(), d, generator=gen)
    return u, k, v


def test_planted_cls_flow_survives_every_stage():
    """CLS relay and value norm planted on 12 patches: exactly those survive the multi-stage schedule."""
    p, t, last = 200, 12, 5
    planted = torch.randperm(p, generator=torch.Generator().manual_seed(1))[:t] + 1  # token ids (CLS is 0)
    u, k, v = _planted(p + 1, planted)
    v[:, 0] = 0.1 * u  # CLS value: small, so the semantic term is flat-ish
    tracker = FlowTracker(torch.ones(1, p, dtype=torch.bool), torch.tensor([t]), last)
    for layer in range(last + 1):
        live = torch.cat([torch.ones(1, 1, dtype=torch.bool), tracker.live], 1)
        score, relay = cls_flow_scores(u[None], k[None], v[None], live, 1.0 / math.sqrt(u.shape[-1]))
        tracker.step(layer, score, relay)
    assert torch.equal(torch.nonzero(tracker.live[0]).flatten() + 1, planted.sort().values)


def test_planted_mean_query_and_llm_scores():
    n = 64
    planted = torch.tensor([5, 17, 40])
    u, k, v = _planted(n, planted, seed=2)
    q = u[:, None].expand(-1, n, -1) + 0.05 * torch.randn(2, n, 8)  # every query close to u: so is the mean
    live = torch.ones(n, dtype=torch.bool)
    live[17] = False  # a hidden token neither scores nor takes part in the softmax
    score, attn = mean_query_scores(q, k, v, live, 1.0 / math.sqrt(8))
    assert set(torch.topk(score, 2).indices.tolist()) == {5, 40} and float(score[17]) == 0.0
    torch.testing.assert_close(attn.sum(), torch.tensor(1.0))
    s = llm_flow_scores(u, k, v[:, 0], v, live, 1.0 / math.sqrt(8))
    assert set(torch.topk(s, 2).indices.tolist()) == {5, 40} and float(s[17]) == -math.inf


# ---- key masking == dropping inside the CLIP tower ---------------------------------------------------
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_clip_key_masking_equals_dropping(attn, processor):
    model = get_model("llava", attn)
    tower = model.model.vision_tower
    pixels = batch(processor, [1, 1])["pixel_values"]
    gen = torch.Generator().manual_seed(0)
    keep = [torch.cat([torch.zeros(1, dtype=torch.long), torch.randperm(576, generator=gen)[:40].sort().values + 1])
            for _ in range(2)]
    keep = torch.stack(keep)  # [2, 41], CLS first
    with torch.no_grad():
        h = tower.pre_layrnorm(tower.embeddings(pixels))
        h = tower.encoder.layers[0](h, None)
        dead = torch.ones(h.shape[:2], dtype=torch.bool)
        dead.scatter_(1, keep, False)
        mask = fs._hide(None, dead, h.dtype)
        dropped = torch.stack([h[i, keep[i]] for i in range(2)])
        masked = h
        for layer in tower.encoder.layers[1:]:
            dropped, masked = layer(dropped, None), layer(masked, mask)
    got = torch.stack([masked[i, keep[i]] for i in range(2)])
    assert (got - torch.stack([h[i, keep[i]] for i in range(2)])).abs().max() > 1e-3  # the layers did work
    torch.testing.assert_close(got, dropped, atol=2e-5, rtol=1e-4)


# ---- LLaVA-1.5: the whole vision stage against physical dropping, then the shortened LM ---------------
_DEEP: dict = {}


def deep_llava():
    """A tiny LLaVA with a 6-layer tower (pruning after layers 1 and 3) and peaked CLS attention."""
    if "m" not in _DEEP:
        model = tiny_llava(vision_layers=6, seed=1)
        for layer in model.model.vision_tower.encoder.layers:  # sharper attention: the middle stage prunes
            layer.self_attn.q_proj.weight.data *= 8
            layer.self_attn.k_proj.weight.data *= 8
        _DEEP["m"] = model
    return _DEEP["m"]


def _clip_layer(layer, h: torch.Tensor) -> torch.Tensor:
    """One CLIP encoder layer without a mask (transformers 4.x also takes a causal mask, and returns a tuple)."""
    extra = {"causal_attention_mask": None} if "causal_attention_mask" in inspect.signature(layer.forward).parameters else {}
    out = layer(h, None, **extra)
    return out[0] if isinstance(out, tuple) else out


@torch.no_grad()
def reference_clip_flowcut(model, pixels, target: int):
    """FlowCut on each tile of transformers' LLaVA with dropped tokens and full attention rows."""
    return reference_tower_flowcut(model.model.vision_tower, model.config.vision_feature_layer,
                                   model.model.multi_modal_projector, pixels, target)


@torch.no_grad()
def reference_tower_flowcut(tower, feature_layer, projector, pixels, target: int):
    """FlowCut on each tile of a CLIP vision transformer ``tower`` (``embeddings``, ``pre_layrnorm``,
    ``encoder.layers``) with dropped tokens and full attention rows: (kept patch ids, projected features of
    ``hidden_states[feature_layer]``, per tile the patch counts after each scoring layer)."""
    layers = tower.encoder.layers
    last = fs.last_clip_layer(feature_layer, len(layers))
    feature = last + 1  # the layer whose output the projector reads
    kept_ids, feats, stages = [], [], []
    for r in range(pixels.shape[0]):
        h = tower.pre_layrnorm(tower.embeddings(pixels[r:r + 1]))
        ids = torch.arange(h.shape[1])  # tokens still in the sequence (CLS first)
        cum, counts = None, []
        for i, layer in enumerate(layers):
            attn = layer.self_attn
            x = layer.layer_norm1(h)[0]
            n, nh, d = x.shape[0], attn.num_heads, attn.head_dim
            q = attn.q_proj(x).view(n, nh, d).transpose(0, 1).float()
            k = attn.k_proj(x).view(n, nh, d).transpose(0, 1).float()
            v = attn.v_proj(x).view(n, nh, d).transpose(0, 1).float()
            h = _clip_layer(layer, h)
            if i > last or ids.numel() - 1 <= target:
                if i == feature:
                    feats.append(h[0, 1:])
                continue
            cls_row = torch.softmax(q @ k.transpose(1, 2) * attn.scale, -1)[:, 0].mean(0)[1:]
            sem_row = torch.softmax(v @ v.transpose(1, 2), -1)[:, 0].mean(0)[1:]
            score = (cls_row / cls_row.sum() + sem_row / sem_row.sum()) * v.mean(0)[1:].abs().sum(-1)
            cum = score if cum is None else 0.5 * cum + 0.5 * score
            keep = keep_count(ids.numel() - 1, target, last - i, cls_row)
            if keep < ids.numel() - 1:
                top = torch.sort(torch.topk(cum, keep).indices).values
                cum, ids = cum[top], torch.cat([ids[:1], ids[1:][top]])
                h = torch.cat([h[:, :1], h[:, 1:][:, top]], 1)
            counts.append(ids.numel() - 1)
            if i == feature:
                feats.append(h[0, 1:])
        kept_ids.append(ids[1:] - 1)
        stages.append(counts)
    projected = [projector(f) for f in feats]
    return kept_ids, projected, stages


@pytest.mark.parametrize("case", ["single", "left_padded_2"])
def test_llava_pre_llm_equals_dropping_in_the_tower(case, processor):
    model = deep_llava()
    t = 24
    inputs = batch(processor, [1] if case == "single" else [1, 1])
    vtprune.apply(model, "flowcut", keep=t)
    with torch.no_grad():
        pruned = model(**inputs).logits
        gen = model.generate(**inputs, max_new_tokens=3, do_sample=False, output_logits=True,
                             return_dict_in_generate=True, eos_token_id=NO_EOS)
    st = vtprune.stats(model)
    vtprune.remove(model)
    assert st.stage == "pre-llm" and st.visual_after == [t] * len(st.visual_after)
    kept, feats, stages = reference_clip_flowcut(model, inputs["pixel_values"], t)
    assert all(576 > c[1] > t for c in stages)  # layer 1 pruned (so the masking mattered) ...
    assert all(c[-1] == t for c in stages)  # ... and the last one reached the target
    for b in range(len(kept)):
        assert torch.equal(st.kept[b], kept[b])
    # the unpatched language model on the shortened sequence built from the dropped-tower features
    ids, attn_mask = inputs["input_ids"], inputs["attention_mask"]
    dropped = dropped_positions(model, ids, st)
    with torch.no_grad():
        embeds = model.model.get_input_embeddings()(ids)
    vis = ids == model.config.image_token_id
    rows = []
    for b in range(ids.shape[0]):
        e = embeds[b].clone()
        e[torch.nonzero(vis[b]).flatten()[kept[b]]] = feats[b]
        rows.append((e[~dropped[b]], attn_mask[b][~dropped[b]]))
    width = max(r[0].shape[0] for r in rows)
    short = torch.zeros(len(rows), width, embeds.shape[-1])
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for b, (e, m) in enumerate(rows):  # left padding, as vtprune re-pads
        short[b, width - e.shape[0]:], mask[b, width - e.shape[0]:] = e, m
    with torch.no_grad():
        ref = model(inputs_embeds=short, attention_mask=mask).logits
        ref_gen = model.generate(inputs_embeds=short, attention_mask=mask, max_new_tokens=3, do_sample=False,
                                 output_logits=True, return_dict_in_generate=True, eos_token_id=NO_EOS)
    valid = mask.bool()
    torch.testing.assert_close(pruned[valid], ref[valid], atol=2e-5, rtol=1e-4)
    assert torch.equal(gen.sequences[:, ids.shape[1]:], ref_gen.sequences)
    for a, b in zip(gen.logits, ref_gen.logits):
        torch.testing.assert_close(a, b, atol=3e-5, rtol=1e-4)


# ---- Qwen-VL: the vision stage against physical dropping (window order included) -----------------------
_QWEN: dict = {}


def deep_qwen(kind: str):
    """A tiny Qwen-VL with a 6-block tower and sharper attention, so the middle stages prune."""
    if kind not in _QWEN:
        model = tiny_qwen(kind, vision_layers=6, seed=1)
        for block in model.model.visual.blocks:
            w = block.attn.qkv.weight.data
            w[: 2 * w.shape[1]] *= 100  # the q and k rows
        _QWEN[kind] = model
    return _QWEN[kind]


@torch.no_grad()
def reference_qwen_flowcut(model, inputs, item_target: int):
    """FlowCut-Qwen with dropped merge groups: per image, the kept merged tokens (raster) and their features."""
    visual = model.model.visual
    blocks = visual.blocks
    seen = []
    handles = [b.register_forward_pre_hook(lambda m, a, k: seen.append((a[0], k)), with_kwargs=True)
               for b in blocks]
    visual(inputs["pixel_values"], grid_thw=inputs["image_grid_thw"])
    for h in handles:
        h.remove()
    rope_mod = importlib.import_module(type(blocks[0]).__module__)
    h = seen[0][0]
    grid = inputs["image_grid_thw"]
    frames = [(0, 0)]  # patch ranges of the images (single frames here), tower order
    for _t, gh, gw in grid.tolist():
        frames.append((frames[-1][1], frames[-1][1] + gh * gw))
    frames = frames[1:]
    ids = torch.arange(h.shape[0])  # patches still in the sequence, tower order
    cum = {}
    last = len(blocks) - 1
    for i, block in enumerate(blocks):
        kw = seen[i][1]
        cos, sin = kw["position_embeddings"]
        cu = torch.searchsorted(ids, kw["cu_seqlens"].long()).unique_consecutive().to(torch.int32)  # no empty window
        x = block.norm1(h)
        s = x.shape[0]
        q, k, v = block.attn.qkv(x).reshape(s, 3, block.attn.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
        q, k = rope_mod.apply_rotary_pos_emb_vision(q, k, cos[ids], sin[ids])
        h = block(h, cu_seqlens=cu, position_embeddings=(cos[ids], sin[ids]))
        keep_ids = []
        for f, (a, b) in enumerate(frames):
            sel = torch.nonzero((ids >= a) & (ids < b)).flatten()
            g = sel.numel() // 4
            target = min((b - a) // 4, 2 * item_target)
            if i > last or g <= target:
                keep_ids.append(sel)
                continue
            qf, kf, vf = q[sel].transpose(0, 1).float(), k[sel].transpose(0, 1).float(), v[sel].transpose(0, 1).float()
            attn = torch.softmax(qf.mean(1, keepdim=True) @ kf.transpose(1, 2) * block.attn.scaling, -1)[:, 0].mean(0)
            score = (attn * vf.mean(0).abs().sum(-1)).view(g, 4).mean(1)
            cum[f] = score if f not in cum else 0.5 * cum[f] + 0.5 * score
            keep = keep_count(g, target, last - i, attn.view(g, 4).sum(1))
            top = torch.sort(torch.topk(cum[f], keep).indices).values
            cum[f] = cum[f][top]
            keep_ids.append(sel.view(g, 4)[top].flatten())
        sel = torch.cat(keep_ids)
        ids, h = ids[sel], h[sel]
    feats = visual.merger(h)
    groups = ids.view(-1, 4)[:, 0] // 4  # tower-order merge group of each kept merged token
    vc = model.config.vision_config
    order = (window_order(grid, 2, vc.window_size, vc.patch_size) if model.config.model_type == "qwen2_5_vl"
             else torch.arange(int(grid.prod(-1).sum()) // 4))
    raster = order[groups]
    out = []
    offset = 0
    for t_, gh, gw in grid.tolist():
        n = t_ * gh * gw // 4
        sel = torch.nonzero((raster >= offset) & (raster < offset + n)).flatten()
        sel = sel[torch.argsort(raster[sel])]  # raster order
        out.append((raster[sel] - offset, feats[sel]))
        offset += n
    return out


@pytest.mark.parametrize("kind", QWEN)
def test_qwen_vision_stage_equals_dropping_groups(kind):
    model = deep_qwen(kind)
    t = 6
    inputs = qwen_batch(kind, "two_images")
    ref = reference_qwen_flowcut(model, inputs, t)
    vtprune.apply(model, "flowcut", keep=t)
    with torch.no_grad():
        model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"])
    rec = model._vtprune_state.vision_record
    vtprune.remove(model)
    scores = rec.cls_attention.flatten()
    offset = 0
    for i, (kept, feats) in enumerate(ref):
        n = rec.features[i].shape[0]
        ours = torch.nonzero(torch.isfinite(scores[offset:offset + n])).flatten()
        assert kept.numel() == min(n, 2 * t) and torch.equal(ours, kept)
        torch.testing.assert_close(rec.features[i][kept], feats, atol=2e-5, rtol=1e-4)
        offset += n


def test_qwen_middle_stages_prune_and_the_config_is_restored():
    """The masking path is exercised (a middle stage prunes), and remove() gives the original config back."""
    model = deep_qwen("qwen2_5_vl")
    attn = model.model.visual.blocks[0].attn
    original = attn.config
    counts = []
    step = FlowTracker.step

    def spy(self, layer, score, relay):
        step(self, layer, score, relay)
        counts.append(self.live.sum(1).tolist())

    vtprune.apply(model, "flowcut", keep=6)
    assert attn.config is not original and attn.config._attn_implementation == fs.FLOWCUT_ATTENTION
    FlowTracker.step = spy
    try:
        inputs = qwen_batch("qwen2_5_vl", "single")
        with torch.no_grad():
            model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"])
    finally:
        FlowTracker.step = step
        vtprune.remove(model)
    assert attn.config is original
    full = int(inputs["image_grid_thw"].prod()) // 4
    assert full > counts[1][0] > 12 and counts[-1] == [12]


# ---- in-LLM: LLaVA-NeXT and Qwen-VL against the masked reference ------------------------------------------
def _in_llm_inputs(kind, case, next_processor):
    if kind == "next":
        return batch(next_processor, [1] if case == "single" else [1, 1], sizes=((400, 500), (300, 620)))
    return qwen_batch(kind, case)


@torch.no_grad()
def masked_reference(model, full, n, layer, hidden, dropped, lm_inputs):
    """Unpatched model on ``full`` (prompt + generated tokens), no cache: the language model gets the patched
    run's prompt inputs (its vision-stage features), and the key columns of ``hidden`` (``[B, n]``) are masked
    in decoder layers <= ``layer``, those of ``dropped`` after it (each token still sees itself)."""
    lm = model.model.language_model
    length = full["input_ids"].shape[1]
    keys_ok = full["attention_mask"].bool()

    def allowed(cols):
        pad = torch.zeros(cols.shape[0], length, dtype=torch.bool)
        pad[:, :n] = cols
        ok = torch.ones(length, length, dtype=torch.bool).tril()[None] & (keys_ok & ~pad)[:, None, :]
        return (ok | torch.eye(length, dtype=torch.bool)[None])[:, None]

    early, late = allowed(hidden), allowed(dropped)

    def swap(module, args, kwargs):
        embeds = kwargs["inputs_embeds"].clone()
        embeds[:, :n] = lm_inputs["inputs_embeds"]
        kwargs["inputs_embeds"] = embeds
        if lm_inputs.get("deepstack_visual_embeds") is not None:  # Qwen3-VL: the patched tower's deepstack
            kwargs["deepstack_visual_embeds"] = lm_inputs["deepstack_visual_embeds"]
        return args, kwargs

    def masker(ok):
        def pre(module, args, kwargs):
            mask = kwargs.get("attention_mask")
            if mask is None or mask.dtype == torch.bool:
                kwargs["attention_mask"] = ok if mask is None else (mask & ok)
            else:
                kwargs["attention_mask"] = mask.masked_fill(~ok, torch.finfo(mask.dtype).min)
            return args, kwargs

        return pre

    def record(module, args, kwargs):
        seen.update(hidden=args[0] if args else kwargs["hidden_states"], rope=kwargs["position_embeddings"])

    seen: dict = {}
    handles = [lm.register_forward_pre_hook(swap, with_kwargs=True),
               lm.layers[layer].register_forward_pre_hook(record, with_kwargs=True)]
    handles += [lay.register_forward_pre_hook(masker(early if i <= layer else late), with_kwargs=True)
                for i, lay in enumerate(lm.layers)]
    try:
        return model(**full, use_cache=False).logits, seen
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def reference_llm_keep(layer, hidden, rope, query_pos, lay, candidates, t):
    """Per sample, the top-``t`` prunable tokens per image by FlowCut's LLM score, from full projections."""
    rotary = importlib.import_module(type(layer).__module__).apply_rotary_pos_emb
    attn = layer.self_attn
    x = layer.input_layernorm(hidden)
    bsz, n, _ = x.shape
    hd = attn.head_dim
    q, k, v = (proj(x).view(bsz, n, -1, hd) for proj in (attn.q_proj, attn.k_proj, attn.v_proj))
    if hasattr(attn, "q_norm"):  # Qwen3
        q, k = attn.q_norm(q), attn.k_norm(k)
    q, k = rotary(q.transpose(1, 2), k.transpose(1, 2), *rope)
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, 1).float(), v.transpose(1, 2).repeat_interleave(rep, 1).float()
    q = q.float()
    out = []
    for b in range(bsz):
        qp, kept = int(query_pos[b]), []
        for idx in lay.image_slices(b):
            pos, dom = lay.positions[b][idx], candidates[b][idx]
            rel = torch.einsum("hd,hnd->hn", q[b, :, qp], k[b, :, pos]) * attn.scaling
            sem = torch.einsum("hd,hnd->hn", v[b, :, qp], v[b, :, pos]) / math.sqrt(hd)
            rel, sem = (torch.softmax(x.masked_fill(~dom, -math.inf), -1) for x in (rel, sem))
            score = (rel.mean(0) + sem.mean(0)) * v[b, :, pos].mean(0).abs().sum(-1)
            score = score.masked_fill(~(dom & lay.prunable[b][idx]), -math.inf)
            kept.append(idx[torch.topk(score, t).indices])
        out.append(torch.cat(kept).sort().values)
    return out


@pytest.mark.parametrize("kind", ["next", *QWEN])
@pytest.mark.parametrize("case", ["single", "left_padded_2"])
def test_in_llm_generate_equals_masked_reference(kind, case, next_processor):
    model = get_model(kind)
    t = 10
    inputs = _in_llm_inputs(kind, case, next_processor)
    lm_inputs = {}

    def capture(module, args, kwargs):
        if not lm_inputs:
            lm_inputs.update(kwargs)

    vtprune.apply(model, "flowcut", keep=t)
    handle = model.model.language_model.register_forward_pre_hook(capture, with_kwargs=True)
    try:
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=3, do_sample=False, output_logits=True,
                                 return_dict_in_generate=True, eos_token_id=NO_EOS)
            sess = model._vtprune_state.session
            hidden, lay, st = sess.extras[fs.HIDDEN], sess.layout, vtprune.stats(model)
            candidates = sess.extras[fs.CANDIDATES]
            prefill = model(**inputs, use_cache=False).logits
    finally:
        handle.remove()
        vtprune.remove(model)
    layer = 2 if kind == "qwen3_vl" else 1  # Qwen3-VL: the first layer after its 2 deepstack layers
    assert st.stage == "llm" and st.layer == layer
    for b in range(lay.batch_size):  # exactly t prunable tokens per image
        for idx in lay.image_slices(b):
            kept = torch.isin(idx, st.kept[b]) & lay.prunable[b][idx]
            assert int(kept.sum()) == t < int(lay.prunable[b][idx].sum())
    n = inputs["input_ids"].shape[1]
    dropped = dropped_positions(model, inputs["input_ids"], st)
    assert bool(hidden.any()) and not bool((hidden & ~dropped).any())  # vision-pruned tokens stay dropped
    if kind != "next":  # Qwen: 2t merged tokens per image survive the vision stage
        sizes = [int(idx.numel()) for b in range(lay.batch_size) for idx in lay.image_slices(b)]
        assert int(hidden.sum()) == sum(s - min(s, 2 * t) for s in sizes)
    new = out.sequences.shape[1] - n
    full = {k: v for k, v in inputs.items()}
    full["input_ids"] = out.sequences
    ones = torch.ones(out.sequences.shape[0], new, dtype=inputs["attention_mask"].dtype)
    full["attention_mask"] = torch.cat([inputs["attention_mask"], ones], 1)
    if kind == "next":  # generate's positions follow the attention mask
        full["position_ids"] = (full["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    else:
        full["mm_token_type_ids"] = torch.cat([inputs["mm_token_type_ids"], torch.zeros_like(ones).to(
            inputs["mm_token_type_ids"].dtype)], 1)
    ref, at_k = masked_reference(model, full, n, layer, hidden, dropped, lm_inputs)
    # the kept tokens are the top t by FlowCut's LLM score at layer K, recomputed from full projections
    rope = tuple(c[:, :n] for c in at_k["rope"])
    want = reference_llm_keep(model.model.language_model.layers[layer], at_k["hidden"][:, :n], rope,
                              sess.query_pos, lay, candidates, t)
    for b in range(lay.batch_size):
        assert torch.equal(st.kept[b][lay.prunable[b][st.kept[b]]], want[b])
    check = inputs["attention_mask"].bool() & ~dropped
    torch.testing.assert_close(prefill[check], ref[:, :n][check], atol=2e-5, rtol=1e-4)
    for i, step in enumerate(out.logits):
        torch.testing.assert_close(step, ref[:, n - 1 + i], atol=3e-5, rtol=1e-4)


# ---- configuration -------------------------------------------------------------------------------------
def test_configuration():
    model = get_model("llava")
    with pytest.raises(ConfigError, match="vision tower only"):
        vtprune.apply(model, "flowcut", keep=8, layer=1)
    with pytest.raises(ConfigError, match="ensemble member"):
        vtprune.apply(model, method="ensemble", keep=8, members=["flowcut", "cls"])
    vtprune.apply(model, "flowcut", keep=8)
    assert model._vtprune_state.stage == "pre-llm"
    vtprune.remove(model)
    for kind, layer in (("next", 1), ("qwen2_vl", 1), ("qwen3_vl", 2)):
        m = get_model(kind)
        vtprune.apply(m, "flowcut", keep=8)
        assert m._vtprune_state.layer == layer
        vtprune.remove(m)
        if kind == "qwen3_vl":
            with pytest.raises(ConfigError, match="deepstack"):
                vtprune.apply(m, "flowcut", keep=8, layer=1)
        else:
            vtprune.apply(m, "flowcut", keep=8, layer=2)  # an explicit layer moves the LLM stage
            assert m._vtprune_state.layer == 2
            vtprune.remove(m)


def test_disabled_is_identity(processor):
    model = get_model("llava")
    inputs = batch(processor, [1])
    with torch.no_grad():
        ref = model(**inputs).logits
        vtprune.apply(model, "flowcut", keep=8)
        with vtprune.disabled(model):
            same = model(**inputs).logits
        pruned = model(**inputs).logits
    vtprune.remove(model)
    torch.testing.assert_close(same, ref, atol=0, rtol=0)
    assert pruned.shape[1] == ref.shape[1] - (576 - 8)
