"""Evaluate a trained BLIP3-o run on held-out compositions of the shapes world.

Every command rebuilds the models from the checkpoints in --run (default out/toy), prints tables, and
ends stdout with its metrics as ONE JSON line; a user error is one `error: ...` line, exit status 2.
Every number is deterministic: fixed seeds, greedy decoding, seeded diffusion noise.

    python eval.py clip          # zero-shot color+shape of held-out single objects and compositions
    python eval.py understand    # exact-match answers per question type, and captions
    python eval.py recon         # image -> CLIP tokens -> pixels, scored by the GenEval rules
    python eval.py toygeneval    # the toy GenEval prompt set -> RUN/geneval-flow-clip/, scored
    python eval.py geneval DIR   # score any folder in GenEval's layout (e.g. from sample.py --geneval)
    python eval.py views         # inside the sampler on held-out prompts -> RUN/trajectory.png and .gif,
                                 # words.png (what each word steers), sweep.png and sweep_plot.png
    python eval.py report        # all of the above -> RUN/REPORT.md, metrics.json, pictures (cached)

"Held-out" means split "test" of the shapes world: images never drawn in training, and for two-object
scenes colour compositions ("a red circle and a blue square") and spatial relations that no training
image shows (data.HELDOUT_COMBOS, data.HELDOUT_RELATIONS). `zero_shot_seen` scores training images.
"""
from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

import blip3o
import data
import pipeline
import sample
from cli import (OneLineParser, UserError, add_run_options, add_sampling_options, check_numbers, comma_list,
                 metrics_main, rounded)

EVAL_VERSION = 5  # part of the report cache's fingerprint: bump it when an evaluation changes

# Seeds of the evaluation sets (disjoint from training, which draws split "train" with seed 0).
SEED_CLIP, SEED_SEEN, _, SEED_QA, SEED_CAPTIONS, SEED_RECON, SEED_POSITION = range(1, 8)

# Sizes of full_report's evaluations (geneval_per_tag None: every held-out prompt, 144, x per_prompt).
REPORT = dict(clip_images=300, questions=1000, captions=200, recon_images=96, geneval_per_tag=None,
              per_prompt=4, per_position=32, per_seen=16, views_per_tag=2, views_samples=2,
              steps=blip3o.SAMPLE_STEPS, guidance=blip3o.GUIDANCE)

# Targets for the default toy run (REPORT.md marks each number against its target).
TARGETS = {"clip zero-shot (held-out)": 0.95, "understanding exact match": 0.88,
           "reconstruction (GenEval rules)": 0.90, "toy GenEval overall": 0.50}
SCENE_SIZES = ("1 object", "2 objects", "3-4 objects")  # how eval_understand splits its answers


def format_table(header, rows) -> str:
    """Rows of cells -> aligned text; floats printed with 3 decimals."""
    cells = [[f"{c:.3f}" if isinstance(c, float) else str(c) for c in row] for row in [header, *rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def fmt(x) -> str:
    """A metric in a table: 3 decimals, or "-" when it could not be measured."""
    return "-" if x is None else f"{x:.3f}"


# --- 1. CLIP: zero-shot classification -----------------------------------------------------------

@torch.no_grad()
def image_embeddings(pipe, images: torch.Tensor, batch: int = 500) -> torch.Tensor:
    """Images (N, 3, H, W), uint8 or float in [0, 1] (decoded) -> unit-norm CLIP image embeddings (N, E)."""
    images = data.as_float(images) if images.dtype == torch.uint8 else images
    return torch.cat([pipe.clip.encode_image(images[i:i + batch].to(pipe.device)).cpu()
                      for i in range(0, len(images), batch)])


@torch.no_grad()
def text_embeddings(pipe, texts, batch: int = 500) -> torch.Tensor:
    """Texts -> unit-norm CLIP text embeddings (N, E)."""
    ids, _ = blip3o.encode_texts(pipe.tokenizer, texts, pipe.config.clip.context_length)
    return torch.cat([pipe.clip.encode_text(ids[i:i + batch].to(pipe.device)).cpu()
                      for i in range(0, len(ids), batch)])


def tag_records(tag: str) -> list[dict]:
    """Every GenEval record of a tag in either split (the candidates a prompt competes with)."""
    records = {}
    for r in data.geneval_prompts("train", n_per_tag=None) + data.geneval_prompts("test", n_per_tag=None):
        if r["tag"] == tag:
            records.setdefault(r["prompt"], r)
    return list(records.values())


def meaning(record: dict) -> tuple:
    """What a GenEval record asks for, independent of word order: "a circle and a square" means the
    same as "a square and a circle", "A left of B" the same as "B right of A"."""
    inc = record["include"]
    objects = frozenset((r["class"], r["count"], r.get("color")) for r in inc)
    relation = None
    for r in inc:
        if "position" in r:
            rel, target = r["position"]
            a, b = r["class"], inc[target]["class"]
            if rel in ("right of", "below"):
                a, b, rel = b, a, {"right of": "left of", "below": "above"}[rel]
            relation = (a, rel, b)
    return record["tag"], objects, relation


def zero_shot(pipe, split: str, n: int, seed: int, tag: str = "colors") -> dict:
    """Images of `tag` classified among its prompts (colors: 30, single_object: 3, color_attr: 600):
    accuracy of the first object's color and shape, both and each alone, and of the whole meaning."""
    images, scenes = data.make_image_set(n, split=split, seed=seed, tags=(tag,))
    records, img = tag_records(tag), image_embeddings(pipe, images)
    pred = (img @ text_embeddings(pipe, [r["prompt"] for r in records]).t()).argmax(1)
    shape_ok = color_ok = both_ok = meaning_ok = 0
    for scene, p in zip(scenes, pred.tolist()):
        want, got = scene.objects[0], records[p]["include"][0]
        s, c = got["class"] == want.shape, got.get("color", want.color) == want.color
        shape_ok, color_ok, both_ok = shape_ok + s, color_ok + c, both_ok + (s and c)
        meaning_ok += meaning(records[p]) == meaning(scene.metadata)
    return {"both": both_ok / n, "color": color_ok / n, "shape": shape_ok / n, "meaning": meaning_ok / n}


def eval_clip(pipe, n: int = 500) -> dict:
    """Zero-shot top-1 on held-out single objects and compositions, and on training images (CLIP_ROWS)."""
    held = zero_shot(pipe, "test", n, SEED_CLIP)
    return {"zero_shot": held["both"], "zero_shot_color": held["color"], "zero_shot_shape": held["shape"],
            "zero_shot_seen": zero_shot(pipe, "train", n, SEED_SEEN)["both"],
            "single_object_shape": zero_shot(pipe, "test", n, SEED_CLIP, tag="single_object")["shape"],
            "zero_shot_compositions": zero_shot(pipe, "test", n, SEED_CLIP, tag="color_attr")["meaning"],
            "images": n}


CLIP_ROWS = {"zero_shot": "zero-shot single object, 30 prompts: color and shape",  # eval_clip's metrics
             "zero_shot_color": "zero-shot single object: color",
             "zero_shot_shape": "zero-shot single object: shape",
             "zero_shot_seen": "zero-shot single object, *seen* (training) images",
             "single_object_shape": "single_object shape (3 prompts)",
             "zero_shot_compositions": "held-out colour compositions, 600 two-object prompts"}


# --- 2. Understanding: exact-match answers --------------------------------------------------------

def question_set(n: int, seed: int) -> tuple[torch.Tensor, list, list]:
    """~n held-out questions, at most one of each type per scene (rarer types are not crowded out) ->
    (uint8 images (M, 3, H, W), rows [(image index, qtype, question, answer)], objects per image)."""
    images, rows, n_objects, i = [], [], [], 0
    while len(rows) < n:
        scene = data.make_scene(i, split="test", seed=seed)
        picked = {}
        for qtype, q, a in data.make_qa(scene, random.Random(data.stable_seed("eval-qa", seed, i))):
            picked.setdefault(qtype, (qtype, q, a))
        rows += [(len(images), *qa) for qa in picked.values()]
        images.append(data.draw(scene))
        n_objects.append(len(scene.objects))
        i += 1
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2), rows[:n], n_objects  # (M, 3, H, W)


def position_set(n: int, seed: int) -> tuple[torch.Tensor, list]:
    """n position questions on seen arrangements and n on never-pictured ones (data.HELDOUT_RELATIONS),
    from held-out scenes -> (uint8 images, rows [(image index, arrangement, question, answer, held out)]);
    the arrangement is the question's form, "circle above triangle"."""
    images, rows, count, i = [], [], {True: 0, False: 0}, 0
    while min(count.values()) < n:
        scene = data.make_scene(i, split="test", seed=seed)
        for qtype, q, a in data.make_qa(scene, random.Random(data.stable_seed("eval-qa", seed, i))):
            if qtype != "position":
                continue
            words = q.split()  # "where is the A relative to the B ?"
            form = (words[3], {"left": "left of", "right": "right of"}.get(a, a), words[-2])
            held = form in data.HELDOUT_RELATIONS
            if count[held] < n:
                rows.append((len(images), " ".join(form), q, a, held))
                count[held] += 1
        images.append(data.draw(scene))
        i += 1
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2), rows  # (M, 3, H, W)


