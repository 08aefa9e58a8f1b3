"""Naming and writing of everything counterseg puts into its BIDS derivative dataset.

This is the only module that decides output file names and writes output files, so that
naming stays consistent and every write is atomic: many HPC jobs may write into one
``output_dir`` at once, and a crash (or a full disk) must never leave a half-written file
under a final name.

Naming (native space, so no ``space-`` entity), for a source ``<entities>_<suffix>.nii[.gz]``:

===============  ===================================================
kind             output name
===============  ===================================================
lesion_mask      ``<entities>_label-lesion_mask.nii.gz``
anomaly_map      ``<entities>_label-lesion_probseg.nii.gz``
counterfactual   ``<entities>_desc-counterfactual_<suffix>.nii.gz``
===============  ===================================================

When several contrasts with the same entities are processed in one run (e.g. ``sub-01_T2w``
and ``sub-01_T1w``), masks and probsegs would collide; then (``disambiguate=True``) they carry
the source contrast as a ``desc`` entity, after ``label`` as BIDS entity order requires:
``sub-01_label-lesion_desc-T2w_mask.nii.gz``. This form matches the BIDS schema's derivative
rules and passes ``bids-validator-deno``. Counterfactuals keep the source suffix and never
collide.

Every sidecar points back at its inputs with BIDS URIs (``bids:raw:<relpath>`` for the source
image, ``bids:<dataset>:<relpath>`` for a cord mask): no output holds a host path. Each dataset
name is declared in ``DatasetLinks`` of ``dataset_description.json`` (``bids_app.bids.links``).
"""
from __future__ import annotations

import logging
import os
import re
from collections import Counter
from collections.abc import Iterable, Mapping
from functools import lru_cache
from pathlib import Path, PurePosixPath
from typing import Any

from bids_app.bids.links import (RAW_LINK, DESCRIPTION, description_lock, input_description, link_target,
                                  read_description, source_datasets)
from bids_app.errors import OutputIOError
from bids_app.io import atomic_write_bytes, atomic_write_json, atomic_write_text, json_bytes, read_or_none, save_nifti_atomic

logger = logging.getLogger(__name__)

BIDS_VERSION = "1.10.0"
DATASET_NAME = "counterseg: lesion segmentation by counterfactual diffusion"
PIPELINE_DESCRIPTION = ("Spinal-cord lesion segmentation by counterfactual synthesis: a latent diffusion model "
                        "trained on healthy participants makes each image healthy, and the residual between the "
                        "image and its healthy counterfactual, calibrated on held-out healthy images, gives the "
                        "lesions.")
README = "README.md"
_README_TITLE = "# counterseg derivatives"
#: Sidecar keys naming input files (BIDS URIs) other than the source image; they are in ``Sources`` too.
INPUT_KEYS = ("CordMask", "AdapterControl")

KINDS = ("lesion_mask", "anomaly_map", "counterfactual")

_IGNORED_DIRS = ("models", "work", "logs", "figures", "reports", "sweep")
#: Non-BIDS content of the output dataset, hidden from the validator. Each directory is listed
#: twice: ``work/`` (gitignore form) alone is not enough for bids-validator-deno 3.0.2, which
#: then still reports the directory ``/work/`` itself as NOT_INCLUDED (bids-validator issue
#: #291, trailing slashes); the anchored ``/work`` form is what it honours.
#: Per-image tables and metrics are ours too (lesion tables, evaluation against ground truth).
BIDSIGNORE_ENTRIES = (*(e for d in _IGNORED_DIRS for e in (f"{d}/", f"/{d}")), "*.html", "*_lesions.tsv",
                      "*_lesions.json", "*_evaluation.json", "/evaluation_summary.tsv", "/lesions.tsv",
                      "/lesions.json")

