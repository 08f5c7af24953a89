"""Next-DiT (Lumina-Next) and flow matching: the generation head of BLIP3-o.

This is one section of blip3o.py, in pipeline order: the Next-DiT that turns noise into 64 CLIP tokens
under the condition read from the frozen LM's query states, the flow-matching loss that trains it, the
Euler sampler with classifier-free guidance, and a loader for the released BLIP3-o generation weights.

Two conventions meet here (see /work/shared/OFFICIAL_WEIGHTS.md):
- ours (the paper's): x_t = t * x1 + (1 - t) * x0, t = 0 noise, t = 1 data, velocity v = x1 - x0;
- the released model's (Lumina-Next / diffusers): sigma = 1 - t is the noise level, the network is fed
  timestep = 1000 * sigma and predicts noise - data = -v.
NextDiT.forward speaks ours on the outside and the official one inside, so released weights run unchanged.
"""
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import safe_open

__all__ = [
    "DiTConfig",
    "NextDiT",
    "flow_matching_loss",
    "velocity_cfg",
    "euler_sample",
    "dit_config_from_state",
    "official_key_map",
    "LoadReport",
    "load_official_generation_weights",
]


# ----------------------------------------------------------------------------------------------------
# Next-DiT configuration
# ----------------------------------------------------------------------------------------------------


@dataclass
class DiTConfig:
    """Next-DiT sizes. The defaults are the released BLIP3-o 8B DiT (DESIGN.md section 2).

    `ffn_dim` and `time_embed_dim` left at None are filled in by the official rules, so a saved config
    always holds concrete numbers. The 4B model differs only in `cond_dim=2048` (Qwen2.5-VL-3B width).
    """

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
    # Toy pixel decoder only: the condition is itself a grid of tokens aligned with x (64 CLIP tokens ->
    # 64 pixel patches), so its projected tokens are also added to the patch embeddings. Cross-attention
    # alone must first *learn* which condition token belongs to which position (its keys carry no RoPE);
    # adding them in place hands over that alignment for free, and a small decoder trains in minutes.
    spatial_cond: bool = False

    def __post_init__(self):
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not a multiple of num_heads {self.num_heads}")
        if (self.hidden_size // self.num_heads) % 4:
            raise ValueError("2-D RoPE splits each head in (row, column) x (cos, sin): head dim must be a multiple of 4")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}")
        if self.ffn_dim is None:
            # Lumina-Next's FeedForward: int(2/3 * 4 * dim), rounded up to a multiple of 256.
            self.ffn_dim = 256 * math.ceil(int(2 * 4 * self.hidden_size / 3) / 256)
        if self.time_embed_dim is None:
            self.time_embed_dim = min(self.hidden_size, 1024)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def num_tokens(self) -> int:
        return self.grid_size**2


# ----------------------------------------------------------------------------------------------------
# Building blocks. Module and parameter names follow the released checkpoint (keys under
# `model.dit.model.`), which are diffusers' LuminaNextDiT2DModel names plus BLIP3-o's caption_projection,
# so loading released weights is a straight copy (official_key_map is the identity up to that prefix).
# ----------------------------------------------------------------------------------------------------


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
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timestep.device) / half)
    args = timestep.float()[:, None] * freqs[None]  # (B, half)
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (B, dim)


def rope_2d(grid_size: int, head_dim: int, theta: float, device=None) -> torch.Tensor:
    """2-D RoPE rotations for a row-major grid: complex unit numbers, (grid_size**2, head_dim // 2).

    The layout is diffusers' get_2d_rotary_pos_embed_lumina: the head dim is read as head_dim/2
    complex pairs; pair 2k rotates with the row index at frequency k, pair 2k+1 with the column index at
    frequency k (row and column interleaved), frequencies theta^(-4k/head_dim), k < head_dim/4. The
    official table is built for a 384 x 384 grid and sliced to 8 x 8, which equals building it for 8 x 8.
    It is cheap, so it is recomputed per call rather than stored in checkpoints.
    """
    axis_dim = head_dim // 2  # dims per axis
    freqs = 1.0 / (theta ** (torch.arange(0, axis_dim, 2, dtype=torch.float32, device=device) / axis_dim))
    pos = torch.arange(grid_size, dtype=torch.float32, device=device)
    angle = torch.outer(pos, freqs)  # (G, head_dim/4)
    rows = angle[:, None, :].expand(grid_size, grid_size, -1)  # (G, G, head_dim/4): varies with the row
    cols = angle[None, :, :].expand(grid_size, grid_size, -1)  # (G, G, head_dim/4): varies with the column
    angle = torch.stack([rows, cols], dim=-1).reshape(grid_size * grid_size, head_dim // 2)  # (N, head_dim/2)
    return torch.polar(torch.ones_like(angle), angle)  # e^(i angle), complex64


def apply_rope(x: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
    """Rotate consecutive pairs (x[2i], x[2i+1]) of x (B, N, H, head_dim) by the complex `rope` (N, head_dim/2).

    Lumina's complex product (a + ib) * e^(i angle), in fp32 as diffusers does. One complex multiply is
    also the fastest form on CPU: the real version (a cos - b sin, a sin + b cos) reads x with stride 2
    and measured 7x slower forward + backward.
    """
    pairs = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))  # (B, N, H, head_dim/2)
    return torch.view_as_real(pairs * rope[:, None]).flatten(-2).type_as(x)  # (B, N, H, head_dim)


