"""Properties of the Next-DiT: shapes, how the condition enters, grouped-query attention."""
import pytest
import torch

import blip3o


def tiny(**kw):
    cfg = dict(in_channels=12, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=4, cond_dim=20)
    cfg.update(kw)
    return blip3o.DiTConfig(**cfg)


def randomized(cfg, seed=0, gates=True):
    """A model with every weight random (a fresh one starts at v = 0, which proves nothing)."""
    torch.manual_seed(seed)
    model = blip3o.NextDiT(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("gate"):
                p.copy_(torch.randn_like(p) if gates else torch.zeros_like(p))
            else:
                p.add_(0.3 * torch.randn_like(p))
    return model.eval()


def test_config_rules():
    cfg = blip3o.DiTConfig()
    assert (cfg.ffn_dim, cfg.time_embed_dim, cfg.head_dim, cfg.num_tokens) == (4864, 1024, 64, 64)
    assert tiny(hidden_size=128).ffn_dim == 512 and tiny(hidden_size=128).time_embed_dim == 128
    with pytest.raises(ValueError):
        tiny(num_heads=5)
    with pytest.raises(ValueError):
        tiny(num_kv_heads=3)


def test_shapes_and_zero_init():
    model = blip3o.NextDiT(tiny())
    x, t, cond = torch.randn(3, 64, 12), torch.rand(3), torch.randn(3, 5, 20)
    v = model(x, t, cond)
    assert v.shape == (3, 64, 12)
    # adaLN-zero blocks and a zero final layer: a fresh model is the identity map and predicts v = 0.
    assert torch.all(v == 0)
    with pytest.raises(ValueError, match="tokens"):
        model(torch.randn(3, 16, 12), t, cond)


def with_projected_condition(model, projected):
    """Make the model see `projected` as the output of its condition MLP."""
    return model.caption_projection.register_forward_hook(lambda module, args, out: projected)


@torch.no_grad()
def test_zero_gates_condition_enters_only_through_its_mean():
    x, t, cond = torch.randn(2, 64, 12), torch.rand(2), torch.randn(2, 6, 20)
    p = torch.randn(2, 6, 32)
    delta = torch.randn(2, 6, 32)
    same_mean = p + delta - delta.mean(dim=1, keepdim=True)  # different tokens, same pooled mean
    shifted = p + torch.randn(1, 1, 32)  # different mean (not a constant: LayerNorm would absorb it)

    def run(model, projected):
        handle = with_projected_condition(model, projected)
        try:
            return model(x, t, cond)
        finally:
            handle.remove()

    closed = randomized(tiny(), gates=False)
    # Other tokens with the same mean: the pooled mean is summed in another order (fp32, ~1e-6), and the
    # randomized weights (outputs of order 10) magnify it through the adaLN modulation: 1e-4.
    torch.testing.assert_close(run(closed, same_mean), run(closed, p), atol=1e-4, rtol=1e-4)
    assert not torch.allclose(run(closed, shifted), run(closed, p), atol=1e-2)
    # With open gates the cross-attention sees the tokens themselves.
    opened = randomized(tiny(), gates=True)
    assert not torch.allclose(run(opened, same_mean), run(opened, p), atol=1e-2)


@torch.no_grad()
def test_condition_is_a_set():
    x, t = torch.randn(2, 64, 12), torch.rand(2)
    cond = torch.randn(2, 64, 20)
    perm = torch.randperm(64)
    # Cross-attention keys carry no position: permuting the condition tokens changes nothing.
    model = randomized(tiny())
    # The attention and the mean sum over the permuted tokens in another order (fp32 reassociation).
    torch.testing.assert_close(model(x, t, cond[:, perm]), model(x, t, cond), atol=1e-4, rtol=1e-4)
    assert not torch.allclose(model(x, t, torch.randn_like(cond)), model(x, t, cond), atol=1e-2)


@torch.no_grad()
@pytest.mark.parametrize("kv_heads", [1, 2])
def test_grouped_query_attention_is_multi_head_with_shared_kv(kv_heads):
    """A GQA model equals the multi-head model whose K/V heads are copied within each group."""
    gqa = randomized(tiny(num_kv_heads=kv_heads))
    assert gqa.layers[0].attn1.to_k.weight.shape == (kv_heads * 8, 32)
    mha = blip3o.NextDiT(tiny())
    state = gqa.state_dict()
    rep = 4 // kv_heads
    for name, value in list(state.items()):
        if any(s in name for s in ("to_k.", "to_v.", "norm_k.")):
            state[name] = value.unflatten(0, (kv_heads, 8)).repeat_interleave(rep, dim=0).flatten(0, 1)
    mha.load_state_dict(state)
    x, t, cond = torch.randn(2, 64, 12), torch.rand(2), torch.randn(2, 5, 20)
    # SDPA's grouped path against repeated K/V heads: other kernels, other summation order (fp32).
    torch.testing.assert_close(gqa(x, t, cond), mha(x, t, cond), atol=1e-5, rtol=1e-5)


def test_gradients_reach_every_parameter():
    model = randomized(tiny())
    v = model(torch.randn(2, 64, 12), torch.rand(2), torch.randn(2, 64, 20))
    v.square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


@pytest.mark.slow  # torch.compile: tens of seconds of compilation on a CPU
def test_compiled_blocks_match_eager_without_complex_numbers(recwarn):
    """compile_blocks (train.py / bench.py --compile): the same outputs and gradients as eager, and the
    compiled graph holds no complex tensors (RoPE switches to its real form), which inductor could not
    generate code for: it would warn and leave those ops unfused."""
    import copy

    eager = randomized(tiny(num_layers=3))
    compiled = copy.deepcopy(eager).compile_blocks()
    x, t, cond = torch.randn(2, 64, 12), torch.rand(2), torch.randn(2, 5, 20)
    outputs, grads = [], []
    for model in (eager, compiled):
        v = model(x, t, cond)
        v.square().mean().backward()
        outputs.append(v.detach())
        grads.append({n: p.grad for n, p in model.named_parameters()})
    # Inductor fuses and reorders the fp32 ops (other rounding); gradients, a sum over the batch and
    # three blocks of such differences, get a looser relative tolerance.
    torch.testing.assert_close(outputs[1], outputs[0], atol=1e-4, rtol=1e-4)
    for n, g in grads[0].items():
        torch.testing.assert_close(grads[1][n], g, atol=1e-4, rtol=1e-3)
    assert not [w for w in recwarn if "complex" in str(w.message)]
