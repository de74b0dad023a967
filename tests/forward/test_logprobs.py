import pytest
import torch

from plot_ds.pair_batch import IGNORE_INDEX, PairBatch, PairCounts
from plot_ds.forward.logprobs import saved_by_its_own_node, target_logps, target_logps_and_support
from plot_ds.objectives.plot_loss import top_k_support
from plot_ds.pair_batch import PairLogps, ResponseTokens
from plot_ds.forward.pair_forward import forward_pairs


def direct_row_logps(logits, labels):
    sums, counts = [], []
    for row in range(labels.shape[0]):
        total, n = torch.zeros((), dtype=torch.double), 0
        for t in range(labels.shape[1] - 1):
            target = labels[row, t + 1]
            if target != IGNORE_INDEX:
                total = total + torch.log_softmax(logits[row, t].double(), -1)[target]
                n += 1
        sums.append(total)
        counts.append(n)
    return torch.stack(sums), counts


def test_target_logps_value_and_gradient_match_log_softmax():
    torch.manual_seed(0)
    logits = torch.randn(4, 7, 11, dtype=torch.bfloat16)
    labels = torch.randint(0, 11, (4, 7))
    labels[:, :3] = IGNORE_INDEX  # prompt
    labels[1, 5:] = IGNORE_INDEX  # padding
    tokens = ResponseTokens.of(labels)
    ours = tokens.select(logits).float().requires_grad_()
    sums = tokens.row_sums(target_logps(ours.to(torch.bfloat16), tokens.targets, chunk=3))
    expected_logits = logits.float().requires_grad_()
    expected, counts = direct_row_logps(expected_logits, labels)
    assert sums.dtype == torch.float64  # a response's sum in float64 (ResponseTokens.row_sums)
    torch.testing.assert_close(sums.double(), expected, rtol=1e-5, atol=1e-5)
    assert tokens.row_counts().tolist() == counts
    weights = torch.tensor([0.5, -1.0, 2.0, 0.25])
    (sums * weights).sum().backward()
    (expected * weights.double()).sum().backward()
    torch.testing.assert_close(ours.grad, tokens.select(expected_logits.grad), rtol=0, atol=1e-2)  # bf16 logits
    exact = tokens.select(logits).float().requires_grad_()
    (tokens.row_sums(target_logps(exact, tokens.targets, chunk=2)) * weights).sum().backward()
    reference = tokens.select(logits).float().requires_grad_()
    (
        tokens.row_sums(torch.log_softmax(reference, -1).gather(-1, tokens.targets[:, None]).squeeze(-1)) * weights
    ).sum().backward()
    torch.testing.assert_close(exact.grad, reference.grad, rtol=0, atol=1e-6)


def test_in_place_gradient_equals_the_allocated_one_and_takes_the_logits_place():
    torch.manual_seed(1)
    targets = torch.randint(0, 300, (40,))
    weights = torch.randn(40)
    grads = []
    for in_place in (False, True):
        x = torch.randn(40, 300, generator=torch.Generator().manual_seed(2)).requires_grad_()
        logits = x * 1.0  # a head's output: not a leaf
        (target_logps(logits, targets, chunk=16, in_place_grad=in_place) * weights).sum().backward()
        grads.append(x.grad)
        assert torch.equal(logits.detach(), x.detach()) != in_place  # overwritten by its gradient
    torch.testing.assert_close(grads[1], grads[0], rtol=0, atol=0)


@pytest.mark.parametrize("read", ["both", "logps", "support"])
def test_support_logits_read_in_the_log_prob_pass_equal_reading_them_apart(read):
    """The support logits come out of the log-prob pass and their gradient goes into its backward:
    the same values and gradients as autograd's gather beside ``target_logps``, whichever output a
    loss reads."""
    generator = torch.Generator().manual_seed(4)
    logits = torch.randn(9, 13, generator=generator)
    targets = torch.randint(0, 13, (9,), generator=generator)
    targets[0] = logits[0].argmax()  # a target among the top k: its slot after the top k repeats it
    weights = torch.randn(9, 5, generator=generator)
    fused, apart = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    logps, support = target_logps_and_support(fused * 1.0, targets, top_k=4, chunk=4, in_place_grad=True)
    separate = top_k_support(apart, targets, top_k=4)
    assert torch.equal(support.ids, separate.ids) and support.ids[0, 0] == support.ids[0, -1] == targets[0]
    assert torch.equal(support.logits, separate.logits)
    torch.testing.assert_close(logps, target_logps(logits, targets), rtol=0, atol=0)

    # An output no loss reads gets no gradient at all (None), not zeros.
    def loss(logps, support_logits):
        return (logps.sum() if read != "support" else 0.0) + (
            (support_logits * weights).sum() if read != "logps" else 0.0
        )

    loss(logps, support.logits).backward()
    loss(target_logps(apart, targets), separate.logits).backward()
    torch.testing.assert_close(fused.grad, apart.grad, rtol=0, atol=1e-6)