class Attention(nn.Module):
    """q/k/v projections (no bias) and Lumina's qk-norm: LayerNorm over all heads at once, before RoPE.

    Only the cross-attention owns an output projection (`to_out.0`): a Next-DiT block mixes the heads of
    self- and cross-attention first and projects the sum once (see NextDiTBlock).
    """

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

    def forward(self, x, context, rope, rope_keys: bool, mask=None) -> torch.Tensor:
        """x (B, N, dim) attends to context (B, L, context_dim); returns the heads (B, H, N, head_dim).

        RoPE always rotates the queries; the keys only when they live on the same grid (self-attention).
        mask: None or bool (B, 1, 1, L), True = attend.
        """
        q = self.norm_q(self.to_q(x)).unflatten(-1, (self.num_heads, self.head_dim))  # (B, N, H, hd)
        k = self.norm_k(self.to_k(context)).unflatten(-1, (self.num_kv_heads, self.head_dim))  # (B, L, Hkv, hd)
        v = self.to_v(context).unflatten(-1, (self.num_kv_heads, self.head_dim))  # (B, L, Hkv, hd)
        q = apply_rope(q, rope)
        if rope_keys:
            k = apply_rope(k, rope)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # heads first for SDPA
        # Default scale 1/sqrt(head_dim) in both attentions, as the official model.
        gqa = self.num_kv_heads != self.num_heads
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)  # (B, H, N, hd)


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

    def forward(self, x, cond, cond_mask, temb, rope):
        """x (B, N, D), cond (B, L, D) projected condition, cond_mask None or (B, 1, 1, L), temb (B, T)."""
        h, gate_msa, scale_mlp, gate_mlp = self.norm1(x, temb)  # h (B, N, D)
        self_attn = self.attn1(h, h, rope, rope_keys=True)  # (B, H, N, hd)
        cross_attn = self.attn2(h, self.norm1_context(cond), rope, rope_keys=False, mask=cond_mask)  # (B, H, N, hd)
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
    """Conditioning vector of the adaLN: timestep MLP + Linear(LayerNorm(masked mean of the condition))."""

    def __init__(self, dim: int, cond_width: int):
        super().__init__()
        self.timestep_embedder = _TimestepMLP(dim)
        self.caption_embedder = nn.Sequential(nn.LayerNorm(cond_width), nn.Linear(cond_width, dim))

    def forward(self, timestep, cond, cond_mask):
        t_emb = self.timestep_embedder(timestep_embedding(timestep).to(cond.dtype))  # (B, T)
        if cond_mask is None:
            pooled = cond.mean(dim=1)  # (B, D)
        else:
            m = cond_mask.to(cond.dtype)[..., None]  # (B, L, 1)
            pooled = (cond * m).sum(dim=1) / m.sum(dim=1)  # (B, D)
        return t_emb + self.caption_embedder(pooled)  # (B, T)


