"""Drift detection with Evidently and the health check, on the features of a real (small)
registered classifier, against the reference profile and golden-set figures registered with it
in MLflow (the log: test_log.py; feedback and the label queue: test_feedback.py)."""

import time
from dataclasses import replace
from datetime import UTC, datetime

import numpy as np
import pandas as pd
import pytest
from conftest import register_quick

from monitoring.config import DriftConfig
from monitoring.drift import NotEnoughData, check_window, decide, kl_divergence, windows
from training.data import SCENARIOS, generate


def test_kl_divergence_is_zero_for_equal_mixes_and_grows_with_shift():
    ref = pd.Series(["a"] * 50 + ["b"] * 50)
    assert kl_divergence(ref, ref, ["a", "b"]) == pytest.approx(0, abs=1e-12)
    small = kl_divergence(pd.Series(["a"] * 60 + ["b"] * 40), ref, ["a", "b"])
    large = kl_divergence(pd.Series(["a"] * 90 + ["b"] * 10), ref, ["a", "b"])
    assert 0 < small < large


@pytest.fixture(scope="module")
def router(tmp_path_factory):
    """A small support router (~0.9 accuracy, seconds to train), registered with its profile."""
    from conftest import tiny_settings

    from serve_apps.model import load
    from training.registry import Registry

    settings = tiny_settings(tmp_path_factory.mktemp("drift"))
    tasks = dict(settings.training.tasks)
    tc = tasks["support-router"]
    tasks["support-router"] = tc.model_copy(update={
        "train_size": 1200, "holdout_size": 300, "model": tc.model.model_copy(
        update={"freeze_embeddings": False, "architecture": {
            "hidden_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
            "intermediate_size": 128}})})
    settings.training.tasks = tasks
    registry = Registry(settings.registry, settings.data_dir)
    register_quick(settings, registry, "support-router", epochs=10, lr=1e-3)
    model = load("models:/support-router/1", registry.tracking_uri)
    return registry, model


def _window(model, scenario: str, seed: int, n: int = 500, feedback: bool = False) -> pd.DataFrame:
    """What the inference log holds for n requests of `scenario` mixed 50% into base traffic."""
    df = generate("support-tickets", scenario, n, seed=seed, fraction=0.5)
    rows = [{**o["features"], "prediction": o["label"], "confidence": o["confidence"]}
            for o in model.classify(list(df.text))]
    window = pd.DataFrame(rows)
    window["ts"] = pd.Timestamp.now(tz="UTC")
    window["label"] = list(df.label) if feedback else None
    return window


def test_drift_detected_in_one_window_for_every_scenario_and_quiet_on_clean_traffic(router):
    registry, model = router
    config = DriftConfig()
    reference = registry.reference_profile("support-router", "1")
    assert len(reference) == 500 and {"embedding", "prediction", "label"} <= set(reference.columns)
    assert (reference.prediction == reference.label).mean() > 0.8

    def check(window: pd.DataFrame):
        return check_window(window, reference, config.thresholds, model="support-router",
                            version="1", min_rows=config.min_rows)

    clean = [check(_window(model, "base", seed, feedback=seed % 2 == 0)) for seed in range(20)]
    decisions = [decide(clean[:i + 1], config, "support-router", "1") for i in range(20)]
    assert not any(d.drift for d in decisions)  # 20 consecutive clean windows: never declared
    assert sum(r.drifted for r in clean) <= 2
    assert any(r.labelled == 500 for r in clean)
    # labels asked for the least confident answers only (the label queue's way): still quiet,
    # where accuracy against the reference rows' would read as a large drop
    right = (reference.prediction == reference.label).mean()
    hardest = [w.assign(label=w.label.where(w.confidence.rank(method="first") <= 40))
               for w in (_window(model, "base", seed, feedback=True) for seed in (40, 41))]
    for w in hardest:
        asked = w.dropna(subset=["label"])
        assert right - (asked.prediction == asked.label).mean() > config.thresholds \
            .feedback_accuracy_drop  # what a comparison with the reference rows would see
        assert not check(w).metric("feedback_accuracy_drop").drifted

    for scenario in sorted(set(SCENARIOS) - {"base"}):
        report = check(_window(model, scenario, 100, feedback=True))
        assert report.drifted, (scenario, report.metrics)
    shifted = check(_window(model, "label-shift", 101))
    assert shifted.metric("kl_divergence").drifted
    novel = check(_window(model, "new-product", 101))
    assert novel.metric("embedding_drift").drifted
    concept = check(_window(model, "concept-shift", 101, feedback=True))
    assert concept.metric("feedback_accuracy_drop").drifted  # the inputs alone look clean
    assert not concept.metric("embedding_drift").drifted


