"""The `advisor` application: the advisory chatbot's tool, portfolio simulation
(`serve_apps/portfolio.py`), behind the policy chain (scope `advise`).

HTTP: `POST /v1/advisor/simulate {"holdings": {"SPY": 0.6, "IEF": 0.4}, "horizon_years": 10,
"risk_profile": "balanced", "paths": 20000, "seed": 7}` -> the risk figures, a rebalancing
within the profile's bounds, the disclaimer and the request id. Python:
`serve.get_app_handle("advisor").simulate.remote({...}, principal=...)`. The simulation's
paths run as Ray tasks over the cluster's free CPUs. The audit record of every answer holds the
tool call (arguments with the seed, figures, the configuration's digest): `llmops audit replay
REQUEST_ID` runs it again and compares.
"""

import asyncio
import json

from fastapi import Request
from ray import serve

from serve_apps.auth import Principal
from serve_apps.call import Answer, Caller
from serve_apps.config import AdvisorAppConfig, LimitsConfig
from serve_apps.http import create_app
from serve_apps.policies import chain
from serve_apps.portfolio import SimulationRequest, digest, request_of, simulate

TOOL = "simulate_portfolio"

app = create_app("llmops advisor", "Portfolio simulations for the advisory chatbot, every "
                 "answer audited and replayable.")


def tool_call(result: dict, config_digest: str) -> dict:
    """A simulation as the audit record keeps it: enough to run it again and compare."""
    return {"name": TOOL, "arguments": result["request"], "seed": result["request"]["seed"],
            "config_sha256": config_digest, "result": result["figures"],
            "rebalance": result["rebalance"]["weights"]}


@serve.deployment(ray_actor_options={"num_cpus": 0.05}, max_ongoing_requests=16)
@serve.ingress(app)
class AdvisorService:
    def __init__(self, log: dict | None, tracking_uri: str | None, config: dict | None = None,
                 governance: dict | None = None):
        self.config = AdvisorAppConfig.model_validate(config or {})
        self.policies = chain("advisor", self.config.policies, self.config.guardrails,
                              governance)
        app.state.edge = self.policies.edge(LimitsConfig())

    @app.post("/simulate")
    async def http_simulate(self, body: SimulationRequest, request: Request) -> dict:
        return await self._simulate(body, Caller.http(request))

    async def simulate(self, request: SimulationRequest | dict,
                       correlation_id: str | None = None,
                       principal: Principal | dict | None = None) -> dict:
        caller = Caller(correlation_id, principal)
        return await self.policies.admit("simulate", request, caller,
                                         lambda: self._simulate(request, caller))

    async def _simulate(self, request: SimulationRequest | dict, caller: Caller) -> dict:
        body = request_of(request, self.config.portfolio)

        async def run(call) -> Answer:
            result = await asyncio.to_thread(simulate, body, self.config.portfolio)
            return Answer([json.dumps(result["figures"])], [{}], payload=result,
                          tools=[tool_call(result, digest(self.config.portfolio))])

        holdings = ", ".join(f"{k} {v}" for k, v in body.holdings.items())
        call, answer = await self.policies.apply(
            "advise", [f"simulate {holdings} over {body.horizon_years} years"], caller, run)
        return {"request_id": call.request_id, **answer.payload,
                "disclaimer": self.config.disclaimer}