class _FinalLayer(nn.Module):
    """Scale-only output modulation: Linear_2(LayerNorm(x) * (1 + Linear_1(silu(temb)))), eps 1e-6."""

    def __init__(self, dim: int, temb_dim: int, out_dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(temb_dim, dim)
        self.linear_2 = nn.Linear(dim, out_dim)

    def forward(self, x, temb):
        scale = self.linear_1(F.silu(temb))  # (B, D)
        return self.linear_2(F.layer_norm(x, (x.shape[-1],), eps=1e-6) * (1 + scale[:, None]))


# ----------------------------------------------------------------------------------------------------
# Next-DiT
# ----------------------------------------------------------------------------------------------------


class NextDiT(nn.Module):
    """The BLIP3-o diffusion transformer: Lumina-Next's Next-DiT with a condition MLP in front.

    forward(x, t, cond, cond_mask=None) -> v, all in the paper's convention:
      x (B, N, in_channels) noisy tokens, row-major on the grid_size x grid_size grid;
      t (B,) in [0, 1], 0 = noise, 1 = data; cond (B, L, cond_dim); cond_mask None or bool (B, L), True =
      a real token (every row needs at least one); returns the velocity v = x1 - x0, (B, N, in_channels).
    Inside it speaks the released model's convention (OFFICIAL_WEIGHTS.md, diffusers' Lumina pipeline):
    noise level sigma = 1 - t, timestep = 1000 * sigma fed to the sinusoidal embedding, and the network
    predicts noise - data, so its output is negated. Released weights therefore run unchanged.

    Initialization follows Lumina-Next's NextDiT (the authors' code) for training from scratch: xavier-
    uniform linear layers with zero bias, N(0, 0.02) timestep MLP, and zeros for the adaLN modulation
    (so every block starts as the identity, DiT's adaLN-zero), the pooled-condition projection, the
    cross-attention gates, and the whole final layer (the model starts by predicting v = 0). diffusers'
    port and BLIP3-o (which trained with it) leave PyTorch's default init except the zero gates.
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
        """Lumina-Next's initialization (see the class docstring)."""
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear) and not name.startswith("caption_projection"):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        for lin in (self.time_caption_embed.timestep_embedder.linear_1, self.time_caption_embed.timestep_embedder.linear_2):
            nn.init.normal_(lin.weight, std=0.02)
        zero = [self.time_caption_embed.caption_embedder[1], self.norm_out.linear_1, self.norm_out.linear_2]
        zero += [layer.norm1.linear for layer in self.layers]
        for lin in zero:
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)
        for layer in self.layers:
            nn.init.zeros_(layer.gate)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def forward(self, x, t, cond, cond_mask=None):
        B, N, _ = x.shape
        if N != self.cfg.num_tokens:
            raise ValueError(f"expected {self.cfg.num_tokens} tokens ({self.cfg.grid_size}^2 grid), got {N}")
        t = t.expand(B) if t.dim() == 0 else t
        cond = self.caption_projection(cond)  # (B, L, D): every block and the pooled path see this
        h = self.patch_embedder(x)  # (B, N, D)
        if self.cfg.spatial_cond:
            if cond.shape[1] != N:
                raise ValueError(f"spatial_cond needs one condition token per grid token, got {cond.shape[1]} vs {N}")
            h = h + cond
        temb = self.time_caption_embed(1000.0 * (1.0 - t), cond, cond_mask)  # (B, T), official timestep
        rope = rope_2d(self.cfg.grid_size, self.cfg.head_dim, self.cfg.rope_theta, device=x.device)
        mask = None if cond_mask is None else cond_mask.bool()[:, None, None, :]  # (B, 1, 1, L)
        for layer in self.layers:
            h = layer(h, cond, mask, temb, rope)
        return -self.norm_out(h, temb)  # official output is noise - data; ours is data - noise


# ----------------------------------------------------------------------------------------------------
# Flow matching (paper convention): x_t = t x1 + (1 - t) x0, x0 ~ N(0, I), v = x1 - x0, Euler 0 -> 1
# ----------------------------------------------------------------------------------------------------


def flow_matching_loss(model, x1, cond, cond_mask=None, *, cond_drop=0.1, time_sampling="uniform", generator=None):
    """Rectified-flow loss || v_theta(x_t, t, cond) - (x1 - x0) ||^2 on a batch of targets x1 (B, N, C).

    t ~ U(0, 1) ("uniform", the paper) or sigmoid(N(0, 1)) ("logit_normal", SD3's choice, which spends
    more steps at mid noise). With probability cond_drop a sample's condition is replaced by zeros (the
    unconditional branch of classifier-free guidance). `generator` must live on x1's device.
    Returns (mean loss, t (B,), per-sample loss (B,)) so callers can log the loss per t-bin (minRF).
    """
    B, device = x1.shape[0], x1.device
    if time_sampling == "uniform":
        t = torch.rand(B, device=device, generator=generator)
    elif time_sampling == "logit_normal":
        t = torch.sigmoid(torch.randn(B, device=device, generator=generator))
    else:
        raise ValueError(f"time_sampling must be 'uniform' or 'logit_normal', got {time_sampling!r}")
    x0 = torch.randn(x1.shape, device=device, dtype=x1.dtype, generator=generator)
    t_ = t.to(x1.dtype).view(B, *([1] * (x1.dim() - 1)))  # (B, 1, 1) broadcast over tokens and channels
    xt = t_ * x1 + (1 - t_) * x0
    if cond_drop > 0:
        drop = torch.rand(B, device=device, generator=generator) < cond_drop  # (B,)
        cond = cond.masked_fill(drop.view(B, *([1] * (cond.dim() - 1))), 0.0)
    per_sample = (model(xt, t, cond, cond_mask) - (x1 - x0)).float().pow(2).flatten(1).mean(dim=1)  # (B,)
    return per_sample.mean(), t, per_sample


