"""Schedules, config, and the scheduler contract run on DDIM; known regions; chains denoised together."""
from __future__ import annotations

import json

import pytest
import torch

from bids_app.schedulers import DDIMScheduler, SchedulerConfig, denoise_chains, start_chain
from bids_app.schedulers import schedules as S
from tests.schedulers.mixin import SchedulerContract


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors gain nothing from intra-op threads, and on a shared 2-core runner the thread
    pool's contention made these tests several times slower; restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# -- the contract, on each scheduler ------------------------------------------------------------
class TestDDIM(SchedulerContract):
    def make(self, config: SchedulerConfig | None = None) -> DDIMScheduler:
        return DDIMScheduler(config)


# -- schedules -------------------------------------------------------------------------------
@pytest.mark.parametrize("betas", [S.linear_betas(1000), S.cosine_betas(1000), S.cosine_betas(10),
                                   S.linear_betas(10, 1e-3, 0.2)], ids=["linear", "cosine", "cosine10", "linear10"])
def test_schedules_are_monotone_with_alpha_bar_in_unit_interval(betas: torch.Tensor) -> None:
    assert betas.dtype == torch.float64
    assert torch.all(betas[1:] >= betas[:-1]) and betas.min() > 0 and betas.max() < 1
    alpha_bar = S.alphas_cumprod_from_betas(betas)
    assert torch.all(alpha_bar[1:] < alpha_bar[:-1])
    assert alpha_bar.min() > 0 and alpha_bar.max() < 1


def test_schedule_end_points() -> None:
    linear = S.linear_betas(1000)
    assert linear[0] == pytest.approx(1e-4) and linear[-1] == pytest.approx(0.02)
    cosine = S.alphas_cumprod_from_betas(S.cosine_betas(1000))
    assert cosine[0] > 0.9999 and cosine[-1] < 1e-8  # close to zero terminal SNR
    assert S.cosine_betas(1000).max() == pytest.approx(0.999)


@pytest.mark.parametrize("call", [lambda: S.linear_betas(0), lambda: S.linear_betas(10, 0.1, 0.01),
                                  lambda: S.cosine_betas(10, max_beta=1.0), lambda: S.make_betas("sigmoid", 10)])
def test_schedules_reject_bad_arguments(call) -> None:
    with pytest.raises(ValueError):
        call()


def test_conversions_are_mutually_consistent_and_broadcast() -> None:
    g = torch.Generator().manual_seed(0)
    x0, eps = (torch.randn(3, 2, 4, 4, 4, generator=g, dtype=torch.float64) for _ in range(2))
    ab = torch.tensor([0.999, 0.5, 1e-3], dtype=torch.float64)
    x_t = S.add_noise(x0, eps, ab)
    for i in range(3):  # (B,) broadcasts per sample
        torch.testing.assert_close(x_t[i], ab[i].sqrt() * x0[i] + (1 - ab[i]).sqrt() * eps[i])
    v = S.predict_v(x0, eps, ab)
    torch.testing.assert_close(S.predict_start_from_noise(x_t, eps, ab), x0)
    torch.testing.assert_close(S.predict_noise_from_start(x_t, x0, ab), eps)
    torch.testing.assert_close(S.predict_start_from_v(x_t, v, ab), x0)
    torch.testing.assert_close(S.predict_noise_from_v(x_t, v, ab), eps)
    torch.testing.assert_close(S.add_noise(x0, eps, 0.25), 0.5 * x0 + 0.75 ** 0.5 * eps)  # float alpha_bar


def test_conversions_cast_float64_coefficients_to_the_sample_dtype() -> None:
    x = torch.randn(2, 1, 2, 2, 2)
    out = S.add_noise(x, x, torch.tensor([0.3, 0.6], dtype=torch.float64))
    assert out.dtype == torch.float32


# -- config ------------------------------------------------------------------------------------
def test_scheduler_config_round_trips_through_json() -> None:
    config = SchedulerConfig(num_train_timesteps=500, schedule="linear", beta_end=0.03,
                             prediction_type="v_prediction", clip_sample=3.0)
    assert SchedulerConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config


def test_scheduler_config_names_unknown_keys() -> None:
    with pytest.raises(ValueError, match="betaend.*eta|eta.*betaend"):
        SchedulerConfig.from_dict({"betaend": 0.02, "eta": 0.0})


@pytest.mark.parametrize("values", [{"schedule": "sigmoid"}, {"prediction_type": "sample"},
                                    {"num_train_timesteps": 0}, {"beta_start": 0.1, "beta_end": 0.01},
                                    {"clip_sample": 0.0}])
def test_scheduler_config_rejects_bad_values(values: dict) -> None:
    with pytest.raises(ValueError):
        SchedulerConfig(**values)


def test_respaced_step_goes_to_the_next_scheduled_timestep() -> None:
    scheduler = DDIMScheduler()
    scheduler.set_timesteps(4)
    assert scheduler.timesteps.tolist() == [999, 749, 499, 249]
    prev = scheduler._tables["alpha_bar_prev"]
    ab = scheduler.alphas_cumprod
    assert prev[999] == ab[749] and prev[750] == ab[749] and prev[749] == ab[499] and prev[249] == 1.0


