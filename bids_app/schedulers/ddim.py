"""DDIM sampling (Song et al. 2021) over a respaced chain.

Step t goes to the previous scheduled timestep s (alpha_bar_s = 1 after the last one):

    x_s = sqrt(ab_s) x0_hat + sqrt(1 - ab_s - sigma^2) eps_hat + sigma z,
    sigma = eta sqrt((1 - ab_s) / (1 - ab_t)) sqrt(1 - ab_t / ab_s)     (the paper's eq. 16).

eta = 0 is deterministic (no noise is drawn); eta = 1 has the DDPM posterior's variance.
"""
from __future__ import annotations

import torch
from torch import Tensor

from bids_app.schedulers.base import Scheduler, SchedulerConfig, StepOutput, draw_noise

__all__ = ["DDIMScheduler"]


class DDIMScheduler(Scheduler):
    """DDIM with a noise level eta in [0, 1]; eta is an inference choice, not part of the config."""

    def __init__(self, config: SchedulerConfig | None = None, eta: float = 0.0) -> None:
        if not 0.0 <= eta <= 1.0:
            raise ValueError(f"eta must be in [0, 1], got {eta}")
        self.eta = float(eta)
        super().__init__(config)

    def _build_step_tables(self) -> None:
        ab = self._tables["alpha_bar"]
        ab_prev = self._tables["alpha_bar_prev"]
        variance = (1.0 - ab_prev) / (1.0 - ab) * (1.0 - ab / ab_prev)
        sigma = self.eta * variance.clamp(min=0.0).sqrt()
        self._tables["sqrt_alpha_bar_prev"] = ab_prev.sqrt()
        self._tables["coef_eps"] = (1.0 - ab_prev - sigma**2).clamp(min=0.0).sqrt()
        self._tables["sigma"] = sigma

    def step(self, model_output: Tensor, t: Tensor | int, sample: Tensor,
             generator: torch.Generator | None = None) -> StepOutput:
        """x_s from x0_hat and eps_hat; draws noise only when eta > 0."""
        x0, eps = self._split(model_output, self._lookup("alpha_bar", t, sample), sample)
        prev = (self._coefficient("sqrt_alpha_bar_prev", t, sample) * x0
                + self._coefficient("coef_eps", t, sample) * eps)
        if self.eta > 0:
            prev = prev + self._coefficient("sigma", t, sample) * draw_noise(sample, generator)
        return StepOutput(prev, x0)
