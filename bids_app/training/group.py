"""Group-level training: run the stages in order, store each component, write the model card last.

Each component lives in its own folder of the model directory with its config next to its weights
and a ``stage.json`` that marks it finished. Checkpoints live in the work dir; a rerun resumes an
interrupted stage and skips a finished one (``--retrain`` trains again).

Under torchrun every rank runs the training stages (DDP); rank 0 alone writes (checkpoints,
components, figures, the model card), and a barrier follows each write that another rank reads next
(the checkpoint folder before a stage resumes, a component before the next stage loads it). The
calibration runs on rank 0 only, after the last collective: it is inference on a few held-out
participants, and the other ranks are done by then.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import shutil
from pathlib import Path
from typing import Any, Mapping

from bids_app.io import atomic_write_json, remove_leftover_temp_files
from bids_app.data import AugmentationSettings, TrainingVolumes
from bids_app.models.adapter import AdapterConfig
from bids_app.training.adapter import AdapterStage
from bids_app.errors import MissingInputError
from bids_app.model_card import MODEL_CARD, write_model_card
from bids_app.model_store import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    is_finished,
    load_components,
    load_unet,
    load_vqgan,
    read_stage,
    store_component,
)
from bids_app.pipelines.calibrate import CALIBRATION_FILE, calibration_identity, run_calibration
from bids_app.pipelines.counterfactual import CounterfactualPipeline
from bids_app.pipelines.segment import ImageInput
from bids_app.segmentation.calibration import CalibrationFile, read_calibration_file, write_calibration_file
from bids_app.models.discriminators import DiscriminatorConfig
from bids_app.schedulers import SchedulerConfig
from bids_app.settings import RunSettings, StageSettings
from bids_app.training import loop
from bids_app.distributed import SINGLE, Distributed
from bids_app.training.diffusion import DiffusionStage, latent_scale, unet_config
from bids_app.training.preparation import PreparedData
from bids_app.training.vqgan import VQGANStage, vqgan_config

log = logging.getLogger(__name__)



def diffusion_augmentation(augment: AugmentationSettings | None, kind: str) -> AugmentationSettings | None:
    """The diffusion stage's augmentation: all of it (``full``), or only random windows and
    left-right flips (``flip``). Measured with the tiny preset on the demo's budget
    (docs/benchmarks.md, "Patched noising"): without rotations and intensity changes the patched
    UNet reached a mean oracle Dice of 0.50 on unseen phantoms, against 0.40 with them."""
    if augment is None or kind == "full":
        return augment
    return dataclasses.replace(augment, rotation_degrees=0.0, intensity_scale=0.0, intensity_shift=0.0, gamma=0.0)


def train_models(settings: RunSettings, prepared: PreparedData, device: str,
                 dist: Distributed = SINGLE) -> dict[str, Any]:
    """Run the selected stages; returns what the run record and model card say about them."""
    model_dir, seed = settings.model_dir, settings.compute.seed
    if dist.is_main:
        (model_dir / MODEL_CARD).unlink(missing_ok=True)  # re-written last, once every component is final
        remove_leftover_temp_files(model_dir, recursive=True)  # a killed run's half-written files
        remove_leftover_temp_files(settings.work_dir / "checkpoints", recursive=True)
    dist.barrier()  # every rank decides below from the same files
    figures = model_dir / "figures" if dist.is_main else None
    cache = settings.work_dir / "cache"
    augment = AugmentationSettings() if settings.training.augment else None
    crop = settings.training.vqgan.crop_shape
    vq_augment = AugmentationSettings(crop_shape=tuple(crop)) if augment and crop else augment
    vq_train, validation = prepared.datasets(cache, seed, vq_augment)
    diff_train, _ = prepared.datasets(cache, seed, diffusion_augmentation(augment, settings.training.diffusion.augmentation))
    summary: dict[str, Any] = {}

    vq_cfg = vqgan_config(settings.preset, settings.models.vqgan)
    disc_cfg = DiscriminatorConfig.from_dict(dict(settings.models.discriminator))
    vq_dir = model_dir / "vqgan"
    if "vqgan" in settings.training.stages:
        if is_finished(vq_dir, vq_cfg.to_dict()) and not settings.training.retrain:
            log.info("vqgan: already trained (%s); --retrain trains it again", vq_dir)
        else:
            stage = VQGANStage(vq_cfg, disc_cfg, settings.training.vqgan, vq_train, validation, device, seed, figures,
                               dist)
            result = _run(stage, settings.training.vqgan, settings, "vqgan", vq_cfg.to_dict(), dist)
            if dist.is_main:
                store_component(vq_dir, stage.inference_weights(), vq_cfg.to_dict(), _summary(result, settings.training.vqgan, dist),
                                {"discriminator": disc_cfg.to_dict()})
            dist.barrier()
    vqgan = load_vqgan(vq_dir, device) if is_finished(vq_dir) else None
    summary["vqgan"] = read_stage(vq_dir)

    diff_dir = model_dir / "diffusion"
    if "diffusion" in settings.training.stages:
        if vqgan is None:
            raise MissingInputError(f"the diffusion stage needs a trained VQ-GAN in {vq_dir}: run the vqgan stage first")
        unet_cfg = unet_config(settings.preset, vq_cfg.embedding_dim, settings.models.unet)
        sched_cfg = SchedulerConfig.from_dict(dict(settings.models.scheduler))
        identity = {**unet_cfg.to_dict(), "vqgan_sha256": summary["vqgan"]["sha256"]}
        if is_finished(diff_dir, identity) and not settings.training.retrain:
            log.info("diffusion: already trained (%s); --retrain trains it again", diff_dir)
        else:
            scale = latent_scale(vqgan, TrainingVolumes(prepared.train, prepared.plan, cache), device, dist)
            log.info("diffusion: latent scale factor %.4f (1 / std of the training latents)", scale)
            stage = DiffusionStage(vqgan, unet_cfg, sched_cfg, settings.training.diffusion, diff_train, scale,
                                   device, seed, figures, dist)
            result = _run(stage, settings.training.diffusion, settings, "diffusion", identity, dist)
            if dist.is_main:
                store_component(diff_dir, stage.inference_weights(), identity,
                                _summary(result, settings.training.diffusion, dist),
                                {"scheduler": sched_cfg.to_dict(), "latent_scale": stage.scale})
            dist.barrier()
    summary["diffusion"] = read_stage(diff_dir)

    adapter_dir = model_dir / "adapter"
    if "adapter" in settings.training.stages and summary["diffusion"]:
        _train_adapter(settings, prepared, summary, vqgan, device, dist)
    summary["adapter"] = read_stage(adapter_dir) if is_finished(adapter_dir) else {}
    if not dist.is_main:
        return summary  # the last collective is behind: calibration and the model card are rank 0's

    if "calibrate" in settings.training.stages and summary["diffusion"]:
        summary["calibration"] = _calibrate(settings, prepared, _upstream(summary), device)
    elif (model_dir / CALIBRATION_FILE).is_file():
        summary["calibration"] = dict(read_calibration_file(model_dir / CALIBRATION_FILE).summary)

    if set(settings.training.stages) <= {"plan"}:
        log.info("only the plan stage was asked for: no model is trained")
    elif summary.get("vqgan") and summary.get("diffusion"):
        write_model_card(model_dir, _card(settings, prepared, summary))
        log.info("model card written: %s", model_dir / MODEL_CARD)
    else:
        missing = [name for name in ("vqgan", "diffusion") if not summary.get(name)]
        log.warning("no model card: stage(s) %s not trained yet (--stages)", ", ".join(missing))
    return summary


def _run(stage: Any, stage_settings: StageSettings, settings: RunSettings, name: str,
         identity: Mapping[str, Any], dist: Distributed = SINGLE) -> loop.StageResult:
    """Resume from the stage's checkpoint only when it was made for the same identity (architecture
    and upstream weights) and no retraining was asked; otherwise start afresh."""
    checkpoints = _checkpoint_dir(settings, name)
    marker = checkpoints / "identity.json"
    wanted = json.loads(json.dumps(identity))
    stale = marker.is_file() and json.loads(marker.read_text()) != wanted
    if dist.is_main and (settings.training.retrain or stale or not marker.is_file()):
        if stale:
            log.info("%s: the checkpoint in %s belongs to another configuration; starting afresh", name, checkpoints)
        shutil.rmtree(checkpoints, ignore_errors=True)
        atomic_write_json(marker, wanted)
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


def _checkpoint_dir(settings: RunSettings, name: str) -> Path:
    return settings.work_dir / "checkpoints" / name


def _train_adapter(settings: RunSettings, prepared: PreparedData, summary: Mapping[str, Any], vqgan: Any,
                   device: str, dist: Distributed = SINGLE) -> None:
    """The T2I-Adapter on the training images that have a cord mask; skipped when none has one."""
    samples = tuple(s for s in prepared.train if "control" in s.masks)
    directory = settings.model_dir / "adapter"
    if not samples:
        log.info("adapter: skipped: no training image has the control derivative (default: the cord mask)")
        return
    diffusion = summary["diffusion"]
    unet = load_unet(settings.model_dir / "diffusion", device)
    config = AdapterConfig.for_models(unet.config, vqgan.config.downsample, **dict(settings.models.adapter))
    patched = settings.training.diffusion
    identity = {**config.to_dict(), "diffusion_sha256": diffusion["sha256"]}
    if is_finished(directory, identity) and not settings.training.retrain:
        log.info("adapter: already trained (%s); --retrain trains it again", directory)
        return
    data = TrainingVolumes(samples, prepared.plan, settings.work_dir / "cache",
                           augment=AugmentationSettings() if settings.training.augment else None, seed=settings.compute.seed)
    stage = AdapterStage(vqgan, unet, SchedulerConfig.from_dict(diffusion["scheduler"]), config, settings.training.adapter,
                         data, float(diffusion["latent_scale"]), device, settings.compute.seed, dist,
                         patched.patch_fraction, tuple(patched.patch_max_size))
    result = _run(stage, settings.training.adapter, settings, "adapter", identity, dist)
    if dist.is_main:
        store_component(directory, stage.inference_weights(), identity, _summary(result, settings.training.adapter, dist),
                        {"control": list(settings.selection.control_names) or "cord mask", "n_images": len(samples),
                         "patch_fraction": patched.patch_fraction, "patch_max_size": list(patched.patch_max_size)})
    dist.barrier()


def _upstream(summary: Mapping[str, Any]) -> str:
    """Checksums of the models the calibration's residuals come from."""
    adapter = summary.get("adapter") or {}
    return summary["diffusion"]["sha256"] + (":" + adapter["sha256"] if adapter else "")


