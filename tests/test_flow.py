"""Flow matching: the loss's conventions and the Euler sampler on velocity fields with known solutions."""
import pytest
import torch

import blip3o


class Field(torch.nn.Module):
    """A stand-in model v(x, t, cond) = fn(x, t, cond), counting its calls and batch sizes."""

    def __init__(self, fn):
        super().__init__()
        self.fn, self.batches, self.conds = fn, [], []

    def forward(self, x, t, cond):
        self.batches.append(x.shape[0])
        self.conds.append(cond)
        return self.fn(x, t[:, None, None], cond)


def test_euler_constant_field_is_exact():
    target = torch.randn(2, 64, 3)
    x0 = torch.randn(2, 64, 3)
    model = Field(lambda x, t, c: (target - x0).expand_as(x))
    for steps in (1, 7):
        x1 = blip3o.euler_sample(model, torch.zeros(2, 1, 4), 64, 3, steps=steps, guidance=1.0, x0=x0)
        torch.testing.assert_close(x1, target)  # exact up to fp32 rounding of the summed steps (default tol)


def test_euler_straight_path_to_a_point_lands_on_it():
    """The exact flow to a single data point is v = (x* - x) / (1 - t); Euler from t = 0 hits x* exactly."""
    target = torch.randn(1, 64, 3)
    model = Field(lambda x, t, c: (target - x) / (1 - t))
    x1 = blip3o.euler_sample(model, torch.zeros(1, 1, 4), 64, 3, steps=5, guidance=1.0)
    torch.testing.assert_close(x1, target)  # exact in real arithmetic; fp32 rounding only (default tol)


def test_euler_time_grid_and_convergence():
    # v = 2t: x(1) = x0 + 1; left-endpoint Euler on t_i = i / n gives x0 + (n - 1) / n.
    model = Field(lambda x, t, c: 2 * t.expand_as(x))
    x0 = torch.zeros(1, 64, 1)
    for n in (4, 10):
        x1 = blip3o.euler_sample(model, torch.zeros(1, 1, 1), 64, 1, steps=n, guidance=1.0, x0=x0)
        torch.testing.assert_close(x1, torch.full_like(x0, (n - 1) / n))  # fp32 rounding only (default tol)
    # v = x: x(1) = e * x0; the Euler error (1 + 1/n)^n vs e shrinks like 1/n.
    model = Field(lambda x, t, c: x)
    x0 = torch.ones(1, 64, 1, dtype=torch.float64)
    errors = [(blip3o.euler_sample(model, torch.zeros(1, 1, 1, dtype=torch.float64), 64, 1, steps=n, guidance=1.0,
                                   x0=x0) - torch.e).abs().max().item() for n in (10, 100)]
    assert errors[0] < 0.13 and errors[1] < 0.014 and errors[1] < errors[0] / 8


def test_guidance_is_batched_and_matches_separate_passes():
    torch.manual_seed(0)
    model = blip3o.NextDiT(blip3o.DiTConfig(in_channels=6, hidden_size=32, num_layers=1, num_heads=4,
                                            num_kv_heads=4, cond_dim=10))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    x, t, cond = torch.randn(3, 64, 6), torch.rand(3), torch.randn(3, 4, 10)
    with torch.no_grad():
        v_c, v_u = model(x, t, cond), model(x, t, torch.zeros_like(cond))
        assert (v_c - v_u).abs().max() > 0.1  # the condition matters, so the mix below is not trivial
        scale = v_c.abs().max().item()  # about 30 with these perturbed weights
        for s in (0.0, 1.0, 3.0):
            # One batch of 6 vs two batches of 3: the fp32 matmuls block (and so sum) in another order,
            # about 1e-6 relative per output; v_u + s (v_c - v_u) magnifies that by up to 1 + 2s.
            torch.testing.assert_close(blip3o.guided_velocity(model, x, t, cond, s), v_u + s * (v_c - v_u),
                                       atol=2e-6 * scale * (1 + 2 * s), rtol=0)


