"""Run by real ranks (torchrun): one optimizer step through plot_ds.training.loop.train_step for each
objective and micro-batch split, recording the full gradient the optimizer is about to use, and
how each parameter is partitioned; for SFT and DPO also the parameters before and after the
update (lr 1e-3, weight decay 0.1) and whether ZeRO-3's fp32 master weights are the parameter
partitions themselves.

usage: step_gradients.py MODEL_DIR DS_CONFIG OUT_FILE SPLITS REFERENCE_DIR [VARIANTS]
  SPLITS: comma-separated MICROxACCUM, e.g. 1x4,2x2,4x1 (per-rank micro-batch x accumulation)
  REFERENCE_DIR: the reference model of the AOT variants (another model than the policy's start)
  VARIANTS: comma-separated names of VARIANTS to run (all by default)

Also fetches embedding rows (different sets, of different sizes, on each rank) through both the
sliced and the full-gather path, to compare with the unpartitioned matrix.
"""

import dataclasses
import json
import sys
from pathlib import Path

import deepspeed
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from conftest import make_tiny_llama  # noqa: E402
from deepspeed.utils import safe_get_full_grad, z3_leaf_module

from plot_ds.forward import packing, pair_forward
from plot_ds.forward import prompt_sharing
from plot_ds.forward import tiled_head
from plot_ds.engine import engines
from plot_ds.config import load_config
from plot_ds.data import GlobalBatchSampler
from plot_ds.distributed.process_group import barrier, init_distributed
from plot_ds.distributed.embedding_slice import EmbeddingRows
from plot_ds.training.monitoring import reduce_metrics
from plot_ds.training.run import setup_run
from plot_ds.training.loop import train_step

