# syntax=docker/dockerfile:1
# NeuroWeaver web console (HTTP 8090, ops port 9456: /metrics, /healthz). Build from the repository root:
#   docker build -f deploy/docker/console.Dockerfile -t neuroweaver/console:0.1.0 .
ARG PYTHON_IMAGE=python:3.11-slim-bookworm
ARG NODE_IMAGE=node:22-bookworm-slim

# Stage 1: wheels of the repo's own packages (no editable installs in images).
FROM ${PYTHON_IMAGE} AS wheels
WORKDIR /src
COPY libs/neuroweaver-proto libs/neuroweaver-proto
COPY libs/neuroweaver-runtime libs/neuroweaver-runtime
COPY services/console services/console
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels \
        ./libs/neuroweaver-proto ./libs/neuroweaver-runtime ./services/console

# Stage 2: a virtualenv with the wheels and their dependencies from PyPI.
FROM ${PYTHON_IMAGE} AS venv
COPY --from=wheels /wheels /wheels
RUN python -m venv /opt/venv \
    && /opt/venv/bin/pip install --no-cache-dir /wheels/*.whl

# Stage 3: the npm files the pages load: chart.js, cytoscape and cytoscape-dagre alone (their dist builds bundle what
# they need), each at the version and integrity package-lock.json pins; not the repository's whole Node tooling.
FROM ${NODE_IMAGE} AS assets
WORKDIR /assets
COPY package-lock.json /tmp/package-lock.json
RUN set -eu; \
    for package in chart.js cytoscape cytoscape-dagre; do \
        version="$(node -p "require('/tmp/package-lock.json').packages['node_modules/${package}'].version")"; \
        integrity="$(node -p "require('/tmp/package-lock.json').packages['node_modules/${package}'].integrity")"; \
        npm pack --json --silent "${package}@${version}" > /tmp/pack.json; \
        test "$(node -p "require('/tmp/pack.json')[0].integrity")" = "${integrity}"; \
        mkdir -p "node_modules/${package}"; \
        tar -xzf "${package}-${version}.tgz" --strip-components=1 --no-same-owner -C "node_modules/${package}"; \
    done; \
    test -f node_modules/chart.js/dist/chart.umd.min.js; \
    test -f node_modules/cytoscape/dist/cytoscape.min.js; \
    test -f node_modules/cytoscape-dagre/dist/cytoscape-dagre.min.js

# Stage 4: runtime, non-root, no build tools.
FROM ${PYTHON_IMAGE} AS runtime
RUN groupadd --system --gid 10001 neuroweaver \
    && useradd --system --uid 10001 --gid 10001 --create-home --home-dir /home/neuroweaver \
        --shell /usr/sbin/nologin neuroweaver
COPY --from=venv /opt/venv /opt/venv
COPY --from=assets /assets/node_modules /opt/neuroweaver-console/node_modules
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    NW_CONSOLE_ASSETS_DIR=/opt/neuroweaver-console/node_modules \
    NW_CONSOLE_HOST=0.0.0.0
USER 10001:10001
WORKDIR /home/neuroweaver
EXPOSE 8090 9456
# GET /healthz on the ops port (plain HTTP even when the console serves HTTPS). http.client, not urllib: urllib would
# send it through an HTTP(S)_PROXY set in the container's environment.
HEALTHCHECK --interval=15s --timeout=5s --start-period=30s --retries=3 \
    CMD ["/opt/venv/bin/python", "-c", "import http.client, os; c = http.client.HTTPConnection('127.0.0.1', int(os.environ.get('NW_CONSOLE_METRICS_PORT') or 9456), timeout=4); c.request('GET', '/healthz'); raise SystemExit(c.getresponse().status != 200)"]
ENTRYPOINT ["python", "-m", "neuroweaver_console"]
CMD ["--host", "0.0.0.0"]
