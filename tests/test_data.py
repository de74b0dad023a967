import json

import pytest
import torch

from plot_ds.assets import champ_pairs
from plot_ds.data import (IGNORE_INDEX, DataError, GlobalBatchSampler, collate, example_counts,
                          load_pairs, split_pairs, tokenize_pair)


def test_builtin_champ_has_the_444_real_pairs():
    pairs = load_pairs("builtin:champ")
    assert len(pairs) == 444
    assert len({p["id"] for p in pairs}) == 444
    first = pairs[0]
    assert first["prompt"].startswith("Solve the following problem.")
    assert first["chosen"] != first["rejected"]
    assert all(p["chosen"].strip() and p["rejected"].strip() and p["answer"] for p in pairs)
    assert pairs == champ_pairs()  # deterministic order


def test_jsonl_and_json_files(tmp_path):
    records = [{"prompt": f"q{i}", "chosen": f"good {i}", "rejected": f"bad {i}"} for i in range(3)]
    (tmp_path / "pairs.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n\n")
    (tmp_path / "pairs.json").write_text(json.dumps(records))
    for name in ("pairs.jsonl", "pairs.json"):
        loaded = load_pairs(str(tmp_path / name))
        assert [(p["prompt"], p["chosen"], p["rejected"]) for p in loaded] == \
            [(r["prompt"], r["chosen"], r["rejected"]) for r in records]


@pytest.mark.parametrize("line, message", [
    ('{"prompt": "q", "chosen": "a"', "pairs.jsonl:2: not valid JSON"),
    ('{"prompt": "q", "chosen": "a"}', "pairs.jsonl:2: field 'rejected' is missing"),
    ('{"prompt": "q", "chosen": 3, "rejected": "b"}', "pairs.jsonl:2: field 'chosen' must be a string, got int"),
    ('{"prompt": "q", "chosen": " ", "rejected": "b"}', "pairs.jsonl:2: field 'chosen' is empty"),
    ('{"prompt": "q", "chosen": "same", "rejected": "same"}', "pairs.jsonl:2: fields 'chosen' and 'rejected' are identical"),
    ('[1, 2]', "pairs.jsonl:2: expected an object"),
])
def test_bad_records_name_file_line_and_field(tmp_path, line, message):
    path = tmp_path / "pairs.jsonl"
    path.write_text('{"prompt": "q", "chosen": "a", "rejected": "b"}\n' + line + "\n")
    with pytest.raises(DataError) as err:
        load_pairs(str(path))
    assert message in str(err.value)


def test_missing_file_and_unknown_builtin(tmp_path):
    with pytest.raises(DataError, match="no such data file"):
        load_pairs(str(tmp_path / "nope.jsonl"))
    with pytest.raises(DataError, match="unknown built-in dataset 'hh'"):
        load_pairs("builtin:hh")


def test_split_is_seeded_and_disjoint():
    pairs = [{"id": str(i)} for i in range(50)]
    train, held = split_pairs(pairs, 10, seed=3)
    assert len(train) == 40 and len(held) == 10
    assert not {p["id"] for p in train} & {p["id"] for p in held}
    assert split_pairs(pairs, 10, seed=3) == (train, held)
    assert split_pairs(pairs, 10, seed=4)[1] != held


@pytest.fixture(scope="module")
def tokenizer(real_model_dir):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(real_model_dir)


def test_tokenize_uses_chat_template_truncates_and_ends_with_eos(tokenizer):
    pair = {"id": "x", "prompt": "word " * 200, "chosen": "yes " * 300, "rejected": "no"}
    ex = tokenize_pair(tokenizer, pair, max_length=128, max_prompt_length=32)
    assert len(ex.prompt_ids) == 32 and ex.truncated
    assert tokenizer.decode(ex.prompt_ids).endswith("<|im_start|>assistant\n")  # kept the end
    assert len(ex.prompt_ids) + len(ex.chosen_ids) == 128
    assert ex.rejected_ids[-1] == tokenizer.eos_token_id
    short = tokenize_pair(tokenizer, {"id": "y", "prompt": "hi", "chosen": "a", "rejected": "b"}, 128, 32)
    assert not short.truncated
    assert tokenizer.decode(short.prompt_ids).startswith("<|im_start|>system")


def test_collate_labels_only_response_tokens(tokenizer):
    pairs = [{"id": "a", "prompt": "2+2?", "chosen": "4", "rejected": "5 or so"},
             {"id": "b", "prompt": "Capital of France, please?", "chosen": "Paris", "rejected": "Rome"}]
    examples = [tokenize_pair(tokenizer, p, 256, 128) for p in pairs]
    batch = collate(examples, tokenizer.pad_token_id)
    assert batch["input_ids"].shape[0] == 4  # chosen rows, then rejected rows
    for row, (ex, response) in enumerate([(e, e.chosen_ids) for e in examples] +
                                         [(e, e.rejected_ids) for e in examples]):
        labels = batch["labels"][row]
        n_prompt = len(ex.prompt_ids)
        assert (labels[:n_prompt] == IGNORE_INDEX).all()
        assert labels[n_prompt:n_prompt + len(response)].tolist() == response
        assert (labels[n_prompt + len(response):] == IGNORE_INDEX).all()
        assert batch["attention_mask"][row].sum() == n_prompt + len(response)
    counts = example_counts(examples)
    response_positions = (batch["labels"][:, 1:] != IGNORE_INDEX).sum(1)
    assert counts.tolist() == [2, float(response_positions[:2].sum()), float(response_positions[2:].sum()),
                               float(batch["attention_mask"].sum()), 1.0]


@pytest.mark.parametrize("world, micro, accum", [(1, 4, 2), (2, 2, 2), (2, 1, 4), (4, 2, 1)])
def test_sampler_global_batch_does_not_depend_on_the_split(world, micro, accum):
    samplers = [GlobalBatchSampler(37, micro, accum, rank, world, seed=5) for rank in range(world)]
    reference = GlobalBatchSampler(37, 8, 1, 0, 1, seed=5)
    assert samplers[0].steps_per_epoch == 4 and samplers[0].dropped_per_epoch == 5
    for step in range(9):  # crosses two epoch boundaries
        shares = [idx for s in samplers for mb in s.micro_batches(step) for idx in mb]
        assert all(len(mb) == micro for s in samplers for mb in s.micro_batches(step))
        assert shares == reference.global_batch(step)
    epoch = [i for step in range(4) for i in reference.global_batch(step)]
    assert len(set(epoch)) == 32  # no pair twice within an epoch
    next_epoch = [i for step in range(4, 8) for i in reference.global_batch(step)]
    assert epoch != next_epoch


def test_sampler_refuses_too_little_data():
    with pytest.raises(DataError, match="cannot fill one global batch of 8"):
        GlobalBatchSampler(5, 2, 2, 0, 2, seed=0)
