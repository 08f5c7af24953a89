"""The real presets (blip3o-4b, blip3o-8b) at true size, on PyTorch's `meta` device.

No weights can be downloaded here, so every real module is built from its published config numbers on
`meta`: shapes and parameter counts are exact, no memory is allocated and nothing is computed. The
forward passes below therefore check that shapes and wiring fit (query width = backbone width, 64 CLIP
tokens of 1792, ...). A tiny Qwen2.5-VL built on the CPU checks the numbers of the same code path.
Run with `-s` to see the parameter table.
"""
import dataclasses

import pytest
import torch

import blip3o
import pipeline

BACKBONE_WIDTH = {"blip3o-4b": 2048, "blip3o-8b": 3584}  # Qwen2.5-VL-3B / -7B hidden sizes


def millions(module) -> str:
    return f"{sum(p.numel() for p in module.parameters()) / 1e6:10.1f} M"


@pytest.fixture(scope="module", params=sorted(BACKBONE_WIDTH))
def real(request):
    """(preset name, config, backbone on meta, generator on meta) for one real preset."""
    cfg = blip3o.get_config(request.param)
    lm = blip3o.build_backbone(cfg.lm, device="meta")
    with torch.device("meta"):
        gen = blip3o.Generator(cfg)
    return request.param, cfg, lm, gen


def test_clip_tower_gives_64_tokens_of_1792_at_448px():
    """EVA02-E-14-plus forced to 448 px: a 32x32 patch grid of width 1792, pooled 4x4 to 8x8 = 64 tokens."""
    cfg = blip3o.get_config("blip3o-8b")
    assert blip3o.get_config("blip3o-4b").clip == cfg.clip  # both models read the same CLIP
    enc = blip3o.ImageEncoder(cfg.clip, device="meta")
    assert all(p.is_meta for p in enc.parameters())
    images = torch.empty(2, 3, 448, 448, device="meta")
    assert enc.tokens(images).shape == (2, 64, 1792)
    print(f"\nEVA02-E-14-plus (vision + text towers) {millions(enc)}   vision {millions(enc.model.visual)}")


def test_backbone_width_and_generation_condition(real):
    """Queries are as wide as the backbone, and the condition is the backbone's last (post-norm) state at
    the 64 query positions: (B, 64, H) with H = 2048 (3B) or 3584 (7B)."""
    name, cfg, lm, gen = real
    width = BACKBONE_WIDTH[name]
    assert type(lm).__name__ == "Qwen2_5_VLForConditionalGeneration"
    assert lm.get_decoder().config.hidden_size == width == cfg.lm.hidden_size
    assert gen.queries.shape == (64, width)
    assert gen.dit.caption_projection.linear_1.in_features == width  # cond width 2048 / 3584
    prompt = torch.zeros(3, 12, dtype=torch.long, device="meta")
    lengths = torch.tensor([5, 12, 9], device="meta")
    cond = gen.condition(lm, prompt, lengths)
    assert cond.shape == (3, 64, width)
    x = torch.empty(3, 64, 1792, device="meta")
    assert gen.dit(x, torch.empty(3, device="meta"), cond).shape == (3, 64, 1792)  # velocity of 64 tokens


def test_dit_size_matches_the_release(real):
    """The official Next-DiT: width 1792, 24 layers, 28 heads, FFN 4864, about 1.4 B parameters."""
    name, cfg, lm, gen = real
    dit = gen.dit.cfg
    assert (dit.hidden_size, dit.num_layers, dit.num_heads, dit.ffn_dim, dit.in_channels) == (1792, 24, 28, 4864, 1792)
    assert 1.30e9 <= sum(pipeline.count_params(gen.dit)) <= 1.45e9
    print(f"\n{name}: backbone {millions(lm)} (language model {millions(lm.get_decoder())}, "
          f"its vision tower {millions(lm.model.visual)})\n{name}: Next-DiT {millions(gen.dit)}   "
          f"queries {gen.queries.numel() / 1e6:.2f} M")


def test_understanding_path_projects_clip_into_the_backbone(real):
    """Stage 1 wiring: 64 projected CLIP tokens (1792 -> H) fill the image placeholders, logits come out."""
    name, cfg, lm, gen = real
    image_id = 151655  # Qwen2.5-VL's <|image_pad|>
    with torch.device("meta"):
        vlm = blip3o.VisionLanguageModel(lm, cfg.clip.width, image_id)
    assert (vlm.projector.linear_1.in_features, vlm.projector.linear_2.out_features) == (1792, BACKBONE_WIDTH[name])
    ids = torch.full((2, 70), image_id, device="meta")
    _, logits = vlm(ids, torch.empty(2, 64, 1792, device="meta", dtype=torch.bfloat16))
    assert logits.shape == (2, 70, cfg.lm.vocab_size)
    print(f"\n{name}: projector {millions(vlm.projector)}")


# ----------------------------------------------------------------------------------------------------
# A tiny Qwen2.5-VL with real numbers: the generation path through `inputs_embeds` is the right one
# ----------------------------------------------------------------------------------------------------

