"""The causal LM and its tokenizer, loaded so that ZeRO-3 partitions each tensor as it is loaded,
after the checks that turn a wrong model into one clear message (``ModelError``; where the model is
found: ``model_source``): a tokenizer without pad or EOS token, an attention implementation the
architecture lacks."""

from __future__ import annotations

import importlib.util
import os
import warnings

from .adapters import quantization_config
from ..config import Config, ConfigError
from .ds_config import model_dtype, zero_stage
from ..errors import ModelError
from ..forward.sequence_parallel import why_not_sequence_parallel
from .model_source import model_source

_ANNOUNCED: set[str] = set()  # each choice logged once per process (policy and reference share it)
ATTENTION_CHOICES = ("auto", "eager", "sdpa", "flash_attention_2", "flash_attention_3", "flex_attention")


def load_tokenizer(config: Config):
    from transformers import AutoTokenizer

    source, _ = model_source(config.model.name_or_path, config.model.revision, config.model.trust_remote_code)
    tokenizer = AutoTokenizer.from_pretrained(
        source, revision=config.model.revision, trust_remote_code=config.model.trust_remote_code
    )
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token is None:
            raise ModelError(
                f"model.name_or_path '{config.model.name_or_path}': its tokenizer has neither a pad "
                'nor an EOS token, so responses cannot be ended or batched; add "eos_token" '
                '(and "pad_token") to its tokenizer_config.json'
            )
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def attention_for(requested: str | None, model_class, dtype, device_type: str) -> str:
    """The attention implementation to load with. ``auto``: flash_attention_2 where flash-attn is
    installed and the model supports it on a GPU in half precision, else sdpa where the model
    supports it, else eager. An explicit choice the model lacks is a ``ModelError``."""
    import torch

    name = model_class.__name__
    flash_ready = (
        importlib.util.find_spec("flash_attn") is not None
        and device_type == "cuda"
        and dtype in (torch.float16, torch.bfloat16)
    )
    supports = {
        "eager": True,
        "sdpa": bool(getattr(model_class, "_supports_sdpa", False)),
        "flash_attention_2": bool(
            getattr(model_class, "_supports_flash_attn", False) or getattr(model_class, "_supports_flash_attn_2", False)
        ),
        "flex_attention": bool(getattr(model_class, "_supports_flex_attn", False)),
    }
    if requested in (None, "auto"):
        return (
            "flash_attention_2"
            if supports["flash_attention_2"] and flash_ready
            else "sdpa"
            if supports["sdpa"]
            else "eager"
        )
    if requested not in ATTENTION_CHOICES and "/" not in requested:  # "org/kernel": a hub attention kernel
        raise ModelError(
            f"model.attn_implementation '{requested}': not an attention implementation; use one of "
            f"{', '.join(ATTENTION_CHOICES)}"
        )
    if not supports.get(requested, True):
        fallback = attention_for("auto", model_class, dtype, device_type)
        raise ModelError(
            f"model.attn_implementation '{requested}': {name} does not support it; use auto "
            f"(picks {fallback} here) or {fallback}"
        )
    if requested == "flash_attention_2" and not flash_ready:
        raise ModelError(
            "model.attn_implementation 'flash_attention_2' needs the flash-attn package, a CUDA "
            "device and bf16 or fp16 weights; use auto to fall back to sdpa or eager"
        )
    return requested


def _causal_lm_class(hf_config, trust_remote_code: bool):
    from transformers import AutoModelForCausalLM

    if trust_remote_code and getattr(hf_config, "auto_map", None):
        return None  # remote code: its class is only known once loaded; transformers picks
    return AutoModelForCausalLM._model_mapping[type(hf_config)]


