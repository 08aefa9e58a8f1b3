"""Data-parallel training: the rank arithmetic in-process, and the group level under torchrun on CPU (gloo)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from bids_app.workspace import checkpoints_dir
from bids_app import cli
from bids_app.compute import configure_threads
from bids_app.errors import ExitCode, UsageError
from bids_app.schedulers import DDIMScheduler, SchedulerConfig
from bids_app.settings import build_settings
from bids_app.training import loop
from bids_app.training.diffusion import noisy_batch
from bids_app.distributed import SINGLE, Distributed, from_environment

REPO = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).with_name("ddp_worker.py")

#: Every stage, a few steps: adversarial terms from step 2 (both DDP discriminators), a mid-run checkpoint,
#: and accumulation over two micro-steps (no_sync) in the diffusion stage.
DDP_TRAINING = {"training": {
    "stages": ["vqgan", "diffusion", "adapter"],
    "vqgan": {"max_steps": 3, "disc_start": 1, "figure_every": 0, "checkpoint_every": 2},
    "diffusion": {"max_steps": 2, "figure_every": 0, "batch_size": 4, "accumulation_steps": 2},
    "adapter": {"max_steps": 1},
}}
FLAGS = ["group", "--preset", "tiny", "--skip-bids-validation", "--omp-nthreads", "1"]
#: Measured between one process and two (gloo, this machine): per-step losses differ by at most 2.3e-4
#: (relative) and the stored weights by 1.6e-3 (relative L2 norm, adapter; 4e-5 for the VQ-GAN). The
#: differences are floating-point summation order (gradients averaged across ranks rather than over one
#: batch), amplified by Adam's sign-like first steps and an occasional flipped nearest code.
LOSS_TOLERANCE = 2e-3
WEIGHT_TOLERANCE = 1e-2


def test_environment_selects_the_rank() -> None:
    assert from_environment({}) is SINGLE
    assert from_environment({"WORLD_SIZE": "1", "RANK": "0"}) is SINGLE
    context = from_environment({"WORLD_SIZE": "4", "RANK": "3", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"})
    assert (context.rank, context.local_rank, context.world_size, context.is_main) == (3, 1, 4, False)
    with pytest.raises(UsageError, match="inconsistent"):
        from_environment({"WORLD_SIZE": "2", "RANK": "2", "LOCAL_RANK": "0"})


def test_rank_shards_put_together_are_the_single_process_batch() -> None:
    for accumulation in (1, 2):
        whole = loop.micro_batches(5, 8, accumulation, 7, seed=3)
        ranks = [loop.micro_batches(5, 8, accumulation, 7, seed=3, dist=Distributed(r, r, 2, 2)) for r in range(2)]
        for m, micro in enumerate(whole):
            assert ranks[0][m].items + ranks[1][m].items == micro.items
            assert [ranks[r][m].last for r in range(2)] == [micro.last] * 2
        assert sum(len(micro.items) for micro in whole) == 8
    with pytest.raises(UsageError, match="multiple of the number of processes"):
        loop.micro_batches(0, 6, 1, 7, seed=3, dist=Distributed(0, 0, 4, 4))


def test_noise_is_drawn_for_the_whole_micro_batch() -> None:
    scheduler = DDIMScheduler(SchedulerConfig(num_train_timesteps=50))
    x0 = torch.randn(4, 2, 3, 3, 3)
    whole = noisy_batch(scheduler, x0, torch.Generator().manual_seed(1))
    generators = [torch.Generator().manual_seed(1) for _ in range(2)]
    parts = [noisy_batch(scheduler, x0[r * 2:(r + 1) * 2], generators[r], 4, slice(r * 2, (r + 1) * 2)) for r in range(2)]
    for i in range(3):
        assert torch.equal(torch.cat([parts[0][i], parts[1][i]]), whole[i])
    assert torch.equal(generators[0].get_state(), generators[1].get_state()), "generators stay in step"


def test_threads_are_shared_by_the_processes_of_a_node() -> None:
    before = torch.get_num_threads()
    try:
        assert configure_threads(None, 4, processes_per_node=2) == 2
        assert configure_threads(3, 4, processes_per_node=2) == 3
        assert configure_threads(None, 1, processes_per_node=2) == 1
    finally:
        torch.set_num_threads(before)


def test_batch_must_split_into_micro_steps(tmp_path: Path) -> None:
    overrides = {"bids_dir": tmp_path, "output_dir": tmp_path / "o", "analysis_level": "group",
                 "training": {"vqgan": {"batch_size": 3, "accumulation_steps": 2}}}
    with pytest.raises(UsageError, match="multiple of accumulation_steps"):
        build_settings(overrides)


def test_participant_level_refuses_torchrun(simple_dataset: Path, tmp_path: Path, monkeypatch) -> None:
    for name, value in {"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "2"}.items():
        monkeypatch.setenv(name, value)
    code = cli.main([str(simple_dataset), str(tmp_path / "out"), "participant", "--skip-bids-validation"])
    assert code == ExitCode.USAGE
    assert not (tmp_path / "out").exists()


def _files(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}


def _losses(out: Path, stage: str) -> list[dict]:
    return [json.loads(line) for line in (checkpoints_dir(out / "work", out / "models") / stage / "losses.jsonl").read_text().splitlines()]


def _relative_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    names = [k for k in a if a[k].is_floating_point()]
    difference = sum(float((a[k].double() - b[k].double()).pow(2).sum()) for k in names) ** 0.5
    return difference / sum(float(a[k].double().pow(2).sum()) for k in names) ** 0.5


@pytest.mark.slow
def test_group_level_under_torchrun(simple_dataset: Path, tmp_path: Path) -> None:
    """Two gloo ranks resume a one-process run interrupted after a checkpoint: both finish, rank 0 alone
    writes, the ranks end with identical training states, and the result is the one-process result."""
    config = tmp_path / "ddp.json"
    config.write_text(json.dumps(DDP_TRAINING))
    threads = torch.get_num_threads()
    try:
        one, two = tmp_path / "one", tmp_path / "two"
        assert cli.main([str(simple_dataset), str(one), *FLAGS, "--config", str(config)]) == 0
        interrupted = tmp_path / "interrupted.json"
        interrupted.write_text(json.dumps({"training": {**DDP_TRAINING["training"], "stages": ["vqgan"],
                                                         "vqgan": {**DDP_TRAINING["training"]["vqgan"], "max_steps": 2}}}))
        assert cli.main([str(simple_dataset), str(two), *FLAGS, "--config", str(interrupted)]) == 0
    finally:
        torch.set_num_threads(threads)
    shutil.rmtree(two / "models" / "vqgan")  # as if killed after the step-2 checkpoint, before storing the component
    logs_before = _files(two / "logs")

    probes = tmp_path / "probes"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(WORKER),
               str(probes), str(simple_dataset), str(two), *FLAGS, "--config", str(config)]
    started = time.monotonic()
    run = subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-4000:]
    print(f"torchrun, 2 processes: {time.monotonic() - started:.1f} s")

    exits = [json.loads((probes / f"exit_rank{r}.json").read_text()) for r in range(2)]
    assert [e["exit_code"] for e in exits] == [0, 0], "both ranks finish"
    assert exits[0]["written"] and exits[1]["written"] == [], "rank 1 commits no file"
    outside_logs = [{f for f in _files(out) if not f.startswith("logs/")} for out in (one, two)]
    assert outside_logs[0] == outside_logs[1], "the same files as one process: no rank writes anything of its own"
    new_logs = sorted(_files(two / "logs") - logs_before)
    assert len(new_logs) == 2 and all("rank" not in name for name in new_logs), new_logs
    log_text = next((two / "logs" / n).read_text() for n in new_logs if n.endswith(".log"))
    assert "rank 1" not in log_text
    assert "vqgan: resuming from step 2" in log_text
    assert "effective batch 4 volume(s) per optimiser step = 2 process(es) x 2 micro-step(s) x 1 volume(s)" in log_text

    for stage in ("vqgan", "diffusion", "adapter"):
        states = [json.loads((probes / f"{stage}_rank{r}.json").read_text()) for r in range(2)]
        assert states[0] == states[1], f"{stage}: the ranks' training states differ"
        for a, b in zip(_losses(one, stage), _losses(two, stage), strict=True):
            assert a["step"] == b["step"]
            for name in set(a) - {"step", "time_s"}:
                assert abs(a[name] - b[name]) <= LOSS_TOLERANCE * max(abs(a[name]), 1e-6), (stage, a["step"], name)
        weights = [torch.load(out / "models" / stage / "weights.pt", weights_only=True) for out in (one, two)]
        assert _relative_difference(*weights) <= WEIGHT_TOLERANCE, stage
