"""The plumbing around the model in blip3o.py: the released weights, checkpoints (an unreadable file raises
CheckpointError naming it and the command that retrains it), devices, a run rebuilt as one `Pipeline`.
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import safe_open

from blip3o import (GUIDANCE, IMAGE, SAMPLE_STEPS, Config, DiTConfig, Generator, ImageEncoder, NextDiT,
                    PixelDecoder, VAE, VisionLanguageModel, build_backbone, build_qa_batch, decode_ids,
                    encode_prompts, generate, load_tokenizer)


# --- Released BLIP3-o generation weights (BLIP3o/BLIP3o-Model-8B, -4B) --------------------------------

OFFICIAL_DIT_PREFIX = "model.dit.model."
OFFICIAL_QUERIES_KEY = "model.latent_queries"
OFFICIAL_EMBED_KEY = "model.embed_tokens.weight"  # the backbone's input embeddings (rows for [IMG] & co.)


def official_key_map(dit: NextDiT) -> dict[str, str]:
    """{our state_dict name: released checkpoint key}. Our names are the official ones under the prefix."""
    return {name: OFFICIAL_DIT_PREFIX + name for name in dit.state_dict()}


def dit_config_from_state(state, **overrides) -> DiTConfig:
    """A DiTConfig read off the shapes of a DiT state dict or {name: shape} (our names, any key prefix)."""
    gate_keys = [k for k in state if k.endswith("layers.0.gate")]
    if not gate_keys:
        raise ValueError("not a Next-DiT state: no 'layers.0.gate' key")
    prefix = gate_keys[0][: -len("layers.0.gate")]
    shape = {k[len(prefix):]: tuple(getattr(v, "shape", v)) for k, v in state.items() if k.startswith(prefix)}
    hidden, in_channels = shape["patch_embedder.proj.weight"]
    num_heads = shape["layers.0.gate"][0]
    head_dim = hidden // num_heads
    num_layers = 1 + max(int(k.split(".")[1]) for k in shape if k.startswith("layers."))
    cfg = dict(in_channels=in_channels, hidden_size=hidden, num_layers=num_layers, num_heads=num_heads,
               num_kv_heads=shape["layers.0.attn1.to_k.weight"][0] // head_dim,
               ffn_dim=shape["layers.0.feed_forward.linear_1.weight"][0],
               cond_dim=shape["caption_projection.linear_1.weight"][1],
               time_embed_dim=shape["time_caption_embed.timestep_embedder.linear_1.weight"][0])
    return DiTConfig(**{**cfg, **overrides})


@dataclass
class LoadReport:
    """What load_official_generation_weights did: complete when missing, mismatched, unexpected are empty."""

    files: list[str]
    config: DiTConfig
    loaded: int = 0
    skipped: dict[str, int] = field(default_factory=dict)  # the checkpoint's other tensors, per top prefix
    missing: list[str] = field(default_factory=list)  # model tensors the checkpoint lacks (left at init)
    mismatched: list[str] = field(default_factory=list)  # "key: checkpoint vs model shape" (left at init)
    unexpected: list[str] = field(default_factory=list)  # DiT keys the model has no place for (ignored)

    def __str__(self):
        lines = [f"loaded {self.loaded} tensors from {len(self.files)} file(s)"]
        lines += [f"skipped {n:>6} tensors under {p}" for p, n in sorted(self.skipped.items())]
        lines += [f"{what}: {key}" for what in ("missing", "mismatched", "unexpected")
                  for key in getattr(self, what)]
        return "\n".join(lines)


def load_official_embedding_row(path, token_id: int) -> torch.Tensor | None:
    """Row `token_id` (H,) of a released checkpoint's `model.embed_tokens.weight` (None if none), read as a
    slice: BLIP3o adds [IMG] after Qwen's tokens and trains its row, unlike the stock backbone (NOTES.md)."""
    path = Path(path)
    for file in [path] if path.is_file() else sorted(path.glob("*.safetensors")):
        with safe_open(os.fspath(file), framework="pt") as f:
            if OFFICIAL_EMBED_KEY in f.keys():
                table = f.get_slice(OFFICIAL_EMBED_KEY)
                return table[token_id:token_id + 1][0] if token_id < table.get_shape()[0] else None
    return None


