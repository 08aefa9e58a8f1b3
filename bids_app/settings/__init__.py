"""Run settings: frozen dataclasses, presets, and overrides from a JSON/YAML file.

One place per setting. Precedence, lowest first: dataclass defaults < preset < ``--config`` file <
flags given on the command line. The resolved settings are saved with every run under
``<output_dir>/logs/`` so a result can always be traced to what produced it.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Mapping

from bids_app.errors import UsageError
from bids_app.settings.fields import (REQUIRED, Checked, Rule, above, at_least, between, build_dataclass, count,
                                     each_of, increasing, matches, non_empty, setting, sized, to_jsonable, whole)
from bids_app.settings.legacy import migrate
from bids_app.settings.segmentation import SegmentationSettings

ANALYSIS_LEVELS = ("participant", "group")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
TRAINING_STAGES = ("plan", "vqgan", "diffusion", "adapter", "calibrate")  # "plan" (data preparation) always runs first

#: Derivative name templates, tried in order. ``{stem}`` is the image name without extension
#: (``sub-01_ses-1_T2w``), ``{entities}`` the same without the suffix (``sub-01_ses-1``).
DEFAULT_CORD_NAMES: tuple[str, ...] = (
    "{stem}_label-SC_seg",  # spine-generic (current)
    "{stem}_label-SC_mask",
    "{entities}_label-SC_mask",  # BIDS-derivatives style
    "{stem}_seg-manual",  # spine-generic (legacy)
    "{stem}_label-SC_softseg",  # contrast-agnostic soft segmentation
    "{stem}_softseg",
    "{stem}_seg",  # sct_deepseg_sc / contrast-agnostic default output
)
DEFAULT_LESION_NAMES: tuple[str, ...] = (
    "{stem}_label-lesion_seg",
    "{stem}_label-lesion_mask",
    "{entities}_label-lesion_mask",
    "{stem}_lesion-manual",
    "{stem}_lesion",
)
#: Intervertebral disc labels (SCT numbering: value n at the disc above vertebra n, 3 = C2/C3), or a
#: cord segmentation labelled by vertebral level; they give each lesion its vertebral level.
DEFAULT_DISC_NAMES: tuple[str, ...] = (
    "{stem}_labels-disc-manual",  # spine-generic (manual disc labels)
    "{stem}_label-disc",
    "{stem}_label-discs_dlabel",  # spine-generic (current)
    "{stem}_labels-disc",
    "{stem}_seg_labeled_discs",  # sct_label_vertebrae outputs
    "{stem}_seg_labeled",
)


#: Letters and digits: BIDS labels (``sub-<label>``) and suffixes; nothing that could be a path.
_LABELS = matches(r"[A-Za-z0-9]+", "BIDS labels (letters and digits only)")
_SUFFIXES = Rule(non_empty(_LABELS).test, "one or more BIDS suffixes (letters and digits, e.g. T2w)")
_TEXT = matches(r"(?s).*\S.*", "a non-empty text")


def _is_template(template: Any) -> bool:
    """A derivative name template: formats with ``{stem}`` and ``{entities}`` only, names a file in
    the image's own folder (no ``/``, no ``..``)."""
    if not isinstance(template, str) or "/" in template or "\\" in template or ".." in template:
        return False
    try:
        return bool(template.format(stem="s", entities="e").strip())
    except (KeyError, IndexError, ValueError):
        return False


_TEMPLATES = Rule(lambda v: isinstance(v, tuple) and all(_is_template(t) for t in v),
                  "name templates with {stem} and {entities} only (no '/' or '..')")
_DERIVATIVE_NAMES = matches(r"[A-Za-z0-9][A-Za-z0-9_-]*", "cord, lesion or a name part such as label-SC_seg")
#: Top-level keys of a BIDS filter (``{"image": {entity: value}}``, fMRIPrep's format).
BIDS_FILTER_KEYS = ("image",)


def _is_filter_value(value: Any) -> bool:
    """A label, a number, null (entity absent) or "*" (any value); never something path-like."""
    if isinstance(value, list):
        return all(_is_filter_value(v) for v in value)
    if value is None or isinstance(value, (bool, int, float)):
        return True
    return isinstance(value, str) and not any(part in value for part in ("/", "\\", "..", "\0"))


_FILTERS = Rule(lambda v: isinstance(v, Mapping) and set(v) <= set(BIDS_FILTER_KEYS) and all(
    isinstance(q, Mapping) and all(isinstance(k, str) and _is_filter_value(x) for k, x in q.items())
    for q in v.values()), '{"image": {entity: label, null or "*"}} with no path-like value')