# -- DDIM draws nothing ---------------------------------------------------------------------
def test_a_ddim_step_draws_no_noise() -> None:
    scheduler = DDIMScheduler()
    g = torch.Generator().manual_seed(0)
    state = g.get_state()
    scheduler.step(torch.randn(1, 1, 2, 2, 2), scheduler.timesteps[3], torch.randn(1, 1, 2, 2, 2), g)
    assert torch.equal(g.get_state(), state)


# -- chains with a known region --------------------------------------------------------------
def test_known_region_holds_the_original_and_only_the_editable_part_changes() -> None:
    config = SchedulerConfig(num_train_timesteps=100)
    x0 = torch.randn(1, 2, 4, 4, 6, generator=torch.Generator().manual_seed(0))

    def model(z, t, _conditions):  # any deterministic "network"
        return 0.3 * z + 0.1

    def run(editable):
        scheduler = DDIMScheduler(config)
        chain = start_chain(scheduler, x0, scheduler.img2img_timesteps(0.6, 10), torch.Generator().manual_seed(3),
                            editable)
        return denoise_chains(model, [chain])[0]

    assert torch.equal(run(torch.zeros(1, 1, 4, 4, 6)), x0), "nothing editable: the input comes back exactly"
    free = run(None)
    assert torch.allclose(run(torch.ones(1, 1, 4, 4, 6)), free), "all editable: plain img2img"
    half = torch.zeros(1, 1, 4, 4, 6)
    half[..., 3:] = 1
    partial = run(half)
    assert torch.equal(partial[..., :3], x0[..., :3])
    assert not torch.allclose(partial[..., 3:], x0[..., 3:])


def test_the_model_sees_the_clean_original_outside_the_patch() -> None:
    """Patched noising: at every step the model sees the clean x0 outside the editable patch."""
    config = SchedulerConfig(num_train_timesteps=100)
    x0 = torch.randn(1, 2, 4, 4, 6, generator=torch.Generator().manual_seed(0))
    patch = torch.zeros(1, 1, 4, 4, 6)
    patch[..., 2:4] = 1
    seen: list[torch.Tensor] = []

    def model(z, t, _conditions):
        seen.append(z.clone())
        return 0.3 * z + 0.1

    scheduler = DDIMScheduler(config)
    chain = start_chain(scheduler, x0, scheduler.img2img_timesteps(0.6, 3), torch.Generator().manual_seed(3), patch)
    result = denoise_chains(model, [chain])[0]
    outside = (patch == 0).expand_as(x0)
    assert len(seen) == 3  # the three timesteps asked for: 59, 39, 20
    assert all(torch.equal(z[outside], x0[outside]) for z in seen)
    assert not torch.allclose(seen[0][~outside], x0[~outside]), "the patch itself starts noised"
    assert torch.equal(result[outside], x0[outside])
    assert not torch.allclose(result[~outside], x0[~outside])


def test_a_chain_without_timesteps_is_finished_and_holds_the_input() -> None:
    x0 = torch.randn(1, 2, 4, 4, 6)
    chain = start_chain(DDIMScheduler(), x0, [], torch.Generator().manual_seed(0), torch.ones(1, 1, 4, 4, 6), "c")
    assert chain.done and chain.start is None and chain.sample is x0 and chain.condition == "c"
    assert denoise_chains(lambda z, t, _: 1 / 0, [chain])[0] is x0


def test_chains_denoised_together_equal_chains_run_alone() -> None:
    """Different lengths, starts, conditions and generators in one batch: each chain gets its own t,
    condition and starting noise, as when run alone."""
    config = SchedulerConfig(num_train_timesteps=100)
    x0 = torch.randn(1, 2, 4, 4, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64)

    def model(z, t, conditions):
        scale = torch.tensor([c for c in conditions], dtype=z.dtype).view(-1, 1, 1, 1, 1)
        return scale * z + 0.01 * t.to(z.dtype).view(-1, 1, 1, 1, 1)

    def chains():
        made = []
        for k, (strength, steps) in enumerate([(0.3, 1), (0.6, 3), (0.9, 5), (0.0, 2)]):
            scheduler = DDIMScheduler(config)
            made.append(start_chain(scheduler, x0, scheduler.img2img_timesteps(strength, steps),
                                    torch.Generator().manual_seed(k), condition=0.1 * (k + 1)))
        return made

    together = denoise_chains(model, chains())
    for max_batch in (1, 2):
        for a, b in zip(together, denoise_chains(model, chains(), max_batch)):
            torch.testing.assert_close(a, b)
    alone = [denoise_chains(model, [c])[0] for c in chains()]
    for a, b in zip(together, alone):
        torch.testing.assert_close(a, b)
    assert together[3] is x0
    with pytest.raises(ValueError, match="max_batch"):
        denoise_chains(model, chains(), 0)
