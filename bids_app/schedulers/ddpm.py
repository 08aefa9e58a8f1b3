"""DDPM ancestral sampling (Ho et al. 2020) over a respaced chain.

With respacing, step t goes to the previous scheduled timestep s (alpha_bar_s = 1 after the last
one), so the chain is the DDPM posterior of the respaced process (Nichol & Dhariwal, sec. 4):
alpha_t' = ab_t / ab_s, beta_t' = 1 - alpha_t', and

    q(x_s | x_t, x0) = N(c0 x0 + c1 x_t, beta_tilde),
    c0 = sqrt(ab_s) beta_t' / (1 - ab_t),  c1 = sqrt(alpha_t') (1 - ab_s) / (1 - ab_t),
    beta_tilde = beta_t' (1 - ab_s) / (1 - ab_t).

beta_tilde is 0 on the last step, so the final sample carries no noise, without a branch.
"""
from __future__ import annotations

import torch
from torch import Tensor

from bids_app.schedulers.base import Scheduler, StepOutput, draw_noise

__all__ = ["DDPMScheduler"]


class DDPMScheduler(Scheduler):
    """Stochastic ancestral sampler; noise comes from the generator passed to ``step``."""

    def _build_step_tables(self) -> None:
        ab = self._tables["alpha_bar"]
        ab_prev = self._tables["alpha_bar_prev"]
        alpha = ab / ab_prev
        beta = 1.0 - alpha
        self._tables["coef_x0"] = ab_prev.sqrt() * beta / (1.0 - ab)
        self._tables["coef_xt"] = alpha.sqrt() * (1.0 - ab_prev) / (1.0 - ab)
        self._tables["sigma"] = (beta * (1.0 - ab_prev) / (1.0 - ab)).clamp(min=0.0).sqrt()

    def step(self, model_output: Tensor, t: Tensor | int, sample: Tensor,
             generator: torch.Generator | None = None) -> StepOutput:
        """Sample x_s ~ q(x_s | x_t, x0_hat), x0_hat from the model output."""
        x0 = self.predict_original(model_output, t, sample)
        mean = self._coefficient("coef_x0", t, sample) * x0 + self._coefficient("coef_xt", t, sample) * sample
        noise = draw_noise(sample, generator)
        return StepOutput(mean + self._coefficient("sigma", t, sample) * noise, x0)
