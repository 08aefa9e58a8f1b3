"""BIDS URIs for the input files our outputs name, and the ``DatasetLinks`` that resolve them.

No output file holds a host path. An input file is named ``bids:<dataset>:<path in that dataset>``
(``bids:raw:sub-01/anat/sub-01_T2w.nii.gz``, ``bids:labels:sub-01/anat/sub-01_T2w_label-SC_seg.nii.gz``),
and ``DatasetLinks`` in the output's ``dataset_description.json`` maps each ``<dataset>`` to its
location *relative to the output dataset* (``../..`` for a raw dataset that holds the output under
``derivatives/``): a relative reference is a valid URI, and it names no host path. Each linked
dataset is listed in ``SourceDatasets`` too, with its DOI when its own description gives one.

The raw dataset is always ``raw``. Another input dataset (the cord masks' derivative dataset) is
linked under its folder name the first time one of its files is named (:func:`bids_uri`), under a
lock, so that concurrent jobs writing into one output dataset add links without losing any.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
from collections.abc import Iterator, Mapping
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import unquote, urlparse

from bids_app.io import atomic_write_bytes, exclusive_lock, json_bytes

RAW_LINK = "raw"  # DatasetLinks key of the raw dataset, used in every bids:raw:... URI
DESCRIPTION = "dataset_description.json"
_LOCK = ("logs", ".dataset_description.lock")
_NAME_CHARS = re.compile(r"[^A-Za-z0-9_-]")


@contextlib.contextmanager
def description_lock(output_dir: str | Path) -> Iterator[None]:
    """Hold the lock of the output's ``dataset_description.json`` for a read-then-write of it."""
    with exclusive_lock(Path(output_dir).joinpath(*_LOCK)):
        yield


def read_description(output_dir: str | Path) -> dict[str, Any]:
    """The output's ``dataset_description.json`` as a dict ({} when absent or not a JSON object)."""
    return input_description(output_dir)


def link_target(root: str | Path, output_dir: str | Path) -> str:
    """Where ``root`` lies, relative to the output dataset (POSIX form, e.g. ``../..``)."""
    return PurePosixPath(os.path.relpath(Path(root).resolve(), Path(output_dir).resolve())).as_posix()


def resolve_link(target: Any, output_dir: str | Path) -> Path | None:
    """The local folder a ``DatasetLinks`` value points to: a relative path (ours), or a ``file:`` URI
    (older counterseg outputs); None for a remote URL or anything else."""
    if not isinstance(target, str) or not target:
        return None
    if target.startswith("file:"):
        return Path(unquote(urlparse(target).path))
    if re.match(r"^[A-Za-z][A-Za-z0-9+.-]*:", target):
        return None  # https:, doi:, ...: not on this machine
    return (Path(output_dir).resolve() / target).resolve()


def resolve_bids_uri(uri: Any, output_dir: str | Path) -> Path | None:
    """The local file a ``bids:<dataset>:<path>`` URI of the output names (None when unknown).

    An absolute path (what counterseg 0.1 wrote instead of a URI) is returned as it is."""
    if not isinstance(uri, str) or not uri:
        return None
    if not uri.startswith("bids:"):
        return Path(uri) if Path(uri).is_absolute() else None
    parts = uri.split(":", 2)
    if len(parts) != 3:
        return None
    _, name, rel = parts
    root = resolve_link((read_description(output_dir).get("DatasetLinks") or {}).get(name), output_dir)
    return root / rel if root is not None and rel else None


def dataset_root(path: str | Path) -> Path:
    """The dataset a file belongs to: the nearest folder above it with a ``dataset_description.json``,
    else the folder holding its ``sub-*`` folder (a derivative dataset without a description).

    Symbolic links are not followed: a file of a DataLad/git-annex dataset is a link into the
    annex, and it belongs to the dataset it is linked from."""
    path = Path(os.path.abspath(path))
    for folder in path.parents:
        if (folder / DESCRIPTION).is_file():
            return folder
    for folder in path.parents:
        if folder.name.startswith("sub-"):
            return folder.parent
    raise ValueError(f"{path} is in no BIDS dataset (no dataset_description.json, no sub-* folder above it)")


def bids_uri(path: str | Path, output_dir: str | Path) -> str:
    """``bids:<dataset>:<relative path>`` for an input file, linking its dataset in ``DatasetLinks``
    (and ``SourceDatasets``) of the output's description when it is not linked yet. The path within
    the dataset is the one given (symbolic links not followed, see :func:`dataset_root`)."""
    path = Path(os.path.abspath(path))
    root = dataset_root(path)
    rel = path.relative_to(root).as_posix()
    links = read_description(output_dir).get("DatasetLinks") or {}
    name = _linked_name(links, root, output_dir)
    if name is None:
        with description_lock(output_dir):  # read again under the lock: another job may have linked it
            description = read_description(output_dir)
            links = dict(description.get("DatasetLinks") or {})
            name = _linked_name(links, root, output_dir)
            if name is None:
                name = _new_name(root, links)
                links[name] = link_target(root, output_dir)
                description["DatasetLinks"] = links
                description["SourceDatasets"] = source_datasets(links, output_dir)
                atomic_write_bytes(Path(output_dir) / DESCRIPTION, json_bytes(description))
    return f"bids:{name}:{rel}"


def _linked_name(links: Mapping[str, Any], root: Path, output_dir: str | Path) -> str | None:
    for name, target in links.items():
        linked = resolve_link(target, output_dir)
        if linked is not None and linked.resolve() == root.resolve():
            return name
    return None


def _new_name(root: Path, links: Mapping[str, Any]) -> str:
    """The dataset's folder name as a link name (letters, digits, ``_``, ``-``), unique among ``links``."""
    base = _NAME_CHARS.sub("", root.name) or "input"
    base = "input" if base == RAW_LINK else base
    name, number = base, 1
    while name in links:
        number += 1
        name = f"{base}{number}"
    return name


def source_datasets(links: Mapping[str, Any], output_dir: str | Path) -> list[dict[str, str]]:
    """``SourceDatasets``: each linked dataset's location (as linked), with its ``DatasetDOI`` if any."""
    entries = []
    for target in links.values():
        entry = {"URL": str(target)}
        root = resolve_link(target, output_dir)
        doi = input_description(root).get("DatasetDOI") if root is not None else None
        if isinstance(doi, str) and doi.strip():
            entry["DOI"] = doi.strip()
        entries.append(entry)
    return entries


def input_description(root: str | Path) -> dict[str, Any]:
    """A dataset's own ``dataset_description.json`` ({} when absent, unreadable or not an object)."""
    try:
        data = json.loads((Path(root) / DESCRIPTION).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}
