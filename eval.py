"""Evaluate a trained BLIP3-o run on held-out compositions of the shapes world.

Every command rebuilds the models from the checkpoints in --run (default out/toy), prints readable
tables, and prints its metrics as ONE JSON object on the last line of stdout. Exit status 0 on
success, 2 with a one-line `error: ...` for a user error (missing checkpoint, bad flag). Everything is
deterministic: fixed seeds, greedy decoding, seeded diffusion noise.

    python eval.py clip          # zero-shot color+shape of held-out single objects, retrieval R@1
    python eval.py understand    # exact-match answers per question type, and captions
    python eval.py clipgen       # text -> CLIP features; does the feature retrieve its own prompt?
    python eval.py recon         # image -> CLIP tokens -> pixels, scored by the GenEval rules
    python eval.py toygeneval    # the toy GenEval prompt set -> RUN/geneval-flow-clip/, scored
    python eval.py geneval DIR   # score any folder in GenEval's layout (e.g. from sample.py --geneval)
    python eval.py report        # all of the above -> RUN/REPORT.md, metrics.json, pictures (cached)
    python eval.py clipgen --variant mse-clip --run out/toy      # an ablation's generator
    python eval.py clipgen --tags single_object,colors --per-tag 100 --samples 8   # all 33 such prompts
    python eval.py diversity     # one prompt, 8 seeds: spread of the samples per design (Finding 2)
    python eval.py ablation      # the paper's design study -> out/ablation/ablation.md, .png, .json
    python eval.py ablation --quick --out /tmp/ablation              # the same in seconds (tiny sizes)

"Held-out" means split "test" of the shapes world: images never drawn in training, and for two-object
scenes colour compositions ("a red circle and a blue square") and spatial relations that no training
image shows (data.HELDOUT_COMBOS, data.HELDOUT_RELATIONS). `zero_shot_seen` scores training images.
"""
from __future__ import annotations

import argparse
import filecmp
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
import sample
from sample import OneLineParser, UserError

EVAL_VERSION = 2  # part of the report cache's fingerprint: bump it when an evaluation changes

# Seeds of the evaluation sets (disjoint from training, which draws split "train" with seed 0).
SEED_CLIP, SEED_SEEN, SEED_RETRIEVAL, SEED_QA, SEED_CAPTIONS, SEED_RECON = 1, 2, 3, 4, 5, 6

# Sizes of full_report's evaluations: small enough to finish in about two minutes on a laptop CPU.
REPORT = dict(clip_images=300, questions=1000, captions=200, recon_images=96, geneval_per_tag=10,
              per_prompt=4, ablation_per_tag=8, ablation_samples=2, steps=30, cfg=3.0, decoder_steps=20,
              decoder_cfg=1.0)

# What the issues ask of the default toy run (REPORT.md marks each number against its target).
TARGETS = {"clip zero-shot (held-out)": 0.95, "understanding exact match": 0.90,
           "clipgen single_object+colors": 0.85, "reconstruction (GenEval rules)": 0.90,
           "toy GenEval overall": 0.60}


# ----------------------------------------------------------------------------------------------------
# Small helpers: tables and the JSON line
# ----------------------------------------------------------------------------------------------------


