"""DeepSpeed glue: the filled DeepSpeed config, ZeRO-3-partitioned model loading, and the policy
and frozen reference engines. The training loop sees only the engines this module returns.
"""
from __future__ import annotations

import copy
import functools
import json
import math
import warnings
from pathlib import Path

import torch

from .assets import resolve_model_path
from .checkpointing import checkpoint_ds_config
from .logprobs import enable_prompt_sharing
from .config import Config, ConfigError, TrainConfig

REPO_ROOT = Path(__file__).resolve().parent.parent


# ------------------------------------------------------------------------------ DeepSpeed config
def find_ds_config(path: str) -> Path:
    candidate = Path(path)
    for option in (candidate, REPO_ROOT / candidate):
        if option.is_file():
            return option
    raise ConfigError(f"deepspeed.config: {path} not found (looked in the working directory and "
                      f"in {REPO_ROOT})")


def resolve_precision(precision: str) -> str:
    from deepspeed.accelerator import get_accelerator

    if precision != "auto":
        return precision
    accelerator = get_accelerator()
    # bf16 matmuls on CPUs without AMX are slower than fp32; on GPUs bf16 is the norm.
    if accelerator.device_name() != "cpu" and accelerator.is_bf16_supported():
        return "bf16"
    return "fp32"


def _fill(section: dict, key: str, value, where: str) -> None:
    """Set an "auto" field; a value written in the JSON must agree with the training config."""
    current = section.get(key, "auto")
    if current == "auto":
        section[key] = value
    elif current != value and not (isinstance(value, float) and isinstance(current, (int, float))
                                   and math.isclose(current, value)):
        raise ConfigError(f"{where}.{key} is {current!r} in the DeepSpeed config but the training "
                          f"config gives {value!r}: set it to \"auto\" or make them agree")


# ZeRO sizes that scale with the model, as Hugging Face's integration sets them: buckets of one
# hidden x hidden matrix, parameters below ten hidden vectors kept whole. Fixed 5e7-element buckets
# would cost a small model more memory than its layers.
MODEL_SIZED_ZERO = {"reduce_bucket_size": lambda h: h * h, "stage3_prefetch_bucket_size": lambda h: int(0.9 * h * h),
                    "stage3_param_persistence_threshold": lambda h: 10 * h}


def fill_ds_config(template: dict, train: TrainConfig, world_size: int, hidden_size: int | None = None) -> dict:
    ds = copy.deepcopy(template)
    zero = ds.get("zero_optimization", {})
    for key, size in MODEL_SIZED_ZERO.items():
        if zero.get(key) == "auto" and hidden_size is not None:
            zero[key] = size(hidden_size)
    precision = resolve_precision(train.precision)
    _fill(ds, "train_micro_batch_size_per_gpu", train.micro_batch_size, "ds")
    _fill(ds, "gradient_accumulation_steps", train.gradient_accumulation_steps, "ds")
    _fill(ds, "train_batch_size",
          train.micro_batch_size * train.gradient_accumulation_steps * world_size, "ds")
    _fill(ds, "gradient_clipping", float(train.max_grad_norm), "ds")
    for name in ("bf16", "fp16"):
        _fill(ds.setdefault(name, {}), "enabled", precision == name, f"ds.{name}")
    optimizer = ds.get("optimizer")
    if optimizer is not None:
        params = optimizer.setdefault("params", {})
        _fill(params, "lr", float(train.lr), "ds.optimizer.params")
        _fill(params, "betas", list(train.adam_betas), "ds.optimizer.params")
        _fill(params, "eps", float(train.adam_eps), "ds.optimizer.params")
        _fill(params, "weight_decay", float(train.weight_decay), "ds.optimizer.params")
    leftover = [k for k, v in _walk(ds) if v == "auto"]
    if leftover:
        raise ConfigError(f"DeepSpeed config: no value known for {', '.join(leftover)}; "
                          f"write a value instead of \"auto\"")
    return ds


