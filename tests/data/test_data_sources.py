"""Every source and format, and every kind of defect, reported as specified with nothing valid lost."""

import dataclasses
import gzip
import json

import pytest

from plot_ds.config import DataConfig
from plot_ds.data import DataError, load_pairs, prepare_datasets, split_transcripts

RECORDS = [
    {"id": f"p{i}", "prompt": f"What is {i}+{i}?", "chosen": f"{2 * i}", "rejected": f"{2 * i + 1}"} for i in range(5)
]


def triples(pairs):
    return [(p.prompt, p.chosen, p.rejected) for p in pairs]


EXPECTED = [(r["prompt"], r["chosen"], r["rejected"]) for r in RECORDS]


def write(path, kind):
    if kind == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    elif kind == "jsonl.gz":
        with gzip.open(path, "wt") as handle:
            handle.write("".join(json.dumps(r) + "\n" for r in RECORDS))
    elif kind == "json":
        path.write_text(json.dumps(RECORDS))
    elif kind == "csv":
        import csv

        with path.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(RECORDS[0]))
            writer.writeheader()
            writer.writerows(RECORDS)
    elif kind == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(RECORDS), path)


@pytest.mark.parametrize("kind", ["jsonl", "jsonl.gz", "json", "csv", "parquet"])
def test_each_file_type(tmp_path, kind):
    path = tmp_path / f"pairs.{kind}"
    write(path, kind)
    pairs, defects, n = load_pairs(str(path))
    assert n == 5 and not defects
    assert triples(pairs) == EXPECTED
    assert [p.id for p in pairs] == [r["id"] for r in RECORDS]
    assert {p.format for p in pairs} == {"explicit"}


def test_folder_of_files_and_saved_dataset(tmp_path):
    folder = tmp_path / "parts"
    folder.mkdir()
    (folder / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in RECORDS[:2]))
    (folder / "b.json").write_text(json.dumps(RECORDS[2:]))
    (folder / "notes.txt").write_text("ignored: not a data file")
    pairs, defects, _ = load_pairs(str(folder))
    assert triples(pairs) == EXPECTED and not defects

    from datasets import Dataset, DatasetDict

    saved = tmp_path / "saved"
    DatasetDict({"train": Dataset.from_list(RECORDS[:3]), "test": Dataset.from_list(RECORDS[3:])}).save_to_disk(
        str(saved)
    )
    train, _, _ = load_pairs(str(saved), split="train")
    test, _, _ = load_pairs(str(saved), split="test")
    assert triples(train) == EXPECTED[:3] and triples(test) == EXPECTED[3:]
    with pytest.raises(DataError, match="no split 'validation'"):
        load_pairs(str(saved), split="validation")


def test_hub_name_without_network_is_explained(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DataError, match="loading it as a Hugging Face dataset failed.*save_to_disk"):
        load_pairs("Anthropic/hh-rlhf")


def test_field_name_mapping(tmp_path):
    path = tmp_path / "mapped.jsonl"
    path.write_text(json.dumps({"question": "q", "good": "yes", "bad": "no"}) + "\n")
    config = DataConfig(prompt_field="question", chosen_field="good", rejected_field="bad")
    pairs, defects, _ = load_pairs(str(path), config)
    assert triples(pairs) == [("q", "yes", "no")] and not defects


HH = [
    {
        "chosen": "\n\nHuman: Hi there\n\nAssistant: Hello! How can I help?\n\nHuman: Name a fruit.\n\nAssistant: An apple.",
        "rejected": "\n\nHuman: Hi there\n\nAssistant: Hello! How can I help?\n\nHuman: Name a fruit.\n\nAssistant: A rock.",
    },
    # The responses share their first word: the prompt still ends at the turn boundary.
    {
        "chosen": "\n\nHuman: Capital of France?\n\nAssistant: Paris is the capital.",
        "rejected": "\n\nHuman: Capital of France?\n\nAssistant: Paris? No, Lyon.",
    },
]