def test_confidence_drifts_only_when_it_moved_against_its_spread_and_in_itself(router):
    """A confident version (confidences within a hundredth) with a few more doubts than its
    reference is quiet, though its normed Wasserstein passes; a real fall in confidence drifts,
    and so does a widely spread one's."""
    registry, model = router
    thresholds = DriftConfig().thresholds
    reference = registry.reference_profile("support-router", "1")
    window = _window(model, "base", 8)
    rng = np.random.default_rng(0)

    def check(ref_conf: np.ndarray, conf: np.ndarray):
        report = check_window(window.assign(confidence=conf), reference.assign(confidence=ref_conf),
                              thresholds, model="support-router", version="1", min_rows=100)
        return report.metric("confidence_drift"), report.metric("confidence_energy")

    confident = 1 - np.abs(rng.normal(0, 0.01, len(reference)))
    doubts = 1 - np.abs(rng.normal(0, 0.01, len(window)))
    doubts[:8] = rng.uniform(0.75, 0.9, 8)  # 1.6% of answers unsure, against about 0 before
    normed, energy = check(confident, doubts)
    assert normed.value >= thresholds.confidence_drift and not normed.drifted
    assert energy.value < thresholds.confidence_energy and not energy.drifted
    fallen = doubts.copy()
    fallen[:100] = rng.uniform(0.4, 0.8, 100)  # a fifth of the answers unsure
    assert all(m.drifted for m in check(confident, fallen))
    spread = rng.uniform(0.5, 1.0, len(reference))
    normed, energy = check(spread, rng.uniform(0.5, 1.0, len(window)))  # the same world
    assert energy.value >= thresholds.confidence_energy and not energy.drifted
    assert normed.value < thresholds.confidence_drift and not normed.drifted
    assert all(m.drifted for m in check(spread, rng.uniform(0.4, 0.85, len(window))))


def test_drift_policy_needs_k_of_n_windows_and_enough_rows(router):
    registry, model = router
    config = DriftConfig(k=2, n=3, window=100, min_rows=100)
    reference = registry.reference_profile("support-router", "1")
    drifted = check_window(_window(model, "new-product", 3, n=300), reference, config.thresholds,
                           model="support-router", version="1", min_rows=100)
    clean = check_window(_window(model, "base", 4, n=300), reference, config.thresholds,
                         model="support-router", version="1", min_rows=100)
    assert drifted.drifted and not clean.drifted
    assert not decide([clean, drifted, clean], config, "m", "1").drift  # one window is noise
    assert decide([drifted, clean, drifted], config, "m", "1").drift
    # the onset a retrain learns from: the first drifted window's start
    hours = [replace(w, start=f"2026-12-03 1{h}:00:00+00:00")
             for h, w in enumerate([clean, drifted, drifted])]
    onset = datetime(2026, 12, 3, 11, tzinfo=UTC).timestamp()
    assert decide(hours, config, "m", "1").onset == onset
    assert decide([clean] * 3, config, "m", "1").onset is None
    with pytest.raises(NotEnoughData, match="at least 100"):
        check_window(_window(model, "base", 5, n=99), reference, config.thresholds,
                     model="support-router", version="1", min_rows=100)