def _walk(tree: dict, prefix: str = ""):
    for key, value in tree.items():
        if isinstance(value, dict):
            yield from _walk(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def load_ds_config(config: Config, world_size: int) -> dict:
    path = find_ds_config(config.deepspeed.config_for(world_size, resolve_precision(config.train.precision)))
    try:
        template = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(f"{path}: not valid JSON at line {err.lineno} ({err.msg})") from None
    hidden_size = None
    if any(template.get("zero_optimization", {}).get(key) == "auto" for key in MODEL_SIZED_ZERO):
        from transformers import AutoConfig
        model_config = AutoConfig.from_pretrained(resolve_model_path(config.model.name_or_path),
                                                  trust_remote_code=config.model.trust_remote_code)
        hidden_size = getattr(model_config.get_text_config(), "hidden_size", None)
    return fill_ds_config(template, config.train, world_size, hidden_size)


def choose_ds_config(config: Config, world_size: int, resume_from: Path | None) -> str:
    """deepspeed.config as this run uses it: auto follows the checkpoint being resumed (its ZeRO
    stage fixes how its optimizer state is laid out), else ranks and precision (config_for)."""
    if config.deepspeed.config == "auto" and resume_from is not None:
        written = checkpoint_ds_config(resume_from)
        if written is not None:
            return written
    return config.deepspeed.config_for(world_size, resolve_precision(config.train.precision))


def zero_stage(ds_config: dict) -> int:
    return int(ds_config.get("zero_optimization", {}).get("stage", 0))


def shares_prompt(config: Config, ds_config: dict) -> bool:
    """``model.share_prompt`` for an engine of ``ds_config``. ``auto`` shares the prompt unless
    ZeRO-3 fetches the parameters from other ranks or from host memory: each of the three passes
    would fetch them again, and its backward reduce-scatter the gradients again (2 ranks: 3.2x the
    all-gathers and 3.0x the reduce-scatters per step, docs/benchmarks.md). On one rank without
    offload those are local copies, and sharing saves compute."""
    if config.model.share_prompt != "auto":
        return config.model.share_prompt
    if zero_stage(ds_config) != 3:
        return True
    import deepspeed.comm as dist

    offload = ds_config["zero_optimization"].get("offload_param") or {}
    ranks = dist.get_world_size() if dist.is_initialized() else 1
    return ranks == 1 and offload.get("device", "none") in ("none", None)


def reference_ds_config(policy_ds: dict, offload: bool) -> dict:
    """Same sharding and precision as the policy, no optimizer; stage 0 unless ZeRO-3, since
    ZeRO-1/2 only shard optimizer state, which a frozen model does not have."""
    stage = 3 if zero_stage(policy_ds) == 3 else 0
    zero = {"stage": stage}
    if stage == 3:
        keep = ("stage3_param_persistence_threshold", "stage3_prefetch_bucket_size",
                "stage3_max_live_parameters", "stage3_max_reuse_distance")
        zero.update({k: v for k, v in policy_ds["zero_optimization"].items() if k in keep})
        if offload:
            zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    elif offload:
        raise ConfigError("reference.offload needs ZeRO-3 (ds_configs/zero3*.json)")
    return {
        "train_micro_batch_size_per_gpu": policy_ds["train_micro_batch_size_per_gpu"],
        "gradient_accumulation_steps": policy_ds["gradient_accumulation_steps"],
        "train_batch_size": policy_ds["train_batch_size"],
        "bf16": {"enabled": policy_ds["bf16"]["enabled"]},
        "fp16": {"enabled": policy_ds["fp16"]["enabled"]},
        "zero_optimization": zero,
        "steps_per_print": policy_ds.get("steps_per_print", 1000000),
        "wall_clock_breakdown": False,
    }


def model_dtype(ds_config: dict) -> torch.dtype:
    if ds_config["bf16"]["enabled"]:
        return torch.bfloat16
    if ds_config["fp16"]["enabled"]:
        return torch.float16
    return torch.float32


# ------------------------------------------------------------------------------------- models
def load_tokenizer(config: Config):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(config.model.name_or_path),
                                              revision=config.model.revision,
                                              trust_remote_code=config.model.trust_remote_code)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(config: Config, ds_config: dict, name_or_path: str | None = None):
    """Load the causal LM so that ZeRO-3 partitions each tensor as it is loaded.

    ``HfDeepSpeedConfig`` makes ``from_pretrained`` construct the model under ``zero.Init``; it is
    held by the model because transformers consults it later (generation needs synced ranks).
    """
    from transformers import AutoModelForCausalLM
    from transformers.integrations import HfDeepSpeedConfig

    hf_ds_config = HfDeepSpeedConfig(ds_config) if zero_stage(ds_config) == 3 else None
    model = AutoModelForCausalLM.from_pretrained(
        resolve_model_path(name_or_path or config.model.name_or_path),
        revision=config.model.revision,
        trust_remote_code=config.model.trust_remote_code,
        dtype=model_dtype(ds_config),
        attn_implementation=config.model.attn_implementation,
    )
    model._plot_ds_hf_ds_config = hf_ds_config
    model.config.use_cache = False
    if hf_ds_config is not None:
        mark_zero3_leaf_modules(model, config.deepspeed)
    return model


