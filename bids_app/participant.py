"""Participant level: segment every selected image and write its derivatives.

Per image, in this order: counterfactual, anomaly map (probseg), lesion table, evaluation (when a
ground-truth lesion mask exists), and the lesion mask last, so an existing mask means the image is
done: a rerun after a crash skips finished images and redoes the interrupted one (``--overwrite``
redoes all). Every write is atomic, and an image whose segmentation fails has what it wrote so far
removed (``bids_app.image_outputs``), so every image is complete or absent.

One bad image stops nothing (fMRIPrep's behaviour): an image that fails the input checks or fails
while it is segmented gets a crash report under ``logs/`` and the run goes on with the others, then
ends with ``ImagesFailed`` listing every failed image; ``--stop-on-first-crash`` stops at the first.
A failure of the whole run (the model, the calibration) and an interruption stop it at once. An
image another live job holds the lock of is skipped (``bids_app.image_outputs``), not failed.
"""
from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from bids_app.bids.derivatives import output_relpath, write_derivative

from bids_app import runlog
from bids_app.io import atomic_write_json, exclusive_lock, save_nifti_atomic, try_exclusive_lock
from bids_app.bids.images import check_fits_plan
from bids_app.bids.links import bids_uri
from bids_app.bids.layout import ImageRecord, name_parts
from bids_app.errors import BadDataError, CountersegError, ExitCode, MissingInputError, UsageError
from bids_app.image_outputs import image_outputs
from bids_app.model_card import untrained_contrasts
from bids_app.model_store import TrainedModels, load_trained_models
from bids_app.pipelines.counterfactual import CounterfactualPipeline
from bids_app.pipelines.segment import ImageInput, native_residual
from bids_app.segmentation.calibration import (
    Calibration,
    grow_threshold,
    probability_map,
    probseg_threshold,
    read_calibration_file,
    with_threshold,
)
from bids_app.segmentation.lesions import lesion_mask, lesion_table, write_lesion_tsv
from bids_app.segmentation.vertebrae import add_vertebral_levels
from bids_app.segmentation.metrics import evaluate, healthy_false_positive, summarise, write_summary_tsv
from bids_app.segmentation.residuals import RESIDUAL_MAP_VERSION
from bids_app.settings import RunSettings, settings_to_dict
from bids_app.settings.fields import calibrated_values, flatten, sidecar_values

log = logging.getLogger(__name__)

SUMMARY_FILE = "evaluation_summary.tsv"
SUMMARY_LOCK = ".evaluation_summary.lock"


def load_calibration(settings: RunSettings, models: TrainedModels) -> Calibration:
    """The calibrated threshold from the model directory (checksum-verified), or ``--threshold``."""
    entry = models.card.get("calibration")
    if not entry:
        raise MissingInputError(
            f"the model in {settings.model_dir} is not calibrated: run the group level with the stage calibrate "
            "(it also gives the healthy reference that --threshold and the anomaly map need)"
        )
    stored = read_calibration_file(settings.model_dir / entry["file"], entry["sha256"])
    _warn_if_settings_differ(settings, stored.identity)
    threshold = settings.segmentation.lesions.threshold
    return with_threshold(stored.calibration, threshold) if threshold is not None else stored.calibration


class ImagesFailed(CountersegError):
    """Some images failed while the run went on with the others: raised at the end of the run.

    ``failures`` are rows of the run record (:func:`failure_row`); the exit code is
    :func:`failures_exit_code` of them; ``run_record`` is what the run did, for ``logs/run_*.json``.
    """

    def __init__(self, failures: Sequence[Mapping[str, Any]], n_images: int,
                 run_record: Mapping[str, Any] | None = None) -> None:
        super().__init__(failures_message(failures, n_images))
        self.exit_code = failures_exit_code(failures)  # type: ignore[assignment]
        self.run_record = dict(run_record or {})


def error_line(exc: BaseException) -> str:
    """The first line of an error; an unexpected one (a crash) also names its type."""
    lines = str(exc).strip().splitlines()
    first = lines[0] if lines else ""
    if isinstance(exc, CountersegError):
        return first or type(exc).__name__
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


def exit_code_of(exc: BaseException) -> int:
    """A typed error's exit code; 1 for anything else (a crash)."""
    return int(exc.exit_code) if isinstance(exc, CountersegError) else int(ExitCode.UNEXPECTED)


def failure_row(image: str, exc: BaseException, crash_report: Path | None = None) -> dict[str, Any]:
    """One failed image as the run record lists it."""
    return {"image": image, "error": error_line(exc), "exit_code": exit_code_of(exc),
            "crash_report": None if crash_report is None else str(crash_report)}


