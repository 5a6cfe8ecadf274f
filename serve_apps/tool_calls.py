"""A language model's tool calls, read from the text it generated, as OpenAI's `tool_calls`.

Models write calls in their family's format (what vLLM's `--tool-call-parser` names):
- `hermes`: each call a JSON object `{"name": ..., "arguments": {...}}` between `<tool_call>`
  and `</tool_call>` (Qwen 2.5 and 3, Hermes 2 and 3, and the models trained on their format);
- `json`: the whole answer one such object or a list of them, `parameters` for `arguments`
  (Llama 3.1-3.3's JSON tool calling).
A call is only one of a function offered to the model, with an object of arguments; anything
else stays the answer's text, as the model wrote it, so nothing it said is lost."""

from __future__ import annotations

import json
import re
from typing import Literal

ToolParser = Literal["hermes", "json"]

_HERMES = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.DOTALL)


def forced_call(parser: ToolParser, name: str | None) -> str:
    """The start of a call that an answer is made to begin with (written after the generation
    prompt, so the model writes on from it): of any function offered (`name` None: OpenAI's
    `tool_choice: required`), or of the one named. Only a grammar could force the rest; what
    does not parse then is the caller's to refuse."""
    key = "arguments" if parser == "hermes" else "parameters"
    start = '<tool_call>\n{"name": "' if parser == "hermes" else '{"name": "'
    return start + (f'{name}", "{key}":' if name else "")  # the model writes the space on


def parse(text: str, parser: ToolParser, offered: set[str], call_id: str
          ) -> tuple[str | None, list[dict]]:
    """(the answer's remaining text or None, its calls); ids are `call_id` and the call's
    index, so a request's calls are named the same wherever it is replayed."""
    if parser == "hermes":
        found = [(m.span(), _call(m.group(1), offered)) for m in _HERMES.finditer(text)]
        calls = [c for _, c in found if c is not None]
        rest = text
        for (start, end), call in reversed(found):
            if call is not None:
                rest = rest[:start] + rest[end:]
    else:
        calls, rest = _json_calls(text.strip(), offered), text
        if calls:
            rest = ""
    named = [{"id": f"{call_id}-{i}", "type": "function",
              "function": {"name": name, "arguments": json.dumps(arguments)}}
             for i, (name, arguments) in enumerate(calls)]
    return (rest.strip() or None) if named else text, named


def _call(body: str, offered: set[str]) -> tuple[str, dict] | None:
    try:
        value = json.loads(body)
    except ValueError:
        return None
    return _named(value, offered)


def _named(value, offered: set[str]) -> tuple[str, dict] | None:
    if not isinstance(value, dict) or value.get("name") not in offered:
        return None
    arguments = value.get("arguments", value.get("parameters", {}))
    if isinstance(arguments, str):  # some models write the arguments as a JSON string
        try:
            arguments = json.loads(arguments)
        except ValueError:
            return None
    return (value["name"], arguments) if isinstance(arguments, dict) else None


def _json_calls(text: str, offered: set[str]) -> list[tuple[str, dict]]:
    """The calls of an answer that is wholly a call or a list of calls; else none."""
    try:
        value = json.loads(text)
    except ValueError:
        return []
    values = value if isinstance(value, list) else [value]
    calls = [_named(v, offered) for v in values]
    return calls if calls and all(c is not None for c in calls) else []
