"""Precision rules shared by training and inference."""
from __future__ import annotations

import pytest
import torch

from bids_app.compute import amp_dtype


@pytest.mark.parametrize("precision", ["auto", "fp32", "bf16", "fp16"])
def test_cpu_always_computes_in_fp32(precision: str) -> None:
    assert amp_dtype("cpu", precision) is None


def test_cuda_precisions(monkeypatch: pytest.MonkeyPatch) -> None:
    assert amp_dtype("cuda", "fp32") is None
    assert amp_dtype("cuda:1", "fp16") == torch.float16
    assert amp_dtype("cuda", "bf16") == torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert amp_dtype("cuda", "auto") == torch.float16, "no bf16 on this GPU: fp16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert amp_dtype("cuda", "auto") == torch.bfloat16
