"""ZeRO-3 model-state memory per rank at 1 and 2 ranks, side by side in one run.

    python bench/zero3_memory.py [--ranks 1,2] [--section.key value ...]

For each rank count the script starts itself under torchrun, builds the policy engine exactly as
training does (plot_ds.training.run.setup_run, ds_configs/zero3.json by default), runs one optimizer step so that
gradients and Adam state exist, and counts the bytes of the tensors each rank holds, by storage
(views and aliases counted once):

- parameters: this rank's ZeRO-3 partitions, plus the full copies of parameters below
  ``stage3_param_persistence_threshold`` (kept whole on every rank by design);
- gradients: the flat buffer of this rank's gradient partitions;
- optimizer: Adam's moments and the fp32 master partitions when they are a separate copy.

Prints one JSON line: bytes per category and rank, and the ratio of the largest rank's total at
N ranks to the total at 1 rank (ideal: 1/N, plus the replicated small parameters).

    python bench/zero3_memory.py --adapters [--ranks 2] [--section.key value ...]

instead compares, at each rank count, a DPO run training every weight (policy plus a reference
engine) with one training LoRA adapters (``adapter.method lora``, the reference its base with the
adapters off): the same categories per rank, plus the reference engine's parameter partitions.
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
    moments = [
        value
        for state in zero.optimizer.state.values()
        for value in state.values()
        if hasattr(value, "untyped_storage") and value.dim() > 0
    ]
    optimizer = storage_bytes(list(zero.fp32_partitioned_groups_flat) + moments, seen)
    return {
        "parameters": parameters,
        "gradients": gradients,
        "optimizer": optimizer,
        "total": parameters + gradients + optimizer,
        "persistent_parameters": sum(p.numel() for p in model_params if getattr(p, "ds_persist", False)),
        "trainable_parameters": sum(getattr(p, "ds_numel", p.numel()) for p in model_params if p.requires_grad),
    }


def reference_bytes(reference) -> int:
    """The reference engine's parameter partitions (0 without one, or for the policy's own base)."""
    from plot_ds.engine.adapters import BaseOfPolicy

    if reference is None or isinstance(reference, BaseOfPolicy):
        return 0
    params = list(reference.module.parameters())
    return storage_bytes([p.ds_tensor for p in params] + [p.data for p in params], set())


def child(rest: list[str], out_file: str) -> None:
    from plot_ds.config import load_config, parse_overrides
    from plot_ds.training.run import setup_run
    from plot_ds.training.loop import train_step

    # Model state does not depend on the batch: one short SFT step creates the gradients and Adam state.
    config = load_config(
        None,
        {
            "train.save_checkpoint": False,
            "data.eval_size": 0,
            "objective.name": "sft",
            "plot.enabled": False,
            "data.max_length": 64,
            "data.max_prompt_length": 32,
            "train.micro_batch_size": 1,
            "train.precision": "fp32",
            "train.seed": 0,
            "train.resume": "none",
            **parse_overrides(rest),
        },
    )
    run = setup_run(config)
    dist, policy = run.dist, run.policy
    train_step(run, run.micro_batches(0))
    measured = {
        **model_state_bytes(policy),
        "reference": reference_bytes(getattr(run.reference, "engine", None)),
        "rank": dist.rank,
        "world_size": dist.world_size,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "model": config.model.name_or_path,
        "ds_config": config.deepspeed.config,
        "precision": config.train.precision,
    }
    with open(f"{out_file}.rank{dist.rank}", "w") as handle:
        json.dump(measured, handle)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--ranks", default="1,2", help="rank counts to compare; the first is the baseline")
    parser.add_argument("--adapters", action="store_true", help="compare full DPO with LoRA DPO at each rank count")
    parser.add_argument("--child-out", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    args, rest = parser.parse_known_args()
    if args.child_out:
        child(rest, args.child_out)
        return

    counts = [int(n) for n in args.ranks.split(",")]
    if args.adapters:
        compare_adapters(counts, rest)
        return
    results = {ranks: measure(ranks, rest) for ranks in counts}
    baseline = results[counts[0]][0]["total"]
    summary = {
        "benchmark": "zero3_memory",
        "model": results[counts[0]][0]["model"],
        "ds_config": results[counts[0]][0]["ds_config"],
        "precision": results[counts[0]][0]["precision"],
        "persistent_parameters": results[counts[0]][0]["persistent_parameters"],
        "per_rank": {
            str(n): [
                {k: r[k] for k in ("rank", "parameters", "gradients", "optimizer", "total", "peak_rss_bytes")}
                for r in rs
            ]
            for n, rs in results.items()
        },
        "ratio_to_first": {str(n): max(r["total"] for r in rs) / baseline for n, rs in results.items()},
    }
    print(json.dumps(summary), flush=True)


def measure(ranks: int, rest: list[str]) -> list[dict]:
    """Each rank's measurement of one engine build and step, in a child torchrun."""
    print(
        f"[bench] {ranks} rank(s) {' '.join(rest)}: building the engine and taking one step",
        file=sys.stderr,
        flush=True,
    )
    with tempfile.TemporaryDirectory() as scratch:
        out = os.path.join(scratch, f"ranks{ranks}")
        subprocess.run(
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                f"--nproc_per_node={ranks}",
                "--master_addr=127.0.0.1",
                f"--master_port={free_port()}",
                os.path.abspath(__file__),
                "--child-out",
                out,
                *rest,
            ],
            check=True,
        )
        return [json.load(open(f"{out}.rank{r}")) for r in range(ranks)]


def compare_adapters(counts: list[int], rest: list[str]) -> None:
    variants = {"full": ["--objective.name", "dpo"], "lora": ["--objective.name", "dpo", "--adapter.method", "lora"]}
    keys = ("rank", "parameters", "gradients", "optimizer", "reference", "total", "peak_rss_bytes")
    summary = {"benchmark": "zero3_memory_adapters", "per_rank": {}, "lora_to_full": {}}
    for ranks in counts:
        measured = {name: measure(ranks, [*extra, *rest]) for name, extra in variants.items()}
        for rows in measured.values():
            for row in rows:
                row["total"] += row["reference"]
        summary["model"] = measured["full"][0]["model"]
        summary["trainable_parameters"] = {name: rows[0]["trainable_parameters"] for name, rows in measured.items()}
        summary["per_rank"][str(ranks)] = {
            name: [{k: r[k] for k in keys} for r in rows] for name, rows in measured.items()
        }
        summary["lora_to_full"][str(ranks)] = max(r["total"] for r in measured["lora"]) / max(
            r["total"] for r in measured["full"]
        )
    print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
