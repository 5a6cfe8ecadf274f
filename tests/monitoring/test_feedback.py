"""Feedback labels (`monitoring/feedback.py`): each checked against the logged request, its
tenant and its model's labels, one by one or in a batch with one read; and the queue of answers
awaiting a label, disagreements and doubts first, each predicted label in turn, the rest spread
over the traffic."""

import numpy as np
import pytest
from conftest import log_record

from monitoring.config import LogConfig
from monitoring.log import FEEDBACK, INFERENCE, SegmentWriter, now


def label(uri: str, ids_labels) -> None:
    """Feedback for requests `r{i}`: (i, label) pairs."""
    SegmentWriter(uri, FEEDBACK, LogConfig()).write_segment([
        {"request_id": f"r{i}", "item": 0, "label": lab, "ts": now(), "tenant": "default"}
        for i, lab in ids_labels])


def test_feedback_is_checked_against_the_log_and_the_models_labels_or_corrections(tmp_path):
    from monitoring.feedback import InvalidLabel, Label, UnknownRequest, feedback_row, feedback_rows

    uri = str(tmp_path / "log")
    writer = SegmentWriter(uri, INFERENCE, LogConfig())
    writer.write_segment([log_record(1), {**log_record(2), "model": "rewriter", "prediction": "stop"},
                          {**log_record(3), "model": None, "outcome": "error"}])
    labels = {"support-router": ["billing", "refund"], "rewriter": []}

    def labels_of(model: str, version: str) -> list[str]:
        assert version == "1"
        return labels[model]

    row = feedback_row(uri, labels_of, "r1", 0, "refund", "default")
    assert row == {"request_id": "r1", "item": 0, "label": "refund", "tenant": "default",
                   "correction": None}
    # a generator's answer takes its corrected text, a classifier's a label, never the other
    [fixed, crossed] = feedback_rows(uri, labels_of, [
        Label("r2", 0, None, "default", "Please stop posting here."),
        Label("r1", 0, None, "default", "refund")])
    assert fixed == {"request_id": "r2", "item": 0, "label": None, "tenant": "default",
                     "correction": "Please stop posting here."}
    assert isinstance(crossed, InvalidLabel) and "as `label`" in str(crossed)
    bad = [("nope", 0, "refund", "default", UnknownRequest, "no logged request"),
           ("r1", 3, "refund", "default", UnknownRequest, "item 3"),
           # another tenant's request reads exactly as an unknown one
           ("r1", 0, "refund", "other", UnknownRequest, "no logged request 'r1' with item 0"),
           ("r1", 0, "shipping", "default", InvalidLabel, "billing, refund"),
           ("r2", 0, "refund", "default", InvalidLabel, "answers with text.*`correction`"),
           ("r3", 0, "refund", "default", InvalidLabel, "did not get a prediction")]
    for rid, item, label, tenant, error, message in bad:
        with pytest.raises(error, match=message):
            feedback_row(uri, labels_of, rid, item, label, tenant)
    # a batch is checked with one read: each label gets its own record or error, in order
    batch = [Label(*case[:4]) for case in bad]
    batch.insert(3, Label("r1", 0, "billing", "default"))
    checked = feedback_rows(uri, labels_of, batch)
    assert checked[3] == {"request_id": "r1", "item": 0, "label": "billing", "tenant": "default",
                          "correction": None}
    del checked[3]
    assert [type(c) for c in checked] == [case[4] for case in bad]


