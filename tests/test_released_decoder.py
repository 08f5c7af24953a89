"""The released checkpoint's own diffusion decoder (released.py) and `sample.py --official-checkpoint`.

No real weights here: tiny random UNet / VAE / scheduler saved in the released folder layout
(DIR/diffusion-decoder/{unet,vae,scheduler}) stand in for Emu2-Gen's. Our decoding loop must give what
diffusers' own StableDiffusionXLPipeline gives for the same components and conditioning; the real
UNet's configuration is built on the meta device to check its size and that 64 x 1792 features fit it.
"""
import sys

import pytest
import torch
from PIL import Image

import conftest
import released
import sample

diffusers = pytest.importorskip("diffusers")

WIDTH = 16  # CLIP feature width of the tiny DiT (1792 in the release)
SIDE = 32  # image side: the tiny VAE halves it once, so the UNet sees 16 x 16 latents

# Emu2-Gen's scheduler, as released (baaivision/Emu, Emu2/emu/conf/diffusion_config/scheduler/
# scheduler_config.json): SDXL's Euler schedule, "leading" spacing.
EULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
             prediction_type="epsilon", steps_offset=1, timestep_spacing="leading", interpolation_type="linear",
             use_karras_sigmas=False)


def tiny_unet(width=WIDTH):
    """Emu2-Gen's UNet shape in miniature: a plain first block, cross-attention below, SDXL's text_time."""
    return diffusers.UNet2DConditionModel(
        sample_size=SIDE // 2, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), norm_num_groups=8, cross_attention_dim=width, use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=8, projection_class_embeddings_input_dim=width + 6 * 8,
    )


def write_decoder(checkpoint, width=WIDTH, seed=0):
    """checkpoint/diffusion-decoder/{unet,vae,scheduler}: the UNet as the release names it (variant bf16,
    *.bf16.safetensors), the VAE without a variant, so both loading paths run."""
    torch.manual_seed(seed)
    root = checkpoint / released.DECODER_DIR
    unet = tiny_unet(width)
    with torch.no_grad():  # diffusers zero-initializes some output layers: open every path
        for p in unet.parameters():
            p.add_(0.02 * torch.randn_like(p))
    unet.save_pretrained(root / "unet", variant="bf16")
    diffusers.AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16),
                            down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                            layers_per_block=1, norm_num_groups=4, sample_size=SIDE,
                            scaling_factor=0.13025).save_pretrained(root / "vae")
    diffusers.EulerDiscreteScheduler(**EULER).save_pretrained(root / "scheduler")
    return root


def features(n, seed):
    return torch.randn(n, 64, WIDTH, generator=torch.Generator().manual_seed(seed))


# ---- the oracle: diffusers' StableDiffusionXLPipeline on the same components --------------------------


def sdxl(decoder, feats, negative, steps, guidance, seed):
    """What diffusers' SDXL pipeline makes of our conditioning: the features as prompt_embeds, their mean as
    the pooled embedding, the negative prompt's features as the negative embeddings, the released time ids
    (original size 1024, no crop, target = the image size)."""
    pipe = diffusers.StableDiffusionXLPipeline(vae=decoder.vae, text_encoder=None, text_encoder_2=None,
                                               tokenizer=None, tokenizer_2=None, unet=decoder.unet,
                                               scheduler=decoder.scheduler, add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    neg = negative.expand(feats.shape[0], -1, -1)
    return pipe(prompt_embeds=feats, pooled_prompt_embeds=feats.mean(1), negative_prompt_embeds=neg,
                negative_pooled_prompt_embeds=neg.mean(1), num_inference_steps=steps, guidance_scale=guidance,
                height=SIDE, width=SIDE, original_size=(1024, 1024), target_size=(SIDE, SIDE),
                generator=torch.Generator().manual_seed(seed), output_type="pt").images  # (B, 3, H, W)


@pytest.mark.parametrize("guidance", [3.0, 1.0])
@pytest.mark.filterwarnings("ignore:__array__ implementation")  # NumPy 2 on diffusers' scheduler (released.decode)
def test_decode_matches_sdxl_pipeline(tmp_path, one_thread, guidance):
    write_decoder(tmp_path)
    decoder = released.load_decoder(tmp_path, "cpu")
    assert decoder.unet.dtype == torch.float32  # fp32 on CPU (bf16 is for CUDA)
    feats, negative = features(2, 1), features(1, 2)
    ours = released.decode(decoder, feats, negative, steps=released.STEPS, guidance=guidance, height=SIDE,
                           width=SIDE, rng=torch.Generator().manual_seed(0))
    expected = sdxl(decoder, feats, negative, released.STEPS, guidance, seed=0)
    assert ours.shape == (2, 3, SIDE, SIDE)
    assert expected.std() > 0.01  # a picture, not a constant: the comparison means something
    # Both run the same fp32 kernels on the same inputs; what differs is the order of the CFG batch
    # ([cond, uncond] as the released pipeline concatenates, [uncond, cond] in SDXL's) and 1/s * x (released
    # decode_latents) against x / s (SDXL): each a rounding of ~1e-7 relative, carried through 50 steps and
    # the VAE. Observed differences are at that level (<1e-6); 1e-5 on [0, 1] pixels is still 400x below
    # one 8-bit grey level (1/255), so the PNGs are identical.
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=0)