def test_sampler_call_pattern_and_validation():
    model = Field(lambda x, t, c: c.mean(dim=1, keepdim=True).expand_as(x))
    cond = torch.ones(2, 3, 4)
    blip3o.euler_sample(model, cond, 64, 4, steps=3, guidance=3.0)
    assert model.batches == [4, 4, 4]  # cond and uncond in one forward per step
    assert all(torch.all(c[2:] == 0) for c in model.conds)  # the unconditional half sees zeros
    model.batches.clear()
    blip3o.euler_sample(model, cond, 64, 4, steps=3, guidance=1.0)
    assert model.batches == [2, 2, 2]  # guidance 1: no unconditional pass
    with pytest.raises(ValueError):
        blip3o.euler_sample(model, cond, 64, 4, steps=0)
    with pytest.raises(ValueError):
        blip3o.euler_sample(model, cond, 64, 4, guidance=-1.0)
    # The same seed draws the same noise, and the same ops on the same shapes in one process: bit-equal.
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    assert torch.equal(blip3o.euler_sample(model, cond, 64, 4, steps=2, rng=g1),
                       blip3o.euler_sample(model, cond, 64, 4, steps=2, rng=g2))


def test_loss_conventions():
    """An oracle that knows x1 recovers v = x1 - x0 from x_t = t x1 + (1 - t) x0: the loss vanishes."""
    x1 = torch.randn(16, 64, 3)
    oracle = Field(lambda x, t, c: (x1 - x) / (1 - t))
    loss, t, per_sample = blip3o.flow_matching_loss(oracle, x1, torch.zeros(16, 1, 2), cond_drop=0.0)
    assert loss.item() < 1e-6 and t.shape == per_sample.shape == (16,)
    # Predicting 0 when the data is 0 costs E|x0|^2 = 1 per element.
    loss, _, _ = blip3o.flow_matching_loss(Field(lambda x, t, c: 0 * x), torch.zeros(64, 64, 8), torch.zeros(64, 1, 2))
    assert abs(loss.item() - 1.0) < 0.03


def test_loss_condition_dropout_and_time_sampling():
    model = Field(lambda x, t, c: 0 * x)
    cond = torch.ones(4000, 1, 2)
    g = torch.Generator().manual_seed(0)
    _, t, _ = blip3o.flow_matching_loss(model, torch.zeros(4000, 1, 1), cond, rng=g)
    dropped = (model.conds[-1] == 0).all(dim=2).all(dim=1).float().mean().item()
    assert 0.08 < dropped < 0.12  # cond_drop = 0.1: about 10% of the conditions zeroed
    assert 0 <= t.min() and t.max() < 1 and abs(t.mean().item() - 0.5) < 0.02
    _, t, _ = blip3o.flow_matching_loss(model, torch.zeros(4000, 1, 1), cond, cond_drop=0.0, time_sampling="logit_normal")
    assert bool(torch.all(model.conds[-1] == 1))
    assert 0 < t.min() and t.max() < 1 and abs(t.mean().item() - 0.5) < 0.02
    assert t.std() < 0.25  # concentrated around mid noise (uniform has std 0.29)
    with pytest.raises(ValueError):
        blip3o.flow_matching_loss(model, torch.zeros(2, 1, 1), cond[:2], time_sampling="cosine")


def test_loss_trains_a_next_dit():
    torch.manual_seed(0)
    model = blip3o.NextDiT(blip3o.DiTConfig(in_channels=4, hidden_size=32, num_layers=1, num_heads=4,
                                            num_kv_heads=4, cond_dim=8))
    x1, cond = torch.randn(8, 64, 4), torch.randn(8, 3, 8)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for step in range(30):  # one fixed batch and noise: the loss must fall well below its start
        loss, _, _ = blip3o.flow_matching_loss(model, x1, cond, rng=torch.Generator().manual_seed(0))
        opt.zero_grad()
        loss.backward()
        if step == 0:
            assert model.norm_out.linear_2.weight.grad.abs().sum() > 0  # the zero-initialised output learns
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses
