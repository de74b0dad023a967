"""PLOT's embedding slice at R ranks: bytes per rank per micro-batch of each path, modelled for real
shapes, and the model checked against the bytes the collectives count at 2, 4 and 8 real ranks.

1. Sizes from real micro-batches: SmolLM2-135M-Instruct's top-k supports on CHAMP training pairs
   (the default run's lengths and micro-batch), per micro-batch |U with Y|, |Y|, the distinct
   (row, target) pairs, and how often each row is asked for (the hot rows of the all-to-all path).
2. Validation: ``torchrun`` ranks (gloo, loopback) partition a matrix of the real 49,152-row
   vocabulary and a tiny width with ZeRO-3; rank r computes the target cosines of measured micro-batch
   r by each path and counts its bytes; the model predicts them from the same micro-batches.
3. Extrapolation to R = 64, 512, 4096 for SmolLM2-135M, Llama-3-8B, Llama-3-70B and Qwen2.5-72B,
   with the time at NVLink (900 GB/s) and InfiniBand (400 Gb/s per GPU) bandwidths beside a step's
   compute time. The sizes measured with SmolLM2's vocabulary stand in for the others' (say so).

    python bench/slice_scaling.py [--micro-batches 8] [--out results/slice_scaling.json]

Prints a markdown table and writes the JSON (and a PNG where matplotlib is installed).
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from plot_ds.distributed.slice_cost import SliceShape, cheaper_path, hot_threshold, path_bytes  # noqa: E402

# (vocabulary, width, bytes per element, parameters) of the real models; bf16 on GPUs but the
# measured SmolLM2 run, fp32 on this CPU.
SHAPES = {
    "SmolLM2-135M (fp32)": (49152, 576, 4, 135e6),
    "Llama-3-8B": (128256, 4096, 2, 8.0e9),
    "Llama-3-70B": (128256, 8192, 2, 70.6e9),
    "Qwen2.5-72B": (152064, 8192, 2, 72.7e9),
}
RANKS = (2, 4, 8, 64, 512, 4096)
NVLINK, INFINIBAND = 900e9, 400e9 / 8  # bytes per second per GPU
# A step's compute for comparison: 6 x parameters x tokens of one micro-batch on one H100 at 40% of
# its 989 dense bf16 TFLOP/s (forward and backward; the policy only, the reference's forward left out).
GPU_FLOPS = 0.4 * 989e12
WIDTH = 64  # the validation matrix's width: the real vocabulary, a tiny width


def measure(micro_batches: int) -> list[dict]:
    """Per micro-batch of the default run's shape: the support ids [N, K+1] and targets [N]."""
    from transformers import AutoModelForCausalLM

    from plot_ds.config import load_config
    from plot_ds.data import prepare_datasets
    from plot_ds.objectives.plot_loss import top_k_support
    from plot_ds.engine.model_source import model_source
    from plot_ds.engine.models import load_tokenizer
    from plot_ds.objectives.plot_loss import restricted_supports

    config = load_config(None, {})
    tokenizer = load_tokenizer(config)
    train, _, _ = prepare_datasets(config.data, tokenizer)
    source, _ = model_source(config.model.name_or_path, config.model.revision, False)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
    per_batch = config.train.micro_batch_size
    batches = []
    for b in range(micro_batches):
        ids, targets = [], []
        for example in train[b * per_batch : (b + 1) * per_batch]:
            for response in (example.chosen_ids, example.rejected_ids):
                tokens = torch.tensor([example.prompt_ids + response])
                with torch.no_grad():
                    logits = model(input_ids=tokens).logits[0].float()
                start = len(example.prompt_ids)
                wanted = torch.tensor(response)
                support = restricted_supports(
                    top_k_support(logits[start - 1 : start - 1 + len(response)], wanted, config.plot.top_k), wanted
                )
                ids.append(support.ids)
                targets.append(wanted)
        batches.append({"support": torch.cat(ids), "targets": torch.cat(targets)})
    return batches


def sizes(batch: dict, vocab: int) -> dict:
    ids, targets = batch["support"], batch["targets"]
    needed = torch.unique(torch.cat([ids.flatten(), targets]))
    return {
        "rows": needed.numel(),
        "targets": torch.unique(targets).numel(),
        "pairs": torch.unique(ids * vocab + targets.unsqueeze(-1)).numel(),
        "needed": needed,
    }


