"""Train BLIP3-o, stage by stage: the whole toy pipeline on a laptop, or one stage on many GPUs.

Laptop (CPU, minutes): the whole toy pipeline, then the evaluations and out/toy/REPORT.md
    python train.py
One stage (each later stage finds the earlier ones under --out):
    python train.py --stage clip                  # contrastive toy CLIP        -> out/toy/clip/
    python train.py --stage understand            # stage 1: projector + LM     -> out/toy/understand/
    python train.py --stage decoder               # scene tokens -> pixels      -> out/toy/decoder/
    python train.py --stage generate --loss flow  # stage 2: queries + Next-DiT -> out/toy/generate/flow-clip/
    python train.py --stage generate --loss mse   # ablation: CLIP + MSE        -> out/toy/generate/mse-clip/
    python train.py --stage vae && python train.py --stage generate --target vae   # ablation: VAE + Flow
    python train.py --stage joint                 # ablation: LM unfrozen, both tasks mixed
Several processes (same code path; gloo on CPU, NCCL on GPUs):
    torchrun --standalone --nproc_per_node=2 train.py --stage generate   # the toy stage 2 on 2 CPU ranks:
                                                # the same losses as one process with --grad-accum 2
    torchrun --standalone --nproc_per_node=8 train.py --stage generate --preset blip3o-8b \
        --data 'shards/{00000..00999}.tar' --global-batch 512 --fsdp --grad-checkpointing --compile \
        --out out/8b
        # WebDataset shards (or --data FOLDER --captions captions.jsonl) streamed and split over the ranks,
        # encoded by the frozen CLIP as they arrive; --fsdp shards the DiT's weights, gradients and Adam
        # state (FSDP2); --compile compiles each Next-DiT block

A stage that finished is skipped, a half-finished one resumes from its last checkpoint, data position
included (`--restart` starts it over). Global batch = batch-size x grad-accum x world size, printed at
start. Mistakes in the command line or the run folder stop with one line and exit status 2; a NaN loss
stops with exit status 1, naming the step and the last good checkpoint.

Read in this order: the recipe (numbers), the stages in the data's order, `main`; then the loop (`fit`)
and the machinery under it (resume, EMA, FSDP, distributed helpers) at the bottom.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from tqdm import tqdm

import blip3o
import data
import pipeline
from cli import OneLineParser, UserError, positive_int

# --- The recipe ---------------------------------------------------------------------------------------

STAGES = ("clip", "understand", "decoder", "vae", "generate", "joint")
PIPELINE = ("clip", "understand", "decoder", "generate")  # what `--stage all` trains, in data order

# Toy defaults per stage: steps, micro-batch, learning rate. Sized so each stage takes a few minutes on
# 2 CPU cores and reaches the README's numbers. Real presets: the paper's stage 2 (lr 1e-4, cosine).
TOY = {
    "clip": dict(steps=3000, batch=128, lr=2e-3),
    "understand": dict(steps=2400, batch=96, lr=2e-3),  # 64 image rows + 32 text rows
    "decoder": dict(steps=4000, batch=64, lr=1e-3),
    "vae": dict(steps=600, batch=64, lr=2e-3),
    "generate": dict(steps=5333, batch=16, lr=2e-3),  # prompts (x2 noise draws each); see TAG_WEIGHTS
    "joint": dict(steps=1000, batch=64, lr=1e-3),
}
REAL = dict(steps=100000, batch=64, lr=1e-4)
TOY_IMAGES = 16384  # training images drawn from the shapes world (split "train"), shared by all stages
UNDERSTAND_TURNS = 4  # question/answer turns packed after each image in stage-1 training
# Binding questions (a colour or a relation asked about one of several objects) are drawn this many times
# as often as the others: single-object, shape and count questions are learnt within the first few hundred
# steps, and the rest of the stage goes where the LM is still wrong.
BINDING_WEIGHT = 3.0
# Share of each stage-1 micro-batch given to text-only rows: a generation prompt, then questions answered
# from its caption alone (see text_qa_table). A real backbone is a language model before it sees images;
# the toy LM learns to read a caption here, and stage 2 reads captions through it (NOTES.md).
UNDERSTAND_TEXT_ROWS = 1 / 3
# Teaching questions (data.AUX_QTYPES) that can be mixed into stage 1, never scored: "place" asks where one
# object sits ("where is the circle ?" -> "above left"). None: at 2400 steps they cost shape binding.
AUX_QUESTIONS = ()
# Stage 2 draws the images of the two compositional tags, whose prompts state a relation or two colours,
# 3x as often as the others, and its steps are 3200 x 10 / 6 so that the others keep theirs: drawn as
# often as the rest, the generator hedges between the two ways to colour two objects (NOTES.md).
TAG_WEIGHTS = {"position": 3.0, "color_attr": 3.0}


def stage_hparams(args, stage: str) -> dict:
    """Steps, micro-batch and learning rate of a stage: the recipe's, unless the command line says."""
    base = TOY[stage] if args.config.preset == "toy" else REAL
    batch = args.batch_size or base["batch"]
    if args.global_batch:  # divisible: checked in check_args
        batch = args.global_batch // (args.grad_accum * dist_info()[2])
    return dict(steps=args.steps or base["steps"], batch=batch, lr=args.lr or base["lr"])


class Objective(nn.Module):
    """A module and its training loss as one forward, so DDP's gradient hooks see the computation.

    forward(*batch, rng) -> (loss, logs dict of floats); `inner` is what gets checkpointed.
    """

    def __init__(self, inner: nn.Module, loss_fn):
        super().__init__()
        self.inner = inner
        self.loss_fn = loss_fn  # (inner, *batch, rng) -> (loss, logs): each stage's closure below

    def forward(self, *batch, rng=None):
        return self.loss_fn(self.inner, *batch, rng)


@dataclass
class Plan:
    """What a stage trains and how: each stage function below returns one, and `fit` runs it."""

    name: str  # e.g. "generate/flow-clip": also the checkpoint folder under --out
    model: "Objective"  # holds every trainable parameter (frozen parts may sit inside it)
    chunk_fn: object  # (step, chunk_index, size, generator) -> batch: deterministic, so resume is exact
    save_fn: object  # (inner module) -> dict of tensors to checkpoint (trainable and needed buffers)
    meta: dict  # extra JSON saved with the checkpoint (what later stages need to rebuild this one)
    steps: int
    batch: int
    lr: float
    tokenizer: object = None
    # Keep an EMA of the trainable weights; its tensors are saved as "ema." + ema_prefix + name, so that
    # "ema.<key>" shadows the checkpoint key "<key>" (see pipeline.load_module(..., ema=True)).
    ema_prefix: str | None = None
    # --fsdp: (inner module) -> the modules fully_shard made FSDP roots (only stages that support it).
    shard_fn: object = None
    # A streamed dataset (data.StreamBatches) whose read position is checkpointed per rank; None: the
    # toy's indexed data, which needs no position (chunk c of step s is a pure function of (seed, s, c)).
    stream: object = None


# --- What every stage reads: the toy images and the frozen parts trained before it --------------------

_IMAGE_SET = {}


