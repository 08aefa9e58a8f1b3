#!/usr/bin/env bash
# Container smoke test: build the image offline, run the BIDS App in it the way users and
# Singularity do (no network, read-only root, tmpfs /tmp, an arbitrary UID, input mounted
# read-only), and check that its outputs match a run of the same code outside the container.
#
#   scripts/container_smoke.sh [--base IMAGE] [--rebuild-base] [--image TAG] [--work DIR]
#
#   --base IMAGE     Debian/Ubuntu base with python3 + venv to build on (default: a local
#                    bookworm made with debootstrap, reused when it exists: Docker Hub is not
#                    needed). Its Python must be the host's major.minor, which makes the wheels.
#   --rebuild-base   make the debootstrap base again
#   --image TAG      tag of the image built (default counterseg:<version>, the version file's)
#   --work DIR       scratch: rootfs, dataset, outputs, host venv (default /tmp/counterseg-smoke;
#                    its host venv is reused when the wheelhouse has not changed)
#
# Environment: PYTHON (host interpreter making the wheelhouse and the host venv, default
# python3), HOST_PYTHON (run the host side with this interpreter instead of a venv made from
# the same wheelhouse), DEBIAN_MIRROR. Needs a running Docker daemon (legacy builder is fine);
# making the base needs root and debootstrap. The wheelhouse goes to ./wheelhouse (git-ignored),
# where the Dockerfile finds it. Exits non-zero on any failure or difference.
set -euo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
BASE_IMAGE=""
REBUILD_BASE=0
# The image scheme: counterseg:<version>, built with VERSION=<version> and the commit as REVISION.
VERSION=$(cat "$REPO/version")
REVISION=$(git -C "$REPO" rev-parse HEAD 2>/dev/null || echo unknown)
IMAGE=counterseg:$VERSION
WORK=/tmp/counterseg-smoke
PYTHON=${PYTHON:-python3}
DEBIAN_MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
LOCAL_BASE=counterseg-smoke-base:bookworm
# What the app is given on both sides: the tiny preset with a few steps per stage (as the test
# suite's TINY_TRAINING in tests/conftest.py), one thread so that both runs are deterministic.
RUN_FLAGS=(--preset tiny --seed 0 --omp-nthreads 1 --device cpu)
TINY_CONFIG='{"training": {"vqgan": {"max_steps": 4, "disc_start": 2, "figure_every": 2},
                           "diffusion": {"max_steps": 4, "figure_every": 2},
                           "adapter": {"max_steps": 2}},
              "segmentation": {"counterfactual": {"strengths": [0.5]}}}'

usage() { sed -n '2,20p' "$0" | sed 's/^# \{0,1\}//'; exit "${1:-0}"; }
while [ $# -gt 0 ]; do
    case "$1" in
        --base) BASE_IMAGE=$2; shift 2 ;;
        --rebuild-base) REBUILD_BASE=1; shift ;;
        --image) IMAGE=$2; shift 2 ;;
        --work) WORK=$2; shift 2 ;;
        -h|--help) usage 0 ;;
        *) echo "unknown option: $1" >&2; usage 64 ;;
    esac
done

