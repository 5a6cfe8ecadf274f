"""The `advisor` application: the advisory chatbot. The intent classifier (`advisor-intent`)
and the slots read from a question decide when to simulate a portfolio (`serve_apps/
dialogue.py`); the answer quotes the simulation exactly (`serve_apps/quoting.py`), refuses
personalised product recommendations and ends with the disclaimer. All behind the policy chain
(scope `advise`).

HTTP, under `/v1/advisor`:
- `POST /chat {"message": "How risky is 60% SPY and 40% IEF over 10 years?"}`: the answer,
  the tool call the service ran and its figures (`history`: the client's earlier messages, so
  a follow-up such as "and over 20 years?" keeps the holdings; the OpenAI route reads them from
  its `messages`);
- `POST /chat/completions`: the same as an OpenAI chat completion with function calling, so
  the official client works with `base_url=.../v1/advisor`. A request whose `tools` offer
  `simulate_portfolio` gets the call back as `tool_calls` (finish_reason `tool_calls`) for the
  client to run; the follow-up with the `tool` message gets the answer quoting its figures.
  Without that tool offered (or with `tool_choice: none`) the service runs it itself;
- `POST /simulate`: the tool itself, with the figures and the rebalancing as JSON;
- `GET /tools`, `GET /models`.
Python: `serve.get_app_handle("advisor").chat.remote({...}, principal=...)` (and `complete`,
`simulate`). The audit record of every answer holds its tool call (arguments with the seed,
the figures, the configuration's digest): `llmops audit replay REQUEST_ID` runs it again and
compares, which also catches a client that reported other figures than its tool returned.
"""

import asyncio
import json
import time

from fastapi import Request
from pydantic import BaseModel, ConfigDict, Field
from ray import serve
from ray.serve.handle import DeploymentHandle

from monitoring.batching import unwrap
from serve_apps import dialogue, metrics
from serve_apps.assistant import Assistant, Turn
from serve_apps.auth import Principal
from serve_apps.batch import Item
from serve_apps.breaker import callers_fault
from serve_apps.call import Answer, Call, Caller
from serve_apps.config import AdvisorAppConfig
from serve_apps.http import (
    InvalidRequest,
    StageModel,
    check_label,
    check_texts,
    create_app,
    parse,
    served_by,
)
from serve_apps.openai_schema import (
    Message,
    ToolChoice,
    conversation,
    conversation_texts,
    last_user_message,
)
from serve_apps.openai_schema import Tool as ToolSpec
from serve_apps.pipeline import Pipeline
from serve_apps.portfolio import SimulationRequest, digest, request_of, simulate
from serve_apps.quoting import QUOTED, check, invented
from training.refs import UnknownModel

MODEL_ID = "advisor"  # the one model name the OpenAI route serves

app = create_app("llmops advisor", "The advisory chatbot: portfolio simulations, every answer "
                 "audited and replayable.")


class AdviceRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    message: str = Field(examples=["How risky is 60% SPY and 40% IEF over the next 10 years?"])
    history: list[str] = Field(default_factory=list, description="the client's earlier "
                               "messages of the conversation, oldest first: what a follow-up "
                               "leaves out (holdings, horizon, profile) is read from them")


class ToolChatRequest(BaseModel):
    """The OpenAI fields the advisor honours; others are accepted and ignored."""

    model_config = ConfigDict(extra="ignore")
    model: str = Field(max_length=256)
    messages: list[Message] = Field(min_length=1)
    tools: list[ToolSpec] | None = Field(None, max_length=64)
    tool_choice: ToolChoice | None = None
    stream: bool = False
    n: int = Field(1, ge=1, le=1)

    def offers_tool(self) -> bool:
        """Whether the client runs `simulate_portfolio` itself (it offered it, and allows calls)."""
        return self.tool_choice != "none" and any(
            t.function.name == dialogue.TOOL for t in self.tools or ())


def tool_call(call_id: str, arguments: dict, result: dict | None, config_digest: str) -> dict:
    """A simulation as the audit record keeps it: enough to run it again and compare (`result`
    None: the call was handed to the client, whose result comes with its next request)."""
    return {"id": call_id, "name": dialogue.TOOL, "arguments": arguments,
            "seed": arguments["seed"], "config_sha256": config_digest,
            "result": None if result is None else result["figures"],
            **({"rebalance": (result.get("rebalance") or {}).get("weights")} if result else {})}


def _advice(call: Call) -> bool:
    """Whether the `advice` guardrail found a product recommendation request in the question."""
    return any(f.kind == "advice" for f in call.findings)


_BY_ASSISTANT = {"written_by": "assistant", "rejected": []}


def _client_text(messages) -> str:
    """What the client wrote in a conversation (as templates read it): the numbers an answer
    may repeat."""
    return " ".join(m["content"] for m in messages if m["role"] in ("user", "system"))


