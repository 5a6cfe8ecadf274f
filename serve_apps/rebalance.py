"""A risk-adjusted rebalancing of the held asset classes: the mean-variance portfolio
(maximise w'mu - (risk_aversion / 2) w'Sigma w) under a risk profile's bounds.

The constraint set, stated with every suggestion: long only; weights sum to 1; each held class
within [min_weight, max_weight]; the equity classes together at most max_equity. Only the
classes already held are reweighted: no product is recommended that the client does not hold.
"""

from __future__ import annotations

import numpy as np

from serve_apps.portfolio_config import PortfolioConfig


def suggest(names: list[str], mu: np.ndarray, cov: np.ndarray, profile_name: str,
            config: PortfolioConfig) -> dict:
    """The suggested weights of the held classes `names` (annual means `mu`, covariance `cov`)
    with their expected return and volatility, and the constraint set; `weights` None with the
    reason when the held classes cannot meet the bounds."""
    from scipy.optimize import minimize

    profile = config.profiles[profile_name]
    equity = np.array([config.assets[n].equity for n in names], dtype=float)
    constraints = (f"profile {profile_name}: long only, weights sum to 1, each held class in "
                   f"[{profile.min_weight}, {profile.max_weight}], equity classes at most "
                   f"{profile.max_equity} together, risk aversion {profile.risk_aversion}")
    out = {"method": "mean-variance", "constraints": constraints, "weights": None}
    n = len(names)
    room = sum(profile.max_weight for e in equity if not e) + min(
        profile.max_equity, profile.max_weight * equity.sum())
    if n * profile.min_weight > 1 + 1e-9 or room < 1 - 1e-9 \
            or profile.min_weight * equity.sum() > profile.max_equity + 1e-9:
        return {**out, "reason": "the held asset classes cannot meet the profile's bounds; "
                                 "more classes (for example bonds or cash) would be needed"}
    gamma = profile.risk_aversion
    result = minimize(
        lambda w: -(w @ mu - gamma / 2 * w @ cov @ w),
        np.full(n, 1 / n), jac=lambda w: -(mu - gamma * cov @ w), method="SLSQP",
        bounds=[(profile.min_weight, profile.max_weight)] * n,
        constraints=[{"type": "eq", "fun": lambda w: w.sum() - 1},
                     {"type": "ineq", "fun": lambda w: profile.max_equity - equity @ w}],
        options={"ftol": 1e-12, "maxiter": 500})
    if not result.success:
        return {**out, "reason": f"the optimiser found no solution: {result.message}"}
    w = np.clip(result.x, 0, None)
    w = w / w.sum()
    return {**out, "weights": {k: round(float(v), 4) for k, v in zip(names, w)},
            "expected_return": round(float(w @ mu), 6),
            "volatility": round(float(np.sqrt(w @ cov @ w)), 6)}