def test_a_retrained_version_compares_inputs_with_the_traffic_it_was_retrained_to_serve(router):
    """Its held-out rows are mostly replay of the old traffic: against them, the traffic it was
    retrained for reads as drift for as long as it serves it. With that traffic profiled
    (unlabelled, `served`), the same traffic is quiet, new drift beyond it is not, and the
    feedback is still judged against the held-out rows' labels."""
    from training.features import SERVED

    registry, model = router
    config = DriftConfig()
    held_out = registry.reference_profile("support-router", "1").assign(**{SERVED: False})
    served = _window(model, "new-product", 200, n=800).drop(columns="ts").assign(**{SERVED: True})
    profile = pd.concat([held_out, served], ignore_index=True)

    def check(window: pd.DataFrame, reference: pd.DataFrame):
        return check_window(window, reference, config.thresholds, model="support-router",
                            version="1", min_rows=config.min_rows)

    now = _window(model, "new-product", 201)
    assert check(now, held_out).metric("embedding_drift").drifted
    quiet = check(now, profile)
    assert not quiet.drifted, quiet.metrics
    # (this small router never learnt the new product: its labels say so, as before)
    labelled = _window(model, "new-product", 201, feedback=True)
    assert check(labelled, profile).metric("feedback_accuracy_drop").value == pytest.approx(
        check(labelled, held_out).metric("feedback_accuracy_drop").value)
    assert check(_window(model, "slang", 202), profile).drifted
    concept = check(_window(model, "concept-shift", 203, feedback=True), profile)
    assert concept.metric("feedback_accuracy_drop").drifted


def test_a_label_shift_the_served_answers_adjust_to_is_not_drift(router):
    """Once the loop serves new priors, live answers are adjusted to them (their prediction and
    confidence; the log keeps the trained posterior): the reference is drawn again in the new
    proportions and answered the same way, so the shift it answers is quiet."""
    from monitoring.drift import reweighted
    from training.priors import estimate, ratios, resample, training_priors

    registry, model = router
    config = DriftConfig()
    reference = registry.reference_profile("support-router", "1")
    labels = model.meta["labels"]
    df = generate("support-tickets", "label-shift", 500, seed=300)
    raw = np.stack([o["features"]["posterior"] for o in model.classify(list(df.text))])
    train = training_priors(labels, reference.label)
    priors = dict(zip(labels, estimate(raw, train)))
    adjusted = model.classify(list(df.text), priors=ratios(priors, dict(zip(labels, train))))
    window = pd.DataFrame([{**o["features"], "prediction": o["label"],
                            "confidence": o["confidence"]} for o in adjusted]).assign(
        ts=pd.Timestamp.now(tz="UTC"), label=None)
    served = reweighted(reference, priors)
    assert served.label.value_counts(normalize=True).reindex(labels).to_numpy() \
        == pytest.approx(list(priors.values()), abs=0.01)
    plain = resample(reference, labels, np.array(list(priors.values())))
    assert served.posterior.equals(plain.posterior)  # the trained posterior, as logged
    assert not np.allclose(served.confidence, plain.confidence)  # answered under the new priors
    report = check_window(window, served, config.thresholds, model="support-router",
                          version="1", min_rows=config.min_rows)
    assert not report.metric("confidence_drift").drifted, report.metrics
    assert not report.metric("kl_divergence").drifted


def test_drift_report_saves_an_evidently_html_report(router, tmp_path):
    registry, model = router
    reference = registry.reference_profile("support-router", "1")
    started = time.perf_counter()
    report = check_window(_window(model, "slang", 7, n=300), reference,
                          DriftConfig().thresholds, model="support-router", version="1",
                          min_rows=100, html_path=tmp_path / "r.html")
    assert report.seconds <= time.perf_counter() - started
    html = (tmp_path / "r.html").read_text()
    assert "Drifted Columns" in html and "column 'confidence" in html
    assert {m.name for m in report.metrics} == {
        "share_of_drifted_descriptors", "prediction_drift", "confidence_drift", "confidence_energy",
        "embedding_drift", "kl_divergence"}
    assert all(np.isfinite(m.value) for m in report.metrics)


def test_windows_end_with_the_newest_request():
    log = pd.DataFrame({"i": range(1050)})
    parts = [list(w.i) for w in windows(log, 500)]
    assert [len(p) for p in parts] == [50, 500, 500] and parts[-1][-1] == 1049

