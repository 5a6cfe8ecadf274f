"""A retrain's training set and gate (`training/retrain.py`): labelled recent traffic mixed with
a replay sample, holdouts that are held out, too few labels refused; a challenger promoted only
with a gain on recent traffic and no loss on the original (concept shift: test_contradiction.py)."""

import dataclasses

import pandas as pd
import pytest

from training.config import GateConfig, RetrainConfig
from training.data import generate, true_labels
from training.errors import InvalidData
from training.retrain import ORIGINAL, RECENT, calibration_rows, copies, gate, retraining_data
from training.taskdata import TaskData


def test_gate_needs_a_gain_on_recent_traffic_and_no_loss_on_the_original():
    cfg = GateConfig(margin=0.02, tolerance=0.02)
    champion = {RECENT: 0.70, ORIGINAL: 0.90}
    assert gate(champion, {RECENT: 0.80, ORIGINAL: 0.89}, cfg).promote
    small = gate(champion, {RECENT: 0.71, ORIGINAL: 0.95}, cfg)
    assert not small.promote and "below the margin" in small.reason
    forgot = gate(champion, {RECENT: 0.95, ORIGINAL: 0.85}, cfg)
    assert not forgot.promote and "over the tolerance" in forgot.reason
    assert forgot.champion == champion and forgot.challenger[ORIGINAL] == 0.85


def test_retraining_set_mixes_labelled_recent_traffic_with_a_replay_sample(tmp_path):
    recent = generate("support-tickets", "new-product", 120, seed=1)
    recent = recent[["text"]].assign(label=true_labels("support-tickets", recent))  # no mistake
    recent.loc[100:, "label"] = None  # answered, never labelled
    sent = generate("support-tickets", "base", 2000, seed=2)  # some texts more than once
    reference = sent.drop_duplicates("text")
    golden = generate("support-tickets", "base", 50, seed=3)
    config = RetrainConfig(min_labelled=60, recent_holdout_share=0.3, recent_repeats=2,
                           replay_rows=500, validation_rows=100)
    twice = retraining_data(recent, sent, golden, config.model_copy(update={"replay_rows": 2000}))
    assert not set(twice.validation.text) & set(twice.train.text)
    data = retraining_data(recent, reference, golden, config)
    assert len(data.holdouts[RECENT]) == 30 and data.holdouts[ORIGINAL].equals(
        golden[["text", "label"]])
    assert len(data.validation) == 100 and data.validation.text.is_unique
    assert not set(data.validation.text) & set(data.train.text)  # no copy on both sides
    mix = pd.concat([data.train, data.validation])
    assert not set(data.holdouts[RECENT].text) & set(mix.text)  # held out means held out
    in_validation = data.validation.text.isin(recent.text).sum()
    assert len(mix) == 500 + 70 * 2 - in_validation and mix.label.notna().all()
    assert data.train.text.isin(recent.text).sum() == 2 * (70 - in_validation)
    assert 0 < in_validation < 30  # its share of the distinct rows, about 12%
    # replayed rows keep their provenance (the support pipeline's resolved tickets come from it)
    replayed = mix[~mix.text.isin(recent.text)]
    assert replayed.intent.notna().all() and (replayed.scenario == "base").all()
    back = TaskData.load(data.save(tmp_path / "d"))
    assert back.train.equals(data.train) and back.holdouts.keys() == data.holdouts.keys()
    # calibrated on validation and the recent holdout, the labels since the drift weighing half
    rows, weights = calibration_rows(back, 0.5)
    since = rows.text.isin(recent.text).to_numpy()
    assert len(rows) == 100 + 30 and since.sum() == in_validation + 30
    assert weights[since].sum() == pytest.approx(0.5) and weights.sum() == pytest.approx(1.0)
    assert len(set(weights[since])) == len(set(weights[~since])) == 1
    assert calibration_rows(back, None) == (back.validation, None)
    assert calibration_rows(dataclasses.replace(back, scenario="base"), 0.5)[1] is None
    with pytest.raises(InvalidData, match="59 labelled recent requests"):
        retraining_data(recent.iloc[:59], reference, golden, config)


def test_labelled_rows_weigh_by_recency():
    """The newest requests' rows are repeated `recent_repeats` times, older ones fewer (halving
    per half-life, never under once); without request times or a half-life, all alike."""
    recent = generate("support-tickets", "concept-shift", 100, seed=4)[["text", "label"]]
    now = pd.Timestamp("2026-12-03T12:00:00Z")
    day = pd.Timedelta(days=1)
    recent["ts"] = [now - day * (i % 4) for i in range(100)]  # 0, 1, 2 and 3 days old
    config = RetrainConfig(min_labelled=60, recent_repeats=8, replay_rows=300,
                           validation_rows=16, recency_half_life_s=86400)
    assert list(copies(recent, config)[:4]) == [8, 4, 2, 1]
    assert (copies(recent, config.model_copy(update={"recency_half_life_s": None})) == 8).all()
    assert (copies(recent.drop(columns="ts"), config) == 8).all()
    data = retraining_data(recent, generate("support-tickets", "base", 600, seed=5),
                           generate("support-tickets", "base", 40, seed=6),
                           config.model_copy(update={"resolve_contradictions": False}))
    age = dict(zip(recent.text, (i % 4 for i in range(100))))
    times = data.train[data.train.text.isin(age)].text.value_counts()
    by_age = {a: {int(times[t]) for t in times.index if age[t] == a} for a in range(4)}
    assert by_age == {0: {8}, 1: {4}, 2: {2}, 3: {1}}


