"""A load generator for the running stack: seeded traffic of any drift scenario, sent to a
pipeline over HTTP, one text per request, from a few concurrent clients, and the feedback human
review would give (a classifier answer's true label, a generated answer's reference text as its
correction). For demos, drift drills and smoke tests (`llmops traffic support --scenario
new-product`, `llmops traffic chat --model rewriter`, `llmops traffic support --model
support-reply`)."""

from __future__ import annotations

import logging
import ssl
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from cluster.settings import Settings
from monitoring.log import now
from training.data import generate
from training.errors import LLMOpsError

logging.getLogger("httpx").setLevel(logging.WARNING)  # not a log line per request sent

MAX_WAIT_S = 10.0
LABELLING = ("queue", "random")  # which answers `--feedback` labels
QUEUE_PAGE = 500  # the most a page of the label queue holds (its default max_limit)
# application -> (dataset, path under its route prefix); chat's texts are a generator's
# prompts (its task's dataset)
TARGETS = {"support": ("support-tickets", "/route"), "moderation": ("moderation", "/"),
           "chat": (None, "/chat/completions")}
TENANT = "traffic"  # the tenant generated traffic is charged to
# applications where every answer holds a generator's, which traffic can correct instead of
# labelling the classifier's (moderation rewrites only the posts it finds toxic)
GENERATING = ("chat", "support")


def token(settings: Settings) -> str:
    """A development token of tenant `traffic` with the scopes traffic needs (moderate,
    support, chat, feedback), signed with the platform's secret."""
    from serve_apps.auth import issue

    return issue(settings.serve.auth, settings.data_dir, tenant=TENANT,
                 scopes=["moderate", "support", "chat", "feedback"], subject="llmops-traffic",
                 ttl_s=24 * 3600)


def generator_target(settings: Settings, app: str, model: str | None
                     ) -> tuple[str, dict[str, float]]:
    """The generator whose answers `app`'s traffic corrects (chat: `model`, or its own;
    support: its reply generator) and the dataset and label mix its prompts are drawn from
    (its task's)."""
    from training.refs import model_name

    if app not in GENERATING:
        raise LLMOpsError(f"a generator's answers are corrected through {' or '.join(GENERATING)}"
                          f" traffic, not {app}'s")
    own = model_name(getattr(settings.serve, app).generator.model)
    if app != "chat" and model not in (None, own):
        raise LLMOpsError(f"{app}'s generator is {own}, not {model}")
    model = model or own
    task = settings.training.task(model)
    if task.kind != "causal-lm":
        raise LLMOpsError(f"{app} traffic corrects a generator; {model} is a {task.kind} model")
    return model, {"dataset": task.dataset, "priors": task.label_priors}


def generator_app(settings: Settings, model: str) -> str:
    """The application whose traffic drives generator `model`'s loop: support where it writes
    support's replies and is not chat's own generator, else chat."""
    from training.refs import model_name

    serve = settings.serve
    return "support" if model == model_name(serve.support.generator.model) != model_name(
        serve.chat.generator.model) else "chat"


def judged(settings: Settings, app: str, asked: tuple[str, dict] | None) -> str:
    """The model whose answers `app`'s traffic gives feedback to: the generator it corrects
    (`generator_target`), else the application's classifier (the label queue also lists the
    answers of its generator, a post's rewrite or a ticket's reply, which take corrections)."""
    from training.refs import model_name

    return asked[0] if asked else model_name(getattr(settings.serve, app).classifier.model)


def send(base_url: str, app: str, route_prefix: str, scenario: str, n: int, seed: int,
         fraction: float, concurrency: int, feedback: float = 0.0,
         feedback_prefix: str = "/v1/feedback", bearer: str | None = None,
         verify: ssl.SSLContext | bool = True, labelling: str = "queue",
         generator: tuple[str, dict] | None = None, model: str | None = None) -> dict:
    """Send `n` generated texts (with the `bearer` token; over HTTPS verified by `verify`, as
    `serve_apps.tls.client_context` gives it); the report counts answers by status code and
    gives latency. A `feedback` share of the answered requests then gets its true label
    through the feedback application, as human review would (the labels retraining learns
    from): the ones the platform's queue of pending labels puts first (`labelling` queue), or
    a seeded random draw (random); the queue is read for `model`'s answers (`judged`). Traffic
    for a `generator` (the one corrected and where its prompts come from, `generator_target`:
    chat's, or support's reply generator) gets corrections instead: each prompt's reference
    text."""
    import httpx

    if app not in TARGETS:
        raise LLMOpsError(f"traffic goes to one of {sorted(TARGETS)}, not {app!r}")
    if concurrency < 1:
        raise LLMOpsError(f"--concurrency must be at least 1, got {concurrency}")
    if not 0.0 <= feedback <= 1.0:
        raise LLMOpsError(f"--feedback is a share between 0 and 1, got {feedback}")
    if labelling not in LABELLING:
        raise LLMOpsError(f"--labelling is one of {', '.join(LABELLING)}, not {labelling!r}")
    if app == "chat" and generator is None:
        raise LLMOpsError("chat traffic asks a generator (`generator_target`)")
    dataset, path = TARGETS[app]
    asked, data = generator or (None, {"dataset": dataset, "priors": None})
    rows = generate(data["dataset"], scenario, n, seed, fraction, priors=data["priors"])
    truth = rows.rewrite if asked else rows.label

    def body(text: str) -> dict:
        return {"model": asked, "messages": [{"role": "user", "content": text}]} \
            if app == "chat" else {"text": text}

    url = base_url + route_prefix.rstrip("/") + path
    auth = {"Authorization": f"Bearer {bearer}"} if bearer else {}
    with httpx.Client(timeout=60, headers=auth, verify=verify) as client:
        try:
            client.post(url, json=body(rows.text.iloc[0]))
        except httpx.HTTPError as exc:
            raise LLMOpsError(f"nothing answers at {url} (start it with `llmops up`)") from exc
        began, started = now().isoformat(), time.perf_counter()
        with ThreadPoolExecutor(concurrency) as pool:
            results = list(pool.map(lambda text: _polite_post(client, url, body(text)),
                                    rows.text))
        seconds = time.perf_counter() - started
        answered = [(rid, truth.iloc[i]) for i, (code, _, rid) in enumerate(results)
                    if code == 200]
        labels = _label(client, base_url + feedback_prefix.rstrip("/") + "/", answered,
                        feedback, labelling, seed, began, concurrency,
                        "correction" if asked else "label", model or asked)
    codes = [c for c, _, _ in results]
    latency = np.array([t for _, t, _ in results]) * 1000
    return {"url": url, "scenario": scenario, "fraction": fraction, "requests": n,
            "ok": codes.count(200), "failed": n - codes.count(200),
            "rps": round(n / seconds, 1), "p50_ms": round(float(np.percentile(latency, 50)), 1),
            "p99_ms": round(float(np.percentile(latency, 99)), 1), "feedback": labels}


