"""The two orchestrators, ``run_group`` and ``run_participant``, and the ``--dry-run`` listing.

Both start with the same discovery (validate, index, select, match derivatives) so that a dry run
lists exactly what a real run would process.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from bids_app.bids import layout as bids_layout
from bids_app.bids.derivatives import unique_output_names
from bids_app.bids.tables import write_dataset_table
from bids_app.io import exclusive_lock
from bids_app.bids.images import check_not_placeholders, check_record, inspect_image
from bids_app.bids.validate import validate_bids_dataset
from bids_app.errors import BidsValidationError
from bids_app.settings import RunSettings, settings_to_dict
from bids_app.distributed import SINGLE, Distributed
from bids_app.distributed import describe as describe_distributed

log = logging.getLogger(__name__)

GROUP_REPORT_LOCK = ".group_report.lock"


@dataclass(frozen=True)
class Inputs:
    """What discovery found: the images to process and, at the group level, the training selection."""

    images: tuple[bids_layout.ImageRecord, ...]
    derivative_roots: tuple[Path, ...]
    is_bids: bool
    training: bids_layout.TrainingSelection | None = None
    disambiguate: Mapping[str, bool] = field(default_factory=dict)


def discover_inputs(settings: RunSettings, dist: Distributed = SINGLE) -> Inputs:
    """Validate and index ``bids_dir``, then select images (and training participants for ``group``).

    Distributed: rank 0 validates (a failure ends the job; torchrun stops the other ranks) and owns the
    pybids database; the other ranks index in memory, so no two processes write the database.
    """
    bids_dir = settings.bids_dir
    selection = settings.selection
    if not bids_layout.is_bids_dataset(bids_dir):
        return _discover_plain_folder(settings)
    check_not_placeholders(bids_dir)
    if settings.skip_bids_validation:
        log.warning("BIDS validation skipped (--skip-bids-validation)")
    elif dist.is_main:
        log.info("validating %s with bids-validator-deno", bids_dir)
        validate_bids_dataset(bids_dir)
    database = settings.bids_database_dir if dist.is_main else None
    layout = bids_layout.load_layout(bids_dir, database, settings.reset_database)
    roots = bids_layout.find_derivative_datasets(
        bids_dir, selection.derivatives, exclude=[settings.output_dir]
    )
    log.info("derivative datasets searched for masks: %s", ", ".join(map(str, roots)) or "none")
    images = bids_layout.collect_images(bids_dir, selection, layout, roots)
    training = None
    if settings.analysis_level == "group":
        participants = bids_layout.read_participants(bids_dir)
        training = bids_layout.select_training(images, participants, selection)
    disambiguate = unique_output_names([r.relpath for r in images], _dataset_images(bids_dir))
    return Inputs(tuple(images), roots, True, training, disambiguate)


def _dataset_images(bids_dir: Path) -> list[str]:
    """Every NIfTI image of the raw dataset, whatever the selection (output names depend on them)."""
    return sorted(p.relative_to(bids_dir).as_posix() for p in bids_dir.glob("sub-*/**/*.nii*")
                  if not p.name.startswith(".") and p.name.endswith((".nii", ".nii.gz")))


def run_group(settings: RunSettings, device: str, dist: Distributed = SINGLE) -> dict[str, Any]:
    """Group level: select and check the healthy training images, train. Returns the run record
    (rank 0's is the one written; the other ranks only train).

    A finished model trained with the same settings and data is left as it is (nothing to train); one
    trained otherwise is refused without ``--retrain`` (``bids_app.training.identity``).
    ``--reports-only`` rebuilds the group report from what is on disk and trains nothing."""
    if settings.report_only:
        if dist.is_main:
            _build_reports("group", lambda reports: reports.build_group_report(settings.output_dir))
        log.info("--reports-only: the group report was rebuilt; nothing was trained")
        return {"reports_only": True}
    # Imported here: the participant level never loads the training code.
    from bids_app.training.group import train_models
    from bids_app.training.identity import IDENTITY_FILE, model_is_current, record_identity, training_identity
    from bids_app.training.preparation import describe as describe_preparation
    from bids_app.training.preparation import prepare_training_data
    from bids_app.training.stages import check_model_settings

    inputs = discover_inputs(settings, dist)
    assert inputs.training is not None
    training = inputs.training
    for subject, reason in training.excluded.items():
        log.info("excluded from training: sub-%s (%s)", subject, reason)
    log.info(
        "training selection: %d image(s) of %d participant(s): %s",
        len(training.images),
        len(training.participants),
        ", ".join(f"sub-{s}" for s in training.participants),
    )
    check_model_settings(settings)
    identity, current = None, False
    if dist.is_main:
        _check_inputs(training.images, settings)
        identity = training_identity(settings, training)
        current = model_is_current(settings.model_dir, identity, settings.training.retrain)
        if not current:
            settings.model_dir.mkdir(parents=True, exist_ok=True)
            record_identity(settings.model_dir / IDENTITY_FILE, identity)
    identity, current = dist.broadcast_object((identity, current))
    record: dict[str, Any] = {
        "inputs": _describe_inputs(inputs, settings.bids_dir),
        "training": {
            "participants": [f"sub-{s}" for s in training.participants],
            "images": [r.relpath for r in training.images],
            "excluded": {f"sub-{s}": why for s, why in training.excluded.items()},
        },
        "device": device,
        "distributed": describe_distributed(dist),
    }
    if current:
        log.info("the model in %s is finished and was trained with these settings and data: nothing to train "
                 "(--retrain trains it again)", settings.model_dir)
        record["models"] = {"unchanged": str(settings.model_dir)}
    else:
        prepared = prepare_training_data(settings, training, dist)
        record["preprocessing"] = describe_preparation(prepared)
        record["models"] = train_models(settings, prepared, identity, device, dist)
    if not dist.is_main:
        return record
    current_record = {"settings": settings_to_dict(settings), **record}
    _build_reports("group", lambda reports: reports.build_group_report(settings.output_dir,
                                                                       run_record=current_record))
    return record


def run_participant(settings: RunSettings, device: str) -> dict[str, Any]:
    """Participant level: find and check every selected image. Returns the run record."""
    inputs = discover_inputs(settings)
    if not inputs.is_bids:
        raise BidsValidationError(
            f"{settings.bids_dir} is not a BIDS dataset (no dataset_description.json): the participant "
            "level needs BIDS entities to name its outputs; a plain folder of NIfTI files is accepted "
            "for group-level training only"
        )
    from bids_app.participant import ImagesFailed, segment_images, summarise_existing

    # Every bad input is found before work starts; by default the others are segmented all the same.
    bad_inputs = {} if settings.report_only else _input_failures(inputs.images, settings)
    if bad_inputs and settings.stop_on_first_crash:
        _check_inputs(inputs.images, settings, bad_inputs)
    for record in inputs.images:
        log.info("found %s (cord mask: %s, lesion mask: %s)", record.relpath,
                 _short(record.cord_mask), _short(record.lesion_mask))
    record: dict[str, Any] = {"inputs": _describe_inputs(inputs, settings.bids_dir), "device": device}
    if settings.report_only:
        record["segmentation"] = summarise_existing(settings, inputs.images, inputs.disambiguate)
    else:
        record["segmentation"] = segment_images(settings, inputs.images, inputs.disambiguate, device, bad_inputs)
    write_dataset_table(settings.output_dir)  # lesions.tsv: every image on disk, this job's and the others'
    current = {"settings": settings_to_dict(settings), **record}
    labels = sorted({r.subject for r in inputs.images})
    _build_reports("participant", lambda reports: reports.build_participant_reports(
        settings.output_dir, labels, run_record=current))
    with exclusive_lock(settings.output_dir / "logs" / GROUP_REPORT_LOCK):  # concurrent jobs: see exclusive_lock
        _build_reports("group", lambda reports: reports.has_group_run(settings.output_dir)
                       and reports.build_group_report(settings.output_dir))
    failed = record["segmentation"].get("failed")
    if failed:
        raise ImagesFailed(failed, len(inputs.images), record)
    return record


def _build_reports(what: str, build: Callable[[Any], Any]) -> None:
    """Build QC reports at the end of a level; a report failure is a warning, never a failed run."""
    try:
        from bids_app import reports

        build(reports)
    except Exception as exc:  # noqa: BLE001 - reports are for looking at; the outputs are what count
        log.warning("%s report(s) not built: %s: %s", what, type(exc).__name__, exc)


def dry_run_listing(settings: RunSettings) -> str:
    """Text a user reads to see what a run would process: images, masks, and the training selection."""
    inputs = discover_inputs(settings)
    lines = [
        f"counterseg dry run: {settings.analysis_level} level on {settings.bids_dir}",
        f"derivative datasets: {', '.join(map(str, inputs.derivative_roots)) or 'none'}",
        f"{len(inputs.images)} image(s) of {len({r.subject for r in inputs.images})} participant(s):",
    ]
    for record in inputs.images:
        summary = inspect_image(record.image, full=False).describe()
        lines.append(f"  {record.relpath}  [{summary}]")
        lines.append(f"    cord mask:   {_relative(record.cord_mask, settings.bids_dir) or 'none'}")
        lines.append(f"    lesion mask: {_relative(record.lesion_mask, settings.bids_dir) or 'none'}")
    if inputs.training is not None:
        lines.append(
            "training participants: " + ", ".join(f"sub-{s}" for s in inputs.training.participants)
        )
        for subject, reason in inputs.training.excluded.items():
            lines.append(f"  excluded sub-{subject}: {reason}")
    return "\n".join(lines)


def _discover_plain_folder(settings: RunSettings) -> Inputs:
    images = bids_layout.collect_plain_images(settings.bids_dir)
    if settings.analysis_level != "group":
        return Inputs(tuple(images), (), False)
    log.warning(
        "%s has no dataset_description.json: treating it as an un-formatted folder of %d NIfTI "
        "image(s), all used for training; such a folder cannot carry cord/lesion masks, contrasts "
        "or participant metadata, and is not BIDS-validated",
        settings.bids_dir,
        len(images),
    )
    subjects = tuple(sorted({r.subject for r in images}))
    training = bids_layout.TrainingSelection(images=tuple(images), participants=subjects, excluded={})
    return Inputs(tuple(images), (), False, training)


def _check_inputs(records: Sequence[bids_layout.ImageRecord], settings: RunSettings,
                  failures: Mapping[str, BaseException] | None = None) -> None:
    """Refuse the run if any image or mask fails an input check, before work is spent on any (65),
    naming every bad image at once (the group level: training on a silently shrunken set is worse).
    ``failures``: those :func:`_input_failures` already found."""
    from bids_app.participant import refuse

    failures = _input_failures(records, settings) if failures is None else failures
    if failures:
        raise refuse(failures, len(records))


def _input_failures(records: Sequence[bids_layout.ImageRecord], settings: RunSettings) -> dict[str, BaseException]:
    """Every selected image whose image or masks fail an input check, with its error (BadDataError,
    or whatever a check crashed with): all of them, not the first only."""
    failures: dict[str, BaseException] = {}
    for record in records:
        try:
            check_record(record, settings.preprocessing.max_nonfinite_fraction)
        except Exception as exc:  # noqa: BLE001 - the caller decides: refuse the run, or go on without it
            failures[record.relpath] = exc
    return failures


def _describe_inputs(inputs: Inputs, bids_dir: Path) -> dict[str, Any]:
    return {
        "bids": inputs.is_bids,
        "derivatives": [str(p) for p in inputs.derivative_roots],
        "images": [
            {
                "image": r.relpath,
                "subject": r.subject,
                "session": r.session,
                "suffix": r.suffix,
                "cord_mask": _relative(r.cord_mask, bids_dir),
                "lesion_mask": _relative(r.lesion_mask, bids_dir),
            }
            for r in inputs.images
        ],
    }


def _relative(path: Path | None, base: Path) -> str | None:
    if path is None:
        return None
    try:
        return Path(path).resolve().relative_to(Path(base).resolve()).as_posix()
    except ValueError:
        return str(path)


def _short(path: Path | None) -> str:
    return Path(path).name if path is not None else "none"
