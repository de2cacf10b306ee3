"""Rectified-flow training and sampling for SANA (sana.md §7-§8).

Convention: sigma in [0, 1] is the noise level; x_sigma = (1 - sigma) * x0 + sigma * eps; the model predicts
the velocity v = eps - x0 and takes ``1000 * sigma`` as its timestep input (the same mapping diffusers'
Sana pipelines use, so exported models sample correctly there).

Training timesteps: logit-normal (mean 0, std 1): u = sigmoid(n), t = floor(1000 u), sigma = t / 1000, then
the flow shift sigma' = s sigma / (1 + (s - 1) sigma) (s = 3 for 1.6B at 512/1024, 4 for 600M at 1024, 6 for
4K). Loss: plain MSE, no timestep weighting.

Samplers: Flow-DPM-Solver (DPM-Solver++ 2M on the data prediction x0 = x - sigma v, with alpha = 1 - sigma),
first order on the first and the last step, and Flow-Euler; both on a time-uniform grid shifted with the
same formula; classifier-free guidance on the velocity.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F

NUM_TRAIN_TIMESTEPS = 1000


def shift_sigma(sigma: torch.Tensor, shift: float) -> torch.Tensor:
    return shift * sigma / (1 + (shift - 1) * sigma)


def sample_sigmas(n: int, shift: float, generator: torch.Generator | None = None, mean: float = 0.0,
                  std: float = 1.0) -> torch.Tensor:
    """Logit-normal training noise levels, quantised to the 1000-step grid, then shifted."""
    u = torch.sigmoid(torch.randn(n, generator=generator) * std + mean)
    t = torch.floor(u * NUM_TRAIN_TIMESTEPS).clamp(max=NUM_TRAIN_TIMESTEPS - 1)
    return shift_sigma(t / NUM_TRAIN_TIMESTEPS, shift)


def add_noise(x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    s = sigma.view(-1, *([1] * (x0.ndim - 1))).to(x0.dtype)
    return (1 - s) * x0 + s * noise


def flow_loss(pred: torch.Tensor, x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Per-sample mean squared error against the velocity target eps - x0 (fp32), shape (B,)."""
    target = (noise - x0).float()
    return F.mse_loss(pred.float(), target, reduction="none").flatten(1).mean(1)


def sigma_schedule(steps: int, shift: float) -> torch.Tensor:
    """steps + 1 noise levels from 1 to 0: time-uniform, then shifted (sana.md §8)."""
    return shift_sigma(torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64), shift)


VelocityFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x, 1000*sigma (B,)) -> v


def cfg_velocity(model, text: torch.Tensor, mask: torch.Tensor | None, null_text: torch.Tensor,
                 null_mask: torch.Tensor | None, guidance: float) -> VelocityFn:
    """v = v_uncond + w (v_cond - v_uncond); one batched forward of [uncond; cond]."""

    def fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if guidance == 1.0:
            return model(x, t, text, mask)
        xx = torch.cat([x, x])
        tt = torch.cat([t, t])
        yy = torch.cat([null_text, text])
        mm = None if mask is None else torch.cat([null_mask if null_mask is not None else torch.ones_like(mask), mask])
        v_u, v_c = model(xx, tt, yy, mm).chunk(2)
        return v_u + guidance * (v_c - v_u)

    return fn


@torch.no_grad()
def sample_euler(velocity: VelocityFn, noise: torch.Tensor, steps: int = 28, shift: float = 3.0) -> torch.Tensor:
    sig = sigma_schedule(steps, shift)
    x = noise.float()
    for i in range(steps):
        s, s_next = float(sig[i]), float(sig[i + 1])
        t = torch.full((x.shape[0],), s * NUM_TRAIN_TIMESTEPS, device=x.device)
        v = velocity(x, t).float()
        x = x + (s_next - s) * v
    return x


@torch.no_grad()
def sample_flow_dpm_solver(velocity: VelocityFn, noise: torch.Tensor, steps: int = 20,
                           shift: float = 3.0) -> torch.Tensor:
    """DPM-Solver++(2M) in the flow parameterisation: alpha_t = 1 - sigma_t, lambda = log(alpha / sigma).

    First-order step:  x_t = (sigma_t / sigma_s) x + (alpha_t - alpha_s sigma_t / sigma_s) D
    (the form of ``sigma_t/sigma_s x - alpha_t (e^{-h} - 1) D`` that stays finite at sigma_s = 1 and
    sigma_t = 0). Second order adds ``0.5 (alpha_t - alpha_s sigma_t / sigma_s) (D0 - D1) / r`` with
    r = h_prev / h ("midpoint" variant). The first and the last step are first order (lower_order_final).
    """
    sig = sigma_schedule(steps, shift)
    x = noise.float()
    prev_x0: torch.Tensor | None = None
    prev_h: float | None = None
    lam = lambda s: math.log((1 - s) / s) if 0 < s < 1 else (math.inf if s == 0 else -math.inf)  # noqa: E731
    for i in range(steps):
        s, s_next = float(sig[i]), float(sig[i + 1])
        t = torch.full((x.shape[0],), s * NUM_TRAIN_TIMESTEPS, device=x.device)
        v = velocity(x, t).float()
        x0 = x - s * v
        a_s, a_t = 1 - s, 1 - s_next
        coef = a_t - a_s * s_next / s
        h = lam(s_next) - lam(s)
        use_second = prev_x0 is not None and prev_h is not None and math.isfinite(h) and math.isfinite(prev_h) \
            and i < steps - 1
        if use_second:
            r = prev_h / h
            d = x0 + 0.5 * (x0 - prev_x0) / r
        else:
            d = x0
        x = (s_next / s) * x + coef * d
        prev_x0, prev_h = x0, h
    return x


SAMPLERS = {"flow_dpm_solver": sample_flow_dpm_solver, "euler": sample_euler}