def mark_zero3_leaf_modules(model, settings) -> list[str]:
    """Flag whole decoder layers as ZeRO-3 leaf modules (deepspeed.zero3_leaf_modules).

    DeepSpeed hooks every submodule to gather its parameters before it runs and release them after;
    on a Llama layer that is ~13 modules per layer and pass, and on a GPU a step of a small model
    is then bound by those hooks' host time, not by the kernels (docs/benchmarks.md). A leaf module
    gathers all its parameters at once, as FSDP does per wrapped layer: one layer's weights live at a
    time instead of one linear's. Returns the marked class names.
    """
    from deepspeed.utils import set_z3_leaf_modules

    classes = settings.leaf_module_classes(model)
    if not classes:
        if settings.zero3_leaf_modules == "auto":
            warnings.warn(f"deepspeed.zero3_leaf_modules auto: {type(model).__name__} names no decoder layer "
                          "class (_no_split_modules); ZeRO-3 hooks every submodule. Name the layer class to "
                          "gather a layer at a time.", stacklevel=2)
        return []
    present = {type(module).__name__ for module in model.modules()}
    missing = [name for name in classes if name not in present]
    if missing:
        raise ConfigError(f"deepspeed.zero3_leaf_modules: no module of class {', '.join(missing)} in "
                          f"{type(model).__name__}; its module classes are {', '.join(sorted(present))}. "
                          "Use auto, none or names from that list.")
    set_z3_leaf_modules(model, classes)
    return classes


