"""The training stages as a table: name (= folder and ``--stages`` name), identity and builder.

A stage's identity (its architecture and the checksums of what it was trained on) decides whether a
stored component is still valid and whether a checkpoint may be resumed. Each stage trains through
the same steps (:func:`train_stage`): skip when finished, resume or start afresh, train, store.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

from bids_app.data import AugmentationSettings, TrainingVolumes
from bids_app.distributed import Distributed
from bids_app.errors import MissingInputError, UsageError
from bids_app.model_store import is_finished, load_unet, load_vqgan, read_stage, store_component
from bids_app.models.adapter import AdapterConfig
from bids_app.models.discriminators import DiscriminatorConfig
from bids_app.schedulers import SchedulerConfig
from bids_app.settings import RunSettings, StageSettings
from bids_app.training import loop
from bids_app.training.adapter import AdapterStage
from bids_app.training.identity import describe_differences, differences, read_identity, record_identity, without_budget
from bids_app.training.diffusion import DiffusionStage, latent_scale, unet_config
from bids_app.training.preparation import PreparedData
from bids_app.training.vqgan import VQGANStage, vqgan_config
from bids_app.workspace import checkpoints_dir

log = logging.getLogger(__name__)


@dataclass
class TrainingRun:
    """What every stage needs: the run's settings and data, where to compute, what earlier stages left."""

    settings: RunSettings
    prepared: PreparedData
    device: str
    dist: Distributed
    #: What the model is trained on and with (``bids_app.training.identity``): every checkpoint records it.
    identity: Mapping[str, Any] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)  # each stage's record, once it ran
    _vqgan: Any = None

    @property
    def seed(self) -> int:
        return self.settings.compute.seed

    @property
    def cache(self) -> Path:
        return self.settings.work_dir / "cache"

    @property
    def checkpoints(self) -> Path:
        return checkpoints_dir(self.settings.work_dir, self.settings.model_dir)

    @property
    def context(self) -> loop.StageContext:
        figures = self.settings.model_dir / "figures" if self.dist.is_main else None
        return loop.StageContext(self.device, self.seed, self.dist, figures)

    @property
    def augment(self) -> AugmentationSettings | None:
        return AugmentationSettings() if self.settings.training.augment else None

    def vqgan(self) -> Any:
        """The trained autoencoder (loaded once, shared by the later stages), or None."""
        directory = self.settings.model_dir / "vqgan"
        if self._vqgan is None and is_finished(directory):
            self._vqgan = load_vqgan(directory, self.device)
        return self._vqgan


@dataclass(frozen=True)
class StagePlan:
    """One stage about to train: its identity, how to build it, what its component records besides."""

    identity: Mapping[str, Any]
    build: Callable[[], Any]
    extra: Callable[[Any], Mapping[str, Any]]


def plan_vqgan(run: TrainingRun) -> StagePlan:
    settings = run.settings
    config = vqgan_config(settings.preset, settings.models.vqgan)
    disc_config = DiscriminatorConfig.from_dict(dict(settings.models.discriminator))
    crop = settings.training.vqgan.crop_shape
    augment = AugmentationSettings(crop_shape=tuple(crop)) if run.augment and crop else run.augment
    train, validation = run.prepared.datasets(run.cache, run.seed, augment)
    return StagePlan(config.to_dict(),
                     lambda: VQGANStage(config, disc_config, settings.training.vqgan, train, validation,
                                        run.context),
                     lambda _: {"discriminator": disc_config.to_dict()})


def diffusion_augmentation(augment: AugmentationSettings | None, kind: str) -> AugmentationSettings | None:
    """The diffusion stage's augmentation: all of it (``full``), or no rotations and intensity changes
    (``flip``: random windows, left-right flips and simulated thick slices; measured better for the
    patched objective, docs/benchmarks.md)."""
    if augment is None or kind == "full":
        return augment
    return dataclasses.replace(augment, rotation_degrees=0.0, intensity_scale=0.0, intensity_shift=0.0, gamma=0.0)


