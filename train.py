"""Train BLIP3-o, stage by stage: the whole toy pipeline on a laptop, or one stage on many GPUs.

Laptop (CPU, minutes): the whole toy pipeline, then the evaluations and out/toy/REPORT.md
    python train.py
One stage (each later stage finds the earlier ones under --out):
    python train.py --stage clip                      # contrastive toy CLIP          -> out/toy/clip/
    python train.py --stage understand                # stage 1: projector + LM       -> out/toy/understand/
    python train.py --stage decoder                   # CLIP tokens -> pixels          -> out/toy/decoder/
    python train.py --stage generate --loss flow      # stage 2: queries + Next-DiT   -> out/toy/generate/flow-clip/
    python train.py --stage generate --loss mse       # ablation: CLIP + MSE          -> out/toy/generate/mse-clip/
    python train.py --stage vae && python train.py --stage generate --target vae   # ablation: VAE + Flow
    python train.py --stage joint                     # ablation: LM unfrozen, both tasks mixed
Several processes (same code path; gloo on CPU, NCCL on GPUs):
    torchrun --standalone --nproc_per_node=8 train.py --stage generate --preset blip3o-8b \
        --data 'shards/{00000..00999}.tar' --batch-size 64 --grad-accum 1 --out out/8b

A stage that finished is skipped, a half-finished one resumes from its last checkpoint (`--restart`
starts it over). Global batch = batch-size x grad-accum x world size, printed at start.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
from tqdm import tqdm

import blip3o
import data

STAGES = ("clip", "understand", "decoder", "vae", "generate", "joint")
PIPELINE = ("clip", "understand", "decoder", "generate")  # what `--stage all` trains, in data order

# Toy defaults per stage: steps, micro-batch, learning rate. Sized so each stage takes a few minutes on
# 2 CPU cores (DESIGN section 6) and reaches the README's numbers.
TOY = {
    "clip": dict(steps=300, batch=256, lr=2e-3),
    "understand": dict(steps=600, batch=64, lr=2e-3),
    "decoder": dict(steps=800, batch=64, lr=1e-3),
    "vae": dict(steps=600, batch=64, lr=2e-3),
    "generate": dict(steps=1000, batch=64, lr=1e-3),
    "joint": dict(steps=1000, batch=64, lr=1e-3),
}
TOY_IMAGES = 16384  # training images drawn from the shapes world (split "train"), shared by all stages


# ----------------------------------------------------------------------------------------------------
# Distributed helpers: degrade to rank 0 / world 1 under plain `python`
# ----------------------------------------------------------------------------------------------------


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
    device = blip3o.pick_device(args.device)
    if world > 1 and not dist.is_initialized():
        if device.type == "cuda":
            device = torch.device("cuda", local_rank)
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device


def all_mean(x: float, device) -> float:
    if dist.is_initialized():
        t = torch.tensor([x], dtype=torch.float64, device=device)
        dist.all_reduce(t)
        return float(t) / dist.get_world_size()
    return x


class UserError(Exception):
    """A mistake in the command line or the run folder: reported in one line, exit status 2."""


# ----------------------------------------------------------------------------------------------------
# The training loop shared by every stage
# ----------------------------------------------------------------------------------------------------


class Objective(nn.Module):
    """A module and its training loss as one forward, so DDP's gradient hooks see the computation.

    forward(*batch, gen) -> (loss, logs dict of floats); `inner` is what gets checkpointed.
    """

    def __init__(self, inner: nn.Module, loss):
        super().__init__()
        self.inner = inner
        self.loss = loss  # (inner, *batch, gen) -> (loss, logs)

    def forward(self, *batch, gen=None):
        return self.loss(self.inner, *batch, gen)


@dataclass
class Plan:
    """What a stage trains and how; filled by the stage functions below."""

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
    # "ema.<key>" shadows the checkpoint key "<key>" (see blip3o.load_module(..., ema=True)).
    ema_prefix: str | None = None


def cosine_lr(step: int, total: int, lr: float, warmup: int, final_ratio: float = 0.1) -> float:
    """Linear warmup, then cosine from lr down to final_ratio * lr (paper: 1e-4 -> 1e-5)."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return lr * (final_ratio + (1 - final_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def fit(plan: Plan, args, device) -> dict:
    """Train `plan.model` for `plan.steps` optimizer steps, with checkpoints, resume and DDP.

    Step s consumes the chunks 0 .. world*accum-1 of the global batch; rank r takes chunks
    r*accum .. r*accum+accum-1. Chunk c of step s is drawn from a generator seeded by (seed, s, c), so
    one process with accum = k*world sees exactly the batches and noise that k-accum ranks see together.
    """
    rank, _, world = dist_info()
    folder = Path(args.out) / plan.name
    accum = args.grad_accum
    global_batch = plan.batch * accum * world
    model = plan.model.to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=plan.lr, betas=(0.9, 0.95))

    trainable, frozen = blip3o.count_params(model)
    print0(f"[{plan.name}] parameters: {trainable:,} trainable, {frozen:,} frozen | global batch "
           f"{global_batch} = {plan.batch} micro x {accum} accum x {world} ranks | {plan.steps} steps")

    # EMA of the generator's weights (sampling uses it), as is standard for diffusion models.
    ema = None
    if plan.ema_prefix is not None and args.ema > 0:
        ema = {n: p.detach().clone() for n, p in model.inner.named_parameters() if p.requires_grad}

    # Resume from the stage's own checkpoint if there is one.
    start, history = 0, []
    if blip3o.checkpoint_path(folder) is not None and not args.restart:
        meta, tensors, opt_state = blip3o.load_checkpoint(folder, stage=plan.name, with_optimizer=True)
        if meta["state"]["done"] and meta["state"]["step"] >= plan.steps:
            print0(f"[{plan.name}] already trained ({meta['state']['step']} steps): skipping")
            return meta
        own = plan.save_fn(model.inner)
        missing = [k for k in own if k not in tensors]
        if missing:
            raise blip3o.CheckpointError(f"{folder}: checkpoint lacks {missing[:5]}")
        with torch.no_grad():
            for k, v in own.items():
                if v.shape != tensors[k].shape:
                    raise blip3o.CheckpointError(f"{folder}: {k} is {tuple(tensors[k].shape)} in the "
                                                 f"checkpoint, {tuple(v.shape)} in the model")
                v.copy_(tensors[k])
        if ema is not None:
            for n in ema:
                ema[n].copy_(tensors[f"ema.{plan.ema_prefix}{n}"])
        if opt_state is not None:
            opt.load_state_dict(opt_state)
        start, history = meta["state"]["step"], meta["state"]["history"]
        print0(f"[{plan.name}] resuming at step {start} from {folder}")
    elif args.resume:
        raise UserError(f"--resume: no checkpoint in {folder}")

    ddp = model
    if world > 1:
        ddp = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda"
                                                  else None, find_unused_parameters=False)

    def save(step: int, done: bool):
        if rank != 0:
            return
        tensors = plan.save_fn(model.inner)
        if ema is not None:
            tensors.update({f"ema.{plan.ema_prefix}{n}": v for n, v in ema.items()})
        state = {"step": step, "done": done, "history": history, "data_position": step * global_batch}
        meta = {"stage": plan.name, "config": args.config.to_dict(), "state": state, **plan.meta,
                "args": {k: v for k, v in vars(args).items() if k != "config"}}
        blip3o.save_checkpoint(folder, tensors, meta, opt.state_dict(), plan.tokenizer)

    warmup = max(1, int(args.warmup * plan.steps))
    model.train()
    t0 = time.time()
    bar = tqdm(range(start, plan.steps), initial=start, total=plan.steps, desc=plan.name,
               disable=rank != 0 or args.quiet, dynamic_ncols=True, file=sys.stdout)
    logs = {}
    for step in bar:
        lr = cosine_lr(step, plan.steps, plan.lr, warmup)
        for g in opt.param_groups:
            g["lr"] = lr
        total = 0.0
        agg = {}
        for micro in range(accum):
            chunk = rank * accum + micro
            gen = torch.Generator().manual_seed(data.stable_seed("batch", args.seed, step, chunk) % 2 ** 63)
            batch = plan.chunk_fn(step, chunk, plan.batch, gen)
            # Gradients are all-reduced only on the last micro-step (DDP's no_sync for the others).
            sync = contextlib.nullcontext() if (world == 1 or micro == accum - 1) else ddp.no_sync()
            with sync, blip3o.autocast(device):
                loss, extra = ddp(*batch, gen=gen)
                (loss / accum).backward()
            total += float(loss.detach()) / accum
            for k, v in extra.items():
                agg[k] = agg.get(k, 0.0) + v / accum
        total = all_mean(total, device)
        if not math.isfinite(total):
            last = blip3o.checkpoint_path(folder)
            raise FloatingPointError(f"[{plan.name}] loss is {total} at step {step}; last good checkpoint: "
                                     f"{last if last else 'none'} (not overwritten)")
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, args.grad_clip))
        opt.step()
        opt.zero_grad(set_to_none=True)
        if ema is not None:
            d = min(args.ema, (1 + step) / (10 + step))  # warm-started EMA: short runs still average
            with torch.no_grad():
                for n, p in model.inner.named_parameters():
                    if n in ema:
                        ema[n].lerp_(p.detach(), 1 - d)
        logs = {"step": step + 1, "loss": round(total, 5), "lr": lr, "grad_norm": round(grad_norm, 4),
                **{k: round(all_mean(v, device), 5) for k, v in agg.items()}}
        history.append(logs)
        bar.set_postfix(loss=f"{total:.4f}")
        if args.ckpt_every and (step + 1) % args.ckpt_every == 0 and step + 1 < plan.steps:
            save(step + 1, done=False)
    bar.close()
    save(plan.steps, done=True)
    seconds = time.time() - t0
    print0(f"[{plan.name}] done: {plan.steps} steps in {seconds:.0f} s, final loss "
           f"{logs.get('loss', float('nan')):.4f} -> {folder}")
    if dist.is_initialized():
        dist.barrier()
    return {"stage": plan.name, "seconds": seconds, "history": history}


