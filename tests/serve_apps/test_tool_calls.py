"""Reading tool calls from generated text (`serve_apps/tool_calls.py`), framing conversations
with tools (`training/prompts.py`) and the chat request's conversation checks, without Ray
(served end to end: test_tool_calling.py)."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from serve_apps.chat import ChatRequest
from serve_apps.config import LimitsConfig
from serve_apps.http import InvalidRequest
from serve_apps.openai_schema import conversation_texts
from serve_apps.tool_calls import forced_call, parse
from training.prompts import PROMPT, Chat, InvalidConversation, prompt_of

OFFERED = {"get_weather", "get_time"}


def _call(name: str, **arguments) -> str:
    return f"<tool_call>{json.dumps({'name': name, 'arguments': arguments})}</tool_call>"


def _named(calls: list[dict]) -> list[tuple[str, str, dict]]:
    return [(c["id"], c["function"]["name"], json.loads(c["function"]["arguments"]))
            for c in calls]


def test_hermes_calls_are_read_with_the_text_around_them():
    text = f"Let me check. {_call('get_weather', city='Paris')}\n{_call('get_time', tz='CET')}"
    content, calls = parse(text, "hermes", OFFERED, "call_r")
    assert content == "Let me check."
    assert _named(calls) == [("call_r-0", "get_weather", {"city": "Paris"}),
                             ("call_r-1", "get_time", {"tz": "CET"})]
    assert all(c["type"] == "function" for c in calls)
    # a call cut off by the token limit still parses when its JSON is whole
    content, calls = parse('<tool_call>{"name": "get_time", "arguments": {}}', "hermes",
                           OFFERED, "x")
    assert content is None and _named(calls) == [("x-0", "get_time", {})]


@pytest.mark.parametrize("text", [
    "It is sunny.",
    _call("delete_account", user="me"),  # a function nobody offered
    '<tool_call>{"name": "get_weather", "arguments": {"city": "Par</tool_call>',  # bad JSON
    '<tool_call>{"name": "get_weather", "arguments": "not json"}</tool_call>',
    '<tool_call>["get_weather"]</tool_call>',
])
def test_what_is_not_a_call_of_an_offered_tool_stays_the_answer_text(text):
    assert parse(text, "hermes", OFFERED, "r") == (text, [])


def test_a_call_among_bad_ones_is_read_and_the_bad_ones_stay_text():
    bad = _call("delete_account")
    content, calls = parse(f"{bad} {_call('get_weather', city='Oslo')}", "hermes", OFFERED, "r")
    assert content == bad and _named(calls) == [("r-0", "get_weather", {"city": "Oslo"})]


def test_json_calls_are_the_whole_answer_with_arguments_or_parameters():
    one = json.dumps({"name": "get_weather", "parameters": {"city": "Rome"}})
    assert _named(parse(f" {one}\n", "json", OFFERED, "r")[1]) == [
        ("r-0", "get_weather", {"city": "Rome"})]
    two = json.dumps([{"name": "get_time", "arguments": json.dumps({"tz": "UTC"})},
                      {"name": "get_weather", "arguments": {"city": "Oslo"}}])
    content, calls = parse(two, "json", OFFERED, "r")
    assert content is None and [n for _, n, _ in _named(calls)] == ["get_time", "get_weather"]
    for text in ["The weather is fine.", '{"city": "Rome"}', json.dumps(
            [{"name": "get_time", "arguments": {}}, {"name": "nope", "arguments": {}}])]:
        assert parse(text, "json", OFFERED, "r") == (text, [])


def test_a_forced_call_begins_in_the_parsers_format_and_parses_once_written_on():
    named = forced_call("hermes", "get_time")
    assert named == '<tool_call>\n{"name": "get_time", "arguments":'
    content, calls = parse(named + ' {"tz": "CET"}}\n</tool_call>', "hermes", OFFERED, "r")
    assert content is None and _named(calls) == [("r-0", "get_time", {"tz": "CET"})]
    assert forced_call("hermes", None) == '<tool_call>\n{"name": "'
    assert forced_call("json", "get_time") == '{"name": "get_time", "parameters":'
    assert _named(parse(forced_call("json", None) + 'get_time", "parameters": {}}', "json",
                        OFFERED, "r")[1]) == [("r-0", "get_time", {})]


class _Templated:
    """A tokenizer's chat-template side (what `prompt_of` uses), without a vocabulary."""

    chat_template = "{{ tools }}|{% for m in messages %}{{ m.role }}:{{ m.content }};{% endfor %}"

    def apply_chat_template(self, messages, tools=None, tokenize=False,
                            add_generation_prompt=False):
        from jinja2 import Template

        if any(m["role"] == "robot" for m in messages):
            from jinja2 import TemplateError

            raise TemplateError("roles must be user or assistant")
        return Template(self.chat_template).render(messages=messages, tools=tools) + (
            ">" if add_generation_prompt else "")


