# syntax=docker/dockerfile:1.7
# vidalign images, one Dockerfile with a `base` stage and a target per image:
#   teacher: `vidalign teacher serve`, gRPC on 50051 (HEALTHCHECK: the gRPC health service).
#   trainer: the training stages (`vidalign train stage2`, under torchrun on
#            Kubernetes) and `vidalign adapter init`.
# Build from the repository root, always naming the target (`make images` builds both):
#   docker build --target teacher -t vidalign/teacher:0.1.0 .
#   docker build --target trainer -t vidalign/trainer:0.1.0 .
# This file is outside the build context (.dockerignore admits only what the
# images install), so editing it does not invalidate the source layers.
#
# Why stages of one file rather than a base image both build FROM: the images
# differ only in their last few lines, and everything above them (CUDA base,
# Python, dependencies, source, user) must stay identical -- the trainer's
# `adapter init` writes the adapter the teacher then serves. As stages, the
# shared part is written once, the second build reuses every cached base layer
# (BuildKit keys the cache on the instructions, so the base is built once per
# change, whichever target comes first), and each target always builds on the
# base of the same checkout: no base tag to build, push and pass in first, and
# no image built on a stale base.
#
# CUDA: the torch cu128 wheels carry their own CUDA runtime, cuDNN and cuBLAS,
# so the base is NVIDIA's minimal CUDA image (driver capabilities for the
# container toolkit, CUDA forward compatibility) rather than a cudnn-runtime
# image that would hold a second, unused copy of those libraries.
# Python 3.11 is not packaged for Ubuntu 24.04; uv installs a standalone
# CPython 3.11 (the build uv pins) into /opt/python.
ARG CUDA_IMAGE=nvidia/cuda:12.8.1-base-ubuntu24.04
ARG UV_IMAGE=ghcr.io/astral-sh/uv:0.13.8

FROM ${UV_IMAGE} AS uv

FROM ${CUDA_IMAGE} AS base
ARG PYTHON_VERSION=3.11
ARG TORCH_INDEX=https://download.pytorch.org/whl/cu128
ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    UV_PYTHON_INSTALL_DIR=/opt/python \
    DS_BUILD_OPS=0
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/*
COPY --from=uv /uv /usr/local/bin/uv
RUN uv python install ${PYTHON_VERSION} \
    && uv venv --seed --python ${PYTHON_VERSION} /opt/venv
ENV VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:${PATH}

WORKDIR /opt/vidalign
# Dependencies first: this layer changes only with requirements*.txt / pyproject.toml.
# torch comes from the CUDA index; `torch==2.13.0` in requirements.txt is then
# already satisfied by 2.13.0+cu128 (a local version matches ==2.13.0).
COPY requirements*.txt pyproject.toml ./
RUN pip install --extra-index-url ${TORCH_INDEX} torch==2.13.0 \
    && pip install --extra-index-url ${TORCH_INDEX} -r requirements.txt \
    && python -c "import torch, sys; sys.exit(0 if torch.version.cuda else 'torch ' + torch.__version__ + ' is not a CUDA build')"

# The source, installed without touching the dependencies above.
COPY README.md ./
COPY libs libs
COPY services services
RUN pip install --no-deps . && rm -rf build *.egg-info

# Non-root, numeric uid (runAsNonRoot can check it). Caches live under /cache
# (a volume on Kubernetes: the root filesystem is read-only there).
RUN groupadd --gid 10001 vidalign \
    && useradd --uid 10001 --gid 10001 --create-home --home-dir /home/vidalign vidalign \
    && mkdir -p /cache /adapters /runs \
    && chown 10001:10001 /cache /adapters /runs
ENV HOME=/home/vidalign \
    XDG_CACHE_HOME=/cache \
    HF_HOME=/cache/huggingface \
    VIDALIGN_CACHE=/cache/vidalign \
    TORCH_HOME=/cache/torch \
    TORCH_EXTENSIONS_DIR=/cache/torch_extensions \
    TRITON_CACHE_DIR=/cache/triton \
    VIDALIGN_LOG_FORMAT=json
USER 10001:10001
WORKDIR /home/vidalign
ENTRYPOINT ["vidalign"]


FROM base AS trainer
# torchrun's static rendezvous (node rank 0 listens).
EXPOSE 29500
CMD ["models", "list"]


FROM base AS teacher
EXPOSE 50051
# SERVING only once the model and adapters have loaded; real models take minutes.
HEALTHCHECK --interval=15s --timeout=5s --start-period=600s --retries=3 \
    CMD ["python", "-c", "import grpc,sys; from grpc_health.v1 import health_pb2 as h, health_pb2_grpc as g; r = g.HealthStub(grpc.insecure_channel('127.0.0.1:50051')).Check(h.HealthCheckRequest(service=''), timeout=4); sys.exit(r.status != h.HealthCheckResponse.SERVING)"]
CMD ["teacher", "serve", "--teacher-model", "tiny-animatediff", "--host", "0.0.0.0", "--port", "50051"]
