"""The advisor's language model (`serve.advisor.assistant`): where one is configured, it decides
when to call the portfolio simulation (its own tool calls, read by `serve_apps/tool_calls.py`)
and writes the answers from the figures. The service keeps what must not be left to a model:
it sets the simulation's paths and seed, runs it, and checks every number the model writes
(`serve_apps/quoting.py`); the refusal and the disclaimer are added as configured.

A model's call whose arguments the simulation refuses is answered with the reason, never run
with guessed arguments; a call the client offered to run itself is handed to it."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from ray.serve.handle import DeploymentHandle

from serve_apps.dialogue import SPEC, TOOL
from serve_apps.http import InvalidRequest
from serve_apps.portfolio import request_of
from serve_apps.tool_calls import parse
from training.prompts import Chat


@dataclass
class Turn:
    """What the model made of a conversation: a simulation to run (`request`, with the
    service's paths and seed) or one it asked for that cannot run (`problem`), else its
    `text`; `outs`: the generator's answers so far (model identity, tokens)."""

    text: str | None = None
    request: dict | None = None
    problem: str | None = None
    call: dict | None = None  # the model's call, its arguments as it wrote them (an object)
    outs: list[dict] = field(default_factory=list)

    @property
    def tokens(self) -> int:
        return sum(o["prompt_tokens"] + o["completion_tokens"] for o in self.outs)


class Assistant:
    """The advisor's generator, asked with the simulation as its one tool."""

    def __init__(self, generator: DeploymentHandle, config):
        self.generator, self.config = generator, config
        self.parser = config.assistant.generation_config.tool_parser

    def _chat(self, messages: list[dict]) -> Chat:
        system = {"role": "system", "content": self.config.assistant_prompt}
        return Chat((system, *messages), (SPEC,))

    async def _generate(self, rid: str, messages: list[dict], turn: Turn) -> str:
        out = await self.generator.generate.remote(self._chat(messages), rid)
        turn.outs.append(out)
        return out["text"]

    async def _written(self, rid: str, messages: list[dict], turn: Turn) -> str:
        """The model's text answer to `messages` (a call it makes there is not run)."""
        return parse(await self._generate(rid, messages, turn), self.parser, {TOOL},
                     f"call_{rid}")[0] or ""

    async def decide(self, rid: str, messages: list[dict]) -> Turn:
        """The model's first answer to the conversation: a call of the simulation or a text."""
        turn = Turn()
        text = await self._generate(rid, messages, turn)
        content, calls = parse(text, self.parser, {TOOL}, f"call_{rid}")
        if not calls:
            turn.text = content
            return turn
        arguments = json.loads(calls[0]["function"]["arguments"])
        turn.call = {**calls[0], "function": {"name": TOOL, "arguments": arguments}}
        try:  # the service's paths and seed
            turn.request = request_of({**arguments, "paths": self.config.paths,
                                       "seed": self.config.seed},
                                      self.config.portfolio).model_dump()
        except InvalidRequest as exc:  # the model's arguments, not the client's request: no 422
            turn.problem = str(exc)
        return turn

    async def answer(self, rid: str, messages: list[dict], turn: Turn, figures: dict) -> str:
        """The model's answer once the simulation's `figures` are back (to 4 decimals: what
        an answer quotes, in fewer tokens), after its own call as it wrote it."""
        call = {"role": "assistant", "content": "", "tool_calls": [turn.call]}
        result = {"role": "tool", "tool_call_id": turn.call["id"], "content": json.dumps(
            {"figures": {k: round(v, 4) for k, v in figures.items()}})}
        return await self._written(rid, [*messages, call, result], turn)

    async def follow_up(self, rid: str, messages: list[dict]) -> tuple[str, Turn]:
        """The model's answer to a conversation that ends with the client's tool results."""
        turn = Turn()
        return await self._written(rid, messages, turn), turn
