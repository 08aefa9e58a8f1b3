"""Optional perceptual loss from a feature extractor the user supplies as a local file.

Pretrained perceptual networks are never downloaded. A user who has one exports it as TorchScript
(``torch.jit.script(model).save(path)``): a module mapping a batch of 2D slices (N, 1, H, W) in
[-1, 1] to a feature tensor or a list of them. The loss is the mean L1 distance between the
features of real and reconstructed slices (the same random slices the 2D discriminator sees).
TorchScript is code: only load files you trust; the path is logged.
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.nn.functional as F

from bids_app.errors import BadDataError

log = logging.getLogger(__name__)


class PerceptualLoss(torch.nn.Module):
    def __init__(self, path: Path, device: str) -> None:
        super().__init__()
        try:
            self.network = torch.jit.load(str(path), map_location=device).eval()
        except (RuntimeError, ValueError, OSError) as exc:
            raise BadDataError(f"{path}: not a TorchScript feature extractor ({exc})") from exc
        for parameter in self.network.parameters():
            parameter.requires_grad_(False)
        log.info("vqgan: perceptual loss on, features from %s", path)

    def forward(self, real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
        real_features = _as_list(self.network(real))
        fake_features = _as_list(self.network(fake))
        losses = [F.l1_loss(f, r.detach()) for r, f in zip(real_features, fake_features)]
        return torch.stack(losses).mean()


def _as_list(features: torch.Tensor | list[torch.Tensor] | tuple[torch.Tensor, ...]) -> list[torch.Tensor]:
    return [features] if isinstance(features, torch.Tensor) else list(features)
