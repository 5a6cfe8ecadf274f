"""Monitoring: the inference log's writer and reader, and drift detection with Evidently on the
features of a real (small) registered classifier, against the reference profile registered with
it in MLflow."""

import asyncio
import time
from datetime import timedelta
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import register_quick

from monitoring.config import DriftConfig, LogConfig
from monitoring.drift import NotEnoughData, check_window, decide, kl_divergence, windows
from monitoring.log import FEEDBACK, INFERENCE, SegmentWriter, now, read, with_feedback
from training.data import SCENARIOS, generate
from training.features import DESCRIPTORS


def _record(i: int, **extra) -> dict:
    return {"request_id": f"r{i}", "item": 0, "ts": now(), "tenant": "default",
            "application": "support", "model": "support-router", "model_version": "1",
            "variant": "champion", "stages": {"router": "support-router/1"},
            **dict.fromkeys(DESCRIPTORS, 1.0), "embedding": [0.0] * 4, "prediction": "billing",
            "confidence": 0.9, "latency_ms": 3.0, "outcome": "ok", **extra}


def test_segment_writer_batches_bounds_memory_and_flushes_on_close(tmp_path):
    uri = str(tmp_path / "log")

    async def scenario() -> list[int]:
        writer = SegmentWriter(uri, INFERENCE, LogConfig(flush_interval_s=0.2, max_buffered=50))
        seen = []
        await writer.append([_record(i) for i in range(10)])
        seen.append(len(read(uri)))  # buffered, not written on the request path
        await asyncio.sleep(0.5)
        seen.append(len(read(uri)))  # the periodic flush wrote them
        await writer.append([_record(i) for i in range(10, 70)])  # over max_buffered: written now
        seen.append(len(read(uri)))
        await writer.append([_record(i) for i in range(70, 75)])
        await writer.close()  # what a replica's graceful shutdown does
        seen.append(len(read(uri)))
        return seen

    assert asyncio.run(scenario()) == [0, 10, 70, 75]
    log = read(uri)
    assert list(log.request_id) == [f"r{i}" for i in range(75)]  # time order
    assert list(read(uri, last=5).request_id) == [f"r{i}" for i in range(70, 75)]
    assert read(uri, model="moderation").empty
    assert len(read(uri, since=log.ts[10])) == 65
    assert len(read(uri, until=log.ts[10])) == 10
    hidden = [p for p in (tmp_path / "log").rglob("*") if p.name.startswith(".")]
    assert not hidden  # no half-written segment left behind
    assert read(uri, FEEDBACK).empty


def _segments(uri: str, kind: str = INFERENCE) -> list:
    return sorted(p for p in (Path(uri) / kind).rglob("*.parquet") if not p.name.startswith("."))


def test_compaction_merges_small_segments_per_day_and_loses_nothing(tmp_path):
    from monitoring.compaction import compact

    uri = str(tmp_path / "log")
    writer = SegmentWriter(uri, INFERENCE, LogConfig())
    yesterday = now() - timedelta(days=1)
    for i in range(24):  # 12 segments a day, two days
        writer.write_segment([_record(i * 3 + j, ts=yesterday if i % 2 else now())
                              for j in range(3)])
    SegmentWriter(uri, FEEDBACK, LogConfig()).write_segment(
        [{"request_id": "r1", "item": 0, "label": "billing", "ts": now(), "tenant": "default"}])
    before = read(uri)
    assert len(_segments(uri)) == 24 and len(before) == 72

    small = compact(uri, INFERENCE, target_bytes=4 * _segments(uri)[0].stat().st_size)
    assert small.written >= 4 and small.merged > small.written  # bins of up to the target
    assert len(_segments(uri)) < 24
    done = compact(uri, INFERENCE, target_bytes=2**26)
    assert len(_segments(uri)) == 2  # one per day
    assert done.merged == small.written + (24 - small.merged)
    after = read(uri)
    pd.testing.assert_frame_equal(after.sort_values("request_id").reset_index(drop=True),
                                  before.sort_values("request_id").reset_index(drop=True))
    assert compact(uri, INFERENCE, target_bytes=2**26).merged == 0  # nothing small is left
    assert compact(uri, FEEDBACK, target_bytes=2**26).merged == 0  # one segment stays as it is
    assert len(read(uri, since=now() - timedelta(hours=1))) == 36  # pruned by day, then by time


def test_a_merge_cut_off_before_its_removals_leaves_copies_readers_never_see(tmp_path,
                                                                            monkeypatch):
    import fsspec.implementations.local as local

    from monitoring.compaction import compact

    uri = str(tmp_path / "log")
    writer = SegmentWriter(uri, INFERENCE, LogConfig())
    for i in range(5):
        writer.write_segment([_record(i)])
    real_rm = local.LocalFileSystem.rm
    monkeypatch.setattr(local.LocalFileSystem, "rm", lambda *a, **k: (_ for _ in ()).throw(
        OSError("the compactor died here")))
    with pytest.raises(OSError, match="died here"):
        compact(uri, INFERENCE, target_bytes=2**26)
    assert len(_segments(uri)) == 6  # the merged segment and the five it merged
    assert sorted(read(uri).request_id) == [f"r{i}" for i in range(5)]  # each record once
    monkeypatch.setattr(local.LocalFileSystem, "rm", real_rm)
    compact(uri, INFERENCE, target_bytes=2**26)  # the next pass removes the copies
    assert len(_segments(uri)) == 1
    assert sorted(read(uri).request_id) == [f"r{i}" for i in range(5)]


