# counterseg BIDS App image, named counterseg:<version> (<version>: the top-level `version` file).
#
#   VERSION=$(cat version)
#   docker build --build-arg VERSION="$VERSION" --build-arg REVISION="$(git rev-parse HEAD)" \
#       -t "counterseg:$VERSION" .
#   docker run --gpus all -u "$(id -u):$(id -g)" -v "$PWD/bids:/data:ro" -v "$PWD/out:/out" \
#       "counterseg:$VERSION" /data /out participant
#   apptainer build "counterseg-$VERSION.sif" "docker-daemon://counterseg:$VERSION"
#
# The image runs the `counterseg` command that `pip install .` makes from pyproject.toml: the same
# entry point as run.py in a clone. VERSION is required: it is the image's tag, its OCI version label,
# what `counterseg --version` reports and GeneratedBy.Container.Tag records, so the build refuses a
# VERSION that cannot be all four (a tag cannot hold "+": put the commit in REVISION, not in VERSION).
#
# The base is plain Ubuntu: the CUDA build of torch from PyPI carries its own CUDA runtime and
# cuDNN, so an nvidia/cuda base would only add gigabytes, and its NVIDIA_REQUIRE_CUDA would refuse
# drivers older than that CUDA release. Any Debian/Ubuntu base works (--build-arg BASE_IMAGE=...);
# when it already has python3 with venv, nothing is fetched with apt.
#
# Offline build (air-gapped sites): put wheels for every requirement and for the build backend in
# ./wheelhouse (e.g. `pip wheel -r requirements.txt setuptools -w wheelhouse` on a machine with the
# base's Python version) and the build installs from them only (--no-index), so `docker build
# --network none` works.
# Written for the legacy builder too: no BuildKit-only syntax.
ARG BASE_IMAGE=ubuntu:24.04

# ---------------------------------------------------------------- builder: the virtual environment
FROM ${BASE_IMAGE} AS builder
SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# python3 and venv come from the base when it has them; otherwise from its distribution. Versions
# are left to the base (pinning Debian/Ubuntu package versions would break every other BASE_IMAGE).
# hadolint ignore=DL3008
RUN if ! python3 -m venv /opt/venv >/dev/null 2>&1; then \
        rm -rf /opt/venv \
        && apt-get update \
        && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends python3 python3-venv \
        && rm -rf /var/lib/apt/lists/* \
        && python3 -m venv /opt/venv; \
    fi

ENV PATH=/opt/venv/bin:$PATH \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# The wheelhouse is optional: "wheelhous[e]" matches nothing when the folder is absent, and the
# listed requirements.txt keeps the COPY valid either way.
COPY requirements.txt /tmp/build/
COPY requirements.txt wheelhous[e] /tmp/build/wheelhouse/
RUN if [ -n "$(find /tmp/build/wheelhouse -maxdepth 1 -name '*.whl' -print -quit)" ]; then \
        echo "installing from wheelhouse/ only (offline build)"; \
        pip install --no-cache-dir --no-index --find-links /tmp/build/wheelhouse -r /tmp/build/requirements.txt; \
    else \
        pip install --no-cache-dir -r /tmp/build/requirements.txt; \
    fi \
    && pip check \
    && bids-validator-deno --version \
    && chmod -R a+rX /opt/venv

# The app, installed as `pip install .` installs it (its dependencies are in already): the
# `counterseg` command in /opt/venv/bin, the version from the version file that VERSION replaces.
COPY pyproject.toml version /tmp/build/src/
COPY bids_app /tmp/build/src/bids_app
WORKDIR /tmp/build/src
ARG VERSION=
RUN case "${VERSION}" in \
        "" | [!A-Za-z0-9_]* | *[!A-Za-z0-9_.-]*) \
            echo "give the build --build-arg VERSION=\"$(cat version)\": the image is counterseg:<VERSION>" \
                 "(got '${VERSION}'; a tag holds letters, digits, '.', '_' and '-')" >&2; \
            exit 64 ;; \
    esac \
    && echo "${VERSION}" > version \
    && if [ -n "$(find /tmp/build/wheelhouse -maxdepth 1 -name '*.whl' -print -quit)" ]; then \
        pip install --no-cache-dir --no-deps --no-index --find-links /tmp/build/wheelhouse .; \
    else \
        pip install --no-cache-dir --no-deps .; \
    fi \
    && pip check \
    && reported="$(counterseg --version)" \
    && if [ "${reported}" != "counterseg ${VERSION}" ]; then \
        echo "VERSION ${VERSION} is not a normalised PEP 440 version: the app says '${reported}'" >&2; \
        exit 64; \
    fi \
    && chmod -R a+rX /opt/venv

# ---------------------------------------------------------------- final: venv + app, no build tools
FROM ${BASE_IMAGE}
SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# A fixed numeric user (no clash with the 1000 of ubuntu images); any other UID works as well.
ARG APP_UID=10001
# The venv's python is a link to the base's /usr/bin/python3: the interpreter only, no venv/pip.
# hadolint ignore=DL3008
RUN if ! command -v python3 >/dev/null; then \
        apt-get update \
        && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends python3 \
        && rm -rf /var/lib/apt/lists/*; \
    fi \
    && groupadd --gid "${APP_UID}" counterseg \
    && useradd --no-log-init --uid "${APP_UID}" --gid "${APP_UID}" --no-create-home --home-dir /tmp \
        --shell /usr/sbin/nologin counterseg

# The venv holds the app too. pip compiled its bytecode (the root filesystem may be read-only at
# run time), and the builder made every file readable by all, since Singularity runs as any UID (a
# chmod here would copy the venv's 1.5 GB into another layer).
COPY --from=builder /opt/venv /opt/venv

ARG VERSION=
ARG REVISION=
LABEL org.opencontainers.image.title="counterseg" \
      org.opencontainers.image.description="Spinal-cord lesion segmentation by counterfactual latent diffusion, as a BIDS App" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.licenses="NOASSERTION"

# Runs under any UID, with HOME unset or unwritable and a read-only root: every cache and
# config a dependency may write goes to /tmp (a tmpfs under `docker run --read-only --tmpfs
# /tmp`); outputs, models, logs and the work dir go to output_dir. Nothing is fetched at run time.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    MPLCONFIGDIR=/tmp/matplotlib \
    XDG_CACHE_HOME=/tmp/.cache \
    XDG_CONFIG_HOME=/tmp/.config \
    TORCH_HOME=/tmp/torch \
    NUMBA_CACHE_DIR=/tmp/numba \
    DENO_DIR=/tmp/deno \
    DENO_NO_UPDATE_CHECK=1 \
    DENO_NO_PROMPT=1 \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    COUNTERSEG_CONTAINER_TAG=counterseg:${VERSION}

USER ${APP_UID}:${APP_UID}
WORKDIR /tmp
ENTRYPOINT ["/opt/venv/bin/counterseg"]
