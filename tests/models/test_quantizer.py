"""EMA vector quantiser: chunked search, codebook init/EMA/restarts, gradients, usage statistics."""
from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from bids_app.models import quantizer as quantizer_module
from bids_app.models.quantizer import CodebookStatistics, VectorQuantizer, nearest_codes

REPO_ROOT = Path(__file__).resolve().parents[2]


def brute_force_codes(flat: torch.Tensor, embedding: torch.Tensor) -> torch.Tensor:
    """Reference: explicit differences to every code at once."""
    return ((flat[:, None, :] - embedding[None, :, :]) ** 2).sum(-1).argmin(dim=1)


@pytest.mark.parametrize("chunk", [1, 7, 100, 999, 5000])
def test_chunked_search_matches_brute_force(chunk: int) -> None:
    g = torch.Generator().manual_seed(0)
    flat = torch.randn(999, 6, generator=g, dtype=torch.float64)  # 999 is divisible by none of 7, 100, 5000
    embedding = torch.randn(50, 6, generator=g, dtype=torch.float64)
    assert torch.equal(nearest_codes(flat, embedding, chunk), brute_force_codes(flat, embedding))


def test_quantizer_uses_chunked_search_and_bounds_distance_matrix(monkeypatch: pytest.MonkeyPatch) -> None:
    shapes: list[tuple[int, int]] = []
    original = quantizer_module._chunk_distances

    def watching(chunk, embedding, e_sq):  # noqa: ANN001, ANN202
        out = original(chunk, embedding, e_sq)
        shapes.append(tuple(out.shape))
        return out

    monkeypatch.setattr(quantizer_module, "_chunk_distances", watching)
    vq = VectorQuantizer(n_codes=64, embedding_dim=4, search_chunk_voxels=300).eval()
    z = torch.randn(2, 4, 8, 8, 10)  # 1280 voxels -> chunks 300 x 4 + 80
    vq(z)
    assert shapes == [(300, 64)] * 4 + [(80, 64)]