def _calibrate(settings: RunSettings, prepared: PreparedData, models_sha256: str, device: str) -> dict[str, Any]:
    """Run (or reuse) the calibration; the file holds its identity, a summary and the reference."""
    path = settings.model_dir / CALIBRATION_FILE
    seg, seed = settings.segmentation, settings.compute.seed
    identity = json.loads(json.dumps(calibration_identity(seg, seed, models_sha256)))
    if path.is_file() and not settings.training.retrain:
        stored = read_calibration_file(path)
        if stored.identity == identity:
            log.info("calibrate: already done for this model and these settings (%s)", path)
            return dict(stored.summary)
    samples = prepared.validation
    if not samples:
        log.warning("calibrate: no validation participant: calibrating on the training participants, whose "
                    "residuals are optimistic; the false-positive rate on new healthy data will be higher")
        samples = prepared.train
    models = load_components(settings.model_dir, prepared.plan, device)
    pipeline = CounterfactualPipeline.from_models(models, device, settings.compute)
    images = [ImageInput(s.name, s.image, s.masks.get("cord"), s.masks.get("control")) for s in samples]
    calibration = run_calibration(pipeline, prepared.plan, images, seg, seed)
    summary = {"threshold": calibration.threshold, "quantile": calibration.quantile,
               "n_images": calibration.n_images, "n_voxels": calibration.n_voxels,
               "participants": sorted({s.name.split("/")[0] for s in samples})}
    write_calibration_file(path, CalibrationFile(identity, summary, calibration))
    return summary


