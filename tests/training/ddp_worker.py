"""Test-only torchrun entry point: the app's CLI plus two probes that production code does not have.

``python -m torch.distributed.run ... ddp_worker.py PROBE_DIR run.py-arguments...`` runs ``bids_app.cli.main``
on every rank and records, per rank, (1) a digest of every tensor and value in each stage's full training
state (weights, optimiser, EMA, generators) when the stage ends, and (2) every file the rank committed
through the atomic writers. The test then compares the ranks' digests and checks rank 1 wrote nothing.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Any

import torch

from bids_app import cli
from bids_app import io as file_io
from bids_app.training import loop


def digest(value: Any) -> Any:
    """A JSON-able fingerprint of a nested state dict: tensors by the SHA-256 of their bytes."""
    if isinstance(value, torch.Tensor):
        data = value.detach().cpu().contiguous().reshape(-1)
        return f"{data.dtype}{list(data.shape)}:" + hashlib.sha256(data.view(torch.uint8).numpy().tobytes()).hexdigest()
    if isinstance(value, dict):
        return {str(k): digest(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [digest(v) for v in value]
    return repr(value)


def main() -> int:
    probe_dir, argv = Path(sys.argv[1]), sys.argv[2:]
    rank = int(os.environ.get("RANK", "0"))
    probe_dir.mkdir(parents=True, exist_ok=True)
    written: list[str] = []
    commit, run_stage = file_io._commit, loop.run_stage

    def recording_commit(tmp: Path, path: Path) -> None:
        written.append(str(path))
        commit(tmp, path)

    def probing_run_stage(stage, budget, checkpoint_dir, dist=loop.SINGLE):
        result = run_stage(stage, budget, checkpoint_dir, dist)
        (probe_dir / f"{stage.name}_rank{rank}.json").write_text(json.dumps(digest(stage.state_dict())))
        return result

    file_io._commit, loop.run_stage = recording_commit, probing_run_stage
    code = cli.main(argv)
    (probe_dir / f"exit_rank{rank}.json").write_text(json.dumps({"exit_code": code, "written": written}))
    return code


if __name__ == "__main__":
    sys.exit(main())
