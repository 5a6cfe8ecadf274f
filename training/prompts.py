"""What a causal LM reads: one text framed alone (`prompt_of(tokenizer, text)`), or a whole
conversation with the tools offered to it (`Chat`), through its tokenizer's chat template.

One function frames every prompt, in training, evaluation and serving, so a served model reads
exactly what it was trained on. No torch here: the serving ingress builds `Chat`s too."""

from __future__ import annotations

from dataclasses import dataclass

from training.errors import LLMOpsError

PROMPT = "Message: {text}\nRewrite:"


class InvalidConversation(LLMOpsError, ValueError):
    """A conversation the model cannot read: tools for a model without a chat template, or one
    its template refuses (roles out of order, say). The caller's input: 422 over HTTP."""

    status = 422


@dataclass(frozen=True, eq=False)
class Chat:
    """A conversation as the OpenAI wire format gives it (`messages`: dicts with `role`,
    `content` and, for an assistant's calls, `tool_calls` whose `arguments` are objects, as
    chat templates read them) and the functions offered to the model (`tools`, OpenAI's
    `{"type": "function", "function": {...}}`). `last_user` is its newest user message: what
    a model without a chat template answers, and what drift checks and the log read."""

    messages: tuple[dict, ...]
    tools: tuple[dict, ...] = ()
    prefix: str = ""  # what the answer is made to begin with (a forced tool call's start)

    @property
    def last_user(self) -> str:
        return next(m["content"] for m in reversed(self.messages) if m["role"] == "user")


def prompt_of(tokenizer, text: str | Chat) -> str:
    """What a causal LM reads for `text`: its tokenizer's chat template (the conversation, or
    one user turn, and the generation prompt) when it has one, as a chat-tuned base expects;
    else the platform's `PROMPT` over the text (a conversation's newest user message: without
    a template there is no way to frame the rest, nor to offer tools). A conversation's
    `prefix` follows the generation prompt: the model writes on from it."""
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(text, Chat):
        if not template:
            if text.tools:
                raise InvalidConversation("this model has no chat template, so it cannot be "
                                          "offered tools; send the request without 'tools'")
            text = text.last_user
        else:
            return _render(tokenizer, list(text.messages), list(text.tools) or None) + text.prefix
    if template:
        return _render(tokenizer, [{"role": "user", "content": text}], None)
    return PROMPT.format(text=text)


def _render(tokenizer, messages: list[dict], tools: list[dict] | None) -> str:
    from jinja2 import TemplateError

    try:
        return tokenizer.apply_chat_template(messages, tools=tools, tokenize=False,
                                             add_generation_prompt=True)
    except TemplateError as exc:  # the template's own refusal (`raise_exception`)
        raise InvalidConversation(f"the model's chat template refuses this conversation: "
                                  f"{exc}") from None
