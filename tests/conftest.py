"""Shared fixtures: synthetic BIDS datasets generated once per session, copied when a test mutates one."""
from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest

from bids_app.synthetic import generate_dataset


def tree_digest(root: Path) -> dict[str, str]:
    """SHA-256 of every file (and the list of folders) under root: proves a tree is unchanged."""
    digest: dict[str, str] = {}
    for path in sorted(Path(root).rglob("*")):
        rel = path.relative_to(root).as_posix()
        if path.is_dir():
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