def test_the_traffic_since_the_drift_in_its_labelled_share_is_what_the_retrained_version_serves(
        tmp_path):
    """Profiled as its drift reference (`training/job.py`): the newest unlabelled requests
    since the onset, and held-out labelled ones (never learnt) in the labelled share of the
    requests since (the queue labels the champion's doubts: without them the reference is surer
    than the traffic), up to `served_rows`, fewer where the holdout is short; none without an
    onset."""
    now = pd.Timestamp("2026-12-03T12:00:00Z")
    before = generate("support-tickets", "base", 100, seed=1)[["text", "label"]].assign(
        ts=now - pd.Timedelta(hours=1))
    since = generate("support-tickets", "new-product", 300, seed=2)[["text", "label"]].assign(
        ts=[now - pd.Timedelta(seconds=300 - i) for i in range(300)])
    since.loc[100:, "label"] = None  # a third of the traffic since is labelled
    before.loc[50:, "label"] = None
    recent = pd.concat([before, since], ignore_index=True)
    reference = generate("support-tickets", "base", 600, seed=3)
    golden = generate("support-tickets", "base", 50, seed=4)
    config = RetrainConfig(replay_rows=300, validation_rows=50, served_rows=60)
    onset = (now - pd.Timedelta(minutes=5)).to_pydatetime()
    data = retraining_data(recent, reference, golden, config, onset=onset)
    held_out = set(data.holdouts["recent"].text)
    assert len(held_out) == 30 and not held_out & set(data.train.text)
    assert data.served.text[:40].tolist() == since.text[260:].tolist()
    assert set(data.served.text[40:]) < held_out and len(data.served) == 60
    assert list(data.served.columns) == ["text"]
    short = retraining_data(recent, reference, golden, config.model_copy(
        update={"served_rows": 1000}), onset=onset)  # 30 held out: 60 unlabelled beside them
    assert short.served.text[:60].tolist() == since.text[240:].tolist()
    assert set(short.served.text[60:]) == held_out and len(short.served) == 90
    assert retraining_data(recent, reference, golden, config).served is None
    assert retraining_data(recent, reference, golden, config.model_copy(
        update={"served_rows": 0}), onset=onset).served is None
    back = TaskData.load(data.save(tmp_path / "d"))
    assert back.served.equals(data.served)
    assert TaskData.load(short.__class__(**{**vars(data), "served": None}).save(
        tmp_path / "e")).served is None


def test_labels_from_before_the_drift_are_checked_against_those_since():
    """Labels of the old concept from before a drift's onset would outvote the new one where it
    moved (feedback labelled all along): with the onset, the moves are found from the labels
    since, the earlier labels they contradict are retired, the rest are learnt from, and only
    labels since are held out or counted towards `min_labelled`."""
    now = pd.Timestamp("2026-12-03T12:00:00Z")
    onset = now - pd.Timedelta(minutes=30)
    old = generate("support-tickets", "base", 450, seed=3)[["text", "label", "intent"]].assign(
        ts=now - pd.Timedelta(hours=2))
    new = generate("support-tickets", "concept-shift", 300, seed=4)[["text", "label"]].assign(
        ts=now)
    recent = pd.concat([old.drop(columns="intent"), new], ignore_index=True)
    reference = generate("support-tickets", "base", 1200, seed=2)
    golden = generate("support-tickets", "base", 60, seed=5)
    config = RetrainConfig(replay_rows=1200, validation_rows=100)
    blind = retraining_data(recent, reference, golden, config)
    assert "account -> security" not in blind.notes.get("contradictions", {}).get("moved", {})
    data = retraining_data(recent, reference, golden, config, onset=onset.to_pydatetime())
    found = data.notes["contradictions"]
    assert {"account -> security", "refund -> billing"} <= set(found["moved"])
    assert found["retired"]["pre-drift"] and "pre-drift rows retired" in data.notes["concept_shift"]
    assert len(data.holdouts[RECENT]) == 90 and set(data.holdouts[RECENT].text) <= set(new.text)
    mix = pd.concat([data.train, data.validation])
    learnt_old = old[old.text.isin(mix.text) & ~old.text.isin(reference.text)
                     & ~old.text.isin(new.text)]
    assert len(learnt_old) > 100  # the labels a move did not contradict are learnt from
    assert not (learnt_old.intent == "account_locked").any()  # those it did are retired
    with pytest.raises(InvalidData, match="59 labelled recent requests since the drift began"):
        retraining_data(pd.concat([old.drop(columns="intent"), new.iloc[:59]]), reference, golden,
                        config, onset=onset.to_pydatetime())