def answer_all(pipe, images: torch.Tensor, questions, answers, batch: int = 250) -> list[str]:
    """Greedy answers, batched. Decoding stops one token past the longest right answer: exact match
    needs nothing more, and an untrained model would otherwise ramble to the token limit."""
    longest = max(len(pipe.tokenizer(a, add_special_tokens=False)["input_ids"]) for a in answers)
    return [answer for i in range(0, len(questions), batch)
            for answer in pipe.answer(data.as_float(images[i:i + batch]), questions[i:i + batch],
                                      temperature=0.0, max_new_tokens=longest + 1)]


def eval_position(pipe, n: int) -> dict:
    """Position answers on arrangements training pictured and on never-pictured ones (n each), and per
    never-pictured arrangement: how the LM reads relations it never saw drawn."""
    images, rows = position_set(n, SEED_POSITION)
    preds = answer_all(pipe, images[[r[0] for r in rows]], [r[2] for r in rows], [r[3] for r in rows])
    hits = {}
    for p, (_, form, _, a, held) in zip(preds, rows):
        for key in ("heldout" if held else "seen", form if held else None):
            hits.setdefault(key, []).append(p.strip() == a)
    hits.pop(None)
    return {k: {"accuracy": sum(h) / len(h), "questions": len(h)} for k, h in sorted(hits.items())}


def eval_understand(pipe, n: int = 1000, n_captions: int = 200, show: int = 6, n_position: int = 200) -> dict:
    """Exact-match accuracy per question type and overall (mean over all questions), position on seen and
    never-pictured arrangements apart (eval_position), and captions."""
    images, rows, n_objects = question_set(n, SEED_QA)
    preds = answer_all(pipe, images[[r[0] for r in rows]], [r[2] for r in rows], [r[3] for r in rows])
    hits = [p.strip() == r[3] for p, r in zip(preds, rows)]
    def score(h):
        return {"accuracy": sum(h) / len(h) if h else None, "questions": len(h)}

    per_type = {q: score([ok for ok, r in zip(hits, rows) if r[1] == q]) for q in data.QTYPES}
    groups = {}  # the same hits, split by objects in the image too
    for ok, r in zip(hits, rows):
        groups.setdefault(r[1], {}).setdefault(SCENE_SIZES[min(n_objects[r[0]], 3) - 1], []).append(ok)
    by_size = {q: {z: score(groups[q][z]) for z in SCENE_SIZES if z in groups[q]}
               for q in data.QTYPES if q in groups}
    cap_images, scenes = data.make_image_set(n_captions, split="test", seed=SEED_CAPTIONS)
    truth = [s.caption for s in scenes]
    cap_preds = answer_all(pipe, cap_images, [data.caption_question] * n_captions, truth)
    cap_hits = [p.strip() == t for p, t in zip(cap_preds, truth)]
    examples = [{"question": r[2], "answer": r[3], "predicted": p} for r, p in zip(rows[:show], preds)]
    examples += [{"question": data.caption_question, "answer": t, "predicted": p}
                 for t, p in zip(truth[:2], cap_preds)]
    return {"overall": sum(hits) / len(hits), "per_type": per_type, "by_scene_size": by_size,
            "questions": len(rows), "position": eval_position(pipe, n_position),
            "caption_exact": sum(cap_hits) / n_captions, "captions": n_captions, "examples": examples}


# --- 3. Generated samples: what their tokens say, GenEval's rules, CLIP space (the design study) -----

@torch.no_grad()
def what_tokens_say(pipe, tokens: torch.Tensor) -> torch.Tensor:
    """Generated scene tokens (N, 64, S) -> uint8 (N, H, W, 3): the objects the CLIP's scene head reads in
    them, drawn exactly. Scored beside the decoded pictures: the generator's errors, not the decoder's."""
    size = pipe.config.clip.image_size
    colour, shape, box = (x.cpu() for x in pipe.clip.read_scene(tokens.to(pipe.device)))
    return torch.stack([torch.from_numpy(data.draw_objects(data.objects_from_slots(c, s, b, size), size))
                        for c, s, b in zip(colour, shape, box)])


