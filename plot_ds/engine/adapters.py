"""LoRA adapters (peft) on frozen base weights, and the reference that costs nothing: the base with
the adapters switched off.

The adapters are injected into the transformers model itself, and that model is what DeepSpeed
wraps, so its forward, its key/value cache (prompt sharing), the LM-head hook and generation stay
the model's own. The ``PeftModel`` is kept beside it (``model.plot_ds_peft``) for switching the
adapters off and for writing the PEFT folder. Under ZeRO-3 the base is partitioned as it loads
(``zero.Init``) and the adapters, created afterwards, are partitioned by ``deepspeed.initialize``
(every rank creates them from the same seed); they are cast to the base's dtype first, as
DeepSpeed keeps one dtype per engine and its own fp32 master copies.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch

from ..errors import ModelError

PEFT_PREFIX = "base_model.model."  # PeftModel's names for the wrapped model's parameters
ADAPTER_NAME = "default"


def base_is_reference(config) -> bool:
    """Whether this run's reference is the policy's base with its adapters off."""
    return config.adapter.active and config.reference.name_or_path in (None, config.model.name_or_path)


def quantization_config(settings, dtype: torch.dtype, device_type: str, zero_stage: int):
    """bitsandbytes' settings for ``adapter.quantize`` (None for none): NF4 with double quantization
    and ``dtype`` compute (QLoRA); under ZeRO-3 the packed weights are stored as ``dtype`` so that
    ZeRO can partition them like any other tensor (Hugging Face's "QLoRA with ZeRO-3" recipe)."""
    if settings.quantize == "none":
        return None
    if device_type != "cuda":
        raise ModelError(
            f"adapter.quantize {settings.quantize}: bitsandbytes' quantized weights need a CUDA "
            f"device, and this run's accelerator is {device_type}; use adapter.quantize none (LoRA on "
            "full-precision weights) here"
        )
    import importlib.util

    if importlib.util.find_spec("bitsandbytes") is None:
        raise ModelError(
            f"adapter.quantize {settings.quantize}: the bitsandbytes package is not installed; "
            "pip install bitsandbytes, or use adapter.quantize none"
        )
    if settings.quantize == "8bit" and zero_stage == 3:
        raise ModelError(
            "adapter.quantize 8bit: ZeRO-3 cannot partition bitsandbytes' 8-bit weights; use "
            "adapter.quantize 4bit, or a ZeRO-2 config (deepspeed.config ds_configs/zero2.json)"
        )
    from transformers import BitsAndBytesConfig

    if settings.quantize == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=dtype,
        bnb_4bit_quant_storage=dtype if zero_stage == 3 else torch.uint8,
    )


def add_adapters(model, settings, dtype: torch.dtype, zero_stage: int = 0):
    """Inject LoRA layers per ``settings`` (the ``adapter`` config section) into ``model`` in place;
    every other parameter is frozen. Returns ``model``."""
    from peft import LoraConfig, get_peft_model

    if settings.modules_to_save and zero_stage == 3:
        # DeepSpeed 0.19 leaves peft's copies of such modules unpartitioned, or of shape [0] at load
        # (deepspeedai/DeepSpeed#7669).
        raise ModelError(
            f"adapter.modules_to_save {settings.modules_to_save}: ZeRO-3 cannot partition peft's "
            "trained copies of whole modules; use a ZeRO-2 config (deepspeed.config "
            "ds_configs/zero2.json), or train those modules' linear layers with adapters instead"
        )

    known = {name.rsplit(".", 1)[-1] for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)}
    targets = settings.target_modules
    if isinstance(targets, list):
        missing = [name for name in targets if name not in known]
        if missing:
            raise ModelError(
                f"adapter.target_modules: {type(model).__name__} has no linear layer named "
                f"{', '.join(missing)}; its linear layers are {', '.join(sorted(known))} (or use all-linear)"
            )
    lora = LoraConfig(
        r=settings.rank,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=targets,
        modules_to_save=settings.modules_to_save,
        bias="none",
        task_type="CAUSAL_LM",
    )
    peft_model = get_peft_model(model, lora, adapter_name=ADAPTER_NAME)
    for param in model.parameters():
        if param.requires_grad and param.dtype != dtype:
            param.data = param.data.to(dtype)
    # Not a submodule (nn.Module's setattr would register it, a cycle model -> peft -> model).
    object.__setattr__(model, "plot_ds_peft", peft_model)
    return model


