"""The reliability catalogue: every case of bad input, interruption, concurrency and security, with
the exit code and the message a user gets. The tests check each row; the table in
docs/reliability.md ("Cases") must equal ``markdown_table()`` (``tests/reliability/test_reliability_doc.py``),
so the two never drift.

Print the table for docs/reliability.md with ``python -m tests.reliability.catalogue``.
"""
from __future__ import annotations

from dataclasses import dataclass

from bids_app.errors import ExitCode


@dataclass(frozen=True)
class Case:
    key: str
    case: str  # what a user did or has (docs/reliability.md "case" column)
    exit_code: int
    message: str  # what the error line (exit 0: the log) says; "…" stands for run-specific text

    def fragments(self) -> list[str]:
        return [part.strip() for part in self.message.split("…") if part.strip()]


def _c(key: str, case: str, code: int, message: str) -> Case:
    return Case(key, case, int(code), message)


BAD_DATA, VALIDATION, MISSING = ExitCode.BAD_DATA, ExitCode.VALIDATION, ExitCode.MISSING_INPUT

#: Bad input. The error line names the file at fault (most start with its path).
BAD_INPUT = (
    _c("empty-image", "0-byte `.nii.gz` image", BAD_DATA, "file is empty (0 bytes), not a NIfTI image"),
    _c("truncated-image", "truncated `.nii.gz` image", BAD_DATA, "file is truncated"),
    _c("gzip-not-nifti", "a gzip file that is not a NIfTI", BAD_DATA, "gzip-compressed, but not a NIfTI file inside"),
    _c("broken-symlink", "broken symlink (DataLad content not retrieved)", BAD_DATA, "broken symbolic link to … (a DataLad/git-annex file whose content was not retrieved? run 'datalad get')"),
    _c("nonfinite-voxels", "NaN/Inf voxels", BAD_DATA, "are not finite (4 NaN, 2 infinite); none is replaced unless allowed"),
    _c("nonfinite-allowed", "a few NaN voxels with `preprocessing.max_nonfinite_fraction` set", 0,
       "replaced 2 NaN/infinite voxel(s) by the background value"),
    _c("4d-image", "4D image (several volumes)", BAD_DATA, "4D image with 2 volumes; counterseg needs a 3D image"),
    _c("2d-image", "2D image", BAD_DATA, "2D image (shape …); counterseg needs a 3D image"),
    _c("voxel-size-zero", "voxel size 0", BAD_DATA, "voxel size 0 mm along axis 3 (header pixdim[3]) is not positive"),
    _c("voxel-size-negative", "negative voxel size", BAD_DATA, "voxel size -1 mm along axis 3 (header pixdim[3]) is not positive"),
    _c("voxel-size-100mm", "100 mm voxels", BAD_DATA, "voxel size 100 mm along axis 3 is outside the plausible range 0.01-20 mm of spinal-cord MRI (wrong units in the header?)"),
    _c("far-too-small", "image far smaller than the model's field of view", BAD_DATA, "field of view … mm is under a quarter of the model's … mm window along …: far too small an image for this model"),
    _c("far-larger", "image far larger than the model's field of view (cropped around the cord)", 0,
       "participant level finished in"),
    _c("too-many-voxels", "more voxels than counterseg loads (2^28)", BAD_DATA, "image grid … has … voxels, more than the … counterseg loads; crop or downsample it first"),
    _c("singular-affine", "singular affine", BAD_DATA, "the affine (qform/sform) is singular; the voxel grid has no valid world orientation"),
    _c("cord-mask-shape", "cord mask shape differs from its image", BAD_DATA, "cord mask shape … does not match the shape … of image"),
    _c("cord-mask-affine", "cord mask affine differs from its image", BAD_DATA, "cord mask affine differs from the affine of image … (largest difference 2); the mask is not on the image grid"),
    _c("cord-mask-empty", "empty cord mask", BAD_DATA, "cord mask is empty (no voxel above 0.5): a failed cord segmentation?"),
    _c("lesion-mask-values", "lesion mask with values other than 0/1", BAD_DATA, "lesion mask has values other than 0 and 1 (2); a label map or a soft segmentation? binarise it"),
    _c("participants-no-id", "`participants.tsv` without `participant_id` column", VALIDATION, "no participant_id column"),
    _c("participants-missing-cells", "`participants.tsv` row with a missing column", VALIDATION, "line 3 has 2 column(s), the header has 6"),
    _c("participants-extra-cells", "`participants.tsv` row with an extra column", VALIDATION, "line 2 has 7 column(s), the header has 6"),
    _c("participants-no-healthy-column", "`participants.tsv` without the healthy-filter column", MISSING, "participants.tsv has no 'pathology' column to select healthy participants"),
    _c("participants-extra-column", "`participants.tsv` with an extra, undeclared column", 0, "training participants: sub-01"),
    _c("description-missing", "`dataset_description.json` missing", VALIDATION, "missing: … is laid out as a BIDS dataset (sub-* folders, participants.tsv) but has no dataset_description.json"),
    _c("description-invalid", "`dataset_description.json` not valid JSON", VALIDATION, "not valid JSON"),
    _c("empty-placeholders", "valid dataset whose NIfTIs are empty placeholders (bids-examples)", BAD_DATA,
       "file is empty (0 bytes), not a NIfTI image (all … images of … are empty placeholder files, as in bids-examples: there is no image data)"),
    _c("symlinked-files", "images, masks and `bids_dir` itself are symlinks (DataLad/git-annex)", 0, "participant level finished in"),
    _c("read-only-bids-dir", "read-only `bids_dir`", 0, "participant level finished in"),
    _c("output-unwritable", "unwritable `output_dir`", ExitCode.CANNOT_CREATE, "cannot create output in …: Not a directory"),
    _c("disk-full", "disk full while writing an output", ExitCode.IO_ERROR, "writing … failed: No space left on device [ENOSPC]"),
    _c("model-other-version", "model directory from another counterseg version", BAD_DATA, "model trained with counterseg 7.0.0 cannot be used by counterseg …: retrain it with the group level"),
    _c("model-tampered", "model weights modified after training", BAD_DATA, "checksum mismatch with the model card"),
    _c("model-truncated", "model weights corrupted (truncated)", BAD_DATA, "checksum mismatch with the model card"),
    _c("model-pickle-code", "model weights that are a pickle with code", BAD_DATA, "not loadable as weights-only (Weights only load failed …)"),
    _c("checkpoint-corrupted", "training checkpoint corrupted (resume refused)", BAD_DATA,
       "not a loadable weights-only checkpoint (…)"),
    _c("checkpoint-pickle-code", "training checkpoint that is a pickle with code", BAD_DATA,
       "not a loadable weights-only checkpoint (…)"),
)