# ----------------------------------------------------------------------------------------------------
# Shared toy data (drawn once per process; every stage indexes into it)
# ----------------------------------------------------------------------------------------------------

_IMAGE_SET = {}


def toy_images(args):
    """The training images (uint8 (N, 3, 32, 32)) and their scenes, from the shapes world."""
    key = (args.images, args.seed)
    if key not in _IMAGE_SET:
        _IMAGE_SET[key] = data.make_image_set(args.images, split="train", seed=args.seed,
                                              image_size=args.config.clip.image_size)
    return _IMAGE_SET[key]


def as_float(images_u8: torch.Tensor) -> torch.Tensor:
    return images_u8.float().div(255)


@torch.no_grad()
def encode_all(fn, images_u8: torch.Tensor, device, batch: int = 512) -> torch.Tensor:
    """Run a frozen encoder once over the whole image set (cached outputs: DESIGN section 6)."""
    outs = [fn(as_float(images_u8[i:i + batch]).to(device)).float().cpu()
            for i in range(0, len(images_u8), batch)]
    return torch.cat(outs)


def load_clip(args, device) -> tuple:
    """The trained CLIP (frozen) and the run's tokenizer, from RUN/clip."""
    folder = Path(args.out) / "clip"
    if args.config.clip.name is not None:  # a real, pretrained open_clip model
        enc = blip3o.ImageEncoder(args.config.clip).to(device)
        tok = blip3o.load_tokenizer(args.config.lm.name)
    else:
        meta, tensors, _ = blip3o.load_checkpoint(folder, stage="clip")
        tok = blip3o.load_tokenizer(str(blip3o.checkpoint_path(folder) / "tokenizer"))
        # The run's CLIP is what was trained, whatever the preset says now; the vocabulary is shared.
        args.config.clip = blip3o.Config.from_dict(meta["config"]).clip
        args.config.lm.vocab_size = len(tok)
        enc = blip3o.ImageEncoder(args.config.clip)
        blip3o.load_module(enc, tensors, "clip", str(folder))
        enc = enc.to(device)
    enc.requires_grad_(False).eval()
    return enc, tok


