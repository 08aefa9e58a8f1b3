"""benchmarks/gpu_check.py --tiny: the GPU check's whole path (train every stage, SIGTERM, resume, segment
two images) on CPU, so that the command a GPU machine runs cannot rot."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from benchmarks import gpu_check
from benchmarks.level_runs import TRAINED_STAGES

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("single_thread")]


@pytest.fixture(scope="module")
def tiny_check(tmp_path_factory: pytest.TempPathFactory) -> tuple[int, dict, Path]:
    workdir = tmp_path_factory.mktemp("gpu_check")
    threads = torch.get_num_threads()
    try:
        code = gpu_check.main([str(workdir), "--tiny"])
    finally:
        torch.set_num_threads(threads)
    return code, json.loads((workdir / "gpu_check.json").read_text()), workdir


def test_tiny_check_passes_every_check(tiny_check) -> None:  # noqa: ANN001
    code, report, _ = tiny_check
    failed = [c for c in report["checks"] if not c["passed"]]
    assert code == 0 and report["passed"] and not failed, failed
    names = {c["name"] for c in report["checks"]}
    assert {"interrupted", "resumed", "kept the finished VQ-GAN", "model card", "participant level"} <= names
    assert report["mode"] == "tiny" and report["preset"] == "tiny" and report["device"] == "cpu"


def test_the_interrupted_stage_resumed_where_it_stopped(tiny_check) -> None:  # noqa: ANN001
    _, report, _ = tiny_check
    calls = [(c["stage"], c.get("steps")) for c in report["group"]["stage_calls"]]
    # The first run: VQ-GAN finished, diffusion stopped by SIGTERM (no result); the rerun: diffusion, adapter.
    assert calls == [("vqgan", 2), ("diffusion", None), ("diffusion", 2), ("adapter", 2)]
    assert report["interrupted_at"] == "diffusion step 1"


def test_report_has_step_times_memory_and_seconds_per_image(tiny_check, capsys) -> None:  # noqa: ANN001
    _, report, _ = tiny_check
    stages = report["group"]["stages"]
    assert list(stages) == list(TRAINED_STAGES)
    assert [p["phase"] for p in stages["vqgan"]["phases"]] == ["vqgan", "vqgan + discriminators"]
    for row in stages.values():
        assert row["steps_logged"] == [1, 2] and all(p["median_s"] > 0 for p in row["phases"])
        assert row["peak_bytes"] >= 0
    participant = report["participant"]
    assert len(participant["images"]) == 2 and participant["synthesis_s_per_image"] > 0
    assert participant["wall_s_per_image"] >= participant["synthesis_s_per_image"]
    line = gpu_check.summary_line(report)
    assert line.startswith("GPU CHECK (--tiny, CPU path) PASS: tiny preset") and "s/image" in line
    assert all(f"{stage} " in line for stage in TRAINED_STAGES)


def test_a_second_check_in_the_same_workdir_is_refused(tiny_check, capsys) -> None:  # noqa: ANN001
    _, _, workdir = tiny_check
    assert gpu_check.main([str(workdir), "--tiny"]) == 64
    assert "exists" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device would run the whole GPU check")
def test_without_cuda_the_gpu_check_is_a_usage_error(tmp_path: Path, capsys) -> None:  # noqa: ANN001
    assert gpu_check.main([str(tmp_path / "w")]) == 64
    assert "CUDA is not available" in capsys.readouterr().err
    assert not (tmp_path / "w").exists()