def test_reads_while_the_log_is_written_and_compacted_see_every_record_once(tmp_path):
    """A writer, a compactor and a reader at once: each read holds every record written before
    it began, none twice."""
    import threading

    from monitoring.compaction import compact

    uri = str(tmp_path / "log")
    writer = SegmentWriter(uri, INFERENCE, LogConfig())
    writer.write_segment([_record(0)])
    written, stop, errors = [1], threading.Event(), []

    def write() -> None:
        for i in range(1, 120):
            writer.write_segment([_record(i)])
            written[0] = i + 1

    def compact_all() -> None:
        while not stop.is_set():
            try:
                compact(uri, INFERENCE, target_bytes=2**26)
            except Exception as exc:  # noqa: BLE001 - reported below
                errors.append(exc)

    threads = [threading.Thread(target=write), threading.Thread(target=compact_all)]
    for t in threads:
        t.start()
    reads = 0
    while threads[0].is_alive() or reads < 5:
        floor = written[0]
        ids = list(read(uri).request_id)
        assert len(ids) == len(set(ids)) >= floor
        reads += 1
    stop.set()
    for t in threads:
        t.join()
    assert not errors
    assert sorted(read(uri).request_id) == sorted(f"r{i}" for i in range(120))


def test_a_failed_segment_write_keeps_its_rows_and_the_flusher_goes_on(tmp_path, monkeypatch):
    """The log folder unwritable for a while: nothing appended is dropped, the periodic flush
    keeps trying, and the rows land once it is writable again."""
    from monitoring.log import LogUnavailable

    uri = str(tmp_path / "log")
    real = SegmentWriter.write_segment
    broken = {"on": True}

    def flaky(self, rows):
        if broken["on"]:
            raise OSError("no space left on device")
        return real(self, rows)

    monkeypatch.setattr(SegmentWriter, "write_segment", flaky)

    async def scenario() -> None:
        writer = SegmentWriter(uri, INFERENCE, LogConfig(flush_interval_s=0.05))
        await writer.append([_record(i) for i in range(5)])
        with pytest.raises(LogUnavailable, match="no space left"):
            await writer.flush()
        await writer.append([_record(5)])
        await asyncio.sleep(0.3)  # several periodic flushes fail meanwhile
        assert writer._flusher is not None and not writer._flusher.done()
        broken["on"] = False
        await asyncio.sleep(2)  # the backed-off flusher retries
        assert len(read(uri)) == 6
        await writer.close()

    asyncio.run(scenario())
    assert list(read(uri).request_id) == [f"r{i}" for i in range(6)]


def test_feedback_joins_by_request_and_item_latest_label_wins(tmp_path):
    log = pd.DataFrame([_record(1), _record(2), {**_record(2), "item": 1}])
    t = now()
    feedback = pd.DataFrame([
        {"request_id": "r2", "item": 1, "label": "refund", "ts": t, "tenant": "default"},
        {"request_id": "r2", "item": 1, "label": "billing", "ts": t + timedelta(seconds=1),
         "tenant": "default"}])
    joined = with_feedback(log, feedback)
    assert joined.label.isna().tolist() == [True, True, False]
    assert joined.label.iloc[2] == "billing"


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
    with pytest.raises(NotEnoughData, match="at least 100"):
        check_window(_window(model, "base", 5, n=99), reference, config.thresholds,
                     model="support-router", version="1", min_rows=100)


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
        "share_of_drifted_descriptors", "prediction_drift", "confidence_drift",
        "embedding_drift", "kl_divergence"}
    assert all(np.isfinite(m.value) for m in report.metrics)


def test_windows_end_with_the_newest_request():
    log = pd.DataFrame({"i": range(1050)})
    parts = [list(w.i) for w in windows(log, 500)]
    assert [len(p) for p in parts] == [50, 500, 500] and parts[-1][-1] == 1049


