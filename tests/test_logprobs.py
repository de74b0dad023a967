import torch

from plot_ds.data import IGNORE_INDEX
from plot_ds.logprobs import PairLogps, sequence_logps


def test_sequence_logps_matches_a_direct_computation():
    torch.manual_seed(0)
    logits = torch.randn(4, 7, 11, dtype=torch.bfloat16)
    labels = torch.randint(0, 11, (4, 7))
    labels[:, :3] = IGNORE_INDEX  # prompt
    labels[1, 5:] = IGNORE_INDEX  # padding
    sums, counts = sequence_logps(logits, labels, rows_per_chunk=3)
    expected_sums, expected_counts = [], []
    for row in range(4):
        total, n = 0.0, 0
        for t in range(6):
            target = labels[row, t + 1]
            if target != IGNORE_INDEX:
                total += torch.log_softmax(logits[row, t].double(), -1)[target].item()
                n += 1
        expected_sums.append(total)
        expected_counts.append(n)
    assert sums.dtype == torch.float32
    torch.testing.assert_close(sums.double(), torch.tensor(expected_sums, dtype=torch.double), rtol=1e-5, atol=1e-5)
    assert counts.tolist() == expected_counts


def test_pair_rows_are_chosen_then_rejected():
    pair = PairLogps.from_rows(torch.tensor([1.0, 2.0, 3.0, 4.0]), torch.tensor([5, 6, 7, 8]))
    assert pair.chosen.tolist() == [1.0, 2.0] and pair.rejected.tolist() == [3.0, 4.0]
    assert pair.chosen_tokens.tolist() == [5, 6] and pair.rejected_tokens.tolist() == [7, 8]