def load_lm(args, tok, device):
    """The stage-1 VLM (LM + projector) from RUN/understand, frozen."""
    if args.config.lm.name is not None:
        lm = blip3o.build_backbone(args.config.lm, device=device)
        vlm = blip3o.VisionLanguageModel(lm, args.config.clip.width,
                                         tok.convert_tokens_to_ids(args.config.lm.image_token))
    else:
        folder = Path(args.out) / "understand"
        meta, tensors, _ = blip3o.load_checkpoint(folder, stage="understand")
        cfg = blip3o.Config.from_dict(meta["config"])
        lm = blip3o.build_backbone(cfg.lm)
        vlm = blip3o.VisionLanguageModel(lm, cfg.clip.width, tok.convert_tokens_to_ids("<image>"))
        blip3o.load_module(vlm, tensors, "vlm", str(folder))
    vlm = vlm.to(device)
    vlm.requires_grad_(False).eval()
    return vlm


# ----------------------------------------------------------------------------------------------------
# Stages
# ----------------------------------------------------------------------------------------------------


def plan_clip(args, device) -> Plan:
    """Contrastive training of the toy CLIP on (image, caption or prompt) pairs."""
    cfg = args.config
    if cfg.clip.name is not None:
        raise UserError(f"--stage clip trains the toy CLIP; preset {cfg.preset} uses the pretrained "
                        f"{cfg.clip.name}")
    tok = blip3o.build_toy_tokenizer(data.VOCAB)
    cfg.clip.vocab_size = len(tok)
    images, scenes = toy_images(args)
    # Each image has two texts: the free caption (every object) and its GenEval-style prompt.
    cap_ids, _ = blip3o.encode_texts(tok, [s.caption for s in scenes], cfg.clip.context_length)
    prm_ids, _ = blip3o.encode_texts(tok, [s.prompt for s in scenes], cfg.clip.context_length)
    enc = blip3o.ImageEncoder(cfg.clip)

    def chunk_fn(step, chunk, size, gen):
        idx = torch.randint(len(images), (size,), generator=gen)
        use_prompt = torch.rand(size, generator=gen) < 0.5
        ids = torch.where(use_prompt[:, None], prm_ids[idx], cap_ids[idx])
        return as_float(images[idx]).to(device), ids.to(device)

    def loss(enc, images_b, ids, gen):
        return enc.contrastive_loss(images_b, ids), {}

    return Plan("clip", Objective(enc, loss), chunk_fn, lambda m: blip3o.module_tensors("clip", m), {},
                tokenizer=tok, **stage_hparams(args, "clip"))