def load_official_generation_weights(path, *, device="cpu", dtype=None):
    """A released BLIP3-o checkpoint (a folder of *.safetensors shards or one file) -> (its 64 queries (64, H)
    or None, its NextDiT configured from the shapes, LoadReport); dtype None keeps the stored one."""
    path = Path(path)
    files = [path] if path.is_file() else sorted(path.glob("*.safetensors"))
    index = path / "model.safetensors.index.json"
    if index.exists():  # it names every shard: only those holding our keys are read
        files = sorted({path / f for k, f in json.loads(index.read_text())["weight_map"].items()
                        if k.startswith(OFFICIAL_DIT_PREFIX) or k == OFFICIAL_QUERIES_KEY})
    if not files:
        raise ValueError(f"no .safetensors files found at {path}")

    dit_state, queries, skipped = {}, None, {}
    for file in files:
        with safe_open(os.fspath(file), framework="pt", device=str(device)) as f:
            for key in f.keys():
                if key.startswith(OFFICIAL_DIT_PREFIX):
                    dit_state[key[len(OFFICIAL_DIT_PREFIX):]] = f.get_tensor(key)
                elif key == OFFICIAL_QUERIES_KEY:
                    queries = f.get_tensor(key)
                else:  # only counted, under 'model.layers', 'visual', ...
                    parts = key.split(".")
                    top = ".".join(parts[:2]) if parts[0] == "model" and len(parts) > 2 else parts[0]
                    skipped[top] = skipped.get(top, 0) + 1
    if not dit_state:
        raise ValueError(f"no '{OFFICIAL_DIT_PREFIX}*' keys in {[os.fspath(f) for f in files]}: not a "
                         "BLIP3-o generation checkpoint")
    if dtype is not None:
        dit_state = {k: v.to(dtype) for k, v in dit_state.items()}
        queries = None if queries is None else queries.to(dtype)

    cfg = dit_config_from_state(dit_state)
    report = LoadReport(files=[os.fspath(f) for f in files], config=cfg, skipped=skipped)
    with torch.device("meta"):  # takes the tensors in place: no second copy of 1.4 B parameters
        model = NextDiT(cfg)
    expected = model.state_dict()
    report.unexpected = sorted(OFFICIAL_DIT_PREFIX + k for k in dit_state if k not in expected)
    report.missing = sorted(OFFICIAL_DIT_PREFIX + k for k in expected if k not in dit_state)
    report.mismatched = sorted(
        f"{OFFICIAL_DIT_PREFIX}{k}: checkpoint {tuple(v.shape)} vs model {tuple(expected[k].shape)}"
        for k, v in dit_state.items() if k in expected and v.shape != expected[k].shape)
    usable = {k: v for k, v in dit_state.items() if k in expected and v.shape == expected[k].shape}
    if len(usable) == len(expected):
        model.load_state_dict(usable, assign=True)  # the meta parameters become the loaded tensors
    else:  # built normally, the missing or mis-shaped tensors left at init
        model = NextDiT(cfg).to(device=device, dtype=dtype)
        model.load_state_dict(usable, strict=False)
    report.loaded = len(usable) + (queries is not None)
    if queries is None:
        report.missing.append(OFFICIAL_QUERIES_KEY)
    else:
        queries = queries.reshape(-1, queries.shape[-1])  # (1, 64, H) -> (64, H)
    return queries, model, report


# --- Checkpoints: safetensors weights + JSON, written atomically --------------------------------------

class CheckpointError(RuntimeError):
    """A checkpoint that is missing, damaged, from another stage, or does not match the model."""

    def __init__(self, message: str, damaged: Path | None = None, reason: str | None = None):
        super().__init__(message)
        self.damaged, self.reason = damaged, reason  # the file that cannot be read, what is wrong (else None)


def damaged_file(file, reason: str, hint: str) -> CheckpointError:
    """The error for a checkpoint file that cannot be used: which file, what is wrong, what to do."""
    return CheckpointError(f"{file} is {reason}: {hint}", damaged=Path(file), reason=reason)