VARIANTS = {
    "sft": {"objective.name": "sft", "plot.enabled": False},
    # On pairs whose responses differ in length (VARIED), so that prompt sharing's two response
    # passes are really of different widths.
    "dpo": {"objective.name": "dpo", "plot.enabled": False, "data.source": "VARIED"},
    "dpo_shared_prompt": {
        "objective.name": "dpo",
        "plot.enabled": False,
        "model.share_prompt": True,
        "data.source": "VARIED",
    },
    # DeepSpeed's own per-submodule gathering, against the decoder-layer leaves every other variant uses.
    # Terms over the global batch (sorted across micro-batches and ranks) and a weighted sum (RPO).
    # The tiny random models' log-ratios are small: a large beta puts AOT where its loss is far from
    # linear, so that a sort over less than the global batch would change the gradients.
    "aot": {
        "objective.name": "aot",
        "plot.enabled": False,
        "objective.label_smoothing": 0.1,
        "objective.beta": 10.0,
        "reference.name_or_path": "REFERENCE",
    },
    "aot_unpaired": {
        "objective.name": "aot_unpaired",
        "plot.enabled": False,
        "objective.beta": 10.0,
        "reference.name_or_path": "REFERENCE",
    },
    "rpo": {"objective.terms": {"dpo": 1.0, "sft": 0.2}, "plot.enabled": False},
    # The short last global batch of an epoch (13 pairs: 8, then 5): uneven shares, and filler
    # micro-batches where a rank has none left. The step taken is that second one.
    "dpo_uneven": {"objective.name": "dpo", "plot.enabled": False, "data.source": "UNEVEN"},
    "aot_uneven": {
        "objective.name": "aot",
        "plot.enabled": False,
        "objective.beta": 10.0,
        "reference.name_or_path": "REFERENCE",
        "data.source": "UNEVEN",
    },
    "dpo_per_submodule": {
        "objective.name": "dpo",
        "plot.enabled": False,
        "deepspeed.zero3_leaf_modules": "none",
        "data.source": "VARIED",
    },
    # PLOT with both terms, so that chosen and rejected positions both carry gradient.
    "dpo+plot": {"objective.name": "dpo", "plot.rejected_weight": 0.5, "plot.top_k": 16},
    "dpo+plot_full": {
        "objective.name": "dpo",
        "plot.rejected_weight": 0.5,
        "plot.top_k": 16,
        "plot.embedding_gather": "full",
    },
    "dpo+plot_all_to_all": {
        "objective.name": "dpo",
        "plot.rejected_weight": 0.5,
        "plot.top_k": 16,
        "plot.embedding_gather": "all_to_all",
    },
    # LoRA on the frozen base (adapters as after some training: perturb_adapters), the reference the
    # base with the adapters off.
    "dpo+plot_lora": {
        "objective.name": "dpo",
        "plot.rejected_weight": 0.5,
        "plot.top_k": 16,
        "adapter.method": "lora",
        "adapter.rank": 4,
        "adapter.dropout": 0.0,
    },
    # Padding-free: every row its own sequence, or each pair prompt, chosen, rejected in one mask.
    "dpo+plot_packed": {
        "objective.name": "dpo",
        "plot.rejected_weight": 0.5,
        "plot.top_k": 16,
        "data.packing": True,
        "model.share_prompt": False,
    },
    "dpo+plot_packed_shared": {
        "objective.name": "dpo",
        "plot.rejected_weight": 0.5,
        "plot.top_k": 16,
        "data.packing": True,
        "model.share_prompt": True,
    },
    # The LM head a tile of positions at a time (3 positions, so that every micro-batch has several
    # tiles); over prompt sharing's passes it is tested in one process (tests/forward/test_tiled_head.py).
    "dpo+plot_tiled": {
        "objective.name": "dpo",
        "plot.rejected_weight": 0.5,
        "plot.top_k": 16,
        "model.tiled_head": True,
        "model.share_prompt": False,
    },
    # Another family (Qwen3: q/k norms, a head_dim of its own) with the tiled head, a term over the
    # global batch (AOT's sorts must see each pair once), SFT, and PLOT's ref_mix target (on the
    # reference's logits at the rank's own positions): one process against a sequence group of 2.
    "aot+plot_qwen3": {
        "objective.terms": {"aot": 1.0, "sft": 0.3},
        "objective.beta": 2.0,
        "plot.target": "ref_mix",
        "plot.rho": 0.3,
        "plot.top_k": 8,
        "plot.sinkhorn_iters": 30,
        "plot.rejected_weight": 0.5,
        "model.tiled_head": True,
        "model.share_prompt": False,
        "model.name_or_path": "QWEN3",
        "reference.name_or_path": "QWEN3_REFERENCE",
    },
    "none+plot_ref_mix": {
        "objective.name": "none",
        "plot.target": "ref_mix",
        "plot.rho": 0.3,
        "plot.top_k": 8,
        "plot.sinkhorn_iters": 30,
    },
    # Packed rows (each pair prompt, chosen, rejected under one mask) meeting the short last batch:
    # a rank's filler micro-batches run through the packed layout too.
    "dpo+plot_packed_shared_uneven": {
        "objective.name": "dpo",
        "plot.rejected_weight": 0.5,
        "plot.top_k": 16,
        "data.packing": True,
        "model.share_prompt": True,
        "data.source": "UNEVEN",
    },
}
# Variants whose parameters before and after the update are recorded: their engine is built anew
# for every split, so that each split's update starts from a fresh optimizer. Every other variant
# builds its engines once and runs each split on them, its weights restored in between.
TRACKS_UPDATE = ("sft", "dpo", "dpo_shared_prompt")
# Sequence parallelism: groups of 2 (or 4) ranks share each pair, a slice of its positions each
# (the tiny Llama has 4 heads and 2 key/value heads: at 4 Ulysses replicates them), each variant
# another one with parallel.sequence set. The split's accumulation is scaled by the group size
# (split_config), so the global batch stays that of the other variants.
VARIANTS.update(
    {
        "dpo+plot_seq2": {**VARIANTS["dpo+plot"], "parallel.sequence": 2},
        "dpo+plot_seq4": {**VARIANTS["dpo+plot"], "parallel.sequence": 4},
        "dpo+plot_lora_seq2": {**VARIANTS["dpo+plot_lora"], "parallel.sequence": 2, "model.tiled_mlp": True},
        # Under ZeRO-2 (the one-process run: ZeRO-3; the step is the same).
        "aot+plot_qwen3_zero2_seq2": {
            **VARIANTS["aot+plot_qwen3"],
            "parallel.sequence": 2,
            "deepspeed.config": "ds_configs/zero2.json",
        },
    }
)
# One-process runs that only sequence groups are compared with, and sequence groups run only where
# named (the 2-rank launch has groups of 2 with LoRA, ZeRO-2 and Qwen3; the 4-rank one plain ones).
SEQUENCE_BASELINES = ("aot+plot_qwen3",)
NAMED_ONLY = ("dpo+plot_seq2", "dpo+plot_seq4")


def perturb_adapters(policy) -> None:
    """Give every adapter weight the same seeded nonzero values on all ranks (peft starts B at 0,
    where A's gradient is 0 and the policy equals its reference)."""
    generator = torch.Generator().manual_seed(3)
    for name, param in policy.module.named_parameters():
        if param.requires_grad:
            with deepspeed.zero.GatheredParameters([param], modifier_rank=0):
                param.data.copy_(0.05 * torch.randn(param.shape, generator=generator))