def qa_table(scenes, seed: int):
    """Every (image index, qtype, question, answer) of the training scenes, plus one caption request."""
    rows = []
    for i, s in enumerate(scenes):
        for qtype, q, a in data.make_qa(s, random.Random(data.stable_seed("qa", seed, i))):
            rows.append((i, q, a))
        rows.append((i, data.caption_question, s.caption))
    return rows


def plan_understand(args, device) -> Plan:
    """Stage 1: projector + LM learn to answer questions about CLIP tokens (CLIP frozen)."""
    cfg = args.config
    if cfg.lm.name is not None:
        raise UserError("stage 1 at real scale is Qwen2.5-VL as released; --stage understand trains the toy")
    enc, tok = load_clip(args, device)
    images, scenes = toy_images(args)
    print0("[understand] encoding the training images with the frozen CLIP ...")
    clip_tokens = encode_all(enc.tokens, images, device)  # (N, 64, D_clip)
    rows = qa_table(scenes, args.seed)
    lm = blip3o.build_backbone(cfg.lm)
    vlm = blip3o.VisionLanguageModel(lm, cfg.clip.width, tok.convert_tokens_to_ids("<image>"))

    def chunk_fn(step, chunk, size, gen):
        pick = torch.randint(len(rows), (size,), generator=gen).tolist()
        img = torch.tensor([rows[j][0] for j in pick])
        ids, labels, _ = blip3o.build_qa_batch(tok, clip_tokens.shape[1], [rows[j][1] for j in pick],
                                               [rows[j][2] for j in pick])
        return ids.to(device), clip_tokens[img].to(device), labels.to(device)

    def loss(vlm, ids, ctok, labels, gen):
        return vlm(ids, ctok, labels)[0], {}

    return Plan("understand", Objective(vlm, loss), chunk_fn, lambda m: blip3o.module_tensors("vlm", m), {},
                tokenizer=tok, **stage_hparams(args, "understand"))