# ------------------------------------------------------------------------------------ engines
def param_groups(model, weight_decay: float) -> list[dict]:
    """No weight decay on biases and norm weights (1-D tensors, judged by their unpartitioned
    shape since ZeRO-3 leaves an empty placeholder behind)."""
    decay, no_decay = [], []
    for param in model.parameters():
        if not param.requires_grad:
            continue
        shape = getattr(param, "ds_shape", param.shape)
        (decay if len(shape) >= 2 else no_decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def warmup_cosine(train: TrainConfig):
    """Multiplier of the peak lr at each optimizer step: linear warmup, cosine to min_lr_ratio."""
    def factor(step: int) -> float:
        if step < train.warmup_steps:
            return (step + 1) / (train.warmup_steps + 1)
        progress = (step - train.warmup_steps) / max(1, train.max_steps - train.warmup_steps)
        cosine = 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
        return train.min_lr_ratio + (1.0 - train.min_lr_ratio) * cosine
    return factor


def keep_one_fp32_copy() -> None:
    """Make DeepSpeed's ZeRO-3 reuse an fp32 partition as its fp32 master weights.

    DeepSpeed 0.19 means to (stage3.py, ``_create_fp32_partitions``) but compares the partition's
    ``torch.device`` with the accelerator's device-name string, which is never equal, so fp32
    training keeps a second full copy of every partition. Comparing devices as devices removes it;
    bf16/fp16 partitions and offloaded optimizers take DeepSpeed's own branches unchanged.
    """
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3 as Stage3

    original = Stage3._create_fp32_partitions
    if getattr(original, "plot_ds_keeps_one_copy", False):
        return

    @functools.wraps(original)
    def create_fp32_partitions(self):
        name = self.device
        if not self.offload_optimizer and isinstance(name, str):
            self.device = torch.device(name)
        try:
            return original(self)
        finally:
            self.device = name

    create_fp32_partitions.plot_ds_keeps_one_copy = True
    Stage3._create_fp32_partitions = create_fp32_partitions


def contiguous_span(tensors: list[torch.Tensor]) -> torch.Tensor | None:
    """One flat view over tensors that lie back to back in one storage, in order; else None."""
    if not tensors:
        return None
    first = tensors[0]
    storage, end = first.untyped_storage().data_ptr(), first.data_ptr()
    for tensor in tensors:
        if (tensor.dtype != first.dtype or not tensor.is_contiguous() or tensor.data_ptr() != end
                or tensor.untyped_storage().data_ptr() != storage):
            return None
        end += tensor.numel() * tensor.element_size()
    return first.as_strided((sum(t.numel() for t in tensors),), (1,))


def hand_over_gradients_as_views() -> None:
    """Give ZeRO-3's optimizer its gradient partition as a view of DeepSpeed's gradient buffer.

    DeepSpeed 0.19 (stage3.py, ``_prepare_fp32_grad_for_sub_group``) flattens the per-parameter
    gradient partitions into a new tensor before the optimizer step, although they already lie back
    to back in one flat buffer: a transient copy of every gradient at the step, which was the peak of
    a training step with a precomputed reference (docs/benchmarks.md). Where the partitions are one
    contiguous run of the optimizer's dtype and device, the view is handed over instead; the buffer is
    overwritten by the next backward, as the copy would have been dropped. Otherwise DeepSpeed's own
    code runs.
    """
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3 as Stage3

    original = Stage3._prepare_fp32_grad_for_sub_group
    if getattr(original, "plot_ds_hands_over_views", False):
        return

    @functools.wraps(original)
    def prepare_fp32_grad(self, sub_group_id):
        master = self.fp32_partitioned_groups_flat[sub_group_id]
        view = contiguous_span(self.averaged_gradients[sub_group_id])
        if view is None or (view.dtype, view.device, view.numel()) != (master.dtype, master.device, master.numel()):
            return original(self, sub_group_id)
        master.grad = view
        self.averaged_gradients[sub_group_id] = None

    prepare_fp32_grad.plot_ds_hands_over_views = True
    Stage3._prepare_fp32_grad_for_sub_group = prepare_fp32_grad


def build_policy_engine(config: Config, ds_config: dict):
    import deepspeed

    keep_one_fp32_copy()
    hand_over_gradients_as_views()
    model = load_model(config, ds_config)
    if config.model.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    schedule = warmup_cosine(config.train)
    engine, *_ = deepspeed.initialize(
        model=model, config=ds_config,
        model_parameters=param_groups(model, config.train.weight_decay),
        lr_scheduler=lambda optimizer: torch.optim.lr_scheduler.LambdaLR(optimizer, schedule))
    enable_prompt_sharing(engine, shares_prompt(config, ds_config) and not config.model.gradient_checkpointing)
    return engine


def build_frozen_engine(config: Config, ds_config: dict, name_or_path: str | None = None,
                        offload: bool = False):
    """A ZeRO-3 inference engine (no optimizer): the reference model, or a model under evaluation."""
    import deepspeed

    frozen_config = reference_ds_config(ds_config, offload)
    model = load_model(config, frozen_config, name_or_path)
    model.eval()
    model.requires_grad_(False)
    engine, *_ = deepspeed.initialize(model=model, config=frozen_config)
    engine.eval()
    enable_prompt_sharing(engine, shares_prompt(config, frozen_config))
    return engine


def destroy_engine(engine) -> None:
    """``engine.destroy()``, and let its model and weights go.

    DeepSpeed 0.19's ZeRO-3 keeps a destroyed engine reachable in two places: its top module on a
    module-global stack (``parameter_offload.FWD_MODULE_STACK``, never popped) and its parameter
    coordinator in a method cache (``_clear_release_plan_cache``). Either way the reference model of
    the cache pass (538 MB for SmolLM2-135M in fp32) would be held through the whole training.
    """
    from deepspeed.runtime.zero import parameter_offload

    module = engine.module
    engine.destroy()
    stack = getattr(parameter_offload, "FWD_MODULE_STACK", [])
    stack[:] = [entry for entry in stack if entry is not module]
    _clear_release_plan_cache()


def _clear_release_plan_cache() -> None:
    """DeepSpeed 0.19 memoises ``PartitionedParameterCoordinator.__params_to_release`` with an
    unbounded ``functools.lru_cache`` on the method, keyed by the coordinator itself: every ZeRO-3
    engine that ran two forwards stays reachable from the cache, and through its parameter trace
    keeps all its weights (538 MB for the reference model of the cache pass, measured). Clearing
    it costs the live engines one recomputation of their release plans."""
    from deepspeed.runtime.zero.partitioned_param_coordinator import PartitionedParameterCoordinator

    method = PartitionedParameterCoordinator.__dict__.get("_PartitionedParameterCoordinator__params_to_release")
    cells = getattr(method, "__closure__", None) or ()  # under DeepSpeed's nvtx wrapper
    for candidate in (method, *(cell.cell_contents for cell in cells if _cell_is_set(cell))):
        if hasattr(candidate, "cache_clear"):
            candidate.cache_clear()


def _cell_is_set(cell) -> bool:
    try:
        cell.cell_contents
    except ValueError:
        return False
    return True


def trim_host_heap() -> None:
    """Give the pages of freed host memory back to the OS (glibc's malloc_trim; a no-op elsewhere).

    glibc keeps freed blocks resident, and the blocks freed between ZeRO-3's gathers and gradient
    hand-offs are fragmented so that later, larger requests grow the heap instead of reusing them:
    on CPU, plot_ds's peak RSS was 34% above its live tensors, TRL's 8% (docs/benchmarks.md).
    """
    _malloc_trim()(0)


@functools.cache
def _malloc_trim():
    import ctypes
    import ctypes.util

    libc = ctypes.util.find_library("c")
    return (getattr(ctypes.CDLL(libc), "malloc_trim", None) if libc else None) or (lambda _pad: 0)


def release_freed_memory() -> None:
    """After an engine is done and dropped (the reference model after the cache pass): its device
    memory back from the caching allocator and its host memory back to the OS, before training
    allocates around it."""
    import gc

    from deepspeed.accelerator import get_accelerator

    gc.collect()
    get_accelerator().empty_cache()
    trim_host_heap()


def build_reference_engine(config: Config, ds_config: dict):
    return build_frozen_engine(config, ds_config, config.reference.name_or_path, config.reference.offload)
