"""BLIP3-o in one file: a unified model that understands images and generates them in CLIP space.

Read this file top to bottom; the pieces come in the order the data flows through them.

    image --CLIP--> 64 patch tokens (B, 64, D_clip) --projector--> LM  ........ stage 1: understanding
    prompt + 64 learnable queries --frozen LM--> query states (B, 64, D_lm)
        --Next-DiT + flow matching--> 64 CLIP tokens --pixel decoder (diffusion)--> image  ... stage 2

1. Config and presets: `toy` (trains on a laptop CPU in minutes), `blip3o-4b`, `blip3o-8b` (the paper's).
2. Tokenizer: a word-level tokenizer built offline for the toy; `AutoTokenizer` for real backbones.
3. Image encoder: an open_clip CLIP; its last block's patch tokens, average-pooled to an 8x8 grid, are what
   the LM reads *and* what the generator learns to produce (paper section 3: "CLIP + Flow Matching").
4. Understanding (stage 1): LLaVA-style projector + causal LM, next-token loss on the answer only.
5. Generation (stage 2): 64 learnable queries appended to the prompt; the frozen LM's last hidden states
   at those positions condition a Next-DiT (Lumina-Next) trained by flow matching, or, for the ablation,
   a linear map trained with MSE.
6. Next-DiT, flow-matching loss and Euler sampler, loader of the released BLIP3-o weights.
7. Pixels: a pixel decoder (the same Next-DiT over 4x4 image patches, conditioned on CLIP tokens) and a
   small VAE for the "VAE + Flow" ablation.
8. Checkpoints: safetensors weights + JSON config, written atomically.

Flow-matching convention (the paper's, used everywhere in this file):
    x_t = t * x_1 + (1 - t) * x_0,  x_0 ~ N(0, I) noise, x_1 data, t ~ U(0, 1),
    the network predicts the velocity v = x_1 - x_0, sampling integrates dx/dt = v from t=0 to t=1.

Importing this module does nothing but define things.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from _dit import *  # noqa: F401,F403  (Next-DiT section; merged into this file before release)
from _dit import DiTConfig, NextDiT, euler_sample, flow_matching_loss

# ----------------------------------------------------------------------------------------------------
# 1. Config and presets
# ----------------------------------------------------------------------------------------------------


@dataclass
class CLIPConfig:
    """The CLIP image encoder. `name` set: an open_clip named model (real use); None: the toy CLIP."""

    name: str | None = None  # open_clip model name, e.g. "EVA02-E-14-plus"
    pretrained: str | None = None  # open_clip pretrained tag or a local weights file
    image_size: int = 32
    patch_size: int = 4  # 32 / 4 = an 8x8 grid: exactly the real model's 64 tokens
    width: int = 128  # D_clip: width of the patch tokens
    layers: int = 4
    heads: int = 4
    embed_dim: int = 128  # joint image-text embedding (contrastive training only)
    text_width: int = 128
    text_layers: int = 3
    text_heads: int = 4
    context_length: int = 24
    vocab_size: int = 0  # toy text tower: set from the tokenizer
    grid: int = 8  # tokens are average-pooled down to grid x grid (real: 32x32 -> 8x8)
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
    # The published config.json of the real backbone, used to build it on the `meta` device without a
    # download (sizes only; weights always come from `name`).
    arch: dict | None = None


@dataclass
class VAEConfig:
    """Small convolutional VAE for the "VAE + Flow" ablation: 32x32x3 -> 8x8xC latents (64 tokens)."""

    latent_channels: int = 8
    width: int = 64
    kl_weight: float = 1e-4


@dataclass
class Config:
    preset: str = "toy"
    clip: CLIPConfig = field(default_factory=CLIPConfig)
    lm: LMConfig = field(default_factory=LMConfig)
    dit: DiTConfig = field(default_factory=DiTConfig)  # the generation head (target: CLIP or VAE tokens)
    decoder: DiTConfig | None = None  # pixel decoder (toy only; the real one is Emu2-Gen's SDXL UNet)
    vae: VAEConfig = field(default_factory=VAEConfig)
    num_queries: int = 64  # learnable queries (paper: 64)
    prompt_template: str = "Please generate an image based on the following caption: {}"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Config":
        d = dict(d)
        dec = d.get("decoder")
        return cls(
            preset=d["preset"],
            clip=CLIPConfig(**{**d["clip"], "image_mean": tuple(d["clip"]["image_mean"]),
                               "image_std": tuple(d["clip"]["image_std"])}),
            lm=LMConfig(**d["lm"]),
            dit=DiTConfig(**d["dit"]),
            decoder=DiTConfig(**dec) if dec is not None else None,
            vae=VAEConfig(**d["vae"]),
            num_queries=d["num_queries"],
            prompt_template=d["prompt_template"],
        )


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
    clip = CLIPConfig()
    lm = LMConfig()
    # Generation head: a small Next-DiT over the 64 CLIP tokens, conditioned on the 64 query states.
    dit = DiTConfig(in_channels=clip.width, hidden_size=192, num_layers=4, num_heads=6, num_kv_heads=6,
                    cond_dim=lm.hidden_size, grid_size=clip.grid)
    # Pixel decoder: the same class over 4x4x3 = 48-channel patches of the 32x32 image, conditioned on the
    # 64 CLIP tokens of that image (spatially aligned: CLIP token i covers patch i).
    decoder = DiTConfig(in_channels=48, hidden_size=192, num_layers=4, num_heads=6, num_kv_heads=6,
                        cond_dim=clip.width, grid_size=clip.grid, spatial_cond=True)
    return Config(preset="toy", clip=clip, lm=lm, dit=dit, decoder=decoder)


def _real(preset: str, lm_name: str, arch: dict) -> Config:
    # EVA02-CLIP-E-14-plus at 448 px: 32x32 patches of width 1792, pooled 4x4 -> 8x8 (DESIGN section 2).
    clip = CLIPConfig(name="EVA02-E-14-plus", image_size=448, patch_size=14, width=1792, embed_dim=1024,
                      grid=8, image_mean=(0.48145466, 0.4578275, 0.40821073),
                      image_std=(0.26862954, 0.26130258, 0.27577711))
    lm = LMConfig(name=lm_name, hidden_size=arch["hidden_size"], num_layers=arch["num_hidden_layers"],
                  num_heads=arch["num_attention_heads"], num_kv_heads=arch["num_key_value_heads"],
                  intermediate_size=arch["intermediate_size"], max_length=4096,
                  vocab_size=arch["vocab_size"], image_token="<|image_pad|>", arch=arch)
    # The official DiT: width 1792, 24 layers, 28 heads, FFN 4864 (DiTConfig's defaults), reading the
    # backbone's hidden states (2048 or 3584 wide) through its caption projection.
    dit = DiTConfig(cond_dim=lm.hidden_size)
    return Config(preset=preset, clip=clip, lm=lm, dit=dit, decoder=None)


PRESETS = {
    "toy": _toy,
    "blip3o-4b": lambda: _real("blip3o-4b", "Qwen/Qwen2.5-VL-3B-Instruct", QWEN25_VL_3B),
    "blip3o-8b": lambda: _real("blip3o-8b", "Qwen/Qwen2.5-VL-7B-Instruct", QWEN25_VL_7B),
}


def get_config(preset: str) -> Config:
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    return PRESETS[preset]()


# ----------------------------------------------------------------------------------------------------
# 2. Tokenizer
# ----------------------------------------------------------------------------------------------------

SPECIAL_TOKENS = ["<pad>", "<unk>", "<eos>", "<bos>", "<image>"]  # ids 0..4; open_clip's pad 0 / eos 2


def build_toy_tokenizer(words):
    """A word-level tokenizer over the toy world's vocabulary, built offline with `tokenizers`.

    Returns a transformers `PreTrainedTokenizerFast`, so `save_pretrained` / `AutoTokenizer.from_pretrained`
    work exactly as for a real backbone's tokenizer. Pad is id 0 and <eos> id 2, which is what open_clip's
    text tower assumes with `pool_type='eos'`.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for w in sorted(set(words) - set(SPECIAL_TOKENS)):
        vocab[w] = len(vocab)
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", unk_token="<unk>",
                                   eos_token="<eos>", bos_token="<bos>",
                                   extra_special_tokens={"image_token": "<image>"})


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