#: What each output is, said once: the mask is made from the probseg, which is an anomaly score.
_DESCRIPTIONS = {
    "lesion_mask": "Binary spinal-cord lesion mask (1 = lesion, 0 = background), made from the anomaly score "
    "(the _probseg image of the same name) in three steps: (1) lesion candidates: the voxels whose score "
    "exceeds ProbsegThreshold (equivalently, whose residual exceeds Threshold, in the residual's normalised "
    "intensity units) and that lie deeper than DetectionInsetMM mm inside the analysis region (the voxels "
    "where the score is above 0); (2) 26-connected lesions smaller than MinLesionVolumeMM3 are removed; "
    "(3) each remaining lesion grows over the connected voxels of the analysis region whose unsmoothed "
    "residual exceeds GrowThreshold (only when GrowThreshold is given).",
    "anomaly_map": "Anomaly score in [0, 1], not a lesion probability: where the voxel's residual r (the "
    "source image minus its healthy counterfactual, see ResidualPolarity) lies among the N residuals of a "
    "healthy reference (held-out healthy participants, inside their analysis region): (the number of "
    "reference residuals <= r, plus 1, plus 1 when r > Threshold) / (N + 2). About the fraction of healthy "
    "voxels with a lower residual (0.99: higher than 99 % of them); a typical healthy voxel scores about "
    "0.5. The score exceeds ProbsegThreshold exactly where the residual exceeds Threshold: thresholding it "
    "there gives the lesion mask's candidates (see the mask's sidecar). 0 outside the analysis region.",
    "counterfactual": "Healthy (pseudo-healthy) counterfactual of the source image generated by "
    "a diffusion model: the same image with lesions removed, in the native space of the source.",
}

_NAME_RE = re.compile(
    r"^(?P<entities>(?:[a-zA-Z]+-[a-zA-Z0-9+]+_)*)(?P<suffix>[a-zA-Z0-9]+)(?P<ext>\.nii(?:\.gz)?)$"
)


# --------------------------------------------------------------------------- naming (pure)


def _split_name(filename: str) -> tuple[list[str], str]:
    """Split a raw image file name into its ``key-value`` entities and its suffix."""
    match = _NAME_RE.match(filename)
    if match is None:
        raise ValueError(
            f"not a BIDS image name (expected <entities>_<suffix>.nii[.gz]): {filename!r}"
        )
    entities = [e for e in match["entities"].split("_") if e]
    if not entities or not entities[0].startswith("sub-"):
        raise ValueError(f"BIDS image name must start with a sub- entity: {filename!r}")
    keys = [e.split("-", 1)[0] for e in entities]
    duplicated = sorted(k for k, n in Counter(keys).items() if n > 1)
    if duplicated:
        raise ValueError(f"repeated entities {duplicated} in {filename!r}")
    # Our outputs add label/desc themselves; a source already carrying them would yield
    # ambiguous or colliding names.
    taken = {"label", "desc"} & set(keys)
    if taken:
        raise ValueError(
            f"source name already has derivative entities {sorted(taken)}: {filename!r}"
        )
    return entities, match["suffix"]


def output_name(source: str | Path, kind: str, disambiguate: bool = False) -> str:
    """Name of the ``kind`` output for a raw image, keeping its entities (see module doc)."""
    if kind not in KINDS:
        raise ValueError(f"unknown output kind {kind!r}; expected one of {', '.join(KINDS)}")
    entities, suffix = _split_name(Path(source).name)
    if kind == "counterfactual":
        parts = [*entities, "desc-counterfactual", suffix]
    else:
        parts = [*entities, "label-lesion"]
        if disambiguate:
            parts.append(f"desc-{suffix}")
        parts.append("mask" if kind == "lesion_mask" else "probseg")
    return "_".join(parts) + ".nii.gz"


def _check_relpath(source_relpath: str | Path) -> PurePosixPath:
    """Reject source paths that would place outputs outside ``sub-XX/[ses-YY/]<datatype>/``."""
    rel = PurePosixPath(Path(source_relpath).as_posix())
    if rel.is_absolute() or ".." in rel.parts:
        raise ValueError(f"source path must be relative to the raw dataset root: {source_relpath}")
    dirs = rel.parts[:-1]
    entities, _ = _split_name(rel.name)
    values = dict(e.split("-", 1) for e in entities)
    expected = [f"sub-{values['sub']}"]
    if "ses" in values:
        expected.append(f"ses-{values['ses']}")
    if list(dirs[:-1]) != expected or len(dirs) != len(expected) + 1:
        raise ValueError(
            f"source path must be {'/'.join(expected)}/<datatype>/{rel.name}, got {source_relpath}"
        )
    return rel


def output_relpath(source_relpath: str | Path, kind: str, disambiguate: bool = False) -> Path:
    """Output path relative to ``output_dir``: the source's ``sub-XX/[ses-YY/]anat/`` + its name."""
    rel = _check_relpath(source_relpath)
    return Path(rel.parent) / output_name(rel.name, kind, disambiguate)