#: Interruptions, concurrency and security (each checked by its own test).
RUNTIME = (
    _c("group-sigkill", "group level SIGKILLed at seeded points in every stage, then rerun", 0, "resuming from step"),
    _c("participant-sigkill", "participant level SIGKILLed mid-image, then rerun", 0, "outputs exist, skipped"),
    _c("group-sigterm", "SIGTERM (SLURM time limit) during group training", 128 + 15,
       "stopped by SIGTERM: vqgan saved a checkpoint at step 1"),
    _c("group-sigint", "SIGINT (Ctrl-C) during group training", 128 + 2,
       "stopped by SIGINT: diffusion saved a checkpoint at step 1"),
    _c("participant-sigterm", "SIGTERM during the participant level", 128 + 15, "stopped by SIGTERM; the run is unfinished"),
    _c("participant-while-training", "participant level while the group level is still training", MISSING,
       "is not finished (model_card.json, written last, is missing)"),
    _c("label-path", "`../` in a participant label", ExitCode.USAGE, "invalid sub label '../sub-01': BIDS labels are alphanumeric"),
    _c("filter-path", "`../` or `/` in a filter-file value", ExitCode.USAGE, "--bids-filter-file …: 'acquisition' value … looks like a path ('..', '/'): filter values are BIDS labels"),
    _c("no-network", "no network at run time (sockets refused)", 0, "participant level finished in"),
)

