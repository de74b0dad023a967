"""TRL's own DPOTrainer loss (``_compute_loss``, TRL 1.16) on given per-sequence log-probs: a
stand-in model hands it per-token log-probs that sum to them, so that plot_ds's objectives can be
compared with TRL's on identical inputs, values and gradients."""

import collections
import types

import torch


def trl_loss(
    loss_types,
    loss_weights,
    chosen,
    rejected,
    ref_chosen,
    ref_rejected,
    chosen_tokens,
    rejected_tokens,
    beta=0.1,
    label_smoothing=0.0,
):
    """(TRL's loss, d loss / d (chosen, rejected) sequence log-probs)."""
    from trl.trainer.dpo_trainer import DPOTrainer

    pairs = chosen.shape[0]
    lengths = torch.cat([chosen_tokens, rejected_tokens]).long()
    width = int(lengths.max()) + 1
    completion_mask = torch.zeros(2 * pairs, width, dtype=torch.long)
    per_token = torch.zeros(2 * pairs, width - 1, dtype=torch.float64)
    for row, (total, n) in enumerate(zip(torch.cat([chosen, rejected]).double().tolist(), lengths.tolist())):
        completion_mask[row, 1 : 1 + n] = 1
        per_token[row, :n] = total / n
    per_token.requires_grad_(True)
    zeros = torch.zeros(2 * pairs, width - 1)
    outputs = types.SimpleNamespace(log_probs=per_token, entropy=zeros, mean_logits=zeros, is_top1=zeros.bool())
    trainer = DPOTrainer.__new__(DPOTrainer)  # no model, data or accelerator: only the loss is used
    trainer.__dict__.update(
        model=types.SimpleNamespace(training=True),
        aux_loss_enabled=False,
        ld_alpha=None,
        precompute_ref_logps=True,
        accelerator=types.SimpleNamespace(
            device=torch.device("cpu"), gather_for_metrics=lambda t: t, gather=lambda t: t
        ),
        f_divergence_type="reverse_kl",
        loss_types=list(loss_types),
        loss_weights=list(loss_weights),
        beta=beta,
        label_smoothing=label_smoothing,
        use_weighting=False,
        _tp_size=1,
        _total_train_tokens=0,
        _metrics={"train": collections.defaultdict(list), "eval": collections.defaultdict(list)},
        _is_vision_dataset=False,
        state=types.SimpleNamespace(global_step=0),
    )
    inputs = {
        "input_ids": torch.zeros(2 * pairs, width, dtype=torch.long),
        "attention_mask": completion_mask.clone(),
        "completion_mask": completion_mask,
        "ref_chosen_logps": ref_chosen.double(),
        "ref_rejected_logps": ref_rejected.double(),
    }
    loss = trainer._compute_loss(lambda **_: outputs, inputs, return_outputs=False)
    loss.backward()
    grad = per_token.grad[:, 0]  # every token of a sequence carries d loss / d (its sum)
    return loss.detach(), grad[:pairs], grad[pairs:]
