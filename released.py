"""Pixels from the released BLIP3-o weights: the checkpoint's own diffusion decoder.

Our code runs the released stage-2 weights (64 queries + Next-DiT) and ends at 64 CLIP features per image.
Each released checkpoint (BLIP3o/BLIP3o-Model-8B, -4B) also carries the second diffusion stage in
`diffusion-decoder/`: Emu2-Gen's SDXL-architecture UNet, an SDXL VAE, an Euler scheduler, and the custom
diffusers pipeline that drives them (`pipeline_llava_gen.py`), whose decoding loop this file writes out:

    features (B, 64, 1792) --+-- encoder_hidden_states   (the UNet cross-attends to all 64 tokens)
                             +-- mean of the 64 tokens     -> text_embeds (SDXL's pooled embedding)
    time_ids = (SIZE, SIZE, 0, 0, H, W)                       SDXL's size and crop conditioning
    STEPS Euler steps, guidance GUIDANCE against the features generated for NEGATIVE_PROMPT
    VAE decode -> images (B, 3, H, W) in [0, 1]

`python sample.py --official-checkpoint DIR` runs it: the only path that needs diffusers. Sources, cited
at the lines that follow them: BLIP3o's pipeline_llava_gen.py (in diffusion-decoder/; public copy in the
loggerJK/VLM repository), class EmuVisualGenerationPipeline; BLIP3o's inference.py (how that pipeline is
loaded); Emu2's pipeline_emu2_gen.py (JiuhaiChen/BLIP3o) and conf/diffusion_config/*.json (baaivision/Emu),
the Emu2-Gen originals of BLIP3o's decoder and pipeline.
"""
import importlib.util
import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from cli import UserError

DECODER_DIR = "diffusion-decoder"  # BLIP3o's inference.py: diffusion_path = model_path + "/diffusion-decoder"
STEPS = 50  # BLIP3o's pipeline_llava_gen.py, __call__: num_inference_steps=50
GUIDANCE = 3.0  # BLIP3o's pipeline_llava_gen.py, __call__: guidance_scale=3.0
SIZE = 1024  # BLIP3o's pipeline_llava_gen.py, __call__: height = width = 1024, original_size=[1024, 1024]
# BLIP3o's pipeline_llava_gen.py, _prepare_and_encode_inputs: the unconditional input is what the model
# generates for the text " ", made once and cached (Emu2's pipeline_emu2_gen.py, the original, uses "").
NEGATIVE_PROMPT = " "
INSTALL_HINT = "the released decoder needs diffusers: pip install diffusers (or pass --features-only)"


class DecoderError(UserError):
    """A missing or unusable diffusion-decoder/ (or no diffusers): reported in one line."""


# ---- checks that cost nothing: run before the backbone and the DiT load --------------------------------

