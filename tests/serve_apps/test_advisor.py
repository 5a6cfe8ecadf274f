"""The advisor application on real Ray Serve with its policies (token, scope, quota, audit): a
simulation over HTTP and through a handle, its paths run as Ray tasks and equal to the same
simulation in-process, bad requests as 422 problems, and `llmops audit replay` running an
answer's recorded simulation again."""

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import yaml
from conftest import free_port, tiny_settings

from cluster.runtime import PLATFORM_ENV
from serve_apps.auth import issue
from serve_apps.deploy import ServeCluster, serve_config
from serve_apps.portfolio import simulate

REQUEST = {"holdings": {"SPY": 0.5, "VXUS": 0.1, "IEF": 0.3, "cash": 0.1},
           "horizon_years": 10, "risk_profile": "balanced", "paths": 12_000, "seed": 42,
           "target_return": 0.5}


@dataclass
class Advisor:
    url: str
    settings: object
    config: Path
    headers: dict


@pytest.fixture(scope="module")
def advisor(ray_session, tmp_path_factory):
    from ray import serve

    root = tmp_path_factory.mktemp("advisor")
    settings = tiny_settings(root / "state")
    port = free_port()
    settings.serve = settings.serve.model_validate({
        "port": port, "moderation": {"enabled": False}, "support": {"enabled": False},
        "chat": {"enabled": False}, "feedback": {"enabled": False},
        "advisor": {"portfolio": {"block_paths": 2000}}})
    config = root / "llmops.yaml"
    config.write_text(yaml.safe_dump(settings.model_dump(mode="json")))
    cluster = ServeCluster(ray_session.dashboard)
    serve.shutdown()  # Serve keeps the port it started on: start it on this module's own
    cluster.deploy(serve_config(settings.serve, None, False, dict(PLATFORM_ENV),
                                governance=settings.governance()), timeout_s=120)
    token = issue(settings.serve.auth, settings.data_dir, tenant="advisory", scopes=["advise"])
    yield Advisor(settings.serve.url, settings, config, {"Authorization": f"Bearer {token}"})
    cluster.shutdown()
    serve.shutdown()


def _llmops(advisor: Advisor, *args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cluster.cli", *args, "--config",
                           str(advisor.config)], capture_output=True, text=True, timeout=300,
                          env={**os.environ, **env})


def test_a_simulation_over_http_equals_the_same_seed_in_process_and_is_replayed(advisor):
    r = httpx.post(f"{advisor.url}/v1/advisor/simulate", json=REQUEST, headers=advisor.headers,
                   timeout=120)
    assert r.status_code == 200, r.text
    body = r.json()
    # the service split the paths into Ray tasks; the figures are those of one process
    local = simulate(REQUEST, advisor.settings.serve.advisor.portfolio, workers=0)
    assert body["figures"] == local["figures"] and body["rebalance"] == local["rebalance"]
    assert body["disclaimer"] == advisor.settings.serve.advisor.disclaimer
    assert body["asset_classes"] == {"us_equity": 0.5, "intl_equity": 0.1, "govt_bonds": 0.3,
                                     "cash": 0.1}
    rid = body["request_id"]

    replayed = _llmops(advisor, "audit", "replay", rid, "--json")
    assert replayed.returncode == 0, replayed.stderr[-2000:]
    report = json.loads(replayed.stdout)
    [tool] = report["tools"]
    assert report["match"] and tool["tool"] == "simulate_portfolio" and tool["seed"] == 42
    assert tool["same_config"] and tool["figures"] == len(body["figures"]) >= 12
    human = _llmops(advisor, "audit", "replay", rid)
    assert human.returncode == 0 and "figures MATCH" in human.stdout

    # under another risk-free rate the Sharpe ratio differs, and the replay says so
    changed = _llmops(advisor, "audit", "replay", rid, "--json",
                      LLMOPS_SERVE__ADVISOR__PORTFOLIO__RISK_FREE_RATE="0.03")
    assert changed.returncode == 1, changed.stderr[-2000:]
    report = json.loads(changed.stdout)
    assert not report["match"] and not report["tools"][0]["same_config"]
    assert set(report["tools"][0]["differences"]) == {"sharpe_ratio"}

    for args, message in [(("nosuch",), "no audit record of request 'nosuch'")]:
        proc = _llmops(advisor, "audit", "replay", *args)
        assert proc.returncode == 2 and message in proc.stderr, proc.stderr[-2000:]
        assert proc.stderr.count("\n") == 1


@pytest.mark.parametrize("change, message", [
    ({"holdings": {"SPY": 0.5, "IEF": 0.3}}, "weights sum to 0.8"),
    ({"holdings": {"SPY": 0.5, "XYZ": 0.5}}, "unknown assets ['XYZ']"),
    ({"horizon_years": -2}, "horizon_years"),
    ({"paths": 10 ** 9}, "paths: at most 200000"),
])
def test_bad_simulation_requests_are_422_problems(advisor, change, message):
    r = httpx.post(f"{advisor.url}/v1/advisor/simulate", json={**REQUEST, **change},
                   headers=advisor.headers, timeout=60)
    assert r.status_code == 422 and r.headers["content-type"] == "application/problem+json"
    assert message in r.json()["detail"], r.text


def test_the_advise_scope_guards_it_and_handles_state_their_principal(advisor):
    from ray import serve

    other = issue(advisor.settings.serve.auth, advisor.settings.data_dir, tenant="advisory",
                  scopes=["chat"])
    r = httpx.post(f"{advisor.url}/v1/advisor/simulate", json=REQUEST, timeout=60,
                   headers={"Authorization": f"Bearer {other}"})
    assert r.status_code == 403 and "advise" in r.json()["detail"]
    assert httpx.post(f"{advisor.url}/v1/advisor/simulate", json=REQUEST,
                      timeout=60).status_code == 401
    handle = serve.get_app_handle("advisor")
    principal = {"subject": "batch", "tenant": "advisory", "scopes": ["advise"]}
    out = handle.simulate.remote({**REQUEST, "paths": 2000}, None, principal).result(
        timeout_s=120)
    assert out["request_id"] and out["figures"]["var_99"] >= out["figures"]["var_95"]
    # its audit record: the tool call, its seed and figures
    from monitoring.audit import find

    record = find(advisor.settings.audit_dir, out["request_id"])
    [tool] = record["tools"]
    assert record["application"] == "advisor" and record["principal"] == "batch"
    assert tool["arguments"]["seed"] == 42 and tool["result"] == out["figures"]
    assert _llmops(advisor, "audit", "replay", out["request_id"]).returncode == 0