def test_a_conversation_is_framed_by_the_chat_template_with_its_tools():
    tool = {"type": "function", "function": {"name": "get_weather"}}
    chat = Chat(({"role": "system", "content": "be brief"},
                 {"role": "user", "content": "weather?"}), (tool,))
    assert prompt_of(_Templated(), chat) == f"{[tool]}|system:be brief;user:weather?;>"
    assert prompt_of(_Templated(), "hi") == "None|user:hi;>"
    assert prompt_of(_Templated(), Chat(chat.messages, (tool,), "<call>")).endswith(";><call>")
    with pytest.raises(InvalidConversation, match="refuses this conversation"):
        prompt_of(_Templated(), Chat(({"role": "robot", "content": "x"},)))


def test_without_a_chat_template_the_newest_user_message_is_read_and_tools_are_refused():
    class Plain:
        chat_template = None

    chat = Chat(({"role": "user", "content": "first"}, {"role": "assistant", "content": "ok"},
                 {"role": "user", "content": "second"}))
    assert prompt_of(Plain(), chat) == PROMPT.format(text="second")
    with pytest.raises(InvalidConversation, match="no chat template"):
        prompt_of(Plain(), Chat(chat.messages, ({"type": "function", "function": {}},)))


def test_the_guardrails_read_every_text_and_the_model_what_they_let_through():
    request = ChatRequest.model_validate({"model": "m", "tools": [
        {"type": "function", "function": {"name": "get_weather"}}], "messages": [
        {"role": "developer", "content": "be brief"},
        {"role": "user", "content": "weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [{"id": "c1", "type": "function",
         "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "21 C"},
        {"role": "user", "content": "and in Rome?"}]})
    texts = conversation_texts(request.messages, LimitsConfig())
    assert texts == ["and in Rome?", "be brief", "weather in Paris?", "21 C"]  # newest first
    chat = request.prompt([t.upper() for t in texts])  # as if a guardrail rewrote each
    assert [(m["role"], m["content"]) for m in chat.messages] == [
        ("system", "BE BRIEF"), ("user", "WEATHER IN PARIS?"), ("assistant", ""),
        ("tool", "21 C"), ("user", "AND IN ROME?")]
    assert chat.messages[2]["tool_calls"][0]["function"]["arguments"] == {"city": "Paris"}
    assert chat.messages[3]["tool_call_id"] == "c1" and chat.last_user == "AND IN ROME?"
    assert chat.tools == ({"type": "function", "function": {"name": "get_weather"}},)
    # a lone user message without tools is a text, as the model was trained on
    lone = ChatRequest.model_validate({"model": "m", "messages": [request.messages[1]]})
    assert lone.prompt(["x"]) == "x"
    with pytest.raises(InvalidRequest, match="messages\\[0\\] has 2001 characters"):
        conversation_texts(ChatRequest.model_validate({"model": "m", "messages": [
            {"role": "system", "content": "s" * 2001},
            {"role": "user", "content": "hi"}]}).messages, LimitsConfig())


@pytest.mark.parametrize("body", [
    {"tool_choice": "required"},  # no tools to call
    {"tool_choice": {"type": "function", "function": {"name": "get_weather"}}},
    {"messages": [{"role": "assistant", "tool_calls": [{"id": "c", "type": "function",
                   "function": {"name": "f", "arguments": "[1]"}}]}]},
])
def test_what_the_server_cannot_honour_is_refused_at_parsing(body):
    with pytest.raises(ValidationError):
        ChatRequest.model_validate({"model": "m", "messages": [{"role": "user", "content": "x"}],
                                    **body})
