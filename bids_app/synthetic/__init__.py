"""Synthetic spinal-cord phantom BIDS dataset, with ground-truth cord and lesion masks.

Every test and the demo need a dataset that is small, fast to make, byte-reproducible and still
hard enough that a naive method (a global threshold, an assumption of RAS float images) fails.
So each participant gets a curved elliptical cord with grey/white matter, a CSF annulus, a
vertebral column with discs, textured soft tissue, a bias field and Rician noise, and the images
vary in axis order, obliquity, data type and intensity scale.

Participants carry the lesions and acquisitions of the clinic (``lesions.LESION_TYPES``:
``central``, ``ms`` peripheral, ``sci`` elongated; ``acquisition.ACQUISITIONS``: ``sag-iso``,
``ax-thick``, ``sag-thick``), cycled so that every mix of them appears in a large enough dataset
and healthy participants span every acquisition; participants.tsv says which each one has.

Run ``python -m bids_app.synthetic OUTDIR`` or call :func:`generate_dataset`.

Layout written (``[...]`` only with sessions)::

    OUTDIR/dataset_description.json, README.md, participants.tsv, participants.json
    OUTDIR/sub-XX[/ses-YY]/anat/sub-XX[_ses-YY]_<contrast>.nii.gz (+ .json)
    OUTDIR/derivatives/labels/dataset_description.json
    OUTDIR/derivatives/labels/sub-XX[/ses-YY]/anat/sub-XX[_ses-YY]_<contrast>_label-SC_seg.nii.gz (+ .json)
    OUTDIR/derivatives/labels/sub-XX[/ses-YY]/anat/sub-XX[_ses-YY]_<contrast>_label-lesion_seg.nii.gz (+ .json)

Lesion masks exist only for lesion participants (pathology ``MS`` or ``SCI``); healthy ones are ``HC``.
"""
from __future__ import annotations

import argparse
import logging
import math
import sys
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from bids_app.errors import CannotCreateError, CountersegError, UsageError
from bids_app.synthetic.acquisition import ACQUISITIONS, draw_acquisition
from bids_app.synthetic.anatomy import CONTRASTS, make_anatomy, make_geometry
from bids_app.synthetic.files import ParticipantRow, write_image_set, write_top_level
from bids_app.synthetic.lesions import LESION_TYPES

logger = logging.getLogger(__name__)

#: Field of view in mm (left-right, anterior-posterior, inferior-superior); each acquisition samples
#: it at its own voxel size.
DEFAULT_FIELD_OF_VIEW: tuple[int, int, int] = (32, 32, 64)
MIN_FIELD_OF_VIEW: tuple[int, int, int] = (24, 24, 8)  # smaller ones lose the CSF and lesions to partial volume
MAX_PARTICIPANTS = 99  # labels are two zero-padded digits


@dataclass(frozen=True)
class SyntheticDataset:
    """What :func:`generate_dataset` wrote; all paths are absolute.

    ``participants`` holds ``(label, pathology)`` with the label without ``sub-`` (``"01"``);
    ``lesion_types`` (None when healthy) and ``acquisitions`` map labels to what participants.tsv says.
    ``cord_masks`` maps every image to its cord mask; ``lesion_masks`` maps only the images of
    lesion participants to their lesion masks.
    """

    root: Path
    participants: list[tuple[str, str]]
    images: list[Path]
    cord_masks: dict[Path, Path]
    lesion_masks: dict[Path, Path]
    lesion_types: dict[str, str | None]
    acquisitions: dict[str, str]

    @property
    def labels_root(self) -> Path:
        """Root of the ground-truth derivative dataset."""
        return self.root / "derivatives" / "labels"


# --------------------------------------------------------------------------------------------
# Argument checks
# --------------------------------------------------------------------------------------------


def _clean_sessions(sessions: Sequence[str]) -> list[str]:
    """Accept ``01`` or ``ses-01`` so callers can pass either BIDS labels or entity strings."""
    labels = [s[4:] if s.startswith("ses-") else s for s in sessions]
    for label in labels:
        if not label or not label.isalnum() or not label.isascii():
            raise UsageError(f"session label {label!r} must be non-empty and alphanumeric")
    if len(set(labels)) != len(labels):
        raise UsageError(f"duplicate session labels in {list(sessions)}")
    return labels


