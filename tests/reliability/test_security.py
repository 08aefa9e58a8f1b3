"""Security: no network at run time, weights-only loading, nothing written outside the output and
work folders, and no path from the dataset or a filter file reaching a written path."""
from __future__ import annotations

import ast
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

import bids_app
from tests.conftest import participant_args, tree_digest

from tests.reliability.catalogue import case
from tests.reliability.harness import FAST, assert_no_partial_output, assert_one_error_line, run_cli

#: Audit events a run may raise, recorded while a test watches (audit hooks cannot be removed).
_WATCH: dict[str, list] = {}
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC


def _audit(event: str, args: tuple) -> None:
    if not _WATCH:
        return
    if event.startswith("socket."):
        _WATCH["sockets"].append((event, args[:2]))
    elif event == "open":
        path, mode, flags = args
        writing = any(c in mode for c in "wax+") if isinstance(mode, str) else bool(flags & _WRITE_FLAGS)
        if writing and isinstance(path, (str, bytes, os.PathLike)):
            _WATCH["writes"].append(os.fsdecode(path))
    elif event in ("os.rename", "os.remove", "os.rmdir", "os.mkdir", "os.truncate", "os.symlink", "os.chmod"):
        target = args[1] if event == "os.rename" else args[0]
        if isinstance(target, (str, bytes, os.PathLike)):
            _WATCH["writes"].append(os.fsdecode(target))
    elif event == "subprocess.Popen":
        _WATCH["commands"].append(os.fsdecode(args[0]))


sys.addaudithook(_audit)


def _refuse(*args, **kwargs):
    raise OSError("network access attempted during a counterseg run")


def test_no_network_and_no_write_outside_output(simple_dataset: Path, tiny_model: Path, tmp_path: Path,
                                                monkeypatch, caplog) -> None:
    """A whole participant run (BIDS validation included) with every socket refused, watched by an
    audit hook: no socket is even created, every write lands in the output folder."""
    for name in ("__init__", "connect", "connect_ex"):
        monkeypatch.setattr(socket.socket, name, _refuse)
    monkeypatch.setattr(socket, "getaddrinfo", _refuse)
    monkeypatch.setattr(socket, "create_connection", _refuse)
    for var in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy", "ALL_PROXY"):
        monkeypatch.setenv(var, "http://127.0.0.1:9")  # a child reaching out would fail loudly
    out = tmp_path / "out"
    before = tree_digest(simple_dataset)
    _WATCH.update(sockets=[], writes=[], commands=[])
    try:
        code = run_cli(simple_dataset, out, "participant", "--participant-label", "01", *participant_args(tiny_model))
    finally:
        watched = dict(_WATCH)
        _WATCH.clear()
    assert code == case("no-network").exit_code, caplog.text[-2000:]
    assert case("no-network").message in caplog.text
    assert watched["sockets"] == []
    outside = sorted({w for w in watched["writes"]
                      if w != os.devnull and not Path(os.path.abspath(w)).is_relative_to(out)})
    assert outside == [], f"written outside {out}: {outside}"
    assert [Path(c).name for c in watched["commands"]] == ["bids-validator-deno"]
    assert tree_digest(simple_dataset) == before
    assert_no_partial_output(out)


def test_every_torch_load_is_weights_only() -> None:
    """The only way a checkpoint could run code is a torch.load without weights_only=True."""
    calls = []
    for path in Path(bids_app.__file__).parent.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "load" and \
                    getattr(node.func.value, "id", None) == "torch":
                safe = any(k.arg == "weights_only" and getattr(k.value, "value", None) is True for k in node.keywords)
                calls.append((path.name, node.lineno, safe))
    assert calls, "the scan found no torch.load call: it is looking in the wrong place"
    assert all(safe for *_, safe in calls), calls


@pytest.mark.parametrize("label", ["../sub-01", "sub-01/../../etc", "01/02"])
def test_path_in_a_participant_label_is_refused(simple_dataset: Path, tmp_path: Path, label: str, caplog) -> None:
    labels = tmp_path / "labels.txt"
    labels.write_text(f"{label}\n")
    for value in (label, f"@{labels}"):
        caplog.clear()
        assert run_cli(simple_dataset, tmp_path / "out", "participant", "--participant-label", value, *FAST) == \
            case("label-path").exit_code
        assert_one_error_line(caplog, "invalid sub label", "BIDS labels are alphanumeric")
    if label == "../sub-01":
        assert all(part in caplog.text for part in case("label-path").fragments())
    assert not (tmp_path / "out").exists() and not (simple_dataset.parent / "sub-01").exists()


@pytest.mark.parametrize("value", ["../../outside", "/etc", ["01", "a/b"], "a\\b"])
def test_path_in_a_filter_value_is_refused(simple_dataset: Path, tmp_path: Path, value, caplog) -> None:
    filters = tmp_path / "filters.json"
    filters.write_text(json.dumps({"image": {"acquisition": value}}))
    code = run_cli(simple_dataset, tmp_path / "out", "participant", "--bids-filter-file", filters, *FAST)
    assert code == case("filter-path").exit_code
    assert_one_error_line(caplog, *case("filter-path").fragments(), str(filters))


def _can_isolate() -> bool:
    if shutil.which("unshare") is None:
        return False
    return subprocess.run(["unshare", "-rmn", "true"], capture_output=True).returncode == 0


@pytest.mark.skipif(not _can_isolate(), reason="unshare -rmn (user, mount and network namespaces) not permitted here")
def test_read_only_dataset_without_network_in_a_fresh_process(simple_dataset: Path, tiny_model: Path,
                                                              tmp_path: Path) -> None:
    """The real thing, where the kernel allows it: a fresh process in an empty network namespace,
    the dataset bind-mounted read-only (root cannot write to it either), validation on."""
    data = tmp_path / "bids"
    shutil.copytree(simple_dataset, data)
    before = tree_digest(data)
    out = tmp_path / "out"
    run = [sys.executable, str(Path(bids_app.__file__).parent.parent / "run.py"), str(data), str(out), "participant",
           "--participant-label", "01", "--omp-nthreads", "1", *participant_args(tiny_model)]
    script = f"mount --bind -o ro {data} {data} && mount -o remount,bind,ro {data} && touch {data}/x 2>/dev/null; " \
             f"test ! -e {data}/x && exec {' '.join(run)}"
    proc = subprocess.run(["unshare", "-rmn", "sh", "-c", script], capture_output=True, text=True)
    assert proc.returncode == case("read-only-bids-dir").exit_code, proc.stderr[-3000:]
    assert "participant level finished" in proc.stderr
    assert tree_digest(data) == before
    assert_no_partial_output(out)
    assert (out / "sub-01" / "anat" / "sub-01_label-lesion_mask.nii.gz").is_file()
