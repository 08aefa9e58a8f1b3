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
from bids_app.settings.fields import Checked, at_least, build_dataclass, setting, to_jsonable
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


@dataclass(frozen=True)
class SelectionSettings:
    """Which images, derivatives and participants a run uses."""

    participant_labels: tuple[str, ...] = ()
    session_labels: tuple[str, ...] = ()
    contrasts: tuple[str, ...] = ("T2w",)
    bids_filters: Mapping[str, Any] = field(default_factory=dict)
    derivatives: tuple[Path, ...] = ()
    require_derivatives: tuple[str, ...] = ()
    cord_names: tuple[str, ...] = DEFAULT_CORD_NAMES
    lesion_names: tuple[str, ...] = DEFAULT_LESION_NAMES
    #: The T2I-Adapter's control derivative; empty = the cord mask (found with ``cord_names``).
    control_names: tuple[str, ...] = ()
    healthy_column: str = "pathology"
    healthy_value: str = "HC"
    train_participants: tuple[str, ...] = ()


@dataclass(frozen=True)
class PreprocessingSettings:
    """Data decisions; unset spacing/shape are derived from the training data's fingerprint."""

    target_spacing: tuple[float, ...] | None = None
    target_shape: tuple[int, ...] | None = None
    max_shape: tuple[int, ...] = (64, 64, 128)
    shape_multiple: int = 16
    percentiles: tuple[float, ...] = (0.5, 99.5)
    image_order: int = 1
    mask_interpolation: str = "nearest"
    max_nonfinite_fraction: float = 0.0
    validation_fraction: float = 0.2


@dataclass(frozen=True)
class StageSettings:
    """Budget and optimiser of one training stage.

    ``batch_size`` is the effective (global) batch of one optimiser step, whatever the number of
    processes: under torchrun each of N processes takes ``batch_size / (N * accumulation_steps)``
    volumes per micro-step. ``learning_rate`` is used as given: nothing scales it with the batch or
    the number of processes (both are logged at the start of each stage).
    """

    max_steps: int = 2000
    max_time_s: float | None = None
    batch_size: int = 2
    accumulation_steps: int = 1
    learning_rate: float = 2e-4
    checkpoint_every: int = 100
    log_every: int = 20
    figure_every: int = 500
    precision: str = "auto"
    clip_norm: float = 1.0


@dataclass(frozen=True)
class VQGANStageSettings(StageSettings):
    """Autoencoder stage: adversarial terms start after ``disc_start`` steps (warm-up)."""

    disc_start: int = 500
    disc_weight: float = 0.1
    feature_matching_weight: float = 1.0
    crop_shape: tuple[int, ...] | None = None
    perceptual_weights: Path | None = None  # a local TorchScript feature extractor (never downloaded)
    perceptual_weight: float = 0.1
    #: Recompute the autoencoder's blocks in the backward instead of keeping their activations: a few
    #: more FLOPs for a third of the memory (docs/benchmarks.md). Off: faster where memory is plentiful.
    activation_checkpointing: bool = True


@dataclass(frozen=True)
class DiffusionStageSettings(StageSettings):
    """Latent diffusion stage."""

    ema_decay: float = 0.999
    loss: str = "l2"
    #: Fraction of training samples noised only inside a random box centred in the cord (the rest of
    #: the latent clean, the loss on the box): teaches the UNet the patched noising of inference
    #: (bids_app.schedulers.patches). 0: the plain objective only.
    patch_fraction: float = 0.7
    patch_max_size: tuple[int, int, int] = (3, 3, 4)  # latent voxels per axis
    #: Encode each augmented training item once and reuse its latent every this many epochs (0: encode
    #: at every step). Encoding is most of a step; memory is this many latents per training image.
    latent_pool_epochs: int = 0
    #: "constant", or "cosine": decayed from learning_rate to 0 over max_steps.
    lr_schedule: str = "constant"
    #: "full" (flips, rotations, intensity changes) or "flip" (random windows and left-right flips only).
    augmentation: str = "full"


@dataclass(frozen=True)
class TrainingSettings:
    """Which stages run and how; a finished stage is skipped unless ``retrain``."""

    stages: tuple[str, ...] = ("vqgan", "diffusion", "adapter", "calibrate")
    retrain: bool = False
    augment: bool = True
    vqgan: VQGANStageSettings = field(default_factory=VQGANStageSettings)
    diffusion: DiffusionStageSettings = field(default_factory=DiffusionStageSettings)
    adapter: StageSettings = field(default_factory=StageSettings)


