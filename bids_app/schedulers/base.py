"""The scheduler contract shared by every sampler and its config (the loops: sampling.py).

A scheduler holds no weights and imports no model (the diffusers split): it turns a model output
into the previous sample. All schedulers share one signature (``set_timesteps``, ``step``,
``add_noise``, ``get_velocity``, ``training_target``, ``predict_original``, ``img2img_timesteps``)
so the pipeline and the tests treat them alike.

Precision: the schedule (betas, alpha_bar and each scheduler's per-step coefficients) is kept as
float64 tables of length T, indexed by the training timestep. A lookup copies the table once to the
sample's device (cached per device) and gathers there, so a step never syncs with the host (no
``.item()``); the coefficients are cast to the sample's dtype just before they multiply it.

Respacing: ``set_timesteps(n)`` picks the "trailing" steps ``k T / n - 1`` for k = n..1, i.e.
descending, evenly spaced, starting at T - 1 (so sampling from pure noise and img2img at
strength 1 begin at the top of the schedule) and ending at T / n - 1, whose step goes to the clean
sample (alpha_bar = 1). A step at timestep t goes to the nearest scheduled timestep below t.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import torch
from torch import Tensor

from bids_app.schedulers import schedules

__all__ = ["SchedulerConfig", "StepOutput", "Scheduler", "ModelFn", "draw_noise"]

PREDICTION_TYPES = ("epsilon", "v_prediction")
SCHEDULES = ("cosine", "linear")

ModelFn = Callable[[Tensor, Tensor], Tensor]
"""``model_fn(sample, t) -> model_output``; t is a long tensor of shape (B,) on the sample's device."""


@dataclass(frozen=True)
class SchedulerConfig:
    """The diffusion process a model was trained for: saved next to the UNet's weights.

    ``beta_start``/``beta_end`` are used by the linear schedule only. ``clip_sample``, when set,
    clamps every predicted x0 to [-clip_sample, clip_sample] (latents are not bounded, so off by
    default).
    """

    num_train_timesteps: int = 1000
    schedule: str = "cosine"
    beta_start: float = 1e-4
    beta_end: float = 0.02
    prediction_type: str = "epsilon"
    clip_sample: float | None = None

    def __post_init__(self) -> None:
        if int(self.num_train_timesteps) != self.num_train_timesteps or self.num_train_timesteps < 1:
            raise ValueError(f"num_train_timesteps must be a positive integer, got {self.num_train_timesteps}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if self.prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {self.prediction_type!r}")
        if not 0 < self.beta_start <= self.beta_end < 1:
            raise ValueError(f"need 0 < beta_start <= beta_end < 1, got {self.beta_start}, {self.beta_end}")
        if self.clip_sample is not None and not self.clip_sample > 0:
            raise ValueError(f"clip_sample must be positive or None, got {self.clip_sample}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "SchedulerConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"unknown scheduler config field(s): {', '.join(unknown)}")
        return cls(**dict(data))


class StepOutput(NamedTuple):
    """What one reverse step returns: the sample at the previous timestep and the x0 it implied."""

    prev_sample: Tensor
    pred_original_sample: Tensor


