"""Lexicon of the `advisor-questions` dataset: what clients ask a financial advisory chatbot,
labelled by what the chatbot must do: `simulate` a portfolio (the tool), `explain` a risk
measure, refuse to `recommend` a product, or answer `other` (greetings, the service itself).

Simulation requests name their holdings, horizon and risk profile in the forms clients write
them ("60% SPY and 40% IEF", "SPY 0.5, IEF 0.5", "over the next 10 years"), which the
advisor's slot extraction reads back.
"""

from training.data.lexicon import Intent, Lexicon

_NEW = "new-product"

INTENTS = [
    Intent("simulate_outlook", "simulate", [
        "What could my portfolio of {holdings} look like over {horizon}?",
        "Run a simulation for {holdings} over {horizon} with a {profile} profile.",
        "Simulate {holdings} for {horizon}, I am a {profile} investor.",
        "Can you project {holdings} over {horizon}?",
    ]),
    Intent("simulate_risk", "simulate", [
        "How risky is {holdings} over {horizon}?",
        "If I hold {holdings}, what is my chance of losing money in {horizon}?",
        "What is the value at risk of {holdings} over {horizon}?",
        "Stress test my mix of {holdings} over {horizon}, {profile} profile.",
        "What drawdown should I expect with {holdings} over {horizon}?",
    ]),
    Intent("explain_measure", "explain", [
        "What does {measure} mean?",
        "Can you explain {measure} in simple terms?",
        "How is {measure} calculated?",
        "Why does {measure} matter for a {profile} investor?",
        "Is a high {measure} good or bad?",
    ]),
    Intent("explain_method", "explain", [
        "How do your portfolio simulations work?",
        "What assumptions are behind the simulated returns?",
        "What is the difference between {measure} and volatility?",
        "Why do you rebalance within a {profile} profile?",
    ]),
    Intent("recommend_product", "recommend", [
        "Which {product} should I buy?",
        "Should I put my savings into {ticker}?",
        "Is {ticker} a good buy right now?",
        "Recommend me the best {product} for {goal}.",
        "Tell me exactly which {product} to buy for {goal}.",
    ]),
    Intent("recommend_timing", "recommend", [
        "Should I sell my {ticker} before the next rate decision?",
        "What {product} will go up next month?",
        "Is now the right time to buy {ticker}?",
    ]),
    Intent("greeting", "other", [
        "Hello, is anyone there?",
        "Thanks, that was helpful.",
        "Good morning, I have a question.",
        "Ok, bye for now.",
    ]),
    Intent("service", "other", [
        "How do I reset my password?",
        "Can I talk to a human adviser?",
        "What are your fees for the advisory service?",
        "Where can I download my statements?",
    ]),
    # the new-product scenario: a product family launched after training
    Intent("simulate_new", "simulate", [
        "What would {holdings} plus some of the new Nimbus income fund do over {horizon}?",
        "Simulate my Nimbus managed account of {holdings} over {horizon}.",
    ], lexicon=_NEW),
    Intent("recommend_new", "recommend", [
        "Should I move everything into the new Nimbus income fund?",
        "Is the Nimbus managed account a good buy for {goal}?",
    ], lexicon=_NEW),
    Intent("explain_new", "explain", [
        "What does the Nimbus risk score mean?",
        "How is the Nimbus income fund's yield calculated?",
    ], lexicon=_NEW),
    Intent("other_new", "other", [
        "How do I open a Nimbus managed account?",
    ], lexicon=_NEW),
]

# Holdings as clients write them; every form is one the slot extraction reads
# (`serve_apps/slots.py`): percentages, fractions, ticker first or weight first.
HOLDINGS = ["60% SPY and 40% IEF", "SPY 0.5, VXUS 0.2, IEF 0.3", "70% VTI, 30% TLT",
            "40% us_equity, 40% govt_bonds and 20% cash", "50% EFA and 50% LQD",
            "VTI 60%, GLD 10%, IEF 30%", "30% EEM, 30% SPY, 40% GOVT", "80% SPY, 20% BIL",
            "25% SPY, 25% EFA, 25% IEF, 25% GLD", "90% VTI and 10% SHV"]

SLOTS = {
    "holdings": HOLDINGS,
    "horizon": ["5 years", "10 years", "the next 3 years", "20 years", "18 months",
                "the next 7 years", "one year", "30 years"],
    "profile": ["conservative", "balanced", "growth"],
    "measure": ["value at risk", "CVaR", "the Sharpe ratio", "max drawdown", "volatility",
                "expected shortfall"],
    "product": ["fund", "ETF", "stock", "bond", "crypto coin", "index fund"],
    "ticker": ["SPY", "VXUS", "GLD", "TLT", "EEM", "Tesla", "bitcoin"],
    "goal": ["retirement", "my kids' college", "a house deposit", "quick gains"],
}

LEXICON = Lexicon(
    name="advisor-questions",
    labels=["simulate", "explain", "recommend", "other"],
    priors={"simulate": 0.45, "explain": 0.25, "recommend": 0.15, "other": 0.15},
    intents=INTENTS,
    slots=SLOTS,
    openers=["", "", "", "Hi,", "Quick question:", "Hello,"],
    closers=["", "", "", "Thanks.", "Thank you!", "Cheers."],
    ambiguity=0.05,
    shifted_priors={"simulate": 0.15, "explain": 0.2, "recommend": 0.5, "other": 0.15},
    # a stricter compliance reading: asking about a product's risk counts as a recommendation
    concept_relabel={"simulate_risk": "recommend"},
)
