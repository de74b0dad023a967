"""Each rank's memory for a run, by part and by phase of the step, before anything is loaded: from
the config (resolved as the run resolves it: precision, the DeepSpeed JSON, the head's tiling, the
reference), the model's shape and the data's lengths. ``model_states`` sizes what DeepSpeed holds,
``step_memory`` what a micro-batch holds; the phases are when they coexist."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from ..config import Config
from ..engine.engines import TILED_ABOVE_BYTES, shares_prompt
from ..forward.tiled_head import tile_positions
from .model_shape import ModelShape
from .model_states import ModelStates, ZeroSettings, frozen_weights, gathered_bytes, trained_states
from .step_memory import (
    MicroBatchShape,
    StepSettings,
    activation_bytes,
    adapted_linears,
    head_bytes,
    inference_bytes,
    plot_bytes,
)

GIB = 2**30
# Device memory outside torch's allocator on a GPU (the CUDA context, kernels, NCCL), and the
# caching allocator's fragmentation over the tensors' peak: assumptions, not measured here.
CUDA_RUNTIME_GB = 1.0
ALLOCATOR_MARGIN = 0.10


@dataclass(frozen=True)
class Machine:
    ranks: int = 1
    ranks_per_node: int = 1
    device: str = "gpu"  # gpu or cpu (on a CPU, device memory is the node's host memory)
    device_memory_gb: float | None = None  # per rank; None: unknown (nothing to fit)
    host_memory_gb: float | None = None  # per node
    runtime_gb: float = CUDA_RUNTIME_GB  # per rank, outside the tensors: CUDA context, or the CPU process

    @property
    def margin(self) -> float:
        return ALLOCATOR_MARGIN if self.device == "gpu" else 0.0


@dataclass(frozen=True)
class DataLengths:
    """Per pair: (prompt, chosen, rejected) tokens after truncation."""

    pairs: tuple[tuple[int, int, int], ...]

    @classmethod
    def stated(cls, tokens: int, prompt_tokens: int) -> "DataLengths":
        return cls(((prompt_tokens, tokens - prompt_tokens, tokens - prompt_tokens),))

    @classmethod
    def of_examples(cls, examples) -> "DataLengths":
        return cls(tuple((len(e.prompt_ids), len(e.chosen_ids), len(e.rejected_ids)) for e in examples))

    def clipped(self, max_length: int, max_prompt_length: int) -> "DataLengths":
        """As ``data.max_length`` would cut them (the prompt first, then each response)."""
        cut = []
        for prompt, chosen, rejected in self.pairs:
            prompt = min(prompt, max_prompt_length)
            cut.append((prompt, min(chosen, max_length - prompt), min(rejected, max_length - prompt)))
        return DataLengths(tuple(cut))

    def truncated_share(self, max_length: int) -> float:
        return sum(p + max(c, r) > max_length for p, c, r in self.pairs) / len(self.pairs)

    def mean_tokens(self) -> float:
        """Tokens of a pair's two rows (the prompt in each)."""
        return sum(2 * p + c + r for p, c, r in self.pairs) / len(self.pairs)

    def largest_micro_batch(self, pairs: int, shared_prompt: bool, packed: bool) -> MicroBatchShape:
        """The longest ``pairs`` pairs in one micro-batch: the step whose memory peaks."""
        longest = sorted(self.pairs, key=lambda pair: pair[0] + max(pair[1], pair[2]), reverse=True)[:pairs]
        longest = (longest * pairs)[:pairs]  # stated lengths: every pair alike
        width = max(p + max(c, r) for p, c, r in longest)
        responses = sum(c + r for _, c, r in longest)
        tokens = 2 * len(longest) * width
        if packed:  # one row of sequences: with prompt sharing each prompt once
            tokens = sum((1 if shared_prompt else 2) * p + c + r for p, c, r in longest)
        if packed or not shared_prompt:
            return MicroBatchShape(2 * len(longest), width, responses, tokens)
        prompt, response = max(p for p, _, _ in longest), max(max(c, r) for _, c, r in longest)
        shared = len(longest) * (prompt + 2 * response)
        return MicroBatchShape(2 * len(longest), width, responses, shared, prompt, response)


@dataclass(frozen=True)
class Part:
    name: str
    bytes: float
    note: str = ""


