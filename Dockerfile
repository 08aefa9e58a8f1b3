# counterseg BIDS App image. A minimal image for now: the CUDA base, non-root user and smoke test
# come with the container issue. Build: docker build --build-arg VERSION=$(git describe) -t counterseg .
ARG BASE_IMAGE=python:3.11-slim-bookworm
FROM ${BASE_IMAGE}

ARG VERSION=0+docker
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    MPLCONFIGDIR=/tmp/matplotlib

WORKDIR /opt/counterseg
COPY requirements.txt ./
RUN pip install --no-cache-dir -r requirements.txt
COPY bids_app ./bids_app
COPY run.py version ./
RUN echo "${VERSION}" > version

ENTRYPOINT ["python", "/opt/counterseg/run.py"]
