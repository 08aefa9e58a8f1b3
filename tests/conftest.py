"""Shared fixtures: synthetic BIDS datasets generated once per test run, copied when a test mutates one."""
from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path
from typing import Iterator

import pytest

from bids_app.synthetic import generate_dataset


def tree_digest(root: Path) -> dict[str, str]:
    """SHA-256 of every file (and the list of folders, and where each symlink points) under root:
    proves a tree is unchanged."""
    digest: dict[str, str] = {}
    for path in sorted(Path(root).rglob("*")):
        rel = path.relative_to(root).as_posix()
        if path.is_symlink():
            digest[rel] = f"symlink to {os.readlink(path)}"
        elif path.is_dir():
            digest[rel + "/"] = "dir"
        else:
            digest[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
    return digest


@pytest.fixture(scope="session")
def simple_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """4 healthy + 2 lesion participants, T2w only, no sessions."""
    root = tmp_path_factory.mktemp("simple") / "bids"
    generate_dataset(root, n_healthy=4, n_lesion=2, seed=1)
    return root


@pytest.fixture(scope="session")
def rich_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Sessions and two contrasts: 2 healthy + 1 lesion participant, ses-1/ses-2, T2w and T1w."""
    root = tmp_path_factory.mktemp("rich") / "bids"
    generate_dataset(root, n_healthy=2, n_lesion=1, seed=2, sessions=("1", "2"), contrasts=("T2w", "T1w"))
    return root


@pytest.fixture()
def dataset_copy(simple_dataset: Path, tmp_path: Path) -> Path:
    """A private copy of the simple dataset for tests that change it."""
    target = tmp_path / "bids"
    shutil.copytree(simple_dataset, target)
    return target


#: A few optimisation steps per stage: enough for a model directory that loads and segments, fast.
TINY_TRAINING = {
    "training": {"vqgan": {"max_steps": 4, "disc_start": 2, "figure_every": 2},
                 "diffusion": {"max_steps": 4, "figure_every": 2},
                 "adapter": {"max_steps": 2}},
    "segmentation": {"counterfactual": {"strengths": [0.5]}},  # one strength: patched noising runs 54 chains a window
}


@pytest.fixture(scope="session")
def tiny_model(simple_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A barely trained, calibrated tiny model directory (group level on the simple dataset)."""
    import json

    from bids_app import cli

    out = tmp_path_factory.mktemp("tiny_model") / "out"
    config = out.parent / "tiny.json"
    config.write_text(json.dumps(TINY_TRAINING))
    code = cli.main([str(simple_dataset), str(out), "group", "--preset", "tiny", "--config", str(config),
                     "--skip-bids-validation"])
    assert code == 0, "training the tiny test model failed"
    return out / "models"


#: A residual threshold under the tiny test model's peaks in sub-01 and sub-05 of the simple dataset,
#: for tests that need lesions to look at: whether a 4-step model's calibration (one healthy image)
#: leaves any is not what they test.
LESION_THRESHOLD = 0.02


def participant_args(model_dir: Path) -> list[str]:
    """Participant-level flags that use the tiny test model at the strength it was calibrated for."""
    return ["--model-dir", str(model_dir), "--strength", "0.5"]


@pytest.fixture
def single_thread() -> Iterator[None]:
    """One intra-op thread: on a shared 2-core box a preempted OpenMP thread makes 2-thread 3D convs ~15x slower."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