def test_feedback_is_checked_against_the_log_and_the_models_labels(tmp_path):
    from monitoring.feedback import InvalidLabel, Label, UnknownRequest, feedback_row, feedback_rows

    uri = str(tmp_path / "log")
    writer = SegmentWriter(uri, INFERENCE, LogConfig())
    writer.write_segment([_record(1), {**_record(2), "model": "rewriter", "prediction": "stop"},
                          {**_record(3), "model": None, "outcome": "error"}])
    labels = {"support-router": ["billing", "refund"], "rewriter": []}

    def labels_of(model: str, version: str) -> list[str]:
        assert version == "1"
        return labels[model]

    row = feedback_row(uri, labels_of, "r1", 0, "refund", "default")
    assert row == {"request_id": "r1", "item": 0, "label": "refund", "tenant": "default"}
    bad = [("nope", 0, "refund", "default", UnknownRequest, "no logged request"),
           ("r1", 3, "refund", "default", UnknownRequest, "item 3"),
           # another tenant's request reads exactly as an unknown one
           ("r1", 0, "refund", "other", UnknownRequest, "no logged request 'r1' with item 0"),
           ("r1", 0, "shipping", "default", InvalidLabel, "billing, refund"),
           ("r2", 0, "refund", "default", InvalidLabel, "answers with text"),
           ("r3", 0, "refund", "default", InvalidLabel, "did not get a prediction")]
    for rid, item, label, tenant, error, message in bad:
        with pytest.raises(error, match=message):
            feedback_row(uri, labels_of, rid, item, label, tenant)
    # a batch is checked with one read: each label gets its own record or error, in order
    batch = [Label(*case[:4]) for case in bad]
    batch.insert(3, Label("r1", 0, "billing", "default"))
    checked = feedback_rows(uri, labels_of, batch)
    assert checked[3] == {"request_id": "r1", "item": 0, "label": "billing", "tenant": "default"}
    del checked[3]
    assert [type(c) for c in checked] == [case[4] for case in bad]


def test_the_label_queue_puts_disagreements_and_doubts_first_per_label_and_explores(tmp_path):
    from monitoring.config import LabelQueueConfig
    from monitoring.feedback import pending

    uri = str(tmp_path / "log")
    rng = np.random.default_rng(0)
    labels = ["billing", "refund", "shipping"]
    # 90 answers: billing predicted 60 times, refund 20, shipping 10; confidence known
    rows = [_record(i, prediction=labels[0 if i < 60 else 1 if i < 80 else 2],
                    confidence=float(rng.uniform(0.3, 1.0)), posterior=[0.3, 0.3, 0.4],
                    text=f"ticket {i}") for i in range(90)]
    rows[5]["confidence"] = 0.99  # confident, but a shadowing challenger says otherwise
    shadow = {**rows[5], "variant": "shadow", "model_version": "2", "prediction": "refund"}
    other = [_record(100 + i, tenant="neighbour", confidence=0.01, posterior=[1, 0, 0])
             for i in range(5)]
    generated = {**_record(200, confidence=0.01), "posterior": None}  # no posterior: a generator
    SegmentWriter(uri, INFERENCE, LogConfig()).write_segment([*rows, shadow, *other, generated])
    SegmentWriter(uri, FEEDBACK, LogConfig()).write_segment([  # already labelled: not pending
        {"request_id": "r7", "item": 0, "label": "billing", "ts": now(), "tenant": "default"}])
    config = LabelQueueConfig(explore=0.25)
    page = pending(uri, "default", 12, config)
    ids = [it["request_id"] for it in page]
    assert len(page) == 12 and len(set(ids)) == 12
    assert page[0]["request_id"] == "r5" and page[0]["reason"] == "disagreement"
    assert not {"r7", "r200"} & set(ids) and not any(i.startswith("r10") for i in ids)
    useful, drawn = page[:9], page[9:]
    assert [it["reason"] for it in drawn] == ["random"] * 3
    assert {it["prediction"] for it in useful[1:4]} == set(labels)  # each label in turn
    by_label = {}
    for it in useful[1:]:
        by_label.setdefault(it["prediction"], []).append(it["confidence"])
    least = {lab: sorted(round(r["confidence"], 4) for r in rows if r["prediction"] == lab
                         and r["request_id"] not in ("r5", "r7"))
             for lab in labels}
    for lab, seen in by_label.items():  # each label's least confident, in order
        assert seen == least[lab][:len(seen)]
    assert page[1]["text"].startswith("ticket") and page[0]["model_version"] == "1"
    assert pending(uri, "neighbour", 50, config) and all(
        it["request_id"].startswith("r10") for it in pending(uri, "neighbour", 50, config))
    assert pending(uri, "default", 12, config, model="moderation") == []
    assert len(pending(uri, "default", 500, config)) == 89  # all but r7 (the shadow is r5's)


def test_health_check_compares_golden_set_figures_with_the_registration(router):
    from monitoring.config import HealthConfig
    from monitoring.health import check_champions, compare
    from training.errors import UnknownName

    registry, _ = router
    registered = registry.run_metrics("support-router", "1")
    assert {"golden_accuracy", "golden_confidence", "golden_latency_p50_ms",
            "golden_latency_p99_ms"} <= set(registered)
    [health] = check_champions(registry, HealthConfig())
    assert health.healthy and health.error is None, health
    checks = {c.name: c for c in health.checks}
    # The same rows through the same function: the same answers as at registration.
    assert checks["accuracy"].value == round(registered["golden_accuracy"], 4)
    assert checks["latency_p50_ms"].limit == pytest.approx(
        registered["golden_latency_p50_ms"] * 2 + 20, abs=1e-3)

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
                                                                           capsys):
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
