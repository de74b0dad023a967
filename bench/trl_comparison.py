"""plot_ds DPO against TRL's DPOTrainer, side by side in one run: the same model, pairs, batches,
sequence length, precision, optimizer settings and number of steps, one process each (CPU, or one
GPU with --device cuda), one after the other. Prints one JSON line with the pairs-per-second ratio
and the peak-memory ratio, both plot_ds / TRL (pairs/s above 1: plot_ds is faster; memory above 1:
plot_ds needs more).

    pip install trl                                   # benchmark-only dependency
    python bench/trl_comparison.py [--steps 8] [--warmup 2] [--micro-batch 2] [--max-length 256]
                                   [--max-prompt-length 128] [--threads 1] [--plot-ds-args "..."]
                                   [--device cuda --precision bf16 --model DIR --pairs FILE.jsonl]

"Same work" means: SmolLM2-135M-Instruct (or --model) with sdpa attention and no gradient
checkpointing, in fp32, or with --precision bf16 in each side's bf16 mixed precision with fp32 master
weights (plot_ds: DeepSpeed's bf16 weights and an fp32 optimizer copy; TRL: fp32 weights under
autocast, its bf16=True);
the first (warmup + steps) x micro-batch built-in CHAMP pairs (the ones trained on), written once to a JSONL file of prompt/chosen/rejected strings that both
sides read; no chat template on either side (plot_ds would template explicit prompts:
data.chat_template none); EOS appended to each response; --micro-batch pairs per step, no
accumulation; sigmoid DPO with plot_ds's beta; with --reference live (default) a reference model
forwarded every step (plot_ds: its default deepspeed.config auto, i.e. ZeRO-3 in fp32 and ZeRO-2
with a plain frozen reference in bf16 on this one process, unless --plot-ds-args names another;
TRL: a plain copy), with --reference precomputed the reference
log-probs made in one pass before training on both sides (plot_ds's reference cache, TRL's
precompute_ref_log_probs), outside the measured steps; torch's fused AdamW on both sides (plot_ds's
ds_configs and transformers' default with torch >= 2.8) with plot_ds's lr, betas, eps, weight decay
and clipping, no warmup, cosine to the same floor. TRL reads the pairs in the order plot_ds's sampler
deals them, so step k trains on the same pairs on both sides. The JSON line reports the mean tokens
per pair as each side tokenised them and each side's loss at every step, so that the equal work can
be checked.

Known differences: TRL 1.16 has no prompt-length limit (plot_ds keeps a prompt's last
max_prompt_length tokens, then cuts the responses; TRL cuts prompt + response at max_length) and
drops a pair whose completions that cut removes entirely, training on the rest. So only pairs whose
prompt fits max_prompt_length are used (the run stops if TRL still drops one). TRL
tokenises prompt + response as one string, plot_ds each part by itself, which can split the boundary
differently. How each side computes the same thing is its own and is what is measured: e.g. TRL's
log-probs come from a chunked ("fused") LM head that never holds the full logits, plot_ds's from the
full logits.

On CPU the peak memory is the peak RSS. Peak RSS counts what glibc's heap keeps after tensors are freed, which depends on each side's order
of allocations as much as on its live tensors; --malloc-mmap-threshold 131072 (on both sides) makes
the peak that of the live tensors, at some cost in speed (fresh pages for every large tensor).

On a GPU it is torch.cuda.max_memory_allocated
(live tensors; the ratio reported) and max_memory_reserved (what the caching allocator held), over
the whole run: DeepSpeed resets CUDA's peak counters in places, so the children disable those resets.

Each side's pairs/s is pairs per step over the wall time between consecutive step ends (data,
forward, backward, optimizer, logging: everything a training step costs), median over the steps after
the warmup. With --rounds R each side runs R times, in the order plot_ds, TRL, TRL, plot_ds, ...
(a slow drift of a shared machine then weighs on both sides alike); the ratio is that of the medians
over all rounds' measured steps, and each round's own ratio is reported beside it. Peak memory is the child process's ru_maxrss, read
inside it as it finishes (with rounds, the highest of a side's runs).
"""