def test_the_queue_lists_a_generators_answers_to_correct_least_sure_first(tmp_path):
    """A generator's answers wait for a correction, ranked as a classifier's answers are: a
    shadowing challenger that wrote something else first, then the least confident; the
    corrected ones, a classifier's rows and another tenant's stay off its page."""
    from monitoring.config import LabelQueueConfig
    from monitoring.feedback import pending

    uri = str(tmp_path / "log")
    confidence = [0.9, 0.2, 0.6, 0.4, 0.95, 0.3]
    rows = [log_record(i, model="rewriter", application="chat", prediction="stop",
                       posterior=None, confidence=c, output=f"answer {i}", text=f"post {i}")
            for i, c in enumerate(confidence)]
    shadow = {**rows[4], "variant": "shadow", "model_version": "2", "output": "another answer"}
    router = log_record(50, confidence=0.01, posterior=[1.0, 0.0])
    SegmentWriter(uri, INFERENCE, LogConfig()).write_segment([*rows, shadow, router])
    SegmentWriter(uri, FEEDBACK, LogConfig()).write_segment([
        {"request_id": "r1", "item": 0, "label": None, "correction": "a better answer",
         "ts": now(), "tenant": "default"}])
    page = pending(uri, "default", 4, LabelQueueConfig(explore=0.0), model="rewriter")
    assert [(it["request_id"], it["reason"]) for it in page] == [
        ("r4", "disagreement"), ("r5", "uncertain"), ("r3", "uncertain"), ("r2", "uncertain")]
    assert page[1]["output"] == "answer 5" and page[1]["text"] == "post 5"
    assert page[1]["confidence"] == 0.3 and page[1]["prediction"] == "stop"
    assert pending(uri, "neighbour", 4, LabelQueueConfig(), model="rewriter") == []


def test_the_label_queue_puts_disagreements_and_doubts_first_per_label_and_covers(tmp_path):
    from monitoring.config import LabelQueueConfig
    from monitoring.feedback import pending

    uri = str(tmp_path / "log")
    rng = np.random.default_rng(0)
    labels = ["billing", "refund", "shipping"]
    # 90 answers: billing predicted 60 times, refund 20, shipping 10; confidence known
    rows = [log_record(i, prediction=labels[0 if i < 60 else 1 if i < 80 else 2],
                    confidence=float(rng.uniform(0.3, 1.0)), posterior=[0.3, 0.3, 0.4],
                    text=f"ticket {i}") for i in range(90)]
    rows[5]["confidence"] = 0.99  # confident, but a shadowing challenger says otherwise
    shadow = {**rows[5], "variant": "shadow", "model_version": "2", "prediction": "refund"}
    other = [log_record(100 + i, tenant="neighbour", confidence=0.01, posterior=[1, 0, 0])
             for i in range(5)]
    generated = {**log_record(200, confidence=0.01), "posterior": None}  # no posterior: a generator
    SegmentWriter(uri, INFERENCE, LogConfig()).write_segment([*rows, shadow, *other, generated])
    label(uri, [(7, "billing")])  # already labelled: not pending
    config = LabelQueueConfig(explore=0.25)
    page = pending(uri, "default", 12, config)
    ids = [it["request_id"] for it in page]
    assert len(page) == 12 and len(set(ids)) == 12
    assert page[0]["request_id"] == "r5" and page[0]["reason"] == "disagreement"
    assert not {"r7", "r200"} & set(ids) and not any(i.startswith("r10") for i in ids)
    useful, drawn = page[:9], page[9:]
    assert [it["reason"] for it in drawn] == ["coverage"] * 3
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


def test_the_label_queue_covers_what_no_label_reached_however_confident(tmp_path):
    """A new sub-intent, a twentieth of the traffic, answered with confidence: doubt never
    points there, and a uniform draw of a page's explore share seldom does. The explore share
    goes to the answers least like every labelled one, so the first page asks about it and,
    once one of its answers is labelled, the next page looks elsewhere."""
    from monitoring.config import LabelQueueConfig
    from monitoring.feedback import pending

    rng = np.random.default_rng(2)

    def answer(i, region, confidence, spread):
        e = np.eye(8)[region] + rng.normal(0, spread, 8)
        return log_record(i, prediction="billing", confidence=confidence,
                          posterior=[0.5, 0.5], embedding=e.tolist(), text=f"r{region} {i}")

    rows = [answer(i, 1 + i % 3, float(rng.uniform(0.4, 0.9)), 0.3) for i in range(190)]
    rows += [answer(500 + i, 0, 0.99, 0.05) for i in range(10)]  # the new sub-intent, also billing
    uri = str(tmp_path / "log")
    SegmentWriter(uri, INFERENCE, LogConfig()).write_segment(rows)
    config = LabelQueueConfig(explore=0.5)
    page = pending(uri, "default", 10, config)
    covered = [it for it in page if it["reason"] == "coverage"]
    assert len(covered) == 5 and {it["reason"] for it in page} == {"uncertain", "coverage"}
    assert all(it["confidence"] < 0.99 for it in page if it["reason"] == "uncertain")
    new = [it["request_id"] for it in covered if it["text"].startswith("r0")]
    assert new, covered
    SegmentWriter(uri, FEEDBACK, LogConfig()).write_segment([
        {"request_id": new[0], "item": 0, "label": "shipping", "ts": now(), "tenant": "default"}])
    again = [it for it in pending(uri, "default", 10, config) if it["reason"] == "coverage"]
    assert len(again) == 5 and not any(it["text"].startswith("r0") for it in again), again


