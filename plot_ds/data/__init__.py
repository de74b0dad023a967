"""Preference data: sources -> records -> pairs (formats, validation) -> tokens (cached) -> batches.

``prepare_datasets`` is the one entry point the trainer and ``plot-data`` use.
"""

from __future__ import annotations

import json
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from ..assets import cache_dir as default_cache_dir
from ..pair_batch import IGNORE_INDEX
from .batching import collate, example_counts
from .formats import FORMATS, FieldNames, Pair, normalise, split_transcripts
from .records import DataError, Defect, read_records
from .sampler import GlobalBatchSampler, eval_shards
from .tokenize import Renderer, TokenizedPair, cache_key, load_cache, save_cache, tokenize_pair

__all__ = [
    "IGNORE_INDEX",
    "DataError",
    "DataReport",
    "Defect",
    "FieldNames",
    "GlobalBatchSampler",
    "Pair",
    "TokenizedPair",
    "collate",
    "eval_shards",
    "example_counts",
    "load_pairs",
    "normalise",
    "prepare_datasets",
    "split_pairs",
    "split_transcripts",
    "tokenize_pairs",
    "FORMATS",
]


@dataclass
class DataReport:
    """What one split of a source held, what was used, and what was wrong with the rest."""

    name: str
    source: str
    records: int = 0
    pairs: int = 0
    formats: dict = field(default_factory=dict)
    defects: list = field(default_factory=list)
    prompt_truncated: int = 0
    response_truncated: int = 0
    lengths: list = field(default_factory=list)
    # The tokenised data's cache key: content, tokenizer and settings.
    fingerprint: str = ""

    def summary(self) -> str:
        formats = ", ".join(f"{k} {v}" for k, v in sorted(self.formats.items())) or "none"
        origin = f"from {self.records} records of {self.source}" if self.records else f"({self.source})"
        return (
            f"{self.name}: {self.pairs} pairs {origin} ({formats}); {len(self.defects)} skipped; "
            f"truncated: {self.prompt_truncated} prompts, {self.response_truncated} pairs' responses"
        )

    def histogram(self, bins: int = 8) -> list[tuple[int, int, int]]:
        if not self.lengths:
            return []
        top = max(self.lengths)
        width = max(1, -(-top // bins))
        counts = Counter(min(length // width, bins - 1) for length in self.lengths)
        return [(i * width, (i + 1) * width - 1, counts.get(i, 0)) for i in range(bins)]

    def describe(self) -> str:
        lines = [self.summary()]
        if self.lengths:
            lines.append("  tokens per pair (prompt + longer response):")
            peak = max(c for *_, c in self.histogram()) or 1
            for low, high, count in self.histogram():
                lines.append(f"    {low:>6}-{high:<6} {count:>6} {'#' * round(40 * count / peak)}")
        for defect in self.defects:
            lines.append(f"  skipped {defect}")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "source": self.source,
            "records": self.records,
            "pairs": self.pairs,
            "formats": self.formats,
            "prompt_truncated": self.prompt_truncated,
            "response_truncated": self.response_truncated,
            "skipped": [{"location": d.location, "field": d.field, "problem": d.problem} for d in self.defects],
            "histogram": [{"tokens": f"{lo}-{hi}", "pairs": n} for lo, hi, n in self.histogram()],
        }


def field_names(data_config) -> FieldNames:
    return FieldNames(data_config.prompt_field, data_config.chosen_field, data_config.rejected_field)


def load_pairs(source: str, data_config=None, split: str = "train") -> tuple[list[Pair], list[Defect], int]:
    """Valid pairs of a source, the defects of the rest, and how many records were read."""
    records, defects = read_records(source, split)
    names = field_names(data_config) if data_config is not None else FieldNames()
    format_option = data_config.format if data_config is not None else "auto"
    marker = data_config.assistant_marker if data_config is not None else "\n\nAssistant:"
    pairs = []
    for where, record in records:
        pair, problems = normalise(where, record, names, format_option, marker)
        defects.extend(problems)
        if pair is not None:
            pairs.append(pair)
    return pairs, defects, len(records)


def split_pairs(pairs: list, eval_size: int, seed: int) -> tuple[list, list]:
    """Carve ``eval_size`` held-out pairs off with a fixed seed, identical on every rank, by whole
    prompts: all pairs of a prompt fall on one side, so that no held-out prompt (nor the chosen
    response its pairs usually share) is trained on. Prompts are taken in a seeded order, skipping
    one whose pairs would overshoot ``eval_size``."""
    if eval_size >= len(pairs):
        raise DataError(f"data.eval_size ({eval_size}) must be smaller than the {len(pairs)} valid pairs")
    groups: dict[str, list[int]] = {}
    for index, pair in enumerate(pairs):
        key = pair.prompt if isinstance(pair.prompt, str) else json.dumps(pair.prompt, sort_keys=True)
        groups.setdefault(key, []).append(index)
    order = list(groups.values())
    random.Random(seed).shuffle(order)
    held_out: set[int] = set()
    for group in order:
        if len(held_out) + len(group) <= eval_size:
            held_out.update(group)
        if len(held_out) == eval_size:
            break
    return ([p for i, p in enumerate(pairs) if i not in held_out], [p for i, p in enumerate(pairs) if i in held_out])


NO_TEMPLATE = "none"  # data.chat_template: none renders explicit prompts as raw text


def _chat_template(data_config) -> str | None:
    template = data_config.chat_template
    if template == NO_TEMPLATE:
        return template
    if template and "{" not in template:
        path = Path(template)
        if not path.is_file():
            raise DataError(f"data.chat_template: {template} is neither a Jinja template nor a file")
        return path.read_text()
    return template


def tokenize_pairs(
    tokenizer, pairs: list[Pair], max_length: int, max_prompt_length: int, chat_template: str | None = None
) -> tuple[list[TokenizedPair], list[Defect]]:
    from tqdm.auto import tqdm

    renderer = Renderer(tokenizer, chat_template)
    examples, defects = [], []
    for pair in tqdm(pairs, desc="tokenize", unit="pair", disable=len(pairs) < 2000):
        example, defect = tokenize_pair(tokenizer, renderer, pair, max_length, max_prompt_length)
        if example is not None:
            examples.append(example)
        else:
            defects.append(defect)
    return examples, defects


def _tokenize_cached(tokenizer, pairs, data_config, preparer: bool, sync) -> tuple[list, list, str]:
    """Tokenise once per dataset version: the preparing rank writes the cache, the others read it.
    Returns the examples, the defects and the data fingerprint (the cache key)."""
    template = _chat_template(data_config)
    settings = {
        "max_length": data_config.max_length,
        "max_prompt_length": data_config.max_prompt_length,
        "chat_template": template,
    }
    key = cache_key(pairs, tokenizer, settings)
    if not data_config.cache:
        return (*tokenize_pairs(tokenizer, pairs, data_config.max_length, data_config.max_prompt_length, template), key)
    root = Path(data_config.cache_dir) if data_config.cache_dir else default_cache_dir() / "tokenized"
    path = root / f"{key}.safetensors"
    failure = None
    if preparer and not path.is_file():
        try:
            examples, defects = tokenize_pairs(
                tokenizer, pairs, data_config.max_length, data_config.max_prompt_length, template
            )
            save_cache(path, examples, defects)
        except Exception as err:  # reach the barrier anyway, so that no rank waits forever
            failure = err
    sync()
    if failure is not None:
        raise failure
    if not path.is_file():
        raise DataError(f"the tokenised data {path} was not written: see the error of local rank 0")
    return (*load_cache(path), key)


def prepare_datasets(data_config, tokenizer, preparer: bool = True, sync=lambda: None):
    """(training pairs, held-out pairs, reports), tokenised.

    ``preparer``: this process tokenises and writes the cache (local rank 0); ``sync``: a barrier.
    With ``data.on_bad_record: strict`` every bad record of both splits is reported at once and
    nothing trains; with ``skip`` they are counted, reported and left out.
    """
    pairs, defects, n_records = load_pairs(data_config.source, data_config, data_config.split)
    train_report = DataReport("train", data_config.source, records=n_records, defects=defects)
    if data_config.eval_source or data_config.eval_split:
        eval_source = data_config.eval_source or data_config.source
        eval_pairs, eval_defects, n_eval = load_pairs(
            eval_source, data_config, data_config.eval_split or data_config.split
        )
        eval_report = DataReport("eval", eval_source, records=n_eval, defects=eval_defects)
        train_pairs = pairs
    else:
        train_pairs, eval_pairs = (
            split_pairs(pairs, data_config.eval_size, data_config.seed) if data_config.eval_size else (pairs, [])
        )
        short = (
            f" (not {data_config.eval_size}: whole prompts did not add up to it)"
            if len(eval_pairs) != data_config.eval_size
            else ""
        )
        eval_report = DataReport(
            "eval", f"{len(eval_pairs)} pairs held out of {data_config.source}, whole prompts{short}"
        )
    results = []
    for report, split in ((train_report, train_pairs), (eval_report, eval_pairs)):
        examples, tokenize_defects, report.fingerprint = _tokenize_cached(tokenizer, split, data_config, preparer, sync)
        report.defects = report.defects + tokenize_defects
        report.pairs = len(examples)
        report.formats = dict(Counter(p.format for p in split))
        report.prompt_truncated = sum(e.prompt_truncated for e in examples)
        report.response_truncated = sum(e.response_truncated for e in examples)
        report.lengths = [len(e.prompt_ids) + max(len(e.chosen_ids), len(e.rejected_ids)) for e in examples]
        results.append(examples)
    bad = train_report.defects + eval_report.defects
    if bad and data_config.on_bad_record == "strict":
        listing = "\n".join(f"  {d}" for d in bad[:200])
        more = f"\n  ... and {len(bad) - 200} more" if len(bad) > 200 else ""
        raise DataError(
            f"{len(bad)} bad record(s); nothing was trained (data.on_bad_record: strict). "
            f"Fix them, or set data.on_bad_record skip to leave them out:\n{listing}{more}"
        )
    if not results[0]:
        raise DataError(f"{data_config.source}: no valid training pairs")
    return results[0], results[1], [train_report, eval_report]
