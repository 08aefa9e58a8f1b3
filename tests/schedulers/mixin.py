"""The contract every scheduler must satisfy, as a mixin (diffusers' SchedulerCommonTest habit).

A test class mixes this in and defines ``make(config)``. Sizes are tiny; float64 where the check
is about the maths.
"""
from __future__ import annotations

import pytest
import torch

from bids_app.schedulers import Scheduler, SchedulerConfig, denoise, denoise_chains, start_chain
from bids_app.schedulers import schedules as S

SHAPE = (2, 2, 4, 4, 4)
CONFIGS = [
    SchedulerConfig(schedule=schedule, prediction_type=prediction)
    for schedule in ("cosine", "linear") for prediction in ("epsilon", "v_prediction")
]
CONFIG_IDS = [f"{c.schedule}-{c.prediction_type}" for c in CONFIGS]


def oracle(scheduler: Scheduler, x0: torch.Tensor):
    """A perfect model for a known x0: the true epsilon (or v) of the current sample."""

    def model_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        alpha_bar = scheduler.alphas_cumprod[t].to(x.dtype)
        eps = S.predict_noise_from_start(x, x0, alpha_bar)
        if scheduler.config.prediction_type == "epsilon":
            return eps
        return S.predict_v(x0, eps, alpha_bar)

    return model_fn


