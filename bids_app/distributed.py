"""Data-parallel group training under ``torchrun``: which process this is, and the collectives the stages need.

``torchrun --nproc_per_node=N run.py bids_dir out group`` starts N copies of the app and sets ``RANK``,
``LOCAL_RANK``, ``WORLD_SIZE``, ``LOCAL_WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT``; as in nanoGPT's
``train.py`` those variables alone select the rank and the device, and ``is_main`` gates every write.
A plain ``python run.py`` has none of them and gets :data:`SINGLE`, on which every collective is a no-op,
so the stages have one code path.

Conventions the stages rely on (they make a run independent of the number of processes):

* ``batch_size`` is the *global* batch of one optimiser step. Its items are a pure function of the seed and
  the step (:func:`bids_app.training.loop.batch_items`); each micro-step's items are cut into contiguous
  per-rank shards (:meth:`Distributed.shard`), so rank order = batch order.
* Every random draw is made for the whole micro-batch with a generator whose state is the same on every
  rank, and each rank keeps its shard of it. Generators therefore stay identical across ranks and the
  checkpointed generator state does not depend on the world size.
* Parameters, optimiser states, the EMA and the VQ-GAN codebook are identical on every rank after each
  step (DDP averages gradients; codebook statistics are all-reduced); checkpoints hold the unwrapped
  module, so a run resumes with any number of processes that divides the batch.
"""
from __future__ import annotations

import datetime as dt
import logging
import os
from dataclasses import dataclass
from typing import Any, Mapping, TypeVar

import torch
from torch import nn

from bids_app.errors import UsageError

log = logging.getLogger(__name__)

T = TypeVar("T")

#: Generous: non-main ranks wait in collectives while rank 0 writes checkpoints, figures and weights.
#: A failed rank never leaves the others waiting this long: torchrun stops every worker when one fails.
COLLECTIVE_TIMEOUT = dt.timedelta(hours=2)


@dataclass(frozen=True)
class Distributed:
    """This process's place in the job; the single-process default makes every method a no-op."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    local_world_size: int = 1
    backend: str | None = None

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        """Wait until every rank gets here (e.g. rank 0 has written what the others read next)."""
        if self.enabled:
            torch.distributed.barrier()

    def broadcast_object(self, obj: T) -> T:
        """Rank 0's ``obj`` on every rank (pickled: use for small, trusted values only)."""
        if not self.enabled:
            return obj
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=0, device=self._object_device())
        return box[0]

    def all_reduce_sum_(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum ``tensor`` over the ranks, in place; returns it."""
        if self.enabled:
            torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.SUM)
        return tensor

    def all_gather_cat(self, tensor: torch.Tensor) -> torch.Tensor:
        """Every rank's ``tensor`` (same shape on all ranks) concatenated along dim 0, in rank order."""
        if not self.enabled:
            return tensor
        parts = [torch.empty_like(tensor) for _ in range(self.world_size)]
        torch.distributed.all_gather(parts, tensor.contiguous())
        return torch.cat(parts)

    def any(self, flag: bool, device: str = "cpu") -> bool:
        """Whether ``flag`` is true on some rank: decisions that must be the same everywhere (the clock)."""
        if not self.enabled:
            return flag
        value = torch.tensor([1.0 if flag else 0.0], device=self._tensor_device(device))
        torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MAX)
        return bool(value.item() > 0)

    def mean_metrics(self, metrics: Mapping[str, float], device: str = "cpu") -> dict[str, float]:
        """Each metric averaged over the ranks (every rank must pass the same keys, in the same order)."""
        if not self.enabled or not metrics:
            return dict(metrics)
        values = torch.tensor(list(metrics.values()), dtype=torch.float64, device=self._tensor_device(device))
        self.all_reduce_sum_(values)
        return {name: float(value) / self.world_size for name, value in zip(metrics, values.tolist())}

    def shard(self, n_items: int) -> slice:
        """This rank's contiguous part of a micro-batch of ``n_items`` (which the world size divides)."""
        if n_items % self.world_size:
            raise UsageError(f"a micro-batch of {n_items} item(s) cannot be split over {self.world_size} processes: "
                             "make batch_size / accumulation_steps a multiple of the number of processes")
        size = n_items // self.world_size
        return slice(self.rank * size, (self.rank + 1) * size)

    def wrap(self, module: nn.Module) -> nn.Module:
        """``module`` in DistributedDataParallel when distributed, else itself.

        ``forward_sync_buffers=False``: buffers that change in training (the VQ-GAN codebook) are kept
        identical by the stage itself (all-reduced statistics), not overwritten by rank 0's at each
        forward; they are still copied from rank 0 once, at construction, which changes nothing as
        every rank builds the same module from the same seed (or checkpoint).
        """
        if not self.enabled:
            return module
        from torch.nn.parallel import DistributedDataParallel

        device = next(module.parameters()).device
        ids = [device.index] if device.type == "cuda" else None
        return DistributedDataParallel(module, device_ids=ids, forward_sync_buffers=False)

    def _tensor_device(self, device: str) -> torch.device:
        return torch.device(device) if self.backend == "nccl" else torch.device("cpu")

    def _object_device(self) -> torch.device | None:
        return torch.device("cuda", torch.cuda.current_device()) if self.backend == "nccl" else None


