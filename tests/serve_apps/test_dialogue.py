"""The advisor's decisions without a model: a verdict and the guardrail's finding make a plan
(a tool call with the arguments read, a question about what is missing, an explanation, a
refusal), and every reply ends with the disclaimer and passes the numbers check."""

import pytest

from serve_apps.config import AdvisorAppConfig
from serve_apps.dialogue import SPEC, TOOL, conversation_intent, fixed_text, plan, reply
from serve_apps.portfolio import simulate
from serve_apps.quoting import check

CONFIG = AdvisorAppConfig(paths=2000, seed=9)


def verdict(label: str, candidates: list[str] | None = None) -> dict:
    return {"label": label, "confidence": 0.9, "candidates": candidates or [label]}


def test_a_simulation_question_becomes_the_tool_call_and_its_answer_quotes_the_result():
    question = "How risky is 70% VTI and 30% TLT over the next 15 years? I'm conservative."
    p = plan(question, verdict("simulate"), False, CONFIG)
    assert p.action == "simulate" and not p.refused and p.missing == []
    assert p.arguments == {"holdings": {"VTI": 0.7, "TLT": 0.3}, "horizon_years": 15.0,
                           "risk_profile": "conservative", "paths": 2000, "seed": 9,
                           "target_return": 0.0}
    result = simulate(p.arguments, CONFIG.portfolio, workers=0)
    text = reply(p, result, CONFIG)
    assert text.endswith(CONFIG.disclaimer) and "2,000 simulated paths" in text
    assert f"{result['figures']['var_95'] * 100:.1f}%" in text
    assert check(text, [result], question, fixed_text(CONFIG)) == text


@pytest.mark.parametrize("question, missing", [
    ("Can you simulate my portfolio over 10 years?", ["holdings"]),
    ("What could 60% SPY and 40% IEF do?", ["horizon_years"]),
    ("Simulate my savings please", ["holdings", "horizon_years"]),
])
def test_what_cannot_be_read_is_asked_for_never_guessed(question, missing):
    p = plan(question, verdict("simulate"), False, CONFIG)
    assert p.action == "ask" and p.arguments is None and p.missing == missing
    text = reply(p, None, CONFIG)
    assert text.startswith("To simulate your portfolio I need")
    assert ("holdings with their weights" in text) == ("holdings" in missing)
    assert check(text, [], question, fixed_text(CONFIG)) == text


def test_a_follow_up_keeps_what_it_leaves_out_from_the_earlier_messages_and_says_so():
    """"and over 20 years?" after a simulation: the newest earlier holdings and profile, its own
    horizon; what no message gave is still asked for; its own holdings win over earlier ones."""
    earlier = ["How risky is 70% VTI and 30% TLT over 15 years? I'm conservative.",
               "And what is CVaR?"]
    p = plan("and over 20 years?", verdict("simulate"), False, CONFIG, earlier)
    assert p.action == "simulate" and p.carried == ["holdings", "risk_profile"]
    assert (p.arguments["holdings"], p.arguments["horizon_years"],
            p.arguments["risk_profile"]) == ({"VTI": 0.7, "TLT": 0.3}, 20.0, "conservative")
    result = simulate(p.arguments, CONFIG.portfolio, workers=0)
    text = reply(p, result, CONFIG)
    assert text.startswith("As in your earlier messages: your holdings (VTI, TLT), the "
                           "conservative profile.") and "Over 20 years" in text
    assert check(text, [result], "and over 20 years?", fixed_text(CONFIG)) == text
    switched = plan("what about 50% SPY and 50% IEF?", verdict("simulate"), False, CONFIG, earlier)
    assert switched.arguments["holdings"] == {"SPY": 0.5, "IEF": 0.5}
    assert (switched.arguments["horizon_years"], switched.carried) == (15.0, ["horizon_years",
                                                                             "risk_profile"])
    asked = plan("and over 20 years?", verdict("simulate"), False, CONFIG, ["hello there"])
    assert asked.action == "ask" and asked.missing == ["holdings"] and asked.carried == []
    fresh = plan("What could 60% SPY and 40% IEF do over 5 years?", verdict("simulate"), False,
                 CONFIG, earlier)
    assert fresh.carried == ["risk_profile"] and "earlier" in reply(fresh, simulate(
        fresh.arguments, CONFIG.portfolio, workers=0), CONFIG)