@dataclass(frozen=True)
class ModelSettings:
    """Architecture overrides over the preset's component configs (saved with each component)."""

    vqgan: Mapping[str, Any] = field(default_factory=dict)
    discriminator: Mapping[str, Any] = field(default_factory=dict)
    unet: Mapping[str, Any] = field(default_factory=dict)
    scheduler: Mapping[str, Any] = field(default_factory=dict)
    adapter: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ComputeSettings(Checked):
    """Where and how hard to compute; none of these changes a result beyond float rounding, but the seed."""

    SECTION: ClassVar[str] = "compute"

    device: str = "auto"
    nprocs: int | None = None
    omp_nthreads: int | None = None
    seed: int = setting(0, "random seed of every stochastic step")
    inference_batch_size: int = setting(16, "denoising chains (windows x strengths x samples x patch sets) per "
                                        "UNet forward; lower it if the GPU runs out of memory, results do not "
                                        "change", rule=at_least(1))
    precision: str = setting("auto", "inference autocast on CUDA (auto: bf16 where supported); the CPU always "
                             "computes in fp32", choices=PRECISIONS)
    max_latent_voxels: int | None = setting(None, "decode in tiles of at most this many latent voxels (bounds "
                                            "the decoder's memory)", rule=at_least(1))


@dataclass(frozen=True)
class RunSettings:
    """Everything one invocation of ``run.py`` needs; saved with the run."""

    bids_dir: Path
    output_dir: Path
    analysis_level: str
    work_dir: Path
    model_dir: Path
    bids_database_dir: Path | None = None
    reset_database: bool = False
    skip_bids_validation: bool = False
    preset: str = "default"
    dry_run: bool = False
    report_only: bool = False
    overwrite: bool = False
    verbosity: int = 0
    selection: SelectionSettings = field(default_factory=SelectionSettings)
    preprocessing: PreprocessingSettings = field(default_factory=PreprocessingSettings)
    training: TrainingSettings = field(default_factory=TrainingSettings)
    segmentation: SegmentationSettings = field(default_factory=SegmentationSettings)
    models: ModelSettings = field(default_factory=ModelSettings)
    compute: ComputeSettings = field(default_factory=ComputeSettings)


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
    settings = build_dataclass(RunSettings, values, "")
    _check(settings)
    return settings


def settings_to_dict(settings: Any) -> dict[str, Any]:
    """JSON-ready nested dict of a settings dataclass (Paths as strings, tuples as lists)."""
    return to_jsonable(dataclasses.asdict(settings))


def _check(settings: RunSettings) -> None:
    if settings.preset not in PRESETS:
        raise UsageError(f"unknown preset {settings.preset!r}; choose one of {', '.join(PRESETS)}")
    for name in ("nprocs", "omp_nthreads"):
        value = getattr(settings.compute, name)
        if value is not None and value < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
    prep = settings.preprocessing
    for name in ("target_spacing", "target_shape", "max_shape", "percentiles"):
        value = getattr(prep, name)
        expected = 2 if name == "percentiles" else 3
        if value is not None and len(value) != expected:
            raise UsageError(f"preprocessing.{name} needs {expected} values, got {list(value)}")
    if not 0 <= prep.validation_fraction < 1:
        raise UsageError(f"preprocessing.validation_fraction must be in [0, 1), got {prep.validation_fraction}")
    for stage in ("vqgan", "diffusion", "adapter"):
        config = getattr(settings.training, stage)
        if config.batch_size < 1 or config.accumulation_steps < 1 or config.batch_size % config.accumulation_steps:
            raise UsageError(f"training.{stage}: batch_size ({config.batch_size}) must be a positive multiple of "
                             f"accumulation_steps ({config.accumulation_steps})")
    diffusion = settings.training.diffusion
    if not 0 <= diffusion.patch_fraction <= 1:
        raise UsageError(f"training.diffusion.patch_fraction must be in [0, 1], got {diffusion.patch_fraction}")
    if diffusion.augmentation not in ("full", "flip"):
        raise UsageError(f"training.diffusion.augmentation must be full or flip, got {diffusion.augmentation!r}")
    if diffusion.lr_schedule not in ("constant", "cosine"):
        raise UsageError(f"training.diffusion.lr_schedule must be constant or cosine, got {diffusion.lr_schedule!r}")
    if diffusion.latent_pool_epochs < 0:
        raise UsageError(f"training.diffusion.latent_pool_epochs must be 0 or more, got {diffusion.latent_pool_epochs}")
    if len(diffusion.patch_max_size) != 3 or min(diffusion.patch_max_size) < 1:
        raise UsageError(f"training.diffusion.patch_max_size needs 3 positive sizes, got {list(diffusion.patch_max_size)}")
    unknown = sorted(set(settings.training.stages) - set(TRAINING_STAGES))
    if unknown:
        raise UsageError(f"unknown training stage {unknown[0]!r}; choose from {', '.join(TRAINING_STAGES)}")
    if not settings.selection.contrasts:
        raise UsageError("--contrast needs at least one suffix")


def _first_line(exc: Exception) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