@dataclass
class MemoryPlan:
    machine: Machine
    summary: str  # the resolved settings in a few words
    parts: dict[str, Part]
    phases: dict[str, list[str]]  # each phase: the parts alive at its peak
    host_bytes: float  # per node: offloaded states (and, on a CPU, every rank)
    tokens_per_step: float
    flops_per_step: float
    settings: dict = field(default_factory=dict)

    def phase_bytes(self, phase: str) -> float:
        tensors = sum(self.parts[name].bytes for name in self.phases[phase] if name != "runtime")
        return tensors * (1 + self.machine.margin) + self.parts["runtime"].bytes

    @property
    def peak_phase(self) -> str:
        return max(self.phases, key=self.phase_bytes)

    @property
    def peak_gb(self) -> float:
        return self.phase_bytes(self.peak_phase) / GIB

    @property
    def tensor_peak_gb(self) -> float:
        """The peak of the tensors alone (no runtime, no margin): what torch's allocator counts."""
        peak = self.peak_phase
        return sum(self.parts[name].bytes for name in self.phases[peak] if name != "runtime") / GIB

    @property
    def fits(self) -> bool | None:
        """None where the machine's memory is not known."""
        verdicts = []
        if self.machine.device_memory_gb is not None:
            verdicts.append(self.peak_gb <= self.machine.device_memory_gb)
        if self.machine.host_memory_gb is not None and self.machine.device == "gpu":
            verdicts.append(self.host_bytes / GIB <= self.machine.host_memory_gb)
        return all(verdicts) if verdicts else None

    def one_line(self) -> str:
        limit = f"{self.machine.device_memory_gb or 0:g} GiB"
        verdict = {None: "", True: f", fits {limit}", False: f", DOES NOT FIT {limit}"}[self.fits]
        return (
            f"predicted peak {self.peak_gb:.2f} GiB per rank at {self.peak_phase}{verdict} "
            f"({self.summary}; {self.tokens_per_step:,.0f} tokens, {self.flops_per_step / 1e12:,.1f} TFLOP per step)"
        )

    def table(self) -> str:
        peak = self.peak_phase
        lines = [f"{'part':<28}{'GiB':>9}  notes"]
        for name in self.phases[peak]:
            part = self.parts[name]
            lines.append(f"{name:<28}{part.bytes / GIB:>9.3f}  {part.note}")
        if self.machine.margin:
            tensors = sum(self.parts[n].bytes for n in self.phases[peak] if n != "runtime")
            lines.append(f"{'allocator margin':<28}{tensors * self.machine.margin / GIB:>9.3f}  assumed")
        lines.append(f"{'peak: ' + peak:<28}{self.peak_gb:>9.3f}")
        for phase in self.phases:
            lines.append(f"  phase {phase:<40}{self.phase_bytes(phase) / GIB:>9.3f} GiB")
        if self.host_bytes:
            lines.append(f"host memory per node (offloaded states): {self.host_bytes / GIB:.2f} GiB")
        return "\n".join(lines)


def resolved_precision(config: Config, machine: Machine) -> str:
    """train.precision as the run resolves it on that machine (ds_config.resolve_precision)."""
    if config.train.precision != "auto":
        return config.train.precision
    return "bf16" if machine.device == "gpu" else "fp32"


def plan_ds_config(config: Config, shape: ModelShape, machine: Machine, precision: str) -> dict:
    """The DeepSpeed config the run would fill (``ds_config``'s own functions)."""
    from ..engine.ds_config import fill_ds_config, find_ds_config

    template = json.loads(find_ds_config(config.deepspeed.config_for(machine.ranks, precision)).read_text())
    return fill_ds_config(template, config.train, machine.ranks, shape.hidden_size, precision)


def step_settings(config: Config, shape: ModelShape, zero: ZeroSettings, positions: int, device: str) -> StepSettings:
    b, plot, adapter = zero.element_size, config.plot, config.adapter
    tiled = config.model.tiled_head is True or (
        config.model.tiled_head == "auto" and positions > TILED_ABOVE_BYTES // (shape.vocab_size * b)
    )
    top_k = plot.top_k if 0 < plot.top_k < shape.vocab_size else shape.vocab_size
    return StepSettings(
        element_size=b,
        gradient_checkpointing=config.model.gradient_checkpointing,
        tiled_mlp=config.model.tiled_mlp,
        tiled_head=tiled and shape.why_head_not_tiled is None,
        tile_positions=tile_positions(shape.vocab_size),
        eager_attention=config.model.attn_implementation == "eager",
        sequence=config.parallel.sequence,
        lora_rank=adapter.rank if adapter.active else 0,
        lora_dropout=adapter.dropout,
        lora_targets=None if adapter.target_modules == "all-linear" else tuple(adapter.target_modules),
        linear_keeps_inputs=zero.stage == 3,
        plot_active=plot.active,
        plot_support=top_k + 1 if top_k < shape.vocab_size else top_k,
        plot_closed_form=plot.resolved_solver("cpu" if device == "cpu" else "cuda") == "closed_form",
        reference_logits=plot.active and plot.target == "ref_mix",
    )