def test_a_follow_up_that_only_gives_an_argument_keeps_the_conversations_simulation():
    """"and over 20 years?" read alone asks for nothing (or leaves the classifier unsure): after
    a simulation, even with a question about a term between, it simulates again and says what
    it carried; a message with no argument, a confident other intent, a recommendation, or a
    conversation that never simulated keep their own."""
    first = "How risky is 70% VTI and 30% TLT over 15 years? I'm conservative."
    earlier = [first, "And what is CVaR?"]
    before = conversation_intent([(first, verdict("simulate")),
                                  ("And what is CVaR?", verdict("explain"))], CONFIG)
    assert before == "simulate"
    p = plan("and over 20 years?", verdict("other"), False, CONFIG, earlier, before)
    assert p.action == "simulate" and p.carried == ["intent", "holdings", "risk_profile"]
    assert p.arguments["horizon_years"] == 20.0 and p.arguments["holdings"] == {"VTI": 0.7,
                                                                               "TLT": 0.3}
    text = reply(p, simulate(p.arguments, CONFIG.portfolio, workers=0), CONFIG)
    assert text.startswith("As in your earlier messages: a simulation, your holdings (VTI, "
                           "TLT), the conservative profile.")
    unsure = plan("and over 20 years?", verdict("explain", ["explain", "simulate"]), False,
                  CONFIG, earlier, before)
    assert unsure.action == "simulate"
    for question, said in [("thanks!", verdict("other")),
                           ("what is VaR over 20 years?", verdict("explain")),
                           ("should I buy more SPY over 20 years?", verdict("recommend"))]:
        own = plan(question, said, False, CONFIG, earlier, before)
        assert own.intent == said["label"] and own.arguments is None, question
    assert plan("should I buy more SPY over 20 years?", verdict("recommend"), False, CONFIG,
                earlier, before).refused
    never = conversation_intent([("hello there", verdict("other"))], CONFIG)
    assert plan("and over 20 years?", verdict("other"), False, CONFIG, ["hello there"],
                never).intent == "other"
    # a follow-up of a follow-up: the third message still carries the simulation
    assert conversation_intent([(first, verdict("simulate")),
                                ("and over 20 years?", verdict("other"))], CONFIG) == "simulate"


def test_a_portfolio_the_simulation_refuses_is_explained_not_run():
    question = "Simulate 60% SPY and 30% IEF over 10 years"
    p = plan(question, verdict("simulate"), False, CONFIG)
    assert p.action == "ask" and "weights sum to 0.9" in p.problem
    text = reply(p, None, CONFIG)
    assert check(text, [p.problem], question, fixed_text(CONFIG)) == text


def test_recommendations_are_refused_alone_or_beside_a_simulation():
    alone = plan("Should I put my savings into Tesla?", verdict("recommend"), True, CONFIG)
    assert alone.action == "refuse" and alone.refused and alone.arguments is None
    assert reply(alone, None, CONFIG) == f"{CONFIG.refusal} {CONFIG.disclaimer}"
    # the classifier unsure between simulate and recommend: simulated, and refused
    both = plan("Simulate 60% SPY and 40% IEF over 10 years. Is GLD a good buy?",
                verdict("simulate", ["simulate", "recommend"]), False, CONFIG)
    assert both.action == "simulate" and both.refused
    result = simulate(both.arguments, CONFIG.portfolio, workers=0)
    assert f"{CONFIG.refusal} {CONFIG.disclaimer}" in reply(both, result, CONFIG)


def test_explanations_come_from_the_glossary_and_others_get_the_service_reply():
    p = plan("What does CVaR mean, and how is it different from VaR?", verdict("explain"),
             False, CONFIG)
    text = reply(p, None, CONFIG)
    assert p.action == "explain" and "expected shortfall" in text and "Value at risk" in text
    assert check(text, [], "", fixed_text(CONFIG)) == text
    method = reply(plan("How do your simulations work?", verdict("explain"), False, CONFIG),
                   None, CONFIG)
    assert "geometric Brownian motion" in method
    assert "I can explain" in reply(plan("Tell me more", verdict("explain"), False, CONFIG),
                                    None, CONFIG)
    other = plan("How do I reset my password?", verdict("other"), False, CONFIG)
    assert other.action == "answer" and reply(other, None, CONFIG).startswith(CONFIG.other_reply)


def test_the_tool_spec_is_the_simulation_request_schema():
    assert SPEC["function"]["name"] == TOOL
    params = SPEC["function"]["parameters"]
    assert params["required"] == ["holdings", "horizon_years"]
    assert {"risk_profile", "paths", "seed", "target_return"} <= set(params["properties"])
