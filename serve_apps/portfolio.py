"""Portfolio simulation, the advisor's tool: Monte Carlo paths of a portfolio's value, its risk
figures, and a risk-adjusted rebalancing within a risk profile's bounds.

Paths are cut into fixed blocks of `block_paths`; block `b` draws from its own generator,
seeded by (`seed`, `b`). Blocks run as Ray tasks spread over the cluster, or in-process
(`workers=0`), and are put back in block order, so the figures for a seed are the same
whatever the number of workers: what lets `llmops audit replay` re-run an answer's simulation
and compare. The model (`PortfolioConfig`): correlated geometric Brownian motion of the asset
classes, or a bootstrap of whole periods of a returns CSV; rebalanced to the weights each step.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydantic import Field

from serve_apps.http import InvalidRequest, parse
from serve_apps.portfolio_config import PortfolioConfig
from serve_apps.rebalance import suggest
from training.config import StrictModel

CONFIDENCES = (0.95, 0.99)


class InvalidPortfolio(InvalidRequest):
    """A simulation request the configuration cannot run (422 over HTTP)."""


class SimulationRequest(StrictModel):
    holdings: dict[str, float] = Field(min_length=1, max_length=64,
                                       description="ticker or asset class -> weight")
    horizon_years: float = Field(gt=0, description="years simulated")
    risk_profile: str = "balanced"
    paths: int = Field(10_000, ge=100)
    seed: int = Field(0, ge=0, lt=2**63)
    target_return: float = Field(0.0, gt=-1, description="over the horizon: the probability "
                                 "of ending below it is reported (0: of a loss)")


@dataclass(frozen=True)
class _Model:
    """What a block needs: weights over the held classes and how their returns are drawn."""

    weights: np.ndarray
    steps: int
    dt: float
    drift: np.ndarray | None = None      # gbm: per-step mean log return of each class
    chol: np.ndarray | None = None       # gbm: Cholesky factor of the per-step covariance
    history: np.ndarray | None = None    # bootstrap: periods x classes of simple returns


def request_of(body: SimulationRequest | dict, config: PortfolioConfig) -> SimulationRequest:
    """The request checked against the configuration: known assets, weights that sum to 1,
    a horizon and a number of paths within the caps, a known risk profile."""
    req = parse(SimulationRequest, body)
    unknown = [h for h in req.holdings if h not in config.assets and h not in config.tickers]
    if unknown:
        raise InvalidPortfolio(f"unknown assets {unknown}; use an asset class "
                               f"({', '.join(config.assets)}) or a ticker "
                               f"({', '.join(sorted(config.tickers))})")
    if any(w < 0 or not math.isfinite(w) for w in req.holdings.values()):
        raise InvalidPortfolio("weights must be finite and not negative (long only)")
    total = sum(req.holdings.values())
    if abs(total - 1) > config.weight_tolerance:
        raise InvalidPortfolio(f"weights sum to {total:.6g}, not 1 (within "
                               f"{config.weight_tolerance})")
    if req.paths > config.max_paths:
        raise InvalidPortfolio(f"paths: at most {config.max_paths}, got {req.paths}")
    if req.horizon_years > config.max_horizon_years:
        raise InvalidPortfolio(f"horizon_years: at most {config.max_horizon_years}, "
                               f"got {req.horizon_years}")
    if req.risk_profile not in config.profiles:
        raise InvalidPortfolio(f"unknown risk_profile {req.risk_profile!r}; choose one of: "
                               f"{', '.join(config.profiles)}")
    return req


def asset_weights(req: SimulationRequest, config: PortfolioConfig) -> dict[str, float]:
    """Holdings folded onto asset classes (tickers of one class add up), in `names` order."""
    out: dict[str, float] = {}
    for name in config.names:
        held = sum(w for h, w in req.holdings.items() if config.tickers.get(h, h) == name)
        if held > 0:
            out[name] = held
    return out


def moments(names: list[str], config: PortfolioConfig) -> tuple[np.ndarray, np.ndarray]:
    """Annual mean simple returns and covariance of the classes `names`: the configured
    assumptions (gbm), or the returns CSV's sample moments (bootstrap)."""
    if config.method == "bootstrap":
        history = _history(config)[names].to_numpy()
        per_year = config.periods_per_year
        return history.mean(axis=0) * per_year, np.atleast_2d(np.cov(history.T)) * per_year
    mu = np.array([config.assets[n].expected_return for n in names])
    sigma = np.array([config.assets[n].volatility for n in names])
    order = [config.names.index(n) for n in names]
    return mu, np.outer(sigma, sigma) * config.correlation_matrix()[np.ix_(order, order)]


