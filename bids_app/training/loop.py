"""The training loop every stage shares: resume, budgets, AMP, safe optimiser steps, logs, checkpoints.

Read top to bottom (as nanoGPT's train.py): ``run_stage`` resumes from the stage's latest
checkpoint when there is one, runs ``stage.train_step(step)`` until ``max_steps`` or the wall-clock
budget, logs losses to ``losses.jsonl`` and checkpoints atomically every ``checkpoint_every`` steps.
SIGTERM/SIGINT during the loop end the current step, save a checkpoint and raise ``RunInterrupted``
(``bids_app.interruption``).
A stage that draws its data order and noise from its own seeded generator, whose state is in the
checkpoint, resumes bitwise identically on CPU.

Under torchrun (see :mod:`bids_app.distributed`) every rank runs this same loop: only rank 0
logs and checkpoints, every rank resumes from the same checkpoint, and the wall-clock budget is
decided jointly so that no rank stops alone. A step is ``accumulation_steps`` micro-steps
(:func:`micro_batches`); gradients are synchronised only on the last one (:func:`sync_gradients`).
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Protocol

import torch

from bids_app import interruption, killpoints, runlog
from bids_app.compute import amp_dtype
from bids_app.errors import UsageError
from bids_app.training.checkpoint import load_checkpoint, save_checkpoint
from bids_app.distributed import SINGLE, Distributed
from bids_app.settings import StageSettings

log = logging.getLogger(__name__)

CHECKPOINT_NAME = "latest.pt"
LOSSES_NAME = "losses.jsonl"


@dataclass(frozen=True)
class StageContext:
    """Where and how a stage trains: the device, the seed of its draws, the processes, its figures."""

    device: str = "cpu"
    seed: int = 0
    dist: Distributed = SINGLE
    figures: Path | None = None


@dataclass(frozen=True)
class StageResult:
    steps: int
    stopped_by: str
    seconds: float
    last_metrics: Mapping[str, float]


class Stage(Protocol):
    """What the loop needs from a stage; the stage owns its models, optimisers and data."""

    name: str

    def train_step(self, step: int) -> dict[str, float]: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: Mapping[str, Any]) -> None: ...


def run_stage(stage: Stage, budget: StageSettings, checkpoint_dir: Path, dist: Distributed = SINGLE) -> StageResult:
    """Train ``stage`` to its budget (``max_steps``, ``max_time_s``; reporting every ``log_every``,
    checkpointing every ``checkpoint_every`` steps), resuming from ``checkpoint_dir/latest.pt`` if present.

    Distributed: every rank loads the checkpoint (rank 0 must not be writing it: the caller holds a
    barrier before), rank 0 alone writes the log and checkpoints.
    """
    is_main = dist.is_main
    checkpoint_dir = Path(checkpoint_dir)
    checkpoint = checkpoint_dir / CHECKPOINT_NAME
    start = 0
    if checkpoint.is_file():
        payload = load_checkpoint(checkpoint)
        stage.load_state_dict(payload["stage"])
        start = int(payload["step"])
        log.info("%s: resuming from step %d (%s)", stage.name, start, checkpoint)
    losses = checkpoint_dir / LOSSES_NAME
    if is_main:
        _truncate_log(losses, start)
    started = time.monotonic()
    metrics: dict[str, float] = {}
    stopped_by = "max_steps"
    step = start
    with _progress(stage.name, start, budget.max_steps, is_main) as progress, interruption.deferred() as stop:
        while step < budget.max_steps:
            metrics = stage.train_step(step)
            step += 1
            killpoints.reached(f"step:{stage.name}")
            elapsed = time.monotonic() - started
            out_of_time = budget.max_time_s is not None and dist.any(elapsed >= budget.max_time_s)
            if is_main:
                _append_log(losses, {"step": step, "time_s": round(elapsed, 3), **metrics})
                progress(step, metrics)
                if step % budget.log_every == 0 or step == budget.max_steps:
                    rate = (step - start) / max(elapsed, 1e-9)
                    eta = (budget.max_steps - step) / max(rate, 1e-9)
                    log.info("%s step %d/%d %s (%.2f it/s, ETA %s)", stage.name, step, budget.max_steps,
                             _format(metrics), rate, _duration(eta))
            # A signal reaches the ranks at different steps: agreed on here, every rank stops after this one.
            stopping = dist.any(stop.requested)
            if is_main and (step % budget.checkpoint_every == 0 or step == budget.max_steps or out_of_time
                            or stopping):
                save_checkpoint(checkpoint, {"step": step, "stage": stage.state_dict()})
            if stopping:
                raise stop.error(f"{stage.name} saved a checkpoint at step {step} ({checkpoint})")
            if out_of_time and step < budget.max_steps:
                stopped_by = "max_time"
                log.warning("%s: wall-clock budget of %.0f s reached at step %d", stage.name, budget.max_time_s, step)
                break
    return StageResult(step, stopped_by, time.monotonic() - started, metrics)


def optimizer_step(
    loss: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    parameters: Iterable[torch.nn.Parameter],
    scaler: torch.amp.GradScaler | None = None,
    clip_norm: float | None = 1.0,
    name: str = "loss",
) -> bool:
    """Zero, backward, unscale, clip, step: one optimisation step from one loss (no accumulation)."""
    optimizer.zero_grad(set_to_none=True)
    backward(loss, scaler, name)
    return apply_gradients(optimizer, parameters, scaler, clip_norm, name)


def backward(loss: torch.Tensor, scaler: torch.amp.GradScaler | None = None, name: str = "loss") -> None:
    """Accumulate the gradient of ``loss``. A non-finite loss is still back-propagated, so that every
    DDP rank takes part in the same gradient reduction; its NaN gradient makes :func:`apply_gradients`
    skip the step on every rank alike."""
    if not torch.isfinite(loss.detach()).all():
        log.warning("skipped an optimiser step: %s is %s", name, loss.detach().float().cpu().tolist())
    (scaler.scale(loss) if scaler is not None else loss).backward()


LR_SCHEDULES = ("constant", "cosine")


def learning_rate_at(step: int, base: float, max_steps: int, schedule: str) -> float:
    """The learning rate of optimiser step ``step`` (0-based): ``base``, or a cosine decay from it to
    0 over ``max_steps``. A function of the step alone, so a resumed run continues the same curve."""
    if schedule == "constant":
        return base
    if schedule != "cosine":
        raise ValueError(f"learning-rate schedule must be one of {LR_SCHEDULES}, got {schedule!r}")
    progress = min(max(step, 0) / max(max_steps, 1), 1.0)
    return base * 0.5 * (1.0 + math.cos(math.pi * progress))


def set_learning_rate(optimizer: torch.optim.Optimizer, value: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = value


def apply_gradients(
    optimizer: torch.optim.Optimizer,
    parameters: Iterable[torch.nn.Parameter],
    scaler: torch.amp.GradScaler | None = None,
    clip_norm: float | None = 1.0,
    name: str = "loss",
) -> bool:
    """Unscale, clip, step. A non-finite gradient skips the step (and says so) instead of corrupting
    the weights; returns whether the step was taken. Gradients are identical on every rank after DDP's
    reduction, so every rank takes the same decision."""
    if scaler is not None:
        scaler.unscale_(optimizer)
    params = [p for p in parameters if p.grad is not None]
    norm = torch.nn.utils.clip_grad_norm_(params, clip_norm if clip_norm else math.inf)
    if not torch.isfinite(norm):
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.update()
        log.warning("skipped an optimiser step: non-finite gradient norm for %s", name)
        return False
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    return True


@dataclass(frozen=True)
class MicroBatch:
    """One micro-step of an optimiser step, as this rank sees it."""

    items: list[tuple[int, int]]  # this rank's (epoch, item) pairs
    size: int  # items of the whole micro-batch, over all ranks: random draws are made for this many
    shard: slice  # this rank's part of the whole micro-batch
    index: int
    count: int  # micro-steps in the optimiser step: each micro-loss is divided by it

    @property
    def last(self) -> bool:
        return self.index == self.count - 1


def micro_batches(step: int, batch_size: int, accumulation_steps: int, n_items: int, seed: int,
                  dist: Distributed = SINGLE) -> list[MicroBatch]:
    """Split the step's global batch (``batch_items``) into micro-batches, and each into rank shards.

    ``batch_size`` is the effective batch of one optimiser step whatever the number of processes, so
    a run's data order (and, up to floating-point summation order, its result) does not depend on it.
    """
    if accumulation_steps < 1 or batch_size % accumulation_steps:
        raise UsageError(f"batch_size {batch_size} is not a multiple of accumulation_steps {accumulation_steps}")
    items = batch_items(step, batch_size, n_items, seed)
    size = batch_size // accumulation_steps
    shard = dist.shard(size)
    return [MicroBatch(items[m * size:(m + 1) * size][shard], size, shard, m, accumulation_steps)
            for m in range(accumulation_steps)]


def sync_gradients(modules: Iterable[torch.nn.Module], sync: bool) -> contextlib.AbstractContextManager:
    """DDP's ``no_sync`` on every wrapped module unless ``sync``: accumulate locally on the non-final
    micro-steps, reduce once on the last (forward and backward must both run inside)."""
    stack = contextlib.ExitStack()
    if not sync:
        for module in modules:
            if hasattr(module, "no_sync"):
                stack.enter_context(module.no_sync())
    return stack


def add_metrics(totals: dict[str, float], metrics: Mapping[str, float], weight: float) -> None:
    """Running weighted sum of per-micro-step metrics (their mean over the step, with weight 1/count)."""
    for name, value in metrics.items():
        totals[name] = totals.get(name, 0.0) + weight * value


def autocast(device: str, precision: str = "auto") -> contextlib.AbstractContextManager:
    """bf16 autocast where supported on CUDA, fp16 otherwise on CUDA; full precision on CPU."""
    dtype = amp_dtype(device, precision)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type="cuda", dtype=dtype)


def make_scaler(device: str, precision: str = "auto") -> torch.amp.GradScaler | None:
    """A grad scaler only for fp16 (bf16 has fp32's range)."""
    return torch.amp.GradScaler("cuda") if amp_dtype(device, precision) == torch.float16 else None


def batch_items(step: int, batch_size: int, n_items: int, seed: int) -> list[tuple[int, int]]:
    """(epoch, item) pairs of a step's batch: epochs of seeded permutations, a pure function of the
    step so a resumed run draws exactly the batches the interrupted one would have drawn."""
    items = []
    for position in range(step * batch_size, (step + 1) * batch_size):
        epoch, offset = divmod(position, n_items)
        order = torch.randperm(n_items, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
        items.append((epoch, int(order[offset])))
    return items


def batch_indices(step: int, batch_size: int, n_items: int, seed: int) -> list[int]:
    return [index for _, index in batch_items(step, batch_size, n_items, seed)]


def load_batch(dataset: Any, step: int, batch_size: int, seed: int, device: str) -> dict[str, torch.Tensor]:
    """Stack the step's items (each drawn with its epoch's augmentation) into device tensors."""
    return load_items(dataset, batch_items(step, batch_size, len(dataset), seed), device)


def load_items(dataset: Any, items: Iterable[tuple[int, int]], device: str) -> dict[str, torch.Tensor]:
    """Stack the given (epoch, item) pairs, each drawn with its epoch's augmentation, into device tensors."""
    tensors: dict[str, list[torch.Tensor]] = {}
    for epoch, index in items:
        dataset.set_epoch(epoch)
        item = dataset[index]
        for name, value in item.items():
            if isinstance(value, torch.Tensor):
                tensors.setdefault(name, []).append(value)
    return {name: torch.stack(values).to(device) for name, values in tensors.items()}


def _truncate_log(path: Path, step: int) -> None:
    """On resume, drop log lines of steps the checkpoint does not contain (they will be redone)."""
    if not path.is_file():
        return
    kept = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
    path.write_text("".join(line + "\n" for line in kept))


def _append_log(path: Path, entry: Mapping[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as handle:
        handle.write(json.dumps(entry) + "\n")


@contextlib.contextmanager
def _progress(name: str, start: int, total: int, is_main: bool) -> Iterator[Any]:
    """A tqdm bar on a terminal (:func:`bids_app.runlog.bar_stream`); elsewhere (clusters, CI, ``-q``)
    the periodic log lines are the progress."""
    stream = runlog.bar_stream() if is_main else None
    if stream is None:
        yield lambda step, metrics: None
        return
    from tqdm import tqdm

    bar = tqdm(total=total, initial=start, desc=name, unit="step", file=stream, dynamic_ncols=True)

    def update(step: int, metrics: Mapping[str, float]) -> None:
        bar.n = step
        bar.set_postfix({k: f"{v:.4g}" for k, v in list(metrics.items())[:3]}, refresh=True)

    try:
        yield update
    finally:
        bar.close()


def _format(metrics: Mapping[str, float]) -> str:
    return " ".join(f"{k}={v:.4g}" for k, v in metrics.items())


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"