def toy_images(args):
    """The training images (uint8 (N, 3, 32, 32)) and their scenes, from the shapes world."""
    key = (args.images, args.seed)
    if key not in _IMAGE_SET:
        _IMAGE_SET[key] = data.make_image_set(args.images, split="train", seed=args.seed,
                                              image_size=args.config.clip.image_size)
    return _IMAGE_SET[key]


@torch.no_grad()
def encode_all(fn, images_u8: torch.Tensor, device, batch: int = 512) -> torch.Tensor:
    """Run a frozen encoder once over the whole image set: its outputs never change, so they are cached."""
    with pipeline.autocast(device):  # the frozen encoder may be in bf16 (CUDA), its input is fp32
        return torch.cat([fn(data.as_float(images_u8[i:i + batch]).to(device)).float().cpu()
                          for i in range(0, len(images_u8), batch)])


def load_clip(args, device) -> tuple:
    """The frozen CLIP and the run's tokenizer: a pretrained open_clip model, or the toy's from RUN/clip."""
    if args.config.clip.name is not None:  # built in place: 4 B parameters
        enc = blip3o.ImageEncoder(args.config.clip, device=device)
        tok = blip3o.load_tokenizer(args.config.lm.name)
    else:
        enc, tok, saved = pipeline.load_clip(args.out)
        # The run's CLIP is what was trained, whatever the preset says now; the vocabulary is shared.
        args.config.clip, args.config.lm.vocab_size = saved.clip, len(tok)
        enc = enc.to(device)
    # Frozen: bf16 on CUDA (half the memory, no gradients to lose), fp32 elsewhere.
    enc.to(torch.bfloat16 if device.type == "cuda" else torch.float32).requires_grad_(False).eval()
    return enc, tok


def load_lm(args, tok, device):
    """The frozen stage-1 VLM (LM + projector): a pretrained backbone, or the toy's from RUN/understand."""
    cfg = args.config
    if cfg.lm.name is not None:
        lm = blip3o.build_backbone(cfg.lm, device=device)
        vlm = blip3o.VisionLanguageModel(lm, cfg.clip.width, tok.convert_tokens_to_ids(cfg.lm.image_token))
    else:
        vlm = pipeline.load_vlm(args.out, tok, cfg.clip.width)
    vlm = vlm.to(device)
    if device.type == "cuda":  # frozen: bf16 (a real backbone is built in bf16 already)
        vlm.to(torch.bfloat16)
    return vlm.requires_grad_(False).eval()


def stack_labels(per_scene) -> list[torch.Tensor]:
    """Per-scene label arrays (a tuple per scene) -> one tensor per label, scenes stacked first."""
    return [torch.from_numpy(np.stack(x)) for x in zip(*per_scene)]


# --- The stages, in the data's order: CLIP -> understanding -> decoder -> generation (+ ablations) ----

def plan_clip(args, device) -> Plan:
    """Contrastive training of the toy CLIP on (image, caption or prompt) pairs."""
    cfg = args.config
    if cfg.clip.name is not None:
        raise UserError(f"--stage clip trains the toy CLIP; preset {cfg.preset} uses the pretrained "
                        f"{cfg.clip.name}")
    tok = blip3o.build_toy_tokenizer(data.VOCAB)
    cfg.clip.vocab_size = len(tok)
    images, scenes = toy_images(args)
    # Plus as many single-object images again: shape is what a tiny CLIP learns slowest (colour comes
    # first), and a lone object is where a caption pins its shape down.
    extra, extra_scenes = data.make_image_set(len(images), split="train", seed=args.seed + 1,
                                              image_size=cfg.clip.image_size,
                                              tags=["colors", "single_object"])
    images, scenes = torch.cat([images, extra]), scenes + extra_scenes
    # Each image has two texts: the free caption (every object) and its GenEval-style prompt.
    cap_ids, _ = blip3o.encode_texts(tok, [s.caption for s in scenes], cfg.clip.context_length)
    prm_ids, _ = blip3o.encode_texts(tok, [s.prompt for s in scenes], cfg.clip.context_length)
    enc = blip3o.ImageEncoder(cfg.clip)
    # Per-token labels for the dense objective: (N, 64) colour, (N, 64) shape, (N, 64, 4) box; and per-scene
    # labels for the scene tokens: (N, 4) colour, (N, 4) shape, (N, 4, 4) box.
    dense = stack_labels(data.token_labels(s, cfg.clip.grid) for s in scenes)
    whole = stack_labels(data.scene_labels(s) for s in scenes)

    def chunk_fn(step, chunk, size, rng):
        idx = torch.randint(len(images), (size,), generator=rng)
        use_prompt = torch.rand(size, generator=rng) < 0.5
        ids = torch.where(use_prompt[:, None], prm_ids[idx], cap_ids[idx])
        return (data.as_float(images[idx]).to(device), ids.to(device),
                *(x[idx].to(device) for x in dense + whole))

    def loss(enc, images_b, ids, colour, shape, box, s_colour, s_shape, s_box, rng):
        if enc.dense_head is None:
            return enc.contrastive_loss(images_b, ids), {}
        tokens = enc.tokens(images_b)  # (B, 64, D_clip)
        l_clip = enc.contrastive_loss(images_b, ids, tokens)
        l_dense = enc.dense_loss(tokens, colour, shape, box)
        logs = {"loss_clip": float(l_clip.detach()), "loss_dense": float(l_dense.detach())}
        value = l_clip + cfg.clip.dense_weight * l_dense
        if enc.scene is not None:  # the scene blocks read the patch tokens detached: their own objective
            l_scene = enc.scene_loss(enc.scene_tokens(tokens), s_colour, s_shape, s_box)
            logs["loss_scene"] = float(l_scene.detach())
            value = value + l_scene
        return value, logs

    return Plan("clip", Objective(enc, loss), chunk_fn, lambda m: pipeline.module_tensors("clip", m), {},
                tokenizer=tok, **stage_hparams(args, "clip"))


def qa_table(scenes, seed: int):
    """Every (image index, question, answer, weight) of the training scenes, plus one caption request.

    The weight is how often a turn is drawn relative to the others of its image (see plan_understand):
    BINDING_WEIGHT for the questions that need the right one of several objects (a colour or a relation
    in an image of two or more), 1 for the rest, which a small LM answers early."""
    rows = []
    for i, s in enumerate(scenes):
        for qtype, q, a in data.make_qa(s, random.Random(data.stable_seed("qa", seed, i)), AUX_QUESTIONS):
            binding = len(s.objects) >= 2 and qtype in ("color", "position", "color_position")
            rows.append((i, q, a, BINDING_WEIGHT if binding else 1.0))
        rows.append((i, data.caption_question, s.caption, 1.0))
    return rows