def failures_exit_code(failures: Sequence[Mapping[str, Any]]) -> int:
    """The exit code of a run with failed images: 1 if any image crashed (an unexpected error, which
    wants a bug report more than any data error wants fixing), else the code of the first failed
    image in the order of the selection (65 for bad data, 74 for an I/O failure, ...)."""
    codes = [int(f["exit_code"]) for f in failures]
    return int(ExitCode.UNEXPECTED) if ExitCode.UNEXPECTED in codes else codes[0]


def failures_message(failures: Sequence[Mapping[str, Any]], n_images: int) -> str:
    """One line naming every failed image (one failure: its own error line), then a line per image."""
    def report(f: Mapping[str, Any]) -> str:
        return f"crash report: {f['crash_report']}" if f.get("crash_report") else ""

    if len(failures) == 1:
        only = failures[0]
        where = [f"{only['image']}: 1 of {n_images} images failed"] if n_images > 1 else []
        notes = "; ".join(where + ([report(only)] if report(only) else []))
        return f"{only['error']}" + (f" ({notes})" if notes else "")
    head = f"{len(failures)} of {n_images} images failed: {', '.join(f['image'] for f in failures)}"
    lines = [f"{f['image']}: {f['error']} (exit {f['exit_code']}{'; ' + report(f) if report(f) else ''})"
             for f in failures]
    return "\n".join([head, *lines])


def refuse(failures: Mapping[str, BaseException], n_images: int) -> BaseException:
    """The one error that refuses a run over images that failed their checks (the group level, and
    ``--stop-on-first-crash``): a crash as it is (exit 1, crash log), one bad image's own error, or
    ``ImagesFailed`` naming every bad image."""
    crashes = [exc for exc in failures.values() if not isinstance(exc, CountersegError)]
    if crashes:
        return crashes[0]
    if len(failures) == 1:
        return next(iter(failures.values()))
    return ImagesFailed([failure_row(image, exc) for image, exc in failures.items()], n_images)


@dataclass
class _Failures:
    """The failed images of a run, each with its crash report under ``logs/``."""

    settings: RunSettings
    name: str
    rows: list[dict[str, Any]] = dataclasses.field(default_factory=list)

    def add(self, image: str, exc: BaseException, step: str) -> None:
        settings = self.settings
        report = runlog.write_image_crash_report(settings.output_dir / "logs", self.name, image, exc,
                                                 error_line(exc), settings_to_dict(settings))
        self.rows.append(failure_row(image, exc, report))
        log.warning("%s: failed (exit %d): %s. Crash report: %s; going on with the other images "
                    "(--stop-on-first-crash stops at the first)", step, exit_code_of(exc), error_line(exc), report)

    def add_all(self, images: Sequence[ImageRecord], errors: Mapping[str, BaseException]) -> None:
        """Add every image of ``errors`` (numbered as in the selection)."""
        for number, record in enumerate(images, 1):
            if record.relpath in errors:
                self.add(record.relpath, errors[record.relpath], f"[{number}/{len(images)}] {record.relpath}")

    def in_order(self, images: Sequence[ImageRecord]) -> list[dict[str, Any]]:
        """The failed images in the order of the selection (whatever stage each failed at)."""
        position = {record.relpath: number for number, record in enumerate(images)}
        return sorted(self.rows, key=lambda row: position[row["image"]])


def check_contrasts(settings: RunSettings, models: TrainedModels, images: Sequence[ImageRecord]) -> None:
    """Images of a contrast the model was not trained on are refused (UsageError, 64) unless
    ``--allow-other-contrast``: the healthy prior and the calibration hold for the trained contrasts."""
    others = untrained_contrasts(models.card, (r.suffix for r in images))
    if not others:
        return
    trained = list(models.card["contrasts"])
    example = next(r.relpath for r in images if r.suffix in others)
    if not settings.allow_other_contrast:
        raise UsageError(f"the model in {settings.model_dir} was trained on {', '.join(trained)} images, not "
                         f"{', '.join(others)} ({example}): its calibration does not hold for them; select "
                         f"--contrast {' '.join(trained)}, or pass --allow-other-contrast to segment them anyway")
    log.warning("segmenting %s image(s) with a model trained on %s (--allow-other-contrast): the calibrated "
                "false-positive rate does not hold for them; their sidecars say so (SourceContrastTrained: false)",
                ", ".join(others), ", ".join(trained))


