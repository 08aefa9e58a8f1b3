"""Vector quantiser with an EMA codebook, data-driven initialisation and dead-code restarts.

Why EMA rather than a learned codebook: the codebook then follows the encoder's outputs directly (a running
k-means), which is more stable than gradient updates for 3D latents with few voxels per batch. Why restarts:
with thousands of codes most of them otherwise die in the first epochs; replacing a dead code by a current
encoder output puts it back where the data is.

The codebook update is split into :meth:`VectorQuantizer._batch_statistics` (local sums) and
:meth:`VectorQuantizer._apply_ema` (the EMA step) so that a distributed trainer can all-reduce the statistics
in between (``reduce_statistics``). Initialisation and dead-code restarts draw their replacement vectors from
``gather_rows(flat)``: a distributed trainer gathers every rank's latent vectors there, and with a generator in
the same state on every rank each rank then draws the same replacements from the same rows, so codebooks stay
identical without a broadcast and equal those of one process seeing the whole batch. ``broadcast_codebook``
(called after initialisation and restarts) is the alternative for trainers whose generators differ per rank.
All hooks default to no-ops. Example for DDP (what ``bids_app.training.vqgan`` installs)::

    def all_reduce(stats):
        torch.distributed.all_reduce(stats.counts); torch.distributed.all_reduce(stats.sums)
        return stats
    quantizer.reduce_statistics = all_reduce
    quantizer.gather_rows = gather_in_rank_order

(and construct DDP with ``forward_sync_buffers=False`` so rank 0's EMA buffers do not overwrite the others').

The nearest-code search runs in chunks of ``search_chunk_voxels`` latent vectors so its memory is
``chunk x n_codes`` distances, never ``voxels x n_codes``.
"""
from __future__ import annotations

import logging
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

logger = logging.getLogger(__name__)


class QuantizerOutput(NamedTuple):
    """What one quantisation returns; a tuple so DDP and ``torch.compile`` can traverse it."""

    quantized: Tensor  # (B, D, X, Y, Z), straight-through: forward = codebook vectors, gradient -> z
    codes: Tensor  # (B, X, Y, Z) long indices into the codebook
    commitment_loss: Tensor  # scalar, commitment_weight * ||z - sg(e)||^2 (mean)
    perplexity: Tensor  # scalar, exp(entropy) of this batch's code usage; n_codes when usage is uniform
    dead_codes: Tensor  # scalar long, codes whose EMA usage is below the threshold (train: restarted now)


class CodebookStatistics(NamedTuple):
    """Per-code sums over one (local) batch, the quantities a distributed trainer all-reduces."""

    counts: Tensor  # (K,) how many latent vectors chose each code
    sums: Tensor  # (K, D) sum of the latent vectors that chose each code


def _randint(high: int, size: int, generator: torch.Generator | None, device: torch.device) -> Tensor:
    """Uniform indices in [0, high) drawn on the generator's device, returned on ``device``."""
    gen_device = generator.device if generator is not None else device
    return torch.randint(0, high, (size,), generator=generator, device=gen_device).to(device)


def _sample_rows(flat: Tensor, n: int, generator: torch.Generator | None) -> Tensor:
    """``n`` rows of ``flat``: without replacement when there are enough rows, with replacement otherwise."""
    if flat.shape[0] >= n:
        gen_device = generator.device if generator is not None else flat.device
        order = torch.randperm(flat.shape[0], generator=generator, device=gen_device)[:n]
        return flat[order.to(flat.device)]
    return flat[_randint(flat.shape[0], n, generator, flat.device)]


def nearest_codes(flat: Tensor, embedding: Tensor, chunk_voxels: int) -> Tensor:
    """Index of the nearest code for every row of ``flat`` (N, D), searched ``chunk_voxels`` rows at a time.

    Uses ``||z||^2 - 2 z.e + ||e||^2`` per chunk, so peak extra memory is ``chunk_voxels x K`` distances.
    """
    if chunk_voxels < 1:
        raise ValueError(f"chunk_voxels must be >= 1, got {chunk_voxels}")
    e_sq = embedding.pow(2).sum(dim=1)
    codes = torch.empty(flat.shape[0], dtype=torch.long, device=flat.device)
    for start in range(0, flat.shape[0], chunk_voxels):
        chunk = flat[start : start + chunk_voxels]
        codes[start : start + chunk.shape[0]] = _chunk_distances(chunk, embedding, e_sq).argmin(dim=1)
    return codes


