"""ZeRO-3 model-state memory per rank at 1 and 2 ranks, side by side in one run.

    python bench/zero3_memory.py [--ranks 1,2] [--section.key value ...]

For each rank count the script starts itself under torchrun, builds the policy engine exactly as
training does (plot_ds.run.setup_run, ds_configs/zero3.json by default), runs one optimizer step so that
gradients and Adam state exist, and counts the bytes of the tensors each rank holds, by storage
(views and aliases counted once):

- parameters: this rank's ZeRO-3 partitions, plus the full copies of parameters below
  ``stage3_param_persistence_threshold`` (kept whole on every rank by design);
- gradients: the flat buffer of this rank's gradient partitions;
- optimizer: Adam's moments and the fp32 master partitions when they are a separate copy.

Prints one JSON line: bytes per category and rank, and the ratio of the largest rank's total at
N ranks to the total at 1 rank (ideal: 1/N, plus the replicated small parameters).
"""
import argparse
import json
import os
import resource
import socket
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def storage_bytes(tensors, seen: set) -> int:
    total = 0
    for tensor in tensors:
        if tensor is None or tensor.numel() == 0:
            continue
        storage = tensor.untyped_storage()
        if storage.data_ptr() in seen:
            continue
        seen.add(storage.data_ptr())
        total += storage.nbytes()
    return total


def model_state_bytes(engine) -> dict:
    zero = engine.optimizer
    model_params = list(engine.module.parameters())
    seen: set = set()
    parameters = storage_bytes([p.ds_tensor for p in model_params] + [p.data for p in model_params], seen)
    gradients = storage_bytes([zero.grad_partitions_flat_buffer], seen)
    moments = [value for state in zero.optimizer.state.values() for value in state.values()
               if hasattr(value, "untyped_storage") and value.dim() > 0]
    optimizer = storage_bytes(list(zero.fp32_partitioned_groups_flat) + moments, seen)
    return {"parameters": parameters, "gradients": gradients, "optimizer": optimizer,
            "total": parameters + gradients + optimizer,
            "persistent_parameters": sum(p.numel() for p in model_params if getattr(p, "ds_persist", False))}


def child(rest: list[str], out_file: str) -> None:
    from plot_ds.config import load_config, parse_overrides
    from plot_ds.run import setup_run
    from plot_ds.training import train_step

    # Model state does not depend on the batch: one short SFT step creates the gradients and Adam state.
    config = load_config(None, {"train.save_checkpoint": False, "data.eval_size": 0, "objective.name": "sft",
                                "plot.enabled": False, "data.max_length": 64, "data.max_prompt_length": 32,
                                "train.micro_batch_size": 1, "train.precision": "fp32", "train.seed": 0,
                                "train.resume": "none", **parse_overrides(rest)})
    run = setup_run(config)
    dist, policy = run.dist, run.policy
    train_step(run, run.micro_batches(0))
    measured = {**model_state_bytes(policy), "rank": dist.rank, "world_size": dist.world_size,
                "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                "model": config.model.name_or_path, "ds_config": config.deepspeed.config,
                "precision": config.train.precision}
    with open(f"{out_file}.rank{dist.rank}", "w") as handle:
        json.dump(measured, handle)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--ranks", default="1,2", help="rank counts to compare; the first is the baseline")
    parser.add_argument("--child-out", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    args, rest = parser.parse_known_args()
    if args.child_out:
        child(rest, args.child_out)
        return

    counts = [int(n) for n in args.ranks.split(",")]
    results = {}
    with tempfile.TemporaryDirectory() as scratch:
        for ranks in counts:
            print(f"[bench] {ranks} rank(s): building the engine and taking one step", file=sys.stderr, flush=True)
            out = os.path.join(scratch, f"ranks{ranks}")
            subprocess.run([sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={ranks}",
                            "--master_addr=127.0.0.1", f"--master_port={free_port()}",
                            os.path.abspath(__file__), "--child-out", out, *rest], check=True)
            results[ranks] = [json.load(open(f"{out}.rank{r}")) for r in range(ranks)]
    baseline = results[counts[0]][0]["total"]
    summary = {
        "benchmark": "zero3_memory", "model": results[counts[0]][0]["model"],
        "ds_config": results[counts[0]][0]["ds_config"], "precision": results[counts[0]][0]["precision"],
        "persistent_parameters": results[counts[0]][0]["persistent_parameters"],
        "per_rank": {str(n): [{k: r[k] for k in ("rank", "parameters", "gradients", "optimizer", "total",
                                                   "peak_rss_bytes")} for r in rs] for n, rs in results.items()},
        "ratio_to_first": {str(n): max(r["total"] for r in rs) / baseline for n, rs in results.items()},
    }
    print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
