"""A model's forward over pair batches, probed for host waits along the whole training loss path."""

import pytest
import torch

import plot_ds.forward.logprobs as logprobs
import plot_ds.forward.packing as packing
import plot_ds.forward.pair_forward as pair_forward
import plot_ds.forward.prompt_sharing as prompt_sharing_module
from host_waits import HostWaits
from plot_ds.config import load_config
from plot_ds.data import collate
from plot_ds.data.tokenize import TokenizedPair
from plot_ds.distributed.embedding_slice import embedding_rows_for
from plot_ds.objectives.objective import build_objective
from plot_ds.pair_batch import GlobalTotals
from plot_ds.forward.packing import Packing
from plot_ds.forward.micro_batch import PairModels, forward_micro_batch
from plot_ds.forward.reference import LiveReference
from plot_ds.forward.prompt_sharing import prompt_sharing


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=64,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            tie_word_embeddings=True,
            pad_token_id=2,
            eos_token_id=2,
        )
    )
    model.config._attn_implementation = "sdpa"
    return model


BATCH = [
    TokenizedPair("a", [5, 6, 7, 8, 9], [10, 11, 12, 2], [13, 2]),
    TokenizedPair("b", [20, 21], [22, 2], [23, 24, 25, 26, 27, 2]),
    TokenizedPair("c", [30, 31, 32], [2], [33, 34, 2]),
]


def transfer_marking(probe, monkeypatch):
    """``to_device`` as on a GPU: a new tensor that lives on the device (marked), not the host one."""

    def to_device(tensor, device):
        return probe.mark(tensor.clone())

    for module in (logprobs, pair_forward, prompt_sharing_module, packing):
        monkeypatch.setattr(module, "to_device", to_device, raising=False)


@pytest.mark.parametrize(
    "share", [False, True, "packed", "packed-shared"], ids=["full-rows", "shared-prompt", "packed", "packed-shared"]
)
@pytest.mark.parametrize(
    "overrides",
    [
        {"objective.name": "dpo"},  # the default: one-hot closed form
        {"objective.name": "dpo", "plot.top_k": 0},  # the whole vocabulary
        {"objective.name": "dpo", "plot.target": "ref_mix", "plot.solver": "sinkhorn", "plot.sinkhorn_iters": 5},
        {"objective.terms": {"dpo": 1.0, "sft": 0.2}, "plot.rejected_weight": 0.3},
    ],
    ids=["onehot", "full-vocabulary", "ref_mix-sinkhorn", "rpo+rejected"],
)
def test_the_training_loss_path_never_waits_for_the_device(monkeypatch, share, overrides):
    """From the batch on the host to the parameters' gradients, one process with the embedding
    matrix whole (the slice path of several ZeRO-3 ranks does wait, README.md says so): the
    reference forward, the policy forward (the head hook, prompt sharing's passes, packed rows), log-probs, DPO
    and PLOT, and the backward. The response positions come from the labels on the host."""
    config = load_config(None, {**overrides, "plot.top_k": overrides.get("plot.top_k", 5)})
    policy, reference = tiny_llama(), tiny_llama()
    reference.requires_grad_(False)
    objective = build_objective(config, embedding_rows_for(policy, config.plot))
    batch = collate(BATCH, pad_id=2)
    sharing = (
        prompt_sharing(policy, share)
        if isinstance(share, bool)
        else Packing(share_prompt=share == "packed-shared", varlen=False)
    )
    with HostWaits(policy, reference) as probe:
        transfer_marking(probe, monkeypatch)
        totals = GlobalTotals.from_counts(probe.mark(batch.counts.as_tensor()))
        layout = pair_forward.ForwardLayout(sharing)
        models = PairModels(policy, layout, LiveReference(reference, layout))
        result = forward_micro_batch(models, batch, objective.needs, objective, totals)
        loss, metrics, policy_out = result.loss, result.metrics, result.policy
        loss.backward()
        assert probe.seen == [], probe.seen
        # transformers' own mask preparation reads values back (bool of an .all()), once per forward
        # of a prompt-sharing pass or a full-rows pass: not plot_ds's, and said so in README.md.
        assert {wait.split(" in ")[1] for wait in probe.elsewhere} <= {"transformers/masking_utils.py"}
        # The probe sees waits where they are: value-dependent sizes, read-backs, host copies.
        loss.item(), policy_out.logps.chosen.tolist(), metrics["loss/total"].cpu()
        torch.equal(policy_out.logps.chosen, policy_out.logps.chosen)
        policy_out.tokens.targets.nonzero()
    assert probe.seen == ["item", "_local_scalar_dense", "tolist", "cpu", "equal", "nonzero"], probe.seen
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in policy.parameters())
    assert metrics["loss/plot"] > 0