#: Settings and inputs that once crashed (exit 1 with a traceback): each is now a usage or data error.
SETTINGS_AND_INPUTS: tuple[Case, ...] = (
    _c("participant-label-twice", "`--participant-label` given twice", 0,
       "2 image(s) of 2 participant(s)"),
    _c("model-override-unknown", "an unknown architecture key under `models.*` in a `--config` file", ExitCode.USAGE,
       "models: unknown VQGANConfig keys: colour"),
    _c("threshold-nan", "`--threshold nan`", ExitCode.USAGE, "segmentation.lesions.threshold must be a finite number, got nan"),
    _c("threshold-inf", "`--threshold inf`", ExitCode.USAGE, "segmentation.lesions.threshold must be a finite number, got inf"),
    _c("adapter-scale-nan", "`adapter_scale: \"nan\"` in a `--config` file", ExitCode.USAGE,
       "segmentation.counterfactual.adapter_scale must be a finite number >= 0, got nan"),
    _c("seed-too-large", "`--seed` 2^64, at either level", ExitCode.USAGE,
       "compute.seed must be an integer in [0, 4294967295], got 18446744073709551616"),
    _c("seed-negative", "`--seed -1`, at either level", ExitCode.USAGE, "compute.seed must be an integer in [0, 4294967295], got -1"),
    _c("checkpoint-every-zero", "`checkpoint_every: 0` for a training stage", ExitCode.USAGE,
       "training.vqgan.checkpoint_every must be an integer >= 1, got 0"),
    _c("log-every-zero", "`log_every: 0` for a training stage", ExitCode.USAGE, "training.diffusion.log_every must be an integer >= 1, got 0"),
    _c("shape-multiple-zero", "`shape_multiple: 0`", ExitCode.USAGE, "preprocessing.shape_multiple must be an integer >= 1, got 0"),
    _c("target-spacing-zero", "`target_spacing: [0, 1, 1]`", ExitCode.USAGE,
       "preprocessing.target_spacing must be 3 values, each a finite number > 0, got [0.0, 1.0, 1.0]"),
    _c("percentiles-decreasing", "`percentiles: [99.5, 0.5]`", ExitCode.USAGE,
       "preprocessing.percentiles must be 2 increasing numbers in [0, 100], got [99.5, 0.5]"),
    _c("learning-rate-nan", "`learning_rate: \"nan\"`", ExitCode.USAGE, "training.adapter.learning_rate must be a finite number > 0, got nan"),
    _c("max-steps-zero", "`max_steps: 0` (once saved the stage untrained, marked finished)", ExitCode.USAGE,
       "training.vqgan.max_steps must be an integer >= 1, got 0"),
    _c("max-steps-negative", "`max_steps: -1`", ExitCode.USAGE, "training.diffusion.max_steps must be an integer >= 1, got -1"),
    _c("max-nonfinite-negative", "`max_nonfinite_fraction: -1`", ExitCode.USAGE,
       "preprocessing.max_nonfinite_fraction must be in [0, 1], got -1.0"),
    _c("rgb-image", "RGB24 (colour) image", BAD_DATA,
       "RGB24 colour image (3 values per voxel); counterseg needs a grey-level image (one value per voxel)"),
    _c("nii-and-nii-gz", "the same image as `.nii` and as `.nii.gz`", BAD_DATA,
       "sub-01_T2w.nii and …sub-01_T2w.nii.gz: the same image twice, as .nii and as .nii.gz; keep only one of them"),
    _c("float64-beyond-float32", "a float64 image with a voxel of 1e39", BAD_DATA,
       "1 voxel(s) outside the float32 range (largest magnitude 1e+39, …); counterseg computes in float32: rescale "
       "the image"),
    _c("label-lacks-contrast", "`--participant-label` of a participant without the selected contrast",
       ExitCode.NOTHING_SELECTED, "sub-01 has no T1w image (it has: T2w); pass --contrast to choose another suffix"),
    _c("stale-database", "`--bids-database-dir` built before a participant was added", 0,
       "is stale (sub-07 on disk but not indexed): indexing … in memory for this run; rebuild the database with "
       "--reset-database"),
    _c("no-orientation", "image whose qform and sform codes are both 0", 0,
       "qform_code and sform_code are both 0: the header does not say how the image lies in the scanner, so its "
       "orientation is a guess"),
    _c("earlier-output-in-derivatives", "an earlier counterseg output in `bids_dir/derivatives/` (its predictions)", 0,
       "not searched for masks: … (generated by counterseg (GeneratedBy in its dataset_description.json): its "
       "lesion masks are predictions, not ground truth)"),
    _c("output-dir-symlinked", "`output_dir` reached through a symlink in `bids_dir/derivatives/`", 0,
       "not searched for masks: … (it is this run's output_dir, whose masks are the run's own predictions)"),
    _c("derivatives-earlier-output", "`--derivatives` naming an earlier counterseg output", ExitCode.USAGE,
       "--derivatives …: generated by counterseg (GeneratedBy in its dataset_description.json): its lesion masks "
       "are predictions, not ground truth; pass the dataset that holds the reference masks"),
    _c("derivatives-output-dir", "`--derivatives` naming the run's own `output_dir`", ExitCode.USAGE,
       "--derivatives …: it is this run's output_dir, whose masks are the run's own predictions"),
)