@dataclass(frozen=True)
class SelectionSettings(Checked):
    """Which images, derivatives and participants a run uses."""

    SECTION: ClassVar[str] = "selection"

    participant_labels: tuple[str, ...] = setting((), "participants to process, without 'sub-' (empty: all)",
                                                  rule=_LABELS)
    session_labels: tuple[str, ...] = setting((), "sessions to process, without 'ses-' (empty: all)", rule=_LABELS)
    contrasts: tuple[str, ...] = setting(("T2w",), "image suffixes to process", rule=_SUFFIXES)
    bids_filters: Mapping[str, Any] = setting({}, "pybids filter of the images (--bids-filter-file)", rule=_FILTERS)
    derivatives: tuple[Path, ...] = setting((), "derivative datasets searched for masks (empty: every folder in "
                                            "bids_dir/derivatives not generated by counterseg)")
    require_derivatives: tuple[str, ...] = setting((), "drop images lacking one of these derivatives",
                                                   rule=_DERIVATIVE_NAMES)
    cord_names: tuple[str, ...] = setting(DEFAULT_CORD_NAMES, "name templates of cord masks, tried in order",
                                          rule=_TEMPLATES)
    lesion_names: tuple[str, ...] = setting(DEFAULT_LESION_NAMES, "name templates of lesion masks (ground truth), "
                                            "tried in order", rule=_TEMPLATES)
    control_names: tuple[str, ...] = setting((), "name templates of the T2I-Adapter's control derivative (empty: "
                                             "the cord mask)", rule=_TEMPLATES)
    disc_names: tuple[str, ...] = setting(DEFAULT_DISC_NAMES, "name templates of disc labels (or a cord segmentation "
                                          "labelled by vertebral level), tried in order", rule=_TEMPLATES)
    healthy_column: str = setting("pathology", "participants.tsv column marking healthy participants", rule=_TEXT)
    healthy_value: str = setting("HC", "value of healthy_column that marks a healthy participant", rule=_TEXT)
    train_participants: tuple[str, ...] = setting((), "group level: train on these participants instead of the "
                                                  "healthy ones", rule=_LABELS)


@dataclass(frozen=True)
class PreprocessingSettings(Checked):
    """Data decisions; unset spacing/shape are derived from the training data's fingerprint."""

    SECTION: ClassVar[str] = "preprocessing"

    target_spacing: tuple[float, ...] | None = setting(None, "model-space voxel size in mm per axis (null: the "
                                                       "training images' median)", rule=sized(3, above(0)))
    target_shape: tuple[int, ...] | None = setting(None, "model-space grid in voxels per axis, multiples of "
                                                   "shape_multiple (null: from the training images' field of "
                                                   "view)", rule=count(3))
    max_shape: tuple[int, ...] = setting((64, 64, 128), "largest model-space grid a derived shape may have",
                                         rule=count(3))
    shape_multiple: int = setting(16, "model-space shapes are multiples of this (the networks' total downsampling)",
                                  rule=whole(1))
    percentiles: tuple[float, ...] = setting((0.5, 99.5), "intensity percentiles mapped to -1 and 1",
                                             rule=increasing(2, between(0, 100)))
    image_order: int = setting(1, "spline order resampling images (1: linear, 3: cubic)", choices=(1, 3))
    mask_interpolation: str = setting("nearest", "how masks are resampled (linear: then thresholded at 0.5)",
                                      choices=("nearest", "linear"))
    max_nonfinite_fraction: float = setting(0.0, "largest fraction of NaN/infinite voxels replaced by the "
                                            "background (0: any is an error)", rule=between(0, 1))
    validation_fraction: float = setting(0.2, "fraction of the healthy participants held out (calibration)",
                                         rule=between(0, 1, high_open=True))

    def check_combined(self) -> None:
        if self.target_shape is not None and any(size % self.shape_multiple for size in self.target_shape):
            raise UsageError(f"preprocessing.target_shape {list(self.target_shape)} must be multiples of "
                             f"preprocessing.shape_multiple ({self.shape_multiple})")


