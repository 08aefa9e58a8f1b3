"""Stage ``vqgan``: the 3D VQ-GAN autoencoder.

Generator loss: L1 reconstruction + commitment; after ``disc_start`` steps (the discriminator
warm-up) also hinge adversarial terms from a 2D patch discriminator on random slices and a 3D patch
discriminator on volumes, plus discriminator feature matching. A perceptual loss runs only with a
local TorchScript feature extractor given as ``perceptual_weights`` (nothing is downloaded);
without it the loss is off and the log says so.

Distributed (see :mod:`bids_app.distributed`): the autoencoder and the discriminators are each
wrapped in DDP. The generator's adversarial terms look through a gradient-free view of the
discriminators (:func:`_frozen`), so the discriminators' gradients come from their own loss only, which
lets both losses accumulate over micro-steps; the discriminators see real and fake slices in one forward
(DDP reduces once per forward/backward pair). The codebook statistics are all-reduced and restarts draw
from every rank's latents (:meth:`VQGANStage._synchronise_codebook`).
"""
from __future__ import annotations

import logging
from typing import Any, Mapping

import torch
import torch.nn.functional as F

from bids_app.models.discriminators import (
    DiscriminatorConfig,
    SliceSelection,
    build_discriminators,
    draw_slices,
    feature_matching_loss,
    hinge_d_loss,
    hinge_g_loss,
    take_slices,
)
from bids_app.models.vqgan import PRESETS as VQGAN_PRESETS
from bids_app.errors import BadDataError
from bids_app.models.quantizer import CodebookStatistics
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
        context: loop.StageContext = loop.StageContext(),
    ) -> None:
        device, seed, dist = context.device, context.seed, context.dist
        figures_dir = context.figures
        torch.manual_seed(seed)
        self.config, self.disc_config, self.settings = config, disc_config, settings
        self.train_data, self.validation_data = train_data, validation_data
        self.device, self.seed, self.figures_dir, self.dist = device, seed, figures_dir, dist
        self.model = VQGAN(config).to(device).set_activation_checkpointing(settings.activation_checkpointing)
        self.d2, self.d3 = (d.to(device) if d is not None else None for d in build_discriminators(disc_config))
        self._synchronise_codebook()
        # The wrapped modules train; the plain ones are checkpointed, validated and exported.
        self.model_ddp = dist.wrap(self.model)
        self.d2_ddp, self.d3_ddp = (dist.wrap(d) if d is not None else None for d in (self.d2, self.d3))
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
        """One step of generator and discriminators, each accumulated over the step's micro-batches."""
        self.model.train()
        adversarial = step >= self.settings.disc_start
        self.opt_g.zero_grad(set_to_none=True)
        self.opt_d.zero_grad(set_to_none=True)
        totals: dict[str, float] = {}
        micro_batches = loop.micro_batches(step, self.settings.batch_size, self.settings.accumulation_steps,
                                           len(self.train_data), self.seed, self.dist)
        for micro in micro_batches:
            batch = loop.load_items(self.train_data, micro.items, self.device)
            loop.add_metrics(totals, self._micro_step(batch["image"], micro, adversarial), 1.0 / micro.count)
        loop.apply_gradients(self.opt_g, self.model.parameters(), self.scaler_g, self.settings.clip_norm,
                             "vqgan generator loss")
        if adversarial:
            loop.apply_gradients(self.opt_d, self._disc_parameters(), self.scaler_d, self.settings.clip_norm,
                                 "discriminator loss")
        metrics = self.dist.mean_metrics(totals, self.device)
        if self.settings.figure_every and (step + 1) % self.settings.figure_every == 0 and self.dist.is_main:
            metrics.update(self.validate(step + 1))
        return metrics

    def _micro_step(self, real: torch.Tensor, micro: loop.MicroBatch, adversarial: bool) -> dict[str, float]:
        """Forward and backward of one micro-batch (gradients synchronised on the last one only)."""
        scale = 1.0 / micro.count
        with loop.sync_gradients([self.model_ddp], micro.last):
            with loop.autocast(self.device, self.settings.precision):
                out = self.model_ddp(real, self.generator)
                reconstruction = F.l1_loss(out.reconstruction.float(), real)
                loss_g = reconstruction + out.commitment_loss
                perceptual = None
                if self.perceptual is not None:
                    chosen = self._slices(real, micro)
                    perceptual = self.perceptual(take_slices(real, chosen), take_slices(out.reconstruction, chosen))
                    loss_g = loss_g + self.settings.perceptual_weight * perceptual
                gan_g = fm = torch.zeros((), device=real.device)
                if adversarial:
                    selection = self._slices(real, micro) if self.d2 is not None else None
                    gan_g, fm = self._generator_terms(real, out.reconstruction, selection)
                    loss_g = loss_g + self.settings.disc_weight * gan_g + self.settings.feature_matching_weight * fm
            loop.backward(loss_g * scale, self.scaler_g, "vqgan generator loss")
        metrics = {"l1": float(reconstruction.detach()), "commitment": float(out.commitment_loss.detach()),
                   "perplexity": float(out.perplexity), "dead_codes": float(out.dead_codes)}
        if perceptual is not None:
            metrics["perceptual"] = float(perceptual.detach())
        if adversarial:
            discriminators = [d for d in (self.d2_ddp, self.d3_ddp) if d is not None]
            with loop.sync_gradients(discriminators, micro.last):
                with loop.autocast(self.device, self.settings.precision):
                    loss_d = self._discriminator_loss(real, out.reconstruction.detach(), selection)
                loop.backward(loss_d * scale, self.scaler_d, "discriminator loss")
            metrics.update(g_adv=float(gan_g.detach()), feature_matching=float(fm.detach()), d_loss=float(loss_d.detach()))
        return metrics

    def _slices(self, real: torch.Tensor, micro: loop.MicroBatch) -> SliceSelection:
        """Slice positions drawn for the whole micro-batch (same draws on every rank); this rank's rows."""
        selection = draw_slices((micro.size, *real.shape[1:]), self.disc_config.slices_per_volume, self.generator)
        return SliceSelection(selection.axis, selection.indices[micro.shard])

    def _generator_terms(self, real: torch.Tensor, fake: torch.Tensor, selection: SliceSelection | None):
        gan, fm = [], []
        if self.d2 is not None:
            fake_logits, fake_feats = _frozen(self.d2, take_slices(fake, selection))
            with torch.no_grad():
                _, real_feats = self.d2(take_slices(real, selection))
            gan.append(hinge_g_loss(fake_logits))
            fm.append(feature_matching_loss(real_feats, fake_feats))
        if self.d3 is not None:
            fake_logits, fake_feats = _frozen(self.d3, fake)
            with torch.no_grad():
                _, real_feats = self.d3(real)
            gan.append(hinge_g_loss(fake_logits))
            fm.append(feature_matching_loss(real_feats, fake_feats))
        return torch.stack(gan).mean(), torch.stack(fm).mean()

    def _discriminator_loss(self, real: torch.Tensor, fake: torch.Tensor, selection: SliceSelection | None) -> torch.Tensor:
        """Hinge loss with real and fake in one forward per discriminator."""
        losses = []
        if self.d2_ddp is not None:
            slices = torch.cat([take_slices(real, selection), take_slices(fake, selection)])
            real_logits, fake_logits = self.d2_ddp(slices)[0].chunk(2)
            losses.append(hinge_d_loss(real_logits, fake_logits))
        if self.d3_ddp is not None:
            real_logits, fake_logits = self.d3_ddp(torch.cat([real, fake]))[0].chunk(2)
            losses.append(hinge_d_loss(real_logits, fake_logits))
        return torch.stack(losses).mean()

    def _synchronise_codebook(self) -> None:
        """Distributed: all-reduce the codebook statistics and draw restarts from every rank's latents."""
        if not self.dist.enabled:
            return
        dist = self.dist

        def reduce(stats: CodebookStatistics) -> CodebookStatistics:
            return CodebookStatistics(dist.all_reduce_sum_(stats.counts.clone()), dist.all_reduce_sum_(stats.sums.clone()))

        self.model.quantizer.reduce_statistics = reduce
        self.model.quantizer.gather_rows = dist.all_gather_cat

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


def _frozen(discriminator: torch.nn.Module, x: torch.Tensor):
    """The discriminator's output with its weights treated as constants: the generator's loss sends
    gradients into ``x`` only, never into the discriminator (whose optimiser sees only its own loss)."""
    weights = {name: p.detach() for name, p in discriminator.named_parameters()}
    return torch.func.functional_call(discriminator, weights, (x,))
