"""``plot-plan``: what each rank of a run will need, before it is launched."""

from __future__ import annotations

import argparse
import json
import sys

from ..config import ConfigError, load_config, parse_overrides
from ..errors import user_errors

USAGE = """plot-plan [--config FILE.yaml] [--section.key VALUE ...] [--ranks N] [--gpus-per-node N]
                 [--gpu-memory-gb G] [--host-memory-gb H] [--cpu] [--tokens L [--prompt-tokens P]] [--json]

Predicts each rank's memory for the run that plot-train would make of the same config and
overrides, on the machine described: by part (parameters, gradients, optimizer state, the
reference, activations, the head and PLOT, gathered parameters, buffers, the runtime and the
allocator's margin), at the phase of the step where it peaks; whether it fits; where it does not,
the settings that make it fit, nearest first; and the tokens and FLOPs of one step. It reads the
model's config.json only (no weights) and the data's lengths (tokenised as plot-train does), or
--tokens per pair (a prompt of --prompt-tokens, default a quarter, and two responses).
Exit status 0 when it fits (or no memory is known), 1 when it does not, 2 on bad input."""


def parse_args(argv: list[str]):
    parser = argparse.ArgumentParser(prog="plot-plan", usage=USAGE)
    parser.add_argument("--config", default=None)
    parser.add_argument("--ranks", type=int, default=1, help="ranks in all (GPUs, or processes on CPUs)")
    parser.add_argument("--gpus-per-node", type=int, default=None, help="ranks per node (default: min(ranks, 8))")
    parser.add_argument("--gpu-memory-gb", type=float, default=80.0, help="memory per GPU, GiB")
    parser.add_argument("--host-memory-gb", type=float, default=None, help="host memory per node, GiB")
    parser.add_argument("--cpu", action="store_true", help="ranks are CPU processes (fp32 under precision auto)")
    parser.add_argument("--tokens", type=int, default=None, help="tokens per pair's row instead of the data's")
    parser.add_argument("--prompt-tokens", type=int, default=None)
    parser.add_argument("--json", action="store_true", help="one JSON object instead of the table")
    known, rest = parser.parse_known_args(argv)
    return known, load_config(known.config, parse_overrides(rest))


def machine_of(args, config):
    from .check import resident_after_imports
    from .memory_plan import Machine

    for name in ("ranks", "gpus_per_node"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')}: must be >= 1 (got {getattr(args, name)})")
    for name in ("gpu_memory_gb", "host_memory_gb"):
        if getattr(args, name) is not None and getattr(args, name) <= 0:
            raise ConfigError(f"--{name.replace('_', '-')}: must be > 0 GiB (got {getattr(args, name)})")
    per_node = args.gpus_per_node or min(args.ranks, 8)
    if args.cpu:
        import deepspeed  # noqa: F401  (the libraries a rank holds before its weights)

        memory = args.host_memory_gb / per_node if args.host_memory_gb else None
        return Machine(args.ranks, per_node, "cpu", memory, args.host_memory_gb, resident_after_imports(config))
    return Machine(args.ranks, per_node, "gpu", args.gpu_memory_gb, args.host_memory_gb)


def lengths_of(args, config):
    """Stated lengths, or the training data's as plot-train would tokenise them."""
    from .memory_plan import DataLengths

    if args.tokens is not None:
        if args.tokens < 2:
            raise ConfigError(f"--tokens: must be >= 2 (got {args.tokens})")
        prompt = args.prompt_tokens if args.prompt_tokens is not None else args.tokens // 4
        if not 0 < prompt < args.tokens:
            raise ConfigError(f"--prompt-tokens: must be between 1 and --tokens - 1 ({args.tokens - 1}); got {prompt}")
        return DataLengths.stated(args.tokens, prompt), None
    from ..data import prepare_datasets
    from ..engine.models import load_tokenizer

    train, _, reports = prepare_datasets(config.data, load_tokenizer(config))
    return DataLengths.of_examples(train), reports[0]


@user_errors("plot-plan")
def main(argv: list[str] | None = None) -> int:
    from .fixes import least_memory, nearest_fixes
    from .memory_plan import plan_memory
    from .model_shape import read_model_shape

    args, config = parse_args(sys.argv[1:] if argv is None else argv)
    if args.ranks % config.parallel.sequence:
        raise ConfigError(
            f"parallel.sequence {config.parallel.sequence}: --ranks {args.ranks} do not split into such groups"
        )
    machine = machine_of(args, config)
    shape = read_model_shape(config.model.name_or_path, config.model.revision, config.model.trust_remote_code)
    lengths, report = lengths_of(args, config)
    plan = plan_memory(config, shape, machine, lengths)
    fixes = nearest_fixes(config, shape, machine, lengths) if plan.fits is False else []
    least = least_memory(config, shape, machine, lengths) if plan.fits is False and not fixes else None
    if args.json:
        print(json.dumps(plan_record(plan, fixes, shape)))
    else:
        print(describe(plan, fixes, shape, report, config, least))
    return 1 if plan.fits is False else 0


def plan_record(plan, fixes, shape) -> dict:
    return {
        "model": shape.model_type,
        "parameters": shape.parameters,
        "summary": plan.summary,
        "peak_gb": plan.peak_gb,
        "peak_phase": plan.peak_phase,
        "fits": plan.fits,
        "parts_gb": {name: plan.parts[name].bytes / 2**30 for name in plan.phases[plan.peak_phase]},
        "phases_gb": {phase: plan.phase_bytes(phase) / 2**30 for phase in plan.phases},
        "host_gb_per_node": plan.host_bytes / 2**30,
        "tokens_per_step": plan.tokens_per_step,
        "flops_per_step": plan.flops_per_step,
        "fixes": [{"overrides": fix.overrides, "peak_gb": fix.plan.peak_gb, "note": fix.note} for fix in fixes],
    }


def describe(plan, fixes, shape, report, config, least=None) -> str:
    machine = plan.machine
    memory = f"{machine.device_memory_gb:g} GiB" if machine.device_memory_gb else "memory not stated"
    lines = [
        f"model: {config.model.name_or_path} ({shape.model_type}, {shape.parameters / 1e9:.3g}B parameters, "
        f"{shape.layers} layers, vocabulary {shape.vocab_size:,})",
        f"machine: {machine.ranks} {machine.device.upper()} rank(s), {machine.ranks_per_node} per node, {memory} each",
        f"run: {plan.summary}",
    ]
    if report is not None:
        lines.append(f"data: {report.describe()}")
    lines += ["", plan.table(), ""]
    verdict = {None: "no memory stated: nothing to fit", True: "fits", False: "DOES NOT FIT"}[plan.fits]
    lines.append(f"verdict: {verdict}")
    if plan.fits is False:
        if fixes:
            lines.append("nearest fixes:")
        else:
            least = f"the least any setting plot-plan knows needs is {least.describe()}; " if least else ""
            lines.append(
                f"{machine.ranks} rank(s) of {machine.device_memory_gb:g} GiB cannot hold this model and run "
                f"at all: {least}use more ranks or larger devices"
            )
        lines += [f"  {fix.describe()}" for fix in fixes]
    lines.append(
        f"per optimizer step: {plan.tokens_per_step:,.0f} tokens, {plan.flops_per_step:.3g} FLOPs "
        "(divide by your devices' sustained FLOP/s for a time)"
    )
    return "\n".join(lines)