def _summary(result: loop.StageResult, stage_settings: StageSettings, dist: Distributed) -> dict[str, Any]:
    return {"steps": result.steps, "stopped_by": result.stopped_by, "seconds": round(result.seconds, 2),
            "final_metrics": dict(result.last_metrics), "effective_batch": stage_settings.batch_size,
            "accumulation_steps": stage_settings.accumulation_steps, "learning_rate": stage_settings.learning_rate,
            "processes": dist.world_size}


def _card(settings: RunSettings, prepared: PreparedData, summary: Mapping[str, Any]) -> dict[str, Any]:
    components = {}
    for name in ("vqgan", "diffusion", "adapter"):
        stage = summary.get(name)
        if not stage:
            continue
        components[name] = {
            "weights": f"{name}/{WEIGHTS_FILE}", "config": f"{name}/{CONFIG_FILE}", "sha256": stage["sha256"],
            "steps": stage["steps"], "stopped_by": stage["stopped_by"], "final_metrics": stage["final_metrics"],
        }
    return {
        "preset": settings.preset,
        "components": components,
        "latent_scale": summary["diffusion"]["latent_scale"],
        "scheduler": summary["diffusion"]["scheduler"],
        "preprocessing": {"plan": prepared.plan.to_dict(), "fingerprint": "dataset_fingerprint.json"},
        "calibration": _calibration_entry(settings.model_dir, summary.get("calibration")),
        "training_participants": prepared.split["train"],
        "validation_participants": prepared.split["validation"],
    }


def _calibration_entry(model_dir: Path, summary: Mapping[str, Any] | None) -> dict[str, Any] | None:
    if summary is None:
        return None
    import hashlib

    digest = hashlib.sha256((model_dir / CALIBRATION_FILE).read_bytes()).hexdigest()
    return {**summary, "file": CALIBRATION_FILE, "sha256": digest}
