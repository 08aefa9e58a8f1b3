"""Read-only access to what the levels wrote: per-image outputs, run records and model files.

Reports are built from these files only (never from weights or in-memory models), so a report can
be rebuilt at any time (``python -m bids_app.reports OUTPUT_DIR``) and shows what is on disk. Every
reader here returns ``None``/empty for a missing or unreadable file instead of raising: a report
with a gap is more useful than no report.
"""
from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from bids_app.bids.derivatives import RAW_LINK, output_relpath
from bids_app.bids.links import resolve_bids_uri, resolve_link
from bids_app.bids.tables import read_tsv
from bids_app.bids.layout import name_parts

log = logging.getLogger(__name__)

_MASK_GLOB = "*_label-lesion*_mask.nii.gz"
_SWEEP_RE = re.compile(r"_strength-(\d{3})_(counterfactual|residual)\.nii\.gz$")
_RAW_PREFIX = f"bids:{RAW_LINK}:"


def read_json(path: Path) -> dict[str, Any] | None:
    """A JSON object from ``path``; None when absent, unreadable or not an object."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        log.debug("cannot read %s: %s", path, exc)
        return None
    return data if isinstance(data, dict) else None


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Rows of a JSON-lines file; a line cut short by a crash is skipped, not fatal."""
    rows = []
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError:
        return rows
    for line in text.splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def run_records(output_dir: Path, level: str) -> list[dict[str, Any]]:
    """Run records of ``level`` in ``<output_dir>/logs``, newest first."""
    paths = sorted(Path(output_dir, "logs").glob(f"run_{level}_*.json"),
                   key=lambda p: (p.stat().st_mtime_ns, p.name), reverse=True)
    return [record for record in map(read_json, paths) if record is not None]


def has_group_run(output_dir: Path) -> bool:
    """Whether the group level ever ran into this output dir (then it has a group report)."""
    return any(Path(output_dir, "logs").glob("run_group_*.json"))


def setting_path(record: Mapping[str, Any] | None, name: str) -> Path | None:
    value = ((record or {}).get("settings") or {}).get(name)
    return Path(value) if value else None


def raw_root(output_dir: Path, records: Sequence[Mapping[str, Any]] = ()) -> Path | None:
    """The raw dataset the outputs came from: ``DatasetLinks.raw`` of the derivative dataset, else
    the ``bids_dir`` of a run record."""
    description = read_json(Path(output_dir) / "dataset_description.json") or {}
    root = resolve_link((description.get("DatasetLinks") or {}).get(RAW_LINK), output_dir)
    if root is not None:
        return root
    for record in records:
        path = setting_path(record, "bids_dir")
        if path is not None:
            return path
    return None


def model_dir(output_dir: Path, records: Sequence[Mapping[str, Any]] = ()) -> Path:
    """Where the model of these runs lives (``--model-dir`` of the newest record, else the default)."""
    for record in records:
        path = setting_path(record, "model_dir")
        if path is not None:
            return path
    return Path(output_dir) / "models"


@dataclass(frozen=True)
class ImageOutputs:
    """Everything written for one source image, and the inputs a figure needs beside them."""

    source: str  # raw relpath, e.g. sub-05/anat/sub-05_T2w.nii.gz
    stem: str  # sub-05_T2w: unique per image, names its tables and figures
    subject: str
    session: str | None
    mask: Path
    probseg: Path
    counterfactual: Path
    lesions_tsv: Path
    evaluation_json: Path
    sidecar: Mapping[str, Any]
    image: Path | None  # the raw image, None when the raw dataset is not reachable
    cord_mask: Path | None
    truth: Path | None  # ground-truth lesion mask, from the run record
    sweep: tuple[tuple[float, Path, Path], ...] = field(default=())  # (strength, counterfactual, residual)

    @property
    def evaluation(self) -> dict[str, Any]:
        return read_json(self.evaluation_json) or {}

    @property
    def lesions(self) -> list[dict[str, str]]:
        return read_tsv(self.lesions_tsv)


def known_inputs(records: Iterable[Mapping[str, Any]]) -> dict[str, dict[str, Path | None]]:
    """Per source relpath, the cord and lesion masks a run found (the newest run that saw it wins)."""
    known: dict[str, dict[str, Path | None]] = {}
    for record in records:
        bids_dir = setting_path(record, "bids_dir")
        for entry in (record.get("inputs") or {}).get("images") or []:
            if not isinstance(entry, Mapping) or entry.get("image") in known:
                continue
            known[entry["image"]] = {key: _resolve(entry.get(key), bids_dir) for key in ("cord_mask", "lesion_mask")}
    return known


