"""What PLOT's one-hot term does to a model, position by position, next to the plain NLL term.

With a one-hot target, W_t = sum_{i in S_t} p~_t(i) c(i, y_t): the restricted probability mass off
the target, weighted by each token's cost to it. If the embedding geometry made near-synonyms
cheap, W_t would be much smaller than that mass, ``1 - p~_t(y_t)``, for the positions where the
model hesitates between near-synonyms, and PLOT would pull differently from the NLL term. This
measures, on training pairs (never the held-out ones) and with the starting model:

- the share of the off-target mass the cost keeps: ``W_t / (1 - p~_t(y_t))`` (1 = a uniform cost),
- how much of the off-target mass sits on tokens close to the target (cosine > 0.5),
- the size of PLOT's gradient on the logits against the NLL term's, per position and overall,
  i.e. the alpha at which PLOT would pull as hard as the NLL term at weight 1.

    python bench/plot_gradient_scale.py [--pairs 64] [--section.key value ...]

Defaults are the comparison grid's (configs/grids/champ.yaml): SmolLM2-135M-Instruct, CHAMP, 160
tokens of which the prompt takes at most 80. Prints one JSON line.
"""

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from plot_ds.config import load_config, parse_overrides  # noqa: E402
from plot_ds.data import prepare_datasets  # noqa: E402
from plot_ds.objectives.plot_loss import top_k_support  # noqa: E402
from plot_ds.engine.model_source import model_source  # noqa: E402
from plot_ds.engine.models import load_tokenizer  # noqa: E402
from plot_ds.objectives.plot_loss import cost_from_cosine, restricted_supports  # noqa: E402

GRID_SHAPES = ["--data.max_length", "160", "--data.max_prompt_length", "80", "--data.eval_size", "40"]
CLOSE_COSINE = 0.5


def response_logits(model, example) -> tuple[torch.Tensor, torch.Tensor]:
    """The logits that predict each chosen-response token, and those tokens."""
    ids = torch.tensor([example.prompt_ids + example.chosen_ids])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0]
    start = len(example.prompt_ids)
    return logits[start - 1 : start - 1 + len(example.chosen_ids)].float(), torch.tensor(example.chosen_ids)


def position_statistics(
    logits: torch.Tensor, targets: torch.Tensor, unit_rows: torch.Tensor, top_k: int, cost: str
) -> dict[str, torch.Tensor]:
    """Per position: p(y), p~(y), W, the off-target mass close to y, and the two gradient norms."""
    logits = logits.detach().requires_grad_(True)
    supports = restricted_supports(top_k_support(logits, targets, top_k), targets)
    cosine = (unit_rows[supports.ids] * unit_rows[targets].unsqueeze(1)).sum(-1)
    costs = cost_from_cosine(cosine, cost).masked_fill(~supports.valid, 0.0)
    w = (supports.probs * costs).sum(-1)
    nll = torch.nn.functional.cross_entropy(logits, targets, reduction="none")
    (grad_w,) = torch.autograd.grad(w.sum(), logits, retain_graph=True)
    (grad_nll,) = torch.autograd.grad(nll.sum(), logits)
    rows = torch.arange(len(targets))
    p_target = supports.probs[rows, supports.target_slot]
    off_target = supports.valid.clone()
    off_target[rows, supports.target_slot] = False
    close = off_target & (cosine > CLOSE_COSINE)
    return {
        "p_full": nll.detach().neg().exp(),
        "p_restricted": p_target.detach(),
        "w": w.detach(),
        "close_mass": (supports.probs * close).sum(-1).detach(),
        "grad_w": grad_w.norm(dim=-1),
        "grad_nll": grad_nll.norm(dim=-1),
    }


def summarise(stats: dict[str, torch.Tensor]) -> dict:
    off_mass = 1.0 - stats["p_restricted"]
    hesitant = off_mass > 0.1  # positions where the model is not already sure of the target
    kept = stats["w"][hesitant] / off_mass[hesitant]
    ratio = stats["grad_w"] / stats["grad_nll"].clamp_min(1e-12)
    return {
        "positions": int(stats["w"].numel()),
        "hesitant_positions": int(hesitant.sum()),
        "mean_p_target": float(stats["p_full"].mean()),
        "mean_w": float(stats["w"].mean()),
        "mean_off_target_mass": float(off_mass.mean()),
        # 1.0: the cost treats every other token alike, and W is just the off-target mass.
        "w_over_off_target_mass": {
            "mean": float(kept.mean()),
            "p10": float(kept.quantile(0.1)),
            "p90": float(kept.quantile(0.9)),
        },
        "close_share_of_off_target_mass": float(stats["close_mass"][hesitant].sum() / off_mass[hesitant].sum()),
        "grad_ratio_plot_over_nll": {
            "overall": float(stats["grad_w"].norm() / stats["grad_nll"].norm()),
            "median_position": float(ratio.median()),
            "median_hesitant_position": float(ratio[hesitant].median()),
        },
    }


def main(argv=None) -> dict:
    from transformers import AutoModelForCausalLM

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config")
    parser.add_argument("--pairs", type=int, default=64, help="training pairs to measure on")
    args, rest = parser.parse_known_args(argv)
    config = load_config(args.config, parse_overrides(GRID_SHAPES + rest))
    tokenizer = load_tokenizer(config)
    train_examples, _, _ = prepare_datasets(config.data, tokenizer)
    source, _ = model_source(config.model.name_or_path, config.model.revision, config.model.trust_remote_code)
    model = AutoModelForCausalLM.from_pretrained(
        source, dtype=torch.float32, trust_remote_code=config.model.trust_remote_code
    ).eval()
    weight = (
        model.get_output_embeddings() if config.plot.embedding == "output" else model.get_input_embeddings()
    ).weight
    unit_rows = torch.nn.functional.normalize(weight.detach().float(), dim=-1)
    collected: dict[str, list] = {}
    for example in train_examples[: args.pairs]:
        logits, targets = response_logits(model, example)
        for key, value in position_statistics(
            logits, targets, unit_rows, config.plot.top_k or weight.shape[0], config.plot.cost
        ).items():
            collected.setdefault(key, []).append(value)
    result = {
        "model": config.model.name_or_path,
        "data": config.data.source,
        "pairs": min(args.pairs, len(train_examples)),
        "top_k": config.plot.top_k,
        "cost": config.plot.cost,
        **summarise({key: torch.cat(values) for key, values in collected.items()}),
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
