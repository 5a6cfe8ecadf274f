"""The seeded generator: determinism, the drift each scenario promises, clear errors."""

import re

import pandas as pd
import pytest

from cluster.cli import main
from training import data
from training.errors import InvalidData, UnknownName


def _vocab(df: pd.DataFrame) -> set[str]:
    return {w for t in df.text for w in re.findall(r"[a-z]+", t.lower())}


@pytest.mark.parametrize("dataset", list(data.DATASETS))
def test_same_seed_same_rows_other_seed_other_rows(dataset):
    a = data.generate(dataset, "base", 300, seed=7)
    pd.testing.assert_frame_equal(a, data.generate(dataset, "base", 300, seed=7))
    assert not a.text.equals(data.generate(dataset, "base", 300, seed=8).text)


def test_support_tickets_cover_six_queues_with_varied_text():
    df = data.generate("support-tickets", "base", 2000, seed=0)
    assert set(df.label) == set(data.labels_of("support-tickets"))
    assert len(data.labels_of("support-tickets")) >= 6
    assert df.text.nunique() > 0.95 * len(df)
    assert len(_vocab(df)) > 500


def test_new_product_brings_vocabulary_unseen_in_base():
    base_vocab = _vocab(data.generate("support-tickets", "base", 3000, seed=0))
    shifted = data.generate("support-tickets", "new-product", 500, seed=1)
    unseen = [bool(set(re.findall(r"[a-z]+", t.lower())) - base_vocab) for t in shifted.text]
    assert sum(unseen) / len(unseen) > 0.9
    assert set(shifted.label) == set(data.labels_of("support-tickets"))


def test_label_shift_changes_the_mix_not_the_messages():
    base = data.generate("support-tickets", "base", 2000, seed=0).label.value_counts(normalize=True)
    shifted = data.generate("support-tickets", "label-shift", 2000, seed=0)
    mix = shifted.label.value_counts(normalize=True)
    assert mix["security"] > 2.5 * base["security"]
    assert mix["billing"] < 0.5 * base["billing"]
    assert set(shifted.intent) <= set(data.generate("support-tickets", "base", 2000, 0).intent)


def test_concept_shift_routes_the_same_phrasing_elsewhere():
    base = data.generate("support-tickets", "base", 2000, seed=0)
    shifted = data.generate("support-tickets", "concept-shift", 2000, seed=0)
    for df, expected in ((base, "refund"), (shifted, "billing")):
        labels = df[df.intent == "refund_request"].label
        assert (labels == expected).mean() > 0.9


def test_a_reorganisation_given_moves_the_concept_shift_and_its_true_labels(monkeypatch):
    monkeypatch.setattr(data, "DATASETS", dict(data.DATASETS))  # undone after the test
    data.reorganise("support-tickets", {"payment_failed": "technical", "two_factor": "account"})
    base = data.generate("support-tickets", "base", 2000, seed=0)
    shifted = data.generate("support-tickets", "concept-shift", 2000, seed=0)
    truth = data.true_labels("support-tickets", shifted)
    for intent, before, after in (("payment_failed", "billing", "technical"),
                                  ("two_factor", "security", "account"),
                                  ("refund_request", "refund", "refund")):  # the lexicon's: off
        assert (base[base.intent == intent].label == before).mean() > 0.9
        assert (shifted[shifted.intent == intent].label == after).mean() > 0.9
        assert (truth[shifted.intent == intent] == after).all()


@pytest.mark.parametrize("moves, error", [
    ({}, InvalidData), ({"payment_failed": "billing"}, InvalidData),
    ({"rainy_day": "billing"}, UnknownName), ({"payment_failed": "sales"}, UnknownName)])
def test_a_reorganisation_that_moves_nothing_known_is_refused(monkeypatch, moves, error):
    monkeypatch.setattr(data, "DATASETS", dict(data.DATASETS))
    before = data.DATASETS["support-tickets"]
    with pytest.raises(error):
        data.reorganise("support-tickets", moves)
    assert data.DATASETS["support-tickets"] is before


@pytest.mark.parametrize("dataset", list(data.DATASETS))
def test_true_labels_are_the_labels_without_the_annotators_random_mistakes(dataset):
    lexicon = data.DATASETS[dataset]
    for scenario in ("base", "concept-shift"):
        df = data.generate(dataset, scenario, 3000, seed=3)
        truth = data.true_labels(dataset, df)
        wrong = (truth != df.label).mean()  # a random label is sometimes the right one
        expected = lexicon.label_noise * (1 - 1 / len(lexicon.labels))
        assert expected / 2 < wrong < expected * 2, (scenario, wrong)
        moved = df.intent.isin(list(lexicon.concept_relabel))
        if scenario == "concept-shift" and moved.any():
            assert (truth[moved] == df.intent[moved].map(lexicon.concept_relabel)).all()