TINY_QWEN25_VL = dict(model_type="qwen2_5_vl", hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, intermediate_size=128, vocab_size=100, max_position_embeddings=256,
                      bos_token_id=1, eos_token_id=2, pad_token_id=0,
                      rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]},  # sums to head_dim / 2
                      vision_config=dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2,
                                         out_hidden_size=64, fullatt_block_indexes=[0]))


@pytest.fixture(scope="module")
def tiny_vl():
    from transformers import AutoConfig

    torch.manual_seed(0)
    hf_cfg = AutoConfig.for_model(**TINY_QWEN25_VL)
    lm = blip3o._auto_class(hf_cfg).from_config(hf_cfg, dtype=torch.float32).eval().requires_grad_(False)
    cfg = blip3o.get_config("toy")
    cfg.lm = blip3o.LMConfig(name="tiny-qwen2.5-vl", hidden_size=64)
    cfg.dit = dataclasses.replace(cfg.dit, num_layers=1)
    return lm, blip3o.Generator(cfg, target_dim=16)


def test_qwen25_vl_condition_equals_the_full_model(tiny_vl):
    """Right-padded batch through the language model alone == each prompt + queries, unpadded, through
    the whole multimodal model (its mrope positions for text): same post-norm states, to float precision."""
    lm, gen = tiny_vl
    prompt = torch.randint(5, 100, (2, 7))
    lengths = torch.tensor([4, 7])
    cond = gen.condition(lm, prompt, lengths)  # (2, 64, 64)
    for b in range(2):
        embeds = lm.get_input_embeddings()(prompt[b:b + 1, :lengths[b]])
        seq = torch.cat([embeds, gen.queries[None]], 1)  # (1, T_b + 64, D)
        with torch.no_grad():
            hidden = lm(inputs_embeds=seq, output_hidden_states=True).hidden_states[-1]
        # Padded batch vs one unpadded row through SDPA: other shapes, other kernels (fp32 reassociation).
        torch.testing.assert_close(cond[b], hidden[0, lengths[b]:], rtol=1e-5, atol=1e-5)
    cond.square().sum().backward()
    assert gen.queries.grad is not None and gen.queries.grad.abs().sum() > 0  # through the frozen LM
    assert all(p.grad is None for p in lm.parameters())


def test_positions_are_explicit_not_inferred_from_stale_state(tiny_vl):
    """Qwen2.5-VL caches `rope_deltas` after an image prompt and would shift the positions of a later
    inputs_embeds-only call; the understanding path passes its positions (multimodal_positions for
    Qwen2.5-VL), so its output is unchanged."""
    lm, _ = tiny_vl
    vlm = blip3o.VisionLanguageModel(lm, 16, image_token_id=3)
    ids = torch.tensor([[1] + [3] * 64 + [7, 8, 9]])
    clip_tokens = torch.randn(1, 64, 16)
    with torch.no_grad():
        before = vlm(ids, clip_tokens)[1]
        lm.model.rope_deltas = torch.tensor([[17]])  # as left by an earlier image + text generate()
        try:
            after = vlm(ids, clip_tokens)[1]
        finally:
            lm.model.rope_deltas = None
    assert torch.equal(before, after)  # the same inputs and positions through the same module: repeatable


def test_image_tokens_get_qwen25_vl_own_2d_positions(tiny_vl):
    """Under multimodal RoPE the understanding path gives the image's tokens the (time, row, column)
    positions Qwen2.5-VL computes itself for one still image (get_rope_index), text before and after
    included; a text-only row counts up on all three axes."""
    lm, _ = tiny_vl
    assert blip3o.VisionLanguageModel(lm, 16, image_token_id=3).mrope
    assert not blip3o.VisionLanguageModel(blip3o.build_backbone(blip3o.LMConfig(vocab_size=9)), 16, 3).mrope
    image_id = 3
    ids = torch.tensor([[1] + [3] * 16 + [7, 8, 9, 0, 0], [1, 5, 6] + [3] * 16 + [7, 8, 0]])
    ref, _ = lm.model.get_rope_index(ids, (ids == image_id).int(), image_grid_thw=torch.tensor([[1, 8, 8]] * 2))
    pos = blip3o.multimodal_positions(ids, image_id)
    assert torch.equal(pos, ref)
    assert pos[:, 0, 1:17].tolist() == [[1] * 16, [1 + r for r in range(4) for _ in range(4)],
                                         [1 + c for _ in range(4) for c in range(4)]]
    text = torch.tensor([[1, 5, 6, 7]])
    assert torch.equal(blip3o.multimodal_positions(text, image_id), torch.arange(4).expand(3, 1, 4))
    with pytest.raises(ValueError, match="square grid"):
        blip3o.multimodal_positions(torch.tensor([[1] + [3] * 15 + [7]]), image_id)


def test_presets_round_trip_and_unknown_names():
    for name in blip3o.PRESETS:
        cfg = blip3o.get_config(name)
        assert blip3o.Config.from_dict(cfg.to_dict()) == cfg  # what a checkpoint stores rebuilds it
    with pytest.raises(ValueError, match="blip3o-8b"):
        blip3o.get_config("blip3o-80b")
