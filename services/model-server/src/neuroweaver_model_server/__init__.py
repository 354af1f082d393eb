"""The NeuroWeaver model server: base model + LoRA adapter behind gRPC (`neuroweaver.inference.v1`) and an
OpenAI-compatible HTTP API, with health, Prometheus metrics, a bounded queue and a dynamic batcher.

`python -m neuroweaver_deployer.model_server --grpc-port ... --http-port ... --base-model ...` is the container
command of the Kubernetes backend and what the local backend starts per replica.
"""