def _resolve(path: str | None, base: Path | None) -> Path | None:
    if not path:
        return None
    candidate = Path(path)
    return candidate if candidate.is_absolute() or base is None else base / candidate


def participant_labels(output_dir: Path) -> list[str]:
    """Labels (without ``sub-``) of participants with at least one finished image."""
    labels = set()
    for folder in Path(output_dir).glob("sub-*"):
        if folder.is_dir() and next(folder.rglob(_MASK_GLOB), None) is not None:
            labels.add(folder.name[len("sub-"):])
    return sorted(labels)


def find_images(output_dir: Path, label: str, records: Sequence[Mapping[str, Any]] = ()) -> list[ImageOutputs]:
    """The finished images of one participant (the mask is written last: a mask means done)."""
    output_dir = Path(output_dir)
    raw = raw_root(output_dir, records)
    inputs = known_inputs(records)
    images = []
    for mask in sorted((output_dir / f"sub-{label}").rglob(_MASK_GLOB)):
        sidecar = read_json(mask.with_name(mask.name[: -len(".nii.gz")] + ".json"))
        sources = (sidecar or {}).get("Sources") or []
        source = next((s[len(_RAW_PREFIX):] for s in sources if isinstance(s, str) and s.startswith(_RAW_PREFIX)), None)
        if source is None:
            log.warning("%s: no sidecar naming its source image; left out of the report", mask)
            continue
        images.append(_image_outputs(output_dir, mask, source, sidecar or {}, raw, inputs.get(source, {})))
    return images


def _image_outputs(output_dir: Path, mask: Path, source: str, sidecar: Mapping[str, Any], raw: Path | None,
                   inputs: Mapping[str, Path | None]) -> ImageOutputs:
    stem = name_parts(Path(source).name)[0]
    folder = mask.parent
    image = raw / source if raw is not None and (raw / source).is_file() else None
    cord = inputs.get("cord_mask") or resolve_bids_uri(sidecar.get("CordMask"), output_dir)
    parts = Path(source).parts
    session = parts[1][len("ses-"):] if len(parts) > 3 and parts[1].startswith("ses-") else None
    return ImageOutputs(
        source=source, stem=stem, subject=parts[0][len("sub-"):], session=session, mask=mask,
        probseg=mask.with_name(mask.name[: -len("_mask.nii.gz")] + "_probseg.nii.gz"),
        counterfactual=output_dir / output_relpath(source, "counterfactual"),
        lesions_tsv=folder / f"{stem}_lesions.tsv", evaluation_json=folder / f"{stem}_evaluation.json",
        sidecar=dict(sidecar), image=image, cord_mask=_existing(cord), truth=_existing(inputs.get("lesion_mask")),
        sweep=sweep_files(output_dir, source),
    )


def _existing(path: Path | None) -> Path | None:
    return path if path is not None and Path(path).is_file() else None


def sweep_files(output_dir: Path, source: str) -> tuple[tuple[float, Path, Path], ...]:
    """The ``--strength-sweep`` outputs of one image, by increasing strength (complete pairs only)."""
    stem = name_parts(Path(source).name)[0]
    folder = Path(output_dir) / "sweep" / Path(source).parent
    found: dict[int, dict[str, Path]] = {}
    for path in folder.glob(f"{stem}_strength-*_*.nii.gz"):
        match = _SWEEP_RE.search(path.name)
        if match and path.name == f"{stem}_strength-{match[1]}_{match[2]}.nii.gz":
            found.setdefault(int(match[1]), {})[match[2]] = path
    return tuple((code / 100, pair["counterfactual"], pair["residual"])
                 for code, pair in sorted(found.items()) if len(pair) == 2)


def evaluations(output_dir: Path) -> list[dict[str, Any]]:
    """Every per-image evaluation JSON under the participant folders, with its file's participant."""
    rows = []
    for path in sorted(Path(output_dir).glob("sub-*/**/*_evaluation.json")):
        row = read_json(path)
        if row is not None and isinstance(row.get("image"), str):
            rows.append(row)
    return rows