class Scheduler:
    """Base class: the schedule tables, the forward process, targets and the img2img start.

    Subclasses implement ``step`` and may add per-step tables in ``_build_step_tables`` (called
    by ``set_timesteps``); tables are 1-D float64 CPU tensors of length T in ``self._tables``.
    """

    def __init__(self, config: SchedulerConfig | None = None) -> None:
        self.config = config if config is not None else SchedulerConfig()
        c = self.config
        self.betas = schedules.make_betas(c.schedule, c.num_train_timesteps, c.beta_start, c.beta_end)
        self.alphas_cumprod = schedules.alphas_cumprod_from_betas(self.betas)
        self.set_timesteps(c.num_train_timesteps)

    @property
    def num_train_timesteps(self) -> int:
        return self.config.num_train_timesteps

    # -- respacing ---------------------------------------------------------------------------
    def set_timesteps(self, n: int) -> None:
        """Choose n respaced timesteps (see the module docstring) and rebuild the step tables."""
        T = self.num_train_timesteps
        if int(n) != n or not 1 <= n <= T:
            raise ValueError(f"the number of inference steps must be an integer in [1, {T}], got {n}")
        n = int(n)
        k = torch.arange(n, 0, -1, dtype=torch.long)
        self._use_timesteps(k * T // n - 1)

    def set_timesteps_from(self, timesteps: Sequence[int]) -> None:
        """Use these timesteps (distinct, descending, in [0, T)) instead of n evenly spaced ones:
        img2img at a strength then starts exactly where asked (:meth:`img2img_timesteps`)."""
        values = [int(t) for t in timesteps]
        T = self.num_train_timesteps
        if not values or any(not 0 <= t < T for t in values) or any(a <= b for a, b in zip(values, values[1:])):
            raise ValueError(f"timesteps must be distinct, descending and in [0, {T}), got {values}")
        self._use_timesteps(torch.tensor(values, dtype=torch.long))

    def _use_timesteps(self, timesteps: Tensor) -> None:
        T = self.num_train_timesteps
        self.timesteps = timesteps
        self.num_inference_steps = len(timesteps)
        ascending = self.timesteps.flip(0)
        below = torch.searchsorted(ascending, torch.arange(T, dtype=torch.long))  # scheduled steps < t
        prev_alpha_bar = self.alphas_cumprod[ascending[(below - 1).clamp(min=0)]]
        self._tables: dict[str, Tensor] = {
            "alpha_bar": self.alphas_cumprod,
            "alpha_bar_prev": torch.where(below > 0, prev_alpha_bar, torch.ones_like(prev_alpha_bar)),
        }
        self._build_step_tables()
        self._device_tables: dict[tuple[str, torch.device], Tensor] = {}

    def _build_step_tables(self) -> None:
        """Hook for subclasses: add per-timestep coefficient tables to ``self._tables``."""

    def img2img_timesteps(self, strength: float, steps: int) -> list[int]:
        """The one img2img rule: ``steps`` evenly spaced timesteps from ``strength * T`` down
        (descending), so a chain starts exactly at its strength whatever the number of steps.

        (diffusers' rule, the last ``int(n * strength)`` of n respaced steps, quantises the start to
        the respaced grid: with one step, strengths 0.5 to 0.99 would all start at T/2.) A strength
        below one training timestep gives no steps: the input comes back unchanged.
        """
        if not 0.0 <= strength <= 1.0:
            raise ValueError(f"strength must be in [0, 1], got {strength}")
        top = int(round(strength * self.num_train_timesteps)) - 1
        if top < 0 or steps < 1:
            return []
        return sorted({int(round(top * (steps - j) / steps)) for j in range(steps)}, reverse=True)

    # -- table lookups -----------------------------------------------------------------------
    def _lookup(self, name: str, t: Tensor | int, like: Tensor) -> Tensor:
        """Table ``name`` at timestep(s) t, on like's device; float64 (float32 where unsupported).

        A (B,) t gives a (B,) tensor (the schedules module broadcasts it), a scalar t a 0-d one.
        """
        device = like.device
        key = (name, device)
        table = self._device_tables.get(key)
        if table is None:
            dtype = torch.float32 if device.type == "mps" else torch.float64
            table = self._tables[name].to(device=device, dtype=dtype)
            self._device_tables[key] = table
        index = torch.as_tensor(t, device=device)
        if index.is_floating_point():
            index = index.long()
        return table[index]

    def _coefficient(self, name: str, t: Tensor | int, like: Tensor) -> Tensor:
        """A step coefficient ready to multiply ``like``: looked up, broadcast, cast to its dtype."""
        value = schedules.broadcast_to_sample(self._lookup(name, t, like), like)
        return value.to(like.dtype)

    # -- forward process and training targets ------------------------------------------------
    def add_noise(self, original: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """x_t from x0 and noise at training timesteps t (a long tensor of shape (B,), or a scalar)."""
        return schedules.add_noise(original, noise, self._lookup("alpha_bar", t, original))

    def get_velocity(self, original: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """The v target at t: sqrt(ab) eps - sqrt(1 - ab) x0."""
        return schedules.predict_v(original, noise, self._lookup("alpha_bar", t, original))

    def training_target(self, original: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """What the model learns to output: the noise, or v, by ``config.prediction_type``."""
        if self.config.prediction_type == "epsilon":
            return noise
        return self.get_velocity(original, noise, t)

    def predict_original(self, model_output: Tensor, t: Tensor | int, sample: Tensor) -> Tensor:
        """The x0 a model output implies at t (clipped when ``config.clip_sample`` is set)."""
        alpha_bar = self._lookup("alpha_bar", t, sample)
        return self._split(model_output, alpha_bar, sample, need_noise=False)[0]

    def _split(self, model_output: Tensor, alpha_bar: Tensor, sample: Tensor,
               need_noise: bool = True, clip: bool = True) -> tuple[Tensor, Tensor | None]:
        """(x0, epsilon) implied by a model output at noise level alpha_bar.

        After clipping x0 (``config.clip_sample``; ``clip=False`` skips it), epsilon is recomputed
        from the clipped x0 so that the pair stays consistent with the sample; without clipping it
        is taken from the output directly (recomputing would divide by a small sqrt(1 - ab)).
        """
        eps: Tensor | None = None
        if self.config.prediction_type == "epsilon":
            x0 = schedules.predict_start_from_noise(sample, model_output, alpha_bar)
            eps = model_output
        else:
            x0 = schedules.predict_start_from_v(sample, model_output, alpha_bar)
            if need_noise:
                eps = schedules.predict_noise_from_v(sample, model_output, alpha_bar)
        bound = self.config.clip_sample
        if clip and bound is not None:
            x0 = x0.clamp(-bound, bound)
            if need_noise:
                eps = schedules.predict_noise_from_start(sample, x0, alpha_bar)
        return x0, eps

    # -- reverse process ---------------------------------------------------------------------
    def step(self, model_output: Tensor, t: Tensor | int, sample: Tensor,
             generator: torch.Generator | None = None) -> StepOutput:
        """One reverse step from timestep t to the next scheduled timestep below it."""
        raise NotImplementedError


def draw_noise(like: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Standard normal noise shaped like ``like``, drawn on the generator's device, then moved.

    Drawing on the generator's device lets a CPU generator seed GPU sampling reproducibly.
    """
    device = generator.device if generator is not None else like.device
    noise = torch.randn(like.shape, generator=generator, device=device, dtype=like.dtype)
    return noise.to(like.device)
