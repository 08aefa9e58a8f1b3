"""counterseg: spinal-cord lesion segmentation by counterfactual latent diffusion, as a BIDS App."""
from __future__ import annotations

from pathlib import Path

_VERSION_FILE = Path(__file__).resolve().parent.parent / "version"


def read_version() -> str:
    """The single source of the version is the top-level ``version`` file (set at image build time)."""
    try:
        return _VERSION_FILE.read_text(encoding="utf-8").strip() or "0+unknown"
    except OSError:
        return "0+unknown"


__version__ = read_version()
