"""Packaging: ``pip install .`` gives the ``counterseg`` command (what run.py runs) that knows its
version; pyproject.toml takes the version and the dependencies from their one source each; the
image is ``counterseg:<version>`` in every file that names it.
"""
from __future__ import annotations

import os
import re
import shutil
import site
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
VERSION = (ROOT / "version").read_text(encoding="utf-8").strip()
DOCKERFILE = (ROOT / "Dockerfile").read_text(encoding="utf-8")


def requirement_lines(path: Path) -> list[str]:
    lines = (line.split("#", 1)[0].strip() for line in path.read_text(encoding="utf-8").splitlines())
    return [line for line in lines if line]


def test_pyproject_takes_version_and_dependencies_from_their_files() -> None:
    project, dynamic = PYPROJECT["project"], PYPROJECT["tool"]["setuptools"]["dynamic"]
    assert "version" not in project and "dependencies" not in project
    assert set(project["dynamic"]) == {"version", "dependencies"}
    assert dynamic["version"] == {"file": "version"}
    assert dynamic["dependencies"] == {"file": ["requirements.txt"]}
    assert "torch==2.13.0" in requirement_lines(ROOT / "requirements.txt")


def test_the_command_is_what_run_py_runs() -> None:
    assert PYPROJECT["project"]["scripts"] == {"counterseg": "bids_app.cli:main"}
    run_py = (ROOT / "run.py").read_text(encoding="utf-8")
    assert "from bids_app.cli import main" in run_py and "sys.exit(main())" in run_py