SINGLE = Distributed()


def unwrap(module: nn.Module) -> nn.Module:
    """The module inside a DDP wrapper (for checkpoints, EMA, evaluation and figures)."""
    return getattr(module, "module", module)


def from_environment(environ: Mapping[str, str] | None = None) -> Distributed:
    """The ranks torchrun put in the environment; :data:`SINGLE` outside torchrun (or with one process)."""
    env = os.environ if environ is None else environ
    try:
        world = int(env.get("WORLD_SIZE", "1"))
        rank = int(env.get("RANK", "0"))
        local_rank = int(env.get("LOCAL_RANK", "0"))
        local_world = int(env.get("LOCAL_WORLD_SIZE", str(world)))
    except ValueError as exc:
        raise UsageError(f"malformed torchrun environment (RANK/LOCAL_RANK/WORLD_SIZE): {exc}") from None
    if world <= 1:
        return SINGLE
    if not 0 <= rank < world or not 0 <= local_rank < local_world:
        raise UsageError(f"inconsistent torchrun environment: RANK={rank}, LOCAL_RANK={local_rank}, "
                         f"WORLD_SIZE={world}, LOCAL_WORLD_SIZE={local_world}")
    return Distributed(rank, local_rank, world, local_world)


def distributed_device(context: Distributed, device: str) -> str:
    """One GPU per process: ``cuda:LOCAL_RANK`` under torchrun (the index given to ``--device`` is ignored)."""
    if not context.enabled or not device.startswith("cuda"):
        return device
    count = torch.cuda.device_count()
    if context.local_rank >= count:
        raise UsageError(f"torchrun started {context.local_world_size} processes on this node but only {count} "
                         "GPU(s) are visible: use --nproc_per_node at most the number of GPUs")
    if device not in ("cuda", f"cuda:{context.local_rank}"):
        log.warning("--device %s ignored under torchrun: rank %d uses cuda:%d", device, context.rank, context.local_rank)
    return f"cuda:{context.local_rank}"


def start(context: Distributed, device: str) -> Distributed:
    """Join the process group: ``nccl`` between GPUs, ``gloo`` on CPU. Returns the context with its backend."""
    if not context.enabled:
        return context
    backend = "nccl" if device.startswith("cuda") else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(torch.device(device))
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group(backend=backend, timeout=COLLECTIVE_TIMEOUT)
    started = Distributed(context.rank, context.local_rank, context.world_size, context.local_world_size, backend)
    log.info("distributed: rank %d of %d (local rank %d), backend %s, device %s",
             started.rank, started.world_size, started.local_rank, backend, device)
    return started


def stop(context: Distributed) -> None:
    if context.enabled and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def describe(context: Distributed) -> dict[str, Any]:
    """For the run record."""
    return {"world_size": context.world_size, "backend": context.backend or "none"}
