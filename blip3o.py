"""BLIP3-o in one file: a unified model that understands images and generates them in CLIP space.

    image --CLIP--> 64 patch tokens (B, 64, D_clip) --projector--> LM  ........ stage 1: understanding
    prompt + 64 learnable queries --frozen LM--> query states (B, 64, D_lm)
        --Next-DiT + flow matching--> 64 CLIP features --pixel decoder--> image  ........ stage 2

Read it top to bottom; every name is defined before it is used.

1. Config and presets: `toy` (trains on a laptop CPU in minutes), `blip3o-4b`, `blip3o-8b` (the paper's).
2. Tokenizer: a word-level tokenizer built offline for the toy; `AutoTokenizer` for real backbones.
3. Image encoder: an open_clip CLIP whose last block's patch tokens, pooled to an 8x8 grid, are what the LM
   reads and, at real scale, what the generator produces (paper section 3, "CLIP + Flow Matching"). The
   toy's tokens also learn which object lies under them, and two scene blocks on top make its generation
   target: 64 tokens that each describe the whole scene, as EVA-CLIP's deep, global features do.
4. Understanding (stage 1): LLaVA-style projector + causal LM, next-token loss on the answer only (the toy
   merges 2x2 CLIP tokens as Qwen2-VL does, and also trains on text-only rows so its LM reads captions).
5. Next-DiT (Lumina-Next): the diffusion transformer, building blocks first.
6. Flow matching: the loss and the Euler sampler with classifier-free guidance.
7. Generation (stage 2): 64 learnable queries appended to the prompt; the frozen LM's last hidden states
   at those positions condition a Next-DiT trained by flow matching (`Generator.loss`), or, for the
   ablation, a linear map trained with MSE; `generate` is text to features, end to end.
8. Pixels: the toy pixel decoder (reads each object from the features, then pastes a sprite per shape;
   deterministic, as BLIP3-o's decoder at inference) and a small VAE for the "VAE + Flow" ablation.
Checkpoints, devices, a whole run rebuilt (`load_run`) and the released weights' loader: pipeline.py.

Flow-matching convention (the paper's, used everywhere in this repository):
    x_t = t * x_1 + (1 - t) * x_0,  x_0 ~ N(0, I) noise, x_1 data, t ~ U(0, 1),
    the network predicts the velocity v = x_1 - x_0, sampling integrates dx/dt = v from t=0 to t=1.

Importing this module does nothing but define things.
"""
from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F


# ----------------------------------------------------------------------------------------------------
# 1. Config and presets
# ----------------------------------------------------------------------------------------------------


# The paper's generation prompt: the caption goes where {} is.
PROMPT_TEMPLATE = "Please generate an image based on the following caption: {}"
# The paper's sampling settings, read by every script: Euler steps and classifier-free guidance scale.
SAMPLE_STEPS, GUIDANCE = 30, 3.0


@dataclass
class DiTConfig:
    """Next-DiT sizes. The defaults are the released BLIP3-o 8B DiT; the 4B differs only in cond_dim=2048.

    `ffn_dim` and `time_embed_dim` left at None get the official rules, so saved configs hold numbers."""

    in_channels: int = 1792  # channels per token of the generated target (EVA-CLIP width)
    hidden_size: int = 1792
    num_layers: int = 24
    num_heads: int = 28
    num_kv_heads: int = 28  # < num_heads gives grouped-query attention (supported, not used by BLIP3-o)
    ffn_dim: int | None = None  # None -> 2/3 * 4 * hidden rounded UP to a multiple of 256 (1792 -> 4864)
    cond_dim: int = 3584  # width of the condition tokens (the LM's hidden size)
    grid_size: int = 8  # tokens = grid_size ** 2, row-major, patch size 1
    time_embed_dim: int | None = None  # None -> min(hidden, 1024), as in Lumina-Next
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0

    def __post_init__(self):
        if self.hidden_size % self.num_heads or self.num_heads % self.num_kv_heads:
            raise ValueError(f"hidden_size {self.hidden_size}, num_heads {self.num_heads} and num_kv_heads "
                             f"{self.num_kv_heads} must each divide the one before")
        if (self.hidden_size // self.num_heads) % 4:
            raise ValueError("2-D RoPE splits each head in (row, column) x (cos, sin): head_dim % 4 != 0")
        if self.ffn_dim is None:
            self.ffn_dim = 256 * math.ceil(int(2 * 4 * self.hidden_size / 3) / 256)
        if self.time_embed_dim is None:
            self.time_embed_dim = min(self.hidden_size, 1024)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def num_tokens(self) -> int:
        return self.grid_size**2


@dataclass
class CLIPConfig:
    """The CLIP image encoder. `name` set: an open_clip named model (real use); None: the toy CLIP."""

    name: str | None = None  # open_clip model name, e.g. "EVA02-E-14-plus"
    pretrained: str | None = None  # open_clip pretrained tag or a local weights file
    image_size: int = 32
    patch_size: int = 4  # 32 / 4 = an 8x8 grid: exactly the real model's 64 tokens
    width: int = 64  # D_clip: width of the patch tokens
    layers: int = 2
    heads: int = 2
    embed_dim: int = 64  # joint image-text embedding (contrastive training only)
    text_width: int = 64
    text_layers: int = 1
    text_heads: int = 2
    context_length: int = 20
    vocab_size: int = 0  # toy text tower: set from the tokenizer
    grid: int = 8  # tokens are average-pooled down to grid x grid (real: 32x32 -> 8x8)
    # Toy only: weight of the per-token objective (ImageEncoder.dense_loss); 0: contrastive loss alone.
    dense_weight: float = 0.0
    # Toy only: scene blocks that make the generation target (ImageEncoder.scene_tokens); 0: the target
    # is the patch tokens themselves, as with the real EVA-CLIP.
    scene_layers: int = 0
    scene_width: int = 32
    image_mean: tuple = (0.5, 0.5, 0.5)
    image_std: tuple = (0.5, 0.5, 0.5)


@dataclass
class LMConfig:
    """The autoregressive backbone. `name` set: a transformers hub id / local folder; None: toy Qwen2."""

    name: str | None = None  # e.g. "Qwen/Qwen2.5-VL-7B-Instruct" or a local path
    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int = 384
    max_length: int = 160  # longest sequence the toy model is built for (positions)
    vocab_size: int = 0  # toy: set from the tokenizer
    image_token: str = "<image>"  # placeholder replaced by projected CLIP tokens (Qwen: "<|image_pad|>")
    # Image tokens the projector merges into one LM token, per side (Qwen2-VL's 2x2 patch merger): the
    # toy's 8x8 CLIP grid reaches its LM as 4x4 = 16 tokens. 1: one LM token per CLIP token (LLaVA).
    image_merge: int = 1
    # Toy only: None builds a Qwen2 (1-D RoPE: image tokens in a row); (t, h, w) frequency pairs build a tiny
    # Qwen2.5-VL, whose multimodal RoPE gives image tokens rows and columns (real: in `arch`, [16, 24, 24]).
    mrope_section: tuple | None = None
    # The real backbone's published config.json, to build it on the `meta` device (sizes only, no download).
    arch: dict | None = None


@dataclass
class VAEConfig:
    """Small convolutional VAE for the "VAE + Flow" ablation: 32x32x3 -> 8x8xC latents (64 tokens)."""

    latent_channels: int = 8
    width: int = 64
    kl_weight: float = 1e-4


@dataclass
class DecoderConfig:
    """The toy pixel decoder (PixelDecoder): scene tokens -> objects -> pixels in one forward pass."""

    width: int = 128  # width of the read-out head that classifies each object
    sprite: int = 24  # side of each shape's learned sprite, in sprite pixels (3 per pixel at 8 px, 2 at 12)
    position_step: int = 4  # objects' box corners are read on this pixel grid: the toy's patch lattice


@dataclass
class Config:
    preset: str = "toy"
    clip: CLIPConfig = field(default_factory=CLIPConfig)
    lm: LMConfig = field(default_factory=LMConfig)
    dit: DiTConfig = field(default_factory=DiTConfig)  # the generation head (target: CLIP or VAE tokens)
    decoder: DecoderConfig | None = None  # pixel decoder (toy only; the real one is Emu2-Gen's SDXL UNet)
    vae: VAEConfig = field(default_factory=VAEConfig)
    num_queries: int = 64  # learnable queries (paper: 64)
    prompt_template: str = PROMPT_TEMPLATE
    # Stage-2 training where the toy departs from the paper (the README's "Where the toy differs"):
    time_sampling: str = "uniform"  # flow matching's t ~ U(0, 1) (paper); "logit_normal": SD3's
    noise_repeats: int = 1  # noise draws per prompt and step, sharing one LM pass (Generator.loss)
    query_init: str = "normal"  # queries start N(0, 1) (official); "embedding": at the LM embeddings' std
    target_norm: bool = False  # divide the targets by their std (Stable Diffusion's latent scaling)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Config":
        clip = {**d["clip"], "image_mean": tuple(d["clip"]["image_mean"]),
                "image_std": tuple(d["clip"]["image_std"])}  # JSON has lists
        # Every stage saves the whole config; fields of an older decoder design are dropped, so that an
        # older run's other stages stay usable and its decoder's weights say what does not match.
        decoder = {k: v for k, v in (d.get("decoder") or {}).items()
                   if k in {f.name for f in dataclasses.fields(DecoderConfig)}}
        lm = {**d["lm"], "mrope_section": tuple(d["lm"]["mrope_section"]) if d["lm"].get("mrope_section")
              else None}
        return cls(**{**d, "clip": CLIPConfig(**clip), "lm": LMConfig(**lm),
                      "dit": DiTConfig(**d["dit"]), "vae": VAEConfig(**d["vae"]),
                      "decoder": DecoderConfig(**decoder) if d.get("decoder") else None})


# The real backbones' published config.json numbers (Qwen2.5-VL-3B / 7B-Instruct), for meta-device builds.
_QWEN25_VL_VISION = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, patch_size=14,
                         spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                         fullatt_block_indexes=[7, 15, 23, 31], in_chans=3, hidden_act="silu")
