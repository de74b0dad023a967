"""The shapes preference data comes in, detected per record and normalised to one Pair.

- explicit: ``prompt``, ``chosen``, ``rejected`` strings;
- implicit: ``chosen`` and ``rejected`` are whole transcripts sharing a prompt (Anthropic HH-RLHF:
  "\\n\\nHuman: ...\\n\\nAssistant: ..."): the prompt is the shared prefix up to the last turn
  boundary both agree on;
- conversational: lists of {role, content} messages, either with a ``prompt`` list, or as two whole
  conversations sharing their first messages.
Field names are configurable (``data.prompt_field`` ...).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .records import Defect

FORMATS = ("explicit", "implicit", "conversational")
ROLES = ("system", "user", "assistant", "tool")


@dataclass(frozen=True)
class FieldNames:
    prompt: str = "prompt"
    chosen: str = "chosen"
    rejected: str = "rejected"


@dataclass
class Pair:
    id: str
    location: str
    format: str
    prompt: str | list[dict]
    chosen: str | list[dict]
    rejected: str | list[dict]
    extra: dict = field(default_factory=dict)


def detect_format(record: dict, names: FieldNames) -> str:
    if isinstance(record.get(names.chosen), list) or isinstance(record.get(names.prompt), list):
        return "conversational"
    return "explicit" if names.prompt in record else "implicit"


def _string(record: dict, name: str, where: str, defects: list, allow_empty: bool = False) -> str | None:
    value = record.get(name)
    if name not in record or value is None:
        defects.append(Defect(where, name, "is missing"))
        return None
    if not isinstance(value, str):
        defects.append(Defect(where, name, f"must be a string, got {type(value).__name__}"))
        return None
    if not allow_empty and not value.strip():
        defects.append(Defect(where, name, "is empty"))
        return None
    return value


def _messages(value, name: str, where: str, defects: list) -> list[dict] | None:
    if isinstance(value, str):  # a bare response string is one assistant message
        return [{"role": "assistant", "content": value}]
    if not isinstance(value, list) or not value:
        defects.append(Defect(where, name, "must be a non-empty list of {role, content} messages"))
        return None
    messages = []
    for i, message in enumerate(value):
        if not isinstance(message, dict):
            defects.append(Defect(where, f"{name}[{i}]", "must be an object with role and content"))
            return None
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            defects.append(Defect(where, f"{name}[{i}].role", f"{role!r} is not one of {', '.join(ROLES)}"))
            return None
        if not isinstance(content, str):
            defects.append(Defect(where, f"{name}[{i}].content", "must be a string"))
            return None
        messages.append({"role": role, "content": content})
    return messages


def split_transcripts(chosen: str, rejected: str, marker: str) -> tuple[str, str, str] | None:
    """(prompt, chosen response, rejected response) of two transcripts that share a prompt: the
    prompt ends at the last ``marker`` (e.g. "\\n\\nAssistant:") inside their common prefix."""
    common = 0
    for a, b in zip(chosen, rejected):
        if a != b:
            break
        common += 1
    end = chosen.rfind(marker, 0, common)  # the whole marker inside the common prefix
    if end < 0:
        return None
    cut = end + len(marker)
    return chosen[:cut], chosen[cut:], rejected[cut:]


def _conversational(record, names, where, defects):
    chosen = _messages(record.get(names.chosen), names.chosen, where, defects)
    rejected = _messages(record.get(names.rejected), names.rejected, where, defects)
    if chosen is None or rejected is None:
        return None
    if names.prompt in record:
        prompt = _messages(record[names.prompt], names.prompt, where, defects)
        if prompt is None:
            return None
        if isinstance(record[names.prompt], str):
            prompt = [{"role": "user", "content": record[names.prompt]}]
    else:  # two whole conversations: the prompt is their common first messages
        shared = 0
        while shared < min(len(chosen), len(rejected)) - 1 and chosen[shared] == rejected[shared]:
            shared += 1
        prompt, chosen, rejected = chosen[:shared], chosen[shared:], rejected[shared:]
        if not prompt:
            defects.append(Defect(where, names.chosen, "shares no first messages with rejected: no prompt"))
            return None
    for name, response in ((names.chosen, chosen), (names.rejected, rejected)):
        if response[0]["role"] != "assistant":
            defects.append(Defect(where, f"{name}[0].role", "a response must start with an assistant message"))
            return None
        if not any(m["content"].strip() for m in response):
            defects.append(Defect(where, name, "is empty"))
            return None
    if prompt[-1]["role"] == "assistant":
        defects.append(Defect(where, names.prompt, "must not end with an assistant message"))
        return None
    return prompt, chosen, rejected


def normalise(
    where: str, record, names: FieldNames, format_option: str = "auto", assistant_marker: str = "\n\nAssistant:"
) -> tuple[Pair | None, list[Defect]]:
    defects: list[Defect] = []
    if not isinstance(record, dict):
        return None, [
            Defect(
                where,
                None,
                f"expected an object with fields {names.prompt}, "
                f"{names.chosen}, {names.rejected}; got {type(record).__name__}",
            )
        ]
    kind = detect_format(record, names) if format_option == "auto" else format_option
    if kind == "explicit":
        prompt = _string(record, names.prompt, where, defects, allow_empty=True)
        chosen = _string(record, names.chosen, where, defects)
        rejected = _string(record, names.rejected, where, defects)
        parts = None if defects else (prompt, chosen, rejected)
    elif kind == "implicit":
        chosen = _string(record, names.chosen, where, defects)
        rejected = _string(record, names.rejected, where, defects)
        parts = None
        if not defects:
            parts = split_transcripts(chosen, rejected, assistant_marker)
            if parts is None:
                defects.append(
                    Defect(
                        where,
                        names.chosen,
                        f"shares no prompt ending in {assistant_marker!r} with rejected (implicit-prompt format)",
                    )
                )
            elif not parts[1].strip() or not parts[2].strip():
                defects.append(
                    Defect(
                        where,
                        names.chosen if not parts[1].strip() else names.rejected,
                        "has an empty response after the shared prompt",
                    )
                )
                parts = None
    else:
        parts = _conversational(record, names, where, defects)
    if parts is None:
        return None, defects
    prompt, chosen, rejected = parts
    if chosen == rejected:
        return None, [Defect(where, f"{names.chosen}/{names.rejected}", "chosen and rejected are identical")]
    extra = {k: v for k, v in record.items() if k in ("answer",)}
    return Pair(str(record.get("id", where)), where, kind, prompt, chosen, rejected, extra), []
