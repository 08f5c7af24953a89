"""Use a trained BLIP3-o run: text -> image, image -> text, reconstructions, and GenEval folders.

Every model is rebuilt from the checkpoints in --run (default out/toy, what `python train.py` writes):

    python sample.py --prompt "a photo of a red circle" --prompt "a photo of two squares"
        -> out/samples.png: one row per prompt, 4 samples each, the prompt written beside its row
    python sample.py --prompt "a photo of a blue triangle" --num-samples 8 --seed 1 --guidance 2.0 --steps 40
    python sample.py --prompt "a photo of a red circle" --variant mse-clip      # the CLIP + MSE ablation
    python sample.py --prompt "a photo of a red circle" --trajectory   # -> out/trajectory.png: 8 Euler steps
        of each sample, x_t over its clean guess; out/trajectory.gif: every step, and what its tokens say
    python sample.py --prompt "a photo of a red circle left of a blue square" --words    # -> out/words.png
    python sample.py --reconstruct img.png        # image -> 64 CLIP tokens -> pixel decoder, side by side
    python sample.py --image img.png --question "what color is the circle?"
    python sample.py --image img.png --caption --temperature 0.7 --seed 3      # sampled, not greedy
    python sample.py --geneval tests/data/geneval_evaluation_metadata.jsonl --outdir out/geneval
        -> GenEval's layout (out/geneval/00000/metadata.jsonl, samples/0000.png ...); score it with
           python eval.py geneval out/geneval

Released BLIP3-o weights (stage 2: the 64 queries and the Next-DiT) on our code, then the checkpoint's
own diffusion decoder (DIR/diffusion-decoder/, Emu2-Gen's SDXL UNet; needs diffusers; released.py):

    python sample.py --official-checkpoint BLIP3o-Model-8B --backbone Qwen/Qwen2.5-VL-7B-Instruct \\
        --prompt "a photo of a red circle" --out out/official
        -> out/official/grid.png, p000_s00.png ... (one image per sample), features.safetensors
    python sample.py --official-checkpoint BLIP3o-Model-8B --backbone Qwen/Qwen2.5-VL-7B-Instruct \\
        --prompt "a photo of a red circle" --out out/features.safetensors      # CLIP features only
"""
import argparse
import functools
import json
import sys
from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont
from safetensors.torch import save_file
from tqdm import tqdm

import blip3o
import data
import pipeline
import released
from cli import OneLineParser, UserError, add_run_options, add_sampling_options, check_numbers, run_main


# ---- pictures: tensors -> PIL, and a grid with a text label beside each row ---------------------------

def to_pil(image) -> Image.Image:
    """A float (3, H, W) tensor in [0, 1] or a uint8 (H, W, 3) array -> PIL RGB image."""
    if isinstance(image, torch.Tensor):
        image = data.to_uint8(image).numpy()
    return Image.fromarray(image)


WORD_GAP = 5  # pixels between words: PIL's default font draws a space 2 px wide, which reads as none


def text_width(draw, text: str, font) -> int:
    """Pixel width of `text` as image_grid writes it: word by word, WORD_GAP pixels apart."""
    words = text.split(" ")
    return sum(int(draw.textlength(w, font=font)) for w in words) + WORD_GAP * (len(words) - 1)


def image_grid(rows, labels=None, scale: int = 4, pad: int = 2) -> Image.Image:
    """Rows of images (any that to_pil takes, all one size) -> one PIL image, each row's label written at its
    left (PIL's default font). Upscaled `scale` times by nearest neighbour: the pixels stay crisp."""
    font = ImageFont.load_default()
    tiles = [[to_pil(im) for im in row] for row in rows]
    h, w = tiles[0][0].height * scale, tiles[0][0].width * scale
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    text_w = max(text_width(probe, label, font) for label in labels) + 3 * pad if labels else 0
    cols = max(len(row) for row in tiles)
    grid = Image.new("RGB", (text_w + cols * (w + pad) + pad, len(tiles) * (h + pad) + pad), "white")
    draw = ImageDraw.Draw(grid)
    for r, row in enumerate(tiles):
        y = pad + r * (h + pad)
        if labels:
            box = probe.textbbox((0, 0), labels[r], font=font)
            x, text_y = pad, y + (h - (box[3] - box[1])) // 2
            for word in labels[r].split(" "):  # WORD_GAP pixels apart
                draw.text((x, text_y), word, fill="black", font=font)
                x += int(draw.textlength(word, font=font)) + WORD_GAP
        for c, tile in enumerate(row):
            grid.paste(tile.resize((w, h), Image.Resampling.NEAREST), (text_w + pad + c * (w + pad), y))
    return grid


