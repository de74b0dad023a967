"""Prompt sharing vs full rows: forward and backward of the policy on the same batches, side by side.

    python bench/prompt_sharing.py [--pairs 8] [--micro-batch 2] [--prompt-lengths raw,128,512] [--model M]

SmolLM2-135M-Instruct (or --model) in fp32 (sdpa), one thread, plain PyTorch (no DeepSpeed: this isolates the
computation). Batches of CHAMP pairs without a chat template; "raw" keeps each prompt as it is (at
most 128 tokens, as the default run), a number N stretches each prompt to N tokens by repeating it,
to show longer prompts; responses are cut so that prompt + response fits in 256 + N tokens.
For every batch the two ways run back to back, alternating which goes first, timed in process CPU
time (steadier than wall time on a shared VM). Prints one JSON line per prompt length with
shared / full time ratios (below 1: sharing is faster).
"""

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def batches_for(tokenizer, pairs, prompt_length, micro_batch):
    from plot_ds.data import collate
    from plot_ds.data.tokenize import TokenizedPair

    rows = []
    for index, pair in enumerate(pairs):
        prompt = tokenizer(pair["prompt"])["input_ids"]
        if prompt_length == "raw":
            prompt, room = prompt[-128:], 256 - min(len(prompt), 128)
        else:
            prompt = (prompt * (prompt_length // len(prompt) + 1))[-prompt_length:]
            room = 256
        response = lambda text: (tokenizer(text)["input_ids"] + [tokenizer.eos_token_id])[:room]  # noqa: E731
        rows.append(TokenizedPair(str(index), prompt, response(pair["chosen"]), response(pair["rejected"])))
    return [collate(rows[i : i + micro_batch], pad_id=tokenizer.pad_token_id) for i in range(0, len(rows), micro_batch)]


def timed_step(model, batch, share):
    from plot_ds.forward.pair_forward import ForwardLayout, forward_pairs
    from plot_ds.forward.prompt_sharing import prompt_sharing

    sharing = prompt_sharing(model, share)
    started = time.process_time()
    out = forward_pairs(model, batch, keep_logits=False, layout=ForwardLayout(sharing))
    (out.logps.chosen.sum() - out.logps.rejected.sum()).backward()
    model.zero_grad(set_to_none=True)
    return time.process_time() - started


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=8)
    parser.add_argument("--micro-batch", type=int, default=2)
    parser.add_argument("--prompt-lengths", default="raw,128,512")
    parser.add_argument("--model", default="builtin:smollm2-135m-instruct", help="a folder or builtin: name")
    args = parser.parse_args()
    torch.set_num_threads(1)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from plot_ds.assets import champ_pairs, resolve_model_path

    path = resolve_model_path(args.model)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="sdpa")
    pairs = champ_pairs()[: args.pairs]
    for length in args.prompt_lengths.split(","):
        length = length if length == "raw" else int(length)
        batches = batches_for(tokenizer, pairs, length, args.micro_batch)
        timed_step(model, batches[0], True)  # warm-up
        seconds = {True: 0.0, False: 0.0}
        for index, batch in enumerate(batches):
            for share in (True, False) if index % 2 else (False, True):
                seconds[share] += timed_step(model, batch, share)
        prompt_tokens = sum(
            int(
                (b.labels[: len(b.labels) // 2] == -100)
                .logical_and(b.attention_mask[: len(b.labels) // 2].bool())
                .sum()
            )
            for b in batches
        )
        tokens = sum(int(b.attention_mask.sum()) for b in batches)
        print(
            json.dumps(
                {
                    "benchmark": "prompt_sharing",
                    "prompt_length": length,
                    "pairs": args.pairs,
                    "micro_batch": args.micro_batch,
                    "prompt_share_of_row_tokens": prompt_tokens * 2 / tokens,
                    "full_rows_s": round(seconds[False], 2),
                    "shared_s": round(seconds[True], 2),
                    "ratio_shared_over_full": round(seconds[True] / seconds[False], 3),
                }
            ),
            flush=True,
        )


if __name__ == "__main__":
    main()