def test_the_holdout_leaves_a_move_two_labels_near_each_of_its_phrasings():
    """A concept shift's rarer phrasings get a label or two each from the queue, and the
    contradiction check relabels a phrasing's replay rows from two labels near them. Held out,
    those labels decide nothing; yet the gate must see the move. The holdout takes the labels
    that contradict the champion in their share of all, each from the move with the most
    labels left near it."""
    common = generate("support-tickets", "base", 120, seed=6)[["text", "label"]]
    common = common.assign(prediction=common.label)  # the champion confirmed
    family = ["How do I add a family member to my account?",
              "Hi, how do I add a family member to my account? Thanks."]
    locked = ["My account is locked after too many login attempts.",
              "Hello, my account is locked after too many login attempts.",
              "My account is locked after too many login attempts. Please help.",
              "Good morning, my account is locked after too many login attempts. Regards."]
    moved = pd.DataFrame({"text": family + locked, "label": "security", "prediction": "account"})
    recent = pd.concat([common, moved], ignore_index=True)
    reference = generate("support-tickets", "base", 600, seed=2)
    golden = generate("support-tickets", "base", 40, seed=3)
    config = RetrainConfig(min_labelled=60, recent_holdout_share=0.4, replay_rows=300,
                           validation_rows=50)
    held: set[str] = set()
    for seed in range(6):
        holdout = set(retraining_data(recent, reference, golden, config, seed=seed)
                      .holdouts[RECENT].text)
        assert len(holdout) == 50 and not holdout & set(family)  # two: both learnt from
        assert len(holdout & set(locked)) == 2  # six of 126 contradict: 2 of the 50 held out
        held |= holdout
    assert held & set(locked) and len(held) > 100  # still a draw
    # without the champion's answers (no log), a plain draw
    plain = retraining_data(recent.drop(columns="prediction"), reference, golden, config)
    assert len(plain.holdouts[RECENT]) == 50


def test_a_label_its_phrasing_disagrees_on_is_learnt_not_held_out():
    """A moved phrasing with a right label and an annotator's mistake: held out, the right
    label left the mistake to decide the phrasing (it kept its old label). A contradicting
    label whose closest other label says another stays learnt, whatever the draw."""
    common = generate("support-tickets", "base", 120, seed=6)[["text", "label"]]
    common = common.assign(prediction=common.label)
    password = ["I forgot my password and the reset email never arrives.",
                "I forgot my password and I cannot log in to reset it.",
                "Please help, I forgot my password and cannot sign in.",
                "I forgot my password, how do I get back into my account?"]
    right, mistake = password[0], "Hi, I forgot my password and the reset email never arrives."
    moved = pd.DataFrame({"text": [*password, mistake], "prediction": "account",
                          "label": ["security"] * 4 + ["shipping"]})
    recent = pd.concat([common, moved], ignore_index=True)
    reference = generate("support-tickets", "base", 600, seed=2)
    golden = generate("support-tickets", "base", 40, seed=3)
    config = RetrainConfig(min_labelled=60, recent_holdout_share=0.4, replay_rows=300,
                           validation_rows=50)
    held = pd.concat([retraining_data(recent, reference, golden, config, seed=seed)
                      .holdouts[RECENT] for seed in range(8)])
    moves = held[held.label == "security"].text  # (the base phrasings hold the first too)
    assert right not in set(moves)
    assert set(password[1:]) & set(moves)  # its move's other labels are still drawn



def test_the_holdout_leaves_the_replay_rows_a_label_moves_two_votes():
    """A move's phrasing with two labels, both held out for the labels of another phrasing
    near them, kept its replay rows' old label: the contradiction check relabels a row from two
    labels among whose nearest rows it is, and the other phrasing's labels have their own
    rows. Both stay learnt; of the other phrasing's three, one is held out (two keep its rows
    moved)."""
    common = generate("support-tickets", "base", 40, seed=6)
    common = common[~common.intent.isin(["password_reset", "account_locked"])]
    common = common[["text", "label"]].assign(prediction=common.label)
    change = ["I need help. How do I change my password? Regards.",
              "Hey there, how do I change my password? Thanks in advance."]
    login = [f"{hi}I can't log in, it says my password is incorrect but I just reset it.{end}"
             for hi, end in (("Hi, ", " Please advise."), ("Hello, ", " Please advise."),
                             ("", " Please help."))]
    moved = pd.DataFrame({"text": change + login, "label": "security", "prediction": "account"})
    recent = pd.concat([common, moved], ignore_index=True)
    reference = generate("support-tickets", "base", 2000, seed=2)  # a phrasing's rows: ~25
    golden = generate("support-tickets", "base", 40, seed=3)
    config = RetrainConfig(min_labelled=20, recent_holdout_share=0.8, replay_rows=1200,
                           validation_rows=50)
    for seed in range(4):
        held = set(retraining_data(recent, reference, golden, config, seed=seed)
                   .holdouts[RECENT].text)
        assert not set(change) & held and len(set(login) & held) == 1
