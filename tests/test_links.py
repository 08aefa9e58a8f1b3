"""BIDS URIs for input files and the DatasetLinks that resolve them: no host path in any output."""
from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from bids_app.bids import derivatives as d
from bids_app.bids import links


def _dataset(root: Path, **description: object) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "dataset_description.json").write_text(json.dumps({"Name": root.name, "BIDSVersion": "1.10.0",
                                                                **description}))
    return root


def _file(root: Path, rel: str) -> Path:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x")
    return path


@pytest.fixture
def layout(tmp_path: Path) -> tuple[Path, Path, Path]:
    """A raw dataset with a labels derivative inside it, and the output under derivatives/ too."""
    raw = _dataset(tmp_path / "bids")
    labels = _dataset(raw / "derivatives" / "labels", DatasetType="derivative", DatasetDOI="doi:10.5/labels")
    out = raw / "derivatives" / "counterseg"
    d.write_dataset_description(out, "0.1.0", raw)
    return raw, labels, out


def test_a_cord_mask_is_named_by_a_uri_of_its_linked_dataset(layout: tuple[Path, Path, Path]) -> None:
    raw, labels, out = layout
    cord = _file(labels, "sub-01/anat/sub-01_T2w_label-SC_seg.nii.gz")
    uri = links.bids_uri(cord, out)
    assert uri == "bids:labels:sub-01/anat/sub-01_T2w_label-SC_seg.nii.gz"
    description = json.loads((out / "dataset_description.json").read_text())
    assert description["DatasetLinks"] == {"raw": "../..", "labels": "../labels"}
    assert description["SourceDatasets"] == [{"URL": "../.."}, {"URL": "../labels", "DOI": "doi:10.5/labels"}]
    assert links.resolve_bids_uri(uri, out) == cord.resolve()
    assert links.bids_uri(raw / "sub-01" / "anat" / "sub-01_T2w.nii.gz", out) == "bids:raw:sub-01/anat/sub-01_T2w.nii.gz"
    assert str(raw.parent) not in (out / "dataset_description.json").read_text()


def test_a_rerun_keeps_the_links_of_the_input_datasets(layout: tuple[Path, Path, Path]) -> None:
    raw, labels, out = layout
    links.bids_uri(_file(labels, "sub-01/anat/sub-01_T2w_label-SC_seg.nii.gz"), out)
    before = (out / "dataset_description.json").read_bytes()
    d.write_dataset_description(out, "0.1.0", raw)  # what every run does at its start and end
    assert (out / "dataset_description.json").read_bytes() == before


def test_datasets_with_one_folder_name_get_distinct_links(tmp_path: Path) -> None:
    raw = _dataset(tmp_path / "raw")
    out = tmp_path / "out"
    d.write_dataset_description(out, "0.1.0", raw)
    first = _file(_dataset(tmp_path / "a" / "labels"), "sub-01/anat/m.nii.gz")
    second = _file(_dataset(tmp_path / "b" / "labels"), "sub-01/anat/m.nii.gz")
    assert links.bids_uri(first, out) == "bids:labels:sub-01/anat/m.nii.gz"
    assert links.bids_uri(second, out) == "bids:labels2:sub-01/anat/m.nii.gz"
    assert links.bids_uri(first, out) == "bids:labels:sub-01/anat/m.nii.gz"
    assert links.resolve_bids_uri("bids:labels2:sub-01/anat/m.nii.gz", out) == second.resolve()


def test_a_derivative_folder_without_a_description_is_rooted_above_its_sub_folders(tmp_path: Path) -> None:
    out = tmp_path / "out"
    d.write_dataset_description(out, "0.1.0", _dataset(tmp_path / "raw"))
    mask = _file(tmp_path / "masks" / "raw", "sub-01/ses-1/anat/sub-01_ses-1_T2w_seg.nii.gz")
    # Its folder is called raw, which names the raw dataset: it is linked as "input" instead.
    assert links.bids_uri(mask, out) == "bids:input:sub-01/ses-1/anat/sub-01_ses-1_T2w_seg.nii.gz"
    assert links.resolve_bids_uri(links.bids_uri(mask, out), out) == mask.resolve()
    with pytest.raises(ValueError, match="in no BIDS dataset"):
        links.dataset_root(_file(tmp_path / "loose", "mask.nii.gz"))


def test_jobs_linking_datasets_at_once_lose_no_link(tmp_path: Path) -> None:
    raw = _dataset(tmp_path / "raw")
    out = tmp_path / "out"
    d.write_dataset_description(out, "0.1.0", raw)
    files = [_file(_dataset(tmp_path / f"deriv{k}"), "sub-01/anat/m.nii.gz") for k in range(8)]

    def job(k: int) -> str:
        d.write_dataset_description(out, "0.1.0", raw)
        return links.bids_uri(files[k], out)

    with ThreadPoolExecutor(max_workers=8) as pool:
        uris = list(pool.map(job, range(8)))
    assert uris == [f"bids:deriv{k}:sub-01/anat/m.nii.gz" for k in range(8)]
    linked = json.loads((out / "dataset_description.json").read_text())["DatasetLinks"]
    assert set(linked) == {"raw", *(f"deriv{k}" for k in range(8))}


@pytest.mark.parametrize(("target", "expected"), [
    ("file:///data/my%20bids", Path("/data/my bids")),  # counterseg 0.1 wrote file: URIs
    ("https://openneuro.org/datasets/ds1", None),
    ("doi:10.1/x", None),
    (None, None),
])
def test_links_that_do_not_point_here_resolve_to_nothing(tmp_path: Path, target, expected) -> None:
    assert links.resolve_link(target, tmp_path) == expected


def test_an_old_absolute_path_still_resolves_and_junk_does_not(tmp_path: Path) -> None:
    assert links.resolve_bids_uri("/abs/mask.nii.gz", tmp_path) == Path("/abs/mask.nii.gz")
    assert links.resolve_bids_uri("bids:nolink:sub-01/x.nii.gz", tmp_path) is None
    assert links.resolve_bids_uri("bids:only", tmp_path) is None
    assert links.resolve_bids_uri(None, tmp_path) is None


def test_a_file_linked_into_an_annex_is_named_within_its_own_dataset(layout: tuple[Path, Path, Path]) -> None:
    """DataLad/git-annex: the dataset's file is a symbolic link to a content file outside any dataset;
    the URI names the file where the dataset has it, and the link to the dataset is not duplicated."""
    raw, labels, out = layout
    content = _file(raw.parent / "annex", "objects/e3238bb987")
    cord = labels / "sub-01" / "anat" / "sub-01_T2w_label-SC_seg.nii.gz"
    cord.parent.mkdir(parents=True)
    cord.symlink_to(content)
    assert links.bids_uri(cord, out) == "bids:labels:sub-01/anat/sub-01_T2w_label-SC_seg.nii.gz"
    linked_dir = raw.parent / "labels-link"
    linked_dir.symlink_to(labels, target_is_directory=True)  # the same dataset reached through a link
    assert links.bids_uri(linked_dir / "sub-01" / "anat" / "sub-01_T2w_label-SC_seg.nii.gz", out).startswith("bids:labels:")
    assert set(json.loads((out / "dataset_description.json").read_text())["DatasetLinks"]) == {"raw", "labels"}
