# syntax=docker/dockerfile:1
#
# mmserver container image (BuildKit, the default builder since Docker 23, is required).
#
#   CPU image (default): python:3.11-slim, torch CPU-only wheels
#     docker build -t mmserver .
#   CUDA image: nvidia/cuda runtime base, vLLM and the CUDA torch wheels it pins
#     docker build --build-arg VARIANT=cuda -t mmserver:cuda .
#   Run it (every model folder under ./model-repo; V2 API and /metrics on port 8080):
#     docker run --rm -p 8080:8080 -v "$PWD/model-repo:/mnt/models:ro" mmserver
#
# Build arguments:
#   VARIANT          cpu | cuda
#   RUNTIMES         runtime distributions under runtimes/ to build and install; every name must be a
#                    folder with a pyproject.toml. Unset: "sklearn xgboost" in the CPU image and
#                    "sklearn xgboost transformers vllm" in the CUDA one (see the builder stage).
#                    >>> TO ADD A RUNTIME: list it at build time, e.g.
#                    >>>   --build-arg RUNTIMES="sklearn xgboost transformers"
#                    >>> (transformers also installs torch, the CPU build in the CPU image)
#   TORCH_VERSION    torch for the CPU image, from TORCH_INDEX_URL (CPU-only wheels, no CUDA libraries);
#   TORCH_INDEX_URL  installed only when the transformers runtime is in RUNTIMES
#   VLLM_VERSION     vLLM for the CUDA image; it pins the CUDA build of torch it needs. Empty: plain
#                    torch==TORCH_VERSION from PyPI (whose Linux wheels are CUDA builds)
#   PYTHON_IMAGE     base of the builder and of the CPU image
#   CUDA_IMAGE       base of the CUDA image (Ubuntu with python3 >= 3.11); torch and vLLM bring their
#                    own CUDA libraries as wheels, the base must only match the host driver (CUDA 13)
#
# The image runs as UID 1000, group 0, with HOME and /mnt/models group-writable, so it also runs
# under OpenShift's arbitrary UIDs. SIGTERM: uvicorn stops accepting, drains in-flight requests
# (30 s at most), then every model is unloaded and the process exits; give the platform a
# termination grace period above 30 s.
#
# tests/test_deploy.py parses this file and runs the `builder` and `final` stages of the CPU variant
# in a fresh virtual environment (no Docker engine on the development machine); the base-* stages
# (apt-get, user creation) are only checked by reading them.

ARG VARIANT=cpu
ARG RUNTIMES=""
ARG PYTHON_IMAGE=python:3.11-slim
ARG CUDA_IMAGE=nvidia/cuda:13.0.2-runtime-ubuntu24.04

# ----------------------------------------------------------------------------- builder: the wheels
# mmserver and its runtimes are pure Python: one wheel each, no compiler needed.
# The runtimes it builds are written to /wheels/RUNTIMES, which the final stage reads.
FROM ${PYTHON_IMAGE} AS builder
ARG VARIANT
ARG RUNTIMES
WORKDIR /src
COPY pyproject.toml README.md ./
COPY mmserver ./mmserver
COPY runtimes ./runtimes
RUN set -eu; \
    if [ -z "$RUNTIMES" ]; then \
      case "$VARIANT" in \
        cuda) RUNTIMES="sklearn xgboost transformers vllm" ;; \
        *) RUNTIMES="sklearn xgboost" ;; \
      esac; \
    fi; \
    mkdir -p /wheels; \
    echo "$RUNTIMES" > /wheels/RUNTIMES; \
    for runtime in $RUNTIMES; do \
      if [ ! -f "runtimes/$runtime/pyproject.toml" ]; then \
        echo "RUNTIMES names '$runtime' but runtimes/$runtime/pyproject.toml does not exist" >&2; exit 1; \
      fi; \
      set -- "$@" "runtimes/$runtime"; \
    done; \
    pip wheel --no-cache-dir --no-deps --wheel-dir /wheels . "$@"

# ----------------------------------------------------------------------------- system bases
FROM ${PYTHON_IMAGE} AS base-cpu
RUN apt-get update \
    && apt-get install -y --no-install-recommends tini \
    && rm -rf /var/lib/apt/lists/*

FROM ${CUDA_IMAGE} AS base-cuda
# Ubuntu 24.04 ships python3.12 (mmserver needs >= 3.11) and a user "ubuntu" holding UID 1000.
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv tini ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && (userdel --remove ubuntu 2>/dev/null || true)

# The serving user: numeric UID 1000 in group 0; what it writes is group-writable (g=u), so an
# arbitrary UID in group 0 (OpenShift) can write there too.
FROM base-${VARIANT} AS base
RUN useradd --uid 1000 --gid 0 --home-dir /home/mmserver --create-home --shell /usr/sbin/nologin mmserver \
    && mkdir -p /home/mmserver/.cache /mnt/models \
    && chown -R 1000:0 /home/mmserver /mnt/models \
    && chmod -R g=u /home/mmserver /mnt/models

# ----------------------------------------------------------------------------- final
FROM base AS final
ARG VARIANT
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG VLLM_VERSION=0.26.0
ENV VIRTUAL_ENV=/opt/mmserver/venv \
    PATH=/opt/mmserver/venv/bin:$PATH \
    HOME=/home/mmserver \
    HF_HOME=/home/mmserver/.cache/huggingface \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VLLM_NO_USAGE_STATS=1 \
    DO_NOT_TRACK=1
RUN python3 -m venv "$VIRTUAL_ENV"
# Frameworks first, from the index that has the right build, so that the runtimes' own dependency on
# torch is already satisfied when their wheels are installed.
RUN --mount=type=bind,from=builder,source=/wheels,target=/wheels \
    set -eu; \
    RUNTIMES="$(cat /wheels/RUNTIMES)"; \
    case "$VARIANT" in \
      cpu) \
        case " $RUNTIMES " in \
          *" transformers "*) pip install --no-cache-dir "torch==$TORCH_VERSION" --index-url "$TORCH_INDEX_URL" ;; \
        esac ;; \
      cuda) \
        if [ -n "$VLLM_VERSION" ]; then pip install --no-cache-dir "vllm==$VLLM_VERSION"; \
        else pip install --no-cache-dir "torch==$TORCH_VERSION"; fi ;; \
      *) echo "VARIANT must be cpu or cuda, not '$VARIANT'" >&2; exit 1 ;; \
    esac
# mmserver and the runtimes from the builder's wheels. XGBoost's Linux wheel pulls NCCL (~470 MB)
# for multi-GPU training only; the CPU image drops it (XGBoost loads it lazily, never for prediction).
RUN --mount=type=bind,from=builder,source=/wheels,target=/wheels \
    set -eu; \
    pip install --no-cache-dir /wheels/*.whl; \
    if [ "$VARIANT" = cpu ]; then pip uninstall -y nvidia-nccl-cu12; fi; \
    python -c 'import sys; from mmserver.runtime import RuntimeRegistry; r = RuntimeRegistry.discover(); missing = set(open(sys.argv[1]).read().split()) - set(r.runtimes); sys.exit(f"runtimes not loadable: {sorted(missing)} {r.broken}" if missing else 0)' /wheels/RUNTIMES; \
    mmserver --version

USER 1000
WORKDIR /home/mmserver
EXPOSE 8080
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/v2/health/ready', timeout=4)"]
# tini as PID 1 forwards SIGTERM to mmserver and reaps the engine processes that runtimes may start.
ENTRYPOINT ["tini", "--", "mmserver"]
CMD ["serve", "/mnt/models", "--host", "0.0.0.0", "--port", "8080"]
