"""counterseg: spinal-cord lesion segmentation by counterfactual latent diffusion, as a BIDS App."""
from __future__ import annotations

from pathlib import Path

_SOURCE_TREE = Path(__file__).resolve().parent.parent
_VERSION_FILE = _SOURCE_TREE / "version"


def read_version() -> str:
    """The single source of the version is the top-level ``version`` file. Run from a source tree
    (a clone, ``pip install -e .``) it is read directly; an installed copy (``pip install .``, the
    image) knows it from its package metadata, which the build took from that file."""
    if (_SOURCE_TREE / "pyproject.toml").is_file():
        try:
            return _VERSION_FILE.read_text(encoding="utf-8").strip() or "0+unknown"
        except OSError:
            return "0+unknown"
    from importlib import metadata

    try:
        return metadata.version("counterseg")
    except metadata.PackageNotFoundError:
        return "0+unknown"


__version__ = read_version()