# Interpreters given by a relative path must survive the cd into the scratch dir (not resolved
# further: a venv's python is a link, and following it would leave the venv).
absolute() { case "$1" in */*) echo "$(cd "$(dirname "$1")" && pwd)/$(basename "$1")" ;; *) echo "$1" ;; esac; }
PYTHON=$(absolute "$PYTHON")
if [ -n "${HOST_PYTHON:-}" ]; then HOST_PYTHON=$(absolute "$HOST_PYTHON"); fi
mkdir -p "$WORK"
WORK=$(cd "$WORK" && pwd)  # docker -v takes absolute paths only

phase_started=$SECONDS
phase() { echo "== [$((SECONDS - phase_started)) s] $*"; }
fail() { echo "SMOKE FAILED: $*" >&2; exit 1; }

# A minimal Debian with python3 + venv, imported into Docker: no registry involved.
make_local_base() {
    local rootfs=$WORK/rootfs
    rm -rf "$rootfs"
    debootstrap --variant=minbase --include=python3,python3-venv bookworm "$rootfs" "$DEBIAN_MIRROR" \
        > "$WORK/debootstrap.log" 2>&1 || { tail -20 "$WORK/debootstrap.log" >&2; fail "debootstrap"; }
    rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
    tar -C "$rootfs" -c . | docker import - "$LOCAL_BASE" >/dev/null
    rm -rf "$rootfs"
}

python_minor() { "$@" -c 'import sys; print("%d.%d" % sys.version_info[:2])'; }

# Wheels for every requirement and the build backend (pyproject.toml's build-system), built on the
# host (torch resolves to the local CPU build).
make_wheelhouse() {
    "$PYTHON" -m pip wheel --quiet --disable-pip-version-check -r "$REPO/requirements.txt" setuptools \
        -w "$REPO/wheelhouse" > "$WORK/wheelhouse.log" 2>&1 || { tail -20 "$WORK/wheelhouse.log" >&2; fail "pip wheel"; }
    ls "$REPO"/wheelhouse/torch-*.whl >/dev/null 2>&1 || fail "no torch wheel in $REPO/wheelhouse"
}

# The host side runs the same package versions as the image: a venv from the same wheelhouse.
host_python() {
    if [ -n "${HOST_PYTHON:-}" ]; then echo "$HOST_PYTHON"; return; fi
    local venv=$WORK/host-venv stamp
    stamp=$(ls "$REPO/wheelhouse" | sha256sum | cut -d' ' -f1)
    if [ "$(cat "$venv/.wheelhouse" 2>/dev/null)" != "$stamp" ]; then
        rm -rf "$venv"
        "$PYTHON" -m venv "$venv"
        "$venv/bin/pip" install --quiet --disable-pip-version-check --no-index \
            --find-links "$REPO/wheelhouse" -r "$REPO/requirements.txt"
        echo "$stamp" > "$venv/.wheelhouse"
    fi
    echo "$venv/bin/python"
}

# The container as Singularity and locked-down Docker sites run it. OMP_NUM_THREADS=1 on both
# sides, with --omp-nthreads 1: BLAS and torch then sum in the same order in both runs.
LOCKED_DOWN=(--rm --network none --read-only --tmpfs /tmp -u 1000:1000 -e HOME=/tmp -e OMP_NUM_THREADS=1)
in_container() {
    docker run "${LOCKED_DOWN[@]}" "${GPU_FLAGS[@]}" \
        -v "$WORK/bids:/data:ro" -v "$WORK/tiny.json:/config/tiny.json:ro" -v "$WORK/out-container:/out" \
        "$IMAGE" "$@"
}

# Run from the scratch dir so that nothing lands in the repository.
on_host() { (cd "$WORK" && OMP_NUM_THREADS=1 "$HOST_PY" "$REPO/run.py" "$@"); }

docker info >/dev/null 2>&1 || fail "no Docker daemon (start dockerd)"
GPU_FLAGS=()
runtimes=$(docker info --format '{{json .Runtimes}}')
if [[ $runtimes == *nvidia* ]]; then GPU_FLAGS=(--gpus all); fi

if [ -z "$BASE_IMAGE" ]; then
    BASE_IMAGE=$LOCAL_BASE
    if [ "$REBUILD_BASE" = 1 ] || ! docker image inspect "$LOCAL_BASE" >/dev/null 2>&1; then
        phase "making the base $LOCAL_BASE with debootstrap"
        make_local_base
    fi
fi
phase "base $BASE_IMAGE"
base_python=$(docker run --rm --network none --entrypoint python3 "$BASE_IMAGE" \
    -c 'import sys; print("%d.%d" % sys.version_info[:2])')
[ "$base_python" = "$(python_minor "$PYTHON")" ] \
    || fail "the base has Python $base_python, $PYTHON is $(python_minor "$PYTHON"): the wheels would not fit"

phase "wheelhouse ($REPO/wheelhouse)"
make_wheelhouse
HOST_PY=$(host_python)

phase "docker build --network none ($IMAGE, VERSION=$VERSION, REVISION=$REVISION)"
build_started=$SECONDS
docker build --network none --build-arg BASE_IMAGE="$BASE_IMAGE" --build-arg VERSION="$VERSION" \
    --build-arg REVISION="$REVISION" -t "$IMAGE" "$REPO" > "$WORK/build.log" 2>&1 \
    || { tail -30 "$WORK/build.log" >&2; fail "docker build"; }
grep -q "installing from wheelhouse/ only" "$WORK/build.log" || fail "the build did not use the wheelhouse"
label() { docker image inspect -f "{{index .Config.Labels \"org.opencontainers.image.$1\"}}" "$IMAGE"; }
[ "$(label version)" = "$VERSION" ] || fail "the image's version label is '$(label version)', expected '$VERSION'"
[ "$(label revision)" = "$REVISION" ] || fail "the image's revision label is '$(label revision)', expected '$REVISION'"
echo "   built in $((SECONDS - build_started)) s; size $(docker image inspect -f '{{.Size}}' "$IMAGE" | awk '{printf "%.2f GB", $1 / 1e9}')"

phase "synthetic dataset"
rm -rf "$WORK/bids" "$WORK/out-container" "$WORK/out-host"
(cd "$REPO" && "$HOST_PY" -m bids_app.synthetic "$WORK/bids" --n-healthy 4 --n-lesion 2 --seed 0)
echo "$TINY_CONFIG" > "$WORK/tiny.json"
# Readable by UID 1000 in the container; its output dir writable by it, whoever runs this.
chmod -R a+rX "$WORK/bids" "$WORK/tiny.json"
mkdir -p "$WORK/out-container" "$WORK/out-host"
chmod 0777 "$WORK/out-container"

phase "container: --version, --help ${GPU_FLAGS[*]}"
reported=$(in_container --version)
[ "$reported" = "counterseg $VERSION" ] || fail "--version says '$reported', expected 'counterseg $VERSION'"
# Captured first: `grep -q` on a pipe would stop reading early, and pipefail see docker's SIGPIPE.
help_text=$(in_container --help) || fail "--help exited non-zero"
grep -q "^usage: counterseg" <<< "$help_text" || fail "--help printed no usage line"
if [ ${#GPU_FLAGS[@]} -gt 0 ]; then
    docker run "${LOCKED_DOWN[@]}" "${GPU_FLAGS[@]}" --entrypoint python3 "$IMAGE" \
        -c 'import torch; assert torch.cuda.is_available()' \
        || fail "the NVIDIA runtime is there but torch sees no GPU in the container"
fi

for level in group participant; do
    phase "container: $level level"
    in_container /data /out "$level" --config /config/tiny.json "${RUN_FLAGS[@]}" \
        || fail "$level level in the container"
done
container_tag=$("$HOST_PY" -c 'import json, sys
print(json.load(open(sys.argv[1]))["GeneratedBy"][0].get("Container", {}).get("Tag", ""))' \
    "$WORK/out-container/dataset_description.json")
[ "$container_tag" = "counterseg:$VERSION" ] \
    || fail "GeneratedBy.Container.Tag is '$container_tag', expected 'counterseg:$VERSION'"

for level in group participant; do
    phase "host: $level level"
    on_host "$WORK/bids" "$WORK/out-host" "$level" --config "$WORK/tiny.json" "${RUN_FLAGS[@]}" \
        || fail "$level level on the host"
done

phase "comparing the outputs"
"$HOST_PY" "$REPO/scripts/compare_outputs.py" "$WORK/out-host" "$WORK/out-container" \
    || fail "the container's outputs differ from the host's"
phase "container smoke test passed (${SECONDS} s in all)"
