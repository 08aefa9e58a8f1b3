"""benchmarks/training_step.py at the smallest size: result structure, FLOPs that scale with the batch."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from benchmarks import training_step
from benchmarks.training_step import REFERENCE_TARGET_BYTES, STAGES, configurations, count_flops, measure_step

SHAPE = [16, 16, 16]


pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def rows() -> dict[tuple[str, int], dict]:
    """One timed step of every stage (tiny preset, 16^3) at batch 1 and 2."""
    with_one_thread = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return {(stage, batch): measure_step(stage, "tiny", SHAPE, batch, repeats=1)
                for stage in STAGES for batch in (1, 2)}
    finally:
        torch.set_num_threads(with_one_thread)


@pytest.mark.parametrize("stage", STAGES)
def test_a_row_says_what_was_measured(rows, stage: str) -> None:  # noqa: ANN001
    row = rows[(stage, 2)]
    assert row["stage"] == stage and row["preset"] == "tiny" and row["shape"] == SHAPE and row["batch"] == 2
    assert row["repeats"] == 1 and len(row["times_s"]) == 1 and row["time_source"] == "median of timed steps"
    assert row["median_s"] == row["times_s"][0] > 0 and row["warmup_s"] > 0
    assert row["volumes_per_s"] == pytest.approx(2 / row["median_s"])
    assert row["flops"] > 0 and row["flop_per_s"] == pytest.approx(row["flops"] / row["median_s"])
    assert row["dtype"] == "float32" and row["threads"] == 1 and row["parameters"] > 0
    assert row["peak_total_bytes"] >= row["baseline_bytes"] > 0 and row["peak_bytes"] >= 0
    assert row["peak_scope"] == "region"  # Linux: the high-water mark is reset for the measured steps
    assert row["n_codes"] == 512  # the app's tiny preset, not the bare architecture preset (64 codes)
    assert row["checkpointing"] is (False if stage.startswith("vqgan") else None)  # the tiny preset trains without


@pytest.mark.parametrize("stage", STAGES)
def test_flops_scale_with_the_batch(rows, stage: str) -> None:  # noqa: ANN001
    assert rows[(stage, 2)]["flops"] == pytest.approx(2 * rows[(stage, 1)]["flops"], rel=0.01)


def test_the_adversarial_phase_counts_the_discriminators(rows) -> None:  # noqa: ANN001
    assert rows[("vqgan_adv", 1)]["flops"] > 1.05 * rows[("vqgan", 1)]["flops"]


def test_the_counted_step_includes_the_backward() -> None:
    """A training step does forward + backward (~3x a forward); only a forward would count ~1x."""
    stage = training_step.build_stage("vqgan", "tiny", SHAPE, 1, "cpu", checkpointing=False)
    x = stage.train_data[0]["image"][None]
    forward = count_flops(lambda: stage.model(x, stage.generator))
    step = count_flops(lambda: stage.train_step(0))
    assert 2.5 * forward < step < 3.5 * forward, (forward, step)


def test_the_count_is_flop_counter_modes() -> None:
    from torch.utils.flop_counter import FlopCounterMode

    stage = training_step.build_stage("adapter", "tiny", SHAPE, 1, "cpu")
    mode = FlopCounterMode(display=False)
    with mode:
        stage.train_step(0)
    assert count_flops(lambda: stage.train_step(1)) == mode.get_total_flops() > 0


def test_long_warm_up_is_the_only_step() -> None:
    row = measure_step("diffusion", "tiny", SHAPE, 1, repeats=5, long_step=0.0)
    assert row["times_s"] == [] and row["time_source"] == "warm-up" and row["median_s"] == row["warmup_s"]


def test_configurations_follow_the_presets() -> None:
    specs = configurations(["tiny", "default"], list(STAGES), [2048, 16384])
    assert len(specs) == 2 * len(STAGES) + 2
    by_label = {s["label"]: s for s in specs}
    assert by_label["tiny vqgan"]["shape"] == [32, 32, 32] and by_label["tiny vqgan"]["batch"] == 2
    assert by_label["default diffusion"]["shape"] == [64, 64, 128]
    reference = by_label["reference vqgan_adv 16384 codes"]
    assert reference == {"stage": "vqgan_adv", "preset": "default", "shape": [32, 128, 128], "batch": 1,
                         "n_codes": 16384, "label": "reference vqgan_adv 16384 codes"}
    assert configurations(["tiny"], ["adapter"], [], shape=[8, 8, 8], batch=3)[0]["batch"] == 3
    per_preset = configurations(["tiny", "default"], ["vqgan"], [], batch=training_step.parse_batch(["default=1"]))
    assert [s["batch"] for s in per_preset] == [2, 1]
    assert training_step.parse_batch(["4"]) == 4 and training_step.parse_batch([]) is None


def test_summary_judges_the_reference_memory_target() -> None:
    rates = {"float32": {"flop_per_s": 1e10}}
    rows = [{"label": "reference a", "dtype": "float32", "flop_per_s": 5e9, "peak_total_bytes": REFERENCE_TARGET_BYTES},
            {"label": "reference b", "dtype": "float32", "flop_per_s": 5e9, "peak_total_bytes": REFERENCE_TARGET_BYTES + 1},
            {"label": "tiny vqgan", "dtype": "float32", "flop_per_s": 2e9, "peak_total_bytes": 10**12}]
    met, missed, other = training_step.summarise(rows, rates)
    assert met["memory_target_met"] and not missed["memory_target_met"] and "memory_target_met" not in other
    assert other["matmul_fraction"] == pytest.approx(0.2)


def test_main_writes_the_report(tmp_path: Path) -> None:
    out = tmp_path / "report.json"
    code = training_step.main(["--preset", "tiny", "--stage", "adapter", "--reference-codes", "--shape", "16", "16", "16",
                               "--repeats", "1", "--threads", "1", "--matmul-size", "256", "--out", str(out)])
    assert code == 0
    report = json.loads(out.read_text())
    assert report["machine"]["torch"] == torch.__version__ and report["machine"]["cpu"]
    assert report["matmul"]["float32"]["size"] == 256 and report["matmul"]["float32"]["flop_per_s"] > 0
    (row,) = report["rows"]
    assert row["label"] == "tiny adapter" and row["threads"] == 1 and 0 < row["matmul_fraction"]