def plan_diffusion(run: TrainingRun) -> StagePlan:
    settings, vqgan = run.settings, run.vqgan()
    if vqgan is None:
        raise MissingInputError(f"the diffusion stage needs a trained VQ-GAN in {settings.model_dir / 'vqgan'}: run "
                                "the vqgan stage first")
    config = unet_config(settings.preset, vqgan.config.embedding_dim, settings.models.unet)
    scheduler = SchedulerConfig.from_dict(dict(settings.models.scheduler))
    augment = diffusion_augmentation(run.augment, settings.training.diffusion.augmentation)
    train, _ = run.prepared.datasets(run.cache, run.seed, augment)

    def build() -> DiffusionStage:
        scale = latent_scale(vqgan, TrainingVolumes(run.prepared.train, run.prepared.plan, run.cache), run.device,
                             run.dist)
        log.info("diffusion: latent scale factor %.4f (1 / std of the training latents)", scale)
        return DiffusionStage(vqgan, config, scheduler, settings.training.diffusion, train, scale, run.context)

    return StagePlan({**config.to_dict(), "vqgan_sha256": run.summary["vqgan"]["sha256"]}, build,
                     lambda stage: {"scheduler": scheduler.to_dict(), "latent_scale": stage.scale})


def plan_adapter(run: TrainingRun) -> StagePlan | None:
    """The T2I-Adapter on the training images that have a control derivative; None when none has one."""
    settings, diffusion = run.settings, run.summary["diffusion"]
    if not diffusion:
        return None
    samples = tuple(s for s in run.prepared.train if "control" in s.masks)
    if not samples:
        log.info("adapter: skipped: no training image has the control derivative (default: the cord mask)")
        return None
    vqgan = run.vqgan()
    unet = load_unet(settings.model_dir / "diffusion", run.device)
    config = AdapterConfig.for_models(unet.config, vqgan.config.downsample, **dict(settings.models.adapter))
    patched = settings.training.diffusion
    data = TrainingVolumes(samples, run.prepared.plan, run.cache, augment=run.augment, seed=run.seed)
    return StagePlan(
        {**config.to_dict(), "diffusion_sha256": diffusion["sha256"]},
        lambda: AdapterStage(vqgan, unet, SchedulerConfig.from_dict(diffusion["scheduler"]), config,
                             settings.training.adapter, data, float(diffusion["latent_scale"]), run.context,
                             patch_fraction=patched.patch_fraction, patch_max_size=tuple(patched.patch_max_size)),
        lambda _: {"control": list(settings.selection.control_names) or "cord mask", "n_images": len(samples),
                   "patch_fraction": patched.patch_fraction, "patch_max_size": list(patched.patch_max_size)})


def check_model_settings(settings: RunSettings) -> None:
    """Build every component's config from the preset and the ``models.*`` overrides before any
    stage trains, so a wrong key or value is a usage error (64) now, not a crash hours later."""
    models = settings.models
    try:
        vqgan = vqgan_config(settings.preset, models.vqgan)
        DiscriminatorConfig.from_dict(dict(models.discriminator))
        unet = unet_config(settings.preset, vqgan.embedding_dim, models.unet)
        SchedulerConfig.from_dict(dict(models.scheduler))
        AdapterConfig.for_models(unet, vqgan.downsample, **dict(models.adapter))
    except (TypeError, ValueError, KeyError) as exc:
        raise UsageError(f"models: {exc}") from exc


#: The stages in training order: (name, plan). The name is the model folder and the ``--stages`` name.
STAGES: tuple[tuple[str, Callable[[TrainingRun], StagePlan | None]], ...] = (
    ("vqgan", plan_vqgan),
    ("diffusion", plan_diffusion),
    ("adapter", plan_adapter),
)


