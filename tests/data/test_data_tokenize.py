import json

import pytest

from plot_ds.assets import champ_pairs
from plot_ds.config import DataConfig
from plot_ds.data import IGNORE_INDEX, Pair, collate, example_counts, load_pairs, prepare_datasets, split_pairs
from plot_ds.pair_batch import PairCounts
from plot_ds.data.tokenize import Renderer, tokenize_pair


def test_builtin_champ_has_the_444_real_pairs():
    pairs, defects, records = load_pairs("builtin:champ")
    assert records == 444 and len(pairs) == 444 and not defects
    assert len({p.id for p in pairs}) == 444
    assert pairs[0].prompt.startswith("Solve the following problem.")
    assert all(p.extra["answer"] for p in pairs)
    assert [p.id for p in pairs] == [p["id"] for p in champ_pairs()]  # deterministic order


def test_split_is_seeded_and_disjoint():
    pairs = [Pair(str(i), f"f:{i}", "explicit", f"prompt {i}", "a", "b") for i in range(50)]
    train, held = split_pairs(pairs, 10, seed=3)
    assert len(train) == 40 and len(held) == 10
    assert not {p.id for p in train} & {p.id for p in held}
    assert split_pairs(pairs, 10, seed=3) == (train, held)
    assert split_pairs(pairs, 10, seed=4)[1] != held


def test_split_keeps_every_prompt_on_one_side():
    from plot_ds.assets import champ_pairs

    pairs, _, _ = load_pairs("builtin:champ")
    assert len({p.prompt for p in pairs}) == 243 < len(pairs) == len(champ_pairs())  # several pairs a prompt
    for size, seed in ((40, 1234), (8, 1), (100, 7)):
        train, held = split_pairs(pairs, size, seed)
        assert len(held) == size and len(train) + size == len(pairs)
        assert not {p.prompt for p in train} & {p.prompt for p in held}
    conversational = [
        Pair(str(i), "f", "conversational", [{"role": "user", "content": f"q{i % 3}"}], "a", "b") for i in range(9)
    ]
    train, held = split_pairs(conversational, 3, seed=0)
    assert len(held) == 3 and len({json.dumps(p.prompt) for p in held}) == 1


@pytest.fixture(scope="module")
def tokenizer(real_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(real_model_dir)


def explicit(prompt, chosen, rejected, id="x"):
    return Pair(id, f"test:{id}", "explicit", prompt, chosen, rejected)


def test_tokenize_uses_chat_template_truncates_and_ends_with_eos(tokenizer):
    renderer = Renderer(tokenizer)
    ex, defect = tokenize_pair(tokenizer, renderer, explicit("word " * 200, "yes " * 300, "no"), 128, 32)
    assert defect is None
    assert len(ex.prompt_ids) == 32 and ex.prompt_truncated and ex.response_truncated
    assert tokenizer.decode(ex.prompt_ids).endswith("<|im_start|>assistant\n")  # kept the end
    assert len(ex.prompt_ids) + len(ex.chosen_ids) == 128
    assert ex.rejected_ids[-1] == tokenizer.eos_token_id
    short, _ = tokenize_pair(tokenizer, renderer, explicit("hi", "a", "b"), 128, 32)
    assert not short.truncated
    assert tokenizer.decode(short.prompt_ids).startswith("<|im_start|>system")


def test_chat_template_none_keeps_explicit_prompts_raw(tokenizer):
    ex, _ = tokenize_pair(tokenizer, Renderer(tokenizer, "none"), explicit("What is 2+2?", " 4", " 5"), 128, 64)
    assert tokenizer.decode(ex.prompt_ids) == "What is 2+2?"
    conversational = Pair(
        "c",
        "test:c",
        "conversational",
        [{"role": "user", "content": "hi"}],
        [{"role": "assistant", "content": "a"}],
        [{"role": "assistant", "content": "b"}],
    )
    with pytest.raises(Exception, match="needs a chat template"):
        tokenize_pair(tokenizer, Renderer(tokenizer, "none"), conversational, 128, 64)


def test_implicit_prompts_are_not_templated(tokenizer):
    pair = Pair("h", "test:h", "implicit", "\n\nHuman: hi\n\nAssistant:", " hello", " go away")
    ex, _ = tokenize_pair(tokenizer, Renderer(tokenizer), pair, 128, 64)
    assert tokenizer.decode(ex.prompt_ids) == "\n\nHuman: hi\n\nAssistant:"
    assert tokenizer.decode(ex.chosen_ids) == " hello<|im_end|>"


def test_collate_labels_only_response_tokens(tokenizer):
    renderer = Renderer(tokenizer)
    examples = [
        tokenize_pair(tokenizer, renderer, explicit(*p), 256, 128)[0]
        for p in [("2+2?", "4", "5 or so", "a"), ("Capital of France, please?", "Paris", "Rome", "b")]
    ]
    batch = collate(examples, tokenizer.pad_token_id)
    assert batch.input_ids.shape[0] == 4 and not batch.filler  # chosen rows, then rejected rows
    for row, (ex, response) in enumerate(
        [(e, e.chosen_ids) for e in examples] + [(e, e.rejected_ids) for e in examples]
    ):
        labels = batch.labels[row]
        n_prompt = len(ex.prompt_ids)
        assert (labels[:n_prompt] == IGNORE_INDEX).all()
        assert labels[n_prompt : n_prompt + len(response)].tolist() == response
        assert (labels[n_prompt + len(response) :] == IGNORE_INDEX).all()
        assert batch.attention_mask[row].sum() == n_prompt + len(response)
    counts = example_counts(examples)
    response_positions = (batch.labels[:, 1:] != IGNORE_INDEX).sum(1)
    assert (
        counts
        == batch.counts
        == PairCounts(
            pairs=2,
            chosen_tokens=float(response_positions[:2].sum()),
            rejected_tokens=float(response_positions[2:].sum()),
            input_tokens=float(batch.attention_mask.sum()),
            micro_batches=1,
        )
    )


def test_prepare_datasets_on_the_default_data(tokenizer, tmp_path):
    config = DataConfig(cache_dir=str(tmp_path))
    train, held, reports = prepare_datasets(config, tokenizer)
    assert len(train) == 436 and len(held) == 8
    assert reports[0].pairs == 436 and reports[0].formats == {"explicit": 436} and not reports[0].defects
    assert reports[0].response_truncated > 0  # CHAMP solutions are long; counted, not hidden
    assert "436 pairs from 444 records" in reports[0].summary()
