"""Chat templates: the Jinja template from `tokenizer.chat_template`, rendered in a sandbox.

Rendering is bounded: the template's own code may run MAX_RENDER_STEPS lines and MAX_RENDER_SECONDS,
and produce MAX_RENDER_CHARS characters (a template from a file is untrusted input: nested loops
over range() would otherwise render for minutes). `render_spans` also reports where each message's
content landed in the text, so that special-token text typed by a user is not parsed as tokens.
"""

from __future__ import annotations

import datetime
import functools
import sys
import time

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

from .errors import InvalidArgumentError, SepedgeError

MAX_RENDER_STEPS = 2_000_000    # lines of template code executed per rendering
MAX_RENDER_SECONDS = 5.0
MAX_RENDER_CHARS = 16 << 20     # rendered text, and any string or list a template builds with * or **
MAX_POWER = 1 << 16

# Used when a model has no template (llama.cpp falls back to ChatML too).
CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] "
          "+ '<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")

ROLES = ("system", "user", "assistant", "tool")


def _raise(message: str):
    raise jinja2.TemplateError(message)


class TemplateTooExpensive(jinja2.TemplateError):
    pass


class _BoundedEnvironment(ImmutableSandboxedEnvironment):
    """The sandbox, with * and ** checked: "x" * 10**12 is one operation, no loop to count."""
    intercepted_binops = frozenset(["*", "**"])

    def call_binop(self, context, operator, left, right):
        if operator == "**" and isinstance(right, (int, float)) and abs(right) > MAX_POWER:
            raise TemplateTooExpensive(f"exponent {right} is larger than {MAX_POWER}")
        if operator == "*":
            for seq, k in ((left, right), (right, left)):
                if isinstance(seq, (str, list, tuple)) and isinstance(k, int) and len(seq) * k > MAX_RENDER_CHARS:
                    raise TemplateTooExpensive(f"a sequence of {len(seq) * k} items is larger than {MAX_RENDER_CHARS}")
        return super().call_binop(context, operator, left, right)


class _Budget:
    """A trace function counting the lines the template's compiled code runs (its code objects have
    the file name "<template>"), and checking the clock every 4096 of them."""

    def __init__(self):
        self.steps = 0
        self.deadline = time.monotonic() + MAX_RENDER_SECONDS

    def __call__(self, frame, event, arg):
        if frame.f_code.co_filename != "<template>":
            return None
        return self._line

    def _line(self, frame, event, arg):
        if event == "line":
            self.steps += 1
            if self.steps > MAX_RENDER_STEPS:
                raise TemplateTooExpensive(f"rendering ran more than {MAX_RENDER_STEPS} steps")
            if self.steps % 4096 == 0 and time.monotonic() > self.deadline:
                raise TemplateTooExpensive(f"rendering took more than {MAX_RENDER_SECONDS} s")
        return self._line


def _bounded_render(template: jinja2.Template, **kwargs) -> str:
    budget, previous = _Budget(), sys.gettrace()
    sys.settrace(budget)
    try:
        out, n = [], 0
        for piece in template.generate(**kwargs):
            n += len(piece)
            if n > MAX_RENDER_CHARS:
                raise TemplateTooExpensive(f"the rendered text is longer than {MAX_RENDER_CHARS} characters")
            out.append(piece)
        return "".join(out)
    finally:
        sys.settrace(previous)


@functools.lru_cache(maxsize=8)
def _compile(template: str) -> jinja2.Template:
    env = _BoundedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
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


def _render(template: str | None, messages: list[dict], add_generation_prompt: bool, bos_token: str,
            eos_token: str) -> str:
    if not isinstance(template, (str, type(None))):
        raise SepedgeError(f"the model's chat template is not text: {type(template).__name__}")
    compiled = _compile(template or CHATML)
    try:
        return _bounded_render(compiled, messages=messages, add_generation_prompt=add_generation_prompt,
                               bos_token=bos_token, eos_token=eos_token)
    except TemplateTooExpensive as e:
        raise InvalidArgumentError(f"the chat template is too expensive to render: {e}") from None
    except jinja2.TemplateError as e:
        raise InvalidArgumentError(f"the chat template rejected the conversation: {e}") from None
    except RecursionError:
        raise InvalidArgumentError("the chat template recursed too deeply") from None
    except (TypeError, ValueError, KeyError, AttributeError, IndexError, ZeroDivisionError, OverflowError) as e:
        raise InvalidArgumentError(f"the chat template failed on the conversation: {type(e).__name__}: {e}") from None


def render(template: str | None, messages, add_generation_prompt: bool = True, bos_token: str = "",
           eos_token: str = "") -> str:
    """The prompt text for a conversation."""
    return _render(template, check_messages(messages), add_generation_prompt, bos_token, eos_token)


def _markers(texts: list[str]) -> tuple[str, str]:
    """Two private-use characters found in none of the texts, to mark where contents begin and end."""
    used = set().union(*(set(t) for t in texts))
    free = (chr(c) for c in range(0xF0000, 0xFFFFE) if chr(c) not in used)
    return next(free), next(free)


def render_spans(template: str | None, messages, add_generation_prompt: bool = True, bos_token: str = "",
                 eos_token: str = "") -> tuple[str, list[tuple[int, int]] | None]:
    """The prompt text and the [start, end) character ranges that hold message contents, found by
    rendering once with each content between two marker characters. Spans are None when the
    template cut or reordered the markers (it slices contents): callers then cannot tell content
    from template and must be conservative."""
    messages = check_messages(messages)
    text = _render(template, messages, add_generation_prompt, bos_token, eos_token)
    begin, end = _markers([template or CHATML, bos_token, eos_token] + [m["content"] for m in messages])
    marked = [dict(m, content=begin + m["content"] + end) for m in messages]
    try:
        with_markers = _render(template, marked, add_generation_prompt, bos_token, eos_token)
    except InvalidArgumentError:
        return text, None
    spans, out, pos, opened = [], [], 0, None
    for ch in with_markers:
        if ch == begin:
            if opened is not None:
                return text, None
            opened = pos
        elif ch == end:
            if opened is None:
                return text, None
            if pos > opened:
                spans.append((opened, pos))
            opened = None
        else:
            out.append(ch)
            pos += 1
    if opened is not None or "".join(out) != text:
        return text, None
    return text, spans