def test_the_label_queue_covers_a_new_phrasing_before_outliers(tmp_path):
    """Farthest from every label are the outliers (a typo-ridden ticket, two requests in one),
    each alone; a new phrasing of a few percent of the traffic, answered with confidence, is
    nearer the labelled regions but many answers together. The explore share asks the
    phrasing first and the outliers only once every group has a label."""
    from monitoring.config import LabelQueueConfig
    from monitoring.feedback import pending

    rng = np.random.default_rng(3)

    def answer(i, e, confidence, text):
        return log_record(i, prediction="billing", confidence=confidence, posterior=[0.5, 0.5],
                          embedding=e.tolist(), text=text)

    centre = np.eye(16)
    rows = [answer(i, centre[1 + i % 3] + rng.normal(0, 0.2, 16), float(rng.uniform(0.5, 0.9)),
                   f"known {i}") for i in range(150)]
    phrasing = 0.6 * centre[1] + 0.8 * centre[0]  # its nearest labelled region: 1
    rows += [answer(300 + i, phrasing + rng.normal(0, 0.03, 16), 0.99, f"new {i}")
             for i in range(8)]
    rows += [answer(400 + i, centre[4 + i] + rng.normal(0, 0.3, 16), 0.99, f"odd {i}")
             for i in range(6)]
    uri = str(tmp_path / "log")
    SegmentWriter(uri, INFERENCE, LogConfig()).write_segment(rows)
    label(uri, [(i, "billing") for i in range(30)])  # ten in each known region
    page = pending(uri, "default", 2, LabelQueueConfig(explore=1.0))
    assert [it["reason"] for it in page] == ["coverage"] * 2
    assert any(it["text"].startswith("new") for it in page), page
    again = pending(uri, "default", 12, LabelQueueConfig(explore=1.0))
    assert sum(it["text"].startswith("new") for it in again) == 1, again


def test_labels_from_before_a_drift_being_handled_do_not_count_as_coverage(tmp_path):
    """A phrasing labelled before a concept shift is the old concept's: while the loop handles
    a drift of the version (`drift_onset`), only the labels since its onset point the queue,
    as only those teach the retrain, so the phrasing is asked about again; another version's
    onset, or none, leaves the labels counted."""
    from datetime import timedelta

    from monitoring.config import LabelQueueConfig
    from monitoring.feedback import pending

    rng = np.random.default_rng(4)
    centre = np.eye(16)

    def answer(i, e, text, ts):
        return log_record(i, prediction="shipping", confidence=0.99, posterior=[0.5, 0.5],
                          embedding=e.tolist(), text=text, ts=ts)

    before = now()
    onset = before + timedelta(seconds=1)
    after = onset + timedelta(seconds=1)
    rows = [answer(i, centre[1 + i % 3] + rng.normal(0, 0.2, 16), f"known {i}", after)
            for i in range(60)]  # each region labelled since the onset too
    rows += [answer(300 + i, centre[0] + rng.normal(0, 0.03, 16), f"phrasing {i}",
                    before if i < 2 else after) for i in range(10)]
    uri = str(tmp_path / "log")
    SegmentWriter(uri, INFERENCE, LogConfig()).write_segment(rows)
    label(uri, [(i, "shipping") for i in range(30)] + [(300, "shipping"), (301, "shipping")])
    config = LabelQueueConfig(explore=1.0)

    def asked(drift_onset) -> int:
        page = pending(uri, "default", 3, config, drift_onset=drift_onset)
        return sum(it["text"].startswith("phrasing") for it in page)

    assert asked(None) == 0  # covered by the labels from before
    assert asked(lambda model, version: onset if version == "1" else None) == 1
    assert asked(lambda model, version: onset if version == "2" else None) == 0


