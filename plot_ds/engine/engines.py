"""DeepSpeed engines: the trained policy, and frozen ones (the reference model, a model under
evaluation). Each builder returns the engine and how its rows are laid out
(``pair_forward.ForwardLayout``: prompt sharing, packing or plain rows; the LM head tiled or whole),
which the loss path is handed explicitly.
"""

from __future__ import annotations

import torch

from .adapters import add_adapters
from ..config import Config
from .deepspeed_patches import apply_training_patches, check_deepspeed_version, forget_destroyed_engine
from .ds_config import model_dtype, reference_ds_config, zero_stage
from .models import load_model
from .optim import param_groups, warmup_cosine
from ..forward.packing import packing_for
from ..errors import ModelError
from ..forward.pair_forward import ForwardLayout, check_packing
from ..forward.prompt_sharing import prompt_sharing
from ..forward.sequence_parallel import SequenceGroup, install_ulysses
from ..forward.tiled_head import tile_positions, why_not_tiled

# model.tiled_head auto: the head is tiled for a micro-batch whose [N, V] logits would take more
# bytes than this (the tiled head's backward recomputes the head's matmul: below, speed wins).
TILED_ABOVE_BYTES = 2**30


def shares_prompt(config, ds_config: dict, ranks: int | None = None) -> bool:
    """``model.share_prompt`` for an engine of ``ds_config``. ``auto`` shares the prompt unless
    ZeRO-3 fetches the parameters from other ranks or from host memory: each of the three passes
    would fetch them again, and its backward reduce-scatter the gradients again (docs/benchmarks.md).
    On one rank without offload those are local copies, and sharing saves compute. Never under
    sequence parallelism (plain rows only; ``true`` is refused there by the config). ``ranks``: the
    world's size (default: the running world's), which the memory plan states before a launch."""
    if config.parallel.sequence > 1:
        return False
    if config.model.share_prompt != "auto":
        return config.model.share_prompt
    if zero_stage(ds_config) != 3:
        return True
    if ranks is None:
        import deepspeed.comm as dist

        ranks = dist.get_world_size() if dist.is_initialized() else 1
    offload = ds_config["zero_optimization"].get("offload_param") or {}
    return ranks == 1 and offload.get("device", "none") in ("none", None)


def rows_layout(config: Config, engine, share_prompt: bool):
    """``data.packing`` (sharing prompts in its own layout where the attention allows), else prompt
    sharing's passes where ``share_prompt``, else plain padded rows."""
    if config.data.packing:
        # One pass whatever the layout: the reasons ``shares_prompt`` may turn sharing off (each of its
        # passes gathers the parameters again; no key/value cache under gradient checkpointing) do
        # not apply.
        packing = packing_for(config, engine.module, config.model.share_prompt is not False)
        check_packing(engine, packing)
        return packing
    return prompt_sharing(engine.module, share_prompt)


def head_tiling(config: Config, module) -> tuple[int, int]:
    """``model.tiled_head`` for a loaded model: (positions per tile, tiled above how many response
    positions); (0, 0) for the whole head."""
    setting = config.model.tiled_head
    reason = why_not_tiled(module) if setting is not False else None
    if setting is True and reason:
        raise ModelError(f"model.tiled_head true: {type(module).__name__} cannot tile its head: {reason}; set it auto")
    if setting is False or reason:
        return 0, 0
    head = module.get_output_embeddings().weight
    vocab_size = module.config.vocab_size
    return tile_positions(vocab_size), 0 if setting is True else TILED_ABOVE_BYTES // (vocab_size * head.element_size())


def forward_layout(config: Config, engine, share_prompt: bool, sequence: SequenceGroup | None = None) -> ForwardLayout:
    """The engine's ``ForwardLayout``; with a ``sequence`` group, plain rows split over it, its
    attention routed through DeepSpeed's Ulysses."""
    if sequence is not None:
        install_ulysses(engine.module, sequence)
        return ForwardLayout(None, *head_tiling(config, engine.module), sequence=sequence)
    return ForwardLayout(rows_layout(config, engine, share_prompt), *head_tiling(config, engine.module))


def build_policy_engine(
    config: Config, ds_config: dict, sequence: SequenceGroup | None = None
) -> tuple[object, ForwardLayout]:
    import deepspeed

    apply_training_patches()
    model = load_model(config, ds_config, adapted=config.adapter.active)
    if config.adapter.active:
        add_adapters(model, config.adapter, model_dtype(ds_config), zero_stage(ds_config))
    if config.model.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    schedule = warmup_cosine(config.train)
    engine, *_ = deepspeed.initialize(
        model=model,
        config=ds_config,
        model_parameters=param_groups(model, config.train.weight_decay),
        lr_scheduler=lambda optimizer: torch.optim.lr_scheduler.LambdaLR(optimizer, schedule),
    )
    # from_pretrained returns the model in eval mode: dropout and gradient checkpointing (which
    # transformers applies only to modules in training mode) would be silently off.
    engine.train()
    # Gradient checkpointing drops the key/value cache that prompt sharing continues from.
    wanted = shares_prompt(config, ds_config) and not config.model.gradient_checkpointing
    return engine, forward_layout(config, engine, wanted, sequence)


def build_frozen_engine(
    config: Config,
    ds_config: dict,
    name_or_path: str | None = None,
    offload: bool = False,
    sequence: SequenceGroup | None = None,
) -> tuple[object, ForwardLayout]:
    """A ZeRO-3 inference engine (no optimizer): the reference model, or a model under evaluation."""
    import deepspeed

    check_deepspeed_version()
    frozen_config = reference_ds_config(ds_config, offload)
    model = load_model(config, frozen_config, name_or_path)
    model.eval()
    model.requires_grad_(False)
    engine, *_ = deepspeed.initialize(model=model, config=frozen_config)
    engine.eval()
    return engine, forward_layout(config, engine, shares_prompt(config, frozen_config), sequence)


def build_reference_engine(
    config: Config, ds_config: dict, sequence: SequenceGroup | None = None
) -> tuple[object, ForwardLayout]:
    return build_frozen_engine(config, ds_config, config.reference.name_or_path, config.reference.offload, sequence)


def destroy_engine(engine) -> None:
    """``engine.destroy()``, and let its model and weights go (DeepSpeed 0.19 would keep them
    reachable: ``deepspeed_patches.forget_destroyed_engine``)."""
    module = engine.module
    engine.destroy()
    forget_destroyed_engine(module)
