"""Deterministic DDIM sampling (Song et al. 2021, eta = 0) over a respaced chain.

Step t goes to the previous scheduled timestep s (alpha_bar_s = 1 after the last one):

    x_s = sqrt(ab_s) x0_hat + sqrt(1 - ab_s) eps_hat      (the paper's eq. 12).

With one step from the strength's timestep this is the app's read-out of the clean latent.
"""
from __future__ import annotations

import torch
from torch import Tensor

from bids_app.schedulers.base import Scheduler, StepOutput

__all__ = ["DDIMScheduler"]


class DDIMScheduler(Scheduler):
    """Deterministic DDIM (eta = 0): no noise is drawn after the chain's start."""

    def _build_step_tables(self) -> None:
        ab_prev = self._tables["alpha_bar_prev"]
        self._tables["sqrt_alpha_bar_prev"] = ab_prev.sqrt()
        self._tables["coef_eps"] = (1.0 - ab_prev).clamp(min=0.0).sqrt()

    def step(self, model_output: Tensor, t: Tensor | int, sample: Tensor,
             generator: torch.Generator | None = None) -> StepOutput:
        """x_s from x0_hat and eps_hat (``generator`` is not used: the step draws nothing)."""
        x0, eps = self._split(model_output, self._lookup("alpha_bar", t, sample), sample)
        prev = (self._coefficient("sqrt_alpha_bar_prev", t, sample) * x0
                + self._coefficient("coef_eps", t, sample) * eps)
        return StepOutput(prev, x0)