def test_conditioning_and_noise_reach_the_image(tmp_path, one_thread):
    write_decoder(tmp_path)
    decoder = released.load_decoder(tmp_path, "cpu")
    feats, negative = features(1, 1), features(1, 2)

    def run(f, seed=0, guidance=3.0):
        return released.decode(decoder, f, negative, steps=4, guidance=guidance, height=SIDE, width=SIDE,
                               rng=torch.Generator().manual_seed(seed))

    base = run(feats)
    torch.testing.assert_close(run(feats), base, atol=0, rtol=0)  # deterministic for a seed
    assert (run(features(1, 3)) - base).abs().max() > 1e-3  # other features, another picture
    assert (run(feats, seed=1) - base).abs().max() > 1e-3  # other noise, another picture
    assert (run(feats, guidance=1.0) - base).abs().max() > 1e-3  # the negative features take part


def test_decode_refuses_a_size_the_vae_cannot_make(tmp_path):
    write_decoder(tmp_path)
    decoder = released.load_decoder(tmp_path, "cpu")
    with pytest.raises(released.DecoderError, match="multiple"):
        released.decode(decoder, features(1, 1), features(1, 2), steps=1, height=33, width=33)


# ---- the real decoder's configuration, built on the meta device ----------------------------------------

# Emu2-Gen's UNet, the decoder BLIP3-o ships: the values of baaivision/Emu, Emu2/emu/conf/diffusion_config/
# unet/config.json (diffusers 0.21.2). The BLIP3o checkpoints' own diffusion-decoder/unet/config.json was not
# available here; BLIP3-o reuses Emu2-Gen's decoder, so these are taken to be its values. Against SDXL's UNet
# they change two numbers: cross_attention_dim 2048 -> 1792 (EVA-CLIP features instead of two text encoders)
# and projection_class_embeddings_input_dim 2816 -> 3328 (pooled 1792 instead of 1280, + 6 x 256 time ids).
EMU2_GEN_UNET = {
    "act_fn": "silu", "addition_embed_type": "text_time", "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": 256, "attention_head_dim": [5, 10, 20], "attention_type": "default",
    "block_out_channels": [320, 640, 1280], "center_input_sample": False, "class_embed_type": None,
    "class_embeddings_concat": False, "conv_in_kernel": 3, "conv_out_kernel": 3, "cross_attention_dim": 1792,
    "cross_attention_norm": None, "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "downsample_padding": 1, "dropout": 0.0, "dual_cross_attention": False, "encoder_hid_dim": None,
    "encoder_hid_dim_type": None, "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4, "layers_per_block": 2,
    "mid_block_only_cross_attention": None, "mid_block_scale_factor": 1, "mid_block_type": "UNetMidBlock2DCrossAttn",
    "norm_eps": 1e-05, "norm_num_groups": 32, "num_attention_heads": None, "num_class_embeds": None,
    "only_cross_attention": False, "out_channels": 4, "projection_class_embeddings_input_dim": 3328,
    "resnet_out_scale_factor": 1.0, "resnet_skip_time_act": False, "resnet_time_scale_shift": "default",
    "sample_size": 128, "time_cond_proj_dim": None, "time_embedding_act_fn": None, "time_embedding_dim": None,
    "time_embedding_type": "positional", "timestep_post_act": None, "transformer_layers_per_block": [1, 2, 10],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"], "upcast_attention": None,
    "use_linear_projection": True,
}
# Its VAE: SDXL's (baaivision/Emu, Emu2/emu/conf/diffusion_config/vae/config.json).
EMU2_GEN_VAE = {
    "act_fn": "silu", "block_out_channels": [128, 256, 512, 512], "down_block_types": ["DownEncoderBlock2D"] * 4,
    "force_upcast": True, "in_channels": 3, "latent_channels": 4, "layers_per_block": 2, "norm_num_groups": 32,
    "out_channels": 3, "sample_size": 1024, "scaling_factor": 0.13025, "up_block_types": ["UpDecoderBlock2D"] * 4,
}
SDXL_UNET_PARAMS = 2_567_463_684  # SDXL base 1.0's UNet, the published count
# 70 transformer blocks (10 at width 640: 2x1 down + 3x2 up; 60 at 1280: 2x10 down, 10 mid, 3x10 up) each
# lose 256 input columns in attn2.to_k and attn2.to_v; add_embedding.linear_1 gains 512 x 1280 weights.
EMU2_GEN_UNET_PARAMS = SDXL_UNET_PARAMS - 2 * 256 * (10 * 640 + 60 * 1280) + 512 * 1280  # 2_525_520_644