def _tool_results(messages: list[Message]) -> tuple[dict, dict] | None:
    """The client's follow-up to a `simulate_portfolio` call: the call (id -> arguments) and the
    result of each, from the `tool` messages after the last assistant message with tool calls;
    None when the conversation does not end with them."""
    tail = []
    for m in reversed(messages):
        if m.role != "tool":
            break
        tail.append(m)
    if not tail:
        return None
    asked = next((m for m in reversed(messages[:len(messages) - len(tail)])
                  if m.role == "assistant" and m.tool_calls), None)
    calls = {t.id: t for t in (asked.tool_calls if asked else [])
             if t.function.name == dialogue.TOOL}
    results: dict[str, dict] = {}
    for m in tail:
        if m.tool_call_id not in calls:
            raise InvalidRequest(f"tool message {m.tool_call_id!r} answers no {dialogue.TOOL} "
                                 f"call of the assistant message before it")
        try:
            content = json.loads(m.text())
        except ValueError:
            content = None
        figures = content.get("figures") if isinstance(content, dict) else None
        if not isinstance(figures, dict) or any(
                not isinstance(figures.get(k), int | float) for k in QUOTED):
            raise InvalidRequest(f"tool message {m.tool_call_id!r}: a {dialogue.TOOL} result is "
                                 f"the JSON object POST /simulate returns, with figures "
                                 f"{', '.join(QUOTED)}")
        results[m.tool_call_id] = content
    return {i: json.loads(calls[i].function.arguments) for i in results}, results