def peft_model_of(module):
    """The PeftModel of a model built by ``add_adapters`` (None for a plain model)."""
    return getattr(module, "plot_ds_peft", None)


@contextmanager
def adapters_off(module) -> Iterator[None]:
    """The base model: adapters bypassed, in eval mode (no dropout), restored afterwards."""
    peft_model = peft_model_of(module)
    training = module.training
    module.eval()
    try:
        with peft_model.disable_adapter():
            yield
    finally:
        module.train(training)


class BaseOfPolicy:
    """The policy engine with its adapters off: the reference model, on the weights already in
    memory. Callable like an engine (no gradients are taken through it)."""

    def __init__(self, engine):
        self.engine = engine

    @property
    def module(self):
        return self.engine.module

    @property
    def device(self):
        return self.engine.device

    def __call__(self, **inputs):
        with adapters_off(self.engine.module):
            return self.engine(**inputs)

    def destroy(self) -> None:
        """Nothing to free: the weights belong to the policy's engine."""


# ------------------------------------------------------------------------------------ export
def _gathered(params):
    import deepspeed

    return deepspeed.zero.GatheredParameters(list(params), modifier_rank=None)


def trained_state(module, is_main: bool) -> dict[str, torch.Tensor]:
    """The trainable tensors (adapters, modules_to_save) gathered, under PeftModel's names, on
    rank 0 ({} elsewhere)."""
    state = {}
    for name, param in module.named_parameters():
        if param.requires_grad:
            with _gathered([param]):
                if is_main:
                    state[PEFT_PREFIX + name] = param.detach().to("cpu", copy=True).contiguous()
    return state


def merged_state(module, is_main: bool) -> dict[str, torch.Tensor]:
    """The base model's weights with the adapters merged in (W + scale * B A), under the plain
    model's names, gathered one layer at a time (bounded memory), on rank 0 ({} elsewhere)."""
    from peft.tuners.lora import LoraLayer

    state: dict[str, torch.Tensor] = {}
    merged_layers = {}
    for name, layer in module.named_modules():
        if isinstance(layer, LoraLayer):
            merged_layers[name] = layer
    for name, layer in merged_layers.items():
        with _gathered(layer.parameters()):
            if is_main:
                base = layer.get_base_layer()
                weight = base.weight.detach().float() + layer.get_delta_weight(ADAPTER_NAME).float()
                state[f"{name}.weight"] = weight.to(base.weight.dtype).cpu().contiguous()
                if getattr(base, "bias", None) is not None:
                    state[f"{name}.bias"] = base.bias.detach().to("cpu", copy=True).contiguous()
    inside = tuple(f"{name}." for name in merged_layers)
    for name, param in module.named_parameters():
        if name.startswith(inside):
            continue
        plain = _plain_name(name)
        if plain is None:
            continue
        with _gathered([param]):
            if is_main:
                state[plain] = param.detach().to("cpu", copy=True).contiguous()
    return state


def _plain_name(name: str) -> str | None:
    """A parameter's name in the model without peft (None for one that is not part of it):
    modules_to_save keep their trained copy."""
    if ".original_module." in name:
        return None
    return name.replace(f".modules_to_save.{ADAPTER_NAME}.", ".")


def save_adapter_folder(module, tokenizer, target: Path, is_main: bool) -> Path | None:
    """A PEFT folder (adapter_config.json, adapter_model.safetensors), loadable with
    ``PeftModel.from_pretrained(base, target)``; written by rank 0, whole or not at all."""
    from ..atomic import atomic_folder

    state = trained_state(module, is_main)
    if not is_main:
        return None
    with atomic_folder(target) as staging:
        peft_model_of(module).save_pretrained(staging, state_dict=state, safe_serialization=True)
        tokenizer.save_pretrained(staging)
    return Path(target)