def text_qa_table(scenes, seed: int, template: str) -> list[list[tuple[str, str]]]:
    """Text-only conversations, two per training scene: the generation prompt wrapping the scene's caption,
    and wrapping its GenEval-style prompt, each followed by the questions that text alone answers, in a
    seeded order (the first turn carries the prompt). The caption names every object's colour and shape
    and, for two objects, their relation; the GenEval-style prompt names what its record includes."""
    out = []
    for i, s in enumerate(scenes):
        qa = data.make_qa(s, random.Random(data.stable_seed("text-qa", seed, i)), AUX_QUESTIONS)
        # The caption states every colour, shape and count, and the relation of two objects of two shapes
        # ("two squares in red and blue" states none); a GenEval-style prompt states every object and count,
        # colours only when it names them all (colors, color_attr), and a relation only for the position tag.
        relation = len(s.objects) == 2 and s.objects[0].shape != s.objects[1].shape
        by_caption = {"color", "shape", "count"} | ({"position", "color_position"} if relation else set())
        by_prompt = {"count"} | ({"color", "shape"} if all("color" in inc for inc in s.metadata["include"])
                                 else set()) | ({"position"} if s.tag == "position" else set())
        for text, stated in ((s.caption, by_caption), (s.prompt, by_prompt)):
            turns = [(q, a) for qtype, q, a in qa if qtype in stated]
            out.append([(template.format(text) + " . " + turns[0][0], turns[0][1])] + turns[1:])
    return out


def plan_understand(args, device) -> Plan:
    """Stage 1: projector + LM learn to answer questions about CLIP tokens (CLIP frozen).

    A third of every micro-batch (UNDERSTAND_TEXT_ROWS) is text-only: a generation prompt and questions its
    caption answers. Stage 2 reads prompts through this LM without an image, which image-only training
    never shows it: with image rows alone, the frozen LM's query states carry the prompt's colour so
    weakly that the generator ignores colour words (NOTES.md has the measurements)."""
    cfg = args.config
    if cfg.lm.name is not None:
        raise UserError("stage 1 at real scale is Qwen2.5-VL as released; --stage understand trains the toy")
    enc, tok = load_clip(args, device)
    images, scenes = toy_images(args)
    print0("[understand] encoding the training images with the frozen CLIP ...")
    clip_tokens = encode_all(enc.tokens, images, device)  # (N, 64, D_clip)
    rows = qa_table(scenes, args.seed)
    lm = blip3o.build_backbone(cfg.lm)
    if args.grad_checkpointing:
        enable_grad_checkpointing(lm)
    image_id = tok.convert_tokens_to_ids(blip3o.IMAGE)
    vlm = blip3o.VisionLanguageModel(lm, cfg.clip.width, image_id, cfg.lm.image_merge)
    n_image = vlm.image_tokens(clip_tokens.shape[1])  # <image> placeholders per image

    # Every distinct question and answer is tokenized once here, in one call: no step calls the tokenizer.
    text_rows = text_qa_table(scenes, args.seed, cfg.prompt_template)
    texts = list(dict.fromkeys([x for _, q, a, _ in rows for x in (q, a)]
                               + [x for turns in text_rows for turn in turns for x in turn]))
    ids = dict(zip(texts, tok(texts, add_special_tokens=False)["input_ids"]))  # text -> its token ids
    per_image = [[] for _ in range(len(images))]  # image index -> its (question, answer) turns, as ids
    weights = [[] for _ in range(len(images))]  # image index -> how often each turn is drawn
    for i, q, a, w in rows:
        per_image[i].append((ids[q], ids[a]))
        weights[i].append(torch.tensor(w))
    weights = [torch.stack(w) for w in weights]
    text_rows = [[(ids[q], ids[a]) for q, a in turns] for turns in text_rows]

    def chunk_fn(step, chunk, size, rng):
        n_text = int(size * UNDERSTAND_TEXT_ROWS)
        img = torch.randint(len(images), (size - n_text,), generator=rng)
        conversations = []
        for i in img.tolist():  # up to UNDERSTAND_TURNS turns about each image, drawn by weight
            k = min(UNDERSTAND_TURNS, len(per_image[i]))
            order = torch.multinomial(weights[i], k, replacement=False, generator=rng).tolist()
            conversations.append([per_image[i][j] for j in order])
        ids, labels, _ = blip3o.build_conversation_batch(tok, n_image, conversations)
        # Text rows: the prompt turn and up to UNDERSTAND_TURNS - 1 more, no image placeholders.
        pick = torch.randint(len(text_rows), (n_text,), generator=rng).tolist()
        t_ids, t_labels, _ = blip3o.build_conversation_batch(tok, 0, [text_rows[j][:UNDERSTAND_TURNS]
                                                                      for j in pick])
        return tuple(x.to(device) for x in (ids, clip_tokens[img], labels, t_ids, t_labels))

    def loss(vlm, ids, ctok, labels, t_ids, t_labels, rng):
        l_img = vlm(ids, ctok, labels)[0]
        if t_ids.shape[0] == 0:
            return l_img, {}
        l_txt = vlm(t_ids, None, t_labels)[0]
        n_img, n_txt = (labels[:, 1:] != -100).sum(), (t_labels[:, 1:] != -100).sum()
        value = (l_img * n_img + l_txt * n_txt) / (n_img + n_txt)  # the mean over every labelled token
        return value, {"loss_image": float(l_img.detach()), "loss_text": float(l_txt.detach())}

    return Plan("understand", Objective(vlm, loss), chunk_fn, lambda m: pipeline.module_tensors("vlm", m), {},
                tokenizer=tok, **stage_hparams(args, "understand"))


def plan_decoder(args, device) -> Plan:
    """The pixel decoder: scene tokens back to the image, one forward pass (CLIP frozen)."""
    cfg = args.config
    if cfg.decoder is None:
        raise UserError(f"preset {cfg.preset} has no toy pixel decoder (the real one is Emu2-Gen's UNet)")
    enc, tok = load_clip(args, device)
    images, scenes = toy_images(args)
    print0("[decoder] encoding the training images with the frozen CLIP ...")
    tokens = encode_all(enc.target_tokens, images, device)  # (N, 64, S)
    # The objects of each image in reading order: (N, 4) colour, (N, 4) shape, (N, 4, 4) box.
    objects = stack_labels(data.scene_labels(s) for s in scenes)
    dec = blip3o.PixelDecoder(cfg.decoder, tokens.shape[-1], cfg.clip.image_size)
    dec.cond_scale.fill_(float(tokens.std()))  # the decoder reads tokens / cond_scale: unit std

    def chunk_fn(step, chunk, size, rng):
        idx = torch.randint(len(images), (size,), generator=rng)
        batch = (data.as_float(images[idx]), tokens[idx], *(x[idx] for x in objects))
        return tuple(x.to(device) for x in batch)

    def loss(dec, images_b, tokens_b, colour, shape, box, rng):
        return dec.loss(images_b, tokens_b, colour, shape, box)

    return Plan("decoder", Objective(dec, loss), chunk_fn, lambda m: pipeline.module_tensors("decoder", m),
                {}, ema_prefix="decoder.", **stage_hparams(args, "decoder"))


def plan_vae(args, device) -> Plan:
    images, _ = toy_images(args)
    vae = blip3o.VAE(args.config.vae)

    def chunk_fn(step, chunk, size, rng):
        idx = torch.randint(len(images), (size,), generator=rng)
        return (data.as_float(images[idx]).to(device),)

    def loss(vae, images_b, rng):
        return vae.loss(images_b, rng=rng), {}

    return Plan("vae", Objective(vae, loss), chunk_fn, lambda m: pipeline.module_tensors("vae", m), {},
                **stage_hparams(args, "vae"))