def test_hh_implicit_prompt_file(tmp_path):
    path = tmp_path / "hh.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in HH))
    pairs, defects, _ = load_pairs(str(path))
    assert not defects and [p.format for p in pairs] == ["implicit", "implicit"]
    assert pairs[0].prompt.endswith("Name a fruit.\n\nAssistant:")
    assert (pairs[0].chosen, pairs[0].rejected) == (" An apple.", " A rock.")
    assert pairs[1].prompt == "\n\nHuman: Capital of France?\n\nAssistant:"
    assert pairs[1].chosen == " Paris is the capital."
    assert split_transcripts("Human: a", "Human: b", "\n\nAssistant:") is None


CONVERSATIONS = [
    {
        "prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}],
        "chosen": [{"role": "assistant", "content": "4"}],
        "rejected": [{"role": "assistant", "content": "5"}],
    },
    {
        "chosen": [{"role": "user", "content": "Sky colour?"}, {"role": "assistant", "content": "Blue."}],
        "rejected": [{"role": "user", "content": "Sky colour?"}, {"role": "assistant", "content": "Green."}],
    },
]


def test_conversational_file_with_the_chat_template(tmp_path, tiny_model_dir):
    from transformers import AutoTokenizer

    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in CONVERSATIONS))
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    config = DataConfig(source=str(path), eval_size=0, cache_dir=str(tmp_path / "cache"))
    train, _, reports = prepare_datasets(config, tokenizer)
    assert reports[0].formats == {"conversational": 2} and not reports[0].defects
    prompt = tokenizer.decode(train[0].prompt_ids)
    assert prompt.startswith("<|im_start|>system\nBe brief.<|im_end|>") and prompt.endswith("<|im_start|>assistant\n")
    assert tokenizer.decode(train[0].chosen_ids) == "4<|im_end|>"  # one end-of-turn, no doubled EOS
    assert tokenizer.decode(train[1].rejected_ids) == "Green.<|im_end|>"
    assert "Sky colour?" in tokenizer.decode(train[1].prompt_ids)


def test_conversational_without_template_is_a_clear_error(tmp_path, tiny_model_dir):
    from transformers import AutoTokenizer

    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps(CONVERSATIONS[0]) + "\n")
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    tokenizer.chat_template = None
    config = DataConfig(source=str(path), eval_size=0, cache=False)
    with pytest.raises(DataError, match="chat.jsonl:1: conversational data needs a chat template.*data.chat_template"):
        prepare_datasets(config, tokenizer)
    template = tmp_path / "template.jinja"
    template.write_text(
        "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}"
    )
    train, _, _ = prepare_datasets(dataclasses.replace(config, chat_template=str(template)), tokenizer)
    assert tokenizer.decode(train[0].prompt_ids) == "<system>Be brief.\n<user>2+2?\n<assistant>"


DEFECTS = [
    (b'{"prompt": "q", "chosen": "a", "rejected": "b", "id": "good1"}', None),
    (b'{"prompt": "q", "chosen": "a"', "line 2: not valid JSON"),
    (b'{"prompt": "q", "chosen": "a"}', "line 3: field 'rejected': is missing"),
    (b'{"prompt": "q", "chosen": 7, "rejected": "b"}', "line 4: field 'chosen': must be a string, got int"),
    (b'{"prompt": "q", "chosen": "   ", "rejected": "b"}', "line 5: field 'chosen': is empty"),
    (
        b'{"prompt": "q", "chosen": "same", "rejected": "same"}',
        "line 6: field 'chosen/rejected': chosen and rejected are identical",
    ),
    (b'{"prompt": "q", "chosen": "\xff\xfe bad bytes", "rejected": "b"}', "line 7: undecodable bytes"),
    (
        b'{"prompt": [{"role": "wizard", "content": "hi"}], "chosen": "a", "rejected": "b"}',
        "line 8: field 'prompt[0].role': 'wizard' is not one of",
    ),
    (
        b'{"prompt": "q", "chosen": "' + b"x " * 300 + b'A", "rejected": "' + b"x " * 300 + b'B"}',
        "line 9: field 'chosen/rejected': identical after truncation",
    ),
    (b'{"prompt": "q2", "chosen": "c", "rejected": "d", "id": "good2"}', None),
]


