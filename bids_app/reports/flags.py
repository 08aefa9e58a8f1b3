"""What a rater must know about an image before trusting its numbers: flags shared by the participant
pages and the QC index (training or calibration participant, failed, no ground truth, ...).

Read from the outputs only: the model directory's ``split.json`` (who trained and calibrated the
model) and the participant run records (which images failed).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from bids_app.reports import outputs as out
from bids_app.reports.outputs import ImageOutputs


@dataclass(frozen=True)
class Flag:
    """A short label (``kind``: "info", "warn" or "bad" for its colour) and what it means."""

    text: str
    kind: str
    meaning: str


TRAINING = Flag("training participant", "warn", "seen in training: its results are optimistic")
CALIBRATION = Flag("calibration participant", "warn",
                   "held out of training but used to calibrate the threshold: its false positives are optimistic")
FAILED = Flag("failed", "bad", "the participant level failed on this image: no outputs")
TRUTH = Flag("ground truth", "info", "a reference lesion mask exists: Dice and lesion-wise metrics are shown")
NO_CORD = Flag("no cord mask", "warn", "no spinal-cord mask was found: the whole body foreground was searched")
OTHER_CONTRAST = Flag("contrast not trained", "bad",
                      "the model was not trained on this contrast (--allow-other-contrast): the calibrated "
                      "false-positive rate does not hold")


def participant_roles(model_dir: Path) -> dict[str, Flag]:
    """Per participant label (without ``sub-``), TRAINING or CALIBRATION from the model's ``split.json``."""
    split = out.read_json(Path(model_dir) / "split.json") or {}
    roles: dict[str, Flag] = {}
    for key, flag in (("validation", CALIBRATION), ("train", TRAINING)):
        for participant in split.get(key) or []:
            roles[str(participant).removeprefix("sub-")] = flag
    return roles


def image_flags(image: ImageOutputs, roles: Mapping[str, Flag]) -> list[Flag]:
    """The flags of one finished image."""
    flags = [roles[image.subject]] if image.subject in roles else []
    if image.sidecar.get("SourceContrastTrained") is False:
        flags.append(OTHER_CONTRAST)
    if image.cord_mask is None and image.sidecar.get("AnalysisRegion") != "spinal-cord mask":
        flags.append(NO_CORD)
    if image.truth is not None:
        flags.append(TRUTH)
    return flags


def failed_images(records: Sequence[Mapping[str, Any]], finished: set[str]) -> list[dict[str, Any]]:
    """Images the newest participant run that tried them failed on and that have no outputs since:
    rows with ``image``, ``error``, ``exit_code`` and ``crash_report`` (as the run record lists them)."""
    seen: set[str] = set()
    failed = []
    for record in records:  # newest first
        segmentation = record.get("segmentation") or {}
        for row in segmentation.get("failed") or []:
            image = row.get("image") if isinstance(row, Mapping) else None
            if isinstance(image, str) and image not in seen and image not in finished:
                failed.append(dict(row))
            seen.add(image)
        for key in ("segmented", "skipped"):
            seen.update(i for i in segmentation.get(key) or [] if isinstance(i, str))
    return sorted(failed, key=lambda row: row["image"])
