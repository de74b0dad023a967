import pytest

from plot_ds.data import DataError, GlobalBatchSampler, TokenizedPair, collate
from plot_ds.pair_batch import PairCounts


@pytest.mark.parametrize("world, micro, accum", [(1, 4, 2), (2, 2, 2), (2, 1, 4), (4, 2, 1), (3, 2, 2)])
def test_global_batch_does_not_depend_on_the_split_and_every_pair_is_used_once(world, micro, accum):
    samplers = [GlobalBatchSampler(37, micro, accum, rank, world, seed=5) for rank in range(world)]
    reference = GlobalBatchSampler(37, samplers[0].global_batch_size, 1, 0, 1, seed=5)
    per_epoch = samplers[0].steps_per_epoch
    assert per_epoch == -(-37 // samplers[0].global_batch_size)
    for step in range(3 * per_epoch):  # three epochs
        shares = [idx for s in samplers for mb in s.micro_batches(step) for idx in mb]
        assert shares == reference.global_batch(step)
        assert all(len(s.micro_batches(step)) == accum for s in samplers)
    for epoch in range(3):
        seen = [
            i
            for step in range(epoch * per_epoch, (epoch + 1) * per_epoch)
            for s in samplers
            for mb in s.micro_batches(step)
            for i in mb
        ]
        assert sorted(seen) == list(range(37))  # every pair once: none twice, none dropped
    first = [i for step in range(per_epoch) for i in reference.global_batch(step)]
    second = [i for step in range(per_epoch, 2 * per_epoch) for i in reference.global_batch(step)]
    assert first != second  # reshuffled each epoch


def test_last_batch_is_dealt_evenly():
    samplers = [GlobalBatchSampler(10, 2, 1, rank, 4, seed=0) for rank in range(4)]
    assert samplers[0].steps_per_epoch == 2 and samplers[0].last_batch_size == 2
    sizes = [len(s.micro_batches(1)[0]) for s in samplers]
    assert sizes == [1, 1, 0, 0]


def test_position_round_trip_and_refusal():
    sampler = GlobalBatchSampler(37, 2, 2, 0, 2, seed=5)
    state = sampler.state_dict(11)
    assert state["epoch"] == 11 // sampler.steps_per_epoch
    assert GlobalBatchSampler(37, 2, 2, 0, 2, seed=5).load_state_dict(state) == 11
    with pytest.raises(DataError, match="global_batch_size was 8 and is now 12"):
        GlobalBatchSampler(37, 2, 3, 0, 2, seed=5).load_state_dict(state)
    with pytest.raises(DataError, match="num_pairs was 37 and is now 36"):
        GlobalBatchSampler(36, 2, 2, 0, 2, seed=5).load_state_dict(state)


def test_empty_micro_batch_becomes_a_weightless_filler():
    filler = TokenizedPair("f", [1, 2], [3], [4])
    batch = collate([], pad_id=0, filler=filler)
    assert batch.filler and batch.weight == 0.0 and batch.pair_ids == []
    assert batch.counts == PairCounts(micro_batches=1)  # counts one micro-batch, nothing else
    assert batch.input_ids.shape == (2, 3)
    with pytest.raises(ValueError, match="filler"):
        collate([], pad_id=0)