QWEN25_VL_3B = dict(model_type="qwen2_5_vl", hidden_size=2048, num_hidden_layers=36, num_attention_heads=16,
                    num_key_value_heads=2, intermediate_size=11008, vocab_size=151936,
                    max_position_embeddings=128000, rope_theta=1000000.0, rms_norm_eps=1e-6,
                    tie_word_embeddings=True, rope_scaling={"type": "mrope", "mrope_section": [16, 24, 24]},
                    vision_config={**_QWEN25_VL_VISION, "out_hidden_size": 2048})
QWEN25_VL_7B = dict(model_type="qwen2_5_vl", hidden_size=3584, num_hidden_layers=28, num_attention_heads=28,
                    num_key_value_heads=4, intermediate_size=18944, vocab_size=152064,
                    max_position_embeddings=128000, rope_theta=1000000.0, rms_norm_eps=1e-6,
                    tie_word_embeddings=False, rope_scaling={"type": "mrope", "mrope_section": [16, 24, 24]},
                    vision_config={**_QWEN25_VL_VISION, "out_hidden_size": 3584})


def _toy() -> Config:
    clip = CLIPConfig(dense_weight=1.0, scene_layers=2)
    # 2x2 merging keeps stage-1 steps cheap: the LM reads 16 image tokens (the image is most of a sequence).
    lm = LMConfig(image_merge=2)
    dit = DiTConfig(in_channels=clip.scene_width, hidden_size=128, num_layers=4, num_heads=4, num_kv_heads=4,
                    ffn_dim=256, cond_dim=lm.hidden_size, grid_size=clip.grid)
    # Stage 2, where the toy departs from the paper (NOTES.md has the measurements):
    # - logit-normal t (SD3) trains the middle of the path, where layout and colour are decided, more often;
    # - 2 noise draws per prompt share one frozen-LM pass, which makes steps cheaper;
    # - queries start at the toy LM embeddings' small scale, where N(0, 1) would drown the prompt;
    # - unit-std targets (the scene tokens' scale is whatever the CLIP stage made it).
    return Config(preset="toy", clip=clip, lm=lm, dit=dit, decoder=DecoderConfig(),
                  time_sampling="logit_normal", noise_repeats=2, query_init="embedding", target_norm=True)


def _real(preset: str, lm_name: str, arch: dict) -> Config:
    # EVA02-CLIP-E-14-plus at 448 px: 32x32 patches of width 1792, pooled 4x4 -> 8x8, as in the paper.
    clip = CLIPConfig(name="EVA02-E-14-plus", image_size=448, patch_size=14, width=1792, embed_dim=1024,
                      grid=8, image_mean=(0.48145466, 0.4578275, 0.40821073),
                      image_std=(0.26862954, 0.26130258, 0.27577711))
    lm = LMConfig(name=lm_name, hidden_size=arch["hidden_size"], num_layers=arch["num_hidden_layers"],
                  num_heads=arch["num_attention_heads"], num_kv_heads=arch["num_key_value_heads"],
                  intermediate_size=arch["intermediate_size"], max_length=4096,
                  vocab_size=arch["vocab_size"], image_token="<|image_pad|>", arch=arch)
    # The official DiT (DiTConfig's defaults) reads the backbone's hidden states (2048 or 3584 wide).
    dit = DiTConfig(cond_dim=lm.hidden_size)
    return Config(preset=preset, clip=clip, lm=lm, dit=dit, decoder=None)


PRESETS = {
    "toy": _toy,
    "blip3o-4b": lambda: _real("blip3o-4b", "Qwen/Qwen2.5-VL-3B-Instruct", QWEN25_VL_3B),
    "blip3o-8b": lambda: _real("blip3o-8b", "Qwen/Qwen2.5-VL-7B-Instruct", QWEN25_VL_7B)}


def get_config(preset: str) -> Config:
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    return PRESETS[preset]()


# ----------------------------------------------------------------------------------------------------
# 2. Tokenizer
# ----------------------------------------------------------------------------------------------------

# The toy tokenizer's special tokens, ids 0..4 in this order. Pad 0 and <eos> 2 are open_clip's defaults,
# so the toy CLIP's text tower and the LM share one tokenizer; <image> marks where CLIP tokens go.
PAD, UNK, EOS, BOS, IMAGE = "<pad>", "<unk>", "<eos>", "<bos>", "<image>"
SPECIAL_TOKENS = [PAD, UNK, EOS, BOS, IMAGE]
PAD_ID, EOS_ID = SPECIAL_TOKENS.index(PAD), SPECIAL_TOKENS.index(EOS)
PUNCTUATION = ".,;:!?"  # split off the word it follows or precedes: "circle?" is "circle ?"


def build_toy_tokenizer(words):
    """A word-level tokenizer over the toy world's vocabulary, built offline with `tokenizers`, as a
    `PreTrainedTokenizerFast`: `save_pretrained` / `AutoTokenizer` work as for a real backbone's."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for w in sorted(set(words) - set(SPECIAL_TOKENS)):
        vocab[w] = len(vocab)
    core = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    _read_as_typed(core)
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token=PAD, unk_token=UNK, eos_token=EOS,
                                   bos_token=BOS, extra_special_tokens={"image_token": IMAGE})


def _read_as_typed(core) -> None:
    """Text as people type it: lower-cased, split at spaces, and PUNCTUATION split off its word, so
    "What color is the circle?" reads as "what color is the circle ?" (toy_words gives the same split).
    An apostrophe stays inside its word: "what's" is one word, refused by name if the vocabulary lacks it."""
    from tokenizers import Regex, normalizers, pre_tokenizers

    core.normalizer = normalizers.Lowercase()
    punctuation = pre_tokenizers.Split(Regex(f"[{PUNCTUATION}]"), "isolated")
    core.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), punctuation])


def toy_words(text: str) -> list[str]:
    """The words the toy tokenizer reads in `text` (see _read_as_typed): what its vocabulary must hold."""
    return re.findall(rf"[^\s{PUNCTUATION}]+|[{PUNCTUATION}]", text.lower())


def load_tokenizer(path_or_name: str):
    """A saved toy tokenizer folder or a real backbone's tokenizer (hub id or local path)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path_or_name)


def encode_texts(tokenizer, texts, length: int, bos: bool = False, eos: bool = True):
    """Texts -> right-padded ids (B, length) and true lengths (B,). Too long: truncated, and counted."""
    rows, lens = [], []
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        ids = ([tokenizer.bos_token_id] if bos else []) + ids + ([tokenizer.eos_token_id] if eos else [])
        ids = ids[:length]
        lens.append(len(ids))
        rows.append(ids + [tokenizer.pad_token_id] * (length - len(ids)))
    return torch.tensor(rows, dtype=torch.long), torch.tensor(lens, dtype=torch.long)


def encode_prompts(tokenizer, captions, length: int | None = None, template: str = PROMPT_TEMPLATE,
                   limit: int | None = None):
    """Captions -> generation prompts: ids (B, T) right-padded, lengths (B,), lengths before any cut (B,).

    Each caption goes into the template after <bos> if the tokenizer has one (Qwen's has not), with no
    <eos>: the queries follow. T is `length` (longer prompts cut) or the longest; over `limit`: ValueError."""
    if not all(c.strip() for c in captions):
        raise ValueError("empty prompt")
    bos = [] if tokenizer.bos_token_id is None else [tokenizer.bos_token_id]
    rows = [bos + tokenizer(template.format(c), add_special_tokens=False)["input_ids"] for c in captions]
    full = torch.tensor([len(r) for r in rows])
    if limit is not None and int(full.max()) > limit:
        raise ValueError(f"prompt of {int(full.max())} tokens is longer than the backbone allows "
                         f"({limit} beside the queries)")
    T = length or int(full.max())
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    ids = torch.tensor([r[:T] + [pad] * (T - len(r[:T])) for r in rows])  # (B, T): padding is never attended
    return ids, full.clamp(max=T), full


def decode_ids(tokenizer, ids) -> str:
    """Token ids -> text, stopping at <eos>, special tokens dropped (word-level: join with spaces)."""
    words = []
    for i in ids:
        i = int(i)
        if i == tokenizer.eos_token_id:
            break
        if i in tokenizer.all_special_ids:
            continue
        words.append(tokenizer.convert_ids_to_tokens(i))
    return tokenizer.convert_tokens_to_string(words) if not _is_word_level(tokenizer) else " ".join(words)


def unknown_words(tokenizer, texts) -> list[str]:
    """The words of `texts` outside a word-level (toy) tokenizer's vocabulary, each once, in order: the toy
    reads them as <unk>, never seen in training. A real BPE tokenizer spells any word, so it returns []."""
    if not _is_word_level(tokenizer):
        return []
    vocab, core = tokenizer.get_vocab(), tokenizer.backend_tokenizer
    norm = core.normalizer.normalize_str if core.normalizer is not None else str
    words = [w for text in texts for w, _ in core.pre_tokenizer.pre_tokenize_str(norm(text))]
    return list(dict.fromkeys(w for w in words if w not in vocab))


def _is_word_level(tokenizer) -> bool:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    return backend is not None and type(backend.model).__name__ == "WordLevel"


# ----------------------------------------------------------------------------------------------------
# 3. Image encoder (CLIP)
# ----------------------------------------------------------------------------------------------------


DENSE_COLOURS, DENSE_SHAPES = 11, 4  # the toy world's 10 colours and 3 shapes, each + background
OBJECT_OUTPUTS = DENSE_COLOURS + DENSE_SHAPES + 4  # one object: colour logits, shape logits, box
SCENE_SLOTS = 4  # objects a scene token describes, top-left first (the toy world has at most 4)


