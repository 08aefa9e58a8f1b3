"""The files the participant level writes for one image, so that a run tells done from half done.

The lesion mask is written last and marks an image done. Before an image is (re)done, its mask goes
first (an ``--overwrite`` that fails midway must not leave the old mask vouching for new, partial
outputs) and the temporary files a killed run left for its outputs are swept. If segmenting it
fails, what it wrote so far is removed: after any failure each image is complete or absent.
Strength-sweep files are extras, each written atomically, and are not part of the set.

One job at a time works on an image: it holds the image's lock (``logs/locks/<image stem>.lock``,
an ``flock`` the kernel releases when the job dies) from before it looks at the outputs until it
is done with them. So a job never sweeps the temporary files, nor removes the outputs, of an image
another live job is writing: under the lock, every temporary file of the image is abandoned.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from bids_app.bids.derivatives import KINDS, output_relpath

from bids_app.io import remove_leftover_temp_files
from bids_app.bids.layout import name_parts

log = logging.getLogger(__name__)

LOCKS_DIR = ("logs", "locks")


@dataclass(frozen=True)
class ImageOutputs:
    """Every output path of one source image (relative names fixed by ``bids.derivatives``), and its lock."""

    mask: Path
    files: tuple[Path, ...]
    lesion_table: Path
    evaluation: Path
    lock: Path

    @property
    def done(self) -> bool:
        return self.mask.is_file()

    def begin(self, locked: bool = True) -> None:
        """Forget the done marker and sweep temporary files left by a killed run (this image only).

        ``locked``: this job holds the image's lock, which proves every temporary file of the image
        abandoned; without it (a filesystem with no ``flock``) only those of dead processes go.
        """
        if self.mask.exists():
            self.mask.unlink()
        self._sweep(locked)

    def discard(self, locked: bool = True) -> None:
        """Remove what a failed attempt wrote, mask first, so the image is plainly not done."""
        removed = [p for p in self.files if p.exists()]
        for path in removed:
            path.unlink(missing_ok=True)
        self._sweep(locked)
        if removed:
            log.info("removed the %d partial output(s) of %s", len(removed), self.mask.parent)

    def _sweep(self, locked: bool) -> None:
        remove_leftover_temp_files(self.mask.parent, {p.name for p in self.files}, keep_live_owners=not locked)


def image_outputs(output_dir: Path, source_relpath: str, disambiguate: bool = False) -> ImageOutputs:
    output_dir = Path(output_dir)
    images = {kind: output_dir / output_relpath(source_relpath, kind, disambiguate) for kind in KINDS}
    mask = images["lesion_mask"]
    stem = name_parts(Path(source_relpath).name)[0]  # sub-01_ses-1_T2w: unique across contrasts
    table, evaluation = mask.parent / f"{stem}_lesions.tsv", mask.parent / f"{stem}_evaluation.json"
    sidecars = [p.with_name(p.name[: -len(".nii.gz")] + ".json") for p in images.values()]
    # The mask and its sidecar first: removing them first turns "done" into "not done" at once.
    files = (mask, sidecars[KINDS.index("lesion_mask")],
             *(p for k, p in images.items() if k != "lesion_mask"),
             *(s for k, s in zip(KINDS, sidecars) if k != "lesion_mask"), table, table.with_suffix(".json"),
             evaluation)
    # One lock per source image, whatever its output names (a --contrast selection may change them).
    return ImageOutputs(mask, files, table, evaluation, output_dir.joinpath(*LOCKS_DIR, f"{stem}.lock"))
