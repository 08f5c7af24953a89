"""Our Next-DiT against the released model's definition.

The released BLIP3-o DiT is diffusers' LuminaNextDiT2DModel with a condition MLP (caption_projection) in
front, fed timestep = 1000 * (1 - t) and predicting noise - data (diffusers' Lumina). So a randomly
initialized diffusers model, converted into ours, must give the same velocity up to the sign, and the
same gradients; a checkpoint laid out like the release must load with nothing unaccounted for; and the
full 8B key list must map one-to-one onto NextDiT(DiTConfig()).
"""
import copy
import json

import pytest
import torch
from safetensors.torch import save_file

import blip3o
import pipeline

diffusers = pytest.importorskip("diffusers")
from diffusers.models.embeddings import get_2d_rotary_pos_embed_lumina  # noqa: E402

# (hidden, heads, kv_heads, layers, in_channels, cond_dim): one with GQA, one with a single KV head.
TINY = [(64, 4, 4, 2, 16, 24), (48, 4, 2, 2, 8, 40), (32, 2, 1, 3, 12, 32)]


def make_pair(hidden, heads, kv_heads, layers, in_channels, cond_dim, seed=0):
    """A random diffusers model, our model holding its weights, and a frozen copy of our condition MLP
    for the oracle (stock diffusers has none). Gates and norm weights are randomized so that every
    path (cross-attention included) contributes."""
    torch.manual_seed(seed)
    ref = diffusers.LuminaNextDiT2DModel(
        sample_size=8, patch_size=1, in_channels=in_channels, hidden_size=hidden, num_layers=layers,
        num_attention_heads=heads, num_kv_heads=kv_heads, cross_attention_dim=hidden, learn_sigma=False,
    )
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if name.endswith("gate"):
                p.normal_(0.0, 1.0)
            elif "norm" in name and "linear" not in name:
                p.add_(0.2 * torch.randn_like(p))
    state = {k: v for k, v in ref.state_dict().items() if k != "pad_token"}  # pad_token: unused by Lumina
    cond_proj = {
        "caption_projection.linear_1.weight": torch.randn(hidden, cond_dim) / cond_dim**0.5,
        "caption_projection.linear_1.bias": 0.1 * torch.randn(hidden),
        "caption_projection.linear_2.weight": torch.randn(hidden, hidden) / hidden**0.5,
        "caption_projection.linear_2.bias": 0.1 * torch.randn(hidden),
    }
    state.update(cond_proj)
    cfg = pipeline.dit_config_from_state(state)
    ours = blip3o.NextDiT(cfg)
    ours.load_state_dict(state)  # strict: names and shapes match one-to-one
    return ref, ours, copy.deepcopy(ours.caption_projection)


def oracle(ref, proj, x, t, cond):
    """Paper-convention velocity computed by diffusers: (B, N, C) <-> (B, C, 8, 8), time and sign mapped.
    Every condition token is real, as BLIP3-o's 64 query states always are: diffusers' mask is all True."""
    B, N, C = x.shape
    head_dim = ref.config.hidden_size // ref.config.num_attention_heads
    out = ref(
        hidden_states=x.transpose(1, 2).reshape(B, C, 8, 8),
        timestep=1000 * (1 - t),
        encoder_hidden_states=proj(cond),
        encoder_mask=torch.ones(cond.shape[:2], dtype=torch.bool),
        image_rotary_emb=get_2d_rotary_pos_embed_lumina(head_dim, 384, 384),
        cross_attention_kwargs={},
    ).sample  # (B, C, 8, 8)
    return -out.flatten(2).transpose(1, 2)  # (B, N, C)


def inputs(in_channels, cond_dim, B=4, L=7, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, 64, in_channels, generator=g)
    t = torch.tensor([0.0, 0.3, 0.77, 1.0])[:B]  # varied timesteps, both ends included
    cond = torch.randn(B, L, cond_dim, generator=g)
    return x, t, cond