@dataclass(frozen=True)
class StageSettings(Checked):
    """Budget and optimiser of one training stage.

    ``batch_size`` is the effective (global) batch of one optimiser step, whatever the number of
    processes: under torchrun each of N processes takes ``batch_size / (N * accumulation_steps)``
    volumes per micro-step. ``learning_rate`` is used as given: nothing scales it with the batch or
    the number of processes (both are logged at the start of each stage).
    """

    SECTION: ClassVar[str] = "training.<stage>"

    max_steps: int = setting(2000, "optimiser steps of the stage", rule=whole(1))
    max_time_s: float | None = setting(None, "stop the stage (with a checkpoint) after this many seconds "
                                       "(null: no limit)", rule=above(0))
    batch_size: int = setting(2, "volumes per optimiser step, over all processes", rule=whole(1))
    accumulation_steps: int = setting(1, "micro-steps per optimiser step (batch_size must be a multiple of it)",
                                      rule=whole(1))
    learning_rate: float = setting(2e-4, "the optimiser's learning rate", rule=above(0))
    checkpoint_every: int = setting(100, "steps between checkpoints", rule=whole(1))
    log_every: int = setting(20, "steps between log lines", rule=whole(1))
    figure_every: int = setting(500, "steps between progress figures (0: none)", rule=whole(0))
    precision: str = setting("auto", "autocast while training on CUDA (auto: bf16 where supported)",
                             choices=PRECISIONS)
    clip_norm: float = setting(1.0, "gradient norm clipped to this (0: no clipping)", rule=at_least(0))

    def check_combined(self) -> None:
        if self.batch_size % self.accumulation_steps:
            raise UsageError(f"{self.SECTION}: batch_size ({self.batch_size}) must be a multiple of "
                             f"accumulation_steps ({self.accumulation_steps})")


@dataclass(frozen=True)
class AdapterStageSettings(StageSettings):
    """T2I-Adapter stage: the common budget and optimiser only."""

    SECTION: ClassVar[str] = "training.adapter"


@dataclass(frozen=True)
class VQGANStageSettings(StageSettings):
    """Autoencoder stage: adversarial terms start after ``disc_start`` steps (warm-up)."""

    SECTION: ClassVar[str] = "training.vqgan"

    disc_start: int = setting(500, "steps before the adversarial terms start", rule=whole(0))
    disc_weight: float = setting(0.1, "weight of the adversarial loss", rule=at_least(0))
    feature_matching_weight: float = setting(1.0, "weight of the discriminator feature-matching loss",
                                             rule=at_least(0))
    crop_shape: tuple[int, ...] | None = setting(None, "random training crops of this many voxels per axis "
                                                 "(null: whole volumes)", rule=count(3))
    perceptual_weights: Path | None = setting(None, "a local TorchScript feature extractor for the perceptual "
                                              "loss (never downloaded; null: none)")
    perceptual_weight: float = setting(0.1, "weight of the perceptual loss", rule=at_least(0))
    #: Recompute the autoencoder's blocks in the backward instead of keeping their activations: a few
    #: more FLOPs for a third of the memory (docs/benchmarks.md). Off: faster where memory is plentiful.
    activation_checkpointing: bool = setting(True, "recompute activations in the backward (less memory, a little "
                                             "slower)")


@dataclass(frozen=True)
class DiffusionStageSettings(StageSettings):
    """Latent diffusion stage."""

    SECTION: ClassVar[str] = "training.diffusion"

    ema_decay: float = setting(0.999, "decay of the weights' exponential moving average", rule=between(0, 1))
    loss: str = setting("l2", "the denoising loss", choices=("l1", "l2"))
    #: Fraction of training samples noised only inside a random box centred in the cord (the rest of
    #: the latent clean, the loss on the box): teaches the UNet the patched noising of inference
    #: (bids_app.schedulers.patches). 0: the plain objective only.
    patch_fraction: float = setting(0.7, "fraction of samples noised only in a box in the cord (patched noising)",
                                    rule=between(0, 1))
    patch_max_size: tuple[int, int, int] = setting((3, 3, 4), "largest noised box, in latent voxels per axis",
                                                   rule=count(3))
    #: Encode each augmented training item once and reuse its latent every this many epochs (0: encode
    #: at every step). Encoding is most of a step; memory is this many latents per training image.
    latent_pool_epochs: int = setting(0, "reuse each item's latent over this many epochs (0: encode at every step)",
                                      rule=whole(0))
    lr_schedule: str = setting("constant", "constant, or cosine: decayed from learning_rate to 0 over max_steps",
                               choices=("constant", "cosine"))
    augmentation: str = setting("full", "full (flips, rotations, intensity changes, thick slices) or flip "
                                "(random windows, left-right flips and thick slices: no rotations or intensity "
                                "changes)", choices=("full", "flip"))


