"""What DeepSpeed holds per rank for a model's parameters, gradients and optimizer, as DeepSpeed 0.19
allocates them (read from its stage_1_and_2.py, stage3.py and partition_parameters.py; the layout
is in docs/planning.md) with plot_ds's patches (engine/deepspeed_patches.py). torch's fused AdamW
keeps two float32 moments per trained element; the float32 master partition is a copy but for
float32 weights under ZeRO-3 (``keep_one_fp32_copy``)."""

from __future__ import annotations

from dataclasses import dataclass

FLOAT32 = 4


@dataclass(frozen=True)
class ZeroSettings:
    """The parts of a filled DeepSpeed config that size memory."""

    stage: int
    ranks: int  # ZeRO shards over every rank
    element_size: int  # the model's dtype: 2 (bf16, fp16) or 4 (fp32)
    reduce_bucket: int  # elements
    prefetch_bucket: int  # elements (ZeRO-3)
    persistence_threshold: int  # elements: smaller parameters are held whole on every rank (ZeRO-3)
    reuse_distance: int  # elements: a gathered parameter used again within this many stays gathered
    offload_optimizer: bool
    offload_param: bool

    @classmethod
    def from_ds_config(cls, ds_config: dict, ranks: int) -> "ZeroSettings":
        zero = ds_config.get("zero_optimization", {})
        bf16 = ds_config.get("bf16", {}).get("enabled") is True
        fp16 = ds_config.get("fp16", {}).get("enabled") is True
        offload = lambda key: (zero.get(key) or {}).get("device", "none") not in ("none", None)  # noqa: E731
        return cls(
            stage=int(zero.get("stage", 0)),
            ranks=ranks,
            element_size=2 if bf16 or fp16 else 4,
            reduce_bucket=int(float(zero.get("reduce_bucket_size", 5e8))),
            prefetch_bucket=int(float(zero.get("stage3_prefetch_bucket_size", 5e7))),
            persistence_threshold=int(float(zero.get("stage3_param_persistence_threshold", 1e5))),
            reuse_distance=int(float(zero.get("stage3_max_reuse_distance", 1e9))),
            offload_optimizer=offload("offload_optimizer"),
            offload_param=offload("offload_param"),
        )


@dataclass(frozen=True)
class ModelStates:
    """Bytes per rank. ``*_host``: what offload keeps in host memory instead."""

    parameters: float  # the model's weights as this rank holds them (partitions, persistent ones whole)
    gradients: float  # the gradient partition (ZeRO-3) or the contiguous gradient buffer (ZeRO-2)
    optimizer: float  # float32 master partition and Adam's two moments
    buckets: float  # reduce buckets (held all run under ZeRO-3, during the backward under ZeRO-2)
    step_transient: float  # the flat gradient and its float32 copy while the optimizer steps
    host: float  # offloaded partitions, in host memory


def partition(numel: int, ranks: int) -> int:
    return -(-numel // ranks)


def trained_states(trained: list[int], frozen: list[int], zero: ZeroSettings) -> ModelStates:
    """The policy: ``trained`` and ``frozen`` parameter sizes (frozen: LoRA's base)."""
    b, ranks = zero.element_size, zero.ranks
    master = FLOAT32
    if zero.stage == 3:
        mine = sum(partition(n, ranks) for n in trained)
        weights = frozen_weights(trained + frozen, zero)
        # The flat gradient and its float32 copy per sub-group. With float32 weights on the device,
        # deepspeed_patches makes the partition its own master and hands the gradients over as views.
        step = mine * (b + FLOAT32)
        if b == FLOAT32 and not zero.offload_optimizer:
            step, master = 0, 0
        grads, buckets = mine * b, zero.reduce_bucket * b
    else:
        elements = sum(trained)
        mine = partition(partition(elements, 2 * ranks) * 2 * ranks, ranks)
        weights = (elements + sum(frozen)) * b
        step = mine * (b + FLOAT32) if b != FLOAT32 else mine * FLOAT32
        # overlap_comm's two buckets and the flattened copy of one being reduced.
        grads, buckets = mine * b, 3 * zero.reduce_bucket * b
    optimizer = mine * (2 * FLOAT32 + master)
    host = 0.0
    if zero.offload_optimizer:
        host += optimizer + mine * (b + FLOAT32)
        optimizer, grads, step = 0.0, 0.0, 0.0
    if zero.offload_param and zero.stage == 3:
        persistent = sum(n for n in trained + frozen if n <= zero.persistence_threshold) * b
        host += weights - persistent
        weights = persistent
    return ModelStates(weights, grads, optimizer, buckets, step, host)


def frozen_weights(sizes: list[int], zero: ZeroSettings) -> float:
    """The weights of a model no optimizer trains (the reference engine), or the policy's under
    ZeRO-3: each parameter's partition, and the small ones whole as well (ZeRO-3 keeps those
    gathered); a whole copy below ZeRO-3."""
    b = zero.element_size
    if zero.stage != 3:
        return sum(sizes) * b
    partitions = sum(partition(n, zero.ranks) for n in sizes)
    persistent = sum(n for n in sizes if n <= zero.persistence_threshold)
    return (partitions + persistent) * b


def gathered_bytes(layer_elements: int, head_elements: int, layers: int, zero: ZeroSettings) -> float:
    """Parameters held gathered at the head's backward, beyond the partitions. Always the head's
    whole gradient (larger than a bucket, it keeps its own tensor until reduced). Under ZeRO-3 on
    more than one rank also the layer being run and the one prefetched, and what ZeRO-3 does not
    release because the trace of the last step uses it again within ``stage3_max_reuse_distance``
    elements (partitioned_param_coordinator's __params_to_release): the head, and layer i from the
    end once 2 i layers and the head fit in that distance. On one rank the partitions are whole."""
    b = zero.element_size
    if zero.stage != 3 or zero.ranks == 1:
        return head_elements * b
    kept_layers = (
        0 if head_elements >= zero.reuse_distance else -(-(zero.reuse_distance - head_elements) // (2 * layer_elements))
    )
    kept = min(kept_layers, layers) * layer_elements + (head_elements if head_elements < zero.reuse_distance else 0)
    prefetched = min(layer_elements, zero.prefetch_bucket)
    return (head_elements + max(kept, layer_elements + prefetched + head_elements)) * b