@pytest.mark.parametrize("dims", TINY)
def test_matches_diffusers_forward(dims):
    ref, ours, proj = make_pair(*dims)
    x, t, cond = inputs(dims[4], dims[5])
    with torch.no_grad():
        expected = oracle(ref, proj, x, t, cond)
        got = ours(x, t, cond)
    assert expected.abs().max() > 0.1  # a meaningful comparison, not zeros against zeros
    # diffusers' attention processors and ours (SDPA, other head layouts): fp32 reassociation only.
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dims", TINY[1:])
def test_matches_diffusers_gradients(dims):
    ref, ours, proj = make_pair(*dims)
    x, t, cond = inputs(dims[4], dims[5])
    w = torch.randn(x.shape[0], 64, dims[4])
    grads = []
    for fn, params in [(lambda a, c: oracle(ref, proj, a, t, c), dict(ref.named_parameters())),
                       (lambda a, c: ours(a, t, c), dict(ours.named_parameters()))]:
        a, c = x.clone().requires_grad_(), cond.clone().requires_grad_()
        (fn(a, c) * w).sum().backward()
        grads.append((a.grad, c.grad, {k: p.grad for k, p in params.items() if p.grad is not None}))
    (ga_ref, gc_ref, gp_ref), (ga, gc, gp) = grads
    # Backward through two implementations: each gradient sums over batch and tokens in its own order,
    # parameter gradients over the most terms, hence the looser atol there.
    torch.testing.assert_close(ga, ga_ref, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(gc, gc_ref, atol=1e-5, rtol=1e-4)
    shared = set(gp_ref) & set(gp)
    assert len(shared) == len(gp_ref) and len(shared) >= 20
    for name in shared:
        torch.testing.assert_close(gp[name], gp_ref[name], atol=1e-4, rtol=1e-4, msg=name)


# ---- a synthetic checkpoint laid out like the release --------------------------------------------------


def write_release(folder, ours, *, with_index, extra_dit=None, drop=()):
    """Official key names, two shards, the backbone's keys beside ours; returns the queries."""
    queries = torch.randn(1, 64, 40)
    tensors = {f"model.dit.model.{k}": v.clone() for k, v in ours.state_dict().items() if k not in drop}
    tensors.update(extra_dit or {})
    tensors["model.latent_queries"] = queries
    backbone = {
        "model.embed_tokens.weight": torch.randn(10, 40),
        "model.layers.0.self_attn.q_proj.weight": torch.randn(40, 40),
        "model.layers.1.mlp.up_proj.weight": torch.randn(8, 40),
        "model.norm.weight": torch.ones(40),
        "visual.blocks.0.attn.qkv.weight": torch.randn(6, 2),
        "lm_head.weight": torch.randn(10, 40),
    }
    tensors.update(backbone)
    keys = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": keys[::2], "model-00002-of-00002.safetensors": keys[1::2]}
    for name, ks in shards.items():
        save_file({k: tensors[k].contiguous() for k in ks}, str(folder / name))
    if with_index:
        weight_map = {k: name for name, ks in shards.items() for k in ks}
        (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return queries


@pytest.mark.parametrize("with_index", [True, False])
def test_load_release_layout(tmp_path, with_index):
    ref, ours, proj = make_pair(*TINY[1])
    queries = write_release(tmp_path, ours, with_index=with_index)
    q, dit, report = pipeline.load_official_generation_weights(tmp_path)
    assert report.missing == [] and report.unexpected == [] and report.mismatched == []
    assert report.skipped == {"model.embed_tokens": 1, "model.layers": 2, "model.norm": 1, "visual": 1, "lm_head": 1}
    assert report.loaded == len(ours.state_dict()) + 1 and len(report.files) == 2
    assert dit.cfg == ours.cfg
    assert torch.equal(q, queries[0])  # copied through safetensors
    x, t, cond = inputs(8, 40)
    with torch.no_grad():
        torch.testing.assert_close(dit(x, t, cond), oracle(ref, proj, x, t, cond), atol=1e-5, rtol=1e-5)


def test_load_reports_problems_by_name(tmp_path):
    _, ours, _ = make_pair(*TINY[0])
    extra = {"model.dit.model.pad_token": torch.zeros(64)}  # stock diffusers' unused parameter
    write_release(tmp_path, ours, with_index=False, extra_dit=extra, drop=("layers.1.gate",))
    _, dit, report = pipeline.load_official_generation_weights(tmp_path, dtype=torch.bfloat16)
    assert report.unexpected == ["model.dit.model.pad_token"]
    assert report.missing == ["model.dit.model.layers.1.gate"]
    assert "missing: model.dit.model.layers.1.gate" in str(report)
    assert dit.layers[0].gate.dtype == torch.bfloat16
    assert torch.equal(dit.layers[0].gate.float(), ours.layers[0].gate.bfloat16().float())  # one bf16 cast
    assert torch.all(dit.layers[1].gate == 0)  # left at its init


def test_load_single_file(tmp_path):
    _, ours, _ = make_pair(*TINY[2])
    tensors = {f"model.dit.model.{k}": v for k, v in ours.state_dict().items()}
    save_file(tensors, str(tmp_path / "dit.safetensors"))
    queries, dit, report = pipeline.load_official_generation_weights(tmp_path / "dit.safetensors")
    assert queries is None and report.missing == ["model.latent_queries"] and report.skipped == {}
    assert dit.cfg.num_kv_heads == 1 and all(torch.equal(dit.state_dict()[k], v) for k, v in ours.state_dict().items())


def test_load_rejects_checkpoint_without_dit(tmp_path):
    save_file({"model.embed_tokens.weight": torch.randn(4, 4)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match="model.dit.model"):
        pipeline.load_official_generation_weights(tmp_path)


# ---- the real 8B / 4B key lists (the released checkpoints' index), on the meta device -------------------


def official_shapes(H):
    """Every DiT key of the released checkpoint with its shape, transcribed from its safetensors index."""
    D, T, F = 1792, 1024, 4864
    top = {
        "caption_projection.linear_1.weight": (D, H), "caption_projection.linear_1.bias": (D,),
        "caption_projection.linear_2.weight": (D, D), "caption_projection.linear_2.bias": (D,),
        "patch_embedder.proj.weight": (D, D), "patch_embedder.proj.bias": (D,),
        "time_caption_embed.timestep_embedder.linear_1.weight": (T, 256),
        "time_caption_embed.timestep_embedder.linear_1.bias": (T,),
        "time_caption_embed.timestep_embedder.linear_2.weight": (T, T),
        "time_caption_embed.timestep_embedder.linear_2.bias": (T,),
        "time_caption_embed.caption_embedder.0.weight": (D,), "time_caption_embed.caption_embedder.0.bias": (D,),
        "time_caption_embed.caption_embedder.1.weight": (T, D), "time_caption_embed.caption_embedder.1.bias": (T,),
        "norm_out.linear_1.weight": (D, T), "norm_out.linear_1.bias": (D,),
        "norm_out.linear_2.weight": (D, D), "norm_out.linear_2.bias": (D,),
    }
    layer = {
        "norm1.linear.weight": (4 * D, T), "norm1.linear.bias": (4 * D,), "norm1.norm.weight": (D,),
        "norm1_context.weight": (D,), "gate": (28,), "norm2.weight": (D,),
        "ffn_norm1.weight": (D,), "ffn_norm2.weight": (D,), "attn2.to_out.0.weight": (D, D),
        "feed_forward.linear_1.weight": (F, D), "feed_forward.linear_3.weight": (F, D),
        "feed_forward.linear_2.weight": (D, F),
    }
    for attn in ("attn1", "attn2"):
        layer.update({f"{attn}.to_{p}.weight": (D, D) for p in "qkv"})
        layer.update({f"{attn}.norm_{p}.{w}": (D,) for p in "qk" for w in ("weight", "bias")})
    shapes = {f"model.dit.model.{k}": v for k, v in top.items()}
    shapes.update({f"model.dit.model.layers.{i}.{k}": v for i in range(24) for k, v in layer.items()})
    return shapes


@pytest.mark.parametrize("H", [3584, 2048])
def test_official_key_list_maps_one_to_one(H):
    official = official_shapes(H)
    assert len(official) == 642
    cfg = pipeline.dit_config_from_state({k[len("model.dit.model."):]: v for k, v in official.items()})
    assert cfg == blip3o.DiTConfig(cond_dim=H)
    with torch.device("meta"):
        dit = blip3o.NextDiT(cfg)
    key_map = pipeline.official_key_map(dit)
    assert sorted(key_map.values()) == sorted(official)  # one-to-one, nothing left over either side
    state = dit.state_dict()
    for ours, theirs in key_map.items():
        assert tuple(state[ours].shape) == official[theirs], ours
    n = sum(pipeline.count_params(dit))
    assert 1.30e9 < n < 1.45e9
    if H == 3584:
        assert n == 1_365_010_336  # the parameter count of the release (BLIP3o-Model-8B)
