"""Record formats: what one record means (prompt, response, earlier turns), recognised from keys.

The first record's keys choose the format (every later record must follow it), in this order:

=================  ==========================================================
``messages``       ``messages``: list of ``{role, content}``; last = assistant
                   (the response), the one before = user (the prompt), earlier
                   turns are the history.
``spin``           ``real`` (SPIN data, usually with ``generated``, ignored):
                   ``real`` is a message list as above.
prompt/response    ``prompt``, ``response``
prompt/completion  ``prompt``, ``completion``
prompt/chosen      ``prompt`` and ``chosen`` strings (UltraFeedback-style
                   preference data): response = chosen, ``rejected`` ignored.
``alpaca``         ``instruction``, ``output`` (``input`` optional): prompt =
                   instruction + "\\n\\n" + input when input is non-empty.
question/answer    ``question``, ``answer`` (e.g. GSM8K)
``hh``             ``chosen`` holding an Anthropic-HH transcript
                   ("\\n\\nHuman: ... \\n\\nAssistant: ..."), or a message list
                   (a ``prompt`` message list, if present and ``chosen`` holds
                   only the answer, is prepended).
``columns``        explicit ``columns={"prompt": COL, "response": COL}``
                   (overrides recognition).
=================  ==========================================================

Prompt and response must be strings (anything else is an error naming the field); an empty
prompt is allowed. Text is kept as written, except that HH turns are stripped of surrounding
whitespace and consecutive turns of one speaker (a few exist in the real harmless-base data) are
joined with "\\n\\n" into one turn.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from .errors import DataError, _describe, _RecordError

RECORD_FORMATS = (
    "prompt/response",
    "prompt/completion",
    "messages",
    "spin",
    "hh",
    "alpaca",
    "question/answer",
    "prompt/chosen",
    "columns",
)


_ROLES = ("system", "user", "assistant")


_FORMAT_HELP = (
    "messages (messages), spin (real[, generated]), prompt/response (prompt, response), "
    "prompt/completion (prompt, completion), prompt/chosen (prompt, chosen strings), "
    "alpaca (instruction, output[, input]), question/answer (question, answer), "
    "hh (chosen: HH transcript or message list)"
)


@dataclass(frozen=True)
class Example:
    """One demonstration: ``response`` is the demonstrated answer to ``prompt``.

    ``history`` holds earlier turns as ``(role, content)`` pairs, oldest first, roles
    ``"system"``, ``"user"`` or ``"assistant"``.
    """

    prompt: str
    response: str
    history: tuple[tuple[str, str], ...] = ()

    def messages(self) -> list[dict]:
        """History plus the final user turn as chat messages (without the response)."""
        msgs = [{"role": role, "content": content} for role, content in self.history]
        msgs.append({"role": "user", "content": self.prompt})
        return msgs


class Preference(NamedTuple):
    """A preference pair as text: ``example.response`` (the chosen response) is preferred to
    ``rejected``, both answering ``example``'s conversation. Encoded, it is a ``pairs.Pair``."""

    example: Example
    rejected: str


def _get_str(rec: dict, key: str) -> str:
    if key not in rec:
        raise _RecordError(f"missing (keys found: {sorted(rec)})", key)
    value = rec[key]
    if not isinstance(value, str):
        raise _RecordError(f"expected a string, got {_describe(value)}", key)
    return value


def _from_messages(msgs: Any, fld: str) -> tuple[str, str, tuple[tuple[str, str], ...]]:
    if not isinstance(msgs, list):
        raise _RecordError(f"expected a list of messages, got {_describe(msgs)}", fld)
    if len(msgs) < 2:
        raise _RecordError(
            f"needs at least a user and an assistant message, got {len(msgs)} message(s)", fld
        )
    turns: list[tuple[str, str]] = []
    for j, m in enumerate(msgs):
        where = f"{fld}[{j}]"
        if not isinstance(m, dict):
            raise _RecordError(
                f"expected an object with role and content, got {_describe(m)}", where
            )
        role, content = m.get("role"), m.get("content")
        if role not in _ROLES:
            raise _RecordError(f"role must be one of {list(_ROLES)}, got {role!r}", where + ".role")
        if not isinstance(content, str):
            raise _RecordError(f"expected a string, got {_describe(content)}", where + ".content")
        turns.append((role, content))
    if turns[-1][0] != "assistant":
        raise _RecordError(
            f"the last message must be an assistant message (the response), got role "
            f"{turns[-1][0]!r}",
            fld,
        )
    if turns[-2][0] != "user":
        raise _RecordError(
            f"the message before the final assistant message must be a user message, got role "
            f"{turns[-2][0]!r}",
            fld,
        )
    return turns[-2][1], turns[-1][1], tuple(turns[:-2])


_HH_MARKER = re.compile(r"(\n\nHuman:|\n\nAssistant:)")