def slice_rows(policy, rank: int) -> dict:
    vocab = policy.module.get_input_embeddings().weight.ds_shape[0]
    generator = torch.Generator().manual_seed(100 + rank)
    ids = torch.randperm(vocab, generator=generator)[: 37 + 50 * rank].sort().values
    ids[0] = vocab - 1  # the last row sits in the padded tail partition
    weight = policy.module.get_input_embeddings().weight
    sliced, sliced_bytes = EmbeddingRows(weight, "slice")(ids, policy.device)
    full, full_bytes = EmbeddingRows(weight, "full")(ids, policy.device)
    # Cosines to a target per position: supports of different widths per rank, repeated rows,
    # the padded tail row, and targets that are also support rows.
    support = torch.randint(0, vocab, (5 + 3 * rank, 7), generator=generator)
    support[0, 0] = vocab - 1
    targets = torch.randint(0, vocab, (support.shape[0],), generator=generator)
    support[1, 3], targets[2] = targets[1], vocab - 1
    cosines, cosine_bytes = EmbeddingRows(weight, "slice").target_cosines(support, targets, policy.device)
    cosines_full, _ = EmbeddingRows(weight, "full").target_cosines(support, targets, policy.device)
    return {
        "ids": ids,
        "sliced": sliced.cpu(),
        "full": full.cpu(),
        "sliced_bytes": sliced_bytes,
        "full_bytes": full_bytes,
        "support": support,
        "targets": targets,
        "cosines": cosines.cpu(),
        "cosines_full": cosines_full.cpu(),
        "cosine_bytes": cosine_bytes,
    }


def leaf_modules(engine) -> dict:
    """Class name -> how many modules of it ZeRO-3 gathers as one leaf."""
    counts = {}
    for module in engine.module.modules():
        if z3_leaf_module(module):
            counts[type(module).__name__] = counts.get(type(module).__name__, 0) + 1
    return counts


def full_parameters(policy) -> dict:
    """The module's own parameters (not the optimizer's copy), gathered."""
    params = dict(policy.module.named_parameters())
    with deepspeed.zero.GatheredParameters(list(params.values())):
        return {name: param.detach().clone().cpu() for name, param in params.items()}


def varied_pairs(path: Path, count: int = 16) -> str:
    """``count`` real CHAMP pairs cut to responses of 6 to 36 words, each pair's two of other lengths."""
    from plot_ds.assets import champ_pairs

    if not path.is_file():
        lines = []
        for i, pair in enumerate(champ_pairs()[:count]):
            cut = lambda text, n: " ".join(text.split()[:n])  # noqa: E731
            lines.append(
                json.dumps(
                    {
                        "id": pair["id"],
                        "prompt": pair["prompt"][-300:],
                        "chosen": cut(pair["chosen"], 6 + 2 * i),
                        "rejected": cut(pair["rejected"], 36 - i),
                    }
                )
            )
        path.write_text("\n".join(lines) + "\n")
    return str(path)


def recording_passes(passes: list, module=prompt_sharing):
    """Record the input shape of every pass ``module`` runs (the shared-prompt or packed passes;
    full rows record nothing), and for packed ones the shape of their attention mask."""
    real = module.with_head_input

    def recorded(model, select, **inputs):
        shape = tuple(inputs["input_ids"].shape)
        mask = inputs.get("attention_mask")
        passes.append(shape if module is prompt_sharing else (shape, None if mask is None else tuple(mask.shape)))
        return real(model, select, **inputs)

    module.with_head_input = recorded
    return real


def recording_slices(slices: list, ulysses_calls: list):
    """Record every plain-row forward's (rows, width, first position) and count the attention calls
    that went through DeepSpeed's Ulysses."""
    from deepspeed.runtime.sequence_parallel.ulysses_sp import UlyssesSPAttentionHF

    real, real_attention = pair_forward.response_logits, UlyssesSPAttentionHF.forward

    def recorded(model, batch, tokens):
        first = 0 if batch.position_ids is None else int(batch.position_ids[0, 0])
        slices.append((*batch.input_ids.shape, first))
        return real(model, batch, tokens)

    def counted(self, *args, **kwargs):
        ulysses_calls.append(1)
        return real_attention(self, *args, **kwargs)

    pair_forward.response_logits, UlyssesSPAttentionHF.forward = recorded, counted
    return real, real_attention


