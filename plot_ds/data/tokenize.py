"""Tokenising pairs: chat templates, response-only labels, truncation, and a cache on disk.

Prompts keep their last ``max_prompt_length`` tokens, responses their first tokens up to
``max_length`` in all; every response ends with EOS. The result is cached under a key made of the
pairs' content, the tokenizer's fingerprint and the settings, in safetensors (no pickle), so a
dataset version is tokenised once, not once per rank or per run.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from ..atomic import atomic_file
from .formats import Pair
from .records import DataError, Defect

CACHE_VERSION = 2


@dataclass
class TokenizedPair:
    id: str
    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]
    prompt_truncated: bool = False
    response_truncated: bool = False
    # The reference final answer (CHAMP `answer`, or GSM8K-style "#### answer" in the chosen text).
    answer: str | None = None

    @property
    def truncated(self) -> bool:
        return self.prompt_truncated or self.response_truncated


def tokenizer_fingerprint(tokenizer) -> str:
    digest = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    digest.update(
        backend.to_str().encode() if backend is not None else json.dumps(tokenizer.get_vocab(), sort_keys=True).encode()
    )
    digest.update(
        json.dumps(
            [
                type(tokenizer).__name__,
                tokenizer.bos_token_id,
                tokenizer.eos_token_id,
                getattr(tokenizer, "chat_template", None),
            ]
        ).encode()
    )
    return digest.hexdigest()


class Renderer:
    """Turns a Pair into (prompt text, chosen text, rejected text) for the tokenizer."""

    def __init__(self, tokenizer, chat_template: str | None = None):
        self.tokenizer = tokenizer
        # "none": no template at all, not even the tokenizer's (raw-text prompts, base models).
        self.template = (
            None if chat_template == "none" else (chat_template or getattr(tokenizer, "chat_template", None))
        )

    def _template(self, messages, generation_prompt: bool) -> str:
        return self.tokenizer.apply_chat_template(
            messages, chat_template=self.template, tokenize=False, add_generation_prompt=generation_prompt
        )

    def render(self, pair: Pair) -> tuple[str, str, str, bool]:
        """Texts, and whether the responses already end with the end-of-turn token."""
        if pair.format == "implicit":  # raw transcripts: no template
            return pair.prompt, pair.chosen, pair.rejected, False
        if pair.format == "explicit":
            if self.template:
                prompt = self._template([{"role": "user", "content": pair.prompt}], True)
                return prompt, pair.chosen, pair.rejected, False
            return pair.prompt, pair.chosen, pair.rejected, False
        if not self.template:
            raise DataError(
                f"{pair.location}: conversational data needs a chat template, and the tokenizer "
                f"has none: set data.chat_template (a Jinja template or a file holding one)"
            )
        prompt = self._template(pair.prompt, True)
        responses = []
        for messages in (pair.chosen, pair.rejected):
            full = self._template(pair.prompt + messages, False)
            if not full.startswith(prompt):
                raise DataError(
                    f"{pair.location}: the chat template renders the prompt differently with "
                    f"and without the response; cannot separate the response tokens"
                )
            responses.append(full[len(prompt) :].rstrip())
        return prompt, responses[0], responses[1], True


def tokenize_pair(
    tokenizer, renderer: Renderer, pair: Pair, max_length: int, max_prompt_length: int
) -> tuple[TokenizedPair | None, Defect | None]:
    prompt_text, chosen_text, rejected_text, templated = renderer.render(pair)
    encode = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]
    eos = tokenizer.eos_token_id
    prompt_ids = encode(prompt_text)
    if not prompt_ids:  # the first response token needs a position that predicts it
        prompt_ids = [tokenizer.bos_token_id if tokenizer.bos_token_id is not None else eos]
    responses = []
    for text in (chosen_text, rejected_text):
        ids = encode(text)
        if eos is not None and not (templated and ids and ids[-1] == eos):
            ids = ids + [eos]
        responses.append(ids)
    prompt_truncated = len(prompt_ids) > max_prompt_length
    prompt_ids = prompt_ids[-max_prompt_length:]
    room = max_length - len(prompt_ids)
    response_truncated = any(len(ids) > room for ids in responses)
    chosen, rejected = (ids[:room] for ids in responses)
    if chosen == rejected:
        return None, Defect(
            pair.location,
            "chosen/rejected",
            f"identical after truncation to {max_length} tokens: raise data.max_length",
        )
    for name, ids in (("chosen", chosen), ("rejected", rejected)):
        if all(token == eos for token in ids):
            return None, Defect(pair.location, name, "is empty after tokenisation")
    return TokenizedPair(
        pair.id, prompt_ids, chosen, rejected, prompt_truncated, response_truncated, reference_answer(pair)
    ), None


def reference_answer(pair: Pair) -> str | None:
    if pair.extra.get("answer") not in (None, ""):
        return str(pair.extra["answer"])
    chosen = pair.chosen if isinstance(pair.chosen, str) else "\n".join(m["content"] for m in pair.chosen)
    marker = chosen.rfind("####")
    tail = chosen[marker + 4 :].strip() if marker >= 0 else ""
    return tail.splitlines()[0].strip() if tail else None


def cache_key(pairs: list[Pair], tokenizer, settings: dict) -> str:
    digest = hashlib.sha256()
    digest.update(
        json.dumps(
            {"version": CACHE_VERSION, "settings": settings, "tokenizer": tokenizer_fingerprint(tokenizer)},
            sort_keys=True,
        ).encode()
    )
    for pair in pairs:
        digest.update(
            json.dumps(
                [pair.id, pair.location, pair.format, pair.prompt, pair.chosen, pair.rejected], sort_keys=True
            ).encode()
        )
    return digest.hexdigest()[:32]


def _flatten(lists: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    offsets = torch.zeros(len(lists) + 1, dtype=torch.int64)
    offsets[1:] = torch.tensor([len(x) for x in lists], dtype=torch.int64).cumsum(0) if lists else offsets[1:]
    flat = torch.tensor([t for x in lists for t in x], dtype=torch.int64)
    return flat, offsets


def _unflatten(flat: torch.Tensor, offsets: torch.Tensor) -> list[list[int]]:
    values, bounds = flat.tolist(), offsets.tolist()
    return [values[bounds[i] : bounds[i + 1]] for i in range(len(bounds) - 1)]


def save_cache(path: Path, examples: list[TokenizedPair], defects: list[Defect]) -> None:
    from safetensors.torch import save_file

    tensors = {}
    for name in ("prompt_ids", "chosen_ids", "rejected_ids"):
        tensors[f"{name}.flat"], tensors[f"{name}.offsets"] = _flatten([getattr(e, name) for e in examples])
    tensors["flags"] = torch.tensor(
        [[e.prompt_truncated, e.response_truncated] for e in examples], dtype=torch.int8
    ).reshape(-1, 2)
    metadata = {
        "ids": json.dumps([e.id for e in examples]),
        "answers": json.dumps([e.answer for e in examples]),
        "defects": json.dumps([[d.location, d.field, d.problem] for d in defects]),
    }
    with atomic_file(path) as staging:  # readers never see a half-written cache
        save_file(tensors, str(staging), metadata=metadata)


def load_cache(path: Path) -> tuple[list[TokenizedPair], list[Defect]]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
        tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    ids, answers = json.loads(metadata["ids"]), json.loads(metadata["answers"])
    columns = [
        _unflatten(tensors[f"{n}.flat"], tensors[f"{n}.offsets"]) for n in ("prompt_ids", "chosen_ids", "rejected_ids")
    ]
    flags = tensors["flags"].tolist()
    examples = [
        TokenizedPair(
            ids[i], columns[0][i], columns[1][i], columns[2][i], bool(flags[i][0]), bool(flags[i][1]), answers[i]
        )
        for i in range(len(ids))
    ]
    defects = [Defect(*d) for d in json.loads(metadata["defects"])]
    return examples, defects