def second_opinion(record: dict, img: np.ndarray) -> bool:
    """An independent scorer, sharing no code with data.detect_objects / data.score_record, to check them:
    each pixel takes the nearest palette colour if it is nearer to it than to the background, 8-connected
    regions of one colour are flood-filled, a region's shape is the drawn shape its mask overlaps best,
    and GenEval's rules are written again from their description (DESIGN: includes ANDed, excludes ORed,
    A left of B when the centre offset shrunk by 0.1 x the summed sizes points mostly left)."""
    rgb = np.array([data.COLOR_RGB[c] for c in data.COLORS] + [data.BACKGROUND], dtype=np.float32)
    label = np.linalg.norm(img[:, :, None].astype(np.float32) - rgb, axis=-1).argmin(-1)  # (H, W)
    seen, objects = label == len(data.COLORS), []
    for y0, x0 in zip(*np.nonzero(~seen)):
        if seen[y0, x0]:
            continue
        seen[y0, x0], stack, pixels = True, [(y0, x0)], []
        while stack:
            y, x = stack.pop()
            pixels.append((y, x))
            for v, u in ((y + dy, x + dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1)):
                if 0 <= v < img.shape[0] and 0 <= u < img.shape[1] and not seen[v, u] \
                        and label[v, u] == label[y0, x0]:
                    seen[v, u] = True
                    stack.append((v, u))
        if len(pixels) < 6:
            continue
        ys, xs = np.array(pixels).T
        side = max(np.ptp(ys), np.ptp(xs)) + 1
        mask = np.zeros((side, side), dtype=bool)
        mask[ys - ys.min(), xs - xs.min()] = True
        iou = {s: (mask & data.shape_mask(s, side)).sum() / (mask | data.shape_mask(s, side)).sum()
               for s in data.SHAPES}
        objects.append({"class": max(iou, key=iou.get), "color": data.COLORS[label[y0, x0]],
                        "n": len(pixels), "centre": np.array([xs.mean(), ys.mean()]),
                        "size": np.array([np.ptp(xs), np.ptp(ys)]) + 1})
    objects.sort(key=lambda o: -o["n"])
    groups = []
    for req in record["include"]:
        top = [o for o in objects if o["class"] == req["class"]][:req["count"]]
        ok = len(top) == req["count"] and all(o["color"] == req.get("color", o["color"]) for o in top)
        if ok and "position" in req:
            rel, target = req["position"]
            axis, sign = {"left of": (0, -1), "right of": (0, 1), "above": (1, -1), "below": (1, 1)}[rel]
            for a, b in ((a, b) for a in top for b in (groups[target] or [])):
                offset = a["centre"] - b["centre"]
                shrunk = np.maximum(np.abs(offset) - 0.1 * (a["size"] + b["size"]), 0) * np.sign(offset)
                ok &= sign * shrunk[axis] / max(np.linalg.norm(offset), 1e-9) > 0.5
            ok &= groups[target] is not None
        groups.append(top if ok else None)
    excluded = any(sum(o["class"] == r["class"] for o in objects) >= r["count"]
                   for r in record.get("exclude", []))
    return all(g is not None for g in groups) and not excluded


def project_scorer(record: dict, img: np.ndarray) -> bool:
    return data.score_record(record, data.detect_objects(img))[0]


def image_hits(records, images_u8: torch.Tensor, scorer=project_scorer) -> list[list[bool]]:
    """uint8 images (P, S, H, W, 3), S per record -> P lists of S: right or wrong by GenEval's rules."""
    return [[scorer(r, img.numpy()) for img in row] for r, row in zip(records, images_u8)]


def score_images(records, hits) -> dict:
    """image_hits of the records' samples -> accuracy per tag and overall (the mean of the tags)."""
    per = {}
    for record, row in zip(records, hits):
        per.setdefault(record["tag"], []).extend(row)
    per_tag = {tag: sum(h) / len(h) for tag, h in per.items()}
    return {"per_tag": per_tag, "overall": sum(per_tag.values()) / len(per_tag)}


def clipgen_scores(pipe, records, images: torch.Tensor) -> dict:
    """Top-1 retrieval of each record's prompt among its tag's prompts by its samples, images (P, S, 3, H, W)
    (a prompt that means the same counts) -> accuracy per tag, single_object+colors pooled, overall."""
    P, S = images.shape[:2]
    emb = image_embeddings(pipe, images.flatten(0, 1)).unflatten(0, (P, S))  # (P, S, E)
    hits = {}
    for tag in dict.fromkeys(r["tag"] for r in records):
        cands = tag_records(tag)
        text = text_embeddings(pipe, [c["prompt"] for c in cands])
        for p, record in enumerate(records):
            if record["tag"] == tag:
                best = (emb[p] @ text.t()).argmax(1).tolist()  # (S,)
                hits.setdefault(tag, []).extend(meaning(cands[b]) == meaning(record) for b in best)
    per_tag = {tag: sum(h) / len(h) for tag, h in hits.items()}
    pooled = hits.get("single_object", []) + hits.get("colors", [])
    return {"per_tag": per_tag, "single_object+colors": sum(pooled) / len(pooled) if pooled else None,
            "overall": sum(per_tag.values()) / len(per_tag), "prompts": P, "samples_per_prompt": S}


# --- 4. GenEval: scoring folders, reconstructions, the toy prompt set -----------------------------

def eval_geneval(outdir) -> dict:
    """Score a GenEval folder with the shapes-world detector; writes outdir/results.jsonl."""
    outdir = Path(outdir)
    if not outdir.is_dir():
        raise UserError(f"no folder {outdir}")
    if not any(p.is_dir() and p.name.isdigit() for p in outdir.iterdir()):
        raise UserError(f"{outdir} is not in GenEval's layout (no 00000/ ... folders)")
    try:
        results, summary = data.score_folder(str(outdir))
    except (OSError, json.JSONDecodeError, KeyError) as e:
        raise UserError(f"cannot score {outdir}: {e}") from None
    (outdir / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in results), encoding="utf-8")
    order = {tag: i for i, tag in enumerate(data.TAGS)}  # GenEval's tag order, any unknown tag last
    per_tag = dict(sorted(summary["per_tag"].items(), key=lambda kv: (order.get(kv[0], len(order)), kv[0])))
    counts = {tag: sum(r["tag"] == tag for r in results) for tag in per_tag}
    return {**summary, "per_tag": per_tag, "images_per_tag": counts}


@torch.no_grad()
def reconstruct_set(pipe, n: int, batch: int = 100):
    """-> (uint8 originals (n, 3, H, W), float reconstructions (n, 3, H, W), scenes, uint8 (n, H, W, 3)
    drawings of what the real target tokens say, or None) of held-out scenes."""
    images, scenes = data.make_image_set(n, split="test", seed=SEED_RECON)
    recon = torch.cat([pipe.reconstruct(data.as_float(images[i:i + batch])).cpu()
                       for i in range(0, n, batch)])
    said = None
    if pipe.target == "clip" and pipe.clip.scene is not None:
        said = what_tokens_say(pipe, pipe.clip.target_tokens(data.as_float(images).to(pipe.device)))
    return images, recon, scenes, said


