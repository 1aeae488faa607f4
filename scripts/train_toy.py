"""Train the built-in toy VLM `toy-llava` on the synthetic shapes task, on the CPU, reproducibly by seed.

    python scripts/train_toy.py --out vtprune/toy/weights/toy-llava            # full run (about 1-2 h)
    python scripts/train_toy.py --smoke --out /tmp/toy-smoke                     # a few steps (CI)

The real LLaVA recipe, scaled down:

1. Vision tower (CLIP ViT, 224 px, patch 14: 256 patch tokens + CLS). Dense supervision so that it
   learns colour *and* shape quickly (captions that differ by colour alone never teach shape): per
   patch, the colour and the shape of the object under it (or background); on the CLS output, the
   multi-label presence of every (colour, shape) pair and the object count, so that CLS attention
   learns to land on the objects.
2. Projector + language model (Llama), tower frozen and its features cached: each training sequence is
   one image followed by several turns (a caption listing every object, then one-word questions);
   the loss is on the answers only.

The result is saved with ``save_pretrained`` (model + processor) plus ``train_log.json`` (settings,
per-stage losses, test accuracy). Progress bars show each stage.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from vtprune.toy import shapes
from vtprune.toy.tiny import llava_tokenizer

IMAGE = 224
PATCH = 14
GRID = IMAGE // PATCH  # 16 x 16 = 256 patch tokens
PROMPT = "USER: <image>\n"
SUFFIX = " Answer with one word. ASSISTANT:"


# ---- model, tokenizer, processor -----------------------------------------------------------------
def build_tokenizer():
    rng = np.random.default_rng(0)
    corpus = []
    for i in range(400):
        _, objs = shapes.make_scene("train", i)
        corpus.append(shapes.describe(objs))
        for _ in range(3):
            q, a, _ = shapes.ask(objs, rng)
            corpus.append(f"USER: {q}{SUFFIX} {a}")
    corpus += ["USER: Describe the image. ASSISTANT:", " ".join(shapes.ANSWERS)]
    return llava_tokenizer(corpus, 512)


def build_model(tok, hidden: int, layers: int, vision_hidden: int, vision_layers: int):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    vision = CLIPVisionConfig(image_size=IMAGE, patch_size=PATCH, hidden_size=vision_hidden,
                              intermediate_size=4 * vision_hidden, num_hidden_layers=vision_layers,
                              num_attention_heads=4, projection_dim=vision_hidden)
    text = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=4 * hidden,
                       num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=4,
                       max_position_embeddings=1024, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                       eos_token_id=tok.eos_token_id)
    cfg = LlavaConfig(vision_config=vision, text_config=text, image_token_id=tok.convert_tokens_to_ids("<image>"),
                      vision_feature_layer=-1, vision_feature_select_strategy="default",
                      image_seq_length=GRID * GRID, projector_hidden_act="gelu")
    return LlavaForConditionalGeneration._from_config(cfg, attn_implementation="sdpa")


def build_processor(tok):
    from transformers import CLIPImageProcessorPil, LlavaProcessor

    ip = CLIPImageProcessorPil(size={"shortest_edge": IMAGE}, crop_size={"height": IMAGE, "width": IMAGE})
    return LlavaProcessor(image_processor=ip, tokenizer=tok, patch_size=PATCH,
                          vision_feature_select_strategy="default", num_additional_image_tokens=1)


def pixels(processor, images) -> torch.Tensor:
    return processor.image_processor(images=images, return_tensors="pt")["pixel_values"]


def optimise(loss, opt, sched, params, losses: list[float], bar) -> None:
    """One step: backward, clip to norm 1, optimiser and schedule; logs the running mean of 20 losses."""
    opt.zero_grad()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    sched.step()
    losses.append(float(loss.detach()))
    bar.set_postfix(loss=f"{np.mean(losses[-20:]):.3f}")


# ---- stage 1: the vision tower -------------------------------------------------------------------
COLOUR_IDS = {c: i + 1 for i, c in enumerate(shapes.COLOURS)}
SHAPE_IDS = {s: i + 1 for i, s in enumerate(shapes.SHAPES)}
PAIRS = [(c, s) for c in shapes.COLOURS for s in shapes.SHAPES]


def patch_labels(objects) -> tuple[np.ndarray, np.ndarray]:
    """``[GRID*GRID]`` colour and shape ids per patch (0 = background); a patch belongs to an object cell."""
    col = np.zeros((GRID, GRID), dtype=np.int64)
    shp = np.zeros((GRID, GRID), dtype=np.int64)
    per_cell = shapes.CELL // PATCH
    for o in objects:
        for r, c in o.cells:
            sl = (slice(r * per_cell, (r + 1) * per_cell), slice(c * per_cell, (c + 1) * per_cell))
            col[sl] = COLOUR_IDS[o.colour]
            shp[sl] = SHAPE_IDS[o.shape]
    return col.reshape(-1), shp.reshape(-1)


def tower_batch(processor, start: int, n: int):
    imgs, cols, shps, pres, counts = [], [], [], [], []
    for i in range(start, start + n):
        img, objs = shapes.make_scene("train", i)
        imgs.append(img)
        c, s = patch_labels(objs)
        cols.append(c)
        shps.append(s)
        p = np.zeros(len(PAIRS), dtype=np.float32)
        for o in objs:
            p[PAIRS.index((o.colour, o.shape))] = 1
        pres.append(p)
        counts.append(len(objs) - 1)
    return (pixels(processor, imgs), torch.tensor(np.stack(cols)), torch.tensor(np.stack(shps)),
            torch.tensor(np.stack(pres)), torch.tensor(counts))


def train_tower(model, processor, steps: int, batch: int, lr: float, log: dict) -> None:
    tower = model.model.vision_tower
    width = tower.config.hidden_size
    heads = nn.ModuleDict(dict(colour=nn.Linear(width, len(COLOUR_IDS) + 1), shape=nn.Linear(width, len(SHAPE_IDS) + 1),
                               presence=nn.Linear(width, len(PAIRS)), count=nn.Linear(width, 4)))
    params = list(tower.parameters()) + list(heads.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=max(steps, 100), pct_start=0.1)
    ce, bce = nn.CrossEntropyLoss(), nn.BCEWithLogitsLoss()
    tower.train()
    losses = []
    bar = tqdm(range(steps), desc="stage 1: vision tower", file=sys.stderr)
    for step in bar:
        px, col, shp, pres, cnt = tower_batch(processor, step * batch, batch)
        out = tower(pixel_values=px)
        patches = out.last_hidden_state[:, 1:]  # the features LLaVA reads (vision_feature_layer=-1)
        cls = out.pooler_output
        loss = (ce(heads["colour"](patches).flatten(0, 1), col.flatten())
                + ce(heads["shape"](patches).flatten(0, 1), shp.flatten())
                + bce(heads["presence"](cls), pres) + ce(heads["count"](cls), cnt))
        optimise(loss, opt, sched, params, losses, bar)
    tower.eval()
    log["tower"] = dict(steps=steps, batch=batch, lr=lr, final_loss=float(np.mean(losses[-20:])))


# ---- stage 2: projector + language model -----------------------------------------------------------
@torch.no_grad()
def cache_features(model, processor, n: int, chunk: int = 64) -> torch.Tensor:
    """``[n, 256, C]`` float16 tower features of the first ``n`` training scenes."""
    tower = model.model.vision_tower
    out = []
    for start in tqdm(range(0, n, chunk), desc="caching tower features", file=sys.stderr):
        imgs = [shapes.make_scene("train", i)[0] for i in range(start, min(n, start + chunk))]
        out.append(tower(pixel_values=pixels(processor, imgs)).last_hidden_state[:, 1:].half())
    return torch.cat(out)


def sequence(tok, objects, rng: np.random.Generator, turns: int, image_id: int) -> tuple[list[int], list[int]]:
    """Token ids and labels (-100 off the answers) of one image followed by ``turns`` turns."""
    ids = [tok.bos_token_id] + tok.encode("USER: ", add_special_tokens=False) + [image_id] * (GRID * GRID)
    labels = [-100] * len(ids)
    first = True
    for t in range(turns):
        if t == 0 and rng.random() < 0.3:
            q, a = "Describe the image.", shapes.describe(objects)
            prompt = ("\n" if first else "USER: ") + q + " ASSISTANT:"
        else:
            q, a, _ = shapes.ask(objects, rng)
            prompt = ("\n" if first else "USER: ") + q + SUFFIX
        first = False
        p = tok.encode(prompt, add_special_tokens=False)
        ans = tok.encode(" " + a, add_special_tokens=False) + [tok.eos_token_id]
        ids += p + ans
        labels += [-100] * len(p) + ans
    return ids, labels


def lm_loss(model, feats: torch.Tensor, ids: torch.Tensor, labels: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
    core = model.model
    embeds = core.get_input_embeddings()(ids)
    vis = core.multi_modal_projector(feats.float())  # [B, 256, H]
    mask = ids == model.config.image_token_id
    embeds = embeds.masked_scatter(mask[..., None].expand_as(embeds), vis.reshape(-1, vis.shape[-1]))
    h = core.language_model(inputs_embeds=embeds, attention_mask=attn).last_hidden_state
    logits = model.lm_head(h[:, :-1])
    return nn.functional.cross_entropy(logits.flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)


@torch.no_grad()
def quick_accuracy(model, processor, n: int, seed: int = 0) -> float:
    """Greedy one-word accuracy on the first ``n`` test samples (the model's own generate())."""
    tok = processor.tokenizer
    tok.padding_side = "left"
    correct = 0
    samples = shapes.dataset("test", n, seed)
    for start in range(0, n, 16):
        chunk = samples[start:start + 16]
        inputs = processor(images=[s.image for s in chunk], text=[PROMPT + s.question + SUFFIX for s in chunk],
                           return_tensors="pt", padding=True)
        out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
        texts = tok.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
        correct += sum(t.strip().split(" ")[0].strip(".").lower() == s.answer for t, s in zip(texts, chunk))
    return correct / n


def train_llm(model, processor, feats: torch.Tensor, steps: int, batch: int, lr: float, turns: int,
              eval_every: int, log: dict) -> None:
    tok = processor.tokenizer
    image_id = model.config.image_token_id
    params = list(model.model.multi_modal_projector.parameters()) + list(model.model.language_model.parameters())
    params += [p for p in model.lm_head.parameters() if all(p is not q for q in params)]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=max(steps, 100), pct_start=0.05)
    rng = np.random.default_rng(1)
    scenes = {}
    losses, evals = [], []
    bar = tqdm(range(steps), desc="stage 2: projector + LLM", file=sys.stderr)
    for step in bar:
        model.model.language_model.train()
        idx = rng.integers(0, feats.shape[0], batch)
        seqs = []
        for i in idx:
            if int(i) not in scenes:
                scenes[int(i)] = shapes.make_scene("train", int(i))[1]
            seqs.append(sequence(tok, scenes[int(i)], rng, turns, image_id))
        width = max(len(s[0]) for s in seqs)
        ids = torch.full((batch, width), tok.pad_token_id)
        labels = torch.full((batch, width), -100)
        attn = torch.zeros(batch, width, dtype=torch.long)
        for b, (s, lab) in enumerate(seqs):  # right padding
            ids[b, :len(s)] = torch.tensor(s)
            labels[b, :len(s)] = torch.tensor(lab)
            attn[b, :len(s)] = 1
        loss = lm_loss(model, feats[torch.as_tensor(idx)], ids, labels, attn)
        optimise(loss, opt, sched, params, losses, bar)
        if eval_every and (step + 1) % eval_every == 0:
            model.eval()
            acc = quick_accuracy(model, processor, 96)
            evals.append((step + 1, acc))
            tqdm.write(f"step {step + 1}: loss {np.mean(losses[-50:]):.3f}, test accuracy (96) {acc:.3f}", file=sys.stderr)
    model.eval()
    log["llm"] = dict(steps=steps, batch=batch, lr=lr, turns=turns, final_loss=float(np.mean(losses[-20:])),
                      evals=evals)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="output directory (save_pretrained)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--smoke", action="store_true", help="a few steps of each stage (for CI)")
    ap.add_argument("--tower-steps", type=int, default=1500)
    ap.add_argument("--tower-batch", type=int, default=32)
    ap.add_argument("--llm-steps", type=int, default=6000)
    ap.add_argument("--llm-batch", type=int, default=32)
    ap.add_argument("--images", type=int, default=12000, help="training scenes cached for stage 2")
    ap.add_argument("--turns", type=int, default=8, help="question turns per training sequence")
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--vision-hidden", type=int, default=128)
    ap.add_argument("--vision-layers", type=int, default=4)
    ap.add_argument("--eval-every", type=int, default=500)
    ap.add_argument("--eval-samples", type=int, default=300)
    args = ap.parse_args(argv)
    if args.smoke:
        args.tower_steps, args.llm_steps, args.images, args.tower_batch, args.llm_batch = 3, 3, 16, 4, 4
        args.eval_every, args.eval_samples, args.turns = 0, 8, 2
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    t0 = time.time()
    tok = build_tokenizer()
    processor = build_processor(tok)
    model = build_model(tok, args.hidden, args.layers, args.vision_hidden, args.vision_layers)
    log = dict(args=vars(args), parameters=sum(p.numel() for p in model.parameters()))
    train_tower(model, processor, args.tower_steps, args.tower_batch, 1e-3, log)
    for p in model.model.vision_tower.parameters():
        p.requires_grad_(False)
    feats = cache_features(model, processor, args.images)
    train_llm(model, processor, feats, args.llm_steps, args.llm_batch, args.lr, args.turns, args.eval_every, log)
    log["test_accuracy"] = quick_accuracy(model, processor, args.eval_samples)
    log["minutes"] = (time.time() - t0) / 60
    os.makedirs(args.out, exist_ok=True)
    for p in model.parameters():
        p.requires_grad_(True)
    model.save_pretrained(args.out)
    processor.save_pretrained(args.out)
    with open(os.path.join(args.out, "train_log.json"), "w") as f:
        json.dump(log, f, indent=1)
    print(json.dumps({k: log[k] for k in ("parameters", "test_accuracy", "minutes")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