def _from_hh(text: str, fld: str) -> tuple[str, str, tuple[tuple[str, str], ...]]:
    if not text.startswith("\n\n"):
        stripped = text.lstrip()
        if stripped.startswith(("Human:", "Assistant:")):
            text = "\n\n" + stripped
    parts = _HH_MARKER.split(text)
    if parts[0].strip():
        raise _RecordError(
            "HH transcript must start with '\\n\\nHuman:' (found text before the first marker)",
            fld,
        )
    turns: list[list[str]] = []
    for marker, content in zip(parts[1::2], parts[2::2]):
        role = "user" if "Human" in marker else "assistant"
        content = content.strip()
        if turns and turns[-1][0] == role:  # same speaker twice in a row: one turn
            turns[-1][1] = turns[-1][1] + "\n\n" + content
        else:
            turns.append([role, content])
    if not turns or turns[-1][0] != "assistant":
        raise _RecordError(
            "HH transcript must end with an Assistant turn (the response); "
            + ("no 'Human:'/'Assistant:' markers found" if not turns else "the last turn is Human"),
            fld,
        )
    if len(turns) < 2:
        raise _RecordError("HH transcript has no Human turn before the final Assistant turn", fld)
    return turns[-2][1], turns[-1][1], tuple((r, c) for r, c in turns[:-2])


def _parse_hh_record(rec: dict) -> tuple[str, str, tuple[tuple[str, str], ...]]:
    if "chosen" not in rec:
        raise _RecordError(f"missing (keys found: {sorted(rec)})", "chosen")
    chosen = rec["chosen"]
    if isinstance(chosen, str):
        return _from_hh(chosen, "chosen")
    if isinstance(chosen, list):
        first_role = chosen[0].get("role") if chosen and isinstance(chosen[0], dict) else None
        if first_role in ("user", "system"):  # full conversation
            return _from_messages(chosen, "chosen")
        prompt = rec.get("prompt")
        if isinstance(prompt, list):
            return _from_messages(prompt + chosen, "prompt+chosen")
        if isinstance(prompt, str):
            return _from_messages([{"role": "user", "content": prompt}] + chosen, "prompt+chosen")
        return _from_messages(chosen, "chosen")
    raise _RecordError(
        f"expected an HH transcript string or a message list, got {_describe(chosen)}", "chosen"
    )


def _parse_alpaca(rec: dict) -> tuple[str, str, tuple]:
    instruction = _get_str(rec, "instruction")
    output = _get_str(rec, "output")
    inp = rec.get("input")
    if inp is None:
        inp = ""
    if not isinstance(inp, str):
        raise _RecordError(f"expected a string, got {_describe(inp)}", "input")
    prompt = instruction + "\n\n" + inp if inp.strip() else instruction
    return prompt, output, ()


def _pair_parser(prompt_key: str, response_key: str):
    def parse(rec: dict) -> tuple[str, str, tuple]:
        return _get_str(rec, prompt_key), _get_str(rec, response_key), ()

    return parse


def _messages_parser(key: str):
    def parse(rec: dict) -> tuple[str, str, tuple]:
        if key not in rec:
            raise _RecordError(f"missing (keys found: {sorted(rec)})", key)
        return _from_messages(rec[key], key)

    return parse


_PARSERS = {
    "messages": _messages_parser("messages"),
    "spin": _messages_parser("real"),
    "prompt/response": _pair_parser("prompt", "response"),
    "prompt/completion": _pair_parser("prompt", "completion"),
    "prompt/chosen": _pair_parser("prompt", "chosen"),
    "alpaca": _parse_alpaca,
    "question/answer": _pair_parser("question", "answer"),
    "hh": _parse_hh_record,
}


_NOTES = {
    "spin": "SPIN data: only the 'real' conversations are used; the 'generated' column is ignored",
    "hh": "preference data: only 'chosen' is used as the demonstration; 'rejected' is ignored",
    "prompt/chosen": "preference data: response = 'chosen'; 'rejected' is ignored",
}


def _detect_format(rec: dict) -> str | None:
    keys = set(rec)
    if "messages" in keys:
        return "messages"
    if "real" in keys:
        return "spin"
    if {"prompt", "response"} <= keys:
        return "prompt/response"
    if {"prompt", "completion"} <= keys:
        return "prompt/completion"
    if (
        {"prompt", "chosen"} <= keys
        and isinstance(rec["prompt"], str)
        and isinstance(rec["chosen"], str)
    ):
        return "prompt/chosen"
    if {"instruction", "output"} <= keys:
        return "alpaca"
    if {"question", "answer"} <= keys:
        return "question/answer"
    if "chosen" in keys:
        return "hh"
    return None


def parse_columns(spec: str | dict[str, str] | None) -> dict[str, str] | None:
    """Parse a CLI mapping ``"prompt:COL,response:COL"`` into a dict (dicts pass through)."""
    if spec is None or isinstance(spec, dict):
        return spec
    out: dict[str, str] = {}
    for item in spec.split(","):
        if not item.strip():
            continue
        key, sep, col = item.partition(":")
        if not sep or not key.strip() or not col.strip():
            raise ValueError(
                f"bad column mapping item {item!r}; expected columns=prompt:COL,response:COL"
            )
        out[key.strip()] = col.strip()
    return out


def _check_columns(path: Path, columns: dict[str, str]) -> None:
    if not isinstance(columns, dict):
        raise DataError(path, f"columns must be a dict, got {type(columns).__name__}")
    unknown = sorted(set(columns) - {"prompt", "response"})
    missing = sorted({"prompt", "response"} - set(columns))
    if unknown or missing:
        raise DataError(
            path,
            "columns must map exactly 'prompt' and 'response' to column names "
            f"(missing: {missing}, unknown: {unknown}); e.g. columns=prompt:COL,response:COL",
        )
