"""Per-rank memory and step time of one long pair split over a sequence group of N ranks
(parallel.sequence N: DeepSpeed's Ulysses), N side by side in one run.

    python bench/sequence_parallel.py --tokens 4096 --groups 1,3 [--section.key value ...]

For each N the script starts itself under torchrun with N ranks (one sequence group: data
parallelism 1, so every N trains on the same pair), builds the run exactly as training does
(``setup_run``: the real SmolLM2-135M by default, ZeRO-3 over the N ranks, DPO + PLOT with the live
reference engine), and takes two optimizer steps on a pair of ``--tokens`` tokens built from CHAMP's
text (``bench/long_pairs.py``). The second step is measured on every rank:

- ``state_gb``: the resident set before the step (model and optimizer partitions, the reference's,
  the process itself), freed heap pages handed back first;
- ``step_peak_gb``: the resident high-water mark during the step (reset just before it through
  /proc/self/clear_refs), and ``above_state_gb`` = the two's difference: what the step itself needs
  (activations, gathered layers, the head, PLOT);
- ``seconds``: the step's wall time.

glibc's ``MALLOC_MMAP_THRESHOLD_`` is set low (64 KiB) in the ranks, so that freed tensors leave the
resident set at once and the peak is that of live memory (as ``bench/trl_comparison.py`` allows).
Prints one JSON line per N and, last, the ratio of the largest rank's ``above_state_gb`` at each N to
that at the first N. SmolLM2-135M has 9 attention heads (3 key/value heads): Ulysses splits them
into groups of 1, 3 or 9 ranks.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def worker(overrides: dict, out: str) -> None:
    import torch

    from plot_ds.config import load_config
    from plot_ds.planning.check import process_status_gb as status_gb
    from plot_ds.distributed.process_group import barrier
    from plot_ds.training.host_memory import trim_host_heap
    from plot_ds.training.loop import train_step
    from plot_ds.training.run import setup_run

    run = setup_run(load_config(None, overrides))
    records = []
    for step in range(2):
        batches = run.micro_batches(step)
        barrier()
        trim_host_heap()
        state = status_gb("VmRSS")
        with open("/proc/self/clear_refs", "w") as clear:
            clear.write("5")  # resets VmHWM to the current resident set
        started = time.perf_counter()
        _, totals = train_step(run, batches)
        records.append(
            {
                "step": step + 1,
                "seconds": time.perf_counter() - started,
                "state_gb": state,
                "step_peak_gb": status_gb("VmHWM"),
                "tokens": int(totals.input_tokens),
                "response_positions": int(totals.chosen_tokens + totals.rejected_tokens),
            }
        )
    measured = records[-1]
    measured["above_state_gb"] = measured["step_peak_gb"] - measured["state_gb"]
    measured["rank"] = run.dist.rank
    parts = [None] * run.dist.world_size
    torch.distributed.all_gather_object(parts, measured)
    if run.dist.is_main:
        with open(out, "w") as handle:
            json.dump(parts, handle)


def overrides_for(args, group: int, data: str, output_dir: str) -> dict:
    overrides = {
        "model.name_or_path": args.model,
        "data.source": data,
        "data.max_length": args.tokens + 64,
        "data.max_prompt_length": args.tokens // 4 + 32,
        "data.eval_size": 0,
        "objective.name": "dpo",
        "train.micro_batch_size": 1,
        "train.gradient_accumulation_steps": 1,
        "train.max_steps": 2,
        "train.output_dir": output_dir,
        "train.resume": "none",
        "parallel.sequence": group,
    }
    from plot_ds.config import parse_overrides

    return {**overrides, **parse_overrides(args.rest)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--groups", default="1,3")
    parser.add_argument("--model", default="builtin:smollm2-135m-instruct")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args, rest = parser.parse_known_args()
    args.rest = rest
    if args.worker:
        worker(json.loads(args.worker), args.out)
        return
    from bench.long_pairs import tokenizer_of, write_long_pairs

    tokenizer = tokenizer_of(args.model)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        data = write_long_pairs(os.path.join(tmp, "pairs.jsonl"), args.tokens, 2, tokenizer)
        for group in map(int, args.groups.split(",")):
            out = os.path.join(tmp, f"group{group}.json")
            overrides = overrides_for(args, group, data, os.path.join(tmp, f"run{group}"))
            env = {**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "65536"}
            command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={group}"]
            command += ["--master_addr=127.0.0.1", f"--master_port={29500 + group}", os.path.abspath(__file__)]
            command += ["--worker", json.dumps(overrides), "--out", out]
            subprocess.run(command, check=True, env=env)
            with open(out) as handle:
                ranks = json.load(handle)
            result = {"group": group, "tokens": args.tokens, "ranks": ranks}
            print(json.dumps(result), flush=True)
            results.append(result)
    first = max(r["above_state_gb"] for r in results[0]["ranks"])
    print(
        json.dumps(
            {
                "above_state_ratio": {
                    str(r["group"]): max(rank["above_state_gb"] for rank in r["ranks"]) / first for r in results
                }
            }
        )
    )


if __name__ == "__main__":
    main()