def test_slang_is_lower_case_with_emoji_and_abbreviations():
    df = data.generate("support-tickets", "slang", 400, seed=0)
    assert (df.text == df.text.str.lower()).mean() > 0.95
    assert df.text.str.contains(r"[\U0001F300-\U0001FAFF]").mean() > 0.9
    assert df.text.str.contains(r"\b(?:pls|u|ur|thx|asap|ngl|fr)\b").mean() > 0.4


def test_fraction_mixes_scenario_into_base_traffic():
    df = data.generate("support-tickets", "slang", 2000, seed=3, fraction=0.25)
    assert 0.2 < (df.scenario == "slang").mean() < 0.3
    assert set(df.scenario) == {"base", "slang"}


def test_advisor_questions_ask_for_every_action_and_name_a_portfolio_when_simulating():
    df = data.generate("advisor-questions", "base", 2000, seed=0)
    assert set(df.label) == {"simulate", "explain", "recommend", "other"}
    assert df.text.nunique() > 0.5 * len(df)
    simulate = df[df.intent.str.startswith("simulate")]
    assert simulate.text.str.contains(r"\d+(?:\.\d+)?%?").mean() > 0.95  # weights and horizons
    # a stricter compliance reading: questions on a holding's risk count as recommendations
    shifted = data.generate("advisor-questions", "concept-shift", 2000, seed=0)
    assert (shifted[shifted.intent == "simulate_risk"].label == "recommend").mean() > 0.9


def test_moderation_pairs_toxic_messages_with_safe_rewrites():
    df = data.generate("moderation", "base", 1000, seed=0)
    assert set(df.label) == {"safe", "toxic", "spam", "pii"}
    toxic = df[(df.intent.isin(["insult_complaint", "insult_user", "threat"]))]
    assert (toxic.rewrite != "").all()
    insults = r"\b(?:idiots?|morons?|clowns?|garbage|trash|losers|stupid|pathetic)\b"
    assert not toxic.rewrite.str.contains(insults, case=False).any()
    assert (df[df.label == "spam"].rewrite == "").all()
    only_toxic = data.generate("moderation", "base", 50, seed=0, priors={"toxic": 1.0})
    assert set(only_toxic.intent) <= {"insult_complaint", "insult_user", "threat"}


def test_hand_written_tickets_cover_every_base_intent_in_other_words_than_the_templates():
    """Five tickets per intent, none a generated text; concept shift relabels them as it
    relabels the generated ones."""
    people = data.handwritten("support-tickets")
    generated = data.generate("support-tickets", "base", 5000, seed=0)
    assert people.intent.value_counts().to_dict() == dict.fromkeys(set(generated.intent), 5)
    assert not set(people.text) & set(generated.text)
    label = {i.name: i.label for i in data.DATASETS["support-tickets"].intents}
    assert (people.label == people.intent.map(label)).all()
    shifted = data.handwritten("support-tickets", "concept-shift")
    moved = data.DATASETS["support-tickets"].concept_relabel
    assert (shifted.label == [moved.get(i, y) for i, y in zip(people.intent, people.label)]).all()
    assert (shifted.label != people.label).sum() == 5 * len(moved)


@pytest.mark.parametrize("call, error", [
    (lambda: data.generate("tickets", "base", 10, 0), UnknownName),
    (lambda: data.generate("moderation", "rainy-day", 10, 0), UnknownName),
    (lambda: data.generate("moderation", "base", 0, 0), InvalidData),
    (lambda: data.generate("moderation", "base", 10, 0, fraction=1.5), InvalidData),
    (lambda: data.generate("moderation", "base", 10, 0, priors={"angry": 1.0}), UnknownName),
    (lambda: data.handwritten("moderation"), UnknownName),
    (lambda: data.handwritten("support-tickets", "rainy-day"), UnknownName),
])
def test_bad_arguments_raise_typed_errors(call, error):
    with pytest.raises(error):
        call()


def test_cli_writes_parquet_and_prints_one_line_summary(tmp_path, capsys):
    out = tmp_path / "t.parquet"
    assert main(["data", "generate", "support-tickets", "--scenario", "new-product", "--n", "120",
                 "--seed", "5", "--out", str(out)]) == 0
    printed = capsys.readouterr().out.strip().splitlines()
    assert len(printed) == 1 and "120 rows" in printed[0]
    pd.testing.assert_frame_equal(pd.read_parquet(out),
                                  data.generate("support-tickets", "new-product", 120, 5))


def test_cli_rejects_unknown_scenario_with_one_line(tmp_path, capsys):
    code = main(["data", "generate", "moderation", "--scenario", "nope", "--out",
                 str(tmp_path / "x.jsonl")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "unknown scenario 'nope'" in err[0]
    assert not (tmp_path / "x.jsonl").exists()
