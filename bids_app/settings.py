"""Run settings: frozen dataclasses, presets, and overrides from a JSON/YAML file.

One place per setting. Precedence, lowest first: dataclass defaults < preset < ``--config`` file <
flags given on the command line. The resolved settings are saved with every run under
``<output_dir>/logs/`` so a result can always be traced to what produced it.
"""
from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from bids_app.errors import UsageError

ANALYSIS_LEVELS = ("participant", "group")
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
    #: Extra weight of the reconstruction loss on the cord and the voxel layer around it (0: plain L1
    #: over the field of view); needs cord masks, ignored for a batch without them.
    cord_weight: float = 0.0
    #: "constant", or "cosine": the generator's learning rate decayed from learning_rate to 0 over
    #: max_steps (the discriminator's stays constant), so the last step is not a noisy draw.
    lr_schedule: str = "constant"
    #: Recompute the autoencoder's blocks in the backward instead of keeping their activations: 13% more
    #: FLOPs (only what each backward needs is recomputed), a third of the memory (docs/benchmarks.md: a
    #: 32x128x128 step of the default model peaks at 2.4 GB instead of 7.8 GB). Off: faster where memory is plentiful.
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
class SegmentationSettings:
    """Counterfactual synthesis and residual -> lesion mask (participant level and calibration)."""

    # Measured with patched noising (docs/benchmarks.md, "Patched noising"): 0.8 alone matches the
    # average of 0.6, 0.8 and 1.0 at a third of the cost (whole-region noising preferred 0.5, 0.65, 0.8).
    strengths: tuple[float, ...] = (0.8,)
    n_samples: int = 1
    # One step: the clean latent read off the noised one (DDIM's x0 prediction). Measured on the
    # demo-budget model (docs/benchmarks.md, "Counterfactual cost"): mean Dice 0.25 over 9 lesion
    # images against 0.22 with 10 steps and 0.19 with the seed's 300-step DDPM, at 1/10 and 1/195
    # of their UNet evaluations. A better-trained model may prefer more steps: rerun the benchmark.
    steps: int = 1
    sampler: str = "ddim"
    eta: float = 0.0
    max_latent_voxels: int | None = None
    median_size: int = 3
    polarity: str = "auto"  # measured: counting only brighter residuals on T2w triples the oracle Dice
    # "both": the residual is the agreement of the transferred counterfactual and the raw decoding
    # (segmentation.residuals.agreement_residual; measured oracle Dice 0.55 -> 0.64); "reconstruction":
    # the transferred one alone; "image": the raw decoding alone.
    reference: str = "both"
    window_overlap: float = 0.5
    edit_region: str = "cord"
    # "patch": each latent patch of the edit region is noised on its own, the rest kept clean (needs a
    # UNet trained with training.diffusion.patch_fraction > 0); "region": the whole edit region at once.
    noising: str = "patch"
    patch_size: tuple[int, int, int] = (2, 2, 2)  # latent voxels
    patch_period: int = 3  # patches of one chain lie this many patches apart
    patch_offsets: int = 2  # shifted patch grids averaged
    cord_margin_mm: float = 0.0  # measured: bright CSF next to the cord dominates a dilated region
    # Lesions are found only deeper than this below the cord's surface (and the field of view's ends),
    # then grow over the whole cord (segmentation.residuals.detection_region). Measured on the
    # demo-budget model (docs/benchmarks.md, "Residual on the native grid"): every healthy image's
    # largest residual lay in the outermost voxel layer; median Dice 0.68 -> 0.76 at 1 mm.
    detection_inset_mm: float = 1.0
    min_lesion_mm3: float = 5.0
    majority_smoothing: bool = False
    calibration_quantile: float = 0.999
    # "voxels": the quantile only; "images": also raised to the threshold at which a new healthy image
    # has a lesion (after the size filter) with probability calibration_image_fpr, predicted from the
    # calibration images' lesion-free thresholds (segmentation.calibration.image_bound; None: their
    # maximum). Measured on the demo-budget model (docs/benchmarks.md, "Image-level calibration"): the
    # voxel quantile gave 7-9 of 12 unseen healthy images a false positive; "images" at 0.1 gave 8-10 %.
    # Since the residual is taken on the native grid, many healthy images have no candidate at all and
    # a few a high one (a skewed, zero-heavy distribution the normal bound underestimates): resampled
    # over calibration sets of 8, a nominal 10 % gave 14-15 % of new healthy images a false positive,
    # 5 % gave 6-9 % ("Residual on the native grid"); hence 5 %, to keep within 1 in 10.
    calibration_rule: str = "images"
    calibration_image_fpr: float | None = 0.05
    # Hysteresis: a lesion found at the threshold grows over its connected voxels above this healthy
    # quantile of the map it grows over (None: no growth), the residual median-filtered with
    # grow_median_size (1: unsmoothed; the filter that keeps healthy specks from being found also
    # rounds off lesion edges). Measured on the demo-budget model (docs/benchmarks.md, "Hysteresis",
    # "Growing over the unsmoothed residual"): at a threshold with 1 of 10 healthy images given a false
    # positive, mean Dice 0.47 growing to 0.99 on the filtered map, 0.58 to 0.995 on the unsmoothed one.
    grow_quantile: float | None = 0.995
    grow_median_size: int = 1
    threshold: float | None = None
    strength_sweep: tuple[float, ...] = ()
    use_adapter: bool = True
    adapter_scale: float = 1.0
    overwrite: bool = False
    # Fast path (docs/benchmarks.md "Counterfactual cost"): chains per UNet forward; autocast on CUDA.
    batch_size: int = 16
    precision: str = "auto"
    compile: bool = False


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
class ComputeSettings:
    """Where and how hard to compute."""

    device: str = "auto"
    nprocs: int | None = None
    omp_nthreads: int | None = None
    seed: int = 0


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
        # 2x2x2 downsampling and 512 codes: measured VQ-GAN L1 0.09 after 600 steps, against 0.13 with
        # the 4x4x4 / 64-code tiny autoencoder, at the same step time on 2 CPU cores.
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
    values = merge_overrides(PRESETS[preset], overrides)
    output_dir = Path(values["output_dir"])
    values.setdefault("work_dir", output_dir / "work")
    values.setdefault("model_dir", output_dir / "models")
    if values.get("work_dir") is None:
        values["work_dir"] = output_dir / "work"
    if values.get("model_dir") is None:
        values["model_dir"] = output_dir / "models"
    settings = _build_dataclass(RunSettings, values, "")
    _check(settings)
    return settings