def unique_output_names(source_relpaths: Iterable[str | Path],
                        dataset_relpaths: Iterable[str | Path] = ()) -> dict[str | Path, bool]:
    """Tell, per source, whether its outputs need ``disambiguate=True`` to stay unique.

    Only mask and probseg names can collide (they drop the suffix). ``dataset_relpaths``: every
    image of the dataset, whatever the run selects, so that an image always gets the same names
    (a T2w image beside a T1w one is disambiguated even in a run that selects only the T2w).
    Raises ValueError if names would still collide after disambiguation (e.g. ``x.nii`` next to
    ``x.nii.gz``).
    """
    sources: dict[str | Path, PurePosixPath] = {}
    seen: set[PurePosixPath] = set()
    for src in source_relpaths:
        rel = _check_relpath(src)
        if rel not in seen:
            seen.add(rel)
            sources[src] = rel
    plain = {src: output_relpath(rel, "lesion_mask") for src, rel in sources.items()}
    distinct = set(sources.values()) | {PurePosixPath(Path(r).as_posix()) for r in dataset_relpaths}
    counts = Counter(name for name in map(_plain_output_or_none, distinct) if name is not None)
    needs = {src: counts[name] > 1 for src, name in plain.items()}
    final = Counter(output_relpath(rel, "lesion_mask", needs[src]) for src, rel in sources.items())
    clashes = sorted(str(name) for name, n in final.items() if n > 1)
    if clashes:
        raise ValueError(f"sources would still write the same outputs: {', '.join(clashes)}")
    return needs


def _plain_output_or_none(relpath: PurePosixPath) -> Path | None:
    """The undisambiguated mask name of a dataset image; None for a file no output can be named after."""
    try:
        return output_relpath(relpath, "lesion_mask")
    except ValueError:
        return None


def sidecar(source_relpath: str | Path, kind: str, extra: Mapping[str, Any] | None = None) -> dict:
    """JSON sidecar content: provenance via ``bids:raw:`` URIs plus kind-specific metadata.

    ``extra`` is merged last, so callers may add fields (thresholds, model version, ...).
    """
    if kind not in KINDS:
        raise ValueError(f"unknown output kind {kind!r}; expected one of {', '.join(KINDS)}")
    uri = f"bids:{RAW_LINK}:{_check_relpath(source_relpath)}"
    extra = dict(extra or {})
    meta: dict[str, Any] = {"Description": _DESCRIPTIONS[kind]}
    if kind == "lesion_mask":
        meta["Type"] = "Lesion"
    elif kind == "counterfactual":
        meta["SkullStripped"] = False
    meta["Sources"] = list(dict.fromkeys([uri, *(extra[k] for k in INPUT_KEYS if extra.get(k))]))
    meta["SpatialReference"] = uri  # native space: same grid as the source image
    meta.update(extra)
    return meta


def dataset_description(
    version: str,
    source_dataset: str | Path,
    output_dir: str | Path,
    container: Mapping[str, Any] | None = None,
    links: Mapping[str, str] | None = None,
) -> dict:
    """Content of the derivative ``dataset_description.json``.

    ``DatasetLinks`` has the raw dataset as ``raw`` (relative to ``output_dir``) and ``links``, the
    other input datasets already linked; ``SourceDatasets`` lists them all. ``License`` is the raw
    dataset's (derived data keep the licence of their source; none is made up when it has none),
    ``Authors`` are the raw dataset's, whose data this is. No ``CodeURL``: counterseg has no public one.
    """
    raw = input_description(source_dataset)
    generated_by: dict[str, Any] = {"Name": "counterseg", "Version": version, "Description": PIPELINE_DESCRIPTION}
    if container:
        generated_by["Container"] = dict(container)
    all_links = {RAW_LINK: link_target(source_dataset, output_dir),
                 **{k: v for k, v in (links or {}).items() if k != RAW_LINK}}
    description: dict[str, Any] = {
        "Name": DATASET_NAME,
        "BIDSVersion": BIDS_VERSION,
        "DatasetType": "derivative",
        "GeneratedBy": [generated_by],
    }
    if isinstance(raw.get("License"), str) and raw["License"].strip():
        description["License"] = raw["License"]
    authors = [a for a in raw.get("Authors") or [] if isinstance(a, str) and a.strip()] \
        if isinstance(raw.get("Authors"), list) else []
    if authors:
        description["Authors"] = authors
    description["HowToAcknowledge"] = _how_to_acknowledge(version, raw)
    description["SourceDatasets"] = source_datasets(all_links, output_dir)
    description["DatasetLinks"] = all_links
    return description