def _check_choices(kind: str, chosen: Sequence[str], known: Sequence[str]) -> None:
    if not chosen:
        raise UsageError(f"need at least one {kind}")
    unknown = [c for c in chosen if c not in known]
    if unknown:
        raise UsageError(f"unknown {kind}(s) {unknown}; choose from {sorted(known)}")
    if len(set(chosen)) != len(chosen):
        raise UsageError(f"duplicate {kind}s in {list(chosen)}")


def _check_args(n_healthy: int, n_lesion: int, seed: int, contrasts: Sequence[str],
                field_of_view: Sequence[float], lesion_types: Sequence[str], acquisitions: Sequence[str]) -> None:
    """Fail early with a usage error rather than half-writing a dataset."""
    if n_healthy < 0 or n_lesion < 0:
        raise UsageError("participant counts must be >= 0")
    if not 1 <= n_healthy + n_lesion <= MAX_PARTICIPANTS:
        raise UsageError(f"need between 1 and {MAX_PARTICIPANTS} participants in total")
    if seed < 0:
        raise UsageError("seed must be >= 0")
    _check_choices("contrast", contrasts, tuple(CONTRASTS))
    _check_choices("lesion type", lesion_types, LESION_TYPES)
    _check_choices("acquisition", acquisitions, ACQUISITIONS)
    if len(field_of_view) != 3 or any(not n >= m for n, m in zip(field_of_view, MIN_FIELD_OF_VIEW)):
        raise UsageError(f"field of view must be 3 numbers (mm) >= {MIN_FIELD_OF_VIEW}, got {tuple(field_of_view)}")


def _prepare_out_dir(out_dir: Path) -> Path:
    """Refuse to mix phantom files into existing data; create the directory otherwise."""
    out_dir = Path(out_dir).absolute()
    if out_dir.exists():
        if not out_dir.is_dir():
            raise UsageError(f"output {out_dir} exists and is not a directory")
        if any(out_dir.iterdir()):
            raise UsageError(f"output directory {out_dir} is not empty")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CannotCreateError(f"cannot create {out_dir}: {exc}") from exc
    return out_dir


def _stream(seed: int, *keys: int | str) -> np.random.Generator:
    """Independent random stream per (participant, session, contrast), stable under additions."""
    ints = [k if isinstance(k, int) else zlib.crc32(k.encode()) for k in keys]
    return np.random.default_rng([seed, *ints])