def installed_copy(tmp_path: Path, version: str) -> Path:
    """Install a copy of the project (with ``version`` in its version file) into a new venv, as
    ``pip install .`` does but offline and without dependencies: the venv sees this interpreter's
    packages (torch, setuptools, pip) through a .pth file. Returns the venv's bin folder."""
    source = tmp_path / "source"
    source.mkdir()
    for name in ("pyproject.toml", "requirements.txt"):
        shutil.copy(ROOT / name, source / name)
    (source / "version").write_text(version + "\n", encoding="utf-8")
    shutil.copytree(ROOT / "bids_app", source / "bids_app", ignore=shutil.ignore_patterns("__pycache__"))
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=60)
    purelib = subprocess.run([str(venv / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                             check=True, capture_output=True, text=True).stdout.strip()
    Path(purelib, "outer.pth").write_text("\n".join(site.getsitepackages()) + "\n", encoding="utf-8")
    env = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PIP_NO_INPUT": "1"}
    env.pop("PYTHONPATH", None)
    proc = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", "--no-deps",
                           "--no-build-isolation", "--no-index", str(source)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return venv / "bin"


def test_pip_install_gives_a_counterseg_command_that_knows_its_version(tmp_path: Path) -> None:
    """From an installed copy (not this checkout, whose version file it cannot see): the version is
    the one its version file had when it was built."""
    bin_dir = installed_copy(tmp_path, "9.8.7")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    where = subprocess.run([str(bin_dir / "python"), "-c", "import bids_app; print(bids_app.__file__)"],
                           cwd=tmp_path, env=env, capture_output=True, text=True, check=True).stdout.strip()
    assert Path(where).is_relative_to(tmp_path / "venv"), where
    proc = subprocess.run([str(bin_dir / "counterseg"), "--version"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=60)
    assert (proc.returncode, proc.stdout.strip()) == (0, "counterseg 9.8.7"), proc.stderr
    proc = subprocess.run([str(bin_dir / "counterseg"), "no-such-dir", str(tmp_path / "out"), "group"], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 64 and "no-such-dir does not exist" in proc.stderr
    requires = subprocess.run([str(bin_dir / "python"), "-c",
                               "from importlib import metadata; print('\\n'.join(metadata.requires('counterseg')))"],
                              cwd=tmp_path, env=env, capture_output=True, text=True, check=True).stdout.split("\n")
    assert [r.replace(" ", "") for r in requires if r] == [r.replace(" ", "") for r in
                                                          requirement_lines(ROOT / "requirements.txt")]


# ----------------------------------------------------------------------------- the image


def final_stage_labels() -> dict[str, str]:
    stage = re.split(r"^FROM\s", DOCKERFILE, flags=re.MULTILINE)[-1]
    return dict(re.findall(r'(org\.opencontainers\.image\.[a-z]+)="([^"]*)"', stage))


def test_the_image_carries_oci_labels() -> None:
    labels = final_stage_labels()
    assert labels["org.opencontainers.image.title"] == "counterseg"
    assert labels["org.opencontainers.image.version"] == "${VERSION}"
    assert labels["org.opencontainers.image.description"] == PYPROJECT["project"]["description"]


def test_the_licence_is_the_same_in_the_image_and_the_package() -> None:
    """No LICENSE file yet: the image says NOASSERTION (SPDX for "not stated") and the package
    states none. Once a licence is chosen, both name it."""
    label = final_stage_labels()["org.opencontainers.image.licenses"]
    licence_files = [p for p in ROOT.iterdir() if p.name.upper().startswith(("LICENSE", "LICENCE", "COPYING"))]
    if not licence_files:
        assert label == "NOASSERTION" and "license" not in PYPROJECT["project"]
    else:
        assert label == PYPROJECT["project"]["license"]


def test_the_image_installs_the_app_with_pip_and_runs_its_command() -> None:
    builder = re.split(r"^FROM\s", DOCKERFILE, flags=re.MULTILINE)[1]
    assert re.search(r"^COPY pyproject\.toml version \S+", builder, re.MULTILINE)
    assert re.search(r"pip install [^\n]*--no-deps[^\n]* \.;", builder)
    assert '[ "${reported}" != "counterseg ${VERSION}" ]' in builder  # the build checks what --version says
    assert re.findall(r"^ENTRYPOINT\s+(.+)$", DOCKERFILE, re.MULTILINE)[-1] == '["/opt/venv/bin/counterseg"]'


def test_the_docker_context_holds_what_the_dockerfile_copies() -> None:
    allowed = {line[1:].rstrip("/") for line in (ROOT / ".dockerignore").read_text().splitlines() if line.startswith("!")}
    copied = set()
    for line in re.findall(r"^COPY (?!--from)(.+)$", DOCKERFILE, re.MULTILINE):
        copied.update(name.replace("[e]", "e") for name in line.split()[:-1])
    assert copied == allowed


#: Every file that names the image. The image is counterseg:<version>, its Apptainer file
#: counterseg-<version>.sif; <version> written as a placeholder or as the version file's.
NAMING_FILES = ["Dockerfile", "scripts/container_smoke.sh", "scripts/slurm/*.sbatch", "README.md", "docs/*.md"]
TAG = {"<version>", "<VERSION>", "$VERSION", "${VERSION}", VERSION}


def image_names(text: str) -> list[str]:
    tag = r"(<version>|<VERSION>|\$\{VERSION\}|\$VERSION|[\w][\w.+-]*)"
    tags = [f"counterseg:{m.rstrip('.,')}" for m in re.findall(rf"(?<![\w-])counterseg:{tag}", text)]
    sifs = [m.group(0) for m in re.finditer(rf"(?<![\w-])counterseg(-{tag})?\.sif\b", text)]
    return tags + sifs


def test_image_names_finds_good_and_bad_names() -> None:
    text = ('docker-daemon://counterseg:0.1.0 "counterseg:$VERSION", counterseg:${VERSION}} counterseg.sif '
            'counterseg-<version>.sif counterseg:latest. counterseg: text [counterseg] x')
    assert image_names(text) == ["counterseg:0.1.0", "counterseg:$VERSION", "counterseg:${VERSION}", "counterseg:latest",
                                 "counterseg.sif", "counterseg-<version>.sif"]


@pytest.mark.parametrize("pattern", NAMING_FILES)
def test_one_image_name_and_tag_scheme_everywhere(pattern: str) -> None:
    bad = []
    for path in sorted(ROOT.glob(pattern)):
        for name in image_names(path.read_text(encoding="utf-8")):
            tag = name.split(":", 1)[1] if ":" in name else name[len("counterseg-"):-len(".sif")]
            if not name.startswith(("counterseg:", "counterseg-")) or tag not in TAG:
                bad.append(f"{path.relative_to(ROOT)}: {name}")
    assert not bad, f"not counterseg:<version> / counterseg-<version>.sif: {bad}"


@pytest.mark.parametrize("pattern", ["README.md", "docs/*.md"])
def test_documented_docker_builds_pass_a_version_the_build_accepts(pattern: str) -> None:
    """The build needs VERSION (tag, label, --version): a documented command without it fails."""
    for path in sorted(ROOT.glob(pattern)):
        text = path.read_text(encoding="utf-8").replace("\\\n", " ")
        for command in re.findall(r"^\s*(?:\$ )?(docker build [^\n]*)", text, re.MULTILINE):  # commands, not prose
            assert "--build-arg VERSION=" in command, f"{path.name}: {command}"
            assert "+g" not in command, f"{path.name}: a tag cannot hold '+': {command}"