def segment_images(settings: RunSettings, images: Sequence[ImageRecord], disambiguate: Mapping[str, bool],
                   device: str, bad_inputs: Mapping[str, BaseException] | None = None) -> dict[str, Any]:
    """Segment every image but ``bad_inputs`` (those that failed the input checks, with their error).

    Returns the run record's ``segmentation``; its ``failed`` rows list the images that failed (each
    with a crash report), for the caller to end the run with ``ImagesFailed`` once it is done.
    """
    failures = _Failures(settings, runlog.run_id(settings.analysis_level))
    bad = dict(bad_inputs or {})
    failures.add_all(images, bad)
    if len(bad) == len(images):  # nothing left to segment: no model needed
        return {"segmented": [], "skipped": [], "busy": [], "failed": failures.in_order(images)}
    models = load_trained_models(settings.model_dir, device)
    # How many NaN voxels to tolerate is this run's choice, not the model's.
    models = dataclasses.replace(models, plan=dataclasses.replace(
        models.plan, max_nonfinite_fraction=settings.preprocessing.max_nonfinite_fraction))
    check_contrasts(settings, models, [r for r in images if r.relpath not in bad])
    pipeline = CounterfactualPipeline.from_models(models, device, settings.compute)
    unfit = _plan_failures([r for r in images if r.relpath not in bad], models)
    if unfit and settings.stop_on_first_crash:
        raise refuse(unfit, len(images))
    failures.add_all(images, unfit)
    bad.update(unfit)
    calibration = load_calibration(settings, models)
    log.info("threshold %.4g (%s)", calibration.threshold, calibration.source)
    outcomes: dict[str, list[str]] = {"segmented": [], "skipped": [], "busy": []}
    evaluations = []
    todo = [(number, record) for number, record in enumerate(images, 1) if record.relpath not in bad]
    with runlog.progress(todo, "images", "image") as numbered:  # a bar with an ETA on a terminal
        for number, record in numbered:
            step = f"[{number}/{len(images)}] {record.relpath}"
            try:
                outcome, evaluation = _segment_locked(settings, models, pipeline, calibration, record,
                                                      disambiguate.get(record.relpath, False), step)
            except Exception as exc:  # an interruption is no Exception: it stops the run
                if settings.stop_on_first_crash:
                    raise
                failures.add(record.relpath, exc, step)
                continue
            outcomes[outcome].append(record.relpath)
            evaluations.extend([evaluation] if evaluation is not None else [])
    return {**outcomes, "failed": failures.in_order(images), "threshold": calibration.threshold,
            "threshold_source": calibration.source, "evaluation_summary": write_summary(settings, evaluations)}


def _segment_locked(settings: RunSettings, models: TrainedModels, pipeline: CounterfactualPipeline,
                    calibration: Calibration, record: ImageRecord, disambiguate: bool,
                    step: str) -> tuple[str, dict[str, Any] | None]:
    """Segment one image under its lock: ``busy`` when another live job holds it, ``skipped`` when it
    is done, else ``segmented``; with its evaluation (an existing one when skipped). If segmenting
    fails, what it wrote is removed (``ImageOutputs.discard``) and the error goes up."""
    outputs = image_outputs(settings.output_dir, record.relpath, disambiguate)
    with try_exclusive_lock(outputs.lock) as lock:
        if lock.busy:
            log.info("%s: being segmented by another job (pid %s), skipped", step, lock.holder or "unknown")
            return "busy", None
        if outputs.done and not settings.overwrite:
            log.info("%s: outputs exist, skipped (--overwrite redoes them)", step)
            existing = _existing_evaluation(outputs.mask, record)
            return "skipped", existing[0] if existing else None
        log.info("%s: segmenting", step)
        outputs.begin(locked=lock.held)
        try:
            return "segmented", segment_one(settings, models, pipeline, calibration, record, disambiguate)
        except BaseException:
            outputs.discard(locked=lock.held)
            raise


def _plan_failures(images: Sequence[ImageRecord], models: TrainedModels) -> dict[str, BaseException]:
    """The images far too small for the model's field of view (the one input check that needs the
    model), each with its error: all found before the first image is segmented."""
    failed: dict[str, BaseException] = {}
    for record in images:
        try:
            check_fits_plan(record.image, models.plan)
        except Exception as exc:  # noqa: BLE001 - a typed error (65) or a crash of the check: this image fails
            failed[record.relpath] = exc
    return failed


