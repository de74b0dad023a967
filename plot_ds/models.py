"""The causal LM and its tokenizer, loaded so that ZeRO-3 partitions each tensor as it is loaded."""
from __future__ import annotations

import warnings

from .assets import resolve_model_path
from .config import Config, ConfigError
from .ds_config import model_dtype, zero_stage


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
    model.plot_ds_hf_ds_config = hf_ds_config
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