def new_generator(args, vlm, loss: str, target_dim: int, targets: torch.Tensor | None = None):
    """A fresh stage-2 generator (queries + head), initialised as Config.query_init and .target_norm say."""
    cfg = args.config
    generator = blip3o.Generator(cfg, loss=loss, target_dim=target_dim)
    if cfg.target_norm and targets is not None:
        generator.target_scale.fill_(float(targets.std()))  # targets / target_scale: unit std
    if cfg.query_init == "embedding":
        with torch.no_grad():
            generator.queries.normal_(0.0, float(vlm.lm.get_input_embeddings().weight.std()))
    return generator


def toy_generation_data(args, enc, tok, device, target: str):
    """The toy world's stage-2 data: every training image's targets (scene tokens, or VAE latents),
    encoded once, and two phrasings of it, its free caption and its GenEval-style prompt, half and half.
    -> (chunk_fn: (step, chunk, size, rng) -> (prompt ids (B, T), lengths (B,), targets (B, 64, D)),
    all targets)."""
    images, scenes = toy_images(args)
    encoder = enc.target_tokens if target == "clip" else pipeline.load_vae(args.out).to(device).eval().tokens
    targets = encode_all(encoder, images, device)  # (N, 64, D)
    template = args.config.prompt_template
    c_ids, c_len, _ = blip3o.encode_prompts(tok, [s.caption for s in scenes], template=template)
    p_ids, p_len, _ = blip3o.encode_prompts(tok, [s.prompt for s in scenes], c_ids.shape[1], template)
    weights = torch.tensor([TAG_WEIGHTS.get(s.tag, 1.0) for s in scenes])  # draws per image, relative

    def chunk_fn(step, chunk, size, rng):
        idx = torch.multinomial(weights, size, replacement=True, generator=rng)
        use_prompt = torch.rand(size, generator=rng) < 0.5
        ids = torch.where(use_prompt[:, None], p_ids[idx], c_ids[idx])  # (B, T), padded to one length
        lens = torch.where(use_prompt, p_len[idx], c_len[idx])
        return ids.to(device), lens.to(device), targets[idx].to(device)

    return chunk_fn, targets


def streamed_generation_data(args, enc, tok, device):
    """Stage 2 on streamed image-caption data (--data): each rank reads its share of the samples, the
    frozen CLIP encodes the images as they arrive, and captions become prompts with the paper's template.
    -> (chunk_fn as toy_generation_data's, the first 64 samples' targets (for their scale) or None, the
    stream)."""
    cfg = args.config
    if args.target != "clip":
        raise UserError("--data trains the paper's target, CLIP features (--target clip)")
    rank, _, world = dist_info()
    stream = data.StreamBatches(data.open_source(args.data, args.captions, cfg.clip.image_size, rank, world))
    sample_targets = None
    if cfg.target_norm:  # the target scale: the first samples, read apart so every rank gets one number
        first = data.StreamBatches(data.open_source(args.data, args.captions, cfg.clip.image_size, 0, 1))
        with torch.no_grad(), pipeline.autocast(device):
            sample_targets = enc.target_tokens(first.take(64)[0].to(device)).float()
    limit = cfg.lm.max_length - cfg.num_queries  # the prompt and the 64 queries share the context

    def chunk_fn(step, chunk, size, rng):
        images, captions = stream.take(size)
        with torch.no_grad(), pipeline.autocast(device):
            targets = enc.target_tokens(images.to(device)).float()  # (B, 64, D_target)
        ids, lens, full = blip3o.encode_prompts(tok, captions, template=cfg.prompt_template)
        stream.truncated += int((full > limit).sum())
        return ids[:, :limit].to(device), lens.clamp(max=limit).to(device), targets

    return chunk_fn, sample_targets, stream


def plan_generate(args, device) -> Plan:
    """Stage 2: the frozen stage-1 LM reads each prompt followed by the 64 learnable queries, and the
    Next-DiT learns by flow matching to generate the image's target tokens from the queries' states (or,
    for the ablation, W by MSE). Trained: the queries and the head; the LM only passes gradients on."""
    cfg = args.config
    if cfg.clip.name is not None and not args.data:
        raise UserError(f"preset {cfg.preset} trains on real images: give them with --data SHARDS")
    enc, tok = load_clip(args, device)
    stream = None
    if args.data:
        chunk_fn, targets, stream = streamed_generation_data(args, enc, tok, device)
    else:
        chunk_fn, targets = toy_generation_data(args, enc, tok, device, args.target)
    vlm = load_lm(args, tok, device)
    if args.grad_checkpointing:
        enable_grad_checkpointing(vlm.lm)
    dim = enc.target_width if targets is None else targets.shape[-1]
    generator = new_generator(args, vlm, args.loss, dim, targets)
    sampling = args.time_sampling or cfg.time_sampling
    repeats = args.noise_repeats or (cfg.noise_repeats if args.loss == "flow" else 1)  # MSE draws no noise

    def loss(m, ids, lens, target, rng):  # m: {"generator", "vlm"}; the flow-matching step is one call
        value, t, per = m.generator.loss(m.vlm.lm, ids, lens, target, time_sampling=sampling,
                                         noise_repeats=repeats, rng=rng)
        return value, t_bin_logs(t, per)

    meta = {"loss": args.loss, "target": args.target, "target_dim": generator.target_dim}
    model = Objective(nn.ModuleDict({"generator": generator, "vlm": vlm}), loss)
    return Plan(f"generate/{args.loss}-{args.target}", model, chunk_fn,
                lambda m: pipeline.module_tensors("generator", m.generator), meta, ema_prefix="",
                shard_fn=shard_generation, stream=stream, **stage_hparams(args, "generate"))


def t_bin_logs(t, per) -> dict:
    """Flow loss per quarter of t (minRF's habit): where along the path the model struggles."""
    if t is None:
        return {}
    quarter = (t * 4).long().clamp(max=3)  # (B,): 0 for t in [0, 0.25), ..., 3 for [0.75, 1]
    return {f"loss_t{k}": float(per[quarter == k].detach().mean()) for k in range(4) if (quarter == k).any()}