def recon_scores(images: torch.Tensor, recon: torch.Tensor, scenes, said=None) -> dict:
    """Each reconstruction scored by the GenEval rules against its scene's own record, per tag; the
    originals scored the same way are the detector's ceiling. `said`: the same scored for the drawings of
    what the real tokens say, so a lost binding is placed in the tokens or in the decoder."""
    out = {}
    for name, pictures in (("recon", data.to_uint8(recon)), ("tokens_say", said),
                           ("originals", images.permute(0, 2, 3, 1))):
        if pictures is None:
            continue
        per_tag = {}
        for img, scene in zip(pictures, scenes):
            per_tag.setdefault(scene.tag, []).append(data.score_record(scene.metadata,
                                                                       data.detect_objects(img.numpy()))[0])
        hits = [ok for h in per_tag.values() for ok in h]
        out[name] = sum(hits) / len(hits)
        key = "per_tag" if name == "recon" else f"{name}_per_tag"
        out[key] = {t: sum(h) / len(h) for t, h in per_tag.items()}
    return {**out, "images": len(scenes)}


def eval_toygeneval(pipe, run, variant: str, per_prompt: int, n_per_tag: int | None, steps: int,
                    guidance: float, seed: int = 0, quiet: bool = False, tags=None, per_position: int = 32,
                    per_seen: int = 16) -> tuple:
    """The toy GenEval prompt set (or its `tags`) -> RUN/geneval-<variant>/ (GenEval layout) -> (scores,
    records, images (P, S, 3, H, W), tokens (P, S, 64, D)): the images are also scored in CLIP space.

    The 6 held-out position prompts get `per_position` images each (at 4, one image moves the tag by 0.04),
    seen prompts `per_seen` (below), the others `per_prompt`."""
    sample.check_pixels(pipe, run)
    records = [r for r in data.geneval_prompts("test", n_per_tag) if tags is None or r["tag"] in tags]
    records.sort(key=lambda r: r["tag"] == "position")  # stable: the position prompts last
    split = sum(r["tag"] != "position" for r in records)
    parts = [(records[:split], per_prompt), (records[split:], max(per_prompt, per_position))]
    images, tokens = [], []
    for part, n in parts:
        if part:
            img, tok = sample.generate_grid(pipe, [r["prompt"] for r in part], n, seed, steps, guidance,
                                            quiet=quiet)
            images, tokens = images + list(img), tokens + list(tok)  # per record: (S, 3, H, W), (S, 64, D)
    outdir = Path(run) / f"geneval-{variant}"
    shutil.rmtree(outdir, ignore_errors=True)  # no stale prompt folders from a larger earlier set
    data.write_geneval_folder(str(outdir), records, [list(x) for x in images])
    scores = {**eval_geneval(outdir), "folder": str(outdir)}
    scores["second_opinion"] = score_images(
        records, image_hits(records, [data.to_uint8(x) for x in images], second_opinion))
    said = pipe.target == "clip" and pipe.clip.scene is not None  # drawn from what the tokens say
    if said:
        scores["tokens_say"] = score_images(records, image_hits(records, [what_tokens_say(pipe, t)
                                                                          for t in tokens]))
    # GenEval's own sense: prompts training pictured (all 18 arrangements, 15 of 510 colour pairs), anew.
    for tag, every in (("position", 1), ("color_attr", 34)):
        if not per_seen or (tags is not None and tag not in tags):
            continue
        seen = [r for r in data.geneval_prompts("train", None) if r["tag"] == tag][::every]
        img, tok = sample.generate_grid(pipe, [r["prompt"] for r in seen], per_seen, seed + per_position,
                                        steps, guidance, quiet=quiet)
        decoded = score_images(seen, image_hits(seen, data.to_uint8(img)))["overall"]
        scores[f"{tag}_seen"] = {"decoded": decoded, "prompts": len(seen), "images": len(seen) * per_seen}
        if said:
            scores[f"{tag}_seen"]["tokens_say"] = score_images(
                seen, image_hits(seen, [what_tokens_say(pipe, t) for t in tok]))["overall"]
    return (scores, records, torch.stack([x[:per_prompt] for x in images]),
            torch.stack([x[:per_prompt] for x in tokens]))


# --- 5. Inside the sampler: its trajectory, what each word steers, guidance and steps swept -------

SWEEP_GUIDANCE, SWEEP_STEPS = (1.0, 1.5, 2.0, 3.0, 5.0, 8.0), (5, 10, 20, 30, 50)  # the paper's among them
VIEW_TAGS = ("two_object", "position", "color_attr")  # views() shows the first held-out prompt of each


def sweep(pipe, records, samples: int) -> tuple[dict, list]:
    """The same prompts and seeds (0 .. samples - 1) at each guidance (REPORT's steps) and each number of
    steps (REPORT's guidance), scored as toygeneval scores -> ({"guidance": [[g, decoded, tokens say], ...],
    "steps": [[n, ...], ...]}, per guidance: uint8 images (P, S, H, W, 3) and image_hits)."""
    scores, done, prompts = {"guidance": [], "steps": []}, {}, [r["prompt"] for r in records]
    for axis, x, steps, guidance in ([("guidance", g, REPORT["steps"], g) for g in SWEEP_GUIDANCE]
                                     + [("steps", n, n, REPORT["guidance"]) for n in SWEEP_STEPS]):
        if (steps, guidance) not in done:  # the paper's setting lies on both axes: sampled once
            images, tokens = sample.generate_grid(pipe, prompts, samples, 0, steps, guidance)
            said = what_tokens_say(pipe, tokens.flatten(0, 1)).unflatten(0, tokens.shape[:2])
            images = data.to_uint8(images)  # (P, S, H, W, 3)
            done[steps, guidance] = images, image_hits(records, images), image_hits(records, said)
        scores[axis].append([x, *(score_images(records, h)["overall"] for h in done[steps, guidance][1:])])
    return scores, [done[REPORT["steps"], g][:2] for g in SWEEP_GUIDANCE]