def load_model(config: Config, ds_config: dict, name_or_path: str | None = None, adapted: bool = False):
    """Load the causal LM so that ZeRO-3 partitions each tensor as it is loaded; ``adapted``: the
    base of an adapter run, its weights per ``adapter.quantize`` (QLoRA), without leaf modules
    (``deepspeed.zero3_leaf_modules``: DeepSpeed 0.19's leaf gathering fails in the backward of a
    frozen layer holding adapters; per-submodule hooks work).

    ``HfDeepSpeedConfig`` makes ``from_pretrained`` construct the model under ``zero.Init``; it is
    held by the model because transformers consults it later (generation needs synced ranks).
    """
    from deepspeed.accelerator import get_accelerator
    from transformers import AutoModelForCausalLM
    from transformers.integrations import HfDeepSpeedConfig

    settings = config.model
    source, hf_config = model_source(
        name_or_path or settings.name_or_path, settings.revision, settings.trust_remote_code
    )
    model_class = _causal_lm_class(hf_config, settings.trust_remote_code)
    check_sequence_parallel(config, hf_config, name_or_path or settings.name_or_path)
    dtype = model_dtype(ds_config)
    attention = settings.attn_implementation
    if model_class is not None:
        attention = attention_for(attention, model_class, dtype, get_accelerator().device_name())
        choice = f"model.attn_implementation auto: {attention} for {model_class.__name__}"
        if (
            settings.attn_implementation in (None, "auto")
            and int(os.environ.get("RANK", "0")) == 0
            and choice not in _ANNOUNCED
        ):
            _ANNOUNCED.add(choice)
            print(f"[plot_ds] {choice}", flush=True)
    elif attention == "auto":
        attention = None  # transformers' own choice for remote code
    quantization = (
        quantization_config(config.adapter, dtype, get_accelerator().device_name(), zero_stage(ds_config))
        if adapted
        else None
    )
    hf_ds_config = HfDeepSpeedConfig(ds_config) if zero_stage(ds_config) == 3 else None
    if hf_ds_config is None:
        # transformers keeps the last ZeRO-3 config it saw (a weak reference) while anything holds
        # it, e.g. a ZeRO-3 engine built earlier in this process: it would partition this model too.
        from transformers.integrations.deepspeed import unset_hf_deepspeed_config

        unset_hf_deepspeed_config()
    model = AutoModelForCausalLM.from_pretrained(
        source,
        revision=settings.revision,
        trust_remote_code=settings.trust_remote_code,
        dtype=dtype,
        attn_implementation=attention,
        quantization_config=quantization,
    )
    model.plot_ds_hf_ds_config = hf_ds_config
    model.config.use_cache = False
    if settings.tiled_mlp and not tile_mlps(model):
        raise ModelError(f"model.tiled_mlp: {type(model).__name__} has no decoder-layer `mlp` to tile; set it false")
    if hf_ds_config is not None and not adapted:
        mark_zero3_leaf_modules(model, config.deepspeed)
    return model


def check_sequence_parallel(config: Config, hf_config, name: str) -> None:
    """``parallel.sequence`` for a model, from its config alone (before any weight is read)."""
    size = config.parallel.sequence
    refused = why_not_sequence_parallel(hf_config, size, config.data.max_length) if size > 1 else None
    if refused:
        raise ModelError(f"parallel.sequence {size}: {name} cannot: {refused}")


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
            warnings.warn(
                f"deepspeed.zero3_leaf_modules auto: {type(model).__name__} names no decoder layer "
                "class (_no_split_modules); ZeRO-3 hooks every submodule. Name the layer class to "
                "gather a layer at a time.",
                stacklevel=2,
            )
        return []
    present = {type(module).__name__ for module in model.modules()}
    missing = [name for name in classes if name not in present]
    if missing:
        raise ConfigError(
            f"deepspeed.zero3_leaf_modules: no module of class {', '.join(missing)} in "
            f"{type(model).__name__}; its module classes are {', '.join(sorted(present))}. "
            "Use auto, none or names from that list."
        )
    set_z3_leaf_modules(model, classes)
    return classes


def tile_mlps(model) -> int:
    """``model.tiled_mlp``: every decoder layer's ``mlp`` computed a slice of positions at a time by
    DeepSpeed's ``TiledMLP`` (ALST), its forward run again in the backward, so that the MLP's
    [positions, intermediate] activations never exist for a whole row. Slices of ``hidden_size``
    positions, as DeepSpeed's own example takes; every rank agrees on the largest count (under ZeRO-3
    each slice's call gathers parameters, a collective). Returns how many MLPs it tiled."""
    import math

    import torch
    from deepspeed.runtime.sequence_parallel.ulysses_sp import TiledMLP

    hidden = model.config.get_text_config().hidden_size
    tiled = 0
    for module in list(model.modules()):
        mlp = getattr(module, "mlp", None)
        if not isinstance(mlp, torch.nn.Module) or getattr(mlp, "plot_ds_tiled", False):
            continue
        whole = type(mlp).forward

        def forward(x, mlp=mlp, whole=whole):
            shards = agreed_maximum(math.ceil(x.shape[-2] / hidden), x.device)
            return TiledMLP.apply(whole, mlp, x, shards, list(mlp.parameters()))

        mlp.forward, mlp.plot_ds_tiled = forward, True
        tiled += 1
    return tiled


def agreed_maximum(value: int, device) -> int:
    """The largest of ``value`` over the ranks (one integer all-reduce), or ``value`` alone."""
    import deepspeed.comm as dist
    import torch

    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return value
    tensor = torch.tensor([value], device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return int(tensor.item())
