"""The LM head over N response positions: the whole [N, V] head (the model's own head, then
plot_ds's chunked float32 log-probs with the gradient written over the logits) against the tiled
head (plot_ds/forward/tiled_head.py), side by side in one run.

Each measurement is a fresh process: the real SmolLM2-135M-Instruct head (its tied embedding,
V = 49152, d = 576, float32 on CPU), N random hidden states, the target log-probs and PLOT's top-16
supports, forward and backward, on DeepSpeed's accelerator. Peak memory on a CPU is the process's
peak resident set above what it held before the step, with glibc's MALLOC_MMAP_THRESHOLD_ low so
that freed tensors go back to the OS at once (the peak of live tensors, not of the heap's
high-water mark); on a GPU, the allocator's peak allocated above what was allocated before. Time is
the median of the repeats. N for a pair of L tokens (a quarter prompt, the rest responses) is 3L/4.

usage: python bench/tiled_head.py [--positions 1536,3072,6144,12288] [--repeats 3] [--top-k 16]
                                  [--dtype float32|bfloat16] [--model builtin:smollm2-135m-instruct]
Prints one JSON line per N, then one with them all and the ratios (tiled / whole).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def resident_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def head_weight(model: str):
    """The model's head (its tied embedding where it has no head of its own); a model stored in
    shards gets a random matrix of its head's shape (time and memory depend on the shape only)."""
    import torch
    from safetensors import safe_open

    from plot_ds.assets import resolve_model_path

    folder = resolve_model_path(model)
    single = os.path.join(folder, "model.safetensors")
    if os.path.isfile(single):
        with safe_open(single, "pt") as weights:
            name = "lm_head.weight" if "lm_head.weight" in weights.keys() else "model.embed_tokens.weight"
            return weights.get_tensor(name).float()
    with open(os.path.join(folder, "config.json")) as file:
        config = json.load(file)
    return 0.02 * torch.randn(config["vocab_size"], config["hidden_size"])


def child(mode: str, positions: int, repeats: int, top_k: int, dtype: str, model: str) -> dict:
    import torch
    from deepspeed.accelerator import get_accelerator

    from plot_ds.forward.logprobs import target_logps_and_support
    from plot_ds.forward.tiled_head import TiledHeadLogProb, tile_positions

    accelerator = get_accelerator()
    device, on_cpu = accelerator.device_name(), accelerator.device_name() == "cpu"
    torch.manual_seed(0)
    weight = head_weight(model).to(device, getattr(torch, dtype)).requires_grad_(True)
    vocab, width = weight.shape
    hidden = (0.1 * torch.randn(positions, width, device=device, dtype=weight.dtype)).requires_grad_(True)
    targets = torch.randint(vocab, (positions,), device=device)
    tile = tile_positions(vocab)

    def step():
        if mode == "whole":
            logits = torch.nn.functional.linear(hidden, weight)
            logps, support = target_logps_and_support(logits, targets, top_k, in_place_grad=True)
            support_logits = support.logits
        else:
            logps, support_logits, _ = TiledHeadLogProb.apply(hidden, weight, None, targets, tile, top_k)
        (logps.sum() + support_logits.square().mean()).backward()
        hidden.grad = weight.grad = None

    before = resident_bytes() if on_cpu else accelerator.memory_allocated()
    if not on_cpu:
        accelerator.reset_peak_memory_stats()
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        accelerator.synchronize()
        seconds.append(time.perf_counter() - start)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 if on_cpu else accelerator.max_memory_allocated()
    return {
        "device": device,
        "dtype": dtype,
        "mode": mode,
        "positions": positions,
        "peak_above_start_gb": max(0, peak - before) / 2**30,
        "seconds": sorted(seconds)[len(seconds) // 2],
        "logits_gb": positions * vocab * weight.element_size() / 2**30,
        "tile": tile,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--positions", default="1536,3072,6144,12288")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--top-k", type=int, default=16)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--model", default="builtin:smollm2-135m-instruct")
    parser.add_argument("--child", nargs=2, metavar=("MODE", "N"))
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child[0], int(args.child[1]), args.repeats, args.top_k, args.dtype, args.model)))
        return
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
    summary, rows = {}, []
    for index, positions in enumerate(int(n) for n in args.positions.split(",")):
        modes = ("whole", "tiled") if index % 2 == 0 else ("tiled", "whole")  # the order alternates
        results = {}
        for mode in modes:
            command = [sys.executable, os.path.abspath(__file__), "--child", mode, str(positions)]
            command += [
                "--repeats",
                str(args.repeats),
                "--top-k",
                str(args.top_k),
                "--dtype",
                args.dtype,
                "--model",
                args.model,
            ]
            out = subprocess.run(command, env=env, check=True, capture_output=True, text=True).stdout
            results[mode] = json.loads(out.strip().splitlines()[-1])
        whole, tiled = results["whole"], results["tiled"]
        line = {
            "device": whole["device"],
            "dtype": args.dtype,
            "positions": positions,
            "pair_tokens": positions * 4 // 3,
            "logits_gb": round(whole["logits_gb"], 3),
            "whole_peak_gb": round(whole["peak_above_start_gb"], 3),
            "tiled_peak_gb": round(tiled["peak_above_start_gb"], 3),
            "saved_gb": round(whole["peak_above_start_gb"] - tiled["peak_above_start_gb"], 3),
            "whole_seconds": round(whole["seconds"], 3),
            "tiled_seconds": round(tiled["seconds"], 3),
            "tile": tiled["tile"],
        }
        print(json.dumps(line), flush=True)
        rows.append(line)
        summary[positions] = {
            "peak": round(tiled["peak_above_start_gb"] / max(whole["peak_above_start_gb"], 1e-9), 3),
            "time": round(tiled["seconds"] / whole["seconds"], 3),
        }
    print(json.dumps({"benchmark": "tiled_head", "dtype": args.dtype, "rows": rows, "tiled_over_whole": summary}))


if __name__ == "__main__":
    main()
