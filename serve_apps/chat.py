"""The `chat` application: OpenAI-compatible chat completions over a registered causal LM.

`POST /v1/chat/completions` (with `stream: true`, server-sent events ending in `data: [DONE]`)
and `GET /v1/models`, so the official `openai` client works with `base_url=.../v1`. The last
user message is what the model answers. Python: `serve.get_app_handle("chat").complete.remote`.
"""

import json
import time
from collections.abc import AsyncIterator
from typing import Literal

from fastapi import Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from ray import serve
from ray.serve.handle import DeploymentHandle

from serve_apps.config import LimitsConfig
from serve_apps.http import InvalidRequest, check_texts, create_app, new_request_id, parse
from serve_apps.inference_log import InferenceLog
from serve_apps.model import UnknownModel
from training.features import descriptors


class ContentPart(BaseModel):
    type: Literal["text"]
    text: str


class Message(BaseModel):
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[ContentPart]

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else " ".join(
            p.text for p in self.content)


class ChatRequest(BaseModel):
    """The OpenAI request fields this server honours; others (top_p, ...) are accepted and
    ignored, as OpenAI-compatible servers do."""

    model_config = ConfigDict(extra="ignore")
    model: str
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    n: int = Field(1, ge=1, le=1)

    def options(self) -> dict:
        stop = [self.stop] if isinstance(self.stop, str) else self.stop
        return {"max_new_tokens": self.max_completion_tokens or self.max_tokens,
                "temperature": self.temperature, "seed": self.seed, "stop": stop}


app = create_app("llmops chat", "OpenAI-compatible chat completions over registered causal LMs.")


@serve.deployment(ray_actor_options={"num_cpus": 0.1}, max_ongoing_requests=256)
@serve.ingress(app)
class ChatPipeline:
    def __init__(self, generator: DeploymentHandle, limits: dict, log: dict | None = None):
        self.generator = generator
        self.limits = LimitsConfig.model_validate(limits)
        self.log = InferenceLog("chat", log)
        self.created = int(time.time())

    @app.get("/models")
    async def http_models(self) -> dict:
        return {"object": "list", "data": await self.models()}

    @app.post("/chat/completions")
    async def http_complete(self, body: ChatRequest, request: Request):
        rid = request.state.request_id
        if not body.stream:
            return await self.complete(body, rid)
        first = await self._prepare(body)  # errors surface as a 4xx before the stream opens

        async def events() -> AsyncIterator[str]:
            async for chunk in self.stream(body, rid, prepared=first):
                yield f"data: {json.dumps(chunk)}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    async def models(self) -> list[dict]:
        served = await self.generator.identity.remote()
        return [{"id": served["champion"]["name"], "object": "model", "created": self.created,
                 "owned_by": "llmops", "version": served["champion"]["version"]}]

    async def _prepare(self, request: ChatRequest) -> str:
        """The text to answer, after checking the model name and the limits."""
        served = {m["id"] for m in await self.models()}
        if request.model not in served:
            raise UnknownModel(f"model {request.model!r} is not served here; "
                               f"GET /v1/models lists {sorted(served)}")
        if len(request.messages) > self.limits.max_messages:
            raise InvalidRequest(f"at most {self.limits.max_messages} messages per request")
        users = [m.text() for m in request.messages if m.role == "user"]
        if not users:
            raise InvalidRequest("messages: at least one message must have role 'user'")
        return check_texts(users[-1:], self.limits)[0]

    async def complete(self, request: ChatRequest | dict, request_id: str | None = None) -> dict:
        """A `chat.completion` object, with the exact model version under `llmops`."""
        request = parse(ChatRequest, request)
        rid = new_request_id(request_id)
        text = await self._prepare(request)
        started = time.perf_counter()
        out = await self.generator.generate.remote(text, rid, **request.options())
        await self._record(rid, text, out, started)
        return {
            "id": f"chatcmpl-{rid}", "object": "chat.completion", "created": int(time.time()),
            "model": request.model,
            "choices": [{"index": 0, "finish_reason": out["finish_reason"],
                         "message": {"role": "assistant", "content": out["text"]}}],
            "usage": {"prompt_tokens": out["prompt_tokens"],
                      "completion_tokens": out["completion_tokens"],
                      "total_tokens": out["prompt_tokens"] + out["completion_tokens"]},
            "llmops": {"request_id": rid, "model": out["model"]}}

    async def stream(self, request: ChatRequest | dict, request_id: str | None = None,
                     prepared: str | None = None) -> AsyncIterator[dict]:
        """`chat.completion.chunk` objects: the role, the content piece by piece, the finish."""
        request = parse(ChatRequest, request)
        rid = new_request_id(request_id)
        text = prepared if prepared is not None else await self._prepare(request)
        started, first = time.perf_counter(), {}
        base = {"id": f"chatcmpl-{rid}", "object": "chat.completion.chunk",
                "created": int(time.time()), "model": request.model}
        pieces = self.generator.options(stream=True).stream.remote(text, rid, **request.options())
        async for piece in pieces:
            if "model" in piece:
                first = piece
                yield {**base, "choices": [{"index": 0, "delta": {"role": "assistant"},
                                            "finish_reason": None}],
                       "llmops": {"request_id": rid, "model": piece["model"]}}
            else:
                yield {**base, "choices": [{"index": 0, "delta": {"content": piece["text"]},
                                            "finish_reason": None}]}
        yield {**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}
        await self._record(rid, text, {**first, "finish_reason": "stop"}, started)

    async def _record(self, rid: str, text: str, out: dict, started: float) -> None:
        """The log keeps the prompt (redacted), its descriptors and how the answer ended."""
        decision = {"model": out.get("model"), "label": out.get("finish_reason"),
                    "confidence": out.get("confidence"),
                    "features": descriptors(text, out.get("prompt_tokens", 0))}
        await self.log.record(rid, [text], [decision], [{"generator": out.get("model") or {}}],
                              started)

    async def __del__(self) -> None:
        """Serve calls this on a graceful shutdown: nothing buffered is lost."""
        await self.log.close()
