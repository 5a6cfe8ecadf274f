"""The OpenAI chat wire format both chat applications read (`chat`, `advisor`): messages with
text or text parts, and the function-calling fields (`tools`, an assistant's `tool_calls`, a
`tool` message's `tool_call_id`). Fields a server does not use are accepted and ignored, as
OpenAI-compatible servers do."""

from __future__ import annotations

import json
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from serve_apps.config import LimitsConfig
from serve_apps.http import InvalidRequest, check_text, check_texts


class ContentPart(BaseModel):
    type: Literal["text"]
    text: str


class FunctionCall(BaseModel):
    name: str = Field(max_length=64)
    arguments: str = Field(max_length=20_000, description="a JSON object, as a string")

    @field_validator("arguments")
    @classmethod
    def _object(cls, value: str) -> str:
        try:
            if isinstance(json.loads(value), dict):
                return value
        except ValueError:
            pass
        raise ValueError("arguments must be a JSON object")


class ToolCall(BaseModel):
    model_config = ConfigDict(extra="ignore")
    id: str = Field(min_length=1, max_length=128)
    type: Literal["function"] = "function"
    function: FunctionCall


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[ContentPart] | None = None
    tool_calls: list[ToolCall] | None = Field(None, max_length=16)
    tool_call_id: str | None = Field(None, max_length=128)

    def text(self) -> str:
        if self.content is None:
            return ""
        return self.content if isinstance(self.content, str) else " ".join(
            p.text for p in self.content)


class Function(BaseModel):
    model_config = ConfigDict(extra="ignore")
    name: str = Field(min_length=1, max_length=64)
    description: str | None = None
    parameters: dict | None = None


class Tool(BaseModel):
    """A function the client offers the model (`tools`)."""

    type: Literal["function"]
    function: Function


class NamedToolChoice(BaseModel):
    type: Literal["function"]
    function: Function


ToolChoice = Literal["none", "auto", "required"] | NamedToolChoice


def reading_order(messages: list[Message]) -> list[int]:
    """The messages a model reads text of: the newest user message first (what the log and
    drift checks keep of a conversation), then every other one with text, oldest first."""
    last = max(i for i, m in enumerate(messages) if m.role == "user")
    return [last] + [i for i, m in enumerate(messages) if i != last and m.text()]


def conversation_texts(messages: list[Message], limits: LimitsConfig) -> list[str]:
    """The texts of `reading_order`, each within the limits (422 otherwise, naming the
    message)."""
    last_user_message(messages, limits)
    return [check_text(messages[i].text(), f"messages[{i}]", limits)
            for i in reading_order(messages)]


def conversation(messages: list[Message], texts: list[str]) -> tuple[dict, ...]:
    """The messages as chat templates read them, with `texts` (in `reading_order`: what the
    guardrails let through) in place of their own: a developer's as a system message, tool
    calls' arguments as objects (a request's are checked to be JSON objects)."""
    content = dict(zip(reading_order(messages), texts))
    out = []
    for i, m in enumerate(messages):
        message = {"role": "system" if m.role == "developer" else m.role,
                   "content": content.get(i, "")}
        if m.tool_calls:
            message["tool_calls"] = [{"id": c.id, "type": "function", "function": {
                "name": c.function.name, "arguments": json.loads(c.function.arguments)}}
                for c in m.tool_calls]
        if m.tool_call_id:
            message["tool_call_id"] = m.tool_call_id
        out.append(message)
    return tuple(out)


def last_user_message(messages: list[Message], limits: LimitsConfig) -> str:
    """What a chat answers: the last user message, within the limits (422 otherwise)."""
    if len(messages) > limits.max_messages:
        raise InvalidRequest(f"at most {limits.max_messages} messages per request")
    users = [m.text() for m in messages if m.role == "user"]
    if not users:
        raise InvalidRequest("messages: at least one message must have role 'user'")
    return check_texts(users[-1:], limits)[0]