def object_loss(out: torch.Tensor, colour: torch.Tensor, shape: torch.Tensor, box: torch.Tensor):
    """Predicted objects out (..., OBJECT_OUTPUTS) against labels colour (...), shape (...), box (..., 4).

    Cross-entropy on colour and shape (the last class of each is "nothing here"), L1 summed over the 4 box
    coordinates (in [0, 1]) and averaged over the places that hold an object."""
    c_logits, s_logits, b_pred = out.split([DENSE_COLOURS, DENSE_SHAPES, 4], dim=-1)
    on_object = (shape < DENSE_SHAPES - 1).unsqueeze(-1).to(out.dtype)  # (..., 1)
    l_box = ((b_pred - box).abs() * on_object).sum() / on_object.sum().clamp(min=1)
    return F.cross_entropy(c_logits.flatten(0, -2), colour.flatten()) + \
        F.cross_entropy(s_logits.flatten(0, -2), shape.flatten()) + l_box


class ImageEncoder(nn.Module):
    """An open_clip CLIP whose patch tokens are BLIP3-o's image representation.

    `tokens(images)` -> (B, grid*grid, D_clip): the last block's output at the patch positions (CLS dropped)
    average-pooled to 8x8 (EVA02-E-14-plus at 448 px: 32x32 pooled 4x4 -> 64 x 1792, the paper's generation
    target; the toy's grid is 8x8 already). The text tower serves contrastive training and zero-shot only.
    """

    def __init__(self, cfg: CLIPConfig, device=None):
        super().__init__()
        import open_clip

        self.cfg = cfg
        if cfg.name is None:
            # Text pooling is done in `encode_text` (a mean over the words), so the tower returns every
            # position (pool_type "none"); its pad and <eos> ids are our tokenizer's.
            self.model = open_clip.CLIP(
                embed_dim=cfg.embed_dim,
                vision_cfg=dict(image_size=cfg.image_size, patch_size=cfg.patch_size, width=cfg.width,
                                layers=cfg.layers, head_width=cfg.width // cfg.heads),
                text_cfg=dict(context_length=cfg.context_length, vocab_size=cfg.vocab_size,
                              width=cfg.text_width, heads=cfg.text_heads, layers=cfg.text_layers,
                              pool_type="none", pad_id=PAD_ID, eos_id=EOS_ID))
            # The toy image embedding averages the (normalised) patch tokens, no CLS: see `embed_tokens`.
            self.model.visual.pool_type = "avg"
        else:
            # A named open_clip model at cfg.image_size (EVA02-E-14-plus: 224 -> 448), built *inside* the
            # device context, or a meta (size-check) build would allocate all 4 B parameters on the CPU first.
            with torch.device(device or "cpu"):
                self.model = open_clip.create_model(cfg.name, pretrained=cfg.pretrained,
                                                    force_image_size=cfg.image_size, device=device or "cpu")
        # Dense head (toy): a linear read-out of each patch token -> colour logits (10 + background),
        # shape logits (3 + background) and the object's box (4). Linear, so the tokens themselves carry it.
        self.dense_head = nn.Linear(cfg.width, OBJECT_OUTPUTS) if cfg.dense_weight > 0 else None
        # Scene blocks (toy): the generation target, deep and global as EVA-CLIP's features are: each of the
        # 64 outputs names every object (colour, shape, box, top-left first), a scene the generator places
        # as a whole rather than 64 local patches. Object-centric: object k of a scene owns its own block of
        # scene_width / SCENE_SLOTS channels, read by one linear head shared by every slot, so an object's
        # colour lives beside its own shape, never beside another's (NOTES.md has the measurements).
        self.scene = None
        if cfg.scene_layers > 0:
            block = nn.TransformerEncoderLayer(cfg.width, cfg.heads, 2 * cfg.width, dropout=0.0,
                                               activation="gelu", batch_first=True, norm_first=True)
            self.scene = nn.TransformerEncoder(block, cfg.scene_layers, enable_nested_tensor=False)
            self.scene_pos = nn.Parameter(torch.zeros(cfg.grid ** 2, cfg.width))
            self.scene_out = nn.Sequential(nn.LayerNorm(cfg.width), nn.Linear(cfg.width, cfg.scene_width))
            self.scene_head = nn.Linear(cfg.scene_width // SCENE_SLOTS, OBJECT_OUTPUTS)
        # On the model's device from the start (the meta device too: a CPU buffer would not mix with it).
        for name, value in (("mean", cfg.image_mean), ("std", cfg.image_std)):
            self.register_buffer(name, torch.tensor(value, device=device).view(1, 3, 1, 1), persistent=False)

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        return (images - self.mean.to(images.dtype)) / self.std.to(images.dtype)

    def tokens(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, 3, H, W) in [0, 1] -> patch tokens (B, grid*grid, D_clip)."""
        out = self.model.visual.forward_intermediates(self.normalize(images), indices=1,
                                                      intermediates_only=True, output_fmt="NCHW")
        feats = out["image_intermediates"][-1]  # (B, D, h, w): last block, prefix (CLS) tokens dropped
        if feats.shape[-1] != self.cfg.grid:
            feats = F.adaptive_avg_pool2d(feats, self.cfg.grid)  # (B, D, 8, 8), e.g. 32x32 pooled 4x4
        return feats.flatten(2).transpose(1, 2)  # (B, 64, D)

    def scene_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """Patch tokens (B, 64, D_clip) -> scene tokens (B, 64, scene_width), each describing every object.

        The patch tokens enter detached: the scene blocks learn to summarise them, and the patch tokens
        (what the LM reads) stay what the contrastive and dense objectives make them."""
        return self.scene_out(self.scene(tokens.detach() + self.scene_pos))

    @property
    def target_width(self) -> int:
        return self.cfg.width if self.scene is None else self.cfg.scene_width

    def target_tokens(self, images: torch.Tensor) -> torch.Tensor:
        """images -> what the generator learns to produce: scene tokens (toy), or the patch tokens (real)."""
        tokens = self.tokens(images)
        return tokens if self.scene is None else self.scene_tokens(tokens)

    def read_objects(self, scene: torch.Tensor) -> torch.Tensor:
        """Scene tokens (..., S) -> each object's predicted colour logits, shape logits and box (..., 4, 19),
        object k from its own block of channels."""
        return self.scene_head(scene.unflatten(-1, (SCENE_SLOTS, -1)))  # (..., 4, S / 4) -> (..., 4, 19)

    def scene_loss(self, scene: torch.Tensor, colour: torch.Tensor, shape: torch.Tensor, box: torch.Tensor):
        """Every scene token (B, 64, S) predicts all SCENE_SLOTS objects: labels (B, 4), (B, 4), (B, 4, 4).

        Boxes are scored in patch units (x grid), so a place one patch off costs as much as a wrong colour:
        the decoder must read each object's place to the patch."""
        out = self.read_objects(scene)  # (B, 64, 4, 19)
        n = out.shape[1]
        return object_loss(out, colour[:, None].expand(-1, n, -1), shape[:, None].expand(-1, n, -1),
                           box[:, None].expand(-1, n, -1, -1) * self.cfg.grid)

    @torch.no_grad()
    def read_scene(self, scene: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """What scene tokens (B, 64, S), real or generated, say: the head on their mean token -> colour ids
        (B, 4), shape ids (B, 4) (the last id of each = no object) and boxes (B, 4, 4) in [0, 1]."""
        out = self.read_objects(scene.mean(1))  # (B, 4, 19)
        c_logits, s_logits, box = out.split([DENSE_COLOURS, DENSE_SHAPES, 4], dim=-1)
        return c_logits.argmax(-1), s_logits.argmax(-1), box / self.cfg.grid

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """Unit-norm image embeddings (B, embed_dim) for contrastive training / zero-shot."""
        return F.normalize(self.model.encode_image(self.normalize(images)), dim=-1)

    def embed_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """Unit-norm CLIP image embeddings (B, embed_dim) of patch tokens (B, 64, D) already computed.

        Exactly what `encode_image` computes after the last block for the toy's average-pooled tower:
        mean over tokens of ln_post(token), then the projection. Real towers pool a CLS token (and pool
        the grid), so there the 64 tokens alone do not determine the embedding.
        """
        visual = self.model.visual
        if self.cfg.name is not None or visual.pool_type != "avg":
            raise NotImplementedError("embed_tokens needs the toy CLIP's average-pooled vision tower")
        return F.normalize(visual.ln_post(tokens).mean(1) @ visual.proj, dim=-1)

    def encode_text(self, ids: torch.Tensor) -> torch.Tensor:
        """Unit-norm text embeddings (B, embed_dim); ids right-padded with 0 (pad), ending in <eos>.

        The toy tower averages its projected token states over the words, not the <eos> state, so "a red
        square" stays near a sum of "red" and "square": zero-shot then reaches colour-shape pairs never seen
        in training, where <eos> pooling made the tiny tower memorise the pairs it saw (NOTES.md)."""
        if self.cfg.name is not None:  # a named open_clip model pools as it was trained to
            return F.normalize(self.model.encode_text(ids), dim=-1)
        states = self.model.encode_text(ids)  # (B, L, E): pool_type "none" keeps every position
        keep = (ids != PAD_ID).unsqueeze(-1).to(states.dtype)  # (B, L, 1): words and <eos>, not padding
        return F.normalize((states * keep).sum(1) / keep.sum(1).clamp(min=1), dim=-1)

    def contrastive_loss(self, images: torch.Tensor, ids: torch.Tensor, tokens: torch.Tensor | None = None):
        """Symmetric InfoNCE over the batch (CLIP, Radford et al. 2021). A small world repeats captions, so
        every pair of identical texts counts as a positive (soft targets) rather than pushing matches apart.
        `tokens`, the patch tokens of `images` if at hand already, saves a second forward pass."""
        img = self.encode_image(images) if tokens is None else self.embed_tokens(tokens)  # same, toy tower
        txt = self.encode_text(ids)
        logits = self.model.logit_scale.exp() * img @ txt.t()  # (B, B)
        same = (ids[:, None, :] == ids[None, :, :]).all(-1).float()  # (B, B) identical texts
        targets = same / same.sum(1, keepdim=True)
        return (F.cross_entropy(logits, targets) + F.cross_entropy(logits.t(), targets)) / 2

    def dense_loss(self, tokens: torch.Tensor, colour: torch.Tensor, shape: torch.Tensor, box: torch.Tensor):
        """Per-token semantics: tokens (B, 64, D) -> CE on colour and shape, L1 on the owner's box.

        colour (B, 64) and shape (B, 64) are class ids with background as the last class; box (B, 64, 4) is
        the owning object's box in [0, 1], scored on object tokens only. A web-scale CLIP's patch features
        are semantic and object-aware; a tiny one matching captions stays near its pixels unless asked."""
        return object_loss(self.dense_head(tokens), colour, shape, box)  # head: (B, 64, 11 + 4 + 4)


# ----------------------------------------------------------------------------------------------------
# 4. Understanding (stage 1): projector + causal LM
# ----------------------------------------------------------------------------------------------------


def build_backbone(cfg: LMConfig, device=None, dtype=None):
    """The causal LM: a tiny Qwen2 or Qwen2.5-VL from a config (toy), a real one from `cfg.name`, or `meta`.

    Real Qwen2.5-VL checkpoints load with their vision tower (it serves real understanding); BLIP3-o's
    generation path drives only its language model through `inputs_embeds` (see Generator.condition).
    """
    from transformers import AutoConfig, Qwen2_5_VLConfig, Qwen2Config

    if cfg.name is None:
        text = dict(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_layers,
                    num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
                    intermediate_size=cfg.intermediate_size, max_position_embeddings=cfg.max_length,
                    tie_word_embeddings=True, pad_token_id=0, bos_token_id=3, eos_token_id=2)
        hf_cfg = Qwen2Config(**text)
        if cfg.mrope_section is not None:
            # Qwen2.5-VL's LM; its vision tower is a token one (1.8 k parameters), never run.
            rope = dict(rope_type="default", rope_theta=10000.0, mrope_section=list(cfg.mrope_section))
            vision = dict(depth=1, hidden_size=8, intermediate_size=8, num_heads=1, patch_size=2,
                          temporal_patch_size=1, spatial_merge_size=1, out_hidden_size=cfg.hidden_size)
            hf_cfg = Qwen2_5_VLConfig(text_config={**text, "rope_parameters": rope}, vision_config=vision,
                                      **{k: v for k, v in text.items() if k.endswith(("_id", "embeddings"))})
        with torch.device(device or "cpu"):
            return _auto_class(hf_cfg).from_config(hf_cfg).to(dtype or torch.float32)
    if str(device) == "meta":  # sizes only, no weights: from the config numbers the preset carries
        if cfg.arch is None:
            raise ValueError(f"no architecture numbers for {cfg.name!r}: cannot build it on the meta device")
        hf_cfg = AutoConfig.for_model(**cfg.arch)
        with torch.device("meta"):
            return _auto_class(hf_cfg).from_config(hf_cfg, dtype=dtype or torch.bfloat16)
    # Never trust_remote_code: Qwen2.5-VL is built into transformers, so no code from the hub runs here.
    hf_cfg = AutoConfig.from_pretrained(cfg.name)
    model = _auto_class(hf_cfg).from_pretrained(cfg.name, dtype=dtype or torch.bfloat16)
    return model.to(device or "cpu")


def _auto_class(hf_cfg):
    """Qwen2.5-VL is an image-text-to-text model in transformers; plain LMs are causal LMs."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    return AutoModelForImageTextToText if hasattr(hf_cfg, "vision_config") else AutoModelForCausalLM


def text_positions(embeds: torch.Tensor) -> torch.Tensor:
    """Position ids 0 .. T-1 for a text-only sequence of embeddings (B, T, D) -> (B, T).

    Given explicitly: Qwen2.5-VL's language model expands them to its three mrope axes (time, height,
    width: all the token index for text), where its multimodal wrapper, left to infer them, would reuse
    `rope_deltas` cached by an earlier image call and shift every position."""
    B, T = embeds.shape[:2]
    return torch.arange(T, device=embeds.device).expand(B, T)


def multimodal_positions(input_ids: torch.Tensor, image_token_id: int) -> torch.Tensor:
    """Qwen2-VL's multimodal RoPE positions (3, B, T), (time, height, width), for (B, T) ids with at most
    one square block of image placeholders per row, as transformers' get_rope_index for a still image: text
    counts up on all three axes; image tokens take the time position where the image starts plus their row
    (height) and column (width), so the neighbour below is one step away; text after resumes past it."""
    img = input_ids == image_token_id  # (B, T)
    n = img.sum(1, keepdim=True)  # image tokens per row: 0 or side^2
    side = n.float().sqrt().round().long()
    if not input_ids.is_meta and not bool((side * side == n).all()):  # (meta tensors hold no values)
        raise ValueError("an image's placeholders must form a square grid")
    k = img.long().cumsum(1)  # image tokens up to and including each token
    before = (~img).long().cumsum(1) - (~img).long()  # text tokens strictly before each token
    text = before + torch.where((k == n) & (n > 0) & ~img, side, 0)  # after the image: past its span
    cell, side = (k - 1).clamp(min=0), side.clamp(min=1)  # an image token's row-major index in its grid
    return torch.stack([torch.where(img, before, text), torch.where(img, before + cell // side, text),
                        torch.where(img, before + cell % side, text)])


class Projector(nn.Module):
    """LLaVA-1.5's two-layer MLP from CLIP tokens into the LM's embedding space.

    merge > 1: each merge x merge block of neighbouring tokens on the square grid is concatenated first and
    becomes one LM token (Qwen2-VL's patch merger), so the LM reads grid^2 / merge^2 image tokens.
    """

    def __init__(self, clip_dim: int, lm_dim: int, merge: int = 1):
        super().__init__()
        self.merge = merge
        self.linear_1 = nn.Linear(clip_dim * merge * merge, lm_dim)
        self.linear_2 = nn.Linear(lm_dim, lm_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, N, C) row-major on a square grid -> (B, N / merge^2, D_lm)."""
        m = self.merge
        if m > 1:
            B, N, C = x.shape
            g = math.isqrt(N)
            if g * g != N or g % m:
                raise ValueError(f"{N} image tokens are not a square grid divisible into {m}x{m} blocks")
            x = x.reshape(B, g // m, m, g // m, m, C).permute(0, 1, 3, 2, 4, 5)  # (B, g/m, g/m, m, m, C)
            x = x.reshape(B, N // (m * m), m * m * C)
        return self.linear_2(F.gelu(self.linear_1(x)))


class VisionLanguageModel(nn.Module):
    """Stage 1: the LM reads 64 projected CLIP tokens where the <image> placeholders stand.

    Training sequence (right-padded; causal attention means padding after a sample never affects it):
        <bos> <image> x 64  question  answer <eos> <pad> ...
    with labels = -100 everywhere but the answer and its <eos> (prompt and image masked out). With
    `merge` (the toy: 2) the projector merges 2x2 CLIP tokens, and 16 placeholders stand for the image.
    """

    def __init__(self, lm, clip_dim: int, image_token_id: int, merge: int = 1):
        super().__init__()
        self.lm = lm
        self.projector = Projector(clip_dim, lm.config.get_text_config().hidden_size, merge)
        self.image_token_id = image_token_id
        # Qwen2-VL's multimodal RoPE (three position axes): image tokens get rows and columns.
        self.mrope = "mrope_section" in (getattr(lm.config.get_text_config(), "rope_parameters", None) or {})

    def positions(self, input_ids: torch.Tensor, embeds: torch.Tensor) -> torch.Tensor:
        """Position ids for the LM: 2-D for the image's tokens under multimodal RoPE, else 0 .. T-1."""
        return multimodal_positions(input_ids, self.image_token_id) if self.mrope else text_positions(embeds)

    def image_tokens(self, num_clip_tokens: int) -> int:
        """How many <image> placeholders an image of `num_clip_tokens` CLIP tokens needs in the sequence."""
        return num_clip_tokens // self.projector.merge ** 2

    def embed(self, input_ids: torch.Tensor, clip_tokens: torch.Tensor | None) -> torch.Tensor:
        """Token embeddings with the projected image tokens scattered into the placeholder slots.

        clip_tokens None: a text-only sequence (no placeholders allowed)."""
        embeds = self.lm.get_input_embeddings()(input_ids)  # (B, T, D_lm)
        slots = (input_ids == self.image_token_id).unsqueeze(-1)  # (B, T, 1)
        if clip_tokens is None:
            if not embeds.is_meta and bool(slots.any()):
                raise ValueError("image placeholders in a sequence given no image tokens")
            return embeds
        image = self.projector(clip_tokens).to(embeds.dtype)  # (B, 64 / merge^2, D_lm)
        # (Counting needs real values: the meta device, used for size checks, has none.)
        if not embeds.is_meta and int(slots.sum()) != image.shape[0] * image.shape[1]:
            raise ValueError(f"{int(slots.sum())} image placeholders for {image.shape[0] * image.shape[1]} "
                             "image tokens")
        return embeds.masked_scatter(slots, image)

    def forward(self, input_ids, clip_tokens, labels=None):
        """Returns (loss or None, logits (B, T, V)). The loss is the mean over labelled tokens.

        clip_tokens None runs a text-only sequence (the toy's text rows, see train.plan_understand)."""
        embeds = self.embed(input_ids, clip_tokens)  # (B, T, D_lm)
        # use_cache=False: every call runs the whole sequence, so a KV cache would only cost memory.
        logits = self.lm(inputs_embeds=embeds, position_ids=self.positions(input_ids, embeds),
                         use_cache=False).logits
        loss = None
        if labels is not None:
            # Next-token prediction: position i predicts token i+1.
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(),
                                   ignore_index=-100)
        return loss, logits

    @torch.no_grad()
    def generate(self, input_ids, lengths, clip_tokens, max_new_tokens=16, eos_id=EOS_ID,
                 temperature: float = 0.0, rng=None):
        """Batched decoding, greedy (temperature 0) or sampled -> a list of new-token id lists. No KV cache,
        to stay obviously right: each step re-runs the whole right-padded sequence, extending each sample."""
        B = input_ids.shape[0]
        ids = torch.cat([input_ids, input_ids.new_zeros(B, max_new_tokens)], 1)  # room to grow
        lengths = lengths.clone()
        done = torch.zeros(B, dtype=torch.bool, device=ids.device)
        out = [[] for _ in range(B)]
        rows = torch.arange(B, device=ids.device)
        for _ in range(max_new_tokens):
            _, logits = self.forward(ids, clip_tokens)
            last = logits[rows, lengths - 1].float()  # (B, V)
            if temperature > 0:
                nxt = torch.multinomial(F.softmax(last / temperature, -1), 1, generator=rng)[:, 0]
            else:
                nxt = last.argmax(-1)
            for b in range(B):
                if not done[b]:
                    out[b].append(int(nxt[b]))
            ids[rows, lengths] = torch.where(done, ids[rows, lengths], nxt)
            lengths = lengths + (~done).long()
            done |= nxt == eos_id
            if bool(done.all()):
                break
        return out


def build_conversation_batch(tokenizer, image_tokens: int, conversations, length: int | None = None):
    """Several question/answer turns about one image per row -> (input_ids, labels, lengths).
    Questions and answers are texts or lists of their token ids.

    Layout: <bos> <image>*image_tokens q1 a1 <eos> q2 a2 <eos> ... (LLaVA's multi-turn format): the image is
    the bulk of a sequence, so a few turns per image multiply the supervision cheaply. Labels keep only the
    answers and their <eos>; image_tokens 0 builds text-only rows, and an answer None ends the row after its
    question (a prompt to answer)."""
    img = [tokenizer.convert_tokens_to_ids(IMAGE)] * image_tokens

    def ids(text):  # a text, or its token ids already (train.py tokenizes its tables once)
        return text if isinstance(text, list) else tokenizer(text, add_special_tokens=False)["input_ids"]

    rows, labels = [], []
    for turns in conversations:
        row = [tokenizer.bos_token_id] + img
        lab = [-100] * len(row)
        for q, a in turns:
            q_ids = ids(q)
            a_ids = []
            if a is not None:  # the answer and its <eos>; None ends the row after the question
                a_ids = ids(a) + [tokenizer.eos_token_id]
            row += q_ids + a_ids
            lab += [-100] * len(q_ids) + a_ids
        rows.append(row)
        labels.append(lab)
    longest = max(len(r) for r in rows)
    T = length or longest
    if longest > T:
        raise ValueError(f"sequence of {longest} tokens exceeds the backbone's limit {T}")
    ids = torch.tensor([r + [tokenizer.pad_token_id] * (T - len(r)) for r in rows])  # (B, T), right-padded
    labels = torch.tensor([r + [-100] * (T - len(r)) for r in labels])
    return ids, labels, torch.tensor([len(r) for r in rows])


def build_qa_batch(tokenizer, image_tokens: int, questions, answers=None, length: int | None = None):
    """One question (+ its answer) per row: a conversation of one turn -> (input_ids, labels, lengths).

    answers None: each row ends after its question, for the model to answer, and labels is None."""
    turns = [[(q, None if answers is None else answers[i])] for i, q in enumerate(questions)]
    ids, labels, lens = build_conversation_batch(tokenizer, image_tokens, turns, length)
    return ids, (labels if answers is not None else None), lens


# ----------------------------------------------------------------------------------------------------
# 5. Next-DiT (Lumina-Next): the building blocks, then the model
# ----------------------------------------------------------------------------------------------------
#
# Names follow the released checkpoint (keys under `model.dit.model.`: diffusers' LuminaNextDiT2DModel plus
# BLIP3-o's caption_projection), so loading its weights is a straight copy (pipeline.official_key_map).
#
# Time: the released model (Lumina-Next / diffusers) is fed the noise level sigma = 1 - t as
# timestep = 1000 * sigma and predicts noise - data = -v. NextDiT.forward takes our t (the convention at
# the top of this file) and returns our v, converting inside, so released weights run unchanged.


class RMSNorm(nn.Module):
    """RMSNorm with a learned scale (Lumina-Next's sandwich norms), computed in fp32."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x.float(), (x.shape[-1],), self.weight.float(), self.eps).type_as(x)


def timestep_embedding(timestep: torch.Tensor, dim: int = 256, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding (B,) -> (B, dim), cosines first (diffusers Timesteps(flip_sin_to_cos=True))."""
    half = dim // 2
    k = torch.arange(half, dtype=torch.float32, device=timestep.device)
    freqs = torch.exp(-math.log(max_period) * k / half)
    args = timestep.float()[:, None] * freqs[None]  # (B, half)
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (B, dim)


def rope_2d(grid_size: int, head_dim: int, theta: float, device=None) -> torch.Tensor:
    """2-D RoPE rotations for a row-major grid: (cos, sin) of each angle, (grid_size**2, head_dim // 2, 2).

    diffusers' get_2d_rotary_pos_embed_lumina layout: head_dim/2 complex pairs; pair 2k rotates with the row
    index at frequency k, pair 2k+1 with the column index, frequencies theta^(-4k/head_dim), k < head_dim/4
    (the official 384 x 384 table sliced to 8 x 8 equals this). Cheap, so recomputed per call, never saved.
    Real (cos, sin) pairs (view_as_complex reads them as e^(i angle) for free): no complex tensor to compile.
    """
    axis_dim = head_dim // 2  # dims per axis
    freqs = 1.0 / (theta ** (torch.arange(0, axis_dim, 2, dtype=torch.float32, device=device) / axis_dim))
    pos = torch.arange(grid_size, dtype=torch.float32, device=device)
    angle = torch.outer(pos, freqs)  # (G, head_dim/4)
    rows = angle[:, None, :].expand(grid_size, grid_size, -1)  # (G, G, head_dim/4): varies with the row
    cols = angle[None, :, :].expand(grid_size, grid_size, -1)  # (G, G, head_dim/4): varies with the column
    angle = torch.stack([rows, cols], dim=-1).reshape(grid_size * grid_size, head_dim // 2)  # (N, head_dim/2)
    # polar, not stack([cos, sin]): they differ in the last bit, and polar keeps the published toy numbers.
    return torch.view_as_real(torch.polar(torch.ones_like(angle), angle))  # (N, head_dim/2, 2): e^(i angle)


def apply_rope(x: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
    """Rotate the pairs (x[2i], x[2i+1]) of x (B, N, H, head_dim) by `rope` (N, head_dim/2, 2) = (cos, sin).

    Lumina's complex product (a + ib) * e^(i angle), in fp32 as diffusers does; also the fastest eager form
    on CPU, where the real version reads x with stride 2 (NOTES.md)."""
    if torch.compiler.is_compiling():
        # Inductor generates no code for complex numbers; under torch.compile the same rotation in real
        # arithmetic fuses with its neighbours (the strided reads that make it slow in eager disappear).
        cos, sin = rope[:, None].unbind(-1)  # (N, 1, head_dim/2) each
        a, b = x.float().unflatten(-1, (-1, 2)).unbind(-1)  # (B, N, H, head_dim/2) each
        return torch.stack([a * cos - b * sin, a * sin + b * cos], dim=-1).flatten(-2).type_as(x)
    pairs = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))  # (B, N, H, head_dim/2)
    rotated = pairs * torch.view_as_complex(rope)[:, None]  # (B, N, H, head_dim/2)
    return torch.view_as_real(rotated).flatten(-2).type_as(x)  # (B, N, H, head_dim)


class Attention(nn.Module):
    """q/k/v projections (no bias) and Lumina's qk-norm: LayerNorm over all heads at once, before RoPE.

    Only the cross-attention owns an output projection (`to_out.0`): a Next-DiT block mixes the heads of
    self- and cross-attention first and projects the sum once (see NextDiTBlock). q, k and v stay three
    Linears, the checkpoint's layout: fused, a CPU training step is no faster (NOTES.md)."""

    def __init__(self, dim: int, context_dim: int, num_heads: int, num_kv_heads: int, out_proj: bool):
        super().__init__()
        self.num_heads, self.num_kv_heads = num_heads, num_kv_heads
        self.head_dim = dim // num_heads
        self.to_q = nn.Linear(dim, num_heads * self.head_dim, bias=False)
        self.to_k = nn.Linear(context_dim, num_kv_heads * self.head_dim, bias=False)
        self.to_v = nn.Linear(context_dim, num_kv_heads * self.head_dim, bias=False)
        # eps 1e-5 is hard-wired in Lumina-Next's attention, independent of norm_eps.
        self.norm_q = nn.LayerNorm(num_heads * self.head_dim, eps=1e-5)
        self.norm_k = nn.LayerNorm(num_kv_heads * self.head_dim, eps=1e-5)
        if out_proj:
            self.to_out = nn.ModuleList([nn.Linear(num_heads * self.head_dim, dim, bias=False)])
        self.keep_probs = False  # True: also keep the attention probabilities in `probs` (for inspection)

    def forward(self, x, context, rope, rope_keys: bool) -> torch.Tensor:
        """x (B, N, dim) attends to context (B, L, context_dim); returns the heads (B, H, N, head_dim).
        RoPE always rotates the queries; the keys only when they live on the same grid (self-attention)."""
        hd = self.head_dim
        q = self.norm_q(self.to_q(x)).unflatten(-1, (self.num_heads, hd))  # (B, N, H, hd)
        k = self.norm_k(self.to_k(context)).unflatten(-1, (self.num_kv_heads, hd))  # (B, L, Hkv, hd)
        v = self.to_v(context).unflatten(-1, (self.num_kv_heads, hd))  # (B, L, Hkv, hd)
        q = apply_rope(q, rope)
        if rope_keys:
            k = apply_rope(k, rope)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # heads first for SDPA
        # Default scale 1/sqrt(head_dim) in both attentions, as the official model.
        gqa = self.num_kv_heads != self.num_heads
        if self.keep_probs:  # SDPA never returns its softmax(q k^T / sqrt(hd)): computed again, the same
            keys = k.repeat_interleave(self.num_heads // self.num_kv_heads, dim=1)  # (B, H, L, hd)
            self.probs = (q @ keys.transpose(-1, -2) / math.sqrt(hd)).softmax(-1)  # (B, H, N, L)
        return F.scaled_dot_product_attention(q, k, v, enable_gqa=gqa)  # (B, H, N, hd)


class AdaRMSNormZero(nn.Module):
    """Lumina's RMSNorm-zero: conditioning -> (scale_msa, gate_msa, scale_mlp, gate_mlp), and the
    attention input RMSNorm(x) * (1 + scale_msa). Names `linear` / `norm` follow the checkpoint."""

    def __init__(self, dim: int, cond_dim: int, eps: float):
        super().__init__()
        self.linear = nn.Linear(cond_dim, 4 * dim)
        self.norm = RMSNorm(dim, eps)

    def forward(self, x, temb):
        scale_msa, gate_msa, scale_mlp, gate_mlp = self.linear(F.silu(temb)).chunk(4, dim=-1)  # (B, D) each
        return self.norm(x) * (1 + scale_msa[:, None]), gate_msa, scale_mlp, gate_mlp


class SwiGLU(nn.Module):
    """Llama-style gated FFN: linear_2(silu(linear_1 x) * linear_3 x), no biases."""

    def __init__(self, dim: int, inner: int):
        super().__init__()
        self.linear_1 = nn.Linear(dim, inner, bias=False)
        self.linear_2 = nn.Linear(inner, dim, bias=False)
        self.linear_3 = nn.Linear(dim, inner, bias=False)

    def forward(self, x):
        return self.linear_2(F.silu(self.linear_1(x)) * self.linear_3(x))


class NextDiTBlock(nn.Module):
    """One Next-DiT block (Lumina-Next, diffusers LuminaNextDiTBlock).

    x <- x + tanh(gate_msa) * RMSNorm(W_out [SelfAttn(h) + tanh(gate) * CrossAttn(h, cond)]),
         h = RMSNorm(x) * (1 + scale_msa)
    x <- x + tanh(gate_mlp) * RMSNorm(SwiGLU(RMSNorm(x) * (1 + scale_mlp)))
    The per-head cross-attention `gate` starts at zero, so the condition first enters through the pooled
    embedding in the adaLN modulation and the cross-attention is faded in by training.
    """

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        D, H, eps = cfg.hidden_size, cfg.num_heads, cfg.norm_eps
        self.norm1 = AdaRMSNormZero(D, cfg.time_embed_dim, eps)
        self.attn1 = Attention(D, D, H, cfg.num_kv_heads, out_proj=False)  # self-attention
        self.norm1_context = RMSNorm(D, eps)  # on the (projected) condition before cross-attention
        self.attn2 = Attention(D, D, H, cfg.num_kv_heads, out_proj=True)  # cross-attention + shared output
        self.gate = nn.Parameter(torch.zeros(H))
        self.norm2 = RMSNorm(D, eps)
        self.ffn_norm1 = RMSNorm(D, eps)
        self.feed_forward = SwiGLU(D, cfg.ffn_dim)
        self.ffn_norm2 = RMSNorm(D, eps)

    def forward(self, x, cond, temb, rope):
        """x (B, N, D), cond (B, L, D) the projected condition, temb (B, T)."""
        h, gate_msa, scale_mlp, gate_mlp = self.norm1(x, temb)  # h (B, N, D)
        self_attn = self.attn1(h, h, rope, rope_keys=True)  # (B, H, N, hd)
        cross_attn = self.attn2(h, self.norm1_context(cond), rope, rope_keys=False)  # (B, H, N, hd)
        mixed = self_attn + self.gate.tanh()[None, :, None, None] * cross_attn  # (B, H, N, hd)
        mixed = mixed.transpose(1, 2).flatten(2)  # (B, N, H * hd)
        x = x + gate_msa.tanh()[:, None] * self.norm2(self.attn2.to_out[0](mixed))
        ffn = self.feed_forward(self.ffn_norm1(x) * (1 + scale_mlp[:, None]))
        return x + gate_mlp.tanh()[:, None] * self.ffn_norm2(ffn)


class _CaptionProjection(nn.Module):
    """BLIP3-o's condition MLP (diffusers PixArtAlphaTextProjection): cond_dim -> D -> D, tanh-GELU."""

    def __init__(self, cond_dim: int, dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(cond_dim, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, cond):
        return self.linear_2(F.gelu(self.linear_1(cond), approximate="tanh"))


class _PatchEmbed(nn.Module):
    """Patch size 1 on the token grid: one linear map per token (checkpoint name `patch_embedder.proj`)."""

    def __init__(self, in_channels: int, dim: int):
        super().__init__()
        self.proj = nn.Linear(in_channels, dim)

    def forward(self, x):
        return self.proj(x)


class _TimestepMLP(nn.Module):
    """sinusoidal(256) -> Linear -> SiLU -> Linear (diffusers TimestepEmbedding)."""

    def __init__(self, dim: int, freq_dim: int = 256):
        super().__init__()
        self.linear_1 = nn.Linear(freq_dim, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, t_freq):
        return self.linear_2(F.silu(self.linear_1(t_freq)))


class _TimeCaptionEmbed(nn.Module):
    """Conditioning vector of the adaLN: timestep MLP + Linear(LayerNorm(mean of the condition tokens))."""

    def __init__(self, dim: int, cond_width: int):
        super().__init__()
        self.timestep_embedder = _TimestepMLP(dim)
        self.caption_embedder = nn.Sequential(nn.LayerNorm(cond_width), nn.Linear(cond_width, dim))

    def forward(self, timestep, cond):
        t_emb = self.timestep_embedder(timestep_embedding(timestep).to(cond.dtype))  # (B, T)
        return t_emb + self.caption_embedder(cond.mean(dim=1))  # (B, T)


class _FinalLayer(nn.Module):
    """Scale-only output modulation: Linear_2(LayerNorm(x) * (1 + Linear_1(silu(temb)))), eps 1e-6."""

    def __init__(self, dim: int, temb_dim: int, out_dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(temb_dim, dim)
        self.linear_2 = nn.Linear(dim, out_dim)

    def forward(self, x, temb):
        scale = self.linear_1(F.silu(temb))  # (B, D)
        return self.linear_2(F.layer_norm(x, (x.shape[-1],), eps=1e-6) * (1 + scale[:, None]))


# --- The model: blocks over the 8x8 token grid --------------------------------------------------------


class NextDiT(nn.Module):
    """The BLIP3-o diffusion transformer: Lumina-Next's Next-DiT with a condition MLP in front.

    forward(x, t, cond) -> v, all in the paper's convention:
      x (B, N, in_channels) noisy tokens, row-major on the grid_size x grid_size grid;
      t (B,) in [0, 1], 0 = noise, 1 = data; cond (B, L, cond_dim), every token real (BLIP3-o's condition
      is always its 64 query states, so no mask); returns the velocity v = x1 - x0, (B, N, in_channels).
    Inside it speaks the released model's convention (this section's header), converting t and v itself.
    """

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.cfg = cfg
        D = cfg.hidden_size
        self.caption_projection = _CaptionProjection(cfg.cond_dim, D)
        self.patch_embedder = _PatchEmbed(cfg.in_channels, D)
        self.time_caption_embed = _TimeCaptionEmbed(cfg.time_embed_dim, D)
        self.layers = nn.ModuleList([NextDiTBlock(cfg) for _ in range(cfg.num_layers)])
        self.norm_out = _FinalLayer(D, cfg.time_embed_dim, cfg.in_channels)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self):
        """Init for training from scratch: xavier-uniform linears with zero bias, N(0, 0.02) timestep MLP;
        the condition MLP keeps PyTorch's default, as the release's PixArtAlphaTextProjection (diffusers)."""
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear) and not name.startswith("caption_projection"):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        timestep_mlp = self.time_caption_embed.timestep_embedder
        for lin in (timestep_mlp.linear_1, timestep_mlp.linear_2):
            nn.init.normal_(lin.weight, std=0.02)
        # Zero: the final layer (the model starts by predicting v = 0) and the cross-attention gates
        # (BLIP3-o's code). The adaLN modulation and pooled-condition projection keep xavier, as in diffusers'
        # port that BLIP3-o trained with: Lumina-Next's adaLN-zero makes every conditional path a product of
        # zeros, and the toy then follows its prompt far later (NOTES.md).
        for lin in (self.norm_out.linear_1, self.norm_out.linear_2):
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)
        for layer in self.layers:
            nn.init.zeros_(layer.gate)

    def compile_blocks(self, **kwargs) -> "NextDiT":
        """torch.compile each block (regional compilation): the blocks share one graph, compiled in seconds
        where a whole model takes minutes; the code around stays eager (NOTES.md, "Speed and memory")."""
        for layer in self.layers:
            layer.compile(**kwargs)
        return self

    def forward(self, x, t, cond):
        B, N, _ = x.shape
        if N != self.cfg.num_tokens:
            raise ValueError(f"expected {self.cfg.num_tokens} tokens ({self.cfg.grid_size}^2 grid), got {N}")
        t = t.expand(B) if t.dim() == 0 else t
        cond = self.caption_projection(cond)  # (B, L, D): every block and the pooled path see this
        h = self.patch_embedder(x)  # (B, N, D)
        temb = self.time_caption_embed(1000.0 * (1.0 - t), cond)  # (B, T), official timestep
        rope = rope_2d(self.cfg.grid_size, self.cfg.head_dim, self.cfg.rope_theta, device=x.device)
        for layer in self.layers:
            h = layer(h, cond, temb, rope)
        return -self.norm_out(h, temb)  # official output is noise - data; ours is data - noise


# ----------------------------------------------------------------------------------------------------
# 6. Flow matching: the loss and the Euler sampler (the convention at the top of this file)
# ----------------------------------------------------------------------------------------------------


def flow_matching_loss(model, x1, cond, *, cond_drop=0.1, time_sampling="uniform", rng=None):
    """Rectified-flow loss || v_theta(x_t, t, cond) - (x1 - x0) ||^2 on a batch of targets x1 (B, N, C).

    t ~ U(0, 1) ("uniform", the paper) or sigmoid(N(0, 1)) ("logit_normal", SD3's: more steps at mid noise).
    With probability cond_drop a sample's condition is zeroed (guidance's unconditional branch); `rng` (a
    torch.Generator) lives on x1's device. Returns (mean loss, t (B,), per-sample loss (B,)): callers log
    the loss per t-bin (minRF)."""
    B, device = x1.shape[0], x1.device
    if time_sampling == "uniform":
        t = torch.rand(B, device=device, generator=rng)
    elif time_sampling == "logit_normal":
        t = torch.sigmoid(torch.randn(B, device=device, generator=rng))
    else:
        raise ValueError(f"time_sampling must be 'uniform' or 'logit_normal', got {time_sampling!r}")
    x0 = torch.randn(x1.shape, device=device, dtype=x1.dtype, generator=rng)
    t_ = t.to(x1.dtype).view(B, *([1] * (x1.dim() - 1)))  # (B, 1, 1) broadcast over tokens and channels
    xt = t_ * x1 + (1 - t_) * x0
    if cond_drop > 0:
        drop = torch.rand(B, device=device, generator=rng) < cond_drop  # (B,)
        cond = cond.masked_fill(drop.view(B, *([1] * (cond.dim() - 1))), 0.0)
    per_sample = (model(xt, t, cond) - (x1 - x0)).float().pow(2).flatten(1).mean(dim=1)  # (B,)
    return per_sample.mean(), t, per_sample


def guided_velocity(model, x, t, cond, guidance):
    """Guided velocity v_u + guidance * (v_c - v_u), both branches in one batched forward. The unconditional
    one sees an all-zeros condition, as in training's dropout; guidance == 1 skips it (plain conditional)."""
    if guidance == 1:
        return model(x, t, cond)
    v = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([cond, torch.zeros_like(cond)]))  # (2B, N, C)
    v_cond, v_uncond = v.chunk(2)
    return v_uncond + guidance * (v_cond - v_uncond)


@torch.no_grad()
def euler_sample(model, cond, num_tokens, channels, *, steps=SAMPLE_STEPS, guidance=GUIDANCE, rng=None,
                 x0=None, on_step=None):
    """Integrate dx/dt = v(x, t) from t = 0 (noise x0) to t = 1 with `steps` Euler steps; returns x1.
    x0 (B, num_tokens, channels) may be given; else it is drawn with `rng`, on cond's device and dtype.
    on_step(t, x_t, guess), if given, sees every step before it moves: the state x_t and the model's clean
    guess x_t + (1 - t) v, where one straight step would land (the last step's guess is x1 itself)."""
    if steps <= 0:
        raise ValueError(f"steps must be positive, got {steps}")
    if guidance < 0:
        raise ValueError(f"guidance must be >= 0, got {guidance}")
    B = cond.shape[0]
    if x0 is None:
        x0 = torch.randn(B, num_tokens, channels, device=cond.device, dtype=cond.dtype, generator=rng)
    x, dt = x0, 1.0 / steps
    for i in range(steps):
        t = torch.full((B,), i * dt, device=x.device, dtype=torch.float32)
        v = guided_velocity(model, x, t, cond, guidance)
        if on_step is not None:
            on_step(i * dt, x, x + (1 - i * dt) * v)
        x = x + dt * v
    return x


# ----------------------------------------------------------------------------------------------------
# 7. Generation (stage 2): learnable queries read out of the frozen LM
# ----------------------------------------------------------------------------------------------------


class Generator(nn.Module):
    """Stage 2: 64 learnable queries -> frozen LM -> query states -> Next-DiT (flow) or W (MSE).

    The LM is passed in at call time, not owned: it is frozen (`requires_grad_(False)`, `eval()`), its
    weights are saved by stage 1, and gradients still flow *through* it into the queries. `target_scale`
    gives the targets unit std (Stable Diffusion's latent scaling); 1.0 at real scale, as the paper does not
    normalize."""

    def __init__(self, cfg: Config, loss: str = "flow", target_dim: int | None = None,
                 lm_dim: int | None = None):
        super().__init__()
        if loss not in ("flow", "mse"):
            raise ValueError(f"unknown loss {loss!r}: use 'flow' or 'mse'")
        lm_dim = lm_dim or cfg.lm.hidden_size
        target_dim = target_dim or cfg.dit.in_channels
        self.loss_type = loss
        self.num_queries = cfg.num_queries
        self.template = cfg.prompt_template
        self.max_prompt = cfg.lm.max_length - cfg.num_queries  # the prompt and the queries share the context
        # The queries: a plain parameter of (64, D_lm), initialised N(0, 1) as in the official code.
        self.queries = nn.Parameter(torch.randn(cfg.num_queries, lm_dim))
        if loss == "flow":
            dit_cfg = dataclasses.replace(cfg.dit, in_channels=target_dim, cond_dim=lm_dim)
            self.dit = NextDiT(dit_cfg)
        else:
            # The "CLIP + MSE" ablation: a linear map W, L = ||X - W Q||^2 (paper section 3.2), deterministic.
            self.mse = nn.Linear(lm_dim, target_dim)
        self.register_buffer("target_scale", torch.ones(()))
        self.target_dim = target_dim

    def condition(self, lm, prompt_ids: torch.Tensor, prompt_lens: torch.Tensor, output_attentions=False):
        """Prompt ids (B, T) right-padded, lengths (B,) -> query states (B, 64, D_lm): each prompt followed
        directly by the 64 queries, the LM's final hidden states (after its last norm) at those positions.
        output_attentions: also the LM's attention, (B, H, T + 64, T + 64) per layer; eager attention only."""
        B, T = prompt_ids.shape
        Q = self.num_queries
        embeds = lm.get_input_embeddings()(prompt_ids)  # (B, T, D)
        D = embeds.shape[-1]
        seq = torch.cat([embeds, embeds.new_zeros(B, Q, D)], 1)  # (B, T + Q, D)
        slots = prompt_lens[:, None] + torch.arange(Q, device=seq.device)  # (B, Q): right after the prompt
        index = slots[..., None].expand(B, Q, D)
        queries = self.queries.to(seq.dtype)[None].expand(B, Q, D)
        seq = seq.scatter(1, index, queries)  # (B, T + Q, D), differentiable w.r.t. the queries
        out = lm.get_decoder()(inputs_embeds=seq, position_ids=text_positions(seq), use_cache=False,
                               output_attentions=output_attentions)
        cond = out.last_hidden_state.gather(1, index).float()  # (B, Q, D), post final norm
        return (cond, out.attentions) if output_attentions else cond

    def loss(self, lm, prompt_ids, prompt_lens, target, *, time_sampling: str = "uniform",
             noise_repeats: int = 1, cond_drop: float = 0.1, rng=None):
        """Stage 2's training loss: prompts (B, T), lengths (B,) and their raw target tokens (B, 64, D_target)
        -> (scalar loss, t (B,) or None, per-sample loss (B,)). noise_repeats > 1 noises each target that many
        times (own t and noise) under one condition, as MAR's diffusion head: one LM pass, several samples."""
        cond = self.condition(lm, prompt_ids, prompt_lens)  # (B, 64, D_lm)
        cond, x1 = cond.repeat_interleave(noise_repeats, 0), target.repeat_interleave(noise_repeats, 0)
        x1 = x1 / self.target_scale
        if self.loss_type == "mse":
            per = (self.mse(cond) - x1).pow(2).mean(dim=(1, 2))
            return per.mean(), None, per
        return flow_matching_loss(self.dit, x1, cond, cond_drop=cond_drop, time_sampling=time_sampling,
                                  rng=rng)

    @torch.no_grad()
    def sample(self, cond: torch.Tensor, steps: int = SAMPLE_STEPS, guidance: float = GUIDANCE,
               rng=None, on_step=None) -> torch.Tensor:
        """Query states (B, 64, D_lm) -> generated target tokens (B, 64, D_target), unscaled. on_step sees
        every Euler step as in euler_sample, unscaled too: in the units the decoder reads."""
        if self.loss_type == "mse":
            return self.mse(cond) * self.target_scale
        scale = self.target_scale
        unscaled = on_step and (lambda t, x, guess: on_step(t, x * scale, guess * scale))  # None stays None
        x1 = euler_sample(self.dit, cond, self.dit.cfg.num_tokens, self.target_dim, steps=steps,
                          guidance=guidance, rng=rng, on_step=unscaled)
        return x1 * scale


@torch.no_grad()
def generate(generator: Generator, lm, tokenizer, captions, steps: int = SAMPLE_STEPS,
             guidance: float = GUIDANCE, rng=None, on_step=None) -> torch.Tensor:
    """Text -> image features, BLIP3-o's generation up to the pixel decoder: captions -> prompts (the
    paper's template) -> the frozen LM reads each with the 64 queries -> query states -> the Next-DiT
    integrates noise to target tokens in `steps` Euler steps with classifier-free guidance -> (B, 64, D)."""
    ids, lens, _ = encode_prompts(tokenizer, captions, template=generator.template,
                                  limit=generator.max_prompt)
    device = generator.queries.device
    cond = generator.condition(lm, ids.to(device), lens.to(device))  # (B, 64, D_lm)
    return generator.sample(cond, steps, guidance, rng, on_step)


# ----------------------------------------------------------------------------------------------------
# 8. Pixels: the CLIP diffusion decoder and the ablation's VAE
# ----------------------------------------------------------------------------------------------------


SPRITE_GAIN = 10.0  # PixelDecoder's sprite logits are its parameters times this


class PixelDecoder(nn.Module):
    """Scene tokens -> image in one forward pass: what and where each object is, then each object drawn.

    Each of the SCENE_SLOTS objects is read from its own channels of the pooled scene tokens by one head
    that every slot shares: its colour (with a "no object" class), shape, size and place (the box's
    top-left corner), each classified, size and corner on the `position_step` grid (as Pix2Seq quantises
    coordinates). Each shape is one learned sprite, a coverage in [0, 1] on a sprite x sprite grid in its
    box's own frame; a spatial transformer (AIR, Eslami et al. 2016) scales it into the object's box, and
    it paints the object's colour (a learned palette) over a learned background. One sprite serves every
    size and place, so the renderer learns a shape once; the toy's objects never overlap, so paints add
    up. Drawn from the likeliest classes, a slightly-off generated feature still gives an object of one
    colour and shape (drawn straight from the features, generated objects blend them). Deterministic, as
    BLIP3-o's decoder at inference: variety comes from the diffusion stage. At real scale BLIP3-o reuses
    Emu2-Gen's SDXL UNet (a diffusion decoder) instead; see released.py.
    """

    def __init__(self, cfg: DecoderConfig, token_dim: int, image_size: int = 32):
        super().__init__()
        self.cfg, self.image_size = cfg, image_size
        W = cfg.width
        self.points = image_size // cfg.position_step  # grid points per axis a corner or a size can take
        # One object's classes from its own channels: colour, shape, size, x and y of the corner. An MLP, as
        # a linear map cannot cut one coordinate into sharp bins.
        self.classes = (DENSE_COLOURS, DENSE_SHAPES, self.points, self.points, self.points)
        self.read_head = nn.Sequential(nn.Linear(token_dim // SCENE_SLOTS, W), nn.GELU(),
                                       nn.Linear(W, sum(self.classes)))
        # Coverage logits of each shape's sprite ("no object" included: its paint is zero anyway), divided
        # by SPRITE_GAIN. They start at zero, half coverage everywhere, and every sprite pixel gets its own
        # gradient; the gain lets Adam's steps (about lr each) saturate the coverage to 0 or 1 within the
        # stage, as the world's shapes have no soft edges (a soft one leaves a tinted box around each shape).
        self.sprites = nn.Parameter(torch.zeros(DENSE_SHAPES, 1, cfg.sprite, cfg.sprite))
        # Each colour relative to the background, in [-1, 1] units; "no object" paints nothing. It starts at
        # zero, so the first steps learn the colours on half-covered boxes; the paint scales the sprites'
        # gradient, which grows as the colours are learnt.
        self.palette = nn.Embedding(DENSE_COLOURS, 3, padding_idx=DENSE_COLOURS - 1)
        nn.init.zeros_(self.palette.weight)
        self.background = nn.Parameter(torch.zeros(3))
        self.register_buffer("pixel_centres", torch.arange(image_size, dtype=torch.float32) + 0.5,
                             persistent=False)
        self.register_buffer("cond_scale", torch.ones(()))  # scene tokens / cond_scale: unit std

    def read(self, tokens: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """tokens (B, 64, S) -> the logits of the SCENE_SLOTS objects' colour (B, 4, 11), shape (B, 4, 4),
        size (B, 4, points) and corner x, y (B, 4, points) each."""
        # Every scene token describes the whole scene: their mean, split into the objects' channels.
        objects = (tokens / self.cond_scale).mean(1).unflatten(-1, (SCENE_SLOTS, -1))  # (B, 4, S / 4)
        return self.read_head(objects).split(self.classes, dim=-1)

    def draw(self, colour: torch.Tensor, shape: torch.Tensor, size: torch.Tensor,
             corner: torch.Tensor) -> torch.Tensor:
        """Objects as class ids, colour, shape, size (B, 4), corner (B, 4, 2) -> (B, 3, H, W) in [-1, 1]."""
        B, K = shape.shape
        step, img = self.cfg.position_step, self.image_size
        corner = corner.float() * step  # (B, K, 2) in pixels
        side = (size.float() * step).clamp(min=step)  # (B, K): the box's side in pixels (> 0 for any class)
        # Every pixel centre in each object's box frame, -1 .. 1 inside the box (grid_sample's convention);
        # outside it the sprite is padded with zero coverage.
        x = (self.pixel_centres - corner[..., :1]) / side[..., None] * 2 - 1  # (B, K, W)
        y = (self.pixel_centres - corner[..., 1:]) / side[..., None] * 2 - 1  # (B, K, H)
        grid = torch.stack(torch.broadcast_tensors(x[:, :, None, :], y[:, :, :, None]), -1)  # (B,K,H,W,2)
        sprites = torch.sigmoid(self.sprites[shape.flatten()] * SPRITE_GAIN)  # (B * K, 1, s, s)
        cover = F.grid_sample(sprites, grid.flatten(0, 1), align_corners=False)  # (B * K, 1, H, W)
        paint = cover.view(B, K, 1, img, img) * self.palette(colour)[..., None, None]  # (B, K, 3, H, W)
        return paint.sum(1) + self.background.view(3, 1, 1)  # every object over the background

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Scene tokens (B, 64, S) -> images (B, 3, H, W) in [0, 1], every object its likeliest classes."""
        colour, shape, size, x, y = (logits.argmax(-1) for logits in self.read(tokens))
        return (self.draw(colour, shape, size, torch.stack([x, y], -1)) + 1).div(2).clamp(0, 1)

    def box_classes(self, box: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Boxes (B, 4, 4) in [0, 1] -> size (B, 4) and corner (B, 4, 2) on the grid. The side comes from the
        box's own width: a box touching the right edge has its far corner at `points`, past the last class."""
        corner = (box[..., :2] * self.points).round().long().clamp(0, self.points - 1)
        size = ((box[..., 2] - box[..., 0]) * self.points).round().long().clamp(0, self.points - 1)
        return size, corner

    def loss(self, images: torch.Tensor, tokens: torch.Tensor, colour: torch.Tensor, shape: torch.Tensor,
             box: torch.Tensor):
        """The classes' cross-entropy, plus MSE to the image in [-1, 1] drawn from the true classes.

        colour, shape (B, 4) and box (B, 4, 4) in [0, 1] are the true objects in slot order
        (data.scene_labels); an empty slot has the "no object" colour and shape, and no size or place."""
        present = colour < DENSE_COLOURS - 1  # (B, 4)
        size, corner = self.box_classes(box)
        logits = self.read(tokens)
        # Colour and shape in every slot (an empty one: "no object"); size and corner where an object is.
        l_read = sum(F.cross_entropy(lg.flatten(0, 1), y.flatten()) for lg, y in zip(logits, (colour, shape)))
        l_read = l_read + sum(F.cross_entropy(lg[present], y[present])
                              for lg, y in zip(logits[2:], (size, corner[..., 0], corner[..., 1])))
        l_pixels = F.mse_loss(self.draw(colour, shape, size, corner), images * 2 - 1)
        logs = {"loss_pixels": float(l_pixels.detach()), "loss_read": float(l_read.detach())}
        return l_pixels + l_read, logs


class VAE(nn.Module):
    """A small convolutional VAE: 32x32x3 image <-> 8x8xC latent, i.e. 64 tokens of C channels, the target of
    the "VAE + Flow" ablation (the paper's Figure 3). Loss: pixel MSE + a small KL weight (near N(0, I))."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        w, c = cfg.width, cfg.latent_channels
        self.cfg = cfg
        self.encoder = nn.Sequential(
            nn.Conv2d(3, w, 3, padding=1), nn.SiLU(),
            nn.Conv2d(w, w, 4, stride=2, padding=1), nn.SiLU(),  # 32 -> 16
            nn.Conv2d(w, 2 * w, 4, stride=2, padding=1), nn.SiLU(),  # 16 -> 8
            nn.Conv2d(2 * w, 2 * c, 3, padding=1))  # mean and log-variance
        self.decoder = nn.Sequential(
            nn.Conv2d(c, 2 * w, 3, padding=1), nn.SiLU(),
            nn.ConvTranspose2d(2 * w, w, 4, stride=2, padding=1), nn.SiLU(),  # 8 -> 16
            nn.ConvTranspose2d(w, w, 4, stride=2, padding=1), nn.SiLU(),  # 16 -> 32
            nn.Conv2d(w, 3, 3, padding=1))

    def encode(self, images: torch.Tensor):
        """images (B, 3, 32, 32) in [0, 1] -> (mean, logvar), each (B, C, 8, 8)."""
        return self.encoder(images * 2 - 1).chunk(2, dim=1)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return (self.decoder(z) + 1).div(2)

    def loss(self, images: torch.Tensor, rng=None):
        mean, logvar = self.encode(images)
        z = mean + (0.5 * logvar).exp() * torch.randn(mean.shape, generator=rng, device=mean.device)
        recon = F.mse_loss(self.decode(z), images)
        kl = 0.5 * (mean.pow(2) + logvar.exp() - 1 - logvar).mean()
        return recon + self.cfg.kl_weight * kl

    def tokens(self, images: torch.Tensor) -> torch.Tensor:
        """images -> latent means as 64 tokens (B, 64, C): the generation target of the ablation."""
        return self.encode(images)[0].flatten(2).transpose(1, 2)

    def tokens_to_images(self, tokens: torch.Tensor) -> torch.Tensor:
        B, N, C = tokens.shape
        g = int(math.isqrt(N))
        return self.decode(tokens.transpose(1, 2).reshape(B, C, g, g)).clamp(0, 1)