def test_health_check_compares_golden_set_figures_with_the_registration(router):
    from monitoring.config import HealthConfig
    from monitoring.health import check_champions, compare
    from training.errors import UnknownName

    registry, _ = router
    registered = registry.run_metrics("support-router", "1")
    assert {"golden_accuracy", "golden_confidence", "golden_latency_p50_ms",
            "golden_latency_p99_ms"} <= set(registered)
    # quality and confidence must equal the registration's; latency on two busy cores (two
    # test sessions side by side) swings several-fold, so its rule is checked apart (`slow`)
    [health] = check_champions(registry, HealthConfig(latency_factor=50))
    assert health.healthy and health.error is None, health
    checks = {c.name: c for c in health.checks}
    # The same rows through the same function: the same answers as at registration.
    assert checks["accuracy"].value == round(registered["golden_accuracy"], 4)
    assert checks["latency_p50_ms"].limit == pytest.approx(
        registered["golden_latency_p50_ms"] * 50 + 20, abs=1e-3)

    [slow] = check_champions(registry, HealthConfig(latency_factor=0.01, latency_slack_ms=0),
                             ["support-router"])
    assert not slow.healthy and [c.name for c in slow.checks if not c.ok] == ["latency_p50_ms"]
    with pytest.raises(UnknownName, match="nosuch"):
        check_champions(registry, HealthConfig(), ["nosuch"])

    base = {"golden_exact_match": 0.9, "golden_confidence": 0.8, "golden_latency_p50_ms": 10.0}
    now = {"exact_match": 0.87, "confidence": 0.8, "latency_p50_ms": 35.0}
    verdict = {c.name: c.ok for c in compare(now, base, "causal-lm", HealthConfig())}
    assert verdict == {"exact_match": False, "confidence": True, "latency_p50_ms": True}
    verdict = {c.name: c.ok for c in compare({**now, "exact_match": 0.89, "latency_p50_ms": 41},
                                             base, "causal-lm", HealthConfig())}
    assert verdict == {"exact_match": True, "confidence": True, "latency_p50_ms": False}


def test_healthcheck_command_writes_a_textfile_and_pushes_to_a_pushgateway(router, tmp_path,
                                                                           capsys, monkeypatch):
    import http.server
    import json
    import threading

    from cluster.cli import main

    registry, _ = router
    pushed = []

    class Gateway(http.server.BaseHTTPRequestHandler):
        def do_PUT(self):
            pushed.append((self.path, self.rfile.read(int(self.headers["Content-Length"]))))
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args):
            pass

    monkeypatch.setenv("LLMOPS_MONITORING__HEALTH__LATENCY_FACTOR", "50")  # (as above)
    server = http.server.HTTPServer(("127.0.0.1", 0), Gateway)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    data_dir = ["--data-dir", str(registry.data_dir)]
    try:
        code = main(["healthcheck", *data_dir, "--textfile", str(tmp_path / "h.prom"),
                     "--pushgateway", f"127.0.0.1:{server.server_port}", "--json"])
    finally:
        server.shutdown()
        server.server_close()  # the port refuses now: the next push fails before measuring
    out = json.loads(capsys.readouterr().out)
    assert code == 0 and out["healthy"] and out["textfile"] == str(tmp_path / "h.prom")
    textfile = (tmp_path / "h.prom").read_text()
    assert 'llmops_healthcheck_healthy{model="support-router",model_version="1"} 1.0' in textfile
    [(path, body)] = pushed
    assert path == "/metrics/job/llmops_healthcheck" and b"llmops_healthcheck_value" in body

    code = main(["healthcheck", *data_dir, "--textfile", str(tmp_path / "h.prom"),
                 "--pushgateway", f"127.0.0.1:{server.server_port}"])
    assert code == 2 and "cannot push to 127.0.0.1" in capsys.readouterr().err
    assert main(["healthcheck", "nosuch", *data_dir]) == 2
    assert "unknown registered model 'nosuch'" in capsys.readouterr().err
