"""Flow matching pieces: noising, loss, timestep sampling, samplers on an analytic velocity field."""
import math

import torch

from scaleforge.models.sana import flow


def test_add_noise_and_target():
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(3, 4, 5, 5, generator=g), torch.randn(3, 4, 5, 5, generator=g)
    sig = torch.tensor([0.0, 0.3, 1.0])
    xt = flow.add_noise(x0, eps, sig)
    assert torch.allclose(xt[0], x0[0]) and torch.allclose(xt[2], eps[2])
    assert torch.allclose(xt[1], 0.7 * x0[1] + 0.3 * eps[1])
    # a perfect velocity gives zero loss, a zero prediction gives mean((eps - x0)^2)
    assert torch.allclose(flow.flow_loss(eps - x0, x0, eps), torch.zeros(3))
    assert torch.allclose(flow.flow_loss(torch.zeros_like(x0), x0, eps), ((eps - x0) ** 2).flatten(1).mean(1))


def test_logit_normal_with_shift():
    g = torch.Generator().manual_seed(0)
    s = flow.sample_sigmas(200000, shift=1.0, generator=g)
    assert s.min() >= 0 and s.max() < 1
    assert torch.allclose(s * 1000, (s * 1000).round(), atol=1e-3)  # on the 1000-step grid
    assert abs(s.median().item() - 0.5) < 0.01  # logit-normal(0, 1) is symmetric around 0.5
    shifted = flow.sample_sigmas(200000, shift=3.0, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(shifted, flow.shift_sigma(s, 3.0))
    assert abs(shifted.median().item() - 0.75) < 0.01  # 3 * 0.5 / (1 + 2 * 0.5)


def _gaussian_velocity(mu, tau):
    """Exact velocity E[eps - x0 | x_sigma] for x0 ~ N(mu, tau^2) per element."""

    def v(x, t):
        s = (t / 1000).view(-1, 1, 1, 1).double()
        x = x.double()
        var = (1 - s) ** 2 * tau ** 2 + s ** 2
        r = x - (1 - s) * mu
        e_x0 = mu + (1 - s) * tau ** 2 / var * r
        e_eps = s / var * r
        return (e_eps - e_x0).float()

    return v


def test_samplers_solve_the_gaussian_flow():
    # For Gaussian data the probability-flow ODE maps noise z to mu + tau * z exactly.
    mu, tau = 0.7, 0.4
    z = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    exact = mu + tau * z
    v = _gaussian_velocity(mu, tau)
    errs = {}
    for name in ("flow_dpm_solver", "euler"):
        for steps in (10, 20):
            out = flow.SAMPLERS[name](v, z, steps=steps, shift=3.0)
            errs[(name, steps)] = ((out - exact).norm() / exact.norm()).item()
    assert errs[("flow_dpm_solver", 20)] < 0.05
    # second order in the interior: halving the step size cuts the error ~4x (Euler: ~2x)
    assert errs[("flow_dpm_solver", 10)] / errs[("flow_dpm_solver", 20)] > 3.0
    assert errs[("euler", 10)] / errs[("euler", 20)] < 2.5
    assert errs[("flow_dpm_solver", 20)] < 0.5 * errs[("euler", 20)]


def test_cfg_combines_uncond_and_cond():
    class Fake(torch.nn.Module):
        def forward(self, x, t, y, mask):
            return x * 0 + y.mean(dim=(1, 2)).view(-1, 1, 1, 1)

    y = torch.full((2, 3, 4), 2.0)
    null = torch.zeros(2, 3, 4)
    fn = flow.cfg_velocity(Fake(), y, torch.ones(2, 3), null, None, guidance=4.5)
    out = fn(torch.zeros(2, 1, 2, 2), torch.zeros(2))
    assert torch.allclose(out, torch.full_like(out, 0 + 4.5 * 2.0))
    assert math.isclose(flow.sigma_schedule(20, 3.0)[0].item(), 1.0) and flow.sigma_schedule(20, 3.0)[-1] == 0
