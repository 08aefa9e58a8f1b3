"""Stage ``vqgan``: the 3D VQ-GAN autoencoder.

Generator loss: L1 reconstruction + commitment; after ``disc_start`` steps (the discriminator
warm-up) also hinge adversarial terms from a 2D patch discriminator on random slices and a 3D patch
discriminator on volumes, plus discriminator feature matching. A perceptual loss runs only with a
local TorchScript feature extractor given as ``perceptual_weights`` (nothing is downloaded);
without it the loss is off and the log says so.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Mapping

import torch
import torch.nn.functional as F

from bids_app.models.discriminators import (
    DiscriminatorConfig,
    build_discriminators,
    feature_matching_loss,
    hinge_d_loss,
    hinge_g_loss,
    random_slices,
)
from bids_app.models.vqgan import PRESETS as VQGAN_PRESETS
from bids_app.errors import BadDataError
from bids_app.models.vqgan import VQGAN, VQGANConfig
from bids_app.settings import VQGANStageSettings
from bids_app.training import loop
from bids_app.training.checkpoint import restore_rng_state, rng_state
from bids_app.training.figures import save_volume_figure
from bids_app.training.perceptual import PerceptualLoss

log = logging.getLogger(__name__)


def vqgan_config(preset: str, overrides: Mapping[str, Any]) -> VQGANConfig:
    base = VQGAN_PRESETS[preset]().to_dict()
    return VQGANConfig.from_dict({**base, **overrides})


class VQGANStage:
    """One optimisation step of generator and discriminators per ``train_step``."""

    name = "vqgan"

    def __init__(
        self,
        config: VQGANConfig,
        disc_config: DiscriminatorConfig,
        settings: VQGANStageSettings,
        train_data: Any,
        validation_data: Any,
        device: str,
        seed: int,
        figures_dir: Path | None = None,
    ) -> None:
        torch.manual_seed(seed)
        self.config, self.disc_config, self.settings = config, disc_config, settings
        self.train_data, self.validation_data = train_data, validation_data
        self.device, self.seed, self.figures_dir = device, seed, figures_dir
        self.model = VQGAN(config).to(device)
        self.d2, self.d3 = (d.to(device) if d is not None else None for d in build_discriminators(disc_config))
        self.generator = torch.Generator(device=device).manual_seed(seed)
        self.opt_g = torch.optim.Adam(self.model.parameters(), lr=settings.learning_rate, betas=(0.5, 0.9))
        self.opt_d = torch.optim.Adam(self._disc_parameters(), lr=settings.learning_rate, betas=(0.5, 0.9))
        self.scaler_g = loop.make_scaler(device, settings.precision)
        self.scaler_d = loop.make_scaler(device, settings.precision)
        self.perceptual = None
        if settings.perceptual_weights is not None:
            self.perceptual = PerceptualLoss(settings.perceptual_weights, device)
        else:
            log.info("vqgan: perceptual loss off (no local weights file; nothing is downloaded)")

    def train_step(self, step: int) -> dict[str, float]:
        self.model.train()
        batch = loop.load_batch(self.train_data, step, self.settings.batch_size, self.seed, self.device)
        real = batch["image"]
        adversarial = step >= self.settings.disc_start
        with loop.autocast(self.device, self.settings.precision):
            out = self.model(real, self.generator)
            reconstruction = F.l1_loss(out.reconstruction.float(), real)
            loss_g = reconstruction + out.commitment_loss
            perceptual = None
            if self.perceptual is not None:
                real_slices, chosen = random_slices(real, self.disc_config.slices_per_volume, self.generator)
                fake_slices, _ = random_slices(out.reconstruction, self.disc_config.slices_per_volume, selection=chosen)
                perceptual = self.perceptual(real_slices, fake_slices)
                loss_g = loss_g + self.settings.perceptual_weight * perceptual
            gan_g = fm = torch.zeros((), device=real.device)
            if adversarial:
                gan_g, fm, selection = self._generator_terms(real, out.reconstruction)
                loss_g = loss_g + self.settings.disc_weight * gan_g + self.settings.feature_matching_weight * fm
        loop.optimizer_step(loss_g, self.opt_g, self.model.parameters(), self.scaler_g,
                            self.settings.clip_norm, "vqgan generator loss")
        metrics = {"l1": float(reconstruction.detach()), "commitment": float(out.commitment_loss.detach()),
                   "perplexity": float(out.perplexity), "dead_codes": float(out.dead_codes)}
        if perceptual is not None:
            metrics["perceptual"] = float(perceptual.detach())
        if adversarial:
            with loop.autocast(self.device, self.settings.precision):
                loss_d = self._discriminator_loss(real, out.reconstruction.detach(), selection)
            loop.optimizer_step(loss_d, self.opt_d, self._disc_parameters(), self.scaler_d,
                                self.settings.clip_norm, "discriminator loss")
            metrics.update(g_adv=float(gan_g.detach()), feature_matching=float(fm.detach()), d_loss=float(loss_d.detach()))
        if self.settings.figure_every and (step + 1) % self.settings.figure_every == 0:
            metrics.update(self.validate(step + 1))
        return metrics

    def _generator_terms(self, real: torch.Tensor, fake: torch.Tensor):
        gan, fm = [], []
        selection = None
        if self.d2 is not None:
            real_slices, selection = random_slices(real, self.disc_config.slices_per_volume, self.generator)
            fake_slices, _ = random_slices(fake, self.disc_config.slices_per_volume, selection=selection)
            fake_logits, fake_feats = self.d2(fake_slices)
            with torch.no_grad():
                _, real_feats = self.d2(real_slices)
            gan.append(hinge_g_loss(fake_logits))
            fm.append(feature_matching_loss(real_feats, fake_feats))
        if self.d3 is not None:
            fake_logits, fake_feats = self.d3(fake)
            with torch.no_grad():
                _, real_feats = self.d3(real)
            gan.append(hinge_g_loss(fake_logits))
            fm.append(feature_matching_loss(real_feats, fake_feats))
        return torch.stack(gan).mean(), torch.stack(fm).mean(), selection

    def _discriminator_loss(self, real: torch.Tensor, fake: torch.Tensor, selection: Any) -> torch.Tensor:
        losses = []
        if self.d2 is not None:
            real_slices, _ = random_slices(real, self.disc_config.slices_per_volume, selection=selection)
            fake_slices, _ = random_slices(fake, self.disc_config.slices_per_volume, selection=selection)
            losses.append(hinge_d_loss(self.d2(real_slices)[0], self.d2(fake_slices)[0]))
        if self.d3 is not None:
            losses.append(hinge_d_loss(self.d3(real)[0], self.d3(fake)[0]))
        return torch.stack(losses).mean()

    @torch.no_grad()
    def validate(self, step: int) -> dict[str, float]:
        """L1 on the (never augmented) validation volumes, and a figure of the first one."""
        data = self.validation_data if len(self.validation_data) else self.train_data
        self.model.eval()
        errors = []
        first = None
        for index in range(len(data)):
            real = data[index]["image"][None].to(self.device)
            reconstruction = self.model.decode(self.model.quantize(self.model.encode(real)).quantized)
            errors.append(float(F.l1_loss(reconstruction, real)))
            first = first if first is not None else (real[0, 0], reconstruction[0, 0])
        self.model.train()
        if self.figures_dir is not None and first is not None:
            save_volume_figure(self.figures_dir / f"vqgan_reconstruction_step-{step:06d}.png", first)
        return {"val_l1": sum(errors) / len(errors)}

    def _disc_parameters(self) -> list[torch.nn.Parameter]:
        return [p for d in (self.d2, self.d3) if d is not None for p in d.parameters()]

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {
            "model": self.model.state_dict(),
            "d2": self.d2.state_dict() if self.d2 is not None else {},
            "d3": self.d3.state_dict() if self.d3 is not None else {},
            "opt_g": self.opt_g.state_dict(),
            "opt_d": self.opt_d.state_dict(),
            "rng": rng_state(self.generator),
            "config": self.config.to_dict(),
        }
        for name, scaler in (("scaler_g", self.scaler_g), ("scaler_d", self.scaler_d)):
            if scaler is not None:
                state[name] = scaler.state_dict()
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state["config"] != self.config.to_dict():
            raise BadDataError("the vqgan checkpoint in the work dir was made with another architecture: "
                               "delete it or use --retrain")
        self.model.load_state_dict(state["model"])
        if self.d2 is not None:
            self.d2.load_state_dict(state["d2"])
        if self.d3 is not None:
            self.d3.load_state_dict(state["d3"])
        self.opt_g.load_state_dict(state["opt_g"])
        self.opt_d.load_state_dict(state["opt_d"])
        for name, scaler in (("scaler_g", self.scaler_g), ("scaler_d", self.scaler_d)):
            if scaler is not None and name in state:
                scaler.load_state_dict(state[name])
        restore_rng_state(state["rng"], self.generator)

    def inference_weights(self) -> dict[str, torch.Tensor]:
        return self.model.state_dict()