def _model(weights: dict[str, float], horizon: float, config: PortfolioConfig) -> _Model:
    names = list(weights)
    w = np.array([weights[n] for n in names]) / sum(weights.values())
    steps = max(1, round(horizon * config.periods_per_year))
    dt = 1 / config.periods_per_year
    if config.method == "bootstrap":
        return _Model(w, steps, dt, history=_history(config)[names].to_numpy())
    mu, cov = moments(names, config)
    # log returns: mean (mu - sigma^2/2) dt, so a class's expected simple return is mu a year
    chol = np.linalg.cholesky(cov * dt + 1e-15 * np.eye(len(names)))
    return _Model(w, steps, dt, drift=(mu - np.diag(cov) / 2) * dt, chol=chol)


@functools.lru_cache(maxsize=4)
def _read_returns(path: str, mtime_ns: int, size: int) -> tuple:
    """A returns CSV and the SHA-256 of its bytes, read once per version of the file."""
    import io

    import pandas as pd

    raw = Path(path).read_bytes()
    return pd.read_csv(io.BytesIO(raw)), hashlib.sha256(raw).hexdigest()


def _returns(config: PortfolioConfig) -> tuple:
    path = Path(config.returns_csv)
    try:
        stat = path.stat()
        return _read_returns(str(path), stat.st_mtime_ns, stat.st_size)
    except (OSError, ValueError) as exc:
        raise InvalidPortfolio(f"cannot read returns_csv {config.returns_csv}: {exc}") from None


def _history(config: PortfolioConfig):
    df = _returns(config)[0]
    missing = [n for n in config.assets if n not in df.columns]
    if missing or df[list(config.assets)].isna().any().any() or len(df) < 2:
        raise InvalidPortfolio(f"returns_csv needs a full column per asset class; missing "
                               f"or empty: {missing or 'some values'}")
    return df


def _block(model: _Model, seed: int, block: int, n: int) -> tuple[np.ndarray, ...]:
    """`n` paths of block `block`: terminal return, maximum drawdown, and the sum and sum of
    squares of the per-step portfolio returns (for the volatility)."""
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, block])))
    value, peak = np.ones(n), np.ones(n)
    drawdown, total, squares = np.zeros(n), np.zeros(n), np.zeros(n)
    for _ in range(model.steps):
        if model.history is not None:
            simple = model.history[rng.integers(0, len(model.history), n)]
        else:
            # einsum's own loops, not BLAS: the same sums in any process, whatever its threads
            shocks = np.einsum("nk,jk->nj", rng.standard_normal((n, len(model.weights))),
                               model.chol)
            simple = np.expm1(model.drift + shocks)
        step = np.einsum("nk,k->n", simple, model.weights)
        value *= 1 + step
        np.maximum(peak, value, out=peak)
        np.maximum(drawdown, 1 - value / peak, out=drawdown)
        total += step
        squares += step ** 2
    return value - 1, drawdown, total, squares


def _blocks(model: _Model, seed: int, paths: int, block_paths: int, workers: int) -> list:
    sizes = [min(block_paths, paths - start) for start in range(0, paths, block_paths)]
    if workers == 0:
        return [_block(model, seed, b, n) for b, n in enumerate(sizes)]
    import ray

    task = _remote_blocks()
    model_ref = ray.put(model)
    shares = [list(range(w, len(sizes), workers)) for w in range(min(workers, len(sizes)))]
    done = ray.get([task.remote(model_ref, seed, [(b, sizes[b]) for b in share])
                    for share in shares])
    by_block = {b: result for share, results in zip(shares, done)
                for b, result in zip(share, results)}
    return [by_block[b] for b in range(len(sizes))]


