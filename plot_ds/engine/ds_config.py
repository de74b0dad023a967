"""The DeepSpeed JSON of a run: which file (``deepspeed.config``, the checkpoint's own on resume),
read from the working directory or from the copies shipped inside the package, and its ``"auto"``
fields filled from the training config (a written value must agree with it). Precision is
resolved once per run, here.
"""

from __future__ import annotations

import copy
import json
import math
from importlib import resources
from pathlib import Path

import yaml

from .model_source import model_source
from ..config import Config, ConfigError, TrainConfig

PACKAGED_FOLDER = "ds_configs"  # plot_ds/ds_configs: the same files as the top-level ds_configs/


def packaged_ds_configs() -> dict[str, resources.abc.Traversable]:
    folder = resources.files("plot_ds") / PACKAGED_FOLDER
    return {entry.name: entry for entry in folder.iterdir() if entry.name.endswith(".json")}


def find_ds_config(path: str):
    """A file in (or relative to) the working directory; else, for ``ds_configs/<name>`` or a bare
    ``<name>``, the copy shipped inside the package (so a non-editable install works anywhere)."""
    candidate = Path(path)
    if candidate.is_file():
        return candidate
    packaged = packaged_ds_configs()
    if candidate.name in packaged and candidate.parent in (Path("."), Path(PACKAGED_FOLDER)):
        return packaged[candidate.name]
    raise ConfigError(
        f"deepspeed.config: {path} not found (looked in the working directory {Path.cwd()} and, for "
        f"{PACKAGED_FOLDER}/<name>, among the packaged {', '.join(sorted(packaged))})"
    )


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
    elif current != value and not (
        isinstance(value, float) and isinstance(current, (int, float)) and math.isclose(current, value)
    ):
        raise ConfigError(
            f"{where}.{key} is {current!r} in the DeepSpeed config but the training "
            f'config gives {value!r}: set it to "auto" or make them agree'
        )


# ZeRO sizes that scale with the model, as Hugging Face's integration sets them: buckets of one
# hidden x hidden matrix, parameters below ten hidden vectors kept whole. Fixed 5e7-element buckets
# would cost a small model more memory than its layers.
MODEL_SIZED_ZERO = {
    "reduce_bucket_size": lambda h: h * h,
    "stage3_prefetch_bucket_size": lambda h: int(0.9 * h * h),
    "stage3_param_persistence_threshold": lambda h: 10 * h,
}


def fill_ds_config(
    template: dict, train: TrainConfig, world_size: int, hidden_size: int | None = None, precision: str | None = None
) -> dict:
    """``template`` with every "auto" field set; ``precision`` as resolved (default: resolved here)."""
    ds = copy.deepcopy(template)
    zero = ds.get("zero_optimization", {})
    for key, size in MODEL_SIZED_ZERO.items():
        if zero.get(key) == "auto" and hidden_size is not None:
            zero[key] = size(hidden_size)
    precision = precision or resolve_precision(train.precision)
    _fill(ds, "train_micro_batch_size_per_gpu", train.micro_batch_size, "ds")
    _fill(ds, "gradient_accumulation_steps", train.gradient_accumulation_steps, "ds")
    _fill(ds, "train_batch_size", train.micro_batch_size * train.gradient_accumulation_steps * world_size, "ds")
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
        raise ConfigError(
            f'DeepSpeed config: no value known for {", ".join(leftover)}; write a value instead of "auto"'
        )
    return ds


def _walk(tree: dict, prefix: str = ""):
    for key, value in tree.items():
        if isinstance(value, dict):
            yield from _walk(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def checkpoint_ds_config(directory: Path) -> str | None:
    """The DeepSpeed JSON a checkpoint was written with (its config.yaml), which fixes the layout of
    its optimizer state; None where the checkpoint does not say."""
    saved = Path(directory) / "config.yaml"
    if not saved.is_file():
        return None
    written = (yaml.safe_load(saved.read_text()) or {}).get("deepspeed", {}).get("config")
    return written if written and written != "auto" else None


def choose_ds_config(config: Config, world_size: int, resume_from: Path | None, precision: str | None = None) -> str:
    """deepspeed.config as this run uses it: auto follows the checkpoint being resumed (its ZeRO
    stage fixes how its optimizer state is laid out), else ranks and precision (config_for)."""
    if config.deepspeed.config == "auto" and resume_from is not None:
        written = checkpoint_ds_config(resume_from)
        if written is not None:
            return written
    return config.deepspeed.config_for(world_size, precision or resolve_precision(config.train.precision))


def _hidden_size(config: Config, template: dict) -> int | None:
    if not any(template.get("zero_optimization", {}).get(key) == "auto" for key in MODEL_SIZED_ZERO):
        return None
    _, model_config = model_source(config.model.name_or_path, config.model.revision, config.model.trust_remote_code)
    return getattr(model_config.get_text_config(), "hidden_size", None)


def resolve_ds_config(config: Config, world_size: int, resume_from: Path | None = None) -> tuple[str, dict]:
    """(the file chosen, the filled DeepSpeed config) for this run."""
    precision = resolve_precision(config.train.precision)
    name = choose_ds_config(config, world_size, resume_from, precision)
    source = find_ds_config(name)
    try:
        template = json.loads(source.read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(f"{source}: not valid JSON at line {err.lineno} ({err.msg})") from None
    return name, fill_ds_config(template, config.train, world_size, _hidden_size(config, template), precision)


def load_ds_config(config: Config, world_size: int, resume_from: Path | None = None) -> dict:
    return resolve_ds_config(config, world_size, resume_from)[1]


def zero_stage(ds_config: dict) -> int:
    return int(ds_config.get("zero_optimization", {}).get("stage", 0))


def reference_ds_config(policy_ds: dict, offload: bool) -> dict:
    """Same sharding and precision as the policy, no optimizer; stage 0 unless ZeRO-3, since
    ZeRO-1/2 only shard optimizer state, which a frozen model does not have."""
    stage = 3 if zero_stage(policy_ds) == 3 else 0
    zero = {"stage": stage}
    if stage == 3:
        keep = (
            "stage3_param_persistence_threshold",
            "stage3_prefetch_bucket_size",
            "stage3_max_live_parameters",
            "stage3_max_reuse_distance",
        )
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


def precision_of(ds_config: dict) -> str:
    if ds_config["bf16"]["enabled"]:
        return "bf16"
    return "fp16" if ds_config["fp16"]["enabled"] else "fp32"


def model_dtype(ds_config: dict):
    import torch

    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[precision_of(ds_config)]