def train_stage(run: TrainingRun, name: str, plan: StagePlan) -> None:
    """Train and store one stage unless it finished with this identity (``--retrain`` trains it again)."""
    settings, dist = run.settings, run.dist
    directory = settings.model_dir / name
    if is_finished(directory, plan.identity) and not settings.training.retrain:
        log.info("%s: already trained (%s); --retrain trains it again", name, directory)
        return
    stage_settings: StageSettings = getattr(settings.training, name)
    stage = plan.build()
    result = _run(run, stage, stage_settings, name, plan.identity)
    if dist.is_main:
        store_component(directory, stage.inference_weights(), plan.identity, _summary(result, stage_settings, dist),
                        plan.extra(stage))
    dist.barrier()  # the component is stored before another rank or stage loads it


def finished_record(run: TrainingRun, name: str) -> dict[str, Any]:
    """A stage's stored record when its component is complete, else {}."""
    directory = run.settings.model_dir / name
    return read_stage(directory) if is_finished(directory) else {}


def _run(run: TrainingRun, stage: Any, stage_settings: StageSettings, name: str,
         identity: Mapping[str, Any]) -> loop.StageResult:
    """Train from the stage's checkpoint when there is one. A checkpoint records what it was made
    for: another training (settings, data, plan) is refused (exit 64) unless ``--retrain``; new
    upstream weights (an earlier stage trained again) start the stage afresh."""
    settings, dist = run.settings, run.dist
    checkpoints = run.checkpoints / name
    marker = checkpoints / "identity.json"
    wanted = json.loads(json.dumps({"stage": identity, "plan": run.prepared.plan.to_dict(),
                                    **without_budget(run.identity)}))
    stored = read_identity(marker) if dist.is_main and not settings.training.retrain else None
    if stored is not None:
        changed = differences({k: v for k, v in stored.items() if k != "stage"},
                              {k: v for k, v in wanted.items() if k != "stage"})
        if changed:
            raise UsageError(f"{name}: the checkpoint in {checkpoints} was made by another training: "
                             f"{describe_differences(changed)}; rerun with the settings and data it was made with, "
                             "or --retrain to start afresh")
    stale = stored is not None and stored.get("stage") != wanted["stage"]
    if dist.is_main and (settings.training.retrain or stale or stored is None):
        if stale:
            log.info("%s: the checkpoint in %s was made on other upstream weights or architecture; starting afresh",
                     name, checkpoints)
        shutil.rmtree(checkpoints, ignore_errors=True)
        record_identity(marker, wanted)
    dist.barrier()  # the checkpoint folder is settled before any rank resumes from it
    _log_batch(name, stage_settings, dist)
    log.info("%s: training for up to %d steps%s", name, stage_settings.max_steps,
             f" or {stage_settings.max_time_s:.0f} s" if stage_settings.max_time_s else "")
    result = loop.run_stage(stage, stage_settings, checkpoints, dist)
    log.info("%s: finished at step %d (%s) in %.1f s", name, result.steps, result.stopped_by, result.seconds)
    return result


def _log_batch(name: str, stage_settings: StageSettings, dist: Distributed) -> None:
    """The effective batch and the learning rate, stated: neither changes with the number of processes."""
    per_process = stage_settings.batch_size // (stage_settings.accumulation_steps * dist.world_size)
    log.info("%s: effective batch %d volume(s) per optimiser step = %d process(es) x %d micro-step(s) x %d "
             "volume(s); learning rate %g (as set: not scaled with the batch or the number of processes)",
             name, stage_settings.batch_size, dist.world_size, stage_settings.accumulation_steps, per_process,
             stage_settings.learning_rate)


def _summary(result: loop.StageResult, stage_settings: StageSettings, dist: Distributed) -> dict[str, Any]:
    return {"steps": result.steps, "stopped_by": result.stopped_by, "seconds": round(result.seconds, 2),
            "final_metrics": dict(result.last_metrics), "effective_batch": stage_settings.batch_size,
            "accumulation_steps": stage_settings.accumulation_steps, "learning_rate": stage_settings.learning_rate,
            "processes": dist.world_size}
