"""The shared training loop: resume equals an uninterrupted run, budgets, the NaN guard, logs."""
from __future__ import annotations

import json
import pickle
from pathlib import Path
from typing import Any, Mapping

import pytest
import torch
from torch import nn

from bids_app.settings import StageSettings
from bids_app.errors import BadDataError
from bids_app.training import loop
from bids_app.training.checkpoint import load_checkpoint, restore_rng_state, rng_state, save_checkpoint
from bids_app.weights import load_weights, save_weights


class ToyStage:
    """A small regression with dropout, seeded batches and generator noise: every source of
    randomness a real stage has, so resume must restore all of them."""

    name = "toy"

    def __init__(self, seed: int = 0) -> None:
        torch.manual_seed(seed)
        self.model = nn.Sequential(nn.Linear(4, 16), nn.Dropout(0.2), nn.Linear(16, 1))
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-2)
        self.generator = torch.Generator().manual_seed(seed)
        self.x = torch.randn(10, 4, generator=torch.Generator().manual_seed(1))
        self.y = self.x.sum(dim=1, keepdim=True)
        self.seed = seed
        self.poison_at: int | None = None

    def train_step(self, step: int) -> dict[str, float]:
        batch = loop.batch_indices(step, 4, len(self.x), self.seed)
        noise = 0.01 * torch.randn(len(batch), 1, generator=self.generator)
        loss = ((self.model(self.x[batch]) - self.y[batch] - noise) ** 2).mean()
        if step == self.poison_at:
            loss = loss * float("nan")
        loop.optimizer_step(loss, self.optimizer, self.model.parameters())
        return {"loss": float(loss.detach())}

    def state_dict(self) -> dict[str, Any]:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "rng": rng_state(self.generator)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        restore_rng_state(state["rng"], self.generator)


def test_resumed_run_equals_uninterrupted_run_bitwise(tmp_path: Path) -> None:
    straight = ToyStage()
    loop.run_stage(straight, StageSettings(max_steps=30, checkpoint_every=7), tmp_path / "a")
    interrupted = ToyStage()
    loop.run_stage(interrupted, StageSettings(max_steps=13, checkpoint_every=7), tmp_path / "b")
    torch.manual_seed(12345)  # a fresh process would start from another global RNG state
    resumed = ToyStage()
    result = loop.run_stage(resumed, StageSettings(max_steps=30, checkpoint_every=7), tmp_path / "b")
    assert result.steps == 30
    for a, b in zip(straight.model.state_dict().values(), resumed.model.state_dict().values()):
        assert torch.equal(a, b)
    steps = [json.loads(line)["step"] for line in (tmp_path / "b" / "losses.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 31)), "the loss log has each step once after a resume"


def test_wall_clock_budget_stops_and_checkpoints(tmp_path: Path, monkeypatch) -> None:
    clock = iter(float(t) for t in range(1000))
    monkeypatch.setattr(loop.time, "monotonic", lambda: next(clock))
    result = loop.run_stage(ToyStage(), StageSettings(max_steps=100, max_time_s=5, checkpoint_every=50), tmp_path)
    assert result.stopped_by == "max_time" and result.steps < 100
    assert load_checkpoint(tmp_path / "latest.pt")["step"] == result.steps


def test_nan_loss_is_skipped_not_applied(tmp_path: Path, caplog) -> None:
    stage = ToyStage()
    stage.poison_at = 3
    loop.run_stage(stage, StageSettings(max_steps=6), tmp_path)
    assert "skipped an optimiser step" in caplog.text
    assert all(torch.isfinite(p).all() for p in stage.model.parameters())


def test_batch_indices_cover_each_epoch_once() -> None:
    seen = [i for step in range(5) for i in loop.batch_indices(step, 2, 10, seed=3)]
    assert sorted(seen) == list(range(10))
    assert loop.batch_indices(7, 3, 10, seed=3) == loop.batch_indices(7, 3, 10, seed=3)
    assert loop.batch_indices(0, 10, 10, seed=3) != loop.batch_indices(0, 10, 10, seed=4)


class Exploit:
    def __reduce__(self):
        return (print, ("this ran code",))


def test_checkpoints_with_code_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "evil.pt"
    with path.open("wb") as handle:
        pickle.dump({"format": 1, "x": Exploit()}, handle)
    with pytest.raises(BadDataError, match="weights-only"):
        load_checkpoint(path)
    with pytest.raises(BadDataError, match="weights-only"):
        load_weights(path)


def test_weights_checksum_and_truncation(tmp_path: Path) -> None:
    path = tmp_path / "w.pt"
    digest = save_weights(path, {"a": torch.ones(3)})
    assert torch.equal(load_weights(path, digest)["a"], torch.ones(3))
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(BadDataError, match="checksum mismatch"):
        load_weights(path, digest)
    save_checkpoint(tmp_path / "c.pt", {"step": 1})
    (tmp_path / "c.pt").write_bytes((tmp_path / "c.pt").read_bytes()[:20])
    with pytest.raises(BadDataError):
        load_checkpoint(tmp_path / "c.pt")


class _PeerSignalled:
    """A two-rank job's view from rank 0 when only the other rank got SIGTERM at step 3."""

    is_main, rank, world_size = True, 0, 2

    def __init__(self) -> None:
        self.agreements = 0

    def any(self, flag: bool, device: str = "cpu") -> bool:
        self.agreements += 1
        return flag or self.agreements >= 3


def test_a_signal_on_one_rank_stops_every_rank_at_the_same_step(tmp_path: Path) -> None:
    from bids_app import interruption
    from bids_app.errors import RunInterrupted

    dist = _PeerSignalled()
    with interruption.handle_signals(), pytest.raises(RunInterrupted, match="saved a checkpoint at step 3"):
        loop.run_stage(ToyStage(), StageSettings(max_steps=30, checkpoint_every=100), tmp_path, dist)  # type: ignore[arg-type]
    assert load_checkpoint(tmp_path / loop.CHECKPOINT_NAME)["step"] == 3
