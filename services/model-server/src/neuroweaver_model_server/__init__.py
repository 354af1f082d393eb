"""The NeuroWeaver model server: base model + LoRA adapter behind gRPC (`neuroweaver.inference.v1`) and an
OpenAI-compatible HTTP API, with health, Prometheus metrics, a bounded queue and a dynamic batcher.

`python -m neuroweaver_model_server --grpc-port ... --http-port ... --base-model ...` is the container command of
the deployer's Kubernetes backend and what its local backend starts per replica.

Layers: `api/` (gRPC servicer, OpenAI-compatible HTTP) → `service/` (use cases) → `domain/` (requests and their
rules) / `engines/` (decoding) / `adapters/` (model loading); `app.py` wires them, `metrics.py` holds the series.
"""
