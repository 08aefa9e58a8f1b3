"""Settings: building, coercion, precedence, and errors that name the setting."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from bids_app.errors import UsageError
from bids_app.settings import build_settings, load_config_file, merge_overrides, settings_to_dict
from bids_app.settings.segmentation import SegmentationSettings

BASE = {"bids_dir": "/data/bids", "output_dir": "/data/out", "analysis_level": "group"}


def test_defaults_derive_work_and_model_dirs_from_output() -> None:
    settings = build_settings(BASE)
    assert settings.work_dir == Path("/data/out/work")
    assert settings.model_dir == Path("/data/out/models")
    assert settings.selection.contrasts == ("T2w",)
    assert settings.compute.seed == 0


def test_values_are_coerced_to_their_types() -> None:
    settings = build_settings({**BASE, "selection": {"contrasts": "T1w", "derivatives": ["/d1"]},
                               "compute": {"nprocs": "4"}})
    assert settings.selection.contrasts == ("T1w",)
    assert settings.selection.derivatives == (Path("/d1"),)
    assert settings.compute.nprocs == 4


@pytest.mark.parametrize(
    "override, fragment",
    [
        ({"selection": {"colour": 1}}, "unknown setting selection.'colour'"),
        ({"compute": {"seed": "abc"}}, "compute.seed"),
        ({"dry_run": "yes"}, "dry_run"),
        ({"preset": "huge"}, "unknown preset 'huge'"),
        ({"compute": {"nprocs": 0}}, "compute.nprocs must be an integer >= 1, got 0"),
        ({"selection": {"contrasts": []}}, "selection.contrasts must be one or more BIDS suffixes"),
    ],
)
def test_bad_values_name_the_setting(override: dict, fragment: str) -> None:
    with pytest.raises(UsageError, match=None) as info:
        build_settings(merge_overrides(BASE, override))
    assert fragment in str(info.value)


def test_merge_is_deep_and_later_wins() -> None:
    merged = merge_overrides({"compute": {"seed": 1, "device": "cpu"}}, {"compute": {"seed": 2}})
    assert merged == {"compute": {"seed": 2, "device": "cpu"}}


def test_round_trip_through_json(tmp_path: Path) -> None:
    settings = build_settings({**BASE, "selection": {"participant_labels": ["01"]}})
    path = tmp_path / "settings.json"
    path.write_text(json.dumps(settings_to_dict(settings)))
    assert build_settings(load_config_file(path)) == settings


def test_yaml_config_and_errors(tmp_path: Path) -> None:
    good = tmp_path / "a.yaml"
    good.write_text("compute:\n  device: cpu\n")
    assert load_config_file(good) == {"compute": {"device": "cpu"}}
    listed = tmp_path / "b.yaml"
    listed.write_text("- 1\n- 2\n")
    with pytest.raises(UsageError, match="expected a mapping"):
        load_config_file(listed)
    with pytest.raises(UsageError, match="cannot read"):
        load_config_file(tmp_path / "missing.yaml")


def test_activation_checkpointing_only_where_memory_is_the_limit() -> None:
    """The default (GPU-sized) preset recomputes VQ-GAN activations; the CPU-sized tiny preset does not."""
    assert build_settings(BASE).training.vqgan.activation_checkpointing
    assert not build_settings({**BASE, "preset": "tiny"}).training.vqgan.activation_checkpointing


@pytest.mark.parametrize("section, values, message", [
    ("training", {"diffusion": {"patch_fraction": 1.5}}, "patch_fraction"),
    ("training", {"diffusion": {"patch_max_size": [2, 0, 2]}}, "patch_max_size"),
    ("training", {"diffusion": {"lr_schedule": "step"}}, "training.diffusion.lr_schedule"),
    ("training", {"diffusion": {"latent_pool_epochs": -1}}, "latent_pool_epochs"),
    ("segmentation", {"counterfactual": {"patch_size": [2, 2]}}, "segmentation.counterfactual.patch_size"),
    ("segmentation", {"counterfactual": {"patch_period": 0}}, "segmentation.counterfactual.patch_period"),
])
def test_bad_patch_settings_are_refused(section: str, values: dict, message: str) -> None:
    with pytest.raises(UsageError, match=message):
        build_settings({**BASE, section: values})


def test_the_diffusion_stage_keeps_its_learning_rate_schedule() -> None:
    assert build_settings(BASE).training.diffusion.lr_schedule == "constant"
    cosine = build_settings({**BASE, "training": {"diffusion": {"lr_schedule": "cosine"}}})
    assert cosine.training.diffusion.lr_schedule == "cosine"
    assert build_settings({**BASE, "preset": "tiny"}).training.diffusion.lr_schedule == "cosine"


def test_segmentation_and_compute_defaults() -> None:
    settings = build_settings(BASE)
    seg = settings.segmentation
    assert seg == SegmentationSettings()
    assert (seg.counterfactual.strengths, seg.counterfactual.n_samples, seg.counterfactual.adapter_scale) == ((0.8,), 1, 1.0)
    assert (seg.counterfactual.window_overlap, seg.counterfactual.patch_size) == (0.5, (2, 2, 2))
    assert (seg.counterfactual.patch_period, seg.counterfactual.patch_offsets) == (3, 2)
    assert (seg.residual.polarity, seg.residual.detection_inset_mm) == ("auto", 1.0)
    assert (seg.lesions.min_lesion_mm3, seg.lesions.grow_quantile, seg.lesions.threshold) == (5.0, 0.995, None)
    assert (seg.calibration.quantile, seg.calibration.image_fpr, seg.strength_sweep) == (0.999, 0.05, ())
    compute = settings.compute
    assert (compute.inference_batch_size, compute.precision, compute.max_latent_voxels) == (16, "auto", None)
    assert settings.overwrite is False


def test_nested_segmentation_settings_are_read() -> None:
    seg = build_settings({**BASE, "segmentation": {
        "counterfactual": {"strengths": [0.4, 0.6], "n_samples": 2, "patch_size": [1, 2, 2]},
        "residual": {"polarity": "dark", "detection_inset_mm": 0.5},
        "lesions": {"min_lesion_mm3": 8, "threshold": 0.3},
        "calibration": {"quantile": 0.99, "image_fpr": 0.1},
        "strength_sweep": [0.2, 0.4]}}).segmentation
    assert seg.counterfactual.strengths == (0.4, 0.6) and seg.counterfactual.n_samples == 2
    assert seg.counterfactual.patch_size == (1, 2, 2)
    assert (seg.residual.polarity, seg.residual.detection_inset_mm) == ("dark", 0.5)
    assert (seg.lesions.min_lesion_mm3, seg.lesions.threshold) == (8.0, 0.3)
    assert (seg.calibration.quantile, seg.calibration.image_fpr, seg.strength_sweep) == (0.99, 0.1, (0.2, 0.4))


def test_the_image_false_positive_rate_can_be_switched_off() -> None:
    """``segmentation.calibration.image_fpr: null``: raised until no calibration image has a lesion."""
    seg = build_settings({**BASE, "segmentation": {"calibration": {"image_fpr": None}}}).segmentation
    assert seg.calibration.image_fpr is None


def test_growth_can_be_switched_off() -> None:
    """``segmentation.lesions.grow_quantile: null``: no growth (what --no-grow sets)."""
    seg = build_settings({**BASE, "segmentation": {"lesions": {"grow_quantile": None}}}).segmentation
    assert seg.lesions.grow_quantile is None


@pytest.mark.parametrize("section, values, path", [
    ("segmentation", {"counterfactual": {"strengths": [1.5]}}, "segmentation.counterfactual.strengths"),
    ("segmentation", {"counterfactual": {"strengths": []}}, "segmentation.counterfactual.strengths"),
    ("segmentation", {"counterfactual": {"n_samples": 0}}, "segmentation.counterfactual.n_samples"),
    ("segmentation", {"counterfactual": {"adapter_scale": -1}}, "segmentation.counterfactual.adapter_scale"),
    ("segmentation", {"counterfactual": {"window_overlap": 1.0}}, "segmentation.counterfactual.window_overlap"),
    ("segmentation", {"counterfactual": {"patch_offsets": 0}}, "segmentation.counterfactual.patch_offsets"),
    ("segmentation", {"residual": {"polarity": "up"}}, "segmentation.residual.polarity"),
    ("segmentation", {"residual": {"detection_inset_mm": -1}}, "segmentation.residual.detection_inset_mm"),
    ("segmentation", {"lesions": {"min_lesion_mm3": -1}}, "segmentation.lesions.min_lesion_mm3"),
    ("segmentation", {"lesions": {"grow_quantile": 1.0}}, "segmentation.lesions.grow_quantile"),
    ("segmentation", {"lesions": {"threshold": float("nan")}}, "segmentation.lesions.threshold"),
    ("segmentation", {"calibration": {"quantile": 0.4}}, "segmentation.calibration.quantile"),
    ("segmentation", {"calibration": {"image_fpr": 0.7}}, "segmentation.calibration.image_fpr"),
    ("segmentation", {"strength_sweep": [0.2, 1.2]}, "segmentation.strength_sweep"),
    ("segmentation", {"counterfactual": {"colour": 1}}, "unknown setting segmentation.counterfactual.'colour'"),
    ("compute", {"inference_batch_size": 0}, "compute.inference_batch_size"),
    ("compute", {"precision": "fp8"}, "compute.precision"),
    ("compute", {"max_latent_voxels": 0}, "compute.max_latent_voxels"),
])
def test_validation_names_the_nested_setting(section: str, values: dict, path: str) -> None:
    with pytest.raises(UsageError) as info:
        build_settings({**BASE, section: values})
    assert path in str(info.value)


@pytest.mark.parametrize("section, values, message", [
    ("selection", {"participant_labels": ["../01"]}, "selection.participant_labels must be BIDS labels"),
    ("selection", {"cord_names": ["{stem}_{colour}"]}, "selection.cord_names must be name templates"),
    ("selection", {"lesion_names": ["../{stem}_seg"]}, "selection.lesion_names must be name templates"),
    ("selection", {"bids_filters": {"image": {"acq": "../x"}}}, "selection.bids_filters must be"),
    ("selection", {"bids_filters": {"image": "T2w"}}, "selection.bids_filters must be"),
    ("selection", {"healthy_value": " "}, "selection.healthy_value must be a non-empty text"),
    ("preprocessing", {"target_shape": [32, 32, 40]}, "must be multiples of preprocessing.shape_multiple (16)"),
    ("preprocessing", {"image_order": 2}, "preprocessing.image_order must be one of 1, 3"),
    ("preprocessing", {"validation_fraction": 1}, "preprocessing.validation_fraction must be in [0, 1)"),
    ("training", {"vqgan": {"batch_size": 3, "accumulation_steps": 2}}, "training.vqgan: batch_size (3) must be a "
                                                                        "multiple of accumulation_steps (2)"),
    ("training", {"adapter": {"max_time_s": 0}}, "training.adapter.max_time_s must be a finite number > 0"),
    ("training", {"diffusion": {"loss": "huber"}}, "training.diffusion.loss must be one of l1, l2"),
    ("training", {"stages": ["vqgan", "decoder"]}, "training.stages must be a list of plan, vqgan"),
    ("compute", {"device": "gpu"}, "compute.device must be auto, cpu, cuda or cuda:N"),
    ("compute", {"seed": 2**32}, "compute.seed must be an integer in [0, 4294967295], got 4294967296"),
    ("verbosity", -1, "verbosity must be an integer >= 0"),
])
def test_every_section_is_validated_where_it_is_built(section: str, values, message: str) -> None:
    with pytest.raises(UsageError) as info:
        build_settings({**BASE, section: values})
    assert message in str(info.value)


def test_edge_values_of_the_declared_ranges_are_accepted() -> None:
    settings = build_settings({**BASE, "compute": {"seed": 2**32 - 1, "device": "cuda:1"},
                               "preprocessing": {"target_shape": [32, 32, 48], "percentiles": [0, 100]},
                               "training": {"vqgan": {"max_steps": 1, "figure_every": 0, "clip_norm": 0}}})
    assert settings.compute.seed == 2**32 - 1 and settings.preprocessing.percentiles == (0.0, 100.0)
    assert settings.training.vqgan.max_steps == 1


def test_an_old_key_with_a_bad_value_is_refused_under_its_new_name() -> None:
    with pytest.raises(UsageError, match="segmentation.counterfactual.strengths must be"):
        build_settings({**BASE, "segmentation": {"strengths": [1.5]}})


# Config keys of 0.1.0 (flat ``segmentation``): moved with a warning, removed variants refused.

@pytest.mark.parametrize("old, value, new", [
    ("strengths", [0.6], "segmentation.counterfactual.strengths"),
    ("n_samples", 3, "segmentation.counterfactual.n_samples"),
    ("patch_size", [1, 2, 2], "segmentation.counterfactual.patch_size"),
    ("polarity", "dark", "segmentation.residual.polarity"),
    ("detection_inset_mm", 0.5, "segmentation.residual.detection_inset_mm"),
    ("min_lesion_mm3", 8.0, "segmentation.lesions.min_lesion_mm3"),
    ("grow_quantile", 0.99, "segmentation.lesions.grow_quantile"),
    ("threshold", 0.3, "segmentation.lesions.threshold"),
    ("calibration_quantile", 0.99, "segmentation.calibration.quantile"),
    ("calibration_image_fpr", 0.1, "segmentation.calibration.image_fpr"),
    ("batch_size", 4, "compute.inference_batch_size"),
    ("precision", "fp16", "compute.precision"),
    ("max_latent_voxels", 4096, "compute.max_latent_voxels"),
    ("overwrite", True, "overwrite"),
])
def test_a_moved_key_lands_on_its_new_path_with_a_warning(caplog: pytest.LogCaptureFixture, old: str, value,
                                                          new: str) -> None:
    with caplog.at_level(logging.WARNING):
        settings = build_settings({**BASE, "segmentation": {old: value}})
    node = settings
    for part in new.split("."):
        node = getattr(node, part)
    assert node == (tuple(value) if isinstance(value, list) else value)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(f"segmentation.{old}" in m and new in m and "deprecated" in m for m in warnings), warnings


def test_use_adapter_false_is_adapter_scale_zero(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        off = build_settings({**BASE, "segmentation": {"use_adapter": False}}).segmentation
        on = build_settings({**BASE, "segmentation": {"use_adapter": True}}).segmentation
    assert off.counterfactual.adapter_scale == 0.0 and on.counterfactual.adapter_scale == 1.0
    assert "segmentation.counterfactual.adapter_scale" in caplog.text


@pytest.mark.parametrize("use, expected", [(False, 0.0), (True, 0.5)])
def test_use_adapter_beside_an_old_adapter_scale_keeps_a_0_1_0_config_working(use: bool, expected: float) -> None:
    seg = build_settings({**BASE, "segmentation": {"use_adapter": use, "adapter_scale": 0.5}}).segmentation
    assert seg.counterfactual.adapter_scale == expected


def test_an_old_key_beside_a_section_that_is_not_a_mapping_is_a_usage_error() -> None:
    with pytest.raises(UsageError, match="counterfactual"):
        build_settings({**BASE, "segmentation": {"counterfactual": 5, "strengths": [0.6]}})


@pytest.mark.parametrize("key, value", [
    ("segmentation.steps", 1), ("segmentation.sampler", "ddim"), ("segmentation.eta", 0.0),
    ("segmentation.reference", "both"), ("segmentation.noising", "patch"), ("segmentation.edit_region", "cord"),
    ("segmentation.calibration_rule", "images"), ("segmentation.majority_smoothing", False),
    ("segmentation.compile", False), ("segmentation.median_size", 3), ("segmentation.grow_median_size", 1),
    ("segmentation.cord_margin_mm", 0.0), ("training.vqgan.lr_schedule", "constant"),
    ("training.vqgan.cord_weight", 0.0),
])
def test_a_removed_key_with_the_kept_value_is_accepted_with_a_warning(caplog: pytest.LogCaptureFixture, key: str,
                                                                      value) -> None:
    with caplog.at_level(logging.WARNING):
        settings = build_settings(merge_overrides(BASE, _nested(key, value)))
    assert settings == build_settings(BASE)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(key in m and "removed" in m for m in warnings), warnings


@pytest.mark.parametrize("key, value", [
    ("segmentation.steps", 10), ("segmentation.sampler", "ddpm"), ("segmentation.eta", 0.5),
    ("segmentation.reference", "reconstruction"), ("segmentation.noising", "region"),
    ("segmentation.edit_region", "all"), ("segmentation.calibration_rule", "voxels"),
    ("segmentation.majority_smoothing", True), ("segmentation.compile", True), ("segmentation.median_size", 5),
    ("segmentation.grow_median_size", 3), ("segmentation.cord_margin_mm", 2.0),
    ("training.vqgan.lr_schedule", "cosine"), ("training.vqgan.cord_weight", 4.0),
])
def test_a_removed_key_with_another_value_is_a_usage_error_naming_it(key: str, value) -> None:
    with pytest.raises(UsageError) as info:
        build_settings(merge_overrides(BASE, _nested(key, value)))
    assert key in str(info.value) and "removed" in str(info.value)


def test_a_moved_key_under_both_names_must_agree(caplog: pytest.LogCaptureFixture) -> None:
    both = {"strengths": [0.6], "counterfactual": {"strengths": [0.4]}}
    with pytest.raises(UsageError, match="segmentation.counterfactual.strengths is given twice"):
        build_settings({**BASE, "segmentation": both})
    with pytest.raises(UsageError, match="compute.inference_batch_size is given twice"):
        build_settings({**BASE, "segmentation": {"batch_size": 4}, "compute": {"inference_batch_size": 8}})
    same = {"strengths": [0.6], "counterfactual": {"strengths": [0.6]}}
    assert build_settings({**BASE, "segmentation": same}).segmentation.counterfactual.strengths == (0.6,)


def test_old_keys_are_not_changed_in_the_callers_mapping() -> None:
    overrides = {**BASE, "segmentation": {"strengths": [0.6], "steps": 1}}
    build_settings(overrides)
    assert overrides["segmentation"] == {"strengths": [0.6], "steps": 1}


def _nested(path: str, value) -> dict:
    *sections, key = path.split(".")
    node: dict = {key: value}
    for section in reversed(sections):
        node = {section: node}
    return node