def plan_decoder(args, device) -> Plan:
    """The pixel decoder: flow matching from CLIP tokens back to the image (CLIP frozen)."""
    cfg = args.config
    if cfg.decoder is None:
        raise UserError(f"preset {cfg.preset} has no toy pixel decoder (the real one is Emu2-Gen's SDXL UNet)")
    enc, tok = load_clip(args, device)
    images, _ = toy_images(args)
    print0("[decoder] encoding the training images with the frozen CLIP ...")
    clip_tokens = encode_all(enc.tokens, images, device)
    dec = blip3o.PixelDecoder(cfg.decoder, cfg.clip.image_size)
    dec.cond_scale.fill_(float(clip_tokens.std()))

    def chunk_fn(step, chunk, size, gen):
        idx = torch.randint(len(images), (size,), generator=gen)
        return as_float(images[idx]).to(device), clip_tokens[idx].to(device)

    def loss(dec, images_b, ctok, gen):
        value, t, per = dec.loss(images_b, ctok, generator=gen)
        return value, t_bin_logs(t, per)

    return Plan("decoder", Objective(dec, loss), chunk_fn, lambda m: blip3o.module_tensors("decoder", m), {},
                ema_prefix="decoder.", **stage_hparams(args, "decoder"))


def t_bin_logs(t, per) -> dict:
    """Flow loss per quarter of t (minRF's habit): where along the path the model struggles."""
    if t is None:
        return {}
    out = {}
    for k in range(4):
        m = (t >= k / 4) & (t < (k + 1) / 4)
        if m.any():
            out[f"loss_t{k}"] = float(per[m].detach().mean())
    return out


def plan_vae(args, device) -> Plan:
    cfg = args.config
    images, _ = toy_images(args)
    vae = blip3o.VAE(cfg.vae)

    def chunk_fn(step, chunk, size, gen):
        idx = torch.randint(len(images), (size,), generator=gen)
        return (as_float(images[idx]).to(device),)

    def loss(vae, images_b, gen):
        return vae.loss(images_b, generator=gen), {}

    return Plan("vae", Objective(vae, loss), chunk_fn, lambda m: blip3o.module_tensors("vae", m), {},
                **stage_hparams(args, "vae"))


class GenerationStep(nn.Module):
    """Queries + head with the LM attached: frozen in stage 2, trainable in joint training."""

    def __init__(self, generator: blip3o.Generator, vlm: blip3o.VisionLanguageModel):
        super().__init__()
        self.generator = generator
        self.vlm = vlm

    def forward(self, prompt_ids, prompt_lens, target, gen=None):
        cond = self.generator.condition(self.vlm.lm, prompt_ids, prompt_lens)
        value, t, per = self.generator.loss(cond, target, cond_drop=0.1, generator=gen)
        return value, t_bin_logs(t, per)


def generation_data(args, device, target: str):
    """Prompts (ids, lengths) and targets (CLIP tokens or VAE latents) for the training images."""
    enc, tok = load_clip(args, device)
    images, scenes = toy_images(args)
    if target == "clip":
        targets = encode_all(enc.tokens, images, device)
    else:
        meta, tensors, _ = blip3o.load_checkpoint(Path(args.out) / "vae", stage="vae")
        vae = blip3o.VAE(args.config.vae)
        blip3o.load_module(vae, tensors, "vae")
        vae = vae.to(device).eval()
        targets = encode_all(vae.tokens, images, device)
    template = args.config.prompt_template
    length = max(len(tok(template.format(s.caption), add_special_tokens=False)["input_ids"]) for s in scenes) + 1
    # Two phrasings per image: the GenEval-style prompt and the free caption.
    p_ids, p_len = blip3o.encode_texts(tok, [template.format(s.prompt) for s in scenes], length, bos=True,
                                       eos=False)
    c_ids, c_len = blip3o.encode_texts(tok, [template.format(s.caption) for s in scenes], length, bos=True,
                                       eos=False)
    return tok, enc, targets, (p_ids, p_len, c_ids, c_len)


def generation_variant(loss: str, target: str) -> str:
    return f"generate/{loss}-{target}"