def word_peaks(images: torch.Tensor, maps) -> dict:
    """How often a shape word's map (sample.word_maps) peaks on a patch whose centre lies in a box that the
    detector finds for that shape (shapes not drawn are left out); chance: the share of such patches."""
    hits, chance = [], []
    for image, (m, _, tokens) in zip(images, maps):
        found, cell = data.detect_objects(data.to_uint8(image).numpy()), image.shape[-1] // int(len(m) ** 0.5)
        for w, token in enumerate(tokens):
            inside = np.zeros(image.shape[-2:], bool)
            for x0, y0, x1, y1 in [o["box"] for o in found if token in (o["class"], data.plural(o["class"]))]:
                inside[y0:y1, x0:x1] = True
            inside = inside[cell // 2::cell, cell // 2::cell].flatten()  # (64,): each patch's centre pixel
            if inside.any():
                hits, chance = hits + [inside[m[:, w].argmax()]], chance + [inside.mean()]
    return {"peak_in_object": float(np.mean(hits)) if hits else None, "words": len(hits),
            "chance": float(np.mean(chance)) if hits else None}


def framed(image: np.ndarray, ok: bool) -> np.ndarray:
    """A uint8 (H, W, 3) picture in a 2-pixel frame: green when the toy scorer calls it right, red if not."""
    out = np.full((image.shape[0] + 4, image.shape[1] + 4, 3), (0, 170, 0) if ok else (220, 0, 0), np.uint8)
    out[2:-2, 2:-2] = image
    return out


def plot_sweep(scores: dict, out) -> None:
    """Toy GenEval against guidance and against Euler steps, side by side, the paper's setting marked."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(7, 2.6), sharey=True)
    for ax, axis, paper, label in zip(axes, ("guidance", "steps"), (blip3o.GUIDANCE, blip3o.SAMPLE_STEPS), (
            f"guidance ({REPORT['steps']} Euler steps)", f"Euler steps (guidance {REPORT['guidance']:g})")):
        x, decoded, said = zip(*scores[axis])
        ax.plot(x, decoded, "o-", label="decoded pictures")
        ax.plot(x, said, "s--", label="what their tokens say")
        ax.axvline(paper, color="0.5", ls=":", label="the paper's setting")
        ax.set(xscale="log", xticks=x, xticklabels=[f"{v:g}" for v in x], xlabel=label, ylabel="toy GenEval")
        ax.minorticks_off()
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def views(pipe, outdir, per_tag: int, samples: int) -> dict:
    """The sampler seen from inside on `per_tag` held-out prompts of each tag -> OUTDIR/trajectory.png and
    .gif, words.png, sweep.png (the guidance sweep, each picture framed right or wrong), sweep_plot.png;
    returns the word maps' peak rate (seed 0) and the sweeps (seeds 0 .. samples - 1, as the trajectory)."""
    outdir, records = Path(outdir), data.geneval_prompts("test", per_tag)
    prompts = [r["prompt"] for r in records]
    shown = [next(i for i, r in enumerate(records) if r["tag"] == tag) for tag in VIEW_TAGS]
    labels, seeds = [f"{prompts[i]}, seed {j}" for i in shown for j in range(samples)], range(samples)
    sample.trajectory(pipe, [prompts[i] for i in shown[1:]], samples, 0, REPORT["steps"], REPORT["guidance"],
                      outdir / "trajectory.png")
    images, maps = sample.word_maps(pipe, prompts, 0, REPORT["steps"], REPORT["guidance"])
    sample.save_word_maps(images[shown], [maps[i] for i in shown], [prompts[i] for i in shown],
                          pipe.tokenizer, outdir / "words.png")
    scores, swept = sweep(pipe, records, samples)
    rows = [[framed(im[i, j].numpy(), hits[i][j]) for im, hits in swept] for i in shown for j in seeds]
    sample.save_png(sample.image_grid(rows, labels), outdir / "sweep.png")
    plot_sweep(scores, outdir / "sweep_plot.png")
    return {"words": word_peaks(images, maps), "sweep": scores, "prompts": len(records), "samples": samples}


# --- 6. The report: every evaluation, pictures, loss curves, cached by checkpoint fingerprint -----

def checkpoints(run) -> dict:
    """{stage name: (checkpoint folder, its meta.json's "state")} of every stage trained in the run, in
    pipeline order: clip, understand, decoder, vae, generate/<variant> ..., then any other (e.g. joint)."""
    run = Path(run)
    order = ["clip", "understand", "decoder", "vae"]
    names = order + [f"generate/{p.name}" for p in sorted((run / "generate").glob("*"))]
    names += sorted(p.name for p in run.glob("*") if p.name not in order + ["generate"])
    found = {}
    for name in names:
        # Not the temporary / previous copies of an atomic save (dotted names), nor image folders.
        ckpt = pipeline.checkpoint_path(run / name) if "." not in name else None
        if ckpt is not None and ckpt.is_dir() and any((ckpt / f).exists()
                                                      for f in ("meta.json", "model.safetensors")):
            found[name] = ckpt, pipeline.read_meta(ckpt, name, run / name)["state"]
    return found


def fingerprint(run) -> dict:
    """Each checkpoint's step and meta.json mtime, the evaluation version and sizes: the metrics' inputs."""
    ckpts = {name: {"step": state["step"], "mtime_ns": (path / "meta.json").stat().st_mtime_ns}
             for name, (path, state) in checkpoints(run).items()}
    return {"eval_version": EVAL_VERSION, "sizes": REPORT, "checkpoints": ckpts}


def stage_summaries(run) -> dict:
    """Per trained stage: steps and the final loss (mean of the last 10% of logged steps)."""
    out = {}
    for name, (_, state) in checkpoints(run).items():
        tail = [h["loss"] for h in state["history"][-max(1, len(state["history"]) // 10):]]
        out[name] = {"steps": state["step"], "final_loss": sum(tail) / len(tail) if tail else None}
    return out


def plot_losses(run) -> list[str]:
    """RUN/loss_<stage>.png per trained stage: the logged loss (and the flow loss per t quarter)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    files = []
    for name, (_, state) in checkpoints(run).items():
        if not (hist := state["history"]):
            continue
        steps = [h["step"] for h in hist]
        fig, ax = plt.subplots(figsize=(6, 3.5))
        loss = np.array([h["loss"] for h in hist])
        ax.plot(steps, loss, color="0.75", lw=0.8, label="loss")
        k = max(1, len(loss) // 25)  # moving average over ~4% of the run
        ax.plot(steps[k - 1:], np.convolve(loss, np.ones(k) / k, mode="valid"), color="C0", lw=1.5,
                label=f"loss (mean of {k})")
        for q in range(4):  # flow stages log the loss per quarter of t (t=0 noise, t=1 data)
            pts = [(h["step"], h[f"loss_t{q}"]) for h in hist if f"loss_t{q}" in h]
            if len(pts) > k:
                s, v = zip(*pts)
                ax.plot(s[k - 1:], np.convolve(v, np.ones(k) / k, mode="valid"), lw=0.8,
                        label=f"t in [{q / 4:.2f}, {(q + 1) / 4:.2f})")
        if (loss > 0).all():
            ax.set_yscale("log")
        ax.set(xlabel="step", title=name)
        ax.legend(fontsize=7)
        fig.tight_layout()
        file = Path(run) / f"loss_{name.replace('/', '-')}.png"
        fig.savefig(file, dpi=100)
        plt.close(fig)
        files.append(file.name)
    return files


def evaluate_all(run, device) -> dict:
    """Every evaluation of full_report, each timed."""
    t, metrics = {}, {"variant": "flow-clip"}
    pipe = pipeline.load_run(run, device=device)
    start = time.time()
    metrics["clip"] = eval_clip(pipe, REPORT["clip_images"])
    t["clip"] = time.time() - start
    if pipe.vlm is not None:
        start = time.time()
        metrics["understand"] = eval_understand(pipe, REPORT["questions"], REPORT["captions"])
        t["understand"] = time.time() - start
    if pipe.decoder is not None:
        start = time.time()
        images, recon, scenes, said = reconstruct_set(pipe, REPORT["recon_images"])
        metrics["recon"] = recon_scores(images, recon, scenes, said)
        sample.save_png(sample.image_grid([list(data.as_float(images[:8])), list(recon[:8])],
                                          ["original", "reconstruction"]), Path(run) / "reconstructions.png")
        t["recon"] = time.time() - start
    if pipe.generator is not None and pipe.vlm is not None and pipe.decoder is not None:
        start = time.time()
        metrics["toygeneval"], records, images, _ = eval_toygeneval(
            pipe, run, "flow-clip", REPORT["per_prompt"], REPORT["geneval_per_tag"], REPORT["steps"],
            REPORT["guidance"], quiet=True, per_position=REPORT["per_position"], per_seen=REPORT["per_seen"])
        rows = dict(single_object=1, two_object=1, counting=1, colors=2, position=1, color_attr=2)
        picked = [i for tag, n in rows.items()  # samples.png: the first 1-2 held-out prompts of every tag
                  for i in [j for j, r in enumerate(records) if r["tag"] == tag][:n]]
        sample.save_png(sample.image_grid([list(images[i]) for i in picked],
                                          [records[i]["prompt"] for i in picked]), Path(run) / "samples.png")
        t["toygeneval"] = time.time() - start
        start = time.time()
        metrics["views"] = views(pipe, run, REPORT["views_per_tag"], REPORT["views_samples"])
        t["views"] = time.time() - start
    metrics["eval_seconds"] = t
    return metrics


def full_report(run, timings: dict | None = None, train_seconds: float | None = None, device="auto",
                force: bool = False) -> dict:
    """Evaluate a run -> RUN/REPORT.md, metrics.json, samples.png, reconstructions.png, loss_<stage>.png
    (`python train.py` ends with it). Cached: when RUN/metrics.json holds the same fingerprint, its metrics
    are reused. `timings` {stage: seconds} of stages trained now replace the recorded ones."""
    run, start = pipeline.check_run_folder(run), time.time()
    device = pipeline.pick_device(device) if isinstance(device, str) else device
    fp = fingerprint(run)
    try:
        old = json.loads((run / "metrics.json").read_text())
    except (OSError, json.JSONDecodeError):
        old = {}
    pictures = [run / name for name in ("samples.png", "reconstructions.png", "trajectory.png",
                                        "trajectory.gif", "words.png", "sweep.png", "sweep_plot.png")]
    cached = (not force and old.get("fingerprint") == fp
              and all(p.is_file() for p in pictures if p.name in old.get("pictures", [])))
    metrics = old["metrics"] if cached else rounded(evaluate_all(run, device))
    # 0 s: already trained and skipped (its recorded time stays); train.py's "generate" is flow-clip
    trained_now = {("generate/flow-clip" if stage == "generate" else stage): round(seconds, 1)
                   for stage, seconds in (timings or {}).items() if seconds}
    record = {"fingerprint": fp, "metrics": metrics, "stages": rounded(stage_summaries(run)),
              "train_seconds_per_stage": {**old.get("train_seconds_per_stage", {}), **trained_now},
              "last_train_run_seconds": (round(train_seconds, 1) if trained_now and train_seconds
                                         else old.get("last_train_run_seconds")),
              "pictures": [p.name for p in pictures if p.is_file()],
              "loss_plots": old.get("loss_plots", []) if cached else plot_losses(run),
              "cached": cached, "report_seconds": round(time.time() - start, 1)}
    (run / "metrics.json").write_text(json.dumps(record, indent=1) + "\n")
    (run / "REPORT.md").write_text(report_markdown(run, record))
    print(summary_table(record, run))
    return record


def headline(metrics: dict, below: str = "below") -> list[list]:
    """Rows (name, value, target, "ok" or `below`) of the numbers that have targets (TARGETS)."""
    out = {"clip zero-shot (held-out)": metrics.get("clip", {}).get("zero_shot"),
           "understanding exact match": metrics.get("understand", {}).get("overall"),
           "reconstruction (GenEval rules)": metrics.get("recon", {}).get("recon"),
           "toy GenEval overall": metrics.get("toygeneval", {}).get("overall")}
    return [[name, f"{v:.3f}", f">= {TARGETS[name]:.2f}", "ok" if v >= TARGETS[name] else below]
            for name, v in out.items() if v is not None]


def summary_table(record: dict, run) -> str:
    note = "cached: checkpoints unchanged since the last evaluation" if record["cached"] else "evaluated"
    text = (f"\nBLIP3-o toy report ({note}, {record['report_seconds']:.0f} s)\n"
            + format_table(["held-out metric", "value", "target", ""], headline(record["metrics"], "BELOW")))
    if g := record["metrics"].get("toygeneval"):
        text += "\ntoy GenEval per tag: " + ", ".join(f"{t} {a:.2f}" for t, a in g["per_tag"].items())
        if "tokens_say" in g:
            text += f"\nthe same samples drawn from what their tokens say: {g['tokens_say']['overall']:.3f}"
    return text + f"\nfull report: {Path(run) / 'REPORT.md'} (metrics.json, samples.png beside it)"


def md_table(header, rows) -> list[str]:
    """A Markdown table of text cells: the header, its rule, a line per row."""
    return ["| " + " | ".join(map(str, row)) + " |" for row in [header, ["---"] * len(header), *rows]]


def geneval_md(g: dict) -> list[str]:
    """Toy GenEval (eval_toygeneval's or a scored folder's metrics) as Markdown: per tag, decoded beside the
    second scorer and what the tokens say, and the position prompts of seen arrangements."""
    said, other = g.get("tokens_say", {"per_tag": {}}), g.get("second_opinion", {"per_tag": {}})
    rows = [[t, g["images_per_tag"][t], f"{a:.3f}", fmt(other["per_tag"].get(t)), fmt(said["per_tag"].get(t))]
            for t, a in g["per_tag"].items()]
    rows.append(["**overall**", g["images"], f"**{g['overall']:.3f}**", fmt(other.get("overall")),
                 fmt(said.get("overall"))])
    for tag, what in (("position", "arrangements"), ("color_attr", "colour pairs")):
        if seen := g.get(f"{tag}_seen"):
            rows.append([f"{tag}, *seen* {what} ({seen['prompts']} prompts)", seen["images"],
                         f"{seen['decoded']:.3f}", "", fmt(seen.get("tokens_say"))])
    return md_table(["tag", "images", "decoded", "second scorer", "tokens say"], rows)


def understand_md(u: dict) -> list[str]:
    """eval_understand's metrics as Markdown."""
    pos = u["position"]
    md = md_table(["question type", "questions", "accuracy"],
                  [[q, v["questions"], fmt(v["accuracy"])] for q, v in u["per_type"].items()]
                  + [["**overall**", u["questions"], f"**{u['overall']:.3f}**"],
                     ["whole caption", u["captions"], f"{u['caption_exact']:.3f}"]])
    md += ["", "Position answers on arrangements training pictured (*seen*) and on arrangements no training "
           "image shows (*never pictured*, each of its question forms apart):", ""]
    held = pos["heldout"]
    md += md_table(["arrangement", "questions", "accuracy"],
                   [["*seen*", pos["seen"]["questions"], fmt(pos["seen"]["accuracy"])],
                    ["**never pictured**", held["questions"], f"**{held['accuracy']:.3f}**"]]
                   + [[k, v["questions"], fmt(v["accuracy"])] for k, v in pos.items()
                      if k not in ("seen", "heldout")])
    md += ["", "By objects in the image (questions, accuracy). With two objects a colour or shape question "
           "picks one by the other attribute: 0.5 is answering about either at random.", ""]
    md += md_table(["question type", *SCENE_SIZES],
                   [[q, *(f"{v[z]['questions']}, {v[z]['accuracy']:.2f}" if z in v else "-"
                          for z in SCENE_SIZES)] for q, v in u["by_scene_size"].items()])
    return md + ["", "Examples:", ""] + [f"- `{e['question']}` -> `{e['predicted']}` (truth `{e['answer']}`)"
                                        for e in u["examples"]]


def recon_md(r: dict) -> list[str]:
    """recon_scores' metrics as Markdown: per tag, decoded beside what the real scene tokens say."""
    md = [f"{r['images']} held-out images, each scored by the GenEval rules against its own record: "
          f"**{r['recon']:.3f}** (the originals themselves: {r['originals']:.3f}). Per tag, decoded beside "
          "what the real scene tokens say, drawn exactly: a binding lost in the tokens shows in both, one "
          "lost by the decoder only in the first.", ""]
    said = r.get("tokens_say_per_tag", {})
    return md + md_table(["tag", "decoded", "tokens say"], [[t, fmt(a), fmt(said.get(t))]
                                                            for t, a in r["per_tag"].items()])


def report_markdown(run: Path, record: dict) -> str:
    """RUN/REPORT.md: every number of metrics.json as tables, the pictures, and the commands."""
    m, times = record["metrics"], record["train_seconds_per_stage"]
    md = [f"# BLIP3-o toy run: `{run}`", "",
          "All numbers are on held-out compositions of the shapes world (never drawn in training) unless "
          "marked *seen*. Regenerate with `python eval.py report --run " + str(run) + "` (cached while the "
          "checkpoints are unchanged).", "", "## Headline", ""]
    md += md_table(["metric", "value", "target", ""], headline(m))
    rows = []
    for name, s in record["stages"].items():
        secs, plot = times.get(name), f"loss_{name.replace('/', '-')}.png"
        rows.append([name, s["steps"], s["final_loss"] if s["final_loss"] is not None else "-",
                     f"{secs:.0f} s" if secs else "-",
                     f"![]({plot})" if plot in record["loss_plots"] else "-"])
    md += ["", "## Stages", "", *md_table(["stage", "steps", "final loss", "train time", "loss curve"], rows)]
    if times:
        md.append(f"\nTraining time, all stages above: {sum(times.values()) / 60:.1f} min.")
    if record.get("last_train_run_seconds"):
        md.append(f"The last `python train.py` that trained anything took "
                  f"{record['last_train_run_seconds'] / 60:.1f} min, evaluations excluded.")
    if g := m.get("toygeneval"):
        md += ["", "## Toy GenEval (text -> CLIP features -> pixels, scored from pixels)", "",
               f"{g['images']} images of the held-out prompt set in `{Path(g['folder']).name}/` "
               "(GenEval layout, `results.jsonl` beside it); overall = mean over tags. *Second scorer*: the "
               "same pictures scored by an independent detector and rules (`eval.second_opinion`). *Tokens "
               "say*: the same samples drawn exactly from the objects the CLIP's scene head reads in their "
               "generated tokens (the generator's share of the errors; the rest is the pixel decoder's).", "",
               *geneval_md(g), "",
               "The position tag's prompts are arrangements no training image shows (the generalization "
               "test), at 32 images each; GenEval's own position and colour-pair prompts are not held out, "
               "which the *seen* lines measure: the 18 position prompts of arrangements training pictured "
               "and 15 color_attr prompts of pairs it pictured, on new samples. Neither is in the other's "
               "number; the overall is the mean of the six held-out tags."]
    if "samples.png" in record["pictures"]:
        md += ["", "Samples (4 seeds per held-out prompt):", "", "![samples](samples.png)"]
    if v := m.get("views"):
        w, g = v["words"], ", ".join(f"{x:g}" for x, *_ in v["sweep"]["guidance"])
        md += ["", "## Inside the sampler", "",
               f"{v['prompts']} held-out prompts, seeds 0-{v['samples'] - 1}. The trajectory: 8 of the Euler "
               "steps from t = 0 (noise) to 1, each sample's states x_t above its clean guesses "
               "x_t + (1 - t) v ([every step](trajectory.gif), with what the guess's tokens say).", "",
               "![trajectory](trajectory.png)", "", "What each word steers: each image token's attention to "
               "each word, rolled out through the Next-DiT and the LM (`sample.word_maps`), the word's share "
               "of it under its map: where information can flow, not what caused the picture. A shape word's "
               f"map peaks inside that shape's box for {fmt(w['peak_in_object'])} of {w['words']} such words "
               f"(seed 0; chance {fmt(w['chance'])}): the toy's generated tokens are scene tokens that each "
               "name every object, so a token's place on the grid need not be a place in the picture.", "",
               "![word maps](words.png)", "",
               f"The guidance sweep (columns: {g}; green: right by the toy scorer), and toy GenEval against "
               "guidance and Euler steps:", "", "![sweep](sweep.png)", "", "![sweeps](sweep_plot.png)"]
    if u := m.get("understand"):
        md += ["", "## Understanding (stage 1): exact match, greedy", "", *understand_md(u)]
    if "clip" in m:
        md += ["", "## CLIP (toy, contrastive)", ""]
        md += md_table(["metric", "value"], [[name, fmt(m["clip"][key])] for key, name in CLIP_ROWS.items()])
    if r := m.get("recon"):
        md += ["", "## Reconstruction (image -> 64 CLIP tokens -> pixel decoder)", "", *recon_md(r)]
        if "reconstructions.png" in record["pictures"]:
            md += ["", "![reconstructions](reconstructions.png)"]
    md += ["", "## Timings", ""]
    md += md_table(["what", "seconds"], [[f"train {k}", f"{v:.0f}"] for k, v in times.items()]
                   + [[f"eval {k}", f"{v:.0f}"] for k, v in m["eval_seconds"].items()]
                   + [[f"this report ({'cached' if record['cached'] else 'evaluated'})",
                       f"{record['report_seconds']:.0f}"]])
    md += ["", "## Commands", "", "```",
           f"python train.py --out {run}                  # train every stage (finished ones are skipped)",
           f"python eval.py report --run {run}            # this report",
           f"python eval.py understand --run {run}        # or clip, recon, toygeneval, views",
           f"python sample.py --run {run} --prompt \"a photo of a red circle\" --num-samples 4", "```", ""]
    return "\n".join(md)


# --- Command line ---------------------------------------------------------------------------------

def parse_args(argv=None):
    p = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name, help):
        return add_run_options(sub.add_parser(name, help=help, description=help), run=name != "geneval")

    c = command("clip", "zero-shot classification of held-out images")
    c.add_argument("--n", type=int, default=500, help="images per test set")
    c = command("understand", "exact-match question answering and captioning")
    c.add_argument("--n", type=int, default=1000, help="questions")
    c.add_argument("--captions", type=int, default=200, help="images to caption")
    c = command("toygeneval", "the toy GenEval prompt set, generated and scored")
    c.add_argument("--variant", default="flow-clip", help="flow-clip, mse-clip or flow-vae")
    add_sampling_options(c)
    c.add_argument("--seed", type=int, default=0, help="sample j uses seed + j")
    c.add_argument("--tags", default=",".join(data.TAGS), help="comma-separated GenEval tags (default: all)")
    c.add_argument("--per-prompt", type=int, default=4, help="images per prompt")
    c.add_argument("--per-tag", type=int, default=None,
                   help="held-out prompts per tag (at most; default: every held-out prompt, 144)")
    c.add_argument("--per-position", type=int, default=REPORT["per_position"],
                   help="images per held-out position prompt (at least --per-prompt)")
    c.add_argument("--per-seen", type=int, default=REPORT["per_seen"],
                   help="images per seen position / color_attr prompt (0: skip those lines)")
    c = command("views", "inside the sampler: trajectory, word maps, guidance and steps swept")
    c.add_argument("--per-tag", type=int, default=REPORT["views_per_tag"], help="held-out prompts per tag")
    c.add_argument("--samples", type=int, default=REPORT["views_samples"], help="seeds of the sweep")
    c = command("recon", "reconstructions of held-out images scored by the GenEval rules")
    c.add_argument("--n", type=int, default=200, help="images")
    c = command("report", "every evaluation -> RUN/REPORT.md, metrics.json and pictures")
    c.add_argument("--force", action="store_true", help="re-evaluate even if the checkpoints are unchanged")
    c = command("geneval", "score a folder in GenEval's layout; writes DIR/results.jsonl")
    c.add_argument("dir", metavar="DIR", help="folder with 00000/metadata.jsonl, 00000/samples/0000.png ...")

    args = p.parse_args(argv)
    check_numbers(p, args, at_least_one=("n", "captions", "steps", "per_tag", "samples", "per_prompt"),
                  non_negative=("guidance",))
    if args.command == "toygeneval":
        args.tags = comma_list(p, "--tags", args.tags, data.TAGS)
    return args


def main(argv=None) -> int:
    return metrics_main(run_command, parse_args(argv))


def run_command(args) -> dict:
    if args.command == "geneval":
        m = eval_geneval(args.dir)
        print("\n".join([f"GenEval scores of {args.dir} (results.jsonl written there)", "", *geneval_md(m)]))
        return m
    device = pipeline.pick_device(args.device)
    if args.command == "report":
        record = full_report(args.run, device=device, force=args.force)
        return {"metrics": record["metrics"], "cached": record["cached"]}
    need = {"clip": ("clip",), "understand": ("clip", "understand"),
            "recon": ("clip", "decoder")}.get(args.command, ("clip", "understand", "generate"))
    variant = getattr(args, "variant", "flow-clip")
    pipe = pipeline.load_run(args.run, variant, device, need)
    if args.command == "clip":
        m = eval_clip(pipe, args.n)
        md = [f"CLIP on {m['images']} held-out images per row", ""]
        md += md_table(["metric", "value"], [[name, fmt(m[key])] for key, name in CLIP_ROWS.items()])
    elif args.command == "understand":
        m = eval_understand(pipe, args.n, args.captions)
        md = [f"Understanding: exact match on {m['questions']} held-out questions (greedy)", "",
              *understand_md(m)]
    elif args.command == "recon":
        m = recon_scores(*reconstruct_set(pipe, args.n))
        md = ["Reconstruction (image -> CLIP features -> pixel decoder)", "", *recon_md(m)]
    elif args.command == "views":
        sample.check_pixels(pipe, args.run)
        m = views(pipe, args.run, args.per_tag, args.samples)
        md = md_table(["sweep", "setting", "decoded", "tokens say"],
                      [[axis, *map(fmt, r)] for axis, results in m["sweep"].items() for r in results])
        md += ["", f"a shape word's map peaks in its object {fmt(m['words']['peak_in_object'])} (chance "
               f"{fmt(m['words']['chance'])}); {args.run}/trajectory.png, .gif, words.png, sweep*.png"]
    else:  # toygeneval
        m, *_ = eval_toygeneval(pipe, args.run, variant, args.per_prompt, args.per_tag, args.steps,
                                args.guidance, args.seed, tags=args.tags, per_position=args.per_position,
                                per_seen=args.per_seen)
        md = [f"Toy GenEval ({variant}): {m['images']} images in {m['folder']}", "", *geneval_md(m)]
    print("\n".join(md))
    return {"variant": variant, **m} if args.command == "toygeneval" else m


if __name__ == "__main__":
    sys.exit(main())