def previous_path(folder) -> Path:
    """Where a stage's previous checkpoint stays while the next one is in place: `<folder>.prev`."""
    return Path(folder).with_name(Path(folder).name + ".prev")


def retrain_command(folder, stage: str | None) -> str:
    """The command that trains a stage's checkpoint folder again, e.g. for RUN/generate/mse-clip:
    `python train.py --stage generate --loss mse --target clip --restart --out RUN`."""
    if stage is None:
        return "python train.py --stage STAGE --restart"
    parts = stage.split("/")
    run = Path(folder).parents[len(parts) - 1]
    flags = ""
    if parts[0] == "generate" and len(parts) == 2:
        loss, target = parts[1].split("-", 1)
        flags = f" --loss {loss} --target {target}"
    return f"python train.py --stage {parts[0]}{flags} --restart --out {run}"


def save_checkpoint(folder, tensors: dict, meta: dict, optimizer_state: dict | None = None,
                    tokenizer=None, keep_previous: bool = True) -> None:
    """Write a checkpoint folder atomically, the one it replaces kept as `<folder>.prev` unless not
    keep_previous (train.py: a damaged one, whose `.prev` then stays)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp, prev = folder.with_name(folder.name + f".tmp-{os.getpid()}"), previous_path(folder)
    for stale in folder.parent.glob(folder.name + ".tmp-*"):  # left by a writer that was killed
        shutil.rmtree(stale, ignore_errors=True)
    tmp.mkdir()  # written and fsync'd first, then renamed into place: a crash leaves a complete checkpoint
    # clone(): tied weights (the toy LM's embedding = its output layer) share storage, which
    # safetensors refuses; each key gets its own copy and `load_module` restores both.
    weights = {k: v.detach().cpu().clone().contiguous() for k, v in tensors.items()}
    for k, v in weights.items():
        if v.is_floating_point() and not torch.isfinite(v).all():
            shutil.rmtree(tmp, ignore_errors=True)
            raise CheckpointError(f"refusing to save a non-finite tensor: {k}")
    save_file(weights, tmp / "model.safetensors")
    (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
    if optimizer_state is not None:
        torch.save(optimizer_state, tmp / "optimizer.pt")
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp / "tokenizer")
    for f in tmp.iterdir():
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    if folder.exists() and keep_previous:
        shutil.rmtree(prev, ignore_errors=True)
        folder.rename(prev)
    elif folder.is_dir():
        shutil.rmtree(folder)
    elif folder.exists():  # a file where the folder should be
        folder.unlink()
    tmp.rename(folder)


def checkpoint_path(folder) -> Path | None:
    """A stage's latest checkpoint: the folder (intact or not), else `<folder>.prev` (a crash), else None."""
    return next((cand for cand in (Path(folder), previous_path(folder)) if cand.exists()), None)


def read_meta(path, stage: str | None = None, folder=None) -> dict:
    """A checkpoint's meta.json (in `path`, the checkpoint of stage folder `folder`), checked: a dict
    naming its stage (the expected one, if given) and, if it has one, a config that builds."""
    path = Path(path)
    file = path / "meta.json"
    hint = "train the stage again: " + retrain_command(folder or path, stage)
    if not path.is_dir():
        raise damaged_file(path, "a file, not a checkpoint folder", hint)
    try:
        meta = json.loads(file.read_text())
    except FileNotFoundError:
        raise damaged_file(file, "missing", hint) from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise damaged_file(file, f"damaged ({first_line(e)})", hint) from None
    if not isinstance(meta, dict) or not isinstance(meta.get("stage"), str):
        raise damaged_file(file, "not a checkpoint's meta.json (no stage)", hint)
    if stage is not None and meta["stage"] != stage:
        raise CheckpointError(f"{path} holds a {meta['stage']!r} checkpoint, expected {stage!r}: put the "
                              f"{stage} checkpoint there, or {hint}")
    if "config" in meta:
        try:
            Config.from_dict(meta["config"])
        except (TypeError, KeyError, AttributeError, ValueError) as e:
            raise damaged_file(file, f"damaged (no valid config: {first_line(e)})", hint) from None
    return meta