@dataclass(frozen=True)
class TrainingSettings(Checked):
    """Which stages run and how; a finished stage is skipped unless ``retrain``."""

    SECTION: ClassVar[str] = "training"

    stages: tuple[str, ...] = setting(("vqgan", "diffusion", "adapter", "calibrate"), "stages to run (plan always "
                                      "runs first)", rule=each_of(TRAINING_STAGES))
    retrain: bool = setting(False, "retrain stages that already finished")
    augment: bool = setting(True, "augment the training volumes")
    vqgan: VQGANStageSettings = field(default_factory=VQGANStageSettings)
    diffusion: DiffusionStageSettings = field(default_factory=DiffusionStageSettings)
    adapter: AdapterStageSettings = field(default_factory=AdapterStageSettings)


@dataclass(frozen=True)
class ModelSettings(Checked):
    """Architecture overrides over the preset's component configs (saved with each component).

    The keys are those of each component's config; the component checks them where it is built
    (the settings layer imports no model code).
    """

    SECTION: ClassVar[str] = "models"

    vqgan: Mapping[str, Any] = setting({}, "VQ-GAN config overrides")
    discriminator: Mapping[str, Any] = setting({}, "discriminator config overrides")
    unet: Mapping[str, Any] = setting({}, "diffusion UNet config overrides")
    scheduler: Mapping[str, Any] = setting({}, "noise scheduler config overrides")
    adapter: Mapping[str, Any] = setting({}, "T2I-Adapter config overrides")


#: The seed range every consumer accepts: ``numpy.random.seed`` takes [0, 2**32 - 1];
#: ``torch.Generator.manual_seed`` and ``numpy.random.default_rng`` take more. The app derives
#: chain seeds by multiplying (``chain_seed``), which stays within torch's 64 bits from this range.
MAX_SEED = 2**32 - 1


@dataclass(frozen=True)
class ComputeSettings(Checked):
    """Where and how hard to compute; none of these changes a result beyond float rounding, but the seed."""

    SECTION: ClassVar[str] = "compute"

    device: str = setting("auto", "compute device: auto, cpu, cuda or cuda:N",
                          rule=matches(r"auto|cpu|cuda(:\d+)?", "auto, cpu, cuda or cuda:N"))
    nprocs: int | None = setting(None, "CPUs this job may use in all (null: those it is allowed)", rule=whole(1))
    omp_nthreads: int | None = setting(None, "threads per process (null: nprocs / processes per node)",
                                       rule=whole(1))
    seed: int = setting(0, f"random seed of every stochastic step, an integer in [0, {MAX_SEED}] (both levels)",
                        rule=whole(0, MAX_SEED))
    inference_batch_size: int = setting(16, "denoising chains (windows x strengths x samples x patch sets) per "
                                        "UNet forward; lower it if the GPU runs out of memory, results do not "
                                        "change", rule=at_least(1))
    precision: str = setting("auto", "inference autocast on CUDA (auto: bf16 where supported); the CPU always "
                             "computes in fp32", choices=PRECISIONS)
    max_latent_voxels: int | None = setting(None, "decode in tiles of at most this many latent voxels (bounds "
                                            "the decoder's memory)", rule=at_least(1))


#: Presets name a scale of models and data (``tiny``: CPU-sized, for tests and the demo): overrides
#: applied over the defaults and under the user's ``--config`` and flags.
#: v-prediction in both: with epsilon-prediction the clean-latent estimate at the top of the cosine
#: schedule (sqrt(alpha_bar) ~ 5e-5) amplifies any error by 1e4, and samples from pure noise fail.
_V_PREDICTION = {"scheduler": {"prediction_type": "v_prediction"}}
PRESETS: dict[str, dict[str, Any]] = {
    "default": {"models": _V_PREDICTION},
    "tiny": {
        # 2x2x2 downsampling and 512 codes: a better reconstruction than the 4x4x4 / 64-code tiny
        # autoencoder at the same step time on 2 CPU cores (docs/benchmarks.md).
        "models": {**_V_PREDICTION, "vqgan": {"downsample": (2, 2, 2), "n_codes": 512}},
        "preprocessing": {"max_shape": (32, 32, 32)},
        "training": {
            # CPU-sized volumes fit in memory: no recomputation (13% of the step) for the demo's budget.
            "vqgan": {"max_steps": 60, "batch_size": 2, "learning_rate": 1e-3, "disc_start": 40,
                      "checkpoint_every": 20, "log_every": 10, "figure_every": 30, "activation_checkpointing": False},
            # Latent pool: 64 augmented passes kept (a 16^3 x 8 latent is 128 KiB: 8 MiB per image).
            # Flips only, cosine decay: measured better for the patched objective on the demo's budget.
            "diffusion": {"max_steps": 80, "batch_size": 2, "learning_rate": 1e-3, "ema_decay": 0.9, "latent_pool_epochs": 64,
                          "augmentation": "flip", "lr_schedule": "cosine",
                          "checkpoint_every": 20, "log_every": 10, "figure_every": 40},
            "adapter": {"max_steps": 40, "batch_size": 2, "learning_rate": 1e-3, "checkpoint_every": 20,
                        "log_every": 10, "figure_every": 0},
        },
    },
}


