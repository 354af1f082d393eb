"""MLflow side of bench_list.py: pages through `MlflowClient.search_model_versions`, runs in MLflow's own virtualenv.

One walk per JSON line on stdin (`{"walks": [{"filter": ..., "order_by": [...]}, ...], "page_size": N,
"max_pages": N, "pids": [...]}`), one JSON line per command on stdout: per page latency (seconds), items per walk,
and the RSS of `pids` (the MLflow server's processes) after every page. The client (and its HTTP connection) lives
for the whole run, as the registry's gRPC channel does on the other side.

    /tmp/mlflow-venv/bin/python bench/registry/mlflow_search_driver.py http://127.0.0.1:5000
"""

from __future__ import annotations

import gc
import json
import sys
import time

from mlflow import MlflowClient


def rss_bytes(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/statm") as f:
                total += int(f.read().split()[1]) * 4096
        except OSError:
            pass  # a worker that exited
    return total


def walk(client: MlflowClient, spec: dict, page_size: int, max_pages: int, pids: list[int]) -> dict:
    latencies: list[float] = []
    rss: list[int] = [rss_bytes(pids)]
    items, token, previous = 0, None, None
    started = time.perf_counter()
    while len(latencies) < max_pages:
        t0 = time.perf_counter()
        page = client.search_model_versions(
            filter_string=spec["filter"], max_results=page_size, order_by=spec["order_by"], page_token=token
        )
        latencies.append(time.perf_counter() - t0)
        rss.append(rss_bytes(pids))
        items += len(page)
        if spec.get("check_version_desc"):  # the walk must be a strictly descending sequence of versions
            for mv in page:
                version = int(mv.version)
                if previous is not None and version >= previous:
                    raise RuntimeError(f"MLflow pages out of order: {version} after {previous}")
                previous = version
        token = page.token
        if not token:
            break
    return {"latencies": latencies, "wall": time.perf_counter() - started, "items": items, "rss": rss}


def main() -> None:
    uri = sys.argv[1]
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    for line in sys.stdin:
        command = json.loads(line)
        gc.collect()
        gc.disable()  # the client's own collections must not count as server latency (same on the registry side)
        try:
            walks = [walk(client, w, command["page_size"], command["max_pages"], command["pids"]) for w in command["walks"]]
        finally:
            gc.enable()
        print(json.dumps(walks), flush=True)


if __name__ == "__main__":
    main()