def _run_blocks(model: _Model, seed: int, blocks: list[tuple[int, int]]) -> list:
    return [_block(model, seed, b, n) for b, n in blocks]


@functools.cache
def _remote_blocks():
    """`_run_blocks` as a Ray task, made (and shipped to the cluster) once per process."""
    import ray

    return ray.remote(num_cpus=1)(_run_blocks)


def default_workers(config: PortfolioConfig) -> int:
    """Tasks for one simulation: the cluster's free CPUs, at most `max_workers`; 0 (in this
    process) without a Ray connection or a free CPU, so a busy cluster never queues it."""
    import ray

    if not ray.is_initialized():
        return 0
    return min(config.max_workers, int(ray.available_resources().get("CPU", 0)))


def digest(config: PortfolioConfig) -> str:
    """What the figures depend on besides the request: the model's settings, and the returns
    CSV's bytes for a bootstrap. A replay under another digest may rightly differ."""
    h = hashlib.sha256(json.dumps(config.model_dump(mode="json"), sort_keys=True).encode())
    if config.method == "bootstrap":
        h.update(_returns(config)[1].encode())
    return h.hexdigest()


def replay(tool: dict, config: PortfolioConfig) -> dict:
    """A recorded simulation (an audit record's tool call) run again in this process: whether
    every figure is the same, each one that is not, and whether the configuration's digest
    still is the recorded one (when not, differences may come from the configuration)."""
    figures = simulate(tool["arguments"], config, workers=0)["figures"]
    differ = {k: {"recorded": v, "replayed": figures.get(k)}
              for k, v in tool["result"].items() if figures.get(k) != v}
    return {"tool": tool["name"], "seed": tool["seed"], "match": not differ,
            "differences": differ, "figures": len(tool["result"]),
            "same_config": tool["config_sha256"] == digest(config)}


def simulate(body: SimulationRequest | dict, config: PortfolioConfig,
             workers: int | None = None) -> dict:
    """The risk figures of a portfolio over the horizon and a rebalancing suggestion; every
    figure rounded as it is quoted (6 decimals), so a replay compares them exactly."""
    req = request_of(body, config)
    weights = asset_weights(req, config)
    model = _model(weights, req.horizon_years, config)
    workers = default_workers(config) if workers is None else workers
    parts = _blocks(model, req.seed, req.paths, config.block_paths, workers)
    terminal, drawdown, total, squares = (np.concatenate([p[i] for p in parts])
                                          for i in range(4))
    count = terminal.size * model.steps
    mean_step = total.sum() / count
    per_year = 1 / model.dt
    volatility = math.sqrt(max(squares.sum() / count - mean_step ** 2, 0) * per_year)
    annual = mean_step * per_year
    figures = {"expected_return": float(terminal.mean()),
               "median_return": float(np.median(terminal)),
               "annual_return": annual, "volatility": volatility,
               "sharpe_ratio": (annual - config.risk_free_rate) / volatility if volatility else 0.0,
               "max_drawdown": float(drawdown.mean()),
               "max_drawdown_p95": float(np.quantile(drawdown, 0.95)),
               "probability_below_target": float((terminal < req.target_return).mean())}
    for level in CONFIDENCES:
        cut = np.quantile(terminal, 1 - level)
        tag = round(level * 100)
        figures[f"var_{tag}"] = float(-cut)
        figures[f"cvar_{tag}"] = float(-terminal[terminal <= cut].mean())
    return {"request": req.model_dump(), "method": config.method,
            "asset_classes": {k: round(v, 6) for k, v in weights.items()},
            "steps": model.steps, "figures": {k: round(v, 6) for k, v in figures.items()},
            "rebalance": suggest(list(weights), *moments(list(weights), config),
                                 req.risk_profile, config)}
