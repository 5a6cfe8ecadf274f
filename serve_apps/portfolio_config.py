"""Typed configuration of the advisor's portfolio simulation (`serve_apps/portfolio.py`): the
asset classes and their covariance model, the tickers that map to them, the risk profiles
that bound a rebalancing, and the caps a request must stay within."""

from __future__ import annotations

from typing import Literal

import numpy as np
from pydantic import Field, model_validator

from training.config import StrictModel


class AssetClass(StrictModel):
    """Long-run capital-market assumptions of one asset class: annual arithmetic mean return
    and annual volatility of its simple returns."""

    expected_return: float = Field(ge=-0.5, le=1.0)
    volatility: float = Field(ge=0.0, le=2.0)
    equity: bool = Field(False, description="counts toward a profile's `max_equity`")


class RiskProfile(StrictModel):
    """The bounds a rebalancing suggestion keeps: long only, each class within
    [`min_weight`, `max_weight`], the equity classes together at most `max_equity`; the
    mean-variance trade-off is `risk_aversion` (higher: less variance for the same return)."""

    risk_aversion: float = Field(gt=0)
    max_equity: float = Field(1.0, ge=0, le=1)
    max_weight: float = Field(1.0, gt=0, le=1, description="per asset class")
    min_weight: float = Field(0.0, ge=0, lt=1, description="per held asset class")


def _assets() -> dict[str, AssetClass]:
    equity = {"equity": True}
    return {
        "us_equity": AssetClass(expected_return=0.07, volatility=0.16, **equity),
        "intl_equity": AssetClass(expected_return=0.075, volatility=0.18, **equity),
        "em_equity": AssetClass(expected_return=0.085, volatility=0.23, **equity),
        "real_estate": AssetClass(expected_return=0.06, volatility=0.19, **equity),
        "govt_bonds": AssetClass(expected_return=0.035, volatility=0.05),
        "corp_bonds": AssetClass(expected_return=0.045, volatility=0.07),
        "gold": AssetClass(expected_return=0.04, volatility=0.15),
        "cash": AssetClass(expected_return=0.02, volatility=0.005),
    }


def _correlations() -> dict[str, dict[str, float]]:
    return {
        "us_equity": {"intl_equity": 0.8, "em_equity": 0.7, "real_estate": 0.6,
                      "govt_bonds": 0.0, "corp_bonds": 0.35, "gold": 0.05},
        "intl_equity": {"em_equity": 0.8, "real_estate": 0.55, "govt_bonds": 0.0,
                        "corp_bonds": 0.35, "gold": 0.1},
        "em_equity": {"real_estate": 0.5, "govt_bonds": -0.05, "corp_bonds": 0.3, "gold": 0.15},
        "real_estate": {"govt_bonds": 0.15, "corp_bonds": 0.4, "gold": 0.05},
        "govt_bonds": {"corp_bonds": 0.7, "gold": 0.25, "cash": 0.1},
        "corp_bonds": {"gold": 0.15, "cash": 0.05},
    }


def _tickers() -> dict[str, str]:
    return {"SPY": "us_equity", "VTI": "us_equity", "IVV": "us_equity", "VXUS": "intl_equity",
            "EFA": "intl_equity", "EEM": "em_equity", "VWO": "em_equity", "VNQ": "real_estate",
            "IEF": "govt_bonds", "GOVT": "govt_bonds", "TLT": "govt_bonds", "LQD": "corp_bonds",
            "GLD": "gold", "IAU": "gold", "BIL": "cash", "SHV": "cash"}


def _profiles() -> dict[str, RiskProfile]:
    return {"conservative": RiskProfile(risk_aversion=10, max_equity=0.4, max_weight=0.6),
            "balanced": RiskProfile(risk_aversion=5, max_equity=0.7, max_weight=0.6),
            "growth": RiskProfile(risk_aversion=2, max_equity=1.0, max_weight=0.8)}


class PortfolioConfig(StrictModel):
    """`gbm`: correlated geometric Brownian motion of the asset classes from `assets` and
    `correlations` (pairs not named are uncorrelated); `bootstrap`: periods drawn with
    replacement from `returns_csv` (one column of simple returns per asset class, one row per
    period, `periods_per_year` of them a year), whole rows at a time so the classes keep their
    co-movement. Either way the portfolio is rebalanced to its weights every step."""

    method: Literal["gbm", "bootstrap"] = "gbm"
    assets: dict[str, AssetClass] = Field(default_factory=_assets, min_length=1)
    correlations: dict[str, dict[str, float]] = Field(default_factory=_correlations)
    tickers: dict[str, str] = Field(default_factory=_tickers, description="ticker -> class")
    profiles: dict[str, RiskProfile] = Field(default_factory=_profiles, min_length=1)
    returns_csv: str | None = Field(None, description="bootstrap: the historical returns")
    periods_per_year: int = Field(12, ge=1, le=366, description="steps a year (gbm and "
                                  "bootstrap alike: the CSV's frequency)")
    risk_free_rate: float = Field(0.02, ge=-0.1, le=0.5)
    weight_tolerance: float = Field(1e-3, gt=0, le=0.1, description="|sum of weights - 1|")
    max_paths: int = Field(200_000, ge=1000)
    max_horizon_years: float = Field(50, gt=0)
    block_paths: int = Field(5000, ge=100, description="paths per block: the unit of work "
                             "and of seeding, so results do not depend on the worker count")
    max_workers: int = Field(8, ge=1, description="Ray tasks one simulation uses at most")

    @model_validator(mode="after")
    def _consistent(self) -> PortfolioConfig:
        for ticker, asset in self.tickers.items():
            if asset not in self.assets:
                raise ValueError(f"ticker {ticker!r} maps to {asset!r}, not an asset class")
        for a, row in self.correlations.items():
            for b, rho in row.items():
                if a not in self.assets or b not in self.assets:
                    raise ValueError(f"correlation {a}/{b} names an unknown asset class")
                if not -1 < rho < 1:
                    raise ValueError(f"correlation {a}/{b} must lie in (-1, 1), got {rho}")
        if self.method == "bootstrap" and not self.returns_csv:
            raise ValueError("method bootstrap needs returns_csv")
        try:
            np.linalg.cholesky(self.correlation_matrix())
        except np.linalg.LinAlgError:
            raise ValueError("correlations do not form a positive definite matrix") from None
        return self

    @property
    def names(self) -> list[str]:
        """The asset classes in the one order every computation uses (sorted: a settings file
        whose keys were reordered simulates the same paths)."""
        return sorted(self.assets)

    def correlation_matrix(self) -> np.ndarray:
        """In the order of `names`; symmetric, ones on the diagonal."""
        names = self.names
        matrix = np.eye(len(names))
        for a, row in self.correlations.items():
            for b, rho in row.items():
                i, j = names.index(a), names.index(b)
                matrix[i, j] = matrix[j, i] = rho
        return matrix