def save_png(image: Image.Image, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path


# ---- generation helpers (shared with eval.py) ---------------------------------------------------------

def check_known_words(tokenizer, texts, allow: bool) -> None:
    """Refuse prompts or questions with words the toy tokenizer lacks (it would read them as <unk>),
    unless `allow` (--allow-unknown-words). Real backbones' tokenizers know every word."""
    unknown = blip3o.unknown_words(tokenizer, texts)
    if unknown and not allow:
        known = len(tokenizer.get_vocab()) - len(tokenizer.all_special_tokens)
        raise UserError(f"the toy model does not know the word{'s' * (len(unknown) > 1)} "
                        f"{', '.join(repr(w) for w in unknown)} (it knows {known} words, those of the shapes "
                        "world): rephrase, or pass --allow-unknown-words to read them as <unk>")


def generate_grid(pipe: pipeline.Pipeline, prompts, num_samples: int, seed: int, steps: int, guidance: float,
                  batch: int = 64, quiet: bool = True, on_step=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts -> (images (P, S, 3, H, W) in [0, 1], generated tokens (P, S, 64, D)). Column j draws all its
    noise from a generator seeded with seed + j, prompts batched `batch` at a time: reproducible for the same
    prompts, seed and batch. on_step(j, i, t, x_t, guess) sees column j's every Euler step of the prompts
    from i on (blip3o.euler_sample)."""
    if not prompts:
        raise UserError("no prompts to generate")
    if pipe.generator is not None:  # refuse empty or over-long prompts before any progress bar is drawn
        try:
            pipe.check_prompts(prompts)
        except ValueError as e:  # empty, or longer than the backbone's context
            raise UserError(str(e)) from None
    image_cols, token_cols = [], []
    with tqdm(total=len(prompts) * num_samples, desc="generating", unit="image", disable=quiet,
              file=sys.stderr, dynamic_ncols=True) as bar:
        for j in range(num_samples):
            rng = torch.Generator(pipe.device).manual_seed(seed + j)
            images, tokens = [], []
            for i in range(0, len(prompts), batch):
                tok = pipe.generate_tokens(prompts[i:i + batch], steps=steps, guidance=guidance, rng=rng,
                                           on_step=on_step and functools.partial(on_step, j, i))
                images.append(pipe.tokens_to_images(tok).cpu())
                tokens.append(tok.cpu())
                bar.update(len(prompts[i:i + batch]))
            image_cols.append(torch.cat(images))  # (P, 3, H, W)
            token_cols.append(torch.cat(tokens))  # (P, 64, D)
    return torch.stack(image_cols, 1), torch.stack(token_cols, 1)  # (P, S, 3, H, W), (P, S, 64, D)


# ---- inside the sampler: every Euler step, and what each prompt word steers ----------------------------

def trajectory(pipe: pipeline.Pipeline, prompts, num_samples: int, seed: int, steps: int, guidance: float,
               out=None, batch: int = 64) -> torch.Tensor:
    """generate_grid's samples and every Euler step on the way, recorded by the sampler (on_step) -> uint8
    views (P, S, steps + 1, 3, H, W, 3) at t = 0, 1/steps, ..., 1: x_t, the clean guess x_t + (1 - t) v and
    what the guess's tokens say, decoded. `out`: OUT.png, 8 steps, x_t above the clean guess; OUT.gif, every
    step's three views."""
    import eval as evaluation  # what_tokens_say; eval.py imports this file, so not at the top
    P, S, N, D = len(prompts), num_samples, pipe.generator.dit.cfg.num_tokens, pipe.generator.target_dim
    x_t, guess = torch.zeros(2, P, S, steps + 1, N, D)  # every step's tokens; t = 1: the samples

    def record(j, i, t, x, g):  # column j, prompts i, i + 1, ...
        x_t[i:i + len(x), j, round(t * steps)], guess[i:i + len(x), j, round(t * steps)] = x.cpu(), g.cpu()

    images, tokens = generate_grid(pipe, prompts, S, seed, steps, guidance, batch, on_step=record)
    x_t[:, :, -1] = guess[:, :, -1] = tokens
    views = [data.to_uint8(pipe.tokens_to_images(z.flatten(0, 2).to(pipe.device))) for z in (x_t, guess)]
    views = torch.stack([*views, evaluation.what_tokens_say(pipe, guess.flatten(0, 2))], 1)
    views = views.unflatten(0, (P, S, steps + 1))
    views[:, :, -1, :2] = data.to_uint8(images)[:, :, None]  # the samples as generate_grid decoded them
    if out is not None:
        rows, labels = views.flatten(0, 1), [f"{p}, seed {seed + j}" for p in prompts for j in range(S)]
        picks = torch.linspace(0, steps, min(8, steps + 1)).round().long()
        save_png(image_grid([list(row[picks, v].numpy()) for row in rows for v in (0, 1)],
                            [name for label in labels for name in (f"{label}: x_t", "clean guess")]), out)
        frames = [image_grid([list(row[k].numpy()) for row in rows], [f"{x}, t = {k / steps:.2f}" for x in
                                                                       labels]) for k in range(steps + 1)]
        frames[0].save(Path(out).with_suffix(".gif"), save_all=True, append_images=frames[1:], loop=0,
                       duration=[120] * steps + [2000])  # the sample, last, held 2 s
    return views


@torch.no_grad()
def word_maps(pipe: pipeline.Pipeline, prompts, seed: int, steps: int, guidance: float):
    """How much each generated image token draws on each prompt token, through the two attentions on the
    way composed as attention rollout does (Abnar & Zuidema, 2020): the Next-DiT's cross-attention to the
    query states (heads, blocks, Euler steps averaged) times the LM's attention from the queries to the
    prompt (heads averaged, each layer 0.5 A + 0.5 I for the residual, renormalised over the prompt) ->
    (generate_grid's images (P, 3, H, W); per prompt: maps (64, T) whose rows sum to 1, queries (64, T),
    its T tokens)."""
    g, lm = pipe.generator, pipe.vlm.lm
    blocks, cross = [block.attn2 for block in g.dit.layers], 0  # cross: (P, N, Q), the mean over the steps

    def record(j, i, t, x, guess):  # guidance's batch: the conditional half first
        nonlocal cross
        cross = cross + torch.stack([a.probs[:len(x)] for a in blocks]).mean((0, 2)).cpu() / steps

    for a in blocks:
        a.keep_probs = True
    images, _ = generate_grid(pipe, prompts, 1, seed, steps, guidance, batch=len(prompts), on_step=record)
    for a in blocks:
        a.keep_probs, a.probs = False, None
    ids, lens, _ = blip3o.encode_prompts(pipe.tokenizer, prompts, template=g.template, limit=g.max_prompt)
    attn = lm.config._attn_implementation
    lm.set_attn_implementation("eager")  # SDPA, the training path, returns no probabilities
    _, layers = g.condition(lm, ids.to(pipe.device), lens.to(pipe.device), output_attentions=True)
    lm.set_attn_implementation(attn)
    rollout = torch.eye(layers[0].shape[-1])
    for a in layers:  # (P, H, T + Q, T + Q) each, first layer first
        rollout = (0.5 * a.mean(1).cpu().float() + 0.5 * torch.eye(a.shape[-1])) @ rollout
    out = []
    for p, n in enumerate(lens.tolist()):
        queries = rollout[p, n:n + g.num_queries, :n]  # (Q, n): the queries follow the prompt
        queries = queries / queries.sum(-1, keepdim=True)
        tokens = pipe.tokenizer.convert_ids_to_tokens(ids[p, :n].tolist())
        out.append((cross[p] @ queries, queries, tokens))
    return images[:, 0], out


def save_word_maps(images: torch.Tensor, maps, prompts, tokenizer, out) -> Path:
    """A row per prompt: its picture; each caption word's map over it, scaled to its own peak as
    prompt-to-prompt draws them, the word and its share of the weight under it; the queries x words matrix."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    words = [len(tokenizer(p, add_special_tokens=False)["input_ids"]) for p in prompts]  # the prompt ends so
    cols = max(words) + 2  # the picture, the words, the matrix
    fig, axes = plt.subplots(len(prompts), cols, figsize=(1.2 * cols, 1.6 * len(prompts)), squeeze=False,
                             subplot_kw=dict(xticks=[], yticks=[]))
    for ax, image, (m, queries, tokens), k, prompt in zip(axes, images, maps, words, prompts):
        side, size = int(len(m) ** 0.5), image.shape[-1]  # the token grid, the picture
        ax[0].imshow(to_pil(image))
        ax[0].set_title(prompt, fontsize=7, loc="left")
        for a, w in zip(ax[1:], range(-k, 0)):  # the caption's words: the template's come first
            a.imshow(to_pil(image))
            a.imshow(m[:, w].view(side, side).numpy(), cmap="jet", alpha=0.5, extent=(0, size, size, 0))
            a.set_xlabel(f"{tokens[w]} {m[:, w].mean():.2f}", fontsize=7)
        ax[-1].imshow(queries[:, -k:].numpy(), aspect="auto")
        ax[-1].set(ylabel="64 queries", xticks=range(k), xticklabels=tokens[-k:])
        ax[-1].tick_params(axis="x", rotation=90, labelsize=6)
    for a in axes.flat:
        a.axis("on" if a.images else "off")
    fig.suptitle("Attention rolled out from each image token to each word: where information can flow, not "
                 "what caused the picture", fontsize=7)
    fig.tight_layout()
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return Path(out)


def write_geneval(outdir, records, images: torch.Tensor, grid: bool = False) -> int:
    """Images (P, S, 3, H, W) of P GenEval records -> GenEval's folder layout (data.write_geneval_folder);
    grid=True adds outdir/00000/grid.png, the samples in a row. Returns the number of images written."""
    data.write_geneval_folder(str(outdir), records, [list(row) for row in images])
    if grid:
        for i, row in enumerate(images):
            save_png(image_grid([list(row)], scale=1), Path(outdir) / f"{i:05d}" / "grid.png")
    return images.shape[0] * images.shape[1]


def read_image(path, image_size: int) -> torch.Tensor:
    """An image file -> float (3, S, S) in [0, 1], resized and centre-cropped exactly as training data."""
    try:
        raw = Path(path).read_bytes()
    except OSError as e:
        raise UserError(f"cannot read image {path}: {e.strerror or e}") from None
    image, reason = data.decode_image(raw, image_size)
    if image is None:
        raise UserError(f"cannot decode image {path}: {reason} (PIL could not read it as an image)")
    return image


# ---- released BLIP3-o weights: queries + Next-DiT from the checkpoint, the backbone from its own path ----

# The released model's generation input (NOTES.md, "The generation input"): the caption in Qwen's ChatML
# template, the assistant turn left open (inference.py, add_template), then [IMG], then the 64 queries.
OFFICIAL_TEMPLATE = ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
                     "<|im_start|>user\nPlease generate image based on the following caption: {}<|im_end|>\n"
                     "<|im_start|>assistant\n")
IMG_TOKEN = "[IMG]"  # added by BLIP3o's training after Qwen's own tokens: id 151665 in the released tokenizer


def load_official(checkpoint, backbone, device: torch.device):
    """-> (generator with the released queries and DiT, frozen LM, tokenizer). The backbone loads from its own
    path; the tokenizer from the checkpoint when it ships one (BLIP3o's builder.py), else the backbone's."""
    try:
        queries, dit, report = pipeline.load_official_generation_weights(checkpoint, device=device,
                                                                       dtype=torch.float32)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot load {checkpoint}: {e}") from None
    print(report)
    if queries is None or report.missing or report.mismatched:
        raise UserError(f"{checkpoint} is incomplete: {len(report.missing)} missing, "
                        f"{len(report.mismatched)} mis-shaped tensors (listed above)")
    tok_dir = checkpoint if (Path(checkpoint) / "tokenizer_config.json").is_file() else backbone
    try:
        tok = blip3o.load_tokenizer(str(tok_dir))
        lm = blip3o.build_backbone(blip3o.LMConfig(name=str(backbone)), device=device,
                                   dtype=torch.bfloat16 if device.type == "cuda" else torch.float32)
    except (OSError, ValueError) as e:  # no such folder / hub id, or no config / tokenizer in it
        raise UserError(f"cannot load the backbone {backbone}: {str(e).splitlines()[0]}") from None
    lm.requires_grad_(False).eval()
    if tok.pad_token is None:  # right padding is never attended to (causal LM), any id will do
        tok.pad_token = tok.eos_token
    if IMG_TOKEN not in tok.get_vocab():  # looked up by name, never by a hard-coded id
        raise UserError(f"the tokenizer in {tok_dir} has no {IMG_TOKEN} token (BLIP3-o's training adds it): "
                        "use the released checkpoint's own tokenizer (its folder ships one)")
    img, table = tok.convert_tokens_to_ids(IMG_TOKEN), lm.get_input_embeddings().weight  # table: (V, D_lm)
    row = pipeline.load_official_embedding_row(checkpoint, img)
    if row is not None:
        table.data[img] = row.to(table.device, table.dtype)  # trained; the frozen backbone's others: stock
    print(f"tokenizer: {tok_dir}, {IMG_TOKEN} = id {img}, its embedding from "
          f"{'the checkpoint' if row is not None else 'the backbone (the checkpoint has none)'}")
    lm_dim = lm.config.get_text_config().hidden_size
    if queries.shape[1] != lm_dim:
        raise UserError(f"the checkpoint's queries are {queries.shape[1]} wide, the backbone {lm_dim}: "
                        "use the backbone the checkpoint was trained on (4B: Qwen2.5-VL-3B, 8B: 7B)")
    cfg = blip3o.Config(preset="official", dit=report.config, decoder=None, num_queries=queries.shape[0])
    with torch.device("meta"):  # placeholders only: the loaded queries and DiT replace them below
        generator = blip3o.Generator(cfg, loss="flow", target_dim=report.config.in_channels, lm_dim=lm_dim)
    generator.queries = torch.nn.Parameter(queries.to(device), requires_grad=False)
    generator.dit = dit.to(device).eval()
    generator.target_scale = torch.ones((), device=device)  # the released model's targets are not normalized
    return generator, lm, tok


def official_prompt_ids(tok, texts, template: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Texts -> ids (B, T) right-padded, lengths (B,): each text in OFFICIAL_TEMPLATE (or bare), then [IMG],
    tokenized as the official generate_image does (for Qwen no <bos>); each row reads what it would alone."""
    img = tok.convert_tokens_to_ids(IMG_TOKEN)
    rows = [tok(OFFICIAL_TEMPLATE.format(t) if template else t)["input_ids"] + [img] for t in texts]
    T = max(len(r) for r in rows)
    ids = torch.tensor([r + [tok.pad_token_id] * (T - len(r)) for r in rows])  # (B, T)
    return ids, torch.tensor([len(r) for r in rows])


@torch.no_grad()
def official_features(generator, lm, tok, prompts, num_samples: int, seed: int, steps: int, guidance: float,
                      device: torch.device, template: bool = True) -> torch.Tensor:
    """Prompts -> CLIP features (P, S, 64, D) from the released model; sample j uses seed + j. template=False
    feeds the texts bare, still followed by [IMG] (the released decoder's negative prompt " ")."""
    ids, lens = official_prompt_ids(tok, prompts, template)
    with pipeline.autocast(device):
        cond = generator.condition(lm, ids.to(device), lens.to(device))  # (P, 64, D_lm)
        columns = [generator.sample(cond, steps=steps, guidance=guidance,
                                    rng=torch.Generator(device).manual_seed(seed + j)).float().cpu()
                   for j in range(num_samples)]
    return torch.stack(columns, 1)  # (P, S, 64, D)


# ---- command line --------------------------------------------------------------------------------------

def parse_args(argv=None):
    p = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_options(p)
    p.add_argument("--variant", default="flow-clip", help="generation checkpoint under RUN/generate/: "
                   "flow-clip (BLIP3-o), mse-clip or flow-vae (ablations)")
    mode = p.add_argument_group("what to do (text -> image when only --prompt is given)")
    mode.add_argument("--prompt", action="append", default=[], help="a caption; repeat for several rows")
    mode.add_argument("--reconstruct", metavar="IMAGE", help="image -> CLIP tokens -> pixels, side by side")
    mode.add_argument("--image", metavar="PATH", help="an image to ask about (with --question or --caption)")
    mode.add_argument("--question", help="a question about --image, e.g. 'what color is the circle?'")
    mode.add_argument("--caption", action="store_true", help=f"caption --image ('{data.caption_question}')")
    mode.add_argument("--geneval", metavar="METADATA.jsonl", help="GenEval prompts -> GenEval folder layout")
    mode.add_argument("--trajectory", action="store_true", help="--prompt's samples at every Euler step: "
                      "a strip (out/trajectory.png) and an animation (out/trajectory.gif)")
    mode.add_argument("--words", action="store_true", help="what each word of --prompt steers: one map per "
                      "word over the first sample (out/words.png)")
    mode.add_argument("--official-checkpoint", metavar="DIR", help="released weights (with --backbone)")
    opts = p.add_argument_group("options")
    opts.add_argument("--num-samples", type=int, default=4, help="images per prompt (default 4)")
    opts.add_argument("--seed", type=int, default=0, help="sample j uses seed + j")
    add_sampling_options(opts)
    for name, kind, default in (("steps", int, released.STEPS), ("guidance", float, released.GUIDANCE)):
        opts.add_argument(f"--decoder-{name}", type=kind, default=default,
                          help=f"--official-checkpoint: {name} of the released decoder ({default})")
    opts.add_argument("--allow-unknown-words", action="store_true",
                      help="go on with prompt or question words the toy model never saw (read as <unk>)")
    opts.add_argument("--temperature", type=float, default=0.0, help="answer sampling (0: greedy)")
    opts.add_argument("--outdir", help="--geneval: output folder")
    opts.add_argument("--per-prompt", type=int, default=4, help="--geneval: images per prompt (default 4)")
    opts.add_argument("--grid", action="store_true", help="--geneval: also write a grid.png per prompt")
    opts.add_argument("--batch-size", type=int, default=64, help="prompts generated at once")
    opts.add_argument("--backbone", metavar="PATH", help="--official-checkpoint: the LM (hub id or folder)")
    opts.add_argument("--features-only", action="store_true", help="--official-checkpoint: stop at the CLIP "
                      "features (also when --out ends in .safetensors); no diffusers needed")
    opts.add_argument("--resolution", type=int, default=released.SIZE, help="--official-checkpoint: "
                      "image height and width (default %(default)s, the released one)")
    opts.add_argument("--out", help="output file (default out/samples.png, out/reconstruction.png); "
                      "--official-checkpoint: a folder for the images (default out/official) or a "
                      ".safetensors file for the features (default out/features.safetensors)")
    args = p.parse_args(argv)
    args.features_only = args.features_only or str(args.out or "").endswith(".safetensors")

    modes = [m for m in ("reconstruct", "image", "geneval", "official_checkpoint") if getattr(args, m)]
    if len(modes) > 1:
        p.error(f"choose one of --reconstruct, --image, --geneval, --official-checkpoint (got {len(modes)})")
    if args.image and bool(args.question) == args.caption:
        p.error("--image needs exactly one of --question TEXT or --caption")
    if (args.question or args.caption) and not args.image:
        p.error("--question / --caption need --image PATH")
    if not modes and not args.prompt:
        p.error("nothing to do: give --prompt, --reconstruct, --image, --geneval or --official-checkpoint")
    if args.geneval and not args.outdir:
        p.error("--geneval needs --outdir DIR")
    if args.official_checkpoint and not args.backbone:
        p.error("--official-checkpoint needs --backbone PATH")
    if args.trajectory + args.words + len(modes) > 1 or (args.trajectory or args.words) and not args.prompt:
        p.error("--trajectory or --words (one of them) goes with --prompt alone")
    if args.prompt and modes and not args.official_checkpoint:
        p.error(f"--prompt does not go with --{modes[0].replace('_', '-')}")
    if args.official_checkpoint and not args.prompt:
        p.error("--official-checkpoint needs at least one --prompt")
    if any(not text.strip() for text in args.prompt):
        p.error("empty prompt")
    if args.question is not None and not args.question.strip():
        p.error("empty question")
    check_numbers(p, args, at_least_one=("steps", "decoder_steps", "num_samples", "per_prompt", "batch_size",
                                         "resolution"),
                  non_negative=("guidance", "decoder_guidance", "temperature"))
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    modes = {"official_checkpoint": run_official, "geneval": run_geneval, "image": run_answer,
             "reconstruct": run_reconstruct}
    run = next((fn for mode, fn in modes.items() if getattr(args, mode)), run_text_to_image)
    return run_main(run, args, pipeline.pick_device(args.device))


def check_pixels(pipe: pipeline.Pipeline, run) -> None:
    """Text -> image needs the second stage too: the pixel decoder (or the VAE, for flow-vae)."""
    stage = "vae" if pipe.target == "vae" else "decoder"
    if (pipe.vae if stage == "vae" else pipe.decoder) is None:
        raise UserError(f"no {stage} checkpoint in {run} (train it: python train.py --stage {stage} "
                        f"--out {run})")


def run_text_to_image(args, device):
    pipe = pipeline.load_run(args.run, args.variant, device, need=("clip", "understand", "generate"))
    check_pixels(pipe, args.run)
    check_known_words(pipe.tokenizer, args.prompt, args.allow_unknown_words)
    if (args.trajectory or args.words) and (pipe.generator.loss_type, pipe.target) != ("flow", "clip"):
        raise UserError(f"--trajectory and --words look inside CLIP + Flow; {args.variant} is not")
    how = f"{args.variant}, seed {args.seed}, guidance {args.guidance}, {args.steps} steps"
    if args.trajectory:
        out = Path(args.out or "out/trajectory.png")
        trajectory(pipe, args.prompt, args.num_samples, args.seed, args.steps, args.guidance, out,
                   args.batch_size)
        print(f"{args.num_samples} samples a prompt, each Euler step ({how}) -> {out} and .gif")
    elif args.words:
        images, maps = word_maps(pipe, args.prompt, args.seed, args.steps, args.guidance)
        out = save_word_maps(images, maps, args.prompt, pipe.tokenizer, args.out or "out/words.png")
        print(f"word maps of {len(args.prompt)} prompt(s) ({how}) -> {out}")
    else:
        images, _ = generate_grid(pipe, args.prompt, args.num_samples, args.seed, args.steps, args.guidance,
                                  args.batch_size, quiet=False)
        out = save_png(image_grid([list(row) for row in images], args.prompt), args.out or "out/samples.png")
        print(f"{len(args.prompt)} prompt(s) x {args.num_samples} samples ({how}) -> {out}")


def run_reconstruct(args, device):
    pipe = pipeline.load_run(args.run, args.variant, device, need=("clip", "decoder"))
    image = read_image(args.reconstruct, pipe.config.clip.image_size)
    recon = pipe.reconstruct(image[None])
    label = f"{Path(args.reconstruct).name}: original | reconstruction"
    out = save_png(image_grid([[image, recon[0].cpu()]], [label]), args.out or "out/reconstruction.png")
    print(f"{args.reconstruct} -> 64 CLIP features -> pixel decoder -> {out}")


def run_answer(args, device):
    pipe = pipeline.load_run(args.run, args.variant, device, need=("clip", "understand"))
    image = read_image(args.image, pipe.config.clip.image_size)
    question = data.caption_question if args.caption else args.question
    check_known_words(pipe.tokenizer, [question], args.allow_unknown_words)
    rng = torch.Generator(pipe.device).manual_seed(args.seed)
    answer = pipe.answer(image[None], [question], temperature=args.temperature, rng=rng)[0]
    print(f"Q: {question}\nA: {answer}")


def run_geneval(args, device):
    try:
        records = data.load_geneval_metadata(args.geneval)
    except OSError as e:
        raise UserError(f"cannot read {args.geneval}: {e.strerror or e}") from None
    except ValueError as e:
        raise UserError(str(e)) from None
    pipe = pipeline.load_run(args.run, args.variant, device, need=("clip", "understand", "generate"))
    check_pixels(pipe, args.run)
    outside = sum(not data.in_world(r) for r in records)
    print(f"{len(records)} prompts from {args.geneval}; {outside} are outside the shapes world "
          "(they still generate: the toy model simply does not know those words)")
    images, _ = generate_grid(pipe, [r["prompt"] for r in records], args.per_prompt, args.seed,
                              args.steps, args.guidance, args.batch_size, quiet=False)
    n = write_geneval(args.outdir, records, images, grid=args.grid)
    print(f"{n} images -> {args.outdir} (GenEval layout); score: python eval.py geneval {args.outdir}")


def run_official(args, device):
    """Released stage 2 on our code -> CLIP features -> the checkpoint's own diffusion decoder -> PNGs."""
    ckpt = args.official_checkpoint  # the decoder's cheap checks first, before the backbone and the DiT load
    unet_config = None if args.features_only else released.decoder_config(ckpt, args.resolution)
    generator, lm, tok = load_official(ckpt, args.backbone, device)
    if unet_config is not None:
        released.check_width(unet_config, generator.target_dim, str(Path(ckpt, released.DECODER_DIR, "unet")))
    feats = official_features(generator, lm, tok, args.prompt, args.num_samples, args.seed, args.steps,
                              args.guidance, device)  # (P, S, 64, D)
    if args.features_only:
        out = save_features(feats, args.prompt, Path(args.out or "out/features.safetensors"))
        print(f"{len(args.prompt)} prompt(s) x {args.num_samples} samples -> CLIP features "
              f"{tuple(feats.shape)} -> {out}")
        return
    negative = official_features(generator, lm, tok, [released.NEGATIVE_PROMPT], 1, args.seed, args.steps,
                                 args.guidance, device, template=False)[0]  # (1, 64, D), unconditional
    del generator, lm  # done with the LM and the DiT: their memory goes to the UNet
    if device.type == "cuda":
        torch.cuda.empty_cache()
    out = Path(args.out or "out/official")
    save_features(feats, args.prompt, out / "features.safetensors")
    decoder = released.load_decoder(ckpt, device)
    P, S = feats.shape[:2]
    rows = [[] for _ in range(P)]  # feature set (p, s) -> one image, out/p{p}_s{s}.png, drawn with seed + s
    with tqdm(total=P * S, desc="decoding", unit="image", file=sys.stderr, dynamic_ncols=True) as bar:
        for p in range(P):
            for s in range(S):
                rng = torch.Generator(device).manual_seed(args.seed + s)
                image = released.decode(decoder, feats[p, s][None], negative, steps=args.decoder_steps,
                                        guidance=args.decoder_guidance, height=args.resolution,
                                        width=args.resolution, rng=rng)[0].cpu()  # (3, H, W) in [0, 1]
                save_png(to_pil(image), out / f"p{p:03d}_s{s:02d}.png")
                rows[p].append(image)
                bar.update(1)
    grid = save_png(image_grid(rows, args.prompt, scale=1), out / "grid.png")
    how = f"{args.decoder_steps} steps, guidance {args.decoder_guidance}, {args.resolution}x{args.resolution}"
    print(f"{len(args.prompt)} prompt(s) x {args.num_samples} samples, released decoder ({how}) -> {grid} "
          "and one PNG each")


def save_features(feats: torch.Tensor, prompts, out: Path) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file({"features": feats.contiguous()}, str(out), metadata={"prompts": json.dumps(prompts)})
    return out


if __name__ == "__main__":
    sys.exit(main())
