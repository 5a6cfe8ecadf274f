"""A load generator for the running stack: seeded traffic of any drift scenario, sent to a
pipeline over HTTP, one text per request, from a few concurrent clients. For demos, drift
drills and smoke tests (`llmops traffic support --scenario new-product`)."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from training.data import generate
from training.errors import LLMOpsError

# application -> (dataset, path under its route prefix)
TARGETS = {"support": ("support-tickets", "/route"), "moderation": ("moderation", "/")}


def send(base_url: str, app: str, route_prefix: str, scenario: str, n: int, seed: int,
         fraction: float, concurrency: int) -> dict:
    """Send `n` generated texts; the report counts answers by status code and gives latency."""
    import httpx

    if app not in TARGETS:
        raise LLMOpsError(f"traffic goes to one of {sorted(TARGETS)}, not {app!r}")
    if concurrency < 1:
        raise LLMOpsError(f"--concurrency must be at least 1, got {concurrency}")
    dataset, path = TARGETS[app]
    texts = list(generate(dataset, scenario, n, seed, fraction).text)
    url = base_url + route_prefix.rstrip("/") + path
    with httpx.Client(timeout=60) as client:
        try:
            client.post(url, json={"text": texts[0]})
        except httpx.HTTPError as exc:
            raise LLMOpsError(f"nothing answers at {url} (start it with `llmops up`)") from exc

        def one(text: str) -> tuple[int, float]:
            started = time.perf_counter()
            try:
                code = client.post(url, json={"text": text}).status_code
            except httpx.HTTPError:
                code = 0
            return code, time.perf_counter() - started

        started = time.perf_counter()
        with ThreadPoolExecutor(concurrency) as pool:
            results = list(pool.map(one, texts))
    seconds = time.perf_counter() - started
    codes = [c for c, _ in results]
    latency = np.array([t for _, t in results]) * 1000
    return {"url": url, "scenario": scenario, "fraction": fraction, "requests": n,
            "ok": codes.count(200), "failed": n - codes.count(200),
            "rps": round(n / seconds, 1), "p50_ms": round(float(np.percentile(latency, 50)), 1),
            "p99_ms": round(float(np.percentile(latency, 99)), 1)}