def count(module):
    return sum(p.numel() for p in module.parameters())


def test_real_unet_config_on_meta():
    with torch.device("meta"):
        unet = diffusers.UNet2DConditionModel(**EMU2_GEN_UNET)
        sdxl_unet = diffusers.UNet2DConditionModel(**{**EMU2_GEN_UNET, "cross_attention_dim": 2048,
                                                      "projection_class_embeddings_input_dim": 2816})
        vae = diffusers.AutoencoderKL(**EMU2_GEN_VAE)
    assert count(sdxl_unet) == SDXL_UNET_PARAMS  # the derivation's starting point holds in this diffusers
    assert count(unet) == EMU2_GEN_UNET_PARAMS == 2_525_520_644
    released.check_width(EMU2_GEN_UNET, 1792)  # the DiT's output width (8B and 4B alike): accepted
    assert unet.add_embedding.linear_1.in_features == 1792 + 6 * 256
    # 64 x 1792 features (and the 1792 mean) through the whole UNet at 1024 x 1024: shapes only, no compute.
    scale = 2 ** (len(vae.config.block_out_channels) - 1)
    assert scale == 8 and released.SIZE // scale == EMU2_GEN_UNET["sample_size"]
    cond = torch.empty(2, 64, 1792, device="meta")  # (2B, 64, D): conditional and negative
    x = torch.empty(2, 4, 128, 128, device="meta")
    added = {"text_embeds": cond.mean(1), "time_ids": torch.empty(2, 6, device="meta")}
    out = unet(x, torch.tensor([999.0, 999.0], device="meta"), encoder_hidden_states=cond,
               added_cond_kwargs=added).sample
    assert out.shape == (2, 4, 128, 128)
    with pytest.raises(released.DecoderError, match="2048-wide"):  # a decoder meant for other features
        released.check_width({**EMU2_GEN_UNET, "cross_attention_dim": 2048}, 1792)


# ---- sample.py --official-checkpoint, end to end on a tiny release ---------------------------------------


def make_release(tmp_path, width=WIDTH, decoder_width=WIDTH):
    """conftest.make_release's tiny release (queries + DiT under the official names, a tiny Qwen2 backbone
    with the toy tokenizer) and, unless decoder_width is None, a tiny diffusion-decoder/ in it."""
    ckpt, backbone = conftest.make_release(tmp_path, width)
    if decoder_width is not None:
        write_decoder(ckpt, decoder_width)
    return ckpt, backbone


def cli(ckpt, backbone, *extra):
    return sample.main(["--official-checkpoint", str(ckpt), "--backbone", str(backbone), "--prompt",
                        "a photo of a red circle", "--prompt", "a photo of two squares", "--num-samples", "2",
                        "--steps", "2", "--decoder-steps", "3", "--resolution", str(SIDE), "--threads", "1",
                        *map(str, extra)])


def last_error(capsys):
    err = capsys.readouterr().err.rstrip("\n").split("\n")[-1]
    assert err.startswith("error: ")
    return err