def test_the_label_queue_asks_around_confident_mistakes_once_they_exceed_chance(tmp_path):
    """A concept shift moves a region the model answers with confidence: doubt never points
    there. Once labels find the model confidently wrong more often than chance, the queue asks
    about the answers nearest those mistakes (same version, same prediction) first."""
    from monitoring.config import LabelQueueConfig
    from monitoring.feedback import pending

    rng = np.random.default_rng(1)
    centres = np.eye(8)  # three regions the router calls shipping, with confidence; billing doubts

    def answer(i, region, prediction, confidence, version="1"):
        e = centres[region] + rng.normal(0, 0.15, 8)
        return log_record(i, prediction=prediction, confidence=confidence, posterior=[0.5, 0.5],
                          embedding=e.tolist(), model_version=version, text=f"r{region} {i}")

    rows = [answer(i, i % 3, "shipping", 0.97) for i in range(90)]  # region i % 3
    rows += [answer(100 + i, 5, "billing", 0.4 + 0.01 * i) for i in range(20)]
    rows += [answer(200 + i, 1, "shipping", 0.97, version="2") for i in range(10)]
    uri = str(tmp_path / "log")
    SegmentWriter(uri, INFERENCE, LogConfig()).write_segment(rows)

    config = LabelQueueConfig(explore=0)
    # region 0 and 2 confirmed; one mistake in region 1: a calibrated model's share, not a region
    label(uri, [(i, "shipping") for i in (0, 2, 3, 5, 6, 8, 9, 11, 12, 14)] + [(1, "refund")])
    assert {it["reason"] for it in pending(uri, "default", 40, config)} == {"uncertain"}
    label(uri, [(4, "refund"), (7, "refund"), (10, "refund")])  # four of fourteen at 0.97: a region
    page = pending(uri, "default", 40, config)
    asked = [it for it in page if it["reason"] == "contradiction"]
    assert len(asked) >= 10 and {it["text"][:2] for it in asked} == {"r1"}
    assert all(it["model_version"] == "1" and it["prediction"] == "shipping" for it in asked)
    shipping = [it["reason"] for it in page if it["prediction"] == "shipping"]
    assert shipping[:len(asked)] == ["contradiction"] * len(asked)  # before the doubts
    assert [it["prediction"] for it in page[:2]] in (["shipping", "billing"],
                                                     ["billing", "shipping"])  # in turn
    # the threshold is the queue's setting: at 0.98, none of these answers is confident enough
    assert "contradiction" not in {it["reason"] for it in pending(
        uri, "default", 40, LabelQueueConfig(explore=0, confident=0.98))}
    # `since` lists newer answers only; the labels before it still point the queue
    since = now()
    SegmentWriter(uri, INFERENCE, LogConfig()).write_segment(
        [answer(300 + i, region, "shipping", 0.97) for i, region in enumerate([0, 2, 1, 1])])
    newer = pending(uri, "default", 40, config, since=since)
    assert {it["request_id"] for it in newer} == {"r300", "r301", "r302", "r303"}
    assert {it["request_id"] for it in newer if it["reason"] == "contradiction"} == {"r302", "r303"}
    # none since (the traffic not yet flushed): an empty page, not an error
    assert pending(uri, "default", 40, config, since=now()) == []


