# bids_anomaly as a BIDS App, CPU or GPU, from one file.
#
#   CPU:  docker build -t bids_anomaly:cpu .
#   GPU:  docker build -t bids_anomaly:gpu \
#           --build-arg BASE_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04 \
#           --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 .
#   Offline: fill wheelhouse/ first (scripts/container-smoke.sh does) and the build installs
#           from it with --no-index; with wheelhouse/ empty it installs from the package index.
#
# The image runs as any uid with a read-only root filesystem and no network:
#   docker run --rm --read-only --tmpfs /tmp -u "$(id -u):$(id -g)" --network none \
#       -v /data:/data:ro -v /out:/out bids_anomaly:cpu /data /out participant

ARG BASE_IMAGE=debian:bookworm-slim

FROM ${BASE_IMAGE} AS builder
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ENV DEBIAN_FRONTEND=noninteractive \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:$PATH
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv
COPY docker/requirements.txt /tmp/requirements.txt
COPY wheelhouse/ /tmp/wheelhouse/
RUN if ls /tmp/wheelhouse/*.whl > /dev/null 2>&1; then \
        pip install --no-index --find-links /tmp/wheelhouse -r /tmp/requirements.txt; \
    else \
        pip install --extra-index-url "${TORCH_INDEX_URL}" -r /tmp/requirements.txt; \
    fi
COPY pyproject.toml README.md /src/
COPY bids_anomaly /src/bids_anomaly
# the build backend (setuptools) is among the pinned requirements: no index needed here; pip
# byte-compiles everything it installs, so imports need not write to the read-only root
RUN pip install --no-deps --no-build-isolation --no-index /src

FROM ${BASE_IMAGE} AS runtime
ARG VERSION=0.1.0
ARG BASE_IMAGE
LABEL org.opencontainers.image.title="bids_anomaly" \
      org.opencontainers.image.description="Unsupervised anomaly detection and segmentation in brain MRI, as a BIDS App" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.base.name="${BASE_IMAGE}"
ENV DEBIAN_FRONTEND=noninteractive
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 libgomp1 \
    && rm -rf /var/lib/apt/lists/*
COPY --from=builder /opt/venv /opt/venv
# Every cache and configuration folder points into /tmp (a tmpfs with --read-only), so any uid
# works; nothing phones home (Nipype's version check is off) and nothing is downloaded.
ENV PATH=/opt/venv/bin:$PATH \
    HOME=/tmp \
    XDG_CACHE_HOME=/tmp/.cache \
    XDG_CONFIG_HOME=/tmp/.config \
    MPLCONFIGDIR=/tmp/matplotlib \
    TORCH_HOME=/tmp/torch \
    NIPYPE_NO_ET=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    MPLBACKEND=Agg
WORKDIR /tmp
RUN bids_anomaly --version
ENTRYPOINT ["bids_anomaly"]
CMD ["--help"]