def assign_phantoms(n_healthy: int, n_lesion: int, lesion_types: Sequence[str],
                    acquisitions: Sequence[str]) -> list[tuple[str | None, str]]:
    """(lesion type or None, acquisition) of each participant, healthy ones first.

    Healthy participants cycle through the acquisitions; lesion participants cycle through the
    lesion types and, shifted by one each round, the acquisitions, so that n types x n acquisitions
    participants hold every combination once.
    """
    n_types, n_acq = len(lesion_types), len(acquisitions)
    healthy = [(None, acquisitions[j % n_acq]) for j in range(n_healthy)]
    lesion = [(lesion_types[i % n_types], acquisitions[(i + i // n_types) % n_acq]) for i in range(n_lesion)]
    return healthy + lesion


def generate_dataset(out_dir: Path, n_healthy: int = 4, n_lesion: int = 2, seed: int = 0,
                     sessions: Sequence[str] = (), contrasts: Sequence[str] = ("T2w",),
                     field_of_view: Sequence[float] = DEFAULT_FIELD_OF_VIEW,
                     lesion_types: Sequence[str] = LESION_TYPES,
                     acquisitions: Sequence[str] = ACQUISITIONS) -> SyntheticDataset:
    """Write a synthetic BIDS dataset with ground-truth masks and return where everything is.

    ``field_of_view`` is in mm along left-right, anterior-posterior and inferior-superior; each
    participant's acquisition samples it at its own voxel size, and the stored array is permuted to
    the image's axis order (e.g. PSR stores (AP, SI, LR)). ``lesion_types`` and ``acquisitions`` pick
    the mix (see :func:`assign_phantoms`). Healthy participants come first (``HC``), then lesion
    participants. Same arguments, same bytes. Raises UsageError for bad arguments or a non-empty
    ``out_dir``.
    """
    _check_args(n_healthy, n_lesion, seed, contrasts, field_of_view, lesion_types, acquisitions)
    session_labels = _clean_sessions(sessions)
    root = _prepare_out_dir(Path(out_dir))
    plan = assign_phantoms(n_healthy, n_lesion, lesion_types, acquisitions)
    images: list[Path] = []
    cord_masks: dict[Path, Path] = {}
    lesion_masks: dict[Path, Path] = {}
    rows: list[ParticipantRow] = []
    for index, (lesion_type, acquisition_name) in enumerate(plan):
        label = f"{index + 1:02d}"
        rng = _stream(seed, index, "anatomy")
        age, sex = int(rng.integers(20, 70)), "M" if rng.uniform() < 0.5 else "F"
        rows.append(ParticipantRow(label, age, sex, lesion_type, acquisition_name))
        acquisition = draw_acquisition(acquisition_name, index, _stream(seed, index, "acquisition"))
        geom = make_geometry(index, acquisition, field_of_view)
        anat = make_anatomy(geom, lesion_type, rng)
        scale = float(np.exp(rng.uniform(math.log(50.0), math.log(3000.0))))
        for session in session_labels or [None]:
            for contrast in contrasts:
                noise_rng = _stream(seed, index, session or "", contrast)
                image, cord, lesion = write_image_set(root, label, session, contrast, anat, geom, scale, noise_rng)
                images.append(image)
                cord_masks[image] = cord
                if lesion is not None:
                    lesion_masks[image] = lesion
    write_top_level(root, rows, seed)
    return SyntheticDataset(root, [(r.label, r.pathology) for r in rows], images, cord_masks, lesion_masks,
                            {r.label: r.lesion_type for r in rows}, {r.label: r.acquisition for r in rows})


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    """Argument parser whose errors carry the BIDS usage exit code instead of 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(f"{self.prog}: {message}")


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m bids_app.synthetic",
                description="Write a synthetic spinal-cord phantom BIDS dataset with ground-truth masks.")
    p.add_argument("out_dir", type=Path, help="output directory (must not exist or be empty)")
    p.add_argument("--n-healthy", type=int, default=4, help="healthy participants (default 4)")
    p.add_argument("--n-lesion", type=int, default=2, help="participants with lesions (default 2)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--sessions", nargs="*", default=[], help="session labels (default: no sessions)")
    p.add_argument("--contrasts", nargs="+", default=["T2w"], choices=sorted(CONTRASTS),
                   help="contrasts to write (default T2w)")
    p.add_argument("--field-of-view", nargs=3, type=float, default=list(DEFAULT_FIELD_OF_VIEW),
                   metavar=("X", "Y", "Z"), help="field of view in mm along left-right, anterior-posterior, "
                   f"inferior-superior (default {' '.join(map(str, DEFAULT_FIELD_OF_VIEW))})")
    p.add_argument("--lesion-types", nargs="+", default=list(LESION_TYPES), choices=LESION_TYPES,
                   help="lesion types the lesion participants cycle through (default: all)")
    p.add_argument("--acquisitions", nargs="+", default=list(ACQUISITIONS), choices=ACQUISITIONS,
                   help="acquisitions the participants cycle through (default: all)")
    p.add_argument("-v", "--verbose", action="store_true", help="log each file written")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; returns the process exit code."""
    try:
        args = _parser().parse_args(argv)
        logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                            format="%(levelname)s %(name)s: %(message)s")
        ds = generate_dataset(args.out_dir, n_healthy=args.n_healthy, n_lesion=args.n_lesion,
                              seed=args.seed, sessions=args.sessions, contrasts=args.contrasts,
                              field_of_view=tuple(args.field_of_view), lesion_types=args.lesion_types,
                              acquisitions=args.acquisitions)
    except CountersegError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return int(exc.exit_code)
    print(f"wrote {len(ds.images)} image(s) for {len(ds.participants)} participant(s) to {ds.root}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