def test_chunked_search_memory_does_not_grow_with_voxels_times_codes() -> None:
    """16384 codes x 32768 voxels: the full distance matrix is 2 GiB; chunks of 1024 need 64 MiB."""
    script = textwrap.dedent(
        """
        import resource, torch
        from bids_app.models.quantizer import nearest_codes
        g = torch.Generator().manual_seed(0)
        flat, emb = torch.randn(32768, 8, generator=g), torch.randn(16384, 8, generator=g)
        nearest_codes(flat[:16], emb, 1024)
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        nearest_codes(flat, emb, 1024)
        print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) // 1024)
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=True, cwd=REPO_ROOT
    )
    growth_mib = int(result.stdout.strip().splitlines()[-1])
    assert growth_mib < 400, f"peak RSS grew by {growth_mib} MiB (full matrix: 2048 MiB, one chunk: 64 MiB)"


def test_codebook_initialised_from_first_training_batch() -> None:
    vq = VectorQuantizer(n_codes=16, embedding_dim=3).train()
    z = torch.randn(1, 3, 4, 4, 4, generator=torch.Generator().manual_seed(1))
    flat = z.movedim(1, -1).reshape(-1, 3)
    vq.initialise_from(flat, torch.Generator().manual_seed(5))
    assert bool(vq.initialised)
    # every code is one of the encoder outputs, all distinct (64 >= 16 rows: sampled without replacement)
    matches = (vq.embedding[:, None, :] == flat[None, :, :]).all(-1).any(-1)
    assert bool(matches.all())
    assert torch.unique(vq.embedding, dim=0).shape[0] == 16
    again = VectorQuantizer(n_codes=16, embedding_dim=3)
    again.initialise_from(flat, torch.Generator().manual_seed(5))
    assert torch.equal(again.embedding, vq.embedding)


def test_forward_in_training_initialises_once() -> None:
    vq = VectorQuantizer(n_codes=8, embedding_dim=2).train()
    z = torch.randn(1, 2, 4, 4, 4) + 100.0  # far from the random initial codebook
    vq(z, torch.Generator().manual_seed(0))
    assert bool(vq.initialised)
    assert float(vq.embedding.mean()) > 50.0
    calls = []
    vq.initialise_from = lambda *a, **k: calls.append(1)  # type: ignore[method-assign]
    vq(z)
    assert calls == []


def test_ema_updates_only_in_training_mode() -> None:
    vq = VectorQuantizer(n_codes=8, embedding_dim=2, dead_code_threshold=0.0)
    z = torch.randn(2, 2, 4, 4, 4)
    vq.eval()
    before = {k: v.clone() for k, v in vq.state_dict().items()}
    vq(z)
    assert all(torch.equal(before[k], v) for k, v in vq.state_dict().items())
    vq.train()
    vq(z)
    vq(z + 1.0)
    assert not torch.equal(before["embedding"], vq.embedding)
    assert not torch.equal(before["cluster_size"], vq.cluster_size)


def test_ema_step_matches_closed_form() -> None:
    vq = VectorQuantizer(n_codes=2, embedding_dim=1, ema_decay=0.5, eps=0.0)
    vq.cluster_size.copy_(torch.tensor([2.0, 2.0]))
    vq.embed_sum.copy_(torch.tensor([[0.0], [8.0]]))
    vq._apply_ema(CodebookStatistics(torch.tensor([2.0, 0.0]), torch.tensor([[4.0], [0.0]])))
    assert torch.allclose(vq.cluster_size, torch.tensor([2.0, 1.0]))
    assert torch.allclose(vq.embedding, torch.tensor([[1.0], [4.0]]))  # (0.5*0 + 0.5*4) / 2, 4 / 1


def test_dead_codes_restarted_deterministically() -> None:
    def run(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        vq = VectorQuantizer(n_codes=8, embedding_dim=2, dead_code_threshold=1.0).train()
        vq.embedding.copy_(torch.arange(16.0).view(8, 2) * 100.0)
        vq.embed_sum.copy_(vq.embedding * 5.0)
        vq.cluster_size.fill_(5.0)
        vq.initialised.fill_(True)
        vq.cluster_size[3:] = 0.5  # codes 3..7 unused
        z = torch.randn(1, 2, 4, 4, 4, generator=torch.Generator().manual_seed(3))
        out = vq(z, torch.Generator().manual_seed(seed))
        return vq.embedding.clone(), out.dead_codes

    first, dead = run(0)
    again, _ = run(0)
    other, _ = run(1)
    assert int(dead) == 5
    assert torch.equal(first, again)
    assert not torch.equal(first[3:], other[3:])
    z_flat = torch.randn(1, 2, 4, 4, 4, generator=torch.Generator().manual_seed(3)).movedim(1, -1).reshape(-1, 2)
    # restarted codes are current encoder outputs; the live codes 0..2 were only EMA-updated
    assert bool((first[3:, None, :] == z_flat[None]).all(-1).any(-1).all())
    assert float(first[3:].abs().max()) < 10.0


def test_straight_through_gradient_and_commitment() -> None:
    vq = VectorQuantizer(n_codes=4, embedding_dim=2, commitment_weight=0.25).eval()
    z = torch.randn(1, 2, 2, 2, 2, requires_grad=True)
    out = vq(z)
    expected = vq.lookup(out.codes)
    assert torch.allclose(out.quantized, expected)
    assert torch.allclose(out.commitment_loss, 0.25 * ((z - expected) ** 2).mean())
    out.quantized.sum().backward()
    assert torch.allclose(z.grad, torch.ones_like(z))  # identity gradient through the quantiser


def test_each_voxel_gets_the_codebook_vector_of_its_own_code() -> None:
    """The latent's voxels are flattened and restored in the same order (the einops patterns): every voxel's
    code is the nearest to that voxel's own vector, and its quantised vector is that code's, bit for bit."""
    vq = VectorQuantizer(n_codes=16, embedding_dim=3).eval()
    z = torch.randn(2, 3, 4, 5, 6, generator=torch.Generator().manual_seed(0))
    out = vq(z)
    assert out.codes.shape == (2, 4, 5, 6) and out.quantized.shape == z.shape
    voxels = z.movedim(1, -1).reshape(-1, 3)
    assert torch.equal(out.codes.flatten(), brute_force_codes(voxels, vq.embedding))
    for b, x, y, w in [(0, 0, 0, 0), (1, 3, 2, 5), (0, 2, 4, 1)]:
        code = out.codes[b, x, y, w]
        assert torch.equal(vq.lookup(out.codes)[b, :, x, y, w], vq.embedding[code])
    assert torch.equal(vq.lookup(out.codes), vq.embedding[out.codes].movedim(-1, 1))


def test_perplexity_equals_code_count_for_uniform_usage() -> None:
    vq = VectorQuantizer(n_codes=8, embedding_dim=8).eval()
    vq.embedding.copy_(torch.eye(8) * 10.0)
    z = (torch.eye(8) * 10.0).repeat(4, 1).T.reshape(1, 8, 2, 4, 4)  # each code chosen 4 times
    out = vq(z)
    assert torch.allclose(out.perplexity, torch.tensor(8.0))
    assert torch.bincount(out.codes.flatten(), minlength=8).eq(4).all()
    single = vq(torch.zeros(1, 8, 2, 2, 2) + vq.embedding[2].view(1, 8, 1, 1, 1))
    assert torch.allclose(single.perplexity, torch.tensor(1.0))


def test_distributed_hooks_are_called() -> None:
    vq = VectorQuantizer(n_codes=4, embedding_dim=2).train()
    seen: list[str] = []

    def reduce(stats: CodebookStatistics) -> CodebookStatistics:
        seen.append("reduce")
        return CodebookStatistics(stats.counts * 2, stats.sums * 2)  # as if two identical ranks

    vq.reduce_statistics = reduce
    vq.broadcast_codebook = lambda q: seen.append("broadcast")
    vq(torch.randn(1, 2, 4, 4, 4), torch.Generator().manual_seed(0))
    assert seen == ["broadcast", "reduce", "broadcast"]  # init, EMA, restart


def test_lookup_rejects_float_codes_and_bad_latent() -> None:
    vq = VectorQuantizer(n_codes=4, embedding_dim=2)
    with pytest.raises(ValueError, match="integer"):
        vq.lookup(torch.zeros(1, 2, 2, 2))
    with pytest.raises(ValueError, match="latent"):
        vq(torch.zeros(1, 3, 2, 2, 2))