def plan_generate(args, device) -> Plan:
    """Stage 2: queries + Next-DiT (flow) or W (MSE), on the frozen stage-1 LM."""
    cfg = args.config
    tok, enc, targets, (p_ids, p_len, c_ids, c_len) = generation_data(args, device, args.target)
    vlm = load_lm(args, tok, device)
    gen_model = blip3o.Generator(cfg, loss=args.loss, target_dim=targets.shape[-1])
    gen_model.target_scale.fill_(float(targets.std()))
    step_module = Objective(GenerationStep(gen_model, vlm), lambda m, *b: m(*b[:-1], gen=b[-1]))

    def chunk_fn(step, chunk, size, gen):
        idx = torch.randint(len(targets), (size,), generator=gen)
        use_prompt = torch.rand(size, generator=gen) < 0.5
        ids = torch.where(use_prompt[:, None], p_ids[idx], c_ids[idx])
        lens = torch.where(use_prompt, p_len[idx], c_len[idx])
        return ids.to(device), lens.to(device), targets[idx].to(device)

    meta = {"loss": args.loss, "target": args.target, "target_dim": int(targets.shape[-1])}
    return Plan(generation_variant(args.loss, args.target), step_module, chunk_fn,
                lambda m: blip3o.module_tensors("generator", m.generator), meta,
                ema_prefix="", **stage_hparams(args, "generate"))


def stage_hparams(args, stage: str) -> dict:
    base = TOY[stage] if args.config.preset == "toy" else dict(steps=100000, batch=64, lr=1e-4)
    return dict(steps=args.steps or base["steps"], batch=args.batch_size or base["batch"],
                lr=args.lr or base["lr"])


PLANS = {"clip": plan_clip, "understand": plan_understand, "decoder": plan_decoder, "vae": plan_vae,
         "generate": plan_generate}


def run_stage(stage: str, args, device) -> dict:
    plan = PLANS[stage](args, device)
    return fit(plan, args, device)


# ----------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------


def positive_int(s: str) -> int:
    v = int(s)
    if v <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {s}")
    return v


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stage", default="all", choices=("all",) + STAGES, help="what to train (default: all)")
    p.add_argument("--out", default="out/toy", help="run folder; each stage checkpoints to OUT/<stage>/")
    p.add_argument("--preset", default="toy", help=f"model sizes: {', '.join(blip3o.PRESETS)}")
    p.add_argument("--steps", type=positive_int, default=None, help="optimizer steps (default: per stage)")
    p.add_argument("--batch-size", type=positive_int, default=None, help="micro-batch per process")
    p.add_argument("--grad-accum", type=positive_int, default=1, help="micro-batches per optimizer step")
    p.add_argument("--lr", type=float, default=None, help="peak learning rate (default: per stage)")
    p.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay (paper: 0)")
    p.add_argument("--warmup", type=float, default=0.03, help="warmup as a fraction of the steps")
    p.add_argument("--grad-clip", type=float, default=1.0, help="gradient-norm clipping (paper: 1.0)")
    p.add_argument("--ema", type=float, default=0.999, help="EMA decay of the DiT weights (0: off)")
    p.add_argument("--loss", default="flow", choices=("flow", "mse"), help="generation objective")
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
    args = p.parse_args(argv)
    if args.resume and args.restart:
        p.error("--resume and --restart contradict each other")
    if args.lr is not None and not args.lr > 0:
        p.error("--lr must be positive")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        args.config = blip3o.get_config(args.preset)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    rank, _, world = dist_info()
    torch.manual_seed(args.seed + rank)  # per-rank seed for anything not drawn from the batch generators
    try:
        check_writable(Path(args.out))
        device = setup(args)
        stages = PIPELINE if args.stage == "all" else (args.stage,)
        t0 = time.time()
        timings = {}
        for stage in stages:
            timings[stage] = run_stage(stage, args, device).get("seconds", 0.0)
        if args.stage == "all" and not args.no_eval and rank == 0:
            import eval as evaluation

            evaluation.full_report(args.out, timings=timings, train_seconds=time.time() - t0)
    except (UserError, blip3o.CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except FloatingPointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


def check_writable(out: Path) -> None:
    """Fail before training, not at the first checkpoint, if the run folder cannot be written."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}"
        with open(probe, "wb") as f:
            f.write(b"\0" * 1024 * 1024)  # 1 MiB: also catches a disk that is already full
            f.flush()
            os.fsync(f.fileno())
        probe.unlink()
    except OSError as e:
        raise UserError(f"cannot write to {out}: {e.strerror or e}") from None


if __name__ == "__main__":
    sys.exit(main())
