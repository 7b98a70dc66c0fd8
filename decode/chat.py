"""Chat messages to a prompt: the tokenizer's own chat template (Hugging Face's Jinja convention) or, for a
tokenizer without one, ``DEFAULT_CHAT_TEMPLATE``; the checks of an OpenAI ``messages`` list.

A Hugging Face tokenizer directory may carry a template (``chat_template`` in tokenizer_config.json, or
chat_template.jinja); it is rendered as transformers' ``apply_chat_template`` renders it: a sandboxed
Jinja environment with ``trim_blocks`` and ``lstrip_blocks``, the variables ``messages``,
``add_generation_prompt=True``, ``tools=None``, ``documents=None`` and the tokenizer's special tokens
(``bos_token``, ``eos_token``, ``pad_token``, those it has), ``raise_exception``, ``strftime_now`` and
the ``tojson`` filter; the text is encoded without the tokenizer's added special tokens (the template
writes its own BOS). Byte, char and template-less BPE tokenizers get the default template, Phi-3's
layout::

    <|system|>
    You are terse.<|end|>
    <|user|>
    Hi!<|end|>
    <|assistant|>

chosen because every turn ends with an explicit marker: a tokenizer without an EOS token (byte, char)
still gives the model a way to end its reply that the server can see, so ``<|end|>`` is a stop string of
every request rendered with it (``ChatTemplate.stops``). It is plain text, so any tokenizer that can
write ``<``, ``|``, ``>``, letters and a newline encodes it; the same text is what a model fine-tuned
on chat data in this layout learns to continue.
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

import jinja2
from jinja2 import nodes
from jinja2.ext import Extension, loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

from arjax.decode.sampling import FieldError

END_OF_TURN = "<|end|>"
# One message per turn, "<|role|>\n{content}<|end|>\n"; then the assistant's header (Phi-3's layout).
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}" + END_OF_TURN + "\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
ROLES = ("system", "developer", "user", "assistant")
# OpenAI's newer name for the system role: templates know "system" (Llama's, Qwen's and ours).
ROLE_ALIASES = {"developer": "system"}
_UNSUPPORTED_KEYS = {
    "tool_calls": "tool calls",
    "tool_call_id": "tool calls",
    "function_call": "function calls",
    "audio": "audio",
    "name": "participant names",
}


class _GenerationTag(Extension):
    """``{% generation %}...{% endgeneration %}`` (transformers marks the assistant's tokens with it for
    training masks): rendered as its body, so templates that use it compile."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller):
        return caller()


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _environment() -> ImmutableSandboxedEnvironment:
    """transformers' environment for chat templates (``_compile_jinja_template``)."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env


class ChatTemplate:
    """A tokenizer's way of writing a conversation: ``render(messages) -> str`` and ``encode(messages) -> ids``.
    ``ChatTemplate(tokenizer)`` takes the tokenizer's ``chat_template`` (a Hugging Face tokenizer's) or the
    default; a template that does not compile is a ValueError naming it."""

    def __init__(self, tokenizer, source: str | None = None):
        own = source if source is not None else getattr(tokenizer, "chat_template", None)
        self.tokenizer = tokenizer
        self.is_default = own is None
        self.source = DEFAULT_CHAT_TEMPLATE if own is None else own
        # Stop strings every chat request gets: the default template's end of turn (a template of the
        # tokenizer's own ends turns with a token the tokenizer calls EOS, which the server stops at).
        self.stops: tuple[str, ...] = (END_OF_TURN,) if self.is_default else ()
        specials = getattr(tokenizer, "special_tokens", None) or {}
        self.variables = {k: v for k, v in specials.items() if v is not None}
        try:
            self._template = _environment().from_string(self.source)
        except jinja2.exceptions.TemplateError as e:
            raise ValueError(
                f"the tokenizer's chat_template does not compile ({type(e).__name__}: {e}); fix chat_template in "
                "tokenizer_config.json (or chat_template.jinja)"
            ) from None

    def render(self, messages: list[dict[str, str]]) -> str:
        """The prompt text for ``messages`` (checked by ``check_messages``), ending with the assistant's header."""
        try:
            return self._template.render(
                messages=messages, add_generation_prompt=True, tools=None, documents=None, **self.variables
            )
        except jinja2.exceptions.TemplateError as e:  # the template's raise_exception ("roles must alternate")
            raise FieldError("messages", f"messages: the model's chat template refused them: {e}") from None
        except Exception as e:  # noqa: BLE001 (a template may fail in any way on input it did not expect)
            raise FieldError(
                "messages", f"messages: the model's chat template failed on them ({type(e).__name__}: {e})"
            ) from None

    def encode(self, messages: list[dict[str, str]]) -> list[int]:
        """The prompt's token ids. A character the tokenizer cannot encode (a char-level vocabulary) is a
        FieldError naming the message that holds it, or saying that the template's own text is the problem."""
        text = self.render(messages)
        inner = getattr(self.tokenizer, "tokenizer", None)  # a Hugging Face tokenizer's `tokenizers` object
        try:
            if not self.is_default and inner is not None:
                # transformers' convention: the template writes the special tokens (BOS) itself.
                return list(inner.encode(text, add_special_tokens=False).ids)
            return list(self.tokenizer.encode(text))
        except ValueError as e:
            for i, m in enumerate(messages):
                try:
                    self.tokenizer.encode(m["content"])
                except ValueError as bad:
                    raise FieldError("messages", f"messages[{i}].content: {bad}") from None
            raise FieldError(
                "messages",
                f"this tokenizer cannot encode the chat template's own text ({e}); /v1/chat/completions needs a "
                "tokenizer that can write it: use /v1/completions with a prompt of your own",
            ) from None


