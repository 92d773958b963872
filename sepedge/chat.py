"""Chat templates: the Jinja template from `tokenizer.chat_template`, rendered in a sandbox."""

from __future__ import annotations

import datetime
import functools

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

from .errors import InvalidArgumentError, SepedgeError

# Used when a model has no template (llama.cpp falls back to ChatML too).
CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] "
          "+ '<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")

ROLES = ("system", "user", "assistant", "tool")


def _raise(message: str):
    raise jinja2.TemplateError(message)


@functools.lru_cache(maxsize=8)
def _compile(template: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
    try:
        return env.from_string(template)
    except jinja2.TemplateError as e:
        raise SepedgeError(f"the model's chat template does not compile: {e}") from None


def check_messages(messages) -> list[dict]:
    if not isinstance(messages, (list, tuple)) or not messages:
        raise InvalidArgumentError("messages must be a non-empty list of {'role': ..., 'content': ...} dicts")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise InvalidArgumentError(f"message {i} must be a dict with a role in {ROLES} and a string content, got {m!r}")
    return [dict(m) for m in messages]


def render(template: str | None, messages, add_generation_prompt: bool = True, bos_token: str = "",
           eos_token: str = "") -> str:
    """The prompt text for a conversation."""
    messages = check_messages(messages)
    try:
        return _compile(template or CHATML).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                                   bos_token=bos_token, eos_token=eos_token)
    except jinja2.TemplateError as e:
        raise InvalidArgumentError(f"the chat template rejected the conversation: {e}") from None
