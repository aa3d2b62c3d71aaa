"""Turning a prompt into model input text: ONE place, used by generation and training alike.

The paper's released code generated negatives with a different template from the one it trained
with (docs/algorithms.md §6); routing both through `render_prompt` makes that impossible here.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    from .data.formats import Example

NAMED_TEMPLATES = ("instruction", "hh", "plain")
TEMPLATE_CHOICES = ("auto", "chat") + NAMED_TEMPLATES

_ROLE_HH = {"user": "Human", "assistant": "Assistant", "system": "System"}


def resolve_template(tokenizer, template: str) -> str:
    """`auto` means the tokenizer's chat template when it has one, else `instruction`."""
    if template not in TEMPLATE_CHOICES:
        raise ValueError(
            f"unknown template {template!r}; choose one of {', '.join(TEMPLATE_CHOICES)}"
        )
    has_chat = bool(getattr(tokenizer, "chat_template", None))
    if template == "auto":
        return "chat" if has_chat else "instruction"
    if template == "chat" and not has_chat:
        raise ValueError(
            "template=chat but the tokenizer has no chat_template; use instruction, hh or plain"
        )
    return template


def _history_text(example: Example, template: str) -> str:
    turns = list(example.history)
    if not turns:
        return ""
    if template == "hh":
        return "".join(f"\n\n{_ROLE_HH.get(role, role)}: {content}" for role, content in turns)
    if template == "instruction":
        return "".join(f"### {role.capitalize()}: {content}\n\n" for role, content in turns)
    return "".join(f"{content}\n\n" for _, content in turns)


def render_prompt(example: Example, tokenizer, template: str) -> str:
    """The text that precedes the response. `template` must be resolved (see resolve_template)."""
    if template == "chat":
        return tokenizer.apply_chat_template(
            example.messages(), tokenize=False, add_generation_prompt=True
        )
    history = _history_text(example, template)
    if template == "instruction":
        return f"{history}### Instruction: {example.prompt}\n\n### Response: "
    if template == "hh":
        return f"{history}\n\nHuman: {example.prompt}\n\nAssistant:"
    if template == "plain":
        return f"{history}{example.prompt}\n"
    raise ValueError(f"unresolved template {template!r}")


def response_text(response: str, template: str) -> str:
    """HH transcripts put one space between 'Assistant:' and the answer; the others add nothing."""
    return f" {response}" if template == "hh" else response