def trained_and_frozen(config: Config, shape: ModelShape) -> tuple[list[int], list[int]]:
    """Element counts of the trained parameters and of the frozen ones (LoRA's base)."""
    if not config.adapter.active:
        return list(shape.parameter_sizes), []
    rank, adapters = config.adapter.rank, []
    targets = None if config.adapter.target_modules == "all-linear" else tuple(config.adapter.target_modules)
    for linear in adapted_linears(shape, targets):
        adapters += [rank * linear.in_features, linear.out_features * rank]
    return adapters, list(shape.parameter_sizes)


def reference_kind(config: Config) -> str:
    """none, cache, base (LoRA's own base, adapters off), engine or offloaded (a frozen engine's
    partitions in host memory)."""
    needed = config.objective.needs_reference or (config.plot.active and config.plot.target == "ref_mix")
    if not needed or config.reference.mode == "none":
        return "none"
    if config.adapter.active and config.reference.name_or_path is None:
        return "base"
    if config.reference.mode == "cache":
        return "cache"
    return "offloaded" if config.reference.offload else "engine"


REFERENCE_NOTES = {
    "none": "none needed",
    "cache": "log-probs cached before training",
    "base": "the policy's base with its adapters off",
    "offloaded": "frozen engine, partitions in host memory",
}


def reference_weights(shape: ModelShape, zero: ZeroSettings) -> float:
    """A frozen engine's weights: a ZeRO-3 partition beside a ZeRO-3 policy, else a whole copy."""
    stage = 3 if zero.stage == 3 else 0
    return frozen_weights(list(shape.parameter_sizes), ZeroSettings(**{**zero.__dict__, "stage": stage}))


def step_flops(config: Config, shape: ModelShape, lengths: DataLengths, reference_forward: bool) -> float:
    """Multiply-adds x 2 of one optimizer step over all ranks: the layers and attention per token,
    the head per response position; the backward twice the forward (once with frozen weights)."""
    mean_p = sum(p for p, _, _ in lengths.pairs) / len(lengths.pairs)
    mean_r = sum(c + r for _, c, r in lengths.pairs) / len(lengths.pairs)
    row = mean_p + mean_r / 2
    body = shape.parameters - shape.embedding_parameters
    per_pair = (
        2 * (2 * row * body + 2 * shape.layers * shape.query_width * row * row)
        + 2 * mean_r * shape.vocab_size * shape.hidden_size
    )
    passes = (2 if config.adapter.active else 3) + config.model.gradient_checkpointing + reference_forward
    dp = config.train.micro_batch_size * config.train.gradient_accumulation_steps
    return per_pair * passes * dp


def plan_memory(
    config: Config, shape: ModelShape, machine: Machine, lengths: DataLengths, ds_config: dict | None = None
) -> MemoryPlan:
    """The plan of ``config`` on ``machine`` for data of ``lengths``; ``ds_config``: the filled
    DeepSpeed config where the run has resolved it already."""
    precision = resolved_precision(config, machine)
    if ds_config is not None:
        precision = "bf16" if ds_config["bf16"]["enabled"] else "fp16" if ds_config["fp16"]["enabled"] else "fp32"
    ds_config = ds_config or plan_ds_config(config, shape, machine, precision)
    zero = ZeroSettings.from_ds_config(ds_config, machine.ranks)
    packed = config.data.packing and config.parallel.sequence == 1
    # As the policy's engine decides it (no key/value cache to share under checkpointing).
    shared = shares_prompt(config, ds_config, machine.ranks) and not config.model.gradient_checkpointing
    batch = lengths.largest_micro_batch(config.train.micro_batch_size, shared, packed)
    if config.parallel.sequence > 1:
        batch = batch.per_rank(config.parallel.sequence)
    settings = step_settings(config, shape, zero, batch.response_positions, machine.device)
    states = trained_states(*trained_and_frozen(config, shape), zero)
    reference = reference_kind(config)
    parts = model_parts(states, zero, shape) + step_parts(
        shape, settings, batch, reference != "none" and reference != "cache"
    )
    weights = reference_weights(shape, zero) if reference == "engine" else 0.0
    parts.append(Part("reference", weights, REFERENCE_NOTES.get(reference, "frozen engine")))
    if reference == "cache":  # before training, a reference engine beside the policy computes the cache
        cache_pass = reference_weights(shape, zero) + inference_bytes(shape, settings, batch)
        parts.append(Part("cache pass", cache_pass, "the reference engine and its forward, before training"))
    runtime = "CUDA context (assumed)" if machine.device == "gpu" else "this process before its weights"
    parts.append(Part("runtime", machine.runtime_gb * GIB, runtime))
    host = states.host + (reference_weights(shape, zero) if reference == "offloaded" else 0.0)
    summary = (
        f"{precision}, ZeRO-{zero.stage}{' offload' if zero.offload_optimizer else ''}, {machine.ranks} rank(s)"
        f"{f', sequence {settings.sequence}' if settings.sequence > 1 else ''}, micro-batch "
        f"{config.train.micro_batch_size} x {batch.width} tokens"
    )
    data_ranks = machine.ranks // config.parallel.sequence
    pairs = config.train.micro_batch_size * config.train.gradient_accumulation_steps * data_ranks
    return MemoryPlan(
        machine,
        summary,
        {part.name: part for part in parts},
        step_phases(zero.stage == 3 or config.train.gradient_accumulation_steps > 1, reference == "cache"),
        host * machine.ranks_per_node,
        pairs * lengths.mean_tokens(),
        step_flops(config, shape, lengths, reference in ("engine", "offloaded", "base")) * data_ranks,
        {"precision": precision, "zero_stage": zero.stage, "tiled_head": settings.tiled_head, "micro_batch": batch},
    )


