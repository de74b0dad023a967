"""Long preference pairs from real text shipped with the project: the built-in CHAMP problems, their
reference solutions and the flawed model solutions, put together into one long pair.

A pair of about L tokens (SmolLM2's tokenizer): a prompt of about L/4 tokens holding earlier problems
with their reference solutions as a conversation, then a request to solve the next few problems;
the chosen response holds those problems' reference solutions, the rejected one the flawed model
solutions of the same problems, each cut to 3L/8 tokens. Pairs are written as JSONL of
prompt/chosen/rejected strings (the explicit format every trainer reads; no chat template).

usage: python bench/long_pairs.py --tokens 2048 --pairs 4 --out long_2k.jsonl
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def long_pairs(tokens: int, count: int, tokenizer) -> list[dict]:
    from plot_ds.assets import champ_pairs

    source = champ_pairs()
    ids = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    length = lambda text: len(ids(text))  # noqa: E731
    pairs, cursor = [], 0

    def take():
        nonlocal cursor
        pair = source[cursor % len(source)]
        cursor += 1
        return pair

    for _ in range(count):
        turns = []
        while length("\n\n".join(turns)) < tokens // 4:
            pair = take()
            turns.append(f"User: {pair['prompt']}\n\nAssistant: {pair['chosen']}")
        asked, chosen, rejected = [], [], []
        while min(length("\n\n".join(chosen)), length("\n\n".join(rejected))) < 3 * tokens // 8:
            pair = take()
            number = len(asked) + 1
            asked.append(f"Problem {number}: {pair['prompt']}")
            chosen.append(f"Solution {number}: {pair['chosen']}")
            rejected.append(f"Solution {number}: {pair['rejected']}")
        # Cut to length where a token ends: the earlier turns keep their last tokens, the responses
        # their first.
        request = "\n\nUser: Solve each of these problems.\n\n" + "\n\n".join(asked) + "\n\nAssistant:"
        budget = max(0, tokens // 4 - length(request))
        earlier = ids("\n\n".join(turns))
        history = tokenizer.decode(earlier[len(earlier) - budget :]) if budget else ""
        cut = lambda parts: tokenizer.decode(ids("\n\n".join(parts))[: 3 * tokens // 8])  # noqa: E731
        pairs.append({"prompt": history + request, "chosen": cut(chosen), "rejected": cut(rejected)})
    return pairs


def tokenizer_of(model: str):
    """The tokenizer of a model folder, hub id or built-in."""
    from transformers import AutoTokenizer

    from plot_ds.assets import resolve_model_path

    return AutoTokenizer.from_pretrained(resolve_model_path(model))


def write_long_pairs(path: str, tokens: int, count: int, tokenizer) -> str:
    """``count`` pairs of about ``tokens`` tokens as JSONL (ids long0, long1, ...) at ``path``."""
    with open(path, "w") as handle:
        for index, pair in enumerate(long_pairs(tokens, count, tokenizer)):
            handle.write(json.dumps({"id": f"long{index}", **pair}) + "\n")
    return path


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, required=True, help="about this many tokens a pair")
    parser.add_argument("--pairs", type=int, default=4)
    parser.add_argument("--out", required=True)
    parser.add_argument("--tokenizer", default="builtin:smollm2-135m-instruct")
    args = parser.parse_args()
    tokenizer = tokenizer_of(args.tokenizer)
    pairs = long_pairs(args.tokens, args.pairs, tokenizer)
    with open(args.out, "w") as out:
        for pair in pairs:
            out.write(json.dumps(pair) + "\n")
    counts = [
        {part: len(tokenizer(pair[part], add_special_tokens=False)["input_ids"]) for part in pair} for pair in pairs
    ]
    print(json.dumps({"benchmark": "long_pairs", "out": args.out, "tokens": counts}))


if __name__ == "__main__":
    main()
