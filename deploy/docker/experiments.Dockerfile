# syntax=docker/dockerfile:1
# NeuroWeaver experiments service. Build from the repository root:
#   docker build -f deploy/docker/experiments.Dockerfile -t neuroweaver/experiments:0.1.0 .
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# Stage 1: wheels of the repo's own packages (no editable installs in images).
FROM ${PYTHON_IMAGE} AS wheels
WORKDIR /src
COPY libs/neuroweaver-proto libs/neuroweaver-proto
COPY libs/neuroweaver-runtime libs/neuroweaver-runtime
COPY services/experiments services/experiments
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels \
        ./libs/neuroweaver-proto ./libs/neuroweaver-runtime ./services/experiments

# Stage 2: a virtualenv with the wheels and their dependencies from PyPI.
FROM ${PYTHON_IMAGE} AS venv
COPY --from=wheels /wheels /wheels
RUN python -m venv /opt/venv \
    && /opt/venv/bin/pip install --no-cache-dir /wheels/*.whl uvloop==0.23.0

# Stage 3: runtime, non-root, no build tools.
FROM ${PYTHON_IMAGE} AS runtime
RUN groupadd --system --gid 10001 neuroweaver \
    && useradd --system --uid 10001 --gid 10001 --create-home --home-dir /home/neuroweaver \
        --shell /usr/sbin/nologin neuroweaver \
    && install -d -o 10001 -g 10001 /var/lib/neuroweaver
COPY --from=venv /opt/venv /opt/venv
COPY deploy/docker/grpc_health_check.py /usr/local/bin/nw-grpc-health
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    NW_DATA_DIR=/var/lib/neuroweaver \
    NW_EXPERIMENTS_HOST=0.0.0.0
USER 10001:10001
WORKDIR /home/neuroweaver
EXPOSE 50054 9454
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
    CMD ["/opt/venv/bin/python", "/usr/local/bin/nw-grpc-health", "neuroweaver.experiments.v1.ExperimentsService", "--port", "50054", "--port-env", "NW_EXPERIMENTS_PORT", "--tls-env-prefix", "NW_EXPERIMENTS_CLIENT_"]
ENTRYPOINT ["python", "-m", "neuroweaver_experiments"]
CMD ["--host", "0.0.0.0"]