def settings_to_dict(settings: Any) -> dict[str, Any]:
    """JSON-ready nested dict of a settings dataclass (Paths as strings, tuples as lists)."""
    return _to_jsonable(dataclasses.asdict(settings))


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
    vqgan, diffusion = settings.training.vqgan, settings.training.diffusion
    if not 0 <= diffusion.patch_fraction <= 1:
        raise UsageError(f"training.diffusion.patch_fraction must be in [0, 1], got {diffusion.patch_fraction}")
    if diffusion.augmentation not in ("full", "flip"):
        raise UsageError(f"training.diffusion.augmentation must be full or flip, got {diffusion.augmentation!r}")
    if vqgan.lr_schedule not in ("constant", "cosine"):
        raise UsageError(f"training.vqgan.lr_schedule must be constant or cosine, got {vqgan.lr_schedule!r}")
    if vqgan.cord_weight < 0:
        raise UsageError(f"training.vqgan.cord_weight must be >= 0, got {vqgan.cord_weight!r}")
    if diffusion.lr_schedule not in ("constant", "cosine"):
        raise UsageError(f"training.diffusion.lr_schedule must be constant or cosine, got {diffusion.lr_schedule!r}")
    if diffusion.latent_pool_epochs < 0:
        raise UsageError(f"training.diffusion.latent_pool_epochs must be 0 or more, got {diffusion.latent_pool_epochs}")
    if len(diffusion.patch_max_size) != 3 or min(diffusion.patch_max_size) < 1:
        raise UsageError(f"training.diffusion.patch_max_size needs 3 positive sizes, got {list(diffusion.patch_max_size)}")
    unknown = sorted(set(settings.training.stages) - set(TRAINING_STAGES))
    if unknown:
        raise UsageError(f"unknown training stage {unknown[0]!r}; choose from {', '.join(TRAINING_STAGES)}")
    seg = settings.segmentation
    if not seg.strengths or any(not 0 <= v <= 1 for v in (*seg.strengths, *seg.strength_sweep)):
        raise UsageError(f"strengths must lie in [0, 1], got {list(seg.strengths) + list(seg.strength_sweep)}")
    if seg.sampler not in ("ddim", "ddpm"):
        raise UsageError(f"--sampler must be ddim or ddpm, got {seg.sampler!r}")
    if seg.n_samples < 1 or seg.steps < 1:
        raise UsageError("--n-samples and --steps must be at least 1")
    if seg.polarity not in ("auto", "bright", "dark", "both"):
        raise UsageError(f"--polarity must be auto, bright, dark or both, got {seg.polarity!r}")
    if seg.reference not in ("reconstruction", "image", "both"):
        raise UsageError(f"segmentation.reference must be reconstruction, image or both, got {seg.reference!r}")
    if seg.noising not in ("patch", "region"):
        raise UsageError(f"--noising must be patch or region, got {seg.noising!r}")
    if len(seg.patch_size) != 3 or min(seg.patch_size) < 1 or seg.patch_period < 1 or seg.patch_offsets < 1:
        raise UsageError(f"segmentation.patch_size needs 3 positive sizes and patch_period, patch_offsets must be at "
                         f"least 1, got {list(seg.patch_size)}, {seg.patch_period}, {seg.patch_offsets}")
    if seg.edit_region not in ("cord", "all"):
        raise UsageError(f"segmentation.edit_region must be cord or all, got {seg.edit_region!r}")
    if not 0 <= seg.window_overlap < 1:
        raise UsageError(f"segmentation.window_overlap must be in [0, 1), got {seg.window_overlap}")
    if seg.batch_size < 1:
        raise UsageError(f"--inference-batch-size must be at least 1, got {seg.batch_size}")
    if seg.precision not in ("auto", "fp32", "bf16", "fp16"):
        raise UsageError(f"--precision must be auto, fp32, bf16 or fp16, got {seg.precision!r}")
    if seg.calibration_rule not in ("voxels", "images"):
        raise UsageError(f"segmentation.calibration_rule must be voxels or images, got {seg.calibration_rule!r}")
    if seg.calibration_image_fpr is not None and not 0 < seg.calibration_image_fpr < 0.5:
        raise UsageError("segmentation.calibration_image_fpr must be in (0, 0.5) or null, got "
                         f"{seg.calibration_image_fpr}")
    if not 0.5 < seg.calibration_quantile < 1:
        raise UsageError(f"segmentation.calibration_quantile must be in (0.5, 1), got {seg.calibration_quantile}")
    if isinstance(seg.grow_median_size, bool) or not isinstance(seg.grow_median_size, int) or seg.grow_median_size < 1:
        raise UsageError(f"segmentation.grow_median_size must be an integer >= 1, got {seg.grow_median_size!r}")
    if seg.grow_quantile is not None and not 0 < seg.grow_quantile < 1:
        raise UsageError(f"segmentation.grow_quantile must be in (0, 1) or null, got {seg.grow_quantile}")
    if not (isinstance(seg.detection_inset_mm, (int, float)) and 0 <= seg.detection_inset_mm < float("inf")):
        raise UsageError(f"segmentation.detection_inset_mm must be a finite number >= 0, got {seg.detection_inset_mm!r}")
    if not settings.selection.contrasts:
        raise UsageError("--contrast needs at least one suffix")


