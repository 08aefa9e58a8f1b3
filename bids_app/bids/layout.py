"""Find the images a run processes: pybids queries, derivative matching, participant selection.

Raw images are indexed with pybids. Derivatives (cord and lesion masks, disc labels) are matched per
image by name templates under the same ``sub-*/[ses-*/]<datatype>/`` folder of each derivative
dataset, because the names in use (spine-generic's ``*_T2w_label-SC_seg``, ``*_labels-disc-manual``,
legacy ``*_seg-manual``) are not BIDS-derivative names that pybids can parse into entities.
"""
from __future__ import annotations

import csv
import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from bids_app.errors import (
    BadDataError,
    BidsValidationError,
    MissingInputError,
    NothingSelectedError,
    UsageError,
)
from bids_app.settings import BIDS_FILTER_KEYS, SelectionSettings

log = logging.getLogger(__name__)

NIFTI_EXTENSIONS = (".nii.gz", ".nii")
APP_NAME = "counterseg"  # the GeneratedBy name of the datasets counterseg writes
PYBIDS_DATABASE_FILE = "layout_index.sqlite"  # what pybids keeps in --bids-database-dir
FILTER_KEYS = BIDS_FILTER_KEYS  # declared with the setting (selection.bids_filters)
#: BIDS entity keys users write in filter files, mapped to the names pybids queries with.
ENTITY_ALIASES = {
    "sub": "subject",
    "ses": "session",
    "acq": "acquisition",
    "ce": "ceagent",
    "rec": "reconstruction",
    "dir": "direction",
    "mod": "modality",
    "trc": "tracer",
    "stain": "staining",
}
DERIVATIVE_ROLES = ("cord", "lesion", "disc")


@dataclass(frozen=True)
class ImageRecord:
    """One image to process, with the derivatives found for it."""

    image: Path
    relpath: str
    subject: str
    session: str | None
    suffix: str
    entities: Mapping[str, str] = field(default_factory=dict)
    cord_mask: Path | None = None
    lesion_mask: Path | None = None
    control_mask: Path | None = None
    disc_labels: Path | None = None  # disc (or vertebral-level) labels: each lesion's vertebral level


@dataclass(frozen=True)
class TrainingSelection:
    """The healthy images used for training, and why every other participant was left out."""

    images: tuple[ImageRecord, ...]
    participants: tuple[str, ...]
    excluded: Mapping[str, str]


def is_bids_dataset(bids_dir: Path) -> bool:
    """A BIDS dataset has a ``dataset_description.json`` at its root.

    Raises BidsValidationError (16) for one that is not a JSON object, and for a folder laid out
    as BIDS (``sub-*`` folders or ``participants.tsv``) that lacks it: treating such a dataset as a
    plain folder of images would train on its masks and its lesion participants.
    """
    bids_dir = Path(bids_dir)
    path = bids_dir / "dataset_description.json"
    if not path.is_file():
        looks_bids = (bids_dir / "participants.tsv").is_file() or any(
            p.is_dir() for p in bids_dir.glob("sub-*"))
        if looks_bids:
            raise BidsValidationError(f"{path}: missing: {bids_dir} is laid out as a BIDS dataset (sub-* folders, "
                                      "participants.tsv) but has no dataset_description.json")
        return False
    try:
        description = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BidsValidationError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(description, dict):
        raise BidsValidationError(f"{path}: expected a JSON object, got {type(description).__name__}")
    return True


def strip_prefix(label: str, prefix: str) -> str:
    """``sub-01`` and ``01`` name the same participant."""
    label = label.strip()
    return label[len(prefix) :] if label.startswith(prefix) else label