def _polite_post(client, url: str, body: dict) -> tuple[int, float, str | None]:
    """A request, sent again after `Retry-After` when throttled (429 by the tenant's rate
    limit, 503 by load shedding) for up to `MAX_WAIT_S`, as a polite client does; its status,
    seconds and the request id the platform gave it (feedback names it)."""
    import httpx

    started, waited = time.perf_counter(), 0.0
    while True:
        try:
            r = client.post(url, json=body)
        except httpx.HTTPError:
            return 0, time.perf_counter() - started, None
        wait = float(r.headers.get("retry-after", "inf"))
        if r.status_code not in (429, 503) or waited + wait > MAX_WAIT_S:
            answer = r.json() if r.status_code == 200 else {}
            rid = answer.get("request_id") or answer.get("llmops", {}).get("request_id")
            return r.status_code, time.perf_counter() - started, rid
        time.sleep(wait)
        waited += wait


def _label(client, url: str, answered: list[tuple[str, str]], share: float, labelling: str,
           seed: int, since: str, concurrency: int, field: str = "label",
           model: str | None = None) -> dict:
    """Give a `share` of the `answered` requests (request id, true label or correction, as
    `field`) their feedback: the queue's first for `model`'s answers (`labelling` queue) or a
    seeded random draw."""
    truth = dict(answered)
    if labelling == "queue":
        sent, accepted, reasons = _from_queue(client, url, truth, round(share * len(truth)),
                                              since, concurrency, field, model)
    else:
        chosen = np.random.default_rng(seed).random(len(answered)) < share
        picked = [pair for pair, pick in zip(answered, chosen) if pick]
        sent, reasons = len(picked), {"random": len(picked)}
        accepted = _feedback(client, url, picked, concurrency, field)
    return {"labelling": labelling, "sent": sent, "accepted": accepted, "reasons": reasons}


def _from_queue(client, url: str, truth: dict[str, str], budget: int, since: str,
                concurrency: int, field: str = "label", model: str | None = None,
                wait_s: float = 30.0) -> tuple[int, int, dict[str, int]]:
    """Label (or correct: `field`) `budget` of this run's answers (`truth`: request id -> true
    label or reference text) by `model` (None: any) as the platform's queue of pending labels
    orders them (`GET /pending`, one page after another), once the log holds them all (it is
    written every flush interval) or `wait_s` has passed. Returns labels sent, accepted, and
    how many of each reason the queue gave."""
    def page(limit: int) -> list[dict]:
        params = {"limit": limit, "since": since, **({"model": model} if model else {})}
        r = client.get(url + "pending", params=params)
        if r.status_code != 200:
            raise LLMOpsError(f"the label queue answered {r.status_code}: {r.text[:200]}")
        return [it for it in r.json() if it["request_id"] in truth]

    deadline = time.monotonic() + wait_s
    while len(page(QUEUE_PAGE)) < min(len(truth), QUEUE_PAGE) and time.monotonic() < deadline:
        time.sleep(0.5)
    sent = accepted = 0
    reasons: dict[str, int] = {}
    while sent < budget:
        items = page(min(budget - sent, QUEUE_PAGE))
        if not items:
            break
        for it in items:
            reasons[it["reason"]] = reasons.get(it["reason"], 0) + 1
        sent += len(items)
        accepted += _feedback(client, url, [(it["request_id"], truth[it["request_id"]])
                                            for it in items], concurrency, field)
    return sent, accepted, reasons


def _feedback(client, url: str, labels: list[tuple[str, str]], concurrency: int,
              field: str = "label", wait_s: float = 30.0) -> int:
    """POST the labels (or corrections: `field`) from `concurrency` clients, as a review team
    does (the platform checks and stores concurrent labels as one batch); a 404 means the answer
    is not in the log yet (it is written every flush interval), so those are retried until
    `wait_s` has passed."""
    def post(pair: tuple[str, str]) -> int:
        return client.post(url, json={"request_id": pair[0], field: pair[1]}).status_code

    pending, accepted = list(labels), 0
    deadline = time.monotonic() + wait_s
    with ThreadPoolExecutor(concurrency) as pool:
        while pending and time.monotonic() < deadline:
            codes = list(pool.map(post, pending))
            accepted += codes.count(201)
            pending = [pair for pair, code in zip(pending, codes) if code == 404]
            if pending:
                time.sleep(0.5)
    return accepted