def first_line(error: BaseException) -> str:
    """An exception's message cut to its first line (errors are reported in one line)."""
    return (str(error).strip() or type(error).__name__).splitlines()[0]


def load_checkpoint(folder, stage: str | None = None, with_optimizer: bool = False, path: Path | None = None):
    """-> (meta dict, tensors dict, optimizer state or None), from `path` (default: checkpoint_path(folder)).
    Safe: no pickle beyond weights_only. An unreadable file raises CheckpointError naming it."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path) if path is not None else checkpoint_path(folder)
    if path is None:
        raise CheckpointError(f"no checkpoint in {folder}")
    hint = "train the stage again: " + retrain_command(folder, stage)
    meta = read_meta(path, stage, folder)
    weights = path / "model.safetensors"
    try:
        tensors = load_file(weights)
    except FileNotFoundError:
        raise damaged_file(weights, "missing", hint) from None
    except (OSError, SafetensorError) as e:
        raise damaged_file(weights, f"damaged ({first_line(e)})", hint) from None
    opt, optimizer = None, path / "optimizer.pt"
    if with_optimizer and optimizer.is_file():
        try:
            opt = torch.load(optimizer, map_location="cpu", weights_only=True)
        except Exception as e:  # truncated (EOFError, RuntimeError) or a refused pickle (UnpicklingError)
            raise damaged_file(optimizer, f"damaged ({first_line(e)})", hint) from None
    return meta, tensors, opt


def module_tensors(prefix: str, module: nn.Module) -> dict:
    """A module's state dict (parameters and persistent buffers) under `prefix.`."""
    return {f"{prefix}.{k}": v for k, v in module.state_dict().items()}


def load_module(module: nn.Module, tensors: dict, prefix: str, source="checkpoint", ema: bool = False,
                stage: str | None = None) -> None:
    """Copy `prefix.*` tensors into a module; say exactly which keys or shapes do not match, and for the
    checkpoint folder `source` of a run's `stage`, how to train it again."""
    own = module.state_dict()
    found = {k[len(prefix) + 1:]: v for k, v in tensors.items() if k.startswith(prefix + ".")}
    if ema:  # a weight's moving average "ema.<key>" where there is one: diffusion samples from EMA weights
        # A tied weight (one tensor, two names: the toy LM's embedding and output layer) has one EMA,
        # under its first name; every name must take that one, or the last name loaded would win.
        first, alias = {}, {}
        for name, p in module.named_parameters(remove_duplicate=False):
            alias[name] = first.setdefault(id(p), name)
        found = {k: tensors.get(f"ema.{prefix}.{alias.get(k, k)}", v) for k, v in found.items()}
    missing, unexpected = sorted(set(own) - set(found)), sorted(set(found) - set(own))
    shapes = [f"{k}: {tuple(found[k].shape)} in {source}, {tuple(own[k].shape)} in model"
              for k in own if k in found and found[k].shape != own[k].shape]
    lines = [f"{what} {len(keys)} keys, e.g. {', '.join(keys[:5])}"
             for what, keys in (("missing", missing), ("unexpected", unexpected)) if keys]
    lines += ["shape mismatch: " + "; ".join(shapes[:5])] if shapes else []
    if lines:
        again = "" if stage is None else (" (a checkpoint of another run or config? train the stage again: "
                                          f"{retrain_command(source, stage)})")
        raise CheckpointError(f"{source} does not match the {prefix!r} model: " + " | ".join(lines) + again)
    module.load_state_dict(found, strict=True)


# --- Devices and precision (chosen once, in one place) ------------------------------------------------