def request_probability(batches: list[dict], vocab: int) -> torch.Tensor:
    """How often each row is needed by a micro-batch: at R ranks its expected requesters are R x this."""
    counts = torch.zeros(vocab)
    for batch in batches:
        counts[sizes(batch, vocab)["needed"]] += 1
    return counts / len(batches)


def modelled(shape: tuple, ranks: int, measured: dict, probability: torch.Tensor) -> dict:
    vocab, dim, element_size, _ = shape
    partition = -(-vocab * dim // ranks)
    # Hot rows expected at R ranks: each rank's micro-batch asks for row i with the measured probability
    # (rows past SmolLM2's vocabulary never asked: a stand-in for the other tokenizers).
    requesters = torch.zeros(vocab, dtype=torch.float64)
    requesters[: probability.numel()] = probability.double() * ranks
    owner = torch.arange(vocab) * dim // partition
    threshold = hot_threshold(requesters, owner, ranks, dim * element_size)
    hot = requesters >= threshold
    base = SliceShape(ranks, vocab, dim, element_size, measured["rows"], measured["targets"], measured["pairs"])
    with_hot = SliceShape(
        ranks,
        vocab,
        dim,
        element_size,
        measured["rows"],
        measured["targets"],
        measured["pairs"],
        hot_rows=float(hot.sum()),
        hot_wanted=float(requesters[hot].sum()) / ranks,
    )
    result = {
        path: path_bytes(with_hot if path == "all_to_all" else base, path, cosines=True)
        for path in ("allreduce", "all_to_all", "full")
    }
    # as EmbeddingRows decides: the all-to-all's lower bound first, then with the hot rows known
    chosen = (
        "allreduce"
        if cheaper_path(base, True) == "allreduce" or cheaper_path(with_hot, True, histogram_paid=True) == "allreduce"
        else "all_to_all"
    )
    result.update(chosen=chosen, chosen_bytes=result[chosen], hot_rows=int(hot.sum()))
    return result


def worker(batches_file: str, out: str) -> None:
    """One rank of the validation: the ranks' micro-batches through every path, bytes counted."""
    import deepspeed

    from plot_ds.distributed.process_group import init_distributed
    from plot_ds.distributed.embedding_slice import EmbeddingRows

    dist = init_distributed()
    batches = torch.load(batches_file, weights_only=True)
    config = {
        "train_micro_batch_size_per_gpu": 1,
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
    }
    with deepspeed.zero.Init(config_dict_or_path=config):
        embedding = torch.nn.Embedding(49152, WIDTH)
    batch = batches[dist.rank % len(batches)]
    counted = {}
    for path in ("slice", "allreduce", "all_to_all", "full"):
        rows = EmbeddingRows(embedding.weight, path)
        _, moved = rows.target_cosines(batch["support"], batch["targets"], torch.device("cpu"))
        counted[path] = {"bytes": moved, "path": rows.last_path}
    torch.save(counted, f"{out}.rank{dist.rank}")


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def validate(batches: list[dict], ranks: int, workdir: Path) -> dict:
    """Counted bytes (mean over ranks) against the model fed the same micro-batches' sizes."""
    batches_file = workdir / "batches.pt"
    torch.save([{"support": b["support"], "targets": b["targets"]} for b in batches], batches_file)
    out = workdir / f"counted{ranks}"
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "GLOO_SOCKET_IFNAME": "lo",
        "MASTER_ADDR": "127.0.0.1",
        "PYTHONPATH": os.pathsep.join(
            filter(None, [str(Path(__file__).resolve().parent.parent), os.environ.get("PYTHONPATH")])
        ),
    }
    subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            f"--nproc_per_node={ranks}",
            "--master_addr=127.0.0.1",
            f"--master_port={free_port()}",
            __file__,
            "--worker",
            str(batches_file),
            str(out),
        ],
        env=env,
        check=True,
        capture_output=True,
    )
    counted = [torch.load(f"{out}.rank{r}", weights_only=False) for r in range(ranks)]
    mine = [sizes(batches[r % len(batches)], 49152) for r in range(ranks)]
    vocab, dim = 49152, WIDTH
    partition = -(-vocab * dim // ranks)
    remote = [
        int(m["rows"] - ((m["needed"] * dim >= r * partition) & ((m["needed"] + 1) * dim <= (r + 1) * partition)).sum())
        for r, m in enumerate(mine)
    ]
    requesters = torch.zeros(vocab, dtype=torch.long)
    for m in mine:
        requesters[m["needed"]] += 1
    threshold = hot_threshold(requesters, torch.arange(vocab) * dim // partition, ranks, dim * 4)
    hot = requesters >= threshold
    mean = lambda key: sum(m[key] for m in mine) / ranks  # noqa: E731
    shape = SliceShape(
        ranks,
        vocab,
        dim,
        4,
        mean("rows"),
        mean("targets"),
        mean("pairs"),
        hot_rows=float(hot.sum()),
        hot_wanted=float(requesters[hot].sum()) / ranks,
        remote=sum(remote) / ranks,
    )
    report = {}
    for path in ("allreduce", "all_to_all", "full"):
        model = path_bytes(shape, path, cosines=True)
        measured = sum(c[path]["bytes"] for c in counted) / ranks
        report[path] = {"counted": measured, "model": model, "model_over_counted": model / measured}
    report["slice"] = {
        "counted": sum(c["slice"]["bytes"] for c in counted) / ranks,
        "path": sorted({c["slice"]["path"] for c in counted}),
    }
    return report


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--micro-batches", type=int, default=8)
    parser.add_argument("--out", default="results/slice_scaling.json")
    args = parser.parse_args(argv)
    batches = measure(args.micro_batches)
    per_batch = [sizes(b, 49152) for b in batches]
    measured = {key: sum(s[key] for s in per_batch) / len(per_batch) for key in ("rows", "targets", "pairs")}
    probability = request_probability(batches, 49152)
    with tempfile.TemporaryDirectory() as workdir:
        validation = {ranks: validate(batches, ranks, Path(workdir)) for ranks in (2, 4, 8)}
    models = {}
    for name, shape in SHAPES.items():
        vocab, dim, element_size, parameters = shape
        tokens = sum(b["targets"].numel() for b in batches) / len(batches)  # response tokens of a micro-batch
        compute = 6 * parameters * tokens * 2 / GPU_FLOPS  # prompts too: about as many tokens again
        models[name] = {"compute_seconds": compute, "per_ranks": {}}
        for ranks in RANKS:
            row = modelled(shape, ranks, measured, probability)
            row.update(
                chosen_over_full=row["chosen_bytes"] / row["full"],
                nvlink_ms={p: 1e3 * row[p] / NVLINK for p in ("chosen_bytes", "full")},
                infiniband_ms={p: 1e3 * row[p] / INFINIBAND for p in ("chosen_bytes", "full")},
            )
            models[name]["per_ranks"][ranks] = row
    result = {"measured": measured, "micro_batches": len(batches), "validation": validation, "models": models}
    Path(args.out).write_text(json.dumps(result, indent=2, default=float))
    print_tables(result)
    return result


def print_tables(result: dict) -> None:
    m = result["measured"]
    print(
        f"measured per micro-batch (mean of {result['micro_batches']}): |U with Y| {m['rows']:.0f}, "
        f"|Y| {m['targets']:.0f}, pairs {m['pairs']:.0f}\n"
    )
    print("| R | path | counted bytes/rank | model | model/counted |\n| --- | --- | --- | --- | --- |")
    for ranks, report in result["validation"].items():
        for path in ("allreduce", "all_to_all", "full"):
            r = report[path]
            print(f"| {ranks} | {path} | {r['counted']:.0f} | {r['model']:.0f} | {r['model_over_counted']:.3f} |")
        print(
            f"| {ranks} | slice (chose {', '.join(report['slice']['path'])}) | {report['slice']['counted']:.0f} | | |"
        )
    print()
    print(
        "| model | R | allreduce MB | all_to_all MB | full MB | chosen | chosen/full | chosen ms NVLink / IB | full ms NVLink / IB | compute ms |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, model in result["models"].items():
        for ranks, row in model["per_ranks"].items():
            print(
                f"| {name} | {ranks} | {row['allreduce'] / 1e6:.2f} | {row['all_to_all'] / 1e6:.2f} | "
                f"{row['full'] / 1e6:.1f} | {row['chosen']} | {100 * row['chosen_over_full']:.2f}% | "
                f"{row['nvlink_ms']['chosen_bytes']:.3f} / {row['infiniband_ms']['chosen_bytes']:.2f} | "
                f"{row['nvlink_ms']['full']:.2f} / {row['infiniband_ms']['full']:.1f} | "
                f"{1e3 * model['compute_seconds']:.0f} |"
            )


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker(sys.argv[2], sys.argv[3])
    else:
        main()
