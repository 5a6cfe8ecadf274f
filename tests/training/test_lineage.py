"""OpenLineage run events (`training/lineage.py`) through the real client: what the file
transport writes reads back as a chain from data to deployment; the HTTP transport (Marquez's
API) receives the same events; a transport that fails never fails the step it describes.

The events of real fine-tunes, retrains and promotions are checked where those run:
test_cli.py (`llmops train`, then `llmops lineage`) and test_serving.py (the closed loop)."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from conftest import free_port

from training.config import LineageConfig
from training.lineage import Dataset, Lineage, chain, deployment, model_version, retrain_run

URI = "sqlite:///registry.db"


def test_a_retrained_version_reads_back_from_data_to_deployment(tmp_path):
    lineage = Lineage(LineageConfig(), tmp_path)
    generated = Dataset("generator", "support-tickets/base/seed-0", 1600, "training rows")
    with lineage.run("train.router", [generated]) as run:
        run.outputs.append(model_version(URI, "router", 1))
    lineage.deployed(URI, "models:/router/1", ["support/Classifier"], "first champion")
    parent = retrain_run("router", "retrain-router-1")
    window = Dataset("file:///log", "router", 420, "recent answers and their feedback labels")
    lineage.emit("START", *parent, [window], description="drift: retrain router")
    with lineage.run("train.router", [window, model_version(URI, "router", 1)],
                     parent=parent) as run:
        run.outputs.append(model_version(URI, "router", 2))
    lineage.emit("COMPLETE", *parent, outputs=[model_version(URI, "router", 2)])
    lineage.deployed(URI, "models:/router/2", ["support/Classifier"], "drift: v2 replaces v1")

    events = lineage.events()
    assert [e["eventType"] for e in events] == ["START", "COMPLETE", "COMPLETE", "START",
                                                "START", "COMPLETE", "COMPLETE", "COMPLETE"]
    assert all(e["producer"] and e["schemaURL"].startswith("https://openlineage.io/")
               for e in events)
    found = chain(events, "models:/router/2")
    assert found["trained_by"]["state"] == "COMPLETE"
    assert {d["name"]: d["rows"] for d in found["trained_by"]["inputs"]} == {
        "router": 420, "models:/router/1": None}
    assert found["retrain"]["run"] == parent[1] and found["retrain"]["state"] == "COMPLETE"
    assert found["retrain"]["description"] == "drift: retrain router"
    assert found["deployed"] == [{"at": found["deployed"][0]["at"], "why": "drift: v2 replaces v1",
                                  "deployments": ["support/Classifier"]}]
    [base] = found["from"]  # and back to the generated data of v1
    assert base["model"] == "models:/router/1" and base["retrain"] is None
    assert base["trained_by"]["inputs"][0] == generated.to_dict()
    assert [d["why"] for d in base["deployed"]] == ["first champion"]
    assert chain(events, "models:/router/3") == {"model": "models:/router/3", "trained_by": None,
                                                 "retrain": None, "deployed": [], "from": []}


class _Marquez(BaseHTTPRequestHandler):
    received: list[tuple[str, dict]] = []

    def do_POST(self):  # noqa: N802 (http.server's name)
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self.received.append((self.path, json.loads(body)))
        self.send_response(201)
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture
def marquez():
    server = ThreadingHTTPServer(("127.0.0.1", free_port()), _Marquez)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    _Marquez.received.clear()
    yield f"http://127.0.0.1:{server.server_address[1]}", _Marquez.received
    server.shutdown()


def test_http_transport_posts_each_event_and_a_failed_step_is_a_fail_event(marquez, tmp_path):
    url, received = marquez
    lineage = Lineage(LineageConfig(transport="http", url=url), tmp_path)
    with pytest.raises(ValueError, match="no rows"):
        with lineage.run("train.router", [Dataset("generator", "x/base/seed-0", 0)]):
            raise ValueError("no rows")
    assert [path for path, _ in received] == ["/api/v1/lineage"] * 2
    start, fail = (event for _, event in received)
    assert (start["eventType"], fail["eventType"]) == ("START", "FAIL")
    assert start["run"]["runId"] == fail["run"]["runId"]
    assert fail["run"]["facets"]["errorMessage"]["message"] == "ValueError: no rows"
    assert start["inputs"][0]["inputFacets"]["inputStatistics"]["rowCount"] == 0
    with pytest.raises(Exception, match="HTTP endpoint"):
        lineage.events()  # read in Marquez, not here


def test_an_unreachable_endpoint_never_fails_the_step(tmp_path, caplog):
    lineage = Lineage(LineageConfig(transport="http", url=f"http://127.0.0.1:{free_port()}"),
                      tmp_path)
    with lineage.run("serve.router", []) as run:
        run.outputs.append(deployment("support", "Classifier"))
    assert "not sent" in caplog.text
    Lineage(LineageConfig(transport="none"), tmp_path).deployed(URI, "models:/r/1", [], "x")
    assert not (tmp_path / "lineage").exists()


def test_http_transport_needs_a_url():
    with pytest.raises(ValueError, match="needs url"):
        LineageConfig(transport="http")
