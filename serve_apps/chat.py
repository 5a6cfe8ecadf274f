"""The `chat` application: OpenAI-compatible chat completions over a registered causal LM and
the LoRA adapters served over it, picked by the request's `model` (`serve_apps/adapters.py`).

`POST /v1/chat/completions` (with `stream: true`, server-sent events ending in `data: [DONE]`)
and `GET /v1/models`, so the official `openai` client works with `base_url=.../v1`. The model
reads the whole conversation and the tools offered through its chat template
(`training/prompts.py`), and its tool calls come back as `tool_calls` (`serve_apps/tool_calls.py`).
Python: `serve.get_app_handle("chat").complete.remote`.
"""

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import Request, Response
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from ray import serve
from ray.serve.handle import DeploymentHandle

from serve_apps import metrics
from serve_apps.auth import Principal
from serve_apps.breaker import CircuitBreaker, GeneratorUnavailable, callers_fault
from serve_apps.call import Answer, Call, Caller, estimate_tokens
from serve_apps.config import ChatAppConfig
from serve_apps.http import InvalidOutput, create_app, parse, served_by
from serve_apps.inference_log import generated
from serve_apps.openai_schema import Message, Tool, ToolChoice, conversation, conversation_texts
from serve_apps.pipeline import Pipeline
from serve_apps.tool_calls import ToolParser, forced_call
from serve_apps.tool_calls import parse as parse_tool_calls
from training.prompts import Chat
from training.refs import UnknownModel, reference


class ChatRequest(BaseModel):
    """The OpenAI request fields this server honours; others are accepted and ignored, as
    OpenAI-compatible servers do. Every value is checked here, before the request can join a
    batch: one caller's bad value is that caller's 422, never a failed batch."""

    model_config = ConfigDict(extra="ignore")
    model: str = Field(max_length=256)
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2, allow_inf_nan=False)
    top_p: float | None = Field(None, gt=0, le=1, allow_inf_nan=False,
                                description="accepted and checked; sampling uses the full "
                                "distribution")
    seed: int | None = Field(None, ge=0, le=2**32 - 1, description="a 32-bit seed")
    stop: str | list[Annotated[str, Field(min_length=1, max_length=64)]] | None = Field(
        None, max_length=4)
    stream: bool = False
    n: int = Field(1, ge=1, le=1)
    tools: list[Tool] | None = Field(None, max_length=64)
    tool_choice: ToolChoice | None = None

    @field_validator("stop")
    @classmethod
    def _stop(cls, value):
        if isinstance(value, str) and not 1 <= len(value) <= 64:
            raise ValueError("a stop sequence has 1-64 characters")
        return value

    @model_validator(mode="after")
    def _tool_choice(self) -> "ChatRequest":
        names = {t.function.name for t in self.tools or ()}
        if self.tool_choice == "required" and not names:
            raise ValueError("tool_choice 'required' needs tools to call")
        named = getattr(self.tool_choice, "function", None)
        if named is not None and named.name not in names:
            raise ValueError(f"tool_choice names {named.name!r}, which is not among the tools")
        return self

    @property
    def offered(self) -> list[Tool]:
        """The tools the model may call (none with `tool_choice: none`)."""
        return (self.tools or []) if self.tool_choice != "none" else []

    def forced(self, parser: ToolParser) -> str:
        """The start of a call the answer is made to begin with: for `tool_choice: required`
        (any function offered) or a named function; else nothing."""
        if self.tool_choice in (None, "auto", "none"):
            return ""
        return forced_call(parser, getattr(self.tool_choice, "function", None) and
                           self.tool_choice.function.name)

    def prompt(self, texts: list[str], prefix: str = "") -> str | Chat:
        """What the generator answers, with the guardrails' `texts` (in `reading_order`) in
        place of the messages' own: a lone user message as a text, else the conversation (and
        the `prefix` its answer begins with)."""
        if len(self.messages) == 1 and not self.offered:
            return texts[0]
        return Chat(conversation(self.messages, texts),
                    tuple(t.model_dump(exclude_none=True) for t in self.offered), prefix)

    def options(self) -> dict:
        stop = [self.stop] if isinstance(self.stop, str) else self.stop
        return {"max_new_tokens": self.max_completion_tokens or self.max_tokens,
                "temperature": self.temperature, "seed": self.seed, "stop": stop}