def _how_to_acknowledge(version: str, raw: Mapping[str, Any]) -> str:
    text = (f"Cite the source dataset (SourceDatasets) and counterseg {version} (GeneratedBy), and state that "
            "the lesion masks were made by counterfactual synthesis with a latent diffusion model at the "
            "threshold given in each mask's sidecar (Threshold, ThresholdSource).")
    theirs = raw.get("HowToAcknowledge")
    if isinstance(theirs, str) and theirs.strip():
        text += f" The source dataset asks: {theirs.strip()}"
    return text


def detect_container(
    environ: Mapping[str, str] | None = None, root: str | Path = "/"
) -> dict[str, str] | None:
    """Describe the container we run in, for ``GeneratedBy.Container`` (None outside one).

    Singularity/Apptainer export the image path; Docker gives no image tag inside the
    container, so ``Tag`` comes from ``COUNTERSEG_CONTAINER_TAG`` (set it in the image) and is
    left out when unknown rather than guessed.
    """
    env = os.environ if environ is None else environ
    tag = env.get("COUNTERSEG_CONTAINER_TAG")
    image = env.get("APPTAINER_CONTAINER") or env.get("SINGULARITY_CONTAINER")
    if image:
        return {"Type": "singularity", "Tag": tag or Path(image).name}
    if Path(root, ".dockerenv").exists():
        return {"Type": "docker", "Tag": tag} if tag else {"Type": "docker"}
    return None


# --------------------------------------------------------------------------- dataset files


