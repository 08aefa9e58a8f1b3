"""One definition per setting: the library, the participant level and the calibration identity agree.

The segmentation settings are declared once (``bids_app/settings/segmentation.py``). These tests
fail when a second set of defaults comes back, when the residual procedure reads a setting the
calibration identity does not cover, or when a calibrated setting does not reach the identity.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest
import torch

from bids_app import cli
from bids_app.errors import UsageError
from bids_app.models.adapter import AdapterConfig, T2IAdapter
from bids_app.models.unet3d import UNET_PRESETS, UNet3D
from bids_app.models.vqgan import PRESETS, VQGAN
from bids_app.pipelines.calibrate import calibration_identity, run_calibration
from bids_app.pipelines.counterfactual import CounterfactualPipeline
from bids_app.pipelines.segment import ImageInput, native_residual
from bids_app.preprocessing.plan import PreprocessingPlan
from bids_app.schedulers import SchedulerConfig
from bids_app.settings import ComputeSettings, RunSettings, build_settings
from bids_app.settings.fields import Checked
from bids_app.settings.segmentation import SegmentationSettings
from tests.conftest import participant_args


def _leaves(obj: Any, prefix: str = "segmentation") -> dict[str, dataclasses.Field]:
    """Every declared setting below a settings object, by dotted path."""
    leaves = {}
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            leaves.update(_leaves(value, f"{prefix}.{f.name}"))
        else:
            leaves[f"{prefix}.{f.name}"] = f
    return leaves


CALIBRATED = {path for path, f in _leaves(SegmentationSettings()).items() if f.metadata.get("calibrated")}


class Recorder:
    """A settings object that records the dotted path of every setting read through it."""

    def __init__(self, obj: Any, path: str, seen: set[str]) -> None:
        self._obj, self._path, self._seen = obj, path, seen

    def __getattr__(self, name: str) -> Any:
        value = getattr(self._obj, name)
        path = f"{self._path}.{name}"
        if dataclasses.is_dataclass(value):
            return Recorder(value, path, self._seen)
        self._seen.add(path)
        return value


def test_run_settings_take_the_declared_defaults() -> None:
    settings = build_settings({"bids_dir": "/in", "output_dir": "/out", "analysis_level": "participant"})
    assert settings.segmentation == SegmentationSettings()
    assert settings.compute == ComputeSettings()
    assert len(_leaves(SegmentationSettings())) <= 15  # the bound on what a user can set


def test_every_declared_setting_has_help_and_a_valid_default() -> None:
    for path, f in _leaves(SegmentationSettings()).items():
        assert f.metadata.get("help"), path
    with pytest.raises(UsageError, match="segmentation.counterfactual.patch_size"):
        dataclasses.replace(SegmentationSettings().counterfactual, patch_size=(2, 2))


def _declarations(cls: type, prefix: str = "") -> dict[str, tuple[dataclasses.Field, Any, type]]:
    """Every leaf setting of a settings class tree by dotted path: its field, type and section class."""
    hints = typing.get_type_hints(cls)
    found = {}
    for f in dataclasses.fields(cls):
        path = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(hints[f.name]):
            found.update(_declarations(hints[f.name], f"{path}."))
        else:
            found[path] = (f, hints[f.name], cls)
    return found


def _sections(cls: type) -> list[type]:
    hints = typing.get_type_hints(cls)
    inner = [hints[f.name] for f in dataclasses.fields(cls) if dataclasses.is_dataclass(hints[f.name])]
    return [cls, *(section for c in inner for section in _sections(c))]


def _types(hint: Any) -> set[Any]:
    """The scalar types a hint holds (``tuple[int, ...] | None`` -> {int, NoneType})."""
    args = typing.get_args(hint)
    if not args or typing.get_origin(hint) not in (tuple, typing.Union, types.UnionType):
        return {hint}
    return {t for a in args if a is not Ellipsis for t in _types(a)}


RUN_SETTINGS = _declarations(RunSettings)
VALIDATED = sorted(path for path, (f, _, _) in RUN_SETTINGS.items()
                   if f.metadata.get("rule") or f.metadata.get("choices"))


def test_every_setting_is_declared_once_with_help_and_checked_when_built() -> None:
    """A new setting that is not declared with ``setting(default, help, rule=...)`` in a ``Checked``
    section fails here: nothing can reach the run unvalidated."""
    for section in _sections(RunSettings):
        assert issubclass(section, Checked), f"{section.__name__} must derive from Checked (validated on construction)"
    for path, (f, hint, _) in RUN_SETTINGS.items():
        assert f.metadata.get("help"), f"{path}: declare it with setting(default, help, rule=...)"
        if _types(hint) & {int, float, str}:
            assert f.metadata.get("rule") or f.metadata.get("choices"), f"{path}: a number or text needs a rule"


@pytest.mark.parametrize("path", VALIDATED)
def test_each_declared_rule_refuses_a_bad_value_naming_the_setting(path: str) -> None:
    section = build_settings({"bids_dir": "/in", "output_dir": "/out", "analysis_level": "group"})
    *parents, name = path.split(".")
    for parent in parents:
        section = getattr(section, parent)
    with pytest.raises(UsageError) as info:
        dataclasses.replace(section, **{name: object()})
    assert str(info.value).startswith(f"{path} must be"), str(info.value)


def _candidates(value: Any, f: dataclasses.Field) -> list[Any]:
    """Values other than ``value`` that the declaration may accept."""
    choices = f.metadata.get("choices")
    if choices:
        return [c for c in choices if c != value]
    if isinstance(value, tuple):
        return [(*value[:-1], other) for other in _candidates(value[-1], f)]
    if isinstance(value, int):
        return [value + 1]
    return [value / 2, value + (1 - value) / 2, value * 2 + 1] if value else [0.25]


def _changed(section: Any, name: str) -> Any:
    """``section`` with setting ``name`` changed to a value its declaration accepts."""
    f = {x.name: x for x in dataclasses.fields(section)}[name]
    for other in _candidates(getattr(section, name), f):
        try:
            return dataclasses.replace(section, **{name: other})
        except UsageError:
            continue
    raise AssertionError(f"no other valid value found for {name}")


@pytest.mark.parametrize("path", sorted(CALIBRATED))
def test_each_calibrated_setting_changes_the_identity(path: str) -> None:
    seg = SegmentationSettings()
    *sections, name = path.split(".")[1:]
    section = getattr(seg, sections[0]) if sections else seg
    changed_section = _changed(section, name)
    changed = dataclasses.replace(seg, **{sections[0]: changed_section}) if sections else changed_section
    assert calibration_identity(changed, 0, "m") != calibration_identity(seg, 0, "m")
    assert calibration_identity(seg, 0, "m") == calibration_identity(SegmentationSettings(), 0, "m")


def _phantom(folder: Path, index: int) -> ImageInput:
    """A bright tube in a darker field (a cord-like image with its mask), anisotropic voxels."""
    rng = np.random.default_rng(index)
    x, y = np.meshgrid(np.arange(20), np.arange(20), indexing="ij")
    cord = np.repeat((((x - 10) ** 2 + (y - 10) ** 2) < 16)[..., None], 28, axis=2)
    image = (0.3 + 0.5 * cord + 0.05 * rng.standard_normal(cord.shape)).astype(np.float32)
    affine = np.diag([0.9, 0.9, 1.1, 1.0])
    paths = [folder / f"sub-{index:02d}_T2w.nii.gz", folder / f"sub-{index:02d}_T2w_label-SC_seg.nii.gz"]
    nib.save(nib.Nifti1Image(image, affine), str(paths[0]))
    nib.save(nib.Nifti1Image(cord.astype(np.uint8), affine), str(paths[1]))
    return ImageInput(f"sub-{index:02d}", paths[0], paths[1], paths[1])


def test_the_residual_and_the_calibration_read_exactly_the_calibrated_settings(tmp_path: Path) -> None:
    """Every setting the residual procedure and the calibration read is in the calibration identity,
    and every setting in it is read: a calibration holds exactly for what it depends on."""
    torch.manual_seed(0)
    vqgan = VQGAN(PRESETS["tiny"]())
    unet = UNet3D(UNET_PRESETS["tiny"](vqgan.config.embedding_dim))
    adapter = T2IAdapter(AdapterConfig.for_models(unet.config, vqgan.config.downsample))
    plan = PreprocessingPlan(target_spacing=(1.0, 1.0, 1.0), target_shape=(16, 16, 16))
    pipeline = CounterfactualPipeline(vqgan, unet, SchedulerConfig(prediction_type="v_prediction"), 1.0, adapter,
                                      window_shape=plan.target_shape)
    seen: set[str] = set()
    settings = Recorder(SegmentationSettings(), "segmentation", seen)
    images = [_phantom(tmp_path, i) for i in range(2)]
    result = native_residual(pipeline, plan, images[0], settings, 0)
    assert result.adapter_used and result.residual.shape == (20, 20, 28)
    run_calibration(pipeline, plan, images, settings, 0)
    assert seen == CALIBRATED


@pytest.mark.slow
def test_the_library_with_default_settings_equals_the_participant_level(simple_dataset: Path, tiny_model: Path,
                                                                        tmp_path: Path) -> None:
    """The participant level, given no segmentation flag, computes what the library computes from
    ``SegmentationSettings()``: no second set of defaults anywhere between them."""
    from bids_app.model_store import load_trained_models
    from bids_app.participant import load_calibration
    from bids_app.segmentation.calibration import grow_threshold
    from bids_app.segmentation.lesions import lesion_mask

    out = tmp_path / "out"
    args = [arg for arg in participant_args(tiny_model) if arg not in ("--strength", "0.5")]
    assert cli.main([str(simple_dataset), str(out), "participant", "--participant-label", "04",
                     "--skip-bids-validation", *args]) == 0
    written = out / "sub-04" / "anat"
    counterfactual = np.asanyarray(nib.load(written / "sub-04_desc-counterfactual_T2w.nii.gz").dataobj)
    mask = np.asanyarray(nib.load(written / "sub-04_label-lesion_mask.nii.gz").dataobj)

    seg = SegmentationSettings()
    models = load_trained_models(tiny_model)
    pipeline = CounterfactualPipeline.from_models(models, "cpu", ComputeSettings())
    anat = simple_dataset / "sub-04" / "anat"
    cord = simple_dataset / "derivatives" / "labels" / "sub-04" / "anat" / "sub-04_T2w_label-SC_seg.nii.gz"
    result = native_residual(pipeline, models.plan, ImageInput("sub-04", anat / "sub-04_T2w.nii.gz", cord, cord),
                             seg, ComputeSettings().seed)
    np.testing.assert_allclose(counterfactual, result.mean_counterfactual(), atol=1e-5)
    run = build_settings({"bids_dir": simple_dataset, "output_dir": out, "analysis_level": "participant",
                          "model_dir": tiny_model})
    calibration = load_calibration(run, models)
    expected = lesion_mask(result.residual, result.region, calibration.threshold, result.spacing_mm,
                           seg.lesions.min_lesion_mm3, grow_threshold(calibration, seg.lesions.grow_quantile),
                           result.growth, detection_region=result.detection_region)
    assert np.array_equal(mask, expected)