def check_messages(raw: Any) -> list[dict[str, str]]:
    """OpenAI's ``messages`` as the plain ``[{"role", "content"}]`` a template reads: roles system, developer
    (rendered as system), user and assistant; content a string or a list of text parts (joined with newlines,
    as vLLM joins them). Anything else (tools, images, names) is a FieldError naming the message and field."""
    if not isinstance(raw, list) or not raw:
        raise FieldError("messages", 'messages must be a non-empty list of {"role": ..., "content": ...} objects')
    out = []
    for i, m in enumerate(raw):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise FieldError("messages", f'{where} must be an object {{"role": ..., "content": ...}}')
        for key in m:
            if key in _UNSUPPORTED_KEYS and m[key] is not None:
                raise FieldError(
                    "messages",
                    f"{where}.{key}: {_UNSUPPORTED_KEYS[key]} are not supported by this server; leave it out",
                )
            if key not in ("role", "content") and key not in _UNSUPPORTED_KEYS and key != "refusal":
                raise FieldError("messages", f"{where}: unknown field {key!r}; a message has role and content")
        role = m.get("role")
        if role in ("tool", "function"):
            raise FieldError(
                "messages", f"{where}.role {role!r} is not supported: this server has no tool or function calling"
            )
        if role not in ROLES:
            raise FieldError("messages", f"{where}.role must be one of {', '.join(ROLES)} (got {json.dumps(role)})")
        if m.get("refusal") is not None:
            raise FieldError("messages", f"{where}.refusal is not supported by this server; leave it out")
        content = m.get("content")
        if isinstance(content, list):
            texts = []
            for j, part in enumerate(content):
                at = f"{where}.content[{j}]"
                kind = part.get("type") if isinstance(part, dict) else None
                if kind != "text":
                    what = f"parts of type {kind!r} are" if isinstance(kind, str) else "that part is"
                    raise FieldError(
                        "messages", f'{at}: {what} not supported; send text parts {{"type": "text", "text": "..."}}'
                    )
                if set(part) != {"type", "text"} or not isinstance(part["text"], str):
                    raise FieldError("messages", f'{at} must be {{"type": "text", "text": "..."}} (a string text)')
                texts.append(part["text"])
            content = "\n".join(texts)
        if not isinstance(content, str):
            raise FieldError(
                "messages",
                f"{where}.content must be a string or a list of text parts (got {json.dumps(content)[:40]})",
            )
        out.append({"role": ROLE_ALIASES.get(role, role), "content": content})
    return out


__all__ = ["DEFAULT_CHAT_TEMPLATE", "END_OF_TURN", "ChatTemplate", "check_messages"]