def _answer(out: dict, failed: bool) -> Answer:
    """A generator's answer `out` (a completion's or a whole stream's) as the call's: degraded
    where the fallback reply stands in for it (`failed`) or the peak's student wrote it
    (served by the fallback)."""
    student = served_by([out])
    return Answer([out["text"]], [{"generator": out["model"]}],
                  out["prompt_tokens"] + out["completion_tokens"], failed or student is not None,
                  out, served_by=student)


app = create_app("llmops chat", "OpenAI-compatible chat completions over registered causal LMs.")


@serve.deployment(ray_actor_options={"num_cpus": 0.1}, max_ongoing_requests=256)
@serve.ingress(app)
class ChatPipeline(Pipeline):
    application, settings = "chat", ChatAppConfig

    def __init__(self, generator: DeploymentHandle | None, config: dict, limits: dict,
                 tracking_uri: str | None, log: dict | None = None,
                 governance: dict | None = None):
        super().__init__(app, {"Generator": generator}, config, limits, tracking_uri, log,
                         governance)
        self.generator = self.stages["Generator"]
        self.breaker = CircuitBreaker(self.config.breaker)
        self.created = int(time.time())
        self.roots: dict[str, str] = {}  # adapter name -> its exact version, as last listed

    @app.get("/models")
    async def http_models(self, request: Request) -> dict:
        await self.policies.authorize(Caller.http(request), "chat")
        return {"object": "list", "data": await self.models()}

    @app.post("/chat/completions")
    async def http_complete(self, body: ChatRequest, request: Request, response: Response):
        caller = Caller.http(request)
        if not body.stream:
            out, call = await self._complete(body, caller)
            response.headers.update(call.headers)
            return out
        call = await self._enter(body, caller)  # errors are a 4xx before the stream opens

        async def events() -> AsyncIterator[str]:
            async for chunk in self._chunks(call, body):
                yield f"data: {json.dumps(chunk)}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream", headers=call.headers)

    async def models(self) -> list[dict]:
        """The base and each LoRA adapter served over it (`parent`: the base), as OpenAI-style
        servers list them; `root` is the exact version."""
        served = await self.generator.identity.remote()
        base = served["champion"]
        adapters = served.get("adapters") or {}
        self.roots = {name: reference(a["name"], a["version"]) for name, a in adapters.items()}

        def entry(name: str, identity: dict, parent: str | None) -> dict:
            return {"id": name, "object": "model", "created": self.created, "owned_by": "llmops",
                    "version": identity["version"], "parent": parent,
                    "root": reference(identity["name"], identity["version"])}

        return [entry(base["name"], base, None)] + [entry(name, a, base["name"])
                                                    for name, a in adapters.items()]

    def _generator_for(self, model: str, **options) -> DeploymentHandle:
        """The generator's handle for a request naming `model`: for an adapter, Serve routes it
        to a replica that holds that adapter version already, where there is one."""
        root = self.roots.get(model)
        return self.generator.options(**options, **({"multiplexed_model_id": root} if root else {}))

    async def _open(self, request: ChatRequest, caller: Caller) -> Call:
        """The call for the text to answer, after checking the model name and the limits."""
        served = {m["id"] for m in await self.models()}
        if request.model not in served:
            raise UnknownModel(f"model {request.model!r} is not served here; "
                               f"GET /v1/models lists {sorted(served)}")
        texts = conversation_texts(request.messages, self.limits)  # guardrails read them all
        cap = self.config.generator.generation_config.max_new_tokens  # the generator's own cap
        limit = min(request.options()["max_new_tokens"] or cap, cap)
        return self.policies.open("chat", texts, caller, estimate_tokens(texts, limit))

    async def complete(self, request: ChatRequest | dict, correlation_id: str | None = None,
                       principal: Principal | dict | None = None) -> dict:
        """A `chat.completion` object, with the exact model version under `llmops`."""
        out, _ = await self.admit("complete", request, correlation_id, principal,
                                  lambda caller: self._complete(parse(ChatRequest, request),
                                                                caller))
        return out

    async def _complete(self, request: ChatRequest, caller: Caller) -> tuple[dict, Call]:
        """The completion and the call it ran as (its headers go on an HTTP response)."""
        call = await self._open(request, caller)
        answer = await self.policies.run(call, lambda c: self._generate(c, request))
        out, rid = answer.payload, call.request_id
        content, calls = self._tool_calls(answer.outputs[0], request, rid)
        return ({
            "id": f"chatcmpl-{rid}", "object": "chat.completion", "created": int(time.time()),
            "model": request.model,
            "choices": [{"index": 0, "finish_reason": "tool_calls" if calls else out["finish_reason"],
                         "message": {"role": "assistant", "content": content,
                                     **({"tool_calls": calls} if calls else {})}}],
            "usage": {"prompt_tokens": out["prompt_tokens"],
                      "completion_tokens": out["completion_tokens"],
                      "total_tokens": out["prompt_tokens"] + out["completion_tokens"]},
            "llmops": self._meta(call, answer.degraded, out["model"], answer.served_by)}, call)

    def _tool_calls(self, text: str, request: ChatRequest, rid: str) -> tuple[str | None, list]:
        """The answer's text and the calls it makes of the tools offered."""
        if not request.offered:
            return text, []
        return parse_tool_calls(text, self.parser, {t.function.name for t in request.offered},
                                f"call_{rid}")

    async def _generate(self, call: Call, request: ChatRequest) -> Answer:
        """The generator's answer (at a peak its student's, where it has one: the switch is the
        generator's `fallback`; not with tools offered, which the student never learnt to
        call), or the fallback reply while it fails or its breaker is open."""
        prefix = request.forced(self.parser)
        with self.pressure.track() as peak:
            try:
                out = await self.breaker.call(lambda: self._generator_for(request.model)
                                              .generate.remote(request.prompt(call.texts, prefix),
                                                               call.request_id,
                                                               model=request.model, embed=True,
                                                               fallback=peak and not request.offered,
                                                               **request.options()))
                out = self._forced(out, prefix, request, call.request_id)
                degraded = False
            except Exception as exc:
                if callers_fault(exc) or isinstance(exc, InvalidOutput):  # no fallback for these
                    raise
                out, degraded = self._fallback(exc), True
        await self._record(call, out)
        return _answer(out, degraded)

    @property
    def parser(self) -> ToolParser:
        return self.config.generator.generation_config.tool_parser

    def _forced(self, out: dict, prefix: str, request: ChatRequest, rid: str) -> dict:
        """A generator's answer begun with a forced call's `prefix`, whole again; one that does
        not make a call is refused (502: the model answered outside the request's contract)."""
        if not prefix:
            return out
        out = {**out, "text": prefix + out["text"]}
        if not self._tool_calls(out["text"], request, rid)[1]:
            raise InvalidOutput(f"tool_choice asked for a call, and the model wrote none that "
                                f"parses as {self.parser}")
        return out

    def _fallback(self, error: Exception) -> dict:
        metrics.degraded(type(error).__name__)
        if self.config.fallback_reply is None:
            if isinstance(error, GeneratorUnavailable):
                raise error
            raise GeneratorUnavailable(f"the generator failed ({type(error).__name__})",
                                       self.breaker.config.cooldown_s) from error
        return {"text": self.config.fallback_reply, "finish_reason": "stop", "model": None,
                "prompt_tokens": 0, "completion_tokens": 0}

    def _meta(self, call: Call, degraded: bool, model: dict | None,
              peak: str | None = None) -> dict:
        return {**call.summary(degraded, peak), "model": model}

    async def _enter(self, request: ChatRequest, caller: Caller) -> Call:
        call = await self._open(request, caller)
        await self.policies.enter(call)
        return call

    async def stream(self, request: ChatRequest | dict, correlation_id: str | None = None,
                     principal: Principal | dict | None = None) -> AsyncIterator[dict]:
        """`chat.completion.chunk` objects: the role, the content piece by piece, the finish."""
        async def enter(caller: Caller) -> tuple[ChatRequest, Call]:
            parsed = parse(ChatRequest, request)
            return parsed, await self._enter(parsed, caller)

        request, call = await self.admit("stream", request, correlation_id, principal, enter)
        async for chunk in self._chunks(call, request):
            yield chunk

    async def _chunks(self, call: Call, request: ChatRequest) -> AsyncIterator[dict]:
        """The chunks of a call the policies let in. With output guardrails the content is
        held until the whole answer is checked (a pattern may span pieces), then sent; so is
        an answer to a request offering tools (a call is only known once it is whole)."""
        rid, hold = call.request_id, self.policies.checks_output or bool(request.offered)
        base = {"id": f"chatcmpl-{rid}", "object": "chat.completion.chunk",
                "created": int(time.time()), "model": request.model}

        def content(text: str) -> dict:
            return {**base, "choices": [{"index": 0, "delta": {"content": text},
                                         "finish_reason": None}]}

        pieces: list[str] = []
        stream, prefix = None, request.forced(self.parser)
        with self.pressure.track() as peak:
            try:
                stream = self._generator_for(request.model, stream=True).stream.remote(
                    request.prompt(call.texts, prefix), rid, model=request.model, embed=True,
                    fallback=peak and not request.offered, **request.options())
                try:
                    first = await self.breaker.call(lambda: anext(stream))
                except Exception as exc:
                    if callers_fault(exc):
                        raise
                    first, stream = self._fallback(exc), None
                    pieces.append(first["text"])
                yield {**base, "choices": [{"index": 0, "delta": {"role": "assistant"},
                                            "finish_reason": None}],
                       "llmops": {"request_id": rid, "model": first["model"]}}
                wait = self.config.generator.generation_config.piece_timeout_s
                while stream is not None and (piece := await asyncio.wait_for(
                        anext(stream, None), wait)) is not None:
                    pieces.append(piece["text"])
                    if not hold:
                        yield content(piece["text"])
                if stream is not None:  # a forced call's start is part of its answer
                    pieces = [self._forced({"text": "".join(pieces)}, prefix, request, rid)["text"]]
            except BaseException as exc:  # a client gone (cancelled, closed) is settled too
                if stream is not None:
                    stream.cancel()  # the generator replica stops generating for nobody
                await self.policies.fail(call, exc)  # shielded: settled even when cancelled
                raise
        text = "".join(pieces)
        out = {"text": text, "model": first["model"], "finish_reason": "stop",
               "prompt_tokens": first["prompt_tokens"], "embedding": first.get("embedding"),
               "completion_tokens": estimate_tokens([text]) if stream else 0}
        answer = await self.policies.leave(call, _answer(out, stream is None))
        text, calls = self._tool_calls(answer.outputs[0], request, rid)
        if (hold or stream is None) and text:
            yield content(text)
        if calls:
            yield {**base, "choices": [{"index": 0, "finish_reason": None, "delta": {
                "tool_calls": [{"index": i, **c} for i, c in enumerate(calls)]}}]}
        yield {**base, "choices": [{"index": 0, "delta": {},
                                    "finish_reason": "tool_calls" if calls else "stop"}],
               "llmops": self._meta(call, answer.degraded, first["model"], answer.served_by)}
        await self._record(call, out)

    async def _record(self, call: Call, out: dict) -> None:
        """The log keeps the prompt and the answer (redacted: what a reviewer corrects), the
        prompt's descriptors and how the answer ended."""
        stages = {"generator": out["model"]} if out.get("model") else {}  # none: the fallback
        text = call.texts[0]
        await self.log.record(call.request_id, [text], [generated(text, out)], [stages],
                              call.started, tenant=call.principal.tenant)
