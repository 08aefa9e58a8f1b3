"""Noise schedules and the closed-form conversions between x0, epsilon, v and x_t.

Pure functions, no state (in the style of lucidrains' denoising-diffusion-pytorch): the schedulers
compose these, and tests check them against each other. Betas are built in float64, because the
cumulative product over 1000 steps and the small alpha_bar at the top of a cosine schedule lose
digits in float32.

Every conversion takes ``alpha_bar`` as a Python float, a 0-d tensor, or a tensor of shape (B,)
that is broadcast over the remaining dimensions of the sample (B, 1, 1, 1, 1 for a 3D latent).
The square roots are taken in alpha_bar's precision (float64 from the schedulers) and only then
cast to the sample's dtype; a tensor alpha_bar must be on the sample's device.

With ``a = sqrt(alpha_bar)`` and ``b = sqrt(1 - alpha_bar)``:
``x_t = a x0 + b eps`` and ``v = a eps - b x0``, so ``x0 = a x_t - b v`` and ``eps = b x_t + a v``.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = [
    "linear_betas",
    "cosine_betas",
    "make_betas",
    "alphas_cumprod_from_betas",
    "broadcast_to_sample",
    "add_noise",
    "predict_start_from_noise",
    "predict_noise_from_start",
    "predict_v",
    "predict_start_from_v",
    "predict_noise_from_v",
]


def linear_betas(num_timesteps: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> Tensor:
    """The DDPM paper's schedule: betas evenly spaced from beta_start to beta_end (float64).

    Not rescaled by 1000 / T (as lucidrains does): with few training steps the default end point
    leaves a lot of signal at the top, so choose beta_end accordingly or use the cosine schedule.
    """
    _check_timesteps(num_timesteps)
    if not 0 < beta_start <= beta_end < 1:
        raise ValueError(f"betas must satisfy 0 < beta_start <= beta_end < 1, got {beta_start}, {beta_end}")
    return torch.linspace(beta_start, beta_end, num_timesteps, dtype=torch.float64)


def cosine_betas(num_timesteps: int, s: float = 0.008, max_beta: float = 0.999) -> Tensor:
    """Nichol & Dhariwal's cosine schedule: alpha_bar(t) = cos^2(((t/T + s) / (1 + s)) pi / 2).

    Betas are clipped at max_beta so that the last step does not divide by zero; alpha_bar at the
    top is then tiny but positive (about 2e-9 for T = 1000), close to a zero terminal SNR.
    """
    _check_timesteps(num_timesteps)
    if not 0 < max_beta < 1:
        raise ValueError(f"max_beta must be in (0, 1), got {max_beta}")
    steps = torch.arange(num_timesteps + 1, dtype=torch.float64) / num_timesteps
    f = torch.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
    betas = 1 - f[1:] / f[:-1]
    return betas.clamp(min=0.0, max=max_beta)


def make_betas(schedule: str, num_timesteps: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> Tensor:
    """Betas by schedule name ('linear' or 'cosine'): the one place that maps a name to a function."""
    if schedule == "linear":
        return linear_betas(num_timesteps, beta_start, beta_end)
    if schedule == "cosine":
        return cosine_betas(num_timesteps)
    raise ValueError(f"unknown noise schedule {schedule!r} (expected 'linear' or 'cosine')")


def alphas_cumprod_from_betas(betas: Tensor) -> Tensor:
    """alpha_bar_t = prod_{s <= t} (1 - beta_s), in the dtype of betas."""
    return torch.cumprod(1.0 - betas, dim=0)


def broadcast_to_sample(value: Tensor | float, sample: Tensor) -> Tensor | float:
    """Reshape a per-sample coefficient of shape (B,) to (B, 1, ..., 1); scalars pass through."""
    if isinstance(value, Tensor) and value.ndim == 1:
        return value.reshape(value.shape[0], *([1] * (sample.ndim - 1)))
    return value


def _sqrt(value: Tensor | float) -> Tensor | float:
    return value.sqrt() if isinstance(value, Tensor) else math.sqrt(value)


def _coefficients(alpha_bar: Tensor | float, sample: Tensor) -> tuple[Tensor | float, Tensor | float]:
    """sqrt(ab) and sqrt(1 - ab), computed in alpha_bar's precision, then cast to the sample dtype."""
    alpha_bar = broadcast_to_sample(alpha_bar, sample)
    a, b = _sqrt(alpha_bar), _sqrt(1.0 - alpha_bar)
    if isinstance(a, Tensor):
        a, b = a.to(sample.dtype), b.to(sample.dtype)
    return a, b


def add_noise(x0: Tensor, noise: Tensor, alpha_bar: Tensor | float) -> Tensor:
    """The forward process q(x_t | x0): sqrt(ab) x0 + sqrt(1 - ab) eps."""
    a, b = _coefficients(alpha_bar, x0)
    return a * x0 + b * noise


def predict_start_from_noise(x_t: Tensor, noise: Tensor, alpha_bar: Tensor | float) -> Tensor:
    """x0 from x_t and epsilon: (x_t - sqrt(1 - ab) eps) / sqrt(ab)."""
    a, b = _coefficients(alpha_bar, x_t)
    return (x_t - b * noise) / a


def predict_noise_from_start(x_t: Tensor, x0: Tensor, alpha_bar: Tensor | float) -> Tensor:
    """epsilon from x_t and x0: (x_t - sqrt(ab) x0) / sqrt(1 - ab); undefined at ab = 1."""
    a, b = _coefficients(alpha_bar, x_t)
    return (x_t - a * x0) / b


def predict_v(x0: Tensor, noise: Tensor, alpha_bar: Tensor | float) -> Tensor:
    """The v target of Salimans & Ho: sqrt(ab) eps - sqrt(1 - ab) x0."""
    a, b = _coefficients(alpha_bar, x0)
    return a * noise - b * x0


def predict_start_from_v(x_t: Tensor, v: Tensor, alpha_bar: Tensor | float) -> Tensor:
    """x0 from x_t and v: sqrt(ab) x_t - sqrt(1 - ab) v (no division: stable at every t)."""
    a, b = _coefficients(alpha_bar, x_t)
    return a * x_t - b * v


def predict_noise_from_v(x_t: Tensor, v: Tensor, alpha_bar: Tensor | float) -> Tensor:
    """epsilon from x_t and v: sqrt(1 - ab) x_t + sqrt(ab) v."""
    a, b = _coefficients(alpha_bar, x_t)
    return b * x_t + a * v


def _check_timesteps(num_timesteps: int) -> None:
    if int(num_timesteps) != num_timesteps or num_timesteps < 1:
        raise ValueError(f"the number of timesteps must be a positive integer, got {num_timesteps}")