def plan_joint(args, device) -> Plan:
    """The ablation the paper argues against: one model trained on both tasks at once, LM unfrozen.

    It starts where stage 2 starts (RUN/understand, a fresh generator), but every chunk is half stage-1
    rows (question -> answer) and half stage-2 rows (prompt -> scene tokens), and the gradient of
    L_und + L_gen reaches the LM and projector too. RUN/joint holds both the VLM and the generator
    (`pipeline.load_run(run, "joint")`), since the LM it conditions on is no longer stage 1's.
    """
    cfg = args.config
    if cfg.lm.name is not None or args.data:
        raise UserError("--stage joint is a toy ablation (shapes world, toy backbone)")
    if args.loss != "flow" or args.target != "clip":
        raise UserError("--stage joint trains the paper's choice, CLIP + Flow (--loss flow --target clip)")
    hparams = stage_hparams(args, "joint")
    if hparams["batch"] < 2:
        raise UserError("--stage joint splits each micro-batch between the two tasks: --batch-size >= 2")
    enc, tok = load_clip(args, device)
    gen_chunk, targets = toy_generation_data(args, enc, tok, device, "clip")
    images, scenes = toy_images(args)
    clip_tokens = encode_all(enc.tokens, images, device)  # what the understanding rows read (N, 64, D_clip)
    rows = qa_table(scenes, args.seed)
    # The stage-1 VLM, unfrozen and trained in fp32: loaded on the CPU, since on CUDA load_lm hands over
    # a bf16 copy for frozen use, and rounding the stage-1 weights would change the starting point.
    vlm = load_lm(args, tok, torch.device("cpu")).to(device).requires_grad_(True).train()
    gen_model = new_generator(args, vlm, "flow", targets.shape[-1], targets)

    def chunk_fn(step, chunk, size, rng):
        n_und = size // 2  # understanding rows; the rest of the chunk is generation rows
        pick = torch.randint(len(rows), (n_und,), generator=rng).tolist()
        img = torch.tensor([rows[j][0] for j in pick])
        qa_ids, labels, _ = blip3o.build_qa_batch(tok, vlm.image_tokens(clip_tokens.shape[1]),
                                                  [rows[j][1] for j in pick], [rows[j][2] for j in pick])
        return (qa_ids.to(device), clip_tokens[img].to(device), labels.to(device),
                *gen_chunk(step, chunk, size - n_und, rng))

    def loss(m, qa_ids, ctok, labels, ids, lens, target, rng):  # one noise draw per prompt
        und = m.vlm(qa_ids, ctok, labels)[0]
        gen, t, per = m.generator.loss(m.vlm.lm, ids, lens, target, rng=rng,
                                       time_sampling=args.time_sampling or cfg.time_sampling)
        return und + gen, {"loss_und": float(und.detach()), "loss_gen": float(gen.detach()),
                           **t_bin_logs(t, per)}

    def save_fn(m):  # both halves: the LM the generator conditions on is no longer stage 1's
        return {**pipeline.module_tensors("vlm", m.vlm), **pipeline.module_tensors("generator", m.generator)}

    meta = {"loss": "flow", "target": "clip", "target_dim": int(targets.shape[-1])}
    # ema_prefix "": the EMA covers every trainable weight, the LM's too, so evaluation sees one average.
    model = Objective(nn.ModuleDict({"generator": gen_model, "vlm": vlm}), loss)
    return Plan("joint", model, chunk_fn, save_fn, meta, ema_prefix="", **hparams)


PLANS = {"clip": plan_clip, "understand": plan_understand, "decoder": plan_decoder, "vae": plan_vae,
         "generate": plan_generate, "joint": plan_joint}


# --- Command line -------------------------------------------------------------------------------------

