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

import hashlib
import json
import logging
from pathlib import Path
from typing import Any, Mapping

from bids_app.distributed import SINGLE, Distributed
from bids_app.io import remove_leftover_temp_files
from bids_app.model_card import MODEL_CARD, write_model_card
from bids_app.model_store import CONFIG_FILE, WEIGHTS_FILE, load_components
from bids_app.pipelines.calibrate import calibration_identity, run_calibration
from bids_app.pipelines.counterfactual import CounterfactualPipeline
from bids_app.pipelines.segment import ImageInput
from bids_app.segmentation.calibration import (
    CALIBRATION_FILE,
    CalibrationFile,
    read_calibration_file,
    write_calibration_file,
)
from bids_app.settings import RunSettings
from bids_app.training.preparation import PreparedData
from bids_app.training.stages import STAGES, TrainingRun, finished_record, train_stage

log = logging.getLogger(__name__)



def train_models(settings: RunSettings, prepared: PreparedData, identity: Mapping[str, Any], device: str,
                 dist: Distributed = SINGLE) -> dict[str, Any]:
    """Run the selected stages; returns what the run record and model card say about them.

    Called only when the model directory holds no finished model, or ``--retrain`` was given
    (``bids_app.training.identity.model_is_current``)."""
    model_dir = settings.model_dir
    run = TrainingRun(settings, prepared, device, dist, identity)
    if dist.is_main:
        (model_dir / MODEL_CARD).unlink(missing_ok=True)  # re-written last, once every component is final
        remove_leftover_temp_files(model_dir, recursive=True)  # a killed run's half-written files
        remove_leftover_temp_files(run.checkpoints, recursive=True)
    dist.barrier()  # every rank decides below from the same files
    for name, plan_stage in STAGES:
        plan = plan_stage(run) if name in settings.training.stages else None
        if plan is not None:
            train_stage(run, name, plan)
        run.summary[name] = finished_record(run, name)
    summary = run.summary
    if not dist.is_main:
        return summary  # the last collective is behind: calibration and the model card are rank 0's

    if "calibrate" in settings.training.stages and summary["diffusion"]:
        summary["calibration"] = _calibrate(settings, prepared, _upstream(summary), device)
    elif (model_dir / CALIBRATION_FILE).is_file():
        summary["calibration"] = dict(read_calibration_file(model_dir / CALIBRATION_FILE).summary)

    if set(settings.training.stages) <= {"plan"}:
        log.info("only the plan stage was asked for: no model is trained")
    elif summary.get("vqgan") and summary.get("diffusion"):
        write_model_card(model_dir, _card(settings, prepared, summary, identity))
        log.info("model card written: %s", model_dir / MODEL_CARD)
    else:
        missing = [name for name in ("vqgan", "diffusion") if not summary.get(name)]
        log.warning("no model card: stage(s) %s not trained yet (--stages)", ", ".join(missing))
    return summary


def _upstream(summary: Mapping[str, Any]) -> str:
    """Checksums of the models the calibration's residuals come from."""
    adapter = summary.get("adapter") or {}
    return summary["diffusion"]["sha256"] + (":" + adapter["sha256"] if adapter else "")


def _calibrate(settings: RunSettings, prepared: PreparedData, models_sha256: str, device: str) -> dict[str, Any]:
    """Run (or reuse) the calibration; the file holds its identity, a summary and the reference."""
    path = settings.model_dir / CALIBRATION_FILE
    seg, seed = settings.segmentation, settings.compute.seed
    suffixes = [item.suffix for item in _calibration_images(prepared)]
    identity = json.loads(json.dumps(calibration_identity(seg, seed, models_sha256, suffixes)))
    if path.is_file() and not settings.training.retrain:
        stored = read_calibration_file(path)
        if stored.identity == identity:
            log.info("calibrate: already done for this model and these settings (%s)", path)
            return dict(stored.summary)
    if not prepared.validation:
        log.warning("calibrate: no validation participant: calibrating on the training participants, whose "
                    "residuals are optimistic; the false-positive rate on new healthy data will be higher")
    samples = prepared.validation or prepared.train
    models = load_components(settings.model_dir, prepared.plan, device)
    pipeline = CounterfactualPipeline.from_models(models, device, settings.compute)
    images = _calibration_images(prepared)
    calibration = run_calibration(pipeline, prepared.plan, images, seg, seed)
    summary = {"threshold": calibration.threshold, "quantile": calibration.quantile,
               "n_images": calibration.n_images, "n_voxels": calibration.n_voxels,
               "participants": sorted({s.name.split("/")[0] for s in samples}),
               "polarity": identity.get("polarity", {})}
    write_calibration_file(path, CalibrationFile(identity, summary, calibration))
    return summary


def _calibration_images(prepared: PreparedData) -> list[ImageInput]:
    """The held-out healthy images (the training ones when there are none)."""
    return [ImageInput(s.name, s.image, s.masks.get("cord"), s.masks.get("control"))
            for s in prepared.validation or prepared.train]


def _card(settings: RunSettings, prepared: PreparedData, summary: Mapping[str, Any],
          identity: Mapping[str, Any]) -> dict[str, Any]:
    components = {}
    for name in ("vqgan", "diffusion", "adapter"):
        stage = summary.get(name)
        if not stage:
            continue
        components[name] = {
            "weights": f"{name}/{WEIGHTS_FILE}", "config": f"{name}/{CONFIG_FILE}", "sha256": stage["sha256"],
            "config_sha256": hashlib.sha256((settings.model_dir / name / CONFIG_FILE).read_bytes()).hexdigest(),
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
        "contrasts": list(identity["contrasts"]),
        "training_identity": dict(identity),
    }


def _calibration_entry(model_dir: Path, summary: Mapping[str, Any] | None) -> dict[str, Any] | None:
    if summary is None:
        return None
    digest = hashlib.sha256((model_dir / CALIBRATION_FILE).read_bytes()).hexdigest()
    return {**summary, "file": CALIBRATION_FILE, "sha256": digest}