@serve.deployment(ray_actor_options={"num_cpus": 0.02}, max_ongoing_requests=64)
@serve.ingress(app)
class AdvisorPipeline(Pipeline):
    application, settings = "advisor", AdvisorAppConfig

    def __init__(self, classifier: DeploymentHandle | None, generator: DeploymentHandle | None,
                 config: dict, limits: dict, tracking_uri: str | None, log: dict | None = None,
                 governance: dict | None = None):
        assisted = {"Generator": generator} if config.get("assistant") else {}
        super().__init__(app, {"Classifier": classifier, **assisted}, config, limits,
                         tracking_uri, log, governance)
        self.assistant = Assistant(self.stages["Generator"], self.config) if assisted else None
        self.digest = digest(self.config.portfolio)
        self.fixed = dialogue.fixed_text(self.config)
        self.created = int(time.time())
        self.batch_classifier(self._classify)

    @app.post("/chat")
    async def http_chat(self, body: AdviceRequest, request: Request) -> dict:
        return await self._chat(body, Caller.http(request))

    @app.post("/chat/completions")
    async def http_complete(self, body: ToolChatRequest, request: Request) -> dict:
        return await self._complete(body, Caller.http(request))

    @app.post("/simulate")
    async def http_simulate(self, body: SimulationRequest, request: Request) -> dict:
        return await self._simulate(body, Caller.http(request))

    @app.get("/tools")
    async def tools(self) -> dict:
        """The functions the advisor can call, in OpenAI's `tools` format."""
        return {"tools": [dialogue.SPEC]}

    @app.get("/models")
    async def http_models(self, request: Request) -> dict:
        await self.policies.authorize(Caller.http(request), "advise")
        return {"object": "list", "data": [{"id": MODEL_ID, "object": "model",
                                            "created": self.created, "owned_by": "llmops"}]}

    async def chat(self, request: AdviceRequest | dict, correlation_id: str | None = None,
                   principal: Principal | dict | None = None) -> dict:
        return await self.admit("chat", request, correlation_id, principal,
                                lambda caller: self._chat(request, caller))

    async def complete(self, request: ToolChatRequest | dict, correlation_id: str | None = None,
                       principal: Principal | dict | None = None) -> dict:
        return await self.admit("complete", request, correlation_id, principal,
                                lambda caller: self._complete(parse(ToolChatRequest, request),
                                                              caller))

    async def simulate(self, request: SimulationRequest | dict,
                       correlation_id: str | None = None,
                       principal: Principal | dict | None = None) -> dict:
        return await self.admit("simulate", request, correlation_id, principal,
                                lambda caller: self._simulate(request, caller))

    async def _chat(self, request: AdviceRequest | dict, caller: Caller) -> dict:
        request = parse(AdviceRequest, request)
        question = check_texts([request.message], self.limits)[0]
        if len(request.history) >= self.limits.max_messages:
            raise InvalidRequest(f"history: at most {self.limits.max_messages - 1} earlier "
                                 f"messages")
        earlier = check_texts(request.history, self.limits) if request.history else []

        async def work(c: Call) -> Answer:
            if self.assistant:  # the model reads the history too: the guardrails do first
                told = [*c.texts[1:], c.texts[0]]
                return await self._write(c, True, [{"role": "user", "content": t} for t in told])
            return await self._advise(c, True, earlier)

        texts = [question, *earlier] if self.assistant else [question]
        call, answer = await self.policies.apply("advise", texts, caller, work)
        return {**call.summary(answer.degraded, answer.served_by), "answer": answer.outputs[0],
                **answer.payload}

    async def _complete(self, request: ToolChatRequest, caller: Caller) -> dict:
        """A `chat.completion`: the tool call for the client to run, or the answer."""
        if request.model != MODEL_ID:
            raise UnknownModel(f"model {request.model!r} is not served here; GET /models "
                               f"lists {MODEL_ID!r}")
        if request.stream:
            raise InvalidRequest("stream: the advisor answers whole (its answers are checked "
                                 "before they leave)")
        asked = last_user_message(request.messages, self.limits)
        earlier = [m.text() for m in request.messages if m.role == "user"][:-1]
        returned = _tool_results(request.messages)

        async def work(c: Call) -> Answer:
            told = conversation(request.messages, c.texts) if self.assistant else None
            if returned:
                return await self._quote(c, *returned, told)
            if told:
                return await self._write(c, not request.offers_tool(), list(told))
            return await self._advise(c, not request.offers_tool(), earlier)

        texts = conversation_texts(request.messages, self.limits) if self.assistant else [asked]
        call, answer = await self.policies.apply("advise", texts, caller, work)
        payload = answer.payload
        message = {"role": "assistant", "content": answer.outputs[0]}
        if payload["action"] == "tool_call":
            message["tool_calls"] = [{"id": t["id"], "type": "function", "function": {
                "name": t["name"], "arguments": json.dumps(t["arguments"])}} for t in answer.tools]
        return {"id": f"chatcmpl-{call.request_id}", "object": "chat.completion",
                "created": int(time.time()), "model": MODEL_ID,
                "choices": [{"index": 0, "message": message, "finish_reason":
                             "tool_calls" if payload["action"] == "tool_call" else "stop"}],
                "usage": {"prompt_tokens": answer.tokens, "completion_tokens": 0,
                          "total_tokens": answer.tokens},
                "llmops": {**call.summary(answer.degraded, answer.served_by), **payload}}

    async def _verdicts(self, call: Call, texts: list[str]) -> list[dict]:
        """The classifier's verdicts on `texts` (at a peak, its student's)."""
        rid = call.request_id
        with self.pressure.track() as peak:
            async with self.log.on_failure(rid, call.texts[:1], call.started,
                                           call.principal.tenant):
                return [check_label(unwrap(v)) for v in await asyncio.gather(*(
                    self._classify(Item(text, rid, fallback=peak)) for text in texts))]

    async def _advise(self, call: Call, run_tool: bool, earlier: list[str]) -> Answer:
        """Classify the question, plan (`earlier`: the client's earlier messages), run the tool
        (here, or hand the call to the client)."""
        question, rid = call.texts[0], call.request_id
        recent = earlier[-dialogue.FOLLOW_UPS:]  # what the conversation's intent is read from
        verdict, *before = await self._verdicts(call, [question, *recent])
        plan = dialogue.plan(question, verdict, _advice(call), self.config, earlier,
                             dialogue.conversation_intent(list(zip(recent, before)), self.config))
        result, tools = None, []
        if plan.arguments is not None:
            call_id = f"call_{rid}"
            if run_tool:
                result = await asyncio.to_thread(simulate, plan.arguments, self.config.portfolio)
            tools = [tool_call(call_id, plan.arguments, result, self.digest)]
        text = None if tools and result is None else self._checked(
            dialogue.reply(plan, result, self.config), [result, plan.problem], question)
        await self.log.record(rid, [question], [verdict], [{"classifier": verdict["model"]}],
                              call.started, tenant=call.principal.tenant)
        return self._answer(text, plan, verdict, result, tools)

    async def _write(self, call: Call, run_tool: bool, messages: list[dict]) -> Answer:
        """The assistant's answer (`serve_apps/assistant.py`): its call of the simulation run
        here (or handed to the client), its text vetted; the classifier still reads the
        question (the refusal rule, the log)."""
        question, rid = call.texts[0], call.request_id
        (verdict,) = await self._verdicts(call, [question])
        try:
            turn = await self.assistant.decide(rid, messages)
            p = dialogue.Plan(verdict["label"], turn.request, problem=turn.problem,
                              refused=dialogue.refuses(verdict, _advice(call)))
            result, tools, text = None, [], turn.text
            if turn.request is not None:
                if run_tool:
                    result = await asyncio.to_thread(simulate, turn.request,
                                                     self.config.portfolio)
                    text = await self.assistant.answer(rid, messages, turn, result["figures"])
                tools = [tool_call(turn.call["id"], turn.request, result, self.digest)]
            elif turn.problem:
                text = dialogue.unsimulated(turn.problem)
        except Exception as exc:  # the model failed: the classifier and templates answer
            if callers_fault(exc):
                raise
            metrics.degraded(type(exc).__name__)
            earlier = [m["content"] for m in messages if m["role"] == "user"][:-1]
            answer = await self._advise(call, run_tool, earlier)
            answer.degraded = True
            return answer
        vetted, vetting = (None, _BY_ASSISTANT) if tools and result is None else self._vetted(
            text or "", p, result, _client_text(messages))
        await self.log.record(rid, [question], [verdict], [{"classifier": verdict["model"]}],
                              call.started, tenant=call.principal.tenant)
        return self._answer(vetted, p, verdict, result, tools, turn, vetting)

    def _vetted(self, text: str, p: dialogue.Plan, result: dict | None, client_text: str
                ) -> tuple[str, dict]:
        """The assistant's `text` with the refusal and the disclaimer, if it wrote one and every
        number in it is supported; else the template's answer. And who wrote it (`written_by`)
        with the numbers that were not supported (`rejected`)."""
        written = dialogue.reply(dialogue.Plan(p.intent, text=text, refused=p.refused), None,
                                 self.config)
        rejected = invented(written, [r for r in (result, p.problem) if r], client_text,
                            self.fixed)
        if text.strip() and not rejected:
            return written, _BY_ASSISTANT
        instead = p if result is not None else dialogue.Plan(
            p.intent, text=dialogue.unsimulated(p.problem) if p.problem
            else self.config.other_reply, refused=p.refused)
        return self._checked(dialogue.reply(instead, result, self.config), [result, p.problem],
                             client_text), {"written_by": "template", "rejected": rejected}

    async def _quote(self, call: Call, calls: dict[str, dict], results: dict[str, dict],
                     messages: tuple[dict, ...] | None = None) -> Answer:
        """The answer to a client's follow-up carrying the tool's result: its figures quoted,
        by the assistant where there is one (`messages`: the conversation it reads)."""
        question = call.texts[0]
        call_id, arguments = next(iter(calls.items()))
        request = request_of(arguments, self.config.portfolio).model_dump()
        # only the figures are quoted: a client's own tool need not suggest a rebalancing
        result = {"figures": results[call_id]["figures"], "request": request}
        p = dialogue.Plan("simulate", request, refused=_advice(call))
        tools = [tool_call(call_id, request, result, self.digest)]
        if messages is None:
            text = self._checked(dialogue.reply(p, result, self.config), [result], question)
            return self._answer(text, p, None, result, tools)
        text, turn = await self.assistant.follow_up(call.request_id, list(messages))
        text, vetting = self._vetted(text, p, result, _client_text(messages))
        return self._answer(text, p, None, result, tools, turn, vetting)

    def _checked(self, text: str, tool_results: list, question: str) -> str:
        return check(text, [r for r in tool_results if r is not None], question, self.fixed)

    def _answer(self, text: str | None, plan: dialogue.Plan, verdict: dict | None,
                result: dict | None, tools: list[dict], turn: Turn | None = None,
                vetting: dict | None = None) -> Answer:
        """The call's answer; with the assistant's `turn`, its model and who wrote the text
        (`vetting`, `_vetted`'s)."""
        models = {"classifier": StageModel(**verdict["model"])} if verdict else {}
        if turn is not None and turn.outs:
            models["assistant"] = StageModel(**turn.outs[-1]["model"])
        action = "tool_call" if tools and result is None else plan.action
        payload = {"intent": plan.intent, "action": action, "refused": plan.refused,
                   "confidence": verdict["confidence"] if verdict else None,
                   "missing": plan.missing, "carried": plan.carried, "tool_calls": tools,
                   "simulation": result, "disclaimer": self.config.disclaimer,
                   "models": {k: m.model_dump() for k, m in models.items()}, **(vetting or {})}
        fallback = served_by([verdict]) if verdict else None
        tokens = (verdict["tokens"] if verdict else 0) + (turn.tokens if turn else 0)
        return Answer([text], [models], tokens, fallback is not None, payload, tools, fallback)

    async def _simulate(self, request: SimulationRequest | dict, caller: Caller) -> dict:
        body = request_of(request, self.config.portfolio)

        async def run(call: Call) -> Answer:
            result = await asyncio.to_thread(simulate, body, self.config.portfolio)
            return Answer([json.dumps(result["figures"])], [{}], payload=result, tools=[
                tool_call(f"call_{call.request_id}", result["request"], result, self.digest)])

        holdings = ", ".join(f"{k} {v}" for k, v in body.holdings.items())
        call, answer = await self.policies.apply(
            "advise", [f"simulate {holdings} over {body.horizon_years} years"], caller, run)
        return {"request_id": call.request_id, **answer.payload,
                "disclaimer": self.config.disclaimer}

