"""The shipped Prometheus alert rules, scrape config and Grafana dashboard: promtool's own unit
tests and checks, and every dashboard query parsed by Prometheus's PromQL parser."""

import json
import shutil
import subprocess

import pytest
import yaml
from conftest import MONITORING, dashboard_exprs

PROMETHEUS = MONITORING / "prometheus"


def _promtool(*args: str, cwd=PROMETHEUS) -> subprocess.CompletedProcess:
    if shutil.which("promtool") is None:
        pytest.fail("promtool is missing: `make install` installs Debian's prometheus package")
    return subprocess.run(["promtool", *args], capture_output=True, text=True, cwd=cwd, timeout=120)


def test_alert_rules_pass_their_promtool_unit_tests():
    checked = _promtool("check", "rules", "alerts.yml")
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "15 rules found" in checked.stdout
    tested = _promtool("test", "rules", "alerts_test.yml")
    assert tested.returncode == 0, tested.stdout + tested.stderr
    tests = yaml.safe_load((PROMETHEUS / "alerts_test.yml").read_text())["tests"]
    covered = {t["alertname"] for group in tests for t in group["alert_rule_test"]}
    rules = yaml.safe_load((PROMETHEUS / "alerts.yml").read_text())["groups"]
    assert covered == {r["alert"] for g in rules for r in g["rules"]}  # every alert is tested


def test_scrape_config_is_valid_and_scrapes_ray_and_the_monitor():
    checked = _promtool("check", "config", "prometheus.yml")
    assert checked.returncode == 0, checked.stdout + checked.stderr
    jobs = {j["job_name"]: j for j in
            yaml.safe_load((PROMETHEUS / "prometheus.yml").read_text())["scrape_configs"]}
    assert jobs["ray"]["file_sd_configs"][0]["files"] == [
        "/tmp/ray/prom_metrics_service_discovery.json"]
    assert jobs["llmops-monitor"]["static_configs"][0]["targets"] == ["127.0.0.1:9108"]


def test_every_dashboard_query_is_valid_promql(tmp_path):
    dashboard = json.loads((MONITORING / "grafana" / "llmops.json").read_text())
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    assert len({p["id"] for p in dashboard["panels"]}) == len(dashboard["panels"])
    assert all(p["datasource"]["uid"] == "${datasource}" for p in panels)  # importable as is
    exprs = dashboard_exprs()
    assert len(exprs) >= len(panels)
    # Grafana's variables, as Grafana would substitute them, then each query as a recording rule.
    rules = [{"record": f"llmops:panel_{i}", "expr": e.replace("$__rate_interval", "1m")
              .replace("$application", ".*").replace("$model", ".*")}
             for i, e in enumerate(exprs)]
    path = tmp_path / "dashboard_rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    checked = _promtool("check", "rules", str(path), cwd=tmp_path)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    titles = {p["title"] for p in panels}
    assert {"Requests per second", "Latency p50 / p99", "Error ratio",
            "Replicas: healthy and target", "Batch size and forward pass",
            "Drift scores against thresholds", "Versions in service",
            "Retrain timeline"} <= titles
