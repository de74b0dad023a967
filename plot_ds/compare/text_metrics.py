"""Metrics of one generated text, the same for every model: word n-gram diversity and repetition.
Words are whitespace-separated; a text too short for any n-gram has no value (None)."""

from __future__ import annotations


def ngrams(words: list[str], n: int) -> list[tuple[str, ...]]:
    return [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]


def distinct_n(text: str, n: int) -> float | None:
    """Distinct n-grams over all n-grams of the text (Li et al., 2016, per text): 1 = no n-gram
    repeats."""
    grams = ngrams(text.split(), n)
    return len(set(grams)) / len(grams) if grams else None


def repeated_ngram_share(text: str, n: int = 4) -> float | None:
    """The share of the text's n-grams that already occurred earlier in it: 0 for a text without
    repetition, close to 1 for a degenerate loop."""
    grams = ngrams(text.split(), n)
    return (len(grams) - len(set(grams))) / len(grams) if grams else None
