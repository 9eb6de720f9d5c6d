"""Chat templates: turn a prompt/response pair into the text a chat model was tuned on.

Hugging Face checkpoints ship a Jinja template (``chat_template`` in
tokenizer_config.json, or ``chat_template.jinja``) that wraps messages in the role
markers the model expects. Fine-tuning data must use the same wrapping, so farflung
renders the template the way ``transformers`` does — an immutable sandboxed Jinja
environment with ``trim_blocks`` and ``lstrip_blocks``, the variables ``messages``,
``add_generation_prompt``, ``bos_token`` and ``eos_token``, and the helpers templates
call (``raise_exception``, ``tojson``, ``strftime_now``) — without importing it.
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

from farflung.data.errors import DataError


class ChatTemplate:
    """A compiled chat template; compiling once matters when rendering every record."""

    def __init__(self, source: str, bos_token: str = "", eos_token: str = "") -> None:
        import jinja2
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        env = ImmutableSandboxedEnvironment(
            trim_blocks=True,
            lstrip_blocks=True,
            extensions=["jinja2.ext.loopcontrols", _generation_extension()],
        )
        env.filters["tojson"] = _tojson
        env.globals["raise_exception"] = _raise_exception
        env.globals["strftime_now"] = _strftime_now
        try:
            self._template = env.from_string(source)
        except jinja2.TemplateError as exc:
            raise DataError(f"the tokenizer's chat template does not compile: {exc}") from exc
        self.source = source
        self.bos_token = bos_token
        self.eos_token = eos_token

    def render(self, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
        """The template's text for ``messages`` (special tokens appear as their text)."""
        import jinja2

        try:
            return self._template.render(
                messages=messages,
                add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token,
                eos_token=self.eos_token,
            )
        except jinja2.TemplateError as exc:
            raise DataError(f"chat template failed: {exc}") from exc

    def split(self, prompt: str, response: str) -> tuple[str, str]:
        """Prompt part and response part of one exchange, as text.

        The prompt part is the user turn plus the generation prompt (what the model
        sees before it answers); the response part is what the full conversation adds
        after it. The two must join to the full rendering, or the boundary between
        "not trained on" and "trained on" would be ill-defined.
        """
        user = {"role": "user", "content": prompt}
        head = self.render([user], add_generation_prompt=True)
        full = self.render([user, {"role": "assistant", "content": response}], False)
        if not full.startswith(head):
            raise DataError(
                "the chat template's prompt rendering (add_generation_prompt=True) is not "
                "a prefix of its rendering with the response, so the response tokens "
                f"cannot be told apart: prompt part {head[-80:]!r}, full {full[:160]!r}"
            )
        return head, full[len(head) :]


def _raise_exception(message: str) -> None:
    """Templates call this to reject input (e.g. roles out of order)."""
    raise DataError(f"chat template: {message}")


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    """Plain ``json.dumps``: Jinja's own tojson escapes ``<`` and ``>`` for HTML, which
    would change the text a model was tuned on."""
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _strftime_now(fmt: str) -> str:
    """The current date, which some templates put in their system prompt."""
    return datetime.now().strftime(fmt)


def _generation_extension() -> type:
    """A ``{% generation %}...{% endgeneration %}`` block that renders its body unchanged.

    Some templates mark the assistant's text with it (transformers uses it to build
    assistant masks); farflung finds the response by prefix instead, so the tag only
    needs to parse.
    """
    from jinja2 import nodes
    from jinja2.ext import Extension

    class Generation(Extension):
        tags = {"generation"}

        def parse(self, parser: Any) -> nodes.Node:
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return nodes.Scope(body, lineno=lineno)

    return Generation