@dataclass(frozen=True)
class RunSettings(Checked):
    """Everything one invocation of ``run.py`` needs; saved with the run."""

    bids_dir: Path = setting(REQUIRED, "the root of the input BIDS dataset")
    output_dir: Path = setting(REQUIRED, "where the derivative dataset is written")
    analysis_level: str = setting(REQUIRED, "participant or group", choices=ANALYSIS_LEVELS)
    work_dir: Path = setting(REQUIRED, "scratch space (default: output_dir/work)")
    model_dir: Path = setting(REQUIRED, "trained models (default: output_dir/models)")
    bids_database_dir: Path | None = setting(None, "pybids sqlite cache, reused when present (null: index in "
                                             "memory)")
    reset_database: bool = setting(False, "rebuild the pybids database")
    skip_bids_validation: bool = setting(False, "do not run the BIDS validator")
    preset: str = setting("default", "model and data scale (tiny: CPU-sized, for tests and the demo)",
                          choices=tuple(PRESETS))
    dry_run: bool = setting(False, "print what would be processed and exit")
    report_only: bool = setting(False, "participant level: rebuild the summary and reports from existing outputs")
    overwrite: bool = setting(False, "redo images whose outputs already exist")
    stop_on_first_crash: bool = setting(False, "participant level: stop at the first image that fails")
    allow_other_contrast: bool = setting(False, "participant level: segment images of a contrast the model was not "
                                         "trained on (a warning; the sidecars say so)")
    verbosity: int = setting(0, "more log output (1: debug)", rule=whole(0))
    selection: SelectionSettings = field(default_factory=SelectionSettings)
    preprocessing: PreprocessingSettings = field(default_factory=PreprocessingSettings)
    training: TrainingSettings = field(default_factory=TrainingSettings)
    segmentation: SegmentationSettings = field(default_factory=SegmentationSettings)
    models: ModelSettings = field(default_factory=ModelSettings)
    compute: ComputeSettings = field(default_factory=ComputeSettings)


def load_config_file(path: Path) -> dict[str, Any]:
    """Read a JSON or YAML settings file into a nested dict (JSON is valid YAML, so YAML parses both)."""
    import yaml

    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise UsageError(f"--config {path}: cannot read: {exc.strerror or exc}") from exc
    try:
        data = json.loads(text) if str(path).endswith(".json") else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        raise UsageError(f"--config {path}: not valid JSON/YAML: {_first_line(exc)}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UsageError(f"--config {path}: expected a mapping of settings, got {type(data).__name__}")
    return data


def merge_overrides(base: Mapping[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    """Deep-merge two nested override dicts; ``extra`` wins."""
    merged = dict(base)
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = merge_overrides(merged[key], value)
        else:
            merged[key] = value
    return merged


def build_settings(overrides: Mapping[str, Any]) -> RunSettings:
    """Create validated ``RunSettings`` from a nested dict of values (paths as str or Path)."""
    required = {"bids_dir", "output_dir", "analysis_level"}
    missing = sorted(required - set(overrides))
    if missing:
        raise UsageError(f"missing required settings: {', '.join(missing)}")
    preset = overrides.get("preset", "default")
    if preset not in PRESETS:
        raise UsageError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    values = merge_overrides(PRESETS[preset], migrate(overrides))
    output_dir = Path(values["output_dir"])
    values.setdefault("work_dir", output_dir / "work")
    values.setdefault("model_dir", output_dir / "models")
    if values.get("work_dir") is None:
        values["work_dir"] = output_dir / "work"
    if values.get("model_dir") is None:
        values["model_dir"] = output_dir / "models"
    return build_dataclass(RunSettings, values, "")


def settings_to_dict(settings: Any) -> dict[str, Any]:
    """JSON-ready nested dict of a settings dataclass (Paths as strings, tuples as lists)."""
    return to_jsonable(dataclasses.asdict(settings))


def _first_line(exc: Exception) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
