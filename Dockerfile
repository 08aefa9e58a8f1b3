# counterseg BIDS App image.
#
#   docker build --build-arg VERSION="$(cat version)+g$(git rev-parse --short HEAD)" -t counterseg .
#   docker run --gpus all -u "$(id -u):$(id -g)" -v "$PWD/bids:/data:ro" -v "$PWD/out:/out" \
#       counterseg /data /out participant
#
# The base is plain Ubuntu: the CUDA build of torch from PyPI carries its own CUDA runtime and
# cuDNN, so an nvidia/cuda base would only add gigabytes, and its NVIDIA_REQUIRE_CUDA would refuse
# drivers older than that CUDA release. Any Debian/Ubuntu base works (--build-arg BASE_IMAGE=...);
# when it already has python3 with venv, nothing is fetched with apt.
#
# Offline build (air-gapped sites): put wheels for every requirement in ./wheelhouse (e.g.
# `pip wheel -r requirements.txt -w wheelhouse` on a machine with the base's Python version) and
# the build installs from them only (--no-index), so `docker build --network none` works.
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

COPY --from=builder /opt/venv /opt/venv
WORKDIR /opt/counterseg
COPY run.py version ./
COPY bids_app ./bids_app

# VERSION (bids-apps CI passes `git describe`) replaces the version file; empty keeps the file's.
# Bytecode is compiled now because the root filesystem may be read-only at run time, and every
# file is made readable (directories enterable) by all, since Singularity runs as any UID (the
# venv got the same in the builder: a chmod here would copy its 1.5 GB into another layer).
ARG VERSION=
RUN if [ -n "${VERSION}" ]; then echo "${VERSION}" > version; fi \
    && python3 -m compileall -q bids_app \
    && chmod -R a+rX /opt/counterseg

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
    COUNTERSEG_CONTAINER_TAG=${VERSION:+counterseg:${VERSION}}

USER ${APP_UID}:${APP_UID}
WORKDIR /tmp
ENTRYPOINT ["python3", "/opt/counterseg/run.py"]
