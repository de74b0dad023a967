"""plot_ds/compare/model_eval.py: every metric of a model measured against the starting model equals
a hand computation with plain transformers, on one process and on 2 ZeRO-3 ranks."""

import json
import math
import sys

import pytest
import torch

from conftest import REPO, free_port, make_tiny_llama, run_command
from plot_ds.compare.model_eval import kl_per_row

ENTRY = REPO / "plot_ds" / "launch_entry.py"


def test_kl_per_row_is_zero_for_identical_logits_and_the_formula_otherwise():
    torch.manual_seed(0)
    logits, other = torch.randn(5, 7), torch.randn(5, 7)
    rows = torch.tensor([0, 0, 1, 2, 2])
    assert torch.equal(kl_per_row(logits, logits, rows, 3, chunk=2), torch.zeros(3))
    p, q = logits.softmax(-1), other.softmax(-1)
    by_position = (p * (p.log() - q.log())).sum(-1)
    expected = torch.stack([by_position[:2].sum(), by_position[2], by_position[3:].sum()])
    assert torch.allclose(kl_per_row(logits, other, rows, 3, chunk=2), expected, atol=1e-6)


@pytest.fixture(scope="module")
def two_models(real_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("compare_models")
    return make_tiny_llama(root / "start", real_model_dir, seed=0), make_tiny_llama(
        root / "trained", real_model_dir, seed=1
    )


@pytest.fixture(scope="module")
def reward_model(real_model_dir, tmp_path_factory):
    """A randomly initialised sequence-classification Llama with the real tokenizer."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForSequenceClassification

    target = tmp_path_factory.mktemp("reward_model")
    config = LlamaConfig(
        vocab_size=49152,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_labels=1,
        pad_token_id=2,
    )
    torch.manual_seed(3)
    LlamaForSequenceClassification(config).save_pretrained(target)
    AutoTokenizer.from_pretrained(real_model_dir).save_pretrained(target)
    return str(target)


def evaluation_config(tmp_path, start, zero3_config=None, reward=None):
    lines = [
        f"model: {{name_or_path: {start}}}",
        "data: {eval_size: 4, max_length: 64, max_prompt_length: 32, cache: false}",
        "train: {precision: fp32, eval_batch_size: 3}",
        "objective: {beta: 0.2}",
        f"eval: {{generations: 3, max_new_tokens: 6, reward_model: {reward or 'null'}}}",
    ]
    if zero3_config:
        lines.append(f"deepspeed: {{config: {zero3_config}}}")
    path = tmp_path / "config.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path


def run_evaluation(launcher, model, start, config, output):
    run_command(
        [
            *launcher,
            str(ENTRY),
            "compare-eval",
            model,
            "--config",
            str(config),
            "--start-model",
            start,
            "--output",
            str(output),
        ],
        timeout=600,
        output=output,
    )
    return json.loads(output.read_text())


def hand_computed(model_dir, start_dir, config_path, generations):
    from transformers import AutoModelForCausalLM

    from plot_ds.config import load_config
    from plot_ds.data import prepare_datasets
    from plot_ds.engine.models import load_tokenizer

    config = load_config(config_path)
    tokenizer = load_tokenizer(config)
    _, examples, _ = prepare_datasets(config.data, tokenizer)
    model, start = (AutoModelForCausalLM.from_pretrained(d).eval() for d in (model_dir, start_dir))
    pairs = {}
    with torch.no_grad():
        for ex in examples:
            values = {}
            for name, response in (("chosen", ex.chosen_ids), ("rejected", ex.rejected_ids)):
                ids = torch.tensor([ex.prompt_ids + response])
                positions = slice(len(ex.prompt_ids) - 1, ids.shape[1] - 1)
                log_p = model(ids).logits[0, positions].log_softmax(-1)
                log_q = start(ids).logits[0, positions].log_softmax(-1)
                target = torch.tensor(response)
                values[name] = float(log_p[range(len(response)), target].sum())
                values[f"start_{name}"] = float(log_q[range(len(response)), target].sum())
                if name == "chosen":
                    values["kl"] = float((log_p.exp() * (log_p - log_q)).sum(-1).clamp_min(0).sum()) / len(response)
            n_c, n_r = len(ex.chosen_ids), len(ex.rejected_ids)
            pairs[ex.id] = {
                "chosen_nll": -values["chosen"] / n_c,
                "chosen_nll_change": (values["start_chosen"] - values["chosen"]) / n_c,
                "reward_margin": 0.2
                * ((values["chosen"] - values["start_chosen"]) - (values["rejected"] - values["start_rejected"])),
                "preference_accuracy": float(values["chosen"] / n_c > values["rejected"] / n_r),
                "kl_to_start": values["kl"],
            }
        perplexities = {}
        for ex, record in zip(examples, generations):
            generated = model.generate(
                torch.tensor([ex.prompt_ids]),
                max_new_tokens=6,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
            )
            new = generated[0, len(ex.prompt_ids) :].tolist()
            new = new[: new.index(tokenizer.eos_token_id)] if tokenizer.eos_token_id in new else new
            ids = torch.tensor([ex.prompt_ids + new])
            log_q = start(ids).logits[0, len(ex.prompt_ids) - 1 : -1].log_softmax(-1)
            nll = -log_q[range(len(new)), torch.tensor(new)].mean()
            perplexities[ex.id] = (tokenizer.decode(new, skip_special_tokens=True), len(new), math.exp(float(nll)))
    return pairs, perplexities


def check_against_hand(report, pairs, perplexities):
    assert [r["id"] for r in report["pairs"]] == report["held_out_ids"] == list(pairs)
    for record in report["pairs"]:
        expected = pairs[record["id"]]
        for metric, value in expected.items():
            # The margin is a difference of sums of ~500 nats: float32 rounding is ~1e-5 of it.
            tolerance = 2e-4 if metric == "reward_margin" else 1e-5
            assert record[metric] == pytest.approx(value, rel=1e-4, abs=tolerance), metric
        assert record["reward_accuracy"] == float(expected["reward_margin"] > 0)
    assert len(report["generations"]) == 3
    for record in report["generations"]:
        text, length, perplexity = perplexities[record["id"]]
        assert (record["generation"], record["length"]) == (text, length)
        assert record["start_perplexity"] == pytest.approx(perplexity, rel=1e-4)


def hand_rewards(reward_model, records):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(reward_model)
    model = AutoModelForSequenceClassification.from_pretrained(reward_model).eval()
    with torch.no_grad():
        return [
            float(model(**tokenizer(r["prompt"] + r["generation"], return_tensors="pt")).logits[0, 0]) for r in records
        ]


def test_every_metric_equals_a_hand_computation(two_models, reward_model, tmp_path):
    start, trained = two_models
    config = evaluation_config(tmp_path, start, reward=reward_model)
    report = run_evaluation([sys.executable], trained, start, config, tmp_path / "eval.json")
    pairs, perplexities = hand_computed(trained, start, config, report["generations"])
    assert any(abs(p["kl_to_start"]) > 1e-3 for p in pairs.values())  # the models do differ
    check_against_hand(report, pairs, perplexities)
    expected = hand_rewards(reward_model, report["generations"])
    assert [r["reward"] for r in report["generations"]] == pytest.approx(expected, rel=1e-5)
    assert len(set(expected)) > 1
    itself = run_evaluation([sys.executable], start, start, config, tmp_path / "start.json")
    for record in itself["pairs"]:
        assert record["kl_to_start"] == 0.0 and record["chosen_nll_change"] == 0.0 and record["reward_margin"] == 0.0


def test_two_zero3_ranks_give_the_same_records(two_models, tmp_path, zero3_test_config):
    start, trained = two_models
    config = evaluation_config(tmp_path, start, zero3_test_config)
    launcher = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        "--master_addr=127.0.0.1",
        f"--master_port={free_port()}",
    ]
    report = run_evaluation(launcher, trained, start, config, tmp_path / "eval.json")
    pairs, perplexities = hand_computed(trained, start, config, report["generations"])
    check_against_hand(report, pairs, perplexities)