def expand_labels(values: Iterable[str], prefix: str) -> tuple[str, ...]:
    """Labels from the command line, where ``@file`` stands for one label per line of ``file``."""
    labels: list[str] = []
    for value in values:
        if value.startswith("@"):
            path = Path(value[1:])
            try:
                lines = path.read_text(encoding="utf-8").splitlines()
            except OSError as exc:
                raise UsageError(f"cannot read label file {path}: {exc.strerror or exc}") from exc
            labels.extend(line.split("#")[0] for line in lines)
        else:
            labels.append(value)
    cleaned = [strip_prefix(label, prefix) for label in labels if label.strip()]
    bad = [label for label in cleaned if not re.fullmatch(r"[A-Za-z0-9]+", label)]
    if bad:
        raise UsageError(f"invalid {prefix.rstrip('-')} label {bad[0]!r}: BIDS labels are alphanumeric")
    return tuple(dict.fromkeys(cleaned))


def load_bids_filters(path: Path) -> dict[str, Any]:
    """Read an fMRIPrep-style filter file: ``{"image": {entity: value}}``."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise UsageError(f"--bids-filter-file {path}: cannot read: {exc.strerror or exc}") from exc
    except json.JSONDecodeError as exc:
        raise UsageError(f"--bids-filter-file {path}: invalid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise UsageError(f"--bids-filter-file {path}: expected a JSON object like {{\"image\": {{...}}}}")
    unknown = sorted(set(data) - set(FILTER_KEYS))
    if unknown:
        raise UsageError(
            f"--bids-filter-file {path}: unknown key {unknown[0]!r}; allowed: {', '.join(FILTER_KEYS)}"
        )
    for key, query in data.items():
        if not isinstance(query, dict):
            raise UsageError(f"--bids-filter-file {path}: {key!r} must map entities to values")
        for entity, value in query.items():
            for item in value if isinstance(value, list) else [value]:
                _check_filter_value(path, entity, item)
    return data


def _check_filter_value(path: Path, entity: str, value: Any) -> None:
    """Filter values select files; one that looks like a path (``../``, ``/``) is refused outright, so
    no value from a filter file can ever reach a path the app builds."""
    if value is None or isinstance(value, (bool, int, float)):
        return
    if not isinstance(value, str):
        raise UsageError(f"--bids-filter-file {path}: {entity!r}: expected a label, null or \"*\", got {value!r}")
    if "/" in value or "\\" in value or ".." in value or "\0" in value:
        raise UsageError(f"--bids-filter-file {path}: {entity!r} value {value!r} looks like a path "
                         "('..', '/'): filter values are BIDS labels")


def query_from_filters(filters: Mapping[str, Any], known_entities: Iterable[str]) -> dict[str, Any]:
    """pybids query arguments: ``null`` means the entity is absent, ``"*"`` any value."""
    from bids.layout import Query

    known = set(known_entities)
    query: dict[str, Any] = {}
    for key, value in filters.get("image", {}).items():
        entity = ENTITY_ALIASES.get(key, key)
        if entity not in known:
            raise UsageError(
                f"--bids-filter-file: unknown entity {key!r}; known: {', '.join(sorted(known))}"
            )
        if value is None:
            query[entity] = Query.NONE
        elif value == "*":
            query[entity] = Query.ANY
        else:
            query[entity] = value
    return query


def load_layout(bids_dir: Path, database_dir: Path | None = None, reset_database: bool = False):
    """Index ``bids_dir`` with pybids (read-only), reusing an sqlite cache when one is given.

    A reused cache that misses a participant on disk (or lists one no longer there) is stale: the
    run warns and indexes in memory instead, so it never silently drops a participant. It does
    not rebuild the cache itself: jobs of an array may share it while it is read, and
    ``--reset-database`` rebuilds it when no other job uses it.
    """
    from bids import BIDSLayout

    kwargs: dict[str, Any] = {"validate": False, "derivatives": False}
    reused = False
    if database_dir is not None:
        Path(database_dir).mkdir(parents=True, exist_ok=True)
        kwargs["database_path"] = str(database_dir)
        kwargs["reset_database"] = reset_database
        reused = not reset_database and (Path(database_dir) / PYBIDS_DATABASE_FILE).is_file()
    log.debug("indexing %s with pybids (database: %s)", bids_dir, database_dir or "in memory")
    layout = BIDSLayout(str(bids_dir), **kwargs)
    if reused:
        stale = stale_participants(bids_dir, layout.get_subjects())
        if stale:
            log.warning("the pybids database in %s is stale (%s): indexing %s in memory for this run; rebuild "
                        "the database with --reset-database", database_dir, stale, bids_dir)
            return BIDSLayout(str(bids_dir), validate=False, derivatives=False)
    return layout


def stale_participants(bids_dir: Path, indexed: Iterable[str]) -> str:
    """What an index lacks or has too many of, against the ``sub-*`` folders holding a NIfTI file
    on disk ("" when it matches): ``sub-07 on disk but not indexed``."""
    on_disk = {p.name[len("sub-"):] for p in Path(bids_dir).glob("sub-*")
               if p.is_dir() and re.fullmatch(r"sub-[A-Za-z0-9]+", p.name)
               and any(q.name.endswith(NIFTI_EXTENSIONS) for q in p.rglob("*.nii*"))}
    indexed = set(indexed)
    problems = [f"{_subjects(on_disk - indexed)} on disk but not indexed"] if on_disk - indexed else []
    if indexed - on_disk:
        problems.append(f"{_subjects(indexed - on_disk)} indexed but no longer on disk")
    return "; ".join(problems)


def _subjects(labels: Iterable[str]) -> str:
    return ", ".join(f"sub-{label}" for label in sorted(labels))


def generated_by_counterseg(root: Path) -> bool:
    """Whether a dataset's ``dataset_description.json`` names counterseg in ``GeneratedBy`` (as
    ``bids_app.bids.derivatives.dataset_description`` writes it): its lesion masks are counterseg's
    own predictions, never ground truth. A missing or unreadable description is not counterseg's."""
    try:
        description = json.loads((Path(root) / "dataset_description.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    if not isinstance(description, dict):
        return False
    generated = description.get("GeneratedBy")
    pipelines = [*(generated if isinstance(generated, list) else []), description.get("PipelineDescription")]
    return any(isinstance(p, dict) and p.get("Name") == APP_NAME for p in pipelines)


def find_derivative_datasets(
    bids_dir: Path, explicit: Sequence[Path] = (), exclude: Sequence[Path] = ()
) -> tuple[Path, ...]:
    """Derivative datasets to search for masks: the ones given, else every folder under
    ``bids_dir/derivatives``; never one that counterseg generated nor ``exclude`` (the run's
    output dir), compared as resolved paths so a symlink to one is recognised.

    Found under ``derivatives/``, such a folder is skipped (logged); given with ``--derivatives``,
    it is refused (UsageError, 64): the user asked for masks from it, and skipping it silently
    would leave them believing their reference masks were used.
    """
    excluded = {Path(p).resolve() for p in exclude}
    if explicit:
        roots = [Path(p).resolve() for p in explicit]
        missing = [p for p in roots if not p.is_dir()]
        if missing:
            raise UsageError(f"--derivatives {missing[0]}: not a directory")
        for root in roots:
            reason = _not_ground_truth(root, excluded)
            if reason:
                raise UsageError(f"--derivatives {root}: {reason}; pass the dataset that holds the reference masks")
        return tuple(roots)
    base = Path(bids_dir) / "derivatives"
    if not base.is_dir():
        return ()
    found = []
    for path in sorted(base.iterdir()):
        resolved = path.resolve()
        if not resolved.is_dir():
            continue
        reason = _not_ground_truth(resolved, excluded)
        if reason:
            log.info("not searched for masks: %s (%s)", path, reason)
        else:
            found.append(resolved)
    return tuple(found)


def _not_ground_truth(root: Path, excluded: set[Path]) -> str:
    """Why the masks of a (resolved) derivative dataset are not ground truth, or ""."""
    if any(root == e or e in root.parents for e in excluded):
        return "it is this run's output_dir, whose masks are the run's own predictions"
    if generated_by_counterseg(root):
        return ("generated by counterseg (GeneratedBy in its dataset_description.json): its lesion masks are "
                "predictions, not ground truth")
    return ""


def name_parts(filename: str) -> tuple[str, str]:
    """``sub-01_ses-1_T2w.nii.gz`` -> (``sub-01_ses-1_T2w``, ``sub-01_ses-1``)."""
    stem = filename
    for ext in NIFTI_EXTENSIONS:
        if stem.endswith(ext):
            stem = stem[: -len(ext)]
            break
    entities = stem.rsplit("_", 1)[0] if "_" in stem else stem
    return stem, entities


def match_derivative(relpath: str, roots: Sequence[Path], templates: Sequence[str]) -> Path | None:
    """First derivative file for the image at ``relpath``: datasets in order, then templates in order."""
    rel = Path(relpath)
    stem, entities = name_parts(rel.name)
    for root in roots:
        folder = Path(root) / rel.parent
        if not folder.is_dir():
            continue
        for template in templates:
            base = template.format(stem=stem, entities=entities)
            for ext in NIFTI_EXTENSIONS:
                candidate = folder / f"{base}{ext}"
                if candidate.is_file():
                    return candidate
    return None


def required_templates(name: str, selection: SelectionSettings) -> tuple[str, ...]:
    """What ``--require-derivative NAME`` looks for: a role (cord, lesion, disc) or a name part such as
    ``label-SC_seg`` (matched as ``<image stem>_NAME`` or ``<entities>_NAME``)."""
    if name == "cord":
        return selection.cord_names
    if name == "lesion":
        return selection.lesion_names
    if name == "disc":
        return selection.disc_names
    return (f"{{stem}}_{name}", f"{{entities}}_{name}")


def collect_images(
    bids_dir: Path,
    selection: SelectionSettings,
    layout: Any = None,
    derivative_roots: Sequence[Path] = (),
) -> list[ImageRecord]:
    """All images of the selected contrasts, participants, sessions and filters, with their masks.

    Raises MissingInputError (66) when the dataset has no image of the contrasts at all, and
    NothingSelectedError (18) when labels or filters select nothing.
    """
    extensions = list(NIFTI_EXTENSIONS)
    contrasts = list(selection.contrasts)
    everything = layout.get(suffix=contrasts, extension=extensions)
    if not everything:
        raise MissingInputError(
            f"no {'/'.join(contrasts)} image in {bids_dir} (looked for *_{'|'.join(contrasts)}.nii[.gz]);"
            f" pass --contrast to choose another suffix"
        )
    subjects = sorted({f.entities["subject"] for f in everything})
    query: dict[str, Any] = {"suffix": contrasts, "extension": extensions}
    if selection.participant_labels:
        _check_participants_have_images(selection.participant_labels, subjects, contrasts, layout)
        query["subject"] = list(selection.participant_labels)
    if selection.session_labels:
        sessions = sorted({f.entities["session"] for f in everything if "session" in f.entities})
        _check_labels_exist("session", selection.session_labels, sessions)
        query["session"] = list(selection.session_labels)
    query.update(query_from_filters(selection.bids_filters, layout.get_entities().keys()))
    files = layout.get(**query)
    if not files:
        raise NothingSelectedError(
            f"the participant/session labels and filters select no image in {bids_dir} "
            f"(query: {_describe_query(query)})"
        )
    refuse_duplicate_images(Path(f.path) for f in files)
    records = [_record(Path(f.path), Path(bids_dir), f.entities, selection, derivative_roots) for f in files]
    records.sort(key=lambda r: r.relpath)
    return drop_lacking_derivatives(records, selection, derivative_roots)


def refuse_duplicate_images(paths: Iterable[Path]) -> None:
    """One image stored twice, as ``.nii`` and ``.nii.gz``, is bad data (65, naming both files):
    the two would write the same outputs, and which one holds the intended data is the user's call."""
    seen: dict[tuple[Path, str], Path] = {}
    for path in sorted(Path(p) for p in paths):
        key = (path.parent, name_parts(path.name)[0])
        if key in seen:
            raise BadDataError(f"{seen[key]} and {path}: the same image twice, as .nii and as .nii.gz; "
                               "keep only one of them")
        seen[key] = path


def drop_lacking_derivatives(
    records: Sequence[ImageRecord], selection: SelectionSettings, roots: Sequence[Path]
) -> list[ImageRecord]:
    """``--require-derivative``: keep only images that have every named derivative."""
    kept = list(records)
    for name in selection.require_derivatives:
        templates = required_templates(name, selection)
        before = len(kept)
        kept = [r for r in kept if match_derivative(r.relpath, roots, templates) is not None]
        if before != len(kept):
            log.info("--require-derivative %s: dropped %d image(s) lacking it", name, before - len(kept))
    if records and not kept:
        raise MissingInputError(
            f"no selected image has the required derivative(s) {', '.join(selection.require_derivatives)}"
            f" in {', '.join(map(str, roots)) or 'any derivative dataset (none found)'}"
        )
    return kept


def collect_plain_images(folder: Path) -> list[ImageRecord]:
    """The seed's un-formatted dataset: every NIfTI file under ``folder``, one pseudo-participant each."""
    paths = sorted(p for ext in NIFTI_EXTENSIONS for p in Path(folder).rglob(f"*{ext}") if p.is_file())
    refuse_duplicate_images(paths)
    if not paths:
        raise BidsValidationError(
            f"{folder} is not a BIDS dataset (no dataset_description.json) and holds no NIfTI file"
        )
    records = []
    for path in paths:
        rel = path.relative_to(folder).as_posix()
        label = re.sub(r"[^A-Za-z0-9]", "", name_parts(path.name)[0]) or "image"
        records.append(ImageRecord(image=path, relpath=rel, subject=label, session=None, suffix="unknown"))
    return records


def read_participants(bids_dir: Path) -> dict[str, dict[str, str]]:
    """``participants.tsv`` as {label without ``sub-``: row}; empty when the file is absent."""
    path = Path(bids_dir) / "participants.tsv"
    if not path.is_file():
        return {}
    with path.open(encoding="utf-8", newline="") as handle:
        rows = list(csv.reader(handle, delimiter="\t"))
    header = rows[0] if rows else []
    if "participant_id" not in header:
        raise BidsValidationError(f"{path}: no participant_id column")
    table = {}
    for number, row in enumerate(rows[1:], 2):
        if not row:
            continue
        if len(row) != len(header):
            raise BidsValidationError(f"{path}: line {number} has {len(row)} column(s), the header has "
                                      f"{len(header)}; every row needs one value per column (n/a when unknown)")
        values = dict(zip(header, row))
        table[strip_prefix(values["participant_id"], "sub-")] = values
    return table


def select_training(
    records: Sequence[ImageRecord],
    participants: Mapping[str, Mapping[str, str]],
    selection: SelectionSettings,
) -> TrainingSelection:
    """Healthy participants for the group level: ``column == value`` in participants.tsv and no lesion
    mask; ``--train-participants`` overrides the table (but a lesion mask still excludes an image)."""
    by_subject: dict[str, list[ImageRecord]] = {}
    for record in records:
        by_subject.setdefault(record.subject, []).append(record)
    excluded: dict[str, str] = {}
    if selection.train_participants:
        _check_labels_exist("training participant", selection.train_participants, sorted(by_subject))
        wanted = set(selection.train_participants)
        for subject in by_subject:
            if subject not in wanted:
                excluded[subject] = "not in --train-participants"
    else:
        column, value = selection.healthy_column, selection.healthy_value
        if not participants:
            raise MissingInputError(
                "cannot tell healthy participants apart: no participants.tsv; add one with a "
                f"'{column}' column or pass --train-participants"
            )
        some_row = next(iter(participants.values()))
        if column not in some_row:
            raise MissingInputError(
                f"participants.tsv has no '{column}' column to select healthy participants; "
                f"use --healthy-filter COLUMN=VALUE or --train-participants"
            )
        for subject in by_subject:
            row = participants.get(subject)
            if row is None:
                excluded[subject] = "not listed in participants.tsv"
            elif row.get(column, "").strip() != value:
                excluded[subject] = f"{column}={row.get(column, '').strip() or 'n/a'}"
    for subject, images in by_subject.items():
        if subject not in excluded and any(r.lesion_mask is not None for r in images):
            excluded[subject] = "has a lesion mask"
    chosen = tuple(r for r in records if r.subject not in excluded)
    if not chosen:
        raise MissingInputError(
            "no healthy participant to train on: "
            + "; ".join(f"sub-{s}: {why}" for s, why in sorted(excluded.items())[:10])
        )
    return TrainingSelection(
        images=chosen,
        participants=tuple(sorted({r.subject for r in chosen})),
        excluded=dict(sorted(excluded.items())),
    )


def _record(
    path: Path,
    bids_dir: Path,
    entities: Mapping[str, Any],
    selection: SelectionSettings,
    roots: Sequence[Path],
) -> ImageRecord:
    rel = path.relative_to(bids_dir).as_posix()
    kept = {k: str(v) for k, v in entities.items() if k not in ("extension", "suffix", "datatype")}
    return ImageRecord(
        image=path,
        relpath=rel,
        subject=str(entities["subject"]),
        session=str(entities["session"]) if "session" in entities else None,
        suffix=str(entities["suffix"]),
        entities=kept,
        cord_mask=match_derivative(rel, roots, selection.cord_names),
        lesion_mask=match_derivative(rel, roots, selection.lesion_names),
        control_mask=match_derivative(rel, roots, selection.control_names or selection.cord_names),
        disc_labels=match_derivative(rel, roots, selection.disc_names),
    )


def _check_participants_have_images(labels: Sequence[str], subjects: Sequence[str], contrasts: Sequence[str],
                                    layout: Any) -> None:
    """Every ``--participant-label`` must have an image of the contrasts (NothingSelectedError, 18);
    one that exists with other contrasts only is told apart from one that does not exist."""
    missing = [label for label in labels if label not in set(subjects)]
    if not missing:
        return
    other = {label: sorted(set(layout.get(subject=label, extension=list(NIFTI_EXTENSIONS), return_type="id",
                                          target="suffix"))) for label in missing}
    problems = [f"sub-{label} has no {'/'.join(contrasts)} image (it has: {', '.join(other[label])})"
                for label in missing if other[label]]
    absent = [label for label in missing if not other[label]]
    if absent:
        shown = ", ".join(subjects[:20]) + (" ..." if len(subjects) > 20 else "")
        problems.append(f"participant label(s) not found in the dataset: {', '.join(absent)} "
                        f"(available: {shown or 'none'})")
    raise NothingSelectedError("; ".join(problems) + ("; pass --contrast to choose another suffix"
                                                      if len(absent) < len(missing) else ""))


def _check_labels_exist(kind: str, labels: Sequence[str], available: Sequence[str]) -> None:
    missing = [label for label in labels if label not in set(available)]
    if missing:
        shown = ", ".join(available[:20]) + (" ..." if len(available) > 20 else "")
        raise NothingSelectedError(
            f"{kind} label(s) not found in the dataset: {', '.join(missing)} (available: {shown or 'none'})"
        )


def _describe_query(query: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in query.items() if k != "extension")
