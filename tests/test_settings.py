"""Settings: building, coercion, precedence, and errors that name the setting."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from bids_app.errors import UsageError
from bids_app.settings import build_settings, load_config_file, merge_overrides, settings_to_dict

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
        ({"compute": {"nprocs": 0}}, "--nprocs must be at least 1"),
        ({"selection": {"contrasts": []}}, "--contrast"),
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
    ("training", {"diffusion": {"lr_schedule": "step"}}, "lr_schedule"),
    ("training", {"vqgan": {"lr_schedule": "step"}}, "vqgan.lr_schedule"),
    ("training", {"vqgan": {"cord_weight": -1}}, "cord_weight"),
    ("training", {"diffusion": {"latent_pool_epochs": -1}}, "latent_pool_epochs"),
    ("segmentation", {"patch_size": [2, 2]}, "patch_size"),
    ("segmentation", {"patch_period": 0}, "patch_period"),
])
def test_bad_patch_settings_are_refused(section: str, values: dict, message: str) -> None:
    with pytest.raises(UsageError, match=message):
        build_settings({**BASE, section: values})


def test_calibration_rule_settings_default_and_validation() -> None:
    base = {"bids_dir": "/b", "output_dir": "/o", "analysis_level": "group"}
    seg = build_settings(base).segmentation
    assert (seg.calibration_rule, seg.calibration_image_fpr, seg.reference) == ("images", 0.05, "both")
    off = build_settings({**base, "segmentation": {"calibration_image_fpr": None}}).segmentation
    assert off.calibration_image_fpr is None
    assert seg.detection_inset_mm == 1.0
    for bad in ({"calibration_image_fpr": 0.7}, {"calibration_rule": "subjects"}, {"reference": "sharp"},
                {"detection_inset_mm": -1}):
        with pytest.raises(UsageError, match=next(iter(bad))):
            build_settings({**base, "segmentation": bad})