def test_the_asks_around_confident_mistakes_spread_over_the_region(tmp_path):
    """A moved region stretching away from its first mistakes: a page's asks reach its far end
    instead of crowding around the mistakes (closest-first took the four nearest here)."""
    from monitoring.config import LabelQueueConfig
    from monitoring.feedback import pending

    along, other = np.eye(8)[0], np.eye(8)[1]

    def answer(i, e):
        return log_record(i, prediction="shipping", confidence=0.97, posterior=[0.5, 0.5],
                          embedding=e.tolist(), text=f"t {i}")

    # the region: one end at `other + 0 * along`, the far end at `other + 2 * along`
    rows = [answer(i, other + 0.02 * i * along) for i in range(100)]
    rows += [answer(200 + i, np.eye(8)[2] + 0.01 * i * np.eye(8)[3]) for i in range(12)]
    uri = str(tmp_path / "log")
    SegmentWriter(uri, INFERENCE, LogConfig()).write_segment(rows)
    label(uri, [(i, "refund") for i in range(4)] + [(200 + i, "shipping") for i in range(12)])
    asked = [int(it["request_id"][1:]) for it in pending(uri, "default", 4, LabelQueueConfig(
        explore=0)) if it["reason"] == "contradiction"]
    assert len(asked) == 4 and max(asked) >= 90, asked  # the far end is asked about
    assert len({i // 25 for i in asked}) >= 3, asked  # and the page covers most of the region


def test_half_the_coverage_goes_to_the_label_confident_mistakes_were_made_on(tmp_path):
    """A reorganisation moves phrasings of a label that lie far apart in meaning: the labels
    near its first confident mistakes do not reach the others, answered with confidence too,
    and a spread over all the traffic asks mostly where nothing moved. Once the mistakes exceed
    chance, half the coverage goes to the answers of the label they were made on."""
    from monitoring.config import LabelQueueConfig
    from monitoring.feedback import pending

    rng = np.random.default_rng(4)
    centres = np.eye(12)

    def answer(i, region, prediction):
        return log_record(i, prediction=prediction, confidence=0.97, posterior=[0.5, 0.5],
                          embedding=(centres[region] + rng.normal(0, 0.1, 12)).tolist(),
                          text=f"r{region} {i}")

    rows = [answer(i, 0, "shipping") for i in range(20)]  # moved: its labels say refund
    rows += [answer(100 + i, 1, "shipping") for i in range(10)]  # moved too, no label yet
    rows += [answer(200 + i, 2 + i % 6, "billing") for i in range(240)]  # six regions of 40
    uri = str(tmp_path / "log")
    SegmentWriter(uri, INFERENCE, LogConfig()).write_segment(rows)

    def covered(said: str) -> list[str]:
        label(uri, [(i, said) for i in range(10)])
        page = pending(uri, "default", 4, LabelQueueConfig(explore=1.0))
        assert [it["reason"] for it in page] == ["coverage"] * 4
        return [it["text"].split()[0] for it in page]

    assert "r1" not in covered("shipping")  # confirmed: the largest groups, all billing
    regions = covered("refund")  # the same ten, relabelled: confident mistakes
    assert regions.count("r1") == 2 and "r0" not in regions, regions  # where no label is


def test_a_lone_confident_mistake_gets_one_second_label_beside_it(tmp_path):
    """One label cannot tell a moved phrasing from an annotator's mistake: a confident mistake
    that no other label backs gets a second, the unlabelled answer nearest to it, asked in turn
    with the spread over the region; once that label is in (whatever it says), no third."""
    from monitoring.config import LabelQueueConfig
    from monitoring.feedback import pending

    rng = np.random.default_rng(2)
    centres = np.eye(8)

    def answer(i, region):
        e = centres[region] + rng.normal(0, 0.15, 8)
        return log_record(i, prediction="shipping", confidence=0.97, posterior=[0.5, 0.5],
                          embedding=e.tolist(), text=f"r{region} {i}")

    rows = [answer(i, region) for region in range(3) for i in range(30 * region, 30 * region + 30)]
    uri = str(tmp_path / "log")
    SegmentWriter(uri, INFERENCE, LogConfig()).write_segment(rows)

    # region 0 confirmed; region 1 moved (three labels back each other); region 2 one label
    label(uri, [(i, "shipping") for i in range(5)]
          + [(30, "refund"), (31, "refund"), (32, "refund"), (60, "refund")])
    config = LabelQueueConfig(explore=0)
    page = pending(uri, "default", 40, config)
    seconds = [it for it in page if it["reason"] == "second"]
    unlabelled = np.array([r["embedding"] for r in rows[61:]])
    nearest = 61 + int(np.argmax(unlabelled @ rows[60]["embedding"]
                                 / np.linalg.norm(unlabelled, axis=1)))  # cosine
    assert [it["request_id"] for it in seconds] == [f"r{nearest}"]
    assert page[0]["reason"] == "second" and page[1]["reason"] == "contradiction"  # in turn
    # the second label disagrees (the first was the annotator's mistake): no third is asked
    label(uri, [(nearest, "shipping")])
    assert "second" not in {it["reason"] for it in pending(uri, "default", 40, config)}