def format_table(header, rows) -> str:
    """Rows of cells -> aligned text; floats printed with 3 decimals."""
    cells = [[f"{c:.3f}" if isinstance(c, float) else str(c) for c in row] for row in [header, *rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def rounded(obj, digits: int = 4):
    """Floats in a nested structure rounded for the JSON line and metrics.json."""
    if isinstance(obj, float):
        return round(obj, digits)
    if isinstance(obj, dict):
        return {k: rounded(v, digits) for k, v in obj.items()}
    if isinstance(obj, list):
        return [rounded(v, digits) for v in obj]
    return obj


def fmt(x) -> str:
    """A metric for a Markdown table: 3 decimals, or "-" when it could not be measured."""
    return "-" if x is None else f"{x:.3f}"


def as_float(images_u8: torch.Tensor) -> torch.Tensor:
    return images_u8.float().div(255)


# ----------------------------------------------------------------------------------------------------
# 1. CLIP: zero-shot classification and retrieval
# ----------------------------------------------------------------------------------------------------


@torch.no_grad()
def image_embeddings(pipe, images_u8: torch.Tensor, batch: int = 500) -> torch.Tensor:
    """uint8 (N, 3, H, W) -> unit-norm CLIP image embeddings (N, E)."""
    return torch.cat([pipe.clip.encode_image(as_float(images_u8[i:i + batch]).to(pipe.device)).cpu()
                      for i in range(0, len(images_u8), batch)])


@torch.no_grad()
def text_embeddings(pipe, texts, batch: int = 500) -> torch.Tensor:
    """Texts -> unit-norm CLIP text embeddings (N, E)."""
    ids, _ = blip3o.encode_texts(pipe.tokenizer, texts, pipe.config.clip.context_length)
    return torch.cat([pipe.clip.encode_text(ids[i:i + batch].to(pipe.device)).cpu()
                      for i in range(0, len(ids), batch)])


def tag_records(tag: str) -> list[dict]:
    """Every GenEval record of a tag in either split (the candidates a prompt competes with)."""
    records = {}
    for split in ("train", "test"):
        for r in data.geneval_prompts(split, n_per_tag=None):
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
    """Single-object images of `tag` classified against every prompt of that tag.

    tag "colors": 30 prompts "a photo of a red circle" ...; "single_object": 3 prompts (shape only).
    -> accuracy with color and shape both right, and each alone."""
    images, scenes = data.make_image_set(n, split=split, seed=seed, tags=(tag,))
    records = tag_records(tag)
    pred = (image_embeddings(pipe, images) @ text_embeddings(pipe, [r["prompt"] for r in records]).t()).argmax(1)
    shape_ok = color_ok = both_ok = 0
    for scene, p in zip(scenes, pred.tolist()):
        want, got = scene.objects[0], records[p]["include"][0]
        s, c = got["class"] == want.shape, got.get("color", want.color) == want.color
        shape_ok, color_ok, both_ok = shape_ok + s, color_ok + c, both_ok + (s and c)
    return {"both": both_ok / n, "color": color_ok / n, "shape": shape_ok / n}


def zero_shot_compositions(pipe, n: int, seed: int) -> float:
    """Held-out two-object scenes ("a photo of a red circle and a blue square", a colour composition
    never seen in training) classified among all 600 such prompts: is each colour bound to its shape?"""
    images, scenes = data.make_image_set(n, split="test", seed=seed, tags=("color_attr",))
    records = tag_records("color_attr")
    pred = (image_embeddings(pipe, images) @ text_embeddings(pipe, [r["prompt"] for r in records]).t()).argmax(1)
    return sum(meaning(records[p]) == meaning(s.metadata) for s, p in zip(scenes, pred.tolist())) / n


def retrieval_r1(pipe, n: int, seed: int, group: int = 100) -> tuple[float, float]:
    """Held-out images vs their own captions in groups of `group`: image->text and text->image R@1.

    A retrieved caption identical in text to the right one counts as right (a small world repeats)."""
    images, scenes = data.make_image_set(n, split="test", seed=seed)
    captions = [s.caption for s in scenes]
    img, txt = image_embeddings(pipe, images), text_embeddings(pipe, captions)
    i2t = t2i = 0
    for start in range(0, n, group):
        sl = slice(start, min(start + group, n))
        caps = captions[sl]
        sim = img[sl] @ txt[sl].t()  # (G, G): image i vs caption j
        i2t += sum(caps[j] == caps[i] for i, j in enumerate(sim.argmax(1).tolist()))
        t2i += sum(caps[j] == caps[i] for i, j in enumerate(sim.argmax(0).tolist()))
    return i2t / n, t2i / n


def eval_clip(pipe, n: int = 500) -> dict:
    """Zero-shot top-1 of held-out single objects (color and shape), the same on training images, held-out
    two-object colour compositions, and image <-> caption retrieval R@1."""
    held = zero_shot(pipe, "test", n, SEED_CLIP)
    seen = zero_shot(pipe, "train", n, SEED_SEEN)
    single = zero_shot(pipe, "test", n, SEED_CLIP, tag="single_object")
    i2t, t2i = retrieval_r1(pipe, n, SEED_RETRIEVAL)
    return {"zero_shot": held["both"], "zero_shot_color": held["color"], "zero_shot_shape": held["shape"],
            "zero_shot_seen": seen["both"], "single_object_shape": single["shape"],
            "zero_shot_compositions": zero_shot_compositions(pipe, n, SEED_CLIP),
            "retrieval_i2t_r1": i2t, "retrieval_t2i_r1": t2i, "images": n}


def print_clip(m: dict) -> None:
    print(f"CLIP zero-shot on {m['images']} held-out images per row")
    print(format_table(["metric", "top-1"], [
        ["single object, 30 prompts: color and shape", m["zero_shot"]], ["  color", m["zero_shot_color"]],
        ["  shape", m["zero_shot_shape"]], ["  the same on training images", m["zero_shot_seen"]],
        ["single_object: shape (3 prompts)", m["single_object_shape"]],
        ["held-out colour compositions (600 prompts)", m["zero_shot_compositions"]],
        ["retrieval image->text R@1 (of 100)", m["retrieval_i2t_r1"]],
        ["retrieval text->image R@1 (of 100)", m["retrieval_t2i_r1"]]]))


# ----------------------------------------------------------------------------------------------------
# 2. Understanding: exact-match answers
# ----------------------------------------------------------------------------------------------------


def question_set(n: int, seed: int) -> tuple[torch.Tensor, list, list]:
    """~n held-out questions: at most one of each type per scene, so rarer types are not crowded out.

    -> (uint8 images (M, 3, H, W), rows [(image index, qtype, question, answer)], objects per image)."""
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


SCENE_SIZES = ("1 object", "2 objects", "3-4 objects")  # how eval_understand splits its answers


def scene_size(n_objects: int) -> str:
    return SCENE_SIZES[min(n_objects, 3) - 1]


def answer_all(pipe, images: torch.Tensor, questions, answers, batch: int = 250) -> list[str]:
    """Greedy answers, batched. Decoding stops one token past the longest right answer: exact match
    needs nothing more, and an untrained model would otherwise ramble to the token limit."""
    longest = max(len(pipe.tokenizer(a, add_special_tokens=False)["input_ids"]) for a in answers)
    out = []
    for i in range(0, len(questions), batch):
        out += pipe.answer(as_float(images[i:i + batch]), questions[i:i + batch], temperature=0.0,
                           max_new_tokens=longest + 1)
    return out


def eval_understand(pipe, n: int = 1000, n_captions: int = 200, show: int = 6) -> dict:
    """Exact-match accuracy per question type and overall (mean over all questions), and captions."""
    images, rows, n_objects = question_set(n, SEED_QA)
    preds = answer_all(pipe, images[[r[0] for r in rows]], [r[2] for r in rows], [r[3] for r in rows])
    hits = [p.strip() == r[3] for p, r in zip(preds, rows)]
    per_type = {}
    for qtype in data.QTYPES:
        h = [ok for ok, r in zip(hits, rows) if r[1] == qtype]
        per_type[qtype] = {"accuracy": sum(h) / len(h) if h else None, "questions": len(h)}
    # The same split by how many objects the image holds: with two, a colour or shape question names one
    # object and asks about the other attribute, so 0.5 is what answering about either at random gives.
    groups = {}
    for ok, r in zip(hits, rows):
        groups.setdefault(r[1], {}).setdefault(scene_size(n_objects[r[0]]), []).append(ok)
    by_size = {q: {z: {"accuracy": sum(groups[q][z]) / len(groups[q][z]), "questions": len(groups[q][z])}
                   for z in SCENE_SIZES if z in groups[q]} for q in data.QTYPES if q in groups}
    cap_images, scenes = data.make_image_set(n_captions, split="test", seed=SEED_CAPTIONS)
    truth = [s.caption for s in scenes]
    cap_preds = answer_all(pipe, cap_images, [data.caption_question] * n_captions, truth)
    cap_hits = [p.strip() == t for p, t in zip(cap_preds, truth)]
    examples = [{"question": r[2], "answer": r[3], "predicted": p} for r, p in zip(rows[:show], preds)]
    examples += [{"question": data.caption_question, "answer": t, "predicted": p}
                 for t, p in zip(truth[:2], cap_preds)]
    return {"overall": sum(hits) / len(hits), "per_type": per_type, "by_scene_size": by_size,
            "questions": len(rows), "caption_exact": sum(cap_hits) / n_captions, "captions": n_captions, "examples": examples}


def print_understand(m: dict) -> None:
    print(f"Understanding: exact match on {m['questions']} held-out questions (greedy)")
    rows = [[q, v["questions"], v["accuracy"]] for q, v in m["per_type"].items()]
    rows += [["overall", m["questions"], m["overall"]], ["caption (whole caption)", m["captions"],
                                                        m["caption_exact"]]]
    print(format_table(["question type", "n", "accuracy"], rows))
    print("\nthe same by objects in the image (n, accuracy):")
    rows = [[q] + [f"{v[z]['questions']}, {v[z]['accuracy']:.3f}" if z in v else "-" for z in SCENE_SIZES]
            for q, v in m["by_scene_size"].items()]
    print(format_table(["question type", *SCENE_SIZES], rows))
    print("\nexamples:")
    for ex in m["examples"]:
        mark = "ok" if ex["predicted"].strip() == ex["answer"] else "WRONG"
        print(f"  {ex['question']!r:45} -> {ex['predicted']!r} (truth {ex['answer']!r}) {mark}")


# ----------------------------------------------------------------------------------------------------
# 3. Generation scored in CLIP space
# ----------------------------------------------------------------------------------------------------


@torch.no_grad()
def generated_embeddings(pipe, tokens: torch.Tensor, batch: int = 500) -> torch.Tensor:
    """CLIP image embeddings of generated targets (N, 64, D) -> (N, E).

    CLIP targets: the toy CLIP's own pooling of the 64 tokens (ImageEncoder.embed_tokens), no pixels
    needed. VAE latents (the ablation) have no CLIP embedding: they are decoded (deterministic VAE
    decoder) and the pixels encoded by CLIP."""
    out = []
    for i in range(0, len(tokens), batch):
        chunk = tokens[i:i + batch].to(pipe.device)
        if pipe.target == "clip":
            out.append(pipe.clip.embed_tokens(chunk).cpu())
        else:
            out.append(pipe.clip.encode_image(pipe.tokens_to_images(chunk)).cpu())
    return torch.cat(out)


def clipgen_scores(pipe, records, tokens: torch.Tensor) -> dict:
    """Top-1 retrieval of each record's prompt, among all its tag's prompts, by its generated samples.

    tokens (P, S, 64, D): S samples of each record. A retrieved prompt that means the same (see
    `meaning`) counts as right. -> accuracy per tag, single_object+colors pooled, overall (mean of tags)."""
    P, S = tokens.shape[:2]
    emb = generated_embeddings(pipe, tokens.flatten(0, 1)).unflatten(0, (P, S))  # (P, S, E)
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


def heldout_prompts(n_per_tag: int, tags=None) -> list[dict]:
    """The toy GenEval set's held-out records: up to n_per_tag per tag, only `tags` (default every tag)."""
    records = data.geneval_prompts("test", n_per_tag=n_per_tag)
    return records if tags is None else [r for r in records if r["tag"] in tags]


def eval_clipgen(pipe, n_per_tag: int = 8, samples: int = 4, steps: int = 30, cfg: float = 3.0,
                 seed: int = 0, tags=None) -> dict:
    """Held-out prompts (n_per_tag per GenEval tag, of `tags`) -> `samples` generated targets each
    -> scores."""
    records = heldout_prompts(n_per_tag, tags)
    prompts = [r["prompt"] for r in records]
    columns = []
    for j in range(samples):
        gen = torch.Generator(pipe.device).manual_seed(seed + j)
        columns.append(torch.cat([pipe.generate_tokens(prompts[i:i + 64], steps, cfg, gen).cpu()
                                  for i in range(0, len(prompts), 64)]))
    return clipgen_scores(pipe, records, torch.stack(columns, 1))  # tokens (P, S, 64, D)


def print_clipgen(m: dict, variant: str) -> None:
    print(f"Generated features ({variant}): top-1 retrieval of the right prompt among its tag's prompts "
          f"({m['prompts']} held-out prompts x {m['samples_per_prompt']} samples)")
    rows = [[tag, len(tag_records(tag)), acc] for tag, acc in m["per_tag"].items()]
    if m["single_object+colors"] is not None:
        rows.append(["single_object+colors", "", m["single_object+colors"]])
    rows.append(["overall (mean of tags)", "", m["overall"]])
    print(format_table(["tag", "candidates", "top-1"], rows))


# ----------------------------------------------------------------------------------------------------
# 4. GenEval: scoring folders, reconstructions, the toy prompt set
# ----------------------------------------------------------------------------------------------------


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
    with open(outdir / "results.jsonl", "w", encoding="utf-8") as f:
        for r in results:
            f.write(json.dumps(r) + "\n")
    order = {tag: i for i, tag in enumerate(data.TAGS)}  # GenEval's tag order, any unknown tag last
    per_tag = dict(sorted(summary["per_tag"].items(), key=lambda kv: (order.get(kv[0], len(order)), kv[0])))
    counts = {tag: sum(r["tag"] == tag for r in results) for tag in per_tag}
    return {**summary, "per_tag": per_tag, "images_per_tag": counts}


def print_geneval(m: dict, title: str) -> None:
    print(title)
    rows = [[tag, m["images_per_tag"][tag], acc] for tag, acc in m["per_tag"].items()]
    rows.append(["overall (mean of tags)", m["images"], m["overall"]])
    print(format_table(["tag", "images", "accuracy"], rows))


@torch.no_grad()
def reconstruct_set(pipe, n: int, steps: int = 20, cfg: float = 1.0, batch: int = 100):
    """-> (uint8 originals (n, 3, H, W), float reconstructions (n, 3, H, W), scenes) of held-out scenes."""
    images, scenes = data.make_image_set(n, split="test", seed=SEED_RECON)
    gen = torch.Generator(pipe.device).manual_seed(SEED_RECON)
    recon = torch.cat([pipe.reconstruct(as_float(images[i:i + batch]), steps, cfg, gen).cpu()
                       for i in range(0, n, batch)])
    return images, recon, scenes


def recon_scores(images: torch.Tensor, recon: torch.Tensor, scenes) -> dict:
    """Each reconstruction scored by the GenEval rules against its scene's own record, per tag; the
    originals scored the same way are the detector's ceiling."""
    per_tag, ceiling = {}, []
    for orig, rec, scene in zip(images, sample.to_uint8(recon), scenes):
        ok, _ = data.score_record(scene.metadata, data.detect_objects(rec.numpy()))
        per_tag.setdefault(scene.tag, []).append(ok)
        ceiling.append(data.score_record(scene.metadata, data.detect_objects(orig.permute(1, 2, 0).numpy()))[0])
    hits = [ok for h in per_tag.values() for ok in h]
    return {"recon": sum(hits) / len(hits), "per_tag": {t: sum(h) / len(h) for t, h in per_tag.items()},
            "originals": sum(ceiling) / len(ceiling), "images": len(hits)}


def eval_recon(pipe, n: int = 200, steps: int = 20, cfg: float = 1.0) -> dict:
    return recon_scores(*reconstruct_set(pipe, n, steps, cfg))


def print_recon(m: dict) -> None:
    print(f"Reconstruction (image -> CLIP tokens -> pixel decoder) of {m['images']} held-out images, "
          "scored by the GenEval rules against each scene's own record")
    rows = [[tag, acc] for tag, acc in m["per_tag"].items()]
    rows += [["all", m["recon"]], ["(originals, detector ceiling)", m["originals"]]]
    print(format_table(["tag", "correct"], rows))


def eval_toygeneval(pipe, run, variant: str = "flow-clip", per_prompt: int = 4, n_per_tag: int = 16,
                    steps: int = 30, cfg: float = 3.0, decoder_steps: int = 20, decoder_cfg: float = 1.0,
                    seed: int = 0, quiet: bool = False,
                    tags=None) -> tuple[dict, list, torch.Tensor, torch.Tensor]:
    """The toy GenEval prompt set (or its `tags`) -> RUN/geneval-<variant>/ (GenEval layout) -> scores.

    Returns (scores, records, images (P, S, 3, H, W), generated tokens (P, S, 64, D)); the tokens let
    full_report score the same samples in CLIP space without generating twice."""
    sample.check_pixels(pipe, run)
    records = heldout_prompts(n_per_tag, tags)
    outdir = Path(run) / f"geneval-{variant}"
    shutil.rmtree(outdir, ignore_errors=True)  # no stale prompt folders from a larger earlier set
    images, tokens = sample.generate_grid(pipe, [r["prompt"] for r in records], per_prompt, seed, steps,
                                          cfg, decoder_steps, decoder_cfg, quiet=quiet)
    sample.write_geneval(outdir, records, images)
    scores = eval_geneval(outdir)
    scores["folder"] = str(outdir)
    return scores, records, images, tokens


# ----------------------------------------------------------------------------------------------------
# 5. The report: every evaluation, pictures, loss curves, cached by checkpoint fingerprint
# ----------------------------------------------------------------------------------------------------


def checkpoints(run) -> dict:
    """{stage name: checkpoint folder} of every stage trained in the run, in pipeline order:
    clip, understand, decoder, vae, generate/<variant> ..., then any other (e.g. joint)."""
    run = Path(run)
    order = ["clip", "understand", "decoder", "vae"]
    names = order + [f"generate/{p.name}" for p in sorted((run / "generate").glob("*"))]
    names += sorted(p.name for p in run.glob("*") if p.name not in order + ["generate"])
    found = {}
    for name in names:
        path = run / name
        # Skip the temporary / aside copies of an atomic save: checkpoint_path resolves those itself.
        if path.is_dir() and "." not in path.name and (ckpt := blip3o.checkpoint_path(path)) is not None:
            found[name] = ckpt
    return found


def fingerprint(run) -> dict:
    """Each checkpoint's step and meta.json mtime, plus the evaluation version and sizes: when this is
    unchanged, so are the metrics."""
    ckpts = {}
    for name, path in checkpoints(run).items():
        meta = blip3o.read_meta(path, name, Path(run) / name)
        ckpts[name] = {"step": meta["state"]["step"], "mtime_ns": (path / "meta.json").stat().st_mtime_ns}
    return {"eval_version": EVAL_VERSION, "sizes": REPORT, "checkpoints": ckpts}


def stage_summaries(run) -> dict:
    """Per trained stage: steps and the final loss (mean of the last 10% of logged steps)."""
    out = {}
    for name, path in checkpoints(run).items():
        meta = blip3o.read_meta(path, name, Path(run) / name)
        hist = meta["state"]["history"]
        tail = [h["loss"] for h in hist[-max(1, len(hist) // 10):]]
        out[name] = {"steps": meta["state"]["step"], "final_loss": sum(tail) / len(tail) if tail else None}
    return out


def plot_losses(run) -> list[str]:
    """RUN/loss_<stage>.png per trained stage: the logged loss (and the flow loss per t quarter)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    for name, path in checkpoints(run).items():
        hist = blip3o.read_meta(path, name, Path(run) / name)["state"]["history"]
        if not hist:
            continue
        steps = [h["step"] for h in hist]
        fig, ax = plt.subplots(figsize=(6, 3.5))
        loss = np.array([h["loss"] for h in hist])
        ax.plot(steps, loss, color="0.75", lw=0.8, label="loss")
        k = max(1, len(loss) // 25)  # moving average over ~4% of the run
        smooth = np.convolve(loss, np.ones(k) / k, mode="valid")
        ax.plot(steps[k - 1:], smooth, color="C0", lw=1.5, label=f"loss (mean of {k})")
        for q in range(4):  # flow stages log the loss per quarter of t (t=0 noise, t=1 data)
            pts = [(h["step"], h[f"loss_t{q}"]) for h in hist if f"loss_t{q}" in h]
            if len(pts) > k:
                s, v = zip(*pts)
                ax.plot(s[k - 1:], np.convolve(v, np.ones(k) / k, mode="valid"), lw=0.8,
                        label=f"t in [{q / 4:.2f}, {(q + 1) / 4:.2f})")
        if (loss > 0).all():
            ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_title(name)
        ax.legend(fontsize=7)
        fig.tight_layout()
        file = Path(run) / f"loss_{name.replace('/', '-')}.png"
        fig.savefig(file, dpi=100)
        plt.close(fig)
        files.append(file.name)
    return files


def sample_rows(records) -> list[int]:
    """Indices of the ~8 fixed held-out prompts shown in samples.png: 1-2 of every tag."""
    want = {"single_object": 1, "two_object": 1, "counting": 1, "colors": 2, "position": 1, "color_attr": 2}
    picked = []
    for i, r in enumerate(records):
        if want.get(r["tag"], 0) > 0:
            picked.append(i)
            want[r["tag"]] -= 1
    return picked


def evaluate_all(run, device) -> dict:
    """Every evaluation of full_report, sharing work: the toy GenEval samples are also scored in CLIP
    space (clipgen), and the pictures are cut from the samples and reconstructions already made."""
    t = {}
    metrics = {"variant": "flow-clip"}
    pipe = sample.load_pipeline(run, "flow-clip", device, need=("clip",))
    start = time.time()
    metrics["clip"] = eval_clip(pipe, REPORT["clip_images"])
    t["clip"] = time.time() - start
    if pipe.vlm is not None:
        start = time.time()
        metrics["understand"] = eval_understand(pipe, REPORT["questions"], REPORT["captions"])
        t["understand"] = time.time() - start
    if pipe.decoder is not None:
        start = time.time()
        images, recon, scenes = reconstruct_set(pipe, REPORT["recon_images"], REPORT["decoder_steps"],
                                                REPORT["decoder_cfg"])
        metrics["recon"] = recon_scores(images, recon, scenes)
        rows = [[im for im in as_float(images[:8])], list(recon[:8])]
        sample.save_png(sample.image_grid(rows, ["original", "reconstruction"]),
                        Path(run) / "reconstructions.png")
        t["recon"] = time.time() - start
    if pipe.generator is not None and pipe.vlm is not None and pipe.decoder is not None:
        start = time.time()
        geneval, records, images, tokens = eval_toygeneval(
            pipe, run, "flow-clip", REPORT["per_prompt"], REPORT["geneval_per_tag"], REPORT["steps"],
            REPORT["cfg"], REPORT["decoder_steps"], REPORT["decoder_cfg"], quiet=True)
        metrics["toygeneval"] = geneval
        metrics["clipgen"] = {"flow-clip": clipgen_scores(pipe, records, tokens)}
        picked = sample_rows(records)
        sample.save_png(sample.image_grid([list(images[i]) for i in picked],
                                          [records[i]["prompt"] for i in picked]), Path(run) / "samples.png")
        t["toygeneval+clipgen"] = time.time() - start
    # The ablations' generators, when trained: CLIP-space scores on a smaller prompt set.
    for name in checkpoints(run):
        variant = name.split("/", 1)[1] if name.startswith("generate/") else None
        if variant is None or variant == "flow-clip":
            continue
        start = time.time()
        ablation = sample.load_pipeline(run, variant, device, need=("clip", "understand", "generate"))
        if ablation.target == "vae" and ablation.vae is None:
            continue
        metrics.setdefault("clipgen", {})[variant] = eval_clipgen(
            ablation, REPORT["ablation_per_tag"], REPORT["ablation_samples"], REPORT["steps"], REPORT["cfg"])
        t[f"clipgen {variant}"] = time.time() - start
    metrics["eval_seconds"] = t
    return metrics


def full_report(run, timings: dict | None = None, train_seconds: float | None = None, device="auto",
                force: bool = False) -> dict:
    """Evaluate a run and write RUN/REPORT.md, RUN/metrics.json, samples.png, reconstructions.png and
    loss_<stage>.png. Called by `python train.py` after the pipeline; also `python eval.py report`.

    Cached: when RUN/metrics.json holds the same checkpoint fingerprint (each checkpoint's step and
    meta.json mtime, the evaluation version and sizes), its metrics are reused and nothing is
    re-evaluated. `timings` {stage: seconds} of stages trained now replace the recorded ones; stages
    skipped this time (0 s) keep the time they took when they were trained."""
    run = blip3o.check_run_folder(run)
    start = time.time()
    device = blip3o.pick_device(device) if isinstance(device, str) else device
    fp = fingerprint(run)
    old = {}
    if (run / "metrics.json").is_file():
        try:
            old = json.loads((run / "metrics.json").read_text())
        except json.JSONDecodeError:
            old = {}
    pictures = [run / "samples.png", run / "reconstructions.png"]
    cached = (not force and old.get("fingerprint") == fp
              and all(p.is_file() for p in pictures if p.name in old.get("pictures", [])))
    if cached:
        metrics = old["metrics"]
    else:
        metrics = rounded(evaluate_all(run, device))
    train_times = dict(old.get("train_seconds_per_stage", {}))
    trained_now = False
    for stage, seconds in (timings or {}).items():
        if seconds:  # 0: the stage was already trained and skipped; keep the time it took then
            # train.py's `--stage all` names the generation stage "generate": the default flow-clip variant
            train_times["generate/flow-clip" if stage == "generate" else stage] = round(seconds, 1)
            trained_now = True
    record = {
        "fingerprint": fp, "metrics": metrics, "stages": rounded(stage_summaries(run)),
        "train_seconds_per_stage": train_times,
        "last_train_run_seconds": (round(train_seconds, 1) if trained_now and train_seconds
                                   else old.get("last_train_run_seconds")),
        "pictures": [p.name for p in pictures if p.is_file()],
        "loss_plots": old.get("loss_plots", []) if cached else plot_losses(run),
        "cached": cached, "report_seconds": round(time.time() - start, 1),
    }
    (run / "metrics.json").write_text(json.dumps(record, indent=1) + "\n")
    (run / "REPORT.md").write_text(report_markdown(run, record))
    print(summary_table(record, run))
    return record


def headline(metrics: dict) -> dict:
    """The numbers the issues set targets for, by the names used in TARGETS."""
    out = {}
    if "clip" in metrics:
        out["clip zero-shot (held-out)"] = metrics["clip"]["zero_shot"]
    if "understand" in metrics:
        out["understanding exact match"] = metrics["understand"]["overall"]
    if "flow-clip" in metrics.get("clipgen", {}):
        out["clipgen single_object+colors"] = metrics["clipgen"]["flow-clip"]["single_object+colors"]
    if "recon" in metrics:
        out["reconstruction (GenEval rules)"] = metrics["recon"]["recon"]
    if "toygeneval" in metrics:
        out["toy GenEval overall"] = metrics["toygeneval"]["overall"]
    return {name: value for name, value in out.items() if value is not None}


def summary_table(record: dict, run) -> str:
    rows = [[name, value, f">= {TARGETS[name]:.2f}", "ok" if value >= TARGETS[name] else "BELOW"]
            for name, value in headline(record["metrics"]).items()]
    note = "cached: checkpoints unchanged since the last evaluation" if record["cached"] else "evaluated"
    text = (f"\nBLIP3-o toy report ({note}, {record['report_seconds']:.0f} s)\n"
            + format_table(["held-out metric", "value", "target", ""], rows))
    if "toygeneval" in record["metrics"]:
        tags = record["metrics"]["toygeneval"]["per_tag"]
        text += "\ntoy GenEval per tag: " + ", ".join(f"{t} {a:.2f}" for t, a in tags.items())
    return text + f"\nfull report: {Path(run) / 'REPORT.md'} (metrics.json, samples.png beside it)"


def report_markdown(run: Path, record: dict) -> str:
    """RUN/REPORT.md: every number of metrics.json as tables, the pictures, and the commands."""
    m = record["metrics"]
    md = [f"# BLIP3-o toy run: `{run}`", "",
          "All numbers are on held-out compositions of the shapes world (never drawn in training) unless "
          "marked *seen*. Regenerate with `python eval.py report --run " + str(run) + "` (cached while the "
          "checkpoints are unchanged).", "", "## Headline", "",
          "| metric | value | target | |", "| --- | --- | --- | --- |"]
    for name, value in headline(m).items():
        md.append(f"| {name} | {value:.3f} | >= {TARGETS[name]:.2f} | {'ok' if value >= TARGETS[name] else 'below'} |")

    md += ["", "## Stages", "", "| stage | steps | final loss | train time | loss curve |",
           "| --- | --- | --- | --- | --- |"]
    times = record["train_seconds_per_stage"]
    for name, s in record["stages"].items():
        secs = times.get(name)
        plot = f"loss_{name.replace('/', '-')}.png"
        md.append(f"| {name} | {s['steps']} | {s['final_loss'] if s['final_loss'] is not None else '-'} | "
                  f"{f'{secs:.0f} s' if secs else '-'} | "
                  f"{f'![]({plot})' if plot in record['loss_plots'] else '-'} |")
    if times:
        md.append(f"\nTraining time, all stages above: {sum(times.values()) / 60:.1f} min.")
    if record.get("last_train_run_seconds"):
        md.append(f"The last `python train.py` that trained anything took "
                  f"{record['last_train_run_seconds'] / 60:.1f} min, evaluations excluded.")

    if "toygeneval" in m:
        g = m["toygeneval"]
        md += ["", "## Toy GenEval (text -> CLIP tokens -> pixels, scored from pixels)", "",
               f"{g['images']} images of the held-out prompt set in `{Path(g['folder']).name}/` "
               "(GenEval layout, `results.jsonl` beside it); overall = mean over tags.", "",
               "| tag | images | accuracy |", "| --- | --- | --- |"]
        md += [f"| {t} | {g['images_per_tag'][t]} | {a:.3f} |" for t, a in g["per_tag"].items()]
        md.append(f"| **overall** | {g['images']} | **{g['overall']:.3f}** |")
    if "samples.png" in record["pictures"]:
        md += ["", "Samples (4 seeds per held-out prompt):", "", "![samples](samples.png)"]

    if m.get("clipgen"):
        md += ["", "## Generated CLIP features, scored in CLIP space", "",
               "Top-1 retrieval of the right prompt among all prompts of its tag (both splits), by the "
               "toy CLIP embedding of each generated sample. Ablations appear when trained.", ""]
        variants = list(m["clipgen"])
        tags = list(dict.fromkeys(t for v in variants for t in m["clipgen"][v]["per_tag"]))
        md += ["| tag | " + " | ".join(variants) + " |", "| --- |" + " --- |" * len(variants)]
        for t in tags + ["single_object+colors", "overall"]:
            cells = [m["clipgen"][v]["per_tag"].get(t) if t in m["clipgen"][v]["per_tag"]
                     else m["clipgen"][v].get(t) for v in variants]
            md.append(f"| {t} | " + " | ".join(fmt(c) for c in cells) + " |")

    if "understand" in m:
        u = m["understand"]
        md += ["", "## Understanding (stage 1): exact match, greedy", "",
               "| question type | questions | accuracy |", "| --- | --- | --- |"]
        md += [f"| {q} | {v['questions']} | {fmt(v['accuracy'])} |" for q, v in u["per_type"].items()]
        md += [f"| **overall** | {u['questions']} | **{u['overall']:.3f}** |",
               f"| whole caption | {u['captions']} | {u['caption_exact']:.3f} |", ""]
        if "by_scene_size" in u:  # reports cached before this breakdown existed lack it
            md += ["By objects in the image (questions, accuracy). With two objects a colour or shape question "
                   "picks one by the other attribute: 0.5 is answering about either at random.", "",
                   "| question type | " + " | ".join(SCENE_SIZES) + " |", "| --- |" + " --- |" * len(SCENE_SIZES)]
            md += [f"| {q} | " + " | ".join(f"{v[z]['questions']}, {v[z]['accuracy']:.2f}" if z in v else "-"
                                            for z in SCENE_SIZES) + " |" for q, v in u["by_scene_size"].items()]
            md += [""]
        md += ["Examples:", ""]
        md += [f"- `{e['question']}` -> `{e['predicted']}` (truth `{e['answer']}`)" for e in u["examples"]]

    if "clip" in m:
        c = m["clip"]
        md += ["", "## CLIP (toy, contrastive)", "", "| metric | value |", "| --- | --- |",
               f"| zero-shot single object, 30 prompts: color and shape | {c['zero_shot']:.3f} |",
               f"| zero-shot single object: color | {c['zero_shot_color']:.3f} |",
               f"| zero-shot single object: shape | {c['zero_shot_shape']:.3f} |",
               f"| zero-shot single object, *seen* (training) images | {c['zero_shot_seen']:.3f} |",
               f"| single_object shape (3 prompts) | {c['single_object_shape']:.3f} |",
               f"| held-out colour compositions, 600 two-object prompts | {c['zero_shot_compositions']:.3f} |",
               f"| retrieval image -> caption R@1 (groups of 100) | {c['retrieval_i2t_r1']:.3f} |",
               f"| retrieval caption -> image R@1 (groups of 100) | {c['retrieval_t2i_r1']:.3f} |"]

    if "recon" in m:
        r = m["recon"]
        md += ["", "## Reconstruction (image -> 64 CLIP tokens -> pixel decoder)", "",
               f"{r['images']} held-out images, each scored by the GenEval rules against its own record: "
               f"**{r['recon']:.3f}** (the originals themselves: {r['originals']:.3f}).", ""]
        if "reconstructions.png" in record["pictures"]:
            md.append("![reconstructions](reconstructions.png)")

    md += ["", "## Timings", "", "| what | seconds |", "| --- | --- |"]
    md += [f"| train {k} | {v:.0f} |" for k, v in times.items()]
    md += [f"| eval {k} | {v:.0f} |" for k, v in m.get("eval_seconds", {}).items()]
    md.append(f"| this report ({'cached' if record['cached'] else 'evaluated'}) | {record['report_seconds']:.0f} |")

    md += ["", "## Commands", "", "```",
           f"python train.py --out {run}                  # train every stage (finished ones are skipped)",
           f"python eval.py report --run {run}            # this report",
           f"python eval.py clip --run {run}",
           f"python eval.py understand --run {run}",
           f"python eval.py clipgen --run {run} --variant flow-clip --steps 30 --cfg 3.0",
           f"python eval.py recon --run {run} --n 200",
           f"python eval.py toygeneval --run {run} --variant flow-clip --per-prompt 4",
           f"python sample.py --run {run} --prompt \"a photo of a red circle\" --num-samples 4",
           "```", ""]
    return "\n".join(md)


# ----------------------------------------------------------------------------------------------------
# 6. The paper's design study (its Figures 3 and 4; DESIGN.md section 1), at toy scale
# ----------------------------------------------------------------------------------------------------
#
# Finding 1: CLIP features are a better generation target than VAE latents (same DiT, same flow loss).
# Finding 2: flow matching gives diverse samples for one prompt; MSE regression gives one answer.
# Finding 3: sequential training (LM frozen in stage 2) leaves understanding exactly as it was; joint
#            training (both tasks mixed, LM unfrozen) trades one task against the other.

DESIGNS = {"mse-clip": "CLIP + MSE", "flow-clip": "CLIP + Flow", "flow-vae": "VAE + Flow"}  # Figure 3
JOINT = "CLIP + Flow, joint"  # variant "joint": train.py --stage joint
SEED_DIVERSITY = 7  # the pixel decoder's noise in the diversity study (the same for every sample)

# Sizes of `eval.py ablation`. default: within the 30 minutes on 2 CPU cores (about 15 with the
# machine to itself, most of it the three flow trainings; a VAE to train first adds about 3); quick:
# seconds, for the tests.
# Sampling as in the report (REPORT) unless quick.
ABLATION = {
    "default": dict(steps=400, every=100, batch=32, per_tag=8, per_prompt=2, questions=300, captions=50,
                    seeds=4, sample_steps=REPORT["steps"], decoder_steps=REPORT["decoder_steps"],
                    vae_steps=None, vae_batch=None),  # None: train.py's toy defaults
    "quick": dict(steps=2, every=1, batch=4, per_tag=1, per_prompt=1, questions=12, captions=2, seeds=2,
                  sample_steps=2, decoder_steps=2, vae_steps=2, vae_batch=4),
}


def mean_pairwise_distance(x: torch.Tensor, rms: bool = True) -> float:
    """x (P, S, ...): S samples of each of P prompts -> the distance between two samples of one prompt,
    averaged over every pair and prompt; exactly 0 when each prompt's samples are identical.

    rms=True: root-mean-square over the elements (tokens, pixels: per-element units);
    rms=False: Euclidean (unit-norm embeddings: 0 the same, sqrt(2) orthogonal)."""
    flat = x.flatten(2).double()  # (P, S, F)
    P, S, F = flat.shape
    # Pair by pair, written out: torch.cdist's matmul shortcut is not exactly 0 for equal rows.
    pairs = [(flat[:, i] - flat[:, j]).pow(2).sum(-1).sqrt() for i in range(S) for j in range(i + 1, S)]
    d = torch.stack(pairs)  # (pairs, P)
    return float(d.mean() / (F ** 0.5 if rms else 1.0))


def diversity_prompts() -> list[str]:
    """One held-out prompt of each GenEval tag (the default prompts of `eval.py diversity`)."""
    return [r["prompt"] for r in data.geneval_prompts("test", n_per_tag=1)]


@torch.no_grad()
def sample_spread(pipe, prompts, seeds: int = 8, steps: int = 30, cfg: float = 3.0, decoder_steps: int = 20,
                  decoder_cfg: float = 1.0, seed: int = 0) -> tuple[dict, torch.Tensor]:
    """Each prompt sampled with seeds seed .. seed+seeds-1 -> (spread, images (P, S, 3, H, W)).

    Spread = mean pairwise distance of one prompt's samples in three spaces: the toy CLIP embedding
    (generated_embeddings), the generated tokens divided by the generator's target_scale (unit std, so
    CLIP tokens and VAE latents are on one scale), and pixels in [0, 1]. The pixel decoder gets the same
    noise for every seed, so the pixels differ exactly where the generator's outputs do."""
    tokens, images = [], []
    for j in range(seeds):
        gen = torch.Generator(pipe.device).manual_seed(seed + j)
        tok = pipe.generate_tokens(prompts, steps, cfg, gen)  # (P, 64, D)
        decoder_noise = torch.Generator(pipe.device).manual_seed(SEED_DIVERSITY)
        images.append(pipe.tokens_to_images(tok, decoder_steps, decoder_cfg, decoder_noise).cpu())
        tokens.append(tok.cpu())
    tokens, images = torch.stack(tokens, 1), torch.stack(images, 1)  # (P, S, 64, D), (P, S, 3, H, W)
    emb = generated_embeddings(pipe, tokens.flatten(0, 1)).unflatten(0, tokens.shape[:2])  # (P, S, E)
    spread = {"clip_embedding": mean_pairwise_distance(emb, rms=False),
              "tokens": mean_pairwise_distance(tokens / pipe.generator.target_scale.cpu()),
              "pixels": mean_pairwise_distance(images)}
    return spread, images


def eval_diversity(run, variants, prompts, seeds: int = 8, steps: int = 30, cfg: float = 3.0,
                   decoder_steps: int = 20, decoder_cfg: float = 1.0, seed: int = 0, device="cpu",
                   allow_unknown_words: bool = False) -> dict:
    """Finding 2, per design: the spread of one prompt's samples over seeds (see sample_spread).

    Variants not trained in the run are skipped (listed under "skipped"). Writes RUN/diversity.png: the
    first two prompts of each variant, one row of samples each."""
    out = {"prompts": list(prompts), "seeds": seeds, "variants": {}, "skipped": []}
    rows, labels = [], []
    for variant in variants:
        pipe = sample.load_pipeline(run, variant, device, need=("clip", "understand"))
        sample.check_known_words(pipe.tokenizer, prompts, allow_unknown_words)
        if pipe.generator is None:
            out["skipped"].append(variant)
            continue
        sample.check_pixels(pipe, run)
        spread, images = sample_spread(pipe, prompts, seeds, steps, cfg, decoder_steps, decoder_cfg, seed)
        out["variants"][variant] = spread
        rows += [list(row) for row in images[:2]]
        labels += [f"{DESIGNS.get(variant, variant)}: {p}" for p in prompts[:2]]
    if not out["variants"]:
        raise UserError(f"none of {', '.join(variants)} is trained in {run} (python train.py --stage generate "
                        f"--loss flow|mse --target clip|vae --out {run})")
    flow, mse = out["variants"].get("flow-clip"), out["variants"].get("mse-clip")
    if flow and mse:  # the paper's claim in one number per space: MSE's spread relative to flow's
        out["mse_over_flow"] = {k: mse[k] / flow[k] if flow[k] > 0 else None for k in flow}
    out["picture"] = str(sample.save_png(sample.image_grid(rows, labels), Path(run) / "diversity.png"))
    return out


def print_diversity(m: dict) -> None:
    print(f"Diversity: mean pairwise distance between {m['seeds']} samples of the same prompt "
          f"({len(m['prompts'])} prompts)")
    rows = [[v, DESIGNS.get(v, v), s["clip_embedding"], s["tokens"], s["pixels"]]
            for v, s in m["variants"].items()]
    if "mse_over_flow" in m:
        rows.append(["mse / flow", "(paper: ~0)", *[m["mse_over_flow"][k] if m["mse_over_flow"][k] is not None
                                                    else "-" for k in ("clip_embedding", "tokens", "pixels")]])
    print(format_table(["variant", "design", "CLIP embedding", "tokens (unit std)", "pixels"], rows))
    if m["skipped"]:
        print(f"not trained, skipped: {', '.join(m['skipped'])}")
    print(f"picture: {m['picture']}")


def train_segment(out, stage_argv: list, steps, batch, data_args: dict, device, restart: bool):
    """Train one stage in OUT up to `steps` (resuming from its checkpoint unless `restart`), in this
    process, through train.py's own plan and loop. -> the trained module (the plan's `inner`)."""
    import train

    argv = [*stage_argv, "--out", str(out), "--images", str(data_args["images"]), "--seed",
            str(data_args["seed"]), "--ckpt-every", "0", "--quiet", "--device", str(device)]
    argv += ["--steps", str(steps)] if steps else []
    argv += ["--batch-size", str(batch)] if batch else []
    argv += ["--restart"] if restart else []
    if "generate" in stage_argv:  # one noise draw per prompt: every design sees the same samples per step
        argv += ["--noise-repeats", "1"]
    args = train.parse_args(argv)
    args.config = blip3o.get_config(args.preset)
    torch.manual_seed(args.seed)  # as train.main does: the new modules' initial weights
    try:
        plan = train.PLANS[args.stage](args, device)
        train.fit(plan, args, device)
    except train.UserError as e:
        raise UserError(str(e)) from None
    return plan.model.inner


def ablation_folder(run: Path, out: Path, sizes: dict, device) -> dict:
    """Copy RUN's finished clip, understand, decoder (and vae) checkpoints into OUT, so every design
    starts from the same frozen pieces; train a VAE in OUT if RUN has none.

    -> the data arguments of RUN's stage 1 ({"images", "seed"}), which every design then trains on."""
    import train

    blip3o.check_run_folder(run)
    if out.resolve() == run.resolve():
        raise UserError("--out must not be the run folder: the study trains its own generation stages")
    for stage in ("clip", "understand", "decoder", "vae"):
        src = blip3o.checkpoint_path(run / stage)
        if src is None:
            if stage == "vae":
                continue
            raise UserError(f"no {stage} checkpoint in {run} (train it: python train.py --stage {stage} "
                            f"--out {run})")
        state = blip3o.read_meta(src, stage, run / stage)["state"]
        if not state["done"]:
            raise UserError(f"{run / stage} is still training (step {state['step']}): wait until it is done")
        dst = blip3o.checkpoint_path(out / stage)
        if dst is None:
            shutil.copytree(src, out / stage, ignore=shutil.ignore_patterns("optimizer.pt"))
        elif not filecmp.cmp(src / "model.safetensors", dst / "model.safetensors", shallow=False):
            raise UserError(f"{out / stage} is not {run / stage} any more (retrained since?): use a new --out")
    args = blip3o.read_meta(blip3o.checkpoint_path(out / "understand"), "understand").get("args", {})
    data_args = {"images": args.get("images") or train.TOY_IMAGES, "seed": args.get("seed", 0)}
    if blip3o.checkpoint_path(out / "vae") is None:
        print(f"[ablation] {run} has no VAE: training one in {out / 'vae'}", flush=True)
        train_segment(out, ["--stage", "vae"], sizes["vae_steps"], sizes["vae_batch"], data_args, device, True)
    return data_args


def lm_change(vlm, stage1: dict) -> tuple[bool, float]:
    """The VLM (LM + projector) against the stage-1 checkpoint's tensors, compared one by one:
    -> (every tensor bit-identical, the largest absolute change of any weight)."""
    identical, largest = True, 0.0
    for key, now in blip3o.module_tensors("vlm", vlm).items():
        before = stage1[key].to(now.device, now.dtype)
        identical &= torch.equal(now, before)
        largest = max(largest, float((now.float() - before.float()).abs().max()))
    return identical, largest


def score_design(out, variant: str, sizes: dict, device) -> dict:
    """A design's checkpoint in OUT -> toy GenEval (from pixels: the CLIP decoder, or the VAE decoder
    for flow-vae) and CLIP-space prompt retrieval of the same samples (clipgen_scores)."""
    pipe = sample.load_pipeline(out, variant, device, need=("clip", "understand", "generate"))
    geneval, records, _, tokens = eval_toygeneval(pipe, out, variant, sizes["per_prompt"], sizes["per_tag"],
                                                  sizes["sample_steps"], REPORT["cfg"], sizes["decoder_steps"],
                                                  REPORT["decoder_cfg"], quiet=True)
    retrieval = clipgen_scores(pipe, records, tokens)
    return {"geneval": geneval["overall"], "retrieval": retrieval["overall"], "images": geneval["images"],
            "geneval_per_tag": geneval["per_tag"], "retrieval_per_tag": retrieval["per_tag"]}


def understanding(out, variant: str, sizes: dict, device, vlm_state: dict | None = None) -> dict:
    """Exact-match understanding of OUT's VLM (of RUN/joint for variant "joint"), or of the weights
    `vlm_state` when given (the LM as a finished training segment left it)."""
    pipe = sample.load_pipeline(out, variant, device, need=("clip", "understand"))
    # On CUDA stage 2 holds a bf16 copy of the frozen LM; its fp32 weights are the checkpoint's, which
    # the pipeline already has (lm_change compared the copy with them, cast alike).
    if vlm_state is not None and all(v.dtype == torch.float32 for v in vlm_state.values()):
        pipe.vlm.load_state_dict(vlm_state)
    m = eval_understand(pipe, sizes["questions"], sizes["captions"])
    return {"accuracy": m["overall"], "caption_exact": m["caption_exact"], "questions": m["questions"]}


def run_ablation(run, out, sizes: dict, device) -> dict:
    """Train CLIP + MSE, CLIP + Flow, VAE + Flow and joint CLIP + Flow for the same steps on the same
    data, seed and backbone, scoring each every `every` steps; then understanding before / after and
    the diversity of the three designs. Writes OUT/ablation.json, ablation.md and ablation.png.

    Training runs in segments (`--steps every`, `--steps 2*every`, ... with train.py's resume), so each
    segment's cosine learning-rate schedule ends at its own last step: the same for every design."""
    start = time.time()
    run, out = Path(run), Path(out)
    data_args = ablation_folder(run, out, sizes, device)
    stage1 = blip3o.load_checkpoint(out / "understand", stage="understand")[1]
    points = list(range(sizes["every"], sizes["steps"] + 1, sizes["every"]))
    points += [sizes["steps"]] if points[-1] != sizes["steps"] else []
    before = understanding(out, "flow-clip", sizes, device)
    designs, sequential_lm = {}, None
    for variant in (*DESIGNS, "joint"):
        argv = (["--stage", "joint"] if variant == "joint" else
                ["--stage", "generate", "--loss", variant.split("-")[0], "--target", variant.split("-")[1]])
        d = designs[variant] = {"name": DESIGNS.get(variant, JOINT), "curve": [], "train_seconds": 0.0,
                                "eval_seconds": 0.0, "lm_bit_identical": True, "lm_max_change": 0.0}
        for i, step in enumerate(points):
            t = time.time()
            trained = train_segment(out, argv, step, sizes["batch"], data_args, device, restart=i == 0)
            d["train_seconds"] += time.time() - t
            identical, change = lm_change(trained.vlm, stage1)  # after every segment, tensor by tensor
            d["lm_bit_identical"] &= identical
            d["lm_max_change"] = max(d["lm_max_change"], change)
            t = time.time()
            d["curve"].append({"step": step, **score_design(out, variant, sizes, device)})
            d["eval_seconds"] += time.time() - t
            print(f"[ablation] {d['name']} at step {step}: toy GenEval {d['curve'][-1]['geneval']:.3f}, "
                  f"CLIP-space retrieval {d['curve'][-1]['retrieval']:.3f}; LM "
                  f"{'bit-identical to stage 1' if identical else f'changed (largest change {change:.2e})'}",
                  flush=True)
        if variant == "flow-clip":
            sequential_lm = {k: v.detach().clone() for k, v in trained.vlm.state_dict().items()}
    und = {"before": before, "sequential_after": understanding(out, "flow-clip", sizes, device, sequential_lm),
           "joint_after": understanding(out, "joint", sizes, device)}
    diversity = eval_diversity(out, list(DESIGNS), diversity_prompts(), sizes["seeds"], sizes["sample_steps"],
                               REPORT["cfg"], sizes["decoder_steps"], REPORT["decoder_cfg"], device=device)
    result = {"run": str(run), "out": str(out), "sizes": sizes, "data": data_args, "points": points,
              "designs": designs, "understanding": und, "diversity": diversity}
    result["findings"] = ablation_findings(result)
    result["seconds"] = time.time() - start
    result = rounded(result)
    (out / "ablation.json").write_text(json.dumps(result, indent=1) + "\n")
    plot_ablation(result, out / "ablation.png")
    (out / "ablation.md").write_text(ablation_markdown(result))
    return result


def ablation_findings(r: dict) -> dict:
    """The paper's three findings, as the numbers measured here (whatever they say)."""
    d = r["designs"]
    clip, vae = d["flow-clip"]["curve"], d["flow-vae"]["curve"]
    ratio = r["diversity"].get("mse_over_flow", {})
    und = r["understanding"]
    return {
        "1_clip_vs_vae": {"steps": r["points"][-1], "clip_flow_geneval": clip[-1]["geneval"],
                          "vae_flow_geneval": vae[-1]["geneval"], "clip_flow_retrieval": clip[-1]["retrieval"],
                          "vae_flow_retrieval": vae[-1]["retrieval"],
                          "clip_ahead_points": sum(c["geneval"] > v["geneval"] for c, v in zip(clip, vae)),
                          "clip_behind_points": sum(c["geneval"] < v["geneval"] for c, v in zip(clip, vae)),
                          "points": len(clip)},
        "2_mse_over_flow_diversity": ratio.get("clip_embedding"),
        "2_reproduced": all(x is not None and x <= 0.1 for x in ratio.values()) if ratio else False,
        "3_sequential_lm_bit_identical": all(d[v]["lm_bit_identical"] for v in DESIGNS),
        "3_sequential_understanding_unchanged":
            und["sequential_after"]["accuracy"] == und["before"]["accuracy"],
        "3_joint_understanding_change": und["joint_after"]["accuracy"] - und["before"]["accuracy"],
        "3_joint_minus_sequential_geneval": d["joint"]["curve"][-1]["geneval"] - clip[-1]["geneval"],
    }


def ablation_rows(r: dict) -> list[list]:
    """One row per design: final scores, diversity, understanding after, and the LM check."""
    und, div = r["understanding"], r["diversity"]["variants"]
    rows = []
    for variant, d in r["designs"].items():
        final = d["curve"][-1]
        after = und["joint_after" if variant == "joint" else "sequential_after"]["accuracy"]
        lm = "bit-identical" if d["lm_bit_identical"] else f"changed (largest change {d['lm_max_change']:.1e})"
        rows.append([d["name"] + (" (BLIP3-o)" if variant == "flow-clip" else ""), final["geneval"],
                     final["retrieval"], div[variant]["clip_embedding"] if variant in div else "-", after, lm])
    return rows


ABLATION_HEADER = ["design", "toy GenEval", "CLIP retrieval", "diversity (CLIP)", "understanding", "LM weights"]


def print_ablation(r: dict) -> None:
    steps = r["points"][-1]
    print(f"\nThe design study at {steps} steps per design (batch {r['sizes']['batch']}, "
          f"{r['seconds'] / 60:.1f} min); understanding before stage 2: "
          f"{r['understanding']['before']['accuracy']:.3f}")
    print(format_table(ABLATION_HEADER, ablation_rows(r)))
    print(f"files: {Path(r['out']) / 'ablation.md'}, ablation.png, ablation.json")


def plot_ablation(r: dict, path) -> None:
    """Score vs training steps for the three designs: the paper's Figure 4 in miniature."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    for ax, key, title in ((axes[0], "geneval", "toy GenEval (held-out prompts, pixels)"),
                           (axes[1], "retrieval", "prompt retrieval in CLIP space")):
        for variant, name in DESIGNS.items():
            curve = r["designs"][variant]["curve"]
            ax.plot([p["step"] for p in curve], [p[key] for p in curve], marker="o", label=name)
        ax.set_xlabel("training steps")
        ax.set_title(title, fontsize=10)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def ablation_markdown(r: dict) -> str:
    """OUT/ablation.md: the summary table, the curves as a table and a plot, diversity, findings."""
    s, f, und = r["sizes"], r["findings"], r["understanding"]
    steps = r["points"][-1]
    md = ["# The BLIP3-o design study at toy scale", "",
          f"`python eval.py ablation --run {r['run']} --out {r['out']} --steps {steps} --every {s['every']}`: "
          f"every design trained {steps} steps (batch {s['batch']}, {r['data']['images']} training images, "
          f"seed {r['data']['seed']}) from the same CLIP, stage-1 VLM and pixel decoder of `{r['run']}`; "
          f"{r['seconds'] / 60:.1f} min in all.", "",
          "| " + " | ".join(ABLATION_HEADER) + " |", "|" + " --- |" * len(ABLATION_HEADER)]
    md += ["| " + " | ".join(fmt(c) if isinstance(c, float) else str(c) for c in row) + " |"
           for row in ablation_rows(r)]
    md += ["", f"Understanding (exact match, {und['before']['questions']} held-out questions) before stage 2: "
           f"{und['before']['accuracy']:.3f}. Diversity: mean distance between two samples of one prompt, "
           "in toy CLIP embedding space (see below).", "",
           "## Score vs steps (Figure 4 in miniature)", "", "![score vs steps](ablation.png)", "",
           "| step | " + " | ".join(d["name"] for d in r["designs"].values()) + " |",
           "|" + " --- |" * (len(r["designs"]) + 1)]
    for i, step in enumerate(r["points"]):
        cells = [f"{d['curve'][i]['geneval']:.3f} / {d['curve'][i]['retrieval']:.3f}"
                 for d in r["designs"].values()]
        md.append(f"| {step} | " + " | ".join(cells) + " |")
    md += ["", "Each cell: toy GenEval / CLIP-space retrieval, "
           f"{r['designs']['flow-clip']['curve'][-1]['images']} samples ({s['per_tag']} held-out prompts per "
           f"tag at most, {s['per_prompt']} each; "
           f"{s['sample_steps']} Euler steps, CFG {REPORT['cfg']}).", "",
           "## Diversity (Finding 2)", "",
           f"{r['diversity']['seeds']} seeds for each of {len(r['diversity']['prompts'])} held-out prompts; "
           "the pixel decoder gets the same noise for every seed, so pixels differ only where the generated "
           "tokens do.", "",
           "| design | CLIP embedding | tokens (unit std) | pixels |", "| --- | --- | --- | --- |"]
    for variant, v in r["diversity"]["variants"].items():
        md.append(f"| {DESIGNS[variant]} | {v['clip_embedding']:.4f} | {v['tokens']:.4f} | {v['pixels']:.4f} |")
    md += ["", "![diversity](diversity.png)", "", "## The three findings, as measured here", ""]
    f1 = f["1_clip_vs_vae"]
    md.append(f"1. CLIP vs VAE target at {f1['steps']} steps: toy GenEval {f1['clip_flow_geneval']:.3f} "
              f"(CLIP + Flow) vs {f1['vae_flow_geneval']:.3f} (VAE + Flow); CLIP-space retrieval "
              f"{f1['clip_flow_retrieval']:.3f} vs {f1['vae_flow_retrieval']:.3f}. In toy GenEval CLIP + Flow is "
              f"ahead at {f1['clip_ahead_points']} and behind at {f1['clip_behind_points']} of {f1['points']} "
              "evaluation points (paper: CLIP ahead throughout).")
    ratio = f["2_mse_over_flow_diversity"]
    md.append(f"2. MSE / Flow diversity in CLIP space: {fmt(ratio)} (paper: MSE nearly deterministic; the "
              "acceptance bound is 0.1 in every space): "
              f"{'reproduced' if f['2_reproduced'] else 'NOT reproduced'}.")
    md.append(f"3. Sequential: the LM is bit-identical to stage 1 after every training segment of all three "
              f"designs: {'yes' if f['3_sequential_lm_bit_identical'] else 'NO'}; understanding "
              f"{und['before']['accuracy']:.3f} before, {und['sequential_after']['accuracy']:.3f} after. Joint "
              f"(LM unfrozen, half of every batch understanding rows): understanding "
              f"{und['joint_after']['accuracy']:.3f} ({f['3_joint_understanding_change']:+.3f}), toy GenEval "
              f"{f['3_joint_minus_sequential_geneval']:+.3f} against sequential CLIP + Flow.")
    md += ["", "## How it was measured", "",
           "- Toy GenEval: the shapes-world detector scores the decoded pixels (the CLIP diffusion decoder "
           "for CLIP targets, the VAE decoder for VAE + Flow). CLIP-space retrieval: does the CLIP embedding "
           "of a sample retrieve its own prompt among all prompts of its tag (VAE samples are decoded, then "
           "encoded by CLIP).",
           f"- Training runs in segments of {s['every']} steps (`--steps {s['every']}`, `--steps "
           f"{2 * s['every']}`, ... with train.py's resume), so each segment's cosine learning-rate schedule "
           "ends at its own last step; every design sees the same schedule, data order and noise.",
           "- Joint: `train.py --stage joint`, started from the same stage-1 checkpoint and the same initial "
           "generator as sequential CLIP + Flow, the same steps and batch size, half of each batch question-answer rows (next-token loss), half generation rows "
           "(flow loss), the sum back-propagated into LM, projector, queries and DiT; evaluated with the EMA "
           "of all of them.",
           "- Time: " + ", ".join(f"{d['name']} {d['train_seconds'] / 60:.1f} min training + "
                                   f"{d['eval_seconds'] / 60:.1f} min scoring" for d in r["designs"].values())
           + ".", ""]
    return "\n".join(md)


# ----------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------


def parse_args(argv=None):
    p = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name, help):
        c = sub.add_parser(name, help=help, description=help)
        if name != "geneval":
            c.add_argument("--run", default="out/toy", help="run folder written by train.py")
            c.add_argument("--device", default="auto", help="auto (CUDA -> MPS -> CPU), cpu, cuda, ...")
        c.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default; 1 "
                       "is often faster on a CPU that other processes keep busy)")
        return c

    c = command("clip", "zero-shot classification and retrieval of held-out images")
    c.add_argument("--n", type=int, default=500, help="images per test set")
    c = command("understand", "exact-match question answering and captioning")
    c.add_argument("--n", type=int, default=1000, help="questions")
    c.add_argument("--captions", type=int, default=200, help="images to caption")
    for name, help in (("clipgen", "generated CLIP features scored by prompt retrieval"),
                       ("toygeneval", "the toy GenEval prompt set, generated and scored")):
        c = command(name, help)
        c.add_argument("--variant", default="flow-clip", help="flow-clip, mse-clip or flow-vae")
        c.add_argument("--steps", type=int, default=30, help="Euler steps, text -> target tokens")
        c.add_argument("--cfg", type=float, default=3.0, help="classifier-free guidance scale")
        c.add_argument("--seed", type=int, default=0, help="sample j uses seed + j")
        c.add_argument("--tags", default=",".join(data.TAGS),
                       help="comma-separated GenEval tags to score (default: all six)")
        if name == "clipgen":
            c.add_argument("--per-tag", type=int, default=8, help="held-out prompts per GenEval tag (at most; "
                           "more than a tag has: all of them, e.g. --tags single_object,colors --per-tag 100)")
            c.add_argument("--samples", type=int, default=4, help="samples per prompt")
        else:
            c.add_argument("--per-prompt", type=int, default=4, help="images per prompt")
            c.add_argument("--per-tag", type=int, default=16, help="held-out prompts per tag (at most)")
            c.add_argument("--decoder-steps", type=int, default=20, help="Euler steps, tokens -> pixels")
            c.add_argument("--decoder-cfg", type=float, default=1.0, help="guidance of the pixel decoder")
    c = command("recon", "reconstructions of held-out images scored by the GenEval rules")
    c.add_argument("--n", type=int, default=200, help="images")
    c.add_argument("--decoder-steps", type=int, default=20, help="Euler steps of the pixel decoder")
    c = command("report", "every evaluation -> RUN/REPORT.md, metrics.json and pictures")
    c.add_argument("--force", action="store_true", help="re-evaluate even if the checkpoints are unchanged")
    c = command("diversity", "spread of the samples of one prompt over seeds, per design (Finding 2)")
    c.add_argument("--variants", default=",".join(DESIGNS), help="comma-separated: flow-clip, mse-clip, "
                   "flow-vae, joint (default: the paper's three designs)")
    c.add_argument("--prompts", nargs="+", default=None, help="prompts (default: one held-out prompt per tag)")
    c.add_argument("--allow-unknown-words", action="store_true",
                   help="go on with prompt words the toy model never saw (read as <unk>)")
    c.add_argument("--seeds", type=int, default=8, help="samples per prompt, seeds seed .. seed+seeds-1")
    c.add_argument("--seed", type=int, default=0, help="first seed")
    c.add_argument("--steps", type=int, default=30, help="Euler steps, text -> target tokens")
    c.add_argument("--cfg", type=float, default=3.0, help="classifier-free guidance scale")
    c.add_argument("--decoder-steps", type=int, default=20, help="Euler steps, tokens -> pixels")
    c.add_argument("--decoder-cfg", type=float, default=1.0, help="guidance of the pixel decoder")
    c = command("ablation", "the paper's design study: CLIP/VAE x MSE/Flow, sequential vs joint -> "
                "OUT/ablation.md, .png, .json")
    c.add_argument("--out", default="out/ablation", help="folder of the study (RUN's checkpoints are copied in)")
    c.add_argument("--steps", dest="train_steps", metavar="N", type=int, default=None,
                   help=f"training steps per design (default {ABLATION['default']['steps']})")
    c.add_argument("--every", metavar="K", type=int, default=None,
                   help=f"evaluate every K steps (default {ABLATION['default']['every']})")
    c.add_argument("--quick", action="store_true", help="tiny sizes: a few steps, a few samples (tests)")
    c = command("geneval", "score a folder in GenEval's layout; writes DIR/results.jsonl")
    c.add_argument("dir", metavar="DIR", help="folder with 00000/metadata.jsonl, 00000/samples/0000.png ...")

    args = p.parse_args(argv)
    for name in ("n", "captions", "steps", "per_tag", "samples", "per_prompt", "decoder_steps"):
        if getattr(args, name, 1) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    for name in ("cfg", "decoder_cfg"):
        if not getattr(args, name, 0.0) >= 0:
            p.error(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")

    def comma_list(flag: str, value: str, allowed) -> list[str]:
        items = [v.strip() for v in value.split(",") if v.strip()]
        unknown = [v for v in items if v not in allowed]
        if unknown or not items:
            p.error(f"{flag}: unknown {', '.join(unknown) or '(none given)'}; use {', '.join(allowed)}")
        return items

    if args.command in ("clipgen", "toygeneval"):
        args.tags = comma_list("--tags", args.tags, data.TAGS)
    if args.command == "diversity":
        if args.seeds < 2:
            p.error(f"--seeds must be at least 2 (a spread needs two samples), got {args.seeds}")
        args.variants = comma_list("--variants", args.variants, (*DESIGNS, "joint"))
    if args.command == "ablation":
        for flag, value in (("--steps", args.train_steps), ("--every", args.every)):
            if value is not None and value < 1:
                p.error(f"{flag} must be at least 1, got {value}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    try:
        metrics = run_command(args)
    except (UserError, blip3o.CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(rounded(metrics)))  # the last line of stdout: the metrics
    return 0


def run_command(args) -> dict:
    if args.command == "geneval":
        m = eval_geneval(args.dir)
        print_geneval(m, f"GenEval scores of {args.dir} (results.jsonl written there)")
        return m
    device = blip3o.pick_device(args.device)
    if args.command == "report":
        record = full_report(args.run, device=device, force=args.force)
        return {"metrics": record["metrics"], "cached": record["cached"]}
    if args.command == "clip":
        m = eval_clip(sample.load_pipeline(args.run, device=device), args.n)
        print_clip(m)
    elif args.command == "understand":
        m = eval_understand(sample.load_pipeline(args.run, device=device, need=("clip", "understand")),
                            args.n, args.captions)
        print_understand(m)
    elif args.command == "clipgen":
        pipe = sample.load_pipeline(args.run, args.variant, device, need=("clip", "understand", "generate"))
        if pipe.target == "vae":
            sample.check_pixels(pipe, args.run)
        m = {"variant": args.variant, **eval_clipgen(pipe, args.per_tag, args.samples, args.steps, args.cfg,
                                                    args.seed, args.tags)}
        print_clipgen(m, args.variant)
    elif args.command == "recon":
        m = eval_recon(sample.load_pipeline(args.run, device=device, need=("clip", "decoder")), args.n,
                       args.decoder_steps)
        print_recon(m)
    elif args.command == "diversity":
        try:
            m = eval_diversity(args.run, args.variants, args.prompts or diversity_prompts(), args.seeds,
                               args.steps, args.cfg, args.decoder_steps, args.decoder_cfg, args.seed, device,
                               args.allow_unknown_words)
        except ValueError as e:  # e.g. an empty prompt, or one longer than the backbone's context
            raise UserError(str(e)) from None
        print_diversity(m)
    elif args.command == "ablation":
        sizes = dict(ABLATION["quick" if args.quick else "default"])
        sizes["steps"] = args.train_steps or sizes["steps"]
        sizes["every"] = min(args.every or sizes["every"], sizes["steps"])
        m = run_ablation(args.run, args.out, sizes, device)
        print_ablation(m)
    else:  # toygeneval
        pipe = sample.load_pipeline(args.run, args.variant, device, need=("clip", "understand", "generate"))
        m, *_ = eval_toygeneval(pipe, args.run, args.variant, args.per_prompt, args.per_tag, args.steps,
                                args.cfg, args.decoder_steps, args.decoder_cfg, args.seed, tags=args.tags)
        print_geneval(m, f"Toy GenEval ({args.variant}): {m['images']} images in {m['folder']}")
        m = {"variant": args.variant, **m}
    return m


if __name__ == "__main__":
    sys.exit(main())