def test_decoder_defaults_follow_the_path():
    """--decoder-steps / --decoder-guidance belong to the released decoder: its 50 / 3.0 unless given."""
    release = ["--official-checkpoint", "ckpt", "--backbone", "lm", "--prompt", "a photo of a red circle"]

    def defaults(*argv):
        args = sample.parse_args([*argv])
        return args.decoder_steps, args.decoder_guidance

    assert defaults(*release) == (released.STEPS, released.GUIDANCE) == (50, 3.0)
    assert defaults(*release, "--decoder-steps", "7", "--decoder-guidance", "2") == (7, 2.0)


def test_cli_writes_images(tmp_path, capsys):
    from safetensors.torch import load_file

    ckpt, backbone = make_release(tmp_path)
    out = tmp_path / "images"
    assert cli(ckpt, backbone, "--out", out) == 0
    assert "released decoder (3 steps, guidance 3.0" in capsys.readouterr().out  # the released guidance
    names = sorted(p.name for p in out.iterdir())
    assert names == ["features.safetensors", "grid.png", "p000_s00.png", "p000_s01.png", "p001_s00.png",
                     "p001_s01.png"]
    pics = {n: Image.open(out / n).convert("RGB") for n in names if n.startswith("p")}
    assert all(im.size == (SIDE, SIDE) for im in pics.values())
    assert pics["p000_s00.png"].tobytes() != pics["p000_s01.png"].tobytes()  # seed + j per sample
    assert pics["p000_s00.png"].tobytes() != pics["p001_s00.png"].tobytes()  # the prompt reaches the pixels
    assert load_file(out / "features.safetensors")["features"].shape == (2, 2, 64, WIDTH)
    before = {n: im.tobytes() for n, im in pics.items()}
    assert cli(ckpt, backbone, "--out", out) == 0  # deterministic
    assert {n: Image.open(out / n).convert("RGB").tobytes() for n in before} == before


def test_cli_features_only_needs_no_decoder(tmp_path):
    from safetensors.torch import load_file

    ckpt, backbone = make_release(tmp_path, decoder_width=None)
    assert cli(ckpt, backbone, "--features-only", "--out", tmp_path / "f") == 0
    assert load_file(tmp_path / "f")["features"].shape == (2, 2, 64, WIDTH)
    assert cli(ckpt, backbone, "--out", tmp_path / "g.safetensors") == 0  # the suffix says features only
    torch.testing.assert_close(load_file(tmp_path / "g.safetensors")["features"],
                               load_file(tmp_path / "f")["features"], atol=0, rtol=0)


def test_cli_without_decoder_folder(tmp_path, capsys):
    ckpt, backbone = make_release(tmp_path, decoder_width=None)
    assert cli(ckpt, backbone, "--out", tmp_path / "images") == 2
    err = last_error(capsys)
    assert "no diffusion-decoder/" in err and "--features-only" in err


def test_cli_decoder_width_mismatch(tmp_path, capsys):
    ckpt, backbone = make_release(tmp_path, decoder_width=WIDTH + 8)
    assert cli(ckpt, backbone, "--out", tmp_path / "images") == 2
    err = last_error(capsys)
    assert f"reads {WIDTH + 8}-wide conditioning" in err and f"makes {WIDTH}-wide" in err
    assert not (tmp_path / "images").exists()  # refused before anything was generated


def test_cli_size_the_vae_cannot_make(tmp_path, capsys):
    ckpt, backbone = make_release(tmp_path)
    assert cli(ckpt, backbone, "--out", tmp_path / "images", "--resolution", SIDE + 1) == 2
    assert "not a multiple of 2, the VAE's" in last_error(capsys)  # the tiny VAE halves the side once


def test_cli_missing_backbone(tmp_path, capsys):
    ckpt, _ = make_release(tmp_path)
    assert cli(ckpt, tmp_path / "no-such-backbone", "--out", tmp_path / "images") == 2
    assert "cannot load the backbone" in last_error(capsys)


def test_cli_without_diffusers(tmp_path, capsys, monkeypatch):
    ckpt, backbone = make_release(tmp_path)
    monkeypatch.setitem(sys.modules, "diffusers", None)  # `import diffusers` now raises ImportError
    assert cli(ckpt, backbone, "--out", tmp_path / "images") == 2
    assert last_error(capsys) == f"error: {released.INSTALL_HINT}"
