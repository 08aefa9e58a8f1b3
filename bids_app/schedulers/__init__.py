"""Diffusion schedulers: no weights, no model imports (see base.py for the shared contract)."""
from bids_app.schedulers.base import (
    ModelFn,
    Scheduler,
    SchedulerConfig,
    StepOutput,
    denoise,
    draw_noise,
    img2img,
)
from bids_app.schedulers.ddim import DDIMScheduler
from bids_app.schedulers.ddpm import DDPMScheduler

SCHEDULERS = {"ddpm": DDPMScheduler, "ddim": DDIMScheduler}

__all__ = [
    "DDIMScheduler",
    "DDPMScheduler",
    "ModelFn",
    "SCHEDULERS",
    "Scheduler",
    "SchedulerConfig",
    "StepOutput",
    "denoise",
    "draw_noise",
    "img2img",
]
