"""Padded rows vs padding-free packed rows (``data.packing``), and each with its prompts shared:
forward and backward of the policy on the same micro-batches, side by side.

    python bench/packing.py [--model builtin:smollm2-135m-instruct] [--data builtin:champ] [--pairs 32]
                            [--micro-batch 4] [--max-length 512] [--max-prompt-length 256]
                            [--device auto] [--precision fp32] [--attention auto]

Real pairs through plot_ds's own tokenisation (chat template, truncation), in the sampler's seeded
order, collated as training collates them. Layouts: ``padded`` (one row per response, padded to
the longest), ``shared_passes`` (model.share_prompt: a prompt pass and two response passes over its
cache), ``packed`` (data.packing: one row, each response its own sequence), ``packed_shared``
(data.packing with model.share_prompt: each pair prompt, chosen, rejected under one mask; sdpa and
eager only). Every micro-batch runs every layout back to back, the order rotating. Time: process CPU
time on one thread on a CPU; wall time between synchronisations on a GPU, where the peak memory of
each layout is also read. Prints one JSON line: per layout the seconds, the positions the model
computed (the embedding's inputs) and the ratios to ``padded`` (below 1: cheaper than padding).
"""

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def micro_batches(tokenizer, source: str, pairs: int, micro_batch: int, max_length: int, max_prompt_length: int):
    from plot_ds.config import load_config
    from plot_ds.data import collate, load_pairs, tokenize_pairs

    config = load_config(
        None, {"data.source": source, "data.max_length": max_length, "data.max_prompt_length": max_prompt_length}
    )
    found, _, _ = load_pairs(source, config.data)
    examples, _ = tokenize_pairs(tokenizer, found, max_length, max_prompt_length)
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(0)).tolist()[:pairs]
    chosen = [examples[i] for i in order]
    return [
        collate(chosen[i : i + micro_batch], pad_id=tokenizer.pad_token_id) for i in range(0, len(chosen), micro_batch)
    ]


def layouts(model, attention: str) -> dict:
    from plot_ds.forward.packing import MASKED_ATTENTION, VARLEN_ATTENTION, Packing
    from plot_ds.forward.prompt_sharing import prompt_sharing

    varlen = attention in VARLEN_ATTENTION
    found = {"padded": None, "shared_passes": prompt_sharing(model, True), "packed": Packing(False, varlen)}
    if attention in MASKED_ATTENTION:
        found["packed_shared"] = Packing(True, False)
    return found


class Clock:
    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def now(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
            return time.perf_counter()
        return time.process_time()


def timed_step(model, batch, layout, clock: Clock) -> float:
    from plot_ds.forward.pair_forward import ForwardLayout, forward_pairs

    started = clock.now()
    out = forward_pairs(model, batch, keep_logits=False, layout=ForwardLayout(layout))
    (out.logps.chosen.sum() - out.logps.rejected.sum()).backward()
    model.zero_grad(set_to_none=True)
    return clock.now() - started


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="builtin:smollm2-135m-instruct")
    parser.add_argument("--data", default="builtin:champ")
    parser.add_argument("--pairs", type=int, default=32)
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--max-prompt-length", type=int, default=256)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--attention", default="auto", help="auto: as model.attn_implementation auto")
    args = parser.parse_args()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from plot_ds.assets import resolve_model_path
    from plot_ds.engine.models import attention_for

    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    if device.type == "cpu":
        torch.set_num_threads(1)
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    path = resolve_model_path(args.model)
    tokenizer = AutoTokenizer.from_pretrained(path)
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    model_class = MODEL_FOR_CAUSAL_LM_MAPPING[type(AutoConfig.from_pretrained(path))]
    attention = attention_for(args.attention, model_class, dtype, device.type)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation=attention).to(device)
    model.train()
    positions = [0]
    model.get_input_embeddings().register_forward_hook(
        lambda _, inputs, __: positions.__setitem__(0, positions[0] + inputs[0].numel())
    )
    batches = micro_batches(tokenizer, args.data, args.pairs, args.micro_batch, args.max_length, args.max_prompt_length)
    clock = Clock(device)
    chosen = layouts(model, attention)
    names = list(chosen)
    for name in names:  # warm-up
        timed_step(model, batches[0], chosen[name], clock)
    seconds, computed, peak = dict.fromkeys(names, 0.0), dict.fromkeys(names, 0), dict.fromkeys(names, 0)
    for index, batch in enumerate(batches):
        for name in names[index % len(names) :] + names[: index % len(names)]:
            positions[0] = 0
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            seconds[name] += timed_step(model, batch, chosen[name], clock)
            computed[name] += positions[0]
            if device.type == "cuda":
                peak[name] = max(peak[name], torch.cuda.max_memory_allocated())
    tokens = sum(int(b.attention_mask.sum()) for b in batches)
    result = {
        "benchmark": "packing",
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "attention": attention,
        "precision": args.precision,
        "pairs": len(batches) * args.micro_batch,
        "micro_batch": args.micro_batch,
        "max_length": args.max_length,
        "row_tokens": tokens,
    }
    for name in names:
        result[f"{name}_s"] = round(seconds[name], 3)
        result[f"{name}_positions"] = computed[name]
        result[f"ratio_{name}_over_padded"] = round(seconds[name] / seconds["padded"], 3)
        result[f"positions_{name}_over_padded"] = round(computed[name] / computed["padded"], 3)
        if device.type == "cuda":
            result[f"{name}_peak_gib"] = round(peak[name] / 2**30, 3)
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
