"""The SLURM templates run as SLURM would run them, with stand-ins for apptainer, srun and scontrol."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

SLURM = Path(__file__).resolve().parents[1] / "scripts" / "slurm"
#: A stand-in container runtime (and srun, scontrol): records its arguments, exits with $STUB_EXIT.
STUB = """#!/bin/bash
printf '%s\\n' "$@" > "$STUB_LOG.$(basename "$0")"
[[ $(basename "$0") == scontrol ]] && { echo node-a; echo node-b; exit 0; }
[[ $(basename "$0") == srun ]] && { shift; exec "$@"; }
exit "${STUB_EXIT:-0}"
"""


@pytest.fixture()
def stubs(tmp_path: Path) -> Path:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in ("apptainer", "srun", "scontrol"):
        (bin_dir / name).write_text(STUB)
        (bin_dir / name).chmod(0o755)
    return bin_dir


#: The image as the templates' usage builds it: counterseg:<version> made into a SIF.
SIF = "/images/counterseg-0.1.0.sif"


def run_template(name: str, stubs: Path, tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    environ = {"PATH": f"{stubs}:{os.environ['PATH']}", "HOME": str(tmp_path), "STUB_LOG": str(tmp_path / "called"),
               "BIDS_DIR": str(tmp_path / "bids"), "OUTPUT_DIR": str(tmp_path / "out"), "SIF": SIF, **env}
    return subprocess.run(["bash", str(SLURM / name)], env=environ, cwd=tmp_path, capture_output=True, text=True,
                          timeout=60)


@pytest.mark.parametrize("name", ["participant_array.sbatch", "group_multigpu.sbatch"])
def test_templates_are_valid_bash(name: str) -> None:
    assert subprocess.run(["bash", "-n", str(SLURM / name)], capture_output=True).returncode == 0


@pytest.mark.parametrize("task, label", [("1", "01"), ("3", "05"), ("4", "10")])
def test_array_task_runs_its_participant_and_logs_the_exit_code(stubs: Path, tmp_path: Path, task: str, label: str) -> None:
    participants = tmp_path / "participants.txt"
    participants.write_text("# healthy first\nsub-01\n02\n\n  sub-05 \n10\n")
    result = run_template("participant_array.sbatch", stubs, tmp_path, PARTICIPANTS=str(participants),
                          SLURM_ARRAY_TASK_ID=task, SLURM_ARRAY_JOB_ID="77", SLURM_CPUS_PER_TASK="4",
                          STUB_EXIT="65", COUNTERSEG_ARGS="--steps 2")
    assert result.returncode == 65, result.stderr
    args = (tmp_path / "called.apptainer").read_text().splitlines()
    assert args[:2] == ["run", "--nv"]
    assert args[args.index(SIF) + 3] == "participant"  # the image's entry point gets the BIDS-App arguments
    assert args[args.index("--participant-label") + 1] == label
    database = Path(args[args.index("--bids-database-dir") + 1])
    assert database == tmp_path / "out" / "work" / "pybids" / f"task-77_{task}" and database.is_dir()
    assert args[args.index("--nprocs") + 1] == "4" and args[-2:] == ["--steps", "2"]
    line = [ln for ln in result.stdout.splitlines() if ln.startswith("counterseg-task")]
    assert len(line) == 1 and f"counterseg-task 77_{task} participant=sub-{label} " in line[0] and "exit=65" in line[0]


def test_array_task_past_the_list_is_a_usage_error(stubs: Path, tmp_path: Path) -> None:
    participants = tmp_path / "participants.txt"
    participants.write_text("01\n")
    result = run_template("participant_array.sbatch", stubs, tmp_path, PARTICIPANTS=str(participants),
                          SLURM_ARRAY_TASK_ID="2")
    assert result.returncode == 64 and "exit=64" in result.stdout
    assert not (tmp_path / "called.apptainer").exists()


def test_group_template_starts_torchrun_on_every_node(stubs: Path, tmp_path: Path) -> None:
    result = run_template("group_multigpu.sbatch", stubs, tmp_path, SLURM_NNODES="2", SLURM_GPUS_ON_NODE="4",
                          SLURM_JOB_ID="99", SLURM_JOB_NODELIST="node-[a-b]", SLURM_CPUS_PER_TASK="32")
    assert result.returncode == 0, result.stderr
    args = (tmp_path / "called.apptainer").read_text().splitlines()
    assert args[:2] == ["exec", "--nv"]
    torchrun = args[args.index("torchrun"):]
    assert {"--nnodes=2", "--nproc_per_node=4", "--rdzv_backend=c10d", "--rdzv_endpoint=node-a:29500",
            "--rdzv_id=99"} <= set(torchrun)
    assert args[args.index(SIF) + 1] == "torchrun"
    # torchrun starts the image's counterseg command (the entry point; no Python file) on every GPU
    assert torchrun[torchrun.index("--no-python") + 1] == "counterseg"
    assert torchrun[torchrun.index("counterseg") + 3] == "group"


@pytest.mark.parametrize("name, env", [("participant_array.sbatch", {"SLURM_ARRAY_TASK_ID": "1"}),
                                       ("group_multigpu.sbatch", {})])
def test_templates_need_the_image(stubs: Path, tmp_path: Path, name: str, env: dict[str, str]) -> None:
    """No default image: a job runs the counterseg-<version>.sif it is given, never a stale one."""
    (tmp_path / "participants.txt").write_text("01\n")
    result = run_template(name, stubs, tmp_path, SIF="", **env)
    assert result.returncode != 0 and "SIF" in result.stderr and "counterseg-<version>.sif" in result.stderr
    assert not (tmp_path / "called.apptainer").exists()
