"""The model server's edges: the gRPC servicer (`servicer.py`) and the OpenAI-compatible HTTP API (`openai_http.py`)."""