def test_in_place_gradient_is_refused_where_the_logits_are_saved_by_their_own_op():
    x = torch.randn(5, 7, requires_grad=True)
    assert not saved_by_its_own_node(x @ torch.randn(7, 9))  # a linear head saves its inputs
    assert saved_by_its_own_node(torch.tanh(x) * 1.0) is False  # the product is not what tanh saved
    assert saved_by_its_own_node(torch.tanh(x))  # tanh keeps its result
    assert not saved_by_its_own_node(x.detach())


def test_forward_pairs_projects_only_response_positions_and_matches_full_logits():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=50,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
        )
    )
    input_ids = torch.randint(0, 50, (4, 9))
    labels = input_ids.clone()
    labels[:, :4] = IGNORE_INDEX
    labels[3, 7:] = IGNORE_INDEX
    attention_mask = torch.ones_like(input_ids)
    attention_mask[3, 7:] = 0
    seen = []
    model.lm_head.register_forward_hook(lambda module, args, out: seen.append(args[0].shape))
    out = forward_pairs(model, PairBatch(input_ids, attention_mask, labels, [], PairCounts()), keep_logits=True)
    n_response = int((labels[:, 1:] != IGNORE_INDEX).sum())
    assert seen == [torch.Size([n_response, 16])]  # the head saw only the response positions
    full = model(input_ids=input_ids, attention_mask=attention_mask).logits
    expected, counts = direct_row_logps(full.detach(), labels)
    torch.testing.assert_close(
        torch.cat([out.logps.chosen, out.logps.rejected]).double(), expected, rtol=1e-5, atol=1e-5
    )
    torch.testing.assert_close(out.logits, out.tokens.select(full), rtol=1e-5, atol=1e-5)
    assert torch.cat([out.logps.chosen_tokens, out.logps.rejected_tokens]).tolist() == counts


def test_forward_pairs_head_gradient_with_plot_is_the_same_in_place_allocated_or_fused(monkeypatch):
    """DPO-style log-probs and PLOT read the same logits; the gradient written over them must
    give the model exactly the gradient of a separately allocated one."""
    from transformers import LlamaConfig, LlamaForCausalLM

    import plot_ds.forward.logprobs as logprobs
    from plot_ds.config import PlotConfig
    from plot_ds.distributed.embedding_slice import EmbeddingRows
    from plot_ds.objectives.objective import GlobalTotals
    from plot_ds.objectives.plot_loss import PLOTLoss

    input_ids = torch.randint(0, 50, (4, 9), generator=torch.Generator().manual_seed(3))
    labels = input_ids.clone()
    labels[:, :4] = IGNORE_INDEX
    batch = PairBatch(input_ids, torch.ones_like(input_ids), labels, [], PairCounts())
    totals = GlobalTotals(*torch.tensor([2.0, 10.0, 10.0, 36.0, 1.0]).unbind())
    grads = []
    # PLOT reading the kept logits, over them and allocated; then its supports read in the log-prob
    # pass (the training path), whose gradient is added there.
    for in_place, top_k in ((True, 0), (False, 0), (True, 5)):
        monkeypatch.setattr(logprobs, "saved_by_its_own_node", lambda tensor: not in_place)
        torch.manual_seed(0)
        model = LlamaForCausalLM(
            LlamaConfig(
                vocab_size=50,
                hidden_size=16,
                intermediate_size=32,
                num_hidden_layers=1,
                num_attention_heads=2,
                num_key_value_heads=1,
                tie_word_embeddings=True,
            )
        )
        out = forward_pairs(model, batch, keep_logits=not top_k, top_k=top_k)
        assert (out.logits is None) == bool(top_k) and (out.support is None) != bool(top_k)
        plot, _ = PLOTLoss(
            PlotConfig(top_k=5, rejected_weight=0.3), EmbeddingRows(model.get_input_embeddings().weight)
        )(out, None, totals)
        (plot + out.logps.chosen.sum() - 0.5 * out.logps.rejected.sum()).backward()
        grads.append({name: param.grad.clone() for name, param in model.named_parameters()})
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=0, atol=0, msg=name)
        torch.testing.assert_close(grads[2][name], grads[1][name], rtol=1e-5, atol=1e-7, msg=name)


def test_pair_rows_are_chosen_then_rejected():
    pair = PairLogps.from_rows(torch.tensor([1.0, 2.0, 3.0, 4.0]), torch.tensor([5, 6, 7, 8]))
    assert pair.chosen.tolist() == [1.0, 2.0] and pair.rejected.tolist() == [3.0, 4.0]
    assert pair.chosen_tokens.tolist() == [5, 6] and pair.rejected_tokens.tolist() == [7, 8]
