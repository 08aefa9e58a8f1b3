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
from bids_app.io import exclusive_lock
from bids_app.bids.images import check_not_placeholders, check_record, inspect_image
from bids_app.bids.validate import validate_bids_dataset
from bids_app.errors import BadDataError, BidsValidationError
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
    disambiguate = unique_output_names([r.relpath for r in images])
    return Inputs(tuple(images), roots, True, training, disambiguate)


def run_group(settings: RunSettings, device: str, dist: Distributed = SINGLE) -> dict[str, Any]:
    """Group level: select and check the healthy training images, train. Returns the run record
    (rank 0's is the one written; the other ranks only train)."""
    # Imported here: the participant level never loads the training code.
    from bids_app.training.group import train_models
    from bids_app.training.preparation import describe as describe_preparation
    from bids_app.training.preparation import prepare_training_data

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
    if dist.is_main:
        _check_inputs(training.images, settings)
    prepared = prepare_training_data(settings, training, dist)
    models = train_models(settings, prepared, device, dist)
    record = {
        "inputs": _describe_inputs(inputs, settings.bids_dir),
        "preprocessing": describe_preparation(prepared),
        "models": models,
        "training": {
            "participants": [f"sub-{s}" for s in training.participants],
            "images": [r.relpath for r in training.images],
            "excluded": {f"sub-{s}": why for s, why in training.excluded.items()},
        },
        "device": device,
        "distributed": describe_distributed(dist),
    }
    if not dist.is_main:
        return record
    current = {"settings": settings_to_dict(settings), **record}
    _build_reports("group", lambda reports: reports.build_group_report(settings.output_dir, run_record=current))
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
    if not settings.report_only:
        _check_inputs(inputs.images, settings)
    for record in inputs.images:
        log.info("found %s (cord mask: %s, lesion mask: %s)", record.relpath,
                 _short(record.cord_mask), _short(record.lesion_mask))
    record: dict[str, Any] = {"inputs": _describe_inputs(inputs, settings.bids_dir), "device": device}
    from bids_app.participant import segment_images, summarise_existing

    if settings.report_only:
        record["segmentation"] = summarise_existing(settings, inputs.images, inputs.disambiguate)
    else:
        record["segmentation"] = segment_images(settings, inputs.images, inputs.disambiguate, device)
    current = {"settings": settings_to_dict(settings), **record}
    labels = sorted({r.subject for r in inputs.images})
    _build_reports("participant", lambda reports: reports.build_participant_reports(
        settings.output_dir, labels, run_record=current))
    with exclusive_lock(settings.output_dir / "logs" / GROUP_REPORT_LOCK):  # concurrent jobs: see exclusive_lock
        _build_reports("group", lambda reports: reports.has_group_run(settings.output_dir)
                       and reports.build_group_report(settings.output_dir))
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


def _check_inputs(records: Sequence[bids_layout.ImageRecord], settings: RunSettings) -> None:
    """Every image and mask must pass every input check before work is spent on any (BadDataError, 65)."""
    empty = [r.image for r in records if r.image.is_file() and r.image.stat().st_size == 0]
    if empty:
        raise BadDataError(f"{empty[0]}: file is empty (0 bytes), not a NIfTI image ({len(empty)} of {len(records)} "
                           "selected images are empty: placeholder files, as in bids-examples, hold no data)")
    for record in records:
        check_record(record, settings.preprocessing.max_nonfinite_fraction)


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