def decoder_config(checkpoint, size: int = SIZE) -> dict:
    """Check DIR/diffusion-decoder/, diffusers, and that the VAE makes size x size images -> UNet config."""
    root = Path(checkpoint) / DECODER_DIR
    if not root.is_dir():
        raise DecoderError(f"no {DECODER_DIR}/ in {checkpoint}: the released checkpoints carry one (download "
                           "the whole repository), or pass --features-only for CLIP features")
    for sub in ("unet", "vae", "scheduler"):
        if not (root / sub).is_dir():
            raise DecoderError(f"{root} has no {sub}/ folder (expected unet/, vae/, scheduler/)")
    try:
        importlib.import_module("diffusers")
    except ImportError:
        raise DecoderError(INSTALL_HINT) from None
    cfg = {}
    for sub in ("unet", "vae"):
        try:
            cfg[sub] = json.loads((root / sub / "config.json").read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise DecoderError(f"cannot read {root / sub / 'config.json'}: {e}") from None
    scale = 2 ** (len(cfg["vae"]["block_out_channels"]) - 1)  # pipeline_llava_gen.py: vae_scale_factor
    if size % scale:
        raise DecoderError(f"image size {size} is not a multiple of {scale}, the VAE's down-sampling factor")
    return cfg["unet"]


def check_width(unet_config: dict, width: int, where="the decoder") -> None:
    """The UNet must read `width`-wide features per token (cross-attention) and mean-pooled: its SDXL
    "text_time" embedding takes the pooled vector and 6 time ids of addition_time_embed_dim each."""
    cross = unet_config.get("cross_attention_dim")
    cross = set(cross) if isinstance(cross, (list, tuple)) else {cross}
    if unet_config.get("addition_embed_type") != "text_time":
        raise DecoderError(f"{where} is not an SDXL-style UNet (addition_embed_type "
                           f"{unet_config.get('addition_embed_type')!r}, expected 'text_time')")
    pooled = unet_config["projection_class_embeddings_input_dim"] - 6 * unet_config["addition_time_embed_dim"]
    if cross != {width} or pooled != width:
        raise DecoderError(f"{where} reads {'/'.join(map(str, sorted(cross)))}-wide conditioning "
                           f"(pooled {pooled}), the DiT makes {width}-wide CLIP features: use the "
                           "diffusion-decoder/ of the same checkpoint")


# ---- loading and decoding -------------------------------------------------------------------------------

@dataclass
class Decoder:
    unet: torch.nn.Module  # diffusers UNet2DConditionModel, SDXL architecture (Emu2-Gen: 2.53 B parameters)
    vae: torch.nn.Module  # diffusers AutoencoderKL: 4 latent channels, 8x down-sampling
    scheduler: object  # diffusers EulerDiscreteScheduler (epsilon prediction, scaled-linear betas)


def load_decoder(checkpoint, device) -> Decoder:
    """DIR/diffusion-decoder/{unet,vae,scheduler} -> Decoder, frozen, bf16 on CUDA and fp32 elsewhere."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel

    root, device = Path(checkpoint) / DECODER_DIR, torch.device(device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32

    # diffusers' fast load needs accelerate; asking for the fallback directly spares its five-line notice.
    fast = importlib.util.find_spec("accelerate") is not None
    if not fast:
        print("note: the decoder loads faster with accelerate installed (pip install accelerate)")

    # BLIP3o's inference.py: variant="bf16" (*.bf16.safetensors); a folder saved without one loads too
    variant = {s: "bf16" if any((root / s).glob("*.bf16.safetensors")) else None for s in ("unet", "vae")}
    try:
        unet = UNet2DConditionModel.from_pretrained(root, subfolder="unet", torch_dtype=dtype,
                                                    variant=variant["unet"], local_files_only=True,
                                                    low_cpu_mem_usage=fast)
        vae = AutoencoderKL.from_pretrained(root, subfolder="vae", torch_dtype=dtype, variant=variant["vae"],
                                            local_files_only=True, low_cpu_mem_usage=fast)
        scheduler = EulerDiscreteScheduler.from_pretrained(root, subfolder="scheduler", local_files_only=True)
    except (OSError, ValueError) as e:  # no weights file, a broken config
        raise DecoderError(f"cannot load {root}: {str(e).splitlines()[0]}") from None
    unet.to(device).requires_grad_(False).eval()
    vae.to(device).requires_grad_(False).eval()
    return Decoder(unet, vae, scheduler)


@torch.no_grad()
def decode(decoder: Decoder, features: torch.Tensor, negative: torch.Tensor, *, steps: int = STEPS,
           guidance: float = GUIDANCE, height: int = SIZE, width: int = SIZE, rng=None) -> torch.Tensor:
    """CLIP features (B, 64, D), the negative prompt's features (1, 64, D) -> images (B, 3, H, W) in [0, 1]:
    the loop of BLIP3o's pipeline_llava_gen.py, __call__, step for step. The initial noise is drawn with
    `rng` in one call for the batch (as diffusers' pipelines do): one image per call is independent."""
    unet, vae, scheduler = decoder.unet, decoder.vae, decoder.scheduler
    device, dtype = unet.device, unet.dtype
    scale = 2 ** (len(vae.config.block_out_channels) - 1)  # __init__: vae_scale_factor (8 for SDXL's VAE)
    if height % scale or width % scale:
        raise DecoderError(f"image size {height}x{width} is not a multiple of the VAE's factor {scale}")
    B = features.shape[0]
    guided = guidance > 1.0  # __call__: do_classifier_free_guidance = guidance_scale > 1.0
    # _prepare_and_encode_inputs: torch.cat([prompt, negative]): conditional first
    cond = torch.cat([features, negative.expand(B, -1, -1)]) if guided else features  # (2B, 64, D)
    cond = cond.to(device, dtype)  # __call__: prompt_embeds.to(dtype).to(device)
    added = {
        # __call__: unet_added_conditions["text_embeds"] = torch.mean(prompt_embeds, dim=1): the pooled input
        "text_embeds": cond.mean(1),  # (2B, D)
        # __call__: time_ids = original_size + crop_info + [height, width], original_size fixed at 1024
        "time_ids": torch.tensor([SIZE, SIZE, 0, 0, height, width], device=device).expand(cond.shape[0], 6),
    }
    # diffusers' Euler scheduler calls np.array on a tensor; NumPy 2's warning about it is harmless: silenced.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "__array__ implementation", DeprecationWarning)
        scheduler.set_timesteps(steps, device=device)  # __call__: 2. Prepare timesteps
    # __call__: 3. latents = randn(B, in_channels, H / 8, W / 8) * scheduler.init_noise_sigma
    latents = torch.randn((B, unet.config.in_channels, height // scale, width // scale), generator=rng,
                          device=device, dtype=dtype) * scheduler.init_noise_sigma  # (B, 4, H/8, W/8)
    for t in scheduler.timesteps:  # __call__: 4. Denoising loop
        x = torch.cat([latents] * 2) if guided else latents  # (2B, 4, H/8, W/8)
        x = scheduler.scale_model_input(x, t)  # Euler: x / sqrt(sigma^2 + 1)
        eps = unet(x, t, encoder_hidden_states=cond, added_cond_kwargs=added).sample  # predicted noise
        if guided:
            eps_cond, eps_uncond = eps.chunk(2)
            eps = eps_uncond + guidance * (eps_cond - eps_uncond)
        latents = scheduler.step(eps, t, latents).prev_sample
    # decode_latents: 1 / scaling_factor * latents -> VAE -> (image / 2 + 0.5).clamp(0, 1)
    images = vae.decode(1 / vae.config.scaling_factor * latents).sample  # (B, 3, H, W) in about [-1, 1]
    return (images / 2 + 0.5).clamp(0, 1).float()