def step_parts(shape: ModelShape, settings: StepSettings, batch: MicroBatchShape, live_reference: bool) -> list[Part]:
    """What one micro-batch holds: kept for the backward, and the transients of its phases."""
    kept, layer_backward = activation_bytes(shape, settings, batch)
    head_kept, head_backward = head_bytes(shape, settings, batch.response_positions)
    plot = plot_bytes(shape, settings, batch.response_positions)
    tiled = settings.tiled_head
    return [
        Part("activations", kept, activation_note(settings, batch)),
        Part("head and PLOT", head_kept + plot, head_note(settings)),
        Part("head backward", head_backward, "float32 weight gradient and a tile" if tiled else "float32 chunk"),
        Part("layer backward", layer_backward, "recomputed" if settings.gradient_checkpointing else "its gradients"),
        Part("reference forward", inference_bytes(shape, settings, batch) if live_reference else 0.0, "no gradients"),
    ]


def step_phases(gradients_early: bool, cache_pass: bool = False) -> dict[str, list[str]]:
    """The parts alive at each phase's peak. ZeRO-2 allocates its gradient buffer at a backward's
    first reduction and frees it at the step (``gradients_early`` false); accumulation keeps it from
    one micro-batch to the next, and ZeRO-3's lives all run. ``cache_pass``: the reference cache's
    pass before training (the optimizer's master copy exists by then; its moments do not)."""
    held = ["parameters", "optimizer state", "buffers", "reference"]
    early = held + ["gradients"] * gradients_early
    phases = {
        "the head's backward": early + ["gathered parameters", "activations", "head and PLOT", "head backward"],
        "a layer's backward": held + ["gradients", "gathered parameters", "activations", "layer backward"],
        "the reference's forward": early + ["gathered parameters", "reference forward"],
        "the optimizer step": held + ["gradients", "optimizer step"],
    }
    if cache_pass:
        phases["the reference cache pass"] = early + ["cache pass"]
    return {name: parts + ["runtime"] for name, parts in phases.items()}


def model_parts(states: ModelStates, zero: ZeroSettings, shape: ModelShape) -> list[Part]:
    where = "partition" if zero.stage == 3 else "whole"
    head = shape.vocab_size * shape.hidden_size
    return [
        Part("parameters", states.parameters, f"{where}{', offloaded' if zero.offload_param else ''}"),
        Part("gradients", states.gradients, "partition" if zero.stage else "whole"),
        Part(
            "optimizer state",
            states.optimizer,
            "float32 master and Adam moments" + (" (offloaded)" if zero.offload_optimizer else ""),
        ),
        Part("buffers", states.buckets, "reduce buckets"),
        Part(
            "gathered parameters",
            gathered_bytes(shape.layer_parameters, head, shape.layers, zero),
            "the head's gradient; under ZeRO-3 what is gathered or kept for reuse",
        ),
        Part("optimizer step", states.step_transient, "the flat gradient in float32"),
    ]


def activation_note(settings: StepSettings, batch: MicroBatchShape) -> str:
    what = "layer inputs (checkpointing)" if settings.gradient_checkpointing else "saved by every layer"
    return f"{what}, {batch.tokens:,} positions"


def head_note(settings: StepSettings) -> str:
    head = "tiled head" if settings.tiled_head else "[N, V] logits"
    return head + (f", PLOT support {settings.plot_support}" if settings.plot_active else "")
