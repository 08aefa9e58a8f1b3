"""Exponential moving average of a model's weights: the weights diffusion models sample with."""
from __future__ import annotations

import copy

import torch
from torch import nn


class EMA:
    """A frozen shadow copy updated as ``shadow = decay * shadow + (1 - decay) * weights``."""

    def __init__(self, model: nn.Module, decay: float = 0.999) -> None:
        if not 0 <= decay < 1:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.shadow = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        for ema_param, param in zip(self.shadow.parameters(), model.parameters()):
            ema_param.lerp_(param.detach(), 1 - self.decay)
        for ema_buffer, buffer in zip(self.shadow.buffers(), model.buffers()):
            ema_buffer.copy_(buffer)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.shadow.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.shadow.load_state_dict(state)
