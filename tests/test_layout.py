"""BIDS input: label handling, filters, derivative matching, training selection."""
from __future__ import annotations

from pathlib import Path

import pytest
from bids.layout import Query

from bids_app.bids import layout as L
from bids_app.errors import MissingInputError, NothingSelectedError, UsageError
from bids_app.settings import SelectionSettings


def test_labels_lose_their_prefix_and_duplicates(tmp_path: Path) -> None:
    listed = tmp_path / "labels.txt"
    listed.write_text("sub-03\n# a comment\n04  # trailing\n\n")
    assert L.expand_labels(["sub-01", "02", "01", f"@{listed}"], "sub-") == ("01", "02", "03", "04")
    assert L.expand_labels(["ses-1"], "ses-") == ("1",)
    with pytest.raises(UsageError, match="alphanumeric"):
        L.expand_labels(["sub-0_1"], "sub-")


def test_filter_values_map_to_pybids_queries() -> None:
    query = L.query_from_filters({"image": {"acq": None, "session": "*", "run": 1}}, ["acquisition", "session", "run"])
    assert query == {"acquisition": Query.NONE, "session": Query.ANY, "run": 1}


def test_name_parts_and_templates() -> None:
    assert L.name_parts("sub-01_ses-1_acq-sag_T2w.nii.gz") == ("sub-01_ses-1_acq-sag_T2w", "sub-01_ses-1_acq-sag")
    assert L.name_parts("sub-01_T2w.nii") == ("sub-01_T2w", "sub-01")


def test_derivative_matching_prefers_dataset_then_template_order(tmp_path: Path) -> None:
    first, second = tmp_path / "a", tmp_path / "b"
    for root in (first, second):
        (root / "sub-01" / "anat").mkdir(parents=True)
    (second / "sub-01" / "anat" / "sub-01_T2w_label-SC_seg.nii.gz").write_bytes(b"x")
    (first / "sub-01" / "anat" / "sub-01_T2w_seg.nii").write_bytes(b"x")
    (first / "sub-01" / "anat" / "sub-01_label-SC_mask.nii.gz").write_bytes(b"x")
    templates = SelectionSettings().cord_names
    found = L.match_derivative("sub-01/anat/sub-01_T2w.nii.gz", [first, second], templates)
    assert found == first / "sub-01" / "anat" / "sub-01_label-SC_mask.nii.gz"
    assert L.match_derivative("sub-01/anat/sub-01_T2w.nii.gz", [second], templates).name == "sub-01_T2w_label-SC_seg.nii.gz"
    assert L.match_derivative("sub-02/anat/sub-02_T2w.nii.gz", [first, second], templates) is None


def test_derivative_datasets_exclude_the_output(tmp_path: Path) -> None:
    for name in ("labels", "counterseg"):
        (tmp_path / "derivatives" / name).mkdir(parents=True)
    found = L.find_derivative_datasets(tmp_path, exclude=[tmp_path / "derivatives" / "counterseg"])
    assert found == ((tmp_path / "derivatives" / "labels").resolve(),)
    with pytest.raises(UsageError, match="not a directory"):
        L.find_derivative_datasets(tmp_path, explicit=[tmp_path / "nope"])


def _record(subject: str, lesion: bool = False) -> L.ImageRecord:
    return L.ImageRecord(
        image=Path(f"/x/sub-{subject}_T2w.nii.gz"), relpath=f"sub-{subject}/anat/sub-{subject}_T2w.nii.gz",
        subject=subject, session=None, suffix="T2w", lesion_mask=Path("/m.nii.gz") if lesion else None,
    )


def test_training_selection_reasons() -> None:
    records = [_record("01"), _record("02"), _record("03", lesion=True), _record("04")]
    table = {"01": {"pathology": "HC"}, "02": {"pathology": "MS"}, "03": {"pathology": "HC"}}
    chosen = L.select_training(records, table, SelectionSettings())
    assert chosen.participants == ("01",)
    assert chosen.excluded == {"02": "pathology=MS", "03": "has a lesion mask", "04": "not listed in participants.tsv"}


def test_training_selection_needs_a_way_to_tell_healthy() -> None:
    with pytest.raises(MissingInputError, match="no participants.tsv"):
        L.select_training([_record("01")], {}, SelectionSettings())
    with pytest.raises(MissingInputError, match="no 'pathology' column"):
        L.select_training([_record("01")], {"01": {"age": "30"}}, SelectionSettings())
    with pytest.raises(NothingSelectedError, match="99"):
        L.select_training([_record("01")], {}, SelectionSettings(train_participants=("99",)))
