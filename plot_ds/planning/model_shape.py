"""A model's shape from its config.json alone: every parameter's size and what the activation model
needs (widths, heads, layers, experts). The model is built on the meta device, so no weight is
read or allocated, and the parameter list is transformers' own for that architecture."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import ModelError


class ShapeUnknown(ModelError):
    """transformers cannot build the architecture on the meta device: plot-plan cannot size it, and
    plot-train trains without a plan."""


@dataclass(frozen=True)
class Linear:
    """A linear layer LoRA may adapt: its short name and sizes."""

    name: str
    in_features: int
    out_features: int
    per_layer: bool  # inside a decoder layer (the head and embeddings are not)


@dataclass(frozen=True)
class ModelShape:
    model_type: str
    vocab_size: int
    hidden_size: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate_size: int  # per expert for mixtures of experts
    experts_per_token: int  # 1 for dense MLPs
    qk_norm: bool  # per-head RMSNorm of queries and keys (Qwen3, Gemma3)
    tied_embeddings: bool
    why_head_not_tiled: str | None  # forward/tiled_head.why_not_tiled of the model; None: tileable
    parameter_sizes: tuple[int, ...]  # every parameter's element count, in the model's order
    layer_parameters: int  # elements of the largest decoder layer (what ZeRO-3 gathers at once)
    linears: tuple[Linear, ...]

    @property
    def parameters(self) -> int:
        return sum(self.parameter_sizes)

    @property
    def query_width(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_width(self) -> int:
        return self.kv_heads * self.head_dim

    @property
    def embedding_parameters(self) -> int:
        return self.vocab_size * self.hidden_size * (1 if self.tied_embeddings else 2)


def read_model_shape(name_or_path: str, revision: str | None = None, trust_remote_code: bool = False) -> ModelShape:
    """``name_or_path``'s shape: its config.json (a folder, a built-in or a hub id) and nothing else."""
    from .. import assets
    from ..engine.model_source import model_source

    if name_or_path.startswith("builtin:"):
        # A built-in's config.json is written with the converted folder; the plan only needs its shape.
        name_or_path = assets.resolve_model_path(name_or_path)
    _, hf_config = model_source(name_or_path, revision, trust_remote_code)
    return shape_of(hf_config, f"model.name_or_path '{name_or_path}'")


def shape_of(hf_config, where: str = "the model") -> ModelShape:
    import torch
    from transformers import AutoModelForCausalLM

    from ..forward.tiled_head import why_not_tiled

    text = hf_config.get_text_config()
    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(hf_config)
    except (ValueError, KeyError, TypeError, RuntimeError, NotImplementedError) as err:
        raise ShapeUnknown(
            f"{where}: transformers cannot build a causal LM of model type '{hf_config.model_type}' "
            f"({err}); plot-plan needs an architecture transformers knows (or model.trust_remote_code true)"
        ) from None
    layers = _decoder_layers(model)
    if not layers:
        raise ShapeUnknown(f"{where}: no decoder layers found in {type(model).__name__}; plot-plan cannot size it")
    heads = text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    experts = getattr(text, "num_experts_per_tok", None) or 1
    intermediate = getattr(text, "moe_intermediate_size", None) or text.intermediate_size
    head = model.get_output_embeddings()
    linears = []
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and module is not head:
            linears.append(Linear(name.rsplit(".", 1)[-1], module.in_features, module.out_features, ".layers." in name))
    return ModelShape(
        model_type=hf_config.model_type,
        vocab_size=text.vocab_size,
        hidden_size=text.hidden_size,
        layers=len(layers),
        heads=heads,
        kv_heads=getattr(text, "num_key_value_heads", None) or heads,
        head_dim=head_dim,
        intermediate_size=intermediate,
        experts_per_token=experts
        if getattr(text, "num_local_experts", None) or getattr(text, "num_experts", None)
        else 1,
        qk_norm=any(name.endswith(("q_norm", "k_norm")) for name, _ in layers[0].named_modules()),
        tied_embeddings=head is not None and head.weight is model.get_input_embeddings().weight,
        why_head_not_tiled=why_not_tiled(model),
        parameter_sizes=tuple(p.numel() for p in model.parameters()),
        layer_parameters=max(sum(p.numel() for p in layer.parameters()) for layer in layers),
        linears=tuple(linears),
    )


def _decoder_layers(model) -> list:
    """The model's repeated decoder layers: the longest ModuleList of one class."""
    import torch

    best = []
    for module in model.modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) > len(best):
            if len({type(m) for m in module}) == 1:
                best = list(module)
    return best