#: Runs that must not lose data or give a silently wrong result (shared work dirs, finished models,
#: datasets that are not the run's own, edited model cards, selection-dependent names, other contrasts).
TRUST: tuple[Case, ...] = (
    _c("shared-work-dir", "two datasets trained into two output dirs sharing one `-w` work dir", 0,
       "training for up to"),
    _c("resume-other-data", "an interrupted training rerun on changed training data", ExitCode.USAGE,
       "the unfinished model in … was made by another training (…): training file content differs: …; rerun with "
       "the settings and data it was made with, or --retrain to start afresh"),
    _c("group-rerun-same-settings", "group level rerun on a finished model without `--preset`/`--config`", 0,
       "is finished and was trained with these settings and data: nothing to train"),
    _c("group-rerun-other-settings", "group level rerun on a finished model with other settings", ExitCode.USAGE,
       "the finished model in … was trained with other settings or data: …; a finished model is never modified "
       "without --retrain"),
    _c("group-reports-only", "`group --reports-only`", 0, "the group report was rebuilt; nothing was trained"),
    _c("swapped-dirs", "`bids_dir` and `output_dir` swapped", ExitCode.USAGE,
       "holds a dataset that counterseg did not generate (are bids_dir and output_dir swapped?)"),
    _c("output-other-derivative", "`output_dir` is another derivative dataset (the masks')", ExitCode.USAGE,
       "holds a dataset that counterseg did not generate: counterseg writes only into a new or empty folder or its "
       "own earlier output"),
    _c("output-not-empty", "`output_dir` is a non-empty folder that is not a counterseg output", ExitCode.USAGE,
       "is not empty (…) and holds no counterseg output"),
    _c("bids-inside-output", "`bids_dir` inside `output_dir`", ExitCode.USAGE, "contains the input dataset"),
    _c("model-dir-is-a-dataset", "`--model-dir` (or `-w`) is a folder holding a BIDS dataset", ExitCode.USAGE,
       "holds a BIDS dataset: models and scratch files go to a folder of their own"),
    _c("model-card-edited", "`model_card.json` edited by hand (e.g. `latent_scale`)", BAD_DATA,
       "the model card was modified after training"),
    _c("model-config-edited", "a component's `config.json` edited by hand", BAD_DATA,
       "checksum mismatch with the model card: the config was modified after training"),
    _c("other-contrast", "participant level on a contrast the model was not trained on (T1w for a T2w model)",
       ExitCode.USAGE, "the model in … was trained on T2w images, not T1w (…): its calibration does not hold for "
       "them; select --contrast T2w, or pass --allow-other-contrast to segment them anyway"),
    _c("other-contrast-allowed", "the same with `--allow-other-contrast`", 0,
       "segmenting T1w image(s) with a model trained on T2w (--allow-other-contrast)"),
)

#: One bad image stops nothing; concurrent jobs on one participant keep each other's outputs.
CONTINUATION: tuple[Case, ...] = (
    _c("continue-past-bad-image", "one truncated image among good ones (participant level): the good ones are "
       "segmented, a crash report is written per failed image", BAD_DATA,
       "file is truncated) (…: 1 of 3 images failed; crash report: …/logs/crash_…_sub-05_T2w.txt)"),
    _c("stop-on-first-crash", "`--stop-on-first-crash` with a truncated image among good ones: nothing is segmented",
       BAD_DATA, "file is truncated"),
    _c("continue-past-crash", "an image crashes while it is segmented and another is truncated: the rest are "
       "segmented; the exit code is 1 if any image crashed, else the first failed image's", ExitCode.UNEXPECTED,
       "2 of 3 images failed: …, …"),
    _c("interrupted-not-failed", "SIGTERM while the first of several images is segmented: the run stops at once",
       128 + 15, "stopped by SIGTERM; the run is unfinished"),
    _c("group-bad-training-images", "two bad training images (group level): refused before training, both named",
       BAD_DATA, "2 of 4 images failed: …, …"),
    _c("image-being-segmented", "two jobs on one participant: the second reaches the image the first is "
       "segmenting (neither deletes the other's files)", 0, "being segmented by another job (pid …), skipped"),
)

ALL_CASES = (*BAD_INPUT, *RUNTIME, *SETTINGS_AND_INPUTS, *TRUST, *CONTINUATION)
CATALOGUE = {case.key: case for case in ALL_CASES}


def case(key: str) -> Case:
    return CATALOGUE[key]


def markdown_table() -> str:
    lines = ["| case | exit code | message: the one error line, which names the file (exit 0: a log line) |",
             "| --- | --- | --- |"]
    for item in ALL_CASES:
        lines.append(f"| {item.case} | {item.exit_code} | {item.message.replace('|', '/')} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(markdown_table())
