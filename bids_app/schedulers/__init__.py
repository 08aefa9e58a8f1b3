"""Diffusion schedulers: no weights, no model imports (see base.py for the shared contract)."""
from bids_app.schedulers.base import (
    ModelFn,
    Scheduler,
    SchedulerConfig,
    StepOutput,
    draw_noise,
)
from bids_app.schedulers.ddim import DDIMScheduler
from bids_app.schedulers.patches import patch_sets, random_patches
from bids_app.schedulers.sampling import Chain, KnownRegion, denoise, denoise_chains, start_chain

__all__ = [
    "Chain",
    "KnownRegion",
    "denoise_chains",
    "start_chain",
    "DDIMScheduler",
    "ModelFn",
    "Scheduler",
    "SchedulerConfig",
    "StepOutput",
    "denoise",
    "draw_noise",
    "patch_sets",
    "random_patches",
]