def velocity_cfg(model, x, t, cond, cfg, cond_mask=None):
    """Guided velocity v_u + cfg * (v_c - v_u), both branches in one batched forward.

    The unconditional branch sees an all-zeros condition, as in training's condition dropout; it reuses
    cond_mask, which cannot change anything there (identical zero tokens pool and attend the same way).
    cfg == 1 is plain conditional sampling and skips the unconditional half.
    """
    if cfg == 1:
        return model(x, t, cond, cond_mask)
    mask2 = None if cond_mask is None else torch.cat([cond_mask, cond_mask])
    v = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([cond, torch.zeros_like(cond)]), mask2)  # (2B, N, C)
    v_cond, v_uncond = v.chunk(2)
    return v_uncond + cfg * (v_cond - v_uncond)


@torch.no_grad()
def euler_sample(model, cond, num_tokens, channels, *, steps=30, cfg=3.0, cond_mask=None, generator=None, x0=None):
    """Integrate dx/dt = v(x, t) from t = 0 (noise x0) to t = 1 with `steps` Euler steps; returns x1.

    Defaults are the paper's sampling settings (30 steps, guidance 3.0). x0 (B, num_tokens, channels) may
    be given for reproducible starts; otherwise it is drawn with `generator` (on cond's device, in cond's
    dtype).
    """
    if steps <= 0:
        raise ValueError(f"steps must be positive, got {steps}")
    if cfg < 0:
        raise ValueError(f"cfg must be >= 0, got {cfg}")
    B = cond.shape[0]
    if x0 is None:
        x0 = torch.randn(B, num_tokens, channels, device=cond.device, dtype=cond.dtype, generator=generator)
    x, dt = x0, 1.0 / steps
    for i in range(steps):
        t = torch.full((B,), i * dt, device=x.device, dtype=torch.float32)
        x = x + dt * velocity_cfg(model, x, t, cond, cfg, cond_mask)
    return x


# ----------------------------------------------------------------------------------------------------
# Released BLIP3-o generation weights (BLIP3o/BLIP3o-Model-8B, -4B): see /work/shared/OFFICIAL_WEIGHTS.md
# ----------------------------------------------------------------------------------------------------

OFFICIAL_DIT_PREFIX = "model.dit.model."
OFFICIAL_QUERIES_KEY = "model.latent_queries"


def official_key_map(dit: NextDiT) -> dict[str, str]:
    """{our state_dict name: released checkpoint key}. Our names are the official ones under the prefix."""
    return {name: OFFICIAL_DIT_PREFIX + name for name in dit.state_dict()}


def _shape(v) -> tuple[int, ...]:
    return tuple(v.shape) if hasattr(v, "shape") else tuple(v)


def dit_config_from_state(state, **overrides) -> DiTConfig:
    """Infer a DiTConfig from a DiT state dict or {name: shape} (our names, any common key prefix).

    Widths come from the weight shapes, depth from the layer indices, heads from the per-head `gate`,
    KV heads from `attn1.to_k`, and the FFN width is taken as stored (4864 in the release, whatever
    diffusers would compute). What shapes cannot tell (grid_size, spatial_cond, eps) comes from
    `overrides` or the defaults.
    """
    gate_keys = [k for k in state if k.endswith("layers.0.gate")]
    if not gate_keys:
        raise ValueError("not a Next-DiT state: no 'layers.0.gate' key")
    prefix = gate_keys[0][: -len("layers.0.gate")]
    shape = {k[len(prefix):]: _shape(v) for k, v in state.items() if k.startswith(prefix)}
    hidden, in_channels = shape["patch_embedder.proj.weight"]
    num_heads = shape["layers.0.gate"][0]
    head_dim = hidden // num_heads
    num_layers = 1 + max(int(k.split(".")[1]) for k in shape if k.startswith("layers."))
    cfg = dict(
        in_channels=in_channels,
        hidden_size=hidden,
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=shape["layers.0.attn1.to_k.weight"][0] // head_dim,
        ffn_dim=shape["layers.0.feed_forward.linear_1.weight"][0],
        cond_dim=shape["caption_projection.linear_1.weight"][1],
        time_embed_dim=shape["time_caption_embed.timestep_embedder.linear_1.weight"][0],
    )
    cfg.update(overrides)
    return DiTConfig(**cfg)


