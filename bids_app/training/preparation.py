"""Group-level data preparation: train/validation split, fingerprint, plan, warm cache.

Runs before any model stage. The plan and fingerprint go to the model directory (inference reads
them back); the split is recorded so calibration can use held-out healthy participants only.
"""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bids_app import runlog
from bids_app.bids.images import check_fits_plan
from bids_app.bids.layout import ImageRecord, TrainingSelection
from bids_app.data import Sample, TrainingVolumes, split_participants
from bids_app.preprocessing.fingerprint import (
    Fingerprint,
    compute_fingerprint,
    plan_from_fingerprint,
    save_fingerprint,
)
from bids_app.preprocessing.plan import PreprocessingPlan, load_plan, save_plan, PLAN_FILE
from bids_app.settings import RunSettings
from bids_app.distributed import SINGLE, Distributed

log = logging.getLogger(__name__)

SPLIT_FILE = "split.json"


@dataclass(frozen=True)
class PreparedData:
    plan: PreprocessingPlan
    fingerprint: Fingerprint
    train: tuple[Sample, ...]
    validation: tuple[Sample, ...]
    split: dict[str, list[str]]

    def datasets(self, cache_dir: Path, seed: int, augment: Any = None) -> tuple[TrainingVolumes, TrainingVolumes]:
        """Training volumes (augmented when asked) and validation volumes (never augmented)."""
        return (
            TrainingVolumes(self.train, self.plan, cache_dir, augment=augment, seed=seed),
            TrainingVolumes(self.validation, self.plan, cache_dir, augment=None, seed=seed),
        )


def sample_of(record: ImageRecord) -> Sample:
    masks = {"cord": record.cord_mask} if record.cord_mask is not None else {}
    if record.control_mask is not None:
        masks["control"] = record.control_mask
    return Sample(name=record.relpath, image=record.image, masks=masks)


def prepare_training_data(settings: RunSettings, selection: TrainingSelection,
                          dist: Distributed = SINGLE) -> PreparedData:
    """Split by participant, fingerprint the training images, derive (or reuse) the plan, and
    preprocess every image once into the work-dir cache so that stages start from cached arrays.

    Distributed: rank 0 prepares and writes; the others receive its result once the cache is warm
    (the broadcast is also the barrier), so they read the cache and never write it.
    """
    prepared = _prepare(settings, selection) if dist.is_main else None
    return dist.broadcast_object(prepared)


def _prepare(settings: RunSettings, selection: TrainingSelection) -> PreparedData:
    from bids_app.io import atomic_write_json, remove_leftover_temp_files

    prep = settings.preprocessing
    train_labels, val_labels = split_participants(
        selection.participants, prep.validation_fraction, settings.compute.seed
    )
    log.info("split: %d training participant(s), %d validation participant(s) (%s)",
             len(train_labels), len(val_labels), ", ".join(f"sub-{s}" for s in val_labels) or "none")
    train = [r for r in selection.images if r.subject in train_labels]
    validation = [r for r in selection.images if r.subject in val_labels]
    fingerprint = compute_fingerprint([(r.image, r.cord_mask, r.relpath) for r in train])
    model_dir = settings.model_dir
    plan = _plan(settings, fingerprint, model_dir)
    for record in selection.images:
        check_fits_plan(record.image, plan)
    model_dir.mkdir(parents=True, exist_ok=True)
    save_fingerprint(fingerprint, model_dir)
    save_plan(plan, model_dir)
    split = {"train": [f"sub-{s}" for s in train_labels], "validation": [f"sub-{s}" for s in val_labels]}
    atomic_write_json(model_dir / SPLIT_FILE, split)
    prepared = PreparedData(plan, fingerprint, tuple(map(sample_of, train)), tuple(map(sample_of, validation)), split)
    remove_leftover_temp_files(settings.work_dir / "cache")  # a killed run's half-written entries
    train_set, val_set = prepared.datasets(settings.work_dir / "cache", settings.compute.seed)
    entries = [(dataset, index) for dataset in (train_set, val_set) for index in range(len(dataset))]
    with runlog.progress(entries, "preprocess", "image") as todo:  # a bar with an ETA on a terminal
        for dataset, index in todo:
            dataset.arrays(index)
    log.info("preprocessed %d image(s) into %s", len(train_set) + len(val_set), settings.work_dir / "cache")
    return prepared


def _plan(settings: RunSettings, fingerprint: Fingerprint, model_dir: Path) -> PreprocessingPlan:
    """An existing plan is kept (models trained on it must keep seeing the same data); otherwise
    derive one from the fingerprint and the settings."""
    prep = settings.preprocessing
    if (model_dir / PLAN_FILE).is_file():
        # How many NaN voxels to tolerate is this run's choice, not the model's.
        plan = dataclasses.replace(load_plan(model_dir), max_nonfinite_fraction=prep.max_nonfinite_fraction)
        log.info("reusing the preprocessing plan in %s", model_dir / PLAN_FILE)
        for name in ("target_spacing", "target_shape"):
            wanted = getattr(prep, name)
            if wanted is not None and tuple(wanted) != tuple(getattr(plan, name)):
                log.warning("preprocessing.%s=%s is ignored: the models in %s were planned with %s; "
                            "use a new --model-dir to train with the new value",
                            name, list(wanted), model_dir, list(getattr(plan, name)))
        return plan
    fixed = {
        "target_spacing": prep.target_spacing,
        "target_shape": prep.target_shape,
        "percentiles": prep.percentiles,
        "image_order": prep.image_order,
        "mask_interpolation": prep.mask_interpolation,
        "max_nonfinite_fraction": prep.max_nonfinite_fraction,
    }
    return plan_from_fingerprint(fingerprint, prep.max_shape, prep.shape_multiple, fixed)


def describe(prepared: PreparedData) -> dict[str, Any]:
    return {"split": prepared.split, "plan": prepared.plan.to_dict()}