def summarise_existing(settings: RunSettings, images: Sequence[ImageRecord],
                       disambiguate: Mapping[str, bool]) -> dict[str, Any]:
    """``--report-only``: the summary table from the evaluations already written; no model needed."""
    evaluations = []
    for record in images:
        mask_path = settings.output_dir / output_relpath(record.relpath, "lesion_mask", disambiguate.get(record.relpath, False))
        evaluations.extend(_existing_evaluation(mask_path, record) if mask_path.is_file() else [])
    if not evaluations:
        raise MissingInputError(f"--report-only: no finished outputs of the selected images in {settings.output_dir}")
    return {"segmented": [], "reported": [e["image"] for e in evaluations],
            "evaluation_summary": write_summary(settings, evaluations)}


def write_summary(settings: RunSettings, evaluations: Sequence[Mapping[str, Any]]) -> dict[str, Any] | None:
    """Mean and median of every metric over every evaluated image of the output dataset (this run's
    ``evaluations`` and those earlier or concurrent jobs wrote), when there is more than one.

    Read and written under a lock, so that concurrent participant jobs (a job array into one
    ``output_dir``) leave one table that covers all of them rather than whichever job ended last.
    """
    from bids_app.reports.outputs import evaluations as evaluations_on_disk

    with exclusive_lock(settings.output_dir / "logs" / SUMMARY_LOCK):
        rows = {row["image"]: row for row in evaluations_on_disk(settings.output_dir)}
        rows.update({row["image"]: dict(row) for row in evaluations})
        table = [rows[image] for image in sorted(rows)]
        if len(table) < 2:
            return None
        write_summary_tsv(settings.output_dir / SUMMARY_FILE, table)
    log.info("evaluation summary of %d image(s): %s", len(table), settings.output_dir / SUMMARY_FILE)
    return summarise(table)


def segment_one(settings: RunSettings, models: TrainedModels, pipeline: CounterfactualPipeline,
                calibration: Calibration, record: ImageRecord, disambiguate: bool) -> dict[str, Any] | None:
    seg, seed = settings.segmentation, settings.compute.seed
    result = native_residual(pipeline, models.plan, image_input(record), seg, seed)
    source = result.preprocessed.trace.source
    probability = probability_map(result.residual, calibration, result.region)
    grow = grow_threshold(calibration, seg.lesions.grow_quantile)
    mask = lesion_mask(result.residual, result.region, calibration.threshold, result.spacing_mm,
                       seg.lesions.min_lesion_mm3, grow,
                       result.growth if calibration.grow_reference is not None else None,
                       detection_region=result.detection_region)
    extra = {
        # How the threshold was calibrated is the calibration's record, not this run's settings.
        **sidecar_values(seg, skip=("calibration",)),
        "Seed": seed,
        "ResidualGrid": "native",
        "ResidualPolarity": result.polarity,
        "Threshold": calibration.threshold,
        "ProbsegThreshold": probseg_threshold(calibration),  # the same threshold on the probseg
        "ThresholdSource": calibration.source,
        "CalibrationRule": calibration.rule,
        "CalibrationImages": calibration.n_images,
        **({"CalibrationImageFPR": calibration.image_fpr} if calibration.image_fpr is not None else {}),
        **({"GrowThreshold": grow, "GrowQuantile": seg.lesions.grow_quantile} if grow is not None else {}),
        "AnalysisRegion": "spinal-cord mask" if result.region_source == "cord" else "body foreground",
        "ModelCardSHA256": models.card_sha256,
        "ModelContrasts": list(models.card.get("contrasts") or []),
        "SourceContrastTrained": not untrained_contrasts(models.card, [record.suffix]),
        "CalibratedPolarity": dict((models.card.get("calibration") or {}).get("polarity") or {}),
        "AdapterUsed": result.adapter_used,
        "AdapterScale": seg.counterfactual.adapter_scale if result.adapter_used else 0.0,
    }
    if record.cord_mask is not None:
        extra["CordMask"] = bids_uri(record.cord_mask, settings.output_dir)
    if result.adapter_used:
        extra["AdapterControl"] = bids_uri(record.control_mask, settings.output_dir)
    out = settings.output_dir
    write_derivative(source.to_nifti(result.mean_counterfactual(), "image"), record.relpath, "counterfactual", out, extra, disambiguate)
    write_derivative(source.to_nifti(probability, "probability"), record.relpath, "anomaly_map", out, extra, disambiguate)
    paths = image_outputs(out, record.relpath, disambiguate)
    rows = add_vertebral_levels(lesion_table(mask, probability, source.affine), record.disc_labels)
    write_lesion_tsv(paths.lesion_table, rows,
                     levels_from=bids_uri(record.disc_labels, out) if record.disc_labels is not None else None)
    voxel_volume = float(np.prod(result.spacing_mm))
    evaluation: dict[str, Any] | None = {"image": record.relpath, "n_lesions": len(rows),
                                         "lesion_volume_mm3": float(mask.sum() * voxel_volume),
                                         "seconds": round(result.seconds, 2)}
    if record.lesion_mask is not None:
        truth = _truth(record, mask.shape)
        evaluation.update(evaluate(mask, probability, truth, result.region, voxel_volume))
    else:
        evaluation.update(healthy_false_positive(mask, voxel_volume))
    atomic_write_json(paths.evaluation, evaluation)
    if seg.strength_sweep:
        _write_sweep(settings, models, pipeline, record)
    write_derivative(source.to_nifti(mask, "mask"), record.relpath, "lesion_mask", out, extra, disambiguate)
    log.info("%s: %d lesion(s), %.1f mm3%s (%.1f s)", record.relpath, len(rows), evaluation["lesion_volume_mm3"],
             f", Dice {evaluation['dice']:.3f}" if "dice" in evaluation else "", result.seconds)
    return evaluation