@pytest.fixture
def defect_file(tmp_path):
    path = tmp_path / "defects.jsonl"
    path.write_bytes(b"\n".join(line for line, _ in DEFECTS) + b"\n")
    return path


def test_strict_reports_every_bad_record_and_trains_nothing(defect_file, tiny_model_dir, tmp_path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    config = DataConfig(
        source=str(defect_file), eval_size=0, max_length=64, max_prompt_length=32, cache_dir=str(tmp_path / "cache")
    )
    with pytest.raises(DataError) as err:
        prepare_datasets(config, tokenizer)
    message = str(err.value)
    assert "8 bad record(s)" in message and "data.on_bad_record" in message
    for _, expected in DEFECTS:
        if expected:
            line, problem = expected.split(": ", 1)
            assert f"{defect_file}:{line.split()[1]}" in message and problem in message, (expected, message)


def test_skip_keeps_every_valid_pair_and_reports_the_rest(defect_file, tiny_model_dir, tmp_path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    config = DataConfig(
        source=str(defect_file),
        eval_size=0,
        max_length=64,
        max_prompt_length=32,
        on_bad_record="skip",
        cache_dir=str(tmp_path / "cache"),
    )
    train, _, reports = prepare_datasets(config, tokenizer)
    assert [e.id for e in train] == ["good1", "good2"]
    # 10 lines: 2 never became records (bad JSON, bad bytes), 6 records were bad, 2 were good.
    assert reports[0].records == 8 and reports[0].pairs == 2 and len(reports[0].defects) == 8
    text = reports[0].describe()
    for _, expected in DEFECTS:
        if expected:
            assert expected.split(": ", 1)[1] in text


def test_unreadable_and_unsupported_files_are_defects_not_crashes(tmp_path):
    folder = tmp_path / "mixed"
    folder.mkdir()
    (folder / "good.jsonl").write_text(json.dumps(RECORDS[0]) + "\n")
    (folder / "broken.jsonl.gz").write_bytes(b"not gzip at all")
    (folder / "broken.parquet").write_bytes(b"PAR1 nonsense")
    pairs, defects, _ = load_pairs(str(folder))
    assert triples(pairs) == EXPECTED[:1]
    assert {d.location for d in defects} == {str(folder / "broken.jsonl.gz"), str(folder / "broken.parquet")}
    assert all("unreadable file" in d.problem for d in defects)
    with pytest.raises(DataError, match="no such file or folder"):
        load_pairs(str(tmp_path / "missing.jsonl"))


def test_tokenised_once_then_read_from_the_cache(tmp_path, tiny_model_dir, monkeypatch):
    from transformers import AutoTokenizer
    import plot_ds.data as data

    path = tmp_path / "pairs.jsonl"
    write(path, "jsonl")
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    config = DataConfig(source=str(path), eval_size=2, cache_dir=str(tmp_path / "cache"))
    first = prepare_datasets(config, tokenizer)
    assert len(list((tmp_path / "cache").glob("*.safetensors"))) == 2  # train and eval
    calls = []
    monkeypatch.setattr(data, "tokenize_pairs", lambda *a, **k: calls.append(1))
    second = prepare_datasets(config, tokenizer)
    assert not calls and first[0] == second[0] and first[1] == second[1]
    monkeypatch.undo()
    prepare_datasets(dataclasses.replace(config, max_length=300), tokenizer)  # other settings: another key
    assert len(list((tmp_path / "cache").glob("*.safetensors"))) == 4