def pick_device(name: str = "auto") -> torch.device:
    """CUDA -> MPS -> CPU, unless a device is named."""
    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def autocast(device: torch.device):
    """bf16 autocast on CUDA; a no-op context elsewhere (CPU bf16 is not worth its error in the toy)."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast(device.type, enabled=False)


def count_params(module: nn.Module) -> tuple[int, int]:
    """(trainable, frozen) parameter counts."""
    t = sum(p.numel() for p in module.parameters() if p.requires_grad)
    return t, sum(p.numel() for p in module.parameters()) - t


# --- The whole model, rebuilt from a run folder -------------------------------------------------------

@dataclass
class Pipeline:
    """Every trained piece of a run, rebuilt from its checkpoints alone (no command-line flags)."""

    config: Config
    tokenizer: object
    clip: ImageEncoder  # RUN/clip, with the tokenizer
    vlm: VisionLanguageModel | None = None  # RUN/understand: projector + LM (RUN/joint: trained with the DiT)
    generator: Generator | None = None  # RUN/generate/<loss>-<target> (or RUN/joint): queries + Next-DiT or W
    decoder: PixelDecoder | None = None  # RUN/decoder: pixels
    vae: VAE | None = None  # RUN/vae (ablation)
    target: str = "clip"
    device: torch.device = torch.device("cpu")

    @torch.no_grad()
    def answer(self, images: torch.Tensor, questions, temperature: float = 0.0, max_new_tokens: int = 24,
               rng=None) -> list[str]:
        """images (B, 3, H, W) in [0, 1], one question each -> answers (greedy or sampled)."""
        if self.vlm is None:
            raise CheckpointError("this run has no understanding checkpoint (RUN/understand)")
        ctok = self.clip.tokens(images.to(self.device))
        ids, _, lens = build_qa_batch(self.tokenizer, self.vlm.image_tokens(ctok.shape[1]), questions)
        outs = self.vlm.generate(ids.to(self.device), lens.to(self.device), ctok, max_new_tokens,
                                 self.tokenizer.eos_token_id, temperature, rng)
        return [decode_ids(self.tokenizer, o) for o in outs]

    def generate_tokens(self, captions, steps: int = SAMPLE_STEPS, guidance: float = GUIDANCE,
                        rng=None, on_step=None) -> torch.Tensor:
        """Captions -> generated target tokens (B, 64, D): scene tokens (or VAE latents). on_step(t, x_t,
        guess) sees every Euler step (blip3o.euler_sample)."""
        if self.generator is None or self.vlm is None:
            raise CheckpointError("this run has no generation checkpoint (RUN/generate/...)")
        return generate(self.generator, self.vlm.lm, self.tokenizer, captions, steps, guidance, rng, on_step)

    def check_prompts(self, captions) -> None:
        """Refuse empty or over-long prompts (ValueError) before any sampling starts."""
        g = self.generator
        encode_prompts(self.tokenizer, captions, template=g.template, limit=g.max_prompt)

    @torch.no_grad()
    def tokens_to_images(self, tokens: torch.Tensor) -> torch.Tensor:
        """Target tokens -> images (B, 3, H, W) in [0, 1]: the pixel decoder, or the VAE decoder."""
        if self.target == "vae":
            return self.vae.tokens_to_images(tokens)
        if self.decoder is None:
            raise CheckpointError("this run has no pixel decoder (RUN/decoder)")
        return self.decoder(tokens)

    def generate_images(self, captions, steps: int = SAMPLE_STEPS, guidance: float = GUIDANCE,
                        rng=None) -> torch.Tensor:
        """Text -> image: condition -> scene tokens (diffusion) -> pixels (the decoder)."""
        return self.tokens_to_images(self.generate_tokens(captions, steps, guidance, rng))

    @torch.no_grad()
    def reconstruct(self, images: torch.Tensor) -> torch.Tensor:
        """Image -> target tokens -> image: the CLIP autoencoder (or the VAE's, for target 'vae')."""
        images = images.to(self.device)
        tokens = self.vae.tokens(images) if self.target == "vae" else self.clip.target_tokens(images)
        return self.tokens_to_images(tokens)


def check_run_folder(run) -> Path:
    """A run folder that exists and is a folder, or a CheckpointError saying which it is not."""
    run = Path(run)
    if run.exists() and not run.is_dir():
        raise CheckpointError(f"{run} is a file, not a run folder: give the folder train.py wrote (--out)")
    if not run.is_dir():
        raise CheckpointError(f"no run folder {run} (train one: python train.py --out {run})")
    return run


# Each trained piece, rebuilt from its stage's checkpoint: load_run and train.py's later stages use these.

def load_clip(run) -> tuple[ImageEncoder, object, Config]:
    """RUN/clip -> the toy CLIP, the run's tokenizer (saved with it) and the config the CLIP stage saved."""
    folder = Path(run) / "clip"
    meta, tensors, _ = load_checkpoint(folder, stage="clip")
    cfg = Config.from_dict(meta["config"])
    clip = ImageEncoder(cfg.clip)
    load_module(clip, tensors, "clip", folder, stage="clip")
    tok_dir = checkpoint_path(folder) / "tokenizer"
    hint = "train the stage again: " + retrain_command(folder, "clip")
    if not tok_dir.is_dir():
        raise damaged_file(tok_dir, "missing", hint)
    try:
        return clip, load_tokenizer(str(tok_dir)), cfg
    except Exception as e:  # transformers raises OSError, ValueError or a JSON error for a broken folder
        raise damaged_file(tok_dir, f"damaged ({first_line(e)})", hint) from None


def load_vlm(run, tokenizer, clip_width: int) -> VisionLanguageModel:
    """RUN/understand -> the stage-1 LM and projector."""
    folder = Path(run) / "understand"
    meta, tensors, _ = load_checkpoint(folder, stage="understand")
    lm_cfg = Config.from_dict(meta["config"]).lm
    vlm = VisionLanguageModel(build_backbone(lm_cfg), clip_width, tokenizer.convert_tokens_to_ids(IMAGE),
                              lm_cfg.image_merge)
    load_module(vlm, tensors, "vlm", folder, stage="understand")
    return vlm


def load_vae(run) -> VAE:
    """RUN/vae -> the ablation's VAE."""
    folder = Path(run) / "vae"
    meta, tensors, _ = load_checkpoint(folder, stage="vae")
    vae = VAE(Config.from_dict(meta["config"]).vae)
    load_module(vae, tensors, "vae", folder, stage="vae")
    return vae


def load_run(run, variant: str = "flow-clip", device="cpu", need=("clip",)) -> Pipeline:
    """Rebuild a toy run's models from RUN/<stage> checkpoints. `need`: stages that must exist."""
    run, device = check_run_folder(run), torch.device(device)
    gen_stage = "joint" if variant == "joint" else f"generate/{variant}"

    def have(stage, kind):  # kind: the name `need` uses for the stage (RUN/joint is a "generate")
        if checkpoint_path(run / stage) is not None:
            return True
        if kind in need or stage == "clip":
            raise CheckpointError(f"no {stage} checkpoint in {run} (train it: "
                                  f"{retrain_command(run / stage, stage).replace(' --restart', '')})")
        return False

    have("clip", "clip")
    clip, tokenizer, cfg = load_clip(run)
    pipe = Pipeline(cfg, tokenizer, clip, device=device)
    if have("understand", "understand"):
        pipe.vlm = load_vlm(run, tokenizer, clip.cfg.width)
    if have("decoder", "decoder"):
        meta, tensors, _ = load_checkpoint(run / "decoder", stage="decoder")
        dec_cfg = Config.from_dict(meta["config"]).decoder
        pipe.decoder = PixelDecoder(dec_cfg, clip.target_width, clip.cfg.image_size)
        load_module(pipe.decoder, tensors, "decoder", run / "decoder", ema=True, stage="decoder")
    if have("vae", "vae"):
        pipe.vae = load_vae(run)
    if have(gen_stage, "generate"):
        meta, tensors, _ = load_checkpoint(run / gen_stage, stage=gen_stage)
        gen_cfg = Config.from_dict(meta["config"])
        pipe.generator = Generator(gen_cfg, loss=meta["loss"], target_dim=meta["target_dim"])
        load_module(pipe.generator, tensors, "generator", run / gen_stage, ema=True, stage=gen_stage)
        pipe.target = meta["target"]
        if variant == "joint" and pipe.vlm is not None:  # the LM was trained too: both come from RUN/joint
            load_module(pipe.vlm, tensors, "vlm", run / gen_stage, ema=True, stage=gen_stage)
    for m in (pipe.clip, pipe.vlm, pipe.generator, pipe.decoder, pipe.vae):
        if m is not None:
            m.to(device).eval().requires_grad_(False)
    return pipe