def _is_word_level(tokenizer) -> bool:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    return backend is not None and type(backend.model).__name__ == "WordLevel"


# ----------------------------------------------------------------------------------------------------
# 3. Image encoder (CLIP)
# ----------------------------------------------------------------------------------------------------


class ImageEncoder(nn.Module):
    """An open_clip CLIP whose patch tokens are BLIP3-o's image representation.

    `tokens(images)` -> (B, grid*grid, D_clip): the last transformer block's output at the patch
    positions (CLS dropped), average-pooled to an 8x8 grid. For EVA02-E-14-plus at 448 px that is a
    32x32 grid pooled 4x4 -> 64 x 1792, the paper's generation target. The toy CLIP has patch 4 on 32x32
    images, so its grid is already 8x8 and the pooling is the identity.
    The text tower is used only for contrastive training and zero-shot scoring.
    """

    def __init__(self, cfg: CLIPConfig, device=None):
        super().__init__()
        import open_clip

        self.cfg = cfg
        if cfg.name is None:
            # pool_type='eos': pool the text at the <eos> token (id 2), which works for any vocabulary
            # (open_clip's default 'argmax' assumes EOT has the largest id, true only for its BPE vocab).
            self.model = open_clip.CLIP(
                embed_dim=cfg.embed_dim,
                vision_cfg=dict(image_size=cfg.image_size, patch_size=cfg.patch_size, width=cfg.width,
                                layers=cfg.layers, head_width=cfg.width // cfg.heads),
                text_cfg=dict(context_length=cfg.context_length, vocab_size=cfg.vocab_size,
                              width=cfg.text_width, heads=cfg.text_heads, layers=cfg.text_layers,
                              pool_type="eos", pad_id=0, eos_id=2),
            )
            # The toy image embedding is the mean of the (normalised) patch tokens instead of a CLS
            # token, so a set of 64 *generated* tokens has a CLIP embedding too (see `embed_tokens`).
            self.model.visual.pool_type = "avg"
        else:
            # A named open_clip model; "image_size" forces the resolution (EVA02-E-14-plus: 224 -> 448).
            # On the meta device (size checks) we must build *inside* the device context, or open_clip
            # would allocate all 4 B parameters on the CPU first.
            with torch.device(device or "cpu"):
                self.model = open_clip.create_model(cfg.name, pretrained=cfg.pretrained,
                                                    force_image_size=cfg.image_size,
                                                    device=device or "cpu")
        self.register_buffer("mean", torch.tensor(cfg.image_mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(cfg.image_std).view(1, 3, 1, 1), persistent=False)

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

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """Unit-norm image embeddings (B, embed_dim) for contrastive training / zero-shot."""
        return F.normalize(self.model.encode_image(self.normalize(images)), dim=-1)

    def embed_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """Unit-norm CLIP image embeddings (B, embed_dim) of patch tokens (B, 64, D), e.g. generated ones.

        Exactly what `encode_image` computes after the last block for the toy's average-pooled tower:
        mean over tokens of ln_post(token), then the projection. Real towers pool a CLS token (and pool
        the grid), so there the 64 tokens alone do not determine the embedding.
        """
        visual = self.model.visual
        if self.cfg.name is not None or visual.pool_type != "avg":
            raise NotImplementedError("embed_tokens needs the toy CLIP's average-pooled vision tower")
        return F.normalize(visual.ln_post(tokens).mean(1) @ visual.proj, dim=-1)

    def encode_text(self, ids: torch.Tensor) -> torch.Tensor:
        """Unit-norm text embeddings (B, embed_dim); ids right-padded with 0, ending in <eos>."""
        return F.normalize(self.model.encode_text(ids), dim=-1)

    def contrastive_loss(self, images: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Symmetric InfoNCE over the batch (CLIP, Radford et al. 2021).

        A small world repeats captions within a batch ("a photo of a circle"), so every pair whose texts
        are identical counts as a positive (soft targets), instead of pushing true matches apart.
        """
        img, txt = self.encode_image(images), self.encode_text(ids)
        logits = self.model.logit_scale.exp() * img @ txt.t()  # (B, B)
        same = (ids[:, None, :] == ids[None, :, :]).all(-1).float()  # (B, B) identical texts
        targets = same / same.sum(1, keepdim=True)
        return (F.cross_entropy(logits, targets) + F.cross_entropy(logits.t(), targets)) / 2


# ----------------------------------------------------------------------------------------------------
# 4. Understanding (stage 1): projector + causal LM
# ----------------------------------------------------------------------------------------------------


def build_backbone(cfg: LMConfig, device=None, dtype=None):
    """The causal LM: a tiny Qwen2 from a config (toy), a real one from `cfg.name`, or on `meta`.

    Real Qwen2.5-VL checkpoints load with their vision tower (it serves real understanding); BLIP3-o's
    generation path drives only its language model through `inputs_embeds` (see `lm_decoder`).
    """
    from transformers import AutoConfig, AutoModelForCausalLM, Qwen2Config, Qwen2ForCausalLM

    if cfg.name is None:
        hf_cfg = Qwen2Config(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
                             num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
                             num_key_value_heads=cfg.num_kv_heads, intermediate_size=cfg.intermediate_size,
                             max_position_embeddings=cfg.max_length, tie_word_embeddings=True,
                             pad_token_id=0, bos_token_id=3, eos_token_id=2)
        with torch.device(device or "cpu"):
            return Qwen2ForCausalLM(hf_cfg).to(dtype or torch.float32)
    if str(device) == "meta":
        # Sizes only, no weights: build from the published config numbers we carry in the preset.
        if cfg.arch is None:
            raise ValueError(f"no architecture numbers for {cfg.name!r}: cannot build it on the meta device")
        hf_cfg = AutoConfig.for_model(**cfg.arch)
        with torch.device("meta"):
            return _auto_class(hf_cfg)._from_config(hf_cfg, torch_dtype=dtype or torch.bfloat16)
    hf_cfg = AutoConfig.from_pretrained(cfg.name)
    model = _auto_class(hf_cfg).from_pretrained(cfg.name, torch_dtype=dtype or torch.bfloat16)
    return model.to(device or "cpu")


def _auto_class(hf_cfg):
    """Qwen2.5-VL is an image-text-to-text model in transformers; plain LMs are causal LMs."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    return AutoModelForImageTextToText if hasattr(hf_cfg, "vision_config") else AutoModelForCausalLM


def lm_decoder(lm) -> nn.Module:
    """The decoder stack (embeddings -> blocks -> final norm) of a causal LM, without its LM head.

    Its `last_hidden_state` is taken *after* the final norm, which is where BLIP3-o reads the queries.
    For Qwen2.5-VL this is the language model inside the multimodal wrapper.
    """
    return lm.get_decoder()


class Projector(nn.Module):
    """LLaVA-1.5's two-layer MLP from CLIP tokens into the LM's embedding space."""

    def __init__(self, clip_dim: int, lm_dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(clip_dim, lm_dim)
        self.linear_2 = nn.Linear(lm_dim, lm_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.gelu(self.linear_1(x)))


class VisionLanguageModel(nn.Module):
    """Stage 1: the LM reads 64 projected CLIP tokens where the <image> placeholders stand.

    Training sequence (right-padded; causal attention means padding after a sample never affects it):
        <bos> <image> x 64  question  answer <eos> <pad> ...
    with labels = -100 everywhere but the answer and its <eos> (prompt and image masked out).
    """

    def __init__(self, lm, clip_dim: int, image_token_id: int):
        super().__init__()
        self.lm = lm
        self.projector = Projector(clip_dim, lm.config.get_text_config().hidden_size)
        self.image_token_id = image_token_id

    def embed(self, input_ids: torch.Tensor, clip_tokens: torch.Tensor) -> torch.Tensor:
        """Token embeddings with the projected image tokens scattered into the placeholder slots."""
        embeds = self.lm.get_input_embeddings()(input_ids)  # (B, T, D_lm)
        slots = (input_ids == self.image_token_id).unsqueeze(-1)  # (B, T, 1)
        image = self.projector(clip_tokens).to(embeds.dtype)  # (B, 64, D_lm)
        if int(slots.sum()) != image.shape[0] * image.shape[1]:
            raise ValueError(f"{int(slots.sum())} image placeholders for {image.shape[0] * image.shape[1]} "
                             "image tokens")
        return embeds.masked_scatter(slots, image)

    def forward(self, input_ids, clip_tokens, labels=None):
        """Returns (loss or None, logits (B, T, V)). The loss is the mean over labelled tokens."""
        logits = self.lm(inputs_embeds=self.embed(input_ids, clip_tokens)).logits
        loss = None
        if labels is not None:
            # Next-token prediction: position i predicts token i+1.
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(),
                                   ignore_index=-100)
        return loss, logits

    @torch.no_grad()
    def generate(self, input_ids, lengths, clip_tokens, max_new_tokens=16, eos_id=2,
                 temperature: float = 0.0, generator=None):
        """Batched decoding: greedy (temperature 0) or sampled. Returns a list of new-token id lists.

        Each step re-runs the whole (short) right-padded sequence and reads the logits at each sample's
        own last position, then writes the new token there; no KV cache, which keeps it obviously right.
        """
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
                nxt = torch.multinomial(F.softmax(last / temperature, -1), 1, generator=generator)[:, 0]
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


def build_qa_batch(tokenizer, clip_grid_tokens: int, questions, answers=None, length: int | None = None):
    """Questions (+ answers) -> (input_ids, labels or None, lengths). Image placeholders first.

    Layout: <bos> <image>*64 question [answer <eos>]; labels keep only the answer and <eos>.
    """
    img = [tokenizer.convert_tokens_to_ids(SPECIAL_TOKENS[4])] * clip_grid_tokens
    rows, labels, lens = [], [], []
    for i, q in enumerate(questions):
        prompt = [tokenizer.bos_token_id] + img + tokenizer(q, add_special_tokens=False)["input_ids"]
        target = []
        if answers is not None:
            target = tokenizer(answers[i], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        rows.append(prompt + target)
        labels.append([-100] * len(prompt) + target)
        lens.append(len(prompt) + len(target))
    T = length or max(lens)
    if max(lens) > T:
        raise ValueError(f"sequence of {max(lens)} tokens exceeds the backbone's limit {T}")
    pad = tokenizer.pad_token_id
    ids = torch.tensor([r + [pad] * (T - len(r)) for r in rows])
    lab = torch.tensor([r + [-100] * (T - len(r)) for r in labels])
    return ids, (lab if answers is not None else None), torch.tensor(lens)


# ----------------------------------------------------------------------------------------------------
# 5. Generation (stage 2): learnable queries read out of the frozen LM
# ----------------------------------------------------------------------------------------------------


class MSEHead(nn.Module):
    """The "CLIP + MSE" ablation: a learnable linear map W from query states to target tokens.

    L = ||X - W Q||^2 (paper section 3.2). Deterministic: one prompt, one output.
    """

    def __init__(self, cond_dim: int, out_dim: int):
        super().__init__()
        self.proj = nn.Linear(cond_dim, out_dim)

    def forward(self, cond: torch.Tensor) -> torch.Tensor:
        return self.proj(cond)  # (B, 64, D_lm) -> (B, 64, D_target)


class Generator(nn.Module):
    """Stage 2: 64 learnable queries -> frozen LM -> query states -> Next-DiT (flow) or W (MSE).

    The LM is passed in at call time, not owned: it is frozen (`requires_grad_(False)`, `eval()`), its
    weights are saved by stage 1, and gradients still flow *through* it into the queries.
    `target_scale` divides the target tokens so they have unit standard deviation, like Stable
    Diffusion's latent scaling factor; it is 1.0 for the real model (the paper does not normalize).
    """

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
        # The queries: a plain parameter of (64, D_lm), initialised N(0, 1) as in the official code.
        self.queries = nn.Parameter(torch.randn(cfg.num_queries, lm_dim))
        if loss == "flow":
            dit_cfg = dataclasses.replace(cfg.dit, in_channels=target_dim, cond_dim=lm_dim)
            self.dit = NextDiT(dit_cfg)
        else:
            self.mse = MSEHead(lm_dim, target_dim)
        self.register_buffer("target_scale", torch.ones(()))
        self.target_dim = target_dim

    def condition(self, lm, prompt_ids: torch.Tensor, prompt_lens: torch.Tensor) -> torch.Tensor:
        """Prompt ids (B, T) right-padded, lengths (B,) -> query states (B, 64, D_lm).

        Each sample's sequence is its prompt followed directly by the 64 queries; the final hidden state
        (after the LM's last norm) at those 64 positions is the condition.
        """
        B, T = prompt_ids.shape
        Q = self.num_queries
        embeds = lm.get_input_embeddings()(prompt_ids)  # (B, T, D)
        D = embeds.shape[-1]
        seq = torch.cat([embeds, embeds.new_zeros(B, Q, D)], 1)  # (B, T + Q, D)
        slots = prompt_lens[:, None] + torch.arange(Q, device=seq.device)  # (B, Q): right after the prompt
        index = slots[..., None].expand(B, Q, D)
        queries = self.queries.to(seq.dtype)[None].expand(B, Q, D)
        seq = seq.scatter(1, index, queries)  # (B, T + Q, D), differentiable w.r.t. the queries
        hidden = lm_decoder(lm)(inputs_embeds=seq).last_hidden_state  # (B, T + Q, D), post final norm
        return hidden.gather(1, index).float()  # (B, Q, D)

    def loss(self, cond: torch.Tensor, target: torch.Tensor, cond_drop: float = 0.1,
             time_sampling: str = "uniform", generator=None):
        """target (B, 64, D_target) raw tokens -> (scalar loss, t (B,) or None, per-sample loss (B,))."""
        x1 = target / self.target_scale
        if self.loss_type == "mse":
            per = (self.mse(cond) - x1).pow(2).mean(dim=(1, 2))
            return per.mean(), None, per
        return flow_matching_loss(self.dit, x1, cond, cond_drop=cond_drop, time_sampling=time_sampling,
                                  generator=generator)

    @torch.no_grad()
    def sample(self, cond: torch.Tensor, steps: int = 30, cfg: float = 3.0, generator=None) -> torch.Tensor:
        """Query states (B, 64, D_lm) -> generated target tokens (B, 64, D_target), unscaled."""
        if self.loss_type == "mse":
            x1 = self.mse(cond)
        else:
            x1 = euler_sample(self.dit, cond, self.dit.cfg.grid_size ** 2,
                              self.target_dim, steps=steps, cfg=cfg, generator=generator)
        return x1 * self.target_scale

    def prompts(self, captions):
        return [self.template.format(c) for c in captions]


# ----------------------------------------------------------------------------------------------------
# 7. Pixels: the CLIP diffusion decoder and the ablation's VAE
# ----------------------------------------------------------------------------------------------------


def patchify(images: torch.Tensor, patch: int) -> torch.Tensor:
    """(B, 3, H, W) -> (B, (H/p)*(W/p), p*p*3) row-major patches (the DiT's token layout)."""
    B, C, H, W = images.shape
    x = images.reshape(B, C, H // patch, patch, W // patch, patch)  # (B, C, h, p, w, p)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(B, (H // patch) * (W // patch), patch * patch * C)


def unpatchify(tokens: torch.Tensor, patch: int, channels: int = 3) -> torch.Tensor:
    """Inverse of `patchify`: (B, h*w, p*p*C) -> (B, C, h*p, w*p) for a square grid."""
    B, N, _ = tokens.shape
    g = int(math.isqrt(N))
    x = tokens.reshape(B, g, g, patch, patch, channels)  # (B, h, w, p, p, C)
    return x.permute(0, 5, 1, 3, 2, 4).reshape(B, channels, g * patch, g * patch)


class PixelDecoder(nn.Module):
    """CLIP tokens -> image, by flow matching over 4x4 pixel patches (an Emu2-style diffusion decoder).

    The same Next-DiT class as the generator, with 48-channel tokens (4*4*3 pixels in [-1, 1]) on the
    8x8 grid and the image's 64 CLIP tokens as its condition. In the toy the condition is also added to
    the patch embeddings position by position (`spatial_cond`), since CLIP token i describes patch i;
    this lets a tiny decoder learn in minutes. At real scale BLIP3-o reuses Emu2-Gen's SDXL UNet instead.
    """

    def __init__(self, cfg: DiTConfig, image_size: int = 32):
        super().__init__()
        self.patch = image_size // cfg.grid_size
        if cfg.in_channels != 3 * self.patch ** 2:
            raise ValueError(f"decoder in_channels {cfg.in_channels} != 3 x {self.patch}^2")
        self.dit = NextDiT(cfg)
        self.register_buffer("cond_scale", torch.ones(()))  # CLIP tokens / cond_scale: unit std

    def loss(self, images: torch.Tensor, clip_tokens: torch.Tensor, cond_drop: float = 0.1, generator=None):
        x1 = patchify(images * 2 - 1, self.patch)  # (B, 64, 48) in [-1, 1]
        return flow_matching_loss(self.dit, x1, clip_tokens / self.cond_scale, cond_drop=cond_drop,
                                  generator=generator)

    @torch.no_grad()
    def sample(self, clip_tokens: torch.Tensor, steps: int = 20, cfg: float = 1.0, generator=None):
        """(B, 64, D_clip) -> images (B, 3, H, W) in [0, 1]."""
        x1 = euler_sample(self.dit, clip_tokens / self.cond_scale, clip_tokens.shape[1],
                          self.dit.cfg.in_channels, steps=steps, cfg=cfg, generator=generator)
        return (unpatchify(x1, self.patch) + 1).div(2).clamp(0, 1)


class VAE(nn.Module):
    """A small convolutional VAE: 32x32x3 image <-> 8x8xC latent, i.e. 64 tokens of C channels.

    Used only by the "VAE + Flow" ablation, whose generator targets these latents instead of CLIP tokens
    (the paper's Figure 3). Loss: pixel MSE + a small KL weight (an autoencoder that stays near N(0, I)).
    """

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        w, c = cfg.width, cfg.latent_channels
        self.cfg = cfg
        self.encoder = nn.Sequential(
            nn.Conv2d(3, w, 3, padding=1), nn.SiLU(),
            nn.Conv2d(w, w, 4, stride=2, padding=1), nn.SiLU(),  # 32 -> 16
            nn.Conv2d(w, 2 * w, 4, stride=2, padding=1), nn.SiLU(),  # 16 -> 8
            nn.Conv2d(2 * w, 2 * c, 3, padding=1),  # mean and log-variance
        )
        self.decoder = nn.Sequential(
            nn.Conv2d(c, 2 * w, 3, padding=1), nn.SiLU(),
            nn.ConvTranspose2d(2 * w, w, 4, stride=2, padding=1), nn.SiLU(),  # 8 -> 16
            nn.ConvTranspose2d(w, w, 4, stride=2, padding=1), nn.SiLU(),  # 16 -> 32
            nn.Conv2d(w, 3, 3, padding=1),
        )

    def encode(self, images: torch.Tensor):
        """images (B, 3, 32, 32) in [0, 1] -> (mean, logvar), each (B, C, 8, 8)."""
        return self.encoder(images * 2 - 1).chunk(2, dim=1)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return (self.decoder(z) + 1).div(2)

    def loss(self, images: torch.Tensor, generator=None):
        mean, logvar = self.encode(images)
        z = mean + (0.5 * logvar).exp() * torch.randn(mean.shape, generator=generator, device=mean.device)
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


# ----------------------------------------------------------------------------------------------------
# 8. Checkpoints: safetensors weights + JSON, written atomically
# ----------------------------------------------------------------------------------------------------


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, from another stage, or does not match the model."""


def save_checkpoint(folder, tensors: dict, meta: dict, optimizer_state: dict | None = None,
                    tokenizer=None) -> None:
    """Write a checkpoint folder atomically: a crash mid-save leaves the previous one intact.

    Everything goes into a sibling temporary folder first (fsync'd); then the old folder is renamed
    aside, the new one renamed into place, and the old one deleted. `load_checkpoint` falls back to the
    aside copy if a crash happened between the two renames.
    """
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.with_name(folder.name + f".tmp-{os.getpid()}")
    old = folder.with_name(folder.name + ".old")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    # clone(): tied weights (the toy LM's embedding = its output layer) share storage, which
    # safetensors refuses; each key gets its own copy and `load_module` restores both.
    weights = {k: v.detach().cpu().clone().contiguous() for k, v in tensors.items()}
    for k, v in weights.items():
        if v.is_floating_point() and not torch.isfinite(v).all():
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
    if folder.exists():
        shutil.rmtree(old, ignore_errors=True)
        folder.rename(old)
    tmp.rename(folder)
    shutil.rmtree(old, ignore_errors=True)


def checkpoint_path(folder) -> Path | None:
    """The folder holding a complete checkpoint (or its aside copy after a crash), or None."""
    folder = Path(folder)
    for cand in (folder, folder.with_name(folder.name + ".old")):
        if (cand / "meta.json").is_file() and (cand / "model.safetensors").is_file():
            return cand
    return None


def load_checkpoint(folder, stage: str | None = None, with_optimizer: bool = False):
    """-> (meta dict, tensors dict, optimizer state or None). Safe: no pickle beyond weights_only."""
    from safetensors.torch import load_file

    path = checkpoint_path(folder)
    if path is None:
        raise CheckpointError(f"no checkpoint in {folder}")
    meta = json.loads((path / "meta.json").read_text())
    if stage is not None and meta.get("stage") != stage:
        raise CheckpointError(f"{folder} holds a {meta.get('stage')!r} checkpoint, expected {stage!r}")
    tensors = load_file(path / "model.safetensors")
    opt = None
    if with_optimizer and (path / "optimizer.pt").is_file():
        opt = torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True)
    return meta, tensors, opt


def module_tensors(prefix: str, module: nn.Module) -> dict:
    """A module's state dict (parameters and persistent buffers) under `prefix.`."""
    return {f"{prefix}.{k}": v for k, v in module.state_dict().items()}


def load_module(module: nn.Module, tensors: dict, prefix: str, source: str = "checkpoint",
                ema: bool = False) -> None:
    """Copy `prefix.*` tensors into a module; say exactly which keys or shapes do not match.

    ema=True: where the checkpoint holds an exponential moving average "ema.<key>" of a weight, load
    that instead (diffusion models sample from their EMA weights).
    """
    own = module.state_dict()
    found = {k[len(prefix) + 1:]: v for k, v in tensors.items() if k.startswith(prefix + ".")}
    if ema:
        found = {k: tensors.get(f"ema.{prefix}.{k}", v) for k, v in found.items()}
    missing = sorted(set(own) - set(found))
    unexpected = sorted(set(found) - set(own))
    shapes = [f"{k}: {tuple(found[k].shape)} in {source}, {tuple(own[k].shape)} in model"
              for k in own if k in found and found[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        lines = []
        if missing:
            lines.append(f"missing {len(missing)} keys, e.g. {', '.join(missing[:5])}")
        if unexpected:
            lines.append(f"unexpected {len(unexpected)} keys, e.g. {', '.join(unexpected[:5])}")
        if shapes:
            lines.append("shape mismatch: " + "; ".join(shapes[:5]))
        raise CheckpointError(f"{source} does not match the {prefix!r} model: " + " | ".join(lines))
    module.load_state_dict(found, strict=True)


# ----------------------------------------------------------------------------------------------------
# Devices and precision (chosen once, in one place)
# ----------------------------------------------------------------------------------------------------


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
    f = sum(p.numel() for p in module.parameters() if not p.requires_grad)
    return t, f


# ----------------------------------------------------------------------------------------------------
# 9. The whole model, rebuilt from a run folder
# ----------------------------------------------------------------------------------------------------


@dataclass
class Pipeline:
    """Every trained piece of a run, rebuilt from its checkpoints alone (no command-line flags).

    RUN/clip (CLIP + tokenizer), RUN/understand (projector + LM), RUN/decoder (pixels),
    RUN/generate/<loss>-<target> (queries + Next-DiT or W), RUN/vae (ablation). Missing pieces are None.
    """

    config: Config
    tokenizer: object
    clip: ImageEncoder
    vlm: VisionLanguageModel | None = None
    generator: Generator | None = None
    decoder: PixelDecoder | None = None
    vae: VAE | None = None
    target: str = "clip"
    device: torch.device = torch.device("cpu")

    # --- understanding -------------------------------------------------------------------------------
    @torch.no_grad()
    def answer(self, images: torch.Tensor, questions, temperature: float = 0.0, max_new_tokens: int = 24,
               generator=None) -> list[str]:
        """images (B, 3, H, W) in [0, 1], one question each -> answers (greedy or sampled)."""
        if self.vlm is None:
            raise CheckpointError("this run has no understanding checkpoint (RUN/understand)")
        ctok = self.clip.tokens(images.to(self.device))
        ids, _, lens = build_qa_batch(self.tokenizer, ctok.shape[1], questions)
        outs = self.vlm.generate(ids.to(self.device), lens.to(self.device), ctok, max_new_tokens,
                                 self.tokenizer.eos_token_id, temperature, generator)
        return [decode_ids(self.tokenizer, o) for o in outs]

    # --- generation ----------------------------------------------------------------------------------
    def encode_prompts(self, captions):
        """Captions -> templated prompt ids (B, T) right-padded, and lengths (B,)."""
        texts = self.generator.prompts(captions)
        lens = [len(self.tokenizer(t, add_special_tokens=False)["input_ids"]) + 1 for t in texts]
        limit = self.config.lm.max_length - self.config.num_queries
        if max(lens) > limit:
            raise ValueError(f"prompt of {max(lens)} tokens is longer than the backbone allows ({limit} "
                             f"with the {self.config.num_queries} queries)")
        ids, lens = encode_texts(self.tokenizer, texts, max(lens), bos=True, eos=False)
        return ids.to(self.device), lens.to(self.device)

    @torch.no_grad()
    def generate_tokens(self, captions, steps: int = 30, cfg: float = 3.0, generator=None) -> torch.Tensor:
        """Captions -> generated target tokens (B, 64, D): CLIP features (or VAE latents)."""
        if self.generator is None or self.vlm is None:
            raise CheckpointError("this run has no generation checkpoint (RUN/generate/...)")
        for c in captions:
            if not c.strip():
                raise ValueError("empty prompt")
        ids, lens = self.encode_prompts(captions)
        cond = self.generator.condition(self.vlm.lm, ids, lens)
        return self.generator.sample(cond, steps=steps, cfg=cfg, generator=generator)

    @torch.no_grad()
    def tokens_to_images(self, tokens: torch.Tensor, steps: int = 20, cfg: float = 1.0,
                         generator=None) -> torch.Tensor:
        """Target tokens -> images (B, 3, H, W) in [0, 1]: the pixel decoder, or the VAE decoder."""
        if self.target == "vae":
            return self.vae.tokens_to_images(tokens)
        if self.decoder is None:
            raise CheckpointError("this run has no pixel decoder (RUN/decoder)")
        return self.decoder.sample(tokens, steps=steps, cfg=cfg, generator=generator)

    @torch.no_grad()
    def generate_images(self, captions, steps: int = 30, cfg: float = 3.0, decoder_steps: int = 20,
                        decoder_cfg: float = 1.0, generator=None) -> torch.Tensor:
        """Text -> image: two diffusion stages, condition -> CLIP tokens -> pixels."""
        tokens = self.generate_tokens(captions, steps, cfg, generator)
        return self.tokens_to_images(tokens, decoder_steps, decoder_cfg, generator)

    @torch.no_grad()
    def reconstruct(self, images: torch.Tensor, steps: int = 20, cfg: float = 1.0, generator=None):
        """Image -> CLIP tokens -> image: the CLIP autoencoder (or the VAE's, for target 'vae')."""
        images = images.to(self.device)
        tokens = self.vae.tokens(images) if self.target == "vae" else self.clip.tokens(images)
        return self.tokens_to_images(tokens, steps, cfg, generator)


def load_run(run, variant: str = "flow-clip", device="cpu", need=("clip",)) -> Pipeline:
    """Rebuild a toy run's models from RUN/<stage> checkpoints. `need`: stages that must exist."""
    run = Path(run)
    device = torch.device(device)

    def ckpt(stage):
        folder = run / stage
        if checkpoint_path(folder) is None:
            if stage.split("/")[0] in need:
                raise CheckpointError(f"no {stage} checkpoint in {run} (train it: python train.py "
                                      f"--stage {stage.split('/')[0]} --out {run})")
            return None
        return load_checkpoint(folder, stage=stage)

    meta, tensors, _ = ckpt("clip")
    cfg = Config.from_dict(meta["config"])
    tokenizer = load_tokenizer(str(checkpoint_path(run / "clip") / "tokenizer"))
    clip = ImageEncoder(cfg.clip)
    load_module(clip, tensors, "clip", str(run / "clip"))
    pipe = Pipeline(cfg, tokenizer, clip.to(device).eval(), device=device)

    if (got := ckpt("understand")) is not None:
        lm = build_backbone(Config.from_dict(got[0]["config"]).lm)
        pipe.vlm = VisionLanguageModel(lm, cfg.clip.width, tokenizer.convert_tokens_to_ids("<image>"))
        load_module(pipe.vlm, got[1], "vlm", str(run / "understand"))
        pipe.vlm.to(device).eval()
    if (got := ckpt("decoder")) is not None:
        pipe.decoder = PixelDecoder(Config.from_dict(got[0]["config"]).decoder, cfg.clip.image_size)
        load_module(pipe.decoder, got[1], "decoder", str(run / "decoder"), ema=True)
        pipe.decoder.to(device).eval()
    if (got := ckpt("vae")) is not None:
        pipe.vae = VAE(Config.from_dict(got[0]["config"]).vae)
        load_module(pipe.vae, got[1], "vae", str(run / "vae"))
        pipe.vae.to(device).eval()
    if (got := ckpt(f"generate/{variant}")) is not None:
        gmeta = got[0]
        pipe.generator = Generator(Config.from_dict(gmeta["config"]), loss=gmeta["loss"],
                                   target_dim=gmeta["target_dim"])
        load_module(pipe.generator, got[1], "generator", str(run / "generate" / variant), ema=True)
        pipe.generator.to(device).eval()
        pipe.target = gmeta["target"]
    for m in (pipe.clip, pipe.vlm, pipe.generator, pipe.decoder, pipe.vae):
        if m is not None:
            m.requires_grad_(False)
    return pipe