import argparse
import importlib.util
import json
import os
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

MODEL = "builtin:smollm2-135m-instruct"


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=8, help="measured steps per side")
    parser.add_argument("--warmup", type=int, default=2, help="unmeasured steps first, per side")
    parser.add_argument("--micro-batch", type=int, default=2, help="pairs per step")
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="runs of each side, alternating (plot_ds, TRL, "
        "TRL, plot_ds, ...) so that a machine's drift over minutes falls on both sides alike",
    )
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--max-prompt-length", type=int, default=128, help="plot_ds only: TRL 1.16 has none")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads, the same on both sides (0: "
        "torch's own default on both, e.g. on a GPU machine whose host work should not be pinned)",
    )
    parser.add_argument(
        "--reference",
        choices=["live", "precomputed"],
        default="live",
        help="live: a reference forward every step on both sides; precomputed: plot_ds's "
        "reference cache vs TRL's precompute_ref_log_probs (one pass before training)",
    )
    parser.add_argument(
        "--malloc-mmap-threshold",
        type=int,
        default=None,
        metavar="BYTES",
        help="glibc's MALLOC_MMAP_THRESHOLD_ for both children (default: glibc's own, "
        "dynamic). 131072 makes freed tensors go back to the OS at once, so that the "
        "peak RSS is the peak of live tensors rather than of the heap's high-water mark",
    )
    parser.add_argument(
        "--device",
        choices=["cpu", "cuda"],
        default="cpu",
        help="cuda: one GPU per side (DeepSpeed's accelerator must be cuda)",
    )
    parser.add_argument(
        "--precision",
        choices=["fp32", "bf16"],
        default="fp32",
        help="bf16: each side's mixed precision with fp32 master weights",
    )
    parser.add_argument("--model", default=MODEL, help="model path or hub id, the same on both sides")
    parser.add_argument(
        "--pairs",
        help="JSONL of prompt/chosen/rejected records (default: the built-in "
        "CHAMP pairs); the first (warmup + steps) x micro-batch are used",
    )
    parser.add_argument(
        "--plot-ds-args",
        default="",
        help='extra plot_ds overrides, e.g. "--deepspeed.config '
        'ds_configs/zero2.json" (applied last; TRL does not see them)',
    )
    parser.add_argument("--child", choices=["plot_ds", "trl"], help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    for name in ("rounds", "steps", "micro_batch"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    return args


def log(message):
    print(f"[bench] {message}", file=sys.stderr, flush=True)


def measured(values, args):
    return values[args.warmup : args.warmup + args.steps]


# ------------------------------------------------------------------------------------ plot_ds side
def run_plot_ds(args, data_file, workdir):
    # In this process, not as a grandchild, so that this process's ru_maxrss is the trainer's.
    from plot_ds.cli import train_main

    output_dir = os.path.join(workdir, "plot_ds_run")
    argv = [
        "--model.name_or_path",
        args.model,
        "--objective.name",
        "dpo",
        "--plot.enabled",
        "false",
        "--reference.mode",
        "engine" if args.reference == "live" else "cache",
        "--reference.cache_path",
        os.path.join(workdir, "reference_logps.safetensors"),
        "--data.source",
        data_file,
        "--data.eval_size",
        "0",
        "--data.chat_template",
        "none",
        "--data.max_length",
        str(args.max_length),
        "--data.max_prompt_length",
        str(args.max_prompt_length),
        "--data.cache",
        "false",
        "--train.micro_batch_size",
        str(args.micro_batch),
        "--train.gradient_accumulation_steps",
        "1",
        "--train.max_steps",
        str(args.warmup + args.steps),
        "--train.warmup_steps",
        "0",
        "--train.precision",
        args.precision,
        "--train.eval_every",
        "0",
        "--train.save_checkpoint",
        "false",
        "--train.export_final",
        "false",
        "--train.resume",
        "none",
        "--train.output_dir",
        output_dir,
        # TRL runs with report_to none: no TensorBoard writer on this side either.
        "--train.tensorboard",
        "false",
        *shlex.split(args.plot_ds_args),
    ]
    code = train_main(argv)
    if code != 0:
        raise SystemExit(f"plot_ds training exited with {code}")
    with open(os.path.join(output_dir, "train_history.jsonl")) as handle:
        history = [json.loads(line) for line in handle if line.strip()]
    pairs_per_s = [record["throughput/pairs_per_s"] for record in history]
    for record in history:
        log(f"plot_ds step {record['step']}: {args.micro_batch / record['throughput/pairs_per_s']:.2f} s")
    # tokens/s over pairs/s of the same step: the trainer's own count of input tokens per pair.
    tokens_per_pair = [r["throughput/tokens_per_s"] / r["throughput/pairs_per_s"] for r in history]
    with open(os.path.join(output_dir, "ds_config.json")) as handle:
        stage = json.load(handle)["zero_optimization"]["stage"]
    return {
        "pairs_per_s": statistics.median(measured(pairs_per_s, args)),
        "measured_pairs_per_s": measured(pairs_per_s, args),
        "mean_tokens_per_pair": statistics.mean(tokens_per_pair),
        "zero_stage": stage,
        "losses": [record["loss/total"] for record in history],
    }


# ---------------------------------------------------------------------------------------- TRL side
def run_trl(args, data_file, workdir):
    import datasets
    import torch
    from transformers import AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    from plot_ds.assets import resolve_model_path
    from plot_ds.config import ObjectiveConfig, TrainConfig
    from plot_ds.data.sampler import GlobalBatchSampler

    train = TrainConfig()  # plot_ds's defaults: the optimizer settings both sides use
    total_steps = args.warmup + args.steps
    dataset = datasets.load_dataset(
        "json", data_files=data_file, split="train", cache_dir=os.path.join(workdir, "hf_datasets")
    )
    # plot_ds shuffles with its seeded sampler; TRL reads sequentially in that same order.
    sampler = GlobalBatchSampler(len(dataset), args.micro_batch, 1, 0, 1, train.seed)
    dataset = dataset.select([i for step in range(total_steps) for i in sampler.global_batch(step)])

    class StepTimer(TrainerCallback):
        """Wall time between consecutive step ends, as plot_ds measures its throughput."""

        def __init__(self):
            self.seconds, self.last = [], None

        def on_train_begin(self, *_, **__):
            self.last = time.perf_counter()

        def on_step_end(self, _args, state, *_, **__):
            now = time.perf_counter()
            self.seconds.append(now - self.last)
            self.last = now
            log(f"trl step {state.global_step}: {self.seconds[-1]:.2f} s")

    config = DPOConfig(
        output_dir=os.path.join(workdir, "trl_run"),
        per_device_train_batch_size=args.micro_batch,
        gradient_accumulation_steps=1,
        max_steps=total_steps,
        learning_rate=train.lr,
        lr_scheduler_type="cosine_with_min_lr",
        lr_scheduler_kwargs={"min_lr_rate": train.min_lr_ratio},
        warmup_steps=0,
        optim="adamw_torch_fused",
        adam_beta1=train.adam_betas[0],
        adam_beta2=train.adam_betas[1],
        adam_epsilon=train.adam_eps,
        weight_decay=train.weight_decay,
        max_grad_norm=train.max_grad_norm,
        beta=ObjectiveConfig().beta,
        loss_type=["sigmoid"],
        max_length=args.max_length,
        precompute_ref_log_probs=args.reference == "precomputed",
        # DPOConfig defaults to bf16 and gradient checkpointing; plot_ds runs fp32 without checkpointing.
        # (activation_checkpointing is transformers 5's name; it wins over TRL's gradient_checkpointing.)
        # bf16 is TRL's mixed precision: fp32 weights (and optimizer) under bf16 autocast.
        bf16=args.precision == "bf16",
        fp16=False,
        activation_checkpointing=False,
        model_init_kwargs={"dtype": "float32", "attn_implementation": "sdpa"},
        use_cpu=args.device == "cpu",
        dataloader_num_workers=0,
        train_sampling_strategy="sequential",
        seed=train.seed,
        eval_strategy="no",
        save_strategy="no",
        report_to="none",
        logging_steps=1,
        disable_tqdm=True,
    )
    model_path = resolve_model_path(args.model)
    timer = StepTimer()
    trainer = DPOTrainer(
        model=model_path,
        args=config,
        train_dataset=dataset,
        processing_class=AutoTokenizer.from_pretrained(model_path),
        callbacks=[timer],
    )
    if len(trainer.train_dataset) != len(dataset):  # it drops pairs whose completions it truncated away
        raise SystemExit(
            f"TRL kept {len(trainer.train_dataset)} of the {len(dataset)} pairs: the two sides would "
            "train on different pairs; raise --max-length"
        )
    # Non-padding tokens of the chosen and rejected rows, from TRL's own tokenisation and collator.
    examples = [trainer.train_dataset[i] for i in range(len(trainer.train_dataset))]
    batches = [
        trainer.data_collator(examples[i : i + args.micro_batch]) for i in range(0, len(examples), args.micro_batch)
    ]
    tokens = sum(int(batch["attention_mask"].sum()) for batch in batches)
    trainer.train()
    if len(timer.seconds) != total_steps:
        raise SystemExit(f"TRL ran {len(timer.seconds)} steps, expected {total_steps}")
    return {
        "pairs_per_s": args.micro_batch / statistics.median(measured(timer.seconds, args)),
        "measured_pairs_per_s": [args.micro_batch / seconds for seconds in measured(timer.seconds, args)],
        "mean_tokens_per_pair": tokens / len(examples),
        "torch_threads": torch.get_num_threads(),
        "losses": [entry["loss"] for entry in trainer.state.log_history if "loss" in entry],
    }


def keep_cuda_peaks():
    """DeepSpeed resets CUDA's peak-memory counters in places (runtime.utils.empty_cache,
    see_memory_usage); a peak over the whole run needs those resets off, on both sides alike."""
    import torch
    from deepspeed.accelerator import get_accelerator

    accelerator = get_accelerator()
    if accelerator.device_name() != "cuda":
        raise SystemExit(f"--device cuda, but DeepSpeed's accelerator is {accelerator.device_name()!r}")
    for owner in (torch.cuda, torch.cuda.memory, type(accelerator)):
        for name in ("reset_peak_memory_stats", "reset_max_memory_allocated", "reset_max_memory_cached"):
            if hasattr(owner, name):
                setattr(owner, name, lambda *_, **__: None)


def child_main(args):
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "cuda":
        keep_cuda_peaks()
    data_file = os.path.join(args.workdir, "pairs.jsonl")
    result = (run_plot_ds if args.child == "plot_ds" else run_trl)(args, data_file, args.workdir)
    result.setdefault("torch_threads", torch.get_num_threads())  # DeepSpeed must not have changed it
    result["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    if args.device == "cuda":
        result["peak_gpu_allocated_mib"] = torch.cuda.max_memory_allocated() / 2**20
        result["peak_gpu_reserved_mib"] = torch.cuda.max_memory_reserved() / 2**20
        result["gpu"] = torch.cuda.get_device_name()
    with open(os.path.join(args.workdir, f"result_{args.child}.json"), "w") as handle:
        json.dump(result, handle)


# ------------------------------------------------------------------------------------------ parent
def prompt_tokens(model, prompts):
    """Each prompt's token count as both sides tokenise it (no chat template, no special tokens);
    the tokenizers library alone, so that this parent process stays free of torch."""
    from tokenizers import Tokenizer

    from plot_ds.assets import resolve_model_path

    tokenizer = Tokenizer.from_file(os.path.join(resolve_model_path(model), "tokenizer.json"))
    return [len(tokenizer.encode(prompt, add_special_tokens=False).ids) for prompt in prompts]


def write_pairs(path, count, source=None, model=None, max_prompt_length=None):
    # Only string fields: both sides then see the same explicit prompt/chosen/rejected records. Only
    # the pairs the run trains on, so that a precomputed reference covers exactly those. Only pairs
    # whose prompt fits max_prompt_length: TRL drops a pair whose prompt fills max_length and has no
    # prompt limit of its own, so longer prompts would give the two sides different pairs.
    if source is None:
        from plot_ds.assets import champ_pairs

        pairs = champ_pairs()
    else:
        with open(source) as handle:
            pairs = [json.loads(line) for line in handle if line.strip()]
    for number, pair in enumerate(pairs, 1):
        missing = [k for k in ("prompt", "chosen", "rejected") if not isinstance(pair.get(k), str)]
        if missing:
            raise SystemExit(f"{source}: record {number} has no string field(s) {missing}")
    if max_prompt_length is not None:
        lengths = prompt_tokens(model, [pair["prompt"] for pair in pairs])
        pairs = [pair for pair, length in zip(pairs, lengths) if length <= max_prompt_length]
    if len(pairs) < count:
        raise SystemExit(
            f"{source or 'the built-in CHAMP pairs'}: {len(pairs)} pairs with prompts of at most "
            f"{max_prompt_length} tokens, the run needs {count} ((warmup + steps) x micro-batch); "
            "raise --max-prompt-length or lower --steps or --micro-batch"
        )
    with open(path, "w") as handle:
        for pair in pairs[:count]:
            handle.write(json.dumps({k: pair[k] for k in ("prompt", "chosen", "rejected")}) + "\n")


def run_child(side, args, workdir):
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    if args.threads:
        env.update(OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    else:
        for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            env.pop(name, None)
    if args.malloc_mmap_threshold is not None:
        env["MALLOC_MMAP_THRESHOLD_"] = str(args.malloc_mmap_threshold)
    forwarded = [
        "--steps",
        args.steps,
        "--warmup",
        args.warmup,
        "--micro-batch",
        args.micro_batch,
        "--max-length",
        args.max_length,
        "--max-prompt-length",
        args.max_prompt_length,
        "--threads",
        args.threads,
        "--reference",
        args.reference,
        "--plot-ds-args",
        args.plot_ds_args,
        "--device",
        args.device,
        "--precision",
        args.precision,
        "--model",
        args.model,
    ]
    command = [sys.executable, os.path.abspath(__file__), "--child", side, "--workdir", workdir, *map(str, forwarded)]
    log(f"running {side} ({args.warmup} + {args.steps} steps, {args.threads or 'default'} thread(s))")
    started = time.perf_counter()
    # The children's stdout goes to stderr: this process's stdout is the one JSON line.
    subprocess.run(command, env=env, stdout=sys.stderr, check=True, cwd=REPO)
    log(f"{side} done in {time.perf_counter() - started:.0f} s")
    with open(os.path.join(workdir, f"result_{side}.json")) as handle:
        return json.load(handle)


def alternating_runs(rounds, run):
    """``run(side)`` for each side ``rounds`` times, in the order plot_ds, TRL, TRL, plot_ds, ...:
    a linear drift of the machine's speed then costs both sides the same."""
    runs = {"plot_ds": [], "trl": []}
    for round_ in range(rounds):
        for side in ("plot_ds", "trl") if round_ % 2 == 0 else ("trl", "plot_ds"):
            runs[side].append(run(side))
    return runs


def pooled(runs):
    """One side's runs as one: pairs/s the median over all their measured steps, each peak the
    highest of the runs (the rest, e.g. the losses, is the same in every run: the first's)."""
    result = dict(runs[0])
    result["pairs_per_s"] = statistics.median(x for run in runs for x in run["measured_pairs_per_s"])
    for key in ("peak_rss_mib", "peak_gpu_allocated_mib", "peak_gpu_reserved_mib"):
        if key in result:
            result[key] = max(run[key] for run in runs)
    return result


def main():
    args = parse_args()
    if args.child:
        return child_main(args)
    if importlib.util.find_spec("trl") is None:
        raise SystemExit("this benchmark needs TRL: pip install trl")
    from importlib.metadata import version

    # The parent stays small (no torch): a child's ru_maxrss can start from its parent's size.
    with tempfile.TemporaryDirectory(prefix="trl_comparison.") as workdir:
        write_pairs(
            os.path.join(workdir, "pairs.jsonl"),
            (args.warmup + args.steps) * args.micro_batch,
            args.pairs,
            args.model,
            args.max_prompt_length,
        )
        runs = alternating_runs(args.rounds, lambda side: run_child(side, args, workdir))
    ours, theirs = pooled(runs["plot_ds"]), pooled(runs["trl"])
    result = {
        "benchmark": "trl_comparison",
        "device": ours.get("gpu", "cpu"),
        "model": args.model,
        "precision": args.precision,
        "pairs_per_step": args.micro_batch,
        "max_length": args.max_length,
        "max_prompt_length_plot_ds": args.max_prompt_length,
        "warmup_steps": args.warmup,
        "measured_steps": args.steps,
        "threads": args.threads,
        "reference": args.reference,
        "zero_stage_plot_ds": ours["zero_stage"],
        "torch_threads_plot_ds": ours["torch_threads"],
        "torch_threads_trl": theirs["torch_threads"],
        "mean_tokens_per_pair_plot_ds": ours["mean_tokens_per_pair"],
        "mean_tokens_per_pair_trl": theirs["mean_tokens_per_pair"],
        # Same pairs, model and optimizer: the losses should agree step by step (to float noise).
        "losses_plot_ds": [round(x, 5) for x in ours["losses"]],
        "losses_trl": [round(x, 5) for x in theirs["losses"]],
        "pairs_per_s_plot_ds": ours["pairs_per_s"],
        "pairs_per_s_trl": theirs["pairs_per_s"],
        "pairs_per_s_ratio": ours["pairs_per_s"] / theirs["pairs_per_s"],
        "rounds": args.rounds,
        "pairs_per_s_ratio_by_round": [
            o["pairs_per_s"] / t["pairs_per_s"] for o, t in zip(runs["plot_ds"], runs["trl"])
        ],
        "peak_rss_mib_plot_ds": ours["peak_rss_mib"],
        "peak_rss_mib_trl": theirs["peak_rss_mib"],
        "peak_rss_ratio": ours["peak_rss_mib"] / theirs["peak_rss_mib"],
        **(
            {
                "peak_gpu_allocated_mib_plot_ds": ours["peak_gpu_allocated_mib"],
                "peak_gpu_allocated_mib_trl": theirs["peak_gpu_allocated_mib"],
                "peak_gpu_allocated_ratio": ours["peak_gpu_allocated_mib"] / theirs["peak_gpu_allocated_mib"],
                "peak_gpu_reserved_mib_plot_ds": ours["peak_gpu_reserved_mib"],
                "peak_gpu_reserved_mib_trl": theirs["peak_gpu_reserved_mib"],
                "peak_gpu_reserved_ratio": ours["peak_gpu_reserved_mib"] / theirs["peak_gpu_reserved_mib"],
            }
            if args.device == "cuda"
            else {}
        ),
        "versions": {name: version(name) for name in ("torch", "transformers", "deepspeed", "trl")},
    }
    if args.plot_ds_args:
        result["plot_ds_args"] = args.plot_ds_args
    if args.malloc_mmap_threshold is not None:
        result["malloc_mmap_threshold"] = args.malloc_mmap_threshold
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