@dataclass
class LoadReport:
    """What load_official_generation_weights did. Loading is complete when missing, mismatched and
    unexpected are empty; `skipped` counts the checkpoint's other tensors per top-level prefix."""

    files: list[str]
    config: DiTConfig
    loaded: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    missing: list[str] = field(default_factory=list)  # model tensors the checkpoint lacks (left at init)
    mismatched: list[str] = field(default_factory=list)  # "key: checkpoint shape vs model shape" (left at init)
    unexpected: list[str] = field(default_factory=list)  # DiT keys the model has no place for (ignored)

    def __str__(self):
        lines = [f"loaded {self.loaded} tensors from {len(self.files)} file(s)"]
        lines += [f"skipped {n:>6} tensors under {p}" for p, n in sorted(self.skipped.items())]
        for what in ("missing", "mismatched", "unexpected"):
            for key in getattr(self, what):
                lines.append(f"{what}: {key}")
        return "\n".join(lines)


def _top_prefix(key: str) -> str:
    """'model.layers.3.mlp.up_proj.weight' -> 'model.layers', 'visual.blocks.0...' -> 'visual'."""
    parts = key.split(".")
    return ".".join(parts[:2]) if parts[0] == "model" and len(parts) > 2 else parts[0]


def load_official_generation_weights(path, *, device="cpu", dtype=None):
    """Load the stage-2 weights of a released BLIP3-o checkpoint: the 64 queries and the DiT.

    path: a folder of *.safetensors shards (with or without model.safetensors.index.json) or one file.
    Only `model.latent_queries` and `model.dit.model.*` are read; the backbone and anything else is
    counted in the report, never loaded. The DiT's config is inferred from the shapes, the model is built
    on the meta device and takes the checkpoint tensors in place (no second copy of 1.4 B parameters);
    if some tensors are missing or mis-shaped it is built normally instead and those keep their init.
    Returns (queries (64, H) or None if absent, NextDiT, LoadReport). dtype None keeps the stored dtype.
    """
    path = Path(path)
    if path.is_file():
        files = [path]
    else:
        index = path / "model.safetensors.index.json"
        if index.exists():
            # The index names every shard; reading only the shards that hold our keys skips the rest.
            weight_map = json.loads(index.read_text())["weight_map"]
            names = {f for k, f in weight_map.items() if k.startswith(OFFICIAL_DIT_PREFIX) or k == OFFICIAL_QUERIES_KEY}
            files = sorted(path / f for f in names)
        else:
            files = sorted(path.glob("*.safetensors"))
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
                else:
                    skipped[_top_prefix(key)] = skipped.get(_top_prefix(key), 0) + 1
    if not dit_state:
        raise ValueError(f"no '{OFFICIAL_DIT_PREFIX}*' keys in {[os.fspath(f) for f in files]}: not a BLIP3-o generation checkpoint")
    if dtype is not None:
        dit_state = {k: v.to(dtype) for k, v in dit_state.items()}
        queries = None if queries is None else queries.to(dtype)

    cfg = dit_config_from_state(dit_state)
    report = LoadReport(files=[os.fspath(f) for f in files], config=cfg, skipped=skipped)
    with torch.device("meta"):
        model = NextDiT(cfg)
    expected = model.state_dict()
    report.unexpected = sorted(OFFICIAL_DIT_PREFIX + k for k in dit_state if k not in expected)
    report.missing = sorted(OFFICIAL_DIT_PREFIX + k for k in expected if k not in dit_state)
    report.mismatched = sorted(
        f"{OFFICIAL_DIT_PREFIX}{k}: checkpoint {tuple(v.shape)} vs model {tuple(expected[k].shape)}"
        for k, v in dit_state.items()
        if k in expected and v.shape != expected[k].shape
    )
    usable = {k: v for k, v in dit_state.items() if k in expected and v.shape == expected[k].shape}
    if len(usable) == len(expected):
        model.load_state_dict(usable, assign=True)  # the meta parameters become the loaded tensors
    else:
        model = NextDiT(cfg).to(device=device, dtype=dtype)
        model.load_state_dict(usable, strict=False)
    report.loaded = len(usable) + (queries is not None)
    if queries is None:
        report.missing.append(OFFICIAL_QUERIES_KEY)
    else:
        queries = queries.reshape(-1, queries.shape[-1])  # (1, 64, H) -> (64, H)
    return queries, model, report
