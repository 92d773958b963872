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


def _content_text(content, i: int) -> str:
    """A message's content as text: a string, or (OpenAI's form) a list of text parts; None (an
    assistant turn that only called tools) is empty."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, (list, tuple)):
        texts = []
        for part in content:
            if isinstance(part, str):
                texts.append(part)
            elif isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str):
                texts.append(part["text"])
            else:
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise InvalidArgumentError(f"message {i}: content part of type {kind!r} is not supported (text parts only)")
        return "".join(texts)
    raise InvalidArgumentError(f"message {i}: content must be a string or a list of text parts")


def check_messages(messages) -> list[dict]:
    if not isinstance(messages, (list, tuple)) or not messages:
        raise InvalidArgumentError("messages must be a non-empty list of {'role': ..., 'content': ...} dicts")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES or "content" not in m:
            raise InvalidArgumentError(f"message {i} must be a dict with a role in {ROLES} and a content, got {m!r}")
        out.append({**m, "content": _content_text(m["content"], i)})
    return out


def render(template: str | None, messages, add_generation_prompt: bool = True, bos_token: str = "",
           eos_token: str = "") -> str:
    """The prompt text for a conversation."""
    messages = check_messages(messages)
    try:
        return _compile(template or CHATML).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                                   bos_token=bos_token, eos_token=eos_token)
    except jinja2.TemplateError as e:
        raise InvalidArgumentError(f"the chat template rejected the conversation: {e}") from None
