"""Sequence parallelism's pieces that need no second rank: how a batch is cut among a group (the
multi-rank step is tested against one process in tests/training/test_training_distributed.py), which
models and settings are refused, and how the counts of a pair are counted once."""

import pytest
import torch
from transformers import Gemma2Config, LlamaConfig, MistralConfig, Qwen2Config

from plot_ds.config import ConfigError, load_config
from plot_ds.data import collate
from plot_ds.data.tokenize import TokenizedPair
from plot_ds.distributed.process_group import DistInfo
from plot_ds.forward.sequence_parallel import SequenceGroup, why_not_sequence_parallel
from plot_ds.pair_batch import IGNORE_INDEX, PairCounts, ResponseTokens
from plot_ds.training.run import sequence_parallel_dist


def batch_of_pairs():
    ids = [(11 * i + 5) % 1000 for i in range(60)]
    pairs = [
        TokenizedPair("a", ids[:7], ids[7:20], ids[20:24]),
        TokenizedPair("b", ids[24:27], ids[27:30], ids[30:53]),
    ]
    return collate(pairs, pad_id=0)


@pytest.mark.parametrize("size", [2, 3, 4, 8])
def test_each_response_position_is_one_ranks_at_its_place_in_the_row(size):
    """Rows padded to a multiple of the group, cut into contiguous slices; the position that ends a
    slice predicts the token that starts the next (targets read from whole rows), so the ranks'
    positions are exactly the whole rows' and their per-row sums add up to the whole rows'."""
    batch = batch_of_pairs()
    whole = ResponseTokens.of(batch.labels)
    width = batch.input_ids.shape[1]
    values = torch.randn(whole.targets.shape[0], dtype=torch.float64)
    by_place = {(int(r), int(c)): v for r, c, v in zip(whole.rows, whole.cols, values)}
    seen, sums = [], torch.zeros(whole.n_rows, dtype=torch.float64)
    for index in range(size):
        sharded, local = SequenceGroup(size, index, None).shard(batch, whole)
        piece = -(-width // size)
        start = index * piece
        assert sharded.input_ids.shape == sharded.labels.shape == (4, piece)
        assert torch.equal(sharded.position_ids[0], torch.arange(start, start + piece))
        assert bool((local.cols >= 0).all() and (local.cols < piece).all())
        padded = torch.nn.functional.pad(batch.input_ids, (0, piece * size - width))
        assert torch.equal(sharded.input_ids, padded[:, start : start + piece])
        for row, col, target in zip(local.rows, local.cols, local.targets):
            place = (int(row), int(col) + start)
            seen.append(place)
            assert int(target) == int(batch.labels[place[0], place[1] + 1]) != IGNORE_INDEX
        sums += local.row_sums(torch.tensor([by_place[p] for p in seen[len(seen) - local.rows.numel() :]]))
    assert sorted(seen) == sorted(by_place)
    torch.testing.assert_close(sums, whole.row_sums(values), rtol=0, atol=1e-12)


def test_a_pair_is_counted_by_the_first_rank_of_its_group_only():
    counts = PairCounts(pairs=2, chosen_tokens=9, rejected_tokens=5, input_tokens=40, micro_batches=1)
    first, other = SequenceGroup(4, 0, None), SequenceGroup(4, 3, None)
    assert first.counted(counts) == counts
    assert other.counted(counts) == PairCounts(micro_batches=1)


def test_the_world_must_split_into_groups():
    dist = DistInfo(rank=5, local_rank=1, world_size=6, device=torch.device("cpu"))
    assert sequence_parallel_dist(load_config(None, {"parallel.sequence": 3}), dist).data_rank == 1
    with pytest.raises(ConfigError, match="the 6 ranks of this launch do not split into groups of 4"):
        sequence_parallel_dist(load_config(None, {"parallel.sequence": 4}), dist)


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ({"data.packing": True}, "data.packing true: it puts several sequences in one row"),
        ({"model.share_prompt": True}, "model.share_prompt true"),
        ({"plot.granularity": "sequence", "plot.solver": "emd"}, "plot.granularity sequence"),
        ({"model.attn_implementation": "eager"}, "model.attn_implementation eager"),
        ({"parallel.sequence": 0}, "parallel.sequence: must be >= 1"),
    ],
)
def test_settings_that_need_whole_rows_are_refused_with_sequence_groups(setting, message):
    overrides = {"parallel.sequence": 2, **setting}
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)
    if "parallel.sequence" not in setting:
        load_config(None, {**overrides, "parallel.sequence": 1})  # fine without groups


def small(config_class, **settings):
    return config_class(hidden_size=96, num_hidden_layers=1, vocab_size=100, **settings)


@pytest.mark.parametrize(
    ("config", "size", "max_length", "reason"),
    [
        (small(LlamaConfig, num_attention_heads=8, num_key_value_heads=2), 4, 512, None),
        (small(LlamaConfig, num_attention_heads=8, num_key_value_heads=2), 8, 512, None),  # kv replicated
        (small(LlamaConfig, num_attention_heads=6, num_key_value_heads=6), 4, 512, "6 attention heads"),
        (small(Qwen2Config, num_attention_heads=12, num_key_value_heads=3), 4, 512, "3 key/value heads"),
        (small(MistralConfig, num_attention_heads=4, num_key_value_heads=2, sliding_window=256), 2, 512, "256"),
        (small(MistralConfig, num_attention_heads=4, num_key_value_heads=2, sliding_window=4096), 2, 512, None),
        (small(Qwen2Config, num_attention_heads=4, num_key_value_heads=2, sliding_window=64), 2, 512, None),
        (small(Gemma2Config, num_attention_heads=4, num_key_value_heads=2, head_dim=16), 2, 512, "soft-caps"),
    ],
)
def test_models_whose_attention_cannot_split_are_named(config, size, max_length, reason):
    """Ulysses gives each rank whole heads (key/value heads may be replicated to the group) and
    attends causally over whole rows: no sliding window shorter than the rows, no soft cap."""
    got = why_not_sequence_parallel(config, size, max_length)
    if reason is None:
        assert got is None
    else:
        assert reason in got