def write_dataset_description(
    output_dir: str | Path,
    version: str,
    source_dataset: str | Path,
    container: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``dataset_description.json``; a no-op when it already has this content.

    Input datasets another job linked (``bids_app.bids.links.bids_uri``) stay linked: the file is
    read and written under its lock.
    """
    path = Path(output_dir) / DESCRIPTION
    with description_lock(output_dir):
        old = read_or_none(path)
        links = read_description(output_dir).get("DatasetLinks") or {}
        content = dataset_description(version, source_dataset, output_dir, container,
                                      {k: v for k, v in links.items() if isinstance(v, str)})
        data = json_bytes(content)
        if old == data:
            return path
        if old is not None and _core(read_description(output_dir)) != _core(content):
            logger.warning("replacing %s: its content differs from this run's", path)
        atomic_write_bytes(path, data)
    logger.info("wrote %s", path)
    return path


def _core(description: Mapping[str, Any]) -> dict[str, Any]:
    """A description less what runs add to (the links), to tell a changed description from a grown one."""
    return {k: v for k, v in description.items() if k not in ("DatasetLinks", "SourceDatasets")}


def readme_text() -> str:
    """The output dataset's README: what its files are and how to get the mask back from the probseg."""
    return f"""{_README_TITLE}

Spinal-cord lesion segmentations made by counterseg (see `GeneratedBy` in `dataset_description.json`)
from the raw dataset linked as `raw` in `DatasetLinks`; every input file is named in the sidecars by a
BIDS URI, `bids:<dataset>:<path>`, whose `<dataset>` is a key of `DatasetLinks` (a path relative to
this folder).

## Files

Per source image `<entities>_<suffix>.nii[.gz]`, on its own grid (native space), in `sub-*/[ses-*/]anat/`:

- `<entities>_label-lesion_mask.nii.gz`: binary lesion mask (1 = lesion).
- `<entities>_label-lesion_probseg.nii.gz`: anomaly score in [0, 1]; not a lesion probability (its
  JSON sidecar says what it is).
- `<entities>_desc-counterfactual_<suffix>.nii.gz`: the healthy counterfactual of the image.
- `<entities>_<suffix>_lesions.tsv` (+ `.json` describing each column): one row per lesion, with its
  vertebral level where disc labels were found.

At the top: `lesions.tsv` (+ `lesions.json`), one row per segmented image for statistics, rebuilt from
the files above at the end of every participant-level run. `logs/`, `figures/`, `*.html`,
`evaluation_summary.tsv` and the per-image tables are not BIDS files and are listed in `.bidsignore`.

## The mask from the probseg

Voxels whose probseg value is greater than `ProbsegThreshold` (in the mask's sidecar) are exactly those
whose residual is greater than `Threshold`. The lesion candidates are those that also lie deeper than
`DetectionInsetMM` mm inside the analysis region (the voxels where the probseg is above 0); the mask
is the candidates less the 26-connected lesions smaller than `MinLesionVolumeMM3`, each remaining lesion
then grown over connected voxels of the unsmoothed residual above `GrowThreshold`.
"""


def write_readme(output_dir: str | Path) -> Path:
    """Write the output's ``README.md``, unless the user replaced ours with their own."""
    path = Path(output_dir) / README
    old = read_or_none(path)
    text = readme_text()
    if old is not None and (old.decode("utf-8", "replace") == text or not old.startswith(_README_TITLE.encode())):
        return path
    atomic_write_text(path, text)
    return path


def merged_bidsignore(existing: str, entries: Iterable[str] = BIDSIGNORE_ENTRIES) -> str:
    """The user's ``.bidsignore`` text with our missing entries appended (order kept)."""
    present = {line.strip() for line in existing.splitlines()}
    missing = [e for e in entries if e not in present]
    if not missing:
        return existing
    head = existing if not existing or existing.endswith("\n") else existing + "\n"
    return head + "".join(f"{e}\n" for e in missing)


def write_bidsignore(output_dir: str | Path) -> Path:
    """Add our non-BIDS folders/files to ``.bidsignore``, keeping lines already there."""
    path = Path(output_dir) / ".bidsignore"
    try:
        existing = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        existing = ""
    except OSError as exc:
        raise OutputIOError(f"cannot read {path}: {exc.strerror or exc}") from exc
    merged = merged_bidsignore(existing)
    if merged != existing:  # idempotent: untouched (same mtime) when nothing is missing
        atomic_write_text(path, merged)
    return path


def write_derivative(
    img: Any,
    source_relpath: str | Path,
    kind: str,
    output_dir: str | Path,
    extra_metadata: Mapping[str, Any] | None = None,
    disambiguate: bool = False,
) -> Path:
    """Write one output image and its JSON sidecar; returns the image path.

    The sidecar is written first, so an existing image always has its sidecar.
    """
    rel = output_relpath(source_relpath, kind, disambiguate)
    path = Path(output_dir) / rel
    meta = sidecar(source_relpath, kind, extra_metadata)
    atomic_write_json(path.with_name(path.name[: -len(".nii.gz")] + ".json"), meta)
    save_nifti_atomic(img, path)
    logger.info("wrote %s", path)
    return path


# --------------------------------------------------------------------------- name checks


@lru_cache(maxsize=1)
def _raw_validator() -> Any:
    from bids_validator import BIDSValidator

    return BIDSValidator()


@lru_cache(maxsize=1)
def _derivative_rules() -> tuple[re.Pattern[str], ...]:
    """Filename regexes of the BIDS schema's derivative + common rules (bidsschematools)."""
    import bidsschematools.rules
    import bidsschematools.schema

    schema = bidsschematools.schema.load_schema()
    files = schema.rules.files
    rules = [
        *bidsschematools.rules.regexify_filename_rules(files.common, schema, level=2),
        *bidsschematools.rules.regexify_filename_rules(files.deriv, schema, level=2),
    ]
    return tuple(re.compile(rule["regex"]) for rule in rules)


def is_raw_bids_name(relpath: str | Path) -> bool:
    """Whether ``relpath`` (relative to a raw dataset root) is a valid raw BIDS file name.

    Uses the ``bids-validator`` Python package. Note what it does *not* do: it knows only raw
    names (it rejects ``_label-lesion_mask``, ``_desc-..._T2w`` and every derivative name) and
    answers True for anything under ``derivatives/``, ``code/``, ``sourcedata/``, ``stimuli/``
    without looking further.
    """
    return bool(_raw_validator().is_bids("/" + PurePosixPath(Path(relpath).as_posix()).as_posix()))


def check_bids_name(relpath: str | Path) -> bool:
    """Whether a file we write (path relative to ``output_dir``) has a valid BIDS name.

    The ``bids-validator`` package cannot judge derivative names (see
    :func:`is_raw_bids_name`), so derivative names are matched against the derivative rules of
    the BIDS schema shipped in ``bidsschematools`` (a dependency of ``bids-validator``); raw-style
    names such as sidecars of top-level files are still accepted via ``bids-validator``.
    Entity/directory consistency (``sub-01/`` vs ``sub-02_``) is checked too.
    """
    rel = PurePosixPath(Path(relpath).as_posix())
    if rel.is_absolute() or ".." in rel.parts or not rel.parts:
        return False
    if rel.parts[0] in {"derivatives", "code", "sourcedata", "stimuli"}:
        return False  # bids-validator would wave these through unchecked
    text = rel.as_posix()
    if any(rule.match(text) for rule in _derivative_rules()):
        return True
    return is_raw_bids_name(text)