class SchedulerContract:

    def make(self, config: SchedulerConfig | None = None) -> Scheduler:
        raise NotImplementedError

    # -- forward process and targets ---------------------------------------------------------
    @pytest.mark.parametrize("config", CONFIGS, ids=CONFIG_IDS)
    def test_add_noise_matches_closed_form(self, config: SchedulerConfig) -> None:
        scheduler = self.make(config)
        g = torch.Generator().manual_seed(0)
        x0, noise = torch.randn(SHAPE, generator=g), torch.randn(SHAPE, generator=g)
        t = torch.tensor([0, 731])
        ab = scheduler.alphas_cumprod[t].float().view(-1, 1, 1, 1, 1)
        expected = ab.sqrt() * x0 + (1 - ab).sqrt() * noise
        torch.testing.assert_close(scheduler.add_noise(x0, noise, t), expected)

    @pytest.mark.parametrize("config", CONFIGS, ids=CONFIG_IDS)
    def test_velocity_and_start_from_v_invert_each_other(self, config: SchedulerConfig) -> None:
        scheduler = self.make(config)
        g = torch.Generator().manual_seed(1)
        x0, noise = (torch.randn(SHAPE, generator=g, dtype=torch.float64) for _ in range(2))
        t = torch.tensor([3, 998])
        x_t = scheduler.add_noise(x0, noise, t)
        v = scheduler.get_velocity(x0, noise, t)
        ab = scheduler.alphas_cumprod[t]
        torch.testing.assert_close(S.predict_start_from_v(x_t, v, ab), x0)
        torch.testing.assert_close(S.predict_noise_from_v(x_t, v, ab), noise)

    @pytest.mark.parametrize("config", CONFIGS, ids=CONFIG_IDS)
    def test_training_target_and_predict_original(self, config: SchedulerConfig) -> None:
        scheduler = self.make(config)
        g = torch.Generator().manual_seed(2)
        x0, noise = (torch.randn(SHAPE, generator=g, dtype=torch.float64) for _ in range(2))
        t = torch.tensor([10, 500])
        target = scheduler.training_target(x0, noise, t)
        if config.prediction_type == "epsilon":
            assert torch.equal(target, noise)
        else:
            torch.testing.assert_close(target, scheduler.get_velocity(x0, noise, t))
        x_t = scheduler.add_noise(x0, noise, t)
        torch.testing.assert_close(scheduler.predict_original(target, t, x_t), x0)

    def test_clip_sample_bounds_the_prediction(self) -> None:
        scheduler = self.make(SchedulerConfig(clip_sample=1.0))
        sample = 5 * torch.ones(SHAPE)
        x0 = scheduler.step(torch.zeros(SHAPE), scheduler.timesteps[0], sample).pred_original_sample
        assert x0.abs().max() <= 1.0

    # -- respacing and img2img ---------------------------------------------------------------
    @pytest.mark.parametrize("n", [1, 7, 10, 50, 333, 1000])
    def test_set_timesteps_descending_unique_in_range(self, n: int) -> None:
        scheduler = self.make()
        scheduler.set_timesteps(n)
        ts = scheduler.timesteps
        assert ts.dtype == torch.long and ts.shape == (n,)
        assert ts[0] == 999 and ts.min() >= 0 and ts.max() < 1000
        assert torch.all(ts[:-1] > ts[1:])
        gaps = torch.cat([ts[:-1] - ts[1:], ts[-1:] + 1])  # the last step goes to "t = -1", clean
        assert gaps.max() - gaps.min() <= 1  # evenly spaced, up to integer rounding

    @pytest.mark.parametrize("n", [0, 1001, 2.5])
    def test_set_timesteps_rejects_bad_counts(self, n) -> None:
        with pytest.raises(ValueError):
            self.make().set_timesteps(n)

    @pytest.mark.parametrize("steps", [1, 2, 5, 10, 20, 50])
    @pytest.mark.parametrize("strength", [0.05, 0.3, 0.5, 0.65, 0.8, 1.0])
    def test_img2img_timesteps_start_at_the_strength_evenly_spaced(self, steps: int, strength: float) -> None:
        timesteps = self.make().img2img_timesteps(strength, steps)
        assert timesteps[0] == round(strength * 1000) - 1
        # as many as asked while the range has room for them (0.05 of 1000: 50 timesteps, 49 above 0)
        assert len(timesteps) == steps if steps < timesteps[0] else len(timesteps) <= steps
        assert timesteps == sorted(set(timesteps), reverse=True) and timesteps[-1] >= 0
        gaps = [a - b for a, b in zip(timesteps, [*timesteps[1:], 0])]  # the last step goes to 0
        assert max(gaps) - min(gaps) <= 1, "evenly spaced, up to integer rounding"

    def test_img2img_timesteps_with_one_step_start_at_each_strength(self) -> None:
        """diffusers' respaced-grid rule started one step at 0.5, 0.65 and 0.8 all at t = 499."""
        scheduler = self.make()
        assert [scheduler.img2img_timesteps(s, 1) for s in (0.5, 0.65, 0.8, 1.0)] == [[499], [649], [799], [999]]
        assert scheduler.img2img_timesteps(1.0, 10) == [999, 899, 799, 699, 599, 500, 400, 300, 200, 100]
        assert self.make(SchedulerConfig(num_train_timesteps=100)).img2img_timesteps(0.4, 1) == [39]

    @pytest.mark.parametrize("strength, steps", [(0.0, 1), (0.0004, 3), (0.0001, 1000), (0.5, 0)])
    def test_img2img_timesteps_are_empty_below_one_timestep(self, strength: float, steps: int) -> None:
        assert self.make().img2img_timesteps(strength, steps) == []

    @pytest.mark.parametrize("strength", [-0.1, 1.5])
    def test_img2img_rejects_bad_strength(self, strength: float) -> None:
        with pytest.raises(ValueError, match="strength"):
            self.make().img2img_timesteps(strength, 1)

    def test_strength_zero_returns_input(self) -> None:
        scheduler = self.make()
        x0 = torch.randn(SHAPE)
        calls = []
        chain = start_chain(scheduler, x0, scheduler.img2img_timesteps(0.0, 10), torch.Generator().manual_seed(0))
        assert chain.done and chain.sample is x0 and chain.start is None
        assert denoise_chains(lambda x, t, _: calls.append(t) or x, [chain])[0] is x0 and not calls
        assert denoise(lambda x, t: x, scheduler, x0, scheduler.timesteps[:0]) is x0

    def test_a_chain_noises_to_the_step_it_starts_at(self) -> None:
        scheduler = self.make()
        x0 = torch.randn(SHAPE)
        seen: list[tuple[torch.Tensor, torch.Tensor]] = []

        def model_fn(x: torch.Tensor, t: torch.Tensor, _conditions) -> torch.Tensor:
            seen.append((x.clone(), t.clone()))
            return torch.zeros_like(x)

        chain = start_chain(scheduler, x0, scheduler.img2img_timesteps(0.4, 4), torch.Generator().manual_seed(3))
        start = chain.start
        denoise_chains(model_fn, [chain])
        assert start == 399 and len(seen) == 4
        assert [int(t[0]) for _, t in seen] == scheduler.timesteps.tolist() == [399, 299, 200, 100]
        first_x, first_t = seen[0]
        assert torch.equal(first_t, torch.full((SHAPE[0],), start))
        noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(3))
        torch.testing.assert_close(first_x, scheduler.add_noise(x0, noise, first_t))

    # -- sampling ----------------------------------------------------------------------------
    @pytest.mark.parametrize("config", CONFIGS, ids=CONFIG_IDS)
    @pytest.mark.parametrize("n, dtype, atol", [(1, torch.float64, 1e-9), (25, torch.float64, 1e-9),
                                                (25, torch.float32, 1e-5)])
    def test_oracle_reconstructs_x0_from_pure_noise(self, config: SchedulerConfig, n: int,
                                                     dtype: torch.dtype, atol: float) -> None:
        """The oracle's x0 is exact, so every sampler must land on x0 (float32: rounding only).

        Not float32 with n = 1: x0 = (x_T - sqrt(1 - ab) eps) / sqrt(ab) at the top of the cosine
        schedule divides float32 rounding by sqrt(ab) ~ 5e-5.
        """
        scheduler = self.make(config)
        g = torch.Generator().manual_seed(4)
        x0 = torch.randn(SHAPE, generator=g, dtype=dtype)
        scheduler.set_timesteps(n)
        noise = torch.randn(SHAPE, generator=g, dtype=dtype)
        out = denoise(oracle(scheduler, x0), scheduler, noise, scheduler.timesteps, g)
        torch.testing.assert_close(out, x0, atol=atol, rtol=0)

    @pytest.mark.parametrize("config", CONFIGS[:2], ids=CONFIG_IDS[:2])
    def test_one_step_keeps_the_forward_marginal(self, config: SchedulerConfig) -> None:
        """x_t ~ q(x_t | x0) stepped with the oracle must be ~ q(x_s | x0) = N(sqrt(ab_s) x0, 1 - ab_s)."""
        scheduler = self.make(config)
        scheduler.set_timesteps(10)
        t, s = scheduler.timesteps[3], scheduler.timesteps[4]
        g = torch.Generator().manual_seed(5)
        x0 = torch.full((1, 1, 64, 64, 64), 0.7, dtype=torch.float64)
        x_t = scheduler.add_noise(x0, torch.randn(x0.shape, generator=g, dtype=torch.float64), t)
        x_s = scheduler.step(oracle(scheduler, x0)(x_t, t.expand(1)), t, x_t, g).prev_sample
        ab_s = scheduler.alphas_cumprod[s]
        assert abs(x_s.mean() - ab_s.sqrt() * 0.7) < 0.01
        assert abs(x_s.std() - (1 - ab_s).sqrt()) < 0.01

    def test_batched_timesteps_match_per_sample_steps(self) -> None:
        scheduler = self.make()
        g = torch.Generator().manual_seed(6)
        sample, output = torch.randn(SHAPE, generator=g), torch.randn(SHAPE, generator=g)
        t = torch.tensor([999, 420])
        batched = scheduler.step(output, t, sample, torch.Generator().manual_seed(0))
        for i in range(SHAPE[0]):
            single = scheduler.step(output[i:i + 1], t[i], sample[i:i + 1], torch.Generator().manual_seed(0))
            torch.testing.assert_close(batched.pred_original_sample[i:i + 1], single.pred_original_sample)
            torch.testing.assert_close(batched.prev_sample[i:i + 1], single.prev_sample)

    @pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
    def test_step_keeps_the_sample_dtype(self, dtype: torch.dtype) -> None:
        scheduler = self.make()
        sample = torch.randn(SHAPE, dtype=dtype)
        out = scheduler.step(torch.randn(SHAPE, dtype=dtype), scheduler.timesteps[5], sample, torch.Generator())
        assert out.prev_sample.dtype == dtype and out.pred_original_sample.dtype == dtype
        assert scheduler.add_noise(sample, sample, torch.tensor([1, 2])).dtype == dtype

    def test_generator_determinism(self) -> None:
        scheduler = self.make()
        scheduler.set_timesteps(8)
        start = torch.randn(SHAPE, generator=torch.Generator().manual_seed(7))

        def model_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return 0.5 * x

        def run(seed: int) -> torch.Tensor:
            return denoise(model_fn, scheduler, start, scheduler.timesteps, torch.Generator().manual_seed(seed))

        assert torch.equal(run(0), run(0))
        assert torch.equal(run(0), run(1)), "a deterministic step draws nothing from the generator"

    def test_last_step_adds_no_noise(self) -> None:
        scheduler = self.make()
        scheduler.set_timesteps(10)
        sample, output = torch.randn(SHAPE), torch.randn(SHAPE)
        t = scheduler.timesteps[-1]
        a = scheduler.step(output, t, sample, torch.Generator().manual_seed(0)).prev_sample
        b = scheduler.step(output, t, sample, torch.Generator().manual_seed(1)).prev_sample
        assert torch.equal(a, b)
        torch.testing.assert_close(a, scheduler.predict_original(output, t, sample))