def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rank, _, world = dist_info()
    try:
        check_args(args, world)
        check_writable(Path(args.out))
        device = setup(args)
        stages = PIPELINE if args.stage == "all" else (args.stage,)
        t0, timings = time.time(), {}
        for stage in stages:
            if finished(args, stage):  # before the plan, which draws and encodes the image set
                continue
            seed_init(args, stage)
            result = fit(PLANS[stage](args, device), args, device)
            if "seconds" in result:  # a stage skipped as already trained keeps its recorded time
                timings[result["stage"]] = result["seconds"]
        if args.stage == "all" and not args.no_eval and rank == 0:
            import eval as evaluation

            evaluation.full_report(args.out, timings=timings, train_seconds=time.time() - t0)
    except (UserError, data.DataError, pipeline.CheckpointError, FloatingPointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1 if isinstance(e, FloatingPointError) else 2  # a NaN loss, or a mistake in the input
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


def parse_args(argv=None):
    p = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stage", default="all", choices=("all",) + STAGES, help="what to train (default: all)")
    p.add_argument("--out", default="out/toy", help="run folder; each stage checkpoints to OUT/<stage>/")
    p.add_argument("--preset", default="toy", help=f"model sizes: {', '.join(blip3o.PRESETS)}")
    p.add_argument("--steps", type=positive_int, default=None, help="optimizer steps (default: per stage)")
    p.add_argument("--batch-size", type=positive_int, default=None, help="micro-batch per process")
    p.add_argument("--global-batch", type=positive_int, default=None,
                   help="global batch instead of --batch-size (paper: 512); micro = global / (accum x world)")
    p.add_argument("--grad-accum", type=positive_int, default=1, help="micro-batches per optimizer step")
    p.add_argument("--lr", type=float, default=None, help="peak learning rate (default: per stage)")
    p.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay (paper: 0)")
    p.add_argument("--warmup", type=float, default=0.03, help="warmup as a fraction of the steps")
    p.add_argument("--grad-clip", type=float, default=1.0, help="gradient-norm clipping (paper: 1.0)")
    p.add_argument("--ema", type=float, default=0.999, help="EMA decay of the DiT weights (0: off)")
    p.add_argument("--loss", default="flow", choices=("flow", "mse"), help="generation objective")
    p.add_argument("--time-sampling", default=None, choices=("uniform", "logit_normal"),
                   help="flow matching's t distribution (default: the preset's time_sampling)")
    p.add_argument("--noise-repeats", type=positive_int, default=None,
                   help="--stage generate: noise draws per prompt and step (default: the preset's)")
    p.add_argument("--target", default="clip", choices=("clip", "vae"), help="generation target space")
    p.add_argument("--images", type=positive_int, default=TOY_IMAGES, help="toy training images")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ckpt-every", type=int, default=200, help="checkpoint every N steps (0: only at end)")
    p.add_argument("--resume", action="store_true", help="require a checkpoint to continue from")
    p.add_argument("--restart", action="store_true", help="ignore existing checkpoints, start over")
    p.add_argument("--no-eval", action="store_true", help="--stage all: skip the evaluations and report")
    p.add_argument("--device", default="auto", help="auto (CUDA -> MPS -> CPU), cpu, cuda, cuda:1, ...")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    scale = p.add_argument_group("scale (real presets, several GPUs)")
    scale.add_argument("--data", metavar="SHARDS", help="--stage generate on streamed data: WebDataset .tar "
                       "shards ('shards/*.tar', 'shards/{00000..00999}.tar') or, with --captions, a folder")
    scale.add_argument("--captions", metavar="JSONL", help='with --data FOLDER: lines {"file", "caption"}')
    scale.add_argument("--compile", action="store_true", help="torch.compile each Next-DiT block (GPU)")
    scale.add_argument("--fsdp", action="store_true", help="shard the generation head with FSDP2, not DDP")
    scale.add_argument("--grad-checkpointing", action="store_true",
                       help="recompute the backbone's activations in backward (less memory)")
    args = p.parse_args(argv)
    if args.resume and args.restart:
        p.error("--resume and --restart contradict each other")
    if args.batch_size and args.global_batch:
        p.error("give --batch-size (per process) or --global-batch, not both")
    if args.captions and not args.data:
        p.error("--captions goes with --data FOLDER")
    # Each rule is written so that nan fails it too.
    for name, ok, rule in (("lr", args.lr is None or args.lr > 0, "> 0"),
                           ("grad_clip", args.grad_clip > 0, "> 0"),
                           ("weight_decay", args.weight_decay >= 0, ">= 0"),
                           ("warmup", 0 <= args.warmup < 1, "in [0, 1)"),
                           ("ema", 0 <= args.ema < 1, "in [0, 1)"),
                           ("ckpt_every", args.ckpt_every >= 0, ">= 0"),
                           ("threads", args.threads >= 0, ">= 0")):
        if not ok:
            p.error(f"--{name.replace('_', '-')} must be {rule}, got {getattr(args, name)}")
    try:
        args.config = blip3o.get_config(args.preset)
    except ValueError as e:
        p.error(str(e))
    return args


def seed_init(args, stage: str) -> None:
    """Seed the new modules' initial weights from the run's seed and the stage alone, so that a stage
    trained by itself (--stage X) starts exactly where it starts inside `--stage all`. The joint ablation
    starts where stage 2 starts: the same generator."""
    torch.manual_seed(data.stable_seed("init", args.seed, "generate" if stage == "joint" else stage) % 2**63)


def finished(args, stage: str) -> bool:
    """True when the stage's latest checkpoint is a finished run of at least the planned steps (fit would
    skip it too, after its plan had drawn the data for nothing)."""
    name = f"generate/{args.loss}-{args.target}" if stage == "generate" else stage
    path = pipeline.checkpoint_path(Path(args.out) / name)
    if args.restart or path is None:
        return False
    try:
        state = pipeline.read_meta(path, name)["state"]
    except pipeline.CheckpointError:
        return False  # fit resumes from the previous checkpoint or names the damaged file
    done = state["done"] and state["step"] >= stage_hparams(args, stage)["steps"]
    if done:
        print0(f"[{name}] already trained ({state['step']} steps): skipping")
    return done


def check_args(args, world: int) -> None:
    """Checks that need the preset or the world size; every rank fails alike, before any collective."""
    if args.global_batch and args.global_batch % (args.grad_accum * world):
        raise UserError(f"--global-batch {args.global_batch} is not divisible by grad-accum x world size "
                        f"({args.grad_accum} x {world})")
    for flag, given in (("--data", args.data), ("--fsdp", args.fsdp)):
        if given and args.stage != "generate":
            raise UserError(f"{flag} is for --stage generate (got --stage {args.stage})")


def check_writable(out: Path) -> None:
    """Fail before training, not at the first checkpoint, if the run folder cannot be written."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file, not a run folder: give a folder (train.py creates it)")
    probe = out / f".write-test-{os.getpid()}"
    try:
        out.mkdir(parents=True, exist_ok=True)
        with open(probe, "wb") as f:
            f.write(b"\0" * 1024 * 1024)  # 1 MiB: also catches a disk that is already full
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        raise UserError(f"cannot write to {out}: {e.strerror or e}") from None
    finally:
        with contextlib.suppress(OSError):
            probe.unlink()


# --- The training loop shared by every stage ----------------------------------------------------------

def fit(plan: Plan, args, device) -> dict:
    """Train `plan.model` for `plan.steps` optimizer steps, with checkpoints, resume and DDP or FSDP2.

    Step s consumes the chunks 0 .. world*accum-1 of the global batch; rank r takes chunks
    r*accum .. r*accum+accum-1. Chunk c of step s is drawn from a generator seeded by (seed, s, c), so
    one process with accum = k*world sees exactly the batches and noise that k-accum ranks see together.
    (A streamed plan reads its batches in order from each rank's share of the data instead, and saves
    every rank's read position with the checkpoint.)
    """
    rank, _, world = dist_info()
    folder = Path(args.out) / plan.name
    model = plan.model.to(device)
    trainable, frozen = pipeline.count_params(model)
    print0(f"[{plan.name}] parameters: {trainable:,} trainable, {frozen:,} frozen | global batch "
           f"{plan.batch * args.grad_accum * world} = {plan.batch} micro x {args.grad_accum} accum x {world} "
           f"ranks | {plan.steps} steps")

    # Weights go into the plain model, before any sharding; optimizer and EMA state once it is wrapped.
    state = restore(plan, model, folder, args)
    if state.done_meta is not None:
        return state.done_meta
    if args.compile:  # each Next-DiT block, before FSDP wraps it (checkpoint keys do not change)
        for module in model.modules():
            if isinstance(module, blip3o.NextDiT):
                module.compile_blocks()
    ddp, fsdp_roots = wrap(plan, model, device, world, args)
    params = [p for p in model.parameters() if p.requires_grad]  # after sharding: this rank's shards
    opt = make_optimizer(params, plan.lr, args.weight_decay, device)
    if state.opt_state is not None:
        load_optimizer_state(model, opt, state.opt_state, args)
    ema = make_ema(plan, model, state.tensors, folder, args)

    warmup = max(1, int(args.warmup * plan.steps))
    model.train()
    t0 = time.time()
    bar = tqdm(range(state.step, plan.steps), initial=state.step, total=plan.steps, desc=plan.name,
               disable=rank != 0 or args.quiet, dynamic_ncols=True, file=sys.stdout)
    history, logs = state.history, {}
    for step in bar:
        lr = cosine_lr(step, plan.steps, plan.lr, warmup)
        for g in opt.param_groups:
            g["lr"] = lr
        loss, extra = train_step(plan, ddp, model, fsdp_roots, step, args, device)
        grad_norm = float(full_tensor(torch.nn.utils.clip_grad_norm_(params, args.grad_clip)))
        # Never step on (or later save) a non-finite value: stop, naming the step and the last checkpoint.
        for what, value in (("loss", loss), ("gradient norm", grad_norm)):
            if not math.isfinite(value):
                last = pipeline.checkpoint_path(folder)
                raise FloatingPointError(f"[{plan.name}] {what} is {value} at step {step + 1}; last good "
                                         f"checkpoint: {last if last else 'none'} (not overwritten)")
        opt.step()
        opt.zero_grad(set_to_none=True)
        update_ema(ema, model, args.ema, step)
        logs = {"step": step + 1, "loss": round(loss, 5), "lr": lr, "grad_norm": round(grad_norm, 4),
                **mean_logs(extra)}
        history.append(logs)
        bar.set_postfix(loss=f"{loss:.4f}")
        if args.ckpt_every and (step + 1) % args.ckpt_every == 0 and step + 1 < plan.steps:
            save_stage(plan, model, opt, ema, folder, args, step + 1, False, history, state)
    bar.close()
    save_stage(plan, model, opt, ema, folder, args, plan.steps, True, history, state)
    seconds = time.time() - t0
    print0(f"[{plan.name}] done: {plan.steps} steps in {seconds:.0f} s, final loss "
           f"{logs.get('loss', float('nan')):.4f} -> {folder}")
    if dist.is_initialized():
        dist.barrier()
    return {"stage": plan.name, "seconds": seconds, "history": history}


def train_step(plan: Plan, ddp, model, fsdp_roots, step: int, args, device) -> tuple[float, dict]:
    """One optimizer step's forward and backward over this rank's `grad_accum` micro-batches -> (the loss
    averaged over every rank, this rank's extra logs averaged over its micro-batches)."""
    rank, accum = dist_info()[0], args.grad_accum
    total, extra = 0.0, {}
    for micro in range(accum):
        chunk = rank * accum + micro
        seed = data.stable_seed("batch", args.seed, step, chunk) % 2 ** 63
        rng = torch.Generator().manual_seed(seed)
        batch = plan.chunk_fn(step, chunk, plan.batch, rng)
        # The model draws its noise on its own device; on the CPU that is the same generator.
        noise = rng if device.type == "cpu" else torch.Generator(device).manual_seed(seed)
        # Gradients are reduced only on the last micro-step (DDP's no_sync, FSDP's gradient sync off).
        last_micro = micro == accum - 1
        for root in fsdp_roots:
            root.set_requires_gradient_sync(last_micro)
        sync = contextlib.nullcontext() if (ddp is model or last_micro) else ddp.no_sync()
        with sync, pipeline.autocast(device):
            loss, logs = ddp(*batch, rng=noise)
            (loss / accum).backward()
        total += float(loss.detach()) / accum
        for k, v in logs.items():
            extra[k] = extra.get(k, 0.0) + v / accum
    if dist.is_initialized():  # the loss averaged over every rank
        t = torch.tensor([total], dtype=torch.float64, device=device)
        dist.all_reduce(t)
        total = float(t) / dist.get_world_size()
    return total, extra


def cosine_lr(step: int, total: int, lr: float, warmup: int, final_ratio: float = 0.1) -> float:
    """Linear warmup, then cosine from lr down to final_ratio * lr (paper: 1e-4 -> 1e-5)."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return lr * (final_ratio + (1 - final_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def make_optimizer(params, lr: float, weight_decay: float, device):
    """AdamW (betas 0.9 / 0.95); weight decay on matrices only, never on biases, norms or gates."""
    decay, no_decay = [p for p in params if p.ndim >= 2], [p for p in params if p.ndim < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.95),
                             fused=device.type == "cuda" or None)  # fused: one kernel, 7% off an 8B-head step


# --- Resume, checkpoints and EMA ----------------------------------------------------------------------

@dataclass
class Restored:
    """What a stage's own checkpoint gives back to `fit` (nothing, for a fresh start)."""

    step: int = 0
    history: list = dataclasses.field(default_factory=list)
    tensors: dict | None = None  # every saved tensor, EMA included
    opt_state: dict | None = None
    damaged_latest: bool = False  # resumed from <folder>.prev: the next save replaces the damaged one
    done_meta: dict | None = None  # the stage is already trained: its meta, and nothing to do


def restore(plan: Plan, model: Objective, folder: Path, args) -> Restored:
    """Resume from the stage's own checkpoint if there is one (unless --restart): its weights are copied
    into `model` here; the optimizer and EMA states are returned for after wrapping."""
    rank, _, world = dist_info()
    if pipeline.checkpoint_path(folder) is None or args.restart:
        if args.resume:
            raise UserError(f"--resume: no checkpoint in {folder}")
        return Restored()
    meta, tensors, opt_state, damaged_latest = load_for_resume(folder, plan.name)
    if meta["state"]["done"] and meta["state"]["step"] >= plan.steps:
        print0(f"[{plan.name}] already trained ({meta['state']['step']} steps): skipping")
        return Restored(done_meta=meta)
    check_same_config(folder, meta, args)
    if opt_state is not None and meta["state"].get("optimizer_format", "torch") != optimizer_format(args):
        raise UserError(f"{folder} was trained {'without' if args.fsdp else 'with'} --fsdp: "
                        "resume it the same way, or --restart")
    own = plan.save_fn(model.inner)
    if missing := [k for k in own if k not in tensors]:
        raise pipeline.CheckpointError(f"{folder}: checkpoint lacks {missing[:5]}")
    with torch.no_grad():
        for k, v in own.items():
            if v.shape != tensors[k].shape:
                raise pipeline.CheckpointError(f"{folder}: {k} is {tuple(tensors[k].shape)} in the "
                                             f"checkpoint, {tuple(v.shape)} in the model")
            v.copy_(tensors[k])
    saved = meta["state"].get("data")
    if plan.stream is not None and saved is not None:
        if saved["world"] == world:
            plan.stream.load_state(saved["ranks"][rank])
        else:
            print0(f"warning: the data position was saved by {saved['world']} ranks, this run has {world}: "
                   "the data stream starts again from the beginning")
    source = pipeline.previous_path(folder) if damaged_latest else folder
    print0(f"[{plan.name}] resuming at step {meta['state']['step']} from {source}")
    return Restored(meta["state"]["step"], meta["state"]["history"], tensors, opt_state, damaged_latest)


def load_for_resume(folder: Path, stage: str):
    """The stage's checkpoint to resume from -> (meta, tensors, optimizer state, latest is damaged).

    The latest one; if a file of it cannot be read, the previous one (`<folder>.prev`), said on stderr;
    with no intact previous one, the CheckpointError that names the file and how to retrain."""
    try:
        return (*pipeline.load_checkpoint(folder, stage=stage, with_optimizer=True), False)
    except pipeline.CheckpointError as e:
        prev = pipeline.previous_path(folder)
        if e.damaged is None or pipeline.checkpoint_path(folder) == prev or not prev.is_dir():
            raise
        try:
            got = pipeline.load_checkpoint(folder, stage=stage, with_optimizer=True, path=prev)
        except pipeline.CheckpointError:
            raise e from None
        if dist_info()[0] == 0:
            print(f"warning: {e.damaged} is {e.reason}: resuming from the previous checkpoint {prev} "
                  f"(step {got[0]['state']['step']})", file=sys.stderr, flush=True)
        return (*got, True)


def check_same_config(folder, meta: dict, args) -> None:
    """Resume only into the model the checkpoint was trained as: name the config fields that differ."""
    def flat(d, prefix=""):
        out = {}
        for k, v in d.items():
            out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
        return out

    saved, now = flat(meta["config"]), flat(json.loads(json.dumps(args.config.to_dict())))  # tuples -> lists
    diff = [f"{k} {saved.get(k)!r} in the checkpoint, {now.get(k)!r} now"
            for k in sorted(set(saved) | set(now)) if saved.get(k) != now.get(k)]
    if diff:
        listed = "; ".join(diff[:4]) + ("; ..." if len(diff) > 4 else "")
        raise pipeline.CheckpointError(f"{folder} was trained with another config ({listed}): use the same "
                                       "--preset, or --restart")


def save_stage(plan: Plan, model: Objective, opt, ema, folder: Path, args, step: int, done: bool,
               history: list, state: Restored) -> None:
    """Checkpoint the stage: weights (+ EMA), optimizer, loop state and data position, config.

    Every rank takes part (FSDP gathers the sharded tensors, each rank reports its data position);
    rank 0 writes. A damaged latest checkpoint (state.damaged_latest) is replaced, not kept as previous."""
    rank, _, world = dist_info()
    tensors = {k: full_tensor(v) for k, v in plan.save_fn(model.inner).items()}
    if ema is not None:
        tensors.update({f"ema.{plan.ema_prefix}{n}": full_tensor(v) for n, v in ema.items()})
    opt_state = optimizer_state(model, opt, args)
    loop = {"step": step, "done": done, "history": history, "optimizer_format": optimizer_format(args)}
    if plan.stream is not None:
        loop["data"] = {"world": world, "ranks": gather_objects(plan.stream.state())}  # a collective
        print0(f"[{plan.name}] data: {data.stream_summary(loop['data']['ranks'])}")
    if rank != 0:
        return
    meta = {"stage": plan.name, "config": args.config.to_dict(), "state": loop, **plan.meta,
            "args": {k: v for k, v in vars(args).items() if k != "config"}}
    pipeline.save_checkpoint(folder, tensors, meta, opt_state, plan.tokenizer,
                             keep_previous=not state.damaged_latest)
    state.damaged_latest = False


def make_ema(plan: Plan, model: Objective, tensors: dict | None, folder: Path, args) -> dict | None:
    """An EMA of the trainable weights (sampling uses it, as is standard for diffusion models), restored
    from the checkpoint's "ema." tensors on resume; None if the plan keeps none or --ema 0."""
    if plan.ema_prefix is None or args.ema <= 0:
        return None
    ema = {n: p.detach().clone() for n, p in model.inner.named_parameters() if p.requires_grad}
    if tensors is not None:
        with torch.no_grad():
            for n in ema:
                key = f"ema.{plan.ema_prefix}{n}"
                if key not in tensors:
                    raise UserError(f"{folder} holds no EMA weights (trained with --ema 0?): resume with "
                                    "--ema 0, or --restart")
                copy_into(ema[n], tensors[key])
    return ema


def update_ema(ema: dict | None, model: Objective, decay: float, step: int) -> None:
    if ema is None:
        return
    d = min(decay, (1 + step) / (10 + step))  # warm-started EMA: short runs still average
    with torch.no_grad():
        for n, p in model.inner.named_parameters():
            if n in ema:
                ema[n].lerp_(p.detach(), 1 - d)


# --- Several processes: DDP, FSDP2, gradient checkpointing, distributed helpers -----------------------

def wrap(plan: Plan, model: Objective, device, world: int, args):
    """-> (the module to call, FSDP roots). Several processes: DDP keeps a whole copy of the model per
    rank and all-reduces gradients; FSDP2 (--fsdp) shards the trainable part's weights, gradients and
    Adam state across the ranks (plan.shard_fn picks the units). One process: the model itself."""
    if world > 1 and not args.fsdp:
        return nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda"
                                                   else None, find_unused_parameters=False), []
    if not args.fsdp:
        return model, []
    from torch.distributed.device_mesh import init_device_mesh

    if plan.shard_fn is None:
        raise UserError(f"--fsdp shards the generation head (--stage generate); {plan.name} uses DDP")
    # fully_shard keeps each rank's own values, unlike DDP, which copies rank 0's: broadcast them first.
    with torch.no_grad():
        for t in [p for p in model.parameters() if p.requires_grad] + list(model.buffers()):
            dist.broadcast(t.data, 0)
    return model, plan.shard_fn(model.inner, init_device_mesh(device.type, (dist.get_world_size(),)))


def shard_generation(step: nn.ModuleDict, mesh) -> list:
    """FSDP2 units of stage 2: each DiT block, then the generator (queries and the DiT's other layers).

    The frozen backbone is left whole on every rank. Training enters the generator through loss() rather
    than forward(), so FSDP is told to gather its weights around that call as well.
    """
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    g = step.generator
    if g.loss_type == "flow":
        for block in g.dit.layers:
            fully_shard(block, mesh=mesh)
    fully_shard(g, mesh=mesh)
    register_fsdp_forward_method(g, "loss")
    return [g]


def copy_into(dst: torch.Tensor, src: torch.Tensor) -> None:
    """dst.copy_(src) for a whole tensor src, where dst may be this rank's FSDP2 shard (a DTensor)."""
    if hasattr(dst, "device_mesh"):
        from torch.distributed.tensor import distribute_tensor

        src = distribute_tensor(src.to(dst.device), dst.device_mesh, dst.placements)
    dst.copy_(src)


def optimizer_format(args) -> str:
    """How the optimizer state is stored: torch's own (per-parameter index), or FSDP's full state."""
    return "fsdp-full" if args.fsdp else "torch"


def optimizer_state(model: nn.Module, opt, args) -> dict:
    """The optimizer state to checkpoint. Under FSDP gathered whole (keyed by parameter name) on rank 0."""
    if not args.fsdp:
        return opt.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_optimizer_state_dict(model, opt, options=options)


def load_optimizer_state(model: nn.Module, opt, state: dict, args) -> None:
    if not args.fsdp:
        return opt.load_state_dict(state)
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(model, opt, state, options=StateDictOptions(full_state_dict=True))


def enable_grad_checkpointing(lm) -> None:
    """--grad-checkpointing: the backbone recomputes its activations during backward instead of keeping
    them (transformers' implementation): about a third more compute for much less memory. transformers
    does this only in train mode; fit() sets it, and the frozen backbone has no dropout to switch on."""
    kwargs = {"use_reentrant": False}
    if hasattr(lm, "activation_checkpointing_enable"):  # its name since transformers 5.x
        lm.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def dist_info() -> tuple[int, int, int]:
    """(rank, local_rank, world_size) from torchrun's environment, or (0, 0, 1)."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", 0)), int(os.environ["WORLD_SIZE"])
    return 0, 0, 1


def print0(*a, **k):
    if dist_info()[0] == 0:
        print(*a, **k, flush=True)


def setup(args) -> torch.device:
    rank, local_rank, world = dist_info()
    device = pipeline.pick_device(args.device)
    if (world > 1 or args.fsdp) and not dist.is_initialized():
        if device.type == "cuda":
            device = torch.device("cuda", local_rank)
            torch.cuda.set_device(device)
        backend = "nccl" if device.type == "cuda" else "gloo"
        if "MASTER_ADDR" in os.environ:  # torchrun
            dist.init_process_group(backend)
        else:  # --fsdp under plain `python`: a group of one process, so the same code path runs
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    return device


def mean_logs(logs: dict) -> dict:
    """Each logged value averaged over the ranks that logged it (a t-bin may be empty on some rank, so
    ranks can hold different keys: one gather, never a collective per key)."""
    per_rank = gather_objects(logs)
    keys = sorted({k for d in per_rank for k in d})
    return {k: round(sum(d[k] for d in per_rank if k in d) / sum(k in d for d in per_rank), 5) for k in keys}


def gather_objects(obj) -> list:
    """Every rank's `obj` (any picklable value), in rank order, on every rank: [obj] when alone."""
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """A tensor sharded by FSDP2 (a DTensor) gathered whole; plain tensors pass through. Collective."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


if __name__ == "__main__":
    sys.exit(main())