def _build_dataclass(cls: type, values: Mapping[str, Any], where: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise UsageError(
            f"unknown setting {where}{unknown[0]!r}; known settings here: {', '.join(sorted(names))}"
        )
    kwargs = {}
    for name, value in values.items():
        kwargs[name] = _coerce(hints[name], value, f"{where}{name}")
    try:
        return cls(**kwargs)
    except TypeError as exc:
        raise UsageError(f"bad settings for {where or 'run'}: {exc}") from exc


def _coerce(hint: Any, value: Any, where: str) -> Any:
    """Convert a JSON/YAML/CLI value to the annotated type, or raise a UsageError naming the setting."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(inner[0], value, where)
    if dataclasses.is_dataclass(hint):
        if dataclasses.is_dataclass(value):
            return value
        if not isinstance(value, Mapping):
            raise UsageError(f"setting {where!r} must be a mapping")
        return _build_dataclass(hint, value, f"{where}.")
    if origin is tuple:
        if isinstance(value, (str, Path)):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise UsageError(f"setting {where!r} must be a list")
        return tuple(_coerce(args[0], item, where) for item in value)
    if origin is not None and origin.__name__ == "Mapping" or hint is dict:
        if not isinstance(value, Mapping):
            raise UsageError(f"setting {where!r} must be a mapping")
        return dict(value)
    if hint is Path:
        if not isinstance(value, (str, Path)):
            raise UsageError(f"setting {where!r} must be a path")
        return Path(value)
    if hint is bool:
        if not isinstance(value, bool):
            raise UsageError(f"setting {where!r} must be true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            try:
                return int(str(value))
            except ValueError:
                raise UsageError(f"setting {where!r} must be an integer, got {value!r}") from None
        return value
    if hint is float:
        if isinstance(value, bool):
            raise UsageError(f"setting {where!r} must be a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise UsageError(f"setting {where!r} must be a number, got {value!r}") from None
    if hint is str:
        if not isinstance(value, str):
            raise UsageError(f"setting {where!r} must be a string, got {value!r}")
        return value
    return value


def _to_jsonable(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (list, tuple)):
        return [_to_jsonable(v) for v in value]
    if isinstance(value, Mapping):
        return {k: _to_jsonable(v) for k, v in value.items()}
    return value


def _first_line(exc: Exception) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