def _chunk_distances(chunk: Tensor, embedding: Tensor, e_sq: Tensor) -> Tensor:
    """Squared distances (c, K) of one chunk to every code; a separate function so tests can watch it."""
    # addmm broadcasts ||e||^2 into its output and the ||z||^2 term is added in place: one (c, K) buffer.
    distances = torch.addmm(e_sq, chunk, embedding.t(), alpha=-2.0)
    return distances.add_(chunk.pow(2).sum(dim=1, keepdim=True))


class VectorQuantizer(nn.Module):
    """EMA vector quantiser over the channel axis of a (B, D, X, Y, Z) latent.

    Buffers (all saved in the state dict): ``embedding`` (K, D), ``cluster_size`` (K) EMA usage counts,
    ``embed_sum`` (K, D) EMA sums, ``initialised`` (bool). The codebook changes only in ``training`` mode.
    """

    def __init__(
        self,
        n_codes: int,
        embedding_dim: int,
        commitment_weight: float = 0.25,
        ema_decay: float = 0.99,
        dead_code_threshold: float = 1.0,
        search_chunk_voxels: int = 4096,
        eps: float = 1e-5,
    ) -> None:
        super().__init__()
        if n_codes < 1 or embedding_dim < 1:
            raise ValueError(f"n_codes and embedding_dim must be >= 1, got {n_codes}, {embedding_dim}")
        if not 0.0 <= ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {ema_decay}")
        if search_chunk_voxels < 1:
            raise ValueError(f"search_chunk_voxels must be >= 1, got {search_chunk_voxels}")
        self.n_codes = n_codes
        self.embedding_dim = embedding_dim
        self.commitment_weight = commitment_weight
        self.ema_decay = ema_decay
        self.dead_code_threshold = dead_code_threshold
        self.search_chunk_voxels = search_chunk_voxels
        self.eps = eps
        embedding = torch.randn(n_codes, embedding_dim)
        self.register_buffer("embedding", embedding)
        self.register_buffer("cluster_size", torch.zeros(n_codes))
        self.register_buffer("embed_sum", embedding.clone())
        self.register_buffer("initialised", torch.tensor(False))
        #: Distributed hooks (see the module docstring); plain attributes, not saved.
        self.reduce_statistics: Callable[[CodebookStatistics], CodebookStatistics] | None = None
        self.gather_rows: Callable[[Tensor], Tensor] | None = None
        self.broadcast_codebook: Callable[[VectorQuantizer], None] | None = None

    def forward(self, z: Tensor, generator: torch.Generator | None = None) -> QuantizerOutput:
        """Quantise ``z``; in training mode also initialise (first call) and update the codebook."""
        if z.dim() < 3 or z.shape[1] != self.embedding_dim:
            raise ValueError(f"expected (B, {self.embedding_dim}, ...) latent, got shape {tuple(z.shape)}")
        # The search and the EMA run in the codebook's precision, outside autocast: half-precision
        # distances pick wrong codes once codes are close together.
        with torch.autocast(device_type=z.device.type, enabled=False):
            z = z.to(self.embedding.dtype)
            flat = rearrange(z, "b d ... -> (b ...) d")
            rows = flat.detach()
            if self.training and self.gather_rows is not None:
                rows = self.gather_rows(rows)
            if self.training and not bool(self.initialised):
                self.initialise_from(rows, generator)
            with torch.no_grad():
                codes = nearest_codes(flat.detach(), self.embedding, self.search_chunk_voxels)
            quantized_flat = F.embedding(codes, self.embedding)
            stats = self._batch_statistics(flat.detach(), codes)
            if self.training and self.reduce_statistics is not None:
                stats = self.reduce_statistics(stats)  # before the perplexity: it then describes the whole batch
            perplexity = self._perplexity(stats.counts)
            if self.training:
                dead = self.update_codebook(rows, stats, generator).sum()
            else:
                dead = (self.cluster_size < self.dead_code_threshold).sum()
            quantized = rearrange(quantized_flat, "(b n) d -> b d n", b=z.shape[0]).view_as(z)
            commitment = self.commitment_weight * F.mse_loss(z, quantized.detach())
            straight_through = z + (quantized - z).detach()
        codes = codes.view(*z.shape[:1], *z.shape[2:])
        return QuantizerOutput(straight_through, codes, commitment, perplexity, dead)

    def lookup(self, codes: Tensor) -> Tensor:
        """Codebook vectors for integer ``codes`` (B, X, Y, Z) as a (B, D, X, Y, Z) latent for decoding."""
        if codes.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"codes must be integer indices, got {codes.dtype}")
        return rearrange(F.embedding(codes.long(), self.embedding), "b ... d -> b d ...")

    @torch.no_grad()
    def initialise_from(self, flat: Tensor, generator: torch.Generator | None = None) -> None:
        """Set the codebook to a random sample of latent vectors ``flat`` (N, D); called on the first batch.

        The EMA usage starts at N / K (as if usage were uniform) so that codes are not all declared dead by
        the first EMA step; ``embed_sum`` is consistent with it.
        """
        flat = flat.to(self.embedding.dtype)
        self.embedding.copy_(_sample_rows(flat, self.n_codes, generator))
        self.cluster_size.fill_(flat.shape[0] / self.n_codes)
        self.embed_sum.copy_(self.embedding * self.cluster_size.unsqueeze(1))
        self.initialised.fill_(True)
        if self.broadcast_codebook is not None:
            self.broadcast_codebook(self)
        logger.debug("codebook of %d codes initialised from %d latent vectors", self.n_codes, flat.shape[0])

    @torch.no_grad()
    def update_codebook(
        self, flat: Tensor, stats: CodebookStatistics, generator: torch.Generator | None = None
    ) -> Tensor:
        """One EMA step from this batch's statistics (already reduced over ranks), then restart the
        codes that fell out of use from the rows ``flat`` (already gathered).

        Returns the mask of codes that were dead (and have been restarted) in this step.
        """
        self._apply_ema(stats)
        return self.restart_dead_codes(flat, generator)

    @torch.no_grad()
    def _batch_statistics(self, flat: Tensor, codes: Tensor) -> CodebookStatistics:
        """Per-code counts and vector sums of one batch (local to this process)."""
        counts = torch.bincount(codes, minlength=self.n_codes).to(flat.dtype)
        sums = torch.zeros_like(self.embed_sum).index_add_(0, codes, flat)
        return CodebookStatistics(counts, sums)

    @torch.no_grad()
    def _apply_ema(self, stats: CodebookStatistics) -> None:
        """EMA of counts and sums; codes = sums / Laplace-smoothed counts (keeps empty codes finite)."""
        self.cluster_size.mul_(self.ema_decay).add_(stats.counts, alpha=1.0 - self.ema_decay)
        self.embed_sum.mul_(self.ema_decay).add_(stats.sums, alpha=1.0 - self.ema_decay)
        total = self.cluster_size.sum()
        smoothed = (self.cluster_size + self.eps) / (total + self.n_codes * self.eps) * total
        self.embedding.copy_(self.embed_sum / smoothed.unsqueeze(1))

    @torch.no_grad()
    def restart_dead_codes(self, flat: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Replace codes whose EMA usage is below the threshold by random rows of ``flat``; returns the mask.

        A restarted code gets usage = threshold, so it survives only if the data keeps choosing it. Written
        with ``torch.where`` over a full sample of K rows so that no host sync is needed to count the dead.
        """
        dead = self.cluster_size < self.dead_code_threshold
        replacement = _sample_rows(flat.to(self.embedding.dtype), self.n_codes, generator)
        mask = dead.unsqueeze(1)
        self.embedding.copy_(torch.where(mask, replacement, self.embedding))
        self.embed_sum.copy_(torch.where(mask, replacement * self.dead_code_threshold, self.embed_sum))
        self.cluster_size.masked_fill_(dead, self.dead_code_threshold)
        if self.broadcast_codebook is not None:
            self.broadcast_codebook(self)
        if logger.isEnabledFor(logging.DEBUG):
            logger.debug("restarted %d dead codes", int(dead.sum()))
        return dead

    @staticmethod
    def _perplexity(counts: Tensor) -> Tensor:
        """exp(entropy) of the code-usage distribution of one batch."""
        p = counts / counts.sum().clamp_min(1)
        return torch.exp(-(p * torch.log(p.clamp_min(1e-12))).sum())

    def extra_repr(self) -> str:
        return (
            f"n_codes={self.n_codes}, embedding_dim={self.embedding_dim}, decay={self.ema_decay}, "
            f"dead_code_threshold={self.dead_code_threshold}, search_chunk_voxels={self.search_chunk_voxels}"
        )
