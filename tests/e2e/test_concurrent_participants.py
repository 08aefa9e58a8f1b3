"""Four participant jobs at once into one output dataset, as a SLURM job array runs them."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from bids_app.bids.derivatives import BIDSIGNORE_ENTRIES
from bids_app.bids.validate import run_validator

from tests.conftest import participant_args

REPO = Path(__file__).resolve().parents[2]
LABELS = ("01", "02", "05", "06")  # two healthy, two with lesions
KINDS = ("desc-counterfactual_T2w.nii.gz", "label-lesion_probseg.nii.gz", "label-lesion_mask.nii.gz",
         "desc-counterfactual_T2w.json", "label-lesion_probseg.json", "label-lesion_mask.json",
         "T2w_lesions.tsv", "T2w_lesions.json", "T2w_evaluation.json")


@pytest.mark.slow
def test_concurrent_participant_jobs_share_one_output_dir(simple_dataset: Path, tiny_model: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    jobs = [subprocess.Popen([sys.executable, str(REPO / "run.py"), str(simple_dataset), str(out), "participant",
                              "--participant-label", label, "--skip-bids-validation", "--omp-nthreads", "1",
                              "--bids-database-dir", str(tmp_path / "pybids" / label), *participant_args(tiny_model)],
                             env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            for label in LABELS]
    errors = [job.communicate(timeout=900)[1] for job in jobs]
    assert [job.returncode for job in jobs] == [0] * len(LABELS), errors

    for label in LABELS:
        folder = out / f"sub-{label}" / "anat"
        for kind in KINDS:
            assert (folder / f"sub-{label}_{kind}").is_file(), f"sub-{label}_{kind}"
    for path in out.rglob("*.nii.gz"):
        assert np.isfinite(np.asanyarray(nib.load(path).dataobj)).all(), path  # decompresses every byte
    for path in out.rglob("*.json"):
        json.loads(path.read_text())
    leftovers = [p.name for p in out.rglob(".*") if p.is_file() and not p.name.endswith(".lock") and p.name != ".bidsignore"]
    assert not leftovers, f"temporary files left behind: {leftovers}"

    description = json.loads((out / "dataset_description.json").read_text())
    assert description["GeneratedBy"][0]["Name"] == "counterseg"
    assert (out / ".bidsignore").read_text().splitlines() == list(BIDSIGNORE_ENTRIES), "written once, not merged four times"
    records = sorted((out / "logs").glob("run_participant_*.json"))
    assert len(records) == len(LABELS) and len(list((out / "logs").glob("counterseg_participant_*.log"))) == len(LABELS)
    assert all(json.loads(p.read_text())["exit_code"] == 0 for p in records)
    summary = (out / "evaluation_summary.tsv").read_text().splitlines()
    assert summary[0].split("\t")[:2] == ["metric", "mean"]
    n_images = {row.split("\t")[0]: int(row.split("\t")[-1]) for row in summary[1:]}
    assert n_images["lesion_volume_mm3"] == len(LABELS), "the table summarises every job's image"
    table = (out / "lesions.tsv").read_text().splitlines()
    assert [row.split("\t")[0] for row in table[1:]] == [f"sub-{label}" for label in LABELS], \
        "lesions.tsv lists every job's image"

    result = run_validator(out)
    assert not result.errors, result.errors