def _truth(record: ImageRecord, shape: tuple[int, ...]) -> np.ndarray:
    import nibabel as nib

    data = np.asanyarray(nib.load(str(record.lesion_mask)).dataobj)
    data = data.reshape(data.shape[:3]) if data.ndim == 4 and data.shape[3] == 1 else data
    if data.shape != tuple(shape):
        raise BadDataError(f"{record.lesion_mask}: shape {data.shape} does not match its image {tuple(shape)}")
    return data > 0.5


def _existing_evaluation(mask_path: Path, record: ImageRecord) -> list[dict[str, Any]]:
    path = mask_path.with_name(name_parts(Path(record.relpath).name)[0] + "_evaluation.json")
    try:
        return [json.loads(path.read_text())]
    except (OSError, json.JSONDecodeError):
        return []


def image_input(record: ImageRecord) -> ImageInput:
    return ImageInput(record.relpath, record.image, record.cord_mask, record.control_mask)


def _write_sweep(settings: RunSettings, models: TrainedModels, pipeline: CounterfactualPipeline,
                 record: ImageRecord) -> None:
    """The counterfactual and residual at each strength of the sweep (native grid, ``sweep/``)."""
    seg = settings.segmentation
    folder = settings.output_dir / "sweep" / Path(record.relpath).parent
    stem = name_parts(Path(record.relpath).name)[0]
    for strength in seg.strength_sweep:
        at_strength = dataclasses.replace(seg, counterfactual=dataclasses.replace(seg.counterfactual,
                                                                                 strengths=(strength,)))
        result = native_residual(pipeline, models.plan, image_input(record), at_strength, settings.compute.seed)
        source = result.preprocessed.trace.source
        tag = f"strength-{int(round(strength * 100)):03d}"
        save_nifti_atomic(source.to_nifti(result.mean_counterfactual(), "image"), folder / f"{stem}_{tag}_counterfactual.nii.gz")
        save_nifti_atomic(source.to_nifti(result.residual, "probability"), folder / f"{stem}_{tag}_residual.nii.gz")
    log.info("%s: strength sweep %s written to %s", record.relpath, list(seg.strength_sweep), folder)


def _warn_if_settings_differ(settings: RunSettings, identity: Mapping[str, Any]) -> None:
    """A warning naming each calibrated setting that differs from what the threshold was calibrated with."""
    if "segmentation" not in identity:
        log.warning("the threshold was calibrated by counterseg 0.1.0, which did not store its settings as this "
                    "version does: they cannot be checked; rerun the group stage calibrate to record them")
        return
    version = identity.get("residual_map", 1)
    if version != RESIDUAL_MAP_VERSION:
        log.warning("the threshold was calibrated on residual maps of version %s, and this version computes "
                    "version %s (docs/method.md): the calibrated false-positive rate does not hold; rerun the "
                    "group stage calibrate", version, RESIDUAL_MAP_VERSION)
    now = {**flatten(calibrated_values(settings.segmentation), "segmentation."), "compute.seed": settings.compute.seed}
    then = {**flatten(identity.get("segmentation", {}), "segmentation."), "compute.seed": identity.get("seed")}
    differing = sorted(k for k in now.keys() | then.keys() if now.get(k) != then.get(k))
    if differing:
        log.warning("segmentation settings differ from those the threshold was calibrated with (%s): the "
                    "calibrated false-positive rate does not hold; rerun the group stage calibrate with them",
                    ", ".join(f"{k}: {then.get(k)} now {now.get(k)}" for k in differing))