def counting_tiles(tiles: list):
    """Count the tiles every tiled head computes (each call adds ceil(positions / tile))."""
    real = tiled_head.TiledHeadLogProb.apply

    def counted(hidden, weight, bias, targets, tile, top_k):
        tiles.append(-(-hidden.shape[0] // tile))
        return real(hidden, weight, bias, targets, tile, top_k)

    tiled_head.TiledHeadLogProb.apply = counted
    return real


# Tiles of 3 positions: several per micro-batch even at one pair per micro-batch.
engines.tile_positions = lambda vocab_size: 3


def split_config(overrides: dict, model_dir: str, ds_config_path: str, split: str) -> object:
    micro, accum = map(int, split.split("x"))
    accum *= overrides.get("parallel.sequence", 1)
    return load_config(
        None,
        {
            "model.name_or_path": model_dir,
            "deepspeed.config": ds_config_path,
            **overrides,
            "data.max_length": 96,
            "data.max_prompt_length": 48,
            "data.eval_size": 0,
            "train.micro_batch_size": micro,
            "train.gradient_accumulation_steps": accum,
            "train.max_grad_norm": 0.0,
            "train.precision": "fp32",
            "train.max_steps": 2,
            "train.warmup_steps": 0,
            "train.lr": 1e-3,
            "train.weight_decay": 0.1,
            "train.seed": 7,
            "train.resume": "none",
        },
    )


def for_split(run, config):
    """``run`` with the engines it has, stepping in ``config``'s split: the sampler's micro-batches
    and the engine's accumulation boundary (DeepSpeed's public setters)."""
    train, dist = config.train, run.dist
    config.deepspeed.config = run.config.deepspeed.config
    run.policy.set_train_micro_batch_size(train.micro_batch_size)
    # DeepSpeed counts every rank as data-parallel (it is not told of sequence groups).
    run.policy.set_train_batch_size(train.micro_batch_size * train.gradient_accumulation_steps * dist.world_size)
    # A split starts on a boundary: the engine's micro-step count is a multiple of its accumulation.
    assert run.policy.micro_steps % train.gradient_accumulation_steps == 0, (run.policy.micro_steps, train)
    sampler = GlobalBatchSampler(
        len(run.train_examples),
        train.micro_batch_size,
        train.gradient_accumulation_steps,
        dist.data_rank,
        dist.data_ranks,
        train.seed,
    )
    return dataclasses.replace(run, config=config, sampler=sampler)


def restore_parameters(policy, values: dict) -> None:
    params = dict(policy.module.named_parameters())
    for name, value in values.items():
        with deepspeed.zero.GatheredParameters([params[name]], modifier_rank=0):
            params[name].data.copy_(value)


def close(run) -> None:
    run.policy.destroy()
    if run.reference is not None:
        run.reference.destroy()


def step_record(run, variant: str) -> dict:
    """One optimizer step of ``run`` (the global batch of step 0, or 1 for the _uneven variants)."""
    policy, reference, sampler, config = run.policy, run.reference, run.sampler, run.config
    step = 1 if variant.endswith("_uneven") else 0
    batches = run.micro_batches(step)
    if config.adapter.active:
        perturb_adapters(policy)
    grads = {}

    def capture():
        for name, param in policy.module.named_parameters():
            if param.requires_grad:
                grads[name] = safe_get_full_grad(param).detach().clone().cpu()

    tracks_update = variant in TRACKS_UPDATE
    before = full_parameters(policy) if tracks_update else None
    grad_storages = []  # what the optimizer steps with: views of DeepSpeed's buffer, or copies
    hook = policy.optimizer.optimizer.register_step_pre_hook(
        lambda optimizer, *_: grad_storages.extend(
            p.grad.untyped_storage().data_ptr() for group in optimizer.param_groups for p in group["params"]
        )
    )
    passes, packed_passes, tiles, slices, ulysses_calls = [], [], [], [], []
    real_tiled_apply = counting_tiles(tiles)
    real_slices = recording_slices(slices, ulysses_calls)
    real_with_head_input = recording_passes(passes)
    real_packed_with_head_input = recording_passes(packed_passes, packing)
    try:
        sums, totals = train_step(run, batches, before_update=capture)
    finally:
        prompt_sharing.with_head_input = real_with_head_input
        packing.with_head_input = real_packed_with_head_input
        tiled_head.TiledHeadLogProb.apply = real_tiled_apply
        from deepspeed.runtime.sequence_parallel.ulysses_sp import UlyssesSPAttentionHF

        pair_forward.response_logits, UlyssesSPAttentionHF.forward = real_slices
        hook.remove()
    partition = {
        name: (int(p.ds_tensor.numel()), int(p.ds_numel), int(p.numel()))
        for name, p in policy.module.named_parameters()
        if hasattr(p, "ds_tensor")
    }
    record = {
        "grads": grads,
        "metrics": reduce_metrics(sums),
        "leaf_modules": leaf_modules(policy),
        "reference_leaf_modules": leaf_modules(reference.engine) if reference else None,
        "pairs": float(totals.pairs),
        "partition": partition,
        "shared_passes": passes,
        "packed_passes": packed_passes,
        "head_tiles": sum(tiles),
        "row_slices": slices,
        "ulysses_calls": len(ulysses_calls),
        "full_widths": [batch.input_ids.shape[1] for batch in batches],
        "input_tokens": [int(batch.attention_mask.sum()) for batch in batches],
        "response_lengths": [batch.labels.ne(-100).sum(1).tolist() for batch in batches],
        "global_batch": sampler.global_batch(step),
        "batch_weights": [batch.weight for batch in batches],
    }
    if tracks_update:
        optimizer = policy.optimizer
        buffer = optimizer.grad_partitions_flat_buffer.untyped_storage().data_ptr()
        record.update(
            before=before,
            after=full_parameters(policy),
            master_is_partition=all(
                master.data_ptr() == partition.data_ptr()
                for master, partition in zip(
                    optimizer.fp32_partitioned_groups_flat, optimizer.fp16_partitioned_groups_flat
                )
            ),
            grads_are_buffer_views=bool(grad_storages) and set(grad_storages) == {buffer},
        )
    return record


def fits_by_default(variant: str, ranks: int) -> bool:
    """Whether a launch that names no variants runs ``variant``: a sequence group needs more ranks
    than one and a multiple of its size; a one-process baseline of sequence groups only runs there."""
    sequence = VARIANTS[variant].get("parallel.sequence", 1)
    if variant in NAMED_ONLY:
        return False
    if sequence > 1:
        return ranks > 1 and ranks % sequence == 0
    return ranks == 1 or variant not in SEQUENCE_BASELINES


def splits_of(variant: str, splits: list[str]) -> list[str]:
    """A sequence group's variant takes the middle split only: what it adds is the split of ranks
    into data and sequence; the micro-batch splits are every other variant's concern."""
    return [splits[len(splits) // 2]] if VARIANTS[variant].get("parallel.sequence", 1) > 1 else splits


def main(model_dir: str, ds_config_path: str, out_file: str, splits: str, reference_dir: str, only: str = "") -> None:
    dist = init_distributed()
    results = {}
    named = {
        "REFERENCE": reference_dir,
        "VARIED": varied_pairs(Path(f"{out_file}.varied.jsonl")),
        "UNEVEN": varied_pairs(Path(f"{out_file}.uneven.jsonl"), count=13),
        "QWEN3": str(Path(f"{out_file}.qwen3")),
        "QWEN3_REFERENCE": str(Path(f"{out_file}.qwen3_reference")),
    }
    if dist.rank == 0:  # Qwen3: q/k norms, and 4 heads of 16 dimensions (not hidden / heads)
        for name, seed in (("QWEN3", 5), ("QWEN3_REFERENCE", 6)):
            if not Path(named[name], "config.json").is_file():
                make_tiny_llama(named[name], model_dir, seed, "qwen3", head_dim=16, tie_word_embeddings=False)
    barrier()
    chosen = only.split(",") if only else [v for v in VARIANTS if fits_by_default(v, dist.world_size)]
    for variant in chosen:
        overrides = {k: named.get(v, v) if isinstance(v, str) else v for k, v in VARIANTS[variant].items()}
        run, start = None, None
        for split in splits_of(variant, splits.split(",")):
            config = split_config(overrides, model_dir, ds_config_path, split)
            if run is None or variant in TRACKS_UPDATE:
                if run is not None:
                    close(run)
                run = setup_run(config, dist)
                start = None if variant in TRACKS_UPDATE else full_parameters(run.policy)
            else:
                run = for_split(run, config)
                restore_parameters(run.policy, start)
            if "slice" not in results and hasattr(run.policy.module.get_input_embeddings().weight, "ds_shape"):
                results["slice"] = slice_rows(run.policy, dist.rank)
            results[f"{variant}:{split}"] = step_record(run, variant)
        close(run)
    torch.save(results, f"{out_file}.rank{dist.rank}")


if __name__ == "__main__":
    main(*sys.argv[1:7])
