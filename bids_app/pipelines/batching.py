"""The model calls of inference, batched for speed: encode, decode, the conditioned UNet.

Every chain, window, strength and sample is independent, so inference stacks them into batches.
On CPU, channels-last 3D layouts and never a batch of one keep torch on its fast convolution
path (docs/benchmarks.md, "Counterfactual cost").
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import torch


@torch.inference_mode()
def encode(vqgan: torch.nn.Module, image: torch.Tensor, scale: float) -> torch.Tensor:
    return vqgan.quantize(vqgan.encode(image)).quantized * scale


@torch.inference_mode()
def decode(vqgan: torch.nn.Module, latent: torch.Tensor, scale: float, max_latent_voxels: int | None) -> torch.Tensor:
    """Snap the denoised latent to the codebook, then decode (tiled when a voxel budget is set)."""
    quantized = vqgan.quantize(latent / scale).quantized
    if max_latent_voxels is None:
        return vqgan.decode(quantized)
    return vqgan.decode_tiled(quantized, max_latent_voxels=max_latent_voxels)


def prepare_for_inference(*modules: torch.nn.Module | None) -> None:
    """Evaluation mode, and channels-last 3D weights on CPU (faster there, docs/benchmarks.md; on
    CUDA the layout is left alone, as it is unmeasured)."""
    for module in modules:
        if module is None:
            continue
        module.eval()
        if next(module.parameters()).device.type == "cpu":
            module.to(memory_format=torch.channels_last_3d)


def channels_last(x: torch.Tensor) -> torch.Tensor:
    """Channels-last for 5-D CPU tensors (to match :func:`prepare_for_inference`)."""
    return x.contiguous(memory_format=torch.channels_last_3d) if x.device.type == "cpu" and x.dim() == 5 else x


#: torch's CPU convolution takes oneDNN for a batch of one only when N*C*D*H exceeds this (any
#: 3x3x3 kernel; the last axis is not counted); below it, the reference ``slow_conv3d``.
SLOW_CONV_LIMIT = 20480


def avoid_single_batch(fn: Callable[..., torch.Tensor], x: torch.Tensor, *rest: Any, width: int) -> torch.Tensor:
    """``fn(x, *rest)``; a single CPU volume whose main layers would take torch's slow path runs as
    two copies (the first kept).

    ``width`` is C*D*H of the model's full-resolution layers for one sample (where its cost is): a
    model past the limit (the default VQ-GAN) would only pay twice. Per-sample tensors in ``rest``
    (timesteps, lists of adapter features) are doubled alike.
    """
    if x.device.type != "cpu" or x.shape[0] != 1 or width > SLOW_CONV_LIMIT:
        return fn(x, *rest)
    twice = [torch.cat([a, a]) if isinstance(a, torch.Tensor) and a.dim() and a.shape[0] == 1 else a for a in rest]
    twice = [[torch.cat([f, f]) for f in a] if isinstance(a, list) else a for a in twice]
    return fn(torch.cat([x, x]), *twice)[:1]


def batched(tensors: Sequence[torch.Tensor], size: int, fn: Callable[[torch.Tensor], torch.Tensor],
            width: Callable[[torch.Tensor], int]) -> list[torch.Tensor]:
    """``fn`` over the tensors (batch 1 each) in concatenated batches of at most ``size``; split back.
    ``width(x)``: see :func:`avoid_single_batch`."""
    results: list[torch.Tensor] = []
    for first in range(0, len(tensors), size):
        group = torch.cat(list(tensors[first:first + size]))
        results.extend(avoid_single_batch(fn, group, width=width(group)).split(1))
    return results


def full_resolution_width(vqgan: torch.nn.Module, image_shape: Sequence[int]) -> int:
    return int(vqgan.config.n_hiddens * image_shape[0] * image_shape[1])


def conditioned_model(unet: torch.nn.Module, dtype: torch.dtype | None) -> Callable:
    """The batched model function of :func:`denoise_chains`: conditions are per-chain adapter
    features (a list per encoder level, or None), concatenated along the batch."""
    def model_fn(z: torch.Tensor, t: torch.Tensor, conditions: Sequence[Any]) -> torch.Tensor:
        features = None
        if any(c is not None for c in conditions):
            template = next(c for c in conditions if c is not None)
            # A chain without features adds zeros: exactly "no adapter" (the UNet adds them).
            filled = [c if c is not None else [torch.zeros_like(f) for f in template] for c in conditions]
            features = [channels_last(torch.cat([c[level] for c in filled])) for level in range(len(template))]
        with torch.autocast(z.device.type, dtype=dtype, enabled=dtype is not None):
            width = int(unet.config.base_channels * z.shape[2] * z.shape[3])
            output = (avoid_single_batch(unet, channels_last(z), t, features, width=width) if features is not None
                      else avoid_single_batch(unet, channels_last(z), t, width=width))
        return output.float()
    return model_fn
